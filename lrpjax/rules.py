r"""LRP rules: how one layer hands the relevance at its output to its inputs.

A rule is a pure function ``rule(layer, a, R) -> R_in``:

- ``layer``: the Flax NNX layer (`nnx.Linear`, `nnx.Conv` of any dimension, `nnx.BatchNorm`
  in inference mode, or a parameter-free layer such as `lrpjax.layers.MaxPool`);
- ``a``: the layer's input activations, shape (N, ...);
- ``R``: the relevance at the layer's output, with the output's shape;
- returns ``R_in``, the relevance at the layer's input, with the shape of ``a``.

Write a new rule as such a function and map it in a composite. The presets below are
`Rule` values (a function and its bound parameters) so that equal rules compare equal and
a jit-compiled explanation is reused.

Conventions. A linear layer computes :math:`z_k = \sum_j a_j w_{jk} + b_k` (for a
convolution, the sum runs over the receptive field; for batch-norm in inference mode,
:math:`w = \mathrm{scale} / \sqrt{\mathrm{var} + \epsilon_{BN}}` per channel and
:math:`b = \mathrm{bias} - \mathrm{mean} \cdot w`). The stabiliser is
:math:`\mathrm{stabilize}(z) = z + \epsilon \cdot \mathrm{sign}(z)` with
:math:`\mathrm{sign}(0) = +1`. :math:`(\cdot)^+ = \max(\cdot, 0)`,
:math:`(\cdot)^- = \min(\cdot, 0)`.

Every rule of the form :math:`R_j = \sum_k \frac{a_j \rho(w_{jk})}{\mathrm{stabilize}(\sum_j
a_j \rho(w_{jk}) + \rho(b_k))} R_k` is computed the same way (Montavon et al. 2019, Sec.
10.2.3): :math:`z = \rho(\text{layer})(a)`, :math:`s = R / \mathrm{stabilize}(z)`,
:math:`c = J_\rho^\top s` by `jax.vjp`, :math:`R_{in} = a \odot c`. No per-neuron loop
and no explicit weight matrix: a convolution's rule costs one convolution and its
transpose.

Per-unit form. The engine passes :math:`c = R / a` between layers (see `lrpjax.engine`).
For rules whose relevance is :math:`a \odot c` by construction (`epsilon`, `z`,
`alpha_beta`, `gamma`), `per_unit` gives a second function
``per_unit(layer, a, y, c_out) -> c_in`` that computes :math:`c_{in}` directly from the
layer's output :math:`y` and :math:`c_{out} = R / y`: for `epsilon`,
:math:`c_{in} = J^\top (c_{out} \odot y \oslash \mathrm{stabilize}(y))`, since
:math:`z = y` for an affine layer. Same formula, without recomputing :math:`z` or dividing
by :math:`a`; the tests check that both forms agree.

References:
  Bach, Binder, Montavon, Klauschen, Müller, Samek (2015). On pixel-wise explanations for
  non-linear classifier decisions by layer-wise relevance propagation. PLoS ONE 10(7).
  Montavon, Binder, Lapuschkin, Samek, Müller (2019). Layer-Wise Relevance Propagation:
  An Overview. In: Explainable AI, LNCS 11700, Springer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.layers import (
    FEW_CHANNELS,
    MaxPool,
    _unwindowed,
    _upsample,
    _window_axes,
    _windowed,
    few_channel_conv,
)

__all__ = [
    "Affine",
    "Rule",
    "alpha_beta",
    "as_affine",
    "epsilon",
    "flat",
    "gamma",
    "gradient",
    "identity",
    "per_unit",
    "proportional",
    "stabilize",
    "wsquare",
    "z",
    "zbox",
    "zplus",
]

Array = jax.Array


class Rule(NamedTuple):
    """A rule function with its parameters bound; called as ``rule(layer, a, R)``.

    Attributes:
      fn: ``fn(layer, a, R, **params) -> R_in``.
      params: the keyword parameters, as a tuple of (name, value) pairs (hashable).
    """

    fn: Callable[..., Array]
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, layer: nnx.Module, a: Array, R: Array) -> Array:
        return self.fn(layer, a, R, **dict(self.params))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.fn.__name__.strip('_')}({args})"


def stabilize(z: Array, eps: float) -> Array:
    """z + eps * sign(z), with sign(0) = +1, so the result is never zero for eps > 0."""
    return z + eps * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _safe_divide(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# ---------------------------------------------------------------------------------------
# Linear layers as (forward with any weights, weights, bias)


class Affine(NamedTuple):
    """A linear layer seen as ``apply(a, kernel, bias) = a W + b`` with replaceable weights.

    ``bias`` may be None (a layer without bias); ``apply(a, kernel, None)`` omits it.
    """

    apply: Callable[[Array, Array, Array | None], Array]
    kernel: Array
    bias: Array | None


def _module_with(layer: nnx.Module, kernel: Array, bias: Array | None) -> nnx.Module:
    """A copy of `layer` with other kernel and bias values (a pure tree operation)."""
    graph, state = nnx.split(layer)
    values = nnx.to_pure_dict(state)
    values["kernel"] = kernel
    if "bias" in values:
        values["bias"] = bias if bias is not None else jnp.zeros_like(values["bias"])
    return nnx.merge(graph, values)


def _few_channels(conv: nnx.Conv) -> bool:
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


def as_affine(layer: nnx.Module) -> Affine:
    """View `nnx.Linear`, `nnx.Conv` (1D/2D/3D, any padding) or `nnx.BatchNorm` as `Affine`.

    Linear and convolution layers run their own forward with substituted weights, so every
    option of the layer (strides, padding, dilation, groups) is honoured; plain
    convolutions of few input channels (an RGB input) run as `few_channel_conv`, the same
    values computed faster on CPU. Batch-norm is taken in inference mode: a per-channel
    scale and shift of its running statistics.

    Raises:
      TypeError: for any other layer.
    """
    if isinstance(layer, nnx.Conv) and _few_channels(layer):
        padding = layer.padding.upper()

        def apply(a: Array, kernel: Array, b: Array | None) -> Array:
            y = few_channel_conv(a, kernel, padding)
            return y if b is None else y + b

        return Affine(apply, layer.kernel[...], layer.bias[...] if layer.bias is not None else None)
    if isinstance(layer, nnx.Linear | nnx.Conv):
        bias = layer.bias[...] if layer.bias is not None else None

        def apply(a: Array, kernel: Array, b: Array | None) -> Array:
            return _module_with(layer, kernel, b)(a)

        return Affine(apply, layer.kernel[...], bias)
    if isinstance(layer, nnx.BatchNorm):
        inv_std = jax.lax.rsqrt(layer.var[...] + layer.epsilon)
        scale = layer.scale[...] * inv_std if layer.scale is not None else inv_std
        shift = -layer.mean[...] * scale
        if layer.bias is not None:
            shift = shift + layer.bias[...]
        if layer.axis != -1:
            raise TypeError("lrpjax handles BatchNorm over the last (channel) axis only")

        def apply(a: Array, kernel: Array, b: Array | None) -> Array:
            return a * kernel if b is None else a * kernel + b

        return Affine(apply, scale, shift)
    raise TypeError(f"{type(layer).__name__} is not a linear layer lrpjax knows")


def _pos(x: Array | None) -> Array | None:
    return None if x is None else jnp.maximum(x, 0)


def _neg(x: Array | None) -> Array | None:
    return None if x is None else jnp.minimum(x, 0)


def _zeros(x: Array | None) -> Array | None:
    return None if x is None else jnp.zeros_like(x)


def _scaled(f: Callable[..., Array], inputs: tuple[Array, ...], R: Array, eps: float):
    """LRP's core step: z = f(*inputs); s = R / stabilize(z); return inputs * J_f^T s."""
    z, vjp = jax.vjp(f, *inputs)
    grads = vjp(R / stabilize(z, eps))
    return sum(x * g for x, g in zip(inputs, grads, strict=True))


# ---------------------------------------------------------------------------------------
# Rules for linear layers


def _epsilon(layer: nnx.Module, a: Array, R: Array, *, eps: float) -> Array:
    aff = as_affine(layer)
    return _scaled(lambda x: aff.apply(x, aff.kernel, aff.bias), (a,), R, eps)


def _transposed(layer: nnx.Module, a: Array, s: Array) -> Array:
    """J^T s for the linear layer's Jacobian J (a only gives shapes)."""
    aff = as_affine(layer)
    _, vjp = jax.vjp(lambda x: aff.apply(x, aff.kernel, aff.bias), a)
    return vjp(s)[0]


def _epsilon_per_unit(layer: nnx.Module, a: Array, y: Array, c: Array, *, eps: float) -> Array:
    return _transposed(layer, a, c * y / stabilize(y, eps))


def epsilon(eps: float = 1e-6) -> Rule:
    r"""LRP-epsilon (Bach et al. 2015; Montavon et al. 2019, Eq. 10.2).

    .. math:: R_j = \sum_k \frac{a_j w_{jk}}{\mathrm{stabilize}(z_k)} R_k,
       \qquad z_k = \sum_j a_j w_{jk} + b_k

    The stabiliser absorbs relevance of weak or contradictory outputs; eps -> 0 gives LRP-0.
    The bias's share :math:`b_k / z_k \cdot R_k` is not passed on.

    Args:
      eps: stabiliser, >= 0.
    """
    return Rule(_epsilon, (("eps", float(eps)),))


def z() -> Rule:
    r"""LRP-0 (Bach et al. 2015): :math:`R_j = \sum_k a_j w_{jk} / z_k \cdot R_k`.

    Computed as `epsilon` with eps = 0, except that outputs with :math:`z_k = 0` pass
    nothing (instead of dividing by zero).
    """
    return Rule(_z)


def _z(layer: nnx.Module, a: Array, R: Array) -> Array:
    aff = as_affine(layer)
    zk, vjp = jax.vjp(lambda x: aff.apply(x, aff.kernel, aff.bias), a)
    return a * vjp(_safe_divide(R, zk))[0]


def _z_per_unit(layer: nnx.Module, a: Array, y: Array, c: Array) -> Array:
    return _transposed(layer, a, jnp.where(y != 0, c, 0.0))  # R / z = y c / y, 0 at z = 0


def _signed_parts(aff: Affine, a: Array):
    r"""vjp-able halves of a linear layer: ``W a`` and ``|W| |a|`` (no bias), for `gamma`.

    With :math:`a = a^+ + a^-` and :math:`W = W^+ + W^-`,
    :math:`W^+ a^+ + W^- a^- = (Wa + |W||a|) / 2` and
    :math:`W^- a^+ + W^+ a^- = (Wa - |W||a|) / 2`; on the backward pass, since
    :math:`a^+` and :math:`a^-` have disjoint support, the four transposed products reduce
    to :math:`a \odot W^\top u + |a| \odot |W|^\top v`: two convolutions and two
    transposed ones instead of four and four. Exact where the denominators are of the
    order of :math:`|W||a|`, as gamma's are (they contain all of z); alpha-beta's one-sided
    denominators can be much smaller, so `alpha_beta` sums each side directly.

    Returns:
      ``(Wa, |W||a|, cotangents)`` with ``cotangents(u, v) = (W^T u, |W|^T v)``.
    """
    za, vjp_w = jax.vjp(lambda x: aff.apply(x, aff.kernel, None), a)
    zabs, vjp_abs = jax.vjp(lambda x: aff.apply(x, jnp.abs(aff.kernel), None), jnp.abs(a))

    def cotangents(u: Array, v: Array) -> tuple[Array, Array]:
        return vjp_w(u)[0], vjp_abs(v)[0]

    return za, zabs, cotangents


def _alpha_beta_per_sign(
    layer: nnx.Module, a: Array, R: Array, *, alpha: float, beta: float, eps: float
) -> tuple[Array, Array]:
    """Relevance per unit of input for a's positive entries and for its negative ones."""
    aff = as_affine(layer)
    ap, an = jnp.maximum(a, 0), jnp.minimum(a, 0)
    wp, wn = _pos(aff.kernel), _neg(aff.kernel)
    if _stackable(layer):
        return _alpha_beta_stacked(aff, ap, an, wp, wn, R, alpha=alpha, beta=beta, eps=eps)

    def z_pos(xp, xn):  # positive contributions: w+ a+ and w- a-
        return aff.apply(xp, wp, _pos(aff.bias)) + aff.apply(xn, wn, _zeros(aff.bias))

    def z_neg(xp, xn):  # negative contributions: w- a+ and w+ a-
        return aff.apply(xp, wn, _neg(aff.bias)) + aff.apply(xn, wp, _zeros(aff.bias))

    def per_unit(f):
        z, vjp = jax.vjp(f, ap, an)
        return vjp(R / stabilize(z, eps))

    c_pos, c_neg = (alpha * c for c in per_unit(z_pos))
    if beta != 0:
        d_pos, d_neg = per_unit(z_neg)
        c_pos, c_neg = c_pos - beta * d_pos, c_neg - beta * d_neg
    return c_pos, c_neg


def _stackable(layer: nnx.Module) -> bool:
    """Input channels are independent (no groups): a^+ and a^- can be stacked along them."""
    return isinstance(layer, nnx.Linear) or (
        isinstance(layer, nnx.Conv) and layer.feature_group_count == 1
    )


def _alpha_beta_stacked(
    aff: Affine,
    ap: Array,
    an: Array,
    wp: Array,
    wn: Array,
    R: Array,
    *,
    alpha: float,
    beta: float,
    eps: float,
) -> tuple[Array, Array]:
    """`_alpha_beta_per_sign` as one product: [a+, a-] (stacked along the input channels)
    times [[w+, w-], [w-, w+]], whose output channels are [z+, z-].

    The same sums as the four separate products, exactly (each side is still a sum of
    same-signed terms), in one layer call and one transposed call: fewer passes over memory.
    For beta = 0 only the z+ half is computed.
    """
    x = jnp.concatenate([ap, an], axis=-1)
    k_pos = jnp.concatenate([wp, wn], axis=-2)  # kernels are (..., in, out)
    b_pos = _pos(aff.bias)
    if beta == 0:
        z, vjp = jax.vjp(lambda x: aff.apply(x, k_pos, b_pos), x)
        (c,) = vjp(alpha * R / stabilize(z, eps))
    else:
        kernel = jnp.concatenate([k_pos, jnp.concatenate([wn, wp], axis=-2)], axis=-1)
        bias = None if aff.bias is None else jnp.concatenate([b_pos, _neg(aff.bias)])
        z, vjp = jax.vjp(lambda x: aff.apply(x, kernel, bias), x)
        z_pos, z_neg = jnp.split(z, 2, axis=-1)
        (c,) = vjp(
            jnp.concatenate(
                [alpha * R / stabilize(z_pos, eps), -beta * R / stabilize(z_neg, eps)], axis=-1
            )
        )
    c_pos, c_neg = jnp.split(c, 2, axis=-1)
    return c_pos, c_neg


def _alpha_beta(layer: nnx.Module, a: Array, R: Array, *, alpha: float, beta: float, eps: float):
    c_pos, c_neg = _alpha_beta_per_sign(layer, a, R, alpha=alpha, beta=beta, eps=eps)
    return jnp.maximum(a, 0) * c_pos + jnp.minimum(a, 0) * c_neg


def _alpha_beta_per_unit(
    layer: nnx.Module, a: Array, y: Array, c: Array, *, alpha: float, beta: float, eps: float
) -> Array:
    c_pos, c_neg = _alpha_beta_per_sign(layer, a, y * c, alpha=alpha, beta=beta, eps=eps)
    return jnp.where(a >= 0, c_pos, c_neg)


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-6) -> Rule:
    r"""LRP-alpha-beta (Bach et al. 2015; Montavon et al. 2019, Sec. 10.2.3).

    .. math:: R_j = \sum_k \Big( \alpha \frac{(a_j w_{jk})^+}{z_k^+}
                              - \beta \frac{(a_j w_{jk})^-}{z_k^-} \Big) R_k

    with :math:`z_k^+ = \sum_j (a_j^+ w_{jk}^+ + a_j^- w_{jk}^-) + b_k^+` and
    :math:`z_k^- = \sum_j (a_j^+ w_{jk}^- + a_j^- w_{jk}^+) + b_k^-` (both denominators
    stabilised with eps). Positive and negative parts of inputs and weights are both
    separated, so the rule is also right for signed inputs (here: after batch-norm).

    Args:
      alpha: weight of positive contributions.
      beta: weight of negative contributions; alpha - beta must be 1 (conservation).
      eps: stabiliser of the denominators.
    """
    if abs(alpha - beta - 1.0) > 1e-9:
        raise ValueError(f"alpha - beta must be 1, got alpha={alpha}, beta={beta}")
    return Rule(_alpha_beta, (("alpha", float(alpha)), ("beta", float(beta)), ("eps", float(eps))))


def zplus(eps: float = 1e-6) -> Rule:
    r"""LRP-z+ (Montavon et al. 2019, Eq. 10.4 generalised to signed inputs): alpha=1, beta=0.

    .. math:: R_j = \sum_k \frac{(a_j w_{jk})^+}{z_k^+} R_k
    """
    return alpha_beta(1.0, 0.0, eps)


def _gamma_per_sign(
    aff: Affine, a: Array, R: Array, *, gamma: float, eps: float, za: Array | None = None
) -> tuple[Array, Array]:
    """``(W^T u, |W|^T v)``: relevance per unit of a is ``W^T u + sign(a) |W|^T v``.

    `za` (``W a``, without bias) may be given when known, e.g. from the layer's output.
    """
    za_computed, zabs, cotangents = _signed_parts(aff, a)
    za = za_computed if za is None else za
    b = aff.bias
    z = za if b is None else za + b
    positive = z > 0
    # Outputs > 0 amplify their positive contributions (a+ w+, a- w-) and positive bias,
    # outputs <= 0 their negative ones; see `_signed_parts` for the identities.
    z_up, z_down = za + gamma * 0.5 * (za + zabs), za + gamma * 0.5 * (za - zabs)
    if b is not None:
        z_up, z_down = z_up + b + gamma * _pos(b), z_down + b + gamma * _neg(b)
    s = R / stabilize(jnp.where(positive, z_up, z_down), eps)
    signed = jnp.where(positive, s, -s)
    return cotangents((1 + 0.5 * gamma) * s, 0.5 * gamma * signed)


def _gamma(layer: nnx.Module, a: Array, R: Array, *, gamma: float, eps: float) -> Array:
    c_w, c_abs = _gamma_per_sign(as_affine(layer), a, R, gamma=gamma, eps=eps)
    return a * c_w + jnp.abs(a) * c_abs


def _gamma_per_unit(
    layer: nnx.Module, a: Array, y: Array, c: Array, *, gamma: float, eps: float
) -> Array:
    aff = as_affine(layer)
    za = y if aff.bias is None else y - aff.bias  # the forward already computed W a
    c_w, c_abs = _gamma_per_sign(aff, a, y * c, gamma=gamma, eps=eps, za=za)
    return c_w + jnp.where(a >= 0, c_abs, -c_abs)


def gamma(gamma: float = 0.25, eps: float = 1e-6) -> Rule:
    r"""LRP-gamma (Montavon et al. 2019, Eq. 10.3): weights :math:`w + \gamma w^+`.

    .. math:: R_j = \sum_k \frac{z'_{jk}}{\mathrm{stabilize}(\sum_j z'_{jk} + b'_k)} R_k,
       \quad z'_{jk} = a_j w_{jk} + \gamma (a_j w_{jk})^{\pm},
       \quad b'_k = b_k + \gamma b_k^{\pm}

    where :math:`\pm` is the sign of the output :math:`z_k`: contributions of the same sign
    as the output are amplified by 1 + gamma. For non-negative inputs and positive outputs
    this is exactly :math:`\rho(w) = w + \gamma w^+` of the paper.

    Args:
      gamma: amplification of same-sign contributions, >= 0 (0 gives LRP-epsilon).
      eps: stabiliser.
    """
    return Rule(_gamma, (("gamma", float(gamma)), ("eps", float(eps))))


def _zbox(layer: nnx.Module, a: Array, R: Array, *, low: Any, high: Any, eps: float) -> Array:
    aff = as_affine(layer)
    lo = jnp.broadcast_to(jnp.asarray(low, a.dtype), a.shape)
    hi = jnp.broadcast_to(jnp.asarray(high, a.dtype), a.shape)
    wp, wn, w = _pos(aff.kernel), _neg(aff.kernel), aff.kernel

    def z_box(x, l, h):
        return aff.apply(x, w, None) - aff.apply(l, wp, None) - aff.apply(h, wn, None)

    return _scaled(z_box, (a, lo, hi), R, eps)


def zbox(low: Any = 0.0, high: Any = 1.0, eps: float = 1e-6) -> Rule:
    r"""LRP-z^B for the input layer (Montavon et al. 2017; Montavon et al. 2019, Sec. 10.2.3).

    .. math:: R_i = \sum_j \frac{x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}
                               {\sum_i (x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-)} R_j

    for inputs bounded by :math:`l_i \le x_i \le h_i`; the bias is not used.

    Args:
      low, high: bounds, scalars or per-channel arrays broadcastable to the input
        (e.g. shape (3,) for RGB); (0, 1) for images in [0, 1].
      eps: stabiliser.
    """
    return Rule(_zbox, (("low", _hashable(low)), ("high", _hashable(high)), ("eps", float(eps))))


def _hashable(x: Any) -> Any:
    return tuple(float(v) for v in np.ravel(np.asarray(x))) if np.ndim(x) else float(x)


def _flat(layer: nnx.Module, a: Array, R: Array, *, eps: float) -> Array:
    aff = as_affine(layer)
    ones = jnp.ones_like(a)
    return _scaled(lambda x: aff.apply(x, jnp.ones_like(aff.kernel), None), (ones,), R, eps)


def flat(eps: float = 1e-6) -> Rule:
    r"""Flat rule (Lapuschkin et al. 2019): every connected input gets an equal share.

    .. math:: R_i = \sum_j \frac{1}{\sum_{i'} 1} R_j

    where the sum over :math:`i'` counts the inputs connected to output j (for a padded
    convolution, fewer at the border). Independent of the input values.

    Args:
      eps: stabiliser.
    """
    return Rule(_flat, (("eps", float(eps)),))


def _wsquare(layer: nnx.Module, a: Array, R: Array, *, eps: float) -> Array:
    aff = as_affine(layer)
    ones = jnp.ones_like(a)
    return _scaled(lambda x: aff.apply(x, jnp.square(aff.kernel), None), (ones,), R, eps)


def wsquare(eps: float = 1e-6) -> Rule:
    r"""w^2 rule (Montavon et al. 2017): shares proportional to squared weights.

    .. math:: R_i = \sum_j \frac{w_{ij}^2}{\sum_{i'} w_{i'j}^2} R_j

    Args:
      eps: stabiliser.
    """
    return Rule(_wsquare, (("eps", float(eps)),))


_PER_UNIT: dict[Callable[..., Array], Callable[..., Array]] = {
    _epsilon: _epsilon_per_unit,
    _z: _z_per_unit,
    _alpha_beta: _alpha_beta_per_unit,
    _gamma: _gamma_per_unit,
}


def per_unit(rule: Callable) -> Callable[[nnx.Module, Array, Array, Array], Array] | None:
    r"""The per-unit form of a preset rule, or None if it has none.

    Returns:
      ``f(layer, a, y, c_out) -> c_in`` with ``a`` the layer's input (N, ...), ``y`` its
      output, ``c_out = R_out / y`` (shape of y) and ``c_in = R_in / a`` (shape of a),
      where ``R_in = rule(layer, a, R_out)``; ``c_in`` is arbitrary where ``a == 0``.
    """
    if not isinstance(rule, Rule) or rule.fn not in _PER_UNIT:
        return None
    return partial(_PER_UNIT[rule.fn], **dict(rule.params))


# ---------------------------------------------------------------------------------------
# Rules for any layer


def _identity(layer: nnx.Module, a: Array, R: Array) -> Array:
    if R.size != a.size:
        raise ValueError(
            f"rule 'identity' needs as many outputs as inputs, {type(layer).__name__} maps "
            f"{a.shape} to {R.shape}"
        )
    return R.reshape(a.shape)


def identity() -> Rule:
    """Pass rule: :math:`R_{in} = R` (reshaped), for layers whose output is their input
    up to an elementwise change, e.g. batch-norm or activations."""
    return Rule(_identity)


def _gradient(layer: nnx.Module, a: Array, R: Array) -> Array:
    y, vjp = jax.vjp(layer, a)
    return a * vjp(_safe_divide(R, y))[0]


def gradient() -> Rule:
    r"""Relevance along the layer's own gradient: :math:`R_{in} = a \odot J^\top (R \oslash y)`.

    The rule for positively homogeneous parameter-free layers (ReLU, dropout in eval mode,
    reshapes, max-pooling), where it passes relevance through unchanged in total; for
    max-pooling it is winner-take-all (Montavon et al. 2019, Sec. 10.2.2: relevance to the
    maximum of each window; ties share it). The engine computes it without the division.
    """
    return Rule(_gradient)


def _proportional(layer: nnx.Module, a: Array, R: Array, *, eps: float) -> Array:
    if not isinstance(layer, MaxPool):
        raise TypeError(f"rule 'proportional' is for MaxPool layers, not {type(layer).__name__}")
    window = layer.window
    axes = _window_axes(window)
    aw = _windowed(a, window)
    share = aw / stabilize(jnp.sum(aw, axis=axes, keepdims=True), eps)
    return _unwindowed(share * _upsample(R, window), a.shape)


def proportional(eps: float = 1e-6) -> Rule:
    r"""Max-pooling handled as sum-pooling: each input of a window gets a share of the
    window's relevance proportional to its activation,
    :math:`R_i = a_i / \mathrm{stabilize}(\sum_{i' \in w} a_{i'}) \cdot R_w`
    (Montavon et al. 2019, Sec. 10.2.2). The alternative to winner-take-all (`gradient`).

    Args:
      eps: stabiliser.
    """
    return Rule(_proportional, (("eps", float(eps)),))
