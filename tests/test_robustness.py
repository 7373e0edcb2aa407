"""Resume after interruption, one clear error for every bad input, nothing lost."""
from pathlib import Path

import pytest
import torch
from conftest import tiny_student_config

import spoonfeed_helpers as sf


def _cfg(cfg, **kw):
    return sf.make_config(**{**vars(cfg), **kw})


def _student(cfg, cache):
    return sf.build_student(cfg, cache)


# --- checkpoints and resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["phase2", "phase3"])
def test_interrupt_and_resume_equals_uninterrupted(tiny_cache, tmp_path, phase):
    cfg, cache, _ = tiny_cache
    straight_cfg = _cfg(cfg, run_dir=str(tmp_path / "straight"), ckpt_every=5)
    broken_cfg = _cfg(cfg, run_dir=str(tmp_path / "broken"), ckpt_every=5)

    straight = _student(straight_cfg, cache)
    h2 = sf.train_superposition(straight, cache, straight_cfg, progress=False)
    h3 = sf.train_lm_head(straight, cache, straight_cfg, progress=False)

    broken = _student(broken_cfg, cache)
    if phase == "phase2":
        sf.train_superposition(broken, cache, broken_cfg, progress=False, stop_after=15)  # "the kernel dies"
        broken = _student(broken_cfg, cache)  # a fresh kernel: a new, untrained student
        r2 = sf.train_superposition(broken, cache, broken_cfg, progress=False)
        r3 = sf.train_lm_head(broken, cache, broken_cfg, progress=False)
    else:
        sf.train_superposition(broken, cache, broken_cfg, progress=False)
        sf.train_lm_head(broken, cache, broken_cfg, progress=False, stop_after=12)
        broken = _student(broken_cfg, cache)
        r2 = sf.train_superposition(broken, cache, broken_cfg, progress=False)  # finished: loaded, not redone
        r3 = sf.train_lm_head(broken, cache, broken_cfg, progress=False)
    assert r2 == h2 and r3 == h3
    a, b = straight.state_dict(), broken.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_phase_is_not_redone_unless_asked(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    model = _student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False)
    steps = []
    real = sf.superposition_step
    patch(sf, "superposition_step", lambda *a, **k: (steps.append(1), real(*a, **k))[1])
    sf.train_superposition(_student(cfg, cache), cache, cfg, progress=False)
    assert steps == []
    sf.train_superposition(_student(cfg, cache), cache, cfg, progress=False, fresh=True)
    assert len(steps) == cfg.superposition_steps


def test_checkpoint_truncated_mid_write_falls_back_to_the_previous_one(tiny_cache):
    cfg, cache, _ = tiny_cache
    cfg = _cfg(cfg, ckpt_every=10)
    model = _student(cfg, cache)
    sf.train_superposition(model, cache, cfg, progress=False, stop_after=20)
    latest, prev = sf._ckpt_paths(cfg.run_dir, "phase2")
    assert prev.exists()
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 2)
    sig = sf._signature(cfg, "phase2", model, cache)
    with pytest.warns(UserWarning, match=r"phase2\.pt is corrupt or partial"):
        state = sf.load_checkpoint(cfg.run_dir, "phase2", sig)
    assert state["step"] == 10


def test_checkpoint_is_written_atomically(tiny_cache, monkeypatch):
    cfg, cache, _ = tiny_cache
    sf.save_checkpoint(cfg.run_dir, "phase2", {"step": 1})
    real = torch.save

    def dying_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:10])  # the write is cut short ...
        raise KeyboardInterrupt  # ... and the kernel dies

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sf.save_checkpoint(cfg.run_dir, "phase2", {"step": 2})
    latest, _ = sf._ckpt_paths(cfg.run_dir, "phase2")
    assert torch.load(latest, weights_only=True)["step"] == 1  # the last good one is untouched


def test_checkpoint_from_other_settings_is_moved_aside_not_lost(tiny_cache):
    cfg, cache, _ = tiny_cache
    sf.train_superposition(_student(cfg, cache), cache, cfg, progress=False)
    other = _cfg(cfg, lr=1e-3)
    sf.train_superposition(_student(other, cache), cache, other, progress=False)
    assert (Path(cfg.run_dir) / "checkpoints" / "phase2.other-settings.pt").exists()


def test_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    cfg = _cfg(cfg, ckpt_every=5)
    model = _student(cfg, cache)
    calls = []
    real = sf.cosine_loss

    def poisoned(pred, target, mask=None):
        calls.append(1)
        return real(pred, target, mask) * (float("nan") if len(calls) == 8 else 1.0)

    patch(sf, "cosine_loss", poisoned)
    with pytest.raises(sf.NonFiniteLossError, match=r"step 7.*checkpoint"):
        sf.train_superposition(model, cache, cfg, progress=False)
    state = torch.load(sf._ckpt_paths(cfg.run_dir, "phase2")[0], weights_only=True)
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step changed nothing


def test_nan_weights_are_never_saved_as_a_result(tmp_path):
    model = sf.BitNetStudent(tiny_student_config())
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(sf.NonFiniteLossError, match="refusing to save"):
        sf.save_pretrained(model, tmp_path / "s")
    with pytest.raises(sf.NonFiniteLossError):
        sf.export_ternary(model, tmp_path / "t")
    assert not (tmp_path / "s" / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_finite_check_finds_every_nan_and_inf_and_passes_every_finite_tensor(dtype):
    """non_finite decides by one sum: it must agree with isfinite().all() on every kind of tensor, including
    finite ones whose sum overflows and non-finite ones whose infinities cancel."""
    from spoonfeed.optim import non_finite

    big = torch.finfo(dtype).max
    cases = {"empty": torch.zeros(0, dtype=dtype), "normal": torch.randn(64, 33).to(dtype),
             "sum overflows": torch.full((8, 8), big, dtype=dtype), "both signs at the limit": torch.tensor(
                 [big, -big, big], dtype=dtype)}
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        for where in (0, 1000, -1):
            t = torch.randn(40, 33).to(dtype)
            t.view(-1)[where] = value
            cases[f"{name} at {where}"] = t
    t = torch.randn(40, 33).to(dtype)
    t[0, 0], t[-1, -1] = float("inf"), float("-inf")  # the sum is NaN, not a cancellation
    cases["inf and -inf"] = t
    cases["nan beside huge values"] = torch.tensor([big, big, float("nan")], dtype=dtype)
    bad = set(non_finite(cases))
    assert bad == {k for k, t in cases.items() if not torch.isfinite(t).all()}
    assert {"nan at 0", "inf at -1", "inf and -inf", "nan beside huge values"} <= bad
    assert not {"empty", "normal", "sum overflows", "both signs at the limit"} & bad


def test_cuda_out_of_memory_names_the_sliders():
    with pytest.raises(RuntimeError, match="BATCH_SIZE, MAX_SEQ_LENGTH"):
        with sf._cuda_oom_hint():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


# --- bad input: one clear error before any work -----------------------------------------------------------

@pytest.mark.parametrize("kw,fix", [
    (dict(teacher="gpt-9000"), "bundled teacher 'smollm2'"),
    (dict(dataset="no such dataset"), "Offline, use 'stdlib'"),
    (dict(student_dim=100, student_heads=12), "multiple of the heads"),
    (dict(student_dim=36, student_heads=12), "odd"),
    (dict(seq_len=0), "MAX_SEQ_LENGTH must be positive"),
    (dict(seq_len=-5), "MAX_SEQ_LENGTH must be positive"),
    (dict(teacher="TinyLlama/TinyLlama-1.1B-Chat-v1.0", seq_len=4096), "lower MAX_SEQ_LENGTH"),
    (dict(batch_size=64, num_samples=10), "lower BATCH_SIZE"),
    (dict(loss="l1"), "one of"),
    (dict(head_mode="shared"), "one of"),
    (dict(head_init="zeros"), "one of"),
    (dict(lr=0.0), "LEARNING_RATE=0.0 must be above 0"),
    (dict(embed_lr_mult=-1.0), "EMBED_LR_MULT=-1.0 must be above 0"),
    (dict(batch_size=8.5), "BATCH_SIZE=8.5 must be a whole number"),
    (dict(btach_size=8), "did you mean 'batch_size'"),
    (dict(encoding="no-such-codec"), "ENCODING='no-such-codec' is not a text encoding"),
    (dict(encoding="base64"), "set ENCODING"),
])
def test_bad_settings_are_refused_with_the_fix(kw, fix):
    with pytest.raises(sf.ConfigError, match=fix):
        sf.make_config(**kw)


def _cell_2_form_names():
    """{RunConfig field: form setting} as the notebook's cell 2 passes them to make_config (field=FORM_NAME)."""
    import re

    src = (Path(sf.__file__).parent / "spoon_feed.py").read_text()
    call = src[src.index("cfg = sf.make_config("):]
    call = call[:call.index("\n)\n")]
    return dict(re.findall(r"\b([a-z_]+)=(?:sf\.\w+\()?([A-Z][A-Z_]*)\b", call))


def test_the_form_names_are_the_ones_cell_2_passes():
    assert sf.FORM_NAMES == _cell_2_form_names()


def test_the_docs_name_every_field_that_has_no_form_setting():
    """robustness.md says which RunConfig fields FORM_NAMES leaves out: every one of them, and no other."""
    import dataclasses
    import re

    text = (Path(sf.__file__).parent / "docs" / "robustness.md").read_text()
    listed = text[text.index("The\nother fields") if "The\nother fields" in text else text.index("other fields"):]
    listed = listed[:listed.index("have no form setting")]
    named = set(re.findall(r"`([a-z_*]+)`", listed))
    missing = [f.name for f in dataclasses.fields(sf.RunConfig) if f.name not in sf.FORM_NAMES
               and f.name not in named and not (f.name.startswith("logit_kd_") and "logit_kd_*" in named)]
    assert not missing and not {n for n in named if n != "logit_kd_*"} & set(sf.FORM_NAMES)


# one bad value of each kind a form setting can get, as the form, `papermill -p` and a YAML file pass them
_BAD = {"int": ["12.5", 12.5, "many", True, None], "float": ["1e-3", "fast", None, [1.0]], "str": [3, None],
        "bool": ["no", "1", 2], "tuple": ["128", 128]}


@pytest.mark.parametrize("field, form", sorted(sf.FORM_NAMES.items()))
def test_every_error_names_the_form_setting_the_user_typed_not_the_field(field, form):
    """Each setting the form feeds, given a value of the wrong type and (for numbers and choices) an impossible
    value: the one error names the form setting (LEARNING_RATE) and never the internal field (lr=)."""
    import dataclasses

    kind = {f.name: f.type for f in dataclasses.fields(sf.RunConfig)}[field]
    impossible = {"int": -3, "float": -1.0, "str": "???" if field not in ("cache_dir", "run_dir") else None}[kind] \
        if kind in ("int", "float", "str") else None
    values = _BAD[kind] + ([impossible] if impossible is not None else [])
    refused = 0
    for value in values:
        try:
            sf.make_config(**{field: value})
        except sf.ConfigError as e:
            refused += 1
            assert form in str(e), (value, str(e))
            assert f"{field}=" not in str(e).replace(f"{form}=", ""), (value, str(e))
    assert refused >= len(_BAD[kind]) - (kind == "int" and field == "seed")  # every wrong type (a seed may be < 0)


_FLOAT_FIELDS = [f.name for f in __import__("dataclasses").fields(sf.RunConfig) if f.type == "float"]


@pytest.mark.parametrize("field", _FLOAT_FIELDS)
def test_every_real_valued_setting_must_be_finite_and_is_checked_before_any_work(field):
    """Every float field of RunConfig, one added later included: inf, -inf and nan are refused by validate(),
    naming the setting as the user types it; its default passes."""
    import dataclasses

    assert len(_FLOAT_FIELDS) >= 12
    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(sf.ConfigError, match=rf"^{sf.setting(field)}={value}"):
            sf.make_config("smoke", **{field: value})
        with pytest.raises(sf.ConfigError, match=sf.setting(field)):
            dataclasses.replace(sf.make_config("smoke"), **{field: value}).validate()
    sf.make_config("smoke", **{field: getattr(sf.RunConfig, field)})


@pytest.mark.parametrize("field, value", [("grad_clip", 0.0), ("min_lr_ratio", 1.5), ("min_lr_ratio", -0.1),
                                          ("weight_decay", -0.01), ("logit_kd_alpha", -0.5)])
def test_real_valued_settings_out_of_their_range_are_refused(field, value):
    with pytest.raises(sf.ConfigError, match=rf"^{field}={value} must .*: set {field} to"):
        sf.make_config("smoke", **{field: value})


def test_a_setting_the_form_lacks_says_where_it_can_be_set():
    with pytest.raises(sf.ConfigError) as e:
        sf.make_config("smoke", logit_kd_alpha=2.0)
    assert "LOGIT_KD_ALPHA" not in str(e.value)
    assert "notebook's form has no such setting" in str(e.value) and "--set logit_kd_alpha=" in str(e.value)


@pytest.mark.parametrize("field, value, hint", [
    ("lr", "1e-3", "a YAML parameters file reads 1e-3 as text, so write 1.0e-3 there"),
    ("lr", "0.001", "write it as a number, 0.001, without quotes"),
    ("num_samples", "16", "write it as a whole number, 16, without quotes"),
    ("seq_len", "1e3", "write it as a whole number, 1000, without quotes"),
    ("num_samples", "12.5", "write a whole number, such as 12"),
    ("lr", "inf", "write a finite number"),
])
def test_the_hint_for_a_number_written_as_text_fits_the_settings_type(field, value, hint):
    with pytest.raises(sf.ConfigError) as e:
        sf.make_config(**{field: value})
    assert hint in str(e.value)
    assert "YAML" not in str(e.value) or field == "lr" and "e" in value  # the YAML hint only where it applies


@pytest.mark.parametrize("value, hint", [("1e-3", "write 1.0e-3"), (1.0, None)])
def test_a_number_written_as_text_says_how_to_write_it(value, hint):
    if hint is None:
        assert sf.make_config(lr=value).lr == 1.0
        return
    with pytest.raises(sf.ConfigError, match=rf"LEARNING_RATE='1e-3' must be a number \(it is the text.*{hint}"):
        sf.make_config(lr=value)
    with pytest.raises(sf.ConfigError, match=r"NUM_CACHE_SAMPLES=600.0 must be a whole number \(write 600"):
        sf.make_config(num_samples=600.0)


def test_unknown_preset_is_refused():
    with pytest.raises(sf.ConfigError, match="must be one of"):
        sf.make_config("gpu-monster")


def test_batch_larger_than_the_cache_is_refused_before_training(tiny_cache):
    cfg, cache, _ = tiny_cache
    big = _cfg(cfg, batch_size=cache.num_train + 1, num_samples=cache.num_train + 1)
    with pytest.raises(sf.ConfigError, match="lower BATCH_SIZE"):
        sf.train_superposition(_student(cfg, cache), cache, big, progress=False)
    assert not (Path(cfg.run_dir) / "checkpoints").exists()


def test_saved_student_that_does_not_fit_the_tokenizer_or_teacher_is_refused(tiny_cache):
    cfg, cache, loader = tiny_cache
    model = sf.BitNetStudent(tiny_student_config(vocab_size=8, teacher_dim=24))
    with pytest.raises(sf.ConfigError, match="distilled from"):
        sf.check_compatible(model, tokenizer=loader.tokenizer)
    with pytest.raises(sf.ConfigError, match="projector maps to 24"):
        sf.check_compatible(sf.BitNetStudent(tiny_student_config()), teacher_dim=576)
    sf.check_compatible(_student(cfg, cache), loader.tokenizer, cache.teacher_dim)  # the right pair passes


def test_preset_fills_the_settings_left_at_their_defaults_and_changed_ones_win(monkeypatch):
    monkeypatch.setenv("SPOONFEED_PRESET", "smoke")
    form = dict(num_samples=2000, teacher="Qwen/Qwen2.5-Coder-1.5B-Instruct", student_dim=768)  # 2000 is changed
    cfg = sf.make_config(sf.resolve_preset("none"), **form)
    assert cfg.teacher == "smollm2" and cfg.student_dim == 32  # left at the form default: the preset's
    assert cfg.num_samples == 2000  # moved by the user (or `papermill -p`): the user's
    assert sf.resolve_preset("cpu") == "cpu"  # the form's PRESET, when set, comes before the environment
    monkeypatch.delenv("SPOONFEED_PRESET")
    assert sf.resolve_preset("none") is None and sf.preset_from_env() is None
    assert sf.make_config(None, **form).teacher == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_a_setting_named_on_a_command_line_wins_over_the_preset_even_at_its_form_default(monkeypatch):
    """A form cannot tell a value typed at its default from one left alone, so the preset takes both; a headless
    run names what its command line set (spoonfeed_run's --set; run_notebook.py's -p, through SPOONFEED_SET), and
    those win at any value."""
    default, cpu = sf.RunConfig(), sf.PRESETS["cpu"]
    form = dict(logit_kd_steps=default.logit_kd_steps, lr=default.lr, seed=default.seed)
    assert cpu["logit_kd_steps"] != default.logit_kd_steps and cpu["lr"] == default.lr
    assert sf.make_config("cpu", **form).logit_kd_steps == cpu["logit_kd_steps"]  # the form alone: the preset's
    cfg = sf.make_config("cpu", explicit=("LOGIT_KD_STEPS", "PRESET", "RETRAIN"), **form)  # non-settings ignored
    assert cfg.logit_kd_steps == default.logit_kd_steps and cfg.lm_head_steps == cpu["lm_head_steps"]
    monkeypatch.setenv("SPOONFEED_SET", "PRESET,LOGIT_KD_STEPS, SEED,")
    assert sf.explicit_settings() == ("PRESET", "LOGIT_KD_STEPS", "SEED")
    monkeypatch.delenv("SPOONFEED_SET")
    assert sf.explicit_settings() == ()  # Colab, Jupyter, plain papermill: the form's rule alone


# --- a device torch cannot use here -----------------------------------------------------------------------

def _gpus(monkeypatch, n: int, mps: bool = False):
    """Simulate a machine with n CUDA GPUs (0: a torch without a usable GPU) and with or without MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


BAD_DEVICES = {  # device -> (GPUs, MPS, what the message says)
    "cuda": (0, False, "cannot be used on this machine"),
    "cuda:0": (0, False, "cannot be used on this machine"),
    "cuda:3": (2, False, "names cuda device 3, but this machine has 2"),
    "mps": (0, False, "MPS needs Apple silicon"),
    "meta": (0, False, "no usable meta device"),
    "garbage": (0, False, "is not a device torch knows"),
    "cuda:-1": (1, False, "is not a device torch knows"),
    "": (0, False, "is not a device torch knows"),
}


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_device_torch_cannot_use_here_is_one_config_error_before_any_work(tmp_path, monkeypatch, device):
    """make_config (cell 2, spoonfeed_run) refuses it, naming the setting and the fix, instead of an AssertionError
    from torch (CUDA on a CPU build) or a RuntimeError from accelerate much later."""
    import spoonfeed_run

    gpus, mps, said = BAD_DEVICES[device]
    _gpus(monkeypatch, gpus, mps)
    with pytest.raises(sf.ConfigError, match=f"device={device!r}") as err:
        sf.make_config("smoke", device=device, run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    assert said in str(err.value) and "'auto'" in str(err.value) and "'cpu'" in str(err.value)
    with pytest.raises(sf.ConfigError, match=f"device={device!r}"):  # headless: before the PartialState is made
        spoonfeed_run.main(["--preset", "smoke", "--set", f"device={device!r}", "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("device, gpus, mps", [("auto", 0, False), ("cpu", 0, False), ("cuda", 1, False),
                                               ("cuda:1", 2, False), ("mps", 0, True), ("auto", 2, False)])
def test_a_device_this_machine_has_is_accepted(monkeypatch, device, gpus, mps):
    _gpus(monkeypatch, gpus, mps)
    assert sf.make_config("smoke", device=device).device == (device if device != "auto" else "cpu")


# --- every path the run writes in RUN_DIR, checked before any work -----------------------------------------

def _wrong_kind(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        path.write_text("a file where the run makes a folder")
    else:
        (path / "inside").mkdir(parents=True)


@pytest.mark.parametrize("name", sf.RUN_DIR_LAYOUT)
def test_a_path_the_run_writes_that_exists_as_the_wrong_kind_is_refused_before_any_work(tmp_path, name):
    """For every path of RUN_DIR_LAYOUT, the list the writers take their paths from (run_path, RUN_DIR_EXPORTS, the
    checkpoints), a file where the run makes a folder or a folder where it writes a file is one ConfigError from
    check_folders (cell 2, spoonfeed_run) naming it, not a FileExistsError after the training."""
    from conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path)
    sf.check_folders(cfg)  # an empty RUN_DIR is fine
    _wrong_kind(Path(cfg.run_dir) / name, sf.RUN_DIR_LAYOUT[name])
    with pytest.raises(sf.ConfigError, match="RUN_DIR") as err:
        sf.check_folders(cfg)
    assert str(Path(cfg.run_dir) / name) in str(err.value)


def test_every_path_a_writer_asks_for_is_listed():
    assert sf.run_path("r", "plots/1_cache.png") == Path("r/plots/1_cache.png")
    with pytest.raises(KeyError, match="RUN_DIR_LAYOUT"):
        sf.run_path("r", "plots/6_new.png")  # a new output is listed first, and so checked by check_folders
    assert {f"checkpoints/{p}.pt" for p in ("phase2", "phase3", "logit_kd")} <= set(sf.RUN_DIR_LAYOUT)
    assert set(sf.RUN_DIR_EXPORTS.values()) <= set(sf.RUN_DIR_LAYOUT)


def test_the_plots_folder_as_a_file_stops_a_headless_run_before_phase1(tmp_path, patch):
    import spoonfeed_run

    patch(sf, "cache_teacher_states", lambda *a, **k: pytest.fail("Phase 1 ran"), called=False,
          caller=spoonfeed_run._run)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plots").write_text("not a folder")
    with pytest.raises(sf.ConfigError, match="plots"):
        spoonfeed_run.main(["--preset", "smoke", "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", f"cache_dir={tmp_path / 'cache'}"])


# --- fixes that name a notebook cell, headless -------------------------------------------------------------

def _cell_strings():
    """Every string constant of the package and the helper (docstrings aside) that names a cell, with whether it
    sits in an in_notebook call, and in which of its two wordings."""
    import ast
    import re

    root = Path(sf.__file__).parent
    for path in sorted((root / "spoonfeed").glob("*.py")) + [root / "spoonfeed_helpers.py"]:
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        wording = {}
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) == "in_notebook":
                for i, arg in enumerate(call.args):
                    for n in ast.walk(arg):
                        wording[id(n)] = ("notebook", "headless")[i]
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and \
                    re.search(r"\b(cells?|run all)\b", n.value, re.IGNORECASE):
                yield f"{path.name}:{n.lineno}", n.value, wording.get(id(n))


def test_every_fix_that_names_a_notebook_cell_has_a_headless_wording():
    found = list(_cell_strings())
    assert len(found) >= 8  # the cells named by fixes today: the checks, the faults, OOM, the phase order
    for where, text, wording in found:
        assert wording == "notebook", f"{where}: {text!r} names a cell outside in_notebook(notebook, headless)"


def test_under_spoonfeed_run_non_finite_targets_name_the_command_not_cell_3(tmp_path):
    from spoonfeed.optim import _FaultGuard

    param = torch.nn.Parameter(torch.ones(2))
    target = torch.tensor([0.0, float("nan")])
    guard = _FaultGuard("Phase 2", [param], "lower LEARNING_RATE", tmp_path, cache_path=tmp_path / "cache")
    assert "rerun cell 3" in str(guard._error(0, "Phase 2 loss is nan", target))
    with sf.headless():
        guard = _FaultGuard("Phase 2", [param], "lower LEARNING_RATE", tmp_path, cache_path=tmp_path / "cache")
        message = str(guard._error(0, "Phase 2 loss is nan", target))
    assert isinstance(guard._error(0, "x", target), sf.NonFiniteTargetError)
    assert "cell" not in message and "rerun the command: Phase 1 rebuilds it" in message
    assert "rerunning the same spoonfeed_run command resumes" in message
