"""Phase checkpoints: atomic saves, signatures, moving aside what does not match, and bit-exact resume.

A phase's checkpoint is <run_dir>/checkpoints/<phase>.pt; the previous good one is kept as <phase>.prev.pt.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from .errors import NonFiniteLossError, in_notebook
from .files import _replacing, check_free_space, run_path
from .optim import non_finite


def weights_digest(model: torch.nn.Module, skip: tuple = ()) -> str:
    """sha256 (hex) of every tensor in model.state_dict() whose name does not start with one of `skip`, name by name
    in sorted order, over the tensors' bytes whatever their dtype: two models with the same digest hold the same
    weights bit for bit. About 0.1 s for the cpu preset's 30M float32 weights (about 1 GB/s, plus the copy to the
    CPU for a model elsewhere). Checkpoint signatures name the student they continue by it."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not name.startswith(tuple(skip)):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # its bytes, not copied
    return h.hexdigest()


def _ckpt_paths(run_dir, phase: str):
    """(<run_dir>/checkpoints/<phase>.pt, its .prev.pt), as listed in RUN_DIR_LAYOUT (KeyError for an unlisted
    phase: add it to CHECKPOINT_PHASES)."""
    return run_path(run_dir, f"checkpoints/{phase}.pt"), run_path(run_dir, f"checkpoints/{phase}.prev.pt")


def _non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors in a checkpoint's weights and optimiser state that hold NaN or inf."""
    bad = non_finite(state.get("model", {}), "model.")
    for pid, slots in (state.get("optimizer") or {}).get("state", {}).items():
        bad += non_finite(slots, f"optimizer.state[{pid}].")
    return bad


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(run_dir, phase: str, state: dict):
    """Atomic: written to a temp file, fsynced, then renamed; the last good one becomes .prev.

    Refused, with the files on disk untouched, when a weight or optimiser tensor is not finite
    (NonFiniteLossError) or when the folder lacks room for the file (ConfigError naming RUN_DIR)."""
    path, prev = _ckpt_paths(run_dir, phase)
    bad = _non_finite(state)
    if bad:
        raise NonFiniteLossError(f"refusing to save the {phase} checkpoint: non-finite values in {bad[:3]}"
                                 f"{' and more' if len(bad) > 3 else ''}; the last good checkpoint {path} is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, _tensor_bytes(state) + 2**20, f"the {phase} checkpoint needs",
                     "free some space or point RUN_DIR at a bigger disk, then " + in_notebook(
                         "rerun the cell", "rerun the command") + " (it resumes from the last good checkpoint)",
                     unit="MiB")
    with _replacing(path, keep=prev) as tmp:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def _set_aside(path: Path, phase: str, tag: str) -> Path:
    """Move a checkpoint out of the way under a name no later save reuses: moved, never deleted."""
    aside, n = path.with_name(f"{phase}.{tag}.pt"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{phase}.{tag}-{n}.pt")
    os.replace(path, aside)
    return aside


# Settings a phase's signature leaves out at their default, so that checkpoints written before the setting
# existed still resume: float32 (PRECISION) and the dense embedding update (EMBEDDING_UPDATE).
SIGNATURE_DEFAULTS = {"precision": "fp32", "embedding_update": "dense"}


def _signature_changes(old, new) -> str:
    """What differs between two signatures, as 'name old -> new' items."""
    if not isinstance(old, dict):
        return "no signature"
    names = {"phase2_student": "the Phase 2 student it decodes",
             "cache": "the teacher cache it was trained on (Phase 1 rebuilt it: other data or settings)"}
    old, new = dict(old), dict(new)
    for k, default in SIGNATURE_DEFAULTS.items():  # a signature leaves these out at their default (_signature)
        if k in old or k in new:
            old.setdefault(k, default)
            new.setdefault(k, default)
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(names[k] if k in names else
                       f"{k} {old.get(k)!r} -> {new.get(k)!r}" if not isinstance(new.get(k), dict) else k)
    return ", ".join(out)


def load_checkpoint(run_dir, phase: str, signature: dict, weights: dict | None = None, set_aside: bool = True):
    """The newest good checkpoint of this phase whose signature matches, or None.

    The newest file is tried first, then the previous one (.prev). A file that is corrupt or partial, holds
    non-finite weights or optimiser state, or does not hold exactly `weights` (name -> shape; another version
    wrote it) is named in a warning, and resume falls back to the previous one, naming both files. A file made
    with other settings is named with what changed. Each of them is moved aside (renamed, never deleted) unless
    set_aside=False (a read-only look).
    """
    bad = None  # the newest file that could not be used, and why
    for path in _ckpt_paths(run_dir, phase):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            problem, tag = None, None
        except Exception as e:  # truncated zip, bad pickle frame, ...: all mean "unreadable"
            state, problem, tag = None, f"is corrupt or partial ({type(e).__name__})", "corrupt"
        if state is not None and state.get("signature") != signature:
            change = _signature_changes(state.get("signature"), signature)
            if set_aside:
                aside = _set_aside(path, phase, "other-settings")
                print(f"{path} was made with other settings ({change}): moved it to {aside.name}")
            continue
        if state is not None and weights is not None and (
                set(state.get("model", {})) != set(weights)
                or any(tuple(v.shape) != tuple(weights[k]) for k, v in state["model"].items())):
            problem, tag = "does not hold this phase's weights for this student (another version wrote it)", "other-version"
        elif state is not None and _non_finite(state):
            problem, tag = f"holds non-finite values in {_non_finite(state)[:3]}", "non-finite"
        if problem:
            aside = _set_aside(path, phase, tag) if set_aside else path
            moved = f" (moved to {aside.name})" if set_aside else ""
            warnings.warn(f"checkpoint {path} {problem}{moved}; trying the previous one")
            bad = bad or (path, moved)
            continue
        if bad:
            warnings.warn(f"{phase}: the newest checkpoint {bad[0]} could not be used{bad[1]}; resuming from the "
                          f"previous good one, {path} (step {state.get('step')})")
        return state
    return None


def _resume(state, model, opt, sched, gen, names=None, scaler=None) -> bool:
    """Restore a checkpoint into the live objects: only the weights it holds (load_checkpoint has checked that
    they are this phase's), the optimiser, the schedule, the GradScaler (fp16) and the random state."""
    if state is None:
        return False
    current = model.state_dict()
    saved = state["model"]
    if (set(saved) != set(names if names is not None else current)
            or any(saved[k].shape != current[k].shape for k in saved)):
        warnings.warn("the checkpoint does not fit this student (another version wrote it): starting afresh")
        return False
    with torch.no_grad():
        for k, v in saved.items():
            current[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):  # fp16: the loss scale and its growth tracker
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(gen, state["rng"])
    return True


def _checkpoint_due(cfg, done: int, steps: int) -> bool:
    """Whether a phase saves after `done` of its `steps` steps: every cfg.ckpt_every steps and at the last (0: never)."""
    return bool(cfg.ckpt_every) and (done % cfg.ckpt_every == 0 or done == steps)


def _checkpoint_every(cfg, phase, done, steps, signature, model, opt, sched, gen, history, names=None, scaler=None):
    """Save the training state every cfg.ckpt_every steps and at the end: the weights this phase trains
    (names), never the frozen ones, with the optimiser, schedule, GradScaler (fp16) and random state."""
    if _checkpoint_due(cfg, done, steps):
        weights = {k: v for k, v in model.state_dict().items() if names is None or k in names}
        save_checkpoint(cfg.run_dir, phase, {
            "signature": signature, "step": done, "model": weights, "history": history,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(gen),
            "scaler": scaler.state_dict() if scaler is not None else None})


def _rng_state(gen: torch.Generator) -> dict:
    return {"batch": gen.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(gen: torch.Generator, state: dict):
    gen.set_state(state["batch"])
    torch.set_rng_state(state["torch"])
