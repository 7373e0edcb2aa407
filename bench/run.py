"""Spoon Feed against the original notebook, side by side in one run: speed, memory and quality.

    python bench/run.py                  # the full benchmark, about 20 minutes on 2 CPU cores
    python bench/run.py --smoke          # seconds-to-minutes: every section at toy size (run by the tests); the
                                         # compiled rows through aot_eager, not inductor's C++ kernels
    python bench/run.py --only quality   # one or more sections: peak,phase1,phase2,speed,phase3,generate,rss,quality
    python bench/run.py --precision fp32 # (b) in float32 (default: auto, bf16 on a CPU with native bf16 matmul)

(a) is bench/original.py, the original notebook's loops re-implemented as the baseline; (b) is
spoonfeed_helpers, run at --precision (the PRECISION setting; (a) is always float32, as the original ran).
Every speed figure is a ratio (b)/(a) measured in this process on this machine. With the speed section, the
Phase 2 and generation sections also time (b) with EMBEDDING_UPDATE = "lazy" and with COMPILE (torch.compile, compiled from an empty
inductor cache; the first step or call, which compiles, is its own row).
Results go to stdout as one markdown table, and to --out as JSON.
"""

import argparse
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from bench import original as orig  # noqa: E402

SECTIONS = ("peak", "phase1", "phase2", "speed", "phase3", "generate", "rss", "quality")  # speed: issue 28's rows

# the budget of the quality comparison (training issue): 512 x 128 tokens, student 256x4x4, batch 8, 300 + 150
FULL = dict(n_phase1=48, dim=256, layers=4, heads=4, seq=128, batch=8, steps=10, head_steps=10, gen_tokens=128,
            rss_n=512, rss_steps=40, matmul=2048)
SMOKE = dict(n_phase1=4, dim=32, layers=2, heads=2, seq=32, batch=2, steps=2, head_steps=2, gen_tokens=8,
             rss_n=8, rss_steps=2, matmul=256)
PRECISION = "auto"  # --precision: what (b) computes in
SPEED = True  # the "speed" section: Phase 2 and generation with EMBEDDING_UPDATE = "lazy" and COMPILE

ROWS = []


def row(figure, a, b, target=None, unit="", higher_is_better=True, note=""):
    """One table row; the ratio is always (b)/(a)."""
    ratio = b / a if (a and b is not None and a == a and b == b) else float("nan")
    met = ""
    if target is not None:
        ok = ratio >= target if higher_is_better else ratio <= target
        met = "yes" if ok else "**no**"
    ROWS.append(dict(figure=figure, original=a, spoonfeed=b, ratio=ratio, target=target, met=met, unit=unit,
                     note=note, higher_is_better=higher_is_better))
    print(f"  {figure}: (a) {_fmt(a)} (b) {_fmt(b)} {unit}  ratio {ratio:.3g} {met} {note}", flush=True)


def _fmt(x):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def timed(fn, repeat=1):
    fn()  # warm-up: first calls pay for lazy initialisation
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


# --- machine peak -----------------------------------------------------------------------------------------

def matmul_peak(n, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    reps = 10
    best = min(timed(lambda: [a @ b for _ in range(reps)]) for _ in range(3))
    return 2 * n ** 3 * reps / best / 1e9


# --- Phase 1 ----------------------------------------------------------------------------------------------

def teacher_flops_per_token(teacher, seq):
    """Forward FLOPs a token: 2 x non-embedding parameters + attention (2 x layers x context x width)."""
    c = teacher.config
    n = sum(p.numel() for p in teacher.get_decoder().parameters()) - teacher.get_input_embeddings().weight.numel()
    return 2 * n + 2 * c.num_hidden_layers * seq * c.hidden_size


_OURS = {}


def ours_teacher(teacher, tok):
    """The teacher (b) runs: loaded in the policy's dtype (bf16 on a CPU with native bf16), once."""
    policy = sf.precision_policy("cpu", PRECISION)
    if policy.teacher == torch.float32:
        return teacher
    if "teacher" not in _OURS:
        _OURS["teacher"] = sf.load_teacher(sf.BUNDLED_TEACHER, "cpu", tok, PRECISION)[0]
    return _OURS["teacher"]


def bench_phase1(p, peak, teacher, tok, tmp):
    """(a) the original's float32 teacher; (b) ours, with the teacher loaded as the policy says (bf16 here)."""
    n, seq = p["n_phase1"], p["seq"]
    texts = list(_train_texts(n * 4, [], seq))
    t = time.perf_counter()
    inputs, _ = orig.cache_original(teacher, tok, texts, n, seq)
    a = len(inputs) * seq / (time.perf_counter() - t)
    cfg = sf.make_config(teacher=sf.BUNDLED_TEACHER, dataset=sf.STDLIB_CORPUS, num_samples=n, val_samples=4,
                         seq_len=seq, batch_size=2, cache_dir=str(tmp / "phase1"), device="cpu", precision=PRECISION)
    policy = sf.precision_policy("cpu", PRECISION)
    ours = ours_teacher(teacher, tok)
    t = time.perf_counter()
    cache = sf.cache_teacher_states(cfg, loader=lambda: (ours, tok), tokenizer=tok, progress=False)
    b = (cache.num_train + cache.num_val) * seq / (time.perf_counter() - t)
    row(f"Phase 1 teacher tokens/s ((b) teacher in {str(policy.teacher)[6:]})", a, b, 2.0, "tok/s")
    flops = teacher_flops_per_token(teacher, seq)
    share_a, share_b = a * flops / 1e9 / peak["fp32"], b * flops / 1e9 / peak["fp32"]
    row("Phase 1 share of fp32 matmul peak", share_a, share_b, note=f"(b) {share_b:.0%}")
    if policy.teacher == torch.bfloat16:
        row("Phase 1 share of bf16 matmul peak", a * flops / 1e9 / peak["bf16"], b * flops / 1e9 / peak["bf16"],
            note=f"(b) {b * flops / 1e9 / peak['bf16']:.0%}")


# --- Phase 2 / 3 ------------------------------------------------------------------------------------------

def _models(p, vocab, teacher_dim, max_len=None):
    torch.manual_seed(0)
    a = orig.BitNetStudent(vocab, p["dim"], p["layers"], p["heads"])
    a_proj = orig.Decompressor(p["dim"], teacher_dim)
    b = sf.BitNetStudent(sf.StudentConfig(vocab_size=vocab, teacher_dim=teacher_dim, dim=p["dim"],
                                          n_layers=p["layers"], n_heads=p["heads"], max_seq_len=max_len or p["seq"]))
    return a, a_proj, b


def train_flops_per_token(model: sf.BitNetStudent, seq):
    """fwd + bwd: 6 x (ternary + projector parameters) + attention (3 x 2 x layers x context x width)."""
    c = model.cfg
    n = model.num_params()
    return 6 * (n["ternary"] + n["projector"]) + 6 * c.n_layers * seq * c.dim


def bench_phase2(p, peak, head_weight, vocab, teacher_dim):
    B, T = p["batch"], p["seq"]
    a, a_proj, b = _models(p, vocab, teacher_dim)
    tokens = torch.randint(0, vocab, (B, T))
    target = torch.randn(B, T, teacher_dim)
    a_opt = torch.optim.AdamW(list(a.parameters()) + list(a_proj.parameters()), lr=1e-3, weight_decay=0.0)
    ta = timed(lambda: orig.train_step_original(a, a_proj, a_opt, tokens, target), p["steps"])
    cfg = sf.make_config(batch_size=B, num_samples=max(B, 1), lr=1e-3, precision=PRECISION)
    params = [q for n, q in b.named_parameters() if not n.startswith("head.")]
    b_opt = sf._adamw(params, 1e-3, 0.0)
    gen = torch.Generator().manual_seed(0)
    b.train()
    policy = sf.precision_policy("cpu", PRECISION)
    tb = timed(lambda: sf.superposition_step(b, b_opt, params, tokens, target, cfg, None, gen, policy), p["steps"])
    row(f"Phase 2 training tokens/s (cosine loss; (b) in {policy.name})", B * T / ta, B * T / tb, 2.5, "tok/s")
    flops = train_flops_per_token(b, T)
    row("Phase 2 share of fp32 matmul peak", B * T * flops / ta / 1e9 / peak["fp32"],
        B * T * flops / tb / 1e9 / peak["fp32"])
    if policy.autocast == torch.bfloat16:
        row("Phase 2 share of bf16 matmul peak", B * T * flops / ta / 1e9 / peak["bf16"],
            B * T * flops / tb / 1e9 / peak["bf16"])
    if SPEED:
        phase2_variants(p, b, params, tokens, target, cfg, policy, B * T / ta, tb)
    head = torch.nn.Linear(teacher_dim, vocab, bias=False).requires_grad_(False)
    head.weight.data.copy_(head_weight)
    for kd_tokens, label in ((128, "128 positions a batch"), (0, "every position")):
        kcfg = dataclasses.replace(cfg, kd_weight=1.0, kd_tokens=kd_tokens)
        tk = timed(lambda: sf.superposition_step(b, b_opt, params, tokens, target, kcfg, head, gen, policy),
                   p["steps"])
        row(f"Phase 2 step time with logit KD on {label}, vs cosine only", tb, tk, unit="s",
            note="(a) is the cosine-only step here: the ratio is KD's extra cost")


def phase2_variants(p, b, params, tokens, target, cfg, policy, tok_a, tb):
    """Phase 2 steps with the lazy embedding update (EMBEDDING_UPDATE) and torch.compile (COMPILE), each next to
    today's (b) step in this run. A compiled variant's first step (the compile, forward and backward) is timed
    apart from its steady steps. The embedding gets its own AdamW group here, as in train_superposition."""
    from spoonfeed import compile as sf_compile

    B, T = tokens.shape

    def variant(lazy, compile):
        b.tok_embeddings.sparse = lazy  # what Phase does for EMBEDDING_UPDATE = "lazy"
        opt = sf._adamw(params, 1e-3, 0.0, b.tok_embeddings.weight, 1.0, lazy=lazy)
        vcfg = dataclasses.replace(cfg, compile=compile)
        step = lambda: sf.superposition_step(b, opt, params, tokens, target, vcfg, None, None, policy)  # noqa: E731
        sf_compile.reset()
        t = time.perf_counter()
        step()
        first = time.perf_counter() - t
        dt = timed(step, p["steps"])
        b.tok_embeddings.sparse = False
        return first, dt

    dense = variant(False, False)
    for lazy, compile, label in ((True, False, "lazy embedding update"), (False, True, "compiled (COMPILE)"),
                                 (True, True, "compiled + lazy embedding update")):
        first, dt = variant(lazy, compile)
        row(f"Phase 2 training tokens/s, {label}", tok_a, B * T / dt, 3.0 if compile and lazy else None, "tok/s",
            note=f"today's (b) {B * T / tb:.0f} tok/s in this run; {dt / dense[1]:.2f}x its step time with "
                 "the embedding in its own group")
        if compile:
            row(f"Phase 2 first step with {label}, vs an eager step", dense[1], first, unit="s",
                note="(a) is today's eager (b) step here: the ratio is the compile's cost in steps")
    update_rows(p, b)


def update_rows(p, b):
    """The embedding's part of a step alone: the lookup's backward, clipping and AdamW on the embedding, dense
    (today's) against lazy, with a batch's worth of token ids."""
    B, T = p["batch"], p["seq"]
    tokens = torch.randint(0, b.cfg.vocab_size, (B, T))
    times = {}
    for lazy in (False, True):
        emb = torch.nn.Embedding(b.cfg.vocab_size, b.cfg.dim, sparse=lazy)
        opt = sf._adamw([emb.weight], 1e-3, 0.0, emb.weight, 100.0, lazy=lazy)
        grad = torch.randn(B, T, b.cfg.dim)
        times[lazy] = timed(lambda: sf.optimizer_step((emb(tokens) * grad).sum(), opt, [emb.weight], 1.0), p["steps"])
    row(f"Embedding update alone ({b.cfg.vocab_size} x {b.cfg.dim}, {B} x {T} tokens): lazy vs today's dense AdamW",
        times[False] * 1e3, times[True] * 1e3, unit="ms", higher_is_better=False,
        note="(a) is today's dense update here; backward of the lookup, clipping and the step")


def bench_phase3(p, cache, vocab, teacher_dim):
    """Seconds per Phase 3 step, each side's whole loop (ours includes computing the features once)."""
    a, _, b = _models(p, vocab, teacher_dim)
    inputs = [cache.tokens("train", [i]) for i in range(cache.num_train)]
    steps = p["head_steps"]
    ta = timed(lambda: orig.train_lm_head_original(a, inputs, steps, p["batch"])) / steps
    with tempfile.TemporaryDirectory() as d:
        cfg = sf.make_config(teacher=sf.BUNDLED_TEACHER, dataset=sf.STDLIB_CORPUS, batch_size=p["batch"],
                             num_samples=cache.num_train, lm_head_steps=steps, eval_every=10**6, ckpt_every=0,
                             head_kd_weight=0.0,  # the same loss as the original: CE only
                             student_dim=p["dim"], student_layers=p["layers"], student_heads=p["heads"],
                             seq_len=cache.seq_len, run_dir=d, device="cpu", head_init="unigram", precision=PRECISION)
        tb = timed(lambda: sf.train_lm_head(b, cache, cfg, progress=False, need_phase2=False)) / steps
        cfg = dataclasses.replace(cfg, head_init="teacher")  # the default: adds the one-off least-squares fit
        tb_fit = timed(lambda: sf.train_lm_head(b, cache, cfg, progress=False, fresh=True, need_phase2=False)) / steps
    row("Phase 3 seconds per step (CE, new head vs tied)", ta, tb, 0.35, "s", higher_is_better=False,
        note="target: (b) at most 0.35 of (a); head started at the unigram predictor")
    row(f"Phase 3 seconds per step with the default teacher-fitted start, one-off fit spread over {steps} steps",
        ta, tb_fit, None, "s", higher_is_better=False)


def bench_generate(p, vocab, teacher_dim, tok):
    """Greedy decoding, n new tokens. One prompt; then the original's three prompts, which the original's
    notebook decodes one after the other and generate_text decodes as one left-padded batch."""
    n = p["gen_tokens"]
    prompts = [sf.prompt_ids(tok, text) for text in sf.ORIGINAL_PROMPTS]
    a, _, b = _models(p, vocab, teacher_dim, max_len=n + max(len(q) for q in prompts))
    a.eval(), b.eval()
    prompt = torch.tensor([prompts[0]])
    ta = timed(lambda: orig.generate_original(a, prompt, n, temperature=0))
    tb = timed(lambda: sf.generate(b, prompt, n, temperature=0, precision=PRECISION))
    row(f"Generation tokens/s ({n} new tokens, one prompt)", n / ta, n / tb, unit="tok/s")
    if SPEED:
        generate_compiled(b, prompt, n, ta, tb)
    ta3 = timed(lambda: [orig.generate_original(a, torch.tensor([q]), n, temperature=0) for q in prompts])
    ids, mask = sf.left_pad(prompts)
    tb3 = timed(lambda: sf.generate(b, ids, n, temperature=0, precision=PRECISION, attention_mask=mask))
    k = len(prompts)
    row(f"Generation tokens/s, the original's {k} prompts x {n} new tokens ((a) one at a time, as its notebook; "
        f"(b) one batch, as generate_text)", k * n / ta3, k * n / tb3, 10.0, "tok/s")


def generate_compiled(b, prompt, n, ta, tb):
    """One prompt through the compiled decode step (COMPILE), its first call (the compile) apart."""
    from spoonfeed import compile as sf_compile

    sf_compile.reset()
    t = time.perf_counter()
    sf.generate(b, prompt, n, temperature=0, precision=PRECISION, compile=True)
    first = time.perf_counter() - t
    tbc = timed(lambda: sf.generate(b, prompt, n, temperature=0, precision=PRECISION, compile=True))
    row(f"Generation tokens/s ({n} new tokens, one prompt), compiled decode step (COMPILE)", n / ta, n / tbc, 10.0,
        "tok/s", note=f"eager (b) {n / tb:.0f} tok/s in this run")
    row(f"Generation: the first compiled call ({n} new tokens, compile included), vs an eager call", tb, first,
        unit="s", note="(a) is the eager (b) call here: the ratio is the compile's cost in calls")


# --- memory -----------------------------------------------------------------------------------------------

def rss_child(args):
    """In a fresh process: train from the given cache and print peak RSS (MiB)."""
    cache = sf.TeacherCache(args.rss_cache)
    p = json.loads(args.rss_params)
    cfg = sf.make_config(batch_size=p["batch"], num_samples=cache.num_train, superposition_steps=p["rss_steps"],
                         student_dim=p["dim"], student_layers=p["layers"], student_heads=p["heads"],
                         seq_len=cache.seq_len, eval_every=10**6, ckpt_every=0, run_dir=args.rss_run, device="cpu",
                         warmup_steps=0)
    if args.rss_side == "original":  # the original keeps every target in Python lists in RAM
        inputs = [cache.tokens("train", [i]) for i in range(cache.num_train)]
        targets = [cache.states("train", [i]) for i in range(cache.num_train)]
        a, a_proj, _ = _models(p, cache.vocab_size, cache.teacher_dim)
        orig.train_superposition_original(a, a_proj, inputs, targets, p["rss_steps"], p["batch"], 1e-3)
    else:
        model = sf.build_student(cfg, cache)
        sf.train_superposition(model, cache, cfg, progress=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)


def bench_rss(p, tok, tmp):
    """Peak RSS while training from a cache of N and of 8N blocks (random tiny teacher of the real width)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                           max_position_embeddings=4096)).eval()
    peaks = {}
    for n in (p["rss_n"], 8 * p["rss_n"]):
        cfg = sf.make_config(teacher="rss/random-teacher", dataset=sf.STDLIB_CORPUS, num_samples=n, val_samples=4,
                             seq_len=p["seq"], batch_size=p["batch"], cache_dir=str(tmp / "rss"), device="cpu",
                             cache_batch_size=32)
        cache = sf.cache_teacher_states(cfg, loader=lambda: (teacher, tok), tokenizer=tok, progress=False)
        for side in ("original", "spoonfeed"):
            out = subprocess.run([sys.executable, __file__, "--rss-child", "--rss-cache", str(cache.path),
                                  "--rss-side", side, "--rss-run", str(tmp / f"rss-run-{side}-{n}"),
                                  "--rss-params", json.dumps(p)], capture_output=True, text=True, check=True)
            peaks[(side, n)] = float(out.stdout.strip().splitlines()[-1])
    n = p["rss_n"]
    row(f"Peak RSS training from {n} cached blocks", peaks[("original", n)], peaks[("spoonfeed", n)], unit="MiB")
    row(f"Peak RSS training from {8 * n} cached blocks", peaks[("original", 8 * n)], peaks[("spoonfeed", 8 * n)],
        unit="MiB")
    growth_a = peaks[("original", 8 * n)] / peaks[("original", n)]
    growth_b = peaks[("spoonfeed", 8 * n)] / peaks[("spoonfeed", n)]
    ROWS.append(dict(figure="Peak RSS growth, 8x larger cache", original=growth_a, spoonfeed=growth_b,
                     ratio=float("nan"), target="(b) <= 1.10", met="yes" if growth_b <= 1.10 else "**no**",
                     unit="x", note=""))
    print(f"  RSS growth 8x cache: (a) {growth_a:.3f}x (b) {growth_b:.3f}x", flush=True)


# --- quality at equal budget ------------------------------------------------------------------------------

def _train_texts(n, val_docs, seq):
    """The first n documents of the stdlib corpus that are not held out (n None: all of them, read lazily), in the
    cache's order, each cut to seq * 16 characters. The corpus is read no further: every document is a file."""
    skip = set(val_docs)
    texts = sf.iter_texts(sf.STDLIB_CORPUS)
    try:
        yield from itertools.islice((t[: seq * 16] for i, t in enumerate(texts) if i not in skip), n)
    finally:
        texts.close()


@torch.no_grad()
def original_quality(a, a_proj, cache):
    """The original's student on our held-out blocks: cosine of projector(student) and CE of its tied head."""
    a.eval()
    tokens = cache.tokens("val", np.arange(cache.num_val))
    h = a(tokens, return_hidden_states=True)
    cos = sf.held_out_cosine(None, cache, predict=lambda t, idx: a_proj(h[idx]))
    ce = sf.next_token_ce(torch.nn.functional.linear(h, a.embed_tokens.weight), tokens).item()
    return cos, ce


def bench_quality(cfg, teacher, tok, progress):
    """(a) the original at its budget, float32; (b) the cpu preset's Phases 1-3 at --precision, scored on (b)'s
    held-out blocks (the teacher's states there come from (b)'s cache)."""
    cache = sf.cache_teacher_states(cfg.run, loader=lambda: (ours_teacher(teacher, tok), tok), tokenizer=tok,
                                    progress=progress)
    t = time.perf_counter()
    texts = _train_texts(None, cache.manifest["val_docs"], cfg.seq_len)  # read as cache_original asks
    inputs, targets = orig.cache_original(teacher, tok, texts, cfg.num_samples, cfg.seq_len)
    a, a_proj, _ = _models(dict(dim=cfg.student_dim, layers=cfg.student_layers, heads=cfg.student_heads,
                                seq=cfg.seq_len), cache.vocab_size, cache.teacher_dim)
    orig.train_superposition_original(a, a_proj, inputs, targets, cfg.superposition_steps, cfg.batch_size,
                                      cfg.lr_original, progress=progress)
    orig.train_lm_head_original(a, inputs, cfg.lm_head_steps, cfg.batch_size, progress=progress)
    cos_a, ce_a = original_quality(a, a_proj, cache)
    time_a = time.perf_counter() - t
    del inputs, targets
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        run = dataclasses.replace(cfg.run, run_dir=d)
        model = sf.build_student(run, cache)
        sf.train_superposition(model, cache, run, progress=progress)
        sf.train_lm_head(model, cache, run, progress=progress)
        m = sf.evaluate(model, cache, precision=run.precision)["metrics"]
    time_b = time.perf_counter() - t
    base = m["baseline_cosine"]
    row("Held-out cosine to the teacher", cos_a, m["student_cosine"], note=f"mean-vector baseline {base:.4f}")
    row("Held-out cosine gain over the baseline", cos_a - base, m["cosine_gain"], 2.0)
    ROWS.append(dict(figure="Held-out CE (nats/token)", original=ce_a, spoonfeed=m["student_ce"],
                     ratio=float("nan"), target="(b) <= (a) - 1.5", met="yes" if m["student_ce"] <= ce_a - 1.5
                     else "**no**", unit="nats",
                     note=f"teacher {m['teacher_ce']:.3f}, unigram {m['unigram_ce']:.3f}, (b) via teacher head "
                          f"{m['student_ce_via_teacher_head']:.3f}; difference {ce_a - m['student_ce']:.3f}"))
    print(f"  held-out CE: (a) {ce_a:.3f} (b) {m['student_ce']:.3f} teacher {m['teacher_ce']:.3f}", flush=True)
    row("Whole Phase 1-3 wall time at the quality budget", time_a, time_b, unit="s", higher_is_better=False)


class QualityConfig:
    def __init__(self, run, lr_original):
        self.run, self.lr_original = run, lr_original

    def __getattr__(self, k):
        return getattr(self.run, k)


def table(machine):
    lines = [f"Machine: {machine}", "",
             "| figure | (a) original | (b) Spoon Feed | (b)/(a) | target | met |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        target = r["target"] if isinstance(r["target"], str) else (f">= {r['target']}x" if r["target"] else "")
        if r["target"] and not isinstance(r["target"], str) and not r.get("higher_is_better", True):
            target = f"<= {r['target']}x"
        ratio = "" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x"
        unit = f" {r['unit']}" if r["unit"] else ""
        lines.append(f"| {r['figure']}{' — ' + r['note'] if r['note'] else ''} | {_fmt(r['original'])}{unit} | "
                     f"{_fmt(r['spoonfeed'])}{unit} | {ratio} | {target} | {r['met']} |")
    return "\n".join(lines)


def machine_name():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks that every section runs")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--precision", default="auto", choices=sf.PRECISIONS, help="what (b) computes in (PRECISION)")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rss-cache", help=argparse.SUPPRESS)
    ap.add_argument("--rss-side", help=argparse.SUPPRESS)
    ap.add_argument("--rss-run", help=argparse.SUPPRESS)
    ap.add_argument("--rss-params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    p = SMOKE if args.smoke else FULL
    from spoonfeed import compile as sf_compile

    if args.smoke:  # the compiled rows' code runs, captured by TorchDynamo but without inductor's C++ compile
        sf_compile.BACKEND = "aot_eager"
    else:  # compile times from an empty cache, as a first run sees them (inductor caches its kernels on disk)
        torch._inductor.config.force_disable_caches = True
    ROWS.clear()
    global PRECISION, SPEED
    PRECISION, SPEED = args.precision, "speed" in sections
    policy = sf.precision_policy("cpu", PRECISION)
    print(f"(b) computes in {policy.name}: {policy.reason}", flush=True)
    peak = {"fp32": matmul_peak(p["matmul"]), "bf16": matmul_peak(p["matmul"], torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32']:.1f}, bf16 {peak['bf16']:.1f} GFLOP/s", flush=True)
    if "peak" in sections:
        for dtype in ("fp32", "bf16"):
            ROWS.append(dict(figure=f"{dtype} matmul peak ({p['matmul']}x{p['matmul']})", original=peak[dtype],
                             spoonfeed=peak[dtype], ratio=float("nan"), target=None, met="", unit="GFLOP/s",
                             note=""))
    if "fp32" not in _OURS:  # loaded once a process (the tests run main() several times)
        _OURS["fp32"] = sf.load_teacher(sf.BUNDLED_TEACHER, device="cpu", precision="fp32")
    teacher, tok = _OURS["fp32"]  # (a)'s, as the original
    vocab, teacher_dim = teacher.config.vocab_size, teacher.config.hidden_size
    head_weight = teacher.get_output_embeddings().weight.detach()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "phase1" in sections:
            bench_phase1(p, peak, teacher, tok, tmp)
        if "phase2" in sections:
            bench_phase2(p, peak, head_weight, vocab, teacher_dim)
        if "generate" in sections:
            bench_generate(p, vocab, teacher_dim, tok)
        if "phase3" in sections:
            cfg = sf.make_config(teacher=sf.BUNDLED_TEACHER, dataset=sf.STDLIB_CORPUS, num_samples=max(16, p["batch"]),
                                 val_samples=4, seq_len=p["seq"], batch_size=p["batch"],
                                 cache_dir=str(tmp / "phase3"), device="cpu", precision="fp32")  # tokens only
            bench_phase3(p, sf.cache_teacher_states(cfg, loader=lambda: (teacher, tok), tokenizer=tok, progress=False), vocab,
                         teacher_dim)
        if "rss" in sections:
            bench_rss(p, tok, tmp)
        if "quality" in sections:
            run = sf.make_config("smoke" if args.smoke else "cpu", cache_dir=str(ROOT / "spoonfeed_cache"),
                                 precision=PRECISION)
            if args.smoke:
                run = dataclasses.replace(run, cache_dir=str(tmp / "quality"))
            bench_quality(QualityConfig(run, lr_original=1e-3), teacher, tok, progress=not args.smoke)
    report = table(f"{machine_name()}; (b) computes in {policy.name} ({policy.reason})")
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_name(), "precision": policy.name,
                                              "path": policy.reason, "rows": ROWS}, indent=1, default=str))
    return ROWS


if __name__ == "__main__":
    main()
