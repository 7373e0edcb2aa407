"""The packed 1.6-bit ternary export and the ablation."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_student_config

import spoonfeed_helpers as sf

ROOT = Path(__file__).resolve().parents[1]


def test_pack_unpack_round_trip():
    q = torch.randint(-1, 2, (7, 13)).float()  # 91 weights: not a multiple of 5
    packed = sf.pack_ternary(q)
    assert packed.dtype == np.uint8 and len(packed) == math.ceil(91 / 5)
    assert torch.equal(sf.unpack_ternary(packed, 91).view(7, 13), q)


def _rounded_to_fp16(model):
    """The source model with its full-precision parts rounded as the export stores them."""
    bl = {n for n, _ in model.bitlinears()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[0] not in bl:
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("mode", ["new", "teacher"])
def test_export_load_gives_exactly_equal_eval_logits(tmp_path, mode):
    model = sf.BitNetStudent(tiny_student_config(head_mode=mode, n_layers=3))
    if mode == "teacher":
        model.attach_teacher_head(torch.randn(64, 24).half().float())
    model = _rounded_to_fp16(model).eval()
    sf.export_ternary(model, tmp_path / "t")
    loaded = sf.load_ternary(tmp_path / "t")
    idx = torch.randint(0, 64, (2, 11))
    assert torch.equal(loaded.logits(loaded(idx)), model.logits(model(idx)))
    assert torch.equal(sf.generate(loaded, idx[:, :3], 8, temperature=0), sf.generate(model, idx[:, :3], 8, temperature=0))
    for (_, a), (_, b) in zip(model.bitlinears(), loaded.bitlinears()):  # the latent weight re-quantizes the same
        assert torch.equal(sf.quantize_weight(a.weight)[0], sf.quantize_weight(b.weight)[0])


def test_export_size_matches_the_computed_expectation(tmp_path):
    cfg = tiny_student_config(dim=64, n_layers=3, n_heads=4, vocab_size=100)
    model = sf.BitNetStudent(cfg)
    sizes = sf.export_ternary(model, tmp_path / "t")
    n_ternary = sum(m.weight.numel() for _, m in model.bitlinears())
    n_fp = sum(p.numel() for n, p in model.state_dict().items()
               if n.rsplit(".", 1)[0] not in dict(model.bitlinears()))
    expected = math.ceil(n_ternary / 5) + 4 * len(model.bitlinears()) + 2 * n_fp
    assert sizes["ternary_weights"] == n_ternary
    assert sizes["bits_per_ternary_weight"] <= 1.61
    header = 8 + int.from_bytes((tmp_path / "t" / "ternary.safetensors").read_bytes()[:8], "little")
    padding = sizes["file_bytes"] - header - expected  # safetensors may align tensors to their dtype size
    assert 0 <= padding <= 4 * 2 * len(model.bitlinears())
    assert abs(sizes["file_bytes"] - expected) / expected < 0.06  # the JSON header is the only overhead
    assert sizes["file_bytes"] == (tmp_path / "t" / "ternary.safetensors").stat().st_size


def test_corrupt_export_is_reported(tmp_path):
    sf.export_ternary(sf.BitNetStudent(tiny_student_config()), tmp_path / "t")
    (tmp_path / "t" / "ternary.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="export again"):
        sf.load_ternary(tmp_path / "t")


def test_ternary_stats_show_the_share_of_each_value():
    model = sf.BitNetStudent(tiny_student_config())
    with torch.no_grad():
        w = model.layers[0].attention.wq.weight
        w.copy_(torch.tensor([1.0, -1.0, 0.0, 0.0]).repeat(w.numel() // 4).view_as(w))
    row = sf.ternary_stats(model)[0]
    assert row["layer"] == "layers.0.attention.wq"
    assert (row["neg"], row["zero"], row["pos"]) == (0.25, 0.5, 0.25)
    assert row["scale"] == pytest.approx(0.5)


@pytest.mark.slow
def test_ablation_runs_three_arms_with_finite_figures(tiny_cache):
    cfg, cache, _ = tiny_cache
    result = sf.run_ablation(cache, cfg, progress=False)
    assert set(result["arms"]) == {("ternary", 16), ("full precision", 16), ("direct CE", 16),
                                   ("recipe spoonfeed+kd", 16)}
    assert result["recipe"] == "spoonfeed" and "'spoonfeed+kd' reaches CE" in result["verdict"]
    assert (Path(cfg.run_dir) / "ablation" / "spoonfeed+kd-16" / "checkpoints" / "logit_kd.pt").is_file()
    for arm, r in result["arms"].items():
        assert math.isfinite(r["ce"])
        if arm[0] != "direct CE":
            assert math.isfinite(r["cosine"])
    assert "verdict" in sf.format_ablation(result)
    fp_layers = sf.BitNetStudent(tiny_student_config(ternary=False))
    assert not any(m.quantize for _, m in fp_layers.bitlinears())


@pytest.mark.slow
def test_the_recipe_arm_takes_the_ternary_arms_phase_2_and_reaches_the_figures_of_training_its_own(tiny_cache):
    """The two recipes share Phase 2: the ablation trains it once (the ternary arm's checkpoint), and the other
    recipe's arm, which loads it, ends with the CE and cosine it reaches when it trains its own Phase 2. The
    size estimate counts that Phase 2 once, and every checkpoint the ablation writes."""
    cfg, cache, _ = tiny_cache
    result = sf.run_ablation(cache, cfg, progress=False)
    ablation = Path(cfg.run_dir) / "ablation"
    assert (ablation / "ternary-16" / "checkpoints" / "phase2.pt").is_file()
    assert not list((ablation / "spoonfeed+kd-16").rglob("phase2*.pt"))
    arm, width, ternary, acfg, _ = cfg.ablation_arms()[-1]
    alone = dataclasses.replace(acfg, run_dir=str(Path(cfg.run_dir) / "alone"))
    model = sf.build_student(alone, cache, ternary=ternary)
    sf.train_superposition(model, cache, alone, progress=False)  # its own Phase 2, from scratch
    sf.train_lm_head(model, cache, alone, progress=False)
    sf.train_logit_kd(model, cache, alone, progress=False, checkpoint=True)
    m = sf.evaluate(model, cache, via_teacher_head=False)["metrics"]
    assert result["arms"][(arm, width)] == {"cosine": m["student_cosine"], "ce": m["student_ce"]}
    estimate = {rel for rel in sf._run_dir_bytes(cfg, cache.vocab_size, cache.teacher_dim, ablation=True)
                if rel.startswith("ablation/")}
    written = {p.relative_to(cfg.run_dir).as_posix() for p in ablation.rglob("*.pt")}
    assert written <= estimate and {r for r in estimate if "spoonfeed+kd" in r and "phase2" in r} == set()


def test_the_ablation_leaves_out_only_the_figure_it_does_not_read(tiny_cache, monkeypatch):
    """evaluate(via_teacher_head=False) gives every other figure unchanged; run_ablation asks for no CE through the
    teacher's head (a float32 (N * T, D) x (D, V) product an arm's figures never use)."""
    import spoonfeed.metrics

    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    full = sf.evaluate(model, cache)["metrics"]
    light = sf.evaluate(model, cache, via_teacher_head=False)["metrics"]
    assert math.isfinite(full["student_ce_via_teacher_head"]) and math.isnan(light["student_ce_via_teacher_head"])
    assert {k: v for k, v in light.items() if "via_teacher_head" not in k} == \
        {k: v for k, v in full.items() if "via_teacher_head" not in k}
    asked = []
    real = spoonfeed.metrics.evaluate
    monkeypatch.setattr(sf, "evaluate", lambda *a, **kw: asked.append(kw.get("via_teacher_head", True)) or real(*a, **kw))
    sf.run_ablation(cache, cfg, progress=False)
    assert asked == [False, False, False, False]


def test_verdict_is_computed_from_the_figures():
    def result(t_cos, fp_cos, t_ce, d_ce):
        return {"widths": (64,), "baseline_cosine": 0.5, "teacher_ce": 2.0,
                "arms": {("ternary", 64): {"cosine": t_cos, "ce": t_ce},
                         ("full precision", 64): {"cosine": fp_cos, "ce": 5.0},
                         ("direct CE", 64): {"cosine": float("nan"), "ce": d_ce}}}

    a = sf.ablation_verdict(result(0.6, 0.7, 5.0, 6.0))
    assert "0.50x the cosine gain" in a and "full precision ahead" in a and "distillation helps" in a
    b = sf.ablation_verdict(result(0.7, 0.6, 6.0, 5.0))  # figures swapped: the verdict flips
    assert "2.00x the cosine gain" in b and "ternary ahead" in b and "distillation does not help" in b


@pytest.mark.parametrize("other_ce,word", [(4.9, "lower"), (5.2, "higher")])
def test_verdict_compares_the_recipe_with_the_other_one_and_points_to_the_recipes_page(other_ce, word):
    result = {"widths": (64,), "baseline_cosine": 0.5, "teacher_ce": 2.0, "recipe": "spoonfeed",
              "other_recipe": "spoonfeed+kd",
              "arms": {("ternary", 64): {"cosine": 0.6, "ce": 5.0}, ("full precision", 64): {"cosine": 0.6, "ce": 5.1},
                       ("direct CE", 64): {"cosine": float("nan"), "ce": 6.0},
                       ("recipe spoonfeed+kd", 64): {"cosine": 0.55, "ce": other_ce}}}
    verdict = sf.ablation_verdict(result)
    assert f"RECIPE 'spoonfeed+kd' reaches CE {other_ce:.3f} against 5.000 for 'spoonfeed'" in verdict
    assert f"nats {word}" in verdict and "docs/recipes.md" in verdict and (ROOT / "docs/recipes.md").is_file()
    fig = sf.plot_ablation(result)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()][-1] == "recipe\nspoonfeed+kd"
    assert other_ce in list(fig.axes[1].lines[0].get_ydata())


def test_verdict_calls_a_tiny_ce_difference_a_tie():
    result = {"widths": (64,), "baseline_cosine": 0.5, "teacher_ce": 2.0,
              "arms": {("ternary", 64): {"cosine": 0.6, "ce": 5.981}, ("full precision", 64): {"cosine": 0.6, "ce": 5.9},
                       ("direct CE", 64): {"cosine": float("nan"), "ce": 5.985}}}
    assert "same CE within 0.05 nats" in sf.ablation_verdict(result)
