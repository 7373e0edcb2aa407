"""The optimiser step: AdamW, the LR schedule, gradient clipping, and the fault guard that names a non-finite step's cause."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NonFiniteGradientError, NonFiniteLossError, NonFiniteTargetError, in_notebook
from .parallel import world
from .precision import release_memory


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
        self.kept = f"The last good checkpoint in {Path(run_dir) / 'checkpoints'} is kept, and " + in_notebook(
            "rerunning the cell resumes from it", "rerunning the same spoonfeed_run command resumes from it")
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
                f"{self.cache_path} and " + in_notebook("rerun cell 3", "rerun the command: Phase 1 rebuilds it")
                + f"); if the teacher gives NaN again, pick another TEACHER_MODEL. {self.kept}")
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


class LazyAdamW(torch.optim.AdamW):
    """AdamW (Loshchilov & Hutter 2019, torch.optim.AdamW's arithmetic) whose groups marked lazy=True update only the
    rows of a (V, d) weight that the step's gradient touches, in time proportional to those rows, not to V.

    Meant for an input embedding with a sparse gradient (nn.Embedding(sparse=True)): a batch of B x T tokens touches
    at most B * T of its V rows. The other groups take torch's AdamW step (fused where it can be).

    The rule for a lazy group, per row (after torch.optim.SparseAdam, with AdamW's decays made exact):
    - a touched row first catches up on the k steps it sat out since it was last touched: its moments decay by
      beta1^k and beta2^k and its weight by the product of (1 - lr_t * weight_decay) over those steps, which is
      exactly what AdamW did to them meanwhile; then it takes AdamW's step at the global step count (the bias
      corrections). Its moments are therefore AdamW's, to float rounding.
    - an untouched row does not change at all: weight and moments stay as its last touch left them. What this
      drops is the step AdamW gives a row with a zero gradient on its decaying moments (its momentum coasting
      on), so a row's weight differs from AdamW's once it has sat out a step after being touched.
    A step that touches every row is AdamW's step exactly (to float rounding); a dense gradient counts as
    touching every row. A step an fp16 GradScaler found overflowing (its found_inf) changes no row, as it changes
    no other weight. State per lazy weight: "step", "exp_avg" and "exp_avg_sq" (V, d) as AdamW's, and "last"
    (V,) int64, the step each row was last brought up to date; with weight decay also "log_decay", the running
    sum of log(1 - lr_t * weight_decay) over the steps (float64).
    """

    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("lazy")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        found_inf = getattr(self, "found_inf", None)  # set by an fp16 GradScaler: the fused step skips, and so do we
        if found_inf is not None and bool(found_inf):
            return loss
        with torch.no_grad():
            for group in groups:
                if group.get("lazy"):
                    for p in group["params"]:
                        if p.grad is not None:
                            self._lazy_step(p, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then "last" and "log_decay" as saved (int64 and float64): torch casts every floating or integer
        state tensor but "step" to the parameter's dtype."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():
            for key in ("last", "log_decay"):
                if key in saved:
                    self.state[params[i]][key] = saved[key].to(params[i].device, copy=True)

    def _lazy_step(self, p: torch.Tensor, group: dict) -> None:
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["last"] = torch.zeros(p.size(0), dtype=torch.long, device=p.device)
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()  # one row per token id: duplicates summed, as the dense gradient sums them
            rows, g = grad.indices()[0], grad.values()  # (n,), (n, d)
        else:
            rows, g = torch.arange(p.size(0), device=p.device), grad
        state["step"] += 1
        step = int(state["step"].item())
        skipped = (step - 1 - state["last"][rows]).to(torch.float64)[:, None]  # (n, 1) steps each row sat out
        m = state["exp_avg"][rows].mul_(torch.pow(beta1, skipped).to(p.dtype))
        v = state["exp_avg_sq"][rows].mul_(torch.pow(beta2, skipped).to(p.dtype))
        w = p[rows]
        if wd:
            log = state.setdefault("log_decay", torch.zeros(1, dtype=torch.float64, device=p.device))
            state["log_decay"] = log = torch.cat([log, log[-1:] + math.log1p(-lr * wd)])  # (step + 1,)
            w.mul_(torch.exp(log[step] - log[state["last"][rows]])[:, None].to(p.dtype))  # this step's decay too
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        p.index_copy_(0, rows, w)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        state["last"][rows] = step


def _adamw(params, lr, weight_decay, embedding=None, embed_lr_mult: float = 1.0, lazy: bool = False):
    """AdamW; the embedding weight, when it is among params, gets lr * embed_lr_mult in a group of its own, and
    with lazy=True that group updates only the rows each step touches (LazyAdamW, for a sparse gradient).

    Each embedding row moves only when its token occurs, so at the body's LR most rows hardly leave their
    small random start, and the token's identity is drowned in the residual stream. A much larger LR there
    lets rare tokens move too (held-out results in docs/results.md, 'Tuning: what worked').
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one fused kernel instead of many small ops
    groups = [{"params": [p for p in params if p is not embedding]}]
    if any(p is embedding for p in params):
        groups.append({"params": [embedding], "lr": lr * embed_lr_mult, "lazy": lazy})
    cls = LazyAdamW if lazy else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over params, where a gradient may also be sparse (a lazy embedding's): a
    sparse gradient is coalesced in place (duplicate rows summed) and counts with its values. Returns the total
    2-norm before clipping, a float32 scalar tensor; the gradients are scaled by min(1, max_norm / (norm + 1e-6)),
    as torch does."""
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(p.grad.values()) for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in sparse:
        p.grad.values().mul_(coef)
    return total


def optimizer_step(loss: torch.Tensor, opt, params, grad_clip: float, scaler=None) -> bool:
    """One optimiser update from a scalar loss; every training loop (Phases 2 and 3, the ablation) goes through it.

    zero_grad -> backward (scaled when a GradScaler is given) -> under `accelerate launch`, the gradients averaged
    over the processes (World.average_gradients, sparse ones too), so that every process takes the same step ->
    unscale -> clip the global grad norm over `params` to `grad_clip` (clip_grad_norm: sparse gradients too) -> step.
    Returns True when the step was taken. When the gradient norm is not finite, opt.step() is never reached: the
    gradients are dropped and False is returned, so the caller can
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
    norm = clip_grad_norm(params, grad_clip)  # the total norm before clipping
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
    memory back to CUDA, so the next phase (or the ablation) starts from the weights alone. Reference counting
    frees them (no cycle holds a gradient or a moment), so no collection runs."""
    model.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    release_memory(collect=False)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor (any shape) holds no NaN and no inf. Its sum (in float32, float64 for
    float64) is finite when every value is, and a NaN or an inf makes it NaN or inf, so one reduction decides,
    without a boolean copy (8x faster than isfinite().all() on a (49152, 256) float32 here); only a sum that
    overflows (finite values near the dtype's limit) is checked value by value."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def non_finite(tensors: dict, prefix: str = "") -> list[str]:
    """Names (prefix + key) of the floating-point tensors among tensors.values() that hold NaN or inf."""
    return [f"{prefix}{k}" for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not all_finite(v)]


def _check_finite(model: nn.Module):
    """Raises NonFiniteLossError, before anything is written, when a weight of model holds NaN or inf."""
    bad = non_finite(model.state_dict())
    if bad:
        raise NonFiniteLossError(f"refusing to save: non-finite weights in {bad[:3]}; resume from the last good "
                                 "checkpoint instead")
