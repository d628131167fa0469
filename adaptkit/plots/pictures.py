"""One figure per picture the commands draw, each from plain data the command already has (lists and dicts,
as its --json prints them), so each is testable without running the command. `figure.draw` writes one.

- `sweep_figure`: a soup sweep's score against α (the WiSE-FT curve), the best α marked;
- `greedy_figure`: a greedy soup's score as each ingredient is tried, the kept ones marked;
- `quantize_figure`: quantization's relative error per tensor (histogram) and the worst tensors by name;
- `merge_figure`: an adapter→adapter merge's refactoring error per module, the worst marked;
- `routing_figure`: a mixture of experts' routers: how alike the experts' rows are, how well-conditioned each layer's;
- `training_figure`: training's loss and evaluation metrics against the step (metrics.jsonl's records).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from ..errors import AdaptkitError
from .figure import natural_key, new_figure, short_names

BEST, KEPT, SKIPPED, MUTED = "tab:red", "tab:green", "tab:red", "0.6"
#: Worst tensors named beside a quantization histogram; module names written under a merge's bars.
WORST_NAMED, LABELLED_BARS = 10, 40
#: The training loss is averaged over runs of (steps // SMOOTHING) steps, where that is more than one.
SMOOTHING = 25


def sweep_figure(alphas: Sequence[float], scores: Sequence[float]):
    """Score against α for a sweep (`scores[i]` at `alphas[i]`, in the order tried); the best α (the first of
    equal best scores, the one the sweep keeps) is marked and annotated."""
    if not alphas or len(alphas) != len(scores):
        raise AdaptkitError(f"a sweep's curve needs one score per α, got {len(alphas)} α and {len(scores)} scores")
    best = max(range(len(alphas)), key=lambda i: scores[i])
    ordered = sorted(zip(alphas, scores))
    fig, (ax,) = new_figure()
    ax.plot([a for a, _ in ordered], [s for _, s in ordered], "o-", label="θ(α) = (1 − α)·A + α·B")
    ax.plot([alphas[best]], [scores[best]], "*", color=BEST, markersize=16, label="best α", gid="best")
    ax.annotate(f"best α = {alphas[best]:g}\nscore {scores[best]:.4g}", (alphas[best], scores[best]),
                textcoords="offset points", xytext=(0, -34), ha="center", color=BEST)
    ax.set(xlabel="α (0: A, 1: B)", ylabel="score (higher is better)", title="soup sweep (WiSE-FT)")
    ax.margins(y=0.25)
    ax.legend(loc="best")
    return fig


def greedy_figure(steps: Sequence[Mapping[str, Any]], scores: Mapping[str, float] | None = None):
    """A greedy soup's trials in order ({added, score, kept}): the soup's score with each candidate added,
    kept ones filled, skipped ones crossed, the running best as a step line and (`scores`) each
    candidate's score on its own."""
    if not steps:
        raise AdaptkitError("a greedy soup with no steps has nothing to draw")
    x = list(range(1, len(steps) + 1))
    fig, (ax,) = new_figure(width=max(6.4, 0.7 * len(steps)))
    running, best = [], float("-inf")
    for step in steps:
        best = step["score"] if step["kept"] else best
        running.append(best)
    ax.step(x, running, where="post", color=KEPT, alpha=0.5, label="soup so far")
    if scores:
        ax.plot(x, [scores.get(str(s["added"]), float("nan")) for s in steps], "D", color=MUTED,
                label="ingredient alone")
    kept = [(i, s["score"]) for i, s in zip(x, steps) if s["kept"]]
    skipped = [(i, s["score"]) for i, s in zip(x, steps) if not s["kept"]]
    ax.plot(*zip(*kept), "o", color=KEPT, markersize=9, label="added: kept", gid="kept")
    if skipped:
        ax.plot(*zip(*skipped), "X", color=SKIPPED, markersize=9, label="added: skipped (soup got worse)",
                gid="skipped")
    ax.set_xticks(x, [PurePath(str(s["added"])).name for s in steps], rotation=30, ha="right")
    ax.set(xlabel="candidate tried (best alone first)", ylabel="score (higher is better)",
           title=f"greedy soup: {len(kept)} of {len(steps)} kept, score {running[-1]:.4g}")
    ax.legend(loc="best")
    return fig


def quantize_figure(errors: Mapping[str, float], method: str | None = None):
    """Quantization's relative error ‖Ŵ − W‖/‖W‖ per tensor: a histogram (mean marked) and the worst
    tensors named, worst on top."""
    if not errors:
        raise AdaptkitError("no tensor was quantized: there is no error to draw")
    values = list(errors.values())
    mean = sum(values) / len(values)
    fig, (hist, worst) = new_figure(2)
    hist.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue")
    hist.axvline(mean, color=BEST, linestyle="--", label=f"mean {mean:.4g}")
    hist.set(xlabel="relative error ‖Ŵ − W‖ / ‖W‖", ylabel="tensors",
             title=f"{len(values)} tensors quantized" + (f" with {method}" if method else ""))
    hist.legend()
    ranked = sorted(errors, key=lambda n: (-errors[n], n))[:WORST_NAMED]
    short = short_names(ranked)
    rows = list(range(len(ranked)))[::-1]
    bars = worst.barh(rows, [errors[n] for n in ranked], color=[BEST] + ["tab:blue"] * (len(ranked) - 1))
    worst.set_yticks(rows, [short[n] for n in ranked], fontsize=8)
    worst.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
    worst.margins(x=0.2)
    worst.set(xlabel="relative error", title=f"the {len(ranked)} worst tensors")
    return fig


def merge_figure(errors: Mapping[str, float], rank: int | None = None):
    """An adapter merge's refactoring error ‖ΔW − B·A‖_F / ‖ΔW‖_F per module, in layer order, the worst
    bar marked and named."""
    if not errors:
        raise AdaptkitError("the merge reported no modules: there is no error to draw")
    names = sorted(errors, key=natural_key)
    worst = max(names, key=lambda n: errors[n])
    short = short_names(names)
    fig, (ax,) = new_figure(width=min(16.0, max(6.4, 0.22 * len(names))), height=5.4)
    x = list(range(len(names)))
    ax.bar(x, [errors[n] for n in names], color=[BEST if n == worst else "tab:blue" for n in names])
    at = names.index(worst) / max(1, len(names) - 1)  # the label leans inwards near either edge
    ax.annotate(f"worst: {short[worst]}\n{errors[worst]:.3g}", (names.index(worst), errors[worst]),
                textcoords="offset points", xytext=(0, 8), color=BEST, fontsize=9,
                ha="left" if at < 0.25 else "right" if at > 0.75 else "center")
    if len(names) <= LABELLED_BARS:
        ax.set_xticks(x, [short[n] for n in names], rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"{len(names)} modules in layer order")
    mean = sum(errors.values()) / len(errors)
    ax.set(ylabel="relative error ‖ΔW − B·A‖ / ‖ΔW‖",
           title=f"refactoring error per module{f' at rank {rank}' if rank else ''}: mean {mean:.3g}, "
                 f"max {errors[worst]:.3g}")
    ax.margins(y=0.2)
    return fig


def routing_figure(similarity: Sequence[Sequence[float]], conditions: Sequence[float], labels: Sequence[str],
                   threshold: float):
    """A mixture of experts' routers from `adaptkit moe`: the cosine similarity of the experts' router rows
    (mean over the layers; near 1 the router cannot tell two experts apart) and each layer's condition number
    of its router matrix, against the threshold above which mergekit and adaptkit call the layer degenerate."""
    if not conditions or len(similarity) != len(labels):
        raise AdaptkitError(f"routers to draw need a row per expert and a condition per layer, got {len(labels)} "
                            f"experts, {len(similarity)} rows and {len(conditions)} layers")
    fig, (left, right) = new_figure(2, width=5.6, height=4.6)
    left.grid(False)
    image = left.imshow(similarity, vmin=-1, vmax=1, cmap="RdBu_r")
    for i, row in enumerate(similarity):
        for j, value in enumerate(row):
            left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if abs(value) > 0.6 else "black")
    ticks = list(range(len(labels)))
    left.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=8)
    left.set_yticks(ticks, labels, fontsize=8)
    left.set_title("router rows: cosine similarity (mean over layers)")
    fig.colorbar(image, ax=left, shrink=0.8)
    layers = list(range(len(conditions)))
    bad = [c > threshold for c in conditions]
    right.bar(layers, conditions, color=[BEST if b else "tab:blue" for b in bad])
    right.axhline(threshold, color=BEST, linestyle="--", label=f"degenerate above {threshold:g}")
    if max(conditions) > 10 * threshold:  # (a degenerate layer's condition can be 10⁶ or infinite)
        right.set_yscale("log")
    right.set(xlabel="layer", ylabel="condition number of the router",
              title=f"routers per layer: {sum(bad)} of {len(layers)} degenerate")
    right.legend(loc="best")
    return fig


def training_figure(records: Sequence[Mapping[str, Any]]):
    """Training's loss against the step, with the evaluation loss where it was measured; a second panel
    for the evaluation accuracy or perplexity when the records have one."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise AdaptkitError("the training records have no loss to draw")
    metric = next((k for k in ("eval_accuracy", "eval_perplexity") if any(k in r for r in records)), None)
    fig, axes = new_figure(2 if metric else 1)
    loss = axes[0]
    x, y = [r["step"] for r in steps], [r["loss"] for r in steps]
    window = len(steps) // SMOOTHING
    if window > 1:  # one batch's loss is noisy: the trend is its moving average, the raw values stay faint
        loss.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        loss.plot(x[window - 1:], _moving_average(y, window), color="tab:blue",
                  label=f"training loss (mean of {window} steps)")
    else:
        loss.plot(x, y, color="tab:blue", label="training loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                  label="evaluation loss")
    loss.set(xlabel="step", ylabel="loss", title=f"loss over {steps[-1]['step']} steps")
    loss.legend()
    if metric:
        rows = [r for r in records if metric in r]
        name = metric.removeprefix("eval_")
        axes[1].plot([r["step"] for r in rows], [r[metric] for r in rows], "o-", color="tab:orange")
        axes[1].set(xlabel="step", ylabel=f"evaluation {name}", title=f"evaluation {name}: last {rows[-1][metric]:.4g}")
        if name == "accuracy":  # on its whole scale, so that 0.93 → 1.0 does not look like a leap
            axes[1].set_ylim(0, 1.03)
    return fig


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each run of `window` consecutive values (len(values) − window + 1 of them)."""
    total, out = sum(values[:window]), []
    out.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out


__all__ = ["greedy_figure", "merge_figure", "quantize_figure", "sweep_figure", "training_figure"]
