"""More Phase 1 data with fewer steps, or today's split? The `cpu` preset's recipe at a fixed notebook time.

    python bench/data_steps.py                  # on an IDLE machine: Phase 1 and the step speeds are timed
    python bench/data_steps.py --smoke          # the same code path at the smoke preset's sizes (tests)

The `cpu` preset cached 512 blocks of 128 tokens and trained on them for 300 + 150 steps (about 4.7 epochs of
Phase 2); "today's split" here is that one (bench/ablation.py's study_config), which this bench's result
replaced. At a fixed notebook time, more Phase 1 data costs training steps. For each size N (--sizes), this
builds the Phase 1 cache in a folder of its own and times it, measures the recipe's seconds a step and fixed
seconds on that cache (as bench/recipes.py --measure does), and scales the recipe's steps by one factor k so that

    Phase 1 seconds + fixed seconds + k * (steps x seconds a step)  =  --budget

(--budget: the seconds Phase 1 and training may take in a 10-minute notebook; the default, 336 s, is 600 s less
the other cells' 264 s in the 453 s `cpu` notebook of 2026-12-07, docs/benchmarks.md). Each size then trains
--seeds seeds at the arm's chosen learning rate (bench/recipes.py's equal-wall-clock choice) and is scored on a
held-out set common to all sizes, the largest cache's (its documents are held out of every smaller cache too:
checked from the caches' manifests), and on the second domain of bench/recipes.py. Today's split (512 blocks,
the preset's steps, below the budget) runs as the reference. Each size is compared with the budget's 512-block
point seed by seed, with a 95% t interval. Results go to --out as they come (resumable, run by run).

--phase3-steps n1,n2,... asks the other question at the largest size: at the same seconds of training, is
Phase 2 or Phase 3 worth more? Each value is a Phase 3 step count; Phase 2 gets the steps that keep the budget
point's training seconds (split_steps). Those points run instead of today's split and the smaller sizes, and each
is compared with the largest size's budget point, seed by seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from bench import recipes as rc  # noqa: E402
from bench.ablation import _json, interval_verdict, study_config, t_interval  # noqa: E402
from bench.run import machine_name  # noqa: E402

PRESETS = {"full": dict(preset="cpu", sizes=(512, 1024, 2048), seeds=3, budget=336.0, short=10, long=30),
           "smoke": dict(preset="smoke", sizes=(16, 32), seeds=2, budget=60.0, short=2, long=10)}


def held_out_docs_common(caches: dict) -> None:
    """The largest cache's held-out documents must be held out of every smaller cache as well: each is one of the
    smaller cache's held-out documents, or lies past the last document it read (when its training blocks filled
    first, the last document it read is its last held-out one). Raises ConfigError naming the cache otherwise."""
    manifests = {n: json.loads((c.path / "manifest.json").read_text()) for n, c in caches.items()}
    common = manifests[max(caches)]["val_docs"]
    for n, m in manifests.items():
        own = set(m["val_docs"])
        last = max(own) if m["val_docs"][-1] % 10 != 9 else None  # pack_blocks: every 10th document is held out
        leaked = [d for d in common if d not in own and (last is None or d <= last)]
        if leaked:
            raise sf.ConfigError(f"the {max(caches)}-block cache's held-out documents {leaked[:5]} may be training "
                                 f"text of the {n}-block cache: no common held-out set")


def common_speed(speed: dict, ref: dict, short: int) -> dict:
    """One size's speed with the seconds a step of the reference (smallest) size: a step costs the same whatever the
    cache holds, so only the fixed cost is the size's own, the rest of its short run (measure's `short` steps). This
    keeps measurement noise in the seconds a step from deciding which size gets more steps."""
    return {p: {"s_per_step": ref[p]["s_per_step"],
                "overhead_s": max(v["overhead_s"] + short * (v["s_per_step"] - ref[p]["s_per_step"]), 0.0)}
            for p, v in speed.items()}


def budget_steps(arm: rc.Arm, speed: dict, phase1_s: float, budget: float) -> dict:
    """The arm's steps scaled by one factor to fill what Phase 1 leaves of the budget (rc.steps_for_seconds). Raises
    ConfigError when the speed gives no seconds a step."""
    steps = rc.steps_for_seconds(arm, speed, budget - phase1_s)
    if steps is None:
        raise sf.ConfigError(f"the measured speed {speed} gives no seconds a step: measure on an idle machine")
    return steps


def split_steps(steps: dict, speed: dict, p3: int) -> dict:
    """The budget point's training seconds, spent on `p3` Phase 3 steps and as many Phase 2 steps as the rest pays
    for: p2' = p2 + (p3_budget - p3) * s3 / s2 (speed's seconds a step), rounded. Raises ConfigError when Phase 3
    would leave Phase 2 no step."""
    s2, s3 = speed["p2"]["s_per_step"], speed["p3"]["s_per_step"]
    p2 = round(steps["p2"] + (steps["p3"] - p3) * s3 / s2)
    if p2 < 1 or p3 < 0:
        most = math.floor(steps["p3"] + (steps["p2"] - 0.5) * s2 / s3)  # the last count that leaves Phase 2 a step
        raise sf.ConfigError(f"{p3} Phase 3 steps take all of the {steps['p2']} + {steps['p3']} steps' seconds "
                             f"and more: pick {most} or fewer")
    return {"p2": p2, "p3": p3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smoke preset's sizes")
    ap.add_argument("--arm", default="a", help="bench/recipes.py's arm to train (default a, Spoon Feed)")
    ap.add_argument("--lr", type=float, help="its learning rate (default: its equal-wall-clock choice in --recipes)")
    ap.add_argument("--recipes", default=str(ROOT / "bench/results/recipes-cpu-2026-12-07.json"),
                    help="the recipes study's JSON, for the chosen learning rate")
    ap.add_argument("--sizes", help="comma-separated NUM_CACHE_SAMPLES values (default 512,1024,2048)")
    ap.add_argument("--seeds", type=int, help="seeds 0..n-1 (default 3)")
    ap.add_argument("--budget", type=float, help="seconds for Phase 1 + training (default 336)")
    ap.add_argument("--out", help="results JSON (default runs/data-steps[-smoke]/data-steps.json)")
    ap.add_argument("--phase3-steps", help="comma-separated Phase 3 step counts at the largest size, Phase 2 filling "
                                           "the same seconds (split_steps); runs these against its budget point")
    args = ap.parse_args(argv)
    p = PRESETS["smoke" if args.smoke else "full"]
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else p["sizes"]
    seeds = range(args.seeds if args.seeds is not None else p["seeds"])
    budget = args.budget if args.budget is not None else p["budget"]
    out = Path(args.out) if args.out else ROOT / "runs" / ("data-steps-smoke" if args.smoke else "data-steps") / "data-steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    base = dataclasses.replace(study_config(p["preset"]), eval_every=10**6, kd_weight=0.0, recipe="spoonfeed",
                               cache_dir=str(out.parent / f"{out.stem}-cache"))
    arm = rc.arms(base)[args.arm]
    lr = args.lr
    if lr is None:
        chosen = json.loads(Path(args.recipes).read_text()).get("chosen", {}).get("wallclock", {}).get(args.arm) \
            if Path(args.recipes).exists() else None
        lr = chosen["lr"] if chosen else arm.lrs[1]
    data = json.loads(out.read_text()) if out.exists() else {}
    splits = [int(v) for v in args.phase3_steps.split(",")] if args.phase3_steps else []
    want = {"arm": args.arm, "lr": lr, "budget": budget, "preset": p["preset"], "sizes": list(sizes),
            **({"phase3_steps": splits} if splits else {})}
    if data and data.get("settings") != want:
        raise sf.ConfigError(f"{out} holds results from other settings ({data.get('settings')}): pass another --out")
    data.setdefault("settings", want)
    data.setdefault("machine", machine_name())
    data.setdefault("sizes", {})
    save = lambda: sf._atomic_write_text(out, _json(data))  # noqa: E731
    caches = {}
    for n in sizes:  # Phase 1 for each size, in a folder of its own, timed when built
        cfg = dataclasses.replace(base, num_samples=n).validate()
        entry = data["sizes"].setdefault(str(n), {})
        if splits and n != max(sizes) and {"phase1_s", "speed"} <= set(entry):
            continue  # only its timings are read: the split points train on the largest size
        t0, load = time.perf_counter(), os.getloadavg()[0]
        caches[n] = sf.cache_teacher_states(cfg, progress=not args.smoke)
        if "phase1_s" not in entry:
            entry.update(phase1_s=time.perf_counter() - t0, phase1_load=load, num_train=caches[n].num_train)
            save()
    held_out_docs_common(caches)
    common = caches[max(sizes)]
    second = rc.second_domain_cache(base, Path(base.cache_dir) / "second-domain")
    for n in sizes:  # the arm's speed on each cache (Phase 3's fixed cost grows with the blocks)
        entry = data["sizes"][str(n)]
        if "speed" not in entry:  # a size skipped above has its speed already
            cfg = dataclasses.replace(base, num_samples=n)
            speed = rc.measure(caches[n], cfg, [args.arm], out.parent / f"{out.stem}-speed-{n}.json", p["short"],
                               p["long"])
            entry["speed"] = speed["arms"][args.arm]
            save()
    ref = data["sizes"][str(sizes[0])]["speed"]
    for n in sizes:
        entry = data["sizes"][str(n)]
        entry["budget_speed"] = common_speed(entry["speed"], ref, p["short"])
        entry["steps"] = budget_steps(arm, entry["budget_speed"], entry["phase1_s"], budget)
    if splits:  # the largest size's budget point against its own seconds split otherwise between the phases
        n, big = max(sizes), data["sizes"][str(max(sizes))]
        ref = f"budget-{n}"  # what every other point is compared with
        points = [(ref, n, big["steps"])] + [
            (f"phase3-{p3}", n, split_steps(big["steps"], big["budget_speed"], p3)) for p3 in splits]
    else:
        ref = f"budget-{sizes[0]}"
        points = [("today", sizes[0], rc.equal_steps(arm))] + [(f"budget-{n}", n, data["sizes"][str(n)]["steps"])
                                                                 for n in sizes]
    data.setdefault("runs", {})
    for seed in seeds:
        for name, n, steps in points:
            k = f"{name}/s{seed}"
            if k in data["runs"]:
                continue
            run_dir = out.parent / f"{out.stem}-runs" / k.replace("/", "_")
            cfg = rc.run_config(dataclasses.replace(base, num_samples=n), arm, lr, {}, seed, run_dir)
            t0 = time.perf_counter()
            model, _ = rc.train(caches[n], cfg, arm, steps, progress=not args.smoke)
            r = {"point": name, "num_samples": n, "seed": seed, "steps": steps, "train_seconds": time.perf_counter() - t0,
                 "ce_common": sf.held_out_ce(model, common, precision=cfg.precision),
                 "ce_own": sf.held_out_ce(model, caches[n], precision=cfg.precision),
                 "second_ce": sf.held_out_ce(model, second, precision=cfg.precision), "loadavg": os.getloadavg()[0]}
            data["runs"][k] = r
            save()
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"  {name} ({n} blocks, steps {steps}) seed {seed}: common held-out CE {r['ce_common']:.4f}, own "
                  f"{r['ce_own']:.4f}, second domain {r['second_ce']:.4f}, {r['train_seconds']:.0f} s", flush=True)
    data["summary"] = summarise(data, [name for name, _, _ in points], ref, base.student_dim)
    save()
    report = format_report(data)
    out.with_suffix(".md").write_text(report + "\n")
    print("\n" + report + f"\n\nwrote {out} and {out.with_suffix('.md')}")
    return data


def summarise(data: dict, names, ref: str, width: int) -> dict:
    """Per point: mean and 95% t interval of each CE over seeds; against `ref` (the budget's smallest size), the
    paired per-seed differences with their interval and a verdict that names a winner only where it excludes 0."""
    runs = data["runs"]
    out = {}
    for name in names:
        mine = {r["seed"]: r for r in runs.values() if r["point"] == name}
        theirs = {r["seed"]: r for r in runs.values() if r["point"] == ref}
        row = {m: t_interval([r[m] for r in mine.values()]) for m in ("ce_common", "ce_own", "second_ce")}
        seeds = sorted(set(mine) & set(theirs))
        if name != ref and seeds:
            diff = t_interval([mine[s]["ce_common"] - theirs[s]["ce_common"] for s in seeds])
            row["vs_ref"] = {**diff, "verdict": interval_verdict(diff, (name, ref), "nats/token (common held-out)",
                                                                 width, higher_is_better=False)}
        row["steps"] = next(iter(mine.values()))["steps"] if mine else {}
        out[name] = row
    return out


def format_report(data: dict) -> str:
    s = data["settings"]
    lines = [f"# Data against steps at {s['budget']:.0f} s of Phase 1 + training ({data['machine']})", "",
             f"Arm ({s['arm']}) at LR {s['lr']:g}; CE in nats/token, mean ± 95% t half-width over seeds.", "",
             "| size | Phase 1 s | speed used (phase: s/step of the smallest size + this size's fixed s) |", "|---|---|---|"]
    for n, e in data["sizes"].items():
        speed = "; ".join(f"{p} {v['s_per_step']:.3f} + {v['overhead_s']:.1f}"
                          for p, v in e.get("budget_speed", {}).items())
        lines.append(f"| {n} | {e['phase1_s']:.1f} | {speed} |")
    ref = f"the {max(s['sizes'])}-block budget point" if s.get("phase3_steps") else "the smallest budget point"
    lines += ["", f"| point | steps | common held-out CE | own held-out CE | second-domain CE | against {ref} |",
              "|---|---|---|---|---|---|"]
    for name, row in data["summary"].items():
        pm = {m: f"{row[m]['mean']:.4f} ± {row[m]['half_width']:.4f}" for m in ("ce_common", "ce_own", "second_ce")}
        vs = row.get("vs_ref")
        lines.append(f"| {name} | {' + '.join(str(v) for v in row['steps'].values())} | {pm['ce_common']} | "
                     f"{pm['ce_own']} | {pm['second_ce']} | "
                     + (f"{vs['mean']:+.4f} ± {vs['half_width']:.4f}: {vs['verdict']}" if vs else "–") + " |")
    dropped = data.get("runs_dropped", {})  # points given up after some seeds, kept with the reason
    if dropped:
        lines += ["", "Runs of points the study gave up (not in the table above):", "",
                  "| run | steps | common held-out CE | second-domain CE | why |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {' + '.join(str(v) for v in r['steps'].values())} | {r['ce_common']:.4f} | "
                  f"{r['second_ce']:.4f} | {r['why']} |" for k, r in dropped.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
