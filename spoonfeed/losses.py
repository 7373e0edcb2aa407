"""Losses: cosine, MSE, logit KD and next-token CE, and the fused, chunked LM head + loss."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .cache import TeacherCache
    from .precision import Precision


def _real(mask, *xs):
    """Keep real tokens only: (B, T, ...) -> (n_real, ...). Selecting before computing keeps padded positions
    out of the value and the gradient, even when they hold NaN."""
    if mask is None:
        return tuple(x.reshape(-1, *x.shape[2:]) for x in xs)
    mask = mask.bool()
    return tuple(x[mask] for x in xs)


def cosine_loss(pred, target, mask=None):
    """1 - cos(pred, target) per token, averaged over real tokens. pred, target: (B, T, D)."""
    pred, target = _real(mask, pred, target)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def mse_loss(pred, target, mask=None):
    pred, target = _real(mask, pred, target)
    return (pred - target).pow(2).mean()


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """KL(teacher || student) per token at temperature T, times T^2 (Hinton et al.). logits: (B, T, V)."""
    s, t = _real(mask, student_logits, teacher_logits)
    s_logp = F.log_softmax(s.float() / temperature, dim=-1)
    t_logp = F.log_softmax(t.float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / max(1, len(s))
    return kl * temperature ** 2


def next_token_ce(logits, tokens, mask=None, reduction="mean"):
    """CE of logits[:, t] against tokens[:, t + 1], over positions whose target is real."""
    if reduction == "none":  # (B, T-1), for sums over whole packed blocks
        V = logits.size(-1)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none")
        return ce.view(tokens.size(0), -1)
    logits, targets = _real(None if mask is None else mask[:, 1:], logits[:, :-1], tokens[:, 1:])
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def mean_ce(states, tokens: torch.Tensor, logits_fn, batch_size: int = 16) -> float:
    """Next-token CE in nats/token over whole blocks, batch by batch: tokens (N, T); states (N, T, ...), or a function
    (i, j) -> states of blocks i..j (read lazily, e.g. from the cache); logits_fn maps (b, T - 1, ...) states to
    (b, T - 1, V) logits, position by position or causally (a head, a projector and a head, a causal LM over token
    ids), as a new tensor: it is written over. Each block gives T - 1 predictions: logits_fn sees the first T - 1
    positions only (the last predicts nothing), so no (b, T, V) logits are made and sliced into a copy. The CE is
    computed in float32, as a log-softmax written over the logits (one (b (T - 1), V) float32 tensor a batch, no
    second one for F.cross_entropy's log-probabilities), each batch's sum in float64. No gradient."""
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        j = min(i + batch_size, len(tokens))
        x = states(i, j) if callable(states) else states[i:j]
        logp = _log_softmax_(logits_fn(x[:, :-1]).float().flatten(0, 1).contiguous())  # (b (T - 1), V), in place
        total -= logp.gather(1, tokens[i:j, 1:].reshape(-1, 1).to(logp.device)).sum(dtype=torch.float64).item()
    return total / (len(tokens) * (tokens.size(1) - 1))


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of x, written over x on a CPU (torch.log_softmax with out=x: no new tensor;
    the CPU kernels read each row before they write it, and tests/test_training.py checks the result against the
    out-of-place one, in float32 and bf16). On other devices, where no test checks that aliasing, a new tensor."""
    return torch.log_softmax(x, -1, out=x) if x.device.type == "cpu" else torch.log_softmax(x, -1)


def _ce(z, y):
    """head_loss's CE on a chunk: z (c, V) logits, overwritten; y (c, 1) targets. Returns the summed loss
    -log p_y (float64 scalar) and its gradient p - onehot(y) in z's memory."""
    logp = _log_softmax_(z)
    loss = -logp.gather(1, y).sum(dtype=torch.float64)
    g = logp.exp_()
    g[torch.arange(len(g), device=g.device), y[:, 0]] -= 1
    return loss, g


def _teacher_logp(zt, dtype, t: float):
    """The teacher's log-probabilities at temperature t, (c, V) in dtype, from its logits zt (c, V): always a new
    tensor, never written over zt (the caller's, which may be a view of logits it keeps)."""
    if zt.dtype != dtype:
        zt = zt.to(dtype)  # a copy: ours to write over
        return _log_softmax_(zt.div_(t) if t != 1 else zt)
    return _log_softmax_(zt / t) if t != 1 else torch.log_softmax(zt, -1)


def _kl_sum(s_logp, t_logp):
    """Sum over a chunk of KL(p_t || p_s) = sum p_t (log p_t - log p_s), from (c, V) log-probabilities; turns
    t_logp into p_t in place and leaves s_logp. The products are rounded to the dtype, as F.kl_div's; each row is
    summed by torch in float32 (rounded to the dtype once: 2^-9 relative in bf16) and the rows in float64.
    Returns (loss, p_t)."""
    d = torch.sub(t_logp, s_logp)  # the one scratch tensor
    p_t = t_logp.exp_()
    return d.mul_(p_t).sum(-1).sum(dtype=torch.float64), p_t


def _kd(s, t_logp, t: float):
    """head_loss's KD on a chunk: s (c, V) the student's logits divided by t, overwritten; t_logp the teacher's
    log-probabilities at t, overwritten. Returns T^2 KL summed (float64) and the gradient T (p_s - p_t) in s's
    memory."""
    loss, g = _kd_from_logp(_log_softmax_(s), t_logp)
    return loss * t * t, g.mul_(t) if t != 1 else g


class _FusedHeadLoss(torch.autograd.Function):
    """The LM head and its loss in one pass over row chunks, gradients computed on the way (see head_loss)."""

    @staticmethod
    def forward(ctx, h, weight, bias, loss_grad, dtype, chunk_rows, denom):
        n, vocab = h.size(0), weight.size(0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False), torch.no_grad():
            w = weight.detach().to(dtype)  # (V, D): one cast a call, as autocast would do
            b = None if bias is None else bias.detach().to(dtype)
            x_all = h.detach().to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            total = torch.zeros((), dtype=torch.float64, device=h.device)
            for i in range(0, n, chunk_rows):
                x = x_all[i:i + chunk_rows]
                z = x @ w.T if b is None else torch.addmm(b, x, w.T)  # (c, V) logits in `dtype`
                loss, g = loss_grad(z, i)  # summed loss of these rows; g (c, V) in `dtype`: its gradient wrt z
                del z
                total += loss
                if need_b:
                    grad_b += g.sum(0)  # accumulated in float32 by torch, rounded to `dtype` once
                if need_h:
                    grad_h[i:i + chunk_rows] = g @ w
                if need_w:  # (V, D), kept in float32 across chunks
                    gw = g.T @ x  # contiguous, like the weight: the optimiser's grad takes it without a copy
                    grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.denom = denom
        return (total / denom).float()

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out / ctx.denom  # the loss is a sum over rows divided by denom (a mean)
        return tuple(None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors) + (None,) * 4


def head_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, policy: Precision,
              targets: torch.Tensor | None = None, teacher_logits=None, temperature: float = 1.0,
              chunk_rows: int | None = None, ce_weight: float | None = None, kd_rows: torch.Tensor | None = None,
              kd_weight: float = 1.0) -> torch.Tensor:
    """Training loss of a linear LM head, fused with the head: mean over rows, nats/token.

    h: (N, D) states; weight: (V, D) and bias: (V,) or None, the head. Either targets (N,) token ids, for the
    next-token CE, or teacher_logits, a function from a row offset i and a row count c to the teacher's logits
    (c, V) for rows i..i+c, for KL(teacher || student) at `temperature`, times T^2 (Hinton et al., 2015: the value
    of kd_loss). The head, the softmax and the gradient with respect to the logits (softmax - one-hot for CE,
    T (softmax(z/T) - p_teacher) for KD) run in the policy's autocast dtype (float32 without one; torch
    accumulates bf16 softmax sums in float32), over chunks of chunk_rows rows (default: 2^26 logits a chunk,
    128 MiB in bf16), and the gradients for h, weight and bias (those that require one) are computed in the same
    pass, the way fused linear cross-entropy kernels do it (Liger Kernel, Hsu et al., 2024; Cut Cross-Entropy,
    Wijmans et al., 2025). At most chunk_rows x V logits exist at once (the cpu preset's 1016 rows are one
    chunk), and nothing is copied to float32 but the (V, D) weight gradient and the summed loss: no autograd
    log-softmax backward, no float32 copy of the logits. The elementwise work runs over the chunk's logits in
    place: CE is a log-softmax written over them (on a CPU; a new tensor on other devices), then exp and minus
    one at the targets (two passes); KD adds the teacher's log-softmax (a new tensor: the caller's logits are
    never written over) and one scratch tensor for p_t (log p_t - log p_s), summed row by row, with no float64
    pass over (c, V); the mixed loss at T = 1 shares one softmax between its two terms. Figures against autograd
    on the cpu preset's shapes are in docs/benchmarks.md; against the loss code before, bench/head_loss.py.
    Same value and gradient as F.cross_entropy / kd_loss on the full logits in float32 (to 1e-6); in bf16 up to
    its rounding of the log-probabilities (2^-8 relative, so about 1/16 nat at -10 nats). That matters for KD
    when student and teacher are close: the gradient T (p_s - p_t) is then a difference of nearly equal bf16
    values, and a reviewer measured relative gradient errors of 0.19 to 5 for teacher logits within 1 to 0.05
    of the student's (docs/precision.md, 'Is bf16 within noise?'; end to end, the cpu preset's held-out figures
    stay within the issue's noise targets of float32's). The KD value's products are rounded to bf16 like
    F.kl_div's, each row's float32 sum once more (2^-9 relative), and the rows are summed in float64. No
    ignore_index in the CE and mixed losses: every row has a target there (leave rows without one out of h); with
    kd_rows, IGNORE_INDEX marks them. The teacher's logits get no gradient, and create_graph (double
    backward) is not supported: the gradients are computed in the forward pass, and not at all under
    torch.no_grad().
    Both targets and teacher_logits, with ce_weight = alpha in [0, 1], give the mixed loss of plain logit KD,
    alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) (Hinton et al., 2015; DistillKit's default), from one
    head product a chunk: the gradient is alpha (softmax(z) - one-hot) + (1 - alpha) T (softmax(z/T) - p_teacher).
    Both targets and teacher_logits, with kd_rows, give CE on every row plus KD on some: the mean CE over the rows
    whose target is not IGNORE_INDEX (-100, as in transformers' labels) + kd_weight * the mean T^2 KL over kd_rows
    (K,), increasing row indices into h, whose teacher logits teacher_logits(j, c) gives for kd_rows[j:j + c]. This
    is Phase 3's loss (CE on the B (T - 1) rows that have a next token, KD on kd_tokens sampled positions, the last
    ones included) from one head product a chunk over the rows the two terms share, instead of one for each: the
    gradient is (p - one-hot) on rows with a target plus c T (softmax(z/T) - p_teacher) on kd_rows, c = kd_weight *
    (rows with a target) / K, one softmax for both at T = 1; a row in neither gets none. Same value and gradients as
    the two calls it replaces (head_loss with targets on the rows with one, + kd_weight * head_loss with
    teacher_logits on h[kd_rows]) to 1e-6 in float32; in bf16 the two gradients are summed before the (V, D)
    product, so each logit's gradient is rounded to bf16 once instead of twice.
    Raises ValueError, before any work, unless exactly one of targets and teacher_logits is given (or both, with
    ce_weight in [0, 1] or with kd_rows); for h that is not (N, D), targets that are not (N,) integer ids in
    [0, V) (or IGNORE_INDEX, with kd_rows); kd_rows that are not a 1-d integer tensor of increasing indices into h,
    or given without both targets and teacher_logits; a temperature that is not finite and above 0; when no row
    has a target; and for chunk_rows < 1.
    """
    both = targets is not None and teacher_logits is not None
    if (targets is None and teacher_logits is None) or (both and ce_weight is None and kd_rows is None):
        raise ValueError("head_loss takes either targets (CE) or teacher_logits (KD), not both or neither; both "
                         "only with ce_weight (the mixed KD loss) or kd_rows (CE plus KD on those rows)")
    if kd_rows is not None and not (both and ce_weight is None):
        raise ValueError("kd_rows gives CE plus KD on those rows: it needs both targets and teacher_logits, and no "
                         "ce_weight")
    if ce_weight is not None and not (both and 0 <= ce_weight <= 1):
        raise ValueError(f"ce_weight={ce_weight} weighs CE against KD: it needs both targets and teacher_logits, "
                         "and a value in [0, 1]")
    if h.dim() != 2 or (targets is not None and targets.shape != (h.size(0),)):
        raise ValueError(f"head_loss takes h (N, D) and targets (N,); got h {tuple(h.shape)} and targets "
                         f"{None if targets is None else tuple(targets.shape)}: flatten the positions first")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be 1 or more (None: the default)")
    if teacher_logits is not None and not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature={temperature} must be a finite number above 0 (1: the plain softmax)")
    if targets is not None:
        _check_targets(targets, weight.size(0), kd_rows is not None)
    if kd_rows is not None:
        _check_kd_rows(kd_rows, h.size(0))
    if not torch.is_grad_enabled():  # no graph will be built: compute the loss alone, no gradients
        h, weight, bias = h.detach(), weight.detach(), None if bias is None else bias.detach()
    dtype = policy.autocast or torch.float32
    chunk_rows = chunk_rows or max(1, 2**26 // weight.size(0))
    t = float(temperature)

    def ce_grad(z, i):  # CE: loss -log p_y; gradient p - onehot(y), over z
        return _ce(z, targets[i:i + len(z), None])

    def kd_grad(z, i):  # KD: loss T^2 KL(p_t || p_s); gradient T (p_s - p_t), p at temperature T, over z
        return _kd(z.div_(t) if t != 1 else z, _teacher_logp(teacher_logits(i, len(z)), z.dtype, t), t)

    def mixed_grad(z, i):  # alpha CE + (1 - alpha) T^2 KL, from the same logits z
        a, y = float(ce_weight), targets[i:i + len(z), None]
        t_logp = _teacher_logp(teacher_logits(i, len(z)), z.dtype, t)
        if t != 1:  # two softmaxes: KD's at T over a scaled copy, then CE's over z
            l_kd, g_kd = _kd(z / t, t_logp, t)
            l_ce, g = _ce(z, y)
            return a * l_ce + (1 - a) * l_kd, g.mul_(a).add_(g_kd, alpha=1 - a)
        logp = _log_softmax_(z)  # at T = 1 both terms share one softmax: one log-softmax, one exp
        l_ce = -logp.gather(1, y).sum(dtype=torch.float64)
        l_kd, p_t = _kl_sum(logp, t_logp)
        g = logp.exp_().sub_(p_t, alpha=1 - a)  # alpha (p - onehot) + (1 - alpha) (p - p_t)
        g[torch.arange(len(g), device=g.device), y[:, 0]] -= a
        return a * l_ce + (1 - a) * l_kd, g

    if kd_rows is not None:
        return _ce_plus_kd(h, weight, bias, dtype, chunk_rows, targets, teacher_logits, t, kd_rows, kd_weight)
    loss_grad = mixed_grad if both else ce_grad if targets is not None else kd_grad
    return _FusedHeadLoss.apply(h, weight, bias, loss_grad, dtype, chunk_rows, h.size(0))


IGNORE_INDEX = -100  # a row without a target (transformers' labels convention)


def _check_targets(targets: torch.Tensor, vocab: int, ignore: bool) -> None:
    """head_loss's targets: integer token ids in [0, vocab), and IGNORE_INDEX where `ignore` (with kd_rows)."""
    if targets.dtype in (torch.bool,) or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise ValueError(f"targets must be integer token ids; got dtype {targets.dtype}")
    real = targets[targets != IGNORE_INDEX] if ignore else targets
    if ignore and len(real) == 0:
        raise ValueError("head_loss with kd_rows: no row has a target (all are IGNORE_INDEX); pass the KD rows "
                         "alone as teacher_logits")
    if len(real) and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab}) (the head's vocabulary)"
                         + (f", or IGNORE_INDEX ({IGNORE_INDEX}) for a row without one" if ignore else
                            f"; a row without a target (IGNORE_INDEX, {IGNORE_INDEX}) is taken only with kd_rows: "
                            "leave such rows out of h and targets")
                         + f"; got ids from {int(real.min())} to {int(real.max())}")


def _check_kd_rows(kd_rows: torch.Tensor, n: int) -> None:
    """head_loss's kd_rows: a 1-D tensor of integer row indices into h's n rows, strictly increasing."""
    if not torch.is_tensor(kd_rows) or kd_rows.dim() != 1 or kd_rows.dtype == torch.bool \
            or kd_rows.dtype.is_floating_point or kd_rows.dtype.is_complex:
        got = (f"a {kd_rows.dim()}-d {kd_rows.dtype} tensor" if torch.is_tensor(kd_rows) else type(kd_rows).__name__)
        raise ValueError(f"kd_rows must be a 1-d tensor of integer row indices into h's {n} rows (a boolean mask "
                         f"m: m.nonzero().squeeze(1)); got {got}")
    rows = kd_rows.cpu()
    if len(rows) and (rows[0] < 0 or rows[-1] >= n or (rows.diff() <= 0).any()):
        raise ValueError(f"kd_rows must be increasing row indices into h's {n} rows (sort them, and their teacher "
                         "states with them); got " + (str(rows.tolist()) if len(rows) <= 8 else
                                                      f"{len(rows)} indices from {int(rows.min())} to "
                                                      f"{int(rows.max())}"))


def _ce_plus_kd(h, weight, bias, dtype, chunk_rows, targets, teacher_logits, t, kd_rows, kd_weight):
    """head_loss with kd_rows (checked by head_loss): sum over rows with a target of CE + c * sum over kd_rows of
    T^2 KL, divided by the number of rows with a target (c = kd_weight * that number / K), one head product a
    chunk."""
    n = h.size(0)
    kd_rows = kd_rows.to(device="cpu", dtype=torch.long)
    has_target = targets != IGNORE_INDEX  # (N,)
    n_ce = int(has_target.sum())
    c = float(kd_weight) * n_ce / len(kd_rows) if len(kd_rows) else 0.0
    bounds = torch.searchsorted(kd_rows, torch.arange(0, n + chunk_rows, chunk_rows)).tolist()  # chunk -> kd slice

    def loss_grad(z, i):
        j0, j1 = bounds[i // chunk_rows], bounds[i // chunk_rows + 1]
        local = (kd_rows[j0:j1] - i).to(z.device)  # this chunk's kd rows, as row indices into z
        y, keep = targets[i:i + len(z)], has_target[i:i + len(z)]
        y = torch.where(keep, y, 0)[:, None]  # any valid id on rows without a target: they get no CE below
        t_logp = _teacher_logp(teacher_logits(j0, j1 - j0), z.dtype, t) if j1 > j0 else None
        if t != 1 and t_logp is not None:  # KD's softmax at T over a scaled copy of the kd rows, CE's over z
            l_kd, g_kd = _kd(z[local] / t, t_logp, t)
            logp = _log_softmax_(z)
        else:  # one softmax for both terms
            logp = _log_softmax_(z)
            l_kd, g_kd = (None, None) if t_logp is None else _kd_from_logp(logp[local], t_logp)
        l_ce = -logp.gather(1, y)[keep].sum(dtype=torch.float64)
        g = logp.exp_()
        g[torch.arange(len(g), device=g.device), y[:, 0]] -= 1
        if not bool(keep.all()):  # no target, no CE gradient (kd rows among them get theirs below)
            g.index_fill_(0, (~keep).nonzero().squeeze(1), 0)  # those rows alone (a boolean mask would pass all)
        if g_kd is None:
            return l_ce, g
        return l_ce + c * l_kd, g.index_add_(0, local, g_kd, alpha=c)

    return _FusedHeadLoss.apply(h, weight, bias, loss_grad, dtype, chunk_rows, n_ce)


def _kd_from_logp(s_logp, t_logp):
    """KD at T = 1 from the student's log-probabilities s_logp (k, V), a copy of them (overwritten), and the
    teacher's t_logp (overwritten). Returns KL summed (float64) and its gradient p_s - p_t in s_logp's memory."""
    loss, p_t = _kl_sum(s_logp, t_logp)
    return loss, s_logp.exp_().sub_(p_t)


def _frozen_teacher_head(cache: TeacherCache, device, dtype: torch.dtype | None = None) -> nn.Linear:
    """The teacher's LM head from the cache: teacher logits = head(cached state), with no logit cache.
    Built once, around the cached (V, D) tensor itself: no randomly initialised (V, D) weight first (2.3 GB
    at the Qwen shapes), no second copy. dtype: the weight's dtype (default float32, as cached; the training
    loops pass their autocast dtype, so that the KD term does not cast the (V, D) weight at every step)."""
    head = nn.Linear(cache.teacher_dim, cache.vocab_size, bias=False, device="meta")  # no storage, no init
    weight = cache.teacher_head().to(device=device, dtype=dtype or torch.float32)  # (V, D)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def _teacher_logits(teacher_head: nn.Linear, states: torch.Tensor):
    """head_loss's teacher_logits for these cached teacher states (n, D): rows i..i+c -> (c, V) logits, computed
    in the head's dtype (no gradient), chunk by chunk, never all at once."""
    def rows(i: int, c: int) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(states[i:i + c].to(teacher_head.weight.dtype), teacher_head.weight)
    return rows
