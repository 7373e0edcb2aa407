"""The student model: BitLinear, the Llama-style ternary student, the decompressor, generation, save/load."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_student_config

import spoonfeed_helpers as sf

# --- quantizers -------------------------------------------------------------------------------------------

def test_quantized_weights_are_ternary_times_one_absmean_scale():
    w = torch.randn(32, 48)
    q, scale = sf.quantize_weight(w)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(scale, w.abs().mean())
    wq = sf._TernarySTE.apply(w)
    assert torch.equal(wq, q * scale)
    assert set((wq / scale).unique().tolist()) == {-1.0, 0.0, 1.0}


def test_exact_quantizer_values():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.0]])  # absmean 0.65: 0.1/0.65 -> 0, -0.5/0.65 -> -1, 2/0.65 -> +1
    q, scale = sf.quantize_weight(w)
    assert torch.equal(q, torch.tensor([[0.0, -1.0, 1.0, 0.0]]))
    assert scale.item() == pytest.approx(0.65)


def test_activation_of_plus_minus_one_has_scale_127():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    q, scale = sf.quantize_activation(x)
    assert scale.item() == 127
    assert torch.equal(q, 127 * x)


def test_activation_quantization_is_int8_per_token():
    x = torch.randn(3, 5, 16) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    q, scale = sf.quantize_activation(x)
    assert q.min() >= -128 and q.max() <= 127 and torch.equal(q, q.round())
    assert scale.shape == (3, 5, 1)  # one scale per token
    assert torch.equal(q.abs().amax(-1), torch.full((3, 5), 127.0))


def test_straight_through_gradient_equals_upstream_gradient():
    w = torch.randn(8, 8, requires_grad=True)
    upstream = torch.randn(8, 8)
    sf._TernarySTE.apply(w).backward(upstream)
    assert torch.equal(w.grad, upstream)
    x = torch.randn(4, 8, requires_grad=True)
    sf._Int8STE.apply(x).backward(upstream[:4])
    assert torch.equal(x.grad, upstream[:4])


def test_bitlinear_gradient_reaches_latent_weight():
    layer = sf.BitLinear(8, 4)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_eval_mode_quantizes_once_and_matches_train_mode():
    layer = sf.BitLinear(16, 8)
    x = torch.randn(2, 5, 16)
    y_train = layer(x)
    layer.eval()
    with sf.quantize_once(layer):
        y_eval = layer(x)
        cached = layer._w_cache
        y_eval2 = layer(x)
        assert layer._w_cache is cached  # reused, not re-quantized
    assert layer._w_cache is None  # dropped when the block ends
    assert torch.equal(y_train, y_eval) and torch.equal(y_eval, y_eval2)
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place update: the next eval forward reads it
    assert torch.equal(layer(x), -y_eval)


@pytest.mark.parametrize("shape,dtype", [((5, 48), torch.float32), ((2, 3, 20), torch.float32),
                                         ((1, 48), torch.bfloat16), ((4, 7), torch.float32)])
@pytest.mark.parametrize("compiled", [False, True])
def test_the_int8_ternary_matmul_is_the_float_path_to_float_rounding(shape, dtype, compiled):
    """Eager through torch._int_mm, compiled as the multiply-sum inductor fuses (captured here, run as captured);
    an all-zero row stays finite, and the output keeps x's shape and dtype."""
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype)
    x[0].zero_()
    q, scale = sf.quantize_weight(torch.randn(24, shape[-1]))
    fn = sf.ternary_linear_int8
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=lambda gm, _: gm.forward, dynamic=False)
    y = fn(x, q.to(torch.int8), scale)
    ref = F.linear(sf.fake_quantize_activation(x.float()).double(), (q * scale).double())
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.equal(y[0], torch.zeros_like(y[0]))


def test_a_layers_int8_form_is_its_eval_weight_exactly_a_pinned_export_and_a_zero_weight_included():
    layer = sf.BitLinear(16, 8).eval()
    for prepare in (lambda: None, lambda: layer.pin_ternary(*sf.quantize_weight(torch.randn(8, 16))),
                    lambda: layer.weight.data.zero_()):
        prepare()
        q, scale = layer.ternary_int8()
        assert q.dtype == torch.int8 and set(q.unique().tolist()) <= {-1, 0, 1} and scale.dtype == torch.float32
        assert torch.equal(q.float() * scale, layer.quantized_weight())


def test_quantize_once_int8_decodes_as_the_float_path_and_keeps_nothing_after_the_block():
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), sf.quantize_once(model):
        ref = model(ids)
    with torch.no_grad(), sf.quantize_once(model, int8=True):
        assert all(m._int8 is not None and m._w_cache is None for _, m in model.bitlinears())
        out = model(ids)
        with sf.quantize_once(model):  # a nested float block, then the int8 forms are back
            assert all(m._int8 is None for _, m in model.bitlinears())
        assert all(m._int8 is not None for _, m in model.bitlinears())
    assert all(m._int8 is None and m._w_cache is None for _, m in model.bitlinears())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with sf.quantize_once(model, int8=True):
        x = torch.randn(3, 16, requires_grad=True)
        model.layers[0].feed_forward.w1(x).sum().backward()  # with autograd on: the float path and its STE
        assert x.grad.abs().sum() > 0
        model.train()  # training mode drops the int8 forms
        assert all(m._int8 is None for _, m in model.bitlinears())
    control = sf.BitNetStudent(tiny_student_config(ternary=False)).eval()
    with sf.quantize_once(control, int8=True):  # full-precision layers have no ternary form
        assert all(m._int8 is None for _, m in control.bitlinears())


def test_full_precision_bitlinear_is_a_plain_linear():
    layer = sf.BitLinear(8, 4, quantize=False)
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


# --- student --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 32)])
def test_shapes_for_odd_batch_and_sequence(B, T):
    model = sf.BitNetStudent(tiny_student_config())
    idx = torch.randint(0, 64, (B, T))
    h = model(idx)
    assert h.shape == (B, T, 16)
    assert model.projector(h).shape == (B, T, 24)
    assert model.logits(h).shape == (B, T, 64)


@pytest.mark.parametrize("kw,fix", [
    (dict(dim=30, n_heads=4), "multiple of the heads"),
    (dict(dim=18, n_heads=2), "odd"),
    (dict(dim=0), "positive"),
    (dict(n_layers=-1), "positive"),
    (dict(head_mode="shared"), "one of"),
])
def test_bad_student_config_raises_before_building(kw, fix):
    with pytest.raises(sf.ConfigError, match=fix):
        tiny_student_config(**kw)


def test_too_long_input_is_refused():
    model = sf.BitNetStudent(tiny_student_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_student_is_causal_and_uses_positions():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    idx = torch.randint(0, 64, (1, 10))
    h = model(idx)
    idx2 = idx.clone()
    idx2[0, 7] = (idx[0, 7] + 1) % 64
    assert torch.equal(model(idx2)[:, :7], h[:, :7])  # the future cannot leak into the past
    swapped = idx[:, [1, 0, *range(2, 10)]]
    # without positions, attention over a set cannot tell the order of the past: RoPE can
    assert not torch.allclose(model(swapped)[0, -1], h[0, -1])


def test_every_projection_is_ternary_and_the_named_parts_full_precision():
    model = sf.BitNetStudent(tiny_student_config())
    bitlinear_names = {n for n, _ in model.bitlinears()}
    assert len(bitlinear_names) == 2 * 7
    assert not any(n.startswith(sf.BitNetStudent.FULL_PRECISION) for n in bitlinear_names)
    assert isinstance(model.tok_embeddings, torch.nn.Embedding) and isinstance(model.head, torch.nn.Linear)


def test_head_is_untied_by_default_and_tied_mode_reuses_the_embedding():
    model = sf.BitNetStudent(tiny_student_config())
    assert model.head.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    tied = sf.BitNetStudent(tiny_student_config(head_mode="tied"))
    h = tied(torch.randint(0, 64, (1, 4)))
    assert torch.equal(tied.logits(h), h @ tied.tok_embeddings.weight.T)


def test_teacher_head_mode_decodes_through_the_projector():
    model = sf.BitNetStudent(tiny_student_config(head_mode="teacher"))
    w = torch.randn(64, 24)
    model.attach_teacher_head(w)
    h = model(torch.randint(0, 64, (1, 4)))
    assert torch.allclose(model.logits(h), model.projector(h) @ w.T)


def test_decompressor_has_the_original_shape():
    net = sf.Decompressor(16, 40).net
    assert [type(m) for m in net] == [torch.nn.Linear, torch.nn.GELU, torch.nn.LayerNorm, torch.nn.Linear]
    assert (net[0].in_features, net[0].out_features, net[3].out_features) == (16, 32, 40)


def test_same_seed_same_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = sf.BitNetStudent(tiny_student_config())
        outs.append(model.logits(model(torch.arange(12).view(2, 6))))
    assert torch.equal(outs[0], outs[1])


def test_tiny_student_overfits_one_batch():
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config())
    idx = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = sf.next_token_ce(model.logits(model(idx)), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


# --- generation -----------------------------------------------------------------------------------------

def _full_recompute_greedy(model, idx, n):
    for _ in range(n):
        nxt = model.logits(model(idx))[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_cached_greedy_generation_equals_full_recomputation():
    torch.manual_seed(3)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = _full_recompute_greedy(model, prompt, 20)
    got = sf.generate(model, prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(got, expected)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (1, 4))
    greedy = sf.generate(model, prompt, 10, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sf.generate(model, prompt, 10, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sf.generate(model, prompt, 10, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_sampling_is_reproducible_with_a_generator():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (1, 4))
    a = sf.generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = sf.generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_generation_stops_at_eos():
    model = sf.BitNetStudent(tiny_student_config()).eval()
    prompt = torch.randint(0, 64, (1, 4))
    greedy = sf.generate(model, prompt, 10, temperature=0)
    eos = greedy[0, 6].item()  # the third generated token
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    out = sf.generate(model, prompt, 10, temperature=0, eos_token_id=eos)
    assert out.shape[1] == 4 + first + 1 and out[0, -1].item() == eos


def test_generation_never_runs_past_the_position_limit_silently():
    model = sf.BitNetStudent(tiny_student_config(max_seq_len=12)).eval()
    with pytest.warns(UserWarning, match="max_seq_len"):
        out = sf.generate(model, torch.zeros(1, 5, dtype=torch.long), 50, temperature=0)
    assert out.shape[1] == 12
    with pytest.raises(ValueError, match="shorten the prompt"):
        sf.generate(model, torch.zeros(1, 12, dtype=torch.long), 5)


# --- save / load ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["new", "tied", "teacher"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, mode):
    model = sf.BitNetStudent(tiny_student_config(head_mode=mode)).eval()
    if mode == "teacher":
        model.attach_teacher_head(torch.randn(64, 24))
    idx = torch.randint(0, 64, (2, 9))
    sf.save_pretrained(model, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]
    loaded = sf.load_pretrained(tmp_path / "s")
    assert torch.equal(loaded.logits(loaded(idx)), model.logits(model(idx)))
    assert torch.equal(loaded.projector(loaded(idx)), model.projector(model(idx)))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        sf.load_pretrained(tmp_path / "nothing")
    model = sf.BitNetStudent(tiny_student_config())
    sf.save_pretrained(model, tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        sf.load_pretrained(tmp_path / "s")
    sf.save_pretrained(model, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["dim"] = 32
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        sf.load_pretrained(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        sf.load_pretrained(tmp_path / "s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 7), (1, 1, 256)])
def test_the_fused_int8_round_trip_equals_quantize_then_dequantize_bit_for_bit(dtype, shape):
    """BitLinear's fast path (fewer passes, in place) must give exactly the reference quantizer's values."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype)
    x[0] = 0  # an all-zero row: scale clamped, no NaN
    ref = sf.dequantize_activation(*sf.quantize_activation(x))
    got = sf.fake_quantize_activation(x)
    assert got.dtype == x.dtype and torch.equal(got, ref)
    if dtype == torch.float32:
        before = x.clone()
        sf.fake_quantize_activation(x)
        assert torch.equal(x, before)  # the input is never written
