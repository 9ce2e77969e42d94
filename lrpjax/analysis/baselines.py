r"""Baseline explainers with the same shape as `lrpjax.explainer`, and explainer specs.

Every explainer here is a factory ``f(model, **params) -> (fn, state)``:
``fn(state, x, target) -> relevance`` is a pure function of arrays (jit-compilable,
batched), with ``x`` of shape (N, ...), ``target`` (N,) int class indices (-1: the class
the model predicts for that image) and ``relevance`` of the shape of ``x``; ``state`` is
the model's `nnx.State` to call it with. Gradients are those of the target's logit
:math:`f_t(x)`. The model is explained in eval mode.

Integrated gradients and SmoothGrad evaluate the model at several points per image: the
points are folded into the batch axis (one batch of ``steps * N`` images through the
model, reshaped back), never looped over with `jax.lax` control flow. The number of
model passes per image is the ``passes`` attribute of their ``fn`` (`passes`), so that a
caller can shrink its batches to keep memory flat.

Noise (SmoothGrad, the random map) is drawn from a key derived from ``seed`` and the
image's own bytes: the same image gets the same noise wherever it sits in a batch, so
every explainer is batch-consistent and reproducible.

`make` turns a spec string into an explainer, for the command line and `lrpjax.analysis.evaluate`:

- ``"gradient"``, ``"sensitivity"``, ``"gradient_x_input"``, ``"random"``;
- ``"rollout"``, ``"rollout:token=cls"`` (attention rollout, for models with
  `nnx.MultiHeadAttention`);
- ``"integrated_gradients"``, ``"integrated_gradients:steps=16,baseline=0.5"``;
- ``"smoothgrad"``, ``"smoothgrad:samples=8,noise=0.2"``;
- ``"lrp:<preset>"`` with the preset's parameters and ``init``:
  ``"lrp:epsilon"``, ``"lrp:epsilon:eps=0.25"``, ``"lrp:epsilon_gamma_box:gamma=0.5"``,
  ``"lrp:epsilon:init=sglrp"``, ``"lrp:epsilon_plus_flat:init=probability"``.

References:
  Simonyan, Vedaldi, Zisserman (2014). Deep inside convolutional networks: visualising
  image classification models and saliency maps. ICLR workshop.
  Shrikumar, Greenside, Shcherbina, Kundaje (2016). Not just a black box: learning
  important features through propagating activation differences. arXiv:1605.01713.
  Sundararajan, Taly, Yan (2017). Axiomatic attribution for deep networks. ICML.
  Smilkov, Thorat, Kim, Viégas, Wattenberg (2017). SmoothGrad: removing noise by adding
  noise. arXiv:1706.03825.
  Samek, Binder, Montavon, Lapuschkin, Müller (2017). Evaluating the visualization of what
  a deep neural network has learned. IEEE TNNLS 28(11).
  Abnar, Zuidema (2020). Quantifying attention flow in transformers. ACL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lrpjax.core import composites as composites_lib
from lrpjax.core import engine

__all__ = [
    "EXPLAINERS",
    "attention_rollout",
    "attention_weights",
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "known_specs",
    "lrp",
    "make",
    "passes",
    "random_map",
    "sensitivity",
    "smoothgrad",
    "spec_params",
]

Explainer = tuple[Callable[[nnx.State, jax.Array, jax.Array], jax.Array], nnx.State]


def passes(fn: Callable) -> int:
    """Model passes (forward and backward) per image of an explainer function; 1 if unset."""
    return int(getattr(fn, "passes", 1))


def _forward(graphdef: nnx.GraphDef, state: nnx.State) -> Callable[[jax.Array], jax.Array]:
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    return model


def _resolve(logits: jax.Array, target: jax.Array) -> jax.Array:
    """(N,) targets with -1 replaced by the predicted class."""
    return jnp.where(target < 0, jnp.argmax(logits, axis=-1), target)


def _target_gradient(
    model: Callable, x: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Gradient of the target logit w.r.t. x, and the logits. target (N,), no -1s."""
    logits, vjp = jax.vjp(model, x)
    seed = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    return vjp(seed)[0], logits


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective integer mix (uint32 -> uint32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _image_normal(x: jax.Array, seed: int, shape: tuple[int, ...]) -> jax.Array:
    """(N, *shape) float32 standard-normal noise per image, from `seed` and its bytes only.

    A counter-based generator (hashes of (image digest, seed, element index), then
    Box-Muller) rather than `jax.random`: it compiles in milliseconds, and an image gets the
    same noise wherever it sits in a batch.
    """
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
    weights = _fmix32(jnp.arange(flat.shape[1], dtype=jnp.uint32)) | 1
    digest = jnp.sum(_fmix32(bits ^ weights), axis=1, dtype=jnp.uint32)
    digest = _fmix32(digest ^ _fmix32(jnp.uint32(seed & 0xFFFFFFFF) + jnp.uint32(0x9E3779B9)))
    count = math.prod(shape)
    index = _fmix32(jnp.arange(2 * count, dtype=jnp.uint32))
    h = _fmix32(_fmix32(index[None] ^ digest[:, None]) + digest[:, None] * jnp.uint32(0x27D4EB2D))
    u = ((h >> 8).astype(jnp.float32) + 0.5) / 2.0**24  # in (0, 1)
    z = jnp.sqrt(-2.0 * jnp.log(u[:, :count])) * jnp.cos(2.0 * jnp.pi * u[:, count:])
    return z.reshape((x.shape[0], *shape))


def gradient(model: nnx.Module) -> Explainer:
    r"""Gradient (saliency) of the target logit: :math:`R = \partial f_t(x) / \partial x`.

    Signed, per input element (take its square, `sensitivity`, or absolute value for a
    sensitivity map).

    Args:
      model: a Flax NNX model returning logits (N, C).

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``.

    References:
      Simonyan, Vedaldi, Zisserman (2014). Deep inside convolutional networks. ICLR
      workshop.
    """
    graphdef, state = nnx.split(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        f = _forward(graphdef, state)
        logits, vjp = jax.vjp(f, x)
        seed = jax.nn.one_hot(_resolve(logits, target), logits.shape[-1], dtype=logits.dtype)
        return vjp(seed)[0]

    return fn, state


def sensitivity(model: nnx.Module) -> Explainer:
    r"""Sensitivity analysis: :math:`R = (\partial f_t(x) / \partial x)^2` per element.

    Summed over channels this is :math:`\|\nabla_{x_p} f_t\|_2^2` per pixel, the heatmap of
    sensitivity analysis in Samek et al. (2017) and Montavon et al. (2018). Non-negative: it
    says what would change the score, not what the score is made of.

    Args:
      model: a Flax NNX model returning logits (N, C).

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``.

    References:
      Simonyan et al. (2014); Samek et al. (2017), IEEE TNNLS 28(11).
    """
    grad_fn, state = gradient(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        return jnp.square(grad_fn(state, x, target))

    return fn, state


def gradient_x_input(model: nnx.Module) -> Explainer:
    r"""Gradient times input: :math:`R = x \odot \partial f_t(x) / \partial x`.

    Args:
      model: a Flax NNX model returning logits (N, C).

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``.

    References:
      Shrikumar, Greenside, Shcherbina, Kundaje (2016). Not just a black box.
      arXiv:1605.01713.
    """
    grad_fn, state = gradient(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        return x * grad_fn(state, x, target)

    return fn, state


def integrated_gradients(
    model: nnx.Module, baseline: float | jax.Array = 0.0, steps: int = 32
) -> Explainer:
    r"""Integrated gradients along the straight path from a baseline :math:`\bar x` to x.

    .. math::
       R = (x - \bar x) \odot \frac{1}{m} \sum_{k=1}^{m}
           \nabla f_t\big(\bar x + \tfrac{k - 1/2}{m} (x - \bar x)\big)

    (the midpoint rule with ``m = steps``; exact for models linear in x). By completeness,
    :math:`\sum R \approx f_t(x) - f_t(\bar x)`. The target of -1 is the class predicted
    at x (not at the path points). The ``m`` path points of every image are folded into
    the batch axis: one pass over ``m * N`` inputs.

    Args:
      model: a Flax NNX model returning logits (N, C).
      baseline: a scalar, or an array broadcastable to x ((...) of one image, or (N, ...)).
      steps: number of points on the path, m >= 1.

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``; ``fn.passes``
      is ``steps + 1``.

    References:
      Sundararajan, Taly, Yan (2017). Axiomatic attribution for deep networks. ICML.
    """
    if int(steps) < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    steps = int(steps)
    graphdef, state = nnx.split(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        f = _forward(graphdef, state)
        target = _resolve(f(x), target)
        base = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
        alphas = ((jnp.arange(steps) + 0.5) / steps).astype(x.dtype)
        alphas = alphas.reshape((steps,) + (1,) * x.ndim)
        path = base[None] + alphas * (x - base)[None]  # (m, N, ...)
        grads, _ = _target_gradient(
            f, path.reshape((steps * x.shape[0], *x.shape[1:])), jnp.tile(target, steps)
        )
        return (x - base) * grads.reshape(path.shape).mean(axis=0)

    fn.passes = steps + 1
    return fn, state


def smoothgrad(
    model: nnx.Module, noise: float = 0.1, samples: int = 16, seed: int = 0
) -> Explainer:
    r"""SmoothGrad: the gradient averaged over noisy copies of the input.

    .. math::
       R = \frac{1}{n} \sum_{i=1}^{n} \nabla f_t(x + \epsilon_i), \qquad
       \epsilon_i \sim \mathcal N(0, \sigma^2), \quad
       \sigma = \mathrm{noise} \cdot (\max x - \min x)

    with the range taken per image (the paper's noise level :math:`\sigma / (x_{max} -
    x_{min})`). ``noise=0`` gives the plain gradient. The n samples of every image are
    folded into the batch axis; the noise depends on ``seed`` and the image only.

    Args:
      model: a Flax NNX model returning logits (N, C).
      noise: noise standard deviation as a fraction of each image's value range.
      samples: number of noisy copies n >= 1.
      seed: seed of the noise.

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``; ``fn.passes``
      is ``samples + 1``.

    References:
      Smilkov, Thorat, Kim, Viégas, Wattenberg (2017). SmoothGrad: removing noise by adding
      noise. arXiv:1706.03825.
    """
    if int(samples) < 1:
        raise ValueError(f"smoothgrad needs samples >= 1, got {samples}")
    samples = int(samples)
    graphdef, state = nnx.split(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        f = _forward(graphdef, state)
        target = _resolve(f(x), target)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        sigma = noise * (flat.max(axis=1) - flat.min(axis=1))
        eps = _image_normal(x, seed, (samples, *x.shape[1:]))  # (N, n, ...)
        eps = jnp.moveaxis(eps, 1, 0) * sigma.reshape((1, n) + (1,) * (x.ndim - 1))
        noisy = (x[None] + eps.astype(x.dtype)).reshape((samples * n, *x.shape[1:]))
        grads, _ = _target_gradient(f, noisy, jnp.tile(target, samples))
        return grads.reshape((samples, *x.shape)).mean(axis=0)

    fn.passes = samples + 1
    return fn, state


def random_map(model: nnx.Module, seed: int = 0) -> Explainer:
    r"""A random map, :math:`R \sim \mathcal N(0, 1)` i.i.d. per element: the null explainer.

    It ignores the model and the target (a lower bound for faithfulness metrics); the values
    depend on ``seed`` and the image only.

    Args:
      model: the model (unused but for its state, to keep the explainer shape).
      seed: seed of the map.

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``.

    References:
      Samek et al. (2017), IEEE TNNLS 28(11): random ordering as the baseline of pixel
      flipping.
    """
    _, state = nnx.split(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        del state, target
        return _image_normal(x, seed, x.shape[1:]).astype(x.dtype)

    return fn, state


class _AttentionRecorder:
    """Stands in for the ``module`` argument of `nnx.dot_product_attention`, which hands it
    each attention's weights through ``module.sow``: records them in call order."""

    def __init__(self) -> None:
        self.weights: list[jax.Array] = []

    def sow(self, kind: Any, name: str, value: jax.Array, *args: Any, **kwargs: Any) -> bool:
        del kind, name, args, kwargs
        self.weights.append(value)
        return True


def _recording_attention(original: Callable, recorder: _AttentionRecorder, *args, **kwargs):
    kwargs["module"] = recorder
    return original(*args, **kwargs)


def _attention_layers(model: nnx.Module) -> list[nnx.MultiHeadAttention]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)]


def attention_weights(model: nnx.Module, x: jax.Array) -> list[jax.Array]:
    """The attention weights of every `nnx.MultiHeadAttention` call of ``model(x)``.

    Each is (N, heads, queries, keys), rows summing to 1, in call order. They are taken from
    the attention function itself (its ``sow`` of the weights), so the model's code is not
    changed: each layer's ``attention_fn`` is wrapped on the model passed in, which should
    be a copy (as in `attention_rollout`).

    Raises:
      ValueError: the model has no `nnx.MultiHeadAttention`, or its attention functions
        record no weights (a custom ``attention_fn`` without ``module.sow``).
    """
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            f"attention rollout needs a model with nnx.MultiHeadAttention layers; "
            f"{type(model).__name__} has none"
        )
    recorder = _AttentionRecorder()
    for layer in layers:
        layer.attention_fn = functools.partial(_recording_attention, layer.attention_fn, recorder)
    model(x)
    if not recorder.weights:
        raise ValueError(
            f"{type(model).__name__}'s attention layers recorded no weights (a custom "
            "attention_fn that does not sow them?)"
        )
    return recorder.weights


def _grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """(rows, columns) of a grid of `tokens` square patches tiling a height x width image."""
    if tokens < 1:
        return None
    side = math.isqrt(height * width // tokens)
    if side < 1 or side * side * tokens != height * width:
        return None
    if height % side or width % side:
        return None
    return height // side, width // side


def attention_rollout(model: nnx.Module, token: str = "auto") -> Explainer:
    r"""Attention rollout (Abnar & Zuidema 2020): attention propagated through the layers.

    For each attention layer l (in call order) with weights :math:`A_l` (N, heads, T, T):
    the mean over heads, plus the identity for the residual connection, rows normalised:
    :math:`\hat A_l = (ar A_l + I) / \mathrm{rowsum}` (equal to
    :math:`	frac12 ar A_l + 	frac12 I`); then the product from the top layer down,
    :math:`	ilde A = \hat A_L \cdots \hat A_1`. The relevance of the input tokens is the
    class token's row of :math:`	ilde A` without its own column (``token="cls"``: the
    first token is the class token, the others the patch grid), or the mean of all rows
    (``token="mean"``, for models that pool the sequence, such as `lrpjax.models.CCT`).
    ``"auto"`` picks ``"mean"`` when the T tokens tile the image as square patches, else
    ``"cls"`` when T - 1 do.

    The token map is upsampled to the image by repeating each patch's value over its
    pixels (nearest neighbour) and split evenly over the channels: relevance of the
    input's shape (N, H, W, C) whose channel sum is the upsampled rollout map. Rollout is
    class-agnostic: the target is ignored. The weights are read from the model's own
    attention calls (`attention_weights`), in eval mode.

    Args:
      model: a Flax NNX model on images (N, H, W, C) with `nnx.MultiHeadAttention` layers
        (self-attention over a grid of patch tokens, optionally after a class token).
      token: ``"auto"``, ``"cls"`` or ``"mean"``.

    Returns:
      ``(fn, state)``: ``fn(state, x (N, H, W, C), target (N,)) -> (N, H, W, C)``.

    Raises:
      ValueError: the model has no `nnx.MultiHeadAttention` (here), or, when ``fn`` is
        traced, inputs that are not images or tokens that do not tile the image.

    References:
      Abnar, Zuidema (2020). Quantifying attention flow in transformers. ACL.
    """
    if token not in ("auto", "cls", "mean"):
        raise ValueError(f"rollout token must be 'auto', 'cls' or 'mean', got {token!r}")
    if not _attention_layers(model):
        raise ValueError(
            f"attention rollout needs a model with nnx.MultiHeadAttention layers; "
            f"{type(model).__name__} has none"
        )
    graphdef, state = nnx.split(model)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        del target
        if x.ndim != 4:
            raise ValueError(f"attention rollout explains images (N, H, W, C), got {x.shape}")
        n, height, width, channels = x.shape
        weights = attention_weights(_forward(graphdef, state), x)
        t = weights[0].shape[-1]
        eye = jnp.eye(t, dtype=jnp.float32)
        rollout = jnp.broadcast_to(eye, (n, t, t))
        for w in weights:
            a = w.astype(jnp.float32).mean(axis=1) + eye
            a = a / a.sum(axis=-1, keepdims=True)
            rollout = a @ rollout
        mode = token
        if mode == "auto":
            if _grid(t, height, width):
                mode = "mean"
            elif _grid(t - 1, height, width):
                mode = "cls"
            else:
                raise ValueError(
                    f"neither {t} nor {t - 1} tokens tile a {height}x{width} image as patches"
                )
        scores = rollout[:, 0, 1:] if mode == "cls" else rollout.mean(axis=1)
        grid = _grid(scores.shape[-1], height, width)
        if grid is None:
            raise ValueError(
                f"{scores.shape[-1]} patch tokens do not tile a {height}x{width} image"
            )
        rows, cols = grid
        maps = scores.reshape(n, rows, cols)
        maps = jnp.repeat(jnp.repeat(maps, height // rows, axis=1), width // cols, axis=2)
        return jnp.broadcast_to((maps / channels)[..., None], x.shape).astype(x.dtype)

    return fn, state


def lrp(model: nnx.Module, composite: str = "epsilon", init: str = "logit", **params) -> Explainer:
    """LRP through `lrpjax.explainer`, returning the relevance only.

    Args:
      model: a Flax NNX model.
      composite: a preset name of `lrpjax.core.composites.PRESETS`, called with ``**params``.
      init: output relevance (``"logit"``, ``"probability"``, ``"one"``, ``"sglrp"``).
      **params: the preset's keyword arguments (e.g. ``eps``, ``gamma``).

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> (N, ...)``.
    """
    if composite not in composites_lib.PRESETS:
        raise ValueError(
            f"unknown composite {composite!r}; presets: {', '.join(composites_lib.PRESETS)}"
        )
    if init not in engine.INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(engine.INITS)}")
    try:
        comp = composites_lib.PRESETS[composite](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for composite {composite!r}: {e}") from None
    lrp_fn, state = engine.explainer(model, composite=comp, init=init)

    def fn(state: nnx.State, x: jax.Array, target: jax.Array) -> jax.Array:
        return lrp_fn(state, x, target).relevance

    return fn, state


#: Baseline explainers by spec name: factory ``f(model, **params) -> (fn, state)``.
EXPLAINERS: dict[str, Callable[..., Explainer]] = {
    "gradient": gradient,
    "sensitivity": sensitivity,
    "gradient_x_input": gradient_x_input,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "random": random_map,
    "rollout": attention_rollout,
}


def _value(text: str) -> Any:
    if "/" in text:
        return tuple(int(v) for v in text.split("/") if v)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def spec_params(text: str, spec: str, what: str = "explainer") -> dict[str, Any]:
    """The ``key=value,...`` part of a spec (``"smoothgrad:samples=8"``,
    ``"vit:depth=2,channels=32/64"``) as keyword arguments: ints, floats, ``/``-separated
    int tuples, or strings.

    Raises:
      ValueError: an item without ``=``, naming the `what` spec.
    """
    params = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = _value(value.strip())
    return params


def known_specs() -> list[str]:
    """The explainer names `make` accepts (parameters aside)."""
    return [*EXPLAINERS, *(f"lrp:{name}" for name in composites_lib.PRESETS)]


def make(model: nnx.Module, spec: str) -> Explainer:
    """An explainer ``(fn, state)`` from a spec string.

    Args:
      model: a Flax NNX model returning logits.
      spec: ``"<name>"`` or ``"<name>:key=value,..."`` for a name of `EXPLAINERS`, or
        ``"lrp:<preset>"``, ``"lrp:<preset>:key=value,..."`` where the keys are the
        preset's parameters and ``init``. Values are parsed as int, float, else string.

    Returns:
      ``(fn, state)``: ``fn(state, x (N, ...), target (N,)) -> relevance (N, ...)``.

    Raises:
      ValueError: an unknown name (listing the known ones) or bad parameters.
    """
    known = ", ".join(known_specs())
    spec = spec.strip()
    if spec.startswith("lrp:"):
        composite, _, rest = spec[4:].partition(":")
        if composite not in composites_lib.PRESETS:
            raise ValueError(f"unknown explainer {spec!r}; known: {known}")
        params = spec_params(rest, spec)
        init = str(params.pop("init", "logit"))
        return lrp(model, composite, init, **params)
    name, _, rest = spec.partition(":")
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {spec!r}; known: {known}")
    params = spec_params(rest, spec)
    try:
        return EXPLAINERS[name](model, **params)
    except TypeError as e:
        raise ValueError(f"bad parameters in explainer spec {spec!r}: {e}") from None
