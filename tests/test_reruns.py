"""Tweak and run again: every order of cell runs ends where a fresh run with the final settings ends, or in one
clear message; a fault never poisons a checkpoint; every folder the run writes is checked before any work."""
from pathlib import Path

import pytest
import torch

import spoonfeed_helpers as sf


def _cfg(cfg, **kw):
    return sf.make_config(**{**vars(cfg), **kw})


@pytest.fixture
def small(tiny_cache, tmp_path):
    """The tiny teacher's cache and short phases (8 + 6 steps, a checkpoint every 4)."""
    cfg, cache, _ = tiny_cache
    return _cfg(cfg, superposition_steps=8, lm_head_steps=6, ckpt_every=4, eval_every=4, warmup_steps=2,
                run_dir=str(tmp_path / "notebook")), cache


class Notebook:
    """Cells 4, 5 and 6 of the notebook over one kernel's objects; a new Notebook is a fresh kernel."""

    def __init__(self, cache):
        self.cache, self.student = cache, None

    def cell4(self, cfg):
        self.student = sf.build_student(cfg, self.cache)

    def cell5(self, cfg):
        return sf.train_superposition(self.student, self.cache, cfg, progress=False)

    def cell6(self, cfg):
        return sf.train_lm_head(self.student, self.cache, cfg, progress=False)

    def run_all(self, cfg):
        self.cell4(cfg)
        self.cell5(cfg)
        self.cell6(cfg)
        return self


def fresh_run(cfg, cache, tmp_path):
    """What a fresh run with these settings ends with, in a run folder of its own."""
    own = _cfg(cfg, run_dir=str(tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"))
    return Notebook(cache).run_all(own).student


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different
    assert a.cfg == b.cfg


# --- 1. a result is tied to everything it was made from --------------------------------------------------

@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(embed_lr_mult=10.0), dict(superposition_steps=12)])
def test_rerun_phase2_after_changing_its_setting_then_phase3_equals_a_fresh_run(small, tmp_path, capsys, change):
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg)
    new = _cfg(cfg, **change)
    nb.cell5(new)  # the crash: Phase 3 then loaded the old run's whole model over the new body
    nb.cell6(new)
    out = capsys.readouterr().out
    assert "phase2.pt was made with other settings" in out and "phase3.pt was made with other settings" in out
    assert "the Phase 2 student it decodes" in out  # the line says why Phase 3 is redone
    assert_same_weights(nb.student, fresh_run(new, cache, tmp_path))
    aside = Path(cfg.run_dir) / "checkpoints"
    assert (aside / "phase2.other-settings.pt").exists() and (aside / "phase3.other-settings.pt").exists()


@pytest.mark.parametrize("change", [dict(lm_head_steps=4), dict(head_lr=3e-3), dict(head_init="unigram")])
def test_rerun_phase3_alone_after_changing_its_setting_reuses_phase2(small, tmp_path, monkeypatch, change, patch):
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg)
    new = _cfg(cfg, **change)
    steps = []
    real = sf.superposition_step
    patch(sf, "superposition_step", lambda *a, **k: (steps.append(1), real(*a, **k))[1], called=False,
          caller=sf.train_superposition)
    nb.cell6(new)
    assert steps == []
    monkeypatch.undo()
    assert_same_weights(nb.student, fresh_run(new, cache, tmp_path))


@pytest.mark.parametrize("change", ["edit every file", "add a file", "remove a file"])
def test_a_checkpoint_made_from_other_data_is_moved_aside_and_retrained(tmp_path, capsys, change):
    """Phase 1 rebuilds the cache in the same folder when the data changes; Phases 2 and 3 then see other
    content under the same folder name, so their checkpoints are moved aside with a line saying why, and the
    run ends where a fresh run on the new data ends (issue 27, item 8)."""
    from conftest import CountingLoader, tiny_run_config

    cfg = _cfg(tiny_run_config(tmp_path), superposition_steps=8, lm_head_steps=6, ckpt_every=4, eval_every=4,
               warmup_steps=2)
    loader = CountingLoader()
    old = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    Notebook(old).run_all(cfg)
    docs = sorted(Path(cfg.dataset).glob("*.txt"))
    if change == "edit every file":
        for i, f in enumerate(docs):
            f.write_text(" ".join(reversed(f.read_text().split())) + f" {i} .")
    elif change == "add a file":
        (Path(cfg.dataset) / "doc000a.txt").write_text("the big red dog ran home and then the sun was happy .")
    else:
        docs[0].unlink()
    new = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 2 and new.path == old.path and new.content_digest != old.content_digest
    capsys.readouterr()
    after = Notebook(new).run_all(cfg)
    out = capsys.readouterr().out
    assert "already done" not in out
    why = "was made with other settings (the teacher cache it was trained on (Phase 1 rebuilt it"
    assert out.count(why) == 4  # each phase's newest checkpoint and its .prev
    assert "moved it to phase2.other-settings.pt" in out and "moved it to phase3.other-settings.pt" in out
    assert_same_weights(after.student, fresh_run(cfg, new, tmp_path))


def test_cells_in_order_in_a_fresh_kernel_reuse_both_phases(small, tmp_path, capsys):
    cfg, cache = small
    Notebook(cache).run_all(cfg)
    capsys.readouterr()
    again = Notebook(cache).run_all(cfg)
    out = capsys.readouterr().out
    assert "Phase 2: already done" in out and "Phase 3: already done" in out
    assert_same_weights(again.student, fresh_run(cfg, cache, tmp_path))


def test_cell6_before_cell5_in_a_fresh_kernel_loads_the_finished_phase2(small, tmp_path, capsys):
    cfg, cache = small
    Notebook(cache).run_all(cfg)
    nb = Notebook(cache)
    nb.cell4(cfg)
    capsys.readouterr()
    nb.cell6(cfg)  # used to stop with "Phase 3 changed the frozen body: this is a bug"
    out = capsys.readouterr().out
    assert "has not been through Phase 2" in out and "phase2.pt" in out and "Phase 3: already done" in out
    reference = fresh_run(cfg, cache, tmp_path)
    assert_same_weights(nb.student, reference)
    nb.cell5(cfg)
    assert_same_weights(nb.student, reference)


def test_cell6_before_any_phase2_is_one_clear_message_then_the_right_order_works(small, tmp_path):
    cfg, cache = small
    nb = Notebook(cache)
    nb.cell4(cfg)
    with pytest.raises(sf.PhaseOrderError, match=r"run cell 5 \(Phase 2\) first"):
        nb.cell6(cfg)
    assert not (Path(cfg.run_dir) / "checkpoints" / "phase3.pt").exists()
    nb.cell5(cfg)
    nb.cell6(cfg)
    assert_same_weights(nb.student, fresh_run(cfg, cache, tmp_path))


def test_phase2_setting_changed_but_only_cell6_rerun_is_one_clear_message(small):
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg)
    with pytest.raises(sf.PhaseOrderError, match=r"Phase 2 with other settings.*run cell 5"):
        nb.cell6(_cfg(cfg, lr=1e-3))
    assert (Path(cfg.run_dir) / "checkpoints" / "phase2.pt").exists()  # a look only: nothing was moved


def test_student_shape_changed_without_cell4_is_one_clear_message(small):
    cfg, cache = small
    nb = Notebook(cache)
    nb.cell4(cfg)
    with pytest.raises(sf.PhaseOrderError, match=r"dim 16 -> 32.*rerun cell 4"):
        nb.cell5(_cfg(cfg, student_dim=32))


@pytest.mark.parametrize("modes", [("new", "tied", "new"), ("new", "teacher", "new"), ("tied", "new")])
def test_change_head_mode_then_rerun_cells_5_and_6(small, tmp_path, modes):
    cfg, cache = small
    nb = Notebook(cache).run_all(_cfg(cfg, head_mode=modes[0]))
    for mode in modes[1:]:
        new = _cfg(cfg, head_mode=mode)
        nb.cell5(new)
        nb.cell6(new)
        assert_same_weights(nb.student, fresh_run(new, cache, tmp_path))


def test_run_all_twice(small, tmp_path):
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg).run_all(cfg)
    assert_same_weights(nb.student, fresh_run(cfg, cache, tmp_path))


def test_rerun_cell6_in_tied_mode_starts_again_from_the_phase2_student(small, tmp_path):
    cfg, cache = small
    cfg = _cfg(cfg, head_mode="tied")
    nb = Notebook(cache).run_all(cfg)
    new = _cfg(cfg, lm_head_steps=4)
    nb.cell6(new)  # the embedding was moved by the first Phase 3: Phase 3 starts from Phase 2's again
    assert_same_weights(nb.student, fresh_run(new, cache, tmp_path))


def test_checkpoints_hold_what_their_phase_trains_and_no_more(small):
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg)
    phase2, _ = sf._ckpt_paths(cfg.run_dir, "phase2")
    phase3, _ = sf._ckpt_paths(cfg.run_dir, "phase3")
    held2 = set(torch.load(phase2, weights_only=True)["model"])
    held3 = set(torch.load(phase3, weights_only=True)["model"])
    assert held3 == {"head.weight", "head.bias"}  # the head; never the frozen body
    assert held2 == set(nb.student.state_dict()) - held3  # everything Phase 2 trains, and no untrained head
    tied = _cfg(cfg, head_mode="tied")
    nb.cell6(tied)
    assert set(torch.load(phase3, weights_only=True)["model"]) == {"tok_embeddings.weight"}


# --- 2. a fault never poisons a checkpoint ------------------------------------------------------------------

def _nan_gradients_from(model, first_step, last_step=None):
    """A gradient hook that turns the projector's gradient into NaN at Phase 2 steps first_step..last_step."""
    calls = []

    def hook(grad):
        calls.append(1)
        step = len(calls) - 1
        return grad * float("nan") if first_step <= step <= (last_step if last_step is not None else 10**9) else grad

    return model.projector.net[0].weight.register_hook(hook)


def test_nan_gradient_from_a_finite_loss_stops_without_a_nan_checkpoint_and_a_rerun_recovers(small, tmp_path):
    cfg, cache = small
    cfg = _cfg(cfg, superposition_steps=12)
    model = sf.build_student(cfg, cache)
    hook = _nan_gradients_from(model, 9)  # from step 9 on, for good: a fault that does not go away
    with pytest.raises(sf.NonFiniteGradientError, match=r"loss was finite but its gradient was not") as err:
        sf.train_superposition(model, cache, cfg, progress=False)
    assert "LEARNING_RATE" not in str(err.value)
    hook.remove()
    latest, prev = sf._ckpt_paths(cfg.run_dir, "phase2")
    for path in (latest, prev):
        state = torch.load(path, weights_only=True)
        assert not sf._non_finite(state), path
    assert torch.load(latest, weights_only=True)["step"] == 8  # the last save before the fault
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the next run (the fault gone) resumes from the good checkpoint and ends as if nothing had happened
    rerun = sf.build_student(cfg, cache)
    history = sf.train_superposition(rerun, cache, cfg, progress=False)
    straight_cfg = _cfg(cfg, run_dir=str(tmp_path / "straight"))
    straight = sf.build_student(straight_cfg, cache)
    assert history == sf.train_superposition(straight, cache, straight_cfg, progress=False)
    assert_same_weights(rerun, straight)


def test_a_single_nan_gradient_step_is_skipped_and_named(small, capsys):
    cfg, cache = small
    model = sf.build_student(cfg, cache)
    _nan_gradients_from(model, 3, 3)  # one bad step: skipped, and training goes on
    history = sf.train_superposition(model, cache, cfg, progress=False)
    assert history["skipped"] == [3]
    assert "step 3: the loss was finite" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_teacher_target_is_named_as_the_cause(small, monkeypatch):
    cfg, cache = small
    real = cache.states

    def broken(split, idx):
        out = real(split, idx)
        out[0, 0, 0] = float("nan")  # as if the teacher had written NaN into the cache
        return out

    monkeypatch.setattr(cache, "states", broken)
    with pytest.raises(sf.NonFiniteTargetError, match=r"teacher targets of this batch hold 1 non-finite") as err:
        sf.train_superposition(sf.build_student(cfg, cache), cache, cfg, progress=False)
    assert "LEARNING_RATE" not in str(err.value) and "rerun cell 3" in str(err.value)


@pytest.mark.parametrize("lr", [1e3, 1e30])  # 1e3: a finite loss whose gradient overflows; 1e30: a NaN loss
def test_too_high_learning_rate_is_named_as_the_cause(small, lr):
    cfg, cache = small
    cfg = _cfg(cfg, lr=lr, warmup_steps=0)
    with pytest.raises(sf.NonFiniteLossError, match=r"learning rate too high.*Lower LEARNING_RATE") as err:
        sf.train_superposition(sf.build_student(cfg, cache), cache, cfg, progress=False)
    assert not isinstance(err.value, (sf.NonFiniteTargetError, sf.NonFiniteGradientError))


@pytest.mark.parametrize("where", ["weights", "optimizer state"])
def test_no_checkpoint_is_written_with_non_finite_values(small, patch, where):
    cfg, cache = small
    model = sf.build_student(cfg, cache)
    calls = []
    real = sf.optimizer_step

    def poisoning(loss, opt, params, *a, **k):
        stepped = real(loss, opt, params, *a, **k)
        calls.append(1)
        if len(calls) == 8:  # the last update before the save at step 8
            with torch.no_grad():
                if where == "weights":
                    model.projector.net[0].weight[0, 0] = float("inf")
                else:
                    opt.state[model.projector.net[0].weight]["exp_avg_sq"][0, 0] = float("nan")
        return stepped

    patch(sf, "optimizer_step", poisoning)
    with pytest.raises(sf.NonFiniteLossError, match="refusing to save the phase2 checkpoint"):
        sf.train_superposition(model, cache, cfg, progress=False)
    latest, _ = sf._ckpt_paths(cfg.run_dir, "phase2")
    state = torch.load(latest, weights_only=True)
    assert state["step"] == 4 and not sf._non_finite(state)


def test_a_bad_newest_checkpoint_falls_back_to_the_previous_good_one_naming_both(small, tmp_path):
    cfg, cache = small
    sf.train_superposition(sf.build_student(cfg, cache), cache, cfg, progress=False)  # saves at 4 and 8
    latest, prev = sf._ckpt_paths(cfg.run_dir, "phase2")
    state = torch.load(latest, weights_only=True)
    state["model"]["norm.weight"][0] = float("nan")  # as an older version could have written it
    torch.save(state, latest)
    model = sf.build_student(cfg, cache)
    with pytest.warns(UserWarning) as caught:
        sf.train_superposition(model, cache, cfg, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert "phase2.pt" in text and "phase2.prev.pt" in text and "non-finite" in text
    assert (latest.parent / "phase2.non-finite.pt").exists()  # moved aside, not deleted
    straight_cfg = _cfg(cfg, run_dir=str(tmp_path / "straight"))
    straight = sf.build_student(straight_cfg, cache)
    sf.train_superposition(straight, cache, straight_cfg, progress=False)
    assert_same_weights(model, straight)


def test_checkpoints_set_aside_are_never_overwritten(small):
    cfg, cache = small
    for lr in (1e-3, 2e-3, 3e-3):
        c = _cfg(cfg, lr=lr, superposition_steps=4)
        sf.train_superposition(sf.build_student(c, cache), cache, c, progress=False)
    names = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").glob("phase2.other-settings*.pt"))
    assert names == ["phase2.other-settings-2.pt", "phase2.other-settings.pt"]


# --- 4. every folder the run writes is checked before any work starts --------------------------------------

@pytest.mark.parametrize("setting", ["cache_dir", "run_dir"])
def test_unwritable_folder_is_one_config_error_naming_the_setting(small, tmp_path, setting):
    cfg, _ = small
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(sf.ConfigError, match=setting.upper()):
        sf.check_folders(_cfg(cfg, **{setting: str(blocker / "sub")}))


def test_unwritable_run_dir_is_refused_before_phase2_trains(small, tmp_path, patch):
    cfg, cache = small
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    steps = []
    real = sf.superposition_step
    patch(sf, "superposition_step", lambda *a, **k: (steps.append(1), real(*a, **k))[1], called=False,
          caller=sf.train_superposition)
    bad = _cfg(cfg, run_dir=str(blocker / "run"))
    with pytest.raises(sf.ConfigError, match="RUN_DIR"):
        sf.train_superposition(sf.build_student(bad, cache), cache, bad, progress=False)
    assert steps == []


def test_not_enough_room_is_one_config_error_naming_the_settings(small, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg, _ = small
    cfg = _cfg(cfg, teacher="smollm2")  # a teacher whose width and vocab are known before it loads
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    with pytest.raises(sf.ConfigError, match=r"CACHE_DIR and RUN_DIR need about .* GiB") as err:
        sf.check_folders(cfg)
    assert "bigger disk" in str(err.value)
    monkeypatch.undo()
    lines = sf.check_folders(cfg)
    assert "CACHE_DIR" in lines and "RUN_DIR" in lines and "MiB" in lines


def test_run_dir_estimate_counts_what_the_run_writes(small, tmp_path):
    """The estimate covers the checkpoints (newest and .prev) and the exports that a real run writes."""
    cfg, cache = small
    nb = Notebook(cache).run_all(cfg)
    sf.save_pretrained(nb.student, Path(cfg.run_dir) / "student")
    sf.export_ternary(nb.student, Path(cfg.run_dir) / "student-ternary")
    files = sf._run_dir_bytes(cfg, cache.vocab_size, cache.teacher_dim, ablation=False)
    for rel, estimate in files.items():
        actual = (Path(cfg.run_dir) / rel).stat().st_size
        assert estimate * 1.05 + 2**16 >= actual, rel


def test_not_enough_room_for_a_checkpoint_keeps_the_last_good_one(small, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg, cache = small
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False, stop_after=4)
    latest, _ = sf._ckpt_paths(cfg.run_dir, "phase2")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**3, 10**3))
    with pytest.raises(sf.ConfigError, match="RUN_DIR"):
        sf.train_superposition(model, cache, cfg, progress=False)
    assert torch.load(latest, weights_only=True)["step"] == 4
    assert not list(latest.parent.glob("*.tmp-*"))
