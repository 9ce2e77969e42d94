r"""Randomisation: do the maps change when the model does?

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

Random logit (Sixt et al. 2020; `random_logit`). The map of the explained class t is
compared with the map of a class drawn uniformly from the others (with a ``jax.random``
key, per image) by the structural similarity (`ssim`) of the two channel-summed maps,
each normalised by its largest absolute value (Quantus's default ``normalise_by_max``,
which divides each batch by its largest absolute value instead: maps whose largest
entries are 1 and 4 are both divided by 4 in one batch, so that the SSIM of the first
depends on the second; one image per batch gives the scores here);
an explanation that is the same whatever class it explains does not explain the class
(high similarity: lower is better). SSIM (Wang et al. 2004) is computed over 2-D windows,
as ``skimage.metrics.structural_similarity``: by default with Wang et al.'s Gaussian
window (sigma 1.5, 11 x 11, population covariances, as skimage's ``gaussian_weights=True,
use_sample_covariance=False``), or ``window="uniform"`` for skimage's default (7 x 7
uniform window, sample covariances); with :math:`K_1 = 0.01`, :math:`K_2 = 0.03`, the data
range L that Quantus passes (the largest minus the smallest entry of the two maps
together), and the mean over the windows that fit inside the map (skimage's cropped
mean). Quantus scores the flattened maps (a 1-D SSIM along the rows); this scores them as
images. ``similarity="spearman"`` scores the Spearman rank correlation instead.

References:
  Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim (2018). Sanity checks for saliency maps.
  NeurIPS. Sixt, Granz, Landgraf (2020). When explanations lie: why many modified BP
  attributions fail. ICML. Wang, Bovik, Sheikh, Simoncelli (2004). Image quality
  assessment: from error visibility to structural similarity. IEEE TIP 13(4), 600-612.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis import baselines
from lrpjax.analysis.metrics.registry import register
from lrpjax.analysis.metrics.scoring import logits, resolve_target
from lrpjax.core import compilation, engine

__all__ = [
    "SSIM_WINDOWS",
    "layer_order",
    "model_randomization",
    "random_logit",
    "randomize_layers",
    "spearman",
    "ssim",
]

#: SSIM windows: name -> (side, Gaussian sigma or None for uniform, sample covariance).
SSIM_WINDOWS = {"gaussian": (11, 1.5, False), "uniform": (7, None, True)}


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


# --- random logit ----------------------------------------------------------------------


def _ssim_window(window: str) -> tuple[np.ndarray, float]:
    """The (side, side) window weights (summing to 1) and the covariance factor."""
    if window not in SSIM_WINDOWS:
        raise ValueError(f"unknown SSIM window {window!r}; choose from {', '.join(SSIM_WINDOWS)}")
    side, sigma, sample = SSIM_WINDOWS[window]
    r = np.arange(side) - side // 2
    g = np.ones(side) if sigma is None else np.exp(-0.5 * (r / sigma) ** 2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    return kernel, (side * side / (side * side - 1) if sample else 1.0)


@functools.partial(jax.jit, static_argnames="cov_norm")
def _ssim(a: jax.Array, b: jax.Array, kernel: jax.Array, cov_norm: float) -> jax.Array:
    both = jnp.concatenate([a, b], axis=1)
    L = both.max(axis=(1, 2)) - both.min(axis=(1, 2))
    c1 = ((0.01 * L) ** 2)[:, None, None]
    c2 = ((0.03 * L) ** 2)[:, None, None]

    def filt(z):  # (N, H, W) -> (N, H - side + 1, W - side + 1), the valid windows
        return jax.lax.conv_general_dilated(
            z[:, None], kernel[None, None], (1, 1), "VALID", precision=jax.lax.Precision.HIGHEST
        )[:, 0]

    ua, ub = filt(a), filt(b)
    va = cov_norm * (filt(a * a) - ua * ua)
    vb = cov_norm * (filt(b * b) - ub * ub)
    vab = cov_norm * (filt(a * b) - ua * ub)
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return jnp.where(L > 0, s.mean(axis=(1, 2)), 1.0)


def ssim(
    a: np.ndarray | jax.Array, b: np.ndarray | jax.Array, *, window: str = "gaussian"
) -> np.ndarray:
    """Structural similarity per pair of (N, H, W) maps; see the module docstring.

    Args:
      a, b: (N, H, W) maps.
      window: a key of `SSIM_WINDOWS`: ``"gaussian"`` (Wang et al. 2004) or ``"uniform"``
        (skimage's default).

    Returns:
      (N,) SSIM in [-1, 1] (1: identical; also for two equal constant maps), float64.

    Raises:
      ValueError: an unknown window, maps of different or non-(N, H, W) shapes, or maps
        smaller than the window.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim takes two (N, H, W) maps of one shape, not {a.shape}, {b.shape}")
    kernel, cov_norm = _ssim_window(window)
    if min(a.shape[1:]) < len(kernel):
        raise ValueError(
            f"maps of {a.shape[1]} x {a.shape[2]} are smaller than the {window} SSIM window "
            f"({len(kernel)} x {len(kernel)}); use a smaller window or the spearman similarity"
        )
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    out = _ssim(a.astype(dtype), b.astype(dtype), jnp.asarray(kernel, dtype), cov_norm)
    return np.asarray(out, np.float64)


def _normalise_by_max(a: np.ndarray) -> np.ndarray:
    peak = np.abs(a).reshape(len(a), -1).max(-1).reshape((-1,) + (1,) * (a.ndim - 1))
    return np.where(peak > 0, a / np.where(peak > 0, peak, 1), a)


@register(
    "random_logit",
    family="randomisation",
    higher_is_better=False,
    reference="Sixt et al. 2020",
    needs_explain=True,
)
def random_logit(
    model,
    x,
    maps,
    target,
    *,
    explain: Callable | None = None,
    key: jax.Array | None = None,
    similarity: str = "ssim",
    window: str = "gaussian",
    normalise: bool = True,
) -> np.ndarray:
    """Similarity of the map to the map of a random other class; see the module docstring.

    The other class of image i is ``(t_i + u_i) % C`` with :math:`u_i` uniform in
    1..C-1 (``jax.random.randint`` with `key`), C the model's number of logits.

    Args:
      model: a Flax NNX model returning logits (N, C), C >= 2.
      x: (N, ...) inputs.
      maps: (N, H, W, C) or (N, H, W) relevance for `target`.
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: ``explain(x, target) -> maps``, the explainer of `maps` (required).
      key: ``jax.random`` key of the draw (default key 0).
      similarity: ``"ssim"`` (`ssim`, Quantus's default) or ``"spearman"`` (`spearman`).
      window: the SSIM window (`SSIM_WINDOWS`).
      normalise: divide each map by its largest absolute value first (Quantus's default).

    Returns:
      (N,) similarities (float64): lower is more class-sensitive.

    Raises:
      ValueError: no explain, fewer than 2 classes, or an unknown similarity.
    """
    if explain is None:
        raise ValueError("random_logit needs explain(x, target) -> maps")
    if similarity not in ("ssim", "spearman"):
        raise ValueError(f"unknown similarity {similarity!r}; choose from ssim, spearman")
    x = jnp.asarray(x)
    scores = logits(model, x)
    n, classes = scores.shape
    if classes < 2:
        raise ValueError("random_logit needs a model with at least 2 classes")
    t = resolve_target(target, scores)
    step = jax.random.randint(jax.random.key(0) if key is None else key, (n,), 1, classes)
    other = ((t + np.asarray(step)) % classes).astype(np.int32)
    a = _pixel_maps(maps)
    b = _pixel_maps(explain(x, jnp.asarray(other)))
    if normalise:
        a, b = _normalise_by_max(a), _normalise_by_max(b)
    if similarity == "spearman":
        return spearman(a, b)
    return ssim(a, b, window=window)
