"""The optimiser step: AdamW, the LR schedule, gradient clipping, and the fault guard that names a non-finite step's cause."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NonFiniteGradientError, NonFiniteLossError, NonFiniteTargetError
from .parallel import world


def lr_schedule(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base LR: linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


MAX_SKIPPED_STEPS = 3  # non-finite gradients (finite loss, no fp16 GradScaler) this many steps in a row stop training


LR_BLOWUP = 100.0  # the largest |weight| grown this many times since the phase started: a too-high LR did it


def _largest(params) -> float:
    return max((p.detach().abs().max().item() for p in params if p.numel()), default=0.0)


class _FaultGuard:
    """Watches a training loop's losses and optimizer_step's verdicts, and names the cause when they go non-finite.

    - A non-finite loss raises at once. A finite loss whose gradient is not finite skips the step (optimizer_step
      already kept it from opt.step()); the step is named, and MAX_SKIPPED_STEPS in a row raise. With an enabled
      fp16 GradScaler a skipped step is the scaler's normal overflow handling and is only counted.
    - The cause, told apart for the message: a non-finite teacher target in the batch (NonFiniteTargetError);
      weights grown LR_BLOWUP times or more since the phase started, what a too-high learning rate does
      (NonFiniteLossError naming lr_fix); else a non-finite gradient from a finite loss (NonFiniteGradientError)
      or a forward overflow with weights of normal size (NonFiniteLossError), neither of which a lower LR fixes.
    Skipped steps are appended to `skipped` (the history's list). Nothing non-finite reaches a checkpoint:
    save_checkpoint refuses it.
    """

    def __init__(self, phase: str, params, lr_fix: str, run_dir, cache_path=None, skipped=None, scaler=None):
        self.phase, self.params, self.lr_fix, self.cache_path = phase, list(params), lr_fix, cache_path
        self.kept = f"The last good checkpoint in {Path(run_dir) / 'checkpoints'} is kept, and rerunning the cell " \
                    "resumes from it"
        self.skipped = skipped if skipped is not None else []
        self.scaler, self.run, self.start = scaler, 0, _largest(self.params)

    def check_loss(self, step: int, loss: torch.Tensor, target=None):
        if not torch.isfinite(loss):
            raise self._error(step, f"{self.phase} loss is {loss.item()} at step {step}", target)

    def after_step(self, step: int, loss: torch.Tensor, stepped: bool, target=None):
        if stepped:
            self.run = 0
            return
        self.skipped.append(step)
        if self.scaler is not None and self.scaler.is_enabled():
            return
        self.run += 1
        print(f"{self.phase} step {step}: the loss was finite ({loss.item():.4g}) but its gradient was not; the step "
              "was skipped (weights and optimiser state unchanged)")
        if self.run >= MAX_SKIPPED_STEPS:
            raise self._error(step, f"{self.phase} stopped at step {step}: the loss was finite but its gradient was "
                              f"not, {self.run} steps in a row (steps {self.skipped[-self.run:]})", target, grad=True)

    def _error(self, step, what, target, grad=False) -> NonFiniteLossError:
        # every process comes here at the same step (its loss and its verdict are the processes' own, averaged), so
        # the count is summed over them all: each names the same cause, whichever process drew the bad targets
        n = int(world().sum(0 if target is None else int((~torch.isfinite(target)).sum())))
        if target is not None and n:
            return NonFiniteTargetError(
                f"{what}, because the teacher targets of this batch hold {n} non-finite values: the cache (or the "
                f"teacher that wrote it) is at fault, not the learning rate. Rebuild the cache (delete "
                f"{self.cache_path} and rerun cell 3); if the teacher gives NaN again, pick another TEACHER_MODEL. "
                f"{self.kept}")
        now = _largest(self.params)
        grown = f"the largest |weight| went from {self.start:.3g} at the start of the phase to {now:.3g}"
        if not math.isfinite(now) or now >= LR_BLOWUP * max(self.start, 1e-12):
            return NonFiniteLossError(f"{what}, with finite teacher targets, after {grown}: a learning rate too "
                                      f"high for this run. {self.lr_fix} and rerun. {self.kept}")
        if grad:
            return NonFiniteGradientError(
                f"{what}. Those steps changed nothing, and no checkpoint holds a non-finite value. This is not a "
                f"learning-rate problem ({grown}, and the loss was finite): the backward pass itself produced NaN/inf, "
                f"e.g. an overflow in a custom loss or a gradient hook. {self.kept}; if it stops at the same step "
                "again, another SEED takes other batches")
        return NonFiniteLossError(f"{what}, with finite teacher targets and weights of normal size ({grown}): the "
                                  "forward pass overflowed, which a lower learning rate is unlikely to fix (on a GPU, "
                                  f"fp16 autocast can do this). {self.kept}")


def _adamw(params, lr, weight_decay, embedding=None, embed_lr_mult: float = 1.0):
    """AdamW; the embedding weight, when it is among params, gets lr * embed_lr_mult in a group of its own.

    Each embedding row moves only when its token occurs, so at the body's LR most rows hardly leave their
    small random start, and the token's identity is drowned in the residual stream. A much larger LR there
    lets rare tokens move too (held-out results in docs/results.md, 'Tuning: what worked').
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one fused kernel instead of many small ops
    groups = [{"params": [p for p in params if p is not embedding]}]
    if any(p is embedding for p in params):
        groups.append({"params": [embedding], "lr": lr * embed_lr_mult})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused)


def optimizer_step(loss: torch.Tensor, opt, params, grad_clip: float, scaler=None) -> bool:
    """One optimiser update from a scalar loss; every training loop (Phases 2 and 3, the ablation) goes through it.

    zero_grad -> backward (scaled when a GradScaler is given) -> under `accelerate launch`, the gradients averaged
    over the processes (World.average_gradients), so that every process takes the same step -> unscale -> clip the
    global grad norm over `params` to `grad_clip` -> step. Returns True when the step was taken. When the gradient
    norm is not finite, opt.step() is never reached: the gradients are dropped and False is returned, so the caller can
    name the cause. With an enabled fp16 GradScaler an overflow is the scaler's business (it skips the step and
    lowers its scale); that also returns False.
    """
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        world().average_gradients(params)
        scaler.unscale_(opt)
    else:
        loss.backward()
        world().average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the total norm before clipping
    finite = bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.step(opt)  # skips opt.step() by itself when unscale_ found inf/NaN
        scaler.update()
    elif finite:
        opt.step()
    if not finite:
        opt.zero_grad(set_to_none=True)
    return finite


def _free_training_state(model: nn.Module, opt) -> None:
    """End of a phase: drop every gradient and the optimizer's state (AdamW's two moments), and give the
    memory back to CUDA, so the next phase (or the ablation) starts from the weights alone."""
    model.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    _release_memory()


def non_finite(tensors: dict, prefix: str = "") -> list[str]:
    """Names (prefix + key) of the floating-point tensors among tensors.values() that hold NaN or inf."""
    return [f"{prefix}{k}" for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def _check_finite(model: nn.Module):
    """Raises NonFiniteLossError, before anything is written, when a weight of model holds NaN or inf."""
    bad = non_finite(model.state_dict())
    if bad:
        raise NonFiniteLossError(f"refusing to save: non-finite weights in {bad[:3]}; resume from the last good "
                                 "checkpoint instead")


def _release_memory() -> None:
    """Collect what was just dropped and give its memory back to CUDA (the next arm is then built in it)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
