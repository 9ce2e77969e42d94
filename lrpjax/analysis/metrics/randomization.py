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

References:
  Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim (2018). Sanity checks for saliency maps.
  NeurIPS.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis import baselines
from lrpjax.core import compilation, engine

__all__ = ["layer_order", "model_randomization", "randomize_layers", "spearman"]


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
