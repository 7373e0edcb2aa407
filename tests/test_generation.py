"""Generation: transformers' sampling, every prompt handled, settings checked, streaming, and ternary weights that
follow every write (issue 16). The older generation checks (cached = full recompute, EOS stop, position guard)
are in test_model.py."""
import re

import pytest
import torch
from conftest import BUNDLED, make_tokenizer, tiny_student_config
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

import spoonfeed.generation
import spoonfeed_helpers as sf

INF = float("inf")


class RecordingStreamer(BaseStreamer):
    """transformers' streamer interface, recording what it is given."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


def _hf_list(temperature, top_k, top_p, min_p, penalty):
    """The processors transformers' generate() builds for these settings, written out by hand."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p))
    return procs


# --- sampling is transformers' ----------------------------------------------------------------------------

SETTINGS = [  # temperature, top_k, top_p, min_p, repetition_penalty
    (0.7, 50, 0.95, None, 1.0),  # the notebook's defaults
    (1.3, 5, 1.0, None, 1.0),
    (0.5, 0, 0.6, None, 1.0),
    (0.9, 20, 0.9, 0.05, 1.3),
    (1.5, 0, 1.0, 0.2, 0.8),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", SETTINGS)
def test_sampling_step_keeps_and_draws_what_transformers_warpers_do(temperature, top_k, top_p, min_p, penalty):
    logits = 3 * torch.randn(256, 40)  # 256 rows of fixed logits over 40 tokens
    input_ids = torch.randint(0, 40, (256, 9))  # what the repetition penalty looks at
    ref = _hf_list(temperature, top_k, top_p, min_p, penalty)(input_ids, logits.clone())
    ours = sf.logits_processors(temperature, top_k, top_p, min_p, penalty)(input_ids, logits.clone())
    assert torch.equal(ours > -INF, ref > -INF)  # the same kept set, row by row
    expected = torch.multinomial(ref.softmax(-1), 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    procs = sf.logits_processors(temperature, top_k, top_p, min_p, penalty)
    drawn = sf._sample_next(logits, input_ids, procs, True, torch.Generator().manual_seed(5))
    assert torch.equal(drawn, expected)  # the same draws under one seed
    assert bool((ref > -INF).gather(1, drawn[:, None]).all())


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().expand(4000, 4)
    procs = sf.logits_processors(1.0, 0, 0.8)
    no_history = torch.zeros(4000, 1, dtype=torch.long)
    drawn = sf._sample_next(logits, no_history, procs, True, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # token 2 was drawn 443 times in 4000 by the hand-written sampler
    equal = torch.zeros(4000, 4)
    procs = sf.logits_processors(1.0, 0, 0.5)
    assert ((procs(None, equal) > -INF).sum(-1) == 2).all()  # four equal tokens at 0.5: two kept, not three
    drawn = sf._sample_next(equal, no_history, procs, True, torch.Generator().manual_seed(0))
    assert len(set(drawn.tolist())) == 2


def test_top_p_zero_and_top_k_one_are_greedy():
    logits = torch.randn(64, 30)
    for procs in (sf.logits_processors(1.0, 0, 0.0), sf.logits_processors(1.0, 1, 1.0)):
        drawn = sf._sample_next(logits, torch.zeros(64, 1, dtype=torch.long), procs, True, torch.Generator())
        assert torch.equal(drawn, logits.argmax(-1))


def test_neutral_settings_add_no_processor_and_temperature_zero_keeps_only_the_penalty():
    assert len(sf.logits_processors(1.0, 0, 1.0, None, 1.0)) == 0
    assert len(sf.logits_processors(1, None, None)) == 0
    greedy = sf.logits_processors(0, 50, 0.5, 0.1, 1.2)
    assert [type(p) for p in greedy] == [RepetitionPenaltyLogitsProcessor]


def _reference_generate(model, prompt, n, procs, gen):
    """Full recomputation every step, with transformers' processors and sampling, as in GenerationMixin._sample."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            scores = procs(ids, model.logits(model(ids))[:, -1].float())
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", SETTINGS)
def test_cached_sampling_equals_transformers_on_full_recomputation(temperature, top_k, top_p, min_p, penalty):
    torch.manual_seed(3)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (3, 5))
    expected = _reference_generate(model, prompt, 15, _hf_list(temperature, top_k, top_p, min_p, penalty),
                                   torch.Generator().manual_seed(11))
    got = sf.generate(model, prompt, 15, temperature, top_k, top_p, generator=torch.Generator().manual_seed(11),
                      min_p=min_p, repetition_penalty=penalty, precision="fp32")  # the reference is float32
    assert torch.equal(got, expected)


def test_temperature_zero_is_greedy_whatever_top_k_and_top_p():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (2, 4))
    greedy = sf.generate(model, prompt, 12, temperature=0)
    assert torch.equal(sf.generate(model, prompt, 12, 0.0, 3, 0.2, generator=torch.Generator().manual_seed(1)), greedy)
    with torch.no_grad():  # greedy with a penalty: argmax of the penalised logits, as transformers does
        ids = prompt
        for _ in range(12):
            scores = RepetitionPenaltyLogitsProcessor(1.5)(ids, model.logits(model(ids))[:, -1])
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sf.generate(model, prompt, 12, temperature=0, repetition_penalty=1.5), ids)


# --- settings out of range --------------------------------------------------------------------------------

BAD = [
    (dict(temperature=-0.1), "TEMPERATURE"),
    (dict(temperature=float("nan")), "TEMPERATURE"),
    (dict(top_p=1.5), "TOP_P"),
    (dict(top_p=-0.01), "TOP_P"),
    (dict(top_k=-1), "TOP_K"),
    (dict(top_k=2.5), "TOP_K"),
    (dict(max_new_tokens=0), "MAX_NEW_TOKENS"),
    (dict(max_new_tokens=-3), "MAX_NEW_TOKENS"),
    (dict(min_p=1.2), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=1e-40), "TEMPERATURE"),  # a tiny positive temperature overflows the softmax: refused
    (dict(temperature=float("inf")), "TEMPERATURE"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(max_new_tokens=True), "MAX_NEW_TOKENS"),
]


@pytest.mark.parametrize("kw,name", BAD)
def test_settings_out_of_range_are_one_clear_error_before_any_work(kw, name):
    model = sf.BitNetStudent(tiny_student_config()).eval()
    streamer = RecordingStreamer()
    settings = {**dict(max_new_tokens=5, temperature=0.7, top_k=50, top_p=0.95), **kw}
    with pytest.raises(sf.ConfigError, match=name):
        sf.check_generation_settings(**settings)
    with pytest.raises(sf.ConfigError, match=name):
        sf.generate(model, torch.zeros(1, 3, dtype=torch.long), streamer=streamer, **settings)
    with pytest.raises(sf.ConfigError, match=name):
        sf.generate_text(model, make_tokenizer(), ["the cat"], streamer=streamer, **settings)
    assert streamer.puts == [] and streamer.ends == 0  # nothing ran


def test_settings_at_the_ends_of_their_ranges_are_accepted():
    import numpy as np

    sf.check_generation_settings(np.int64(3), np.float32(sf.MIN_TEMPERATURE), np.int64(5), np.float64(0.5))
    sf.check_generation_settings(1, 0, 0, 0.0, 0.0, 1.0)
    sf.check_generation_settings(1, 0.0, None, 1.0, 1.0, 0.5)
    sf.check_generation_settings(max_new_tokens=1, temperature=2, top_k=1, top_p=1)


# --- every prompt is handled ------------------------------------------------------------------------------

def _word_tokenizer(bos=False, eos=True):
    """The tests' word-level tokenizer; bos=True adds a <s> that the tokenizer prepends by default."""
    from tokenizers import processors

    tok = make_tokenizer()
    if bos:
        tok.add_special_tokens({"bos_token": "<s>"})
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    if not eos:
        tok.eos_token = None
    return tok


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_an_empty_prompt_starts_from_eos(prompt):
    tok = _word_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    streamer = RecordingStreamer()
    [result] = sf.generate_text(model, tok, [prompt], 6, temperature=0, streamer=streamer)
    assert result.error is None and result.new_tokens >= 1
    assert streamer.puts[0].tolist() == [[tok.eos_token_id]]  # what the student was given


def test_an_empty_prompt_starts_from_eos_even_when_the_tokenizer_has_a_bos():
    tok = _word_tokenizer(bos=True)
    assert tok("the cat").input_ids[0] == tok.bos_token_id  # this tokenizer would prepend its BOS
    assert sf.prompt_ids(tok, "") == [tok.eos_token_id]  # the packer's separator, which the student has seen
    assert sf.prompt_ids(_word_tokenizer(bos=True, eos=False), "") == [tok.bos_token_id]  # no EOS: BOS
    with pytest.raises(sf.ConfigError, match="neither"):
        sf.prompt_ids(_word_tokenizer(bos=False, eos=False), "")


def test_prompts_are_tokenized_as_the_training_blocks_were():
    tok = _word_tokenizer(bos=True)  # adds <s> by default, which pack_blocks does not
    text = "the cat sat on a mat and then it was happy"
    train, _, _ = sf.pack_blocks([text] * 20, tok, seq_len=8, num_train=3, num_val=1)
    stream = train.reshape(-1).tolist()
    n = len(text.split())  # word-level: one token a word
    assert stream[n] == tok.eos_token_id and tok.bos_token_id not in stream  # the student never saw a BOS
    assert sf.prompt_ids(tok, text) == stream[:n]
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    streamer = RecordingStreamer()
    sf.generate_text(model, tok, [text], 3, temperature=0, streamer=streamer)
    assert streamer.puts[0][0].tolist() == stream[:n]


def test_a_too_long_prompt_is_reported_alone_and_the_others_still_generate():
    tok = make_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(max_seq_len=8)).eval()
    prompts = ["the cat", "the dog sat on a big red mat", "a bird", "the sun"]
    results = sf.generate_text(model, tok, prompts, 4, temperature=1.0, seed=3)
    assert [r.prompt for r in results] == prompts
    assert results[1].text == "" and results[1].new_tokens == 0
    assert "prompt 2 of 4" in results[1].error and "max_seq_len" in results[1].error
    assert "MAX_SEQ_LENGTH" in results[1].error
    good = sf.generate_text(model, tok, [prompts[0], "a dog", *prompts[2:]], 4, temperature=1.0, seed=3)
    # each prompt draws from its own generator: a short prompt in its place changes none of the others
    assert [r.text for r in results if r.error is None] == [r.text for i, r in enumerate(good) if i != 1]
    assert all(r.error is None and r.text.startswith(r.prompt) and r.new_tokens == 4 for r in good)
    printed = sf.format_generations(results)
    assert printed.count("Output: ") == 3 and "Skipped: prompt 2 of 4" in printed


@pytest.mark.slow
@pytest.mark.xdist_group(BUNDLED)
def test_the_bundled_tokenizer_handles_an_empty_prompt(bundled_tokenizer):
    tok = bundled_tokenizer
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    streamer = RecordingStreamer()
    results = sf.generate_text(model, tok, ["", "Once upon a time"], 3, temperature=0, streamer=streamer)
    assert all(r.error is None for r in results)  # was: IndexError: index -1 is out of bounds
    assert streamer.puts[0].tolist() == [[tok.eos_token_id]] and tok.bos_token_id != tok.eos_token_id
    assert streamer.puts[4][0].tolist() == tok("Once upon a time", add_special_tokens=False).input_ids


# --- streaming --------------------------------------------------------------------------------------------

def test_streamer_gets_the_prompt_then_each_token_as_produced_then_end():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (1, 4))
    streamer = RecordingStreamer()
    out = sf.generate(model, prompt, 7, temperature=1.0, generator=torch.Generator().manual_seed(0),
                      streamer=streamer)
    assert streamer.ends == 1
    assert torch.equal(streamer.puts[0], prompt)  # (1, T0), as transformers puts the prompt first
    assert all(p.shape == (1,) for p in streamer.puts[1:]) and len(streamer.puts) == 1 + 7
    assert torch.equal(torch.cat([streamer.puts[0][0], *streamer.puts[1:]]), out[0])


def test_text_streamer_prints_each_prompts_full_output(capsys):
    tok = make_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    results = sf.generate_text(model, tok, ["the cat", "a dog"], 6, temperature=1.0,
                               streamer=TextStreamer(tok, skip_special_tokens=True))
    printed = capsys.readouterr().out
    assert printed == "".join(r.text + "\n" for r in results)


# --- EOS and padding ---------------------------------------------------------------------------------------

def test_eos_stops_a_row_padding_follows_and_the_other_rows_go_on():
    torch.manual_seed(1)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (2, 4))
    greedy = sf.generate(model, prompt, 12, temperature=0)
    new0, new1 = greedy[0, 4:].tolist(), greedy[1, 4:].tolist()
    eos = next(t for t in new0[:6] if t not in new1)  # a token row 0 produces and row 1 never does
    out = sf.generate(model, prompt, 12, temperature=0, eos_token_id=eos, pad_token_id=63)
    stop = new0.index(eos)
    assert out[0, 4:4 + stop + 1].tolist() == new0[:stop + 1]
    assert (out[0, 4 + stop + 1:] == 63).all()  # padding after the row's EOS
    assert torch.equal(out[1], greedy[1])  # the other row is not disturbed


# --- the eval-mode ternary weights follow every write -----------------------------------------------------

def _other_state(cfg):
    torch.manual_seed(99)
    return sf.BitNetStudent(cfg).state_dict()


def _step(model, optimizer):
    """Gradients from a training-mode step; then an eval forward (the weights in use) before the optimiser
    writes, as when a loop evaluates between backward() and step()."""
    model.train()
    loss = model.logits(model(torch.randint(0, 64, (2, 6)))).logsumexp(-1).mean()
    loss.backward()
    model.eval()
    with torch.no_grad():
        model.logits(model(torch.randint(0, 64, (2, 6))))
    optimizer.step()


def _ema(model, other, lerp):
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            lerp(p, q)


def _write_foreach_lerp_data(model, cfg):
    other = sf.BitNetStudent(cfg)
    other.load_state_dict(_other_state(cfg))
    torch._foreach_lerp_([p.data for p in model.parameters()], [q.data for q in other.parameters()], 0.5)


def _write_averaged_model_ema(model, cfg):
    from torch.optim.swa_utils import get_ema_multi_avg_fn  # what AveragedModel(multi_avg_fn=...) calls

    other = sf.BitNetStudent(cfg)
    other.load_state_dict(_other_state(cfg))
    get_ema_multi_avg_fn(0.5)(list(model.parameters()), list(other.parameters()), None)


def _write_lerp(model, cfg):
    other = sf.BitNetStudent(cfg)
    other.load_state_dict(_other_state(cfg))
    _ema(model, other, lambda p, q: p.lerp_(q, 0.5))


def _write_numpy(model, cfg):
    state = _other_state(cfg)
    for name, p in model.named_parameters():
        p.detach().numpy()[...] = state[name].numpy()


WRITES = {
    "fused AdamW step": lambda m, cfg: _step(m, torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)),
    "foreach AdamW step": lambda m, cfg: _step(m, torch.optim.AdamW(m.parameters(), lr=0.05, foreach=True)),
    "the trainer's AdamW": lambda m, cfg: _step(m, sf._adamw(m.parameters(), 0.05, 0.0)),
    "fused SGD step": lambda m, cfg: _step(m, torch.optim.SGD(m.parameters(), lr=5.0, fused=True)),
    "load_state_dict": lambda m, cfg: m.load_state_dict(_other_state(cfg)),
    "load_state_dict(assign=True)": lambda m, cfg: m.load_state_dict(_other_state(cfg), assign=True),
    "param.data.copy_": lambda m, cfg: [p.data.copy_(s[n]) for s in [_other_state(cfg)]
                                        for n, p in m.named_parameters()],
    "param.data = tensor": lambda m, cfg: [setattr(p, "data", s[n].clone()) for s in [_other_state(cfg)]
                                           for n, p in m.named_parameters()],
    "EMA, torch._foreach_lerp_ on .data": _write_foreach_lerp_data,
    "EMA, torch's get_ema_multi_avg_fn": _write_averaged_model_ema,
    "EMA, p.lerp_ under no_grad": _write_lerp,
    "a numpy view of the weight": _write_numpy,
    "torch.utils.swap_tensors": lambda m, cfg: [torch.utils.swap_tensors(p, torch.nn.Parameter(s[n]))
                                                for s in [_other_state(cfg)] for n, p in m.named_parameters()],
}


def _fresh_copy(model):
    """A new student holding model's current weights, with nothing cached."""
    ref = sf.BitNetStudent(model.cfg)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("source", ["built", "load_ternary"])
def test_eval_ternary_weights_follow_the_weights_however_written(write, source, tmp_path):
    cfg = tiny_student_config()
    model = sf.BitNetStudent(cfg)
    if source == "load_ternary":  # its BitLinears start pinned to the export's exact ternary weights
        sf.export_ternary(model, tmp_path / "t")
        model = sf.load_ternary(tmp_path / "t")
    model.eval()
    idx = torch.randint(0, 64, (2, 6))
    sf.generate(model, idx[:, :3], 6, temperature=0)  # eval mode, quantized weights in use
    with torch.no_grad():
        model.logits(model(idx))
    old_q = [sf.quantize_weight(m.weight.detach().clone())[0] for _, m in model.bitlinears()]
    WRITES[write](model, cfg)
    model.zero_grad(set_to_none=True)
    new_q = [sf.quantize_weight(m.weight.detach())[0] for _, m in model.bitlinears()]
    assert any(not torch.equal(a, b) for a, b in zip(old_q, new_q))  # the write changed the ternary weights
    ref = _fresh_copy(model)
    with torch.no_grad():
        assert torch.equal(model.logits(model(idx)), ref.logits(ref(idx)))
    assert torch.equal(sf.generate(model, idx[:, :3], 6, temperature=0), sf.generate(ref, idx[:, :3], 6, temperature=0))


def test_generate_quantizes_each_bitlinear_once_per_call(patch):
    model = sf.BitNetStudent(tiny_student_config()).eval()
    calls = []
    real = sf.quantize_weight
    patch(sf, "quantize_weight", lambda w: calls.append(1) or real(w))  # BitLinear quantizes through it
    sf.generate(model, torch.randint(0, 64, (1, 3)), 10, temperature=0)
    assert len(calls) == len(model.bitlinears())  # 14, not 14 a token
    assert all(m._w_cache is None and m._int8 is None for _, m in model.bitlinears())  # nothing kept after


def test_generate_on_a_cpu_multiplies_the_ternary_layers_in_int8_for_the_prompt_and_every_token(patch):
    model = sf.BitNetStudent(tiny_student_config()).eval()
    calls = []
    real = sf.ternary_linear_int8
    patch(sf, "ternary_linear_int8", lambda *a: calls.append(1) or real(*a))
    sf.generate(model, torch.randint(0, 64, (1, 3)), 5, temperature=0)
    assert len(calls) == 5 * len(model.bitlinears())  # the prompt and 4 decode steps, every ternary layer


def test_a_single_string_is_one_prompt_and_a_prompt_that_is_not_text_is_refused_before_any_work():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    tok = make_tokenizer()
    one = sf.generate_text(model, tok, "the cat", 3, 0)
    assert len(one) == 1 and one[0].prompt == "the cat"
    streamer = RecordingStreamer()
    for prompts in (["the cat", None, "a dog"], ["the cat", 5], [b"abc"], [["a", "b"]]):
        with pytest.raises(sf.ConfigError, match="every prompt must be a string: prompt"):
            sf.generate_text(model, tok, prompts, 3, 0, streamer=streamer)
    assert streamer.puts == []  # nothing ran


# --- prompts of different lengths decode together (issue 19) -----------------------------------------------

def _left_pad(rows, fill=0):
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), fill, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", SETTINGS)
def test_a_left_padded_batch_decodes_each_row_as_it_would_alone(temperature, top_k, top_p, min_p, penalty):
    """Per-row positions and a mask over the padding: the batch changes nothing but the speed."""
    torch.manual_seed(5)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    rows = [[5, 6], [7, 8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    ids, mask = _left_pad(rows, fill=63)
    kw = dict(min_p=min_p, repetition_penalty=penalty, precision="fp32")
    gens = [torch.Generator().manual_seed(20 + i) for i in range(len(rows))]
    batch = sf.generate(model, ids, 9, temperature, top_k, top_p, generator=gens, attention_mask=mask, **kw)
    assert torch.isfinite(model(ids)).all()
    for i, r in enumerate(rows):
        alone = sf.generate(model, torch.tensor([r]), 9, temperature, top_k, top_p,
                            generator=[torch.Generator().manual_seed(20 + i)], **kw)
        assert batch[i, ids.shape[1] - len(r):].tolist() == alone[0].tolist()
        assert torch.equal(batch[i, :ids.shape[1]], ids[i])  # the padding is given back as it came


def test_generate_text_batches_without_a_streamer_and_gives_what_streaming_gives(patch):
    tok = make_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    prompts = ["the cat sat on a", "a", "", "the dog ran over the big red"]
    calls = []
    real = sf.generate
    patch(spoonfeed.generation, "generate", lambda m, ids, *a, **k: calls.append(tuple(ids.shape)) or real(m, ids, *a, **k))
    for temperature in (0.0, 1.0):
        calls.clear()
        batched = sf.generate_text(model, tok, prompts, 6, temperature, seed=4, precision="fp32")
        assert calls == [(4, 7)]  # one call, left-padded to the longest prompt
        streamed = sf.generate_text(model, tok, prompts, 6, temperature, seed=4, precision="fp32",
                                    streamer=RecordingStreamer())
        assert len(calls) == 1 + 4  # one prompt at a time
        assert [(r.text, r.new_tokens) for r in batched] == [(r.text, r.new_tokens) for r in streamed]


def test_a_row_that_stops_at_eos_is_not_counted_past_it_in_a_batch():
    tok = make_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok))).eval()
    eos = tok.eos_token_id
    with torch.no_grad():  # the head always prefers EOS: every row stops at its first new token
        model.head.bias.fill_(0).index_fill_(0, torch.tensor([eos]), 100.0)
    out = sf.generate_text(model, tok, ["the cat", "a big red dog"], 5, 0.0, precision="fp32")
    assert [(r.text, r.new_tokens) for r in out] == [("the cat", 1), ("a big red dog", 1)]


def test_prompts_that_would_pass_max_seq_len_together_decode_one_at_a_time(patch):
    """Each prompt keeps its own position limit: a long prompt does not cut a short one's continuation."""
    tok = make_tokenizer()
    model = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok), max_seq_len=10)).eval()
    calls = []
    real = sf.generate
    patch(spoonfeed.generation, "generate", lambda m, ids, *a, **k: calls.append(tuple(ids.shape)) or real(m, ids, *a, **k))
    with pytest.warns(UserWarning, match="stopping after 2 new tokens"):
        out = sf.generate_text(model, tok, ["the cat", "the dog sat on a big red mat"], 6, 0.0)
    assert calls == [(1, 2), (1, 8)]
    assert [r.new_tokens for r in out] == [6, 2]


@pytest.mark.parametrize("mask", [[[1, 1, 0]], [[0, 1, 0]], [[0, 0, 0]], [[1, 1]]])
def test_an_attention_mask_that_is_not_left_padding_is_refused_before_any_work(mask):
    model = sf.BitNetStudent(tiny_student_config()).eval()
    with pytest.raises(ValueError, match="left padding"):
        sf.generate(model, torch.tensor([[1, 2, 3]]), 3, temperature=0, attention_mask=torch.tensor(mask))


def test_left_pad_ends_every_row_at_the_last_column_with_its_mask():
    ids, mask = sf.left_pad([[5, 6], [7, 8, 9], [4]], fill=1)
    assert ids.tolist() == [[1, 5, 6], [7, 8, 9], [1, 1, 4]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert torch.equal(ids, _left_pad([[5, 6], [7, 8, 9], [4]], fill=1)[0])


# --- token ids the student does not know (issue 27, item 11) -------------------------------------------------


def _vocab_of(tok, word):
    return tok.convert_tokens_to_ids(word)


@pytest.mark.parametrize("case", ["a prompt token", "the second prompt only", "an empty prompt's EOS",
                                  "the padding fed after EOS", "a batch's left padding"])
def test_ids_the_student_does_not_know_are_one_clear_error_before_any_forward(case):
    """A tokenizer larger than the student's vocab: whichever way an unknown id would reach the embedding (a
    prompt's token, the EOS an empty prompt starts from, the pad id fed back after EOS, a batch's left padding),
    generate_text names it, and the fix, before any prompt runs; no IndexError half-way."""
    tok = make_tokenizer()  # 39 tokens: <unk>, </s>, the words, ".", ","
    vocab, prompts, where = 20, ["the cat"], None
    if case == "a prompt token":
        prompts, where = ["the fish"], "prompt 1 holds"
    elif case == "the second prompt only":
        prompts, where = ["the cat", "a bird flew", "the dog"], "prompt 2 holds"
    elif case == "an empty prompt's EOS":
        vocab, prompts, where = 1, [""], "eos_token_id holds 1 ('</s>')"
    elif case == "the padding fed after EOS":
        tok.pad_token = "bird"
        where = "pad_token_id holds"
    else:
        tok.eos_token, tok.pad_token = "fish", "fish"  # left_pad fills with the EOS
        prompts, where = ["the cat", "the"], "eos_token_id holds"
    assert len(tok) > vocab
    model = sf.BitNetStudent(tiny_student_config(vocab_size=vocab)).eval()
    model.register_forward_pre_hook(lambda *a: pytest.fail("a forward ran"))
    with pytest.raises(sf.ConfigError, match=rf"{re.escape(where)}.*vocab has {vocab} ids.*tokenizer of the teacher.*"
                                             r"check_compatible.*Nothing was generated"):
        sf.generate_text(model, tok, prompts, 3, temperature=0)


@pytest.mark.parametrize("idx, named", [([[3, 64]], "the prompt ids holds 64"), ([[-1, 3]], "the prompt ids holds -1"),
                                        ([[3, 4]], "eos_token_id holds 99")])
def test_generate_checks_every_id_it_feeds_the_embedding(idx, named):
    model = sf.BitNetStudent(tiny_student_config()).eval()  # vocab 64
    eos = 99 if "99" in named else None
    with pytest.raises(sf.ConfigError, match=named):
        sf.generate(model, torch.tensor(idx), 3, temperature=0, eos_token_id=eos)
    sf.generate(model, torch.tensor([[3, 63]]), 2, temperature=0, eos_token_id=1)  # the last id, 63, is known
