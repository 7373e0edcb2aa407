"""Seed 0 of the cpu preset, Phases 2-3 and the evaluation, printed to full float precision, to compare two
versions of the code bit for bit (docs/log.md, 2026-12-07). Run it from the checkout under test, which it imports
(the cwd); both share one Phase 1 cache, so only Phases 2-3 differ:

    cd CHECKOUT && python /path/to/bench/bitexact_seed0.py bf16|fp32 [CACHE_DIR]
"""
import dataclasses, json, os, sys, tempfile
sys.path.insert(0, os.getcwd())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import spoonfeed_helpers as sf
cfg = dataclasses.replace(sf.make_config("cpu"), cache_dir=sys.argv[2] if len(sys.argv) > 2 else "spoonfeed_cache", precision=sys.argv[1], seed=0)
cache = sf.cache_teacher_states(cfg, progress=False)
with tempfile.TemporaryDirectory() as d:
    run = dataclasses.replace(cfg, run_dir=d)
    model = sf.build_student(run, cache)
    h2 = sf.train_superposition(model, cache, run, progress=False)
    h3 = sf.train_lm_head(model, cache, run, progress=False)
    m = sf.evaluate(model, cache, precision=run.precision)["metrics"]
print(json.dumps({"file": sf.__file__, "precision": sys.argv[1], "ce": m["student_ce"], "gain": m["cosine_gain"],
                  "loss2_last": h2["loss"][-1], "loss3_last": h3["loss"][-1]}))
