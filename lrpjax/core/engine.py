r"""The LRP engine: one jit-compiled, vmappable pass of `jax.vjp` over a rule-modified model.

How it works. Inside the traced function, the model is rebuilt from its state and every
layer (a module with no sub-modules, or a module the composite maps as one unit) is
replaced by a `_Probe` that calls it, with the arguments the model passes, through a
`jax.custom_vjp`: the forward value is the layer's own, the backward applies the layer's
rule. What flows backwards between layers is :math:`c = R / a`, the relevance per unit of
activation. The forward pass is traced to a jaxpr and evaluated again by `lrpjax.core.glue`, which
lets ordinary autodiff handle the linear and homogeneous glue code (reshapes, residual
additions, ReLUs written as functions), where it is conservative: at a sum
:math:`a_1 + a_2` each summand gets :math:`R_i = a_i c`, its proportional share. Elementwise
activations, products of two input-dependent tensors and softmaxes get AttnLRP's rules;
anything else is refused with a `LayerError`. A layer's probe receives
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

import fnmatch
import warnings
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from lrpjax.core import compilation, glue, layer_types
from lrpjax.core import composites as composites_lib
from lrpjax.core import linen as linen_lib
from lrpjax.core import rules as rules_lib
from lrpjax.core.layer_types import LayerError

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


def _path_str(path: tuple) -> str:
    return "/".join(map(str, path))


def _is_rng(module: Any) -> bool:
    return isinstance(module, nnx.RngStream | nnx.Rngs)


def _children(module: nnx.Module) -> list[tuple[Any, nnx.Module]]:
    return [
        (k, c) for k, c in nnx.iter_children(module) if isinstance(c, nnx.Module) and not _is_rng(c)
    ]


def _has_own_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _units(
    model: nnx.Module, composite: composites_lib.Composite, glue_paths: frozenset[str] = frozenset()
) -> list[tuple]:
    """Paths of the modules explained as one unit each: layers (no sub-modules) with a rule
    or parameters, and modules the composite maps by path or type (not walked into).
    Parameter-free modules of unknown type, and those in `glue_paths`, are glue:
    `lrpjax.core.glue` handles their code."""
    found = []

    def walk(path: tuple, module: nnx.Module) -> None:
        children = _children(module)
        if path and composite.explicit_rule(_path_str(path), module) is not None:
            found.append(path)
            return
        if children:
            for key, child in children:
                walk((*path, key), child)
            return
        if _path_str(path) in glue_paths:
            return
        known = composite.rule_for(_path_str(path), module, frozenset()) is not None
        if known or _has_own_params(module) or layer_types.is_affine(module):
            found.append(path)

    walk((), model)
    return found


class _Tape:
    """What one trace of the instrumented model sees; local to that trace.

    Recording (``probes is None``): the call order, each layer's input and which layers take
    the model's input. Explaining: the rules and the zero probes whose cotangents carry each
    layer's input relevance out.
    """

    def __init__(self):
        self.input_like: list[Any] = []
        self.calls: list[str] = []
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.takes_input: set[str] = set()
        self.rules: dict[str, rules_lib.Rule] = {}
        self.probes: dict[str, jax.Array] | None = None
        self.masks: Mapping[str, jax.Array] = {}
        self.repeated: set[str] = set()  # parameter-free layers called more than once


def _fast_forward(layer: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """The layer's forward; Linear and Conv through their affine view, which runs RGB-like
    input convolutions as `few_channel_conv` and the rest as the layer itself."""
    if isinstance(layer, nnx.Linear | nnx.Conv):
        affine = layer_types.as_affine(layer)
        return lambda a: affine.apply(a, affine.kernel, affine.bias)
    return layer


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


class _Probe:
    """Stands in for a layer during tracing; applies its rule on the backward pass."""

    def __init__(self, layer: nnx.Module, path: str, tape: _Tape):
        self.layer, self.path, self.tape = layer, path, tape

    def __call__(self, *args, **kwargs):
        tape, layer, path = self.tape, self.layer, self.path
        if not args or not _is_array(args[0]):
            raise LayerError(f"layer {path!r} is called without an array as its first argument")
        a = args[0]
        if tape.probes is None:
            return self._record(a, args, kwargs)
        # Other arguments: arrays pass as operands (zero cotangents), the rest is static.
        leaves, treedef = jax.tree.flatten((args[1:], kwargs))
        is_array = [_is_array(leaf) for leaf in leaves]
        static = [None if arr else leaf for leaf, arr in zip(leaves, is_array, strict=True)]

        def bound(side: tuple) -> Any:
            it = iter(side)
            filled = [next(it) if arr else leaf for leaf, arr in zip(static, is_array, strict=True)]
            rest, kw = jax.tree.unflatten(treedef, filled)
            return layer_types.Bound(layer, rest, kw) if rest or kw else layer

        plain = not leaves
        forward = _fast_forward(layer) if plain else None

        def call(a, side):
            return forward(a) if plain else bound(side)(a)

        @jax.custom_vjp
        def relevance_gate(a, probe, side, mask):
            del probe, mask
            return call(a, side)

        def fwd(a, probe, side, mask):
            y = call(a, side)
            return y, (a, side, y, mask)

        def _lrpjax_layer_bwd(residuals, c_out):
            a, side, y, mask = residuals
            if mask is not None:  # a condition (CRP): relevance of the chosen outputs only
                c_out = c_out * mask.astype(c_out.dtype)
            # Looked up when the backward is traced: the engine may refine a rule after
            # tracing the forward pass (`_rectified`).
            c_in, R_in = tape.rules[path].backward(bound(side), a, y, c_out)
            if jnp.issubdtype(a.dtype, jnp.floating):
                c_in = c_in.astype(a.dtype)
            else:  # integer inputs (tokens): their relevance leaves through the probe
                c_in = glue._zero_cotangent(a)
            probe = tape.probes[path]
            zeros = tuple(glue._zero_cotangent(s) for s in side)
            mask_cotangent = None if mask is None else jnp.zeros_like(mask)
            return c_in, R_in.astype(probe.dtype), zeros, mask_cotangent

        relevance_gate.defvjp(fwd, _lrpjax_layer_bwd)
        side = tuple(leaf for leaf, arr in zip(leaves, is_array, strict=True) if arr)
        return relevance_gate(a, tape.probes[path], side, tape.masks.get(path))

    def _record(self, a, args, kwargs):
        tape, path = self.tape, self.path
        if path in tape.shapes:
            if isinstance(self.layer, layer_types.PASS_THROUGH) and not _has_own_params(
                self.layer
            ):  # a reused ReLU or dropout: its gradient rule is what glue does anyway
                tape.repeated.add(path)
                return self.layer(*args, **kwargs)
            raise LayerError(
                f"layer {path!r} is called more than once; lrpjax needs one call per layer "
                "with parameters (use one module per call)"
            )
        y = self.layer(*args, **kwargs)
        if not _is_array(y):
            raise LayerError(
                f"layer {path!r} returns {type(y).__name__}, not an array; map a module "
                "around it, or map its parts, so that each unit returns one array"
            )
        tape.calls.append(path)
        dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else y.dtype
        tape.shapes[path] = jax.ShapeDtypeStruct(a.shape, dtype)
        if any(a is t for t in tape.input_like):
            tape.takes_input.add(path)
            if isinstance(self.layer, layer_types.RESHAPING):
                tape.input_like.append(y)  # the next layer still sees the input, reshaped
        return y


def _instrument(
    model: nnx.Module,
    composite: composites_lib.Composite,
    tape: _Tape,
    glue_paths: frozenset[str] = frozenset(),
) -> tuple[nnx.Module, dict[str, nnx.Module]]:
    """Replace every unit of `model` (a fresh copy inside the trace) by a `_Probe`.

    Returns the instrumented model and its units keyed by path.
    """
    paths = _units(model, composite, glue_paths)
    if paths == [()]:  # the model is a single layer
        root = model

        class _Single(nnx.Module):
            def __init__(self):
                self.layer = root

            def __call__(self, *args, **kwargs):
                return self.layer(*args, **kwargs)

        model, paths = _Single(), [("layer",)]
    units = {}
    for path in paths:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        layer = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
        probe = _Probe(layer, _path_str(path), tape)
        units[probe.path] = layer
        if isinstance(path[-1], int):
            parent[path[-1]] = probe
        else:
            setattr(parent, path[-1], probe)
    return model, units


def _instrumented(
    graphdef, state, composite, glue_paths: frozenset[str] = frozenset()
) -> tuple[nnx.Module, dict[str, nnx.Module], _Tape]:
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    tape = _Tape()
    model, units = _instrument(model, composite, tape, glue_paths)
    return model, units, tape


class _Plan(NamedTuple):
    calls: tuple[str, ...]
    shapes: dict[str, jax.ShapeDtypeStruct]
    takes_input: frozenset[str]
    units: dict[str, nnx.Module]
    glue_paths: frozenset[str]  # parameter-free layers called more than once: glue


def _record(graphdef, state, composite, x, glue_paths: frozenset[str] = frozenset()) -> _Plan:
    """The units of the model in call order, with their input shapes: an abstract
    evaluation of its own, whose results are returned, not left on any object."""
    model, units, tape = _instrumented(graphdef, state, composite, glue_paths)

    def record(x):
        tape.input_like = [x]
        return model(x)

    out = jax.eval_shape(record, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise LayerError(f"the model returns {type(out).__name__}; lrpjax explains one array")
    if tape.repeated:  # again, with the reused parameter-free layers as glue
        return _record(graphdef, state, composite, x, glue_paths | frozenset(tape.repeated))
    calls = tuple(tape.calls)
    return _Plan(calls, dict(tape.shapes), frozenset(tape.takes_input), units, glue_paths)


def traced_units(
    model: nnx.Module, x, composite: composites_lib.Composite
) -> tuple[Any, dict[int, str], dict[str, nnx.Module]]:
    """The model's forward pass as a jaxpr, with its units found in it: for canonizers,
    which need to know what feeds what.

    Returns:
      ``(closed_jaxpr, gates, units)``: ``gates`` maps the index of each top-level equation
      that calls a unit to its path (units inside jit-compiled functions of the model are
      not listed); ``units`` maps paths to modules. A gate equation's operands are
      ``(*consts, a, probe, *arrays, ...)`` with ``consts`` as many as its ``num_consts``
      parameter says; its one output is the unit's output.
    """
    graphdef, state = nnx.split(model)
    plan = _record(graphdef, state, composite, x)
    instrumented, _, tape = _instrumented(graphdef, state, composite, plan.glue_paths)
    tape.rules = {p: rules_lib.gradient() for p in plan.calls}  # no backward is taken
    zeros = {p: jnp.zeros(s.shape, s.dtype) for p, s in plan.shapes.items()}

    def forward(x, probes):
        tape.probes = probes
        return instrumented(x)

    closed = jax.make_jaxpr(forward)(x, zeros)
    return closed, _gates(closed.jaxpr, zeros), plan.units


def _gates(jaxpr, probes: Mapping[str, Any]) -> dict[int, str]:
    """Index of each top-level equation of `jaxpr` (traced as ``f(x, probes)``) that calls a
    unit, mapped to the unit's path."""
    probe_vars = dict(zip(jaxpr.invars[1:], sorted(probes), strict=True))
    gates = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name == "custom_vjp_call" and glue.is_gate(eqn):
            probe = eqn.invars[_operand_index(eqn) + 1]
            if probe in probe_vars:
                gates[i] = probe_vars[probe]
    return gates


def _operand_index(eqn) -> int:
    """Where a gate equation's layer input is among its operands (after its constants)."""
    return eqn.params.get("num_consts", 0)


def _rectified(jaxpr, gates: dict[int, str], plan: _Plan, rules: Mapping) -> set[str]:
    """Units whose output reaches the relevance only through a ReLU: the output's one use
    is a `layer_types.RECTIFIERS` unit whose rule passes relevance along the gradient or
    unchanged, or ``max(., 0)`` (also inside jit or custom_jvp, as `jax.nn.relu`). Their
    relevance is zero wherever their output is <= 0."""
    uses: dict[Any, list] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jax_core.Literal):
                uses.setdefault(v, []).append(eqn)
    outputs = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    by_eqn = {id(jaxpr.eqns[i]): path for i, path in gates.items()}

    def before_relu(i: int) -> bool:
        (y,) = jaxpr.eqns[i].outvars
        users = uses.get(y, [])
        if len(users) != 1 or y in outputs:
            return False
        (user,) = users
        relu_unit = by_eqn.get(id(user))
        if relu_unit is None:
            return _only_relu(user, y)
        return (
            isinstance(plan.units[relu_unit], layer_types.RECTIFIERS)
            and isinstance(rules[relu_unit], rules_lib.Gradient | rules_lib.Identity)
            and user.invars[_operand_index(user)] is y
            and user.invars.count(y) == 1
        )

    return {path for i, path in gates.items() if before_relu(i)}


#: Primitives whose output is >= 0 wherever their first operand is (the others are shapes
#: or indices): rearrangements, and maxima over windows or axes.
_SIGN_KEEPING_OPS = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "rev", "copy", "copy_p", "convert_element_type", "reduce_precision",
    "reduce_max", "reduce_window_max",
})  # fmt: skip


def _known_nonnegative(v, found: set) -> bool:
    """A literal >= 0, or a variable in `found`."""
    if isinstance(v, jax_core.Literal):
        return bool(np.all(np.asarray(v.val) >= 0))
    return v in found


def _nonnegative(jaxpr, known: set, gates: dict[int, str], plan: _Plan | None) -> set:
    """Variables of `jaxpr` that are >= 0 by its structure, given `known` ones: outputs of
    `layer_types.RECTIFIERS` units and of ``max`` with an operand >= 0 (`jax.nn.relu`),
    and what `layer_types.SIGN_KEEPING` units, `_SIGN_KEEPING_OPS`, ``concatenate``,
    ``pad`` (with a padding value >= 0) and calls (jit, custom_jvp) make of such values.
    Anything else is not known to be (an allow-list)."""
    found = set(known)

    def nonneg(v) -> bool:
        return _known_nonnegative(v, found)

    for i, eqn in enumerate(jaxpr.eqns):
        name, path = eqn.primitive.name, gates.get(i)
        if path is not None:
            unit = plan.units[path]
            out = isinstance(unit, layer_types.RECTIFIERS) or (
                isinstance(unit, layer_types.SIGN_KEEPING)
                and nonneg(eqn.invars[_operand_index(eqn)])
            )
        elif name == "max":
            out = any(nonneg(v) for v in eqn.invars)
        elif name in _SIGN_KEEPING_OPS:
            out = bool(eqn.invars) and nonneg(eqn.invars[0])
        elif name in ("concatenate", "pad"):
            out = all(nonneg(v) for v in eqn.invars)
        elif name in glue.CALL_PARAMS:
            inner = eqn.params[glue.CALL_PARAMS[name]]
            inner = getattr(inner, "jaxpr", inner)
            if len(inner.invars) == len(eqn.invars):
                given = {w for w, v in zip(inner.invars, eqn.invars, strict=True) if nonneg(v)}
                inside = _nonnegative(inner, given, {}, None)
                found.update(
                    v
                    for v, w in zip(eqn.outvars, inner.outvars, strict=True)
                    if _known_nonnegative(w, inside)
                )
            continue
        else:
            out = False
        if out:
            found.update(eqn.outvars)
    return found


def _nonnegative_inputs(jaxpr, gates: dict[int, str], plan: _Plan) -> set[str]:
    """Units whose input is >= 0 by the model's structure (see `_nonnegative`)."""
    found = _nonnegative(jaxpr, set(), gates, plan)
    return {
        path
        for i, path in gates.items()
        if jaxpr.eqns[i].invars[_operand_index(jaxpr.eqns[i])] in found
    }


def _only_relu(eqn, v) -> bool:
    """Whether `eqn`, the one use of v, is ``max(v, 0)``, or a call whose body uses v only
    so (recursively)."""
    name = eqn.primitive.name
    if name == "max":
        other = [u for u in eqn.invars if u is not v]
        return (
            len(other) == 1
            and isinstance(other[0], jax_core.Literal)
            and bool(np.all(np.asarray(other[0].val) == 0))
        )
    if name not in glue.CALL_PARAMS or eqn.invars.count(v) != 1:
        return False
    inner = eqn.params[glue.CALL_PARAMS[name]]
    inner = getattr(inner, "jaxpr", inner)
    w = inner.invars[eqn.invars.index(v)]
    users = [e for e in inner.eqns if any(u is w for u in e.invars)]
    return len(users) == 1 and w not in inner.outvars and _only_relu(users[0], w)


def _canonized(graphdef, state, composite, x) -> tuple[Any, nnx.State]:
    """Apply the composite's canonizers to a copy of the model (inside the trace)."""
    if not composite.canonizers:
        return graphdef, state
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    for canonizer in composite.canonizers:
        model = canonizer(model, x, composite)
    return nnx.split(model)


def layer_calls(
    model: nnx.Module, x, composite: str | composites_lib.Composite | Mapping = "epsilon"
) -> list[tuple[str, nnx.Module]]:
    """The units of `model` as (path, layer) in the order a call on x (N, ...) runs them."""
    model = linen_lib.convert(model, x)  # bridged Linen modules as NNX layers
    graphdef, state = nnx.split(model)
    plan = _record(graphdef, state, composites_lib.get(composite), x)
    return [(path, plan.units[path]) for path in plan.calls]


def _resolve_rules(plan: _Plan, composite: composites_lib.Composite) -> dict[str, rules_lib.Rule]:
    affine = [p for p in plan.calls if layer_types.is_affine(plan.units[p])]
    tokens = any(isinstance(plan.units[p], layer_types.EMBEDDINGS) for p in plan.takes_input)
    # FIRST is the input layer: none where the input is token ids, which an embedding takes.
    first = affine[0] if affine and not tokens else None
    last = affine[-1] if affine else None
    resolved = {}
    for path in plan.calls:
        layer = plan.units[path]
        positions = frozenset(
            k for k, p in ((composites_lib.FIRST, first), (composites_lib.LAST, last)) if p == path
        )
        rule = composite.rule_for(path, layer, positions)
        if rule is None:
            raise LayerError(
                f"no rule for layer {path!r} ({type(layer).__name__}) in composite "
                f"{composite.name}: map its type or path to a rule from lrpjax.core.rules"
            )
        resolved[path] = rule
    for key in composite.path_keys():
        if not any(fnmatch.fnmatchcase(path, key) for path in plan.units):
            raise LayerError(
                f"composite {composite.name} maps {key!r}, which matches no layer of the model;"
                f" its layer paths are {list(plan.calls)}"
            )
    return resolved


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
        graph, state = _canonized(graphdef, state, composite, x)
        plan = _record(graph, state, composite, x)
        model, _, tape = _instrumented(graph, state, composite, plan.glue_paths)
        tape.rules = _resolve_rules(plan, composite)
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
        gates = _gates(closed.jaxpr, zeros)
        for path in _rectified(closed.jaxpr, gates, plan, tape.rules):
            tape.rules[path] = tape.rules[path].for_rectified_output()
        for path in _nonnegative_inputs(closed.jaxpr, gates, plan):
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


def _logits(graphdef, state, x):
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    return model(x)


def _check_input(graphdef, state, composite, x) -> tuple[int, _Plan]:
    """Clear errors for inputs the model or the first rule cannot take.

    Returns the number of classes and the model's plan.
    """
    if x.dtype == jnp.uint8:
        raise ValueError(
            "x is uint8 (raw pixels); convert it to float first, e.g. x / 255 for a model "
            "trained on [0, 1], as lrpjax.data loads images"
        )
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("input contains NaN or Inf values")
    key = (graphdef, composite, x.shape, str(x.dtype))
    if key not in _STRUCTURES:  # traced once per model structure and input shape
        _STRUCTURES[key] = _structure(graphdef, state, composite, x)
        while len(_STRUCTURES) > 64:
            _STRUCTURES.pop(next(iter(_STRUCTURES)))
    num_classes, plan, rules, normaliser = _STRUCTURES[key]
    if normaliser is not None:
        warnings.warn(
            f"the model ends in a {normaliser}: lrpjax explains the logits below it (relevance "
            "through a softmax does not sum to a score); init='probability' puts the "
            "probability on them",
            stacklevel=3,
        )
    if x.ndim == 4 and jnp.issubdtype(x.dtype, jnp.floating):
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        if max(-lo, hi) > FAR_OUTSIDE:
            warnings.warn(
                f"x has values in [{lo:.3g}, {hi:.3g}], far outside [0, 1]: raw pixels as "
                "floats? Scale them as the model was trained (lrpjax's models and "
                "lrpjax.data use x / 255); rules with input bounds (z^B) assume [0, 1]",
                stacklevel=3,
            )
    for path in plan.takes_input:
        rule = rules[path]
        if isinstance(rule, rules_lib.ZBox):
            low, high = np.min(rule.low), np.max(rule.high)
            lo, hi = float(jnp.min(x)), float(jnp.max(x))
            if lo < low - 1e-3 or hi > high + 1e-3:
                warnings.warn(
                    f"x has values in [{lo:.3g}, {hi:.3g}], outside the bounds "
                    f"[{low:.3g}, {high:.3g}] of the z^B rule of layer {path!r}; "
                    "give the composite the input's bounds (e.g. epsilon_gamma_box(low=..., "
                    "high=...)) or rescale x",
                    stacklevel=3,
                )
    return num_classes, plan


#: Image batches with values beyond +-FAR_OUTSIDE get a warning (0..255 pixels as floats).
FAR_OUTSIDE = 10.0

#: (graphdef, composite, input shape, dtype) -> (classes, plan, rules, output softmax):
#: value-independent.
_STRUCTURES: dict[tuple, tuple[int, _Plan, dict[str, rules_lib.Rule], str | None]] = {}


def _input_hint(graphdef, state, x) -> str:
    """What the model's first convolution takes, where x's rank does not fit it."""
    model = nnx.merge(graphdef, state, copy=True)
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    if not convs:
        return ""
    conv = convs[0]
    spatial, channels = len(conv.kernel_size), conv.in_features
    if x.ndim >= spatial + 1:  # the right rank, or one example without its batch axis
        return ""
    wanted = f"(N, {', '.join('HWD'[:spatial])}, {channels})"
    hint = f"; its first convolution takes {wanted} inputs"
    features = int(np.prod(x.shape[1:]))
    side = round((features / channels) ** (1 / spatial)) if features % channels == 0 else 0
    if side > 0 and side**spatial * channels == features:
        shape = ", ".join([str(x.shape[0]), *[str(side)] * spatial, str(channels)])
        hint += f": x.reshape({shape}) if x holds channels-last images"
    return hint


def _structure(
    graphdef, state, composite, x
) -> tuple[int, _Plan, dict[str, rules_lib.Rule], str | None]:
    """The model's output classes, plan, rules and trailing softmax (None, ``"softmax"``
    or ``"log_softmax"``) on inputs like x, or a clear error."""
    try:
        out = jax.eval_shape(partial(_logits, graphdef), state, x)
    except LayerError:
        raise
    except Exception as error:
        hint = _input_hint(graphdef, state, x)
        if hint:
            raise ValueError(f"the model cannot take x of shape {x.shape}{hint}") from error
        try:
            jax.eval_shape(partial(_logits, graphdef), state, x[None])
        except Exception:
            raise ValueError(f"the model cannot take x of shape {x.shape}: {error}") from error
        raise ValueError(
            f"x of shape {x.shape} looks like one example without the batch axis; pass x[None]"
        ) from error
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2:
        raise ValueError(
            f"the model must return (N, classes) logits, got {getattr(out, 'shape', out)}"
        )
    plan = _record(graphdef, state, composite, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        for path in plan.takes_input:
            if not isinstance(plan.units[path], layer_types.EMBEDDINGS):
                raise ValueError(
                    f"x is {x.dtype} and reaches layer {path!r} "
                    f"({type(plan.units[path]).__name__}), not a token embedding; "
                    "convert it to float"
                )
    _, normaliser = glue.strip_output_softmax(jax.make_jaxpr(partial(_logits, graphdef))(state, x))
    return out.shape[-1], plan, _resolve_rules(plan, composite), normaliser


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
    num_classes, plan = _check_input(graphdef, state, composite, x)
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
