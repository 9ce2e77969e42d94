r"""The LRP engine: one jit-compiled, vmappable pass of `jax.vjp` over a rule-modified model.

How it works. Inside the traced function, the model is rebuilt from its state and every
layer (a module with no sub-modules, or a module the composite maps as one unit) is
replaced by a probe that calls it, with the arguments the model passes, through a
`jax.custom_vjp` (`lrpjax.core.tracing`): the forward value is the layer's own, the
backward applies the layer's rule. What flows backwards between layers is
:math:`c = R / a`, the relevance per unit of activation. The forward pass is traced to a
jaxpr and evaluated again by `lrpjax.core.glue`, which lets ordinary autodiff handle the
linear and homogeneous glue code (reshapes, residual additions, ReLUs written as
functions), where it is conservative: at a sum :math:`a_1 + a_2` each summand gets
:math:`R_i = a_i c`, its proportional share. Elementwise activations, products of two
input-dependent tensors and softmaxes get AttnLRP's rules; anything else is refused with a
`LayerError`. A layer's probe receives :math:`R_{out} = y \odot c_{out}` and hands back
:math:`c_{in} = R_{in} \oslash a`. The exact :math:`R_{in}` of every layer leaves through
the cotangent of a zero "probe" input, which is how `layerwise=True` reads the relevance at
every layer without a second pass.

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
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core import checks, compilation, glue, structure, tracing
from lrpjax.core import composites as composites_lib
from lrpjax.core import linen as linen_lib
from lrpjax.core import rules as rules_lib
from lrpjax.core.layer_types import LayerError
from lrpjax.core.tracing import traced_units

__all__ = [
    "INITS",
    "Explanation",
    "LayerError",
    "explain",
    "explainer",
    "layer_calls",
    "output_relevance",
    "resolve_rules",
    "traced_units",
]

INITS = ("logit", "probability", "one", "sglrp")


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


def _plan(
    model: nnx.Module, x, composite: str | composites_lib.Composite | Mapping
) -> tuple[composites_lib.Composite, tracing.Plan]:
    model = linen_lib.convert(model, x)  # bridged Linen modules as NNX layers
    graphdef, state = nnx.split(model)
    composite = composites_lib.get(composite)
    return composite, tracing.record(graphdef, state, composite, x)


def layer_calls(
    model: nnx.Module, x, composite: str | composites_lib.Composite | Mapping = "epsilon"
) -> list[tuple[str, nnx.Module]]:
    """The units of `model` as (path, layer) in the order a call on x (N, ...) runs them."""
    _, plan = _plan(model, x, composite)
    return [(path, plan.units[path]) for path in plan.calls]


def resolve_rules(
    model: nnx.Module,
    x,
    composite: str | composites_lib.Composite | Mapping = composites_lib.DEFAULT,
) -> dict[str, rules_lib.Rule]:
    """The rule a composite gives each layer of a model: what `explain` would apply.

    Args:
      model: a Flax NNX model, as for `explain`.
      x: (N, ...) example input; only its shape and dtype matter (they decide which layers
        run, and which take the input: the `composites.FIRST` position).
      composite: as for `explain` (default `lrpjax.core.composites.DEFAULT`).

    Returns:
      ``{layer path: rule}`` in call order, with the paths of `layer_calls`, of
      ``explain(..., layerwise=True)`` and of the ``masks`` of `explainer`. Where a layer's
      output only feeds a ReLU, or its input is >= 0 by the model's structure, `explain`
      runs an exact cheaper form of the rule (`lrpjax.core.structure`); the rules here are
      the composite's.

    Raises:
      LayerError: for a layer without a rule, or a path key of the composite that matches
        no layer.
    """
    composite, plan = _plan(model, x, composite)
    return composite.resolve(plan)


def explainer(
    model: nnx.Module,
    *,
    composite: str | composites_lib.Composite | Mapping = composites_lib.DEFAULT,
    init: str | Callable = "logit",
    layerwise: bool = False,
) -> tuple[Callable, nnx.State]:
    """The explanation as a pure function, for `jax.jit`, `jax.vmap` and sharding.

    Compile it with `lrpjax.jit` (`jax.jit` with the XLA options lrpjax uses on CPU, about
    1.8x faster there; see `lrpjax.core.compilation`) or with `jax.jit` itself.

    Args:
      model: a Flax NNX model (its current state is taken; it is explained in eval mode).
      composite, init, layerwise: as for `explain`.

    Returns:
      ``(fn, state)``: ``fn(state, x, target, masks=None) -> Explanation``, a pure function
      of arrays, with ``target`` an int array (N,) or (N, K) (K targets per image share one
      forward pass; -1 means the predicted class); and the model's state to call it with.
      ``masks`` conditions the explanation (Concept Relevance Propagation, Achtibat et al.
      2023): ``{layer path: mask}``, each mask broadcastable to that layer's output (e.g.
      (N, 1, 1, C) for channels), multiplies the relevance at the layer's output, so that
      only the chosen neurons' relevance is propagated to the input.
    """
    linen_lib.check_converted(model)  # no input here to convert bridged Linen modules with
    graphdef, state = nnx.split(model)
    return _explain_fn(graphdef, composites_lib.get(composite), init, layerwise), state


@lru_cache(maxsize=64)
def _explain_fn(graphdef, composite, init, layerwise) -> Callable:
    def fn(state, x, target, masks=None):
        graph, state = tracing.canonized(graphdef, state, composite, x)
        plan = tracing.record(graph, state, composite, x)
        model, _, tape = tracing.instrumented(graph, state, composite, plan.glue_paths)
        tape.rules = composite.resolve(plan)
        unknown = set(masks or {}) - set(plan.calls)
        if unknown:
            raise LayerError(
                f"masks for unknown layers {sorted(unknown)}; the layers are {list(plan.calls)}"
            )
        tape.masks = dict(masks or {})
        zeros = {p: jnp.zeros(s.shape, s.dtype) for p, s in plan.shapes.items()}

        def forward(x, probes):
            tape.probes = probes
            return model(x)

        closed, _ = glue.strip_output_softmax(jax.make_jaxpr(forward)(x, zeros))
        gates = tracing.find_gates(closed.jaxpr, zeros)
        for path in structure.rectified(closed.jaxpr, gates, plan, tape.rules):
            tape.rules[path] = tape.rules[path].for_rectified_output()
        for path in structure.nonnegative_inputs(closed.jaxpr, gates, plan):
            tape.rules[path] = tape.rules[path].for_nonnegative_input()
        float_input = jnp.issubdtype(x.dtype, jnp.floating)

        def interpreted(x, probes):
            args = [x, *jax.tree.leaves(probes)]
            relevant = [float_input] + [True] * (len(args) - 1)
            outs, _ = glue.evaluate(
                closed.jaxpr, closed.consts, args, relevant, composite.glue_rule
            )
            return outs[0]

        logits, vjp = jax.vjp(interpreted, x, zeros)
        predicted = jnp.argmax(logits, axis=-1)
        resolved = jnp.where(
            target < 0, predicted.reshape(predicted.shape + (1,) * (target.ndim - 1)), target
        )

        def backward(t):
            R_top = output_relevance(logits, t, init)
            c_x, R_layers = vjp(rules_lib.safe_per_unit(R_top, logits).astype(logits.dtype))
            direct = [R_layers[p].reshape(x.shape) for p in plan.takes_input]
            if float_input:
                relevance = x * c_x
                if direct:  # rules like flat or z^B give relevance to zero inputs, too
                    relevance = relevance + jnp.where(jnp.abs(x) > rules_lib.TINY, 0.0, sum(direct))
            else:  # token ids: the relevance of their embeddings
                relevance = sum(direct) if direct else jnp.zeros(x.shape, logits.dtype)
            ordered = {p: R_layers[p] for p in plan.calls} if layerwise else None
            return relevance, ordered

        if resolved.ndim == 2:
            relevance, layers = jax.vmap(backward, in_axes=1, out_axes=1)(resolved)
        else:
            relevance, layers = backward(resolved)
        return Explanation(relevance, logits, resolved, layers)

    return fn


@lru_cache(maxsize=64)
def _jitted(graphdef, composite, init, layerwise, options):
    """`options` (the compiler options, as a tuple) only keys the cache: switching them with
    `lrpjax.core.compilation.jax_defaults` gives another compiled function."""
    del options
    return compilation.jit(_explain_fn(graphdef, composite, init, layerwise))


def explain(
    model: nnx.Module,
    x: jax.Array | np.ndarray,
    *,
    composite: str | composites_lib.Composite | Mapping = composites_lib.DEFAULT,
    target: int | jax.Array | np.ndarray | None = None,
    init: str | Callable = "logit",
    layerwise: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Explain a batch of predictions with LRP.

    Args:
      model: a Flax NNX model built from layers lrpjax knows (`lrpjax.core.layer_types`: dense,
        convolution, normalisation, embedding, pooling, dropout) and glue code between them
        (`lrpjax.core.glue`: activations, residual additions, attention, reshapes); explained in
        eval mode.
      x: (N, ...) batch of inputs: finite floats, or integer token ids for a model whose
        input layer is an `nnx.Embed`.
      composite: a preset name (default `lrpjax.core.composites.DEFAULT`,
        ``"epsilon_gamma_box"``: z^B on the input layer, gamma on convolutions, epsilon on
        dense layers; ``"epsilon"`` for LRP-epsilon everywhere, ``"zero"`` for LRP-0), a
        `lrpjax.core.composites.Composite`, or a dict of layer type / group / path / position ->
        rule. A path key that matches no layer is an error.
      target: None (the predicted class), an int, an (N,) int array, or an (N, K) int
        array for K explanations per image from one forward pass.
      init: output relevance: ``"logit"``, ``"probability"``, ``"one"``, ``"sglrp"``,
        or a callable ``init(logits, target) -> (N, C)``.
      layerwise: also return the relevance at the input of every layer.

    Returns:
      Relevance with the shape of x ((N, K, ...) for an (N, K) target); with
      ``layerwise=True``, ``(relevance, {layer path: relevance at that layer's input})``.

    Raises:
      ValueError: for uint8, empty, NaN/Inf or wrongly shaped inputs, an unknown init or
        composite, or a bad target.
      LayerError: for a layer without a rule, or glue code lrpjax cannot pass relevance
        through.
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError("explain() checks its input; under jit/vmap use lrpjax.explainer()")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {x.shape}")
    if not callable(init) and init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)} or a callable")
    composite = composites_lib.get(composite)
    model = linen_lib.convert(model, x)  # bridged Linen modules (ToNNX) as NNX layers
    graphdef, state = nnx.split(model)
    num_classes, plan = checks.check_input(graphdef, state, composite, x)
    user_target = target is not None
    target = jnp.asarray(-1 if target is None else target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"target must be integer class indices, got dtype {target.dtype}")
    if target.ndim == 0:
        target = jnp.full((x.shape[0],), target)
    if target.ndim not in (1, 2) or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"target must be an int, (N,) or (N, K) for N={x.shape[0]}, got {target.shape}"
        )
    if user_target and bool(jnp.any((target < 0) | (target >= num_classes))):
        raise ValueError(
            f"target outside the model's classes 0..{num_classes - 1}: {np.unique(target)}"
        )
    options = tuple(sorted((compilation.compiler_options() or {}).items()))
    out = _jitted(graphdef, composite, init, layerwise, options)(state, x, target)
    if not layerwise:
        return out.relevance
    return out.relevance, {path: out.layers[path] for path in plan.calls}
