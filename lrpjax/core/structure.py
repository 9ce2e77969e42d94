"""Analyses of a model's traced structure that let the engine run cheaper, exact forms
of its rules.

The engine traces the instrumented forward pass (`lrpjax.core.tracing`) and asks, from the
jaxpr alone (no values):

- `rectified`: which units' outputs reach the relevance only through a ReLU, where
  `rules.Rule.for_rectified_output` holds (their relevance is zero where the output is
  <= 0);
- `nonnegative_inputs`: which units' inputs are >= 0 by the structure (after a ReLU,
  max-pooling, zero padding ...), where `rules.Rule.for_nonnegative_input` holds.

Both are allow-lists: what they do not recognise keeps the general form of the rule.
"""

from __future__ import annotations

from collections.abc import Mapping

from lrpjax.core import jaxprs, layer_types
from lrpjax.core import rules as rules_lib
from lrpjax.core.tracing import Plan

__all__ = ["SIGN_KEEPING_OPS", "nonnegative", "nonnegative_inputs", "rectified"]


def rectified(jaxpr, gates: dict[int, str], plan: Plan, rules: Mapping) -> set[str]:
    """Units whose output reaches the relevance only through a ReLU: the output's one use
    is a `layer_types.RECTIFIERS` unit whose rule passes relevance along the gradient or
    unchanged, or ``max(., 0)`` (also inside jit or custom_jvp, as `jax.nn.relu`). Their
    relevance is zero wherever their output is <= 0.

    Args:
      jaxpr: the instrumented forward pass, traced as ``f(x, probes)``.
      gates: its gate equations' indices -> unit paths (`tracing.find_gates`).
      plan: the model's units (`tracing.record`).
      rules: unit path -> rule.
    """
    flow = jaxprs.Dataflow(jaxpr)

    def before_relu(i: int) -> bool:
        (y,) = jaxpr.eqns[i].outvars
        j = flow.only_use(y)
        if j is None:
            return False
        user, relu_unit = jaxpr.eqns[j], gates.get(j)
        if relu_unit is None:
            return _only_relu(user, y)
        return (
            isinstance(plan.units[relu_unit], layer_types.RECTIFIERS)
            and isinstance(rules[relu_unit], rules_lib.Gradient | rules_lib.Identity)
            and jaxprs.operand(user) is y
            and user.invars.count(y) == 1
        )

    return {path for i, path in gates.items() if before_relu(i)}


#: Primitives whose output is >= 0 wherever their first operand is (the others are shapes
#: or indices): rearrangements, and maxima over windows or axes.
SIGN_KEEPING_OPS = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "rev", "copy", "copy_p", "convert_element_type", "reduce_precision",
    "reduce_max", "reduce_window_max",
})  # fmt: skip


def _known_nonnegative(v, found: set) -> bool:
    """A literal >= 0, or a variable in `found`."""
    return jaxprs.literal_nonnegative(v) if jaxprs.is_literal(v) else v in found


def nonnegative(jaxpr, known: set, gates: dict[int, str], plan: Plan | None) -> set:
    """Variables of `jaxpr` that are >= 0 by its structure, given `known` ones: outputs of
    `layer_types.RECTIFIERS` units and of ``max`` with an operand >= 0 (`jax.nn.relu`),
    and what `layer_types.SIGN_KEEPING` units, `SIGN_KEEPING_OPS`, ``concatenate``,
    ``pad`` (with a padding value >= 0) and calls (jit, custom_jvp) make of such values.
    Anything else is not known to be (an allow-list)."""
    found = set(known)

    def nonneg(v) -> bool:
        return _known_nonnegative(v, found)

    for i, eqn in enumerate(jaxpr.eqns):
        name, path, called = eqn.primitive.name, gates.get(i), jaxprs.body(eqn)
        if path is not None:
            unit = plan.units[path]
            out = isinstance(unit, layer_types.RECTIFIERS) or (
                isinstance(unit, layer_types.SIGN_KEEPING) and nonneg(jaxprs.operand(eqn))
            )
        elif name == "max":
            out = any(nonneg(v) for v in eqn.invars)
        elif name in SIGN_KEEPING_OPS:
            out = bool(eqn.invars) and nonneg(eqn.invars[0])
        elif name in ("concatenate", "pad"):
            out = all(nonneg(v) for v in eqn.invars)
        elif called is not None:
            inner, _ = called
            if len(inner.invars) == len(eqn.invars):
                given = {w for w, v in zip(inner.invars, eqn.invars, strict=True) if nonneg(v)}
                inside = nonnegative(inner, given, {}, None)
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


def nonnegative_inputs(jaxpr, gates: dict[int, str], plan: Plan) -> set[str]:
    """Units whose input is >= 0 by the model's structure (see `nonnegative`); arguments as
    for `rectified`."""
    found = nonnegative(jaxpr, set(), gates, plan)
    return {path for i, path in gates.items() if jaxprs.operand(jaxpr.eqns[i]) in found}


def _only_relu(eqn, v) -> bool:
    """Whether `eqn`, the one use of v, is ``max(v, 0)``, or a call whose body uses v only
    so (recursively)."""
    if eqn.primitive.name == "max":
        other = [u for u in eqn.invars if u is not v]
        return len(other) == 1 and jaxprs.literal_zero(other[0])
    called = jaxprs.body(eqn)
    if called is None or eqn.invars.count(v) != 1:
        return False
    inner, _ = called
    w = inner.invars[eqn.invars.index(v)]
    j = jaxprs.Dataflow(inner).only_use(w)
    return j is not None and _only_relu(inner.eqns[j], w)
