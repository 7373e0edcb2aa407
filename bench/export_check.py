"""The exports measured on the `cpu` preset (not CI): what the head bias costs, and whether the files agree
with the student. One run, one machine:

    python bench/export_check.py                 # cpu preset: Phases 1-3, then the exports; ~10 min on 2 cores
    python bench/export_check.py --smoke         # the smoke preset, to check that the script runs
    python bench/export_check.py --llamacpp-only runs/export-check-cpu/student-TQ2_0.gguf   # llama.cpp row only

1. Phase 1-3 as the notebook runs them (head with a bias, HEAD_BIAS=True), then export_hf: the held-out CE with
   the bias, with it folded into the weights by least squares, and with it dropped.
2. Phase 3 again with HEAD_BIAS=False (same frozen body): the held-out CE of a bias-free head.
3. The bias-free student exported both ways and scored on the same held-out blocks: the HF folder through
   `AutoModelForCausalLM.from_pretrained`, and the TQ2_0 GGUF through llama.cpp (`llama-cpp-python`), when that
   package can be imported. llama.cpp quantizes activations per 256-value block (Q8_K), not per token, so its
   CE differs from the student's by a little.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
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
from spoonfeed.losses import mean_ce  # noqa: E402


def ce_of_logits(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """logits (N, T, V), tokens (N, T) -> mean next-token CE in nats/token."""
    return sf.next_token_ce(logits.float(), tokens).item()


@torch.no_grad()
def hf_ce(path, cache) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = cache.tokens("val", np.arange(cache.num_val))
    return mean_ce(tokens, tokens, lambda ids: model(ids).logits, batch_size=8)  # the model reads the tokens


def llamacpp_ce(path, cache) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        print(f"llama-cpp-python is not importable ({e}): skipping the llama.cpp row")
        return None
    llm = Llama(model_path=str(path), n_ctx=cache.seq_len, logits_all=True, n_threads=2, verbose=False)
    total = 0.0
    for i in range(cache.num_val):
        tokens = cache.val_tokens[i].tolist()
        llm.reset()
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))[None]  # (1, T, V)
        total += sf.next_token_ce(logits, torch.tensor([tokens]), reduction="none").sum().item()
    return total / (cache.num_val * (cache.seq_len - 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smoke preset (F16 GGUF: its dims are 32)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--llamacpp-only", metavar="GGUF", help="only score this GGUF with llama.cpp on the preset's "
                    "held-out blocks (after installing llama-cpp-python)")
    args = ap.parse_args(argv)
    preset = "smoke" if args.smoke else "cpu"
    cfg = sf.make_config(preset, run_dir=f"runs/export-check-{preset}")
    rows, t0 = {}, time.time()
    cache = sf.cache_teacher_states(cfg)
    if args.llamacpp_only:
        print(f"| CE, {args.llamacpp_only} via llama.cpp | {llamacpp_ce(args.llamacpp_only, cache):.4f} |")
        return None
    tokenizer = sf.load_tokenizer(cfg.teacher)
    student = sf.build_student(cfg, cache)
    sf.train_superposition(student, cache, cfg)
    sf.train_lm_head(student, cache, cfg)
    out = Path(cfg.run_dir)
    _, fold = sf.llama_head(student, cache)
    rows.update({"CE, head with bias (HEAD_BIAS=True)": fold["ce_with_bias"],
                 "CE, bias folded into the weights (least squares)": fold["ce_bias_folded"],
                 "CE, bias dropped": fold["ce_bias_dropped"]})
    sf.export_hf(student, tokenizer, out / "student-hf-folded", cache, cfg)
    rows["CE, folded head, HF checkpoint via from_pretrained"] = hf_ce(out / "student-hf-folded", cache)

    free = dataclasses.replace(cfg, head_bias=False, run_dir=f"{cfg.run_dir}-nobias")
    sf.train_lm_head(student, cache, free)
    rows["CE, Phase 3 without a bias (HEAD_BIAS=False)"] = sf.held_out_ce(student, cache)
    sf.export_hf(student, tokenizer, out / "student-hf", cache, free)
    rows["CE, bias-free head, HF checkpoint via from_pretrained"] = hf_ce(out / "student-hf", cache)
    qtype = sf.gguf_qtype_for(student, "TQ2_0")
    gguf_path = sf.export_gguf(student, tokenizer, out / f"student-{qtype}.gguf", qtype)
    rows[f"CE, bias-free head, {qtype} GGUF via llama.cpp"] = llamacpp_ce(gguf_path, cache)
    rows["GGUF size (MiB)"] = gguf_path.stat().st_size / 2**20

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"preset {preset}, {time.time() - t0:.0f} s\n")
    print("| figure (held-out, nats/token) | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {'not run' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
