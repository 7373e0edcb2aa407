"""Is the superposition verdict real? The ablation over seeds and widths, with error bars and equal memory.

    python bench/ablation.py             # 4 arms x widths 128,256,512 x 3 seeds + equal-memory arms, cpu preset
    python bench/ablation.py --smoke     # the same code path at the smoke preset's sizes (run by the tests)
    nice -n 19 python bench/ablation.py --widths 256 --seeds 1     # one arm of each kind: the time estimate

Arms, at equal data and budget (the `cpu` preset's ablation budget, ablation_steps + ablation_head_steps,
as in the notebook's section 11):
  (a) ternary + Spoon Feed               (Phase 2 cosine to the cached teacher states, then Phase 3);
  (b) full-precision linears + Spoon Feed;
  (c) ternary, direct next-token CE      (no teacher; as many optimiser steps as (a)'s two phases together);
  (d) full precision, direct next-token CE.
Every arm uses the bundled teacher's one Phase 1 cache (stdlib corpus) and differs from the others only in
precision, method, width and the training seed. For each width w, arm (b) also runs at equal_memory_width(w):
the full-precision width whose BitLinear weights take the same bytes in bf16 as ternary ones at w.

Resumable arm by arm: every finished (arm, width, seed) goes into --out (JSON, written atomically) at once,
and a rerun skips what is there. Inside an arm, Phases 2 and 3 also checkpoint (the helpers' own
checkpoints), so a kill mid-arm loses at most ckpt_every steps of (a)/(b); a direct-CE arm restarts.

The report (stdout, and a markdown file next to --out) gives per cell the mean and standard deviation over
seeds of the held-out cosine gain and CE; the paired differences (a - b) and (a - c) over seeds with a 95%
two-sided Student t interval; the equal-memory comparison; and a verdict computed from the intervals.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from bench.run import machine_name  # noqa: E402  (the machine line every bench result carries)

# arm -> (label, ternary BitLinears?, method)
ARMS = {
    "a": ("ternary + Spoon Feed", True, "spoonfeed"),
    "b": ("full precision + Spoon Feed", False, "spoonfeed"),
    "c": ("ternary, direct CE", True, "direct"),
    "d": ("full precision, direct CE", False, "direct"),
}
TERNARY_BITS = math.log2(3)  # 1.58 bits a weight: what a ternary weight holds (the packed export takes 1.6)
FP_BITS = 16  # full precision stored in bf16
CONFIDENCE = 0.95

# the `cpu` preset as the benches' committed studies ran on it (until 2026-12-07; the preset has since taken 1,024
# blocks, 371 + 186 steps at LR 1e-3 and a 100 + 50 ablation): pinned so that their results files still resume
CPU_2026_12_07 = dict(num_samples=512, superposition_steps=300, lm_head_steps=150, lr=2e-3, ablation_steps=150,
                      ablation_head_steps=75)
FULL = dict(preset="cpu", widths=(128, 256, 512), seeds=3)
# smoke: the smoke preset's sizes, but without its Phase 2 logit KD, which the cpu preset's arms do not use either
SMOKE = dict(preset="smoke", widths=(16, 32), seeds=2, kd_weight=0.0)


def study_config(preset: str, **form) -> sf.RunConfig:
    """make_config for the benches' studies (this one, bench/recipes.py, bench/data_steps.py): the `cpu` preset with
    CPU_2026_12_07 pinned, the settings their committed results ran on; other presets as they are. The pin is
    named `explicit`, so that a pinned value equal to a form default (lr 2e-3 is not; it need not be) still wins."""
    pin = CPU_2026_12_07 if preset == "cpu" else {}
    return sf.make_config(preset, explicit=pin, **{**form, **pin})


# --- memory: the equal-memory width -----------------------------------------------------------------------

def bitlinear_weights(cfg: sf.RunConfig, width: int) -> int:
    """Number of weights in the student's BitLinear layers (q, k, v, o and the SwiGLU's three) at this width.
    The embedding, norms, projector and head are full precision in every arm and are not counted.
    Counted on a model built on the meta device, so it is the model's own count and costs no memory."""
    student = cfg.student_config(vocab_size=2, teacher_dim=2, dim=width)
    return _bitlinear_weights(tuple(sorted(dataclasses.asdict(student).items())))


@functools.lru_cache(maxsize=None)
def _bitlinear_weights(student: tuple) -> int:
    import torch

    with torch.device("meta"):
        model = sf.BitNetStudent(sf.StudentConfig(**dict(student)))
    return sum(m.weight.numel() for _, m in model.bitlinears())


def bitlinear_bytes(cfg: sf.RunConfig, width: int, bits: float) -> float:
    """Bytes the BitLinear weights take at `bits` a weight (TERNARY_BITS = log2 3, or FP_BITS = 16 for bf16)."""
    return bitlinear_weights(cfg, width) * bits / 8


def equal_memory_width(cfg: sf.RunConfig, width: int) -> int:
    """The full-precision width whose BitLinear weights take, in bf16, the bytes closest to the ternary ones at
    `width` (log2 3 = 1.58 bits a weight). The BitLinear count grows as width^2 (16 width^2 a layer with the
    SwiGLU at 4x), so the answer is near width * sqrt(1.58 / 16) = 0.315 width. Candidates are the widths a
    student can have: multiples of 2 * student_heads, so that dim divides by the heads and the head dim stays
    even (RoPE). The one with the smallest byte difference wins (ties: the smaller). Raises ConfigError when
    no valid width is below `width`."""
    step = 2 * cfg.student_heads
    target = bitlinear_bytes(cfg, width, TERNARY_BITS)
    candidates = list(range(step, width, step))
    if not candidates:
        raise sf.ConfigError(f"no full-precision width below {width} has an even head dim with {cfg.student_heads} "
                          "heads: use a larger width")
    return min(candidates, key=lambda w: (abs(bitlinear_bytes(cfg, w, FP_BITS) - target), w))


# --- statistics and the verdict ---------------------------------------------------------------------------

def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """Mean, sample standard deviation (ddof 1) and the two-sided Student t interval of the mean:
    mean +/- t_{(1+confidence)/2, n-1} * sd / sqrt(n). For paired differences pass the per-seed differences
    (the paired t interval). With fewer than 2 values the half-width is NaN: one seed gives no interval."""
    from scipy import stats

    x = np.asarray([v for v in values if v == v], dtype=np.float64)  # drop NaN
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": n, "half_width": half, "low": mean - half, "high": mean + half,
            "confidence": confidence, "method": "two-sided Student t" + (f", {n - 1} df" if n > 1 else "")}


def interval_verdict(diff: dict, names: tuple[str, str], metric: str, width, higher_is_better: bool) -> str:
    """One line from the interval of A - B (diff: t_interval's dict). The winner is named only when the interval
    excludes zero: "A ahead by X +/- Y <metric> at width w"; otherwise "not resolved at n seeds". For a metric
    where lower is better (CE), a negative difference puts A ahead."""
    n, mean, half = diff["n"], diff["mean"], diff["half_width"]
    if n == 0:
        return f"{names[0]} vs {names[1]} at width {width}: not measured"
    if not half == half:  # NaN: a single seed
        return (f"{names[0]} vs {names[1]} at width {width}: not resolved at {n} seed ({metric} difference "
                f"{mean:+.4f}; one seed gives no interval)")
    if diff["low"] > 0 or diff["high"] < 0:
        a_ahead = (mean > 0) == higher_is_better
        winner, loser = names if a_ahead else names[::-1]
        return (f"{winner} ahead of {loser} by {abs(mean):.4f} +/- {half:.4f} {metric} at width {width} "
                f"({diff['confidence']:.0%} t interval, {n} seeds)")
    return (f"{names[0]} vs {names[1]} at width {width}: not resolved at {n} seeds ({metric} difference "
            f"{mean:+.4f} +/- {half:.4f}, the interval crosses zero)")


# --- the runs ----------------------------------------------------------------------------------------------

def base_config(cfg: sf.RunConfig, steps: int | None = None, head_steps: int | None = None) -> sf.RunConfig:
    """The arms' shared settings: the notebook's ablation settings (run_ablation's), at the preset's ablation
    budget unless steps / head_steps are given."""
    steps = cfg.ablation_steps if steps is None else steps
    head_steps = cfg.ablation_head_steps if head_steps is None else head_steps
    return dataclasses.replace(cfg, superposition_steps=steps, lm_head_steps=head_steps, head_mode="new",
                               eval_every=max(steps, 1)).validate()


def plan(cfg: sf.RunConfig, widths, seeds, arms="abcd", equal_memory: bool = True) -> list[tuple[str, int, int]]:
    """(arm, width, seed) in run order: seed by seed, so a run cut short leaves whole seeds. Arm (b) also
    runs at each width's equal-memory width. Bad widths raise ConfigError before any work."""
    dataclasses.replace(cfg, ablation_widths=tuple(widths)).validate()  # dim / heads / even head dim
    jobs = []
    for seed in seeds:
        for w in widths:
            jobs += [(arm, w, seed) for arm in arms]
            if equal_memory and "a" in arms:
                jobs.append(("b", equal_memory_width(cfg, w), seed))
    return list(dict.fromkeys(jobs))


def _json(data) -> str:
    """Strict JSON: NaN and infinities (a direct-CE arm's cosine, a one-seed interval) become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=1, allow_nan=False)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def key(arm, width, seed) -> str:
    return f"{arm}/{width}/{seed}"


def settings(base: sf.RunConfig, cache) -> dict:
    """What every result in one JSON must share; a rerun with other settings is refused, not mixed in."""
    skip = {"seed", "student_dim", "run_dir", "cache_dir", "ablation_widths", "device", "ckpt_every"}
    s = {k: v for k, v in dataclasses.asdict(base).items() if k not in skip}
    s["cache_content"] = cache.content_digest  # what the results come from: a cache rebuilt in its folder differs
    s["precision"] = sf.precision_policy(base.device, base.precision).name  # what "auto" chose on this machine
    return s


def legacy_cache_key(path: Path, old: dict, expected: dict, results: dict, folders: dict, figures: dict) -> bool:
    """Whether a results file written before results were keyed on the cache's content is this cache's: its
    settings name the cache FOLDER ({"cache": name}, folders: {key: this cache's folder name}) and no content
    digest, but agree otherwise. The folder name is the request's hash, not the content (a rebuild in the same
    folder keeps it), so the content is checked through figures that depend on the cache alone: each result's
    (figures: {field: this cache's value}, e.g. teacher_ce, the teacher's held-out CE) must agree to 1e-4, and
    at least one must be there to check. True: take it (its settings are then rewritten with the digest).
    False: not the legacy form. Raises ConfigError when it is, but the content differs or cannot be checked."""
    content = {k for k in expected if k.endswith("cache_content")}
    if not content or content & set(old) or set(folders) - set(old):
        return False
    if {k: v for k, v in old.items() if k not in folders} != {k: v for k, v in expected.items() if k not in content}:
        return False
    if any(old[k] != v for k, v in folders.items()):
        return False
    checked = 0
    for r in results.values():
        for field, now in figures.items():
            was = r.get(field)
            if isinstance(was, (int, float)) and math.isfinite(was):
                if abs(was - now) > 1e-4 * max(1.0, abs(now)):
                    raise sf.ConfigError(f"{path} holds results from the cache folder {old.get('cache')} as it was "
                                         f"before a rebuild ({field} {was:.6g} then, {now:.6g} now): pass another "
                                         "--out for results from this cache's content")
                checked += 1
    if results and not checked:
        raise sf.ConfigError(f"{path} names its cache by folder, not content, and none of its results holds a figure "
                             "that shows which content it was: pass another --out")
    print(f"{path}: results keyed by cache folder, before content digests; {checked} figure(s) of this cache's "
          "content agree, so they are kept and keyed by content from now on", flush=True)
    return True


def load_results(path: Path, expected: dict, cache=None) -> dict:
    """The results file at path, or a new one. Its settings must be `expected`; a file from before results were
    keyed on the cache's content is taken when its figures show this cache's content (legacy_cache_key: cache is
    the TeacherCache). Raises ConfigError for results from other settings or another cache content."""
    if not path.exists():
        return {"settings": expected, "results": {}}
    data = json.loads(path.read_text())
    if cache is not None and legacy_cache_key(path, data.get("settings") or {}, expected, data.get("results", {}),
                                              {"cache": cache.path.name}, {"teacher_ce": cache.teacher_ce()}):
        data["settings"] = expected
    if data.get("settings") != expected:
        old = data.get("settings") or {}
        diff = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
        raise sf.ConfigError(f"{path} holds results from other settings ({', '.join(diff)} differ): pass "
                             "another --out to keep both, or rerun with the settings that wrote it")
    return data


def run_arm(cache, base: sf.RunConfig, arm: str, width: int, seed: int, run_dir: Path, progress: bool) -> dict:
    """Train and evaluate one (arm, width, seed). Returns its held-out figures and its wall time."""
    _, ternary, method = ARMS[arm]
    cfg = dataclasses.replace(base, student_dim=width, seed=seed, run_dir=str(run_dir))
    t0, c0 = time.perf_counter(), time.process_time()
    model = sf.build_student(cfg, cache, ternary=ternary)
    if method == "spoonfeed":
        sf.train_superposition(model, cache, cfg, progress=progress)
        sf.train_lm_head(model, cache, cfg, progress=progress)
    else:
        sf.train_direct_ce(model, cache, cfg, progress=progress)
    m = sf.evaluate(model, cache, precision=cfg.precision, via_teacher_head=False)["metrics"]
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    spoonfeed = method == "spoonfeed"  # a direct-CE arm never trains its projector: no cosine to report
    return {"arm": arm, "width": width, "seed": seed, "ternary": ternary, "method": method,
            "cosine": m["student_cosine"] if spoonfeed else float("nan"), "baseline_cosine": m["baseline_cosine"],
            "cosine_gain": m["cosine_gain"] if spoonfeed else float("nan"), "ce": m["student_ce"],
            "teacher_ce": m["teacher_ce"], "unigram_ce": m["unigram_ce"], "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # process CPU time, all threads: less swayed by a busy machine than wall
            "bitlinear_weights": bitlinear_weights(base, width),
            "bitlinear_bytes": bitlinear_bytes(base, width, TERNARY_BITS if ternary else FP_BITS),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(cfg: sf.RunConfig, cache, widths, seeds, out: Path, arms="abcd", equal_memory=True, steps=None,
        head_steps=None, progress=True, max_arms: int | None = None) -> dict:
    """Run every planned arm not yet in `out`, writing `out` atomically after each one. max_arms stops after
    that many newly finished arms (what a kill does; tests). Returns the results dict as written."""
    base = base_config(cfg, steps, head_steps)
    jobs = plan(base, widths, seeds, arms, equal_memory)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = load_results(out, settings(base, cache), cache)
    old_plan = [tuple(j) for j in data.get("plan", [])]  # a rerun on a subset keeps the plan of what is there
    data.update(machine=data.get("machine", machine_name()), plan=[list(j) for j in dict.fromkeys(old_plan + jobs)])
    if equal_memory:
        data.setdefault("equal_memory_widths", {}).update({str(w): equal_memory_width(base, w) for w in widths})
    todo = [j for j in jobs if key(*j) not in data["results"]]
    print(f"ablation: {len(jobs)} arms planned, {len(jobs) - len(todo)} already in {out}, {len(todo)} to run",
          flush=True)
    done = 0
    for arm, width, seed in todo:
        if max_arms is not None and done >= max_arms:
            break
        # the arm's own checkpoints, under this --out's name: a Phase 3 checkpoint is only valid on the Phase 2
        # that wrote it, so two result files with other settings must never share an arm's folder
        run_dir = out.parent / f"{out.stem}-arms" / f"{arm}-{width}-s{seed}"
        r = run_arm(cache, base, arm, width, seed, run_dir, progress)
        data["results"][key(arm, width, seed)] = r
        sf._atomic_write_text(out, _json(data))
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints: the result is safe in `out` now
        done += 1
        print(f"  ({arm}) {ARMS[arm][0]:<28} width {width:>4} seed {seed}: gain {r['cosine_gain']:.4f} "
              f"CE {r['ce']:.3f}  {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU", flush=True)
    return data


# --- the analysis -----------------------------------------------------------------------------------------

def _by_seed(results: dict, arm: str, width: int, metric: str) -> dict:
    return {r["seed"]: _num(r[metric]) for r in results.values() if r["arm"] == arm and r["width"] == width}


def paired(results: dict, x: tuple, y: tuple, metric: str) -> dict:
    """t_interval of x - y over the seeds both (arm, width) cells have; x, y: (arm, width)."""
    a, b = _by_seed(results, *x, metric), _by_seed(results, *y, metric)
    seeds = sorted(s for s in set(a) & set(b) if a[s] == a[s] and b[s] == b[s])  # both figures, neither NaN
    return {**t_interval([a[s] - b[s] for s in seeds]), "seeds": seeds}


def summarise(data: dict, main_width: int | None = None) -> dict:
    """Cells (mean and sd over seeds), paired differences, the equal-memory comparison and the verdict."""
    results = data["results"]
    cells = {}
    for r in results.values():
        cells.setdefault((r["arm"], r["width"]), []).append(r)
    cell_rows = []
    for (arm, width), rs in sorted(cells.items()):
        gain, ce = t_interval([_num(r["cosine_gain"]) for r in rs]), t_interval([_num(r["ce"]) for r in rs])
        cell_rows.append({"arm": arm, "label": ARMS[arm][0], "width": width, "seeds": sorted(r["seed"] for r in rs),
                          "gain_mean": gain["mean"], "gain_sd": gain["sd"], "ce_mean": ce["mean"], "ce_sd": ce["sd"],
                          "bitlinear_bytes": rs[0]["bitlinear_bytes"],
                          "seconds_mean": float(np.mean([r["seconds"] for r in rs]))})
    widths = sorted({w for a, w in cells if a == "a"})
    diffs, verdicts = [], []
    for w in widths:
        comparisons = (("b", "cosine_gain", True, "cosine gain"), ("b", "ce", False, "nats CE"),
                       ("c", "ce", False, "nats CE"))
        for other, metric, better_high, what in comparisons:
            if (other, w) not in cells:
                continue
            d = paired(results, ("a", w), (other, w), metric)
            names = ("ternary", "full precision") if other == "b" else ("Spoon Feed", "direct CE")
            v = interval_verdict(d, names, what, w, better_high)
            diffs.append({"comparison": f"(a) - ({other})", "metric": metric, "width": w, **d, "verdict": v})
    equal = []
    for w in widths:
        fp = data.get("equal_memory_widths", {}).get(str(w))
        if fp is None or ("b", fp) not in cells:
            continue
        row = {"ternary_width": w, "fp_width": fp, "ternary_bytes": cells[("a", w)][0]["bitlinear_bytes"],
               "fp_bytes": cells[("b", fp)][0]["bitlinear_bytes"]}
        row["bytes_ratio"] = row["fp_bytes"] / row["ternary_bytes"]
        for metric, better_high, what in (("cosine_gain", True, "cosine gain"), ("ce", False, "nats CE")):
            d = paired(results, ("a", w), ("b", fp), metric)
            row[metric] = d
            row[f"{metric}_verdict"] = interval_verdict(d, ("ternary", f"full precision of equal memory (width {fp})"),
                                                        what, w, better_high)
        equal.append(row)
    if main_width is None and widths:
        main_width = 256 if 256 in widths else widths[len(widths) // 2]
    for d in diffs:
        if d["width"] == main_width and d["metric"] == ("cosine_gain" if d["comparison"] == "(a) - (b)" else "ce"):
            verdicts.append(d["verdict"])
    for row in equal:
        if row["ternary_width"] == main_width:
            verdicts.append(row["cosine_gain_verdict"])
    return {"cells": cell_rows, "differences": diffs, "equal_memory": equal, "main_width": main_width,
            "verdict": "; ".join(verdicts)}


def _pm(mean, sd, digits):
    return f"{mean:.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}") if mean == mean else "–"


def format_report(data: dict, summary: dict) -> str:
    s = data["settings"]
    lines = [f"Machine: {data.get('machine', '?')}",
             f"Budget per arm: {s['superposition_steps']} + {s['lm_head_steps']} steps ((c)/(d): "
             f"{s['superposition_steps'] + s['lm_head_steps']} direct-CE steps), batch {s['batch_size']}, "
             f"{s['student_layers']} layers x {s['student_heads']} heads, teacher {s['teacher']}, data {s['dataset']}",
             "", "| arm | width | seeds | cosine gain (mean ± sd) | held-out CE (mean ± sd) | BitLinear KiB | s/arm |",
             "|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        lines.append(f"| ({c['arm']}) {c['label']} | {c['width']} | {len(c['seeds'])} | "
                     f"{_pm(c['gain_mean'], c['gain_sd'], 4)} | {_pm(c['ce_mean'], c['ce_sd'], 3)} | "
                     f"{c['bitlinear_bytes'] / 1024:.0f} | {c['seconds_mean']:.0f} |")
    lines += ["", "Paired differences over seeds (same seed: same init and batch order), 95% two-sided Student t "
              "interval (n - 1 df):", "", "| difference | metric | width | seeds | mean ± half-width | verdict |",
              "|---|---|---|---|---|---|"]
    for d in summary["differences"]:
        lines.append(f"| {d['comparison']} | {d['metric']} | {d['width']} | {d['n']} | "
                     f"{_pm(d['mean'], d['half_width'], 4)} "
                     f"| {d['verdict']} |")
    if not summary["equal_memory"]:  # --no-equal-memory, or no (b) run at those widths yet
        return "\n".join(lines + ["", f"Verdict (width {summary['main_width']}): {summary['verdict']}"])
    lines += ["", "Equal memory: ternary (a) at width w against full precision (b) at the width whose BitLinear "
              f"weights take the same bytes in bf16 ({TERNARY_BITS:.2f} vs {FP_BITS} bits a weight):", "",
              "| ternary width | fp width | BitLinear KiB ternary / fp | (a) - (b) cosine gain | (a) - (b) CE "
              "| verdict |",
              "|---|---|---|---|---|---|"]
    for e in summary["equal_memory"]:
        g, c = e["cosine_gain"], e["ce"]
        lines.append(f"| {e['ternary_width']} | {e['fp_width']} | {e['ternary_bytes'] / 1024:.0f} / "
                     f"{e['fp_bytes'] / 1024:.0f} ({e['bytes_ratio']:.2f}x) | {_pm(g['mean'], g['half_width'], 4)} | "
                     f"{_pm(c['mean'], c['half_width'], 3)} | {e['cosine_gain_verdict']} |")
    lines += ["", f"Verdict (width {summary['main_width']}): {summary['verdict']}"]
    return "\n".join(lines)


def plot(summary: dict, path=None):
    """Three panels, error bars = one standard deviation over seeds: cosine gain against width, cosine gain
    against BitLinear memory (the equal-memory view), held-out CE against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, marker in zip(ARMS, "osD^"):
        cs = [c for c in summary["cells"] if c["arm"] == arm]
        if not cs:
            continue
        w = np.array([c["width"] for c in cs])
        kw = dict(marker=marker, capsize=3, label=f"({arm}) {ARMS[arm][0]}")
        if ARMS[arm][2] == "spoonfeed":
            axes[0].errorbar(w, [c["gain_mean"] for c in cs], yerr=np.nan_to_num([c["gain_sd"] for c in cs]), **kw)
            axes[1].errorbar([c["bitlinear_bytes"] / 2**20 for c in cs], [c["gain_mean"] for c in cs],
                             yerr=np.nan_to_num([c["gain_sd"] for c in cs]), **kw)
        axes[2].errorbar(w, [c["ce_mean"] for c in cs], yerr=np.nan_to_num([c["ce_sd"] for c in cs]), **kw)
    axes[0].set(title="held-out cosine gain over the mean vector", xlabel="student width", ylabel="cosine gain")
    axes[1].set(title="the same against BitLinear memory", xlabel=f"BitLinear MiB (ternary {TERNARY_BITS:.2f} bits, "
                f"fp {FP_BITS} bits)", ylabel="cosine gain")
    axes[2].set(title="held-out CE", xlabel="student width", ylabel="nats/token")
    widths = sorted({c["width"] for c in summary["cells"]})
    for i, ax in enumerate(axes):
        ax.set_xscale("log", base=2)
        if i != 1:  # the widths themselves as ticks, not powers of two
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ablation: mean ± sd over seeds", fontsize=10)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smoke preset's sizes, widths 16,32, 2 seeds")
    ap.add_argument("--widths", help="comma-separated student widths (default 128,256,512)")
    ap.add_argument("--seeds", type=int, help="number of training seeds, 0..n-1 (default 3)")
    ap.add_argument("--arms", default="abcd", help="which arms, e.g. ab (default abcd)")
    ap.add_argument("--no-equal-memory", action="store_true", help="skip arm (b) at the equal-memory widths")
    ap.add_argument("--steps", type=int, help="Phase 2 steps per arm (default: the preset's ablation_steps)")
    ap.add_argument("--head-steps", type=int, help="Phase 3 steps per arm (default: ablation_head_steps)")
    ap.add_argument("--out", default=None, help="results JSON (default runs/ablation[-smoke]/ablation.json); "
                    "the plot (.png) and report (.md) go next to it")
    ap.add_argument("--cache-dir", default=str(ROOT / "spoonfeed_cache"), help="Phase 1 cache folder")
    ap.add_argument("--precision", default="auto", choices=sf.PRECISIONS, help="PRECISION for every arm")
    ap.add_argument("--max-arms", type=int, help=argparse.SUPPRESS)  # stop after this many arms (tests)
    args = ap.parse_args(argv)
    p = SMOKE if args.smoke else FULL
    try:  # the notebook's ABLATION_WIDTHS rules, named as this command's option
        widths = sf.parse_widths(args.widths) if args.widths is not None else p["widths"]
    except sf.ConfigError:
        ap.error(f"--widths {args.widths!r}: give student widths separated by commas, such as 128,256,512")
    if not widths:
        ap.error("--widths is empty: give student widths separated by commas, such as 128,256,512")
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: run at least 1 seed (3 or more give an interval)")
    seeds = range(args.seeds if args.seeds is not None else p["seeds"])
    if set(args.arms) - set(ARMS) or not args.arms:
        ap.error(f"--arms takes letters from {''.join(ARMS)}")
    out = Path(args.out or ROOT / "runs" / ("ablation-smoke" if args.smoke else "ablation") / "ablation.json")
    cfg = study_config(p["preset"], cache_dir=args.cache_dir, precision=args.precision)
    if "kd_weight" in p:
        cfg = dataclasses.replace(cfg, kd_weight=p["kd_weight"])
    base = base_config(cfg, args.steps, args.head_steps)
    try:  # bad widths fail before the teacher loads
        plan(base, widths, seeds, args.arms, not args.no_equal_memory)
    except sf.ConfigError as e:
        ap.error(f"--widths {','.join(map(str, widths))}: {e}".replace(" (ABLATION_WIDTHS)", "")
                 .replace("set ABLATION_WIDTHS, e.g.", "e.g."))
    cache = sf.cache_teacher_states(cfg, progress=not args.smoke)  # one Phase 1 cache for every arm and seed
    data = run(cfg, cache, widths, seeds, out, args.arms, not args.no_equal_memory, args.steps, args.head_steps,
               progress=not args.smoke, max_arms=args.max_arms)
    summary = summarise(data, cfg.student_dim if cfg.student_dim in widths else None)
    data["summary"] = summary
    sf._atomic_write_text(out, _json(data))
    report = format_report(data, summary)
    out.with_suffix(".md").write_text(report + "\n")
    plot(summary, out.with_suffix(".png"))
    print("\n" + report)
    return data


if __name__ == "__main__":
    main()
