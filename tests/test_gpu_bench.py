"""bench/memory.py and bench/gpu_check.py in smoke mode (issue 13): every cell and phase runs, under both the
CPU policy and the T4's (fp16 autocast + GradScaler, forced), and the figures are written. No speed asserts."""
import json
import math

import pytest


@pytest.mark.slow
def test_memory_bench_smoke_measures_every_cell_and_the_checkpoint_sizes(tmp_path):
    from bench import memory

    result = memory.main(["--smoke", "--out", str(tmp_path / "memory.json")])
    cells = [r["cell"] for r in result["cells"]]
    assert cells[0].startswith("3. Phase 1") and cells[-1] == "10. ablation" and len(cells) == 8
    assert all(r["peak_rss_mib"] > 0 and math.isfinite(r["tensors_peak_mib"]) for r in result["cells"])
    sizes = result["sizes_bytes"]
    assert sizes["phase2_pt"] == 12 * (sizes["params"] - sizes["head_params"])
    assert json.loads((tmp_path / "memory.json").read_text())["cells"]


def test_checkpoint_sizes_at_the_defaults_follow_from_the_shapes():
    from bench import memory

    sizes = memory.checkpoint_sizes(memory.DEFAULTS)
    assert sizes["head_params"] == 151936 * 768 + 151936
    assert 2.7e9 < sizes["phase2_pt"] < 2.9e9 and 1.3e9 < sizes["phase3_pt"] < 1.5e9


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_phase_under_both_policies(tmp_path, monkeypatch):
    from bench import gpu_check

    monkeypatch.setenv("OUT", str(tmp_path))
    result = gpu_check.main(["--smoke", "--steps", "2", "--new-tokens", "4"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["policy"] for r in saved["runs"]] == ["auto", "T4"]
    assert saved["runs"][1]["grad_scaler"] and saved["runs"][1]["autocast"] == "torch.float16"
    for run in result["runs"]:
        phases = [p["phase"] for p in run["phases"]]
        assert phases == ["phase1", "build", "phase2", "phase3", "evaluate", "save", "generate", "ablation"]
        assert all(p["ok"] for p in run["phases"]), [p.get("error") for p in run["phases"]]
        assert math.isfinite(run["phases"][2]["loss"]) and len(run["phases"][6]["texts"]) == 3
