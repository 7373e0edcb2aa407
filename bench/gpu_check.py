"""The notebook's path on a real GPU, headless and self-contained: each phase's time and peak memory, twice.

    python bench/gpu_check.py                   # CUDA: under 4 minutes on an H200 (default student and batch)
    python bench/gpu_check.py --smoke           # CPU, toy shapes, seconds (run by the tests)

It needs no hub, no network, no bitsandbytes, datasets or gguf. The teacher is a random Qwen2 at the Colab
teacher's shapes (Qwen2.5-Coder-1.5B: width 1536, 12 heads, 2 KV heads, MLP 8960, vocab 151936, 28 layers unless
--teacher-layers says fewer), written with save_pretrained into a temp folder beside a word-level tokenizer
built from the data, and loaded back by the notebook's own `load_teacher` (AutoModelForCausalLM.from_pretrained).
The data is the stdlib corpus (the Python standard library's source). The student and batch are the form's
defaults (768x12x12, batch 16, seq 128, 500 samples). Then the notebook's helper calls run in order: Phase 1,
Phase 2, Phase 3, evaluate, save, generate and the ablation, with --steps optimiser steps a phase.

It does this twice:
  1. "auto": the precision policy's choice for this card (bf16 autocast on capability >= 8.0);
  2. "T4": the T4's policy forced (torch.cuda.get_device_capability patched to 7.5): fp16 autocast with a
     GradScaler and the teacher in float32, so the T4 code path runs on real CUDA. bitsandbytes is absent here,
     so Phase 1 holds the whole float32 teacher (Colab's T4 loads it in 4-bit NF4: much less).
For each phase: seconds (CUDA synchronised) and torch.cuda.max_memory_allocated since the phase began (GiB).
The figures go to $OUT/gpu_check.json when OUT is set, else runs/gpu_check.json, written after every phase,
so a run cut short keeps what it measured.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402

QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, num_hidden_layers=28, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True)
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=4096,
            num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=True)
FORM = dict(num_samples=500, seq_len=128, student_dim=768, student_layers=12, student_heads=12, batch_size=16)
SMOKE_FORM = dict(num_samples=16, val_samples=4, seq_len=32, student_dim=32, student_layers=2, student_heads=2,
                  batch_size=4)
EOS = "<|endoftext|>"


def write_teacher(folder: Path, shape: dict, device, texts) -> Path:
    """A random Qwen2 at `shape` plus a word-level tokenizer of the data's most common words (ids < vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    try:
        with torch.device(device):  # initialised where it runs: seconds on a GPU instead of a minute on CPU
            model = Qwen2ForCausalLM(Qwen2Config(**shape))
    except Exception as e:  # some transformers versions refuse a device context without accelerate
        print(f"building the teacher on CPU ({type(e).__name__}: {str(e)[:120]})", flush=True)
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model = model.to(torch.bfloat16)  # Qwen's checkpoints are bf16
    model.save_pretrained(folder)
    del model
    counts = Counter(w for t in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(t))
    words = [w for (w, _), _ in counts.most_common(min(shape["vocab_size"], 60000) - 2)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", EOS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=EOS).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def forced_t4(device: torch.device):
    """The T4's policy: on CUDA by reporting capability 7.5 to precision_policy; on CPU (smoke) by returning the
    fp16 + GradScaler policy directly, since CPU otherwise stays float32."""
    if device.type == "cuda":
        real = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = lambda d=None: (7, 5)
        try:
            yield
        finally:
            torch.cuda.get_device_capability = real
    else:  # every module that looks precision_policy up: the helper and the package's phases, metrics, generation
        callers = [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("spoonfeed")
                   and getattr(m, "precision_policy", None) is sf.precision_policy and m.__name__ != "spoonfeed.precision"]
        real = sf.precision_policy
        forced = lambda device="auto", precision="auto": sf.Precision(  # noqa: E731
            "cpu", torch.float16, True, torch.float32, "T4 policy forced on CPU (smoke)")
        for m in callers:
            m.precision_policy = forced
        try:
            yield
        finally:
            for m in callers:
                m.precision_policy = real


class Stopwatch:
    def __init__(self, device, result, out):
        self.device, self.result, self.out = device, result, out

    @contextlib.contextmanager
    def phase(self, run: dict, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        row = {"phase": name}
        run["phases"].append(row)
        try:
            yield row
            row["ok"] = True
        except Exception as e:  # keep measuring the other phases; the error is in the JSON
            row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if cuda:
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["seconds"] = time.perf_counter() - t
        print(f"  [{run['policy']}] {name:<10} {row['seconds']:7.1f} s  peak {row.get('peak_gib', float('nan')):6.2f} GiB"
              + ("" if row["ok"] else f"  FAILED: {row['error'][:200]}"), flush=True)
        self.out.write_text(json.dumps(self.result, indent=1))


def run_policy(name, cfg, teacher_dir, device, watch, args):
    policy = sf.precision_policy(device)
    run = {"policy": name, "precision": policy.reason, "autocast": str(policy.autocast),
           "grad_scaler": policy.grad_scaler, "teacher_dtype": str(policy.teacher), "phases": []}
    watch.result["runs"].append(run)
    print(f"{name}: {policy.reason}", flush=True)
    cache = student = None
    with watch.phase(run, "phase1"):
        cache = sf.cache_teacher_states(cfg, progress=False)
    if cache is None:
        return
    with watch.phase(run, "build"):
        student = sf.build_student(cfg, cache)
    with watch.phase(run, "phase2") as row:
        h = sf.train_superposition(student, cache, cfg, progress=False)
        row["loss"] = h["loss"][-1]
        row["val_cosine"] = h["val_cosine"][-1]
    with watch.phase(run, "phase3") as row:
        h = sf.train_lm_head(student, cache, cfg, progress=False)
        row["val_ce"] = h["val_ce"][-1]
    with watch.phase(run, "evaluate") as row:
        row["metrics"] = sf.evaluate(student, cache)["metrics"]
    with watch.phase(run, "save") as row:
        sf.save_pretrained(student, Path(cfg.run_dir) / "student")
        row["ternary_file_bytes"] = sf.export_ternary(student, Path(cfg.run_dir) / "student-ternary")["file_bytes"]
    with watch.phase(run, "generate") as row:
        tok = sf.load_tokenizer(cfg.teacher)
        row["texts"] = [g.text or g.error for g in sf.generate_text(student, tok, sf.ORIGINAL_PROMPTS, args.new_tokens, 0.7, seed=0)]
    if args.ablation:
        with watch.phase(run, "ablation") as row:
            row["verdict"] = sf.run_ablation(cache, cfg, progress=False)["verdict"]
    del student, cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy shapes on whatever device there is (tests)")
    ap.add_argument("--steps", type=int, default=20, help="Phase 2 steps (Phase 3 and the ablation: half)")
    ap.add_argument("--teacher-layers", type=int, default=None, help="teacher depth (default 28, Qwen2.5-1.5B's)")
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--no-ablation", dest="ablation", action="store_false")
    ap.add_argument("--policies", default="auto,T4", help="comma-separated: auto, T4")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or runs/gpu_check.json)")
    args = ap.parse_args(argv)
    device = sf.pick_device("auto")
    shape = dict(TINY if args.smoke else QWEN_1_5B)
    if args.teacher_layers:
        shape["num_hidden_layers"] = args.teacher_layers
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                            else ROOT / "runs" / "gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    import importlib.util

    import transformers

    for pkg in ("accelerate", "bitsandbytes", "datasets", "gguf"):
        print(f"{pkg}: {'installed' if importlib.util.find_spec(pkg) else 'absent'}", flush=True)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"device": card, "torch": torch.__version__, "transformers": transformers.__version__,
              "teacher_shape": shape, "form": SMOKE_FORM if args.smoke else FORM, "steps": args.steps, "runs": []}
    print(f"{card}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    if shape["num_hidden_layers"] != QWEN_1_5B["num_hidden_layers"] and not args.smoke:
        print(f"teacher: {shape['num_hidden_layers']} layers instead of 28, as asked (--teacher-layers): Phase 1's "
              "time and the teacher's memory scale with the depth", flush=True)
    watch = Stopwatch(device, result, out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = [t for _, t in zip(range(400), sf.iter_texts(sf.STDLIB_CORPUS))]
        t = time.perf_counter()
        teacher = write_teacher(tmp / "teacher", shape, device, texts)
        result["teacher_write_seconds"] = time.perf_counter() - t
        print(f"random Qwen2 teacher written in {result['teacher_write_seconds']:.0f} s", flush=True)
        form = SMOKE_FORM if args.smoke else FORM
        steps = max(1, args.steps)
        for name in args.policies.split(","):
            cfg = sf.make_config(
                teacher=str(teacher), dataset=sf.STDLIB_CORPUS, **form, superposition_steps=steps,
                lm_head_steps=max(1, steps // 2), warmup_steps=min(5, steps // 2), eval_every=steps,
                ckpt_every=steps, cache_dir=str(tmp / f"cache-{name}"), run_dir=str(tmp / f"run-{name}"),
                ablation_steps=max(1, steps // 2), ablation_head_steps=max(1, steps // 4))
            with forced_t4(device) if name == "T4" else contextlib.nullcontext():
                run_policy(name, cfg, teacher, device, watch, args)
            sf.release_memory()
    result["total_seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=1))
    print(f"total {result['total_seconds']:.0f} s; figures in {out}")
    return result


if __name__ == "__main__":
    main()
