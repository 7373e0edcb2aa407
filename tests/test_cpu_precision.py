"""PRECISION = auto | fp32 | bf16 (issue 19): one policy for every device. On a CPU with native bf16 matmul
(avx512_bf16 or AMX) "auto" runs the teacher in bf16 and every student phase under bf16 autocast; elsewhere
float32. The CPU's instructions are simulated by monkeypatching cpu_bf16_instructions; bf16 autocast itself runs
on any x86 CPU (emulated where it is not native), so every test here runs on any machine."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import CountingLoader, make_tokenizer, tiny_run_config, tiny_student_config

import spoonfeed.precision
import spoonfeed_helpers as sf


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("native", [[], ["avx512_bf16"], ["avx512_bf16", "amx_bf16"]])
def test_auto_uses_bf16_exactly_where_the_cpu_has_native_bf16_matmul(patch, cpu_only, native):
    patch(spoonfeed.precision, "cpu_bf16_instructions", lambda: native)
    policy = sf.precision_policy("cpu", "auto")
    want = torch.bfloat16 if native else None
    assert (policy.autocast, policy.grad_scaler) == (want, False)
    assert policy.teacher == (torch.bfloat16 if native else torch.float32)
    assert policy.name == ("bf16" if native else "fp32")
    assert all(n in policy.reason for n in native)
    forced = sf.precision_policy("cpu", "fp32")
    assert (forced.autocast, forced.teacher, forced.name) == (None, torch.float32, "fp32")
    asked = sf.precision_policy("cpu", "bf16")  # always honoured on a CPU; the reason warns when it is emulated
    assert (asked.autocast, asked.teacher) == (torch.bfloat16, torch.bfloat16)
    assert ("slower than float32" in asked.reason) == (not native)


def test_cpu_bf16_instructions_are_torchs_capability_checks(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert sf.cpu_bf16_instructions() == ["avx512_bf16"]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert sf.cpu_bf16_instructions() == []


def test_bf16_on_a_gpu_without_native_bf16_is_refused_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(sf.ConfigError, match="PRECISION='auto'"):
        sf.precision_policy("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sf.precision_policy("cuda", "bf16").autocast == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", "float32"])
def test_an_unknown_precision_is_one_config_error_before_any_work(bad):
    with pytest.raises(sf.ConfigError, match="PRECISION"):
        sf.make_config("smoke", precision=bad)
    with pytest.raises(sf.ConfigError, match="PRECISION"):
        sf.precision_policy("cpu", bad)


def test_the_cache_is_keyed_by_the_teachers_dtype_and_fp32_keeps_its_old_key():
    args = ("t", "stdlib", 8, 2, 16)
    fp32, bf16 = sf.cache_request(*args), sf.cache_request(*args, teacher_dtype=torch.bfloat16)
    assert "teacher_dtype" not in fp32 and bf16["teacher_dtype"] == "bfloat16"
    assert sf.cache_folder("c", fp32) != sf.cache_folder("c", bf16)


def test_phase1_loads_the_teacher_in_the_policys_dtype_and_keeps_one_cache_per_dtype(tmp_path, monkeypatch, cpu_only, patch):
    """The default loader gets cfg.precision; switching PRECISION does not reuse the other dtype's states."""
    patch(spoonfeed.precision, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    seen = []
    teacher_and_tok = CountingLoader()

    def fake_load_teacher(name, device="auto", tokenizer=None, precision="auto"):
        seen.append(precision)
        teacher, tok = teacher_and_tok()
        return teacher.to(sf.precision_policy(device, precision).teacher), tok

    patch(sf, "load_teacher", fake_load_teacher)  # cache_teacher_states' default loader
    patch(sf, "load_tokenizer", lambda name: make_tokenizer())
    cfg = tiny_run_config(tmp_path)
    caches = {p: sf.cache_teacher_states(dataclasses.replace(cfg, precision=p), progress=False)
              for p in ("auto", "fp32", "bf16")}
    assert seen == ["auto", "fp32"]  # "bf16" is what "auto" chose here: its cache is reused
    assert caches["auto"].path == caches["bf16"].path != caches["fp32"].path
    assert caches["auto"].manifest["request"]["teacher_dtype"] == "bfloat16"
    a = caches["fp32"].states("val", np.arange(2))
    b = caches["bf16"].states("val", np.arange(2))
    assert not torch.equal(a, b)  # computed in bf16: close, not equal
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.99


class AutocastSpy:
    """Records, at every student forward and head call, whether CPU autocast is on and in which dtype."""

    def __init__(self, model, monkeypatch):
        self.forward, self.head = [], []
        forward, logits = model.forward, model.logits

        def spy_forward(*a, **k):
            self.forward.append(self.state())
            return forward(*a, **k)

        def spy_logits(h):
            self.head.append((self.state(), h.dtype))
            return logits(h)

        monkeypatch.setattr(model, "forward", spy_forward)
        monkeypatch.setattr(model, "logits", spy_logits)

    @staticmethod
    def state():
        on = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if on else None


@pytest.mark.parametrize("precision,want", [("fp32", None), ("bf16", torch.bfloat16)])
def test_every_phase_evaluation_and_generation_follow_the_setting(tmp_path, monkeypatch, cpu_only, precision, want):
    cfg = tiny_run_config(tmp_path, superposition_steps=4, lm_head_steps=3, eval_every=2, ckpt_every=0,
                          precision=precision, head_kd_weight=0.0)
    cache = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    model = sf.build_student(cfg, cache)
    spy = AutocastSpy(model, monkeypatch)
    sf.train_superposition(model, cache, cfg, progress=False)
    assert spy.forward and set(spy.forward) == {want}  # training steps and the held-out cosine
    spy.forward.clear()
    hist = sf.train_lm_head(model, cache, cfg, progress=False)
    assert spy.forward and set(spy.forward) == {want}  # the frozen body's features
    assert all(np.isfinite(hist["val_ce"]))
    spy.forward.clear()
    report = sf.evaluate(model, cache, precision=precision)
    assert spy.forward and set(spy.forward) == {want}
    # every held-out CE is scored from float32 logits: the head runs outside autocast on float32 states
    assert spy.head and all(state is None and dtype == torch.float32 for state, dtype in spy.head)
    assert np.isfinite(report["metrics"]["student_ce"])
    spy.forward.clear()
    head = sf.decode_head(model, sf.precision_policy("cpu", precision).autocast)
    assert head(torch.randn(2, cfg.student_dim)).dtype == torch.float32  # sampled in float32 either way
    out = sf.generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0, precision=precision)
    assert out.shape == (1, 7)


def test_phase3_trains_the_head_under_the_autocast_and_scores_it_in_float32(tmp_path, monkeypatch, cpu_only):
    cfg = tiny_run_config(tmp_path, superposition_steps=2, lm_head_steps=2, eval_every=1, ckpt_every=0,
                          precision="bf16")
    cache = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    head_calls = []
    import torch.nn.functional as F

    linear = F.linear

    def spy(x, w, b=None):
        if w.shape[0] == cache.vocab_size and w.shape[1] == cfg.student_dim:
            head_calls.append(AutocastSpy.state())
        return linear(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    sf.train_lm_head(model, cache, cfg, progress=False)
    assert torch.bfloat16 in head_calls  # the training steps
    assert None in head_calls  # the held-out CE


def test_changing_precision_redoes_phase2_instead_of_resuming_the_other_dtypes_checkpoint(tmp_path, cpu_only,
                                                                                            capsys):
    cfg = tiny_run_config(tmp_path, superposition_steps=4, lm_head_steps=2, ckpt_every=2, precision="fp32")
    cache = sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    model = sf.build_student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "phase2.pt", weights_only=True)
    assert "precision" not in state["signature"]  # float32 checkpoints keep the signature they had
    capsys.readouterr()
    bf16 = dataclasses.replace(cfg, precision="bf16")
    sf.train_superposition(model, cache, bf16, progress=False)
    assert "precision" in capsys.readouterr().out  # moved aside, saying why
    state = torch.load(tmp_path / "run" / "checkpoints" / "phase2.pt", weights_only=True)
    assert state["signature"]["precision"] == "bf16"


def test_bf16_generation_reads_the_head_in_bf16_cast_once_per_call_and_keeps_the_body_float32(monkeypatch):
    """Decoding is one row a step: the 49152-wide head is what is read, and only it pays to read in bf16."""
    model = sf.BitNetStudent(tiny_student_config()).eval()
    spy = AutocastSpy(model, monkeypatch)
    casts = []
    real_to = torch.Tensor.to
    head = model.head.weight

    def counting_to(t, *a, **k):
        if t.data_ptr() == head.data_ptr() and t.shape == head.shape:
            casts.append(a)
        return real_to(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    out = sf.generate(model, torch.tensor([[1, 2]]), 6, temperature=0, precision="bf16")
    assert out.shape == (1, 8)
    assert casts == [(torch.bfloat16,)]  # once per call, not once a token
    assert set(spy.forward) == {None}  # the body: float32, no autocast
    assert spy.head == []  # decode_head, not model.logits


def test_bf16_generation_agrees_with_float32_on_the_first_greedy_tokens():
    """bf16 rounds the states, so long greedy runs may part; the first tokens of a clear model agree."""
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)  # well-separated logits: rounding cannot swap the argmax
    prompt = torch.tensor([[3, 4, 5]])
    a = sf.generate(model, prompt, 3, temperature=0, precision="fp32")
    b = sf.generate(model, prompt, 3, temperature=0, precision="bf16")
    assert torch.equal(a, b)


def test_one_token_decoding_without_a_mask_equals_full_recomputation():
    """The decode step's unmasked attention (one new token sees every cached one) is the causal result."""
    torch.manual_seed(0)
    model = sf.BitNetStudent(tiny_student_config()).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), sf.quantize_once(model):
        full = model(ids)
        cache = sf.KVCache(model.cfg, 2, "cpu")
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key,default,other", [("precision", "fp32", "bf16"), ("embedding_update", "dense", "lazy")])
def test_the_moved_aside_line_names_a_left_out_setting_by_its_default_not_none(key, default, other):
    """A signature leaves some settings out at their default (older checkpoints stay valid); the line that says
    why a checkpoint was moved aside names that default, never None, both ways. Every such setting is listed."""
    from spoonfeed.checkpoints import SIGNATURE_DEFAULTS

    assert SIGNATURE_DEFAULTS[key] == default
    old = {"lr": 1.0}  # a signature at the default: no key, as before the setting existed
    new = {"lr": 1.0, key: other}
    assert sf._signature_changes(old, new) == f"{key} {default!r} -> {other!r}"
    assert sf._signature_changes(new, old) == f"{key} {other!r} -> {default!r}"


def test_every_setting_a_signature_leaves_out_has_its_default_listed():
    """The settings _signature adds only away from their default are exactly SIGNATURE_DEFAULTS' keys."""
    import inspect

    from spoonfeed.checkpoints import SIGNATURE_DEFAULTS

    source = inspect.getsource(sf._signature)
    conditional = set(re.findall(r'sig\["(\w+)"\] = (?!cfg\.batch_size)', source)) - {"batch_size", "phase2_student"}
    assert conditional == set(SIGNATURE_DEFAULTS)


def test_a_device_that_is_not_a_cpu_is_not_described_as_one():
    for precision in ("auto", "bf16"):
        assert "CPU" not in sf.precision_policy(torch.device("mps"), precision).reason
