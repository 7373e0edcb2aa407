"""The notebook's shape: numbered form cells with the original's defaults, no functions, no outputs in git.
(The notebook itself runs under `pytest --nbmake` in smoke mode; see scripts/test.sh.)"""
import json
import re

from conftest import ROOT, copy_code

NB = json.loads((ROOT / "spoon_feed.ipynb").read_text())
CODE = ["".join(c["source"]) for c in NB["cells"] if c["cell_type"] == "code"]


def test_outputs_are_stripped_and_no_functions_are_defined():
    assert all(not c.get("outputs") and not c.get("execution_count") for c in NB["cells"] if c["cell_type"] == "code")
    assert not any(re.search(r"^\s*(def|class|lambda)\b", src, re.M) for src in CODE)


def test_cells_are_numbered_steps_with_a_why_line():
    titles = [re.match(r"# @title (\d+)\. ", src) for src in CODE]
    assert all(titles) and [int(t.group(1)) for t in titles] == list(range(1, len(CODE) + 1))
    assert all("# @markdown" in src for src in CODE)


def test_form_defaults_are_the_original_notebooks():
    src = "\n".join(CODE)
    expected = {"TEACHER_MODEL": '"Qwen/Qwen2.5-Coder-1.5B-Instruct"', "DATASET": '"roneneldan/TinyStories"',
                "NUM_CACHE_SAMPLES": "500", "MAX_SEQ_LENGTH": "128", "STUDENT_DIM": "768", "STUDENT_LAYERS": "12",
                "STUDENT_HEADS": "12", "SUPERPOSITION_STEPS": "500", "LM_HEAD_STEPS": "200", "BATCH_SIZE": "16",
                "LEARNING_RATE": "1e-3"}
    for name, value in expected.items():
        assert re.search(rf"^{name} = {re.escape(value)}  # @param", src, re.M), name
    for option in ("Qwen/Qwen2.5-Coder-7B-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "smollm2", "stdlib",
                   "Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B"):
        assert option in src
    for knob in ("LOSS", "KD_WEIGHT", "HEAD_MODE", "CACHE_DIR"):
        assert re.search(rf"^{knob} = .*# @param", src, re.M), knob


def test_every_form_settings_default_is_its_runconfig_fields_default():
    """A preset fills in the settings left at their default, judged against RunConfig's defaults: a form default
    that differs (KD_TEMPERATURE was 1.0 on the form, 2.0 in RunConfig) always counts as changed in the notebook,
    and a headless run without the form (spoonfeed_run) trains something else from the same settings."""
    import ast

    import spoonfeed_helpers as sf
    from spoonfeed.config import FORM_FIELDS

    values = {}
    for node in ast.parse(CODE[0]).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    default = sf.RunConfig()
    checked = [name for name in sf.FORM_NAMES.values() if name in values]
    assert len(checked) >= 25  # every form setting that feeds a RunConfig field
    for name in checked:
        field = FORM_FIELDS[name]
        value = sf.parse_widths(values[name]) if name == "ABLATION_WIDTHS" else values[name]
        assert value == getattr(default, field), f"{name} = {value!r} on the form, {field} = {getattr(default, field)!r}"


def test_every_phase_has_a_plot():
    for step in ("plot_cache", "plot_phase2", "plot_phase3", "plot_evaluation", "plot_ablation"):
        assert any(step in src and "plt.show()" in src for src in CODE), step


def test_the_ipynb_is_spoon_feed_py_paired_by_jupytext():
    """spoon_feed.py is the source; after `jupytext --sync spoon_feed.py` both hold the same cells (sources,
    tags, form metadata) and notebook metadata. jupytext's own comparison names the first difference."""
    import jupytext
    from jupytext.compare import compare_notebooks

    compare_notebooks(jupytext.read(ROOT / "spoon_feed.ipynb"), jupytext.read(ROOT / "spoon_feed.py"),
                      fmt="py:percent")
    assert not {"papermill", "widgets"} & set(NB["metadata"])  # no executed notebook committed in its place


def test_papermill_sees_every_form_setting_as_a_parameter():
    """Cell 1 is tagged `parameters` and holds every `# @param`, so `papermill -p NAME value` sets any of them."""
    import papermill

    param = r"^(\w+) = .*# @param"
    in_cell_1 = set(re.findall(param, CODE[0], re.M))
    assert in_cell_1 == set(re.findall(param, "\n".join(CODE), re.M))  # no setting hides in a later cell
    assert {"PRESET", "STUDENT_DIM", "SEED"} <= in_cell_1
    assert set(papermill.inspect_notebook(str(ROOT / "spoon_feed.ipynb"))) == in_cell_1


def test_generation_settings_are_form_fields_and_the_cell_streams():
    src = "\n".join(CODE)
    for knob, value in (("MAX_NEW_TOKENS", "30"), ("TEMPERATURE", "0.7"), ("TOP_K", "50"), ("TOP_P", "0.95")):
        assert re.search(rf"^{knob} = {re.escape(value)}  # @param", CODE[0], re.M), knob
    assert re.search(r"check_generation_settings\(MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P\)", CODE[1])  # cell 2
    generate_cell = next(c for c in CODE if "generate_text" in c)
    assert "TextStreamer(" in generate_cell and "streamer=streamer" in generate_cell
    assert all(k in generate_cell for k in ("MAX_NEW_TOKENS", "TEMPERATURE", "TOP_K", "TOP_P"))
    assert "format_generations(" in generate_cell

def test_the_save_cell_writes_every_format_and_a_stock_pipeline_reloads_the_export():
    save = next(src for src in CODE if "Save and export" in src)
    assert "sf.export_all(" in save and "GGUF_QTYPE" in save and "push_to_hub" in save
    reload = next(src for src in CODE if 'pipeline("text-generation"' in src)
    assert CODE.index(reload) == CODE.index(next(src for src in CODE if "sf.generate_text(" in src)) + 1
    settings = CODE[0]
    for knob in ("HEAD_BIAS", "GGUF_QTYPE", "HUB_REPO_ID"):
        assert re.search(rf"^{knob} = .*# @param", settings, re.M), knob
    assert "head_bias=HEAD_BIAS" in CODE[1]

# --- the Colab runtime (issue 13) -----------------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import spoonfeed_helpers as sf  # noqa: E402


def test_metadata_asks_colab_for_a_t4_and_the_preset_is_a_dropdown():
    assert NB["metadata"]["accelerator"] == "GPU" and NB["metadata"]["colab"]["gpuType"] == "T4"
    assert re.search(r'^PRESET = "none"  # @param \["none", "cpu", "smoke"\]', CODE[0], re.M)


@pytest.mark.parametrize("teacher", ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
def test_a_cpu_runtime_with_a_hub_teacher_and_no_preset_stops_naming_both_fixes(monkeypatch, teacher):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = sf.make_config(teacher=teacher)
    with pytest.raises(sf.ConfigError) as err:
        sf.check_runtime(cfg, None)
    assert "Runtime \u2192 Change runtime type \u2192 T4 GPU" in str(err.value)
    assert 'PRESET = "cpu"' in str(err.value)
    sf.check_runtime(cfg, "cpu")  # a preset: the user chose CPU
    sf.check_runtime(sf.make_config(teacher=sf.BUNDLED_TEACHER), None)  # the bundled teacher is meant for CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sf.check_runtime(cfg, None)  # a GPU runtime


class FakeColab:
    """google.colab in sys.modules; subprocess.run recorded; `git clone` makes the folder, and fails with exit
    status 128 when the folder already exists, as git does."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr(sys, "path", list(sys.path))

    def run(self, args, check=False, **kw):
        self.calls.append(args)
        if args[:2] == ["git", "clone"]:
            target = args[-1]
            if os.path.exists(target):
                raise subprocess.CalledProcessError(128, args)
            os.makedirs(os.path.join(target, "spoonfeed"))
            for name in ("spoonfeed_helpers.py", os.path.join("spoonfeed", "__init__.py")):
                open(os.path.join(target, name), "w").close()
        return subprocess.CompletedProcess(args, 0)

    def clones(self):
        return sum(a[:2] == ["git", "clone"] for a in self.calls)


def run_setup_cell(monkeypatch):
    """Cells 1 and 2 as Colab runs them (PRESET smoke: no GPU here)."""
    monkeypatch.delenv("SPOONFEED_PRESET", raising=False)
    ns = {}
    exec(CODE[0].replace('PRESET = "none"', 'PRESET = "smoke"'), ns)
    exec(CODE[1], ns)
    return ns


def test_setup_cell_reruns_and_restarts_without_cloning_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    colab = FakeColab(monkeypatch)
    run_setup_cell(monkeypatch)
    run_setup_cell(monkeypatch)  # rerun in the same session
    clone = os.path.abspath("spoon-feed")
    assert colab.clones() == 1 and sys.path.count(clone) == 1
    sys.path.remove(clone)  # "Restart session and run all": a fresh sys.path, the clone still on disk
    ns = run_setup_cell(monkeypatch)
    assert colab.clones() == 1 and sys.path.count(clone) == 1
    assert ns["cfg"].student_dim == sf.PRESETS["smoke"]["student_dim"]


def test_setup_cell_uses_the_code_beside_the_notebook_and_redoes_a_cut_clone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_code(tmp_path)  # the helper file and its package beside the notebook
    colab = FakeColab(monkeypatch)
    run_setup_cell(monkeypatch)
    assert colab.clones() == 0 and os.path.abspath("spoon-feed") not in sys.path
    shutil.rmtree(tmp_path / "spoonfeed")  # the helper file alone is not enough: it imports the package
    run_setup_cell(monkeypatch)
    assert colab.clones() == 1 and os.path.abspath("spoon-feed") in sys.path
    shutil.rmtree(tmp_path / "spoon-feed")
    (tmp_path / "spoon-feed").mkdir()  # a clone interrupted before the code arrived
    (tmp_path / "spoon-feed" / "spoonfeed_helpers.py").write_text("")
    run_setup_cell(monkeypatch)
    assert colab.clones() == 2
    assert all((tmp_path / "spoon-feed" / f).exists() for f in ("spoonfeed_helpers.py", "spoonfeed/__init__.py"))


# --- cell 2 checks every setting; cell 11 decodes with the form's settings (issue 17) ---------------------------

def test_cell_2_reads_every_form_setting_of_cell_1():
    """Every setting reaches a check in cell 2 (make_config, or a check_* call), so a bad one stops there."""
    for name in re.findall(r"^(\w+) = .*# @param", CODE[0], re.M):
        assert re.search(rf"\b{name}\b", CODE[1]), name


@pytest.mark.parametrize("name, value", [("GGUF_QTYPE", "Q4_0"), ("HUB_REPO_ID", "bad name"),
                                         ("HUB_REPO_ID", "me/bad@name!"), ("HUB_REPO_ID", "student"),
                                         ("RETRAIN", "no"), ("RUN_ABLATION", "yes"), ("RUN_ABLATION", 0),
                                         ("ABLATION_WIDTHS", "wide"), ("ABLATION_WIDTHS", "128.5"),
                                         ("ABLATION_WIDTHS", "64;128"), ("ABLATION_WIDTHS", "0"),
                                         ("ABLATION_WIDTHS", "-64"), ("ABLATION_WIDTHS", "6"),  # 6/2 heads: odd
                                         ("ABLATION_WIDTHS", 1.5)])
def test_a_bad_save_cell_or_switch_setting_stops_cell_2_before_any_work(tmp_path, monkeypatch, name, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPOONFEED_PRESET", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    ns = {}
    exec(CODE[0].replace('PRESET = "none"', 'PRESET = "smoke"'), ns)
    ns[name] = value  # as papermill's injected cell sets it
    with pytest.raises(sf.ConfigError, match=name):
        exec(CODE[1], ns)
    assert os.listdir(tmp_path) == []  # no folder made, nothing cached or trained


@pytest.mark.parametrize("text, widths", [("", ()), ("64", (64,)), (" 64 , 128 ", (64, 128)), ("64,", (64,)),
                                          (128, (128,))])
def test_ablation_widths_take_comma_separated_whole_numbers(text, widths):
    assert sf.parse_widths(text) == widths
    assert sf.make_config("smoke", ablation_widths=widths).ablation_widths == widths


def test_cell_2_needs_a_hub_token_only_when_hub_repo_id_is_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPOONFEED_PRESET", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    ns = {}
    exec(CODE[0].replace('PRESET = "none"', 'PRESET = "smoke"'), ns)
    exec(CODE[1], dict(ns))  # HUB_REPO_ID = "": no upload, no token needed
    ns["HUB_REPO_ID"] = "me/student"
    with pytest.raises(sf.ConfigError, match="HUB_REPO_ID is set but there is no Hugging Face token"):
        exec(CODE[1], ns)


class RecordingPipeline:
    """Stands in for transformers.pipeline: a real tokenizer, a model with a position limit, calls recorded."""

    def __init__(self, limit):
        from conftest import make_tokenizer

        self.tokenizer = make_tokenizer()
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=limit))
        self.calls = []
        self.seeds = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return [{"generated_text": prompt + " ..."}]


def run_reload_cell(exported, limit=12, **settings):
    """Cell 11 with transformers' pipeline replaced by a RecordingPipeline; returns the calls' keyword arguments."""
    recorder = RecordingPipeline(limit)
    cell = next(c for c in CODE if 'pipeline("text-generation"' in c)
    assert "from transformers import pipeline, set_seed\n" in cell
    ns = {"sf": sf, "exported": exported, "cfg": sf.make_config("smoke", head_mode=settings.pop("mode", "new")),
          "PROMPTS": sf.ORIGINAL_PROMPTS, "MAX_NEW_TOKENS": 30, "TEMPERATURE": 0.7, "TOP_K": 50, "TOP_P": 0.95,
          "SEED": 7, "pipeline": lambda task, model, device: recorder, "set_seed": recorder.seeds.append}
    ns.update(settings)
    exec(cell.replace("from transformers import pipeline, set_seed\n", ""), ns)
    return recorder.calls


def test_the_reload_cell_decodes_with_the_forms_settings_within_the_students_positions(capsys):
    calls = run_reload_cell({"hf": "student-hf"}, TEMPERATURE=0.9, TOP_K=7, TOP_P=0.5)
    assert len(calls) == len(sf.ORIGINAL_PROMPTS)
    for kw in calls:
        assert (kw["do_sample"], kw["temperature"], kw["top_k"], kw["top_p"]) == (True, 0.9, 7, 0.5)
        assert "max_new_tokens" not in kw and kw["max_length"] == 12  # 30 new tokens would pass the 12 positions
    assert all(kw["top_k"] == 0 for kw in run_reload_cell({"hf": "x"}, TOP_K=0))  # 0: no top-k
    assert all(not kw["do_sample"] and "top_k" not in kw for kw in run_reload_cell({"hf": "x"},
                                                                                    TEMPERATURE=0))
    capsys.readouterr()
    calls = run_reload_cell({"hf": "x"}, limit=3)  # 4, 5 and 2 tokens with the test tokenizer
    assert len(calls) == 1 and "Skipped: the prompt has 4 tokens but the student only knows 3 positions" in \
        capsys.readouterr().out  # a prompt too long is reported, and the others still run


def test_the_reload_cell_seeds_sampling_with_the_forms_seed_before_decoding():
    seeds = []
    calls = run_reload_cell({"hf": "x"}, SEED=3, set_seed=seeds.append)
    assert seeds == [3] and len(calls) == len(sf.ORIGINAL_PROMPTS)


def test_the_reload_cell_says_why_it_is_skipped_in_teacher_head_mode(capsys):
    calls = run_reload_cell({"safetensors": "student", "ternary": "student-ternary"}, mode="teacher")
    assert calls == []
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Reload skipped:") and "HEAD_MODE = 'teacher'" in out


@pytest.mark.parametrize("shell", [None, "cpu", "smoke"])
def test_the_test_commands_notebook_runs_the_smoke_preset_and_the_environment_is_put_back(monkeypatch, shell):
    """tests/nbmake_smoke.py, the plugin scripts/test.sh loads: SPOONFEED_PRESET=smoke while the notebook's item
    runs (its kernel inherits it), whatever the shell held, and as it was afterwards; other items untouched."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    import nbmake_smoke

    if shell is None:
        monkeypatch.delenv("SPOONFEED_PRESET", raising=False)
    else:
        monkeypatch.setenv("SPOONFEED_PRESET", shell)
    test = SimpleNamespace(path=Path("tests/test_x.py"), stash=pytest.Stash())
    notebook = SimpleNamespace(path=Path("spoon_feed.ipynb"), stash=pytest.Stash())
    nbmake_smoke.pytest_runtest_setup(test)
    assert os.environ.get("SPOONFEED_PRESET") == shell
    nbmake_smoke.pytest_runtest_setup(notebook)
    assert os.environ["SPOONFEED_PRESET"] == "smoke"
    nbmake_smoke.pytest_runtest_teardown(notebook)
    nbmake_smoke.pytest_runtest_teardown(test)
    assert os.environ.get("SPOONFEED_PRESET") == shell
    command = (Path(__file__).parents[1] / "scripts" / "test.sh").read_text()
    assert "-p tests.nbmake_smoke" in command and "--nbmake" in command and "spoon_feed.ipynb tests" in command
