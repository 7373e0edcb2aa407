"""COMPILE: Phase 2's and the direct-CE arm's forward and the decode step through torch.compile, once per shape,
giving eager's results (bit for bit through the graph capture; within a stated tolerance through inductor's
kernels), and eager when compiling fails."""
import pytest
import torch
import torch.nn.functional as F

import spoonfeed.compile
import spoonfeed_helpers as sf
from spoonfeed import generation
from conftest import tiny_student_config


@pytest.fixture
def backend(monkeypatch):
    """Use `backend` for torch.compile from a clean slate; returns the list of graphs it was handed. The default,
    "count", captures graphs as torch.compile does (TorchDynamo) and runs them as they are: the capture and the
    plumbing are tested in seconds, without inductor's C++ compile (the slow tests below run inductor)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def use(name="count"):
        monkeypatch.setattr(spoonfeed.compile, "BACKEND", count if name == "count" else name)
        spoonfeed.compile.reset()
        return graphs

    yield use
    spoonfeed.compile.reset()


def _phase2_steps(compile, precision="fp32", steps=4, embedding_update="dense"):
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config())
    cfg = sf.make_config(batch_size=4, num_samples=4, lr=1e-3, precision=precision, compile=compile,
                         embedding_update=embedding_update)
    params = [q for n, q in model.named_parameters() if not n.startswith("head.")]
    opt = sf._adamw(params, 1e-3, 0.0, model.tok_embeddings.weight, 10.0, lazy=embedding_update == "lazy")
    if embedding_update == "lazy":
        model.tok_embeddings.sparse = True
    g = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for _ in range(steps):
        tokens, target = torch.randint(0, 64, (4, 16), generator=g), torch.randn(4, 16, 24, generator=g)
        losses.append(sf.superposition_step(model, opt, params, tokens, target, cfg, None, None,
                                            sf.precision_policy("cpu", precision))[0].item())
    return losses, model.state_dict()


@pytest.mark.parametrize("embedding_update", ["dense", "lazy"])
def test_a_compiled_phase2_step_is_the_eager_step_bit_for_bit_and_compiles_once(backend, embedding_update):
    graphs = backend()
    eager_losses, eager = _phase2_steps(False, embedding_update=embedding_update)
    assert graphs == []  # COMPILE off compiles nothing
    losses, state = _phase2_steps(True, embedding_update=embedding_update)
    assert losses == eager_losses
    for k in eager:
        assert torch.equal(state[k], eager[k]), k
    assert len(graphs) == 1  # one graph for four steps of one shape: no recompiles
    assert [k[0] for k in spoonfeed.compile.COMPILE_TIMES] == ["Phase 2's forward"]


def test_a_failing_compile_warns_once_and_the_step_runs_eager(backend):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    backend(broken)
    eager_losses, _ = _phase2_steps(False)
    with pytest.warns(UserWarning, match="torch.compile failed for Phase 2's forward .*no C\\+\\+ compiler.*COMPILE") \
            as record:
        losses, _ = _phase2_steps(True)
    assert losses == eager_losses and len(record) == 1


def test_train_superposition_and_the_direct_ce_arm_compile_their_forwards_and_report_the_first_step(
        tiny_cache, backend, capsys):
    graphs = backend()
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "superposition_steps": 3, "eval_every": 100, "compile": True})
    eager_cfg = sf.make_config(**{**vars(cfg), "compile": False, "run_dir": cfg.run_dir + "-eager"})
    model, eager = sf.build_student(cfg, cache), sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    sf.train_superposition(eager, cache, eager_cfg, progress=False)
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), k
    out = capsys.readouterr().out
    assert "Phase 2: the first step took" in out and "compiled in" in out
    assert len(graphs) == 1
    sf.train_direct_ce(sf.build_student(cfg, cache), cache, sf.make_config(**{**vars(cfg), "lm_head_steps": 0}),
                       progress=False)
    assert "ablation (direct CE): the first step took" in capsys.readouterr().out
    assert len(graphs) == 2


def test_the_first_step_line_says_whether_it_compiled_reused_a_graph_or_ran_eager(tiny_cache, backend, capsys):
    backend()
    cfg, cache, _ = tiny_cache
    cfg = sf.make_config(**{**vars(cfg), "superposition_steps": 2, "eval_every": 100, "compile": True})
    sf.train_superposition(sf.build_student(cfg, cache), cache, cfg, progress=False)
    assert "compiling its forward and backward" in capsys.readouterr().out
    again = sf.make_config(**{**vars(cfg), "run_dir": cfg.run_dir + "-again"})  # same shapes: the graph is reused
    sf.train_superposition(sf.build_student(again, cache), cache, again, progress=False)
    out = capsys.readouterr().out
    assert "compiled earlier in this process" in out and "compiling its forward" not in out

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    backend(broken)
    eager = sf.make_config(**{**vars(cfg), "run_dir": cfg.run_dir + "-eager"})
    with pytest.warns(UserWarning, match="torch.compile failed"):
        sf.train_superposition(sf.build_student(eager, cache), cache, eager, progress=False)
    out = capsys.readouterr().out
    assert "torch.compile failed (see the warning), so every step runs eager" in out and "runs compiled" not in out


def test_the_static_cache_decodes_as_the_growing_cache_without_compiling():
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    ids, mask = sf.left_pad([[3, 5, 7, 9, 11], [4, 6]])
    logits = {}
    for static in (False, True):
        cls = sf.StaticKVCache if static else sf.KVCache
        cache = cls(model.cfg, 2, "cpu", slots=model.cfg.max_seq_len, pad=(mask == 0).sum(1))
        with torch.no_grad(), model.quantize_once():
            steps = [model.logits(model(ids, cache)[:, -1])]
            for t in (8, 13, 21):
                steps.append(model.logits(model(torch.tensor([[t], [t + 1]]), cache)[:, -1]))
        logits[static] = torch.stack(steps)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_decoding_gives_eagers_tokens_and_compiles_once_per_batch_size(backend, precision):
    graphs = backend()
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    runs = [([[3, 5, 7, 9]], None), ([[4, 6, 8]], None)]  # another prompt length: the same shapes
    runs.append(sf.left_pad([[3, 5, 7, 9, 11], [4, 6]]))  # a batch of two, left-padded: one more graph
    for ids, mask in runs:
        ids = torch.as_tensor(ids)
        kw = dict(temperature=0, precision=precision, attention_mask=mask)
        assert torch.equal(sf.generate(model, ids, 12, compile=True, **kw), sf.generate(model, ids, 12, **kw))
    assert len(graphs) == 2
    assert len(spoonfeed.compile.COMPILE_TIMES) == 2


def test_a_compiled_streamed_generation_prints_its_compile_line_before_the_text_and_streams_eagers_tokens(
        backend, capsys):
    from transformers.generation.streamers import BaseStreamer

    class Printing(BaseStreamer):  # prints what it is given, as TextStreamer does in the notebook's cell 10
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.tolist())
            print(f"<{value.tolist()}>", end="")

        def end(self):
            print("<end>")

    backend()
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    runs = {}
    for compile in (False, True):
        streamer = Printing()
        sf.generate(model, torch.tensor([[3, 5, 7]]), 6, temperature=0, streamer=streamer, compile=compile)
        runs[compile] = streamer.puts, capsys.readouterr().out
    assert runs[True][0] == runs[False][0]  # the same puts: the prompt, then each new token
    out = runs[True][1]
    assert out.index("the greedy decode step: compiled in") < out.index("<")  # not inside the streamed text
    assert out.count("<end>") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_one_row_head_gives_float32_logits_of_the_weights_it_reads(backend, dtype):
    """Compiled, one row: a multiply-sum over the head in its dtype, accumulated in float32 (inductor fuses it into
    one pass). A bf16 matmul would round the logits to bf16 (about 1e-3 relative), far outside 1e-5."""
    backend()
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config(vocab_size=512, dim=64)).eval()
    with torch.no_grad():
        model.head.bias.normal_()
    weight, bias = generation._head_weights(model, None if dtype == torch.float32 else dtype)
    h = torch.randn(1, 64)
    ref = F.linear(h.double(), weight.double(), bias.double())
    out = torch.compile(generation._logits, backend=spoonfeed.compile.BACKEND, dynamic=False)(model, h, weight, bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("penalty,step", [(1.0, "the greedy decode step"), (1.3, "the decode step")])
def test_greedy_decoding_takes_the_argmax_inside_the_compiled_step_unless_a_processor_runs(backend, penalty, step):
    graphs = backend()
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    kw = dict(temperature=0, repetition_penalty=penalty, precision="fp32")
    assert torch.equal(sf.generate(model, ids, 12, compile=True, **kw), sf.generate(model, ids, 12, **kw))
    assert [k[0] for k in spoonfeed.compile.COMPILE_TIMES] == [step] and len(graphs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_inductor_phase2_loss_and_gradients_match_eager_within_float_rounding(backend, precision, rtol):
    """Inductor's fused kernels round differently from eager's separate passes (an int8 level can flip where
    x * scale lands near .5): the loss agrees to 1e-5 relative in float32 and 2e-3 in bf16, and each gradient to
    100 times that in relative 2-norm (a flipped level moves a few elements of a gradient, not its norm)."""
    backend("inductor")
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = sf.BitNetStudent(tiny_student_config()).train()
        cfg = sf.make_config(batch_size=4, num_samples=4, precision=precision, compile=compile)
        tokens, target = torch.randint(0, 64, (4, 16)), torch.randn(4, 16, 24)
        with sf._autocast(sf.precision_policy("cpu", precision)):
            loss = sf._phase2_loss(cfg, sf._forward(sf._projected, cfg)(model, tokens).float(), target, None)
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager), (loss, grads) = runs
    assert loss == pytest.approx(eager_loss, rel=rtol)
    assert grads.keys() == eager.keys()
    for n in eager:
        assert (grads[n] - eager[n]).norm() <= 100 * rtol * eager[n].norm(), n


@pytest.mark.slow
def test_inductor_decoding_gives_eagers_greedy_tokens(backend):
    backend("inductor")
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    assert torch.equal(sf.generate(model, ids, 20, temperature=0, compile=True),
                       sf.generate(model, ids, 20, temperature=0))
