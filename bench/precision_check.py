"""What PRECISION costs in quality and buys in time, on the `cpu` preset (not CI). One run, one machine:

    python bench/precision_check.py                      # Phase 1 check + seeds 0 and 1 in fp32 and bf16
    python bench/precision_check.py --only phase1        # the teacher check alone
    python bench/precision_check.py --samples 512,1024   # + the samples / minutes / held-out CE trade-off (bf16)
    python bench/precision_check.py --smoke              # toy sizes, to check that the script runs

1. Phase 1: the bundled teacher over the preset's blocks in float32 and in bf16 (separate caches). Reported: the
   mean cosine between the two sets of cached states over every token, and the teacher's held-out CE (its own
   head over its cached states) each way. Targets: cosine >= 0.999, |delta CE| <= 0.01 nats/token.
2. Seeds 0 and 1: Phases 2 and 3 and the evaluation in fp32 (on the fp32 cache) and in bf16 (on the bf16 cache),
   as the notebook runs them. Targets: |delta held-out CE| <= 0.05 nats/token and |delta cosine gain| <= 0.005.
3. --samples: the preset in bf16 with NUM_CACHE_SAMPLES at each value (Phase 1 from an empty cache, Phases 2-3,
   the evaluation): minutes against held-out CE.
Every phase's wall time is printed; --out writes the figures as JSON.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import spoonfeed_helpers as sf  # noqa: E402
from bench.run import machine_name  # noqa: E402


@torch.no_grad()
def states_cosine(a: sf.TeacherCache, b: sf.TeacherCache) -> float:
    """Mean cosine between two caches' states over every token, training and held-out."""
    total, n = 0.0, 0
    for split, count in (("train", a.num_train), ("val", a.num_val)):
        for i in range(0, count, 32):
            idx = np.arange(i, min(i + 32, count))
            total += torch.nn.functional.cosine_similarity(a.states(split, idx).float(), b.states(split, idx).float(),
                                                           dim=-1).sum().item()
            n += len(idx) * a.seq_len
    return total / n


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def phase1(cfg, figures):
    caches = {}
    for precision in ("fp32", "bf16"):
        caches[precision], seconds = timed(lambda: sf.cache_teacher_states(dataclasses.replace(cfg, precision=precision),
                                                                          progress=False))
        figures[f"phase1_{precision}_s"] = seconds
        figures[f"teacher_ce_{precision}"] = caches[precision].teacher_ce()  # as evaluate computes it
        print(f"Phase 1 {precision}: {seconds:.0f} s (a reused cache takes ~0 s), teacher held-out CE "
              f"{figures[f'teacher_ce_{precision}']:.4f}", flush=True)
    figures["states_cosine_bf16_vs_fp32"] = states_cosine(caches["fp32"], caches["bf16"])
    figures["teacher_ce_delta"] = figures["teacher_ce_bf16"] - figures["teacher_ce_fp32"]
    print(f"Phase 1: mean cosine bf16 vs fp32 states {figures['states_cosine_bf16_vs_fp32']:.5f} (target >= 0.999); "
          f"teacher CE delta {figures['teacher_ce_delta']:+.4f} nats (target |d| <= 0.01)", flush=True)
    return caches


def train_and_score(cfg, cache):
    """Phases 2 and 3 from scratch in a temporary RUN_DIR, then evaluate: (metrics, seconds per part)."""
    with tempfile.TemporaryDirectory() as d:
        run = dataclasses.replace(cfg, run_dir=d)
        model = sf.build_student(run, cache)
        _, t2 = timed(lambda: sf.train_superposition(model, cache, run, progress=False))
        _, t3 = timed(lambda: sf.train_lm_head(model, cache, run, progress=False))
        report, te = timed(lambda: sf.evaluate(model, cache, precision=run.precision))
        prompts = sf.ORIGINAL_PROMPTS
        tok = sf.load_tokenizer(run.teacher)
        _, tg = timed(lambda: sf.generate_text(model, tok, prompts, run.seq_len // 2, 0.0, precision=run.precision))
    return report["metrics"], {"phase2_s": t2, "phase3_s": t3, "evaluate_s": te, "generate_s": tg}


def seeds(cfg, caches, figures, seed_list):
    rows = []
    for seed in seed_list:
        pair = {}
        for precision in ("fp32", "bf16"):
            run = dataclasses.replace(cfg, precision=precision, seed=seed)
            m, t = train_and_score(run, caches[precision])
            pair[precision] = m
            rows.append({"seed": seed, "precision": precision, "ce": m["student_ce"], "cosine_gain": m["cosine_gain"],
                         "cosine": m["student_cosine"], **t})
            print(f"seed {seed} {precision}: held-out CE {m['student_ce']:.4f}, cosine gain {m['cosine_gain']:.4f} "
                  f"(cosine {m['student_cosine']:.4f}); " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), flush=True)
        d_ce = pair["bf16"]["student_ce"] - pair["fp32"]["student_ce"]
        d_gain = pair["bf16"]["cosine_gain"] - pair["fp32"]["cosine_gain"]
        rows.append({"seed": seed, "delta_ce": d_ce, "delta_cosine_gain": d_gain})
        print(f"seed {seed}: bf16 - fp32: CE {d_ce:+.4f} (target |d| <= 0.05), cosine gain {d_gain:+.4f} "
              f"(target |d| <= 0.005)", flush=True)
    figures["seeds"] = rows


def samples(cfg, values, figures):
    rows = []
    for n in values:
        with tempfile.TemporaryDirectory() as d:
            run = dataclasses.replace(cfg, num_samples=n, precision="bf16", cache_dir=d)
            t = time.perf_counter()
            cache = sf.cache_teacher_states(run, progress=False)
            t1 = time.perf_counter() - t
            m, parts = train_and_score(run, cache)
        minutes = (t1 + parts["phase2_s"] + parts["phase3_s"] + parts["evaluate_s"]) / 60
        rows.append({"num_samples": n, "minutes_phase1_to_eval": minutes, "phase1_s": t1, **parts,
                     "ce": m["student_ce"], "cosine_gain": m["cosine_gain"]})
        print(f"num_samples {n}: {minutes:.1f} min (Phase 1 {t1:.0f} s), held-out CE {m['student_ce']:.4f}, "
              f"cosine gain {m['cosine_gain']:.4f}", flush=True)
    figures["samples"] = rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="phase1,seeds", help="phase1, seeds (needs phase1's caches), or both")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", default="", help="comma-separated NUM_CACHE_SAMPLES values for the trade-off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = sf.make_config("smoke" if args.smoke else "cpu")
    if args.smoke:
        cfg = dataclasses.replace(cfg, cache_dir=tempfile.mkdtemp(prefix="precision-smoke-"))
    figures = {"machine": machine_name(), "preset": "smoke" if args.smoke else "cpu",
               "bf16_path": sf.precision_policy("cpu", "bf16").reason}
    print(f"Machine: {figures['machine']}\nbf16: {figures['bf16_path']}", flush=True)
    parts = args.only.split(",")
    if "phase1" in parts or "seeds" in parts:
        caches = phase1(cfg, figures)
        if "seeds" in parts:
            seeds(cfg, caches, figures, [int(s) for s in args.seeds.split(",") if s])
    if args.samples:
        samples(cfg, [int(s) for s in args.samples.split(",") if s], figures)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
