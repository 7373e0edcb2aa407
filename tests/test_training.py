"""Phases 2 and 3 and held-out evaluation."""
import math

import numpy as np
import pytest
import torch

import spoonfeed.cache
import spoonfeed.metrics
import spoonfeed_helpers as sf
from spoonfeed.losses import IGNORE_INDEX


def _student(cfg, cache, **kw):
    return sf.build_student(cfg, cache, **kw)


@pytest.mark.parametrize("loss_fn", ["cosine", "mse", "kd"])
def test_losses_ignore_masked_positions(loss_fn):
    pred = torch.randn(2, 6, 8, requires_grad=True)
    target = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 5:] = False

    def run(p, t):
        if loss_fn == "cosine":
            return sf.cosine_loss(p, t, mask)
        if loss_fn == "mse":
            return sf.mse_loss(p, t, mask)
        return sf.kd_loss(p, t, 2.0, mask)

    loss = run(pred, target)
    grad, = torch.autograd.grad(loss, pred)
    pred2, target2 = pred.detach().clone(), target.clone()
    pred2[~mask] = 1e4 * torch.randn_like(pred2[~mask])
    target2[~mask] = float("nan")
    pred2.requires_grad_(True)
    loss2 = run(pred2, target2)
    grad2, = torch.autograd.grad(loss2, pred2)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad[mask], grad2[mask]) and not grad2[~mask].any()


def test_next_token_ce_ignores_padded_targets():
    logits = torch.randn(1, 5, 10)
    tokens = torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    ce = sf.next_token_ce(logits, tokens, mask)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], tokens[0, 1:3])
    assert torch.allclose(ce, expected)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("lazy", [False, True])
def test_mean_ce_is_the_mean_next_token_ce_of_every_prediction_and_makes_no_logits_for_the_last_position(batch_size,
                                                                                                         lazy):
    from spoonfeed.losses import mean_ce

    torch.manual_seed(0)
    states, tokens, head = torch.randn(7, 9, 6), torch.randint(0, 30, (7, 9)), torch.nn.Linear(6, 30)
    seen = []

    def logits(x):
        seen.append(tuple(x.shape))
        return head(x)

    with torch.no_grad():
        full = head(states)  # (7, 9, 30): position 8 of each block has no target
        want = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 30).double(), tokens[:, 1:].reshape(-1))
    got = mean_ce((lambda i, j: states[i:j]) if lazy else states, tokens, logits, batch_size)
    assert abs(got - want.item()) < 1e-5
    assert all(shape[1] == 8 for shape in seen) and sum(shape[0] for shape in seen) == 7


def test_held_out_ce_is_computed_once_for_the_same_weights_and_again_after_any_change(tiny_cache, monkeypatch):
    """held_out_ce remembers its figure on the model: a second call on unchanged weights (a phase's last record,
    then evaluate) makes no head product; a change to any weight, another cache's content or another precision
    computes it again, and every figure equals a fresh computation."""
    from conftest import rebuilt_in_place

    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    calls = []
    real = spoonfeed.metrics.mean_ce
    monkeypatch.setattr(spoonfeed.metrics, "mean_ce", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = sf.held_out_ce(model, cache)
    assert sf.held_out_ce(model, cache) == first and len(calls) == 1
    assert sf.evaluate(model, cache, via_teacher_head=False)["metrics"]["student_ce"] == first and len(calls) == 1
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(-1)  # a body weight: the head's inputs change
    moved = sf.held_out_ce(model, cache)
    assert len(calls) == 2 and moved != first
    with torch.no_grad():
        model.head.bias[3] += 5.0  # the head alone
    assert sf.held_out_ce(model, cache) != moved and len(calls) == 3
    remembered = sf.held_out_ce(model, cache)
    tokens = cache.tokens("val", np.arange(cache.num_val))
    assert remembered == real(sf.student_features(model, tokens), tokens, model.logits)  # a fresh computation
    n = len(calls)
    sf.held_out_ce(model, cache, batch_size=2)  # another batch size: its own figure
    assert len(calls) == n + 1
    n = len(calls)
    sf.held_out_ce(model, rebuilt_in_place(cache))  # the same folder, other content
    assert len(calls) == n + 1
    other_dtype = sf.precision_policy("cpu", "auto").autocast != sf.precision_policy("cpu", "fp32").autocast
    sf.held_out_ce(model, cache, precision="fp32")  # another autocast dtype (where "auto" is bf16 here)
    assert len(calls) == n + 1 + other_dtype


def test_weights_digest_reads_every_dtype_and_tells_weights_apart_bit_for_bit(tiny_cache):
    """The key of checkpoint signatures and of held_out_ce's memo: a bf16 student has one too, and one changed bit
    changes it."""
    from spoonfeed.checkpoints import weights_digest

    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    digest = weights_digest(model)
    assert weights_digest(_student(cfg, cache)) == digest  # the same seed, the same weights
    half = _student(cfg, cache).to(torch.bfloat16)
    assert weights_digest(half) not in (digest, None)
    with torch.no_grad():
        w = model.layers[0].feed_forward.w2.weight
        w.view(torch.int32)[0, 0] ^= 1  # the last bit of one float32
    assert weights_digest(model) != digest
    assert weights_digest(model, skip=("layers.0.feed_forward.w2",)) == weights_digest(
        _student(cfg, cache), skip=("layers.0.feed_forward.w2",))


def test_kd_is_zero_for_equal_logits_and_finite_on_random_input():
    logits = torch.randn(3, 4, 50)
    assert sf.kd_loss(logits, logits.clone(), 2.0).abs().item() < 1e-6
    kd = sf.kd_loss(torch.randn(3, 4, 50) * 30, torch.randn(3, 4, 50) * 30, 0.5)
    assert torch.isfinite(kd) and kd > 0


def _head_case(n=37, dim=16, vocab=300, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, dim, generator=g) * 0.5).requires_grad_(True)
    b = torch.randn(vocab, generator=g).requires_grad_(True) if bias else None
    return h, w, b, g


def _grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


FP32 = sf.precision_policy("cpu", "fp32")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 8, 36, 37])  # one chunk, one row a chunk, a ragged last chunk
def test_head_loss_ce_has_the_value_and_gradients_of_cross_entropy_on_full_logits(bias, chunk_rows):
    h, w, b, g = _head_case(bias=bias)
    y = torch.randint(300, (37,), generator=g)
    fused = sf.head_loss(h, w, b, FP32, targets=y, chunk_rows=chunk_rows)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, r in zip(_grads(fused, h, w, b), _grads(ref, h, w, b)):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_head_loss_kd_has_the_value_and_gradients_of_kd_loss(temperature):
    h, w, b, g = _head_case()
    teacher = torch.randn(37, 300, generator=g) * 3
    fused = sf.head_loss(h, w, b, FP32, teacher_logits=lambda i, c: teacher[i:i + c], temperature=temperature,
                         chunk_rows=10)
    ref = sf.kd_loss(torch.nn.functional.linear(h, w, b)[None], teacher[None], temperature)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, r in zip(_grads(fused, h, w, b), _grads(ref, h, w, b)):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-7)


def test_head_loss_gradients_follow_the_loss_they_are_part_of_and_skip_what_needs_none():
    h, w, b, g = _head_case()
    y = torch.randint(300, (37,), generator=g)
    once = _grads(sf.head_loss(h, w, b, FP32, targets=y), w, b)
    scaled = _grads(3.0 * sf.head_loss(h, w, b, FP32, targets=y) + 1.0, w, b)  # a weight on it, as KD and GradScaler
    assert all(torch.allclose(3 * a, s) for a, s in zip(once, scaled))
    frozen = h.detach()  # Phase 3: the states are fixed; only the head learns
    gw, = torch.autograd.grad(sf.head_loss(frozen, w, None, FP32, targets=y), [w])
    assert gw.shape == w.shape and gw.dtype == torch.float32 and gw.is_contiguous()


def test_head_loss_in_bf16_stays_near_float32():
    h, w, b, g = _head_case(n=64, dim=32, vocab=2000)
    y = torch.randint(2000, (64,), generator=g)
    bf16 = sf.precision_policy("cpu", "bf16")
    lo, lb = sf.head_loss(h, w, b, FP32, targets=y), sf.head_loss(h, w, b, bf16, targets=y)
    assert abs(lo.item() - lb.item()) < 0.02 and lb.dtype == torch.float32
    (go,), (gb,) = _grads(lo, w), _grads(lb, w)
    assert gb.dtype == torch.float32 and torch.nn.functional.cosine_similarity(go.flatten(), gb.flatten(), 0) > 0.999


@pytest.mark.parametrize("kwargs", [{}, {"targets": torch.zeros(37, dtype=torch.long),
                                         "teacher_logits": lambda i, c: torch.zeros(c, 300)}])
def test_head_loss_takes_exactly_one_of_targets_and_teacher_logits(kwargs):
    h, w, b, _ = _head_case()
    with pytest.raises(ValueError, match="either targets"):
        sf.head_loss(h, w, b, FP32, **kwargs)


@pytest.mark.parametrize("bad", [dict(chunk_rows=-5), dict(targets_len=40), dict(targets_len=30), dict(h_3d=True)])
def test_head_loss_refuses_bad_shapes_and_chunks_before_any_work(bad):
    h, w, b, g = _head_case()
    y = torch.randint(300, (bad.get("targets_len", 37),), generator=g)
    if bad.get("h_3d"):
        h = h[None]
    with pytest.raises(ValueError, match="chunk_rows|targets"):
        sf.head_loss(h, w, b, FP32, targets=y, chunk_rows=bad.get("chunk_rows"))


def test_head_loss_under_no_grad_gives_the_same_value_and_computes_no_gradient(monkeypatch):
    h, w, b, g = _head_case()
    y = torch.randint(300, (37,), generator=g)
    want = sf.head_loss(h, w, b, FP32, targets=y).item()
    with torch.no_grad():
        got = sf.head_loss(h, w, b, FP32, targets=y)
    assert got.item() == pytest.approx(want, rel=1e-6) and not got.requires_grad


def test_head_loss_kd_value_is_summed_in_float64_not_rounded_to_bf16():
    h, w, b, g = _head_case(n=64, dim=32, vocab=2000)
    teacher = torch.randn(64, 2000, generator=g)
    bf16 = sf.precision_policy("cpu", "bf16")
    value = sf.head_loss(h, w, b, bf16, teacher_logits=lambda i, c: teacher[i:i + c]).item()
    assert value != float(torch.tensor(value).bfloat16())  # not a bf16 number
    ref = sf.kd_loss(torch.nn.functional.linear(h, w, b)[None], teacher[None]).item()
    assert value == pytest.approx(ref, rel=0.02)


def _ce_plus_kd_case(seed=0, n=37, k=9):
    """Rows 12, 25 and 36 have no target (a block's last position); the KD rows include two of them."""
    h, w, b, g = _head_case(seed=seed, n=n)
    y = torch.randint(300, (n,), generator=g)
    y[[12, 25, 36]] = IGNORE_INDEX
    rows = torch.cat([torch.randperm(n - 2, generator=g)[:k - 2], torch.tensor([12, 36])]).unique()  # sorted
    teacher = torch.randn(len(rows), 300, generator=g) * 3
    return h, w, b, y, rows, (lambda i, c: teacher[i:i + c])


def _ce_plus_kd_reference(h, w, b, y, rows, teacher_logits, kd_weight, t, policy=FP32):
    """Phase 3's loss as two head_loss calls: CE on the rows with a target, + kd_weight x KD on h[rows]."""
    keep = y != IGNORE_INDEX
    return sf.head_loss(h[keep], w, b, policy, targets=y[keep]) + kd_weight * sf.head_loss(
        h[rows], w, b, policy, teacher_logits=teacher_logits, temperature=t)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [None, 1, 10, 13])  # one chunk, a row a chunk, chunks with 0 to several KD rows
@pytest.mark.parametrize("bias", [True, False])
def test_head_loss_with_kd_rows_is_ce_on_rows_with_a_target_plus_weighted_kd_on_those_rows(temperature, chunk_rows,
                                                                                           bias):
    h, w, b, y, rows, teacher = _ce_plus_kd_case()
    b = b if bias else None
    one = sf.head_loss(h, w, b, FP32, targets=y, teacher_logits=teacher, kd_rows=rows, kd_weight=0.7,
                       temperature=temperature, chunk_rows=chunk_rows)
    two = _ce_plus_kd_reference(h, w, b, y, rows, teacher, 0.7, temperature)
    assert one.item() == pytest.approx(two.item(), rel=1e-6)
    for a, r in zip(_grads(one, h, w, b), _grads(two, h, w, b)):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-7)
    gh, = _grads(sf.head_loss(h, w, b, FP32, targets=y, teacher_logits=teacher, kd_rows=rows, kd_weight=0.7,
                              temperature=temperature, chunk_rows=chunk_rows), h)
    assert gh[25].abs().max() == 0 and gh[12].abs().max() > 0  # no target and no KD: no gradient; KD alone: some


def test_head_loss_with_kd_rows_in_bf16_stays_near_the_two_calls_and_takes_no_kd_rows_as_the_ce_alone():
    h, w, b, y, rows, teacher = _ce_plus_kd_case(seed=1)
    bf16 = sf.precision_policy("cpu", "bf16")
    one = sf.head_loss(h, w, b, bf16, targets=y, teacher_logits=teacher, kd_rows=rows, kd_weight=1.0)
    two = _ce_plus_kd_reference(h, w, b, y, rows, teacher, 1.0, 1.0, policy=bf16)
    assert one.item() == pytest.approx(two.item(), rel=1e-3)
    (g1,), (g2,) = _grads(one, w), _grads(two, w)
    assert torch.nn.functional.cosine_similarity(g1.flatten(), g2.flatten(), 0) > 0.999
    keep = y != IGNORE_INDEX  # a process that holds none of the batch's KD positions: the CE alone
    none = sf.head_loss(h, w, b, FP32, targets=y, teacher_logits=teacher, kd_rows=rows[:0], kd_weight=1.0)
    assert none.item() == pytest.approx(sf.head_loss(h[keep], w, b, FP32, targets=y[keep]).item(), rel=1e-6)


@pytest.mark.parametrize("bad,message", [
    (dict(kd_rows=torch.tensor([3, 1, 7])), "increasing"),  # unsorted: the teacher's rows would not line up
    (dict(kd_rows=torch.tensor([1, 1, 7])), "increasing"),  # a row twice
    (dict(kd_rows=torch.tensor([1, 37])), "increasing row indices into h's 37 rows"),  # past the end
    (dict(kd_rows=torch.tensor([-1, 3])), "increasing"),
    (dict(kd_rows=torch.tensor([1, 3]), teacher=False), "needs both"),
    (dict(kd_rows=torch.tensor([1, 3]), ce_weight=0.5), "no ce_weight"),
    (dict(kd_rows=torch.tensor([1, 3]), no_targets=True), "no row has a target"),
    (dict(kd_rows=torch.tensor(3)), "1-d tensor of integer row indices"),  # not even a list
    (dict(kd_rows=torch.tensor([0.0, 2.5, 3.9])), "1-d tensor of integer row indices"),  # would truncate to 0, 2, 3
    (dict(kd_rows=torch.arange(37) % 2 == 0), "boolean mask"),  # a mask, not indices
    (dict(kd_rows=torch.tensor([[1, 3]])), "1-d tensor"),
    (dict(kd_rows=torch.tensor([1, 3]), temperature=0.0), "temperature=0.0 must be a finite number above 0"),
])
def test_head_loss_refuses_kd_rows_it_cannot_line_up_before_any_work(bad, message):
    h, w, b, y, _, teacher = _ce_plus_kd_case()
    if bad.get("no_targets"):
        y = torch.full_like(y, IGNORE_INDEX)
    with pytest.raises(ValueError, match=message):
        sf.head_loss(h, w, b, FP32, targets=y, teacher_logits=teacher if bad.get("teacher", True) else None,
                     kd_rows=bad["kd_rows"], ce_weight=bad.get("ce_weight"), temperature=bad.get("temperature", 1.0))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("mode", ["kd", "mixed", "kd_rows"])
def test_head_loss_refuses_a_temperature_that_is_not_a_positive_number_in_every_kd_mode(temperature, mode):
    h, w, b, y, rows, teacher = _ce_plus_kd_case()
    kw = {"kd": dict(), "mixed": dict(targets=y.clamp(min=0), ce_weight=0.5),
          "kd_rows": dict(targets=y, kd_rows=rows)}[mode]
    with pytest.raises(ValueError, match="must be a finite number above 0"):
        sf.head_loss(h, w, b, FP32, teacher_logits=teacher if mode != "kd" else lambda i, c: torch.zeros(c, 300),
                     temperature=temperature, **kw)


@pytest.mark.parametrize("bad,message", [
    (IGNORE_INDEX, r"taken only with kd_rows"),  # -100 without kd_rows: leave the row out instead
    (-3, r"token ids in \[0, 300\)"),
    (300, r"token ids in \[0, 300\)"),  # one past the vocabulary
])
@pytest.mark.parametrize("mode", ["ce", "mixed"])
def test_head_loss_refuses_targets_outside_the_vocabulary_naming_the_range(bad, message, mode):
    h, w, b, g = _head_case()
    y = torch.randint(300, (37,), generator=g)
    y[5] = bad
    kw = dict(teacher_logits=lambda i, c: torch.zeros(c, 300), ce_weight=0.5) if mode == "mixed" else {}
    with pytest.raises(ValueError, match=message):
        sf.head_loss(h, w, b, FP32, targets=y, **kw)


def test_head_loss_with_kd_rows_refuses_a_target_outside_the_vocabulary_and_float_targets():
    h, w, b, y, rows, teacher = _ce_plus_kd_case()
    with pytest.raises(ValueError, match=r"or IGNORE_INDEX \(-100\)"):
        sf.head_loss(h, w, b, FP32, targets=torch.where(y == IGNORE_INDEX, -7, y), teacher_logits=teacher,
                     kd_rows=rows)
    with pytest.raises(ValueError, match="integer token ids"):
        sf.head_loss(h, w, b, FP32, targets=y.float(), teacher_logits=teacher, kd_rows=rows)


def test_phase3_loss_is_the_ce_of_every_next_token_plus_kd_on_the_sampled_positions(tiny_cache, patch):
    """Each Phase 3 step's loss, checked against the formula on the full logits: the mean next-token CE over the
    B (T - 1) positions with a next token + head_kd_weight x the mean KD over kd_tokens distinct positions of the
    B T (the teacher's logits from its cached states at those very positions)."""
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "lm_head_steps": 3, "kd_tokens": 10, "head_kd_weight": 0.6,
                            "precision": "fp32"})
    model = _student(cfg, cache)
    teacher_head = cache.teacher_head()  # (V, D_teacher)
    tokens = cache.tokens("train", np.arange(cache.num_train))  # (N, T)
    states = cache.states("train", np.arange(cache.num_train))  # (N, T, D_teacher)
    seen, head_loss = [], sf.head_loss

    def checked(h, weight, bias, policy, **kw):
        loss = head_loss(h, weight, bias, policy, **kw)
        rows, y = kw["kd_rows"], kw["targets"]
        b, t = len(h) // cache.seq_len, cache.seq_len
        y = y.view(b, t)
        assert (y[:, -1] == IGNORE_INDEX).all()  # the last position has no next token
        blocks = [int((tokens[:, 1:] == y[i, :-1]).all(1).nonzero()[0]) for i in range(b)]  # each row's next tokens
        assert len(rows) == 10 and (rows.diff() > 0).all()  # kd_tokens distinct positions, in order
        t_logits = torch.cat([kw["teacher_logits"](j, 1) for j in range(len(rows))])
        for j, r in enumerate(rows.tolist()):  # the teacher's logits at that very block and position
            assert torch.allclose(t_logits[j], states[blocks[r // t], r % t] @ teacher_head.T, atol=1e-4)
        logits = torch.nn.functional.linear(h.detach(), weight.detach(), bias.detach())  # (B T, V)
        want = torch.nn.functional.cross_entropy(logits.view(b, t, -1)[:, :-1].flatten(0, 1), y[:, :-1].flatten()) \
            + 0.6 * sf.kd_loss(logits[rows][None], t_logits[None])
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        seen.append(loss.item())
        return loss

    patch(sf, "head_loss", checked)
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    assert len(seen) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 300, 4099])  # below, across and off the kernels' vector widths
def test_log_softmax_written_over_its_input_is_the_out_of_place_log_softmax(dtype, vocab):
    from spoonfeed.losses import _log_softmax_

    z = (torch.randn(37, vocab, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    want = torch.log_softmax(z, -1)
    got = _log_softmax_(z)
    assert got.data_ptr() == z.data_ptr() and torch.equal(got, want)  # in place, and bit for bit


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["fp32", "bf16"])
@pytest.mark.parametrize("ce_weight", [None, 0.5])
def test_head_loss_never_writes_over_the_teacher_logits_it_is_given(temperature, teacher_dtype, policy, ce_weight):
    h, w, b, g = _head_case()
    teacher = (torch.randn(37, 300, generator=g) * 3).to(teacher_dtype)
    kept = teacher.clone()
    y = torch.randint(300, (37,), generator=g) if ce_weight is not None else None
    loss = sf.head_loss(h, w, b, sf.precision_policy("cpu", policy), targets=y, ce_weight=ce_weight,
                        teacher_logits=lambda i, c: teacher[i:i + c], temperature=temperature, chunk_rows=10)
    loss.backward()
    assert torch.equal(teacher, kept)  # the views head_loss was handed are untouched (it works on its own copies)


def test_head_loss_kd_in_bf16_is_the_float32_loss_within_bf16_rounding_of_the_log_probabilities():
    h, w, b, g = _head_case(n=64, dim=32, vocab=2000)
    teacher = torch.randn(64, 2000, generator=g) * 3
    bf16 = sf.precision_policy("cpu", "bf16")
    for t in (1.0, 2.0):
        kw = dict(teacher_logits=lambda i, c: teacher[i:i + c], temperature=t)
        lo, lb = sf.head_loss(h, w, b, FP32, **kw), sf.head_loss(h, w, b, bf16, **kw)
        assert lb.item() == pytest.approx(lo.item(), rel=0.02)
        (go,), (gb,) = _grads(lo, w), _grads(lb, w)
        assert torch.nn.functional.cosine_similarity(go.flatten(), gb.flatten(), 0) > 0.999


def test_teacher_ce_is_the_teacher_heads_ce_on_the_cached_states_computed_once_per_cache(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    head = cache.teacher_head()
    expected = np.mean([sf.next_token_ce(cache.states("val", [i]) @ head.T, cache.tokens("val", [i]),
                                         reduction="none").mean().item() for i in range(cache.num_val)])
    built = []
    frozen = sf._frozen_teacher_head
    for module in (spoonfeed.metrics, spoonfeed.cache):  # evaluate, and the teacher CE it asks the cache for
        patch(module, "_frozen_teacher_head", lambda *a, **k: built.append(1) or frozen(*a, **k))
    model = _student(cfg, cache)
    first = sf.evaluate(model, cache)["metrics"]["teacher_ce"]
    n = len(built)
    assert first == pytest.approx(expected, rel=1e-5)
    assert sf.evaluate(model, cache)["metrics"]["teacher_ce"] == first and len(built) == n + n - 1  # not again
    assert sf.TeacherCache(cache.path).teacher_ce() == pytest.approx(first)  # a new cache object computes it anew


def test_lr_schedule_warms_up_peaks_and_decays():
    f = [sf.lr_schedule(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # linear warmup
    assert f[10] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then it only decays
    assert f[-1] == pytest.approx(0.1)  # down to min_ratio at the last step
    assert f[55] == pytest.approx(0.55, abs=0.02)  # cosine: halfway is the mean


def test_phase2_lowers_held_out_cosine_loss(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    before = sf.held_out_cosine(model, cache)
    history = sf.train_superposition(model, cache, cfg, progress=False)
    after = sf.held_out_cosine(model, cache)
    assert after > before + 0.05
    assert history["val_cosine"][-1] == pytest.approx(after)
    assert len(history["loss"]) == len(history["lr"]) == cfg.superposition_steps
    assert history["eval_step"] == [10, 20, 30]


def test_phase2_clips_the_projector_too(tiny_cache, monkeypatch):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, *a, **k: (clipped.append(list(ps)),
                                                                                 real(clipped[-1], *a, **k))[1])
    sf.train_superposition(model, cache, sf.make_config(**{**vars(cfg), "superposition_steps": 1,
                                                           "ablation_widths": ()}), progress=False)
    ids = {id(p) for p in clipped[0]}
    assert all(id(p) in ids for p in model.projector.parameters())
    assert all(id(p) in ids for _, m in model.bitlinears() for p in m.parameters())


@pytest.mark.parametrize("mult", [1.0, 30.0])
def test_phase2_gives_the_embedding_its_own_learning_rate(tiny_cache, mult):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "superposition_steps": 1, "warmup_steps": 0, "embed_lr_mult": mult})
    model = _student(cfg, cache)
    emb, proj = model.tok_embeddings.weight.detach().clone(), model.projector.net[0].weight.detach().clone()
    sf.train_superposition(model, cache, cfg, progress=False, fresh=True)
    # Adam's first step moves every weight with a gradient by its group's LR (no decay at step 0 of 1)
    moved = (model.tok_embeddings.weight.detach() - emb).abs()
    assert moved.max().item() == pytest.approx(cfg.lr * mult, rel=1e-3)
    assert (model.projector.net[0].weight.detach() - proj).abs().max().item() == pytest.approx(cfg.lr, rel=1e-3)
    seen = torch.zeros(cache.vocab_size, dtype=torch.bool)
    seen[cache.train_tokens.ravel()] = True
    assert moved[~seen].max().item() == 0  # rows of tokens the batch never held stay put


def test_phase2_with_kd_and_mse_runs_and_learns(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "loss": "cosine+mse", "kd_weight": 1.0, "run_dir": cfg.run_dir + "-kd"})
    model = _student(cfg, cache)
    history = sf.train_superposition(model, cache, cfg, progress=False)
    assert all(math.isfinite(x) for x in history["loss"])
    assert history["loss"][-1] < history["loss"][0]


def test_same_seed_same_history(tiny_cache, tmp_path):
    cfg, cache, _ = tiny_cache
    runs = []
    for i in range(2):
        c = sf.make_config(**{**vars(cfg), "run_dir": str(tmp_path / f"r{i}")})
        model = _student(c, cache)
        runs.append((sf.train_superposition(model, cache, c, progress=False),
                     sf.train_lm_head(model, cache, c, progress=False)))
    assert runs[0] == runs[1]


def test_phase3_leaves_body_embedding_and_projector_bit_identical(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    head_before = model.head.weight.detach().clone()
    history = sf.train_lm_head(model, cache, cfg, progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not torch.equal(model.head.weight, head_before)
    assert history["val_ce"][-1] < history["val_ce"][0] or history["val_ce"][-1] < math.log(cache.vocab_size)
    assert history["val_ppl"][-1] == pytest.approx(math.exp(history["val_ce"][-1]))


def test_phase3_computes_student_features_once(tiny_cache, monkeypatch):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    calls = []
    real = sf.BitNetStudent.forward
    monkeypatch.setattr(sf.BitNetStudent, "forward", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    n_batches = math.ceil(cache.num_train / 16) + math.ceil(cache.num_val / 16)
    assert len(calls) == n_batches  # train + held-out features, never per head step


def test_phase3_tied_mode_drifts_the_embedding(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "head_mode": "tied", "run_dir": cfg.run_dir + "-tied"})
    model = _student(cfg, cache)
    emb = model.tok_embeddings.weight.detach().clone()
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    assert not torch.equal(model.tok_embeddings.weight, emb)  # the original's defect, kept for comparison


def test_phase3_teacher_mode_needs_no_training(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "head_mode": "teacher"})
    model = _student(cfg, cache)
    history = sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    assert history["step"] == [] and len(history["val_ce"]) == 1
    assert torch.equal(model.teacher_head.weight, cache.teacher_head())


def test_evaluate_reports_baseline_and_a_perfect_projector_scores_one(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    report = sf.evaluate(model, cache)
    m = report["metrics"]
    for key in ("student_cosine", "baseline_cosine", "student_ce", "teacher_ce", "unigram_ce",
                "student_ce_via_teacher_head", "student_ppl", "teacher_ppl"):
        assert math.isfinite(m[key]), key
    assert m["cosine_gain"] == pytest.approx(m["student_cosine"] - m["baseline_cosine"])
    perfect = sf.held_out_cosine(model, cache, predict=lambda tokens, idx: cache.states("val", idx))
    assert perfect == pytest.approx(1.0, abs=1e-5)
    mean = torch.from_numpy(cache.train_mean)
    const = sf.held_out_cosine(model, cache, predict=lambda tokens, idx: mean.expand(len(idx), cache.seq_len, -1))
    assert const == pytest.approx(m["baseline_cosine"], abs=1e-6)
    assert len(report["ternary"]) == 2 * 7
    row = report["ternary"][0]
    assert row["neg"] + row["zero"] + row["pos"] == pytest.approx(1.0)
    assert "baseline" in sf.format_report(report)


def test_train_mean_is_the_mean_teacher_vector(tiny_cache):
    _, cache, _ = tiny_cache
    states = cache.states("train", np.arange(cache.num_train))
    assert torch.allclose(torch.from_numpy(cache.train_mean), states.mean(dim=(0, 1)), atol=1e-3)


def test_student_starts_at_the_mean_vector_and_the_head_at_the_unigram_predictor(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    assert torch.equal(model.projector.net[-1].bias.detach(), torch.from_numpy(cache.train_mean))
    cfg = sf.make_config(**{**vars(cfg), "lm_head_steps": 0, "head_init": "unigram"})
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    assert torch.allclose(model.head.bias.detach(), torch.from_numpy(sf.log_unigram(cache)))
    probs = np.exp(sf.log_unigram(cache))
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_logit_scale_recovers_the_temperature_of_sampled_targets():
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, 12, generator=gen)
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
    assert sf.fit_logit_scale(2 * z, targets) == pytest.approx(0.5, abs=0.02)
    assert sf.fit_logit_scale(z / 3, targets) == pytest.approx(3.0, abs=0.1)


def test_teacher_fitted_head_is_the_centred_teacher_head_when_the_student_holds_the_teacher_states(tiny_cache):
    _, cache, _ = tiny_cache
    states = cache.states("train", np.arange(cache.num_train))  # a "student" whose states are the teacher's
    weight, bias = sf.fit_head_to_teacher(cache, states, ridge=0.0)
    head = cache.teacher_head()
    centred = head - head.mean(0)
    scale = (weight * centred).sum() / centred.square().sum()
    assert scale > 0
    assert torch.allclose(weight, scale * centred, atol=1e-3 * centred.abs().max())
    assert bias.abs().max() < 1e-3 * centred.abs().max() * states.abs().max()


def test_phase3_starts_the_new_head_at_the_teacher_fit(tiny_cache):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    cfg = sf.make_config(**{**vars(cfg), "lm_head_steps": 0, "head_init": "teacher"})
    sf.train_lm_head(model, cache, cfg, progress=False, need_phase2=False)
    feats = sf.student_features(model, cache.tokens("train", np.arange(cache.num_train)))
    weight, bias = sf.fit_head_to_teacher(cache, feats)
    assert torch.equal(model.head.weight.detach(), weight) and torch.equal(model.head.bias.detach(), bias)


@pytest.mark.parametrize("chunk", [1, 7, 12 * 13, 2**20])
def test_logit_scale_is_the_same_whatever_block_of_rows_each_pass_takes(chunk):
    """The blocked passes (a row or less, a part-filled last block, everything at once) find the s that the
    CE's minimum has, to float rounding: checked against a grid search of the CE itself."""
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(300, 12, generator=gen) + torch.randn(12, generator=gen)
    targets = torch.multinomial(torch.softmax(0.7 * z, -1), 1, generator=gen).squeeze(1)
    grid = torch.linspace(0.3, 1.5, 12001)
    ce = torch.stack([torch.nn.functional.cross_entropy(g * z.double(), targets) for g in grid])
    s = sf.fit_logit_scale(z, targets, chunk=chunk)
    assert s == pytest.approx(grid[ce.argmin()].item(), abs=2e-4)
    assert s == pytest.approx(sf.fit_logit_scale(z, targets, chunk=z.numel()), rel=1e-5)


def test_logit_scale_of_bf16_logits_far_from_zero_is_the_float32_figure():
    """The Newton passes run in float32 whatever the logits' dtype: in bf16, E[z^2] - E[z]^2 of logits near 100
    cancels to noise (a reviewer saw 10.0 for a true 0.51)."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(400, 64, generator=gen)
    targets = torch.multinomial(torch.softmax(0.5 * z, -1), 1, generator=gen).squeeze(1)
    shifted = (z + 100).bfloat16()
    assert sf.fit_logit_scale(shifted, targets) == pytest.approx(sf.fit_logit_scale(shifted.float(), targets),
                                                                 rel=1e-5)
    assert sf.fit_logit_scale(shifted, targets) == pytest.approx(0.5, abs=0.1)
