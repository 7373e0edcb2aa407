"""The held-out CE's cost (issue 28): mean_ce today against the version before, and what a repeated held_out_ce
costs now that it is remembered per weights, side by side in one process at the `cpu` preset's shapes (not CI):

    python bench/held_out.py            # about a minute on 2 cores
    python bench/held_out.py --smoke    # toy sizes

The held-out CE is the student's float32 head over 64 held-out blocks of 128 tokens (8,128 predictions, vocab
49,152, width 256): a (8128, 256) x (256, 49152) product and a log-softmax over 400 M logits. A `cpu` notebook
computed it 14 times (Phase 3's four records, cell 8's evaluate, and nine times in the ablation, five of them on
weights it had just scored). "before" is mean_ce as it was (frozen below: F.cross_entropy on each batch's logits,
which makes a second (b (T - 1), V) tensor of log-probabilities); "now" is spoonfeed.losses.mean_ce (the
log-softmax written over the logits). The runs alternate, before then now, --repeat times; the figure is the ratio
of the medians, with the difference in value. Then held_out_ce on a cpu-shaped student: its first call against a
second on the same weights (weights_digest and a dictionary lookup). The machine, its load average and the date
are printed: on a loaded machine the ratios hold but the seconds are not speed figures.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from bench.run import machine_name  # noqa: E402
from spoonfeed.losses import mean_ce  # noqa: E402

SHAPES = {"full": dict(blocks=64, seq=128, dim=256, vocab=49152, teacher=576, layers=4, heads=4),
          "smoke": dict(blocks=4, seq=16, dim=32, vocab=512, teacher=48, layers=1, heads=2)}


def before_mean_ce(states, tokens, logits_fn, batch_size=16):
    """mean_ce before issue 28's change (frozen here)."""
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        j = min(i + batch_size, len(tokens))
        logits = logits_fn(states[i:j][:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), tokens[i:j, 1:].flatten(), reduction="sum").item()
    return total / (len(tokens) * (tokens.size(1) - 1))


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each (default 3)")
    args = ap.parse_args(argv)
    s = SHAPES["smoke" if args.smoke else "full"]
    torch.manual_seed(0)
    feats = torch.randn(s["blocks"], s["seq"], s["dim"])
    tokens = torch.randint(0, s["vocab"], (s["blocks"], s["seq"]))
    head = torch.nn.Linear(s["dim"], s["vocab"])
    with torch.no_grad():
        head.weight.mul_(4.0)  # logits spread like a trained head's (a CE of a few nats, not log V)
    times = {"before": [], "now": []}
    values = {}
    with torch.no_grad():
        for _ in range(args.repeat):
            for name, fn in (("before", before_mean_ce), ("now", mean_ce)):
                t, values[name] = _timed(lambda: fn(feats, tokens, head))
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # held_out_ce on a student of the cpu preset's shape, over a cache-like object holding random held-out blocks
    student = sf.BitNetStudent(sf.StudentConfig(vocab_size=s["vocab"], teacher_dim=s["teacher"], dim=s["dim"],
                                                n_layers=s["layers"], n_heads=s["heads"], max_seq_len=s["seq"]))
    val = tokens.numpy().astype(np.int32)
    cache = SimpleNamespace(num_val=len(val), content_digest="bench", tokens=lambda split, idx: torch.from_numpy(
        val[idx].astype(np.int64)))
    first, _ = _timed(lambda: sf.held_out_ce(student, cache))
    again, _ = _timed(lambda: sf.held_out_ce(student, cache))
    print(f"# held-out CE cost: {machine_name()}, {time.strftime('%H:%M')}, load average {os.getloadavg()[0]:.2f}\n")
    print(f"{s['blocks']} blocks x {s['seq'] - 1} predictions, vocab {s['vocab']}, width {s['dim']}; medians of "
          f"{args.repeat} alternating runs\n")
    print("| what | before s | now s | before / now | value before - now (nats/token) |\n|---|---|---|---|---|")
    print(f"| mean_ce, float32 head | {med['before']:.3f} | {med['now']:.3f} | {med['before'] / med['now']:.2f}x | "
          f"{values['before'] - values['now']:+.1e} |")
    print(f"| held_out_ce, a second call on the same weights (a student of this width, {s['layers']} layers) | "
          f"{first:.3f} (first call) | {again:.3f} | {first / again:.0f}x | 0 |")
    return {"median": med, "values": values, "first": first, "again": again}


if __name__ == "__main__":
    main()
