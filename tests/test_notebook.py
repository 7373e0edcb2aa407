"""The notebook's shape: numbered form cells with the original's defaults, no functions, no outputs in git.
(The notebook itself runs under `pytest --nbmake` in smoke mode; see scripts/test.sh.)"""
import json
import re

from conftest import ROOT

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
