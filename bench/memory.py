"""Peak memory of each notebook cell at the Colab defaults, measured on CPU; the CUDA peak computed from it.

    nice -n 19 python bench/memory.py            # the default shapes, one step a phase: ~15 minutes on 2 cores
    python bench/memory.py --smoke               # toy shapes, seconds (run by the tests)

The default shapes are the form's: vocab 151936 and teacher width 1536 (Qwen2.5-Coder-1.5B), student
768x12 layers x12 heads, 500 + 64 blocks of 128 tokens, batch 16. Phase 1 runs the real
`cache_teacher_states` with a stand-in teacher of that width and vocab whose body returns random states:
a real 1.5B teacher is out of reach of 2 CPU cores, and its own weights are Phase 1's peak on a GPU
(see docs/colab.md). Every later cell runs the notebook's own helper calls, one optimiser step a phase
(memory does not grow with steps), the ablation included, with the main student kept resident as in
the notebook.

How it measures: the process's peak resident set (VmHWM) is reset before each cell through
/proc/self/clear_refs and read after it. "Tensors" is that peak minus the resident set of the bare
runtime (torch and the helper imported, no tensors), which is what a GPU would hold: weights, gradients,
optimizer state, activations and the teacher head all live on the device in a CUDA run, while the
runtime stays on the host. The CPU run computes in float32; on a T4 (fp16 autocast) the activations kept
for backward are about half as large and autocast adds fp16 copies of the weights, so the float32 figure
is the estimate we give for CUDA. bench/gpu_check.py measures torch.cuda.max_memory_allocated on a real GPU.

Also printed: the checkpoint sizes on disk at these shapes, computed from the parameter counts (below).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from spoonfeed.config import TEACHERS, RunConfig  # noqa: E402

_, _TEACHER_DIM, _VOCAB = TEACHERS[RunConfig.teacher]  # the default teacher's (context, width, vocab)
DEFAULTS = dict(vocab=_VOCAB, teacher_dim=_TEACHER_DIM, num_samples=500, val_samples=64, seq_len=128, student_dim=768,
                student_layers=12, student_heads=12, batch_size=16)
SMOKE = dict(vocab=512, teacher_dim=48, num_samples=16, val_samples=4, seq_len=16, student_dim=32,
             student_layers=2, student_heads=2, batch_size=4)
T4_GIB = 15.0  # the free Colab GPU's memory (nvidia-smi shows 15360 MiB)


# --- a stand-in teacher at the real width and vocab --------------------------------------------------------

class HashTokenizer:
    """Whitespace words hashed into the vocab: enough for pack_blocks, no tokenizer files needed."""

    eos_token_id, eos_token, unk_token_id, unk_token = 0, "<eos>", None, None  # what check_eos reads

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in text.split()])


class RandomStatesTeacher(nn.Module):
    """config.hidden_size = D, an LM head (V, D), and a body whose last_hidden_state is random."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=dim, max_position_embeddings=32768)
        self.lm_head = nn.Linear(dim, vocab, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(torch.randn(vocab, dim) * 0.02, requires_grad=False)
        self.dtype = torch.float32
        teacher_dim = dim

        class Body(nn.Module):
            def forward(self, input_ids, use_cache=False):
                g = torch.Generator().manual_seed(int(input_ids.sum()))
                h = torch.randn(*input_ids.shape, teacher_dim, generator=g)
                return SimpleNamespace(last_hidden_state=h / h.norm(dim=-1, keepdim=True) * 30)

        self.body = Body()

    def get_decoder(self):
        return self.body

    def get_output_embeddings(self):
        return self.lm_head


# --- peak resident set per cell ----------------------------------------------------------------------------

def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def measure(name, fn, rows, runtime_mib):
    import gc

    gc.collect()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set to the current one
        f.write("5")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = _status_mib("VmHWM")
    rows.append(dict(cell=name, seconds=seconds, rss_before_mib=before, peak_rss_mib=peak,
                     tensors_peak_mib=peak - runtime_mib))
    print(f"  {name:<28} peak RSS {peak / 1024:6.2f} GiB, tensors {(peak - runtime_mib) / 1024:6.2f} GiB "
          f"({seconds:.0f} s)", flush=True)
    return out


# --- checkpoint sizes, computed from the parameter counts ----------------------------------------------------

def checkpoint_sizes(s: dict) -> dict:
    """Bytes on disk at these shapes, from the parameter counts of a student built on the meta device.
    Phase 2 keeps the body, embedding and projector with AdamW's two moments (3 float32 copies: 12 bytes a
    parameter); Phase 3 the head with its two moments. save_pretrained writes every parameter once in float32;
    export_ternary writes the BitLinear weights at 1.6 bits and the rest in float16. Each phase's checkpoint
    also keeps its previous copy (.prev.pt), and the ablation's ternary and full-precision arms keep their own."""
    with torch.device("meta"):
        m = sf.BitNetStudent(sf.StudentConfig(vocab_size=s["vocab"], teacher_dim=s["teacher_dim"],
                                              dim=s["student_dim"], n_layers=s["student_layers"],
                                              n_heads=s["student_heads"], max_seq_len=s["seq_len"]))
    head = sum(p.numel() for p in m.head.parameters())
    total = sum(p.numel() for p in m.parameters())
    ternary = sum(w.weight.numel() for _, w in m.bitlinears())
    phase2, phase3 = 12 * (total - head), 12 * head
    per_run = 2 * (phase2 + phase3)  # with the .prev copies
    n = s["num_samples"] + s["val_samples"]
    cache = n * s["seq_len"] * (2 * s["teacher_dim"] + 4) + 2 * s["vocab"] * s["teacher_dim"]  # fp16 states, int32 tokens, fp16 head
    student = 4 * total
    ternary_file = ternary // 5 + 2 * (total - ternary)  # five trits a byte; the rest in float16
    return dict(params=total, head_params=head, phase2_pt=phase2, phase3_pt=phase3, checkpoints_main=per_run,
                checkpoints_ablation=2 * per_run, cache=cache, student_safetensors=student,
                student_ternary=ternary_file, total=3 * per_run + cache + student + ternary_file)


# --- the notebook's cells ------------------------------------------------------------------------------------

def run(s: dict, steps: int, workdir: Path, progress=False, ablation_only=False) -> list[dict]:
    import safetensors.torch  # noqa: F401  the libraries the cells import lazily count as runtime, not tensors
    import tqdm.auto  # noqa: F401

    rows = []
    runtime = _status_mib("VmRSS")  # torch + helpers imported, nothing allocated yet
    print(f"runtime before any tensor: {runtime:.0f} MiB resident", flush=True)
    cfg = sf.make_config(
        teacher="bench/random-qwen-shape", dataset=sf.STDLIB_CORPUS, num_samples=s["num_samples"],
        val_samples=s["val_samples"], seq_len=s["seq_len"], student_dim=s["student_dim"],
        student_layers=s["student_layers"], student_heads=s["student_heads"], batch_size=s["batch_size"],
        superposition_steps=steps, lm_head_steps=steps, eval_every=steps, ckpt_every=steps, warmup_steps=0,
        cache_dir=str(workdir / "cache"), run_dir=str(workdir / "run"), device="cpu",
        ablation_steps=steps, ablation_head_steps=steps)
    tok = HashTokenizer(s["vocab"])
    cache = measure("3. Phase 1 (stand-in)", lambda: sf.cache_teacher_states(
        cfg, loader=lambda: (RandomStatesTeacher(s["vocab"], s["teacher_dim"]), tok), progress=progress,
        tokenizer=tok),
        rows, runtime)
    student = measure("4. build student", lambda: sf.build_student(cfg, cache), rows, runtime)
    if ablation_only:  # the main student stays resident, untrained (it holds no training state either way)
        measure("10. ablation", lambda: sf.run_ablation(cache, cfg, progress=progress), rows, runtime)
        return rows
    measure("5. Phase 2", lambda: sf.train_superposition(student, cache, cfg, progress=progress), rows, runtime)
    measure("6. Phase 3", lambda: sf.train_lm_head(student, cache, cfg, progress=progress), rows, runtime)
    measure("7. evaluate", lambda: sf.evaluate(student, cache), rows, runtime)
    measure("8. save", lambda: (sf.save_pretrained(student, workdir / "run" / "student"),
                                sf.export_ternary(student, workdir / "run" / "student-ternary")), rows, runtime)
    prompt = torch.tensor([[1, 2, 3, 4]])
    measure("9. generate", lambda: [sf.generate(student, prompt, 30, 0.7, generator=torch.Generator().manual_seed(i))
                                    for i in range(3)], rows, runtime)
    measure("10. ablation", lambda: sf.run_ablation(cache, cfg, progress=progress), rows, runtime)
    return rows


def table(rows, sizes, machine) -> str:
    lines = [f"Peak memory per cell ({machine}); CUDA estimate = tensors (see bench/memory.py); T4: {T4_GIB} GB",
             "", "| cell | peak RSS (GiB) | tensors = CUDA estimate (GiB) | share of a T4 |", "|---|---|---|---|"]
    for r in rows:
        t = r["tensors_peak_mib"] / 1024
        lines.append(f"| {r['cell']} | {r['peak_rss_mib'] / 1024:.2f} | {t:.2f} | {t / (T4_GIB * 1e9 / 2**30):.0%} |")
    lines += ["", "| file at these shapes | size (GB) |", "|---|---|"]
    for k in ("phase2_pt", "phase3_pt", "checkpoints_main", "checkpoints_ablation", "cache", "student_safetensors",
              "student_ternary", "total"):
        lines.append(f"| {k} | {sizes[k] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy shapes: checks that every cell runs")
    ap.add_argument("--steps", type=int, default=1, help="optimiser steps a phase (memory does not grow with them)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--ablation-only", action="store_true", help="cells 3, 4 and 10 only")
    ap.add_argument("--samples", type=int, default=None, help="training blocks (default 500, the form's)")
    args = ap.parse_args(argv)
    s = dict(SMOKE if args.smoke else DEFAULTS)
    if args.samples:
        s["num_samples"] = args.samples
    sizes = checkpoint_sizes(s)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(s, args.steps, Path(tmp), ablation_only=args.ablation_only)
    print(table(rows, sizes, machine))
    result = {"shapes": s, "steps": args.steps, "machine": machine, "cells": rows, "sizes_bytes": sizes}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
