"""keep_freed_memory (glibc's mmap and trim thresholds raised, spoonfeed/precision.py) against glibc's default: one
training step of the LM head's fused loss at the `cpu` preset's shapes, forward + backward, in bf16.

    python bench/malloc.py            # 3 rounds, about a minute on 2 cores; run it on an idle machine
    python bench/malloc.py --smoke    # toy sizes, 1 round (run by the tests)

The setting is process-wide and fixed for a process's life, so each side runs in a child process of its own: the
rounds alternate default, then kept, each child timing --steps steps after one warm-up step. Two steps: Phase 3's
(head_loss over 8 x 127 rows, vocab 49,152, width 256, gradient for the head) and the direct-CE arm's (the same,
plus the gradient for the states). Printed: the median step in milliseconds of each side, their ratio (default /
kept: above 1 is faster kept), and the children's peak RSS; the machine and its load average come with the table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, {root!r})
from spoonfeed import losses
from spoonfeed.precision import keep_freed_memory, precision_policy
said = keep_freed_memory("cpu")
rows, vocab, dim, steps = {rows}, {vocab}, {dim}, {steps}
policy = precision_policy("cpu", "bf16")
torch.manual_seed(0)
w = (torch.randn(vocab, dim) * 0.02).requires_grad_(True)
b = torch.zeros(vocab, requires_grad=True)
y = torch.randint(0, vocab, (rows,))
out = {{"said": said}}
for name, h in (("head", torch.randn(rows, dim)), ("head + states", torch.randn(rows, dim, requires_grad=True))):
    times = []
    for i in range(steps + 1):
        w.grad = b.grad = h.grad = None
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = losses.head_loss(h, w, b, policy, targets=y)
        loss.backward()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    out[name] = statistics.median(times) * 1000
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""

FULL = dict(rows=8 * 127, vocab=49152, dim=256, steps=8, rounds=3)
SMOKE = dict(rows=16, vocab=4096, dim=32, steps=2, rounds=1)


def child(params: dict, kept: bool) -> dict:
    env = {**os.environ, "SPOONFEED_MALLOC": "1" if kept else "0"}
    code = CHILD.format(root=str(ROOT), **{k: params[k] for k in ("rows", "vocab", "dim", "steps")})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes, one round")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    from bench.run import machine_name

    p = SMOKE if args.smoke else FULL
    load = os.getloadavg()[0]
    runs = {False: [], True: []}
    for _ in range(p["rounds"]):
        for kept in (False, True):
            runs[kept].append(child(p, kept))
    rows = []
    for step in ("head", "head + states"):
        default = statistics.median(r[step] for r in runs[False])
        kept = statistics.median(r[step] for r in runs[True])
        rows.append(dict(step=step, default_ms=default, kept_ms=kept, ratio=default / kept))
    rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    lines = [(f"Machine: {machine_name()}; load average {load:.2f} at the start; {p['rounds']} rounds of "
              f"{p['steps']} steps, rows {p['rows']}, vocab {p['vocab']}, width {p['dim']}, bf16"),
             f"keep_freed_memory said: {runs[True][0]['said'] or '(nothing: not glibc)'}", "",
             "| step | glibc default (ms) | freed memory kept (ms) | default / kept |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['default_ms']:.1f} | {r['kept_ms']:.1f} | {r['ratio']:.2f}x |" for r in rows]
    lines += ["", f"Peak RSS of a child: default {rss[False]:.0f} MiB, kept {rss[True]:.0f} MiB"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_name(), "loadavg": load, "params": p,
                                              "rows": rows, "peak_rss_mib": rss, "time": time.ctime()}, indent=1))
    return rows


if __name__ == "__main__":
    main()
