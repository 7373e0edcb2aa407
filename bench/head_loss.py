"""The fused head loss's elementwise work (issue 28): head_loss today against the version before, side by side in
one process, at the `cpu` preset's shapes (not CI):

    nice -n 5 python bench/head_loss.py           # about two minutes on 2 cores
    python bench/head_loss.py --smoke             # toy sizes (run by the tests)
    nice -n 5 python bench/head_loss.py --compile # + the chunk's loss through torch.compile (inductor), a minute more
    python bench/head_loss.py --only "Phase 3" --keep-freed-memory  # one case, with the notebook's allocator

Each row is one forward + backward of sf.head_loss (the head product, the loss, the gradients for the head's
weight) at 1016 rows (8 x 127, Phase 3's CE, the direct-CE arm and logit KD) or 256 rows (Phase 3's KD positions),
vocab 49,152, student width 256, the teacher's logits from its 576-wide head (as _teacher_logits computes them), in
bf16 and in float32. "before" is the loss code this bench replaced (kept below, frozen), run through the same
_FusedHeadLoss; in the last row (Phase 3's whole loss), "before" is the two head_loss calls Phase 3 made until
2026-12-08 (CE on the 1016 rows with a next token, then KD on 256 of the 1024 rows, each its own head product) and
"after" the one call with kd_rows, whose head product covers the rows the two terms share. The runs alternate, before then after, --repeat times; the figure is the ratio of the medians
(before / after: above 1 is faster), with the largest difference in value and weight gradient between the two.
The machine, its load average and the date are printed with the table: on a loaded machine the ratio holds but
the seconds are not speed figures.

--compile adds the question of issue 28's item 2: would torch.compile'd per-chunk loss code (inductor fuses the
log-softmaxes, exps, subtraction and reduction into a few row-wise kernels) beat the eager code? It times the
chunk's loss and gradient alone (no head product), eager (head_loss's _ce and _kd) against compiled pure
versions computed in float32 inside the kernels, side by side, with the compile time apart and the difference in
value and gradient. head_loss stays eager: at the cpu preset's shapes it did not pay clearly
(bench/results/head_loss-cpu-2026-12-07.md).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import machine_name  # noqa: E402
from spoonfeed import losses  # noqa: E402
from spoonfeed.precision import keep_freed_memory, precision_policy  # noqa: E402

VOCAB, STUDENT, TEACHER = 49152, 256, 576
CASES = [  # (what, rows, loss, temperature)
    ("CE, 8 x 127 rows (Phase 3, direct-CE arm)", 1016, "ce", 1.0),
    ("KD, 256 rows, T 1 (Phase 3's KD positions)", 256, "kd", 1.0),
    ("KD, 8 x 127 rows, T 1", 1016, "kd", 1.0),
    ("KD, 8 x 127 rows, T 2", 1016, "kd", 2.0),
    ("mixed 0.5, 8 x 127 rows, T 1 (logit KD)", 1016, "mixed", 1.0),
    ("mixed 0.5, 8 x 127 rows, T 2", 1016, "mixed", 2.0),
    ("Phase 3: CE on 8 x 127 rows + KD on 256 of the 8 x 128, T 1, one pass (kd_rows)", 1024, "ce+kd", 1.0),
]
SEQ = 128  # the ce+kd case's block length: the last row of each block has no target


def before_loss_grad(targets, teacher_logits, t, ce_weight):
    """head_loss's per-chunk loss and gradient as they were before issue 28's change (frozen here)."""
    def ce_grad(z, i):
        y = targets[i:i + len(z), None]
        logp = torch.log_softmax(z, dim=-1)
        loss = -logp.gather(1, y).sum(dtype=torch.float64)
        g = logp.exp_()
        g[torch.arange(len(g), device=g.device), y[:, 0]] -= 1
        return loss, g

    def kd_grad(z, i):
        t_logp = torch.log_softmax(teacher_logits(i, len(z)).to(z.dtype) / t, dim=-1)
        s_logp = torch.log_softmax(z / t if t != 1 else z, dim=-1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(dtype=torch.float64) * t * t
        return loss, s_logp.exp_().sub_(t_logp.exp_()).mul_(t)

    def mixed_grad(z, i):
        a = float(ce_weight)
        (l_ce, g_ce), (l_kd, g_kd) = ce_grad(z, i), kd_grad(z, i)
        return a * l_ce + (1 - a) * l_kd, g_ce.mul_(a).add_(g_kd, alpha=1 - a)

    return {"ce": ce_grad, "kd": kd_grad, "mixed": mixed_grad}


def case(rows, loss, t, dtype, shrink, seed=0):
    """Inputs for one row of the table: the two step functions (before, after), each returning (loss, grad_w)."""
    g = torch.Generator().manual_seed(seed)
    vocab = VOCAB // shrink
    h = torch.randn(rows, STUDENT, generator=g)
    w = (torch.randn(vocab, STUDENT, generator=g) * STUDENT ** -0.5).requires_grad_(True)
    t_states = torch.randn(rows, TEACHER, generator=g)
    head = torch.nn.Linear(TEACHER, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, TEACHER, generator=g) * TEACHER ** -0.5 * 2)
    head = head.to(dtype)  # as _frozen_teacher_head casts it to the autocast dtype
    targets = torch.randint(vocab, (rows,), generator=g)
    policy = precision_policy("cpu", "bf16" if dtype == torch.bfloat16 else "fp32")
    if loss == "ce+kd":
        return _phase3_case(h, w, t_states, head, targets, t, policy, g)
    kw = dict(targets=None if loss == "kd" else targets, temperature=t, ce_weight=0.5 if loss == "mixed" else None,
              teacher_logits=None if loss == "ce" else losses._teacher_logits(head, t_states))
    chunk_rows = max(1, 2**26 // vocab)

    def after():
        out = losses.head_loss(h, w, None, policy, **kw)
        return out.item(), torch.autograd.grad(out, [w])[0]

    def before():
        fn = before_loss_grad(targets, kw["teacher_logits"], t, kw["ce_weight"])[loss]
        out = losses._FusedHeadLoss.apply(h, w, None, fn, policy.autocast or torch.float32, chunk_rows, rows)
        return out.item(), torch.autograd.grad(out, [w])[0]

    return before, after


def _phase3_case(h, w, t_states, head, targets, t, policy, g, kd_tokens=256):
    """Phase 3's step loss: before, two head_loss calls (CE on the rows with a next token, then KD on kd_tokens
    sampled rows, each its own head product); after, one call with kd_rows over the rows the two share."""
    targets = targets.clone()
    targets[SEQ - 1::SEQ] = losses.IGNORE_INDEX  # each block's last position predicts nothing
    keep = targets != losses.IGNORE_INDEX
    rows = torch.randperm(len(h), generator=g)[:kd_tokens].sort().values
    teacher = losses._teacher_logits(head, t_states[rows])

    def before():
        out = losses.head_loss(h[keep], w, None, policy, targets=targets[keep]) + losses.head_loss(
            h[rows], w, None, policy, teacher_logits=teacher, temperature=t)
        return out.item(), torch.autograd.grad(out, [w])[0]

    def after():
        out = losses.head_loss(h, w, None, policy, targets=targets, teacher_logits=teacher, kd_rows=rows,
                               temperature=t)
        return out.item(), torch.autograd.grad(out, [w])[0]

    return before, after


def _kd_pure(z, zt, t: float):
    """The KD chunk loss and gradient as one function of the logits, for torch.compile."""
    s_logp = torch.log_softmax(z.float() / t, -1)
    t_logp = torch.log_softmax(zt.float() / t, -1)
    p_t = t_logp.exp()
    loss = (p_t * (t_logp - s_logp)).sum(-1).double().sum() * (t * t)
    return loss, ((s_logp.exp() - p_t) * t).to(z.dtype)


def _ce_pure(z, y):
    """The CE chunk loss and gradient as one function of the logits, for torch.compile."""
    logp = torch.log_softmax(z.float(), -1)
    onehot = torch.arange(z.size(1), device=z.device)[None, :] == y
    return -logp.gather(1, y).double().sum(), (logp.exp() - onehot.float()).to(z.dtype)


def compile_rows(shrink, repeat):
    """Eager against torch.compile for the chunk's loss alone: rows of (what, dtype, compile s, ratio, diffs)."""
    out = []
    rows, vocab = 1016, VOCAB // shrink
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        z0, zt0 = ((torch.randn(rows, vocab, generator=g) * 3).to(dtype) for _ in range(2))
        y = torch.randint(vocab, (rows, 1), generator=g)
        eager = {"KD, T 1": lambda z: losses._kd(z, losses._teacher_logp(zt0, dtype, 1.0), 1.0),
                 "CE": lambda z: losses._ce(z, y)}
        pure = {"KD, T 1": torch.compile(lambda z: _kd_pure(z, zt0, 1.0), dynamic=False),
                "CE": torch.compile(lambda z: _ce_pure(z, y), dynamic=False)}
        for what in eager:
            first = timed(lambda: pure[what](z0.clone())) - timed(lambda: z0.clone())  # the compile, mostly
            (le, ge), (lc, gc) = eager[what](z0.clone()), pure[what](z0.clone())
            te, tc = [], []
            for _ in range(repeat):
                z = z0.clone()
                te.append(timed(lambda: eager[what](z)))
                z = z0.clone()
                tc.append(timed(lambda: pure[what](z)))
            ratio = statistics.median(te) / statistics.median(tc)
            dv = abs(lc.item() - le.item()) / max(abs(le.item()), 1e-12)
            dg = ((gc.float() - ge.float()).abs().max() / ge.float().abs().max()).item()
            out.append((what, str(dtype).split(".")[1], first, ratio, dv, dg))
            print(f"| {what}, {rows} rows | {out[-1][1]} | {first:.1f} | {ratio:.2f}x | {dv:.1e} | {dg:.1e} |",
                  flush=True)
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeat", type=int, default=None, help="alternating runs of each (default 5; 2 with --smoke)")
    ap.add_argument("--compile", action="store_true", help="also eager against torch.compile for the chunk's loss")
    ap.add_argument("--only", default="", help="only the cases whose name holds this text, in any case (e.g. "
                    "'one pass')")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc's allocator as the notebook sets it (keep_freed_memory); default: glibc's own")
    args = ap.parse_args(argv)
    said = keep_freed_memory("cpu") if args.keep_freed_memory else ""
    cases = [c for c in CASES if args.only.lower() in c[0].lower()]
    if not cases:
        ap.error(f"--only {args.only!r} names no case; the cases: " + "; ".join(c[0] for c in CASES))
    shrink = 64 if args.smoke else 1
    repeat = args.repeat or (2 if args.smoke else 5)
    print(f"Machine: {machine_name()} ({platform.machine()}), {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; allocator: "
          f"{said or 'glibc defaults (the notebook raises its thresholds: --keep-freed-memory)'}\n")
    print("| head_loss, forward + backward | dtype | before / after | value diff | grad diff (max rel) |\n"
          "|---|---|---|---|---|")
    rows = []
    if args.smoke:
        print(f"--smoke: the vocabulary is {VOCAB // shrink}, not {VOCAB}; the rows are as named. The ratios are not "
              "speed figures.\n")
    for what, n, loss, t in cases:
        for dtype in (torch.bfloat16, torch.float32):
            before, after = case(n, loss, t, dtype, shrink)
            (vb, gb), (va, ga) = before(), after()  # warm-up, and the two results compared
            times = {"before": [], "after": []}
            for _ in range(repeat):
                times["before"].append(timed(before))
                times["after"].append(timed(after))
            ratio = statistics.median(times["before"]) / statistics.median(times["after"])
            dv, dg = abs(va - vb) / max(abs(vb), 1e-12), ((ga - gb).abs().max() / gb.abs().max()).item()
            rows.append(dict(what=what, dtype=str(dtype).split(".")[1], ratio=ratio, value_diff=dv, grad_diff=dg,
                             before_s=times["before"], after_s=times["after"]))
            print(f"| {what} | {rows[-1]['dtype']} | {ratio:.2f}x | {dv:.1e} | {dg:.1e} |", flush=True)
    if args.compile:
        print("\n| chunk loss alone | dtype | compile s | eager / compiled | value diff | grad diff (max rel) |\n"
              "|---|---|---|---|---|---|")
        rows += [dict(zip(("what", "dtype", "compile_s", "ratio", "value_diff", "grad_diff"), r))
                 for r in compile_rows(shrink, repeat)]
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main()
