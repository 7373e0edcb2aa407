"""The precision policy (issue 13): one place decides autocast, GradScaler and the teacher's dtype, from the GPU's
compute capability, for every phase, the ablation and the teacher. CUDA cards are simulated by monkeypatching
torch.cuda; fp16 autocast itself runs on this CPU."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_config

import spoonfeed.phase
import spoonfeed.precision
import spoonfeed_helpers as sf

CARDS = {  # name: (capability, autocast dtype, GradScaler, teacher dtype)
    "Tesla T4": ((7, 5), torch.float16, True, torch.float32),
    "Tesla V100-SXM2-16GB": ((7, 0), torch.float16, True, torch.float32),
    "NVIDIA A100-SXM4-40GB": ((8, 0), torch.bfloat16, False, torch.bfloat16),
}


def fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports (emulation)


@pytest.mark.parametrize("name", CARDS)
def test_policy_follows_compute_capability_never_bf16_emulation(monkeypatch, name):
    capability, autocast, scaler, teacher = CARDS[name]
    fake_gpu(monkeypatch, name, capability)
    policy = sf.precision_policy("auto")
    assert (policy.device, policy.autocast, policy.grad_scaler, policy.teacher) == ("cuda", autocast, scaler, teacher)
    dtype, use_scaler = sf.precision_policy("cuda")  # unpacks as (autocast dtype, GradScaler?)
    assert (dtype, use_scaler) == (autocast, scaler)
    assert name in policy.reason
    assert isinstance(sf.make_grad_scaler(policy), torch.amp.GradScaler) == scaler
    forced = sf.precision_policy("cuda", "fp32")
    assert (forced.autocast, forced.grad_scaler, forced.teacher) == (None, False, torch.float32)


def test_policy_on_cpu_is_float32_without_autocast_or_scaler(monkeypatch, patch):
    """A CPU without native bf16 matmul (test_cpu_precision.py covers those with it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    patch(spoonfeed.precision, "cpu_bf16_instructions", lambda: [])
    policy = sf.precision_policy("auto")
    assert (policy.device, policy.autocast, policy.grad_scaler, policy.teacher) == ("cpu", None, False, torch.float32)
    assert sf.make_grad_scaler(policy) is None
    with sf._autocast(policy):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(sf.ConfigError, match="PRECISION='fp8'"):
        sf.precision_policy("cpu", "fp8")


@pytest.mark.parametrize("name", CARDS)
@pytest.mark.parametrize("gguf", [False, True])
def test_teacher_loads_with_the_policys_dtype_whatever_the_transformers_default(monkeypatch, name, gguf):
    """An explicit dtype= (and 4-bit compute dtype), so transformers 4.56/4.57 cannot fall back to fp16."""
    from transformers import AutoModelForCausalLM

    capability, _, _, teacher = CARDS[name]
    fake_gpu(monkeypatch, name, capability)
    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: calls.append(kw) or "model")
    kw = {"gguf_file": "x.gguf"} if gguf else {}
    assert sf._load_cuda_teacher("some/teacher", kw, sf.precision_policy("cuda")) == "model"
    assert len(calls) == 1 and calls[0]["dtype"] == teacher
    if not gguf:
        assert calls[0]["quantization_config"].bnb_4bit_compute_dtype == teacher


def fp16_on_cpu_policy():
    """The T4's policy (fp16 autocast + GradScaler), run on this CPU."""
    return sf.Precision("cpu", torch.float16, True, torch.float32, "T4 policy simulated on CPU")


def test_fp16_gradient_of_1e7_survives_with_the_grad_scaler():
    """fp16's smallest subnormal is 6e-8: a 2.5e-8 upstream gradient flushes to zero unless the loss is scaled."""
    x = torch.ones(4, 8)  # four rows of ones: d loss / d w = 4 * 2.5e-8 = 1e-7 in every entry
    updates = {}
    for use_scaler in (False, True):
        w = torch.nn.Parameter(torch.zeros(3, 8))
        opt = torch.optim.SGD([w], lr=1.0)
        with sf._autocast(fp16_on_cpu_policy()):
            out = F.linear(x, w)  # (4, 3) in fp16
        assert out.dtype == torch.float16
        loss = (out.float() * 2.5e-8).sum()
        scaler = torch.amp.GradScaler("cpu") if use_scaler else None
        assert sf.optimizer_step(loss, opt, [w], grad_clip=1.0, scaler=scaler)
        updates[use_scaler] = -w.detach()
    assert torch.all(updates[False] == 0)  # the defect: the gradient underflows and nothing trains
    assert torch.allclose(updates[True], torch.full((3, 8), 1e-7), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantizers_compute_scales_in_float32_for_half_inputs(dtype):
    x = torch.stack([torch.zeros(8), torch.linspace(-1e-3, 1e-3, 8), torch.linspace(-3, 5, 8)]).to(dtype)
    q, scale = sf.quantize_activation(x)
    q32, scale32 = sf.quantize_activation(x.float())
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all()
    assert torch.equal(scale, scale32) and torch.equal(q.float(), q32)
    deq = sf.dequantize_activation(q, scale)
    assert deq.dtype == dtype and torch.isfinite(deq).all()
    assert torch.all(deq[0] == 0)  # an all-zero row stays zero (fp16 made it NaN: 0 * (127 / 1e-5 = inf))
    assert torch.allclose(deq[1].float(), x[1].float(), rtol=0, atol=1e-3 / 127)  # absmax < 2e-3: not zeroed
    w = torch.randn(16, 8).to(dtype) * 1e-3
    qw, sw = sf.quantize_weight(w)
    qw32, sw32 = sf.quantize_weight(w.float())
    assert sw.dtype == torch.float32 and torch.equal(sw, sw32) and torch.equal(qw.float(), qw32)
    assert torch.isfinite(sf.quantize_weight(torch.zeros(4, 4, dtype=dtype))[1])


def test_bitlinear_under_fp16_autocast_keeps_zero_and_small_rows_finite():
    layer = sf.BitLinear(8, 4)
    x = torch.stack([torch.zeros(8), torch.full((8,), 1e-3)])
    with sf._autocast(fp16_on_cpu_policy()):
        y = layer(x)
        with torch.no_grad():
            y_eval = layer.eval()(x)
    assert torch.isfinite(y).all() and torch.isfinite(y_eval).all()
    assert torch.all(y[0] == 0) and torch.any(y[1] != 0)


FP16_CALLERS = (sf, spoonfeed.phase, spoonfeed.metrics)  # what looks precision_policy up during Phases 2 and 3


def test_phase2_and_3_with_fp16_and_grad_scaler_resume_bit_exact(tmp_path, patch):
    """The GradScaler's state is checkpointed: an interrupted fp16 run resumes to the same weights and scale."""
    for module in FP16_CALLERS:
        patch(module, "precision_policy", lambda device="auto", precision="auto": fp16_on_cpu_policy())
    cfg = tiny_run_config(tmp_path, superposition_steps=6, lm_head_steps=4, ckpt_every=2, eval_every=3)
    from conftest import CountingLoader

    cache = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    runs = {}
    for name in ("straight", "interrupted"):
        run = sf.dataclasses.replace(cfg, run_dir=str(tmp_path / name))
        model = sf.build_student(run, cache)
        if name == "interrupted":
            sf.train_superposition(model, cache, run, progress=False, stop_after=3)
            model = sf.build_student(run, cache)  # a fresh kernel: everything comes from the checkpoint
        sf.train_superposition(model, cache, run, progress=False)
        if name == "interrupted":
            sf.train_lm_head(model, cache, run, progress=False, stop_after=2)
        sf.train_lm_head(model, cache, run, progress=False)
        runs[name] = (model.state_dict(), torch.load(tmp_path / name / "checkpoints" / "phase2.pt",
                                                     weights_only=True)["scaler"])
    (a, sa), (b, sb) = runs["straight"], runs["interrupted"]
    assert sa is not None and sa["scale"] > 0 and sa == sb
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_phase_frees_its_gradients(tiny_cache):
    """No gradients outlive a phase (0.9 GB after Phase 2 and 1.3 GB after Phase 3 at the defaults)."""
    cfg, cache, _ = tiny_cache
    cfg = sf.dataclasses.replace(cfg, superposition_steps=3, lm_head_steps=2, eval_every=3)
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    assert all(p.grad is None for p in model.parameters())
    sf.train_lm_head(model, cache, cfg, progress=False)
    assert all(p.grad is None for p in model.parameters())
    other = sf.build_student(cfg, cache)
    sf.train_direct_ce(other, cache, cfg, progress=False)
    assert all(p.grad is None for p in other.parameters())


def test_direct_ce_arm_uses_the_policy_phase3_slicing_and_the_oom_hint(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    patch(spoonfeed.phase, "precision_policy", lambda device="auto", precision="auto": fp16_on_cpu_policy())
    hints = []

    class Hint(sf._cuda_oom_hint):
        def __enter__(self):
            hints.append(1)
            return self

    patch(sf, "_cuda_oom_hint", Hint)
    model = sf.build_student(cfg, cache)
    seen, head_loss = [], sf.head_loss
    patch(sf, "head_loss", lambda h, w, b, policy, **k: seen.append((h.shape, policy, k)) or
          head_loss(h, w, b, policy, **k))
    cfg2 = sf.dataclasses.replace(cfg, superposition_steps=2, lm_head_steps=1)
    sf.train_direct_ce(model, cache, cfg2, progress=False)
    assert len(hints) == 3 and len(seen) == 3
    rows = cfg.batch_size * (cache.seq_len - 1)  # the T-1 positions that have a target
    assert all(shape == (rows, cfg.student_dim) and policy.autocast == torch.float16 and k["targets"].shape == (rows,)
               for shape, policy, k in seen)


@pytest.mark.slow
def test_ablation_frees_each_arm_before_building_the_next(tiny_cache, patch):
    import gc
    import weakref

    cfg, cache, _ = tiny_cache
    built, build = [], sf.build_student

    def tracked(*a, **k):
        gc.collect()
        assert all(ref() is None for ref in built), "an earlier ablation arm is still alive"
        model = build(*a, **k)
        built.append(weakref.ref(model))
        return model

    patch(sf, "build_student", tracked)
    sf.run_ablation(cache, sf.dataclasses.replace(cfg, ablation_steps=2, ablation_head_steps=1), progress=False)
    assert len(built) == 4  # ternary, full precision, direct CE, the other recipe


def test_a_phase_frees_its_gradients_and_optimizer_moments_with_no_collection(tiny_cache, monkeypatch):
    """The end of a phase runs no gc.collect (a full collection scans every object of the process), so what it
    drops must go by reference counting alone: with the collector off, the moments and gradients are gone."""
    import gc
    import weakref

    cfg, cache, _ = tiny_cache
    held, free = [], spoonfeed.phase._free_training_state

    def watched(model, opt):
        held.extend(weakref.ref(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        held.extend(weakref.ref(p.grad) for p in model.parameters() if p.grad is not None)
        free(model, opt)

    monkeypatch.setattr(spoonfeed.phase, "_free_training_state", watched)
    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("a phase's end ran a full collection"))
    model = sf.build_student(cfg, cache)
    gc.disable()
    try:
        sf.train_superposition(model, cache, cfg, progress=False)
    finally:
        gc.enable()
    assert held and all(ref() is None for ref in held), "a moment or gradient outlived its phase"


def test_phase1_frees_a_teacher_that_reference_cycles_keep_alive(tmp_path):
    """A transformers model after a forward can sit in reference cycles, which reference counting never frees:
    Phase 1 collects when it drops the teacher, so the teacher's weights are gone before a student is built."""
    import gc
    import weakref

    from conftest import make_teacher, make_tokenizer

    refs = []

    def loader():
        teacher = make_teacher()
        teacher.cycle = teacher  # a cycle for certain, whatever transformers' version builds
        refs.append(weakref.ref(teacher.model.embed_tokens.weight))
        return teacher, make_tokenizer()

    gc.disable()
    try:
        sf.cache_teacher_states(tiny_run_config(tmp_path), loader=loader, tokenizer=make_tokenizer(), progress=False)
        assert refs and refs[0]() is None, "the teacher outlived Phase 1"
    finally:
        gc.enable()


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_phase1_frees_the_teacher_when_it_stops_on_any_error_even_with_the_traceback_kept(tmp_path, monkeypatch,
                                                                                        error):
    """An error or an interrupt in the middle of Phase 1 (here from its progress bar, after the first batch):
    the teacher is freed all the same, although the traceback, which Jupyter keeps as sys.last_traceback, holds
    Phase 1's frame and the frames below it."""
    import gc
    import weakref

    from conftest import make_teacher, make_tokenizer

    refs = []

    def loader():
        teacher = make_teacher()
        teacher.cycle = teacher
        refs.append(weakref.ref(teacher.model.embed_tokens.weight))
        return teacher, make_tokenizer()

    class Bar:
        calls = 0

        def __init__(self, *a, **k):
            pass

        def update(self, n):
            Bar.calls += 1
            if Bar.calls == 2:
                raise error

        def close(self):
            pass

    monkeypatch.setattr(sf, "progress_bar", Bar)
    gc.disable()
    try:
        with pytest.raises(type(error)) as caught:
            sf.cache_teacher_states(tiny_run_config(tmp_path, cache_batch_size=2), loader=loader,
                                    tokenizer=make_tokenizer(), progress=False)
        assert caught.value.__traceback__ is not None and Bar.calls == 2  # kept, as Jupyter keeps it
        assert refs and refs[0]() is None, "the teacher outlived a Phase 1 that stopped"
    finally:
        gc.enable()


def test_teacher_head_is_built_from_its_tensor_without_a_random_init(tiny_cache, monkeypatch):
    cfg, cache, _ = tiny_cache

    init = torch.nn.init.kaiming_uniform_

    def no_real_init(tensor, *a, **k):
        assert tensor.is_meta, "a random (V, D) weight was initialised in memory"
        return init(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", no_real_init)
    head = sf._frozen_teacher_head(cache, "cpu")
    assert torch.equal(head.weight, cache.teacher_head()) and not head.weight.requires_grad
    x = torch.randn(3, cache.teacher_dim)
    assert torch.allclose(head(x), x @ cache.teacher_head().T)


class NanTeacherLoader:
    """A teacher in `dtype` whose final norm makes every state NaN (or huge, past float16's range)."""

    def __init__(self, dtype, value=float("nan")):
        from conftest import make_teacher, make_tokenizer

        self.teacher, self.tokenizer = make_teacher(), make_tokenizer()
        self.teacher.model.norm.weight.data.fill_(value)
        self.teacher.to(dtype)

    def __call__(self):
        return self.teacher, self.tokenizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_phase1_refuses_non_finite_teacher_states_and_names_the_dtype(tmp_path, dtype):
    cfg = tiny_run_config(tmp_path)
    with pytest.raises(sf.NonFiniteTeacherError) as err:
        sf.cache_teacher_states(cfg, loader=NanTeacherLoader(dtype), progress=False)
    msg = str(err.value)
    assert str(dtype).replace("torch.", "") in msg and "no manifest" in msg
    assert ('precision="fp32"' in msg) == (dtype != torch.float32)
    assert not list((tmp_path / "cache").rglob("manifest.json"))
    assert not list((tmp_path / "cache").rglob("*_states.npy"))
    from conftest import CountingLoader

    loader = CountingLoader()  # a working teacher then rebuilds the folder: nothing bad was reused
    cache = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 1 and torch.isfinite(cache.states("train", [0])).all()


def test_phase1_refuses_states_beyond_the_float16_cache(tmp_path):
    cfg = tiny_run_config(tmp_path)
    with pytest.raises(sf.NonFiniteTeacherError, match="float16's range"):
        sf.cache_teacher_states(cfg, loader=NanTeacherLoader(torch.float32, value=1e6), progress=False)
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_phase1_refuses_a_teacher_head_that_is_not_finite_before_any_forward(tmp_path):
    """A NaN in the LM head would pass the state checks and poison KD and evaluation later: refused up front."""
    from conftest import CountingLoader

    class BrokenHead(CountingLoader):
        def __call__(self):
            teacher, tok = super().__call__()
            with torch.no_grad():
                teacher.get_output_embeddings().weight[5, 2] = float("nan")
            return teacher, tok

    cfg = tiny_run_config(tmp_path)
    with pytest.raises(sf.NonFiniteTeacherError, match="LM head holds 1 values"):
        sf.cache_teacher_states(cfg, loader=BrokenHead(), progress=False)
    assert not list((tmp_path / "cache").rglob("manifest.json"))


MALLOC_CHILD = """
import os, sys
import torch
sys.path.insert(0, {root!r})
from spoonfeed.precision import keep_freed_memory
said = keep_freed_memory("cpu")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
x = torch.ones(200 * 2**20 // 4)  # 200 MiB, every page written
del x
print(repr(said))
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
@pytest.mark.parametrize("env, kept", [({"SPOONFEED_MALLOC": "1"}, True), ({"SPOONFEED_MALLOC": "0"}, False)])
def test_on_a_cpu_the_memory_of_a_freed_large_tensor_stays_for_the_next_step_unless_turned_off(env, kept):
    """keep_freed_memory: a freed 200 MiB tensor's pages stay in the process (the next step's tensors reuse them,
    with no page faults); with SPOONFEED_MALLOC=0 glibc's default gives them back to the kernel at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", MALLOC_CHILD.format(root=root)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout.splitlines()
    said, grown = eval(out[0]), float(out[1])
    if kept:
        assert "SPOONFEED_MALLOC=0" in said and grown > 150, (said, grown)
    else:
        assert said == "" and grown < 50, (said, grown)


def test_turned_off_after_it_was_on_in_the_same_process_malloc_is_back_to_glibcs_defaults():
    """A rerun of the setup cell with SPOONFEED_MALLOC=0 after a run with it on: the thresholds go back, so a
    freed 200 MiB tensor leaves the process again, and the line says so."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = MALLOC_CHILD.format(root=root).replace(
        'said = keep_freed_memory("cpu")',
        'keep_freed_memory("cpu"); os.environ["SPOONFEED_MALLOC"] = "0"; said = keep_freed_memory("cpu")')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "SPOONFEED_MALLOC": "1"}).stdout.splitlines()
    said, grown = eval(out[0]), float(out[1])
    assert "back to glibc's default" in said and grown < 50, (said, grown)


def test_keeping_freed_memory_is_for_cpu_runs_only(monkeypatch):
    monkeypatch.setenv("SPOONFEED_MALLOC", "1")
    assert sf.keep_freed_memory("cuda") == "" and sf.keep_freed_memory(torch.device("cuda", 0)) == ""


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_spoonfeed_malloc_off_in_any_usual_spelling_leaves_malloc_as_it_is(monkeypatch, value):
    monkeypatch.setenv("SPOONFEED_MALLOC", value)
    assert sf.keep_freed_memory("cpu") == ""


@pytest.mark.parametrize("value", ["2", "maybe", "0n"])
def test_a_spoonfeed_malloc_that_is_neither_on_nor_off_is_refused_naming_both(monkeypatch, value):
    monkeypatch.setenv("SPOONFEED_MALLOC", value)
    with pytest.raises(sf.ConfigError, match="SPOONFEED_MALLOC=.*set it to 0.*or 1"):
        sf.keep_freed_memory("cpu")
