"""Plots for every phase, and the progress bars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .cache import TeacherCache


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


def _figure(ncols=1, width=10, height=3.6):
    import matplotlib.pyplot as plt

    # constrained layout gives each panel room for its own labels: no y label runs into the next panel's ticks
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False, layout="constrained")
    return fig, axes[0]


def _plain_ticks(ax, axis: str = "y"):
    """Plain numbers on a log axis (155, 200, 300), not matplotlib's 1.55x10^2, on major and minor ticks."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")  # 10,000, not 1e+04
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(fmt)
    target.set_minor_formatter(fmt)


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
    """Phase 3's train and held-out CE (nats/token) and held-out perplexity by step. A Phase 3 of no steps (the
    head's closed-form fit alone, as under RECIPE "spoonfeed+kd") draws its one held-out point and says so."""
    fig, (ax1, ax2) = _figure(2)
    if history["step"]:
        ax1.plot(history["step"], history["loss"], lw=0.8, label="train")
    ax1.plot(history["eval_step"], history["val_ce"], "o-", label="held-out")
    if teacher_ce is not None:
        ax1.axhline(teacher_ce, color="gray", ls="--", label="teacher")
    ax1.set(title="Phase 3 cross-entropy" + ("" if history["step"] else ": the closed-form head fit, no steps"),
            xlabel="step", ylabel="nats/token")
    ax1.legend()
    ax2.plot(history["eval_step"], history["val_ppl"], "o-")
    ax2.set(title="held-out perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    _plain_ticks(ax2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_logit_kd(history: dict | None, path=None):
    """Phase 4 (RECIPE "spoonfeed+kd", train_logit_kd's history): left, the training loss a step,
    alpha * CE + (1 - alpha) * T^2 * KL in nats/token; right, the held-out CE (nats/token) from the student Phase 3
    left (step 0) to the end. Saved to `path` when given; returns the figure. history None (a recipe without
    Phase 4) draws nothing, says so, and removes the plot an earlier run left at `path`; returns None."""
    if history is None:
        if path is not None:
            Path(path).unlink(missing_ok=True)
        print("Phase 4 (logit KD) is not part of this RECIPE: no plot")
        return None
    fig, (ax1, ax2) = _figure(2)
    ax1.plot(history["step"], history["loss"], lw=0.8)
    ax1.set(title="Phase 4 train loss (CE + KD)", xlabel="step", ylabel="nats/token")
    ax2.plot(history["eval_step"], history["val_ce"], "o-")
    ax2.set(title="held-out cross-entropy", xlabel="step", ylabel="nats/token")
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
    """The notebook's ablation as points on axes fitted to them, each labelled with its value, one marker per width,
    so that 0.854 against 0.844 cosine reads as a difference; the references (mean-vector baseline, teacher CE),
    far below or above, are named in the titles instead of stretching the axes. Legend outside the data."""
    fig, (ax1, ax2) = _figure(2, width=11)
    names = ["ternary", "full precision", "direct CE"]
    other = f"recipe {result.get('other_recipe')}"  # the other recipe's arm, main width only (run_ablation)
    names += [other] if any(arm == other for arm, _ in result["arms"]) else []
    widths = result["widths"]
    for j, w in enumerate(widths):
        dx = (j - (len(widths) - 1) / 2) * 0.12
        for ax, metric, arms in ((ax1, "cosine", names[:2]), (ax2, "ce", names)):
            xs = [i + dx for i, n in enumerate(arms) if (n, w) in result["arms"]]
            ys = [result["arms"][(n, w)][metric] for n in arms if (n, w) in result["arms"]]
            ax.plot(xs, ys, "os^D"[j % 4], color=f"C{j}", ms=8, ls="none", label=f"width {w}")
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.4f}" if metric == "cosine" else f"{y:.3f}", (x, y), textcoords="offset points",
                            xytext=(8, -3), fontsize=8)
    ax1.set(title=f"held-out cosine (higher is better; mean-vector baseline {result['baseline_cosine']:.4f})",
            xticks=np.arange(2), xticklabels=names[:2], xlim=(-0.5, 1.7), ylabel="cosine")
    ax2.set(title=f"held-out CE (lower is better; teacher {result['teacher_ce']:.3f})", xticks=np.arange(len(names)),
            xticklabels=[n.replace("recipe ", "recipe\n") for n in names], xlim=(-0.5, len(names) - 0.3),
            ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.margins(y=0.25)  # fitted to the points, with room for their labels
        ax.grid(alpha=0.3, axis="y")
        ax.title.set_fontsize(9)
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the data
    return _save(fig, path)
