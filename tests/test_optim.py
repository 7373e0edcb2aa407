"""The lazy embedding update (EMBEDDING_UPDATE = "lazy"): AdamW on the rows a batch touches, nothing on the others."""
import copy

import pytest
import torch

import spoonfeed.optim
import spoonfeed_helpers as sf
from conftest import tiny_run_config

V, D = 12, 4


def _sparse(rows, values):
    """A sparse (V, D) gradient holding `values` (n, D) at `rows` (n,), as nn.Embedding(sparse=True) gives."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (V, D), check_invariants=True)


def _pair(weight_decay, lr=1e-3):
    """The same (V, D) weight under torch's AdamW and under LazyAdamW, with the trainer's settings."""
    torch.manual_seed(0)
    w0 = torch.randn(V, D)
    dense, lazy = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    return (dense, sf._adamw([dense], lr, weight_decay, dense, 1.0)), \
        (lazy, sf._adamw([lazy], lr, weight_decay, lazy, 1.0, lazy=True))


def _step(pair, rows, values):
    (dense, opt_d), (lazy, opt_l) = pair
    dense.grad = _sparse(rows, values).to_dense()
    lazy.grad = _sparse(rows, values)
    opt_d.step()
    opt_l.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_step_that_touches_every_row_is_adamws_step(weight_decay):
    pair = _pair(weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        rows = list(range(V)) + [0, 3]  # every row, two of them twice (their gradients summed, as dense)
        _step(pair, rows, torch.randn(len(rows), D, generator=g))
    (dense, opt_d), (lazy, opt_l) = pair
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_l.state[lazy][key], opt_d.state[dense][key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_an_untouched_row_stays_put_and_its_next_touch_is_adamws_step_on_adamws_moments(weight_decay):
    pair = _pair(weight_decay)
    (dense, opt_d), (lazy, opt_l) = pair
    g = torch.Generator().manual_seed(2)
    touched = {1: [0, 1, 2], 2: [0, 2], 3: [0, 2], 4: [0, 1, 2, 5]}  # row 1 sits out steps 2-3; row 5 waits for 4
    for step, rows in touched.items():
        before_l, before_d = lazy.detach().clone(), dense.detach().clone()
        _step(pair, rows, torch.randn(len(rows), D, generator=g))
        untouched = [r for r in range(V) if r not in rows]
        assert torch.equal(lazy.detach()[untouched], before_l[untouched])  # weight frozen, no decay, no coasting
        if step in (2, 3):  # AdamW lets row 1 coast on its momentum; the lazy rule does not
            assert not torch.allclose(dense.detach()[1], before_d[1] * (1 - 1e-3 * weight_decay), atol=1e-7)
        if step == 4 and not weight_decay:  # row 1's step on its return is AdamW's step at step 4
            torch.testing.assert_close(lazy.detach()[1] - before_l[1], dense.detach()[1] - before_d[1],
                                       rtol=1e-5, atol=1e-9)
    # row 1's moments caught up on the two decays it missed: AdamW's own moments
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_l.state[lazy][key][[0, 1, 2, 5]], opt_d.state[dense][key][[0, 1, 2, 5]],
                                   rtol=1e-5, atol=1e-10)
    # row 5, first touched at step 4, had nothing to coast on: it is AdamW's row exactly, weight decay included
    torch.testing.assert_close(lazy.detach()[5], dense.detach()[5], rtol=1e-6, atol=1e-7)
    assert opt_l.state[lazy]["last"].tolist() == [4, 4, 4, 0, 0, 4, 0, 0, 0, 0, 0, 0]


def test_a_step_the_grad_scaler_found_overflowing_moves_no_row():
    (dense, opt_d), (lazy, opt_l) = _pair(0.0)
    _step(((dense, opt_d), (lazy, opt_l)), [0, 1], torch.ones(2, D))
    before, moments = lazy.detach().clone(), opt_l.state[lazy]["exp_avg"].clone()
    lazy.grad = _sparse([0, 2], torch.full((2, D), float("inf")))
    opt_l.found_inf = torch.tensor(1.0)  # what torch.amp.GradScaler.step sets on a fused optimizer
    opt_l.step()
    assert torch.equal(lazy.detach(), before) and torch.equal(opt_l.state[lazy]["exp_avg"], moments)


def test_lazy_state_survives_a_checkpoint_with_its_dtypes_and_resumes_the_same_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(V, D))
    opt = sf._adamw([w], 1e-2, 0.1, w, 1.0, lazy=True)
    g = torch.Generator().manual_seed(3)
    grads = [(torch.randint(V, (5,), generator=g).tolist(), torch.randn(5, D, generator=g)) for _ in range(6)]
    for rows, values in grads[:3]:
        w.grad = _sparse(rows, values)
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())  # as a checkpoint on disk holds it
    for rows, values in grads[3:]:
        w.grad = _sparse(rows, values)
        opt.step()
    w2 = torch.nn.Parameter(saved_w)
    opt2 = sf._adamw([w2], 1e-2, 0.1, w2, 1.0, lazy=True)
    opt2.load_state_dict(saved)
    assert opt2.state[w2]["last"].dtype == torch.long and opt2.state[w2]["log_decay"].dtype == torch.float64
    for rows, values in grads[3:]:
        w2.grad = _sparse(rows, values)
        opt2.step()
    assert torch.equal(w2.detach(), w.detach())


def test_clipping_counts_a_sparse_gradient_as_its_dense_twin():
    torch.manual_seed(0)
    rows, values = [1, 4, 4, 7], torch.randn(4, D) * 3
    a, b = torch.nn.Parameter(torch.zeros(V, D)), torch.nn.Parameter(torch.zeros(V, D))
    lin_a, lin_b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = _sparse(rows, values), _sparse(rows, values).to_dense()
    lin_a.grad, lin_b.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
    na = spoonfeed.optim.clip_grad_norm([a, lin_a], 1.0)
    nb = torch.nn.utils.clip_grad_norm_([b, lin_b], 1.0)
    torch.testing.assert_close(na, nb)
    torch.testing.assert_close(a.grad.to_dense(), b.grad)
    torch.testing.assert_close(lin_a.grad, lin_b.grad)


def test_phase2_with_a_lazy_embedding_moves_only_the_rows_its_batches_hold(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "superposition_steps": 3, "embedding_update": "lazy"})
    model = sf.build_student(cfg, cache)
    start = model.tok_embeddings.weight.detach().clone()
    held = []
    real = spoonfeed.optim.LazyAdamW._lazy_step

    def spy(self, p, group):
        held.append(p.grad.coalesce().indices()[0])  # the rows this step's gradient touches
        return real(self, p, group)

    patch(spoonfeed.optim.LazyAdamW, "_lazy_step", spy)
    sf.train_superposition(model, cache, cfg, progress=False)
    moved = (model.tok_embeddings.weight.detach() != start).any(dim=1)
    seen = torch.zeros(cache.vocab_size, dtype=torch.bool)
    seen[torch.cat(held)] = True
    assert len(held) == 3 and torch.equal(moved, seen)  # the touched rows, and no other
    assert model.tok_embeddings.sparse is False  # dense again after the phase
    body = {n: p.detach().clone() for n, p in model.named_parameters() if n != "tok_embeddings.weight"}
    dense = sf.build_student(cfg, cache)
    sf.train_superposition(dense, cache, sf.make_config(**{**vars(cfg), "embedding_update": "dense",
                                                            "run_dir": cfg.run_dir + "-dense"}), progress=False)
    assert any(not torch.equal(body[n], p) for n, p in dense.named_parameters() if n in body)  # another rule


def test_a_lazy_phase2_resumes_bit_for_bit_and_is_not_mistaken_for_a_dense_one(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "superposition_steps": 20, "ckpt_every": 10, "embedding_update": "lazy"})
    full = sf.build_student(cfg, cache)
    sf.train_superposition(full, cache, sf.make_config(**{**vars(cfg), "run_dir": cfg.run_dir + "-full"}),
                           progress=False)
    cut = sf.build_student(cfg, cache)
    sf.train_superposition(cut, cache, cfg, progress=False, stop_after=10)
    sf.train_superposition(cut, cache, cfg, progress=False)  # resumes at step 10
    for (n, a), b in zip(full.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), n
    dense = sf.make_config(**{**vars(cfg), "embedding_update": "dense"})
    assert sf._signature(dense, "phase2", cut, cache) != sf._signature(cfg, "phase2", cut, cache)


def test_embedding_update_names_the_setting(tmp_path):
    with pytest.raises(sf.ConfigError, match="EMBEDDING_UPDATE"):
        tiny_run_config(tmp_path, embedding_update="sparse")
