"""Layer types: the one module that knows which Flax NNX layers lrpjax explains, and how.

- `as_affine`: a linear layer as ``apply(a, kernel, bias) = a W + b`` with replaceable
  weights, the view every linear rule of `lrpjax.core.rules` works on. One registry entry per
  layer type (`register_affine`); a new linear layer type is one entry.
- Type groups the presets map (`LayerGroup`: `DENSE`, `CONV`, `BATCH_NORMS`, `LAYER_NORMS`;
  `register_affine` adds a new type to one, `DENSE` unless told otherwise), the
  parameter-free layers whose relevance follows their gradient (`PASS_THROUGH`), and the
  token embeddings (`EMBEDDINGS`).
- `Bound`: a layer with the extra arguments of one call (``bn(x, use_running_average=True)``),
  as rules receive it when the model called it with more than its input.

Adding a layer type (here, a linear layer ``MyDense`` with ``kernel`` and ``bias``)::

    @layer_types.register_affine(MyDense)
    def _my_dense(layer, a=None):
        def apply(x, kernel, bias):
            return x @ kernel if bias is None else x @ kernel + bias
        return layer_types.Affine(apply, layer.kernel[...], layer.bias[...])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core.layers import FEW_CHANNELS, Flatten, MaxPool, ReLU, few_channel_conv

__all__ = [
    "BATCH_NORMS",
    "CONV",
    "DENSE",
    "EMBEDDINGS",
    "LAYER_NORMS",
    "PASS_THROUGH",
    "RECTIFIERS",
    "RESHAPING",
    "SIGN_KEEPING",
    "Affine",
    "Bound",
    "LayerError",
    "LayerGroup",
    "as_affine",
    "is_affine",
    "register_affine",
    "unbound",
]

Array = jax.Array


class LayerError(TypeError):
    """The model holds a layer or operation that lrpjax cannot explain as given."""


class LayerGroup:
    """A named, extendable group of layer types that the presets map to one rule.

    ``layer in group`` holds for instances of the group's types and their subclasses (and
    for a `Bound` call of one). A group is a composite key like a type: presets map
    `DENSE`, `CONV`, `BATCH_NORMS` and `LAYER_NORMS`, so a type added to a group (by
    `register_affine` or `add`) takes that group's rule in every preset, including presets
    made before it was added.
    """

    def __init__(self, name: str, *types: type):
        self.name = name
        self._types: list[type] = list(types)

    def add(self, *types: type) -> None:
        """Add layer types to the group."""
        self._types.extend(t for t in types if t not in self._types)

    @property
    def types(self) -> tuple[type, ...]:
        return tuple(self._types)

    def distance(self, layer: Any) -> int | None:
        """How many classes up the layer's type is a member of the group, or None."""
        mro = type(unbound(layer)).__mro__
        found = [mro.index(t) for t in self._types if t in mro]
        return min(found) if found else None

    def __contains__(self, layer: Any) -> bool:
        return self.distance(layer) is not None

    def __iter__(self):
        return iter(self.types)

    def __repr__(self) -> str:
        return f"LayerGroup({self.name})"


#: Dense layers (presets give them their dense rule).
DENSE = LayerGroup("dense", nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
#: Convolutions (presets give them their convolution rule).
CONV = LayerGroup("conv", nnx.Conv, nnx.ConvTranspose)
#: Batch-norm in inference mode: a per-channel affine map.
BATCH_NORMS = LayerGroup("batch_norm", nnx.BatchNorm)
#: Normalisations over the features of each example, explained with the normalising scale
#: held constant (Achtibat et al. 2024): a linear map of the input.
LAYER_NORMS = LayerGroup("layer_norm", nnx.LayerNorm, nnx.RMSNorm)
#: Parameter-free, positively homogeneous layers: relevance follows their own gradient.
PASS_THROUGH: tuple[type, ...] = (ReLU, Flatten, MaxPool, nnx.Dropout)
#: Layers that pass only the positive part of their input: relevance below them is zero
#: wherever their input is <= 0 (`rules.Rule.for_rectified_output`).
RECTIFIERS: tuple[type, ...] = (ReLU,)
#: Layers whose output is >= 0 wherever their input is (a layer after a ReLU and one of
#: these still sees non-negative inputs: `rules.Rule.for_nonnegative_input`).
SIGN_KEEPING: tuple[type, ...] = (Flatten, MaxPool, nnx.Dropout)
#: Layers whose output is their input rearranged: a layer after one still sees the input.
RESHAPING: tuple[type, ...] = (Flatten, nnx.Dropout)
#: Token embeddings: integer inputs, relevance per token.
EMBEDDINGS: tuple[type, ...] = (nnx.Embed,)


class Bound(NamedTuple):
    """A layer called with more than its input: ``module(a, *args, **kwargs)``."""

    module: nnx.Module
    args: tuple
    kwargs: dict

    def __call__(self, a: Array) -> Array:
        return self.module(a, *self.args, **self.kwargs)


def unbound(layer: Any) -> Any:
    """The module of a `Bound` layer, or the layer itself."""
    return layer.module if isinstance(layer, Bound) else layer


class Affine(NamedTuple):
    """A linear layer seen as ``apply(a, kernel, bias) = a W + b`` with replaceable weights.

    Attributes:
      apply: ``apply(a, kernel, bias)``; ``bias`` None omits it.
      kernel: the layer's weights.
      bias: its bias, or None.
      entrywise: the kernel holds the weights :math:`w_{jk}` entry by entry, so that rules
        that split weights by sign (alpha-beta, gamma, z^B, flat, w^2) apply; False for
        layer norm, whose centring mixes the features.
      stackable: the input's channels are its last axis and the kernel's second-to-last, so
        ``[a+, a-]`` can be stacked along them (`rules.alpha_beta`'s one-product form).
    """

    apply: Callable[[Array, Array, Array | None], Array]
    kernel: Array
    bias: Array | None
    entrywise: bool = True
    stackable: bool = False


_AFFINE: dict[type, Callable[..., Affine]] = {}


def register_affine(*types: type, group: LayerGroup | None = DENSE) -> Callable:
    """Register ``view(layer, a=None) -> Affine`` for layer types (and their subclasses).

    Args:
      types: the layer types the view is for.
      group: the `LayerGroup` whose rule the presets give these types: `DENSE` (the
        default), `CONV`, `BATCH_NORMS`, `LAYER_NORMS`, or None for none (then only a
        composite that maps the type or path explains it).
    """

    def register(view: Callable[..., Affine]) -> Callable[..., Affine]:
        for t in types:
            _AFFINE[t] = view
        if group is not None:
            group.add(*types)
        return view

    return register


def _view_of(layer: Any) -> Callable[..., Affine] | None:
    for cls in type(unbound(layer)).__mro__:
        if cls in _AFFINE:
            return _AFFINE[cls]
    return None


def is_affine(layer: Any) -> bool:
    """Whether `layer` (or the module of a `Bound` layer) has an affine view."""
    return _view_of(layer) is not None


def as_affine(layer: Any, a: Array | None = None) -> Affine:
    """The layer's affine view; `a`, its input, for views that depend on it (layer norm).

    Raises:
      LayerError: for a layer type without an affine view.
    """
    view = _view_of(layer)
    if view is None:
        raise LayerError(
            f"{type(unbound(layer)).__name__} is not a linear layer lrpjax knows; "
            "register it with lrpjax.core.layer_types.register_affine"
        )
    return view(unbound(layer), a)


def _module_with(layer: nnx.Module, kernel: Array, bias: Array | None) -> nnx.Module:
    """A copy of `layer` with other kernel and bias values (a pure tree operation)."""
    graph, state = nnx.split(layer)
    values = nnx.to_pure_dict(state)
    values["kernel"] = kernel
    if "bias" in values:
        values["bias"] = bias if bias is not None else jnp.zeros_like(values["bias"])
    return nnx.merge(graph, values)


def _value(param: Any) -> Array | None:
    return None if param is None else param[...]


def few_channels(conv: nnx.Conv) -> bool:
    """A plain unit-stride convolution of an input with few channels (an RGB input layer)."""

    def ones(v: Any) -> bool:
        return v is None or all(int(i) == 1 for i in np.atleast_1d(v))

    return (
        conv.in_features <= FEW_CHANNELS
        and isinstance(conv.padding, str)
        and conv.padding.upper() in ("SAME", "VALID")
        and all(ones(v) for v in (conv.strides, conv.input_dilation, conv.kernel_dilation))
        and conv.feature_group_count == 1
        and conv.mask is None
        and conv.dtype in (None, conv.param_dtype)
    )


@register_affine(nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.ConvTranspose, group=None)
def _weights_and_bias(layer: nnx.Module, a: Array | None = None) -> Affine:
    """The layer's own forward with substituted weights, so that every option (strides,
    padding, dilation, groups, axes) is honoured; plain convolutions of few input channels
    (an RGB input) run as `few_channel_conv`, the same values computed faster on CPU."""
    del a
    kernel, bias = _value(layer.kernel), _value(layer.bias)
    if isinstance(layer, nnx.Conv) and few_channels(layer):
        padding = layer.padding.upper()

        def apply(x: Array, kernel: Array, b: Array | None) -> Array:
            y = few_channel_conv(x, kernel, padding)
            return y if b is None else y + b

    else:

        def apply(x: Array, kernel: Array, b: Array | None) -> Array:
            return _module_with(layer, kernel, b)(x)

    stackable = isinstance(layer, nnx.Linear) or (
        isinstance(layer, nnx.Conv) and layer.feature_group_count == 1
    )
    return Affine(apply, kernel, bias, stackable=stackable)


@register_affine(nnx.BatchNorm, group=None)
def _batch_norm(layer: nnx.BatchNorm, a: Array | None = None) -> Affine:
    """Inference mode: a per-channel scale and shift of the running statistics."""
    del a
    if layer.axis != -1:
        raise LayerError("lrpjax handles BatchNorm over the last (channel) axis only")
    inv_std = jax.lax.rsqrt(layer.var[...] + layer.epsilon)
    scale = layer.scale[...] * inv_std if layer.scale is not None else inv_std
    shift = -layer.mean[...] * scale
    if layer.bias is not None:
        shift = shift + layer.bias[...]

    def apply(x: Array, kernel: Array, b: Array | None) -> Array:
        return x * kernel if b is None else x * kernel + b

    return Affine(apply, scale, shift)


def _check_last_axis(layer: nnx.Module) -> None:
    if layer.reduction_axes not in (-1, (-1,)) or layer.feature_axes not in (-1, (-1,)):
        raise LayerError(
            f"lrpjax handles {type(layer).__name__} over the last axis only "
            f"(reduction_axes={layer.reduction_axes}, feature_axes={layer.feature_axes})"
        )


@register_affine(nnx.LayerNorm, group=None)
def _layer_norm(layer: nnx.LayerNorm, a: Array | None = None) -> Affine:
    r"""LayerNorm with the normalising scale :math:`1/\sqrt{\mathrm{var}(a) + \epsilon}` of
    the input `a` held constant: :math:`x \mapsto (x - \bar x) s \odot \gamma + \beta`, linear
    in x (AttnLRP, Achtibat et al. 2024). The centring mixes features: not entrywise."""
    if a is None:
        raise LayerError("the affine view of LayerNorm needs its input")
    _check_last_axis(layer)
    a32 = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    inv_std = jax.lax.rsqrt(jnp.var(a32, axis=-1, keepdims=True) + layer.epsilon)
    scale = _value(layer.scale)
    kernel = jnp.ones(a.shape[-1:], a32.dtype) if scale is None else scale

    def apply(x: Array, kernel: Array, b: Array | None) -> Array:
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        y = (centred * inv_std).astype(x.dtype) * kernel
        return y if b is None else y + b

    return Affine(apply, kernel, _value(layer.bias), entrywise=False)


@register_affine(nnx.RMSNorm, group=None)
def _rms_norm(layer: nnx.RMSNorm, a: Array | None = None) -> Affine:
    r"""RMSNorm with :math:`1/\sqrt{\overline{a^2} + \epsilon}` held constant: an elementwise
    scaling of the input, kernel of the input's shape (AttnLRP, Achtibat et al. 2024)."""
    if a is None:
        raise LayerError("the affine view of RMSNorm needs its input")
    _check_last_axis(layer)
    a32 = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(a32), axis=-1, keepdims=True) + layer.epsilon)
    scale = _value(layer.scale)
    kernel = inv_rms if scale is None else inv_rms * scale

    def apply(x: Array, kernel: Array, b: Array | None) -> Array:
        y = x * kernel
        return y if b is None else y + b

    return Affine(apply, kernel.astype(a32.dtype), None)
