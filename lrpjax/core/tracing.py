r"""The model as probed units: how the engine finds, records and instruments its layers.

Inside the traced function, the model is rebuilt from its state and every unit (a module
with no sub-modules, or a module the composite maps as one unit; `units`) is replaced by a
`_Probe` that calls it, with the arguments the model passes, through a `jax.custom_vjp`:
the forward value is the layer's own, the backward applies the layer's rule
(``tape.rules``) and hands the layer's input relevance out through the cotangent of a zero
"probe" input. `record` runs the instrumented model abstractly once to find the units in
call order (a `Plan`); `traced_units` gives the traced forward pass with each unit's gate
equation found in it, for canonizers and analyses that need to know what feeds what.

A composite is passed in and used by what it offers (``explicit_rule``, ``rule_for``,
``canonizers``): this module is below `lrpjax.core.composites` and the engine and imports
neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core import glue, jaxprs, layer_types
from lrpjax.core import rules as rules_lib
from lrpjax.core.layer_types import LayerError

__all__ = ["Plan", "Tape", "canonized", "find_gates", "instrumented", "record", "traced_units"]


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
    model: nnx.Module, composite: Any, glue_paths: frozenset[str] = frozenset()
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


class Tape:
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

    def __init__(self, layer: nnx.Module, path: str, tape: Tape):
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

        def _lrpjax_layer_bwd(residuals, c_out):  # named glue.GATE_NAME: how gates are found
            a, side, y, mask = residuals
            if mask is not None:  # a condition (CRP): relevance of the chosen outputs only
                c_out = c_out * mask.astype(c_out.dtype)
            # Looked up when the backward is traced: the engine may refine a rule after
            # tracing the forward pass (`lrpjax.core.structure.rectified`).
            c_in, R_in = tape.rules[path].backward(bound(side), a, y, c_out)
            if jnp.issubdtype(a.dtype, jnp.floating):
                c_in = c_in.astype(a.dtype)
            else:  # integer inputs (tokens): their relevance leaves through the probe
                c_in = glue.zero_cotangent(a)
            probe = tape.probes[path]
            zeros = tuple(glue.zero_cotangent(s) for s in side)
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
    composite: Any,
    tape: Tape,
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


def instrumented(
    graphdef, state, composite, glue_paths: frozenset[str] = frozenset()
) -> tuple[nnx.Module, dict[str, nnx.Module], Tape]:
    """A fresh copy of the model in eval mode with its units probed: ``(model, {path:
    unit}, tape)``; the tape is the trace's (set its ``rules``, ``probes``, ``masks``)."""
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    tape = Tape()
    model, units = _instrument(model, composite, tape, glue_paths)
    return model, units, tape


class Plan(NamedTuple):
    """A model's units as one abstract call on inputs like x sees them (`record`)."""

    calls: tuple[str, ...]
    shapes: dict[str, jax.ShapeDtypeStruct]
    takes_input: frozenset[str]
    units: dict[str, nnx.Module]
    glue_paths: frozenset[str]  # parameter-free layers called more than once: glue


def record(graphdef, state, composite, x, glue_paths: frozenset[str] = frozenset()) -> Plan:
    """The units of the model in call order, with their input shapes: an abstract
    evaluation of its own, whose results are returned, not left on any object."""
    model, units, tape = instrumented(graphdef, state, composite, glue_paths)

    def run(x):
        tape.input_like = [x]
        return model(x)

    out = jax.eval_shape(run, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise LayerError(f"the model returns {type(out).__name__}; lrpjax explains one array")
    if tape.repeated:  # again, with the reused parameter-free layers as glue
        return record(graphdef, state, composite, x, glue_paths | frozenset(tape.repeated))
    calls = tuple(tape.calls)
    return Plan(calls, dict(tape.shapes), frozenset(tape.takes_input), units, glue_paths)


def traced_units(
    model: nnx.Module, x, composite: Any
) -> tuple[Any, dict[int, str], dict[str, nnx.Module]]:
    """The model's forward pass as a jaxpr, with its units found in it: for canonizers and
    analyses (`lrpjax.analysis.concepts`), which need to know what feeds what.

    Returns:
      ``(closed_jaxpr, gates, units)``: ``gates`` maps the index of each top-level equation
      that calls a unit to its path (units inside jit-compiled functions of the model are
      not listed); ``units`` maps paths to modules. A gate equation's operands are
      ``(*consts, a, probe, *arrays, ...)`` with ``consts`` as many as its ``num_consts``
      parameter says (`lrpjax.core.jaxprs.operand`); its one output is the unit's output.
    """
    graphdef, state = nnx.split(model)
    plan = record(graphdef, state, composite, x)
    model, _, tape = instrumented(graphdef, state, composite, plan.glue_paths)
    tape.rules = {p: rules_lib.gradient() for p in plan.calls}  # no backward is taken
    zeros = {p: jnp.zeros(s.shape, s.dtype) for p, s in plan.shapes.items()}

    def forward(x, probes):
        tape.probes = probes
        return model(x)

    closed = jax.make_jaxpr(forward)(x, zeros)
    return closed, find_gates(closed.jaxpr, zeros), plan.units


def find_gates(jaxpr, probes: Mapping[str, Any]) -> dict[int, str]:
    """Index of each top-level equation of `jaxpr` (traced as ``f(x, probes)``) that calls a
    unit, mapped to the unit's path."""
    probe_vars = dict(zip(jaxpr.invars[1:], sorted(probes), strict=True))
    gates = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name == "custom_vjp_call" and glue.is_gate(eqn):
            probe = eqn.invars[jaxprs.operand_index(eqn) + 1]
            if probe in probe_vars:
                gates[i] = probe_vars[probe]
    return gates


def canonized(graphdef, state, composite, x) -> tuple[Any, nnx.State]:
    """Apply the composite's canonizers to a copy of the model (inside the trace)."""
    if not composite.canonizers:
        return graphdef, state
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    for canonizer in composite.canonizers:
        model = canonizer(model, x, composite)
    return nnx.split(model)
