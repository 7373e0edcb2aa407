"""Headless runs: `bash scripts/run_cpu.sh [papermill options]` and plain `papermill`, on the real notebook.

Each test runs the notebook in a copy of the project under tmp_path, on the smoke preset with a tiny random
teacher saved to a folder (so a whole run takes seconds and reads nothing from a hub). What a Jupyter kernel
shows (widget bars, ipywidgets found) is checked on test_colab_path.py's papermill run, which runs the notebook
in a kernel without the text bars anyway: one whole run fewer.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, copy_code, make_teacher, make_tokenizer, write_corpus

pytestmark = pytest.mark.slow  # every test here runs the notebook headless, end to end

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "SPOONFEED_SETUP": "0"}  # the install step is scripts/setup.sh's job, not the tests'
ENV.pop("SPOONFEED_PROGRESS", None)
ENV.pop("SPOONFEED_PRESET", None)


@pytest.fixture
def project(tmp_path):
    """A copy of the notebook, the helper file, its package and scripts/, plus a tiny teacher folder and a corpus."""
    shutil.copy(ROOT / "spoon_feed.ipynb", tmp_path / "spoon_feed.ipynb")
    copy_code(tmp_path)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    make_teacher().save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    write_corpus(tmp_path / "corpus")
    return tmp_path


def tiny(project, *extra):
    return ["-p", "PRESET", "smoke", "-p", "TEACHER_MODEL", str(project / "teacher"),
            "-p", "DATASET", str(project / "corpus"), *extra]


def run_cpu(project, *args):
    return subprocess.run(["bash", "scripts/run_cpu.sh", *args], cwd=project, env=ENV, capture_output=True,
                          text=True, timeout=600)


def outputs(nb_path):
    """{cell title: [outputs]} of an executed notebook."""
    nb = json.loads(nb_path.read_text())
    return {"".join(c["source"]).splitlines()[0]: c.get("outputs", []) for c in nb["cells"]
            if c["cell_type"] == "code"}


def test_run_cpu_streams_titles_bars_and_results_passes_its_arguments_and_saves_the_notebook(project):
    run_dir = project / "elsewhere"
    # LEARNING_RATE at the form's 0.001, not the smoke preset's 0.002: typed on the command line, so it wins
    args = tiny(project, "-p", "SEED", "7", "-p", "STUDENT_DIM", "48", "-p", "RUN_DIR", str(run_dir),
                "-p", "LEARNING_RATE", "0.001")
    with open(project / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(["bash", "scripts/run_cpu.sh", *args], cwd=project, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=err)
        lines = []
        for line in proc.stdout:  # read as it comes
            lines.append(line)
            if "3. Phase 1: cache the teacher" in line:
                break
        streaming = proc.poll() is None  # the title arrived while the run was still going
        rest, _ = proc.communicate(timeout=600)
        err.seek(0)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, err.read())
    assert r.returncode == 0, r.stdout + r.stderr
    assert streaming
    titles = re.findall(r"^\[\s*\d+ s\] (\d+)\. ", r.stdout, re.M)  # each cell's title, with the elapsed time
    cells = sum(c["cell_type"] == "code" for c in json.loads((project / "spoon_feed.ipynb").read_text())["cells"])
    assert [int(t) for t in titles] == list(range(1, cells + 1))
    assert "parameters from the command line: " in r.stdout
    assert re.search(r"^  seed += 7$", r.stdout, re.M)  # the overrides reached the effective configuration,
    assert re.search(r"^  student_dim += 48$", r.stdout, re.M)  # one of them over the preset's 32,
    assert re.search(r"^  student_layers += 2$", r.stdout, re.M)  # and the preset filled in the rest,
    assert re.search(r"^  lr += 0.001$", r.stdout, re.M)  # but not a -p at the form's default (the preset's 0.002)
    for bar in ("Phase 1: teacher states", "Phase 2: superposition", "Phase 3: LM head"):
        assert re.search(rf"{bar}: 100%\|.*\| (\d+)/\1 ", r.stderr), bar  # text bars, streamed as they move
    assert "held-out cosine (student)" in r.stdout and "student CE" in r.stdout  # the evaluation table
    saved = outputs(project / "runs" / "smoke" / "spoon_feed.ipynb")
    report = "".join("".join(o.get("text", "")) for o in saved["# @title 8. Evaluate on held-out text"])
    assert "held-out cosine (student)" in report
    assert (run_dir / "student" / "config.json").exists()
    # the reload cell decodes within the student's 32 positions: transformers never warns that it went past them
    reload = json.dumps(saved["# @title 11. Reload the export with transformers"])
    assert reload.count("Output: ") == 3 and "predefined maximum length" not in reload + r.stderr
    # the closing line names the run's real RUN_DIR and every form the save cell wrote there (no GGUF: the test
    # teacher's word-level tokenizer has no GGUF form, and cell 9 says so)
    assert "GGUF skipped" in r.stdout and not (run_dir / "student.gguf").exists()
    forms = ", ".join(f"{run_dir}/{f}" for f in ("plots/", "student/", "student-ternary/", "student-hf/"))
    assert re.search(rf"^done in \d+ s: runs/smoke/spoon_feed.ipynb, {re.escape(forms)}$", r.stdout, re.M), \
        r.stdout[-500:]


def test_a_failing_cell_is_named_with_its_traceback_and_the_exit_status_is_nonzero(project):
    (project / "a-file").write_text("")
    r = run_cpu(project, *tiny(project, "-p", "CACHE_DIR", str(project / "a-file" / "cache")))
    assert r.returncode != 0
    # cell 2 checks every folder the run writes before any work, so that is where it stops
    assert 'FAILED in cell "2. Setup and check the settings"' in r.stderr
    assert "Traceback" in r.stderr and "ConfigError: CACHE_DIR" in r.stderr and "set CACHE_DIR" in r.stderr
    assert "3. Phase 1: cache the teacher" not in r.stdout  # it stopped there
    saved = outputs(project / "runs" / "smoke" / "spoon_feed.ipynb")  # saved, with the error in its cell
    errors = [o for o in saved["# @title 2. Setup and check the settings"] if o["output_type"] == "error"]
    assert errors and errors[0]["ename"] == "ConfigError"


def test_a_bad_argument_fails_before_any_cell_runs(project):
    r = run_cpu(project, "-p", "PRESET", "smoke", "--no-such-option")
    assert r.returncode != 0 and "No such option" in r.stderr
    assert not (project / "spoonfeed_cache").exists()


def test_a_misspelt_parameter_is_refused_before_any_cell_runs(tmp_path):
    """papermill alone only warns about a name the parameters cell lacks; the run script stops, naming the fix."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), str(ROOT / "spoon_feed.ipynb"),
                          str(tmp_path / "out.ipynb"), "-p", "PRESET", "smoke", "-p", "STUDENT_DIMS", "512"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "unknown parameter 'STUDENT_DIMS': did you mean 'STUDENT_DIM'?" in out.stderr
    assert not (tmp_path / "out.ipynb").exists()  # no cell ran, nothing written
