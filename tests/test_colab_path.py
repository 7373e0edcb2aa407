"""The Colab path end to end on CPU (issue 13): the notebook itself, run headless with papermill, with a Hugging Face
teacher loaded by AutoModelForCausalLM.from_pretrained (not the GGUF path) and a TinyStories-like .jsonl.

The teacher is a tiny random Qwen2 with the real Qwen vocab of 151936, written with save_pretrained at test time,
next to a word-level tokenizer that works offline. The student is tiny; the 151936-token head dominates."""
import json
import random
import re

import pytest
from conftest import ROOT, WORDS, copy_code

import spoonfeed_helpers as sf

pytestmark = pytest.mark.slow  # every test here runs a whole notebook or bench end to end

QWEN_VOCAB = 151936
EOS = "<|endoftext|>"


def write_tiny_qwen2(folder):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<unk>", EOS, *WORDS, ".", ",", "Once", "upon", "time", "The", "capital",
                                         "of", "France", "is", "def", "fibonacci(n):"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=EOS).save_pretrained(folder)
    return folder


def write_stories(path, n=14, seed=0):
    """TinyStories' shape: one {"text": story} per line."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            story = "Once upon a time " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + " ."
            f.write(json.dumps({"text": story}) + "\n")
    return path


def test_notebook_runs_the_colab_path_with_a_hugging_face_qwen2_teacher(tmp_path, monkeypatch):
    import papermill

    teacher = write_tiny_qwen2(tmp_path / "tiny-qwen2")
    assert not list(teacher.glob("*.gguf"))  # the Hugging Face format: config.json + safetensors
    data = write_stories(tmp_path / "tinystories.jsonl")  # ~1300 tokens: 16 training blocks, ~20 held out
    monkeypatch.delenv("SPOONFEED_PRESET", raising=False)  # the form values alone, as in Colab
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPOONFEED_PROGRESS", raising=False)  # the bars a Jupyter front end shows, not text bars
    params = dict(TEACHER_MODEL=str(teacher), DATASET=str(data), NUM_CACHE_SAMPLES=16, MAX_SEQ_LENGTH=32,
                  STUDENT_DIM=32, STUDENT_LAYERS=2, STUDENT_HEADS=2, SUPERPOSITION_STEPS=6, LM_HEAD_STEPS=4,
                  BATCH_SIZE=4, CACHE_DIR=str(tmp_path / "cache"), RUN_DIR=str(tmp_path / "run"),
                  CHECKPOINT_EVERY=3, MAX_NEW_TOKENS=8, ABLATION_STEPS=2, ABLATION_HEAD_STEPS=1)
    out = tmp_path / "out.ipynb"
    colab = copy_code(tmp_path / "content")  # what cell 2 fetches into Colab's folder: the helper and its package
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel finds the code beside the notebook, nowhere else
    papermill.execute_notebook(str(ROOT / "spoon_feed.ipynb"), str(out), parameters=params, cwd=str(colab),
                               kernel_name="python3", progress_bar=False)
    cells = json.loads(out.read_text())["cells"]
    text = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in cells for o in c.get("outputs", []))
    # what Jupyter, VS Code and Colab see: tqdm.auto draws ipywidgets bars, with no `IProgress not found`
    saved = {"".join(c["source"]).splitlines()[0]: c.get("outputs", []) for c in cells if c["cell_type"] == "code"}
    assert "IProgress" not in json.dumps(saved)
    bars = [o for o in saved["# @title 5. Phase 2: superposition"]
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert bars and "Phase 2: superposition" in "".join(bars[0]["data"]["text/plain"])
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text())
    assert manifest["vocab_size"] == QWEN_VOCAB and manifest["teacher_dim"] == 32
    assert manifest["request"]["teacher"] == str(teacher)
    assert "device: cpu" in text and sf.precision_policy("cpu").reason in text
    for stage in ("Phase 1: cached", "held-out cosine (student)", "packed ternary file", "verdict:"):
        assert stage in text, stage
    assert text.count("Prompt: ") == 6  # the student's generation cell, then the HF reload through pipeline()
    assert (tmp_path / "run" / "student-hf" / "config.json").exists()  # the stock transformers export
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    assert (tmp_path / "run" / "student-ternary" / "ternary.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "phase2.pt").exists()
    imported = re.search(r"^code: (.*)$", text, re.M)
    assert imported and imported.group(1).startswith(str(colab)), "the kernel imported the code from elsewhere"
