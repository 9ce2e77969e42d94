r"""LRP rules: how one layer (or one piece of glue code) hands on the relevance at its output.

A rule is a small immutable object (a frozen dataclass, hashable, so that equal rules reuse
one compiled explanation) with one pure backward. Called as ``rule(layer, a, R) -> R_in``, it
is the definition:

- ``layer``: the layer (`nnx.Linear`, `nnx.Conv` of any dimension, `nnx.BatchNorm` in inference
  mode, any type with an affine view in `lrpjax.core.layer_types`, a parameter-free layer such as
  `lrpjax.core.layers.MaxPool`), a `layer_types.Bound` layer, or a function for glue rules;
- ``a``: the layer's input activations, shape (N, ...) (a tuple for several inputs);
- ``R``: the relevance at the layer's output, with the output's shape;
- returns ``R_in``, the relevance at the layer's input, with the shape of ``a``.

``rule.backward(layer, a, y, c) -> (c_in, R_in)`` is what the engine calls: with
:math:`c = R / y` the relevance per unit of output (see `lrpjax.core.engine`), it returns the
relevance per unit of input :math:`c_{in}` and :math:`R_{in}`. The default derives it from
the definition (:math:`c_{in} = R_{in} / a`); rules whose relevance is :math:`a \odot c` by
construction override it with a form that takes :math:`z` from the layer's own output y
(for `Epsilon`, :math:`c_{in} = J^\top (c \odot y \oslash \mathrm{stabilize}(y))`): the
same formula, without recomputing :math:`z` or dividing by :math:`a`. Write a new rule as a
subclass with ``__call__`` (and ``backward`` where faster), or as a plain function
``rule(layer, a, R)``.

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

Glue rules (AttnLRP, Achtibat et al. 2024) apply to the model's code between layers
(`lrpjax.core.glue`): `identity` for elementwise activations, `uniform` for products of two
input-dependent tensors, `gradient` for softmax (AttnLRP's softmax rule), `hold_constant`
for CP-LRP's attention weights (Ali et al. 2022).

References:
  Bach, Binder, Montavon, Klauschen, Müller, Samek (2015). On pixel-wise explanations for
  non-linear classifier decisions by layer-wise relevance propagation. PLoS ONE 10(7).
  Montavon, Binder, Lapuschkin, Samek, Müller (2019). Layer-Wise Relevance Propagation:
  An Overview. In: Explainable AI, LNCS 11700, Springer.
  Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek (2024). AttnLRP:
  Attention-Aware Layer-Wise Relevance Propagation for Transformers. ICML.
  Ali, Schnake, Eberle, Montavon, Müller, Wolf (2022). XAI for Transformers: Better
  Explanations through Conservative Propagation. ICML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrpjax.core.layer_types import Affine, LayerError, as_affine, unbound
from lrpjax.core.layers import MaxPool, _unwindowed, _upsample, _window_axes, _windowed

__all__ = [
    "AlphaBeta",
    "Embedding",
    "Epsilon",
    "Flat",
    "Gamma",
    "Gradient",
    "HoldConstant",
    "Identity",
    "Proportional",
    "Rule",
    "Uniform",
    "WSquare",
    "Z",
    "ZBox",
    "alpha_beta",
    "as_rule",
    "embedding",
    "epsilon",
    "flat",
    "gamma",
    "gradient",
    "hold_constant",
    "identity",
    "proportional",
    "safe_per_unit",
    "stabilize",
    "uniform",
    "wsquare",
    "z",
    "zbox",
    "zplus",
]

Array = jax.Array
# |a| below this carries no relevance per unit (c = R / a would overflow).
TINY = 1e-20


def stabilize(z: Array, eps: float) -> Array:
    """z + eps * sign(z), with sign(0) = +1, so the result is never zero for eps > 0."""
    return z + eps * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _safe_divide(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def safe_per_unit(R: Array, a: Array) -> Array:
    """R / a, and 0 where |a| is below 1e-20 (no relevance can rest on a zero activation)."""
    ok = jnp.abs(a) > TINY
    return jnp.where(ok, R / jnp.where(ok, a, 1.0), 0.0).astype(R.dtype)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base of all rules: ``rule(layer, a, R) -> R_in`` and ``rule.backward``."""

    def __call__(self, layer: Any, a: Array, R: Array) -> Array:
        raise NotImplementedError

    def backward(self, layer: Any, a: Array, y: Array, c: Array) -> tuple[Array, Array]:
        """``(c_in, R_in)`` from the input a, the output y and ``c = R_out / y``.

        The default applies the definition to ``R_out = y * c``; ``c_in = R_in / a``.
        """
        R_in = self(layer, a, y * c)
        return safe_per_unit(R_in, a), R_in

    def for_rectified_output(self) -> Rule:
        """This rule for a layer whose output reaches the relevance only through a ReLU, so
        that its relevance is zero wherever its output is <= 0 (the engine finds such layers
        from the model's structure). A rule may return a cheaper form that is exact there;
        the default is the rule itself."""
        return self

    def for_nonnegative_input(self) -> Rule:
        """This rule for a layer whose input is >= 0 by the model's structure (it comes from
        a ReLU, possibly through max-pooling or reshapes; the engine finds such layers). A
        rule may return a cheaper form that is exact for such inputs; the default is the
        rule itself."""
        return self


@dataclasses.dataclass(frozen=True)
class _Function(Rule):
    """A plain function ``fn(layer, a, R) -> R_in`` used as a rule."""

    fn: Callable[..., Array]

    def __call__(self, layer: Any, a: Array, R: Array) -> Array:
        return self.fn(layer, a, R)


def as_rule(rule: Rule | Callable) -> Rule:
    """A `Rule`, or a plain function ``fn(layer, a, R) -> R_in`` wrapped as one."""
    if isinstance(rule, Rule):
        return rule
    if callable(rule):
        return _Function(rule)
    raise TypeError(f"not a rule: {rule!r}")


def _affine(layer: Any, a: Array, rule: Rule, *, entrywise: bool = False) -> Affine:
    aff = as_affine(layer, a)
    if entrywise and not aff.entrywise:
        raise LayerError(
            f"rule {rule!r} splits weights by sign, and {type(unbound(layer)).__name__} "
            "has no entrywise weights; use epsilon, z or identity for it"
        )
    return aff


def _forward(aff: Affine) -> Callable[[Array], Array]:
    return lambda x: aff.apply(x, aff.kernel, aff.bias)


def _scaled(f: Callable[..., Array], inputs: tuple[Array, ...], R: Array, eps: float):
    """LRP's core step: z = f(*inputs); s = R / stabilize(z); return inputs * J_f^T s."""
    z, vjp = jax.vjp(f, *inputs)
    grads = vjp(R / stabilize(z, eps))
    return sum(x * g for x, g in zip(inputs, grads, strict=True))


def _transposed(aff: Affine, a: Array, s: Array) -> Array:
    """J^T s for the linear layer's Jacobian J (a only gives shapes)."""
    _, vjp = jax.vjp(_forward(aff), a)
    return vjp(s)[0]


def _pos(x: Array | None) -> Array | None:
    return None if x is None else jnp.maximum(x, 0)


def _neg(x: Array | None) -> Array | None:
    return None if x is None else jnp.minimum(x, 0)


def _zeros(x: Array | None) -> Array | None:
    return None if x is None else jnp.zeros_like(x)


# ---------------------------------------------------------------------------------------
# Rules for linear layers


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
    r"""LRP-epsilon (Bach et al. 2015; Montavon et al. 2019, Eq. 10.2).

    .. math:: R_j = \sum_k \frac{a_j w_{jk}}{\mathrm{stabilize}(z_k)} R_k,
       \qquad z_k = \sum_j a_j w_{jk} + b_k

    The stabiliser absorbs relevance of weak or contradictory outputs; eps -> 0 gives LRP-0.
    The bias's share :math:`b_k / z_k \cdot R_k` is not passed on.

    Attributes:
      eps: stabiliser, >= 0.
    """

    eps: float = 1e-6

    def __call__(self, layer, a, R):
        return _scaled(_forward(_affine(layer, a, self)), (a,), R, self.eps)

    def backward(self, layer, a, y, c):
        c_in = _transposed(_affine(layer, a, self), a, c * y / stabilize(y, self.eps))
        return c_in, a * c_in


def epsilon(eps: float = 1e-6) -> Epsilon:
    """LRP-epsilon; see `Epsilon`."""
    return Epsilon(float(eps))


@dataclasses.dataclass(frozen=True)
class Z(Rule):
    r"""LRP-0 (Bach et al. 2015): :math:`R_j = \sum_k a_j w_{jk} / z_k \cdot R_k`.

    `Epsilon` with eps = 0, except that outputs with :math:`z_k = 0` pass nothing (instead of
    dividing by zero).
    """

    def __call__(self, layer, a, R):
        zk, vjp = jax.vjp(_forward(_affine(layer, a, self)), a)
        return a * vjp(_safe_divide(R, zk))[0]

    def backward(self, layer, a, y, c):
        c_in = _transposed(_affine(layer, a, self), a, jnp.where(y != 0, c, 0.0))
        return c_in, a * c_in


def z() -> Z:
    """LRP-0; see `Z`."""
    return Z()


def _signed_parts(aff: Affine, a: Array):
    r"""vjp-able halves of a linear layer: ``W a`` and ``|W| |a|`` (no bias), for `gamma`.

    With :math:`a = a^+ + a^-` and :math:`W = W^+ + W^-`,
    :math:`W^+ a^+ + W^- a^- = (Wa + |W||a|) / 2` and
    :math:`W^- a^+ + W^+ a^- = (Wa - |W||a|) / 2`; on the backward pass, since
    :math:`a^+` and :math:`a^-` have disjoint support, the four transposed products reduce
    to :math:`a \odot W^\top u + |a| \odot |W|^\top v`: two convolutions and two
    transposed ones instead of four and four. Exact where the denominators are of the
    order of :math:`|W||a|`, as gamma's are (they contain all of z); alpha-beta's one-sided
    denominators can be much smaller, so `AlphaBeta` sums each side directly.

    Returns:
      ``(Wa, |W||a|, cotangents)`` with ``cotangents(u, v) = (W^T u, |W|^T v)``.
    """
    za, vjp_w = jax.vjp(lambda x: aff.apply(x, aff.kernel, None), a)
    zabs, vjp_abs = jax.vjp(lambda x: aff.apply(x, jnp.abs(aff.kernel), None), jnp.abs(a))

    def cotangents(u: Array, v: Array) -> tuple[Array, Array]:
        return vjp_w(u)[0], vjp_abs(v)[0]

    return za, zabs, cotangents


@dataclasses.dataclass(frozen=True)
class AlphaBeta(Rule):
    r"""LRP-alpha-beta (Bach et al. 2015; Montavon et al. 2019, Sec. 10.2.3).

    .. math:: R_j = \sum_k \Big( \alpha \frac{(a_j w_{jk})^+}{z_k^+}
                              - \beta \frac{(a_j w_{jk})^-}{z_k^-} \Big) R_k

    with :math:`z_k^+ = \sum_j (a_j^+ w_{jk}^+ + a_j^- w_{jk}^-) + b_k^+` and
    :math:`z_k^- = \sum_j (a_j^+ w_{jk}^- + a_j^- w_{jk}^+) + b_k^-` (both denominators
    stabilised with eps). Positive and negative parts of inputs and weights are both
    separated, so the rule is also right for signed inputs (here: after batch-norm).

    For z+ (beta = 0) on a layer whose output reaches the relevance only through a ReLU
    (`Rule.for_rectified_output`), :math:`z_k^+ = (z_k - b_k + \sum_j |a_j||w_{jk}|) / 2 +
    b_k^+` takes :math:`z_k` from the forward pass: one extra product forward instead of two,
    see `_zplus_rectified`. On a layer whose input is non-negative by the model's structure
    (`Rule.for_nonnegative_input`), :math:`a^- = 0`: :math:`z^+ = W^+ a + b^+` and
    :math:`z^- = W^- a + b^-`, two products forward and two back instead of four and four
    (one and one for z+), the same sums without their zero terms.

    Attributes:
      alpha: weight of positive contributions.
      beta: weight of negative contributions; alpha - beta must be 1 (conservation).
      eps: stabiliser of the denominators.
      rectified: the layer's relevance is zero wherever its output is <= 0 (set by
        `for_rectified_output`, for z+ only).
      nonnegative_input: the layer's input is >= 0 everywhere (set by
        `for_nonnegative_input`; wrong for inputs with negative entries).
    """

    alpha: float = 2.0
    beta: float = 1.0
    eps: float = 1e-6
    rectified: bool = False
    nonnegative_input: bool = False

    def __post_init__(self):
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(f"alpha - beta must be 1, got alpha={self.alpha}, beta={self.beta}")
        if self.rectified and self.beta != 0:
            raise ValueError("rectified=True is for z+ (beta = 0) only")

    def for_rectified_output(self) -> AlphaBeta:
        # z- would need (z - |W||a|) / 2, which cancels where positive terms dominate: only
        # z+ has a cheaper exact form.
        return dataclasses.replace(self, rectified=True) if self.beta == 0 else self

    def for_nonnegative_input(self) -> AlphaBeta:
        return dataclasses.replace(self, nonnegative_input=True)

    def per_sign(self, layer, a: Array, R: Array) -> tuple[Array, Array]:
        """Relevance per unit of input for a's positive entries and for its negative ones."""
        aff = _affine(layer, a, self, entrywise=True)
        wp, wn = _pos(aff.kernel), _neg(aff.kernel)
        alpha, beta, eps = self.alpha, self.beta, self.eps
        if self.nonnegative_input:
            c = _alpha_beta_nonnegative(aff, a, wp, wn, R, alpha=alpha, beta=beta, eps=eps)
            return c, c
        ap, an = jnp.maximum(a, 0), jnp.minimum(a, 0)
        if aff.stackable:
            return _alpha_beta_stacked(aff, ap, an, wp, wn, R, alpha=alpha, beta=beta, eps=eps)

        def z_pos(xp, xn):  # positive contributions: w+ a+ and w- a-
            return aff.apply(xp, wp, _pos(aff.bias)) + aff.apply(xn, wn, _zeros(aff.bias))

        def z_neg(xp, xn):  # negative contributions: w- a+ and w+ a-
            return aff.apply(xp, wn, _neg(aff.bias)) + aff.apply(xn, wp, _zeros(aff.bias))

        def per_unit(f):
            zs, vjp = jax.vjp(f, ap, an)
            return vjp(R / stabilize(zs, eps))

        c_pos, c_neg = (alpha * c for c in per_unit(z_pos))
        if beta != 0:
            d_pos, d_neg = per_unit(z_neg)
            c_pos, c_neg = c_pos - beta * d_pos, c_neg - beta * d_neg
        return c_pos, c_neg

    def __call__(self, layer, a, R):
        c_pos, c_neg = self.per_sign(layer, a, R)
        return jnp.maximum(a, 0) * c_pos + jnp.minimum(a, 0) * c_neg

    def backward(self, layer, a, y, c):
        if self.rectified and not self.nonnegative_input:  # the latter is cheaper still
            aff = _affine(layer, a, self, entrywise=True)
            c_pos, c_neg = _zplus_rectified(aff, a, y, y * c, self.eps)
        else:
            c_pos, c_neg = self.per_sign(layer, a, y * c)
        c_in = jnp.where(a >= 0, c_pos, c_neg)
        return c_in, a * c_in


def _zplus_rectified(aff: Affine, a: Array, y: Array, R: Array, eps: float):
    r"""z+ per unit of a's positive and negative entries, with :math:`z^+` from the output y.

    :math:`\sum_j (a_j w_{jk})^+ = (\sum_j a_j w_{jk} + \sum_j |a_j||w_{jk}|) / 2`, and the
    first sum is :math:`y_k - b_k`, which the forward pass computed: one product
    (:math:`|W|^\top |a|`) forward, and :math:`W^{+\top} s`, :math:`W^{-\top} s` back (one
    stacked transposed product), against two and two for the stacked exact form. Where
    :math:`y_k > 0`, :math:`z_k^+ \ge \sum_j |a_j||w_{jk}| / 2`, so the cancellation in the
    sum costs at most a few roundings relative to :math:`z_k^+`; where :math:`y_k \le 0` the
    relevance is zero when the output reaches it only through a ReLU, which is when the
    engine uses this form.
    """
    za = y if aff.bias is None else y - aff.bias
    zabs = aff.apply(jnp.abs(a), jnp.abs(aff.kernel), None)
    z_pos = 0.5 * (za + zabs)
    if aff.bias is not None:
        z_pos = z_pos + _pos(aff.bias)
    s = R / stabilize(z_pos, eps)
    wp, wn = _pos(aff.kernel), _neg(aff.kernel)
    if not aff.stackable:
        return tuple(_transposed(aff._replace(kernel=w), a, s) for w in (wp, wn))
    stacked = jnp.concatenate([wp, wn], axis=-2)  # kernels are (..., in, out)
    _, vjp = jax.vjp(lambda x: aff.apply(x, stacked, None), jnp.concatenate([a, a], axis=-1))
    c_pos, c_neg = jnp.split(vjp(s)[0], 2, axis=-1)
    return c_pos, c_neg


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
    """`AlphaBeta.per_sign` as one product: [a+, a-] (stacked along the input channels)
    times [[w+, w-], [w-, w+]], whose output channels are [z+, z-].

    The same sums as the four separate products, exactly (each side is still a sum of
    same-signed terms), in one layer call and one transposed call: fewer passes over memory.
    For beta = 0 only the z+ half is computed.
    """
    x = jnp.concatenate([ap, an], axis=-1)
    k_pos = jnp.concatenate([wp, wn], axis=-2)  # kernels are (..., in, out)
    b_pos = _pos(aff.bias)
    if beta == 0:
        zs, vjp = jax.vjp(lambda x: aff.apply(x, k_pos, b_pos), x)
        (c,) = vjp(alpha * R / stabilize(zs, eps))
    else:
        kernel = jnp.concatenate([k_pos, jnp.concatenate([wn, wp], axis=-2)], axis=-1)
        bias = None if aff.bias is None else jnp.concatenate([b_pos, _neg(aff.bias)])
        zs, vjp = jax.vjp(lambda x: aff.apply(x, kernel, bias), x)
        z_pos, z_neg = jnp.split(zs, 2, axis=-1)
        (c,) = vjp(
            jnp.concatenate(
                [alpha * R / stabilize(z_pos, eps), -beta * R / stabilize(z_neg, eps)], axis=-1
            )
        )
    c_pos, c_neg = jnp.split(c, 2, axis=-1)
    return c_pos, c_neg


def _alpha_beta_nonnegative(
    aff: Affine, a: Array, wp: Array, wn: Array, R: Array, *, alpha: float, beta: float, eps: float
) -> Array:
    r"""`AlphaBeta.per_sign` for inputs a >= 0: relevance per unit of a.

    With :math:`a^- = 0`, :math:`z^+ = W^+ a + b^+` and :math:`z^- = W^- a + b^-`; the
    per-unit relevance is :math:`\alpha W^{+\top} s^+ - \beta W^{-\top} s^-` with
    :math:`s^\pm = R / z^\pm`. Stackable layers compute both sides as one product with
    the kernel ``[w+, w-]`` (output channels ``[z+, z-]``) and one transposed product.
    """
    b_pos, b_neg = _pos(aff.bias), _neg(aff.bias)
    if beta == 0:
        zs, vjp = jax.vjp(lambda x: aff.apply(x, wp, b_pos), a)
        return vjp(alpha * R / stabilize(zs, eps))[0]
    if not aff.stackable:
        z_pos, vjp_pos = jax.vjp(lambda x: aff.apply(x, wp, b_pos), a)
        z_neg, vjp_neg = jax.vjp(lambda x: aff.apply(x, wn, b_neg), a)
        return (
            vjp_pos(alpha * R / stabilize(z_pos, eps))[0]
            - vjp_neg(beta * R / stabilize(z_neg, eps))[0]
        )
    kernel = jnp.concatenate([wp, wn], axis=-1)  # kernels are (..., in, out)
    bias = None if aff.bias is None else jnp.concatenate([b_pos, b_neg])
    zs, vjp = jax.vjp(lambda x: aff.apply(x, kernel, bias), a)
    z_pos, z_neg = jnp.split(zs, 2, axis=-1)
    s = [alpha * R / stabilize(z_pos, eps), -beta * R / stabilize(z_neg, eps)]
    return vjp(jnp.concatenate(s, axis=-1))[0]


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-6) -> AlphaBeta:
    """LRP-alpha-beta; see `AlphaBeta`."""
    return AlphaBeta(float(alpha), float(beta), float(eps))


def zplus(eps: float = 1e-6) -> AlphaBeta:
    r"""LRP-z+ (Montavon et al. 2019, Eq. 10.4 generalised to signed inputs): alpha=1, beta=0.

    .. math:: R_j = \sum_k \frac{(a_j w_{jk})^+}{z_k^+} R_k
    """
    return alpha_beta(1.0, 0.0, eps)


@dataclasses.dataclass(frozen=True)
class Gamma(Rule):
    r"""LRP-gamma (Montavon et al. 2019, Eq. 10.3): weights :math:`w + \gamma w^+`.

    .. math:: R_j = \sum_k \frac{z'_{jk}}{\mathrm{stabilize}(\sum_j z'_{jk} + b'_k)} R_k,
       \quad z'_{jk} = a_j w_{jk} + \gamma (a_j w_{jk})^{\pm},
       \quad b'_k = b_k + \gamma b_k^{\pm}

    where :math:`\pm` is the sign of the output :math:`z_k`: contributions of the same sign
    as the output are amplified by 1 + gamma. For non-negative inputs and positive outputs
    this is exactly :math:`\rho(w) = w + \gamma w^+` of the paper.

    Attributes:
      gamma: amplification of same-sign contributions, >= 0 (0 gives LRP-epsilon).
      eps: stabiliser.
    """

    gamma: float = 0.25
    eps: float = 1e-6

    def per_sign(self, aff: Affine, a: Array, R: Array, za: Array | None = None):
        """``(W^T u, |W|^T v)``: relevance per unit of a is ``W^T u + sign(a) |W|^T v``.

        `za` (``W a``, without bias) may be given when known, e.g. from the layer's output.
        """
        gamma = self.gamma
        za_computed, zabs, cotangents = _signed_parts(aff, a)
        za = za_computed if za is None else za
        b = aff.bias
        zk = za if b is None else za + b
        positive = zk > 0
        # Outputs > 0 amplify their positive contributions (a+ w+, a- w-) and positive bias,
        # outputs <= 0 their negative ones; see `_signed_parts` for the identities.
        z_up, z_down = za + gamma * 0.5 * (za + zabs), za + gamma * 0.5 * (za - zabs)
        if b is not None:
            z_up, z_down = z_up + b + gamma * _pos(b), z_down + b + gamma * _neg(b)
        s = R / stabilize(jnp.where(positive, z_up, z_down), self.eps)
        signed = jnp.where(positive, s, -s)
        return cotangents((1 + 0.5 * gamma) * s, 0.5 * gamma * signed)

    def __call__(self, layer, a, R):
        c_w, c_abs = self.per_sign(_affine(layer, a, self, entrywise=True), a, R)
        return a * c_w + jnp.abs(a) * c_abs

    def backward(self, layer, a, y, c):
        aff = _affine(layer, a, self, entrywise=True)
        za = y if aff.bias is None else y - aff.bias  # the forward already computed W a
        c_w, c_abs = self.per_sign(aff, a, y * c, za=za)
        c_in = c_w + jnp.where(a >= 0, c_abs, -c_abs)
        return c_in, a * c_in


def gamma(gamma: float = 0.25, eps: float = 1e-6) -> Gamma:
    """LRP-gamma; see `Gamma`."""
    return Gamma(float(gamma), float(eps))


def _hashable(x: Any) -> Any:
    return tuple(float(v) for v in np.ravel(np.asarray(x))) if np.ndim(x) else float(x)


@dataclasses.dataclass(frozen=True)
class ZBox(Rule):
    r"""LRP-z^B for the input layer (Montavon et al. 2017; Montavon et al. 2019, Sec. 10.2.3).

    .. math:: R_i = \sum_j \frac{x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}
                               {\sum_i (x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-)} R_j

    for inputs bounded by :math:`l_i \le x_i \le h_i`; the bias is not used.

    Attributes:
      low, high: bounds, scalars or per-channel tuples broadcastable to the input
        (e.g. 3 values for RGB); (0, 1) for images in [0, 1].
      eps: stabiliser.
    """

    low: Any = 0.0
    high: Any = 1.0
    eps: float = 1e-6

    def __call__(self, layer, a, R):
        aff = _affine(layer, a, self, entrywise=True)
        lo = jnp.broadcast_to(jnp.asarray(self.low, a.dtype), a.shape)
        hi = jnp.broadcast_to(jnp.asarray(self.high, a.dtype), a.shape)
        wp, wn, w = _pos(aff.kernel), _neg(aff.kernel), aff.kernel

        def z_box(x, l, h):
            return aff.apply(x, w, None) - aff.apply(l, wp, None) - aff.apply(h, wn, None)

        return _scaled(z_box, (a, lo, hi), R, self.eps)


def zbox(low: Any = 0.0, high: Any = 1.0, eps: float = 1e-6) -> ZBox:
    """LRP-z^B; see `ZBox`. `low`, `high`: scalars or per-channel arrays."""
    return ZBox(_hashable(low), _hashable(high), float(eps))


def _by_weights(rho: Callable[[Array], Array], rule: Rule, layer, a: Array, R: Array) -> Array:
    """Shares by rho(w) alone, whatever the input:
    R_i = sum_j rho(w_ij) / sum_i' rho(w_i'j) R_j (flat: rho = 1; w^2: rho = w^2)."""
    aff = _affine(layer, a, rule, entrywise=True)
    kernel = rho(aff.kernel)
    return _scaled(lambda x: aff.apply(x, kernel, None), (jnp.ones_like(a),), R, rule.eps)


@dataclasses.dataclass(frozen=True)
class Flat(Rule):
    r"""Flat rule (Lapuschkin et al. 2019): every connected input gets an equal share.

    .. math:: R_i = \sum_j \frac{1}{\sum_{i'} 1} R_j

    where the sum over :math:`i'` counts the inputs connected to output j (for a padded
    convolution, fewer at the border). Independent of the input values.

    Attributes:
      eps: stabiliser.
    """

    eps: float = 1e-6

    def __call__(self, layer, a, R):
        return _by_weights(jnp.ones_like, self, layer, a, R)


def flat(eps: float = 1e-6) -> Flat:
    """The flat rule; see `Flat`."""
    return Flat(float(eps))


@dataclasses.dataclass(frozen=True)
class WSquare(Rule):
    r"""w^2 rule (Montavon et al. 2017): shares proportional to squared weights.

    .. math:: R_i = \sum_j \frac{w_{ij}^2}{\sum_{i'} w_{i'j}^2} R_j

    Attributes:
      eps: stabiliser.
    """

    eps: float = 1e-6

    def __call__(self, layer, a, R):
        return _by_weights(jnp.square, self, layer, a, R)


def wsquare(eps: float = 1e-6) -> WSquare:
    """The w^2 rule; see `WSquare`."""
    return WSquare(float(eps))


# ---------------------------------------------------------------------------------------
# Rules for any layer, and for glue


@dataclasses.dataclass(frozen=True)
class Identity(Rule):
    r"""Pass rule: :math:`R_{in} = R` (reshaped), for layers whose output is their input up
    to an elementwise change (batch-norm, activations). AttnLRP's rule for elementwise
    non-linearities such as GELU, SiLU or tanh (Achtibat et al. 2024, Prop. 3.1): with
    :math:`c = R / y`, :math:`c_{in} = c \odot y \oslash a`."""

    def __call__(self, layer, a, R):
        if R.size != a.size:
            raise LayerError(
                f"rule 'identity' needs as many outputs as inputs, "
                f"{getattr(unbound(layer), '__name__', type(unbound(layer)).__name__)} maps "
                f"{a.shape} to {R.shape}"
            )
        return R.reshape(a.shape)


def identity() -> Identity:
    """The pass (identity) rule; see `Identity`."""
    return Identity()


@dataclasses.dataclass(frozen=True)
class Gradient(Rule):
    r"""Relevance along the layer's own gradient: :math:`R_{in} = a \odot J^\top (R \oslash y)`.

    The rule for positively homogeneous parameter-free layers (ReLU, dropout in eval mode,
    reshapes, max-pooling), where it passes relevance through unchanged in total; for
    max-pooling it is winner-take-all (Montavon et al. 2019, Sec. 10.2.2: relevance to the
    maximum of each window; ties share it). On a softmax it is AttnLRP's softmax rule
    (Achtibat et al. 2024, Prop. 3.3): :math:`R_i = x_i (R_i - s_i \sum_j R_j)`, the
    bias's share absorbed. The engine computes it without the division.
    """

    def __call__(self, layer, a, R):
        y, vjp = jax.vjp(layer, a)
        return a * vjp(_safe_divide(R, y))[0]

    def backward(self, layer, a, y, c):
        _, vjp = jax.vjp(layer, a)
        c_in = vjp(c)[0]
        return c_in, a * c_in


def gradient() -> Gradient:
    """Relevance along the gradient; see `Gradient`."""
    return Gradient()


@dataclasses.dataclass(frozen=True)
class Uniform(Rule):
    r"""AttnLRP's uniform rule for a product of n input-dependent factors (Achtibat et al.
    2024, Prop. 3.2): each factor gets an equal share of its gradient times input,

    .. math:: R_{x_i} = \frac{1}{n} x_i \odot \frac{\partial y}{\partial x_i}^\top
                        \frac{R}{y}

    which for a multilinear ``y`` (``x * y``, ``q @ k.T``, ``attn @ v``, einsum) splits the
    relevance equally and conserves it. ``a`` is the tuple of factors.
    """

    def __call__(self, layer, a, R):
        y, vjp = jax.vjp(layer, *a)
        return tuple(x * g / len(a) for x, g in zip(a, vjp(_safe_divide(R, y)), strict=True))

    def backward(self, layer, a, y, c):
        _, vjp = jax.vjp(layer, *a)
        c_in = tuple(g / len(a) for g in vjp(c))
        return c_in, tuple(x * g for x, g in zip(a, c_in, strict=True))


def uniform() -> Uniform:
    """AttnLRP's uniform rule for products; see `Uniform`."""
    return Uniform()


@dataclasses.dataclass(frozen=True)
class HoldConstant(Rule):
    r"""CP-LRP (Ali et al. 2022): the output is held constant, it passes no relevance, and
    products with it are linear maps of their other factor. On attention's softmax, all of
    a head's relevance goes to the values: :math:`R_{in} = 0` here."""

    def __call__(self, layer, a, R):
        return jnp.zeros_like(a)

    def backward(self, layer, a, y, c):
        return jnp.zeros_like(a), jnp.zeros_like(a)


def hold_constant() -> HoldConstant:
    """CP-LRP's rule for attention weights; see `HoldConstant`."""
    return HoldConstant()


@dataclasses.dataclass(frozen=True)
class Embedding(Rule):
    r"""Token embeddings: the relevance of a token is that of its embedding vector,
    :math:`R_t = \sum_d R_{t,d}`; ``a`` holds integer token ids (N, ...)."""

    def __call__(self, layer, a, R):
        return jnp.sum(R, axis=-1)

    def backward(self, layer, a, y, c):
        return None, jnp.sum(y * c, axis=-1)


def embedding() -> Embedding:
    """Relevance per token of an embedding layer; see `Embedding`."""
    return Embedding()


@dataclasses.dataclass(frozen=True)
class Proportional(Rule):
    r"""Max-pooling handled as sum-pooling: each input of a window gets a share of the
    window's relevance proportional to its activation,
    :math:`R_i = a_i / \mathrm{stabilize}(\sum_{i' \in w} a_{i'}) \cdot R_w`
    (Montavon et al. 2019, Sec. 10.2.2). The alternative to winner-take-all (`gradient`).

    Attributes:
      eps: stabiliser.
    """

    eps: float = 1e-6

    def __call__(self, layer, a, R):
        pool = unbound(layer)
        if not isinstance(pool, MaxPool):
            raise LayerError(
                f"rule 'proportional' is for MaxPool layers, not {type(pool).__name__}"
            )
        window = pool.window
        aw = _windowed(a, window)
        share = aw / stabilize(jnp.sum(aw, axis=_window_axes(window), keepdims=True), self.eps)
        return _unwindowed(share * _upsample(R, window), a.shape)


def proportional(eps: float = 1e-6) -> Proportional:
    """Max-pooling as sum-pooling; see `Proportional`."""
    return Proportional(float(eps))
