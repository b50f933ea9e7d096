"""PNG pictures of an evaluation (matplotlib, Agg backend: no display needed).

  (a) `plot_accuracy_vs_ratio`: accuracy against token ratio; per model one curve through its
      top-p points (dense = the p = 1 end), other settings (top-k, threshold, FastV) as labelled
      markers. Several models (e.g. before / after RL) share the axes, one panel per set.
  (a') `plot_tradeoff`: the same axes from plain (p, ratio, accuracy) curves, one line per group.
  (b) `plot_layer_ratios`: per-layer token ratio bars, one bar group per decoder layer.
  (c) `plot_kept_heatmap`: which image patches a layer keeps, drawn over the input image
      (one cell per merged patch = one LM token; see harness.image_keep_grid).

Inputs are `harness.SettingResult`s (or their dicts, e.g. from `harness.read_results`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from zipr1_jax.eval.harness import SettingResult

MARKERS = {"topk": "s", "threshold": "^", "fastv": "D"}


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _results(results) -> list[SettingResult]:
    out = [r if isinstance(r, SettingResult) else SettingResult.from_dict(r) for r in results]
    if not out:
        raise ValueError("no results to plot")
    return out


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path


def slug(name: str) -> str:
    """A file-name-safe version of a set / setting name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "x"


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------- (a)
def plot_accuracy_vs_ratio(results, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Accuracy vs mean token ratio (see module docstring). Returns the path written."""
    results = _results(results)
    plt = _plt()
    sets = _ordered(r.set for r in results)
    models = _ordered(r.model for r in results)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), dpi=100, squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        for m, model in enumerate(models):
            color = colors[m % len(colors)]
            mine = [r for r in results if r.set == set_name and r.model == model]
            curve = sorted((r for r in mine if r.kind in ("topp", "dense")), key=lambda r: r.token_ratio)
            if curve:
                ax.plot([r.token_ratio for r in curve], [r.accuracy for r in curve], marker="o", color=color,
                        label=f"{model} top-p")
                for r in curve:
                    tag = "dense" if r.kind == "dense" else f"p={r.budget:g}"
                    ax.annotate(tag, (r.token_ratio, r.accuracy), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=color)
            for r in mine:
                if r.kind in ("topp", "dense"):
                    continue
                ax.scatter([r.token_ratio], [r.accuracy], marker=MARKERS.get(r.kind, "x"), color=color, s=40,
                           label=f"{model} {r.setting}")
        ax.set_xlabel("token ratio (kept / all, mean over layers)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0.0, 1.05)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(set_name if title is None else f"{title}: {set_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(curves: Mapping[str, list[tuple[float, float, float]]], path: str | os.PathLike, *,
                  title: str = "accuracy vs token ratio", annotate: tuple[str, ...] = ()) -> str:
    """One accuracy-vs-token-ratio line per group (e.g. before RL and each arm averaged over seeds).

    curves: {label: [(p, token_ratio, accuracy), ...]}; the p values of the groups in `annotate`
    are written next to their points (annotating every group makes the picture unreadable).
    """
    if not curves:
        raise ValueError("no curves to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda t: t[1])
        line, = ax.plot([t[1] for t in pts], [t[2] for t in pts], marker="o", label=label)
        if label in annotate:
            for p, x, y in pts:
                ax.annotate(f"{p:g}", (x, y), textcoords="offset points", xytext=(-4, -12), fontsize=7,
                            color=line.get_color())
    ax.set_xlabel("token ratio (kept / all prompt tokens, mean over layers)")
    ax.set_ylabel("accuracy (greedy)")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(-0.02, 1.04)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- (b)
def plot_layer_ratios(results, path: str | os.PathLike, *, set_name: str | None = None,
                      title: str | None = None) -> str:
    """Grouped bars of the per-layer token ratio of each result of one set (default: the first)."""
    results = _results(results)
    set_name = results[0].set if set_name is None else set_name
    chosen = [r for r in results if r.set == set_name]
    if not chosen:
        raise ValueError(f"no results for set {set_name!r}; sets: {_ordered(r.set for r in results)}")
    plt = _plt()
    n_layers = max(len(r.layer_ratio) for r in chosen)
    several = len({r.model for r in chosen}) > 1
    width = 0.8 / len(chosen)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n_layers * max(1, len(chosen)) ** 0.5 + 3), 4.0), dpi=100)
    x = np.arange(n_layers)
    for i, r in enumerate(chosen):
        vals = np.full(n_layers, np.nan)
        vals[:len(r.layer_ratio)] = r.layer_ratio
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=f"{r.model} | {r.setting}" if several else r.setting)
    ax.set_xticks(x)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("token ratio (kept / valid)")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(title or f"per-layer token ratio: {set_name}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- (c)
def plot_kept_heatmap(image: np.ndarray, keep_hw: np.ndarray, path: str | os.PathLike, *, layer: int,
                      title: str | None = None) -> str:
    """The image beside an overlay of the patches layer `layer` keeps.

    Args:
      image: uint8 [H, W, 3] (the input image; it is stretched over the patch grid).
      keep_hw: [h, w] (or [t, h, w]: frame 0) per merged patch, bool kept or a fraction in [0, 1]
        (e.g. kept frequency over several examples or layers).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    keep = np.asarray(keep_hw, np.float32)
    if keep.ndim == 3:
        keep = keep[0]
    if keep.ndim != 2 or keep.size == 0:
        raise ValueError(f"keep_hw must be a non-empty [h, w] or [t, h, w] grid, got shape {np.shape(keep_hw)}")
    if np.any((keep < 0) | (keep > 1)):
        raise ValueError("keep_hw values must be in [0, 1]")
    plt = _plt()
    gh, gw = keep.shape
    extent = (0, gw, gh, 0)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.3), dpi=100)
    axes[0].imshow(img, extent=extent, interpolation="nearest")
    axes[0].set_title("input image")
    axes[1].imshow(img, extent=extent, interpolation="nearest")
    # Dropped patches are dimmed and tinted; kept ones stay clear.
    dim = (0.15, 0.0, 0.0)
    shade = np.zeros((gh, gw, 4), np.float32)
    shade[..., :3] = dim
    shade[..., 3] = 0.75 * (1.0 - keep)
    axes[1].imshow(shade, extent=extent, interpolation="nearest")
    for ax in axes:
        ax.set_xticks(np.arange(gw + 1), minor=True)
        ax.set_yticks(np.arange(gh + 1), minor=True)
        ax.grid(which="minor", color="0.6", linewidth=0.5, alpha=0.7)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    frac = float(keep.mean())
    axes[1].set_title(title or f"layer {layer}: kept {frac:.0%} of {gh * gw} image tokens")
    from matplotlib.cm import ScalarMappable  # noqa: PLC0415
    from matplotlib.colors import LinearSegmentedColormap, Normalize  # noqa: PLC0415

    # The colour bar shows the overlay itself: 0 = dropped (dimmed), 1 = kept (clear).
    cmap = LinearSegmentedColormap.from_list("kept", [tuple(0.25 + 0.75 * c for c in dim), (1.0, 1.0, 1.0)])
    cbar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes[1], fraction=0.046, pad=0.04)
    cbar.set_label("kept (dimmed = dropped)")
    fig.tight_layout()
    return _save(fig, path)


def plot_all(results, out_dir: str | os.PathLike, *, heatmaps: Mapping[str, tuple] | None = None,
             title: str | None = None) -> list[str]:
    """(a) and (b) for every set, plus (c) for each `heatmaps` entry name -> (image, keep_hw, layer).
    Returns the paths written."""
    results = _results(results)
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_accuracy_vs_ratio(results, os.path.join(out_dir, "accuracy_vs_token_ratio.png"), title=title)]
    for set_name in _ordered(r.set for r in results):
        paths.append(plot_layer_ratios(results, os.path.join(out_dir, f"layer_ratios_{slug(set_name)}.png"),
                                       set_name=set_name))
    for name, (image, keep_hw, layer) in (heatmaps or {}).items():
        paths.append(plot_kept_heatmap(image, keep_hw, os.path.join(out_dir, f"kept_{slug(name)}.png"), layer=layer))
    return paths

