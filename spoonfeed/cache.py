"""The Phase 1 teacher cache on disk: its key, its manifest, and reading states through pread."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .files import _file_digest
from .losses import _frozen_teacher_head, mean_ce

CACHE_VERSION = 1


CACHE_FILES = ("train_tokens.npy", "train_states.npy", "val_tokens.npy", "val_states.npy", "train_mean.npy",
               "teacher_head.safetensors")


class TeacherCache:
    """A finished Phase 1 cache folder. States stay on disk; batches are read with pread, so neither the
    Python heap nor the process's mapped pages grow with the number of cached samples."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.train_tokens = np.load(self.path / "train_tokens.npy")  # (N, T) int32, small
        self.val_tokens = np.load(self.path / "val_tokens.npy")  # (M, T) int32
        self.train_mean = np.load(self.path / "train_mean.npy")  # (D,) float32: the constant baseline
        self.num_train, self.seq_len = self.train_tokens.shape
        self.num_val = len(self.val_tokens)
        self.teacher_dim = self.manifest["teacher_dim"]
        self.vocab_size = self.manifest["vocab_size"]
        self._offsets = {s: self.manifest["files"][f"{s}_states.npy"]["data_offset"] for s in ("train", "val")}
        self._teacher_ce = None

    def states(self, split: str, idx) -> torch.Tensor:
        """Teacher states for the given block indices: (len(idx), T, D) float32."""
        T, D = self.seq_len, self.teacher_dim
        row = T * D * 2  # float16
        out = np.empty((len(idx), T, D), dtype=np.float16)
        fd = os.open(self.path / f"{split}_states.npy", os.O_RDONLY)
        try:
            for j, i in enumerate(np.asarray(idx).tolist()):
                buf = os.pread(fd, row, self._offsets[split] + i * row)
                out[j] = np.frombuffer(buf, dtype=np.float16).reshape(T, D)
        finally:
            os.close(fd)
        return torch.from_numpy(out).float()

    def tokens(self, split: str, idx) -> torch.Tensor:
        tokens = self.train_tokens if split == "train" else self.val_tokens
        return torch.from_numpy(tokens[np.asarray(idx)].astype(np.int64))

    def teacher_head(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self.path / "teacher_head.safetensors")["weight"].float()  # (V, D)

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
    encoding: ENCODING, the local files' text encoding; like the dtype, only a value other than the default
    enters the key."""
    request = {"version": CACHE_VERSION, "teacher": teacher, "dataset": dataset, "num_samples": num_samples,
               "val_samples": val_samples, "seq_len": seq_len, "seed": seed, "layers": "last (final-normed)",
               "dtype": "float16", "text_field": text_field,
               "data_files": {k: v for k, v in data_files.items() if k != "listing"} if data_files else None}
    if teacher_dtype != torch.float32:
        request["teacher_dtype"] = str(teacher_dtype).replace("torch.", "")
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


def _valid_cache(folder: Path, request: dict) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("request") != request:
            return False
        for name, meta in manifest["files"].items():
            p = folder / name
            if p.stat().st_size != meta["bytes"] or _file_digest(p) != meta["blake2b"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
