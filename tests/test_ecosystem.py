"""The student in the ecosystem: a stock-transformers checkpoint (Llama + BitNet quantization), a llama.cpp GGUF,
the head bias folded or trained away, and the Hub upload's argument checks. No network."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLED, WORDS, make_tokenizer, tiny_student_config

import spoonfeed.export
import spoonfeed_helpers as sf


def _rounded(model):
    """The student with its full-precision parts rounded to float16, as the exports store them."""
    bl = {n for n, _ in model.bitlinears()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[0] not in bl:
                p.copy_(p.half().float())
    return model.eval()


def _bpe_tokenizer():
    """A tiny BPE tokenizer (64 tokens) trained on the test words: the kind export_gguf writes gpt2 metadata for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


# -----------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("mode", ["new", "tied"])
def test_hf_export_loads_with_plain_from_pretrained_and_matches_the_student(tmp_path, mode):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = _rounded(sf.BitNetStudent(tiny_student_config(head_mode=mode, head_bias=False, n_layers=3)))
    sf.export_hf(model, tok, tmp_path / "hf")
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    assert config["tie_word_embeddings"] == (mode == "tied")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q_proj.dtype == torch.uint8 and q_proj.shape == (16 // 4, 16)  # 4 ternary rows a byte
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert ("lm_head.weight" in f.keys()) == (mode == "new")
        scale = sf.quantize_weight(model.layers[0].attention.wq.weight)[1]
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").item() == pytest.approx(1 / scale.item())

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # offline, no custom code
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    idx = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.logits(model(idx)), rtol=1e-5, atol=1e-5)
    for prompt in sf.ORIGINAL_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ours = sf.generate(model, ids, 12, temperature=0, eos_token_id=tok.eos_token_id)
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)  # generation_config.json: stop at EOS
        assert torch.equal(theirs, ours), prompt


def test_the_model_card_names_the_teacher_data_config_and_figures(tmp_path, tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "head_bias": False})
    model = sf.build_student(cfg, cache)
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)  # a head on an untrained body
    report = sf.evaluate(model, cache)
    sf.export_hf(model, make_tokenizer(), tmp_path / "hf", cache, cfg, report)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert cfg.teacher in card and cfg.dataset in card
    assert f"| student_ce | {report['metrics']['student_ce']:.4f} |" in card
    assert "| lm_head_steps | `20` |" in card


def test_teacher_head_mode_has_no_llama_form_and_is_refused(tmp_path):
    model = sf.BitNetStudent(tiny_student_config(head_mode="teacher"))
    model.attach_teacher_head(torch.randn(64, 24))
    for export in (sf.export_hf, sf.export_gguf):
        with pytest.raises(sf.ConfigError, match="no Llama form.*HEAD_MODE"):
            export(model, make_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_biased_head_needs_the_cache_to_fold_its_bias(tmp_path):
    model = sf.BitNetStudent(tiny_student_config())
    with torch.no_grad():
        model.head.bias.normal_()
    with pytest.raises(sf.ConfigError, match="cache=.*HEAD_BIAS = False"):
        sf.export_hf(model, make_tokenizer(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_constant_bias_exports_exactly_without_the_cache():
    model = sf.BitNetStudent(tiny_student_config())
    with torch.no_grad():
        model.head.bias.fill_(3.0)  # the softmax ignores a shift shared by every logit
    weight, figures = sf.llama_head(model)
    assert torch.equal(weight, model.head.weight) and figures == {}


def test_student_dims_that_cannot_be_packed_four_rows_a_byte_are_refused(tmp_path):
    model = sf.BitNetStudent(tiny_student_config(dim=6, n_heads=3, head_bias=False))
    with pytest.raises(sf.ConfigError, match="multiple of 4.*STUDENT_DIM"):
        sf.export_hf(model, make_tokenizer(), tmp_path / "hf")


# -----------------------------------------------------------------------------
# the head bias


def test_fold_head_bias_is_the_least_squares_fit_of_the_biased_logits():
    feats = torch.randn(300, 8)
    weight, bias = torch.randn(20, 8), torch.randn(20)
    folded = sf.fold_head_bias(weight, bias, feats, ridge=0.0)
    target = feats @ weight.T + (bias - bias.mean())  # (n, V)
    best = torch.linalg.lstsq(feats.double(), target.double()).solution.T.float()  # (V, dim)
    torch.testing.assert_close(folded, best, rtol=1e-4, atol=1e-4)


def test_fold_head_bias_is_exact_when_the_states_carry_a_constant_direction():
    feats = torch.randn(200, 8)
    feats[:, 3] = 0.5  # every state has the same coordinate: the bias can ride on it
    weight, bias = torch.randn(20, 8), torch.randn(20)
    folded = sf.fold_head_bias(weight, bias, feats, ridge=0.0)
    logits, biased = feats @ folded.T, feats @ weight.T + bias
    torch.testing.assert_close(logits - logits.mean(-1, keepdim=True), biased - biased.mean(-1, keepdim=True),
                               rtol=1e-4, atol=1e-4)


def test_export_folds_the_bias_and_prints_the_held_out_ce_before_and_after(tmp_path, tiny_cache, capsys):
    from safetensors.torch import load_file

    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)  # a head on an untrained body
    assert model.head.bias is not None
    sf.export_hf(model, make_tokenizer(), tmp_path / "hf", cache)
    out = capsys.readouterr().out
    assert "held-out CE" in out and "->" in out
    weight, figures = sf.llama_head(model, cache, verbose=False)
    assert figures["ce_with_bias"] == pytest.approx(sf.held_out_ce(model, cache, precision="fp32"))  # fp32 states
    assert f"{figures['ce_with_bias']:.4f} -> {figures['ce_bias_folded']:.4f}" in out
    assert figures["ce_bias_folded"] < figures["ce_bias_dropped"]  # folding beats dropping
    stored = load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"]
    assert torch.equal(stored, weight.half())


def test_head_bias_false_trains_a_bias_free_head_that_exports_exactly(tiny_cache):
    cfg, cache, _ = tiny_cache
    free = sf.make_config(**{**vars(cfg), "head_bias": False})
    model = sf.build_student(free, cache)
    history = sf.train_lm_head(model, cache, free, progress=False, need_phase2=False)
    assert model.head.bias is None and model.cfg.head_bias is False
    assert history["val_ce"][-1] < history["val_ce"][0] or len(history["val_ce"]) == 1
    weight, figures = sf.llama_head(model)  # no cache needed: nothing to fold
    assert torch.equal(weight, model.head.weight) and figures == {}


def test_head_bias_is_part_of_phase_3s_checkpoint_signature_only(tiny_cache):
    cfg, cache, _ = tiny_cache
    free = sf.make_config(**{**vars(cfg), "head_bias": False})
    model = sf.build_student(cfg, cache)
    assert sf._signature(cfg, "phase3", model, cache) != sf._signature(free, "phase3", model, cache)
    assert sf._signature(cfg, "phase2", model, cache) == sf._signature(free, "phase2", model, cache)


def test_head_bias_setting_is_checked():
    assert sf.make_config(head_bias=False).head_bias is False
    assert sf.RunConfig().head_bias is True  # today's behaviour by default
    with pytest.raises(sf.ConfigError, match="HEAD_BIAS='no' must be True or False"):
        sf.make_config(head_bias="no")
    with pytest.raises(sf.ConfigError, match="SEED=True must be a whole number"):
        sf.make_config(seed=True)  # bools are still refused where a number is wanted


# -----------------------------------------------------------------------------
# llama.cpp (GGUF)


def _interleaved_rope(x, theta=10000.0):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotates adjacent pairs (2i, 2i+1). x: (T, nh, hs)."""
    T, _, hs = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hs, 2).float() / hs)
    ang = torch.outer(torch.arange(T).float(), inv)[:, None]  # (T, 1, hs/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_the_qk_permutation_turns_rotate_half_rope_into_llamacpps_interleaved_rope():
    nh, hs, dim, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(nh * hs, dim), torch.randn(nh * hs, dim), torch.randn(T, dim)
    cos, sin = sf.rope_tables(hs, T, 10000.0)
    q = sf.apply_rope((x @ wq.T).view(T, nh, hs).transpose(0, 1), cos, sin)  # (nh, T, hs)
    k = sf.apply_rope((x @ wk.T).view(T, nh, hs).transpose(0, 1), cos, sin)
    q2 = _interleaved_rope((x @ sf._permute_for_llamacpp(wq, nh).T).view(T, nh, hs)).transpose(0, 1)
    k2 = _interleaved_rope((x @ sf._permute_for_llamacpp(wk, nh).T).view(T, nh, hs)).transpose(0, 1)
    torch.testing.assert_close(q2 @ k2.transpose(1, 2), q @ k.transpose(1, 2), rtol=1e-4, atol=1e-4)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def bundled_gguf_tokenizer_fields(bundled_tokenizer):
    """{key: contents} of every tokenizer.* field of the bundled teacher's GGUF, read once (49152 tokens and their
    merges take seconds to parse)."""
    import gguf

    teacher = gguf.GGUFReader(os.path.join(sf.bundled_teacher_dir(), sf.BUNDLED_GGUF))
    return {k: _field(teacher, k) for k in teacher.fields if k.startswith("tokenizer.")}


@pytest.mark.slow
@pytest.mark.xdist_group(BUNDLED)
@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_holds_llama_metadata_the_bundled_tokenizer_and_the_exact_ternary_weights(
        tmp_path, qtype, bundled_tokenizer, bundled_gguf_tokenizer_fields):
    import gguf

    tok = bundled_tokenizer
    cfg = tiny_student_config(vocab_size=len(tok), dim=256, n_heads=4, n_layers=1, head_bias=False, max_seq_len=64)
    model = sf.BitNetStudent(cfg).eval()
    path = sf.export_gguf(model, tok, tmp_path / "s.gguf", qtype=qtype)
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    expected = {"llama.embedding_length": 256, "llama.block_count": 1, "llama.feed_forward_length": 1024,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4, "llama.context_length": 64,
                "llama.rope.dimension_count": 64, "llama.vocab_size": len(tok)}
    assert {k: _field(r, k) for k in expected} == expected
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    teacher = bundled_gguf_tokenizer_fields
    assert "tokenizer.ggml.tokens" in teacher and "tokenizer.ggml.merges" in teacher
    for k in teacher:  # the teacher GGUF's tokenizer, copied key by key
        assert _field(r, k) == teacher[k], k

    tensors = {t.name: t for t in r.tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    for name, m in model.bitlinears():
        layer, sub = name.split(".", 2)[1:]
        t = tensors[f"blk.{layer}.{sf.GGUF_LINEAR_NAMES[sub]}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(m.out_features, m.in_features)
        q, scale = sf.quantize_weight(m.weight)
        want = q * scale
        if sub in ("attention.wq", "attention.wk"):
            want = sf._permute_for_llamacpp(want, cfg.n_heads)
        torch.testing.assert_close(got, want, rtol=0, atol=scale.item() * 2**-11)  # the fp16 block scale
        assert torch.equal(got.sign(), want.sign())  # the ternary pattern itself is exact
    emb = torch.from_numpy(np.asarray(tensors["token_embd.weight"].data, dtype=np.float32))
    assert torch.equal(emb.reshape(model.tok_embeddings.weight.shape), model.tok_embeddings.weight.half().float())


def test_gguf_rows_that_are_not_a_multiple_of_256_get_an_error_that_suggests_f16(tmp_path):
    model = sf.BitNetStudent(tiny_student_config(head_bias=False))
    for qtype in ("TQ2_0", "TQ1_0"):
        with pytest.raises(sf.ConfigError, match="blocks of 256.*qtype='F16'"):
            sf.export_gguf(model, _bpe_tokenizer(), tmp_path / "s.gguf", qtype=qtype)
    assert not (tmp_path / "s.gguf").exists()
    assert sf.gguf_qtype_for(model, "TQ2_0") == "F16"
    with pytest.raises(sf.ConfigError, match="qtype"):
        sf.export_gguf(model, _bpe_tokenizer(), tmp_path / "s.gguf", qtype="Q4_0")


def test_f16_gguf_of_a_small_student_with_bpe_tokenizer_metadata(tmp_path):
    import gguf

    tok = _bpe_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(head_mode="tied")).eval()
    r = gguf.GGUFReader(sf.export_gguf(model, tok, tmp_path / "s.gguf", qtype="F16"))
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and len(tokens) == 64
    assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[-1] == "[PAD63]" and _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert len(_field(r, "tokenizer.ggml.merges")) > 0
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    q, scale = sf.quantize_weight(model.layers[1].feed_forward.w2.weight)
    assert np.array_equal(np.asarray(t.data).reshape(16, 64), (q * scale).detach().numpy().astype(np.float16))


@pytest.mark.parametrize("token, how, expected", [
    ("<tool>", "added", "USER_DEFINED"),  # an added token that is not special
    ("hello world", "added", "USER_DEFINED"),  # an added token with a space in it
    ("<|looks|>", "added", "CONTROL"),  # not marked special, but llama.cpp's converter calls it special
    ("<ctrl>", "special", "CONTROL"),  # an added special token
    ("<|im_start|>", "special", "CONTROL"),
    ("</s>", "vocab", "CONTROL"),  # the EOS: a special token of the trained vocab
    ("the", "vocab", "NORMAL"),  # an ordinary BPE token
    ("[PAD71]", "padding", "UNUSED"),  # an id the tokenizer does not use
])
def test_gguf_types_tokens_as_llama_cpps_converter_does(tmp_path, token, how, expected):
    """llama.cpp matches CONTROL, USER_DEFINED and UNKNOWN tokens whole in the text and BPE-splits the rest, so an
    added token written NORMAL would reach the student as pieces it never saw. The types are read back with
    gguf's reader: added special tokens CONTROL, other added tokens USER_DEFINED (CONTROL if they look special,
    as convert_hf_to_gguf.py's does_token_look_special says), BPE tokens NORMAL, padding UNUSED."""
    import gguf

    tok = _bpe_tokenizer()
    tok.add_tokens(["<tool>", "hello world", "<|looks|>"])
    tok.add_special_tokens({"additional_special_tokens": ["<ctrl>", "<|im_start|>"]})
    model = sf.BitNetStudent(tiny_student_config(vocab_size=72, head_mode="tied")).eval()
    r = gguf.GGUFReader(sf.export_gguf(model, tok, tmp_path / "s.gguf", qtype="F16"))
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    i = tokens.index(token)
    assert i == (tok.convert_tokens_to_ids(token) if how != "padding" else 71)
    assert types[i] == int(getattr(gguf.TokenType, expected)), (token, gguf.TokenType(types[i]).name)


def test_gguf_refuses_a_tokenizer_it_cannot_describe(tmp_path):
    model = sf.BitNetStudent(tiny_student_config(head_bias=False))
    with pytest.raises(sf.ConfigError, match="BPE"):
        sf.export_gguf(model, make_tokenizer(), tmp_path / "s.gguf", qtype="F16")  # word-level


# -----------------------------------------------------------------------------
# the Hub and the notebook's save cell


def test_push_to_hub_checks_its_arguments_before_any_network_call(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(sf.ConfigError, match="export_hf"):
        sf.push_to_hub(tmp_path, "me/student")
    sf.export_hf(sf.BitNetStudent(tiny_student_config(head_bias=False)), make_tokenizer(), tmp_path / "hf")
    for bad in ("student", "me/", "a/b/c", "me/my student"):
        with pytest.raises(sf.ConfigError, match="user/name"):
            sf.push_to_hub(tmp_path / "hf", bad)
    with pytest.raises(sf.ConfigError, match="HF_TOKEN"):
        sf.push_to_hub(tmp_path / "hf", "me/student")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert sf._hub_token() == "hf_test"


def test_export_all_writes_the_four_formats_and_skips_the_llama_forms_for_the_teacher_head(tmp_path, capsys):
    model = sf.BitNetStudent(tiny_student_config(head_bias=False))
    out = sf.export_all(model, _bpe_tokenizer(), tmp_path / "run")
    assert set(out) == {"safetensors", "ternary", "hf", "gguf"}
    assert all(os.path.exists(p) for p in out.values())
    assert "writing F16 instead" in capsys.readouterr().out
    teacher = sf.BitNetStudent(tiny_student_config(head_mode="teacher"))
    teacher.attach_teacher_head(torch.randn(64, 24))
    out = sf.export_all(teacher, _bpe_tokenizer(), tmp_path / "run-teacher")
    assert set(out) == {"safetensors", "ternary"}
    assert "no Llama form" in capsys.readouterr().out


def test_export_all_folds_a_head_bias_once_for_both_llama_forms(tmp_path, tiny_cache, patch, capsys):
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)  # a biased head
    calls, fold = [], sf.llama_head
    patch(sf, "llama_head", lambda *a, **k: calls.append(1) or fold(*a, **k))  # export_all folds, the forms reuse it
    out = sf.export_all(model, _bpe_tokenizer(), tmp_path / "run", cache)
    assert set(out) == {"safetensors", "ternary", "hf", "gguf"} and len(calls) == 1
    assert capsys.readouterr().out.count("head bias folded") == 1


def test_export_all_checks_the_hf_form_before_writing_anything_or_folding_the_bias(tmp_path, tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)

    class TooBig:  # a tokenizer with more tokens than the student's vocabulary
        def __len__(self):
            return model.cfg.vocab_size + 1

    for caller in (sf.export_all, spoonfeed.export.export_hf, spoonfeed.export.export_gguf):  # and the forms
        patch(sys.modules[caller.__module__], "llama_head",
              lambda *a, **k: pytest.fail("the fold ran before the checks"), called=False, caller=caller)
    with pytest.raises(sf.ConfigError, match="vocab"):
        sf.export_all(model, TooBig(), tmp_path / "exports", cache)
    assert not (tmp_path / "exports").exists()


# -----------------------------------------------------------------------------
# destinations: every writer refuses what is not its own earlier output, before any work, and leaves no temp file

WRITERS = {  # each writer of a save or an export, on a tiny student
    "save_pretrained": lambda model, path: sf.save_pretrained(model, path),
    "export_ternary": lambda model, path: sf.export_ternary(model, path),
    "export_hf": lambda model, path: sf.export_hf(model, _bpe_tokenizer(), path),
    "export_gguf": lambda model, path: sf.export_gguf(model, _bpe_tokenizer(), path, qtype="F16"),
}


def _tree(root):
    """{relative path: bytes or 'dir'} of everything under root."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _student():
    return sf.BitNetStudent(tiny_student_config(head_bias=False)).eval()


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_a_destination_that_holds_something_else_before_any_work(tmp_path, writer, patch):
    notes = tmp_path / "mine"  # a user's folder
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    other = tmp_path / "other-kind"  # a save of another kind: the one writer must not take it for its own
    (sf.export_ternary if writer == "save_pretrained" else sf.save_pretrained)(_student(), other)
    places = [notes, a_file, a_file / "sub" / "out"] + ([other] if writer != "export_gguf" else [])
    before = _tree(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the destination was checked")

    if writer in ("export_hf", "export_gguf"):  # the head fold: the first costly step of the Llama forms
        patch(spoonfeed.export, "llama_head", no_work, called=False, caller=getattr(spoonfeed.export, writer))
    for place in places:
        with pytest.raises(sf.ConfigError, match=rf"{writer} .*{place.name}") as err:
            WRITERS[writer](_student(), place)
        assert "move what is there" in str(err.value) or "a path in a folder" in str(err.value)
        assert _tree(tmp_path) == before, place  # nothing deleted, nothing written, no temp file


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_replaces_its_own_earlier_output_and_takes_an_empty_folder(tmp_path, writer):
    path = tmp_path / "out"
    if writer != "export_gguf":
        path.mkdir()  # an empty folder is fine
    WRITERS[writer](_student(), path)
    first = _tree(tmp_path)
    torch.manual_seed(1)
    WRITERS[writer](_student(), path)  # another student, over the first one's files
    second = _tree(tmp_path)
    assert second.keys() == first.keys() and second != first  # replaced in place; no temp or old copy left
    if writer == "export_hf":  # a folder written before config.json carried spoonfeed_format is ours too
        config = json.loads((path / "config.json").read_text())
        del config["spoonfeed_format"]
        (path / "config.json").write_text(json.dumps(config))
        WRITERS[writer](_student(), path)
        assert json.loads((path / "config.json").read_text())["spoonfeed_format"] == sf.HF_FORMAT


def test_export_hf_refuses_the_current_folder_and_those_above_it_with_a_clear_error(tmp_path, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for dest in (".", "", "..", str(tmp_path), "/"):
        with pytest.raises(sf.ConfigError, match="current folder or one above it.*student-hf"):
            sf.export_hf(_student(), make_tokenizer(), dest)
    assert os.listdir(here) == [] and os.listdir(tmp_path) == ["empty"]
    with pytest.raises(sf.ConfigError, match="is a folder, not a file"):
        sf.export_gguf(_student(), _bpe_tokenizer(), ".", qtype="F16")
    assert os.listdir(here) == []


def _partial_then_full_disk(path):
    with open(path, "wb") as f:
        f.write(b"partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("writer", [*WRITERS, "save_checkpoint"])
def test_a_write_that_fails_leaves_no_temp_file_and_the_earlier_output_intact(tmp_path, writer, monkeypatch):
    import gguf
    import safetensors.torch

    if writer == "save_checkpoint":
        def write(model, path):
            sf.save_checkpoint(path, "phase2", {"model": model.state_dict()})
    else:
        write = WRITERS[writer]
    path = tmp_path / ("out.gguf" if writer == "export_gguf" else "out")
    write(_student(), path)  # an earlier save, which a failed one must leave as it was
    before = _tree(tmp_path)
    if writer == "export_gguf":
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file",
                            lambda self, **kw: _partial_then_full_disk(self.path))
    elif writer == "save_checkpoint":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: _partial_then_full_disk(f))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, f, *a, **kw: _partial_then_full_disk(f))
    with pytest.raises(OSError, match="No space left"):
        write(_student(), path)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saves_exports_and_checkpoints_get_the_normal_modes_for_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        sf.export_all(_student(), _bpe_tokenizer(), tmp_path / "run")
        sf.save_checkpoint(tmp_path / "run", "phase2", {"model": _student().state_dict()})
    finally:
        os.umask(old)
    made = list((tmp_path / "run").rglob("*"))
    assert {"model.safetensors", "ternary.safetensors", "student.gguf", "phase2.pt"} <= {p.name for p in made}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in made}
    assert modes == {k: oct((0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask) for k in modes}


def test_the_phase_1_cache_files_get_the_normal_modes(tiny_cache):
    _, cache, _ = tiny_cache
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in cache.path.iterdir()}
    assert "teacher_head.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}


# -----------------------------------------------------------------------------
# the save cell's settings, the files it skips, the Hub, and the reload cell's decoding


def test_an_invalid_gguf_qtype_is_refused_naming_the_choices_and_only_a_valid_ternary_type_falls_back():
    small = _student()  # rows of 16: no ternary type holds them
    for bad in ("Q4_0", "tq2_0", "", None):
        with pytest.raises(sf.ConfigError, match=r"GGUF_QTYPE=.*not one of \('TQ2_0', 'TQ1_0', 'F16'\)"):
            sf.gguf_qtype_for(small, bad)
        with pytest.raises(sf.ConfigError, match="GGUF_QTYPE"):
            sf.check_export_settings(bad, "")
    assert [sf.gguf_qtype_for(small, q) for q in sf.GGUF_QTYPES] == ["F16", "F16", "F16"]
    wide = sf.BitNetStudent(tiny_student_config(dim=256, n_heads=4, n_layers=1, head_bias=False))
    assert [sf.gguf_qtype_for(wide, q) for q in sf.GGUF_QTYPES] == list(sf.GGUF_QTYPES)


def test_hub_repo_ids_are_checked_by_huggingface_hubs_validator_and_need_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    for bad in ("me/bad@name!", "bad name", "me/my student", "student", "me/", "/student", "a/b/c", "me/-x",
                "me/x" + "y" * 100, 5):
        with pytest.raises(sf.ConfigError, match=r"HUB_REPO_ID=.*'user/name'"):
            sf.check_export_settings("TQ2_0", bad)
    for good in ("", "me/student", "my-org/spoon_feed.v2"):
        sf.check_export_settings("TQ2_0", good)
    monkeypatch.delenv("HF_TOKEN")
    sf.check_export_settings("TQ2_0", "")  # no upload, no token needed
    with pytest.raises(sf.ConfigError, match="HUB_REPO_ID is set but there is no Hugging Face token.*HF_TOKEN"):
        sf.check_export_settings("TQ2_0", "me/student")


def test_push_to_hub_takes_only_an_export_hf_folder_and_a_valid_id_before_any_network_call(tmp_path, monkeypatch):
    import huggingface_hub

    def network(*args, **kwargs):
        raise AssertionError("reached the network")

    monkeypatch.setattr(huggingface_hub, "HfApi", network)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    model = _student()
    sf.save_pretrained(model, tmp_path / "student")  # config.json + model.safetensors, but our own format
    sf.export_ternary(model, tmp_path / "student-ternary")
    look_alike = tmp_path / "look-alike"  # a folder of the same file names that export_hf did not write
    look_alike.mkdir()
    (look_alike / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (look_alike / "model.safetensors").write_bytes(b"")
    for folder in ("student", "student-ternary", "look-alike", "missing"):
        with pytest.raises(sf.ConfigError, match="not a folder written by export_hf"):
            sf.push_to_hub(tmp_path / folder, "me/student")
    sf.export_hf(model, make_tokenizer(), tmp_path / "hf")
    for bad in ("me/bad@name!", ""):
        with pytest.raises(sf.ConfigError, match="user/name"):
            sf.push_to_hub(tmp_path / "hf", bad)
    with pytest.raises(AssertionError, match="reached the network"):  # a good folder and id go ahead
        sf.push_to_hub(tmp_path / "hf", "me/student")


def test_a_form_the_save_cell_skips_loses_an_earlier_runs_file_with_a_line_saying_so(tmp_path, capsys):
    run = tmp_path / "run"
    sf.export_all(_student(), _bpe_tokenizer(), run)
    assert (run / "student.gguf").is_file()
    capsys.readouterr()
    out = sf.export_all(_student(), make_tokenizer(), run)  # a word-level tokenizer: no GGUF this time
    printed = capsys.readouterr().out
    assert "gguf" not in out and "GGUF skipped" in printed and not (run / "student.gguf").exists()
    assert [line for line in printed.splitlines() if line.startswith("removed")] == \
        [f"removed {run / 'student.gguf'}, an earlier run's export: this run writes no GGUF"]

    sf.export_all(_student(), _bpe_tokenizer(), run)  # all four again, then a teacher-head run in the same folder
    teacher = sf.BitNetStudent(tiny_student_config(head_mode="teacher"))
    teacher.attach_teacher_head(torch.randn(64, 24))
    capsys.readouterr()
    sf.export_all(teacher, _bpe_tokenizer(), run)
    removed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("removed")]
    assert len(removed) == 2 and "student-hf" in removed[0] and "student.gguf" in removed[1]
    assert sorted(os.listdir(run)) == ["student", "student-ternary"]
    (run / "student.gguf").write_text("not ours")  # something the save cell never wrote is left alone
    sf.export_all(teacher, _bpe_tokenizer(), run)
    assert (run / "student.gguf").read_text() == "not ours"


def test_the_save_cell_checks_every_destination_in_run_dir_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    (run / "student-hf").mkdir(parents=True)
    (run / "student-hf" / "notes.txt").write_text("my notes")  # RUN_DIR/student-hf is someone else's
    (run / "student.gguf").mkdir()
    with pytest.raises(sf.ConfigError, match=r"student-hf.*RUN_DIR.*; .*student\.gguf.*is a folder"):
        sf.export_all(_student(), _bpe_tokenizer(), run)
    assert sorted(os.listdir(run)) == ["student-hf", "student.gguf"]  # nothing written, nothing deleted
    assert (run / "student-hf" / "notes.txt").read_text() == "my notes"
    from conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, run_dir=str(run))
    with pytest.raises(sf.ConfigError, match="export_hf will not write to .*student-hf"):
        sf.check_folders(cfg)  # cell 2 says so before any work
    teacher_cfg = tiny_run_config(tmp_path, run_dir=str(run), head_mode="teacher")
    sf.check_folders(teacher_cfg)  # a teacher-head run writes neither


def test_the_hf_export_knows_the_students_context_and_the_model_card_names_the_real_teacher(tmp_path):
    model = sf.BitNetStudent(tiny_student_config(head_bias=False, max_seq_len=24))
    sf.export_hf(model, make_tokenizer(), tmp_path / "hf", cfg=sf.make_config("smoke"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 24
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["max_length"] == 24
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"**Teacher:** `{sf.BUNDLED_MODEL}`" in card and sf.BUNDLED_GGUF in card
    assert "`smollm2`" not in card and "standard library" in card


class _FakeGenerator:
    """Stands in for a pipeline: its tokenizer and the model's position limit."""

    def __init__(self, limit):
        from types import SimpleNamespace

        self.tokenizer = make_tokenizer()
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))


def test_pipeline_settings_use_cell_9s_settings_and_stop_at_the_students_last_position():
    gen = _FakeGenerator(limit=12)
    prompt = "the cat sat on"  # 4 tokens
    assert sf.pipeline_settings(gen, prompt, 30, 0.9, 7, 0.5) == dict(  # max_length: prompt + new tokens
        add_special_tokens=False, max_length=12, do_sample=True, temperature=0.9, top_k=7, top_p=0.5)
    assert sf.pipeline_settings(gen, prompt, 5, 0.9, 0, 1.0)["max_length"] == 4 + 5
    assert sf.pipeline_settings(gen, prompt, 5, 0.9, 0, 1.0)["top_k"] == 0  # transformers: 0 is no top-k
    assert sf.pipeline_settings(gen, prompt, 30, 0.0, 7, 0.5) == dict(add_special_tokens=False, max_length=12,
                                                                      do_sample=False)
    with pytest.raises(sf.PromptTooLongError, match="12 positions"):
        sf.pipeline_settings(gen, " ".join(["cat"] * 12), 30, 0.9, 7, 0.5)
    with pytest.raises(sf.ConfigError, match="TOP_K"):
        sf.pipeline_settings(gen, prompt, 30, 0.9, -1, 0.5)


def test_a_stock_pipeline_with_those_settings_stays_within_the_students_positions(tmp_path):
    from transformers import pipeline

    sf.export_hf(sf.BitNetStudent(tiny_student_config(head_bias=False, max_seq_len=10)), make_tokenizer(),
                 tmp_path / "hf")
    generator = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    for temperature in (0.0, 0.8):
        settings = sf.pipeline_settings(generator, "the cat sat", 30, temperature)
        # min_new_tokens holds EOS back, so that only the length limit stops the output
        out = generator("the cat sat", return_tensors=True, min_new_tokens=7, **settings)[0]["generated_token_ids"]
        assert len(out) == 10  # the 3 prompt tokens and 7 new ones: the student's 10 positions
    out = generator("the cat sat", return_tensors=True, min_new_tokens=7, do_sample=False)[0]["generated_token_ids"]
    assert len(out) == 10  # no length given: generation_config.json's max_length stops it there too
