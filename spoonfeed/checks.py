"""The checks made before any work starts: the runtime, the folders and the room the run needs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import cache_folder, cache_request
from .config import BUNDLED_TEACHER, _teacher_shape
from .errors import ConfigError, in_notebook
from .files import (
    RUN_DIR_EXPORTS,
    RUN_DIR_LAYOUT,
    check_export_destinations,
    layout_problems,
    space_problem,
    writable_problem,
)
from .precision import pick_device, precision_policy
from .sources import data_fingerprint

if TYPE_CHECKING:
    from .config import RunConfig


def check_runtime(cfg: RunConfig, preset: str | None = None) -> None:
    """Cell 2: the form's defaults need a GPU. On a CPU runtime with a Hub teacher and no preset, Phase 2 alone
    would take about 9 hours (66 s a step) and the ablation would outgrow Colab's 12.7 GB of host RAM, so stop
    before any work with ConfigError naming the two fixes. A preset, the bundled teacher or a local teacher
    folder means the user chose CPU on purpose."""
    if preset or pick_device(cfg.device).type != "cpu":
        return
    if cfg.teacher == BUNDLED_TEACHER or os.path.isdir(os.path.expanduser(cfg.teacher)):
        return
    raise ConfigError(
        f"this runtime has no GPU, and the teacher {cfg.teacher!r} with a {cfg.student_dim}x{cfg.student_layers} "
        "student needs one (on CPU, Phase 2 alone takes about 9 hours). " + in_notebook(
            "In Colab: Runtime \u2192 Change runtime type \u2192 T4 GPU, then Run all. Or set PRESET = \"cpu\" in cell 1",
            "Run it on a machine with a CUDA GPU, or pass --preset cpu")
        + " (the bundled teacher and the stdlib corpus, about 10 minutes on 2 CPU cores)")


def _run_dir_bytes(cfg: RunConfig, vocab: int, teacher_dim: int, ablation: bool) -> dict:
    """What a run writes under RUN_DIR, in bytes, by relative path: checkpoints (weights plus AdamW's two
    moments, fp32: 12 bytes a trained parameter) as newest and .prev, the float32 student, the packed export."""
    out = {}

    def checkpoints(prefix, dim, head_mode, head_steps, kd_steps=0, phase2=True):
        n = cfg.student_config(vocab, teacher_dim, dim=dim).param_counts()
        trained3 = {"new": n["head"], "tied": n["embedding"], "teacher": 0}[head_mode] if head_steps else 0
        trained4 = n["phase2"] + n["head"] if kd_steps else 0  # Phase 4 trains all but the projector: a bound
        for phase, numel in (("phase2", n["phase2"] if phase2 else 0), ("phase3", trained3), ("logit_kd", trained4)):
            for name in (f"{phase}.pt", f"{phase}.prev.pt") if numel else ():
                out[f"{prefix}checkpoints/{name}"] = 12 * numel
        return n

    steps = cfg.phase_steps()
    n = checkpoints("", cfg.student_dim, cfg.head_mode, steps["lm_head"], steps.get("logit_kd", 0))
    total = n["phase2"] + n["head"] + (vocab * teacher_dim if cfg.head_mode == "teacher" else 0)
    out["student/model.safetensors"] = 4 * total
    out["student-ternary/ternary.safetensors"] = 2 * total  # an upper bound: the BitLinears take 1.6 bits
    for _, width, _, arm, phase2_dir in cfg.ablation_arms() if ablation else ():  # run_ablation's checkpointed arms
        steps = arm.phase_steps()
        prefix = f"{Path(arm.run_dir).relative_to(cfg.run_dir).as_posix()}/"
        checkpoints(prefix, width, "new", steps["lm_head"], steps.get("logit_kd", 0), phase2_dir == arm.run_dir)
    return out


def _run_dir_outputs(cfg: RunConfig, ablation: bool) -> list[str]:
    """The paths of RUN_DIR_LAYOUT whose kind check_folders checks with layout_problems: all of them but the
    ablation's folder when there is no ablation, and but the exports (RUN_DIR_EXPORTS), which
    check_export_destinations checks, their kind and what they hold."""
    skip = set(RUN_DIR_EXPORTS.values()) | ({"ablation"} if not ablation else set())
    return [name for name in RUN_DIR_LAYOUT if name not in skip]


def _cached_request(folder: Path) -> dict | None:
    """The request of the finished cache in folder (its manifest's), or None."""
    try:
        return json.loads((folder / "manifest.json").read_text())["request"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_folders(cfg: RunConfig, ablation: bool = True) -> str:
    """Check every folder the run writes before any work starts: CACHE_DIR (the Phase 1 cache) and RUN_DIR
    (checkpoints, plots, the saved student and its packed export; the ablation's checkpoints when ablation).
    A cache that would be rebuilt needs its full size even where an older one sits: the new one is written
    beside it and replaces it only when finished.
    Every path the run writes in RUN_DIR (RUN_DIR_LAYOUT: checkpoints/, plots/, the exports, run.json, ...) must be
    missing or of the kind the run writes there (a folder where it makes a folder, a file where it writes a file),
    and the save cell's destinations must be free or hold earlier exports (check_export_destinations).

    Each must be writable (it is created if missing) and have room for what the run writes there: the cache
    (unless a finished cache for this request is already there; the size is known for the listed teachers and
    for local teacher folders) and RUN_DIR's files, less what the same files already take. Two folders on one
    disk share its free space. Checkpoint sizes count AdamW's two moments; DISK_MARGIN is added on top.
    Raises ConfigError, once, naming every setting to change. Returns one line per folder for the notebook.
    """
    lines, need_by_disk, ablation_bytes = [], {}, 0
    shape = _teacher_shape(cfg.teacher)
    folders = (("CACHE_DIR", cfg.cache_dir), ("RUN_DIR", cfg.run_dir))
    problems = [p for p in (writable_problem(folder, setting) for setting, folder in folders) if p]
    if not problems:
        # every other path the run writes in RUN_DIR, of the kind it writes (else it fails there, after the training)
        problems += layout_problems(cfg.run_dir, _run_dir_outputs(cfg, ablation))
        try:  # the save cell's files in RUN_DIR: refused there, after the training, if something else is in the way
            check_export_destinations(cfg.run_dir, cfg.head_mode)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    for setting, folder in folders:
        if shape is None:
            need = None
        elif setting == "CACHE_DIR":
            request = cache_request(cfg.teacher, cfg.dataset, cfg.num_samples, cfg.val_samples, cfg.seq_len,
                                    cfg.seed, cfg.text_field, data_fingerprint(cfg.dataset),
                                    precision_policy(cfg.device, cfg.precision).teacher, cfg.encoding)
            done = _cached_request(cache_folder(folder, request)) == request  # reused; a rebuild goes beside it
            D, V = shape
            need = 0 if done else (cfg.num_samples + cfg.val_samples) * cfg.seq_len * (2 * D + 4) + 2 * V * D
        else:
            files = _run_dir_bytes(cfg, shape[1], shape[0], ablation)
            have = sum((Path(folder) / f).stat().st_size for f in files if (Path(folder) / f).is_file())
            need = max(0, sum(files.values()) - have) + max(files.values())  # + the temp file of a save
            ablation_bytes = sum(v for k, v in files.items() if k.startswith("ablation/"))
        usage = shutil.disk_usage(folder)
        dev = os.stat(folder).st_dev
        entry = need_by_disk.setdefault(dev, {"folder": folder, "need": 0, "settings": []})
        entry["need"] += need or 0
        entry["settings"].append(setting)
        lines.append(f"{setting} {folder}: writable, " + (f"needs about {need / 2**20:,.0f} MiB" if need is not None
                     else "size unknown until the teacher loads") + f", {usage.free / 2**30:.1f} GiB free")
    for entry in need_by_disk.values():
        names = " and ".join(entry["settings"])
        problems.append(space_problem(
            entry["folder"], entry["need"], f"{names} need{'s' if len(entry['settings']) == 1 else ''}",
            f"point {names.replace(' and ', ' or ')} at a bigger disk, free some space, or lower NUM_CACHE_SAMPLES / "
            "MAX_SEQ_LENGTH / the student size" + (f", or set RUN_ABLATION = False (its checkpoints take about "
                                                   f"{ablation_bytes / 2**30:.2f} GiB)"
                                                   if ablation_bytes and "RUN_DIR" in entry["settings"] else "")))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
    return "\n".join(lines)
