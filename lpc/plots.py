"""Every plot of the project: the evaluation's (``lpc.evaluate``), the studies' (``lpc.experiments``) and the
code-usage and latent projections.

matplotlib's object API (no pyplot state), so plotting is safe in worker processes and without a display.
Every plot is written to a temp file beside its target and renamed, so a killed process never leaves a
truncated image. matplotlib is an optional dependency: without it each plot function warns
(``RuntimeWarning``) and returns ``None``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .analysis import as_labels, perplexity
from .io import atomic_file


def new_figure(figsize: tuple[float, float]):
    """A ``matplotlib.figure.Figure``, or ``None`` with a ``RuntimeWarning`` when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: plot skipped", RuntimeWarning, stacklevel=3)
        return None
    return Figure(figsize=figsize)


def save_figure(fig, path) -> Path:
    """``fig.savefig`` into a temp file beside ``path`` (same suffix, so the format is inferred), then rename."""
    path = Path(path)
    with atomic_file(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"), dpi=110, bbox_inches="tight")
    return path


def plot_code_usage(histograms: Mapping[str, np.ndarray], path) -> Optional[Path]:
    """Bar plots of code-usage histograms, one panel per entry (title: name and perplexity).

    Returns the written path, or ``None`` with a ``RuntimeWarning`` when matplotlib is missing.

    Raises:
        ValueError: ``histograms`` is empty or an entry is not a 1-D non-negative count vector.
    """
    if not histograms:
        raise ValueError("histograms must contain at least one entry")
    hists = {}
    for name, h in histograms.items():
        arr = np.asarray(h, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or (arr < 0).any() or not np.isfinite(arr).all():
            raise ValueError(f"histograms[{name!r}] must be a non-empty 1-D non-negative count vector")
        hists[str(name)] = arr
    n = len(hists)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = new_figure((4.2 * cols, 2.8 * rows))
    if fig is None:
        return None
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        total = h.sum()
        ppl = perplexity(h / total) if total > 0 else float("nan")
        ax.bar(np.arange(h.size), h, width=0.9, color="tab:blue")
        ax.set_title(f"{name}\nperplexity {ppl:.2f} of K={h.size}", fontsize=9)
        ax.set_xlabel("code")
        ax.set_ylabel("count")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_projection(panels: Mapping[str, np.ndarray], labels, path, *, label_names: Optional[Sequence[str]] = None,
                    title: Optional[str] = None) -> Optional[Path]:
    """Scatter plots of 2-D points coloured by label, one panel per entry of ``panels`` (``[N, 2]`` each).

    ``labels`` (``[N]`` ints, shared by every panel) index ``label_names`` when given. Returns the path, or
    ``None`` with a warning when matplotlib is missing.

    Raises:
        ValueError: ``panels`` empty, a panel not ``[N, 2]``, or ``labels`` not ``[N]``.
    """
    if not panels:
        raise ValueError("panels must contain at least one entry")
    labels = as_labels(labels, "labels")
    pts = {}
    for name, xy in panels.items():
        arr = np.asarray(xy, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] != labels.shape[0]:
            raise ValueError(f"panels[{name!r}] must be [N={labels.shape[0]}, 2], got shape {arr.shape}")
        pts[str(name)] = arr
    n = len(pts)
    fig = new_figure((4.6 * n, 4.2))
    if fig is None:
        return None
    axes = fig.subplots(1, n, squeeze=False)[0]
    uniq = sorted(set(labels.tolist()))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
              "tab:gray", "tab:olive", "tab:cyan"]
    for ax, (name, xy) in zip(axes, pts.items()):
        for j, lab in enumerate(uniq):
            sel = labels == lab
            if label_names is not None and isinstance(lab, (int, np.integer)) and 0 <= lab < len(label_names):
                text = label_names[lab]
            else:
                text = str(lab)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=7, alpha=0.7, color=colors[j % len(colors)], label=text)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=2, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
              ylabel: str, title: Optional[str] = None, ylim: Optional[tuple[float, float]] = None,
              hlines: Optional[Mapping[str, float]] = None) -> Optional[Path]:
    """Grouped bar chart with error bars: ``series[name] = (means per group, stds per group)``.

    Raises:
        ValueError: empty ``groups``/``series`` or a series whose lengths differ from ``groups``.
    """
    if not groups or not series:
        raise ValueError("groups and series must be non-empty")
    for name, (m, s) in series.items():
        if len(m) != len(groups) or len(s) != len(groups):
            raise ValueError(f"series[{name!r}] must have {len(groups)} means and stds")
    fig = new_figure((max(5.0, 1.1 * len(groups) * max(1, len(series)) * 0.6 + 2), 3.8))
    if fig is None:
        return None
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for j, (name, (m, s)) in enumerate(series.items()):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, m, width, yerr=s, capsize=3, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, color="k", linestyle="--", linewidth=0.8)
        ax.text(len(groups) - 0.5, y, f" {name}", va="bottom", ha="right", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lines(x: Sequence[float], series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
               xlabel: str, ylabel: str, title: Optional[str] = None, logx: bool = False,
               xticklabels: Optional[Sequence[str]] = None,
               hlines: Optional[Mapping[str, float]] = None) -> Optional[Path]:
    """Lines with error bars: ``series[name] = (means at x, stds at x)``; ``hlines[name] = y`` dashed references.

    Raises:
        ValueError: empty ``x``/``series`` or a series whose lengths differ from ``x``.
    """
    if len(x) == 0 or not series:
        raise ValueError("x and series must be non-empty")
    for name, (m, s) in series.items():
        if len(m) != len(x) or len(s) != len(x):
            raise ValueError(f"series[{name!r}] must have {len(x)} means and stds")
    fig = new_figure((5.2, 3.6))
    if fig is None:
        return None
    ax = fig.subplots()
    xs = np.asarray(x, dtype=np.float64)
    for name, (m, s) in series.items():
        m, s = np.asarray(m, dtype=np.float64), np.asarray(s, dtype=np.float64)
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, color="k", linestyle="--", linewidth=0.8)
        ax.text(xs[-1], y, f" {name}", va="bottom", ha="right", fontsize=7)
    if logx:
        ax.set_xscale("log")
    if xticklabels is not None:
        ax.set_xticks(xs)
        ax.set_xticklabels(xticklabels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- evaluation
def plot_margins(margin: np.ndarray, path: Path) -> Optional[Path]:
    """Histogram of held-out reward margins (> 0: the pair is ranked correctly)."""
    fig = new_figure((5, 3))
    if fig is None:
        return None
    ax = fig.subplots()
    ax.hist(margin, bins=40, color="tab:blue")
    ax.axvline(0.0, color="black", lw=1)
    ax.set_xlabel("reward margin r(x, y_w) - r(x, y_l)")
    ax.set_ylabel("pairs")
    ax.set_title(f"held-out: {float((margin > 0).mean()):.3f} ranked correctly", fontsize=9)
    return save_figure(fig, path)


def plot_source_accuracy(by_source: dict, path: Path) -> Optional[Path]:
    """Bar chart of per-source held-out accuracy."""
    if not by_source:
        return None
    fig = new_figure((max(4, 0.8 * len(by_source) + 2), 3))
    if fig is None:
        return None
    ax = fig.subplots()
    ax.bar(list(by_source), list(by_source.values()), color="tab:green")
    ax.axhline(0.5, color="black", lw=1, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def plot_training_curves(metrics_path: Path, path: Path) -> Optional[Path]:
    """Loss and reward accuracy per step from ``metrics.jsonl``."""
    if not metrics_path.exists():
        return None
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig = new_figure((9, 3))
    if fig is None:
        return None
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "rewards/accuracies")):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
    return save_figure(fig, path)


def plot_heatmap(values: np.ndarray, path, *, xlabels: Sequence[str], ylabel: str,
                 title: Optional[str] = None) -> Optional[Path]:
    """A ``[rows, columns]`` matrix of values in [0, 1] as a heatmap (columns named by ``xlabels``), each cell
    annotated when the matrix is small enough to read.

    Raises:
        ValueError: ``values`` not 2-D, or ``xlabels`` not one per column.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(xlabels):
        raise ValueError(f"values must be [rows, {len(xlabels)}] (one column per label), got {values.shape}")
    fig = new_figure((1.0 + 0.8 * values.shape[1], 1.0 + 0.22 * values.shape[0]))
    if fig is None:
        return None
    ax = fig.subplots()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(values.shape[1]))
    ax.set_xticklabels(list(xlabels), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.05)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
