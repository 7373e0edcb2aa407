"""Closed-form head fits: the ridge solve, folding a head bias into the weight, and the logit scale."""

from __future__ import annotations

import torch


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least squares with a ridge: solves (G + ridge * mean(diag G) * I) x = rhs. gram G: (n, n), the Gram matrix
    X^T X (float64); rhs: (n,) or (n, k), X^T y. The ridge is relative to G's mean diagonal, so it does not
    depend on the states' scale."""
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, rhs)


@torch.no_grad()
def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, ridge: float = 1e-6,
                   batch_size: int = 4096) -> torch.Tensor:
    """A bias-free head whose logits are the least-squares fit of the biased head's logits on these states.

    weight: (V, dim), bias: (V,), features: (..., dim) the final-normed student states to fit on. The bias is
    centred first (a softmax ignores a shift that all logits share). The fit of W h + b by W' h is
    W' = W + b m^T, where m solves min_m sum_t (m . h_t - 1)^2: the direction along which the states' projection
    is ~1 everywhere. RMSNorm keeps the states' length about constant, so this can lose little; llama_head
    prints the held-out CE before and after. ridge is relative to the mean diagonal of the Gram matrix.
    Returns the new weight (V, dim).
    """
    h = features.reshape(-1, features.size(-1))
    gram = torch.zeros(h.size(1), h.size(1), dtype=torch.float64, device=h.device)
    total = torch.zeros(h.size(1), dtype=torch.float64, device=h.device)
    for i in range(0, len(h), batch_size):
        chunk = h[i:i + batch_size].double()  # (n, dim)
        gram += chunk.T @ chunk
        total += chunk.sum(0)
    m = ridge_solve(gram, total, ridge).to(weight)  # (dim,): m . h ~ 1
    b = bias - bias.mean()
    return weight + b[:, None].to(weight) * m[None, :]


@torch.no_grad()
def fit_logit_scale(logits: torch.Tensor, targets: torch.Tensor, iters: int = 10, chunk: int = 2**20) -> float:
    """The s that minimises CE(s * logits, targets) (nats/token): logits (n, V), targets (n,). CE is convex in s;
    Newton's method, whose gradient and curvature are the softmax's mean and variance of the logits minus the
    target's logit. Each pass goes over the rows in blocks of about `chunk` elements (4 MiB in float32), so that
    a block's softmax and its two dot products stay in cache: 4-8x faster than whole-matrix passes at 62M
    elements, same figure to float rounding. The passes run in float32 whatever the logits' dtype (in bf16 the
    variance of logits far from zero cancels to noise). Returns s in [0.01, 10]."""
    s = 1.0
    picked = logits.gather(1, targets[:, None]).squeeze(1).float()
    rows = max(1, chunk // logits.size(1))
    mean, second = (logits.new_empty(len(logits), dtype=torch.float32) for _ in range(2))  # E_p[z], E_p[z^2]
    for _ in range(iters):
        for i in range(0, len(logits), rows):
            z = logits[i:i + rows].float()  # float32 whatever the logits' dtype: E[z^2] - E[z]^2 cancels
            p = torch.softmax(s * z, dim=-1)
            mean[i:i + rows] = torch.linalg.vecdot(p, z)
            second[i:i + rows] = torch.linalg.vecdot(p.mul_(z), z)
        var = second - mean.square()
        grad, hess = (mean - picked).mean().item(), var.mean().item()
        step = grad / max(hess, 1e-12)
        s = min(max(s - step, 0.01), 10.0)
        if abs(step) < 1e-4 * s:  # Newton converges quadratically: a few passes usually do
            break
    return s
