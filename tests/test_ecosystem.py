"""The student in the ecosystem: a stock-transformers checkpoint (Llama + BitNet quantization), a llama.cpp GGUF,
the head bias folded or trained away, and the Hub upload's argument checks. No network."""
import json
import os

import numpy as np
import pytest
import torch

import spoonfeed_helpers as sf
from conftest import WORDS, make_tokenizer, tiny_student_config


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
    with pytest.raises(sf.ConfigError, match="head_bias"):
        sf.make_config(head_bias="no")
    with pytest.raises(sf.ConfigError, match="seed"):
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


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_holds_llama_metadata_the_bundled_tokenizer_and_the_exact_ternary_weights(tmp_path, qtype):
    import gguf

    tok = sf.load_tokenizer(sf.BUNDLED_TEACHER)
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
    teacher = gguf.GGUFReader(os.path.join(sf.bundled_teacher_dir(), sf.BUNDLED_GGUF))
    tok_keys = [k for k in teacher.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.tokens" in tok_keys and "tokenizer.ggml.merges" in tok_keys
    for k in tok_keys:  # the teacher GGUF's tokenizer, copied key by key
        assert _field(r, k) == _field(teacher, k), k

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
