r"""Faithfulness by region perturbation (pixel flipping) and its AOPC.

Region perturbation (Samek et al. 2017). The image is cut into a grid of square,
non-overlapping regions of ``region`` x ``region`` pixels; a region's relevance is the sum
of the map over its pixels and channels. Regions are removed in the order of their
relevance, most relevant first (MoRF) or least relevant first (LeRF), one region per step:
removing means replacing its pixels with a value (the image's per-channel mean, zero, a
blurred copy of the image, or uniform noise in [0, 1]). After every step the model's score
for the explained class is recorded, giving a curve :math:`f(x^{(0)}), \dots, f(x^{(L)})`
per image. Its area over the perturbation curve is

.. math::
   \mathrm{AOPC} = \frac{1}{L + 1} \sum_{k=0}^{L} \big(f(x^{(0)}) - f(x^{(k)})\big),

averaged over images (`aopc` gives it per image, `summary` the mean and its standard
error). A faithful map makes the MoRF score fall fast (large MoRF AOPC) and the LeRF score
fall slowly (small LeRF AOPC). Ties in region relevance are broken by region index
(row-major), so a constant map removes regions in reading order.

References:
  Samek, Binder, Montavon, Lapuschkin, Müller (2017). Evaluating the visualization of what
  a deep neural network has learned. IEEE TNNLS 28(11), 2660-2673.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis.metrics.registry import register

__all__ = [
    "ORDERS",
    "REPLACEMENTS",
    "SCORES",
    "aopc",
    "region_perturbation",
    "region_perturbation_lerf",
    "region_perturbation_morf",
    "region_relevance",
    "summary",
]

REPLACEMENTS = ("mean", "zero", "blur", "uniform")
ORDERS = ("morf", "lerf")
SCORES = ("logit", "probability")


def _grid(height: int, width: int, region: int) -> tuple[int, int]:
    return -(-height // region), -(-width // region)


def region_relevance(relevance: np.ndarray | jax.Array, region: int) -> np.ndarray:
    """Relevance per region of a square grid.

    Args:
      relevance: (N, H, W, C) or (N, H, W) maps.
      region: side of a region in pixels; edge regions are smaller when H or W is not a
        multiple of it.

    Returns:
      (N, gh * gw) float64: the sum of relevance over each region's pixels and channels,
      regions in row-major order, with gh = ceil(H / region), gw = ceil(W / region).
    """
    r = np.asarray(relevance, np.float64)
    if r.ndim == 4:
        r = r.sum(axis=-1)
    if r.ndim != 3:
        raise ValueError(f"relevance must be (N, H, W, C) or (N, H, W), got {r.shape}")
    n, h, w = r.shape
    gh, gw = _grid(h, w, region)
    r = np.pad(r, ((0, 0), (0, gh * region - h), (0, gw * region - w)))
    return r.reshape(n, gh, region, gw, region).sum(axis=(2, 4)).reshape(n, gh * gw)


def _positions(region_rel: np.ndarray, order: str) -> np.ndarray:
    """(N, G) int32: at which step each region is removed (0 = first)."""
    key = -region_rel if order == "morf" else region_rel
    ranking = np.argsort(key, axis=1, kind="stable")
    pos = np.empty_like(ranking)
    np.put_along_axis(pos, ranking, np.arange(ranking.shape[1])[None], axis=1)
    return pos.astype(np.int32)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, C) images with reflecting borders."""
    radius = max(1, int(np.ceil(2 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(images, np.float64)
    for axis in (1, 2):
        size = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if size > radius else "edge")
        out = sum(
            kernel[i] * np.take(padded, np.arange(i, i + size), axis=axis)
            for i in range(len(kernel))
        )
    return out.astype(np.asarray(images).dtype)


def _fill(images: np.ndarray, replacement: str, region: int, seed: int, start: int) -> np.ndarray:
    """(N, H, W, C) values that replace removed pixels; `start` is the batch's first index."""
    x = np.asarray(images)
    if replacement == "mean":
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(x.dtype)
    if replacement == "zero":
        return np.zeros_like(x)
    if replacement == "blur":
        return _blur(x, sigma=max(region / 2.0, 1.0))
    if replacement == "uniform":  # one generator per image index: independent of batching
        return np.stack(
            [np.random.default_rng([seed, start + i]).random(x.shape[1:]) for i in range(len(x))]
        ).astype(x.dtype)
    raise ValueError(f"unknown replacement {replacement!r}; choose from {', '.join(REPLACEMENTS)}")


@lru_cache(maxsize=16)
def _perturbed_logits(graphdef: nnx.GraphDef, region: int) -> Callable:
    """jit(state, x, fill, pos, k) -> logits of x with the regions at positions < k filled."""

    def fn(state, x, fill, pos, k):
        n, h, w = x.shape[:3]
        gh, gw = _grid(h, w, region)
        removed = (pos < k).reshape(n, gh, gw)
        removed = jnp.repeat(jnp.repeat(removed, region, axis=1), region, axis=2)[:, :h, :w]
        removed = removed.reshape(removed.shape + (1,) * (x.ndim - 3))
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        return model(jnp.where(removed, fill, x))

    return jax.jit(fn)


def _scores(logits: np.ndarray, target: np.ndarray, score: str) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    if score == "probability":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        logits = z / z.sum(axis=1, keepdims=True)
    return np.take_along_axis(logits, target[:, None], axis=1)[:, 0]


def region_perturbation(
    model: nnx.Module,
    images: np.ndarray | jax.Array,
    relevance: np.ndarray | jax.Array,
    target: np.ndarray | jax.Array | int | None = None,
    *,
    region: int = 4,
    steps: int | None = None,
    order: str = "morf",
    replacement: str = "mean",
    score: str = "logit",
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Region perturbation curves (pixel flipping; Samek et al. 2017).

    All images of a batch are perturbed at once; the model runs once per step on the batch
    (one jit-compiled function of the step number, called from a Python loop).

    Args:
      model: a Flax NNX model returning logits (N, C); run in eval mode.
      images: (N, H, W, C) inputs.
      relevance: (N, H, W, C) or (N, H, W) maps of the images.
      target: (N,) int classes whose score is recorded; an int for all; None or -1: the
        class predicted for the unperturbed image.
      region: side of a square region in pixels (non-overlapping grid).
      steps: number of regions removed, one per step; None: all regions.
      order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
      replacement: ``"mean"`` (per image and channel), ``"zero"``, ``"blur"`` (a Gaussian
        blur with sigma = region / 2) or ``"uniform"`` (noise in [0, 1], from ``seed`` and
        the image's index).
      score: ``"logit"`` (the class score f(x), as in Samek et al.) or ``"probability"``.
      seed: seed of the uniform noise.
      batch_size: images per model call.
      progress: show a tqdm progress bar.
      desc: the progress bar's label.

    Returns:
      (N, steps + 1) float64 curves: column k is the score after k regions were removed.

    Raises:
      ValueError: bad shapes, an unknown order, replacement or score, or too many steps.
    """
    from tqdm.auto import tqdm

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got {images.shape}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    if replacement not in REPLACEMENTS:
        raise ValueError(
            f"unknown replacement {replacement!r}; choose from {', '.join(REPLACEMENTS)}"
        )
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    if region < 1 or batch_size < 1:
        raise ValueError(f"region and batch_size must be positive, got {region}, {batch_size}")
    rel = np.asarray(relevance)
    if rel.shape[0] != images.shape[0] or rel.shape[1:3] != images.shape[1:3]:
        raise ValueError(f"relevance {rel.shape} does not match images {images.shape}")
    n = len(images)
    pos = _positions(region_relevance(rel, region), order)
    num_regions = pos.shape[1]
    steps = num_regions if steps is None else int(steps)
    if not 0 <= steps <= num_regions:
        raise ValueError(f"steps must lie in 0..{num_regions} (the number of regions), got {steps}")
    target = np.broadcast_to(np.asarray(-1 if target is None else target), (n,)).astype(np.int64)
    graphdef, state = nnx.split(model)
    run = _perturbed_logits(graphdef, int(region))
    curves = np.zeros((n, steps + 1))
    batches = range(0, n, batch_size)
    bar = tqdm(
        total=len(batches) * (steps + 1),
        disable=not progress,
        desc=desc or f"{order} {replacement}",
        unit="step",
        leave=False,
    )
    with bar:
        for lo in batches:
            hi = min(lo + batch_size, n)
            x = jnp.asarray(images[lo:hi])
            fill = jnp.asarray(_fill(images[lo:hi], replacement, region, seed, lo), x.dtype)
            p = jnp.asarray(pos[lo:hi])
            t = target[lo:hi]
            for k in range(steps + 1):
                logits = np.asarray(run(state, x, fill, p, jnp.int32(k)))
                if k == 0:
                    t = np.where(t < 0, logits.argmax(axis=1), t)
                curves[lo:hi, k] = _scores(logits, t, score)
                bar.update(1)
    return curves


def aopc(curves: np.ndarray) -> np.ndarray:
    r"""Area over the perturbation curve per image.

    Args:
      curves: (N, L + 1) scores :math:`f(x^{(0)}), \dots, f(x^{(L)})`.

    Returns:
      (N,) :math:`\frac{1}{L+1} \sum_{k=0}^{L} (f(x^{(0)}) - f(x^{(k)}))`.

    References:
      Samek et al. (2017), IEEE TNNLS 28(11), Eq. (12).
    """
    curves = np.asarray(curves, np.float64)
    return (curves[:, :1] - curves).mean(axis=1)


def summary(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); NaN for n < 2)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return float(values.mean()), float(se)


# --- model randomization -------------------------------------------------------------


def _aopc_of(order: str):
    def metric(model, x, maps, target, *, explain=None, key=None, **settings) -> np.ndarray:
        settings.setdefault("progress", False)
        return aopc(region_perturbation(model, x, maps, target, order=order, **settings))

    metric.__name__ = f"region_perturbation_{order}"
    metric.__doc__ = f"""The {order.upper()} AOPC of `region_perturbation` per image (the
    registered metric ``region_perturbation_{order}``; keyword settings as there: region,
    steps, replacement, score, seed, batch_size).

    Returns:
      (N,) AOPC of the score: {"higher" if order == "morf" else "lower"} is more faithful.
    """
    return metric


region_perturbation_morf = register(
    "region_perturbation_morf",
    family="faithfulness",
    higher_is_better=True,
    reference="Samek et al. 2017",
)(_aopc_of("morf"))
region_perturbation_lerf = register(
    "region_perturbation_lerf",
    family="faithfulness",
    higher_is_better=False,
    reference="Samek et al. 2017",
)(_aopc_of("lerf"))
