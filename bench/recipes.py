"""Which recipe buys the best ternary student? Spoon Feed against what users would pick instead, each at its best
learning rate, at equal optimiser steps and at equal wall-clock, on two held-out sets (issue 26).

    python bench/recipes.py --measure      # seconds per step of every arm's phases: run it on an IDLE machine
    nice -n 19 python bench/recipes.py     # the study: LR sweeps on seed 0, then seeds 1 and 2, both budgets
    python bench/recipes.py --smoke        # the same code path at the smoke preset's sizes (run by the tests)

Arms, on the `cpu` preset's Phase 1 cache (bundled teacher, stdlib corpus), the ternary student at width 256:
  (a)  Spoon Feed as the notebook runs it: Phase 2 (cosine to the cached teacher states), then Phase 3 (the head);
  (b)  Spoon Feed with logit KD in Phase 2 (KD_WEIGHT > 0);
  (c)  plain logit KD: the student with its own head, from its random init, alpha CE + (1 - alpha) T^2 KL through
       the cached teacher head (train_logit_kd), with a small sweep of alpha and T;
  (d)  Spoon Feed, then logit KD: Phase 2 as in (a), Phase 3's closed-form head fit, then the whole student (body
       and head) with logit KD + CE;
  (e)  BitDistill-style: a SubLN student (RMSNorm on the inputs of o_proj and down_proj), logit KD at T = 5;
  (f)  next-token CE alone, no teacher (the reference);
  (fp256), (fp512)  Spoon Feed with full-precision linears at widths 256 and 512, each at its own best LR, so
       that the ternary-against-full-precision verdict is made with every arm tuned;
  (fpmem)  the same at the width whose bf16 BitLinear weights take the ternary student's bytes (80 for 256:
       bench/ablation.py's equal-memory arm), at equal steps only (the budget of that verdict).
Each arm's LR is swept on seed 0 (three values, extended by a factor 2 while the best sits at an edge, twice at
most); its variants (alpha and T for (c)) run at that LR; the best setting then runs seeds 1 and 2. Selection is
on the project's own held-out CE, and the held-out sets are the ones reported: seeds 1 and 2 are fresh draws,
but the seed-0 figure of the chosen setting is a selected one (docs/recipes.md says so).

Budgets. "steps": every arm gets (a)'s optimiser steps (superposition_steps + lm_head_steps). "wallclock":
every arm gets the seconds (a) takes, turned into step counts from seconds per step that --measure takes once
(a short and a long run of each phase: seconds a step and the phase's fixed cost), so that the study itself may
run beside other work without skewing the budget. Without a speed file the wall-clock budget is skipped, and
the command to measure one is printed.

Held-out sets: the cache's own held-out blocks (documents no training block shares), and a second domain,
prose: the package descriptions (importlib.metadata) of the project's requirements, packed by Phase 1 into
blocks of the same length. Both report the student's CE in nats/token.

Statistics: paired by seed, each arm against (a): a 95% two-sided Student t interval of the per-seed
differences (bench/ablation.py's t_interval), and a verdict that names a winner only where the interval
excludes zero. Resumable run by run: each finished run goes into --out at once (JSON, atomic), a rerun skips it;
inside a run, the phases checkpoint (ckpt_every), so a kill loses at most that many steps.
"""

import argparse
import dataclasses
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
from bench.ablation import (_json, _num, equal_memory_width, interval_verdict, legacy_cache_key,  # noqa: E402
                            study_config, t_interval)
from bench.run import machine_name  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arm:
    label: str
    phases: tuple  # of ("p2" | "p3" | "kd" | "ce", share of the equal-steps budget's steps)
    lr_field: str  # the RunConfig field the sweep sets
    lrs: tuple  # the sweep's starting values
    overrides: dict = dataclasses.field(default_factory=dict)  # RunConfig fields
    student: dict = dataclasses.field(default_factory=dict)  # StudentConfig fields (subln, ternary), and width
    variants: tuple = ({},)  # RunConfig overrides tried at the best LR; the first is the sweep's own
    budgets: tuple = ("steps", "wallclock")  # the budgets it runs under


def arms(cfg: sf.RunConfig) -> dict:
    """The arms at this preset's budget: (a)'s Phase 2 and Phase 3 steps, every other arm the same total."""
    s2, s3 = cfg.superposition_steps, cfg.lm_head_steps
    total, lr = s2 + s3, cfg.lr
    mem = equal_memory_width(cfg, cfg.student_dim)  # bf16 weights in the bytes of the ternary ones: 80 for 256
    spoon = (("p2", s2), ("p3", s3))
    around = (lr / 2, lr, lr * 2)
    return {
        "a": Arm("Spoon Feed (the notebook's)", spoon, "lr", around),
        "c": Arm("plain logit KD", (("kd", total),), "logit_kd_lr", around, {"logit_kd_alpha": 0.5,
                 "logit_kd_temperature": 1.0},
                 variants=({}, {"logit_kd_alpha": 0.1}, {"logit_kd_temperature": 2.0}, {"embed_lr_mult": 10.0})),
        "d": Arm("Spoon Feed, then logit KD", (("p2", s2), ("p3", 0), ("kd", s3)), "logit_kd_lr",
                 (lr / 4, lr / 2, lr), {"logit_kd_alpha": 0.5, "logit_kd_temperature": 1.0}),
        "e": Arm("BitDistill-style: SubLN + logit KD, T = 5", (("kd", total),), "logit_kd_lr", around,
                 {"logit_kd_alpha": 0.5, "logit_kd_temperature": 5.0}, {"subln": True}),
        "b": Arm("Spoon Feed + logit KD in Phase 2", spoon, "lr", around, {"kd_weight": 0.1}),
        "f": Arm("next-token CE alone", (("ce", total),), "lr", around),
        "fp256": Arm("full precision + Spoon Feed, width 256", spoon, "lr", (lr / 4, lr / 2, lr),
                     student={"ternary": False, "dim": cfg.student_dim}),
        "fp512": Arm("full precision + Spoon Feed, width 512", spoon, "lr", (lr / 4, lr / 2, lr),
                     student={"ternary": False, "dim": 2 * cfg.student_dim}),
        # the ablation's equal-memory arm, tuned: it re-makes that verdict, which bench/ablation.py made at equal steps
        "fpmem": Arm(f"full precision + Spoon Feed, width {mem}: the ternary student's BitLinear bytes", spoon, "lr",
                     (lr / 4, lr / 2, lr), student={"ternary": False, "dim": mem}, budgets=("steps",)),
    }


# the study's base is study_config's: the `cpu` preset as it was when the study ran (bench/ablation.CPU_2026_12_07)
PRESETS = {"full": dict(preset="cpu", seeds=3, sweep_seed=0),
           "smoke": dict(preset="smoke", seeds=2, sweep_seed=0)}
MAX_EXTENSIONS = 2  # the sweep goes on past an edge at most this many times
SECOND_DOMAIN_PACKAGES = ("transformers", "datasets", "accelerate", "safetensors", "gguf", "tqdm", "matplotlib",
                          "numpy", "torch", "huggingface_hub", "tokenizers", "scipy")


# --- the second held-out domain ---------------------------------------------------------------------------

def second_domain_corpus(folder, packages=SECOND_DOMAIN_PACKAGES) -> Path:
    """Write the package descriptions (importlib.metadata, the README each package ships) of the installed
    `packages` into folder/<name>.md, one document each, rewriting a file only when its text changed (so the
    Phase 1 cache, keyed on the files' size and time, stays valid). Packages not installed are left out.
    Raises ConfigError when none has a description."""
    import importlib.metadata as md

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrote = 0
    for name in packages:
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue
        text = meta.get_payload() or meta.get("Description") or ""
        if len(text.strip()) < 200:
            continue
        path = folder / f"{name}.md"
        if not path.exists() or path.read_text() != text:
            sf._atomic_write_text(path, text)
        wrote += 1
    if not wrote:
        raise sf.ConfigError(f"none of {packages} is installed with a description: no second held-out domain")
    return folder


def second_domain_cache(cfg: sf.RunConfig, folder) -> "sf.TeacherCache":
    """Phase 1 on the second domain: cfg.val_samples held-out blocks (and batch_size training blocks, which no
    arm uses) of the package descriptions, with cfg's teacher and seq_len; the teacher's CE on them comes free."""
    corpus = second_domain_corpus(Path(folder) / "corpus")
    c2 = dataclasses.replace(cfg, dataset=str(corpus), num_samples=cfg.batch_size)
    return sf.cache_teacher_states(c2, progress=False)


# --- one run ----------------------------------------------------------------------------------------------

def run_config(base: sf.RunConfig, arm: Arm, lr: float, variant: dict, seed: int, run_dir) -> sf.RunConfig:
    fields = {**arm.overrides, **variant, arm.lr_field: lr}  # a variant wins over the arm's own settings
    return dataclasses.replace(base, **fields, seed=seed, student_dim=arm.student.get("dim", base.student_dim),
                               run_dir=str(run_dir)).validate()


def train(cache, cfg: sf.RunConfig, arm: Arm, steps: dict, progress: bool = False):
    """Train one arm's student with these phase step counts ({"p2": n, ...}); returns (student, seconds by phase)."""
    kw = {k: v for k, v in arm.student.items() if k != "dim"}
    ternary = kw.pop("ternary", True)
    model = sf.build_student(cfg, cache, ternary=ternary, **kw)
    seconds = {}
    for phase, _ in arm.phases:
        n, t0 = steps[phase], time.perf_counter()
        if phase == "p2":
            sf.train_superposition(model, cache, dataclasses.replace(cfg, superposition_steps=n), progress=progress)
        elif phase == "p3":
            c3 = dataclasses.replace(cfg, superposition_steps=steps["p2"], lm_head_steps=n)
            sf.train_lm_head(model, cache, c3, progress=progress)
        elif phase == "kd":
            sf.train_logit_kd(model, cache, cfg, steps=n, progress=progress, checkpoint=True)
        else:
            sf.train_direct_ce(model, cache, dataclasses.replace(cfg, superposition_steps=n, lm_head_steps=0),
                               progress=progress)
        seconds[phase] = time.perf_counter() - t0
    return model, seconds


def run_one(cache, second, base, arm_name: str, arm: Arm, lr: float, variant: dict, seed: int, steps: dict, run_dir,
            progress=False) -> dict:
    """Train and evaluate one run: held-out CE on both sets, the cosine where a projector was trained, seconds."""
    cfg = run_config(base, arm, lr, variant, seed, run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    model, seconds = train(cache, cfg, arm, steps, progress)
    train_s = time.perf_counter() - t0
    m = sf.evaluate(model, cache, precision=cfg.precision, via_teacher_head=False)["metrics"]
    second_ce = sf.held_out_ce(model, second, precision=cfg.precision)
    projector = any(p == "p2" for p, _ in arm.phases)
    return {"arm": arm_name, "lr": lr, "variant": variant, "seed": seed, "steps": steps, "ce": m["student_ce"],
            "second_ce": second_ce, "cosine_gain": m["cosine_gain"] if projector else float("nan"),
            "teacher_ce": m["teacher_ce"], "second_teacher_ce": second.teacher_ce(),
            "train_seconds": train_s, "phase_seconds": seconds, "cpu_seconds": time.process_time() - c0,
            "loadavg": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# --- budgets: equal steps, and equal wall-clock from measured seconds per step ------------------------------

def equal_steps(arm: Arm) -> dict:
    return {p: n for p, n in arm.phases}


def steps_for_seconds(arm: Arm, speed: dict, seconds: float) -> dict | None:
    """The arm's step counts scaled by one factor k so that its phases take `seconds`, from speed[phase] =
    {"s_per_step", "overhead_s"}: sum(overhead) + k * sum(steps x s/step) = seconds (a phase of 0 steps stays 0,
    any other gets 1 at least). None when the speed gives no seconds a step."""
    fixed = sum(speed[p]["overhead_s"] for p, _ in arm.phases)
    variable = sum(n * speed[p]["s_per_step"] for p, n in arm.phases)
    if not variable > 0:
        return None
    k = max(seconds - fixed, 0.0) / variable
    return {p: (0 if n == 0 else max(1, round(k * n))) for p, n in arm.phases}


def wallclock_steps(arm: Arm, speeds: dict, reference: Arm, ref_name: str, name: str) -> dict:
    """Step counts that make `arm` take the seconds `reference` takes at equal steps, from speeds[arm][phase] =
    {"s_per_step", "overhead_s"}: budget B = sum over the reference's phases of overhead + steps x s/step; every
    phase of `arm` is scaled by one factor k with sum(overhead) + k sum(steps x s/step) = B (a phase of 0 steps
    stays 0, any other gets 1 at least). Raises ConfigError when an arm's speeds are missing."""
    for nm, a in ((ref_name, reference), (name, arm)):
        if nm not in speeds or any(p not in speeds[nm] for p, _ in a.phases):
            raise sf.ConfigError(f"no measured speed for arm ({nm}): run `python bench/recipes.py --measure` first")
    ref = speeds[ref_name]
    budget = sum(ref[p]["overhead_s"] + n * ref[p]["s_per_step"] for p, n in reference.phases)
    return steps_for_seconds(arm, speeds[name], budget) or equal_steps(arm)


def measure(cache, base: sf.RunConfig, names, out: Path, short: int, long: int, progress=False) -> dict:
    """Seconds per step and fixed seconds of every phase of every arm, from one run of `short` and one of `long`
    steps per phase (s/step = the difference over long - short steps; overhead = the rest). Written to `out`
    with the machine and the load average before and after, so that a loaded measurement can be told apart."""
    table = arms(base)
    data = {"machine": machine_name(), "short": short, "long": long, "loadavg_before": os.getloadavg(), "arms": {}}
    for name in names:
        arm = table[name]
        times = {}
        for n in (short, long):
            steps = {p: (0 if m == 0 else n) for p, m in arm.phases}
            run_dir = out.parent / f"{out.stem}-runs" / f"{name}-{n}"
            cfg = run_config(base, arm, arm.lrs[1], {}, 0, run_dir)
            _, seconds = train(cache, cfg, arm, steps, progress)
            times[n] = seconds
            shutil.rmtree(run_dir, ignore_errors=True)
        data["arms"][name] = {}
        for p, m in arm.phases:
            per = (times[long][p] - times[short][p]) / (long - short) if m else 0.0
            data["arms"][name][p] = {"s_per_step": max(per, 0.0), "overhead_s": max(times[short][p] - short * per, 0.0)
                                     if m else times[short][p]}
        print(f"  ({name}) " + ", ".join(f"{p}: {v['s_per_step']:.3f} s/step + {v['overhead_s']:.1f} s"
                                        for p, v in data["arms"][name].items()), flush=True)
    data["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    sf._atomic_write_text(out, _json(data))
    return data


# --- the study --------------------------------------------------------------------------------------------

def key(budget, arm, lr, variant, seed) -> str:
    v = ",".join(f"{k}={variant[k]}" for k in sorted(variant)) or "-"
    return f"{budget}/{arm}/{v}/lr={lr:.6g}/s{seed}"


# RunConfig fields that do not change a run's figures: where it writes, its seed (in the key), and what each arm
# sets itself (its phases and their step counts: Arm.phases, not RECIPE and LOGIT_KD_STEPS; its swept LR, in the
# key: an arm that sweeps another LR runs no logit KD, so LOGIT_KD_LR is never read from the base)
NOT_SETTINGS = {"seed", "run_dir", "cache_dir", "device", "ckpt_every", "eval_every", "recipe", "logit_kd_steps",
                "logit_kd_lr"}


def settings(base: sf.RunConfig, cache, second) -> dict:
    s = {k: v for k, v in dataclasses.asdict(base).items() if k not in NOT_SETTINGS}
    # the caches' content (a rebuild in the same folder differs), not their folder names
    s.update(cache_content=cache.content_digest, second_cache_content=second.content_digest,
             precision=sf.precision_policy(base.device, base.precision).name)
    return json.loads(_json(s))  # as the file holds them (tuples as lists), so that a rerun compares equal


def load_results(path: Path, expected: dict, cache=None, second=None) -> dict:
    """The results file at path, or a new one; see the comparison below. A file keyed by the caches' folder names
    (before content digests) is taken when its teacher CEs show these caches' content (legacy_cache_key)."""
    if not path.exists():
        return {"settings": expected, "results": {}}
    data = json.loads(path.read_text())
    old = {k: v for k, v in (data.get("settings") or {}).items() if k not in NOT_SETTINGS}
    # a setting added to RunConfig since the file was written, at its default, is the behaviour the file's runs had
    # (the content digests are no RunConfig fields, so re-keying a legacy file below leaves this set as it is)
    defaults = json.loads(_json(dataclasses.asdict(sf.RunConfig())))
    added = {k for k in set(expected) - set(old) if k in defaults and expected[k] == defaults[k]}
    wanted = {k: v for k, v in expected.items() if k not in added}
    if cache is not None and second is not None:
        folders = {"cache": cache.path.name, "second_cache": second.path.name}
        if legacy_cache_key(path, old, wanted, data.get("results", {}), folders,
                            {"teacher_ce": cache.teacher_ce(), "second_teacher_ce": second.teacher_ce()}):
            old = data["settings"] = {**{k: v for k, v in old.items() if k not in folders},
                                      **{k: v for k, v in expected.items() if k.endswith("cache_content")}}
    if wanted != old:
        diff = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
        raise sf.ConfigError(f"{path} holds results from other settings ({', '.join(diff)} differ): pass another "
                             "--out to keep both, or rerun with the settings that wrote it")
    return data


class _Stop(Exception):
    """max_runs reached (what a kill does; tests)."""


class Study:
    """The study's state: the results file, and one method per stage. Every decision (the best LR, when to
    extend a sweep) is computed from the results alone, so a rerun after a kill takes the same path."""

    def __init__(self, cache, second, base, out: Path, names, seeds, budgets, speeds=None, progress=False,
                 max_runs=None):
        self.cache, self.second, self.base, self.out = cache, second, base, Path(out)
        self.arms = {n: a for n, a in arms(base).items() if n in names}
        self.seeds, self.budgets, self.speeds, self.progress = list(seeds), budgets, speeds, progress
        self.max_runs, self.done = max_runs, 0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.data = load_results(self.out, settings(base, cache, second), cache, second)
        self.data.setdefault("machine", machine_name())
        if speeds is not None:
            self.data["speeds"] = speeds

    def steps(self, budget: str, name: str) -> dict:
        arm = self.arms[name]
        if budget == "steps":
            return equal_steps(arm)
        ref = arms(self.base)["a"]
        return wallclock_steps(arm, self.speeds["arms"], ref, "a", name)

    def result(self, budget, name, lr, variant, seed) -> dict:
        k = key(budget, name, lr, variant, seed)
        if k in self.data["results"]:
            return self.data["results"][k]
        steps = self.steps(budget, name)
        for other in ("steps", "wallclock"):  # (a) at equal wall-clock is (a) at equal steps: run once, either order
            twin = self.data["results"].get(key(other, name, lr, variant, seed))
            if other != budget and twin is not None and twin["steps"] == steps:
                self.data["results"][k] = {**twin, "budget": budget,
                                           "same_run_as": twin.get("same_run_as", key(other, name, lr, variant, seed))}
                sf._atomic_write_text(self.out, _json(self.data))
                return self.data["results"][k]
        if self.max_runs is not None and self.done >= self.max_runs:
            raise _Stop
        arm = self.arms[name]
        run_dir = self.out.parent / f"{self.out.stem}-runs" / k.replace("/", "_").replace("=", "").replace(",", "_")
        try:
            r = run_one(self.cache, self.second, self.base, name, arm, lr, variant, seed, steps, run_dir,
                        self.progress)
        except sf.NonFiniteTargetError:  # the cache is at fault, not this setting: stop the study
            raise
        except sf.NonFiniteLossError as e:  # this setting diverged: a result of the sweep (CE +inf), not a crash
            nan = float("nan")
            r = {"arm": name, "lr": lr, "variant": variant, "seed": seed, "steps": steps, "ce": float("inf"),
                 "second_ce": float("inf"), "cosine_gain": nan, "teacher_ce": nan, "second_teacher_ce": nan,
                 "train_seconds": nan, "phase_seconds": {}, "cpu_seconds": nan, "loadavg": os.getloadavg()[0],
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "diverged": str(e).splitlines()[0][:300]}
        r["budget"] = budget
        self.data["results"][k] = r
        sf._atomic_write_text(self.out, _json(self.data))
        shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints: the result is safe in `out` now
        self.done += 1
        print(f"  [{budget}] ({name}) {dict(variant) or ''} lr {lr:.3g} seed {seed}: CE {r['ce']:.4f}, second "
              f"domain {r['second_ce']:.4f}, {r['train_seconds']:.0f} s (load {r['loadavg']:.1f})", flush=True)
        return r

    def best(self, budget, name) -> tuple:
        """(lr, variant) of the lowest own held-out CE on the sweep seed, after the sweep and the variants."""
        arm, seed = self.arms[name], self.seeds[0]
        tried = {}
        lrs = list(arm.lrs)
        for _ in range(MAX_EXTENSIONS + 1):
            for lr in lrs:
                tried[(lr, 0)] = _num(self.result(budget, name, lr, arm.variants[0], seed)["ce"])
            ranked = sorted(lrs)
            best_lr = min(ranked, key=lambda x: (_finite(tried[(x, 0)]), x))
            if best_lr == ranked[0] and len(lrs) < len(arm.lrs) + MAX_EXTENSIONS:
                lrs.append(ranked[0] / 2)
            elif best_lr == ranked[-1] and len(lrs) < len(arm.lrs) + MAX_EXTENSIONS:
                lrs.append(ranked[-1] * 2)
            else:
                break
        for i, variant in enumerate(arm.variants[1:], 1):
            tried[(best_lr, i)] = _num(self.result(budget, name, best_lr, variant, seed)["ce"])
        lr, i = min(tried, key=lambda k: (_finite(tried[k]), k))
        return lr, arm.variants[i]

    def run(self):
        """Stage by stage, budget by budget: every arm's sweep on seed 0, then the other seeds at the best setting."""
        try:
            for budget in self.budgets:
                if budget == "wallclock" and self.speeds is None:
                    print("wall-clock budget skipped: no speed file. Measure one on an idle machine with "
                          "`python bench/recipes.py --measure`, then pass it with --speeds", flush=True)
                    continue
                chosen = {}
                for name in (n for n, a in self.arms.items() if budget in a.budgets):  # each arm's choice is
                    # written as soon as its sweep is done
                    chosen[name] = lr, variant = self.best(budget, name)
                    self.data.setdefault("chosen", {}).setdefault(budget, {})[name] = {"lr": lr, "variant": variant}
                    sf._atomic_write_text(self.out, _json(self.data))
                for seed in self.seeds[1:]:
                    for name, (lr, variant) in chosen.items():
                        self.result(budget, name, lr, variant, seed)
        except _Stop:
            pass
        return self.data


def _finite(x: float) -> float:
    return x if x == x and math.isfinite(x) else float("inf")


# --- the analysis -----------------------------------------------------------------------------------------

def chosen_runs(data: dict, budget: str, name: str) -> dict:
    """seed -> result of the arm's chosen setting at this budget."""
    pick = data.get("chosen", {}).get(budget, {}).get(name)
    if pick is None:
        return {}
    return {r["seed"]: r for r in data["results"].values() if r.get("budget") == budget and r["arm"] == name
            and r["lr"] == pick["lr"] and r["variant"] == pick["variant"]}


METRICS = (("ce", "own held-out CE"), ("second_ce", "second-domain CE"))
GAIN = ("cosine_gain", "held-out cosine gain")  # Phase 2's figure: the full-precision arms are also compared by it,
LABELS = dict(METRICS + (GAIN,))                # the metric of the ablation's ternary-against-full-precision verdict


def summarise(data: dict, names=None) -> dict:
    """Per budget: each arm's chosen setting with mean and sd over seeds, its paired difference from (a) on both
    held-out sets with a 95% t interval and a verdict, for the full-precision arms (fp256, fp512: each at its own
    best LR, against the ternary (a) at its own) also the difference in held-out cosine gain over the mean-vector
    baseline (higher is better), and the arm with the lowest mean own CE."""
    out = {}
    dim = data["settings"]["student_dim"]  # (a)'s width; an arm of another width names both
    table = arms(dataclasses.replace(study_config("cpu"), student_dim=dim))
    labels = {n: a.label for n, a in table.items()}
    for budget, chosen in data.get("chosen", {}).items():
        rows, diffs = [], []
        ref = chosen_runs(data, budget, "a")
        for name in names or chosen:
            runs = chosen_runs(data, budget, name)
            if not runs:
                continue
            row = {"arm": name, "label": labels.get(name, name), **chosen[name], "seeds": sorted(runs),
                   "steps": next(iter(runs.values()))["steps"],
                   "train_seconds": float(np.mean([_num(r["train_seconds"]) for r in runs.values()]))}
            for m, _ in METRICS:
                ci = t_interval([_num(r[m]) for r in runs.values()])
                row[m] = {"mean": ci["mean"], "sd": ci["sd"]}
            rows.append(row)
            if name == "a":
                continue
            own = table[name].student.get("dim", dim) if name in table else dim
            width = dim if own == dim else f"{own} (against (a) at {dim})"
            seeds = sorted(set(runs) & set(ref))
            compared = [(m, f"nats {what}", "(a) Spoon Feed", False) for m, what in METRICS]  # lower CE is better
            if name.startswith("fp"):  # full precision against the ternary (a), also in the ablation's metric
                compared.append((GAIN[0], GAIN[1], "(a) Spoon Feed, ternary", True))
            for m, metric, reference, higher in compared:
                d = t_interval([_num(runs[s][m]) - _num(ref[s][m]) for s in seeds])
                v = interval_verdict(d, (f"({name}) {row['label']}", reference), metric, width,
                                     higher_is_better=higher)
                diffs.append({"arm": name, "metric": m, **d, "seeds": seeds, "verdict": v})
        best = min(rows, key=lambda r: _finite(r["ce"]["mean"]), default=None)
        out[budget] = {"rows": rows, "differences": diffs, "best": best and best["arm"]}
    return out


def format_report(data: dict, summary: dict) -> str:
    s = data["settings"]
    lines = [f"Machine: {data.get('machine', '?')}",
             f"Student {s['student_dim']} x {s['student_layers']} layers x {s['student_heads']} heads, batch "
             f"{s['batch_size']}, teacher {s['teacher']}, data {s['dataset']}, precision {s['precision']}; "
             f"(a)'s budget {s['superposition_steps']} + {s['lm_head_steps']} steps"]
    for budget, sm in summary.items():
        lines += ["", f"## Budget: {'equal optimiser steps' if budget == 'steps' else 'equal wall-clock'}", "",
                  "| arm | chosen LR | variant | steps | seeds | own CE (mean ± sd) | second-domain CE (mean ± sd) "
                  "| train s |", "|---|---|---|---|---|---|---|---|"]
        for r in sm["rows"]:
            steps = " + ".join(str(n) for n in r["steps"].values())
            variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items()) or "–"
            lines.append(f"| ({r['arm']}) {r['label']} | {r['lr']:.3g} | {variant} | {steps} | {len(r['seeds'])} | "
                         f"{_pm(r['ce'])} | {_pm(r['second_ce'])} | {r['train_seconds']:.0f} |")
        lines += ["", "Paired by seed against (a), 95% two-sided Student t interval:", "",
                  "| arm | held-out set | seeds | difference (arm - (a)) | verdict |", "|---|---|---|---|---|"]
        for d in sm["differences"]:
            half = "" if d["half_width"] != d["half_width"] else f" ± {d['half_width']:.4f}"
            lines.append(f"| ({d['arm']}) | {LABELS[d['metric']]} | {d['n']} | {d['mean']:+.4f}{half} | "
                         f"{d['verdict']} |")
        if sm["best"]:
            lines += ["", f"Lowest mean own held-out CE at this budget: ({sm['best']})"]
    lines += ["", "## Every run (the sweeps on seed 0, then the seeds)", "",
              "| budget | arm | LR | variant | seed | steps | own CE | second-domain CE | cosine gain | train s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["results"].values(), key=lambda r: (r["budget"], r["arm"], r["seed"], sorted(r["variant"]),
                                                               r["lr"])):
        variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items()) or "–"
        gain = _num(r["cosine_gain"])
        lines.append(f"| {r['budget']} | ({r['arm']}) | {r['lr']:.3g} | {variant} | {r['seed']} | "
                     f"{' + '.join(str(n) for n in r['steps'].values())} | {_num(r['ce']):.4f} | "
                     f"{_num(r['second_ce']):.4f} | {'–' if gain != gain else f'{gain:.4f}'} | "
                     f"{_num(r['train_seconds']):.0f} | {_num(r['loadavg']):.1f} |"
                     + (" diverged |" if r.get("diverged") else ""))
    return "\n".join(lines)


def _pm(x: dict) -> str:
    m, sd = x["mean"], x["sd"]
    return "–" if m != m else f"{m:.4f}" + ("" if sd != sd else f" ± {sd:.4f}")


def plot(data: dict, summary: dict, path=None):
    """What the verdict reads: each arm's paired difference from (a), seed by seed (dots), with its mean and 95%
    t interval (bar), on an axis fitted to them, a line at 0 (no difference), both held-out sets and one marker
    per budget. Below 0 the arm beats Spoon Feed; a bar that crosses 0 is not resolved. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    names = list(dict.fromkeys(d["arm"] for sm in summary.values() for d in sm["differences"]))
    for ax, (m, what) in zip(axes, METRICS):
        for j, (budget, sm) in enumerate(summary.items()):
            ref = chosen_runs(data, budget, "a")
            dx = 0.15 * (j - 0.5 * (len(summary) - 1))
            for d in (d for d in sm["differences"] if d["metric"] == m):
                x = names.index(d["arm"]) + dx
                runs = chosen_runs(data, budget, d["arm"])
                per_seed = [_num(runs[s][m]) - _num(ref[s][m]) for s in d["seeds"]]
                half = d["half_width"] if d["half_width"] == d["half_width"] else 0.0
                ax.errorbar(x, d["mean"], yerr=half, capsize=3, marker="os"[j % 2], color=f"C{j}", label=budget)
                ax.plot(np.full(len(per_seed), x), per_seed, ".", color=f"C{j}", alpha=0.4)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), [f"({n})" for n in names])
        ax.set(title=f"{what}: arm - (a) Spoon Feed (below 0: better than (a))", ylabel="nats/token",
               xlabel="arm (dots: seeds; bars: paired 95% t interval)")
        ax.grid(alpha=0.3)
        one = dict(zip(*ax.get_legend_handles_labels()[::-1]))  # label -> handle: one entry a budget
        if one:
            ax.legend(one.values(), one.keys(), fontsize=8)
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


# --- the command line -------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smoke preset's sizes, 2 seeds")
    ap.add_argument("--arms", help="comma-separated arms (default: all, a,c,d,e,b,f,fp256,fp512,fpmem)")
    ap.add_argument("--seeds", type=int, help="seeds 0..n-1 (default 3; seed 0 is the sweep's)")
    ap.add_argument("--budgets", default="steps,wallclock", help="steps, wallclock or both (default both)")
    ap.add_argument("--measure", action="store_true", help="measure seconds per step of every arm and exit")
    ap.add_argument("--speeds", help="the speed JSON from --measure (the wall-clock budget needs it)")
    ap.add_argument("--out", help="results JSON (default runs/recipes[-smoke]/recipes.json); the report (.md) and "
                    "the plot (.png) go next to it")
    ap.add_argument("--cache-dir", default=str(ROOT / "spoonfeed_cache"), help="Phase 1 cache folder")
    ap.add_argument("--precision", default="auto", choices=sf.PRECISIONS, help="PRECISION for every arm")
    ap.add_argument("--max-runs", type=int, help=argparse.SUPPRESS)  # stop after this many runs (tests)
    args = ap.parse_args(argv)
    p = PRESETS["smoke" if args.smoke else "full"]
    cfg = study_config(p["preset"], cache_dir=args.cache_dir, precision=args.precision)
    base = dataclasses.replace(cfg, eval_every=10**6, kd_weight=0.0, recipe="spoonfeed")  # one evaluation a phase, at
    # its end; each arm runs its own phases (Arm.phases), which read Phase 3's steps under the original recipe
    table = arms(base)
    names = [n.strip() for n in args.arms.split(",")] if args.arms else list(table)
    if not names or set(names) - set(table):
        ap.error(f"--arms takes names from {','.join(table)}")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets or set(budgets) - {"steps", "wallclock"}:
        ap.error(f"--budgets {args.budgets!r}: give steps, wallclock or steps,wallclock")
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: run at least 1 seed (3 or more give an interval)")
    speeds = None
    if args.speeds:
        try:
            speeds = json.loads(Path(args.speeds).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--speeds {args.speeds}: not a speed file from --measure ({e})")
    folder = Path(args.out).parent if args.out else ROOT / "runs" / ("recipes-smoke" if args.smoke else "recipes")
    out = Path(args.out) if args.out else folder / "recipes.json"
    cache = sf.cache_teacher_states(cfg, progress=not args.smoke)
    if args.measure:
        short, long = (2, 4) if args.smoke else (10, 30)
        target = Path(args.out) if args.out else folder / "speeds.json"
        return measure(cache, base, names, target, short, long)
    second = second_domain_cache(cfg, Path(args.cache_dir) / "second-domain")
    seeds = range(args.seeds if args.seeds is not None else p["seeds"])
    study = Study(cache, second, base, out, names, seeds, budgets, speeds, progress=not args.smoke,
                  max_runs=args.max_runs)
    data = study.run()
    summary = summarise(data, list(table))  # every arm the file holds, not only this run's: the report is the study's
    data["summary"] = summary
    sf._atomic_write_text(out, _json(data))
    report = format_report(data, summary)
    out.with_suffix(".md").write_text(report + "\n")
    plot(data, summary, out.with_suffix(".png"))
    print("\n" + report + f"\n\nwrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return data


if __name__ == "__main__":
    main()
