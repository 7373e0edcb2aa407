"""The Phase 1 teacher cache on disk: its key, its manifest, and reading states through pread."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import shutil
import socket
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

from .losses import _frozen_teacher_head, mean_ce

CACHE_VERSION = 1


CACHE_FILES = ("train_tokens.npy", "train_states.npy", "val_tokens.npy", "val_states.npy", "train_mean.npy",
               "teacher_head.safetensors")


class TeacherCache:
    """A finished Phase 1 cache folder. States stay on disk; batches are read with pread, so neither the
    Python heap nor the process's mapped pages grow with the number of cached samples.

    Every file is opened once, here, through one descriptor of the folder: the manifest, tokens and mean are read
    into memory, and the states and the teacher head are read later through descriptors kept open. A cache is
    never rewritten in place (a rebuild is renamed over it: publish), so a cache opened here keeps reading the
    files it opened, consistent with its manifest, even after another run replaces the folder (on Linux and
    macOS an open file outlives its name). `name` is the path to report as .path (publish opens a build before
    renaming it). Raises OSError or ValueError when the folder is missing or not a finished cache.
    """

    def __init__(self, path, name=None):
        self.path = Path(name if name is not None else path)
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # the folder as it is now, whatever renames follow
        self._fds = {}
        self._finalizer = weakref.finalize(self, _close_all, self._fds)  # closes them once: close() or collection
        try:
            raw = {f: _read(f, folder) for f in ("manifest.json", "train_tokens.npy", "val_tokens.npy",
                                                 "train_mean.npy")}
            for f in ("train_states.npy", "val_states.npy", "teacher_head.safetensors"):
                self._fds[f] = os.open(f, os.O_RDONLY, dir_fd=folder)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(folder)
        self._small = {f: (len(b), _digest(b)) for f, b in raw.items()}  # what matches() checks, read once
        self.manifest = json.loads(raw["manifest.json"])
        self.train_tokens = np.load(io.BytesIO(raw["train_tokens.npy"]))  # (N, T) int32, small
        self.val_tokens = np.load(io.BytesIO(raw["val_tokens.npy"]))  # (M, T) int32
        self.train_mean = np.load(io.BytesIO(raw["train_mean.npy"]))  # (D,) float32: the constant baseline
        self.num_train, self.seq_len = self.train_tokens.shape
        self.num_val = len(self.val_tokens)
        self.teacher_dim = self.manifest["teacher_dim"]
        self.vocab_size = self.manifest["vocab_size"]
        self._offsets = {s: self.manifest["files"][f"{s}_states.npy"]["data_offset"] for s in ("train", "val")}
        self._teacher_ce = None

    def close(self) -> None:
        """Close the files this cache holds open (also done when it is garbage-collected); it reads no more."""
        self._finalizer()

    @property
    def content_digest(self) -> str:
        """A digest of what the cache holds: its files' digests from the manifest (blake2b). Two caches hold the
        same blocks and states exactly when their digests agree, whatever folder they sit in; a checkpoint records
        it, so one made from other data (a cache rebuilt in the same folder) is never taken for this one."""
        files = {k: v["blake2b"] for k, v in sorted(self.manifest["files"].items())}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]

    def matches(self, request: dict) -> bool:
        """Whether this cache answers `request` and every file is whole: its manifest's request, and each file's
        size and blake2b digest as the manifest lists them (read through the descriptors opened at __init__)."""
        try:
            if self.manifest.get("request") != request or set(self.manifest["files"]) != set(CACHE_FILES):
                return False
            for name, meta in self.manifest["files"].items():
                if name in self._small:
                    size, digest = self._small[name]
                else:
                    size = os.fstat(self._fds[name]).st_size
                    h = hashlib.blake2b(digest_size=16)
                    for at in range(0, size, 1 << 22):
                        h.update(_pread(self._fds[name], min(1 << 22, size - at), at))
                    digest = h.hexdigest()
                if size != meta["bytes"] or digest != meta["blake2b"]:
                    return False
            return True
        except (OSError, KeyError, TypeError):
            return False

    def states(self, split: str, idx) -> torch.Tensor:
        """Teacher states for the given block indices: (len(idx), T, D) float32."""
        T, D = self.seq_len, self.teacher_dim
        row = T * D * 2  # float16
        out = np.empty((len(idx), T, D), dtype=np.float16)
        fd = self._fds[f"{split}_states.npy"]
        for j, i in enumerate(np.asarray(idx).tolist()):
            buf = os.pread(fd, row, self._offsets[split] + i * row)
            out[j] = np.frombuffer(buf, dtype=np.float16).reshape(T, D)
        return torch.from_numpy(out).float()

    def tokens(self, split: str, idx) -> torch.Tensor:
        tokens = self.train_tokens if split == "train" else self.val_tokens
        return torch.from_numpy(tokens[np.asarray(idx)].astype(np.int64))

    def teacher_head(self) -> torch.Tensor:
        from safetensors.torch import load

        fd = self._fds["teacher_head.safetensors"]
        return load(_pread(fd, os.fstat(fd).st_size, 0))["weight"].float()  # (V, D)

    def teacher_ce(self, device="cpu", batch_size: int = 16) -> float:
        """The teacher's held-out next-token CE, nats/token: its head over its cached (float16) states, float32.
        It depends on the cache alone, so it is computed once per TeacherCache (evaluate runs once per ablation
        arm, and each pass is a (M * T, D) x (D, V) product in float32)."""
        if self._teacher_ce is None:
            head = _frozen_teacher_head(self, device)
            tokens = self.tokens("val", np.arange(self.num_val)).to(device)
            self._teacher_ce = mean_ce(lambda i, j: self.states("val", np.arange(i, j)).to(device), tokens, head,
                                       batch_size)
        return self._teacher_ce


def cache_request(teacher: str, dataset: str, num_samples: int, val_samples: int, seq_len: int,
                  seed: int = 0, text_field: str = "auto", data_files: dict | None = None,
                  teacher_dtype: torch.dtype = torch.float32, encoding: str = "utf-8") -> dict:
    """What a Phase 1 cache is keyed by. data_files: data_fingerprint(dataset) for local data (its listing is
    left out), so editing a local file makes a different request; None for a Hub dataset. teacher_dtype: what
    the teacher computes in (precision_policy's teacher dtype); a teacher run in bf16 or fp16 gives a different
    cache from the float32 one (whose key is as it was before the setting existed, so those caches stay valid).
    encoding: ENCODING, the local files' text encoding, by its codec's own name (codecs.lookup(...).name: the same
    data under 'UTF-8', 'utf8' or 'utf_8' is one cache, 'latin-1' and 'ISO-8859-1' another); like the dtype,
    only a codec other than UTF-8 enters the key."""
    request = {"version": CACHE_VERSION, "teacher": teacher, "dataset": dataset, "num_samples": num_samples,
               "val_samples": val_samples, "seq_len": seq_len, "seed": seed, "layers": "last (final-normed)",
               "dtype": "float16", "text_field": text_field,
               "data_files": {k: v for k, v in data_files.items() if k != "listing"} if data_files else None}
    if teacher_dtype != torch.float32:
        request["teacher_dtype"] = str(teacher_dtype).replace("torch.", "")
    encoding = codecs.lookup(encoding).name  # one name per codec: 'UTF-8', 'utf8' and 'utf_8' are 'utf-8'
    if encoding != "utf-8":
        request["encoding"] = encoding
    return request


def cache_folder(cache_dir, request: dict) -> Path:
    """The folder of a request. The local files' fingerprint is left out of the name, so a cache built from
    files since edited sits in the same folder: it is rebuilt there, and data_change says why."""
    key = hashlib.sha256(json.dumps({k: v for k, v in request.items() if k != "data_files"},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / key


def data_change(folder: Path, request: dict, fingerprint: dict | None) -> str | None:
    """Why the cache in folder no longer matches its local data, e.g. "corpus/a.txt modified, corpus/b.txt
    added", or None when the data did not change (or there is no finished cache there)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        old_request, old = manifest["request"], manifest["data_listing"]
    except (OSError, ValueError, KeyError, TypeError):  # no finished cache, or one from before data listings
        return None
    if fingerprint is None or old_request.get("data_files") == request["data_files"]:
        return None
    new = fingerprint["listing"]
    changes = [f"{f} modified" for f in new if f in old and old[f] != new[f]]
    changes += [f"{f} added" for f in new if f not in old] + [f"{f} removed" for f in old if f not in new]
    if not changes:
        return "the local data changed"
    return f"{len(changes)} local file(s) changed: " + ", ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")


def open_cache(folder, request: dict) -> TeacherCache | None:
    """The finished cache in folder when it answers `request` with every file whole (TeacherCache.matches), opened
    once so that what was checked is what is read; else None (missing, partial, corrupt, or another request)."""
    try:
        cache = TeacherCache(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cache.matches(request):
        return cache
    cache.close()
    return None


def open_shared_cache(folder, request: dict, ranks) -> TeacherCache | None:
    """open_cache for the processes of one run (ranks, a spoonfeed.parallel.World): the main process checks every
    file, and the others open the cache it found without reading it all again; each gets its own TeacherCache, or
    every one None. One process: open_cache. Raises RuntimeError when the folder changed in between (another run
    published a cache there meanwhile): rerun."""
    if not ranks.parallel:
        return open_cache(folder, request)
    cache = open_cache(folder, request) if ranks.is_main_process else None
    digest = ranks.on_main(lambda: None if cache is None else cache.content_digest)
    if digest is None or ranks.is_main_process:
        return cache
    cache = TeacherCache(folder)
    if cache.content_digest != digest:
        raise RuntimeError(f"the cache in {folder} changed while this run's processes opened it (another run "
                           "published a new one there): rerun")
    return cache


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()  # as files._file_digest computes it for the manifest


def _pread(fd: int, size: int, offset: int) -> bytes:
    """size bytes at offset (os.pread may return less, e.g. past 2 GiB on Linux)."""
    parts = []
    while size > 0:
        part = os.pread(fd, size, offset)
        if not part:
            raise OSError(f"the cache file ends {size} bytes early")
        parts.append(part)
        size, offset = size - len(part), offset + len(part)
    return b"".join(parts)


def _read(name: str, folder_fd: int) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass
    return True


def begin_build(folder: Path) -> Path:
    """Where a new cache for `folder` is written: a hidden folder beside it, named for this host and process
    (.KEY.build-HOST-PID), made empty. A finished cache is never rewritten in place; publish renames the build
    over it. Left-overs are removed first: an earlier build of this process, builds of this host's processes
    that no longer run (killed half-way), and caches a publish set aside."""
    host, parent = socket.gethostname(), Path(folder).parent
    parent.mkdir(parents=True, exist_ok=True)
    for p in parent.glob(f".{folder.name}.*"):
        kind, _, owner = p.name[len(folder.name) + 2:].partition("-")
        pid = owner.rpartition("-")[2]
        stale = kind == "old" or (kind == "build" and owner.startswith(f"{host}-") and pid.isdigit()
                                  and (int(pid) == os.getpid() or not _pid_alive(int(pid))))
        if stale:
            shutil.rmtree(p, ignore_errors=True)
    build = folder.with_name(f".{folder.name}.build-{host}-{os.getpid()}")
    build.mkdir()
    return build


def publish(build: Path, folder: Path) -> TeacherCache:
    """Put a finished build in place as `folder`, whole: the build is opened first (so the cache returned reads
    this build's files, whatever happens to the folder next), then the cache in folder, if any, is renamed
    aside and the build renamed to folder, and what was set aside is deleted. A run reading the old cache keeps
    its open files. If another run publishes between the two renames, this one tries again, so the last to
    finish is in place and no build is lost half-way."""
    cache = TeacherCache(build, name=folder)
    for _ in range(20):
        aside = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.replace(folder, aside)
        except FileNotFoundError:
            aside = None
        try:
            os.replace(build, folder)
        except OSError:  # another run put its cache there between the two renames: set that aside too
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            continue
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return cache
    raise RuntimeError(f"could not put the new cache in place as {folder}: other runs kept replacing it")
