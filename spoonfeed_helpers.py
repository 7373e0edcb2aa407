"""
Spoon Feed: distil a teacher LLM into a ternary (BitNet b1.58) student. This file is the research; the plumbing
around it (config, precision, data, the cache on disk, checkpoints, metrics, generation, exports, plots) lives in
the package spoonfeed/, one concept per module, and never imports this file.

The protocol has three phases:
  1. cache: run the teacher over packed text blocks and keep only its last, final-normed hidden
     states, on disk (float16 .npy), together with the teacher's LM head;
  2. superposition: train a ternary student plus a "decompressor" MLP so that
     projector(student state) matches the teacher state (cosine loss; MSE and logit KD optional);
  3. speech therapy: train an LM head on the frozen student's states.
Then save (safetensors, the packed 1.6-bit ternary file, transformers and llama.cpp forms) and generate.

The file reads top to bottom in the order of a run: the quantizers and BitLinear -> the student and the
decompressor -> Phase 1 -> Phase 2 -> Phase 3 -> the student's own files -> the ablation.

References:
1) BitNet b1.58, Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
   https://arxiv.org/abs/2402.17764 (absmean ternary weights, per-token absmax int8 activations)
2) "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (the straight-through estimator recipe)
3) huggingface/transformers src/transformers/integrations/bitnet.py (STE quantizers as small functions)
4) RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864 (rotary position embedding)
5) Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (KD with temperature, T^2 factor)
6) karpathy/nanoGPT model.py (one readable file, config dataclasses)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import spoonfeed  # noqa: F401  the plumbing: the package folder beside this file
except ModuleNotFoundError as e:  # the helper copied without its package
    raise ModuleNotFoundError("spoonfeed_helpers.py needs its package, the folder spoonfeed/, beside it: copy the "
                              "folder together with the file, or clone the whole repository") from e

# isort: off
from spoonfeed.errors import ConfigError, NonFiniteTeacherError, PhaseOrderError, headless, in_notebook  # noqa: F401
from spoonfeed.config import check_batch_size, HEAD_MODES, RunConfig, StudentConfig
from spoonfeed.precision import _autocast, _cuda_oom_hint, pick_device, Precision, precision_policy, release_memory
from spoonfeed.precision import keep_freed_memory  # noqa: F401  (the notebook's setup cell calls it)
from spoonfeed.files import (
    _atomic_write_text, _check_destination, _file_digest, _normal_mode, _remove, _remove_stale, _replacing,
    check_export_destinations, check_free_space, check_writable, FORMAT, RUN_DIR_EXPORTS, TERNARY_FORMAT,
)
from spoonfeed.teacher import load_teacher, load_tokenizer
from spoonfeed.data import CHARS_PER_TOKEN, DataReport, iter_texts, MAX_DOC_BLOCKS, undecodable_note
from spoonfeed.sources import data_fingerprint
from spoonfeed.packing import check_eos, pack_blocks
from spoonfeed.cache import (
    begin_build, CACHE_FILES, cache_folder, cache_request, data_change, open_cache, open_shared_cache, publish,
    TeacherCache,
)
from spoonfeed.losses import (IGNORE_INDEX, _frozen_teacher_head, _real, _teacher_logits, cosine_loss, head_loss,
                              mse_loss)
from spoonfeed.optim import _check_finite, optimizer_step
from spoonfeed.checkpoints import _ckpt_paths, load_checkpoint, weights_digest
from spoonfeed.phase import Phase
from spoonfeed.parallel import world
from spoonfeed.compile import Compiled
from spoonfeed.metrics import baseline_cosine, evaluate, held_out_ce, held_out_cosine, log_unigram, student_features
from spoonfeed.heads import fit_logit_scale, fold_head_bias, ridge_solve
from spoonfeed.generation import KVCache
from spoonfeed.export import (
    _check_hf_exportable, check_export_settings, export_gguf, export_hf, gguf_qtype_for, llama_head,
)
from spoonfeed.plots import progress_bar

# re-exported: the notebook, the tests and bench/ use these as sf.NAME
from spoonfeed.errors import (  # noqa: F401
    NonFiniteGradientError, NonFiniteLossError, NonFiniteTargetError, PromptTooLongError, TeacherUnavailableError,
)
from spoonfeed.config import (  # noqa: F401
    BUNDLED_GGUF, BUNDLED_MODEL, BUNDLED_TEACHER, check_switches, check_teacher_name, describe, FORM_NAMES,
    explicit_settings, make_config, named_as, ORIGINAL_PROMPTS, setting, settings_by_field, parse_widths, PRECISIONS, preset_from_env, PRESETS, resolve_preset, STDLIB_CORPUS, recipe_phases, RECIPES,
)
from spoonfeed.precision import cpu_bf16_instructions, make_grad_scaler  # noqa: F401
from spoonfeed.files import HF_FORMAT, RUN_DIR_LAYOUT, run_path  # noqa: F401
from spoonfeed.teacher import _load_cuda_teacher, bundled_teacher_dir  # noqa: F401
from spoonfeed.data import (  # noqa: F401
    _text_documents, _texts_from_records, describe_data, DUPLICATE, MIN_TEXT_CHARS, record_text,
)
from spoonfeed.losses import kd_loss, next_token_ce  # noqa: F401
from spoonfeed.optim import _adamw, lr_schedule  # noqa: F401
from spoonfeed.checkpoints import _non_finite, _signature_changes, save_checkpoint  # noqa: F401
from spoonfeed.metrics import ablation_verdict, format_ablation, format_report, ternary_stats  # noqa: F401
from spoonfeed.generation import (  # noqa: F401
    _sample_next, check_compatible, check_generation_settings, decode_head, format_generations, generate,
    generate_text, left_pad, logits_processors, MIN_TEMPERATURE, prompt_ids, StaticKVCache,
)
from spoonfeed.export import (  # noqa: F401
    _hub_token, _permute_for_llamacpp, GGUF_LINEAR_NAMES, GGUF_QTYPES, pipeline_settings, push_to_hub,
)
from spoonfeed.checks import _run_dir_bytes, check_folders, check_runtime  # noqa: F401
from spoonfeed.plots import plot_ablation, plot_cache, plot_evaluation, plot_logit_kd, plot_phase2, plot_phase3  # noqa: F401
# isort: on

# -------------------------------------------------------------------------------------------------------------
# BitLinear and the quantizers (BitNet b1.58: absmean ternary weights, per-token absmax int8 activations, STE)

EPS = 1e-5  # keeps the scales finite for all-zero tensors and rows


QMAX = 127  # activations are int8: per-token absmax maps to 127


def quantize_weight(w: torch.Tensor):
    """Ternary absmean quantization: w ~ q * scale with q in {-1, 0, +1} and one scale per tensor.
    The scale is computed in float32 whatever w's dtype; q has w's dtype (-1, 0, 1 are exact in any)."""
    scale = w.float().abs().mean().clamp(min=EPS)  # float32: fp16 would round the mean of many small values
    q = (w.float() / scale).round().clamp(-1, 1)
    return q.to(w.dtype), scale


def quantize_activation(x: torch.Tensor):
    """int8 absmax quantization per token: x ~ q / scale with q in [-128, 127].
    The scale is float32 whatever x's dtype: in fp16, QMAX / EPS overflows to inf, which turned an all-zero
    row into NaN and a row with absmax below ~2e-3 into zeros. q has x's dtype (integers to 256 are exact
    in fp16 and bf16)."""
    scale = QMAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1) float32
    q = (x.float() * scale).round().clamp(-QMAX - 1, QMAX)
    return q.to(x.dtype), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q / scale, computed in float32 and returned in q's dtype."""
    return (q.float() / scale).to(q.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """dequantize_activation(*quantize_activation(x)), bit for bit, in fewer passes over x: one buffer rounded,
    clamped and divided in place. x (..., d) -> x's shape and dtype. The
    int8 round trip runs at every BitLinear input in training and evaluation, and these elementwise passes
    cost as much as the matmuls at the cpu preset's sizes (profile in docs/benchmarks.md)."""
    xf = x.float()
    scale = QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1); 15x faster than an inf-norm here
    if torch.compiler.is_compiling():  # torch.compile fuses the passes itself, and wants no in-place writes
        return (xf * scale).round().clamp(-QMAX - 1, QMAX).div(scale).to(x.dtype)
    y = xf.mul_(scale) if xf is not x else xf * scale  # a float copy of x is ours to overwrite
    return y.round_().clamp_(-QMAX - 1, QMAX).div_(scale).to(x.dtype)


def ternary_linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """F.linear(fake_quantize_activation(x), q * scale) to float rounding, in integers: x (..., in) -> (..., out)
    in x's dtype; q (out, in) int8 in {-1, 0, +1}, scale its float32 scale. The int8 levels of x times q sum
    exactly (|sum| <= 128 * in < 2**24) and both scales are applied once, where the float path rounds every
    product; it reads 1 byte a weight instead of 4. Eager: torch._int_mm (CPU); under torch.compile a
    multiply-sum that inductor fuses into one pass over q (decoding's few rows)."""
    xf = x.float()
    s = QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1), as fake_quantize_activation
    levels = (xf * s).round().clamp(-QMAX - 1, QMAX).reshape(-1, x.size(-1))  # (M, in) whole numbers
    if torch.compiler.is_compiling():
        acc = (levels[:, None, :] * q.float()).sum(-1)  # (M, out), exact
    else:
        acc = torch._int_mm(levels.to(torch.int8), q.t()).float()  # (M, out), exact int32 sums
    return (acc.reshape(*x.shape[:-1], q.size(0)) * (scale / s)).to(x.dtype)


class _TernarySTE(torch.autograd.Function):
    """Forward: the dequantized ternary weight. Backward: the straight-through identity."""

    @staticmethod
    def forward(ctx, w):
        q, scale = quantize_weight(w)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Int8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return fake_quantize_activation(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer: ternary weights, int8 activations, fp32 latent weights trained by STE.

    In eval mode every forward quantizes the current latent weight, so the output follows the weight however it
    was written (an optimiser step, fused or not, load_state_dict, param.data.copy_, an EMA update). Inside
    `quantize_once(model)` (what `generate` uses) the ternary weight is computed once and reused until the block
    ends: decoding runs every layer once a token, and nothing writes the weights in between.
    quantize=False turns it into a plain full-precision linear layer (the ablation's control arm).
    """

    def __init__(self, in_features: int, out_features: int, quantize: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.quantize = in_features, out_features, quantize
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the original's (and nn.Linear's) init
        self._reuse = False  # True only inside quantize_once()
        self._w_cache = None  # the dequantized ternary weight, kept only inside quantize_once()
        self._int8 = None  # (q int8, scale): ternary_int8(), kept only inside quantize_once(int8=True)
        self.register_buffer("ternary_pin", None, persistent=False)  # exact q * scale from an export: pin_ternary
        self._pin_factor = None

    def quantized_weight(self) -> torch.Tensor:
        if self.training:
            return _TernarySTE.apply(self.weight)
        if self._w_cache is not None:
            return self._w_cache
        with torch.no_grad():
            pin = self.ternary_pin
            if pin is not None and torch.equal(self.weight, pin.sign() * self._pin_factor):
                w = pin  # the latent weight is still the one pin_ternary wrote
            else:
                q, scale = quantize_weight(self.weight)
                w = q * scale
        if self._reuse:
            self._w_cache = w
        return w

    @torch.no_grad()
    def pin_ternary(self, q: torch.Tensor, scale: torch.Tensor):
        """Rebuild this layer from a ternary export: q (out, in) in {-1, 0, +1} and its absmean scale.

        The latent weight becomes q * c with c = scale / mean|q|: it re-quantizes to q with about this scale, so
        training can go on from it. Float rounding can move that scale by an ulp, so eval mode uses q * scale
        itself, bit for bit, for as long as the latent weight is still exactly q * c. That is checked at every
        use, so a write of any kind (optimiser step, load_state_dict, .data.copy_) ends the pin.
        """
        c = (scale.float() / q.abs().mean().clamp(min=1e-8)).reshape(())
        self.weight.copy_(q.to(self.weight) * c.to(self.weight))
        self._pin_factor = c.item()  # a float32 value: sign(pin) * c rebuilds the latent weight exactly
        self.ternary_pin = (q.float() * scale.float()).to(self.weight)

    def forward(self, x):
        if not self.quantize:
            return F.linear(x, self.weight)
        if torch.is_grad_enabled():
            x = _Int8STE.apply(x)
        elif self._int8 is not None:  # inside quantize_once(int8=True): the same values in integers
            return ternary_linear_int8(x, *self._int8)
        else:  # the same values without autograd bookkeeping: decoding runs this once a layer a token
            x = fake_quantize_activation(x)
        return F.linear(x, self.quantized_weight())

    @torch.no_grad()
    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ternary form that the exports and statistics read: q (out, in) in {-1, 0, +1}, float32 on the CPU,
        and its absmean scale, a float32 scalar (quantize_weight of the latent weight)."""
        return quantize_weight(self.weight.detach().cpu().float())

    @torch.no_grad()
    def ternary_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode weight as (q (out, in) int8 in {-1, 0, +1}, scale float32 0-dim) with q * scale ==
        quantized_weight() exactly (a pinned export's included): ternary_linear_int8's operands."""
        w = self.quantized_weight()
        return w.sign().to(torch.int8), w.abs().amax().float()

    def train(self, mode: bool = True):
        self._w_cache = self._int8 = None
        return super().train(mode)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, ternary={self.quantize}"


@contextlib.contextmanager
def quantize_once(model: nn.Module, int8: bool = False):
    """Inside the block, each BitLinear of `model` in eval mode quantizes its weight on first use and reuses it.

    Keyed on nothing: the copies live only for the block and are dropped when it ends, so a weight written by
    any means (fused optimiser kernels and `.data` writes leave `weight._version` as it was) is re-read by the
    next block. Don't write the weights inside it. Nested blocks restore the outer block's state on exit.
    int8=True (generate on a CPU): each ternary layer in eval mode keeps its weight as int8 and multiplies in
    integers (ternary_linear_int8): the same outputs to float rounding, a quarter of the bytes read a token.
    """
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    saved = [(m._reuse, m._w_cache, m._int8) for m in layers]
    for m in layers:
        m._int8 = m.ternary_int8() if int8 and m.quantize and not m.training else None
        m._reuse, m._w_cache = True, None
    try:
        yield model
    finally:
        for m, (reuse, w, i8) in zip(layers, saved):
            m._reuse, m._w_cache, m._int8 = reuse, w, i8


# -------------------------------------------------------------------------------------------------------------
# the student: a Llama-style decoder with BitLinear in every projection, and the decompressor

def rope_tables(head_dim: int, max_len: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); cos/sin: (T, hs). Rotates each pair (i, i + hs/2) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, cfg.n_heads, cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = (BitLinear(cfg.dim, cfg.dim, cfg.ternary) for _ in range(4))
        # SubLN (BitDistill): an RMSNorm on o_proj's input; transformers' BitNet names it attn_sub_norm
        self.attn_sub_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if cfg.subln else None

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask=None):
        """x (B, T, dim); cos/sin (T, hs), or (B, 1, T, hs) per row; mask (B, 1, T, past + T) bool, for
        left-padded rows (see KVCache.pad), else causal."""
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
        # under CPU autocast SDPA runs in float32: torch's CPU flash-attention kernel is slower in bf16 than in
        # float32 at the student's shapes (forward + backward, 8 x 4 heads x 128 x 64: 6.9 ms against 3.8 ms on
        # the machine of docs/benchmarks.md, bench/shapes.py); the projections around it stay bf16
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            if cpu_autocast:
                q, k, v = q.float(), k.float(), v.float()
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:  # one new token sees every cached one: no mask (a mask sends CPU SDPA down a slow path)
                y = F.scaled_dot_product_attention(q, k, v)
            else:  # token i of this chunk sees the cache and chunk tokens up to itself
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        if self.attn_sub_norm is not None:  # in float32, as Llama's RMSNorm computes (bf16 input has no fused kernel)
            y = self.attn_sub_norm(y.float())
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.w1 = BitLinear(cfg.dim, cfg.hidden_dim, cfg.ternary)  # gate
        self.w3 = BitLinear(cfg.dim, cfg.hidden_dim, cfg.ternary)  # up
        self.w2 = BitLinear(cfg.hidden_dim, cfg.dim, cfg.ternary)  # down
        # SubLN (BitDistill): an RMSNorm on down_proj's input (transformers' BitNet: ffn_sub_norm)
        self.ffn_sub_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps) if cfg.subln else None

    def forward(self, x):
        x = F.silu(self.w1(x)) * self.w3(x)  # (B, T, hidden)
        return self.w2(x if self.ffn_sub_norm is None else self.ffn_sub_norm(x.float()))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Decompressor(nn.Module):
    """The original's projector: student width -> teacher width."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(student_dim, 2 * student_dim),
            nn.GELU(),
            nn.LayerNorm(2 * student_dim),
            nn.Linear(2 * student_dim, teacher_dim),
        )

    def forward(self, x):
        return self.net(x)


class BitNetStudent(nn.Module):
    """Ternary student, its decompressor, and the head that decodes it (see StudentConfig.head_mode)."""

    # the modules kept in full precision; everything else that multiplies is a BitLinear
    FULL_PRECISION = ("tok_embeddings", "norm", "projector", "head", "teacher_head")

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.projector = Decompressor(cfg.dim, cfg.teacher_dim)
        # the head is built in every mode and with its bias, so the random init of everything else (and so
        # Phase 2's result) depends on neither head_mode nor head_bias; the other modes drop it, and a
        # bias-free head drops its bias below
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)  # bias: token priors
        self.teacher_head = None  # nn.Linear(teacher_dim, vocab), frozen; see attach_teacher_head
        self.phase2_result = None  # {"signature", "digest"} of the finished Phase 2 these weights hold
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        if not cfg.head_bias:
            self.head.bias = None
        self._init_head()
        if cfg.head_mode != "new":
            self.head = None
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def attach_teacher_head(self, weight: torch.Tensor):
        head = nn.Linear(self.cfg.teacher_dim, self.cfg.vocab_size, bias=False)
        if tuple(weight.shape) != tuple(head.weight.shape):
            raise ConfigError(f"teacher head {tuple(weight.shape)} does not fit this student "
                              f"(vocab {self.cfg.vocab_size}, teacher dim {self.cfg.teacher_dim})")
        head.weight.data.copy_(weight)
        head.requires_grad_(False)
        self.teacher_head = head.to(self.tok_embeddings.weight.device)

    def forward(self, idx, cache: KVCache | None = None):
        """idx: (B, T) token ids -> final-normed student states (B, T, dim). With a cache, the tokens continue
        it (its left-padded rows included, see KVCache.pad). Raises ValueError past max_seq_len positions.
        A static cache (StaticKVCache, for a compiled decode step) gives the positions and the mask as tensors
        over all its slots, so every step has the same shapes; its caller checks the positions."""
        B, T = idx.shape
        if getattr(cache, "static", False):
            cos, sin, mask = cache.rope_and_mask(self.rope_cos, self.rope_sin, T)  # (B, 1, T, hs) x 2, (B, 1, T, S)
            return self._layers(idx, cos, sin, cache, mask, T)
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        last = start + T - (0 if pad is None else int(pad.min()))  # the furthest position, plus one
        if last > self.cfg.max_seq_len or (cache is not None and start + T > cache.slots):
            raise ValueError(f"{last} positions exceed the student's max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs)
        else:  # left-padded rows: each row's positions count from its first token; pads are never attended
            slot = torch.arange(start, start + T, device=idx.device)  # (T,)
            pos = (slot[None] - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hs)
            key = torch.arange(start + T, device=idx.device)  # (S,)
            mask = (key[None, None] >= pad[:, None, None]) & (key[None, None] <= slot[None, :, None])  # (B, T, S)
            mask |= key[None, None] == slot[None, :, None]  # a pad sees itself: no all-masked row, no NaN
            mask = mask[:, None]  # (B, 1, T, S)
        return self._layers(idx, cos, sin, cache, mask, T)

    def _layers(self, idx, cos, sin, cache, mask, T):
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def logits(self, h):
        """Decode states (B, T, dim) to logits (B, T, vocab) with the configured head."""
        mode = self.cfg.head_mode
        if mode == "new":
            return self.head(h)
        if mode == "tied":  # the original's: the input embedding doubles as the head
            return F.linear(h, self.tok_embeddings.weight)
        if self.teacher_head is None:
            raise RuntimeError("head_mode='teacher' needs the teacher head: call attach_teacher_head first")
        return self.teacher_head(self.projector(h))

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainable head as (weight (vocab, dim), bias (vocab,) or None): the new head's, or in tied mode the
        input embedding (no bias). For head_loss, which runs the head itself. Raises RuntimeError in teacher mode
        (a frozen head over the projector, not trained)."""
        if self.cfg.head_mode == "new":
            return self.head.weight, self.head.bias
        if self.cfg.head_mode == "tied":
            return self.tok_embeddings.weight, None
        raise RuntimeError("head_mode='teacher' has no trainable head")

    def _init_head(self):
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:  # the bias holds token priors; Llama's lm_head has none
            nn.init.zeros_(self.head.bias)

    def set_head_mode(self, mode: str, bias: bool | None = None):
        """Switch the head (see StudentConfig.head_mode). bias: whether a new head has a bias (None keeps the
        config's); a new head with the other bias setting replaces the current one."""
        if mode not in HEAD_MODES:
            raise ConfigError(f"head_mode={mode!r} is not one of {HEAD_MODES}")
        bias = self.cfg.head_bias if bias is None else bias
        self.cfg = dataclasses.replace(self.cfg, head_mode=mode, head_bias=bias)
        if mode == "new" and (self.head is None or (self.head.bias is not None) != bias):
            self.head = nn.Linear(self.cfg.dim, self.cfg.vocab_size, bias=bias).to(self.tok_embeddings.weight)
            self._init_head()
        if mode != "new":
            self.head = None
        if mode != "teacher":
            self.teacher_head = None

    def quantize_once(self, int8: bool = False):
        """quantize_once(self, int8): inside the block, each BitLinear quantizes its weight once (generation)."""
        return quantize_once(self, int8)

    def bitlinears(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, BitLinear)]

    def num_params(self) -> dict:
        ternary = sum(m.weight.numel() for _, m in self.bitlinears())
        total = sum(p.numel() for p in self.parameters())
        projector = sum(p.numel() for p in self.projector.parameters())
        return {"ternary": ternary, "full_precision": total - ternary - projector, "projector": projector,
                "total": total}


def _initial_student(scfg: StudentConfig, seed: int, cache: "TeacherCache") -> BitNetStudent:
    """The student as build_student starts it, on the CPU: the same seed gives the same weights, bit for bit."""
    torch.manual_seed(seed)
    model = BitNetStudent(scfg)
    with torch.no_grad():
        model.projector.net[-1].bias.copy_(torch.from_numpy(np.asarray(cache.train_mean, dtype=np.float32)))
    return model


def build_student(cfg: RunConfig, cache: "TeacherCache", **kw) -> BitNetStudent:
    """A fresh student for this run and cache, seeded, on the run's device. The decompressor's output bias
    starts at the cache's mean teacher vector, so training starts at the constant baseline and spends its
    steps on what is token-specific."""
    return _initial_student(cfg.student_config(cache.vocab_size, cache.teacher_dim, **kw), cfg.seed,
                            cache).to(pick_device(cfg.device))


# -------------------------------------------------------------------------------------------------------------
# Phase 1: cache the teacher's last hidden states (and its LM head) on disk

def _check_teacher_states(h: torch.Tensor, h16: torch.Tensor, teacher_dtype, where: str, folder) -> None:
    """Refuse non-finite teacher states (h, as computed) or states beyond float16's range (h16, as cached)."""
    bad = (~torch.isfinite(h)).sum().item()
    if bad:
        dtype = str(teacher_dtype).replace("torch.", "")
        if teacher_dtype in (torch.float16, torch.bfloat16):
            fix = (f"a {dtype} overflow in the teacher is the likely cause (Qwen2 models are known to overflow "
                   "in float16). Load the teacher in float32: " + in_notebook(
                       "in cell 3 call sf.cache_teacher_states(cfg, precision=\"fp32\"), then rerun",
                       "rerun with --set precision=fp32 (every phase then runs in float32)"))
        else:
            fix = "the teacher's weights are likely broken: check TEACHER_MODEL or pick another teacher"
        raise NonFiniteTeacherError(f"Phase 1 stopped: the teacher's hidden states hold {bad} non-finite values "
                                    f"({where}); the teacher ran in {dtype}: {fix}. Nothing was cached (no manifest "
                                    f"was written; {folder} is as it was)")
    bad = (~torch.isfinite(h16)).sum().item()
    if bad:
        raise NonFiniteTeacherError(f"Phase 1 stopped: {bad} teacher state values ({where}) exceed float16's range "
                                    f"(65504), the cache's dtype; the teacher's final norm is unusual: pick another "
                                    f"TEACHER_MODEL. Nothing was cached (no manifest was written; {folder} is as it "
                                    "was)")


def cache_teacher_states(cfg: RunConfig, loader=None, rebuild: bool = False, progress: bool = True,
                         tokenizer=None, precision: str | None = None) -> TeacherCache:
    """Phase 1. Reuses a cache whose manifest matches the request (local files' size and modification time
    included) without loading the teacher at all; otherwise reads and packs the data first, so every data
    problem is a ConfigError before the teacher loads, then runs batched teacher forwards and writes the
    states incrementally, the manifest last.

    loader() returns (teacher, tokenizer); default load_teacher(cfg.teacher, cfg.device). The data is packed
    with `tokenizer`, else the loader's `tokenizer` attribute, else load_tokenizer(cfg.teacher) (fast: the
    teacher itself loads only after the data is checked). Raises ConfigError for bad data (see iter_texts), a
    tokenizer with no EOS (check_eos), an unwritable CACHE_DIR, too little disk, and seq_len beyond the teacher's
    context.
    The teacher runs in precision_policy's teacher dtype for cfg.precision (or `precision`, when given: "fp32"
    forces float32), and that dtype is part of the cache's key (a custom loader's teacher runs as it is given). Raises
    NonFiniteTeacherError, naming the teacher's dtype, before writing a batch whose states are not finite.
    A new cache is written into a folder beside the cache's own (begin_build) and renamed into place whole when
    it is finished (publish): a finished cache is never rewritten in place, so a run reading it (another
    process sharing CACHE_DIR) keeps reading consistent files, and a failed or interrupted build leaves the
    folder as it was.
    Under `accelerate launch` every process reads and packs the same data and loads the teacher, runs it on its own
    contiguous share of the batches and writes those rows of the build's states files; the main process checks the
    cache for reuse, makes the build and its files, and writes the rest, the manifest last once every share is
    written, then publishes it. The cache is byte for byte the one process's (docs/multi-gpu.md).
    """
    ranks = world()  # one process, or those of `accelerate launch`
    fingerprint = data_fingerprint(cfg.dataset)  # unsupported or empty local files are refused here
    precision = precision or cfg.precision
    policy = precision_policy(cfg.device, precision)
    request = cache_request(cfg.teacher, cfg.dataset, cfg.num_samples, cfg.val_samples, cfg.seq_len, cfg.seed,
                            cfg.text_field, fingerprint, policy.teacher, cfg.encoding)
    folder = cache_folder(cfg.cache_dir, request)
    cache = None if rebuild else open_shared_cache(folder, request, ranks)  # opened once: what is checked is read
    if cache is not None:
        print(f"Phase 1: reusing the cache in {folder}")
        return cache
    why = data_change(folder, request, fingerprint)
    if why and not rebuild:
        print(f"Phase 1: rebuilding the cache in {folder}: {why} since it was built")
    check_writable(cfg.cache_dir, "CACHE_DIR")
    if tokenizer is None:
        tokenizer = getattr(loader, "tokenizer", None) or load_tokenizer(cfg.teacher)
    check_eos(tokenizer, f"the tokenizer of TEACHER_MODEL={cfg.teacher!r}")
    report = DataReport(cfg.dataset, cfg.text_field)
    texts = iter_texts(cfg.dataset, cfg.seed, cfg.text_field, tokenizer, report,
                       max_chars=MAX_DOC_BLOCKS * cfg.seq_len * CHARS_PER_TOKEN, work_dir=cfg.cache_dir,
                       encoding=cfg.encoding)
    try:
        train, val, val_docs = pack_blocks(texts, tokenizer, cfg.seq_len, cfg.num_samples, cfg.val_samples,
                                           report=report)
    finally:
        texts.close()
    if undecodable_note(report):
        print(f"Phase 1: note: {undecodable_note(report)}")
    print(f"Phase 1: the data gave {len(train)} + {len(val)} held-out blocks of {cfg.seq_len} tokens from "
          f"{report.records:,} records; loading the teacher")
    loader = loader or (lambda: load_teacher(cfg.teacher, cfg.device, tokenizer, precision))
    teacher, _ = loader()
    try:
        teacher_dtype = getattr(teacher, "dtype", torch.float32)
        context = getattr(teacher.config, "max_position_embeddings", None)
        if context and cfg.seq_len > context:
            raise ConfigError(f"MAX_SEQ_LENGTH={cfg.seq_len} is beyond the teacher's context ({context}): lower "
                              "MAX_SEQ_LENGTH")
        D, head = teacher.config.hidden_size, teacher.get_output_embeddings().weight
        head16 = head.detach().to("cpu", torch.float16).contiguous()  # (V, D), as cached: KD and evaluation use it
        if not torch.isfinite(head16).all():
            bad = int((~torch.isfinite(head16)).sum())
            raise NonFiniteTeacherError(f"Phase 1 stopped before any forward: the teacher's LM head holds {bad} values "
                                        "that are not finite in float16 (the cache's dtype): its weights are broken or "
                                        "out of float16's range; check TEACHER_MODEL or pick another teacher. Nothing "
                                        "was cached")
        final = folder
        folder = ranks.on_main(lambda: begin_build(final))  # beside the cache's folder, renamed into place whole
        check_free_space(folder, (train.size + val.size) * (D * 2 + 4) + head.numel() * 2, "the cache needs",
                         "lower NUM_CACHE_SAMPLES or MAX_SEQ_LENGTH, or point CACHE_DIR at a bigger disk")
        if ranks.is_main_process:
            np.save(folder / "train_tokens.npy", train)
            np.save(folder / "val_tokens.npy", val)
        decoder = teacher.get_decoder()  # the body with its final norm, and no LM head: no logits computed
        device = next(teacher.parameters()).device
        splits, bs = {"train": train, "val": val}, cfg.cache_batch_size
        mine = {s: ranks.share(range(0, len(b), bs)) for s, b in splits.items()}  # this process's batches: all, in one
        bar = progress_bar(total=sum(len(splits[s][i:i + bs]) for s in mine for i in mine[s]), unit="block",
                           desc="Phase 1: teacher states", disable=not progress)
        offsets, sums = {}, []
        for split, blocks in splits.items():
            out = ranks.main_first(lambda main: np.lib.format.open_memmap(  # the main process creates the file
                folder / f"{split}_states.npy", mode="w+" if main else "r+", dtype=np.float16,
                shape=(*blocks.shape, D)))
            offsets[split] = out.offset
            try:
                with ranks.together():  # a failure on one process stops all of them here, once none is writing
                    for i in mine[split]:
                        x = torch.from_numpy(blocks[i:i + bs].astype(np.int64)).to(device)
                        with torch.inference_mode(), _cuda_oom_hint():
                            h = decoder(input_ids=x, use_cache=False).last_hidden_state  # (B, T, D), final-normed
                        h16 = h.to("cpu", torch.float16)
                        _check_teacher_states(h, h16, teacher_dtype, f"{split} blocks {i} to {i + len(x) - 1}", final)
                        out[i:i + len(x)] = h16.numpy()
                        if split == "train":
                            sums.append(h.double().sum(dim=(0, 1)).cpu())  # (D,) float64, one a batch
                        bar.update(len(x))
                    out.flush()
            except NonFiniteTeacherError:
                del out
                if ranks.is_main_process:
                    _remove(folder)  # the build: incomplete, nothing to keep
                raise
            del out
        bar.close()
        total = torch.zeros(D, dtype=torch.float64)
        for batch_sum in ranks.gather(sums):  # every batch's sum, added in the order one process adds them
            total += batch_sum
    except BaseException as e:  # an error or an interrupt: Jupyter keeps the traceback, whose frames (the
        traceback.clear_frames(e.__traceback__)  # teacher's forward among them) would keep the teacher alive
        raise
    finally:  # on every exit: the last names of the teacher, then the collection, since a transformers model
        teacher = decoder = head = None  # after a forward sits in reference cycles that reference counting
        release_memory()  # never frees
    with ranks.together():  # the main process writes the rest, the manifest last, after every share is complete
        if ranks.is_main_process:
            _finish_cache(folder, request, train, val, val_docs, total, head16, offsets, report, fingerprint)
            cache = publish(folder, final)
    cache = cache if ranks.is_main_process else TeacherCache(final)
    print(f"Phase 1: cached {len(train)} + {len(val)} held-out blocks of {cfg.seq_len} tokens in {final}")
    return cache


def _finish_cache(folder, request, train, val, val_docs, total, head16, offsets, report, fingerprint) -> None:
    """Phase 1's last writes, once every teacher state is on disk: the mean state, the teacher's head, and the
    manifest (digests of every file), last, atomically."""
    D = len(total)
    np.save(folder / "train_mean.npy", (total / train.size).float().numpy())
    from safetensors.torch import save_file

    save_file({"weight": head16}, folder / "teacher_head.safetensors")
    _normal_mode(folder / "teacher_head.safetensors")
    files = {}
    for name in CACHE_FILES:
        p = folder / name
        files[name] = {"bytes": p.stat().st_size, "blake2b": _file_digest(p)}
    for split in ("train", "val"):
        files[f"{split}_states.npy"]["data_offset"] = offsets[split]
    manifest = {"request": request, "teacher_dim": D, "vocab_size": head16.shape[0], "files": files,
                "num_train": len(train), "num_val": len(val), "val_docs": val_docs, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "data": asdict(report), "data_listing": fingerprint["listing"] if fingerprint else {}}
    _atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))


# -------------------------------------------------------------------------------------------------------------
# Phase 2: superposition, the student + decompressor against the cached teacher states

def _phase_weights(model: BitNetStudent, phase: str) -> list[str]:
    """The state_dict names a phase trains, and so what its checkpoint holds: Phase 2 everything but the heads;
    Phase 3 the new head, or in tied mode the input embedding that doubles as the head (teacher mode: none)."""
    names = list(model.state_dict())
    if phase == "phase2":
        return [n for n in names if not n.startswith(("head.", "teacher_head."))]
    return {"new": [n for n in names if n.startswith("head.")], "tied": ["tok_embeddings.weight"],
            "teacher": []}[model.cfg.head_mode]


def _phase2_loss(cfg, pred, target, teacher_head, mask=None, kd_positions=None, policy: Precision | None = None,
                 kd_share: float = 1.0):
    """Cosine and/or MSE over real tokens, plus logit KD through the teacher head on kd_positions
    (flat indices into B*T; None = every real token), fused with the head (head_loss) in the policy's dtype, and
    weighted by kd_share (World.positions: this process's share of the batch's KD positions; none: no KD term)."""
    loss = 0.0
    if cfg.loss in ("cosine", "cosine+mse"):
        loss = loss + cosine_loss(pred, target, mask)
    if cfg.loss in ("mse", "cosine+mse"):
        loss = loss + mse_loss(pred, target, mask)
    if cfg.kd_weight > 0:
        p, t = _real(mask, pred, target)  # (n, D)
        if kd_positions is not None:
            p, t = p[kd_positions], t[kd_positions]
        # the teacher's own logits, recomputed from its cached state; the student's through the same frozen head
        if len(p):  # under several processes, this one may hold none of the batch's KD positions
            loss = loss + cfg.kd_weight * kd_share * head_loss(
                p, teacher_head.weight, None, policy or precision_policy(p.device),
                teacher_logits=_teacher_logits(teacher_head, t), temperature=cfg.kd_temperature)
    return loss


def _signature(cfg: RunConfig, phase: str, model: BitNetStudent, cache: TeacherCache,
               phase2_student: str | None = None) -> dict:
    """Everything a phase's result is made from. "cache" is the cache's content (TeacherCache.content_digest, from
    its files' digests), not its folder: Phase 1 rebuilds a cache in the same folder when the data changes, and
    a checkpoint trained on the old content is then moved aside and retrained, never taken as done. Phase 3's
    names the exact student it decodes: phase2_student, the _frozen_digest of the finished Phase 2 weights."""
    keys = {"phase2": ("superposition_steps", "batch_size", "lr", "embed_lr_mult", "warmup_steps", "min_lr_ratio",
                       "weight_decay", "grad_clip", "loss", "kd_weight", "kd_temperature", "kd_tokens", "seed"),
            "phase3": ("lm_head_steps", "batch_size", "head_lr", "head_mode", "head_init", "head_kd_weight",
                       "kd_temperature", "kd_tokens", "warmup_steps", "min_lr_ratio", "grad_clip", "seed",
                       "head_bias")}[phase]
    head_keys = ("head_mode", "head_bias")  # Phase 2 trains no head; Phase 3's head settings are in keys
    student = {k: v for k, v in asdict(model.cfg).items() if k not in head_keys and not (k == "subln" and not v)}
    sig = {"cache": cache.content_digest, "student": student,  # no subln key unless on: older checkpoints stay valid
           **{k: getattr(cfg, k) for k in keys}}
    sig["batch_size"] = cfg.batch_size * world().num_processes  # the global batch: a resume may change the processes
    if phase == "phase3":
        sig["phase2_student"] = phase2_student
    computes = precision_policy(model.tok_embeddings.weight.device, cfg.precision).name
    if computes != "fp32":  # float32 runs keep the signature they had before PRECISION existed
        sig["precision"] = computes
    if phase == "phase2" and cfg.embedding_update != "dense":  # dense runs keep their signature too
        sig["embedding_update"] = cfg.embedding_update
    return sig


def _check_student(model: BitNetStudent, cfg: RunConfig, cache: TeacherCache):
    """The live student must have the shape the settings ask for (cell 4 rerun after a shape change)."""
    want = asdict(cfg.student_config(cache.vocab_size, cache.teacher_dim))
    have = asdict(model.cfg)
    diff = [f"{k} {have[k]} -> {want[k]}" for k in ("vocab_size", "teacher_dim", "dim", "n_layers", "n_heads",
                                                      "max_seq_len") if have[k] != want[k]]
    if diff:
        raise PhaseOrderError(f"the student in memory was built for other settings ({', '.join(diff)}): " + in_notebook(
            "rerun cell 4 (Build the student), then this cell",
            "build it again with build_student(cfg, cache), then call this phase"))


def _init_phase2(model: BitNetStudent, cfg: RunConfig, cache: TeacherCache):
    """Put the live student back at build_student's start (same seed), so that Phase 2 from scratch gives the
    same result whatever the student held before (an earlier Phase 2, a tied-mode Phase 3)."""
    init = _initial_student(model.cfg, cfg.seed, cache).state_dict()
    current = model.state_dict()
    with torch.no_grad():
        for k in _phase_weights(model, "phase2"):
            current[k].copy_(init[k])
    model.phase2_result = None


def _projected(model: BitNetStudent, tokens: torch.Tensor) -> torch.Tensor:
    """Phase 2's forward: tokens (B, T) -> projector(student states) (B, T, teacher_dim)."""
    return model.projector(model(tokens))


def _states(model: BitNetStudent, tokens: torch.Tensor) -> torch.Tensor:
    """The direct-CE arm's forward: tokens (B, T) -> student states (B, T, dim)."""
    return model(tokens)


# COMPILE: the same forwards through torch.compile, once per shape (the batch is fixed), eager if it fails
_COMPILED = {_projected: Compiled(_projected, "Phase 2's forward"), _states: Compiled(_states, "the student's forward")}


def _forward(fn, cfg: RunConfig):
    return _COMPILED[fn] if cfg.compile else fn


def _frozen_digest(model: BitNetStudent, skip=("head.", "teacher_head.")) -> str:
    """weights_digest of every weight whose name does not start with `skip` (default: the body Phase 3 keeps frozen)."""
    return weights_digest(model, skip)


def superposition_step(model, opt, params, tokens, target, cfg: RunConfig, teacher_head=None, gen=None,
                       policy: Precision | None = None, scaler=None):
    """One Phase 2 step on a batch: tokens (B, T), target (B, T, D). Returns (loss, stepped): a non-finite
    loss is returned before any weight changes, and stepped is False when no update was made (non-finite loss,
    a non-finite gradient that optimizer_step refused, or an fp16 overflow the GradScaler skipped).
    policy: precision_policy of the device (default: looked up); scaler: its GradScaler (fp16), or None.
    cfg.compile runs the forward (student and projector) through torch.compile (spoonfeed/compile.py).
    Under N processes (Phase.batch: this process's B rows of the N * B): the KD positions are drawn over the whole
    batch, as one process draws them, and the loss returned (and judged) is the mean over the processes."""
    device = tokens.device
    policy = policy or precision_policy(device)
    ranks = world()
    kd_positions, kd_share, numel = None, 1.0, tokens.numel() * ranks.num_processes  # the whole batch's positions
    if cfg.kd_weight > 0 and 0 < cfg.kd_tokens < numel:
        kd_positions, kd_share = ranks.positions(torch.randperm(numel, generator=gen)[:cfg.kd_tokens], tokens.numel())
        kd_positions = kd_positions.to(device)
    with _cuda_oom_hint(), _autocast(policy):
        pred = _forward(_projected, cfg)(model, tokens).float()  # (B, T, D)
        loss = _phase2_loss(cfg, pred, target, teacher_head, kd_positions=kd_positions, policy=policy,
                            kd_share=kd_share)
    mean = ranks.mean(loss.detach())  # every process decides on the same figure
    if not torch.isfinite(mean):
        return mean, False
    stepped = optimizer_step(loss, opt, params, cfg.grad_clip, scaler)  # every trainable parameter, projector included
    return mean, stepped


def train_superposition(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True,
                        stop_after: int | None = None, fresh: bool = False) -> dict:
    """Phase 2: student + projector against the cached teacher states.

    AdamW (no weight decay by default; the input embedding at lr * embed_lr_mult), linear warmup then cosine
    decay, clipping over every trainable parameter (projector included). Checkpoints every cfg.ckpt_every
    steps into cfg.run_dir and resumes from the last good one; a finished phase is not redone unless
    fresh=True. Without a checkpoint to resume, the student is first put back at build_student's start, so the
    result depends on the settings alone, never on what the student held before. stop_after simulates an
    interruption (tests).

    Raises PhaseOrderError when the student was built for another shape (rerun cell 4), ConfigError when
    RUN_DIR cannot be written or lacks room for a checkpoint, and NonFiniteLossError (NonFiniteTargetError,
    NonFiniteGradientError) naming the cause when a step goes non-finite (see _FaultGuard).
    """
    check_batch_size(cfg.batch_size * world().num_processes, cache.num_train, f"the {cache.num_train} cached blocks")
    _check_student(model, cfg, cache)
    check_writable(cfg.run_dir, "RUN_DIR")
    device = model.tok_embeddings.weight.device
    steps = cfg.superposition_steps
    params = [p for n, p in model.named_parameters() if not n.startswith(("head.", "teacher_head."))]
    history = {"step": [], "loss": [], "lr": [], "eval_step": [], "val_cosine": [],
               "baseline_cosine": baseline_cosine(cache)}
    signature = _signature(cfg, "phase2", model, cache)
    run = Phase("Phase 2", model, params, cfg, lr=cfg.lr, steps=steps, warmup=cfg.warmup_steps, seed=cfg.seed,
                lr_fix=f"Lower {setting('lr')} (now {cfg.lr}) or {setting('embed_lr_mult')} (now {cfg.embed_lr_mult})",
                history=history, key="phase2", signature=signature, names=_phase_weights(model, "phase2"),
                embedding=model.tok_embeddings.weight, embed_lr_mult=cfg.embed_lr_mult,
                weight_decay=cfg.weight_decay, fresh=fresh, cache_path=cache.path, compiled=cfg.compile,
                restart=lambda: _init_phase2(model, cfg, cache))  # the student as build_student made it
    history = run.history
    model.phase2_result = model.logit_kd_start = None  # an earlier Phase 4 no longer starts from here
    teacher_head = _frozen_teacher_head(cache, device, run.policy.autocast) if cfg.kd_weight > 0 else None
    model.train()
    bar = run.bar("Phase 2: superposition", progress)
    for step in bar:
        idx = run.batch(cache.num_train)
        tokens = cache.tokens("train", idx).to(device)  # (B, T)
        target = cache.states("train", idx).to(device)  # (B, T, D)
        lr = run.lr  # the LR this step uses
        loss, stepped = superposition_step(model, run.opt, params, tokens, target, cfg, teacher_head, run.gen,
                                           run.policy, run.scaler)
        run.update(step, loss, target, stepped)
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["lr"].append(lr)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            history["eval_step"].append(step + 1)
            history["val_cosine"].append(held_out_cosine(model, cache, precision=cfg.precision))
            bar.set_postfix(loss=f"{loss.item():.4f}", val_cos=f"{history['val_cosine'][-1]:.4f}")
        run.checkpoint(step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            break
    if len(history["step"]) == steps:  # finished: Phase 3 decodes exactly these weights
        model.phase2_result = {"signature": signature, "digest": _frozen_digest(model)}
    run.close()
    model.eval()
    return history


# -------------------------------------------------------------------------------------------------------------
# Phase 3: speech therapy, an LM head that decodes the frozen student

@torch.no_grad()
def fit_head_to_teacher(cache: TeacherCache, features: torch.Tensor, ridge: float = 1e-4, batch_size: int = 16):
    """A head that decodes the student the way the teacher would, in closed form.

    The least-squares linear map (with a bias) from the student's states to the teacher's cached states,
    composed with the teacher's head. The head is centred over the vocabulary first, because a softmax
    ignores a shift that all logits share. The result's logits are the least-squares fit of the teacher's
    logits from the student's states. features: (num_train, T, dim), the frozen student's training states.
    ridge is relative to the mean diagonal of the Gram matrix. Returns weight (V, dim) and bias (V,).
    """
    dim, device = features.size(-1), features.device
    gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(dim + 1, cache.teacher_dim, dtype=torch.float64, device=device)
    for i in range(0, cache.num_train, batch_size):
        idx = np.arange(i, min(i + batch_size, cache.num_train))
        f = features[idx].flatten(0, 1).double()
        f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)  # the constant column carries the bias
        gram += f.T @ f
        cross += f.T @ cache.states("train", idx).to(device).flatten(0, 1).double()
    fit = ridge_solve(gram, cross, ridge).float()  # (dim + 1, teacher_dim): student state -> teacher state
    head = cache.teacher_head().to(device)
    head = head - head.mean(0)
    weight, bias = head @ fit[:-1].T, head @ fit[-1]
    idx = np.arange(min(cache.num_train, max(1, 2**26 // (cache.vocab_size * cache.seq_len))))  # <= 256 MiB
    logits = features[idx, :-1] @ weight.T + bias
    scale = fit_logit_scale(logits.flatten(0, 1), cache.tokens("train", idx)[:, 1:].flatten().to(device))
    return scale * weight, scale * bias


def _ensure_phase2(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig) -> str:
    """Make sure the live student is the finished Phase 2 result for these settings, and return its digest.

    It is when train_superposition finished it (or found it done) with these settings and its weights have not
    changed since. Otherwise (a fresh kernel that runs cell 6 before cell 5, a Phase 2 setting changed but cell 5
    not rerun, the embedding moved by a tied-mode Phase 3) the finished Phase 2 checkpoint for these settings is
    loaded, with a line that says so; if there is none, PhaseOrderError asks for cell 5.
    """
    _check_student(model, cfg, cache)
    sig2 = _signature(cfg, "phase2", model, cache)
    digest = _frozen_digest(model)
    mark = model.phase2_result
    if mark is not None and mark["signature"] == sig2 and mark["digest"] == digest:
        return digest
    why = ("the student in memory has not been through Phase 2" if mark is None else
           "the student in memory comes from Phase 2 with other settings" if mark["signature"] != sig2 else
           "the student in memory has changed since Phase 2 (a tied head trains the embedding)")
    names = _phase_weights(model, "phase2")
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only look: Phase 2 itself reports what it finds
        state = load_checkpoint(cfg.run_dir, "phase2", sig2, weights, set_aside=False)
    path = _ckpt_paths(cfg.run_dir, "phase2")[0]
    if state is None or state["step"] < cfg.superposition_steps:
        found = ("no Phase 2 checkpoint for these settings" if state is None else
                 f"Phase 2 stopped at step {state['step']} of {cfg.superposition_steps}")
        raise PhaseOrderError(f"Phase 3 decodes the finished Phase 2 student, but {why} and {path.parent} holds "
                              f"{found}: " + in_notebook("run cell 5 (Phase 2) first, then this cell",
                                                          "run train_superposition first, then train_lm_head"))
    current = model.state_dict()
    with torch.no_grad():
        for k in names:
            current[k].copy_(state["model"][k])
    digest = _frozen_digest(model)
    model.phase2_result = {"signature": sig2, "digest": digest}
    print(f"Phase 3: {why}; loaded the finished Phase 2 student for these settings from {path}")
    return digest


def _reset_head(model: BitNetStudent, seed: int):
    """The new head's start, the same whatever the head held before: N(0, 0.02) weight from the seed, zero bias."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.02)
        if model.head.bias is not None:
            model.head.bias.zero_()


def train_lm_head(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True,
                  stop_after: int | None = None, fresh: bool = False, need_phase2: bool = True) -> dict:
    """Phase 3 ("speech therapy"): a head that decodes the frozen student.

    head_mode new: a fresh untied head on student states computed once; body, embedding and projector stay
    bit-identical. head_init teacher starts it at fit_head_to_teacher (the teacher's head over a least-squares
    map from student to teacher states); unigram starts it at the unigram predictor. teacher: the teacher's
    head over the projector, no training. tied: the original's behaviour, training the input embedding as
    the head, which drifts the body's inputs (comparison only).

    Phase 3 decodes the finished Phase 2 student for these settings (see _ensure_phase2: loaded from its
    checkpoint when the student in memory is not it; PhaseOrderError when there is none). need_phase2=False
    decodes whatever student it is given (tests, benchmarks). Its checkpoint holds only what Phase 3 trains
    (the head; the embedding in tied mode) and is valid only for the exact student it decodes: one made for
    another Phase 2 result is moved aside with a line that says why, and Phase 3 is redone.
    Trains cfg.phase_steps()["lm_head"] steps (0 under RECIPE "spoonfeed+kd": the head's closed-form fit alone).
    """
    check_batch_size(cfg.batch_size * world().num_processes, cache.num_train, f"the {cache.num_train} cached blocks")
    check_writable(cfg.run_dir, "RUN_DIR")
    device = model.tok_embeddings.weight.device
    body = _ensure_phase2(model, cache, cfg) if need_phase2 else _frozen_digest(model)
    model.logit_kd_start = None  # the body is Phase 2's and the head starts afresh: a new start for Phase 4
    model.set_head_mode(cfg.head_mode, bias=cfg.head_bias)
    if cfg.head_mode == "teacher":
        model.attach_teacher_head(cache.teacher_head())
    feats = None
    if cfg.head_mode == "new":
        _reset_head(model, cfg.seed)
        feats = student_features(model, cache.tokens("train", np.arange(cache.num_train)),  # (N, T, dim), once
                                 precision=cfg.precision)
        with torch.no_grad():
            if cfg.head_init == "teacher":
                weight, bias = fit_head_to_teacher(cache, feats)
            else:  # the unigram predictor: the head learns what context adds to it
                weight = model.head.weight.clone()
                bias = torch.from_numpy(log_unigram(cache)).to(device)
            if model.head.bias is None:  # a bias-free head starts at the least-squares fold of the bias
                weight, bias = fold_head_bias(weight, bias, feats), None
            model.head.weight.copy_(weight)
            if bias is not None:
                model.head.bias.copy_(bias)
    history = {"step": [], "loss": [], "eval_step": [], "val_ce": [], "val_ppl": [], "skipped": []}
    val_feats = None  # tied mode moves the embedding, so its held-out states must be recomputed each time
    if cfg.head_mode != "tied":
        val_feats = student_features(model, cache.tokens("val", np.arange(cache.num_val)).to(device),
                                     precision=cfg.precision)

    def record(step):
        ce = held_out_ce(model, cache, val_feats, precision=cfg.precision)
        history["eval_step"].append(step)
        history["val_ce"].append(ce)
        history["val_ppl"].append(math.exp(min(ce, 50)))

    steps = cfg.phase_steps()["lm_head"]  # 0 under RECIPE "spoonfeed+kd": the closed-form fit alone
    if cfg.head_mode == "teacher" or steps == 0:
        record(0)
        return history
    model.requires_grad_(False)
    names = _phase_weights(model, "phase3")
    if cfg.head_mode == "new":
        trainable = list(model.head.parameters())
    else:
        trainable = [model.tok_embeddings.weight]
    for p in trainable:
        p.requires_grad_(True)
    run = Phase("Phase 3", model, trainable, cfg, lr=cfg.head_lr, steps=steps, warmup=min(cfg.warmup_steps, steps // 10),
                seed=cfg.seed + 1, lr_fix=f"Lower the head's learning rate ({setting('head_lr')}, now {cfg.head_lr})",
                history=history, key="phase3", signature=_signature(cfg, "phase3", model, cache, body), names=names,
                fresh=fresh, cache_path=cache.path)
    history, policy = run.history, run.policy
    teacher_head = _frozen_teacher_head(cache, device, policy.autocast) if cfg.head_kd_weight > 0 else None
    bar = run.bar("Phase 3: LM head", progress)
    for step in bar:
        idx = run.batch(cache.num_train)
        tokens = cache.tokens("train", idx).to(device)  # (B, T)
        t_states = None
        with _cuda_oom_hint(), _autocast(policy):
            if cfg.head_mode == "new":
                h = feats[idx.to(feats.device)]  # (B, T, dim), computed once before the loop
            else:
                model.train()
                h = model(tokens)
            weight, bias = model.head_weights()
            if teacher_head is None:  # position t predicts token t+1: CE over the (B * (T-1), V) logits
                loss = head_loss(h[:, :-1].flatten(0, 1), weight, bias, policy, targets=tokens[:, 1:].flatten())
            else:  # the same CE + KD from the teacher's logits on kd_tokens positions of the batch, one head pass
                numel = tokens.numel() * run.world.num_processes  # the whole batch's, every process's rows
                pos, share = run.world.positions(torch.randperm(numel, generator=run.gen)[:cfg.kd_tokens or numel],
                                                 tokens.numel())
                pos = pos.sort().values.to(device)  # (K,) rows of the (B * T) positions; under several processes
                t_states = cache.states("train", idx).to(device).flatten(0, 1)[pos]  # this one may hold none
                targets = F.pad(tokens[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B * T,): the last has none
                loss = head_loss(h.flatten(0, 1), weight, bias, policy, targets=targets,
                                 teacher_logits=_teacher_logits(teacher_head, t_states), kd_rows=pos,
                                 kd_weight=cfg.head_kd_weight * share, temperature=cfg.kd_temperature)
        history["loss"].append(run.update(step, loss, t_states))  # the mean over the processes
        history["step"].append(step)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            record(step + 1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val_ce=f"{history['val_ce'][-1]:.3f}")
        run.checkpoint(step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            break
    run.close()
    model.requires_grad_(True)
    if model.teacher_head is not None:
        model.teacher_head.requires_grad_(False)
    model.eval()
    if cfg.head_mode == "new" and _frozen_digest(model) != body:
        raise RuntimeError("Phase 3 changed the frozen body: this is a bug")
    return history


# -------------------------------------------------------------------------------------------------------------
# logit KD of the whole student: plain KD from scratch (Hinton et al.), or after Phase 2, or BitDistill's stage

def _logit_kd_signature(cfg: RunConfig, model: BitNetStudent, cache: TeacherCache, steps: int, start: str) -> dict:
    """What a logit-KD run is made from: the cache's content (TeacherCache.content_digest, not its folder: a cache
    rebuilt in its folder from other data is another run), its settings and `start`, the digest of every weight it
    starts from."""
    keys = ("batch_size", "logit_kd_lr", "logit_kd_alpha", "logit_kd_temperature", "embed_lr_mult", "warmup_steps",
            "min_lr_ratio", "weight_decay", "grad_clip", "seed")
    return {"cache": cache.content_digest, "student": asdict(model.cfg), "steps": steps, "start": start,
            "precision": precision_policy(model.tok_embeddings.weight.device, cfg.precision).name,
            **{k: getattr(cfg, k) for k in keys}, "batch_size": cfg.batch_size * world().num_processes}


def _moved_start():
    raise PhaseOrderError("Phase 4 starts from the student Phases 2 and 3 leave, but an earlier Phase 4 has moved the "
                          "student in memory (stopped before its first checkpoint, or run with other settings) and no "
                          "checkpoint resumes this one: " + in_notebook(
                              "rerun cells 5 and 6 (they load the finished Phase 2 and refit the head), then this cell",
                              "call train_superposition and train_lm_head again, then train_logit_kd"))


def train_logit_kd(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, steps: int | None = None,
                   progress: bool = True, checkpoint: bool = False, fresh: bool = False) -> dict:
    """Logit KD of the whole student, body, embedding and head together, from whatever weights it holds.

    Loss a batch, over the B * (T-1) positions that have a next token, in nats/token:
        alpha * CE(student, next token) + (1 - alpha) * T^2 * KL(p_teacher || p_student) at temperature T,
    alpha = cfg.logit_kd_alpha, T = cfg.logit_kd_temperature (Hinton et al., 2015; DistillKit's default loss).
    The teacher's logits (B * (T-1), V) are its cached LM head over its cached final-normed states, so no logit
    cache is needed; they are computed chunk by chunk in the precision policy's dtype inside the fused head loss
    (head_loss with ce_weight), which runs the student's head once a chunk for both terms.
    From a fresh build_student this is plain logit KD (recipe arm (c)); after Phase 2 and Phase 3's head fit it
    is the optional phase that trains the whole student (arm (d)); with a SubLN student at T = 5 it is the
    logit part of BitDistill's distillation stage (Wu et al., 2025, arm (e)). Only head_mode 'new' has a head
    of its own. AdamW at cfg.logit_kd_lr (the embedding at lr * embed_lr_mult), warmup then cosine decay over
    `steps` (default cfg.logit_kd_steps), clipping over every trainable weight, seed cfg.seed + 2 for batches.
    checkpoint=True checkpoints every cfg.ckpt_every steps ("logit_kd") and resumes a run with the same
    settings and the same starting weights; fresh=True ignores it. Returns {"step", "loss", "lr", "skipped",
    "eval_step", "val_ce"}: the held-out CE (nats/token, held_out_ce) before the first step, every
    cfg.eval_every steps and after the last.
    Raises ConfigError for head_mode other than 'new', a batch larger than the cache, or an unwritable RUN_DIR;
    the fault guard's errors (see train_superposition) for non-finite losses.
    """
    steps = cfg.logit_kd_steps if steps is None else steps
    if model.cfg.head_mode != "new" or model.head is None:
        raise ConfigError(f"logit KD trains the student's own head: head_mode={model.cfg.head_mode!r} has none; "
                          "set HEAD_MODE = 'new'")
    check_batch_size(cfg.batch_size * world().num_processes, cache.num_train, f"the {cache.num_train} cached blocks")
    if checkpoint:
        check_writable(cfg.run_dir, "RUN_DIR")
    device = model.tok_embeddings.weight.device
    history = {"step": [], "loss": [], "lr": [], "skipped": [], "eval_step": [], "val_ce": []}
    if steps == 0:
        return history
    model.requires_grad_(True)
    if model.teacher_head is not None:
        model.teacher_head.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith(("projector.", "teacher_head."))]
    names = [n for n in model.state_dict() if not n.startswith("teacher_head.")]
    key = "logit_kd" if checkpoint else None
    every = ("teacher_head.",)  # the digest skips only the frozen teacher head: this phase trains all the rest
    # an earlier Phase 4 moved the weights: its start is this one's too (Phases 2 and 3 set a new one), so its
    # checkpoint resumes (or finds it done), and other settings ask for Phases 2 and 3 rather than train on from there
    now = _frozen_digest(model, every)
    start = getattr(model, "logit_kd_start", None) or now
    signature = _logit_kd_signature(cfg, model, cache, steps, start) if checkpoint else None
    mark = getattr(model, "logit_kd_result", None)  # a finished run with these settings left these weights
    if checkpoint and not fresh and mark is not None and mark["digest"] == now and mark["signature"] == signature:
        print("logit KD: already done")
        return mark["history"]
    lr = cfg.logit_kd_lr
    run = Phase("logit KD", model, params, cfg, lr=lr, steps=steps, warmup=min(cfg.warmup_steps, steps // 10),
                seed=cfg.seed + 2, lr_fix=f"Lower {setting('logit_kd_lr')} (now {lr})", history=history, key=key,
                signature=signature, names=names, embedding=model.tok_embeddings.weight,
                embed_lr_mult=cfg.embed_lr_mult, weight_decay=cfg.weight_decay, fresh=fresh, cache_path=cache.path,
                restart=_moved_start if start != now else None)
    history, policy = run.history, run.policy
    teacher_head = _frozen_teacher_head(cache, device, policy.autocast)
    alpha, temperature = cfg.logit_kd_alpha, cfg.logit_kd_temperature
    model.logit_kd_start = start if checkpoint else None
    for k in ("eval_step", "val_ce"):  # a checkpoint written before the phase recorded them
        history.setdefault(k, [])

    def record(step):  # the held-out CE of the student as it is now (the body moves: its states are recomputed)
        history["eval_step"].append(step)
        history["val_ce"].append(held_out_ce(model, cache, precision=cfg.precision))
        model.train()

    if not history["val_ce"]:  # a fresh start (or a checkpoint that kept none): the CE it starts from
        record(run.start)
    model.train()
    bar = run.bar("logit KD: whole student", progress)
    for step in bar:
        idx = run.batch(cache.num_train)
        tokens = cache.tokens("train", idx).to(device)  # (B, T)
        t_states = cache.states("train", idx)[:, :-1].to(device).flatten(0, 1)  # (B * (T-1), D): state t -> token t+1
        lr_now = run.lr
        with _cuda_oom_hint(), _autocast(policy):
            h = model(tokens)[:, :-1].flatten(0, 1)  # (B * (T-1), dim)
            loss = head_loss(h, *model.head_weights(), policy, targets=tokens[:, 1:].flatten(),
                             teacher_logits=_teacher_logits(teacher_head, t_states), temperature=temperature,
                             ce_weight=alpha)
        history["loss"].append(run.update(step, loss, t_states))  # the mean over the processes
        history["step"].append(step)
        history["lr"].append(lr_now)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            record(step + 1)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val_ce=f"{history['val_ce'][-1]:.3f}")
        run.checkpoint(step + 1)
    run.close()
    model.eval()
    model.phase2_result = None  # the body has moved: Phase 3 would no longer decode a finished Phase 2 student
    if checkpoint and len(history["step"]) == steps:
        model.logit_kd_result = {"signature": signature, "digest": _frozen_digest(model, every), "history": history}
    return history


# -------------------------------------------------------------------------------------------------------------
# the student's own files: save/load, the packed 1.6-bit ternary file, and every export at once

def _read_config(path: Path, fmt: str) -> StudentConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}: save a student there first")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.pop("format", None) != fmt:
            raise ValueError(f"format is not {fmt}")
        return StudentConfig(**raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt or not a Spoon Feed config ({e}): save the student again") from e


def _write_config(path: Path, cfg: StudentConfig, fmt: str):
    _atomic_write_text(path / "config.json", json.dumps({"format": fmt, **asdict(cfg)}, indent=1))


def save_pretrained(model: BitNetStudent, path):
    """config.json + model.safetensors (student, projector, head; the teacher head only in teacher mode).
    Files are written under temp names and renamed, config.json last; a failure leaves no temp file behind.
    Raises ConfigError, before anything is written, when path is a file or a folder that holds other things and
    no earlier save (_check_destination), and NonFiniteLossError for non-finite weights."""
    from safetensors.torch import save_file

    _check_finite(model)
    folder = _check_destination(path, "safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.head_mode != "teacher":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("teacher_head.")}
    with _replacing(folder / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        _normal_mode(tmp)
    _write_config(folder, model.cfg, FORMAT)
    return Path(path)


def load_pretrained(path, device="cpu") -> BitNetStudent:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path, FORMAT)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: save the student again")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is corrupt ({e}): save the student again") from e
    model = BitNetStudent(cfg)
    if "teacher_head.weight" in tensors:
        model.attach_teacher_head(tensors["teacher_head.weight"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {weights} do not match its config.json: they come from different "
                         f"students ({str(e).splitlines()[0]}...)") from e
    return model.to(device).eval()


TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256, so five ternary digits fit one byte: 1.6 bits per weight


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def pack_ternary(q: torch.Tensor) -> np.ndarray:
    """{-1, 0, +1} values -> uint8, five base-3 digits a byte."""
    digits = (q.detach().cpu().reshape(-1).to(torch.int8) + 1).numpy().astype(np.uint8)  # {0, 1, 2}
    digits = np.pad(digits, (0, -len(digits) % TRITS_PER_BYTE)).reshape(-1, TRITS_PER_BYTE)
    return (digits * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, n: int) -> torch.Tensor:
    digits = (packed[:, None] // _POW3) % 3  # (bytes, 5)
    return torch.from_numpy(digits.reshape(-1)[:n].astype(np.float32) - 1)


def export_ternary(model: BitNetStudent, path) -> dict:
    """Packed file: every BitLinear at 1.6 bits a weight plus its fp32 scale; embedding, norms, projector and
    heads in float16. Returns sizes for the notebook's printout. Written as save_pretrained writes (temp names,
    config.json last, no temp file left on failure); the same ConfigError for a destination that is a file or a
    folder holding other things and no earlier export_ternary."""
    from safetensors.torch import save_file

    _check_finite(model)
    path = _check_destination(path, "ternary")
    path.mkdir(parents=True, exist_ok=True)
    tensors, ternary_weights = {}, 0
    bl = dict(model.bitlinears())
    for name, m in bl.items():
        q, scale = quantize_weight(m.weight.detach().cpu())
        tensors[f"{name}.packed"] = torch.from_numpy(pack_ternary(q))
        tensors[f"{name}.scale"] = scale.reshape(1).float()
        ternary_weights += q.numel()
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in bl and not (k.startswith("teacher_head.") and model.cfg.head_mode != "teacher"):
            tensors[k] = v.detach().cpu().half().contiguous()
    with _replacing(path / "ternary.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": TERNARY_FORMAT})
        _normal_mode(tmp)
    _write_config(path, model.cfg, TERNARY_FORMAT)
    ternary_bytes = sum(tensors[f"{n}.packed"].numel() for n in bl)
    fp_numel = sum(v.numel() for k, v in tensors.items() if not k.endswith((".packed", ".scale")))
    return {"file_bytes": (path / "ternary.safetensors").stat().st_size, "ternary_weights": ternary_weights,
            "ternary_bytes": ternary_bytes, "bits_per_ternary_weight": 8 * ternary_bytes / max(1, ternary_weights),
            "fp32_latent_bytes": 4 * (fp_numel + ternary_weights)}  # what save_pretrained writes, in fp32


def format_sizes(sizes: dict) -> str:
    return (f"packed ternary file: {sizes['file_bytes'] / 2**20:.2f} MiB vs fp32 latent weights "
            f"{sizes['fp32_latent_bytes'] / 2**20:.2f} MiB ({sizes['fp32_latent_bytes'] / sizes['file_bytes']:.1f}x "
            f"smaller)\nternary part: {sizes['ternary_weights'] / 1e6:.2f}M weights in "
            f"{sizes['ternary_bytes'] / 2**20:.2f} MiB = {sizes['bits_per_ternary_weight']:.2f} bits a weight; "
            "embedding, norms, projector and head in float16")


def load_ternary(path, device="cpu") -> BitNetStudent:
    """Rebuild a student from export_ternary. Its eval logits equal the source model's (with the source's
    full-precision parts rounded to float16) exactly: the ternary weights are rebuilt bit for bit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path, TERNARY_FORMAT)
    try:
        tensors = load_file(path / "ternary.safetensors")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / 'ternary.safetensors'} is missing or corrupt ({e}): export again") from e
    model = BitNetStudent(cfg)
    if "teacher_head.weight" in tensors:
        model.attach_teacher_head(tensors["teacher_head.weight"].float())
    state = model.state_dict()
    for k in state:
        owner = k.rsplit(".", 1)[0]
        if f"{owner}.packed" in tensors:
            continue
        if k not in tensors:
            raise ValueError(f"{path / 'ternary.safetensors'} lacks {k}: it does not match its config.json")
        state[k] = tensors[k].float()
    model.load_state_dict(state)
    model.eval()
    for name, m in model.bitlinears():
        q = unpack_ternary(tensors[f"{name}.packed"].numpy(), m.weight.numel()).view_as(m.weight)
        scale = tensors[f"{name}.scale"][0]
        m.pin_ternary(q, scale)  # the exact ternary weight, for as long as the latent weight is left as written
    return model.to(device)


def export_all(student: BitNetStudent, tokenizer, run_dir, cache: TeacherCache | None = None,
               cfg: RunConfig | None = None, report: dict | None = None, gguf_qtype: str = "TQ2_0") -> dict:
    """The notebook's save cell: safetensors (student/), packed ternary (student-ternary/), the HF folder
    (student-hf/) and the GGUF (student.gguf), printing sizes. Every destination is checked before anything is
    written (check_export_destinations), and gguf_qtype too (check_export_settings). The Llama forms are skipped,
    with the reason printed, for head_mode='teacher'; a GGUF whose rows do not fit the ternary blocks falls back
    to F16 (gguf_qtype_for); a tokenizer that GGUF metadata cannot describe skips the GGUF, with the reason
    printed. A skipped form's earlier export in run_dir is removed, with a line saying so, so that nothing stale
    sits beside this run's files. Returns {format: path} for what was written.
    Raises ConfigError, before anything is written, for an invalid gguf_qtype, a student the HF form cannot hold
    (export_hf's checks), or a destination in the way."""
    run_dir = Path(run_dir)
    why = ("head_mode='teacher' has no Llama form (set HEAD_MODE = 'new')" if student.cfg.head_mode == "teacher" else
           "a SubLN student (subln=True) has no Llama form" if student.cfg.subln else None)
    llama = why is None
    if llama:
        check_export_settings(gguf_qtype=gguf_qtype)
        _check_hf_exportable(student, tokenizer)
    paths = check_export_destinations(run_dir, student.cfg.head_mode if llama else "teacher")
    out = {"safetensors": save_pretrained(student, paths["safetensors"])}
    sizes = export_ternary(student, paths["ternary"])
    out["ternary"] = paths["ternary"]
    print(format_sizes(sizes))
    if not llama:
        print(f"HF folder and GGUF skipped: {why}")
        for kind in ("hf", "gguf"):
            _remove_stale(run_dir / RUN_DIR_EXPORTS[kind], kind, f"this run writes no {kind.upper()} form ({why})")
        return out
    lm_head = llama_head(student, cache)  # the bias fold and its figures, once for both Llama forms
    out["hf"] = export_hf(student, tokenizer, paths["hf"], cache, cfg, report, lm_head)
    qtype = gguf_qtype_for(student, gguf_qtype)
    try:
        out["gguf"] = export_gguf(student, tokenizer, paths["gguf"], qtype, cache, lm_head=lm_head)
    except ConfigError as e:  # a tokenizer GGUF cannot describe: the other three forms are kept
        print(f"GGUF skipped: {e}")
        _remove_stale(paths["gguf"], "gguf", "this run writes no GGUF")
    for k in ("hf", "gguf"):
        if k not in out:
            continue
        p = out[k]
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        print(f"{k}: {p} ({size / 2**20:.2f} MiB)" + (f", {qtype}" if k == "gguf" else ""))
    return out


# -------------------------------------------------------------------------------------------------------------
# the ablation: does ternary superposition help?

def train_direct_ce(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True) -> dict:
    """Ablation arm (c): the same student and head trained with next-token CE on the same tokens, no teacher.
    Same precision (precision_policy, GradScaler in fp16) and the same fused head loss as Phase 3 (head_loss):
    the T-1 positions that have a target, inside the out-of-memory hint. cfg.compile compiles the student's
    forward, as in Phase 2."""
    device = model.tok_embeddings.weight.device
    steps = cfg.superposition_steps + cfg.lm_head_steps  # the same number of optimiser steps as (a) and (b)
    run = Phase("ablation (direct CE)", model, model.parameters(), cfg, lr=cfg.lr, steps=steps,
                warmup=cfg.warmup_steps, seed=cfg.seed, lr_fix=f"Lower {setting('lr')} (now {cfg.lr})",
                embedding=model.tok_embeddings.weight, embed_lr_mult=cfg.embed_lr_mult, weight_decay=cfg.weight_decay,
                compiled=cfg.compile)
    losses = []
    model.train()
    for step in run.bar("ablation: direct CE", progress):
        tokens = cache.tokens("train", run.batch(cache.num_train)).to(device)  # (B, T)
        with _cuda_oom_hint(), _autocast(run.policy):
            h = _forward(_states, cfg)(model, tokens)[:, :-1].flatten(0, 1)  # (B * (T-1), dim): t predicts t+1
            loss = head_loss(h, *model.head_weights(), run.policy, targets=tokens[:, 1:].flatten())
        losses.append(run.update(step, loss))
    run.close()
    model.eval()
    return {"loss": losses}


def run_ablation(cache: TeacherCache, cfg: RunConfig, progress: bool = True) -> dict:
    """Arms at equal width, data and optimiser steps (ABLATION_STEPS, then ABLATION_HEAD_STEPS of Phase 3 or, under
    RECIPE "spoonfeed+kd", of Phase 4): (a) ternary and (b) full precision, both trained by RECIPE, (c) ternary +
    direct next-token CE, optionally over several widths; and at the main width the ternary student trained by
    the other recipe (RECIPES: the strongest alternative in docs/recipes.md), arm ("recipe <name>", width).
    One seed. Arms with the same Phase 2 (the recipes share it: ternary, same width) train it once: the later arm
    loads the earlier one's finished Phase 2 checkpoint (RunConfig.ablation_arms names its folder: the same weights
    it would train, in a fraction of the time). Returns {"arms": {(arm, width): {"cosine", "ce" (nats/token)}},
    "widths", "baseline_cosine", "teacher_ce", "recipe", "other_recipe", "verdict"} (ablation_verdict)."""
    arms = {}
    plan = cfg.ablation_arms()
    for arm, width, ternary, acfg, phase2_dir in plan:
        model = build_student(acfg, cache, ternary=ternary)
        train_superposition(model, cache, dataclasses.replace(acfg, run_dir=phase2_dir), progress=progress)  # resumable
        train_lm_head(model, cache, acfg, progress=progress)
        if "logit_kd" in recipe_phases(acfg.recipe):
            train_logit_kd(model, cache, acfg, progress=progress, checkpoint=True)
        m = evaluate(model, cache, precision=cfg.precision, via_teacher_head=False)["metrics"]
        arms[(arm, width)] = {"cosine": m["student_cosine"], "ce": m["student_ce"]}
        del model  # before the next arm is built: one arm in memory at a time
        release_memory()
        if arm == "full precision":  # (c) at this width: the same budget, no checkpoint
            dcfg = dataclasses.replace(acfg, run_dir=cfg.run_dir)
            model = build_student(dcfg, cache)
            train_direct_ce(model, cache, dcfg, progress=progress)
            m = evaluate(model, cache, precision=cfg.precision, via_teacher_head=False)["metrics"]
            arms[("direct CE", width)] = {"cosine": float("nan"), "ce": m["student_ce"]}
            del model
            release_memory()
    result = {"arms": arms, "widths": tuple(dict.fromkeys(w for _, w, *_ in plan)), "recipe": cfg.recipe,
              "baseline_cosine": m["baseline_cosine"], "teacher_ce": m["teacher_ce"], "other_recipe": plan[-1][3].recipe}
    result["verdict"] = ablation_verdict(result)
    return result
