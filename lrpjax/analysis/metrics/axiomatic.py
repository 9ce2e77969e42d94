r"""Axiomatic: does the map have the properties an attribution should have by definition?

With :math:`R` a map of input x for the class t, :math:`f_t` the model's logit of t and
:math:`\bar x` a baseline input, per image:

- `completeness` (Sundararajan et al. 2017; summation-to-delta, Shrikumar et al. 2017;
  conservation, Montavon et al. 2018): the relevance should add up to the change of the
  logit between the baseline and the input; scored as the gap
  :math:`\big|\sum_i R_i - (f_t(x) - f_t(\bar x))\big|` (0: complete; lower is better),
  with :math:`\bar x = 0` by default. Quantus returns the boolean
  ``sum(R) == f_t(x) - f_t(baseline)``, an exact float equality, of a map normalised by
  its maximum (its default ``normalise=True``, which breaks completeness of any map whose
  maximum is not 1) and a baseline of each image's minimum (``"black"``). Here the map is
  not normalised and the score is the gap itself.
- `non_sensitivity` (Nguyen and Martínez 2020): a feature the model does not depend on
  should get zero relevance, and one of zero relevance should not matter. As in Quantus
  (``NonSensitivity``, ``features_in_step=1``), each feature is replaced by the baseline
  one at a time; it is *insensitive* if the logit moves by less than ``eps``,
  :math:`|f_t(x) - f_t(x^{(p)})| < \epsilon`, and a *non-feature* if its normalised
  relevance :math:`|a_p| / \max_q |a_q| < \epsilon` (Quantus's ``abs=True``,
  ``normalise=True``, whose maximum is the batch's: maps whose largest entries are 1 and
  4 are both divided by 4 in one batch); the score counts the features where the two
  disagree (0: none; lower is better). Features are pixels here: a pixel's relevance is
  its channel sum :math:`a_p = \sum_c R_{pc}` and all its channels are replaced together
  (Quantus broadcasts a channel-summed map to every channel and replaces one element at a
  time, in index order: of an RGB image one channel of one pixel, 3 H W model passes).
  All pixels are perturbed by default (H x W model passes per image); ``samples=S``
  perturbs S pixels per image, drawn without replacement with ``key``, and counts the
  violations among those.
- `input_invariance` (Kindermans et al. 2019): a model :math:`f'` that sees
  :math:`x + m` through a first layer whose bias absorbs the shift,
  :math:`b' = b - W m` (so that :math:`f'(x + m) = f(x)`, every activation unchanged),
  should get the same map; scored as the largest change of the map relative to its
  largest entry, :math:`\max_i |R_i(f, x) - R_i(f', x + m)| / \max_i |R_i(f, x)|`
  (0: invariant; lower is better); Quantus returns the boolean
  ``all(isclose(R, R', atol=1e-4))``. The shifted model is built by `shift_first_layer`
  (the first `nnx.Linear` or `nnx.Conv` the model calls, which must have a bias), as
  Quantus's ``add_mean_shift_to_first_layer``; the metric then checks that
  :math:`f'(x + m) = f(x)`, which fails where the first layer zero-pads its input (the
  padded border sees no shift) or the model transforms its input first: pass a
  ``shifted_model`` then, or ``strict=False`` to score anyway (as Quantus does). Its
  ``explain`` must explain a given model: ``explain(x, target, model=shifted)``
  (`explain_fn` makes one from an explainer spec). Quantus's shift differs where the
  first layer zero-pads: it sets each output channel's bias to :math:`2b - \min z`, with
  :math:`z` the channel's response to the constant input m (``torch.unique(z)[0]``),
  which is :math:`b - W m` only where the smallest response is an interior one; else it is
  a border response, and no position is compensated. On the shipped miniVGG (a 3 x 3
  SAME convolution first) every one of conv1's 32 channels differs, e.g. channel 21 with
  m = -1: :math:`b - W m = -7.905` here, -3.589 in Quantus.

The model's outputs are scored as logits (not probabilities), in eval mode, on a copy.

References:
  Sundararajan, Taly, Yan (2017). Axiomatic attribution for deep networks. ICML.
  Shrikumar, Greenside, Kundaje (2017). Learning important features through propagating
  activation differences. ICML. Montavon, Samek, Müller (2018). Methods for interpreting
  and understanding deep neural networks. Digital Signal Processing 73, 1-15. Nguyen,
  Martínez (2020). On quantitative aspects of model interpretability. arXiv:2007.07584.
  Kindermans, Hooker, Adebayo, Alber, Schütt, Dähne, Erhan, Kim (2019). The (un)reliability
  of saliency methods. In Explainable AI: interpreting, explaining and visualizing deep
  learning, LNCS 11700, 267-280. Hedström et al. (2023). Quantus. JMLR 24(34).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis.metrics.randomization import layer_order
from lrpjax.analysis.metrics.registry import register
from lrpjax.analysis.metrics.scoring import logits, resolve_target

__all__ = [
    "BASELINES",
    "baseline_input",
    "completeness",
    "input_invariance",
    "non_sensitivity",
    "shift_first_layer",
]

#: Named baselines (Quantus's ``perturb_baseline``): per image, the minimum, maximum or mean
#: over all its entries; a number is a constant baseline.
BASELINES = ("black", "white", "mean")

#: Largest difference of the shifted model's logits from the model's, relative to
#: ``1 + max |logit|``, that `input_invariance` accepts as the same function.
SHIFT_RTOL = 1e-4


def baseline_input(x: np.ndarray | jax.Array, baseline: float | str | np.ndarray) -> jax.Array:
    """The baseline of each image, broadcast to x's (N, ...) shape.

    Args:
      x: (N, ...) inputs.
      baseline: a name of `BASELINES` (per image: its minimum ``"black"``, maximum
        ``"white"`` or mean ``"mean"``), a number, or an array broadcastable to x.

    Raises:
      ValueError: an unknown name.
    """
    x = jnp.asarray(x)
    axes = tuple(range(1, x.ndim))
    if isinstance(baseline, str):
        reduce = {"black": jnp.min, "white": jnp.max, "mean": jnp.mean}.get(baseline)
        if reduce is None:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        return jnp.broadcast_to(reduce(x, axis=axes, keepdims=True), x.shape)
    return jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)


@register(
    "completeness",
    family="axiomatic",
    higher_is_better=False,
    reference="Sundararajan et al. 2017",
)
def completeness(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    baseline: float | str | np.ndarray = 0.0,
    batch_size: int = 256,
) -> np.ndarray:
    r"""The gap :math:`|\sum_i R_i - (f_t(x) - f_t(\bar x))|`; see the module docstring.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, ...) inputs.
      maps: (N, ...) their relevance (any shape with N first: all entries are summed).
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain, key: unused (the protocol of `lrpjax.analysis.metrics`).
      baseline: :math:`\bar x` as for `baseline_input` (default 0: a black image).
      batch_size: images per model call.

    Returns:
      (N,) gaps (in logit units) >= 0: lower is more complete.
    """
    x = jnp.asarray(x)
    scores = logits(model, x, batch_size)
    t = resolve_target(target, scores)
    rows = np.arange(len(t))
    delta = scores[rows, t] - logits(model, baseline_input(x, baseline), batch_size)[rows, t]
    total = np.asarray(maps, np.float64).reshape(len(t), -1).sum(-1)
    return np.abs(total - delta)


@lru_cache(maxsize=16)
def _pixel_perturbed(graphdef: nnx.GraphDef) -> Callable:
    """jit(state, x, fill, image, pixel, target) -> logit of target for x[image] with one
    pixel (row-major index over H x W, all channels; -1: none) replaced by fill[image]."""

    def fn(state, x, fill, image, pixel, target):
        h, w = x.shape[1:3]
        hit = (jnp.arange(h * w)[None] == pixel[:, None]).reshape(-1, h, w)
        hit = hit.reshape(hit.shape + (1,) * (x.ndim - 3))
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        out = model(jnp.where(hit, fill[image], x[image]))
        return jnp.take_along_axis(out, target[:, None], axis=1)[:, 0]

    return jax.jit(fn)


@register(
    "non_sensitivity",
    family="axiomatic",
    higher_is_better=False,
    reference="Nguyen and Martínez 2020",
)
def non_sensitivity(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    eps: float = 1e-5,
    samples: int | None = None,
    baseline: float | str | np.ndarray = "black",
    batch_size: int = 256,
) -> np.ndarray:
    """Pixels whose relevance and influence on the logit disagree; see the module docstring.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, H, W, C) or (N, H, W) inputs.
      maps: (N, H, W, C) or (N, H, W) relevance.
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: unused.
      key: ``jax.random`` key that draws the pixels when ``samples`` is set (default key 0).
      eps: threshold of both the logit change and the normalised relevance (Quantus's).
      samples: pixels perturbed per image; None (or H x W or more): all of them.
      baseline: the replacement, as for `baseline_input` (default ``"black"``: the image's
        minimum, Quantus's default).
      batch_size: perturbed images per model call.

    Returns:
      (N,) counts of violations (float64) among the perturbed pixels: lower is better.

    Raises:
      ValueError: maps whose (N, H, W) differs from x's, or samples < 1.
    """
    x = jnp.asarray(x)
    n, h, w = x.shape[:3]
    r = jnp.asarray(maps)
    r = r.sum(-1) if r.ndim == 4 else r
    if r.shape != (n, h, w):
        raise ValueError(f"non_sensitivity: maps of shape {np.shape(maps)} for inputs {x.shape}")
    a = np.abs(np.asarray(r, np.float64).reshape(n, -1))
    peak = a.max(-1, keepdims=True)
    non_feature = np.where(peak > 0, a / np.where(peak > 0, peak, 1), 0) < eps
    if samples is not None and samples < 1:
        raise ValueError(f"non_sensitivity: samples must be >= 1 (or None: all), not {samples}")
    t = resolve_target(target, logits(model, x, batch_size))
    pixels = h * w
    if samples is None or samples >= pixels:
        chosen = np.broadcast_to(np.arange(pixels), (n, pixels))
    else:
        keys = jax.random.split(jax.random.key(0) if key is None else key, n)
        chosen = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, pixels)[:samples])(keys))
    # the unperturbed logits (pixel -1: none replaced) first, through the same program
    image = np.concatenate([np.arange(n), np.repeat(np.arange(n), chosen.shape[1])])
    pixel = np.concatenate([np.full(n, -1), chosen.reshape(-1)])
    chunk = min(batch_size, len(image))  # one compiled shape: the last chunk is padded
    pad = -len(image) % chunk
    image_p, pixel_p = np.pad(image, (0, pad)), np.pad(pixel, (0, pad))
    target_p = jnp.asarray(t[image_p])
    graphdef, state = nnx.split(model)
    fn = _pixel_perturbed(graphdef)
    fill = baseline_input(x, baseline)
    out = [
        np.asarray(
            fn(state, x, fill, image_p[i : i + chunk], pixel_p[i : i + chunk],
               target_p[i : i + chunk])
        )
        for i in range(0, len(image_p), chunk)
    ]  # fmt: skip
    out = np.concatenate(out)[: len(image)].astype(np.float64)
    moved = out[n:].reshape(chosen.shape)
    insensitive = np.abs(moved - out[:n, None]) < eps
    return (
        (insensitive ^ np.take_along_axis(non_feature, chosen, axis=1)).sum(-1).astype(np.float64)
    )


def _first_affine(model: nnx.Module, x) -> str:
    """The path of the model's first layer, checked to be a Linear or Conv with a bias."""
    first = layer_order(model, x)[0]
    modules = {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model)}
    layer = modules.get(first)
    if not isinstance(layer, nnx.Linear | nnx.Conv) or layer.bias is None:
        raise ValueError(
            f"cannot shift the model: its first layer {first or '(the model)'!r} is not an "
            f"nnx.Linear or nnx.Conv with a bias ({type(layer).__name__}); pass shifted_model"
        )
    return first


def shift_first_layer(model: nnx.Module, x: np.ndarray | jax.Array, shift: float) -> nnx.Module:
    r"""A copy of the model whose first layer takes inputs shifted by ``shift``.

    The first layer with parameters that the model calls (`layer_order`), an `nnx.Linear`
    or `nnx.Conv` with a bias, gets the bias :math:`b' = b - m \sum W` (the kernel summed
    over everything but its output axis), so that its pre-activations of :math:`x + m`
    equal those of x (Kindermans et al. 2019). Exact where the layer sees all of its
    input: a convolution that zero-pads (``padding="SAME"``) sees no shift in its padding,
    so its border pre-activations change by the padded taps' share.

    Args:
      model: a Flax NNX model.
      x: (N, ...) example input (its shape and dtype decide which layer is first).
      shift: the constant :math:`m` added to every input entry.

    Returns:
      A new model of the same structure (the original is not changed).

    Raises:
      ValueError: a first layer that is not an `nnx.Linear` or `nnx.Conv` with a bias.
    """
    first = _first_affine(model, x)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    kernel_path, bias_path = (
        (*first.split("/"), name) if first else (name,) for name in ("kernel", "bias")
    )
    paths = {tuple(map(str, path)): path for path in flat}
    kernel_path, bias_path = paths[kernel_path], paths[bias_path]
    kernel = np.asarray(flat[kernel_path].get_value())
    bias = flat[bias_path]
    value = np.asarray(bias.get_value())
    new = value - shift * kernel.sum(axis=tuple(range(kernel.ndim - 1)), dtype=np.float64)
    flat[bias_path] = bias.replace(jnp.asarray(new, value.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


@register(
    "input_invariance",
    family="axiomatic",
    higher_is_better=False,
    reference="Kindermans et al. 2019",
    needs_explain=True,
)
def input_invariance(
    model,
    x,
    maps,
    target,
    *,
    explain: Callable | None = None,
    key=None,
    shift: float = -1.0,
    shifted_model: nnx.Module | None = None,
    strict: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    r"""The relative change of the map under a compensated input shift; see the module docstring.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, ...) inputs.
      maps: (N, ...) their relevance for `target`, from the same explainer as `explain`.
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: ``explain(x, target, *, model) -> maps`` that explains a given model
        (`explain_fn`); required.
      key: unused.
      shift: the constant :math:`m` added to the inputs (Quantus's ``input_shift``, -1).
      shifted_model: the model for :math:`x + m`; default `shift_first_layer`.
      strict: raise if the shifted model's logits of :math:`x + m` differ from the
        model's of x by more than `SHIFT_RTOL` of ``1 + max |logit|``.
      batch_size: images per model call (logits only).

    Returns:
      (N,) relative changes >= 0 (0 for two all-zero maps, inf where only the shifted map
      is non-zero): lower is more invariant.

    Raises:
      ValueError: no explain, an explain that takes no model, a model that cannot be
        shifted, or (strict) a shifted model that is not the same function.
    """
    if explain is None:
        raise ValueError("input_invariance needs explain(x, target, *, model) (see explain_fn)")
    x = jnp.asarray(x)
    shifted = shift_first_layer(model, x, shift) if shifted_model is None else shifted_model
    scores = logits(model, x, batch_size)
    moved = logits(shifted, x + shift, batch_size)
    gap = float(np.abs(moved - scores).max())
    if strict and gap > SHIFT_RTOL * (1 + float(np.abs(scores).max())):
        raise ValueError(
            f"the shifted model is not the same function: its logits of x + {shift} differ "
            f"from the model's of x by up to {gap:.3g} (a zero-padding first layer, or an "
            "input transform before it?); pass shifted_model, or strict=False to score anyway"
        )
    t = resolve_target(target, scores)
    try:
        again = explain(x + shift, t, model=shifted)
    except TypeError as e:
        raise ValueError(
            f"input_invariance needs an explain that takes model= (see explain_fn): {e}"
        ) from None
    r = np.asarray(maps, np.float64).reshape(len(t), -1)
    r2 = np.asarray(again, np.float64).reshape(len(t), -1)
    peak = np.abs(r).max(-1)
    change = np.abs(r - r2).max(-1)
    return np.where(peak > 0, change / np.where(peak > 0, peak, 1), np.where(change > 0, np.inf, 0))
