"""Generation: a KV cache, transformers' logits processors, batched left-padded prompts and streamed text."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .compile import Compiled
from .errors import ConfigError, PromptTooLongError
from .precision import precision_policy

if TYPE_CHECKING:
    from .config import StudentConfig


class KVCache:
    """Preallocated keys and values for every layer: (L, B, nh, slots, hs), slots = max_seq_len unless given.

    pad: (B,) left-padding of each row (generate's attention_mask, transformers' convention): row b's first
    pad[b] slots hold no token, are masked out of attention, and its tokens' positions start at 0 after them."""

    static = False  # the model's forward slices this cache by Python ints (see StaticKVCache)

    def __init__(self, cfg: StudentConfig, batch: int, device, dtype=torch.float32, slots: int | None = None,
                 pad: torch.Tensor | None = None):
        shape = (cfg.n_layers, batch, cfg.n_heads, slots or cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # slots already filled
        self.pad = pad if pad is not None and bool(pad.any()) else None  # None: no row is padded

    @property
    def slots(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class StaticKVCache(KVCache):
    """A KVCache for a compiled decode step: every slot is attended under a mask, and the next slot is a tensor.

    k, v: (L, B, nh, slots, hs) as KVCache's; pos: a 0-dim int64 tensor; pad: (B,) int64, zeros for unpadded rows.
    A step of T tokens writes slots pos..pos+T-1 and attends to all `slots` with a (B, 1, T, slots) mask that
    hides the empty slots and each row's padding, so every decode step has the same shapes and values change
    only inside tensors: torch.compile(dynamic=False) compiles the step once for a (batch, slots) pair. The
    model's forward asks it for the positions and the mask (rope_and_mask); positions are not checked there.
    """

    static = True

    def __init__(self, cfg: StudentConfig, batch: int, device, dtype=torch.float32, slots: int | None = None,
                 pad: torch.Tensor | None = None):
        super().__init__(cfg, batch, device, dtype, slots)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.keys = torch.arange(self.slots, device=device)  # (S,)

    def rope_and_mask(self, rope_cos, rope_sin, T: int):
        """The rotary tables at each row's positions, (B, 1, T, hs) twice, and the attention mask (B, 1, T, S):
        row b's token at slot s sees slots pad[b]..s; a padding slot sees itself (no all-masked row, no NaN)."""
        slot = self.pos + torch.arange(T, device=self.keys.device)  # (T,)
        pos = (slot[None] - self.pad[:, None]).clamp(min=0)  # (B, T)
        key, slot = self.keys[None, None], slot[None, :, None]  # (1, 1, S), (1, T, 1)
        mask = ((key >= self.pad[:, None, None]) & (key <= slot)) | (key == slot)  # (B, T, S)
        return rope_cos[pos][:, None], rope_sin[pos][:, None], mask[:, None]

    def update(self, layer: int, k, v):
        slot = self.pos + torch.arange(k.size(2), device=k.device)  # (T,)
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]  # (B, nh, S, hs): every slot, the mask hides the empty ones


MIN_TEMPERATURE = 1e-4  # logits / 1e-4 stay finite in float32; smaller temperatures overflow the softmax


def check_generation_settings(max_new_tokens=30, temperature=0.7, top_k=None, top_p=None, min_p=None,
                              repetition_penalty=1.0) -> None:
    """Raise one ConfigError, naming the form setting, for a generation setting outside its range.

    max_new_tokens (MAX_NEW_TOKENS): an int >= 1. temperature (TEMPERATURE): >= 0, and 0 is greedy decoding.
    top_k (TOP_K): an int >= 0, or None; 0 and None keep every token. top_p (TOP_P): in [0, 1], or None; 1 and
    None keep every token. min_p: in [0, 1], or None. repetition_penalty: > 0, and 1 is none (CTRL, Keskar et
    al. 2019). The ranges are those of transformers' logits processors, except that temperature 0 means greedy.
    """
    import numbers

    def number(v, kind=numbers.Real):  # numpy scalars count; bools, NaN and inf do not
        return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)

    if not number(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ConfigError(f"MAX_NEW_TOKENS={max_new_tokens!r} must be a whole number of 1 or more")
    if not number(temperature) or not (temperature == 0 or MIN_TEMPERATURE <= temperature):
        raise ConfigError(f"TEMPERATURE={temperature!r} must be 0 (greedy decoding) or a finite number >= "
                          f"{MIN_TEMPERATURE} (below that the scaled logits overflow)")
    if top_k is not None and (not number(top_k, numbers.Integral) or top_k < 0):
        raise ConfigError(f"TOP_K={top_k!r} must be a whole number >= 0 (0 keeps every token)")
    if top_p is not None and (not number(top_p) or not 0 <= top_p <= 1):
        raise ConfigError(f"TOP_P={top_p!r} must be a number in [0, 1] (1 keeps every token)")
    if min_p is not None and (not number(min_p) or not 0 <= min_p <= 1):
        raise ConfigError(f"min_p={min_p!r} must be a number in [0, 1], or None to turn it off")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1 is no penalty)")


def logits_processors(temperature=0.7, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    """transformers' LogitsProcessorList for these settings, in the order `GenerationMixin.generate` builds it:
    repetition penalty, then (sampling only) temperature, top-k, top-p, min-p. A setting at its neutral value
    (temperature 1, top_k 0/None, top_p 1/None, min_p None, repetition_penalty 1) adds no processor, as there.

    Boundary rules are transformers': top-p keeps the smallest set of most probable tokens whose probability
    reaches top_p ([0.5, 0.3, 0.1, 0.1] at 0.8 keeps {0, 1}), and among tied tokens it keeps only as many as
    that needs (four equal tokens at 0.5: two). Raises ConfigError (check_generation_settings).
    """
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    check_generation_settings(1, temperature, top_k, top_p, min_p, repetition_penalty)
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature == 0:  # greedy: transformers runs only the processors above, then argmax
        return procs
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    if min_p is not None:
        procs.append(MinPLogitsWarper(float(min_p)))
    return procs


def _sample_next(logits, input_ids, processors, do_sample: bool, generator=None):
    """One step of transformers' sampling loop. logits: (B, V); input_ids: (B, T) so far -> next ids (B,).

    scores = processors(input_ids, logits in fp32); then argmax (greedy) or one multinomial draw from
    softmax(scores), as `GenerationMixin._sample` does, with `generator` for reproducible draws.
    """
    scores = processors(input_ids, logits.float())  # (B, V)
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):  # one generator a row: a row's draws do not depend on the others
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode_head(model: nn.Module, dtype: torch.dtype | None = None):
    """The head as decoding uses it: h (B, dim) -> logits (B, vocab) float32. With dtype (bf16), the new or tied
    head's weight is cast once, here, and each token reads half the bytes; with None it is read in float32 as it
    is (the new or tied head's F.linear, the teacher head over the projector through model.logits). Not for
    training: a cast copy does not follow later weight writes."""
    weight, bias = _head_weights(model, dtype)
    return lambda h: _logits(model, h, weight, bias)


def _head_weights(model: nn.Module, dtype: torch.dtype | None):
    """(weight (V, dim), bias (V,) or None) cast to dtype once (None: as they are), for decode_head; (None, None)
    for the teacher head, which runs as model.logits."""
    mode = model.cfg.head_mode
    if mode == "teacher":
        return None, None
    weight = (model.head.weight if mode == "new" else model.tok_embeddings.weight).detach()
    bias = model.head.bias.detach() if mode == "new" and model.head.bias is not None else None
    if dtype is None:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _logits(model: nn.Module, h, weight, bias):
    """h (B, dim) -> logits (B, V) float32, through (weight, bias) from _head_weights or through model.logits.

    Compiled, one row: a multiply-sum over the weight in its own dtype, accumulated and returned in float32, which
    inductor fuses into one pass over the weight (faster than the bf16 matmul at one row in side-by-side runs on
    this project's CPU, and float32 logits where the bf16 matmul rounds them to bf16). Eager, or several rows:
    F.linear in the weight's dtype (the bf16 matmul's logits are bf16, read back as float32)."""
    if weight is None:
        return model.logits(h).float()
    if torch.compiler.is_compiling() and h.size(0) == 1:  # several rows would read the weight once each
        out = (h.float()[:, None, :] * weight.float()).sum(-1)  # (1, V)
        return out if bias is None else out + bias.float()
    return F.linear(h.to(weight.dtype), weight, bias).float()


def _decode_step(model: nn.Module, ids, cache, weight, bias):
    """One token a row through the student and its head: ids (B, 1) -> logits (B, V) float32. What COMPILE
    compiles for decoding (with a StaticKVCache: the same shapes at every step)."""
    return _logits(model, model(ids, cache)[:, -1], weight, bias)


def _decode_greedy(model: nn.Module, ids, cache, weight, bias):
    """_decode_step's argmax: ids (B, 1) -> next ids (B,), greedy decoding with no logits processor (then the
    argmax of the logits is the token, as _sample_next picks it), inside the compiled step."""
    return _decode_step(model, ids, cache, weight, bias).argmax(dim=-1)


_DECODE = Compiled(_decode_step, "the decode step")
_DECODE_GREEDY = Compiled(_decode_greedy, "the greedy decode step")


@torch.no_grad()
def generate(model: nn.Module, idx, max_new_tokens=30, temperature=0.7, top_k=None, top_p=None,
             eos_token_id=None, generator=None, *, min_p=None, repetition_penalty=1.0, pad_token_id=None,
             streamer=None, precision: str = "auto", attention_mask=None, compile: bool = False):
    """KV-cached decoding with transformers' logits processors (see logits_processors). idx: (B, T0) token ids,
    T0 >= 1 -> (B, T0 + n) with n <= max_new_tokens. Temperature 0 is greedy.

    attention_mask: (B, T0), 1 for prompt tokens and 0 for left padding (transformers' convention), so that
    prompts of different lengths decode together; a row's positions start at its first token and its padding is
    never attended, so each row decodes as it would alone (to float rounding). generator: a torch.Generator,
    or a list of one per row (then a row's draws do not depend on the other rows).

    A row that has produced eos_token_id is filled with pad_token_id (default: eos_token_id) after it, and
    decoding stops when every row is done. Past the student's max_seq_len it stops with a warning. `streamer`
    follows transformers' convention: put(prompt ids (B, T0)), put(new ids (B,)) per step, then end().
    The ternary weights are quantized once per call (quantize_once), on a CPU into int8 (quantize_once(int8=True):
    exact integer sums, the float path's values to float rounding, a quarter of its bytes). Decoding reads every
    weight once a token for one row of activations; where precision_policy chooses bf16 for `precision`, the LM
    head (49152 x dim, most of what is read) is read in bf16 (decode_head), and the body's activations stay
    float32 around the int8 matmuls: at one row this CPU's bf16 matmul is slower (docs/benchmarks.md). The
    logits are sampled in float32.
    compile=True (the COMPILE setting) decodes each token through _decode_step compiled by torch.compile, with a
    StaticKVCache of the student's max_seq_len slots: the step is compiled once for a batch size (the first call
    pays for it, reported apart) and the prompt runs eager. Greedy decoding with no logits processor takes the
    argmax inside the step (_decode_greedy), and one row's head is a fused pass with float32 sums (_logits). It
    gives the eager path's results to float rounding (tests: the static cache's logits within 1e-5 of the growing
    cache's, the same greedy tokens compiled); a compile that fails runs eager (Compiled).
    Raises ConfigError for a setting out of range and for a token id the student does not know (in idx, padding
    included, or eos_token_id / pad_token_id, which are fed back to it: check_token_ids), PromptTooLongError (a
    ValueError) when T0 >= max_seq_len, ValueError for an empty idx; all before any forward.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    check_token_ids(model.cfg.vocab_size, {"the prompt ids": idx.flatten().tolist(), "eos_token_id": eos_token_id,
                                           "pad_token_id": pad_token_id})
    B, T0 = idx.shape
    limit = model.cfg.max_seq_len
    if T0 == 0:
        raise ValueError("the prompt has no tokens: start it from the document separator (EOS), as generate_text "
                         "does for an empty prompt")
    left = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=idx.device).bool()
        if mask.shape != idx.shape or not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(f"attention_mask must be (B, T0) = {tuple(idx.shape)}, 0 for left padding then 1 for "
                             "every prompt token (pad on the left, as tokenizer(padding_side='left') does)")
        left = (~mask).sum(dim=1)  # (B,) left padding of each row
    longest = T0 - (0 if left is None else int(left.min()))
    if longest >= limit:
        raise PromptTooLongError(_too_long(longest, limit))
    if longest + max_new_tokens > limit:
        warnings.warn(f"stopping after {limit - longest} new tokens: the student's max_seq_len is {limit}")
        max_new_tokens = limit - longest
    processors = logits_processors(temperature, top_k, top_p, min_p, repetition_penalty)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    model.eval()
    ids = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)  # prompt + new tokens
    ids[:, :T0] = idx
    if left is not None:  # the processors see each row's first token in its padding: the same set of tokens
        first = idx.gather(1, left[:, None])  # (B, 1)
        ids[:, :T0] = torch.where(mask, idx, first)
    t = T0
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    # compiled, the first decode step prints its compile line: the stream starts after it, not around it
    held = [] if streamer is not None and compile else None

    def stream(tokens):  # (B, n) ids to the streamer, or held until the first compiled step has run
        (held.append if held is not None else streamer.put)(tokens.cpu())

    def release():  # what was held, to the streamer; from now on it streams as it comes
        nonlocal held
        for tokens in held or ():
            streamer.put(tokens)
        held = None

    if streamer is not None:
        stream(idx)
    weight, bias = _head_weights(model, precision_policy(idx.device, precision).autocast)
    dtype = model.tok_embeddings.weight.dtype
    if compile:  # every call the same shapes: the student's whole context
        cache = StaticKVCache(model.cfg, B, idx.device, dtype, limit, left)
    else:
        cache = KVCache(model.cfg, B, idx.device, dtype, T0 + max_new_tokens, left)
    greedy = temperature == 0 and len(processors) == 0  # the step itself returns the argmax
    step_fn = {(False, False): _decode_step, (False, True): _decode_greedy, (True, False): _DECODE,
               (True, True): _DECODE_GREEDY}[compile, greedy]
    with model.quantize_once(int8=idx.device.type == "cpu"):
        out = _logits(model, model(idx, cache)[:, -1], weight, bias)  # (B, V) float32: the prompt's last position
        for step in range(max_new_tokens):
            # (B,): out is the logits (B, V), or after the prompt the greedy step's ids (B,)
            nxt = out if out.dim() == 1 else _sample_next(out, ids[:, :t], processors, temperature > 0, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, pad)  # finished rows get padding, as in transformers
                done |= nxt == eos_token_id
            ids[:, t] = nxt
            t += 1
            if streamer is not None:
                stream(nxt)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = step_fn(model, nxt[:, None], cache, weight, bias)  # (B, V) float32, or (B,) ids
            release()
    if streamer is not None:
        release()
        streamer.end()
    ids[:, :T0] = idx
    return ids[:, :t]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids the student gets for a prompt, under the rules that built its training blocks (pack_blocks):
    the text is tokenized with add_special_tokens=False, so no BOS (or other special token) the packer never
    added is fed to the student.

    An empty prompt (or one that tokenizes to nothing, such as whitespace under a word-level tokenizer) becomes
    [EOS]. The packer joins documents with EOS, so EOS is the token the student saw before every document start;
    a tokenizer's BOS (SmolLM2-Instruct's is <|im_start|>) never occurs in the blocks. Only a tokenizer with no
    EOS falls back to BOS. Raises ConfigError when the tokenizer has neither.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if ids:
        return list(ids)
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise ConfigError("an empty prompt needs the tokenizer's EOS (or BOS) token to start from, and this "
                          "tokenizer has neither: give a non-empty prompt")
    return [start]


@dataclass
class Generation:
    """One prompt's result from generate_text: the text (prompt + continuation, special tokens skipped), the
    number of new tokens, and the reason when the prompt could not be generated (then text is "")."""

    prompt: str
    text: str
    new_tokens: int = 0
    error: str | None = None


def generate_text(model, tokenizer, prompts, max_new_tokens=30, temperature=0.7, top_k=50, top_p=0.95, seed=0,
                  *, min_p=None, repetition_penalty=1.0, streamer=None, precision: str = "auto",
                  compile: bool = False) -> list[Generation]:
    """Decode a list of prompts with `generate`; the notebook's generation cell.

    Without a streamer the prompts decode together, left-padded into one batch (generate's attention_mask), so
    the LM head, most of what decoding reads, is read once a step for all of them. With a `streamer` (a
    transformers BaseStreamer, e.g. TextStreamer(tokenizer, skip_special_tokens=True), which takes one row) they
    decode one at a time, each streamed as it is produced, then end(). Either way, prompt i (its place in the
    list) draws from its own torch.Generator seeded from (seed, i) (numpy SeedSequence), so its text depends
    on the seed, its place and itself, not on the other prompts or on streaming (to float rounding).
    Prompts are tokenized by prompt_ids (the training blocks' special-token rules; an empty prompt starts from
    EOS). A prompt too long for the student is reported in its own Generation.error and skipped; the others still
    generate, exactly as they would with a short prompt in its place. If the longest prompt plus max_new_tokens
    would pass the student's max_seq_len, the prompts decode one at a time, so that each gets its own limit.
    precision and compile: see generate (cfg.precision and cfg.compile in the notebook). Returns one Generation per
    prompt, in order.
    A single string is one prompt. Special tokens written out in a prompt's text (e.g. "<|im_start|>") are
    parsed as those tokens, as they were in the training text.
    Raises ConfigError for a setting out of range (check_generation_settings), a prompt that is not a string, and
    a token id the student does not know (a tokenizer larger than its vocab: check_token_ids, naming the prompts
    and tokens), before any prompt is run.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    if isinstance(prompts, str):  # one prompt, not its characters
        prompts = [prompts]
    prompts = list(prompts)
    bad = [f"prompt {i + 1} is {type(p).__name__} {p!r:.40}" for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"every prompt must be a string: {'; '.join(bad)}. Nothing was generated")
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len
    results = [None] * len(prompts)
    rows = []  # (place, token ids, generator) of the prompts that fit
    ids_of = [prompt_ids(tokenizer, p) for p in prompts]
    check_token_ids(model.cfg.vocab_size, {**{f"prompt {i + 1}": ids for i, ids in enumerate(ids_of)},
                                           "the tokenizer's eos_token_id": tokenizer.eos_token_id,
                                           "the tokenizer's pad_token_id": tokenizer.pad_token_id}, tokenizer)
    for i, (prompt, ids) in enumerate(zip(prompts, ids_of)):
        if len(ids) >= limit:
            results[i] = Generation(prompt, "", 0, f"prompt {i + 1} of {len(prompts)}: {_too_long(len(ids), limit)}")
            continue
        seed_i = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        rows.append((i, ids, torch.Generator(device=device).manual_seed(seed_i)))
    kw = dict(min_p=min_p, repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
              precision=precision, compile=compile)
    longest = max((len(ids) for _, ids, _ in rows), default=0)
    if streamer is None and len(rows) > 1 and longest + max_new_tokens <= limit:
        batch, mask = left_pad([ids for _, ids, _ in rows], tokenizer.eos_token_id or 0, device)
        out = generate(model, batch, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_token_id,
                       [g for _, _, g in rows], attention_mask=mask, **kw)
        outputs = [out[r:r + 1, longest - len(ids):] for r, (_, ids, _) in enumerate(rows)]
    else:
        outputs = [generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
                            tokenizer.eos_token_id, [g], streamer=streamer, **kw) for _, ids, g in rows]
    for (i, ids, _), out in zip(rows, outputs):
        new = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]  # what follows a row's EOS is padding
        results[i] = Generation(prompts[i], tokenizer.decode(ids + new, skip_special_tokens=True), len(new))
    return results


def check_token_ids(vocab_size: int, named: dict, tokenizer=None) -> None:
    """Every token id that reaches the student's embedding must be one it has: 0 <= id < vocab_size. named maps
    what holds the ids (a prompt, eos_token_id) to an id, a list of ids, or None (nothing to check). A tokenizer
    larger than the student's vocab (not the teacher's) gives ids the embedding does not have, which would
    otherwise stop generation mid-way with an IndexError. Raises one ConfigError naming every place and token
    (through tokenizer, when given) and the fix."""
    bad = []
    for what, ids in named.items():
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        out = sorted({int(i) for i in ids if not 0 <= int(i) < vocab_size})
        if out:
            tokens = tokenizer.convert_ids_to_tokens(out[:3]) if tokenizer is not None else None
            shown = ", ".join(f"{i} ({t!r})" if tokens and t is not None else str(i)
                              for i, t in zip(out[:3], tokens or [None] * 3))
            bad.append(f"{what} holds {shown}" + (" ..." if len(out) > 3 else ""))
    if bad:
        size = f" (the tokenizer has {len(tokenizer)} tokens)" if tokenizer is not None else ""
        raise ConfigError(f"token ids the student does not know: {'; '.join(bad)}. Its vocab has {vocab_size} ids, "
                          f"0 to {vocab_size - 1}{size}: generate with the tokenizer of the teacher it was distilled "
                          "from (sf.check_compatible(student, tokenizer) checks the pair). Nothing was generated")


def left_pad(rows: list[list[int]], fill: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> (ids, attention_mask), both (B, longest) long: each row padded with
    `fill` on the left, so that every row ends at the last column, and mask 1 on its tokens, 0 on the padding
    (transformers' padding_side='left' convention; what generate's attention_mask takes)."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), fill, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, longest - len(r):] = 1
    return ids, mask


def _too_long(n: int, limit: int) -> str:
    return (f"the prompt has {n} tokens but the student only knows {limit} positions (max_seq_len): shorten the "
            "prompt, or train with a larger MAX_SEQ_LENGTH")


def format_generations(results: list[Generation]) -> str:
    """Each prompt and its full output (or why it was skipped), as the notebook prints them."""
    rule = "-" * 40
    return "\n".join(f"Prompt: {r.prompt!r}\n" + (f"Output: {r.text!r}" if r.error is None else f"Skipped: {r.error}")
                     + f"\n{rule}" for r in results)


def check_compatible(model: nn.Module, tokenizer=None, teacher_dim: int | None = None):
    """A saved student must fit the tokenizer and teacher it is used with."""
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab is "
                          f"{model.cfg.vocab_size}: use the teacher the student was distilled from")
    if teacher_dim is not None and teacher_dim != model.cfg.teacher_dim:
        raise ConfigError(f"the teacher's width is {teacher_dim} but the student's projector maps to "
                          f"{model.cfg.teacher_dim}: use the teacher the student was distilled from")
