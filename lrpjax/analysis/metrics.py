r"""Explanation quality: region perturbation (pixel flipping), AOPC, and model randomization.

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

Model randomization (Adebayo et al. 2018). The model's layers with parameters are
re-initialised from the top (the output layer) down, cumulatively; after each stage every
explainer's maps are recomputed and compared with the maps of the trained model by the
Spearman rank correlation per image (averaged over images), of the channel-summed absolute
map and of the channel-summed signed map. An explanation that still looks the same once
the model is random cannot be explaining the model: explainers whose absolute-map
correlation after randomizing all layers stays above a threshold are flagged insensitive.
Batch statistics are kept, so the activations of a randomized network can grow by orders
of magnitude (on the shipped MiniVGG the logits reach ~1e3): explainers that start from the
softmax (LRP with ``init="sglrp"`` or ``"probability"``) may then give all-zero maps, which
count as changed (rank correlation 0 against a non-constant map).

References:
  Samek, Binder, Montavon, Lapuschkin, Müller (2017). Evaluating the visualization of what
  a deep neural network has learned. IEEE TNNLS 28(11), 2660-2673.
  Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim (2018). Sanity checks for saliency maps.
  NeurIPS.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis import baselines
from lrpjax.core import compilation, engine

__all__ = [
    "REPLACEMENTS",
    "aopc",
    "layer_order",
    "model_randomization",
    "randomize_layers",
    "region_perturbation",
    "region_relevance",
    "spearman",
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


def _has_params(module: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(module, nnx.Param)))


def layer_order(model: nnx.Module, x: np.ndarray | jax.Array) -> list[str]:
    """Paths ('/'-joined) of the layers with parameters, in the order the model calls them.

    The call order is recorded by tracing the model on one input with lrpjax's layer
    probes. A model made of a single layer gives ``[""]``.

    Args:
      model: a Flax NNX model.
      x: (N, ...) example input (only its shape and dtype are used).
    """
    leaves = [
        path
        for path, module in nnx.iter_modules(model)
        if not isinstance(module, nnx.RngStream | nnx.Rngs)
        and not any(
            isinstance(c, nnx.Module) and not isinstance(c, nnx.RngStream | nnx.Rngs)
            for _, c in nnx.iter_children(module)
        )
    ]
    if leaves == [()]:
        return [""]
    sample = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), jnp.asarray(x).dtype)
    return [path for path, layer in engine.layer_calls(model, sample) if _has_params(layer)]


def _in_layer(path: tuple, layer: str) -> bool:
    joined = "/".join(map(str, path))
    return layer == "" or joined.startswith(layer + "/")


def randomize_layers(state: nnx.State, layers: Sequence[str], seed: int = 0) -> nnx.State:
    """A copy of a model state with the parameters of some layers drawn afresh.

    Every `nnx.Param` array under a layer's path is replaced by
    ``mean + std * N(0, 1)`` with the mean and standard deviation of the original array
    (so a constant array, such as an untrained zero bias, stays as it is); batch
    statistics and everything else are kept. The draw depends on ``seed`` and the layer's
    path only, so cascading stages share the values of the layers they have in common.

    Args:
      state: the full state of a model (from `nnx.split`).
      layers: layer paths as from `layer_order` ("" for all parameters).
      seed: random seed.

    Returns:
      A state of the same structure.
    """
    flat = []
    for path, var in nnx.to_flat_state(state):
        owner = next((layer for layer in layers if _in_layer(path, layer)), None)
        if owner is not None and isinstance(var, nnx.Param):
            value = np.asarray(var.get_value())
            rng = np.random.default_rng([seed, zlib.crc32("/".join(map(str, path)).encode())])
            noise = rng.standard_normal(value.shape, np.float32)
            new = value.mean(dtype=np.float64) + value.std(dtype=np.float64) * noise
            var = var.replace(jnp.asarray(new, value.dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank."""
    sorter = np.argsort(a, kind="stable")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(a.size)
    s = a[sorter]
    obs = np.r_[True, s[1:] != s[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], a.size]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row of two (N, ...) arrays (ties: average ranks).

    Returns:
      (N,) correlations; 1 where both rows are constant, 0 where only one is.
    """
    a = np.nan_to_num(np.asarray(a, np.float64).reshape(len(a), -1))
    b = np.nan_to_num(np.asarray(b, np.float64).reshape(len(b), -1))
    out = np.empty(len(a))
    for i in range(len(a)):
        ra, rb = _rankdata(a[i]), _rankdata(b[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        na, nb = np.sqrt((ra**2).sum()), np.sqrt((rb**2).sum())
        if na == 0 or nb == 0:
            out[i] = 1.0 if na == nb else 0.0
        else:
            out[i] = float((ra * rb).sum() / (na * nb))
    return out


def _pixel_maps(relevance: np.ndarray) -> np.ndarray:
    r = np.asarray(relevance, np.float64)
    return r.sum(axis=-1) if r.ndim == 4 else r


def model_randomization(
    model: nnx.Module,
    images: np.ndarray | jax.Array,
    explainers: Sequence[str] | Mapping[str, str | baselines.Explainer],
    target: np.ndarray | jax.Array | int | None = None,
    *,
    seed: int = 0,
    threshold: float = 0.5,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """Cascading model-randomization sanity check (Adebayo et al. 2018).

    Stage j re-initialises the parameters of the j top-most layers (`randomize_layers`),
    from the output layer down to the first; each explainer's maps of `images` are computed
    with the randomized state and compared with the trained model's maps. The target class
    stays that of the trained model throughout.

    Args:
      model: a Flax NNX model returning logits.
      images: (N, H, W, C) inputs (a few suffice; each stage explains all of them).
      explainers: spec strings for `lrpjax.analysis.baselines.make`, or a mapping name -> spec or
        ``(fn, state)`` with ``fn(state, x, target) -> (N, ...)`` and ``state`` the model's
        full `nnx.State` (randomized by path, so it must have the model's structure).
      target: (N,) or int classes; None or -1: the trained model's prediction.
      seed: seed of the re-initialisation.
      threshold: an explainer whose mean absolute-map rank correlation after randomizing
        all layers exceeds this is flagged insensitive.
      layers: layer paths to randomize, top first; default: all layers with parameters in
        reverse call order (`layer_order`).
      progress: show a progress bar over stages.

    Returns:
      A JSON-serialisable dict: ``layers`` (the stages: the layer randomized last at each
      stage); ``correlation`` and ``correlation_signed``: explainer -> list of
      ``[layer, mean Spearman rho]`` per stage, of the channel-summed absolute and signed
      maps; ``insensitive``: the flagged explainer names; ``threshold``; ``images``.

    References:
      Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim (2018). Sanity checks for saliency
      maps. NeurIPS.
    """
    from tqdm.auto import tqdm

    images = jnp.asarray(images)
    if isinstance(explainers, Mapping):
        items = dict(explainers)
    else:
        items = {spec: spec for spec in explainers}
    graphdef, model_state = nnx.split(model)
    fns = {}  # name -> (jitted fn, state or None for the model's own state)
    for name, spec in items.items():
        if isinstance(spec, str):
            fn, _ = baselines.make(model, spec)
            fns[name] = (compilation.jit(fn), None)
        else:
            fn, state = spec
            same = jax.tree.structure(state) == jax.tree.structure(model_state) and all(
                a is b
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(model_state), strict=True)
            )
            fns[name] = (compilation.jit(fn), None if same else state)
    n = images.shape[0]
    target = jnp.broadcast_to(jnp.asarray(-1 if target is None else target), (n,)).astype(jnp.int32)
    if bool(jnp.any(target < 0)):
        logits = nnx.merge(graphdef, model_state, copy=True)(images)
        target = jnp.where(target < 0, jnp.argmax(logits, axis=-1), target).astype(jnp.int32)
    if layers is None:
        layers = layer_order(model, images)[::-1]
    layers = list(layers)
    if not layers:
        raise ValueError("the model has no layers with parameters to randomize")
    original = {
        name: _pixel_maps(fn(model_state if state is None else state, images, target))
        for name, (fn, state) in fns.items()
    }
    corr = {name: [] for name in fns}
    corr_signed = {name: [] for name in fns}
    for j in tqdm(range(len(layers)), disable=not progress, desc="randomization", leave=False):
        shared = randomize_layers(model_state, layers[: j + 1], seed)
        for name, (fn, state) in fns.items():
            randomized = shared if state is None else randomize_layers(state, layers[: j + 1], seed)
            maps = _pixel_maps(fn(randomized, images, target))
            rho = float(spearman(np.abs(original[name]), np.abs(maps)).mean())
            rho_signed = float(spearman(original[name], maps).mean())
            corr[name].append([layers[j], rho])
            corr_signed[name].append([layers[j], rho_signed])
    insensitive = [name for name in fns if corr[name][-1][1] > threshold]
    return {
        "layers": layers,
        "correlation": corr,
        "correlation_signed": corr_signed,
        "insensitive": insensitive,
        "threshold": threshold,
        "images": int(n),
        "measure": "mean over images of the Spearman rank correlation between the trained "
        "and randomized model's channel-summed maps (absolute values; signed in "
        "correlation_signed)",
    }
