"""bench/data_steps.py: more Phase 1 data against more steps at a fixed notebook time (issue 26, item 5)."""
import json
from types import SimpleNamespace

import pytest

import spoonfeed_helpers as sf
from bench import ablation as ab
from bench import data_steps as ds
from bench import recipes as rc

STUDY = ab.study_config("cpu")  # the study's base: 512 blocks, 300 + 150

SPEED = {"p2": {"s_per_step": 0.15, "overhead_s": 3.0}, "p3": {"s_per_step": 0.45, "overhead_s": 12.0}}


def test_the_steps_fill_the_budget_after_phase_1_and_keep_the_recipes_ratio():
    arm = rc.arms(STUDY)["a"]  # 300 + 150
    for phase1 in (68.0, 130.0, 250.0):
        steps = ds.budget_steps(arm, SPEED, phase1, 336.0)
        spent = phase1 + 15.0 + sum(n * SPEED[p]["s_per_step"] for p, n in steps.items())
        assert spent == pytest.approx(336.0, abs=0.5) and steps["p2"] == pytest.approx(2 * steps["p3"], abs=1)
    assert ds.budget_steps(arm, SPEED, 68.0, 336.0)["p2"] > ds.budget_steps(arm, SPEED, 250.0, 336.0)["p2"]
    assert ds.budget_steps(arm, SPEED, 400.0, 336.0) == {"p2": 1, "p3": 1}  # over budget: the least it can run


def test_a_speed_of_zero_seconds_a_step_is_refused():
    arm = rc.arms(STUDY)["a"]
    with pytest.raises(sf.ConfigError, match="idle machine"):
        ds.budget_steps(arm, {p: {"s_per_step": 0.0, "overhead_s": 1.0} for p in ("p2", "p3")}, 10.0, 100.0)


def _cache(tmp_path, n, val_docs):
    folder = tmp_path / str(n)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"val_docs": val_docs}))
    return SimpleNamespace(path=folder)


def test_the_common_held_out_set_is_the_largest_caches_and_must_be_held_out_of_every_smaller_one(tmp_path):
    every_tenth = list(range(9, 160, 10))
    small = _cache(tmp_path, 512, every_tenth + [161])  # training filled first: documents past 161 were never read
    large = _cache(tmp_path, 2048, every_tenth + [169, 179])
    ds.held_out_docs_common({512: small, 2048: large})
    read = _cache(tmp_path, 513, every_tenth)  # the last held-out one is a 10th: it may have read on as training
    with pytest.raises(sf.ConfigError, match="169.*513-block"):
        ds.held_out_docs_common({513: read, 2048: large})


def test_every_size_budgets_with_the_smallest_sizes_seconds_a_step_and_its_own_fixed_cost():
    """A noisy seconds-a-step on a larger cache must not buy it more steps: the step costs the same, only the
    fixed cost (the short run's rest) is the size's own."""
    noisy = {"p2": {"s_per_step": 0.05, "overhead_s": 5.0}, "p3": {"s_per_step": 0.45, "overhead_s": 20.0}}
    used = ds.common_speed(noisy, SPEED, short=10)
    assert used["p2"] == {"s_per_step": 0.15, "overhead_s": pytest.approx(4.0)}  # 5 + 10 x 0.05 - 10 x 0.15
    assert used["p3"] == {"s_per_step": 0.45, "overhead_s": pytest.approx(20.0)}
    arm = rc.arms(STUDY)["a"]
    assert ds.budget_steps(arm, used, 130.0, 336.0)["p2"] < ds.budget_steps(arm, SPEED, 68.0, 336.0)["p2"]


def test_a_phase3_split_spends_the_budget_points_training_seconds_and_refuses_one_that_leaves_phase2_nothing():
    """--phase3-steps: at the largest size's budget, Phase 3's step count moves and Phase 2 fills the same seconds."""
    steps = {"p2": 371, "p3": 186}
    seconds = lambda st: sum(n * SPEED[p]["s_per_step"] for p, n in st.items())  # noqa: E731
    for p3 in (0, 100, 186, 224, 300):
        split = ds.split_steps(steps, SPEED, p3)
        assert split["p3"] == p3 and seconds(split) == pytest.approx(seconds(steps), abs=SPEED["p2"]["s_per_step"])
    assert ds.split_steps(steps, SPEED, 186) == steps
    assert ds.split_steps(steps, SPEED, 224)["p2"] < 371 < ds.split_steps(steps, SPEED, 148)["p2"]
    most = 309  # 371 x 0.15 + 186 x 0.45 = 139.35 s: 309 Phase 3 steps leave 2 Phase 2 steps, 310 none
    assert ds.split_steps(steps, SPEED, most)["p2"] == 2
    for p3 in (most + 1, 400):
        with pytest.raises(sf.ConfigError, match=f"pick {most} or fewer"):
            ds.split_steps(steps, SPEED, p3)
