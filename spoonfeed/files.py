"""Files on disk: atomic writes, the writable and free-space checks, and what each of our writers may replace."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import ConfigError


DISK_MARGIN = 1.1  # ask for 10% more free space than the estimate


def writable_problem(folder, setting: str) -> str | None:
    """None when a file can be created in folder (made if missing), else why not, as a message naming the
    setting to change (CACHE_DIR, RUN_DIR)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = Path(folder) / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return None
    except OSError as e:
        return f"{setting} {str(folder)!r} cannot be written ({e.strerror or e}): set {setting} to a writable folder"


def check_writable(folder, setting: str) -> None:
    """Raises ConfigError naming `setting` unless a file can be created in folder (made if missing)."""
    problem = writable_problem(folder, setting)
    if problem:
        raise ConfigError(problem)


def space_problem(folder, need: int, what: str, fix: str, unit: str = "GiB") -> str | None:
    """None when folder's disk has room for `need` bytes and DISK_MARGIN more, else a message: what needs how
    much (in `unit`, GiB or MiB), what is free, and the fix."""
    free = shutil.disk_usage(folder).free
    if need * DISK_MARGIN <= free:
        return None
    scale, digits = {"GiB": (2**30, ".2f"), "MiB": (2**20, ",.0f")}[unit]
    return (f"{what} about {need * DISK_MARGIN / scale:{digits}} {unit} but {folder} has only "
            f"{free / scale:{digits}} {unit} free: {fix}")


def check_free_space(folder, need: int, what: str, fix: str, unit: str = "GiB") -> None:
    """Raises ConfigError (see space_problem) unless folder's disk has room for need bytes, DISK_MARGIN included."""
    problem = space_problem(folder, need, what, fix, unit)
    if problem:
        raise ConfigError(problem)


def _file_digest(path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _replacing(path, keep=None):
    """Write `path` (a file or a folder) whole or not at all: yields a temp path beside it to write, then renames
    the temp over path when the block ends (an earlier folder there goes only once the new one is in place). On
    any failure, an interrupt included, the temp is removed and path is left as it was: no temp file stays
    behind. keep: a file path that the file at path is renamed to before it is replaced (a checkpoint's .prev)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # left by an earlier process with this pid
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            if keep is not None and path.exists():
                os.replace(path, keep)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _normal_mode(path) -> None:
    """Give a file the mode an ordinary open() gives it: 0666 less the umask. safetensors' save_file writes
    through a private temp file and leaves 0600, which other users of a shared run folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path, text: str):
    with _replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


FORMAT = "spoonfeed-student-v1"


TERNARY_FORMAT = "spoonfeed-ternary-v1"


# what each writer leaves at its destination: (the writer, what it does to what is already there)
_WRITERS = {"safetensors": ("save_pretrained", "writes config.json and model.safetensors into the folder, over "
                                               "what is there"),
            "ternary": ("export_ternary", "writes config.json and ternary.safetensors into the folder, over what "
                                          "is there"),
            "hf": ("export_hf", "replaces the whole folder, deleting what is there"),
            "gguf": ("export_gguf", "replaces the file")}


def _is_export(path: Path, kind: str) -> bool:
    """Whether path holds an earlier save of this kind (see _WRITERS), recognised by what our writer puts there:
    config.json's format (save_pretrained, export_ternary), config.json's spoonfeed_format (export_hf; or, for
    folders written before that key, our BitNet quantization config and model card), or the GGUF's general.name.
    """
    try:
        if kind == "gguf":
            import gguf

            return path.is_file() and gguf.GGUFReader(path).fields["general.name"].contents() == GGUF_NAME
        config = json.loads((path / "config.json").read_text())
        if kind == "hf":
            quant = config.get("quantization_config") or {}
            return config.get("spoonfeed_format") == HF_FORMAT or (
                all(quant.get(k) == v for k, v in HF_BITNET_CONFIG.items())
                and "spoon-feed" in (path / "README.md").read_text())
        return config.get("format") == {"safetensors": FORMAT, "ternary": TERNARY_FORMAT}[kind]
    except Exception:  # missing, unreadable, or not a file of ours
        return False


def _check_destination(path, kind: str) -> Path:
    """Refuse, before any work, to write a save or export of this kind (see _WRITERS) over anything but an
    earlier one of the same kind: a missing path, an empty folder and an earlier save are fine. The HF folder is
    replaced whole, so it can be neither the current folder nor one above it. Returns path as an absolute path
    (an absolute name for '.', so that a temp name can sit beside it).
    Raises ConfigError naming what is there and the fix."""
    writer, effect = _WRITERS[kind]
    full = Path(os.path.abspath(os.path.expanduser(path)))
    cwd = Path.cwd()
    if kind == "hf" and (full == cwd or full in cwd.parents):
        raise ConfigError(f"export_hf replaces the whole folder it is given, so it cannot write to {str(path)!r}, "
                          "the current folder or one above it: give it a folder of its own, such as 'student-hf'")
    above = next(p for p in full.parents if os.path.lexists(p))  # the root always exists
    if not above.is_dir():
        raise ConfigError(f"{writer} cannot write to {str(path)!r}: {str(above)!r} is a file, not a folder. Give it "
                          "a path in a folder (in the notebook: set RUN_DIR to a folder)")
    if not os.path.lexists(full):
        return full
    if kind == "gguf":
        problem = "is a folder, not a file" if full.is_dir() else None if _is_export(full, kind) else \
            "is a file that export_gguf did not write"
    else:
        problem = "is a file, not a folder" if not full.is_dir() else None if _is_export(full, kind) or \
            not any(full.iterdir()) else f"holds other things and no config.json written by {writer}"
    if problem:
        raise ConfigError(f"{writer} will not write to {str(path)!r}: it {problem}, and {writer} {effect}. Give "
                          "it a new path or an empty folder (in the notebook: another RUN_DIR), or move what is "
                          "there away first")
    return full


# transformers' BitNet config. Its BitLinear divides the output by weight_scale, so weight_scale = 1 / our scale
# (AutoBitLinear takes it the other way round, w = q * weight_scale; but in transformers 5.24 its offline loader
# leaves the float16 embedding and norms uncast, which breaks float32 compute). Naming lm_head in
# modules_to_not_convert keeps it full precision (that turns off transformers' automatic skip of the head).
HF_BITNET_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                    "modules_to_not_convert": ["lm_head"], "use_rms_norm": False}


HF_FORMAT = "spoonfeed-hf-v1"  # config.json's spoonfeed_format: marks a folder export_hf wrote (and may replace)


GGUF_NAME = "spoon-feed ternary student"  # the GGUF's general.name: marks a file export_gguf wrote


RUN_DIR_EXPORTS = {"safetensors": "student", "ternary": "student-ternary", "hf": "student-hf",
                   "gguf": "student.gguf"}  # what the save cell (export_all) writes in RUN_DIR


CHECKPOINT_PHASES = ("phase2", "phase3", "logit_kd")  # the phases that write <phase>.pt and <phase>.prev.pt


PLOTS = ("1_cache.png", "2_superposition.png", "3_lm_head.png", "4_logit_kd.png", "5_evaluation.png",
         "6_ablation.png")


# every path a run writes under RUN_DIR, relative to it, and whether it is a "file" or a "folder". The writers take
# their paths from here (run_path, RUN_DIR_EXPORTS, checkpoints' _ckpt_paths), so an output that is not listed fails
# on its first use, and check_folders refuses, before any work, a listed path that exists as the other kind
RUN_DIR_LAYOUT = {
    "checkpoints": "folder",
    **{f"checkpoints/{phase}{end}": "file" for phase in CHECKPOINT_PHASES for end in (".pt", ".prev.pt")},
    "plots": "folder", **{f"plots/{name}": "file" for name in PLOTS},
    **{name: "file" if kind == "gguf" else "folder" for kind, name in RUN_DIR_EXPORTS.items()},
    "ablation": "folder",  # run_ablation's arms, each a RUN_DIR of its own (their checkpoints)
    "run.json": "file",  # spoonfeed_run's summary
}


def run_path(run_dir, name: str) -> Path:
    """run_dir / name for a path listed in RUN_DIR_LAYOUT (e.g. "plots/1_cache.png", "run.json"). Raises KeyError
    for a name that is not listed: list a new output there, so that check_folders checks it before any work."""
    if name not in RUN_DIR_LAYOUT:
        raise KeyError(f"{name!r} is not listed in spoonfeed.files.RUN_DIR_LAYOUT: list every path a run writes "
                       "under RUN_DIR there")
    return Path(run_dir) / name


def layout_problems(run_dir, names=RUN_DIR_LAYOUT) -> list[str]:
    """The paths of RUN_DIR_LAYOUT (those in names) that exist under run_dir as the wrong kind: a file where the run
    makes a folder, a folder (or a broken link) where it writes a file. A path inside one already named is not
    named again. Returns one message per path, each naming the fix; [] when nothing is in the way."""
    problems, named = [], []
    for name in sorted(names, key=lambda n: n.count("/")):
        path = Path(run_dir) / name
        if any(name.startswith(f"{above}/") for above in named) or not os.path.lexists(path):
            continue
        want = RUN_DIR_LAYOUT[name]
        if (want == "folder") != path.is_dir():
            named.append(name)
            problems.append(f"RUN_DIR holds {str(path)!r} as a {'folder' if path.is_dir() else 'file'}, where the run "
                            f"writes a {want}: move it away, or set RUN_DIR to another folder")
    return problems


def check_export_destinations(run_dir, head_mode: str = "new") -> dict:
    """The paths the save cell (export_all) writes in RUN_DIR (RUN_DIR_EXPORTS; no Llama forms for head_mode
    'teacher'), each checked by _check_destination before any work: cell 2 (check_folders) and export_all call
    it. Returns {format: path}. Raises one ConfigError naming every path in the way and RUN_DIR."""
    run_dir = Path(run_dir)
    kinds = ("safetensors", "ternary") if head_mode == "teacher" else tuple(RUN_DIR_EXPORTS)
    paths, problems = {k: run_dir / RUN_DIR_EXPORTS[k] for k in kinds}, []
    for kind, path in paths.items():
        try:
            _check_destination(path, kind)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return paths


def _remove_stale(path: Path, kind: str, why: str) -> None:
    """A form the save cell skips this time: an earlier export of it at path (and only one of ours) would sit
    beside this run's files looking current, so it is removed, with one line saying so."""
    if os.path.lexists(path) and _is_export(path, kind):
        _remove(path)
        print(f"removed {path}, an earlier run's export: {why}")
