"""Two runs sharing one CACHE_DIR, in two real processes (issue 27, item 9): a finished cache is never rewritten in
place, a run reading it keeps reading consistent files while another rebuilds it, a run opening it never finds
it half-written, and a build killed half-way leaves the cache as it was."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, CountingLoader, tiny_run_config

import spoonfeed_helpers as sf

# run in a second process: `python -c READER folder mode out`; mode "train" reads one opened cache over and over
# (as a training run does), mode "open" opens the folder afresh each time (as a run starting Phase 1 does)
READER = f"""
import hashlib, json, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
import spoonfeed_helpers as sf
from spoonfeed.cache import TeacherCache

folder, mode, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
stop = out.with_suffix(".stop")

def snapshot(cache):
    idx = np.arange(cache.num_train)
    val = np.arange(cache.num_val)
    return (cache.states("train", idx).numpy().tobytes() + cache.states("val", val).numpy().tobytes()
            + cache.teacher_head().numpy().tobytes() + cache.train_tokens.tobytes())

result = {{"reads": [], "changed": 0, "zeros": 0, "inconsistent": 0, "missing": 0}}
cache = TeacherCache(folder)
first = hashlib.sha256(snapshot(cache)).hexdigest()
result["digest"] = cache.content_digest
out.with_suffix(".ready").write_text("ready")
while not stop.exists():
    if mode == "open":
        try:
            cache = TeacherCache(folder)
        except (OSError, ValueError):
            result["missing"] += 1  # between the two renames of a publish: no folder, never half of one
            continue
        result["inconsistent"] += not cache.matches(cache.manifest["request"])
        cache.close()
    else:
        data = snapshot(cache)
        result["changed"] += hashlib.sha256(data).hexdigest() != first
        result["zeros"] += not np.frombuffer(data[:cache.seq_len * cache.teacher_dim * 2], np.float16).any()
    result["reads"].append(time.time())
out.write_text(json.dumps(result))
"""


class SlowLoader(CountingLoader):
    """The tiny teacher, with each forward slowed down: a rebuild that takes a few seconds, for the reader to
    read through."""

    def __call__(self):
        teacher, tok = super().__call__()
        teacher.get_decoder().register_forward_hook(lambda *a: time.sleep(0.3))
        return teacher, tok


def start_reader(folder, mode, tmp_path):
    out = tmp_path / f"reader-{mode}.json"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(folder), mode, str(out)], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not out.with_suffix(".ready").exists():
        assert proc.poll() is None, "the reader died before it opened the cache"
        assert time.time() < deadline, "the reader never opened the cache"
        time.sleep(0.1)
    return proc, out


def stop_reader(proc, out):
    out.with_suffix(".stop").write_text("stop")
    assert proc.wait(timeout=300) == 0
    return json.loads(out.read_text())


def edit_every_file(cfg):
    for i, f in enumerate(sorted(Path(cfg.dataset).glob("*.txt"))):
        f.write_text(" ".join(reversed(f.read_text().split())) + f" {i} .")


@pytest.mark.parametrize("mode", ["train", "open"])
def test_a_run_reading_the_cache_sees_consistent_files_while_another_rebuilds_it(tmp_path, mode):
    """`train`: a second process trains from the cache (reads every state, the head and the tokens, over and over)
    while this one rebuilds the cache in the same folder from edited data: every read gives what it gave first,
    never zeros. `open`: a second process opens the folder afresh over and over during the rebuild: each time it
    finds a whole cache (every file matching its manifest), the old or the new, never one half-written."""
    cfg = tiny_run_config(tmp_path)
    old = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    proc, out = start_reader(old.path, mode, tmp_path)
    try:
        edit_every_file(cfg)
        start = time.time()
        new = sf.cache_teacher_states(cfg, loader=SlowLoader(), progress=False)
        end = time.time()
    finally:
        result = stop_reader(proc, out)
    assert new.path == old.path and new.content_digest != old.content_digest  # rebuilt, in the same folder
    during = [t for t in result["reads"] if start <= t <= end]
    assert during, "the reader read nothing while the cache was rebuilt"
    assert result["changed"] == result["zeros"] == result["inconsistent"] == 0
    assert result["digest"] == old.content_digest
    assert np.array_equal(old.states("train", [0]), old.states("train", [0]))  # this process's old cache reads on
    assert sorted(p.name for p in Path(cfg.cache_dir).iterdir()) == [old.path.name]  # no build or old copy left


def test_a_build_killed_half_way_leaves_the_cache_as_it_was_and_is_cleared_later(tmp_path):
    cfg = tiny_run_config(tmp_path)
    old = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    good = old.states("train", np.arange(old.num_train))
    script = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "import spoonfeed_helpers as sf\nfrom test_shared_cache import SlowLoader\n"
              f"cfg = sf.make_config(**{vars(cfg)!r})\n"
              "sf.cache_teacher_states(cfg, loader=SlowLoader(), rebuild=True, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not list(Path(cfg.cache_dir).glob(f".{old.path.name}.build-*/train_states.npy")):
        assert proc.poll() is None and time.time() < deadline, "the rebuild never started writing states"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    loader = CountingLoader()
    again = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 0 and again.path == old.path  # the old cache, whole: reused, the teacher never loads
    assert torch.equal(again.states("train", np.arange(again.num_train)), good)
    sf.cache_teacher_states(cfg, loader=loader, rebuild=True, progress=False)  # the next build clears the dead one
    assert sorted(p.name for p in Path(cfg.cache_dir).iterdir()) == [old.path.name]
