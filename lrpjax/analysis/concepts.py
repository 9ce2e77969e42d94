r"""Concept Relevance Propagation (CRP): which channels a prediction uses, where, on which images.

LRP says *where* the evidence for a class lies in the input; CRP (Achtibat et al. 2023) adds
*what*: the relevance of each channel ("concept") of a hidden layer, a heatmap per channel,
and the dataset images on which a channel matters most. Everything here runs on the engine's
one backward pass (`lrpjax.explainer`):

**Convention: a layer's channels are its OUTPUT channels** (as in zennit-crp, the reference
implementation). With :math:`R^{(\ell)}_{n,p,c}` the relevance at the output of layer
:math:`\ell` (image :math:`n`, spatial position :math:`p`, channel :math:`c`; for a dense
layer there is no :math:`p`):

- **channel relevance** :math:`R^{(\ell)}_{n,c} = \sum_p R^{(\ell)}_{n,p,c}`: since LRP
  conserves relevance, the channels of a layer split the output relevance between them. The
  engine reports relevance at every layer's *input*; the relevance at layer
  :math:`\ell`'s output is read at the input of the one layer that takes that output
  (`concept_layers` finds it in the traced computation: for ``conv1 -> relu1`` it is the
  relevance at ``relu1``'s input). A layer whose output goes to several places or to code
  between layers (a residual addition) has no such reading; it can still be conditioned on.
- **conditional relevance** :math:`R(x \mid \theta)`: the explanation restricted to a
  condition :math:`\theta = \{\ell: \text{channels}\}`. At each conditioned layer the relevance
  at its output is multiplied by the mask :math:`m_c = [c \in \theta_\ell]` before the layer's
  rule propagates it (engine ``masks``); several layers at once give the product of their
  masks along every path (CRP's multi-layer conditions). LRP rules are linear in the incoming
  relevance, so the conditional heatmaps of all channels of one layer sum to the plain
  heatmap: :math:`\sum_c R(x \mid \{\ell: c\}) = R(x)` (concepts partition the relevance).
  Many channels are explained at once by `jax.vmap` over one-hot masks; the forward pass is
  shared.
- **relevance maximisation** (CRP's reference sampling): per channel, the dataset images with
  the largest channel relevance, by default relative to the image's total at that layer,
  :math:`R_{n,c} / (\sum_{c'} |R_{n,c'}| + 10^{-10})` (zennit-crp's ``abs_norm``); and, the
  usual comparison, activation maximisation by the channel's largest activation
  :math:`\max_p a_{n,p,c}`. Each reference image comes with the heatmap conditioned on the
  single neuron (channel :math:`c` at its most relevant, or most active, position), which is
  zero outside that neuron's receptive field; the reference is cropped to the bounding box of
  the pixels that receive relevance (`receptive_field_box`).
- **class statistics**: the mean channel relevance over the images of each class,
  :math:`\bar R_{k,c} = \frac{1}{|n: t_n = k|}\sum_{n: t_n = k} R_{n,c}`, its share
  :math:`\bar R_{k,c} / \sum_{c'} |\bar R_{k,c'}|`, and the channels that carry most of it.

`lrpjax.runs.concepts.concepts_dataset` (the ``lrpjax concepts`` command) does all of this
over a whole dataset: batches sharded over the local devices, results streamed to
memory-mapped arrays, resumable, and a concept atlas figure. This module is the library
alone (it imports nothing of `lrpjax.runs`).

References:
  Achtibat, Dreyer, Eisenbraun, Bosse, Wiegand, Samek, Lapuschkin (2023). From attribution maps
  to human-understandable explanations through Concept Relevance Propagation. Nature Machine
  Intelligence 5, 1006-1019. Reference implementation: zennit-crp.
  Bach et al. (2015), PLoS ONE 10(7) (LRP).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax import viz
from lrpjax.core import compilation, engine, jaxprs
from lrpjax.core import composites as composites_lib
from lrpjax.core.layer_types import LayerError

__all__ = [
    "ChannelRelevance",
    "ClassStatistics",
    "ConceptLayer",
    "TopK",
    "atlas_figure",
    "channel_explainer",
    "channel_masks",
    "class_statistics",
    "concept_layers",
    "conditional_explainer",
    "conditional_heatmaps",
    "default_layers",
    "neuron_masks",
    "normalize",
    "receptive_field_box",
    "reference_heatmaps",
    "top_k",
]

#: zennit-crp's stabiliser of the per-image L1 normalisation.
NORM_EPS = 1e-10


# --------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class ConceptLayer:
    """A layer of the model as CRP sees it.

    Attributes:
      path: the layer's path, as in `lrpjax.core.engine.layer_calls` and the engine's ``masks``.
      kind: the layer's class name (``"Conv"``, ``"Linear"``, ...).
      shape: the layer's output for ONE input, e.g. (16, 16, 32) or (512,); the last axis
        is the channel axis.
      reader: the layer whose input relevance is this layer's output relevance (the one
        layer that takes this layer's output), or None where there is none: the output
        goes to several places, to code between layers, or is the model's output.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    reader: str | None

    @property
    def channels(self) -> int:
        """Number of channels (the last axis of the output)."""
        return int(self.shape[-1])

    @property
    def positions(self) -> int:
        """Number of spatial positions per channel (1 for a dense layer)."""
        return int(np.prod(self.shape[:-1], dtype=np.int64))


def concept_layers(
    model: nnx.Module, x: jax.Array | np.ndarray, composite: Any = "epsilon"
) -> dict[str, ConceptLayer]:
    """Every layer of `model` in call order, with its output shape and where its output
    relevance can be read.

    The model is traced once on `x` (abstractly; nothing is computed) with
    `lrpjax.core.engine.traced_units`. A layer's output relevance is the input relevance of layer
    M exactly when the layer's output is used once, as M's input (checked on the traced
    computation, so code between layers, a residual addition or a second use makes
    ``reader`` None). Layers called inside jit-compiled functions of the model are not
    listed.

    Args:
      model: a Flax NNX model lrpjax can explain.
      x: (N, ...) example input (only its shape and dtype matter).
      composite: as for `lrpjax.explain` (which modules count as one layer).

    Returns:
      ``{path: ConceptLayer}`` in call order.
    """
    composite = composites_lib.get(composite)
    x = jnp.zeros(np.shape(x), np.asarray(x).dtype)
    closed, gates, units = engine.traced_units(model, x, composite)
    jaxpr = closed.jaxpr
    producer = {jaxpr.eqns[i].outvars[0]: path for i, path in gates.items()}
    uses: dict[Any, list[str | None]] = {v: [] for v in producer}
    for i, eqn in enumerate(jaxpr.eqns):
        reader = gates.get(i)
        operand = jaxprs.operand(eqn) if reader is not None else None
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal) and v in uses:
                uses[v].append(reader if v is operand else None)
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal) and v in uses:
            uses[v].append(None)
    layers = {}
    for var, path in producer.items():
        readers = uses[var]
        reader = readers[0] if len(readers) == 1 else None
        shape = tuple(int(d) for d in var.aval.shape[1:])
        layers[path] = ConceptLayer(path, type(units[path]).__name__, shape, reader)
    return layers


def _activations(model: nnx.Module, x: jax.Array, composite, paths: Sequence[str]) -> dict:
    """The outputs of the layers `paths` on x: the model's traced forward
    (`engine.traced_units`, the engine's own layer forwards, which XLA can share with an
    explanation's) evaluated up to those layers."""
    closed, gates, _ = engine.traced_units(model, x, composite)
    jaxpr = closed.jaxpr
    at = {path: i for i, path in gates.items()}
    outvars = [jaxpr.eqns[at[p]].outvars[0] for p in paths]
    info = jaxpr.debug_info  # its result paths name the model's outputs, no longer these
    info = info._replace(result_paths=None) if info is not None else None
    pruned = jex_core.ClosedJaxpr(jaxpr.replace(outvars=outvars, debug_info=info), closed.consts)
    probes = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in jaxpr.invars[1:]]
    return dict(zip(paths, jex_core.jaxpr_as_fun(pruned)(x, *probes), strict=True))


def default_layers(layers: Mapping[str, ConceptLayer]) -> list[str]:
    """The layers CRP usually looks at: convolutions and dense layers whose output relevance
    can be read (so not the output layer)."""
    return [p for p, info in layers.items() if info.kind in ("Conv", "Linear") and info.reader]


def check_layers(layers: Mapping[str, ConceptLayer], wanted: Sequence[str]) -> list[str]:
    """`wanted` checked against the model's layers.

    Raises:
      LayerError: an unknown layer, or one whose output relevance cannot be read; the
        message lists the layers that can.
    """
    usable = [p for p, info in layers.items() if info.reader]
    for path in wanted:
        if path not in layers:
            raise LayerError(f"unknown layer {path!r}; the model's layers are {', '.join(usable)}")
        if layers[path].reader is None:
            raise LayerError(
                f"layer {path!r}: its output is not the input of exactly one layer (it feeds "
                "several places, code between layers, or is the model's output), so its "
                f"channel relevance cannot be read; layers that can: {', '.join(usable)}"
            )
    return list(dict.fromkeys(wanted))


# --------------------------------------------------------------------------- channel relevance


class ChannelRelevance(NamedTuple):
    """What a `channel_explainer` function returns, for a batch of N images.

    Attributes:
      relevance: ``{layer: (N, C)}`` channel relevance :math:`\\sum_p R_{n,p,c}` at the
        layer's output.
      activation: ``{layer: (N, C)}`` the channel's largest activation
        :math:`\\max_p a_{n,p,c}`, or None unless asked for.
      peak: ``{layer: (N, C)}`` int32, the flat index (over the layer's spatial positions,
        row-major; 0 for dense layers) of each channel's most relevant position, or None
        unless asked for.
      activation_peak: ``{layer: (N, C)}`` int32, where the largest activation is; or None.
      logits: (N, classes).
      target: (N,) the explained classes.
    """

    relevance: dict[str, jax.Array]
    activation: dict[str, jax.Array] | None
    peak: dict[str, jax.Array] | None
    activation_peak: dict[str, jax.Array] | None
    logits: jax.Array
    target: jax.Array


def _per_channel(a: jax.Array) -> jax.Array:
    """(N, *S, C) -> (N, P, C) with P = prod(S) (1 for (N, C))."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _first_max(a: jax.Array, top: jax.Array) -> jax.Array:
    """argmax over axis 1 of (N, P, C) given its max (N, C): the first position where the
    max is reached, from two plain reductions (a variadic argmax is slow on XLA's CPU)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, a.shape, 1)
    return jnp.min(jnp.where(a == top[:, None], iota, a.shape[1]), axis=1).astype(jnp.int32)


def channel_explainer(
    model: nnx.Module,
    layers: Mapping[str, ConceptLayer],
    *,
    composite: Any = "epsilon",
    init: str | Callable = "logit",
    activations: bool = False,
    peaks: bool = False,
) -> tuple[Callable, nnx.State]:
    """Channel relevance of several layers from one LRP backward pass, as a pure function.

    Args:
      model: a Flax NNX model.
      layers: the layers to report, from `concept_layers` (each with a ``reader``).
      composite, init: as for `lrpjax.explain`.
      activations: also evaluate the model's traced forward pass up to the layers (the
        engine's layer forwards, which XLA can share with the explanation's) and report each
        channel's largest activation (activation maximisation).
      peaks: also report where each channel's relevance (and activation) is largest.

    Returns:
      ``(fn, state)`` with ``fn(state, x, target) -> ChannelRelevance``; x (N, ...), target
      (N,) int (-1: the predicted class). Compile with `lrpjax.jit`, vmap or shard it.
    """
    composite = composites_lib.get(composite)
    check_layers(layers, list(layers))
    fn, state = engine.explainer(model, composite=composite, init=init, layerwise=True)
    graphdef, _ = nnx.split(model)
    wanted = {p: info.reader for p, info in layers.items()}

    def channels(state, x, target) -> ChannelRelevance:
        out = fn(state, x, target)
        relevance, peak = {}, {} if peaks else None
        for path, reader in wanted.items():
            r = _per_channel(out.layers[reader].astype(jnp.float32))
            relevance[path] = r.sum(axis=1)
            if peaks:
                peak[path] = _first_max(r, r.max(axis=1))
        act = act_peak = None
        if activations:
            found = _activations(nnx.merge(graphdef, state), x, composite, list(wanted))
            act, act_peak = {}, {} if peaks else None
            for path in wanted:
                a = _per_channel(found[path].astype(jnp.float32))
                act[path] = a.max(axis=1)
                if peaks:
                    act_peak[path] = _first_max(a, act[path])
        return ChannelRelevance(relevance, act, peak, act_peak, out.logits, out.target)

    return channels, state


# --------------------------------------------------------------------------- conditions


def channel_masks(num_channels: int, channels: Sequence[int] | np.ndarray, ndim: int) -> jax.Array:
    """One-hot channel masks, one per channel, broadcastable to a layer's output.

    Args:
      num_channels: C, the layer's channel count.
      channels: (K,) channel indices.
      ndim: the number of axes of the layer's output with the batch axis (4 for NHWC, 2 for
        dense).

    Returns:
      (K, 1, ..., 1, C) float32 with ``ndim - 1`` ones: mask k keeps channel ``channels[k]``.

    Raises:
      ValueError: a channel outside 0..C-1.
    """
    channels = np.asarray(channels, np.int64).reshape(-1)
    if channels.size and (channels.min() < 0 or channels.max() >= num_channels):
        raise ValueError(f"channels outside 0..{num_channels - 1}: {channels.tolist()}")
    onehot = np.eye(num_channels, dtype=np.float32)[channels]
    return jnp.asarray(onehot.reshape(len(channels), *([1] * (ndim - 1)), num_channels))


def _set_mask(num_channels: int, channels: Sequence[int], ndim: int) -> jax.Array:
    """(1, ..., 1, C) 0/1 mask keeping a set of channels."""
    masks = channel_masks(num_channels, channels, ndim)
    return jnp.minimum(masks.sum(axis=0), 1.0)


def neuron_masks(
    shape: Sequence[int],
    channels: Sequence[int] | np.ndarray,
    positions: Sequence[int] | np.ndarray,
) -> jax.Array:
    """Masks that keep one neuron per image: channel ``channels[n]`` at the flat spatial
    position ``positions[n]`` (zennit-crp's ``mask_rf``).

    Args:
      shape: the layer's output for one input, (*S, C).
      channels, positions: (M,) ints.

    Returns:
      (M, *S, C) float32.
    """
    channels = np.asarray(channels, np.int64).reshape(-1)
    positions = np.asarray(positions, np.int64).reshape(-1)
    spatial = int(np.prod(shape[:-1], dtype=np.int64))
    masks = np.zeros((len(channels), spatial, shape[-1]), np.float32)
    masks[np.arange(len(channels)), positions, channels] = 1.0
    return jnp.asarray(masks.reshape(len(channels), *shape))


def conditional_explainer(
    model: nnx.Module,
    layer: str,
    *,
    composite: Any = "epsilon",
    init: str | Callable = "logit",
) -> tuple[Callable, nnx.State]:
    """Conditional heatmaps for many conditions on one layer at once, as a pure function.

    Returns:
      ``(fn, state)`` with ``fn(state, x, target, masks, conditions=None) -> (N, K, ...)``:
      x (N, ...), target (N,) int (-1: predicted), masks (K, ...) each broadcastable to
      `layer`'s output (`channel_masks`), conditions an optional ``{other layer: mask}``
      applied in every one of the K explanations (multi-layer conditions). The result k is
      :math:`R(x \\mid \\text{layer}: m_k, \\text{conditions})`, with the shape of x per
      image. One forward pass; the K backward passes are one `jax.vmap`.
    """
    fn, state = engine.explainer(model, composite=composite, init=init)

    def conditional(state, x, target, masks, conditions=None):
        fixed = dict(conditions or {})
        if layer in fixed:
            raise ValueError(f"layer {layer!r} is both the vmapped layer and a fixed condition")

        def one(mask):
            return fn(state, x, target, {**fixed, layer: mask}).relevance

        return jax.vmap(one, out_axes=1)(masks)

    return conditional, state


def conditional_heatmaps(
    model: nnx.Module,
    x: jax.Array | np.ndarray,
    layer: str,
    channels: Sequence[int] | np.ndarray,
    *,
    target: int | np.ndarray | None = None,
    conditions: Mapping[str, Sequence[int]] | None = None,
    composite: Any = "epsilon",
    init: str | Callable = "logit",
) -> jax.Array:
    """Input relevance restricted to each of `channels` of `layer` (CRP), eagerly.

    Args:
      model: a Flax NNX model.
      x: (N, ...) inputs.
      layer: the conditioned layer's path (`concept_layers`).
      channels: (K,) channel indices of `layer`'s output.
      target: None (predicted class), an int, or (N,) ints.
      conditions: further layers and the channels kept there, ``{"conv2": [3, 7]}``, applied
        together with each channel of `layer` (the product of the masks along every path).
      composite, init: as for `lrpjax.explain`.

    Returns:
      (N, K, ...) relevance; summed over all channels of `layer` it is `lrpjax.explain`'s.

    Raises:
      LayerError: an unknown layer.
      ValueError: a channel outside the layer's channels.
    """
    x = jnp.asarray(x)
    layers = concept_layers(model, x[:1], composite)
    for path in [layer, *(conditions or {})]:
        if path not in layers:
            raise LayerError(f"unknown layer {path!r}; the model's layers are {', '.join(layers)}")
    info = layers[layer]
    masks = channel_masks(info.channels, channels, len(info.shape) + 1)
    fixed = {
        p: _set_mask(layers[p].channels, c, len(layers[p].shape) + 1)
        for p, c in (conditions or {}).items()
    }
    target = jnp.broadcast_to(jnp.asarray(-1 if target is None else target), (x.shape[0],))
    fn, state = conditional_explainer(model, layer, composite=composite, init=init)
    return compilation.jit(fn)(state, x, target.astype(jnp.int32), masks, fixed)


def reference_heatmaps(
    model: nnx.Module,
    x: jax.Array | np.ndarray,
    target: np.ndarray,
    layer: ConceptLayer,
    channels: np.ndarray,
    positions: np.ndarray,
    *,
    composite: Any = "epsilon",
    init: str | Callable = "logit",
    batch_size: int = 64,
) -> np.ndarray:
    """Heatmaps conditioned on one neuron each: image n explained for ``target[n]`` with only
    channel ``channels[n]`` at position ``positions[n]`` of `layer` kept (CRP's reference
    heatmaps with receptive-field masking). Zero outside that neuron's receptive field.

    Args:
      x: (M, ...) images; target, channels, positions: (M,) ints.
      layer: from `concept_layers`.
      batch_size: images per compiled call.

    Returns:
      (M, ...) float32 relevance, the shape of x.
    """
    x = np.asarray(x)
    fn, state = engine.explainer(model, composite=composite, init=init)
    step = compilation.jit(lambda s, x, t, m: fn(s, x, t, {layer.path: m}).relevance)
    out = np.zeros(x.shape, np.float32)
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        pad = batch_size - (stop - start) if len(x) > batch_size else 0
        xs = np.concatenate([x[start:stop], np.zeros((pad, *x.shape[1:]), x.dtype)])
        t = np.concatenate([np.asarray(target[start:stop], np.int32), np.zeros(pad, np.int32)])
        c = np.concatenate([np.asarray(channels[start:stop]), np.zeros(pad, np.int64)])
        p = np.concatenate([np.asarray(positions[start:stop]), np.zeros(pad, np.int64)])
        masks = neuron_masks(layer.shape, c, p)
        out[start:stop] = np.asarray(step(state, xs, t, masks))[: stop - start]
    return out


def receptive_field_box(relevance: np.ndarray, min_size: int = 8) -> np.ndarray:
    """Bounding boxes of the pixels that receive relevance, for cropping reference images.

    A heatmap conditioned on one neuron is exactly zero outside that neuron's receptive
    field, so the box of its non-zero pixels is the receptive field (less any border that
    received none). Boxes smaller than `min_size` are widened around their centre (within
    the image); an all-zero map gives the whole image.

    Args:
      relevance: (M, H, W, C) or (M, H, W).
      min_size: the smallest box side in pixels.

    Returns:
      (M, 4) int: top, bottom, left, right (bottom and right exclusive).
    """
    r = np.asarray(relevance)
    h = np.abs(r).sum(-1) if r.ndim == 4 else np.abs(r)
    m, height, width = h.shape
    boxes = np.zeros((m, 4), np.int64)
    for i in range(m):
        rows = np.flatnonzero(h[i].max(axis=1) > 0)
        cols = np.flatnonzero(h[i].max(axis=0) > 0)
        if rows.size == 0:
            boxes[i] = (0, height, 0, width)
            continue
        box = []
        for lo, hi, size in ((rows[0], rows[-1] + 1, height), (cols[0], cols[-1] + 1, width)):
            want = min(max(min_size, hi - lo), size)
            if hi - lo < want:
                lo = int(np.clip((lo + hi - want) // 2, 0, size - want))
                hi = lo + want
            box += [lo, hi]
        boxes[i] = box
    return boxes


# --------------------------------------------------------------------------- maximisation


def normalize(scores: np.ndarray) -> np.ndarray:
    """Per-image L1 normalisation over channels (zennit-crp's ``abs_norm``):
    :math:`R_{n,c} / (\\sum_{c'} |R_{n,c'}| + 10^{-10})`. (N, C) -> (N, C) float32."""
    s = np.asarray(scores, np.float32)
    return s / (np.abs(s).sum(axis=-1, keepdims=True) + NORM_EPS)


class TopK(NamedTuple):
    """Per channel, the k dataset images with the largest scores, best first.

    Attributes:
      index: (C, k) int64 dataset indices (ties: the lower index first); -1 where fewer
        than k images qualify.
      score: (C, k) float32 their scores (-inf where index is -1).
    """

    index: np.ndarray
    score: np.ndarray


def _merge(best: TopK, index: np.ndarray, score: np.ndarray, k: int) -> TopK:
    """Merge candidates (C, m) whose indices all exceed `best`'s into `best` (C, <=k)."""
    idx = np.concatenate([best.index, index], axis=1)
    sc = np.concatenate([best.score, score], axis=1)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]  # stable: lower index first
    return TopK(np.take_along_axis(idx, order, 1), np.take_along_axis(sc, order, 1))


def top_k(
    scores: np.ndarray,
    k: int,
    *,
    where: np.ndarray | None = None,
    block: int = 4096,
) -> TopK:
    """The top-k images per channel, streamed over blocks of rows (memory-mapped arrays work).

    Args:
      scores: (N, C) per image and channel (channel relevance, `normalize`d or not, or
        activations).
      k: how many per channel.
      where: optional (N,) bool: only these images compete (e.g. one class).
      block: rows read at a time.

    Returns:
      `TopK` with (C, k) arrays.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n, c = scores.shape
    best = TopK(np.zeros((c, 0), np.int64), np.zeros((c, 0), np.float32))
    for start in range(0, n, block):
        s = np.array(scores[start : start + block], np.float32)
        if where is not None:
            s[~np.asarray(where[start : start + block], bool)] = -np.inf
        order = np.argsort(-s, axis=0, kind="stable")[:k]  # (k', C), lower index first
        cand = TopK((order + start).T.astype(np.int64), np.take_along_axis(s, order, 0).T)
        best = _merge(best, cand.index, cand.score, k)
    index, score = best
    if index.shape[1] < k:
        pad = k - index.shape[1]
        index = np.concatenate([index, np.full((c, pad), -1, np.int64)], axis=1)
        score = np.concatenate([score, np.full((c, pad), -np.inf, np.float32)], axis=1)
    index = np.where(np.isneginf(score), -1, index)
    return TopK(index, score.astype(np.float32))


class ClassStatistics(NamedTuple):
    """Channel relevance per class (of the explained target).

    Attributes:
      mean: (K, C) mean channel relevance over the images of each class (0 where none).
      count: (K,) images per class.
      share: (K, C) ``mean / sum_c |mean|``: each channel's part of the class's relevance at
        this layer.
      order: (K, C) channels by decreasing mean relevance.
      channels_for: ``{0.5: (K,), 0.9: (K,)}``: how many of the best channels it takes to
        reach that fraction of the class's positive mean relevance (between 1 and C; 0 for
        a class without positive mean relevance: no images, or only negative relevance).
    """

    mean: np.ndarray
    count: np.ndarray
    share: np.ndarray
    order: np.ndarray
    channels_for: dict[float, np.ndarray]


def class_statistics(
    relevance: np.ndarray, classes: np.ndarray, num_classes: int, *, block: int = 4096
) -> ClassStatistics:
    """Mean channel relevance per class and the channels that carry most of it.

    Args:
      relevance: (N, C) channel relevance (memory-mapped is fine; read in blocks).
      classes: (N,) int class per image (the explained target).
      num_classes: K.

    Returns:
      `ClassStatistics`.
    """
    n, c = relevance.shape
    sums = np.zeros((num_classes, c), np.float64)
    classes = np.asarray(classes, np.int64)
    for start in range(0, n, block):
        np.add.at(sums, classes[start : start + block], relevance[start : start + block])
    count = np.bincount(classes, minlength=num_classes)[:num_classes]
    mean = sums / np.maximum(count, 1)[:, None]
    share = mean / (np.abs(mean).sum(axis=1, keepdims=True) + NORM_EPS)
    order = np.argsort(-mean, axis=1, kind="stable")
    positive = np.clip(np.take_along_axis(mean, order, 1), 0, None)
    total = positive.sum(axis=1)
    cumulative = np.cumsum(positive, axis=1) / np.where(total > 0, total, 1.0)[:, None]
    channels_for = {
        f: np.where(total > 0, np.minimum((cumulative < f - 1e-12).sum(axis=1) + 1, c), 0)
        for f in (0.5, 0.9)
    }
    return ClassStatistics(
        mean.astype(np.float32), count, share.astype(np.float32), order, channels_for
    )


# --------------------------------------------------------------------------- atlas


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    u8 = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((size, size), Image.NEAREST), np.float32) / 255


def atlas_figure(
    entries: Sequence[dict],
    *,
    title: str = "",
    thumb: int = 40,
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """The concept atlas: one row per class with the class's most relevant channels of each
    layer, each channel with reference images (cropped to the receptive field) above their
    conditional heatmaps (red: evidence for the class, blue: against).

    Args:
      entries: rows, each ``{"label": str, "channels": [{"label": str, "images": r crops
        (h, w, 3), "heatmaps": r crops (h, w) in [-1, 1]}, ...]}``; crops of any size are
        resized to `thumb`.
      title: a line of text on top.
      thumb: thumbnail side in pixels.
      path: where to write the PNG (atomically); None: only return it.

    Returns:
      (H, W, 3) uint8 picture.
    """
    from PIL import Image, ImageDraw

    gap, label_w, head = 4, 80, 14
    ncols = max((len(e["channels"]) for e in entries), default=1)
    nrefs = max((len(c["images"]) for e in entries for c in e["channels"]), default=1)
    block_w = nrefs * (thumb + 1) + gap * 3
    width = label_w + ncols * block_w
    row_h = head + 2 * thumb + 1 + gap
    top = 18 if title else 2
    canvas = np.ones((top + len(entries) * row_h, width, 3), np.float32)
    texts = []
    for r, entry in enumerate(entries):
        y0 = top + r * row_h
        texts.append(((4, y0 + head + thumb - 6), entry["label"]))
        for j, ch in enumerate(entry["channels"]):
            x0 = label_w + j * block_w
            texts.append(((x0, y0 + 1), ch["label"]))
            for i, (img, hm) in enumerate(zip(ch["images"], ch["heatmaps"], strict=True)):
                xi = x0 + i * (thumb + 1)
                canvas[y0 + head : y0 + head + thumb, xi : xi + thumb] = _resize(img, thumb)
                hy = y0 + head + thumb + 1
                colour = viz.colorize(np.asarray(hm)[None])[0]
                canvas[hy : hy + thumb, xi : xi + thumb] = _resize(colour, thumb)
    picture = Image.fromarray((canvas * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    for xy, text in texts:
        draw.text(xy, text, fill=(0, 0, 0))
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        picture.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    return np.asarray(picture)
