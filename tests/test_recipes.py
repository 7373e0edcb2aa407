"""The recipes that issue 26 compares with Spoon Feed: plain logit KD (the mixed fused head loss and the whole-student
loop), SubLN (BitDistill) as a student option, and what neither may change (the default student and its checkpoints)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, rebuilt_in_place, tiny_student_config

import spoonfeed.losses
import spoonfeed_helpers as sf

FP32 = sf.precision_policy("cpu", "fp32")


def _head_case(n=37, dim=16, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, dim, generator=g) * 0.5).requires_grad_(True)
    b = torch.randn(vocab, generator=g).requires_grad_(True)
    return h, w, b, torch.randint(vocab, (n,), generator=g), torch.randn(n, vocab, generator=g) * 3


# --- the mixed loss: alpha * CE + (1 - alpha) * T^2 * KL, one head product a chunk ------------------------------

@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.1, 2.0), (0.9, 5.0), (0.0, 1.0), (1.0, 1.0)])
def test_mixed_head_loss_is_alpha_ce_plus_one_minus_alpha_kd_in_value_and_gradient(alpha, temperature):
    h, w, b, y, teacher = _head_case()
    fused = sf.head_loss(h, w, b, FP32, targets=y, teacher_logits=lambda i, c: teacher[i:i + c],
                         temperature=temperature, ce_weight=alpha, chunk_rows=10)
    z = F.linear(h, w, b)
    ref = alpha * F.cross_entropy(z, y) + (1 - alpha) * sf.kd_loss(z[None], teacher[None], temperature)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    got = torch.autograd.grad(fused, [h, w, b])
    want = torch.autograd.grad(ref, [h, w, b])
    for a, r in zip(got, want):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(with_teacher=True), "both only with ce_weight"),  # both terms need a weight
    (dict(with_teacher=True, ce_weight=1.5), r"\[0, 1\]"),
    (dict(ce_weight=0.5), "needs both"),  # a weight with CE alone weighs nothing
])
def test_mixed_head_loss_refuses_a_missing_or_impossible_weight(kwargs, message):
    h, w, b, y, teacher = _head_case()
    extra = {"teacher_logits": lambda i, c: teacher[i:i + c]} if kwargs.pop("with_teacher", False) else {}
    with pytest.raises(ValueError, match=message):
        sf.head_loss(h, w, b, FP32, targets=y, **extra, **kwargs)


# --- SubLN (BitDistill): an RMSNorm on the inputs of o_proj and down_proj --------------------------------------

def _inputs_of(model, names):
    seen = {}
    hooks = [dict(model.named_modules())[n].register_forward_pre_hook(
        lambda m, args, n=n: seen.setdefault(n, args[0].detach().float())) for n in names]
    return seen, hooks


def test_subln_normalises_the_inputs_of_o_proj_and_down_proj_and_nothing_else():
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config(subln=True)).eval()
    names = ["layers.0.attention.wo", "layers.0.feed_forward.w2", "layers.0.attention.wq", "layers.0.feed_forward.w1"]
    seen, hooks = _inputs_of(model, names)
    with torch.no_grad():
        model(torch.randint(64, (2, 8)))
    for hk in hooks:
        hk.remove()
    rms = {n: seen[n].pow(2).mean(-1).sqrt() for n in names}
    for n in names[:2]:  # SubLN's weight starts at ones: unit RMS per token
        assert torch.allclose(rms[n], torch.ones_like(rms[n]), atol=1e-3), n
    # the other projections see attention_norm / ffn_norm outputs, which also have unit RMS; so check the norms
    # themselves sit where BitDistill and transformers' BitNet put them
    assert isinstance(model.layers[0].attention.attn_sub_norm, torch.nn.RMSNorm)
    assert model.layers[0].attention.attn_sub_norm.weight.shape == (16,)
    assert model.layers[0].feed_forward.ffn_sub_norm.weight.shape == (model.cfg.hidden_dim,)
    plain = sf.BitNetStudent(tiny_student_config())
    seen, hooks = _inputs_of(plain.eval(), names[:2])
    with torch.no_grad():
        plain(torch.randint(64, (2, 8)))
    assert not torch.allclose(seen[names[1]].pow(2).mean(-1).sqrt(), torch.ones(2, 8), atol=1e-2)


def test_subln_leaves_the_rest_of_the_init_and_the_default_student_as_they_were():
    torch.manual_seed(0)
    plain = sf.BitNetStudent(tiny_student_config())
    torch.manual_seed(0)
    sub = sf.BitNetStudent(tiny_student_config(subln=True))
    extra = {k for k in sub.state_dict() if k not in plain.state_dict()}
    assert extra == {f"layers.{i}.{m}" for i in range(2) for m in ("attention.attn_sub_norm.weight",
                                                                    "feed_forward.ffn_sub_norm.weight")}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, sub.state_dict()[k]), k
    assert sub.cfg.param_counts()["phase2"] == sum(v.numel() for k, v in sub.state_dict().items()
                                                   if not k.startswith("head."))
    with pytest.raises(sf.ConfigError, match="subln"):
        tiny_student_config(subln="yes")


def test_default_students_phase_signature_has_no_subln_key_so_older_checkpoints_stay_valid(tiny_cache):
    cfg, cache, _ = tiny_cache
    plain, sub = sf.build_student(cfg, cache), sf.build_student(cfg, cache, subln=True)
    assert "subln" not in sf._signature(cfg, "phase2", plain, cache)["student"]
    assert sf._signature(cfg, "phase2", sub, cache)["student"]["subln"] is True


def test_a_subln_student_saves_and_reloads_but_has_no_llama_export(tmp_path, capsys):
    model = sf.BitNetStudent(tiny_student_config(subln=True, head_bias=False)).eval()
    with torch.no_grad():
        model.layers[0].feed_forward.ffn_sub_norm.weight.mul_(1.5)  # so that a dropped norm would show
    sf.save_pretrained(model, tmp_path / "s")
    back = sf.load_pretrained(tmp_path / "s")
    x = torch.randint(64, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x), back(x)) and back.cfg.subln
    ternary = sf.load_ternary(sf.export_ternary(model, tmp_path / "t") and tmp_path / "t")
    assert ternary.cfg.subln and ternary.layers[0].feed_forward.ffn_sub_norm is not None
    with pytest.raises(sf.ConfigError, match="SubLN"):
        sf.export_hf(model, make_tokenizer(), tmp_path / "hf")
    out = sf.export_all(model, make_tokenizer(), tmp_path / "run")
    assert set(out) == {"safetensors", "ternary"}
    assert "SubLN student (subln=True) has no Llama form" in capsys.readouterr().out


# --- the whole-student logit KD loop ---------------------------------------------------------------------------

def test_logit_kd_trains_body_embedding_and_head_but_not_the_projector_and_lowers_held_out_ce(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, logit_kd_lr=3e-3)
    model = sf.build_student(cfg, cache)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ce0 = sf.evaluate(model, cache, precision=cfg.precision)["metrics"]["student_ce"]
    history = sf.train_logit_kd(model, cache, cfg, steps=30, progress=False)
    after = model.state_dict()
    assert len(history["loss"]) == 30 and all(math.isfinite(x) for x in history["loss"])
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "head.weight", "head.bias"):
        assert not torch.equal(before[name], after[name]), name
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("projector."))
    assert sf.evaluate(model, cache, precision=cfg.precision)["metrics"]["student_ce"] < ce0 - 0.05


def test_logit_kd_loss_is_the_mixed_head_loss_on_the_next_token_positions(tiny_cache, patch):
    """One step's loss: alpha CE on tokens[:, 1:] plus (1 - alpha) T^2 KL to the teacher head over states[:, :-1]."""
    import spoonfeed_helpers

    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, logit_kd_alpha=0.3, logit_kd_temperature=2.0, precision="fp32")
    seen = []
    real = spoonfeed_helpers.head_loss

    def spy(h, weight, bias, policy, **kw):
        seen.append((h.shape, kw["targets"].shape, kw["ce_weight"], kw["temperature"]))
        return real(h, weight, bias, policy, **kw)

    patch(spoonfeed_helpers, "head_loss", spy)
    sf.train_logit_kd(sf.build_student(cfg, cache), cache, cfg, steps=1, progress=False)
    n = cfg.batch_size * (cache.seq_len - 1)
    assert seen == [(torch.Size([n, cfg.student_dim]), torch.Size([n]), 0.3, 2.0)]


def test_logit_kd_needs_a_head_of_its_own(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    model.set_head_mode("teacher")
    with pytest.raises(sf.ConfigError, match="HEAD_MODE = 'new'"):
        sf.train_logit_kd(model, cache, cfg, steps=2, progress=False)


def test_logit_kd_rerun_with_checkpoints_finds_it_done_and_a_settings_change_trains_again_from_its_start(
        tiny_cache, capsys):
    """A finished Phase 4 rerun with its settings is found done. With other settings (or a cache rebuilt in its
    folder from other data) it trains again, but never on top of the weights the first run left: from the
    student it started from, or, while the student in memory is the first run's result, not at all
    (PhaseOrderError naming cells 5 and 6, which give Phase 4 its start back)."""
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    first = sf.train_logit_kd(model, cache, cfg, steps=6, progress=False, checkpoint=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = sf.train_logit_kd(model, cache, cfg, steps=6, progress=False, checkpoint=True)
    assert "logit KD: already done" in capsys.readouterr().out
    assert again["loss"] == first["loss"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for other_cache, other_cfg in ((rebuilt_in_place(cache), cfg), (cache, dataclasses.replace(cfg, logit_kd_lr=3e-3))):
        with pytest.raises(sf.PhaseOrderError, match="cells 5 and 6"):
            sf.train_logit_kd(model, other_cache, other_cfg, steps=6, progress=False, checkpoint=True)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(start)  # what cells 5 and 6 do: the student Phase 4 starts from
    other = sf.train_logit_kd(model, cache, dataclasses.replace(cfg, logit_kd_lr=3e-3), steps=6, progress=False,
                              checkpoint=True)
    fresh = sf.build_student(cfg, cache)
    want = sf.train_logit_kd(fresh, cache, dataclasses.replace(cfg, logit_kd_lr=3e-3, run_dir=cfg.run_dir + "-2"),
                             steps=6, progress=False, checkpoint=True)
    assert other["loss"] != first["loss"] and other["loss"] == pytest.approx(want["loss"], rel=1e-5)


def _interrupt_after(patch, calls: int):
    """head_loss raises KeyboardInterrupt once, on its call number `calls` + 1: the user's stop in the middle of a
    phase; every other call is the real one."""
    real, seen = sf.head_loss, []

    def stop(*a, **k):
        seen.append(1)
        if len(seen) == calls + 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    patch(sf, "head_loss", stop)


def test_an_interrupted_phase_4_rerun_alone_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_does(
        tiny_cache, patch, capsys):
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, ckpt_every=2)
    unbroken = sf.build_student(cfg, cache)
    start = {k: v.clone() for k, v in unbroken.state_dict().items()}
    want = sf.train_logit_kd(unbroken, cache, dataclasses.replace(cfg, run_dir=cfg.run_dir + "-unbroken"), steps=5,
                             progress=False, checkpoint=True)
    model = sf.build_student(cfg, cache)
    model.load_state_dict(start)
    _interrupt_after(patch, 3)  # steps 0-2 done, a checkpoint at 2, step 3 stopped
    with pytest.raises(KeyboardInterrupt):
        sf.train_logit_kd(model, cache, cfg, steps=5, progress=False, checkpoint=True)
    got = sf.train_logit_kd(model, cache, cfg, steps=5, progress=False, checkpoint=True)  # the cell, rerun alone
    assert "logit KD: resuming at step 2 of 5" in capsys.readouterr().out
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert all(torch.allclose(v, unbroken.state_dict()[k], atol=1e-6) for k, v in model.state_dict().items())


def test_a_phase_4_stopped_before_its_first_checkpoint_asks_for_the_cells_that_rebuild_its_start(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, ckpt_every=100)
    model = sf.build_student(cfg, cache)
    _interrupt_after(patch, 2)
    with pytest.raises(KeyboardInterrupt):
        sf.train_logit_kd(model, cache, cfg, steps=5, progress=False, checkpoint=True)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sf.PhaseOrderError, match="cells 5 and 6"):  # not a silent restart from moved weights
        sf.train_logit_kd(model, cache, cfg, steps=5, progress=False, checkpoint=True)
    assert all(torch.equal(moved[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("changed", [{}, {"lr": 3e-3}])
def test_after_a_phase_4_cut_short_rerunning_phases_2_and_3_gives_phase_4_a_new_start(tiny_cache, patch, changed):
    """The fix the error names works, with the same settings and with a Phase 2 setting changed: Phase 4 then
    trains from the student cells 5 and 6 leave, as an unbroken run from there does."""
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, recipe="spoonfeed+kd", superposition_steps=3, ckpt_every=100)
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    sf.train_lm_head(model, cache, cfg, progress=False)
    _interrupt_after(patch, 2)
    with pytest.raises(KeyboardInterrupt):
        sf.train_logit_kd(model, cache, cfg, steps=4, progress=False, checkpoint=True)
    cfg = dataclasses.replace(cfg, **changed)
    sf.train_superposition(model, cache, cfg, progress=False)  # cell 5, rerun
    sf.train_lm_head(model, cache, cfg, progress=False)  # cell 6
    got = sf.train_logit_kd(model, cache, cfg, steps=4, progress=False, checkpoint=True)
    fresh = sf.build_student(cfg, cache)
    clean = dataclasses.replace(cfg, run_dir=cfg.run_dir + "-clean")
    sf.train_superposition(fresh, cache, clean, progress=False)
    sf.train_lm_head(fresh, cache, clean, progress=False)
    want = sf.train_logit_kd(fresh, cache, clean, steps=4, progress=False, checkpoint=True)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("field,value,named", [("logit_kd_alpha", 1.5, "logit_kd_alpha"),
                                               ("logit_kd_temperature", 0.0, "logit_kd_temperature"),
                                               ("logit_kd_lr", -1e-3, "LOGIT_KD_LR"),
                                               ("logit_kd_steps", -1, "LOGIT_KD_STEPS")])
def test_logit_kd_settings_are_checked_before_any_work(field, value, named):
    """A setting the form has is named by its form name (LOGIT_KD_LR); one it lacks by the keyword that was
    given (make_config's, spoonfeed_run's --set), never by a form name that does not exist."""
    with pytest.raises(sf.ConfigError, match=rf"^{named}={value}") as e:
        sf.make_config("smoke", **{field: value})
    if named == field:
        assert field.upper() not in str(e.value)


# --- RECIPE: the phases a run trains ---------------------------------------------------------------------------

def test_each_recipe_names_its_phases_and_their_steps():
    cfg = sf.make_config("smoke", superposition_steps=7, lm_head_steps=5, logit_kd_steps=9)
    assert sf.RECIPES == ("spoonfeed", "spoonfeed+kd")
    assert cfg.phase_steps() == {"superposition": 7, "lm_head": 5}
    kd = dataclasses.replace(cfg, recipe="spoonfeed+kd").validate()
    assert kd.phase_steps() == {"superposition": 7, "lm_head": 0, "logit_kd": 9}  # Phase 4 trains the head


@pytest.mark.parametrize("form", [dict(RECIPE="kd"), dict(RECIPE="Spoonfeed"), dict(recipe=""),
                                  dict(RECIPE="spoonfeed+kd", LOGIT_KD_STEPS=0),
                                  dict(RECIPE="spoonfeed+kd", HEAD_MODE="tied"),
                                  dict(RECIPE="spoonfeed+kd", HEAD_MODE="teacher")])
def test_a_recipe_that_cannot_run_is_refused_before_any_work_naming_the_fix(form):
    with pytest.raises(sf.ConfigError, match="RECIPE|recipe") as e:
        sf.make_config("smoke", **form)
    assert "spoonfeed" in str(e.value)
    for name in ("LOGIT_KD_STEPS", "HEAD_MODE"):
        assert (name in str(e.value)) == (name in form)


def test_each_preset_gives_phase_4_a_budget_of_its_size():
    assert sf.make_config("smoke", recipe="spoonfeed+kd").phase_steps() == {"superposition": 8, "lm_head": 0,
                                                                              "logit_kd": 4}
    cpu = sf.make_config("cpu", recipe="spoonfeed+kd")
    assert cpu.phase_steps() == {"superposition": 371, "lm_head": 0, "logit_kd": 110} and cpu.logit_kd_lr == 2e-3


def test_under_recipe_spoonfeed_kd_phase_3_is_the_closed_form_fit_and_phase_4_starts_from_it(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, recipe="spoonfeed+kd", superposition_steps=3, lm_head_steps=4, eval_every=2)
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    h3 = sf.train_lm_head(model, cache, cfg, progress=False)
    assert h3["step"] == [] and h3["eval_step"] == [0]
    h4 = sf.train_logit_kd(model, cache, cfg, steps=3, progress=False)
    assert h4["eval_step"] == [0, 2, 3] and h4["val_ce"][0] == pytest.approx(h3["val_ce"][0], abs=1e-5)
    tokens = cache.tokens("val", np.arange(cache.num_val))  # computed afresh, not held_out_ce's remembered figure
    fresh = spoonfeed.losses.mean_ce(sf.student_features(model, tokens, precision=cfg.precision), tokens, model.logits)
    assert h4["val_ce"][-1] == pytest.approx(fresh, abs=1e-6)


def test_the_logit_kd_plot_draws_loss_and_held_out_ce_and_a_recipe_without_it_removes_an_old_one(tmp_path, capsys):
    path = tmp_path / "4_logit_kd.png"
    history = {"step": [0, 1, 2], "loss": [5.0, 4.5, 4.2], "eval_step": [0, 3], "val_ce": [4.8, 4.6]}
    fig = sf.plot_logit_kd(history, path)
    assert path.is_file() and [ax.get_ylabel() for ax in fig.axes] == ["nats/token", "nats/token"]
    assert list(fig.axes[1].lines[0].get_ydata()) == [4.8, 4.6]
    assert sf.plot_logit_kd(None, path) is None and not path.exists()
    assert "not part of this RECIPE" in capsys.readouterr().out


# --- plots that show the difference (issue 26, item 7) -----------------------------------------------------

def _render(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


ABLATION = {"widths": (256,), "baseline_cosine": 0.7193, "teacher_ce": 2.82,
            "arms": {("ternary", 256): {"cosine": 0.854, "ce": 5.13}, ("full precision", 256): {"cosine": 0.844, "ce": 5.23},
                     ("direct CE", 256): {"cosine": float("nan"), "ce": 5.38}}}


def test_the_ablation_plot_draws_points_on_axes_fitted_to_them_with_the_legend_off_the_data():
    import matplotlib.pyplot as plt

    fig = sf.plot_ablation(ABLATION)
    renderer = _render(fig)
    ax1, ax2 = fig.axes
    lo, hi = ax1.get_ylim()
    assert 0.80 < lo < 0.844 and 0.854 < hi < 0.90  # 0.854 vs 0.844 spans a good part of the axis, not 1%
    assert (0.854 - 0.844) / (hi - lo) > 0.3
    lo, hi = ax2.get_ylim()
    assert 4.5 < lo < 5.13 and 5.38 < hi < 6.0
    legend = ax2.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax2.get_window_extent(renderer).x1  # beside the axes, never on the points
    assert not any(isinstance(p, plt.Rectangle) and p.get_height() > 0.5 for p in ax1.patches)  # no bars from zero
    plt.close(fig)


def test_phase3_plot_gives_each_panel_room_and_plain_numbers_on_the_log_axis():
    import matplotlib.pyplot as plt

    history = {"step": list(range(150)), "loss": [5.0 - i / 100 for i in range(150)], "eval_step": [50, 100, 150],
               "val_ce": [5.1, 5.0, 4.95], "val_ppl": [164.0, 148.4, 141.2]}
    fig = sf.plot_phase3(history, teacher_ce=2.8)
    renderer = _render(fig)
    ax1, ax2 = fig.axes
    labels = [t.get_text() for t in ax2.get_yticklabels(minor=True) + ax2.get_yticklabels() if t.get_text()]
    assert labels and all("10^" not in t and "times" not in t and "$" not in t for t in labels), labels
    right_label = ax2.yaxis.label.get_window_extent(renderer)
    left_edge = ax1.get_tightbbox(renderer).x1  # the left panel with every label and tick it draws
    assert right_label.x0 > left_edge  # the right panel's y label clears the left panel and its ticks
    plt.close(fig)


@pytest.mark.parametrize("ppl", [9_800.0, 12_345.0, 151.0])
def test_phase3_plot_of_the_closed_form_fit_alone_draws_its_point_with_plain_numbers_and_says_so(ppl):
    """Under RECIPE "spoonfeed+kd" Phase 3 has no steps: one held-out point, no empty train line, and no 1e+04."""
    import matplotlib.pyplot as plt

    fig = sf.plot_phase3({"step": [], "loss": [], "eval_step": [0], "val_ce": [9.2], "val_ppl": [ppl]})
    _render(fig)
    ax1, ax2 = fig.axes
    assert "no steps" in ax1.get_title() and [line.get_label() for line in ax1.lines] == ["held-out"]
    labels = [t.get_text() for t in ax2.get_yticklabels(minor=True) + ax2.get_yticklabels() if t.get_text()]
    assert labels and all("e+" not in t and "10^" not in t and "$" not in t for t in labels), labels
    plt.close(fig)
