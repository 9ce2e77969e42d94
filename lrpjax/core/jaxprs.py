"""Helpers on traced programs (jaxprs), written once for the modules that read them.

Which equations make and use each variable (`Dataflow`), the calls (``jit``, custom
derivatives, remat) whose bodies are walked into (`CALL_PARAMS`, `body`), literals
(`is_literal`, `literal_zero`, `literal_nonnegative`), the equations outputs depend on
(`live`) and the layer input of one of the engine's layer gates (`operand`).

Used by `lrpjax.core.glue`, `lrpjax.core.tracing`, `lrpjax.core.structure`,
`lrpjax.core.canonizers` and `lrpjax.analysis.concepts`; imports nothing from lrpjax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.extend import core as jax_core

__all__ = [
    "CALL_PARAMS",
    "Dataflow",
    "body",
    "is_literal",
    "literal_nonnegative",
    "literal_zero",
    "live",
    "operand",
    "operand_index",
]

#: Call primitives and the parameter holding the jaxpr they run.
CALL_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


def is_literal(v: Any) -> bool:
    """Whether an operand is a literal (a constant written into the equation), not a variable."""
    return isinstance(v, jax_core.Literal)


def literal_zero(v: Any) -> bool:
    """Whether `v` is a literal whose entries are all zero."""
    return is_literal(v) and bool(np.all(np.asarray(v.val) == 0))


def literal_nonnegative(v: Any) -> bool:
    """Whether `v` is a literal whose entries are all >= 0."""
    return is_literal(v) and bool(np.all(np.asarray(v.val) >= 0))


class Dataflow:
    """Which equations of one jaxpr (its top level, not inside calls) make and use each
    variable, by equation index."""

    def __init__(self, jaxpr):
        self.jaxpr = jaxpr
        #: variable -> indices of the equations using it, once per use.
        self.consumers: dict[Any, list[int]] = {}
        #: variable -> index of the equation making it.
        self.producers: dict[Any, int] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not is_literal(v):
                    self.consumers.setdefault(v, []).append(i)
            for v in eqn.outvars:
                self.producers[v] = i
        #: the variables the jaxpr returns.
        self.outputs = frozenset(v for v in jaxpr.outvars if not is_literal(v))

    def uses(self, v: Any) -> list[int]:
        """Indices of the equations using `v`, once per use."""
        return self.consumers.get(v, [])

    def only_use(self, v: Any) -> int | None:
        """The index of the one equation using `v`, where `v` has one use and is not
        returned; else None."""
        users = self.uses(v)
        return users[0] if len(users) == 1 and v not in self.outputs else None

    def producer(self, v: Any, name: str | None = None) -> Any:
        """The equation making `v` (a `name` primitive, if given), or None."""
        i = self.producers.get(v)
        if i is None:
            return None
        eqn = self.jaxpr.eqns[i]
        return eqn if name is None or eqn.primitive.name == name else None


def body(eqn) -> tuple[Any, Sequence[Any]] | None:
    """The jaxpr a call equation (`CALL_PARAMS`) runs, open, with its constants; None for
    other equations."""
    param = CALL_PARAMS.get(eqn.primitive.name)
    if param is None:
        return None
    inner = eqn.params[param]
    if isinstance(inner, jax_core.ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, ()


def live(jaxpr, outvars: list) -> list:
    """The equations of `jaxpr` that `outvars` depend on (or that have effects), in order."""
    needed = {v for v in outvars if not is_literal(v)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars) or eqn.effects:
            kept.append(eqn)
            needed.update(v for v in eqn.invars if not is_literal(v))
    return kept[::-1]


def operand_index(eqn) -> int:
    """Where a layer gate's layer input is among its operands: after its constants. A gate
    equation's operands are ``(*consts, a, probe, *arrays, ...)``."""
    return eqn.params.get("num_consts", 0)


def operand(eqn) -> Any:
    """A layer gate's layer input (`operand_index`)."""
    return eqn.invars[operand_index(eqn)]
