"""Benchmark baseline: a faithful re-implementation of the ORIGINAL research notebook.

This module reproduces the reference notebook's ("Superposition Distillation: The
'Spoon Feed' Protocol", /work/shared/reference/original_notebook.md) model code and
training loops as-is, so that it can serve as the *baseline* in side-by-side
benchmarks.  Its defects and inefficiencies are reproduced ON PURPOSE; do not fix
them here:

* No positional encoding at all in the student (attention is permutation-blind
  apart from the causal mask); a fresh ``triu`` causal mask is built in every
  layer on every forward pass; attention is a manual matmul/softmax.
* Padding counted in the losses: Phase 2's cosine loss runs over ALL positions
  (including pad positions) and Phase 3's next-token cross-entropy also trains on
  pad tokens (pad == eos), with no attention mask anywhere (teacher included).
* Phase 2 clips gradients of the student parameters only; the projector is not
  clipped.  No LR schedule, no warmup.
* Phase 3 trains ``embed_tokens.weight`` which is tied to the LM head, so the
  "head" training also drifts the input embedding that Phase 2 trained the body
  on (AdamW with its default weight decay of 0.01).
* Phase 1 caching runs the teacher one sample at a time (batch 1), as a full
  CausalLM with ``output_hidden_states=True`` (so full-vocab logits are computed
  and all layers' hidden states are kept), padded to ``max_length`` every time.
* The cache lives in Python lists of per-sample tensors in RAM; every training
  step re-stacks a batch from those lists.
* Generation recomputes the whole sequence every token (no KV cache) and never
  stops at EOS.

Only ``torch`` is imported at module level.
"""

import math
from typing import Iterable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "STESign",
    "STERound",
    "BitLinear",
    "RMSNorm",
    "BitNetBlock",
    "BitNetStudent",
    "Decompressor",
    "cache_original",
    "train_step_original",
    "train_superposition_original",
    "train_lm_head_original",
    "generate_original",
]


# =============================================================================
# BitNet implementation (verbatim from the notebook)
# =============================================================================


class STESign(torch.autograd.Function):
    """Straight-Through Estimator for ternary quantization."""

    @staticmethod
    def forward(ctx, x):
        return torch.clamp(torch.round(x), -1, 1)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output  # Pass gradient through


class STERound(torch.autograd.Function):
    """STE for INT8 rounding."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class BitLinear(nn.Module):
    """BitNet b1.58 Linear with proper quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        # Quantize weights to {-1, 0, +1}
        w_scale = self.weight.abs().mean() + 1e-8
        w_quant = STESign.apply(self.weight / w_scale)

        # Quantize activations to INT8
        a_scale = x.abs().amax(dim=-1, keepdim=True) + 1e-8
        a_quant = STERound.apply(torch.clamp(x / a_scale * 127.0, -128, 127))

        # Compute and rescale
        y = F.linear(a_quant, w_quant, None)
        y = y * (w_scale * a_scale / 127.0)

        if self.bias is not None:
            y = y + self.bias
        return y


class RMSNorm(nn.Module):
    """Root Mean Square Layer Normalization."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x / rms) * self.weight


# =============================================================================
# Student model
# =============================================================================


class BitNetBlock(nn.Module):
    """Single transformer block with BitLinear (no positional encoding)."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads

        # Attention
        self.q_proj = BitLinear(hidden_dim, hidden_dim)
        self.k_proj = BitLinear(hidden_dim, hidden_dim)
        self.v_proj = BitLinear(hidden_dim, hidden_dim)
        self.o_proj = BitLinear(hidden_dim, hidden_dim)

        # MLP (SwiGLU)
        mlp_dim = int(hidden_dim * mlp_ratio)
        self.gate_proj = BitLinear(hidden_dim, mlp_dim)
        self.up_proj = BitLinear(hidden_dim, mlp_dim)
        self.down_proj = BitLinear(mlp_dim, hidden_dim)

        # Norms
        self.input_norm = RMSNorm(hidden_dim)
        self.post_attn_norm = RMSNorm(hidden_dim)

    def forward(self, x):
        batch, seq_len, _ = x.shape

        # Pre-norm attention
        residual = x
        x = self.input_norm(x)

        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        # Attention
        scale = 1.0 / math.sqrt(self.head_dim)
        attn = torch.matmul(q, k.transpose(-2, -1)) * scale

        # Causal mask (rebuilt in every layer on every call, as in the notebook)
        causal_mask = torch.triu(torch.ones(seq_len, seq_len, device=x.device), diagonal=1).bool()
        attn = attn.masked_fill(causal_mask, float("-inf"))
        attn = F.softmax(attn, dim=-1)

        out = torch.matmul(attn, v)
        out = out.transpose(1, 2).contiguous().view(batch, seq_len, self.hidden_dim)
        out = self.o_proj(out)
        x = residual + out

        # Pre-norm MLP
        residual = x
        x = self.post_attn_norm(x)
        x = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        x = residual + x

        return x


class BitNetStudent(nn.Module):
    """BitNet student for superposition distillation (tied LM head)."""

    def __init__(self, vocab_size: int, hidden_dim: int = 768,
                 num_layers: int = 12, num_heads: int = 12):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.vocab_size = vocab_size

        self.embed_tokens = nn.Embedding(vocab_size, hidden_dim)
        self.layers = nn.ModuleList([BitNetBlock(hidden_dim, num_heads) for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_dim)

        nn.init.normal_(self.embed_tokens.weight, std=0.02)

    def forward(self, input_ids, return_hidden_states: bool = True):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)

        if return_hidden_states:
            return x
        else:
            return F.linear(x, self.embed_tokens.weight)  # Tied LM head

    def generate(self, input_ids, max_new_tokens=50, temperature=0.7):
        """Notebook generation: full recompute per token, no KV cache, no EOS stop.

        ``temperature == 0`` (not in the notebook) means greedy argmax, so that
        benchmarks can be deterministic; otherwise multinomial sampling exactly as
        the notebook does.
        """
        self.eval()
        for _ in range(max_new_tokens):
            logits = self.forward(input_ids, return_hidden_states=False)
            if temperature == 0:
                next_token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            else:
                next_logits = logits[:, -1, :] / temperature
                probs = F.softmax(next_logits, dim=-1)
                next_token = torch.multinomial(probs, 1)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
        return input_ids


# =============================================================================
# Superposition projector
# =============================================================================


class Decompressor(nn.Module):
    """Projects student hidden states to teacher's dimension."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(student_dim, student_dim * 2),
            nn.GELU(),
            nn.LayerNorm(student_dim * 2),
            nn.Linear(student_dim * 2, teacher_dim),
        )

    def forward(self, x):
        return self.net(x)


# =============================================================================
# Helpers
# =============================================================================


def _progress(iterable, enabled: bool, **kwargs):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return iterable


def _set_postfix(progress, step: int, losses: List[float]) -> None:
    if step % 10 == 0 and hasattr(progress, "set_postfix"):
        avg_loss = sum(losses[-10:]) / len(losses[-10:])
        progress.set_postfix({"loss": f"{avg_loss:.4f}"})


# =============================================================================
# Phase 1: cache teacher hidden states (batch 1, full CausalLM, all layers)
# =============================================================================


def cache_original(teacher, tokenizer, texts: Iterable[str], num_samples: int,
                   max_length: int, device="cpu") -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Phase 1 as the notebook does it.

    One sample at a time: tokenize padded to ``max_length`` (pad = eos), run the
    full CausalLM with ``output_hidden_states=True`` (no attention mask), keep
    ``hidden_states[-1]`` and append to Python lists on the CPU.  Texts shorter
    than 10 characters are skipped.

    Returns ``(cached_inputs, cached_targets)``: each input is a ``(1, L)`` long
    tensor, each target a ``(1, L, D)`` tensor (teacher dtype) on the CPU.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher.eval()

    cached_inputs: List[torch.Tensor] = []
    cached_targets: List[torch.Tensor] = []

    count = 0
    for text in texts:
        if count >= num_samples:
            break

        if not text or len(text) < 10:
            continue

        # Tokenize
        inputs = tokenizer(
            text,
            return_tensors="pt",
            max_length=max_length,
            truncation=True,
            padding="max_length",
        ).to(device)

        # Get teacher hidden states
        with torch.no_grad():
            outputs = teacher(input_ids=inputs.input_ids, output_hidden_states=True)
            hidden = outputs.hidden_states[-1].cpu()  # Last layer

        cached_inputs.append(inputs.input_ids.cpu())
        cached_targets.append(hidden)
        count += 1

    return cached_inputs, cached_targets


# =============================================================================
# Phase 2: superposition training
# =============================================================================


def train_step_original(student, projector, optimizer, batch_in, batch_target) -> float:
    """One Phase 2 step exactly as the notebook's loop body.

    Cosine embedding loss over ALL positions (padding included); gradient
    clipping on the student parameters only (projector not clipped).
    """
    batch_target = batch_target.float()
    teacher_dim = batch_target.size(-1)

    # Forward: student -> projector
    student_hidden = student(batch_in, return_hidden_states=True)
    projected = projector(student_hidden)

    # Cosine similarity loss
    proj_flat = projected.view(-1, teacher_dim)
    target_flat = batch_target.view(-1, teacher_dim)

    ones = torch.ones(proj_flat.size(0), device=batch_in.device)
    loss = F.cosine_embedding_loss(proj_flat, target_flat, ones)

    # Backward
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()

    return loss.item()


def train_superposition_original(student, projector, cached_inputs, cached_targets, steps: int,
                                 batch_size: int, lr: float, seed: int = 0, device="cpu",
                                 progress: bool = False) -> List[float]:
    """Phase 2 as the notebook: AdamW(student + projector, wd=0), random batches
    via ``torch.randint``, re-stacked from the Python-list cache every step, no
    LR schedule.  Returns the per-step losses."""
    torch.manual_seed(seed)

    optimizer = torch.optim.AdamW(
        list(student.parameters()) + list(projector.parameters()),
        lr=lr,
        weight_decay=0.0,
    )

    student.train()
    projector.train()

    num_samples = len(cached_inputs)
    losses: List[float] = []

    bar = _progress(range(steps), progress, desc="Superposition")
    for step in bar:
        # Random batch
        indices = torch.randint(0, num_samples, (batch_size,))

        batch_in = torch.stack([cached_inputs[i] for i in indices])
        batch_target = torch.stack([cached_targets[i] for i in indices])

        # Squeeze extra dimensions if present
        if batch_in.dim() == 3 and batch_in.size(1) == 1:
            batch_in = batch_in.squeeze(1)
        if batch_target.dim() == 4 and batch_target.size(1) == 1:
            batch_target = batch_target.squeeze(1)

        batch_in = batch_in.to(device)
        batch_target = batch_target.to(device).float()

        losses.append(train_step_original(student, projector, optimizer, batch_in, batch_target))
        _set_postfix(bar, step, losses)

    return losses


# =============================================================================
# Phase 3: LM head training (tied embedding)
# =============================================================================


def train_lm_head_original(student, cached_inputs, steps: int, batch_size: int, lr: float = 5e-3,
                           seed: int = 0, device="cpu", progress: bool = False) -> List[float]:
    """Phase 3 as the notebook: freeze everything, unfreeze only the (tied)
    ``embed_tokens.weight``, AdamW (default weight decay), next-token CE over all
    positions including padding, full student forward each step.  All student
    params are unfrozen again at the end.  Returns the per-step losses."""
    torch.manual_seed(seed)

    for param in student.parameters():
        param.requires_grad = False
    student.embed_tokens.weight.requires_grad = True

    head_optimizer = torch.optim.AdamW([student.embed_tokens.weight], lr=lr)

    student.train()
    vocab_size = student.vocab_size
    num_samples = len(cached_inputs)
    lm_losses: List[float] = []

    bar = _progress(range(steps), progress, desc="LM Head")
    for step in bar:
        indices = torch.randint(0, num_samples, (batch_size,))

        batch_in = torch.stack([cached_inputs[i] for i in indices])
        if batch_in.dim() == 3 and batch_in.size(1) == 1:
            batch_in = batch_in.squeeze(1)
        batch_in = batch_in.to(device)

        logits = student(batch_in, return_hidden_states=False)

        shift_logits = logits[:, :-1, :].contiguous()
        shift_labels = batch_in[:, 1:].contiguous()

        loss = F.cross_entropy(
            shift_logits.view(-1, vocab_size),
            shift_labels.view(-1),
        )

        head_optimizer.zero_grad()
        loss.backward()
        head_optimizer.step()

        lm_losses.append(loss.item())
        _set_postfix(bar, step, lm_losses)

    # Unfreeze all for future training
    for param in student.parameters():
        param.requires_grad = True

    return lm_losses


# =============================================================================
# Generation
# =============================================================================


@torch.no_grad()
def generate_original(student, input_ids, max_new_tokens: int, temperature: float = 0.7) -> torch.Tensor:
    """Notebook generation (full recompute each token, no KV cache, no EOS stop).
    ``temperature=0`` means greedy argmax."""
    return student.generate(input_ids, max_new_tokens=max_new_tokens, temperature=temperature)
