r"""The LRP engine: one jit-compiled, vmappable pass of `jax.vjp` over a rule-modified model.

How it works. Inside the traced function, the model is rebuilt from its state and every
layer (a module with no sub-modules) is replaced by a `_Probe` that calls it through a
`jax.custom_vjp`: the forward value is the layer's own, the backward applies the layer's
rule. What flows backwards between layers is :math:`c = R / a`, the relevance per unit of
activation, so that the model's own glue code (ReLUs written as functions, reshapes,
max-pooling, residual additions) is handled by ordinary autodiff and stays conservative:
at a sum :math:`a_1 + a_2` each summand gets :math:`R_i = a_i c`, its proportional share;
at a max-pool the maximum gets all of it. A layer's probe receives
:math:`R_{out} = y \odot c_{out}` and hands back :math:`c_{in} = R_{in} \oslash a`. The
exact :math:`R_{in}` of every layer leaves through the cotangent of a zero "probe" input,
which is how `layerwise=True` reads the relevance at every layer without a second pass.

One consequence: relevance can only rest on non-zero activations (:math:`R = a c`). Rules
whose relevance does not scale with the input (`rules.flat`, `rules.wsquare`, `rules.zbox`,
`rules.identity` on a layer fed by a ReLU) may give relevance to zero inputs; at the model
input (also behind `Flatten` or `Dropout` layers) the engine adds it back exactly, deeper in
the network it is dropped. Use those rules on the first layer, as the presets do.

Output relevance (``init``) is put on the logits: ``"logit"`` (the target's logit),
``"probability"`` (its softmax probability, the reference's definition), ``"one"``, or
``"sglrp"`` (softmax-gradient LRP, Iwana et al. 2019: the gradient of the target's
probability with respect to the logits, :math:`p_t(\delta_{tk} - p_k)`, which is positive
for the target and negative for competing classes and so gives contrastive maps).

References:
  Bach et al. (2015), PLoS ONE 10(7). Montavon et al. (2019), LNCS 11700.
  Iwana, Kuroki, Uchida (2019). Explaining convolutional neural networks using softmax
  gradient layer-wise relevance propagation. ICCV Workshops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from lrpjax import compilation
from lrpjax import composites as composites_lib
from lrpjax import rules as rules_lib
from lrpjax.layers import Flatten

__all__ = [
    "INITS",
    "Explanation",
    "LayerError",
    "explain",
    "explainer",
    "layer_calls",
    "output_relevance",
]

INITS = ("logit", "probability", "one", "sglrp")
# |a| below this carries no relevance per unit (c = R / a would overflow).
_TINY = 1e-20


class LayerError(TypeError):
    """The model holds a layer that lrpjax cannot explain with the composite given."""


class Explanation(NamedTuple):
    """What `explain` returns.

    Attributes:
      relevance: relevance at the input, shape of x; (N, K, ...) for K targets per image.
      logits: (N, C) model output.
      target: (N,) or (N, K) the explained classes.
      layers: relevance at the input of every layer, keyed by the layer's path ('/'-joined
        attribute names), or None unless ``layerwise=True``.
    """

    relevance: jax.Array
    logits: jax.Array
    target: jax.Array
    layers: dict[str, jax.Array] | None


def output_relevance(logits: jax.Array, target: jax.Array, init: str | Callable) -> jax.Array:
    """Relevance put on the output.

    Args:
      logits: (N, C).
      target: (N,) int class per image.
      init: ``"logit"``, ``"probability"``, ``"one"``, ``"sglrp"``, or a callable
        ``init(logits, target) -> (N, C)``.

    Returns:
      (N, C) relevance: zero but at the target, except for ``"sglrp"`` (all classes) and
      callables.
    """
    onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    if callable(init):
        return init(logits, target)
    if init == "logit":
        return onehot * logits
    if init == "probability":
        return onehot * jax.nn.softmax(logits)
    if init == "one":
        return onehot
    if init == "sglrp":
        p = jax.nn.softmax(logits)
        p_target = jnp.sum(onehot * p, axis=-1, keepdims=True)
        return p_target * (onehot - p)
    raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)} or a callable")


def _safe_per_unit(R: jax.Array, a: jax.Array) -> jax.Array:
    ok = jnp.abs(a) > _TINY
    return jnp.where(ok, R / jnp.where(ok, a, 1.0), 0.0)


def _path_str(path: tuple) -> str:
    return "/".join(map(str, path))


def _has_own_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


class _Tape:
    """Trace-time state shared by the probes of one model: call order, rules, probes."""

    def __init__(self):
        self.recording = True
        self.input_like: list[Any] = []  # the model input, and it flattened by layers
        self.calls: list[str] = []
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.takes_input: set[str] = set()
        self.rules: dict[str, Callable] = {}
        self.probes: dict[str, jax.Array] = {}


def _fast_forward(layer: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """The layer's forward; linear layers through their `rules.as_affine` view, which runs
    RGB-like input convolutions as `few_channel_conv` and the rest as the layer itself."""
    if isinstance(layer, nnx.Linear | nnx.Conv):
        affine = rules_lib.as_affine(layer)
        return lambda a: affine.apply(a, affine.kernel, affine.bias)
    return layer


class _Probe:
    """Stands in for a layer during tracing; applies its rule on the backward pass."""

    def __init__(self, layer: nnx.Module, path: str, tape: _Tape):
        self.layer, self.path, self.tape = layer, path, tape

    def __call__(self, a: jax.Array) -> jax.Array:
        tape, layer, path = self.tape, self.layer, self.path
        if tape.recording:
            if path in tape.shapes:
                raise LayerError(
                    f"layer {path!r} is called more than once; lrpjax needs one call per layer"
                )
            tape.calls.append(path)
            tape.shapes[path] = jax.ShapeDtypeStruct(a.shape, a.dtype)
            if any(a is t for t in tape.input_like):
                tape.takes_input.add(path)
            y = layer(a)
            if path in tape.takes_input and isinstance(layer, Flatten | nnx.Dropout):
                tape.input_like.append(y)  # the next layer still sees the input, reshaped
            return y
        rule = tape.rules[path]
        follows_gradient = isinstance(rule, rules_lib.Rule) and rule.fn is rules_lib._gradient
        rule_per_unit = rules_lib.per_unit(rule)
        forward = _fast_forward(layer)

        @jax.custom_vjp
        def relevance_gate(a, probe):
            del probe
            return forward(a)

        def fwd(a, probe):
            y = forward(a)
            return y, (a, y)

        def bwd(residuals, c_out):
            a, y = residuals
            if follows_gradient:  # c passes by the chain rule, no division needed
                _, vjp = jax.vjp(layer, a)
                c_in = vjp(c_out)[0]
                return c_in, a * c_in
            if rule_per_unit is not None:  # same rule, no recomputed z, no division by a
                c_in = rule_per_unit(layer, a, y, c_out)
                return c_in, a * c_in
            R_in = rule(layer, a, y * c_out)
            return _safe_per_unit(R_in, a), R_in

        relevance_gate.defvjp(fwd, bwd)
        return relevance_gate(a, tape.probes[path])


def _instrument(model: nnx.Module, tape: _Tape) -> tuple[nnx.Module, dict[str, nnx.Module]]:
    """Replace every layer of `model` (a fresh copy inside the trace) by a `_Probe`.

    Returns the instrumented model and its layers keyed by path.
    """
    layer_paths = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.RngStream | nnx.Rngs):
            continue
        children = [
            c
            for _, c in nnx.iter_children(module)
            if isinstance(c, nnx.Module) and not isinstance(c, nnx.RngStream | nnx.Rngs)
        ]
        if children:
            if _has_own_params(module):
                raise LayerError(
                    f"module {_path_str(path) or '<root>'} ({type(module).__name__}) has both "
                    "parameters and sub-modules; lrpjax explains layers, not such hybrids"
                )
            continue
        layer_paths.append(path)
    if layer_paths == [()]:  # the model is a single layer
        root = model

        class _Single(nnx.Module):
            def __init__(self):
                self.layer = root

            def __call__(self, x):
                return self.layer(x)

        model, layer_paths = _Single(), [("layer",)]
    layers = {}
    for path in layer_paths:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        layer = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
        probe = _Probe(layer, _path_str(path), tape)
        layers[probe.path] = layer
        if isinstance(path[-1], int):
            parent[path[-1]] = probe
        else:
            setattr(parent, path[-1], probe)
    return model, layers


def _recorded(model: nnx.Module, x) -> tuple[nnx.Module, dict[str, nnx.Module], _Tape]:
    """Instrument an eval-mode copy of `model` and record its layer calls on input like x."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    tape = _Tape()
    model, layers = _instrument(model, tape)

    def record(x):
        tape.input_like = [x]
        return model(x)

    jax.eval_shape(record, x)
    tape.recording = False
    return model, layers, tape


def layer_calls(model: nnx.Module, x) -> list[tuple[str, nnx.Module]]:
    """The layers of `model` as (path, layer) in the order a call on x (N, ...) runs them."""
    _, layers, tape = _recorded(model, x)
    return [(path, layers[path]) for path in tape.calls]


def _resolve_rules(model_probes: dict[str, nnx.Module], composite, tape: _Tape) -> None:
    with_params = [p for p in tape.calls if nnx.state(model_probes[p], nnx.Param)]
    first = with_params[0] if with_params else None
    last = with_params[-1] if with_params else None
    for path in tape.calls:
        layer = model_probes[path]
        positions = frozenset(
            k for k, p in ((composites_lib.FIRST, first), (composites_lib.LAST, last)) if p == path
        )
        rule = composite.rule_for(path, layer, positions)
        if rule is None:
            raise LayerError(
                f"no rule for layer {path!r} ({type(layer).__name__}) in composite "
                f"{composite.name}: map its type or path to a rule from lrpjax.rules"
            )
        tape.rules[path] = rule


def explainer(
    model: nnx.Module,
    *,
    composite: str | composites_lib.Composite | Mapping = "epsilon",
    init: str | Callable = "logit",
    layerwise: bool = False,
) -> tuple[Callable, nnx.State]:
    """The explanation as a pure function, for `jax.jit`, `jax.vmap` and sharding.

    Compile it with `lrpjax.jit` (`jax.jit` with the XLA options lrpjax uses on CPU, about
    1.8x faster there; see `lrpjax.compilation`) or with `jax.jit` itself.

    Args:
      model: a Flax NNX model (its current state is taken; it is explained in eval mode).
      composite, init, layerwise: as for `explain`.

    Returns:
      ``(fn, state)``: ``fn(state, x, target) -> Explanation``, a pure function of arrays,
      with ``target`` an int array (N,) or (N, K) (K targets per image share one forward
      pass; -1 means the predicted class); and the model's state to call it with.
    """
    graphdef, state = nnx.split(model)
    return _explain_fn(graphdef, composites_lib.get(composite), init, layerwise), state


@lru_cache(maxsize=64)
def _explain_fn(graphdef, composite, init, layerwise) -> Callable:
    def fn(state, x, target):
        model, layers, tape = _recorded(nnx.merge(graphdef, state), x)
        fn.call_order = tuple(tape.calls)  # jit returns dicts key-sorted; explain reorders
        _resolve_rules(layers, composite, tape)
        zeros = {p: jnp.zeros(s.shape, s.dtype) for p, s in tape.shapes.items()}

        def forward(x, probes):
            tape.probes = probes
            return model(x)

        _check_glue(jax.make_jaxpr(forward)(x, zeros).jaxpr)
        logits, vjp = jax.vjp(forward, x, zeros)
        predicted = jnp.argmax(logits, axis=-1)
        resolved = jnp.where(
            target < 0, predicted.reshape(predicted.shape + (1,) * (target.ndim - 1)), target
        )

        def backward(t):
            R_top = output_relevance(logits, t, init)
            c_x, R_layers = vjp(_safe_per_unit(R_top, logits).astype(logits.dtype))
            relevance = x * c_x
            direct = [R_layers[p].reshape(x.shape) for p in tape.takes_input]
            if direct:  # rules like flat or z^B give relevance to zero inputs, too
                relevance = relevance + jnp.where(jnp.abs(x) > _TINY, 0.0, sum(direct))
            ordered = {p: R_layers[p] for p in tape.calls} if layerwise else None
            return relevance, ordered

        if resolved.ndim == 2:
            relevance, layers = jax.vmap(backward, in_axes=1, out_axes=1)(resolved)
        else:
            relevance, layers = backward(resolved)
        return Explanation(relevance, logits, resolved, layers)

    return fn


# Operations that are not positively homogeneous: outside a layer with a rule, relevance
# through them would not be conserved, and the map would be silently wrong.
_NON_HOMOGENEOUS = frozenset(
    [
        "tanh",
        "logistic",
        "exp",
        "exp2",
        "log",
        "log1p",
        "expm1",
        "erf",
        "erfc",
        "erf_inv",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "atan2",
        "sinh",
        "cosh",
        "asinh",
        "acosh",
        "atanh",
        "sqrt",
        "rsqrt",
        "cbrt",
        "pow",
        "integer_pow",
        "square",
        "lgamma",
        "digamma",
    ]
)


def _check_glue(jaxpr) -> None:
    """Refuse models whose code between layers applies non-homogeneous functions."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("custom_vjp_call"):
            continue  # a layer with its rule
        if name in _NON_HOMOGENEOUS:
            raise LayerError(
                f"the model applies `{name}` outside its layers (e.g. a functional activation "
                "such as tanh or sigmoid, a normalisation, or a softmax on the output); LRP "
                "through it would not conserve relevance. Return logits, and put such "
                "functions in an nnx.Module mapped to a rule in the composite."
            )
        for sub in jax_core.jaxprs_in_params(eqn.params):
            _check_glue(sub)


@lru_cache(maxsize=64)
def _jitted(graphdef, composite, init, layerwise, options):
    """`options` (the compiler options, as a tuple) only keys the cache: switching them with
    `lrpjax.compilation.jax_defaults` gives another compiled function."""
    del options
    return compilation.jit(_explain_fn(graphdef, composite, init, layerwise))


def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state, copy=True)(x)


def explain(
    model: nnx.Module,
    x: jax.Array | np.ndarray,
    *,
    composite: str | composites_lib.Composite | Mapping = "epsilon",
    target: int | jax.Array | np.ndarray | None = None,
    init: str | Callable = "logit",
    layerwise: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Explain a batch of predictions with LRP.

    Args:
      model: a Flax NNX model built from `nnx.Linear`, `nnx.Conv`, `nnx.BatchNorm`,
        pooling, activations and residual additions; explained in eval mode.
      x: (N, ...) batch of inputs (finite).
      composite: a preset name (``"epsilon"``, ``"epsilon_plus_flat"``, ...), a
        `lrpjax.composites.Composite`, or a dict of layer type / path / position -> rule.
      target: None (the predicted class), an int, an (N,) int array, or an (N, K) int
        array for K explanations per image from one forward pass.
      init: output relevance: ``"logit"``, ``"probability"``, ``"one"``, ``"sglrp"``,
        or a callable ``init(logits, target) -> (N, C)``.
      layerwise: also return the relevance at the input of every layer.

    Returns:
      Relevance with the shape of x ((N, K, ...) for an (N, K) target); with
      ``layerwise=True``, ``(relevance, {layer path: relevance at that layer's input})``.

    Raises:
      ValueError: for NaN/Inf inputs, an unknown init or composite, or a bad target.
      LayerError: for a layer without a rule.
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError("explain() checks its input; under jit/vmap use lrpjax.explainer()")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("input contains NaN or Inf values")
    if not callable(init) and init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)} or a callable")
    composite = composites_lib.get(composite)
    user_target = target is not None
    graphdef, state = nnx.split(model)
    target = jnp.asarray(-1 if target is None else target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"target must be integer class indices, got dtype {target.dtype}")
    if target.ndim == 0:
        target = jnp.full((x.shape[0],), target)
    if target.ndim not in (1, 2) or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"target must be an int, (N,) or (N, K) for N={x.shape[0]}, got {target.shape}"
        )
    num_classes = jax.eval_shape(partial(_logits, graphdef), state, x[:1]).shape[-1]
    if user_target and bool(jnp.any((target < 0) | (target >= num_classes))):
        raise ValueError(
            f"target outside the model's classes 0..{num_classes - 1}: {np.unique(target)}"
        )
    options = tuple(sorted((compilation.compiler_options() or {}).items()))
    out = _jitted(graphdef, composite, init, layerwise, options)(state, x, target)
    if not layerwise:
        return out.relevance
    order = _explain_fn(graphdef, composite, init, layerwise).call_order
    return out.relevance, {path: out.layers[path] for path in order}
