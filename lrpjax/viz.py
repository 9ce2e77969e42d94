"""Heatmaps: from relevance arrays to pictures.

The reference post-processing is the default of `heatmap`: sum relevance over colour
channels, clip at a quantile of its magnitude, and scale symmetrically into [-1, 1], so that
0 stays 0 (neutral) and red means evidence for the class, blue evidence against it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "channel_sum",
    "class_mean_figure",
    "clip_quantile",
    "colorbar",
    "colorize",
    "colormap",
    "grid_figure",
    "heatmap",
    "normalize",
    "overlay",
]


def channel_sum(relevance: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, H, W): relevance summed over channels."""
    return np.asarray(relevance, np.float32).sum(axis=-1)


def clip_quantile(h: np.ndarray, q: float = 0.99) -> np.ndarray:
    """Clip each map of (N, H, W) at the q-quantile of its absolute values (outliers)."""
    h = np.asarray(h, np.float32)
    bound = np.quantile(np.abs(h).reshape(len(h), -1), q, axis=1).reshape(-1, 1, 1)
    return np.clip(h, -bound, bound)


def normalize(h: np.ndarray) -> np.ndarray:
    """Scale each map of (N, H, W) into [-1, 1] by its largest magnitude; all-zero stays 0."""
    h = np.asarray(h, np.float32)
    scale = np.abs(h).reshape(len(h), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(h, scale, out=np.zeros_like(h), where=scale > 0)


def heatmap(relevance: np.ndarray, q: float = 0.99) -> np.ndarray:
    """Reference post-processing: channel sum, clip at quantile q, symmetric normalisation.

    Args:
      relevance: (N, H, W, C) relevance.
      q: quantile of |relevance| to clip at (1.0: no clipping).

    Returns:
      (N, H, W) maps in [-1, 1].
    """
    return normalize(clip_quantile(channel_sum(relevance), q))


def colormap(name: str = "bwr"):
    """A matplotlib colour map with red positive, blue negative, neutral at 0.5.

    Args:
      name: ``"bwr"`` (white at zero), ``"seismic"`` (darker extremes), or ``"coldnhot"``
        (black at zero; cyan-blue negative, red-yellow positive, as in Zennit).
    """
    import matplotlib

    if name == "coldnhot":
        from matplotlib.colors import LinearSegmentedColormap

        return LinearSegmentedColormap.from_list(
            "coldnhot",
            [
                (0.0, "#00ffff"),
                (0.25, "#0000ff"),
                (0.5, "#000000"),
                (0.75, "#ff0000"),
                (1.0, "#ffff00"),
            ],
        )
    if name not in ("bwr", "seismic"):
        raise ValueError(f"unknown colour map {name!r}; choose bwr, seismic or coldnhot")
    return matplotlib.colormaps[name]


def colorize(h: np.ndarray, cmap: str = "bwr") -> np.ndarray:
    """(N, H, W) maps in [-1, 1] -> (N, H, W, 3) RGB in [0, 1]."""
    return colormap(cmap)((np.asarray(h) + 1.0) / 2.0)[..., :3].astype(np.float32)


def overlay(images: np.ndarray, h: np.ndarray, alpha: float = 0.6, cmap: str = "bwr") -> np.ndarray:
    """Blend heatmaps over greyscale images, opaque where relevance is strong.

    Args:
      images: (N, H, W, 3) in [0, 1].
      h: (N, H, W) maps in [-1, 1].
      alpha: opacity of the strongest relevance.

    Returns:
      (N, H, W, 3) RGB in [0, 1].
    """
    grey = np.asarray(images, np.float32).mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    weight = alpha * np.abs(np.asarray(h))[..., None]
    return (1 - weight) * grey + weight * colorize(h, cmap)


def colorbar(fig, cmap: str = "bwr") -> None:
    """Lay out `fig` with a colour bar along its bottom for maps in [-1, 1]: what red and
    blue mean. Call it instead of ``fig.tight_layout()``; the figure grows by the bar.

    Args:
      fig: a matplotlib figure whose heatmaps are drawn with ``vmin=-1, vmax=1``.
      cmap: the maps' colour map (`colormap`).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    reserved = 0.75  # inches: the bar, its tick labels and its label
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + reserved)
    total = height + reserved
    fig.tight_layout(rect=(0, reserved / total, 1, 1), h_pad=1.5)
    bar = fig.add_axes((0.2, 0.5 / total, 0.6, 0.1 / total))
    scale = ScalarMappable(norm=Normalize(-1, 1), cmap=colormap(cmap))
    cb = fig.colorbar(scale, cax=bar, orientation="horizontal", ticks=[-1, 0, 1])
    cb.ax.set_xticklabels(["-1: against the class", "0", "+1: for the class"], fontsize=7)
    cb.ax.set_xlabel(
        "relevance, each map scaled by its largest |R|: red = evidence for the explained "
        "class, blue = against",
        fontsize=7,
    )


def grid_figure(
    images: np.ndarray,
    relevance: np.ndarray | Mapping[str, np.ndarray],
    *,
    labels: Sequence[int] | None = None,
    predictions: Sequence[int] | None = None,
    probabilities: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    cmap: str = "bwr",
    q: float = 0.99,
    path: str | os.PathLike | None = None,
):
    """A grid of rows ``image | heatmap | overlay``, two such triples per row.

    With `relevance` a mapping ``{name: (N, H, W, C) relevance}`` (e.g. two composites for
    the same images), each image is followed by one heatmap per entry instead, headed by its
    name: ``image | heatmap 1 | heatmap 2 ...``.

    Titles give the true class, the predicted class and its probability where known (a class
    index beyond `class_names` is shown as the number). Returns the matplotlib figure; saved
    as PNG when `path` is given.
    """
    import matplotlib.pyplot as plt

    if isinstance(relevance, Mapping):
        panels = [(name, heatmap(r, q)) for name, r in relevance.items()]
    else:
        h = heatmap(relevance, q)
        panels = [("heatmap", h), ("overlay", overlay(images, h, cmap=cmap))]
    n = len(images)
    width = 1 + len(panels)
    per_row = 2
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(
        rows, width * per_row, figsize=(width * per_row * 1.6, rows * 1.8), squeeze=False
    )
    names = list(class_names or [])

    def name(k: int) -> str:  # a class beyond the names given is shown by its index
        return names[k] if 0 <= k < len(names) else str(k)

    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, per_row)
        row = axes[r, width * c : width * c + width]
        row[0].imshow(np.clip(images[i], 0, 1))
        for ax, (label, maps) in zip(row[1:], panels, strict=True):
            if label == "overlay":
                ax.imshow(np.clip(maps[i], 0, 1))
            else:
                ax.imshow(maps[i], cmap=colormap(cmap), vmin=-1, vmax=1)
            if isinstance(relevance, Mapping) and r == 0:
                ax.set_title(label, fontsize=7)
        title = []
        if labels is not None:
            title.append(f"true {name(int(labels[i]))}")
        if predictions is not None:
            p = f" {float(probabilities[i]):.2f}" if probabilities is not None else ""
            title.append(f"pred {name(int(predictions[i]))}{p}")
        row[0].set_title("\n".join(title), fontsize=7)
    colorbar(fig, cmap)
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def class_mean_figure(
    mean_maps: np.ndarray,
    *,
    class_names: Sequence[str],
    counts: Sequence[int] | None = None,
    cmap: str = "bwr",
    max_classes: int = 20,
    path: str | os.PathLike | None = None,
):
    """One heatmap per class (e.g. the mean channel-summed relevance of its images).

    With more than `max_classes` classes, the `max_classes` with the most images (by
    `counts`, and only classes with images; else the first) are shown, in class order, and
    the title says so.

    Args:
      mean_maps: (K, H, W) per-class mean maps (any scale; each is normalised for display).
      class_names: K names.
      counts: images per class, shown in the titles.
    """
    import matplotlib.pyplot as plt

    h = normalize(clip_quantile(mean_maps, 0.99))
    total = len(h)
    shown = np.arange(total)
    if total > max_classes:
        order = shown
        if counts is not None:
            n = np.asarray(counts)
            order = np.argsort(-n, kind="stable")
            if (n > 0).any():
                order = order[n[order] > 0]  # empty classes have no mean to show
        shown = np.sort(order[:max_classes])
    k = len(shown)
    cols = min(k, 5)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), shown, strict=False):
        ax.imshow(h[c], cmap=colormap(cmap), vmin=-1, vmax=1)
        label = class_names[c] if c < len(class_names) else str(c)
        ax.set_title(label + (f" (n={counts[c]})" if counts is not None else ""), fontsize=8)
    title = "mean heatmap per true class"
    if k < total:
        title += f" ({k} of {total} classes: those with the most images)"
    fig.suptitle(title, fontsize=9)
    colorbar(fig, cmap)
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
