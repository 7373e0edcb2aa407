"""Held-out metrics: cosine against the teacher, next-token CE, and the evaluation report."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import weights_digest
from .losses import _frozen_teacher_head, mean_ce
from .precision import _autocast, precision_policy

if TYPE_CHECKING:
    from .cache import TeacherCache
    from .precision import Precision


def _project(model: nn.Module, feats: torch.Tensor, policy: Precision) -> torch.Tensor:
    """projector(student states) (B, T, dim) -> (B, T, teacher_dim) float32, under the policy's autocast."""
    with _autocast(policy):
        return model.projector(feats).float()


@torch.no_grad()
def held_out_cosine(model: nn.Module | None, cache: TeacherCache, batch_size: int = 16, predict=None,
                    precision: str = "auto") -> float:
    """Mean cosine against the teacher over every held-out token. The prediction is projector(student), run
    under precision_policy's autocast for `precision` (the cosine itself in float32), unless
    predict(tokens, idx) -> (B, T, D) is given (the baseline, or the teacher's own states in tests)."""
    was_training = model is not None and model.training
    if predict is None:
        model.eval()
        device = model.tok_embeddings.weight.device
        policy = precision_policy(device, precision)
        predict = lambda tokens, idx: _project(model, student_features(model, tokens, len(tokens), precision),  # noqa: E731
                                               policy)
    total = 0.0
    for i in range(0, cache.num_val, batch_size):
        idx = np.arange(i, min(i + batch_size, cache.num_val))
        pred = predict(cache.tokens("val", idx), idx).float()
        total += F.cosine_similarity(pred, cache.states("val", idx).to(pred.device), dim=-1).sum().item()
    if was_training:
        model.train()
    return total / (cache.num_val * cache.seq_len)


def baseline_cosine(cache: TeacherCache, batch_size: int = 16) -> float:
    """The constant predictor: the mean teacher vector of the training cache, scored on held-out tokens."""
    mean = torch.from_numpy(cache.train_mean)
    return held_out_cosine(None, cache, batch_size, lambda tokens, idx: mean.expand(len(idx), cache.seq_len, -1))


@torch.no_grad()
def student_features(model: nn.Module, tokens: torch.Tensor, batch_size: int = 16,
                     precision: str = "auto") -> torch.Tensor:
    """Final student states for all blocks, computed once: tokens (N, T) -> (N, T, dim) float32 on the model's
    device. The body runs under precision_policy's autocast for `precision` (bf16 on a CPU with native bf16)."""
    model.eval()
    device = model.tok_embeddings.weight.device
    policy = precision_policy(device, precision)
    with _autocast(policy):
        return torch.cat([model(tokens[i:i + batch_size].to(device)).float()
                          for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def held_out_ce(model: nn.Module, cache: TeacherCache, features=None, batch_size: int = 16,
                precision: str = "auto") -> float:
    """The student's next-token CE on held-out blocks, in nats/token. The body runs under `precision`'s
    autocast (student_features); the head, its logits and the softmax stay float32, so the figure carries no
    bf16 rounding of the logits. features: the held-out blocks' student_features at `precision`, (num_val, T, dim),
    when the caller has them.
    On a CPU the figure is remembered on the model, keyed by its weights (weights_digest of every tensor, 0.13 s
    for the cpu preset's 30M weights), its config, the cache's content_digest, the precision's autocast dtype and
    batch_size: a second call on weights that have not changed since (a phase's last record, then evaluate; Phase
    3's, then Phase 4's first) returns it without the (num_val (T - 1), dim) x (dim, V) float32 head product (3.4 s
    on the cpu preset; bench/held_out.py). Any change to any weight changes the key. `features`, when given, are
    trusted to be this model's at `precision`. On an accelerator the product costs less than hashing the weights
    there, so nothing is remembered."""
    model.eval()
    device = model.tok_embeddings.weight.device

    def compute() -> float:
        tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
        feats = student_features(model, tokens, batch_size, precision) if features is None else features
        return mean_ce(feats, tokens, model.logits, batch_size)

    if device.type != "cpu":
        return compute()
    key = (weights_digest(model), repr(getattr(model, "cfg", None)), cache.content_digest,
           str(precision_policy(device, precision).autocast), batch_size)
    memo = model.__dict__.setdefault("_held_out_ce", {})  # a plain attribute, not a module or a buffer
    if key not in memo:
        if len(memo) >= 8:  # a few caches or precisions at most; weights that moved on are not asked again
            memo.clear()
        memo[key] = compute()
    return memo[key]


def log_unigram(cache: TeacherCache) -> np.ndarray:
    """Log-frequencies of the training tokens, add-half smoothed: the constant CE predictor. (V,) float32."""
    counts = np.bincount(cache.train_tokens.ravel(), minlength=cache.vocab_size).astype(np.float64) + 0.5
    return np.log(counts / counts.sum()).astype(np.float32)


def ternary_stats(model: nn.Module) -> list[dict]:
    """Per BitLinear: the share of -1, 0 and +1 in its ternary weight, and its scale."""
    rows = []
    for name, m in model.bitlinears():
        q, scale = m.ternary_weight()
        n = q.numel()
        rows.append({"layer": name, "neg": (q == -1).sum().item() / n, "zero": (q == 0).sum().item() / n,
                     "pos": (q == 1).sum().item() / n, "scale": scale.item()})
    return rows


@torch.no_grad()
def evaluate(model: nn.Module, cache: TeacherCache, batch_size: int = 16, precision: str = "auto",
             via_teacher_head: bool = True) -> dict:
    """Held-out figures: cosine vs the mean-vector baseline, CE/perplexity (nats/token) vs the teacher and the
    unigram predictor, the student decoded through the teacher head, and ternary weight statistics.
    The student's body and projector run under precision_policy's autocast for `precision` (cfg.precision in
    the notebook), as in training; every head, softmax and cosine is float32. via_teacher_head=False leaves the
    CE through the teacher's head out (NaN): a (N * T, D) x (D, V) float32 product that comparisons of students
    by their own head do not read (the ablation, the recipes study)."""
    device = model.tok_embeddings.weight.device
    model.eval()
    policy = precision_policy(device, precision)
    tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
    feats = student_features(model, tokens, batch_size, precision)
    head = _frozen_teacher_head(cache, device)
    n_tok = len(tokens) * (cache.seq_len - 1)
    unigram_ce = float(-log_unigram(cache)[cache.val_tokens[:, 1:].ravel()].mean())
    student_cos = held_out_cosine(model, cache, batch_size, lambda tokens, i: _project(model, feats[i], policy))
    base_cos = baseline_cosine(cache, batch_size)
    metrics = {
        "student_cosine": student_cos,
        "baseline_cosine": base_cos,
        "cosine_gain": student_cos - base_cos,
        "student_ce": held_out_ce(model, cache, feats, batch_size, precision) if _has_head(model) else float("nan"),
        "student_ce_via_teacher_head": mean_ce(feats, tokens, lambda f: head(_project(model, f, policy)), batch_size)
        if via_teacher_head else float("nan"),
        "teacher_ce": cache.teacher_ce(device, batch_size),
        "unigram_ce": unigram_ce,
    }
    for k in ("student_ce", "student_ce_via_teacher_head", "teacher_ce", "unigram_ce"):
        metrics[k.replace("_ce", "_ppl")] = math.exp(min(metrics[k], 50))
    return {"metrics": metrics, "ternary": ternary_stats(model), "head_mode": model.cfg.head_mode,
            "tokens": n_tok}


def _has_head(model):
    return model.cfg.head_mode != "teacher" or model.teacher_head is not None


def format_report(report: dict) -> str:
    m = report["metrics"]
    rows = [("held-out cosine (student)", m["student_cosine"]), ("held-out cosine (mean-vector baseline)",
            m["baseline_cosine"]), ("cosine gain over baseline", m["cosine_gain"]),
            (f"student CE, {report['head_mode']} head (nats)", m["student_ce"]),
            ("student CE via teacher head (nats)", m["student_ce_via_teacher_head"]),
            ("teacher CE (nats)", m["teacher_ce"]), ("unigram constant predictor CE (nats)", m["unigram_ce"]),
            ("student perplexity", m["student_ppl"]), ("teacher perplexity", m["teacher_ppl"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:10.4f}" for name, value in rows]
    lines.append(f"({report['tokens']} held-out next-token predictions)")
    return "\n".join(lines)


def format_ablation(result: dict) -> str:
    """run_ablation's result as a table: each arm and width with its held-out cosine, its gain over the mean-vector
    baseline and its CE (nats/token), then the baseline, the teacher's CE and the verdict."""
    name = max(16, *(len(arm) for arm, _ in result["arms"]))
    lines = [f"{'arm':<{name}} {'width':>5} {'cosine':>8} {'gain':>8} {'CE':>8}"]
    for (arm, width), r in result["arms"].items():
        lines.append(f"{arm:<{name}} {width:>5} {r['cosine']:8.4f} {r['cosine'] - result['baseline_cosine']:8.4f} "
                     f"{r['ce']:8.3f}")
    lines.append(f"mean-vector baseline cosine {result['baseline_cosine']:.4f}, teacher CE {result['teacher_ce']:.3f}")
    lines.append("verdict: " + result["verdict"])
    return "\n".join(lines)


MULTI_SEED_PAGE = "docs/ablation.md"  # the page and section ablation_verdict points to
MULTI_SEED_SECTION = "Ablation across seeds and widths"
TUNED_SECTION = "Re-made with each arm tuned"  # its subsection: full precision at its own LR (bench/recipes.py)
RECIPES_PAGE = "docs/recipes.md"  # where the recipes are compared with intervals (bench/recipes.py)


def ablation_verdict(result: dict) -> str:
    """One line computed from run_ablation's figures (CE in nats/token), at the main (first) width: ternary against
    full precision, Spoon Feed against direct CE, and the recipe against the other one when that arm ran. It rests
    on one seed, and says so: it points to the multi-seed table in docs/ablation.md (bench/ablation.py), to its
    re-make with full precision at its own learning rate (the arm here trains at the ternary arm's), and to
    docs/recipes.md (bench/recipes.py), which give intervals across seeds."""
    w, arms, base = result["widths"][0], result["arms"], result["baseline_cosine"]
    t, fp, direct = arms[("ternary", w)], arms[("full precision", w)], arms[("direct CE", w)]
    gain_t, gain_fp = t["cosine"] - base, fp["cosine"] - base
    ratio = gain_t / gain_fp if gain_fp > 0 else float("nan")
    if not gain_fp > 0:
        first = f"at width {w} full precision did not beat the mean-vector baseline, so ternary cannot be compared"
    else:
        first = (f"at width {w} ternary reaches {ratio:.2f}x the cosine gain of full precision "
                 f"({'ternary ahead' if ratio > 1 else 'full precision ahead'})")
    dce = t["ce"] - direct["ce"]
    who = "Spoon Feed" if result.get("recipe", "spoonfeed") == "spoonfeed" else f"RECIPE {result['recipe']!r}"
    if abs(dce) < 0.05:  # below what one small run can tell apart
        second = (f"{who} and direct CE training reach the same CE within 0.05 nats ({t['ce']:.3f} vs "
                  f"{direct['ce']:.3f}): no clear benefit from distillation at this budget")
    else:
        second = (f"{who} CE is {abs(dce):.2f} nats {'lower' if dce < 0 else 'higher'} than direct CE "
                  f"training ({'distillation helps' if dce < 0 else 'distillation does not help'} at this budget)")
    third = ""
    other = arms.get((f"recipe {result.get('other_recipe')}", w))
    if other is not None:
        d = other["ce"] - t["ce"]
        third = (f"; RECIPE {result['other_recipe']!r} reaches CE {other['ce']:.3f} against {t['ce']:.3f} for "
                 f"{result['recipe']!r} (" + ("the same within 0.05 nats" if abs(d) < 0.05 else
                                                f"{abs(d):.2f} nats {'lower' if d < 0 else 'higher'}")
                 + f") at equal steps, one seed: {RECIPES_PAGE} compares them at equal wall-clock across seeds")
    return (f"{first}; {second}{third}. This rests on one seed per arm: the multi-seed table ({MULTI_SEED_PAGE}, "
            f"'{MULTI_SEED_SECTION}', from bench/ablation.py) says whether it holds across seeds and widths, and "
            f"its '{TUNED_SECTION}' gives full precision its own learning rate (here it trains at the ternary arm's)")
