"""Finding local data: a file, a folder (links followed, loops guarded) or a glob, and the cache key's fingerprint.

Also how `datasets` reads a local path: as it is, through a plain-named link (_plain_alias), quietly and without
a network request (_local_builder)."""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from .config import STDLIB_CORPUS
from .errors import ConfigError

# local file suffix -> the `datasets` packaged builder that reads it, and its config (data._file_records adds the
# encoding); a .txt file is read a line at a time and grouped into documents as it streams (data._text_documents)
LOCAL_FORMATS = {
    ".txt": ("text", {"sample_by": "line"}),
    ".md": ("text", {"sample_by": "document"}),  # a whole file is one document
    ".py": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),  # JSON Lines, or one JSON array of objects
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".parquet": ("parquet", {}),
}


_DOCUMENT_SUFFIXES = (".py", ".md")  # source files: an empty one (an empty __init__.py) is normal, not an error


class LocalFiles(NamedTuple):
    """What a local source holds: files to read (in reading order), files ignored (no supported suffix), paths
    left out with the reason ([path, why]: a link loop, a second way to the same file or folder, a broken
    link), and the links followed ([path, where it leads])."""

    files: list
    ignored: list
    left_out: list
    links: list


def _is_saved_dataset(path) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """The stdlib corpus's files, sorted: listed once a process (a walk of the stdlib takes 0.5-1 s, and the
    installed stdlib does not change while Python runs)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(str(p) for p in root.rglob("*.py")
                        if "site-packages" not in p.parts and "dist-packages" not in p.parts))


def is_local_dataset(source: str) -> bool:
    """True for the stdlib corpus and for an existing local file, folder or glob; False for a Hub id. An
    existing path is taken literally, whatever glob characters ([, ], *, ?) its name holds."""
    path = os.path.expanduser(source)
    return source == STDLIB_CORPUS or os.path.exists(path) or bool(globlib.glob(path, recursive=True))


def _walk(root: Path, left_out: list, links: list) -> list[str]:
    """Every non-hidden file under root, following links to files and folders. A folder or file reached a second
    time (a link loop, a link to a folder above root, two links to one place) is read once: the other ways in
    go to left_out with the reason, as do broken links and what is not a regular file."""
    root_real = os.path.realpath(root)
    seen_dirs, seen_files, out = {root_real: str(root)}, {}, []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames.sort()  # a fixed walk: which of two ways into one folder is read does not depend on the disk
        for d in list(dirnames):
            full, real = here / d, os.path.realpath(here / d)
            if d.startswith("."):
                dirnames.remove(d)
            elif real in seen_dirs or os.path.commonpath([root_real, real]) == real:  # seen, or above root
                dirnames.remove(d)
                why = (f"a link to {seen_dirs[real]}, read once" if real in seen_dirs and real != root_real else
                       "a link loop: it leads back to a folder above it")
                left_out.append([str(full), why])
            else:
                seen_dirs[real] = str(full)
                if full.is_symlink():
                    links.append([str(full), real])
        for f in filenames:
            full = here / f
            if f.startswith("."):
                continue
            if _admit(full, seen_files, left_out, links):
                out.append(str(full))
    return sorted(out)


def _admit(path: Path, seen: dict, left_out: list, links: list) -> bool:
    """Whether a found file is read: a regular file (through links) not already read under another name. What is not
    read goes to left_out with the reason; a link that is read goes to links with its target. seen: real path ->
    the first name it was read under."""
    if not path.is_file():
        left_out.append([str(path), "a broken link" if path.is_symlink() else "not a regular file"])
        return False
    real = os.path.realpath(path)
    if real in seen:
        left_out.append([str(path), f"the same file as {seen[real]}, read once"])
        return False
    seen[real] = str(path)
    if path.is_symlink():
        links.append([str(path), real])
    return True


def _glob(pattern: str, left_out: list, links: list) -> list[str]:
    """The non-hidden files a glob matches, each real file once (glob's ** follows links, loops included)."""
    seen, out = {}, []
    for p in sorted(map(Path, globlib.glob(pattern, recursive=True))):
        if any(part.startswith(".") for part in p.parts) or p.is_dir():
            continue
        if _admit(p, seen, left_out, links):
            out.append(str(p))
    return out


def local_data_files(source: str) -> LocalFiles:
    """The files of a local source, in reading order (sorted; the stdlib unshuffled), and what was left out.

    An existing path is literal: a file or folder whose name holds glob characters is that file or folder. A
    folder is walked with its links followed (_walk: each real file once, loops guarded); a glob is expanded by
    glob.glob. A file must have a supported suffix (LOCAL_FORMATS); a folder or glob skips the others, listed as
    ignored. Hidden files and folders are left out. A folder written by save_to_disk is one entry.
    Raises ConfigError for an unsupported single file, a folder or glob with no supported file, and an empty
    data file (an empty .py/.md is read, and skipped as too short).
    """
    if source == STDLIB_CORPUS:
        return LocalFiles(list(_stdlib_files()), [], [], [])
    path = os.path.expanduser(source)
    supported = ", ".join(LOCAL_FORMATS)
    left_out, links = [], []
    if os.path.isfile(path):
        if Path(path).suffix.lower() not in LOCAL_FORMATS:
            raise ConfigError(f"{path}: unsupported suffix {Path(path).suffix or '(none)'!r}. DATASET takes "
                              f"{supported} files, a folder or glob of them, or a folder written by "
                              "Dataset.save_to_disk")
        candidates = [path]
    elif os.path.isdir(path) and _is_saved_dataset(path):
        return LocalFiles([path], [], [], [])
    elif os.path.isdir(path):
        candidates = _walk(Path(path), left_out, links)
    else:
        candidates = _glob(path, left_out, links)
    files = [f for f in candidates if Path(f).suffix.lower() in LOCAL_FORMATS]
    ignored = [f for f in candidates if f not in set(files)]
    if not files:
        suffixes = sorted({Path(f).suffix or "(none)" for f in ignored})
        raise ConfigError(f"{source} holds no {supported} file" + (f" (it has {', '.join(suffixes)})" if suffixes else
                          " (it is empty)") + ": point DATASET at your data files")
    empty = [f for f in files if os.path.getsize(f) == 0 and Path(f).suffix.lower() not in _DOCUMENT_SUFFIXES]
    if empty and os.path.isfile(path):  # the one file DATASET names
        raise ConfigError(f"{empty[0]} is empty: fill it, or point DATASET at another file")
    files = [f for f in files if f not in set(empty)]  # in a folder or glob an empty data file is passed over
    if not files:
        raise ConfigError(f"{source} holds only empty data files ({', '.join(empty[:3])}): fill them, or point "
                          "DATASET at your data")
    return LocalFiles(files, ignored, left_out, links)


def data_fingerprint(source: str) -> dict | None:
    """What the local files of a dataset hold, for the Phase 1 cache key: {"files": n, "bytes": total size,
    "digest": hash of every file's path, size and modification time (ns)}, with "listing" {path: [size,
    mtime_ns]} for saying what changed. A file read through a link, its own or a folder's on its path (DATASET
    itself a link, data/current -> v1), is stat'ed at its target, and the resolved target is listed too ([size,
    mtime_ns, real path]), so the key covers whatever is read: re-pointing a link to a folder of files with the
    same names, sizes and times changes it. Editing, adding or removing a file (or a link) changes the digest. None for a Hub dataset. Raises ConfigError as local_data_files does."""
    if not is_local_dataset(source):
        return None
    found = local_data_files(source)
    files = found.files
    if len(files) == 1 and os.path.isdir(files[0]):  # save_to_disk folder: every file in it
        files = sorted(str(p) for p in Path(files[0]).rglob("*") if p.is_file())
    listing = {}
    for f in files:
        st, real = os.stat(f), os.path.realpath(f)
        listing[f] = [st.st_size, st.st_mtime_ns] + ([real] if real != os.path.abspath(f) else [])
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    return {"files": len(listing), "bytes": sum(v[0] for v in listing.values()), "digest": digest, "listing": listing}


_PLAIN = re.compile(r"[A-Za-z0-9_.\-/ ]+")  # a path fsspec reads as it is: no ::, no protocol: prefix, no ~


def _plain_alias(path: str, work_dir: str) -> str:
    """A name for an existing local file or folder that `datasets` reads as the path it is. `datasets` hands
    data_files and load_from_disk paths to fsspec, which interprets parts of a local name: `::` chains URLs
    (p::q.txt, zip::x.txt, a folder corpus::v2/), a leading `name:` is a protocol (file:x.txt), and [, ], *, ?
    glob. So the path is never handed over: a link to it, with a plain name (hex digits and its suffix), is made
    in work_dir (a folder with a plain name, see _plain_work_dir) and that is read; errors still name the path.
    Where no link can be made (a file system without them), the glob-escaped path is the fallback."""
    real = os.path.abspath(path)
    alias = os.path.join(work_dir, "data-" + hashlib.blake2b(real.encode("utf-8", "surrogatepass"), digest_size=8)
                         .hexdigest() + Path(path).suffix.lower())
    if not os.path.lexists(alias):
        try:
            os.symlink(real, alias, target_is_directory=os.path.isdir(real))
        except OSError:
            return globlib.escape(path)
    return alias


def _plain_work_dir(work_dir: str | None) -> str | None:
    """work_dir (CACHE_DIR, where the builders' lock files go) when fsspec reads its path as it is (_PLAIN),
    else None: the system's temporary folder."""
    return work_dir if work_dir and _PLAIN.fullmatch(os.path.abspath(work_dir)) else None


@contextlib.contextmanager
def _local_builder():
    """Around a builder reading a local file: its error log lines silenced (we raise one ConfigError), and no
    download-count HEAD request to the Hub per load_dataset call (datasets' own switch; 20 s of Phase 1 for the
    stdlib corpus's 163 files online, for nothing: the files are local)."""
    import logging
    from unittest import mock

    import datasets

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False):
            yield
    finally:
        logger.setLevel(level)
