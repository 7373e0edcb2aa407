"""Float32 against bf16 at the shapes the `cpu` preset runs (not CI): why some parts stay float32 under
PRECISION=auto on a CPU. One process, one machine, each pair timed side by side:

    python bench/shapes.py            # about a minute on 2 cores
    python bench/shapes.py --smoke    # toy sizes (run by the tests)
    python bench/shapes.py --profile  # + torch.profiler's top operators of a Phase 2 and a Phase 3 step in bf16

- F.linear at decoding's one row (the body's 256-wide BitLinears, the 49152 x 256 head), at three rows (the
  original's three prompts as one batch) and at a training batch (8 x 128 rows);
- SDPA forward + backward at Phase 2's shape (8 x 4 heads x 128 x 64), causal;
- the LM head's training loss, forward + backward, in bf16: autograd (F.linear, then F.cross_entropy or kd_loss
  on the bf16 logits, as the helpers did before head_loss) against the fused sf.head_loss, for Phase 3's CE on
  8 x 127 rows and its KD on 256 rows.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import machine_name  # noqa: E402

LINEAR = [  # (what, rows, in, out)
    ("decode: body q/k/v/o, 1 row", 1, 256, 256),
    ("decode: body SwiGLU up, 1 row", 1, 256, 1024),
    ("decode: body SwiGLU down, 1 row", 1, 1024, 256),
    ("decode: LM head, 1 row", 1, 256, 49152),
    ("decode: LM head, 3 rows (three prompts in one batch)", 3, 256, 49152),
    ("training: SwiGLU up, 8 x 128 rows", 1024, 256, 1024),
    ("training: LM head, 8 x 127 rows (Phase 3)", 1016, 256, 49152),
]


def timed_us(fn, repeat):
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile a Phase 2 and a Phase 3 step in bf16")
    args = ap.parse_args(argv)
    shrink = 64 if args.smoke else 1
    rows = []
    print(f"Machine: {machine_name()} ({platform.machine()})\n")
    print("| shape | float32 µs | bf16 µs | bf16 speed-up |\n|---|---|---|---|")
    for what, m, k, n in LINEAR:
        m, n = max(1, m // shrink) if m > 3 else m, max(1, n // shrink)
        x, w = torch.randn(m, k), torch.randn(n, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        repeat = 3 if m * n > 10**7 else 30
        a = timed_us(lambda: F.linear(x, w), repeat)
        b = timed_us(lambda: F.linear(xb, wb), repeat)
        rows.append((what, a, b))
        print(f"| {what} ({m} x {k} @ {k} x {n}) | {a:.0f} | {b:.0f} | {a / b:.2f}x |", flush=True)
    B, H, T, D = (8, 4, 128, 64) if not args.smoke else (2, 2, 16, 8)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
        us = timed_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), 10)
        rows.append((f"SDPA fwd + bwd {dtype}", us, None))
    a, b = rows[-2][1], rows[-1][1]
    print(f"| SDPA forward + backward, causal ({B} x {H} heads x {T} x {D}) | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    rows += head_loss_rows(args.smoke)
    if args.profile:
        profile_steps(args.smoke)
    return rows


def head_loss_rows(smoke: bool):
    """Autograd against sf.head_loss for the head's training losses, bf16, forward + backward, side by side."""
    import spoonfeed_helpers as sf

    V, D, TD = (49152, 256, 576) if not smoke else (512, 32, 24)
    policy = sf.precision_policy("cpu", "bf16")
    torch.manual_seed(0)
    w = (torch.randn(V, D) * 0.05).requires_grad_(True)
    b = torch.zeros(V, requires_grad=True)
    teacher = (torch.randn(V, TD) * 0.05).bfloat16()
    rows = []
    print("\n| LM head loss, bf16, forward + backward | autograd µs | sf.head_loss µs | speed-up |\n|---|---|---|---|")
    for what, n in (("Phase 3 CE, 8 x 127 rows", 1016), ("Phase 3 KD, 256 rows", 256)):
        n = n if not smoke else 16
        h, y, t_states = torch.randn(n, D), torch.randint(V, (n,)), torch.randn(n, TD)
        kd = "KD" in what

        def autograd():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = F.linear(h, w, b)
                if kd:
                    with torch.no_grad():
                        t_logits = F.linear(t_states.bfloat16(), teacher)
                    loss = sf.kd_loss(logits[None], t_logits[None])
                else:
                    with torch.autocast("cpu", enabled=False):
                        loss = F.cross_entropy(logits, y)
            torch.autograd.grad(loss, [w, b])

        def fused():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if kd:
                    loss = sf.head_loss(h, w, b, policy, teacher_logits=lambda i, c: F.linear(
                        t_states[i:i + c].bfloat16(), teacher))
                else:
                    loss = sf.head_loss(h, w, b, policy, targets=y)
            torch.autograd.grad(loss, [w, b])

        a, f = timed_us(autograd, 5), timed_us(fused, 5)
        rows.append((f"head loss: {what}", a, f))
        print(f"| {what} ({n} x {D} @ {D} x {V}) | {a:.0f} | {f:.0f} | {a / f:.2f}x |", flush=True)
    return rows


def profile_steps(smoke: bool, top: int = 12):
    """torch.profiler's operators by self CPU time over 3 steps each: Phase 2 (superposition_step) and Phase 3
    (the new head's CE step as train_lm_head runs it), at the cpu preset's shapes, in bf16."""
    from torch.profiler import profile

    import spoonfeed_helpers as sf

    V, dim, B, T = (49152, 256, 8, 128) if not smoke else (512, 32, 2, 16)
    torch.manual_seed(0)
    model = sf.BitNetStudent(sf.StudentConfig(vocab_size=V, teacher_dim=576, dim=dim, n_layers=4 if not smoke else 2,
                                              n_heads=4 if not smoke else 2, max_seq_len=T))
    cfg = sf.make_config(batch_size=B, num_samples=B, lr=1e-3, precision="bf16")
    policy = sf.precision_policy("cpu", "bf16")
    tokens, target = torch.randint(0, V, (B, T)), torch.randn(B, T, 576)
    params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = sf._adamw(params, 1e-3, 0.0, model.tok_embeddings.weight, 100.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    phase2 = lambda: sf.superposition_step(model, opt, params, tokens, target, cfg, None, gen, policy)  # noqa: E731
    head, feats = model.head, torch.randn(B, T, dim)
    hopt = sf._adamw(list(head.parameters()), 5e-3, 0.0)

    def phase3():
        with sf._autocast(policy):
            loss = sf.head_loss(feats[:, :-1].flatten(0, 1), head.weight, head.bias, policy,
                                targets=tokens[:, 1:].flatten())
        sf.optimizer_step(loss, hopt, list(head.parameters()), 1.0)

    for name, step in (("Phase 2 step (cosine)", phase2), ("Phase 3 step (new head, CE)", phase3)):
        step()
        with profile() as prof:
            for _ in range(3):
                step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"\n{name}, bf16, 3 steps: {total / 3e3:.0f} ms a step of operator self time\n"
              "| operator | share | ms a step |\n|---|---|---|")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"| {e.key} | {e.self_cpu_time_total / total:.0%} | {e.self_cpu_time_total / 3e3:.1f} |")


if __name__ == "__main__":
    main()
