"""Several processes under `accelerate launch` (2 CPU processes, gloo) against one process, on the smoke preset:
the same cache byte for byte, the same loss histories and held-out figures to float tolerance, checkpoints that
resume under another process count, and a fault on one process that stops both. Each launch takes a minute or
more on 2 cores, so the module is slow; test_parallel.py holds the quick tests of the same rules."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import spoonfeed_helpers as sf
from spoonfeed.files import _file_digest

# one worker runs the whole module: the `runs` fixture (two launches) is module-scoped, and under
# `-n 2 --dist loadgroup` each worker that got one of these tests would otherwise launch it again
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_process")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
RTOL = 1e-4  # float32: measured within 3e-6 relative on this machine (docs/multi-gpu.md)


def free_port() -> int:
    with socket.socket() as s:  # not accelerate's default 29500: other runs may use this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, processes: int, *settings, cache: str | None = None, timeout=900):
    """spoonfeed_run on the smoke preset in float32, `processes` CPU processes of batch 4 / processes each, into
    tmp/<name> (its RUN_DIR) with the cache in tmp/<cache or name>-cache. Returns the CompletedProcess."""
    args = ["--preset", "smoke", "--set", "precision=fp32", "--set", f"batch_size={4 // processes}",
            "--set", f"run_dir={tmp / name}", "--set", f"cache_dir={tmp / ((cache or name) + '-cache')}"]
    for s in settings:
        args += ["--set", s]
    if processes == 1:
        command = [sys.executable, "-m", "spoonfeed_run", *args]
    else:  # --multi_gpu selects torchrun; spoonfeed_run makes the processes CPU ones (gloo) for device=cpu
        command = ["accelerate", "launch", "--multi_gpu", f"--num_processes={processes}", "--monitor_interval=0.1",
                   f"--main_process_port={free_port()}", "-m", "spoonfeed_run", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def result(tmp: Path, name: str) -> dict:
    return json.loads((tmp / name / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes of batch 2, and one of batch 4, each from an empty cache folder of its own."""
    tmp = tmp_path_factory.mktemp("multi")
    for name, n in (("two", 2), ("one", 1)):
        r = launch(tmp, name, n)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return tmp


def test_a_cache_built_by_two_processes_is_byte_identical_to_one_process_s(runs):
    two, one = Path(result(runs, "two")["cache"]), Path(result(runs, "one")["cache"])
    assert two.name == one.name and two != one
    for name in sf.CACHE_FILES:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (two, one)]
    for m in manifests:
        del m["created"]  # the time it was written
    assert manifests[0] == manifests[1]
    a, b = sf.TeacherCache(two), sf.TeacherCache(one)  # and read the same
    for split, n in (("train", a.num_train), ("val", a.num_val)):
        assert torch.equal(a.states(split, np.arange(n)), b.states(split, np.arange(n)))
        assert torch.equal(a.tokens(split, np.arange(n)), b.tokens(split, np.arange(n)))
    assert np.array_equal(a.train_mean, b.train_mean) and torch.equal(a.teacher_head(), b.teacher_head())


def test_two_processes_of_batch_b_match_one_process_of_batch_2b(runs):
    two, one = result(runs, "two"), result(runs, "one")
    assert (two["processes"], two["batch_size"], two["global_batch_size"]) == (2, 2, 4)
    assert (one["processes"], one["batch_size"], one["global_batch_size"]) == (1, 4, 4)
    assert two["phase2"]["loss"][0] == pytest.approx(one["phase2"]["loss"][0], rel=1e-6)  # before any step
    for phase, key in (("phase2", "loss"), ("phase2", "val_cosine"), ("phase3", "loss"), ("phase3", "val_ce")):
        assert len(two[phase][key]) == len(one[phase][key]) > 0
        assert two[phase][key] == pytest.approx(one[phase][key], rel=RTOL), (phase, key)
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=RTOL), key
    for kind, path in two["exported"].items():  # the main process wrote every form, once
        assert Path(path).exists() and not list(Path(path).parent.glob(f"{Path(path).name}.tmp-*")), kind


def test_a_checkpoint_of_one_process_resumes_under_two(runs):
    """One process's Phase 2 checkpoint at step 4 of 8, resumed by two processes of half the batch: the rest of
    the run is the one process's, and the two's."""
    (runs / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(runs / "one" / "checkpoints" / "phase2.prev.pt", runs / "resumed" / "checkpoints" / "phase2.pt")
    assert torch.load(runs / "resumed" / "checkpoints" / "phase2.pt")["step"] == 4
    r = launch(runs, "resumed", 2, cache="one")  # the one-process cache, reused
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Phase 2: resuming at step 4 of 8" in r.stdout and "Phase 1: reusing the cache" in r.stdout
    resumed, one = result(runs, "resumed"), result(runs, "one")
    assert resumed["phase2"]["loss"][:4] == one["phase2"]["loss"][:4]  # from the checkpoint, as saved
    for phase in ("phase2", "phase3"):
        assert resumed[phase]["loss"] == pytest.approx(one[phase]["loss"], rel=RTOL), phase
    for key, value in one["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=RTOL), key


def test_non_finite_targets_drawn_by_one_process_stop_both_with_the_same_error(runs):
    """A NaN in one teacher state that only process 1 draws at Phase 2's first step: process 0's own batch is clean,
    yet both stop there with NonFiniteTargetError (none waits forever in a collective), and nothing is saved."""
    one = Path(result(runs, "one")["cache"])
    bad = runs / "bad-cache" / one.name
    shutil.copytree(one, bad)
    idx = torch.randint(16, (4,), generator=torch.Generator().manual_seed(0))  # step 0's blocks: smoke seed 0
    block = next(int(i) for i in idx[2:] if i not in idx[:2])  # process 1's rows, not process 0's
    states = np.load(bad / "train_states.npy", mmap_mode="r+")
    states[block, 3, 5] = np.nan
    states.flush()
    del states
    manifest = json.loads((bad / "manifest.json").read_text())  # signed again: the cache stays valid, and is used
    manifest["files"]["train_states.npy"]["blake2b"] = _file_digest(bad / "train_states.npy")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = launch(runs, "bad", 2, cache="bad", timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Phase 1: reusing the cache" in out
    for process in (0, 1):  # each says it stopped, and why: the same cause, named by both (a line may follow a bar)
        said = f"spoonfeed_run: process {process} of 2 stopped: NonFiniteTargetError: Phase 2 loss is nan at step 0"
        line = next((s for s in out.splitlines() if said in s), None)
        assert line and "hold 1 non-finite values" in line, out[-4000:]
    assert not (runs / "bad" / "checkpoints" / "phase2.pt").exists()


@pytest.mark.parametrize("flags", [[], ["--cpu"]], ids=["no GPU visible", "--cpu"])
def test_accelerate_launch_num_processes_2_that_starts_one_process_is_refused_before_any_work(tmp_path, flags):
    """`accelerate launch --num_processes 2` without --multi_gpu on a machine with fewer than 2 visible GPUs, or
    with --cpu, runs accelerate's simple launcher, which starts one process. That process refuses to run (one line
    naming --multi_gpu and torchrun, exit 2) and writes nothing, instead of training at half the global batch."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    r = subprocess.run(["accelerate", "launch", *flags, "--num_processes", "2", f"--main_process_port={free_port()}",
                        "-m", "spoonfeed_run", "--preset", "smoke", "--set", "batch_size=2", "--set",
                        f"run_dir={run}", "--set", f"cache_dir={cache}"], cwd=ROOT,
                       env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode != 0, r.stdout[-3000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("spoonfeed_run: ConfigError: ")]
    assert len(said) == 1 and "this `accelerate launch --num_processes N` started one process, not N" in said[0]
    assert "accelerate launch --multi_gpu --num_processes N" in said[0], r.stderr[-3000:]
    assert "effective configuration" not in r.stdout and not run.exists() and not cache.exists()
