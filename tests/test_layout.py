"""The layout a newcomer walks: the research in spoonfeed_helpers.py, the plumbing in the package spoonfeed/
(one concept per module, each opening with a docstring, none importing the helper, no import cycles), a one-page
README that maps every module and docs page."""
import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_student_config

import spoonfeed_helpers as sf

MODULES = sorted(p for p in (ROOT / "spoonfeed").glob("*.py") if p.name != "__init__.py")


def runtime_imports(path) -> set[str]:
    """The spoonfeed modules (and spoonfeed_helpers) a file imports when it runs: module level and inside
    functions alike; imports under `if TYPE_CHECKING:` are for annotations only and do not count."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(f"spoonfeed.{node.module}" if node.module else "spoonfeed")
            elif node.module and node.module.split(".")[0] in ("spoonfeed", "spoonfeed_helpers"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("spoonfeed", "spoonfeed_helpers")}
    return found


def test_no_module_of_the_package_imports_the_helper():
    offenders = {p.name: sorted(m) for p in MODULES if (m := {i for i in runtime_imports(p) | {
        i for i in re.findall(r"\b(?:import|from)\s+(spoonfeed_helpers)\b", p.read_text())}
        if i == "spoonfeed_helpers"})}
    assert not offenders, f"modules of spoonfeed/ import the research core: {offenders}"
    # and so importing every module of the package leaves the helper unimported
    code = ("import sys; import " + ", ".join(f"spoonfeed.{p.stem}" for p in MODULES)
            + "; assert 'spoonfeed_helpers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def import_graph(paths) -> dict:
    """{module: the spoonfeed modules it imports at run time} for these files of the package."""
    return {f"spoonfeed.{p.stem}": {m for m in runtime_imports(p) if m.startswith("spoonfeed.")} for p in paths}


def find_cycle(graph: dict) -> list | None:
    """One import cycle in graph, as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node))), None)


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(import_graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_that_only_a_function_level_import_closes(tmp_path):
    """The checks above can fail: a module-level import one way and an import inside a function the other way is
    a cycle; an import under TYPE_CHECKING is not."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import y\n"
                                   "def f():\n    from .a import z\n")
    (tmp_path / "c.py").write_text("from .b import x\n")
    graph = import_graph([tmp_path / n for n in ("a.py", "b.py", "c.py")])
    assert graph["spoonfeed.b"] == {"spoonfeed.a"}  # the TYPE_CHECKING import does not count
    assert find_cycle(graph) == ["spoonfeed.a", "spoonfeed.b", "spoonfeed.a"]
    del graph["spoonfeed.b"]
    assert find_cycle(graph) is None


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_each_module_opens_with_a_docstring_and_holds_one_concept(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.split("\n")[0].endswith("."), f"{path.name} opens with no one-line docstring"
    assert len(path.read_text().splitlines()) <= 600, f"{path.name} is over 600 lines: split it by concept"


def test_the_helper_holds_the_research_in_about_1500_lines_in_the_order_of_a_run():
    text = (ROOT / "spoonfeed_helpers.py").read_text()
    assert len(text.splitlines()) <= 1500
    order = ["class BitLinear", "class BitNetStudent", "def cache_teacher_states", "def train_superposition",
             "def train_lm_head", "def save_pretrained", "def export_all", "def run_ablation"]
    at = [text.index(s) for s in order]
    assert at == sorted(at), "the helper no longer reads in the order of a run"


def test_every_name_the_notebook_and_bench_use_still_resolves_on_sf():
    used = set()
    for path in [ROOT / "spoon_feed.py", *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "docs").glob("*.md"))]:
        used |= set(re.findall(r"\bsf\.([A-Za-z_]\w*)", path.read_text()))
    missing = sorted(n for n in used if not hasattr(sf, n))
    assert not missing, f"sf no longer has {missing}"


def test_the_parameter_count_from_the_shape_is_the_models():
    """check_folders sizes checkpoints from StudentConfig.param_counts, without building the model."""
    for kw in (dict(), dict(head_bias=False), dict(dim=32, n_heads=4, n_layers=3, teacher_dim=40, mlp_ratio=3.0)):
        scfg = tiny_student_config(**kw)
        n = {k: v.numel() for k, v in sf.BitNetStudent(scfg).state_dict().items()}
        head = n["head.weight"] + n.get("head.bias", 0)
        assert scfg.param_counts() == {"phase2": sum(n.values()) - head, "head": head,
                                       "embedding": n["tok_embeddings.weight"]}


def test_the_readme_is_one_page_with_a_file_map_and_an_index_of_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for path in MODULES + [ROOT / "spoonfeed_helpers.py", ROOT / "spoon_feed.ipynb"]:
        assert path.name in readme, f"the README's file map lacks {path.name}"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"the README's index lacks docs/{page.name}"
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme):
        assert (ROOT / link).is_file(), f"the README links to a missing page {link}"
