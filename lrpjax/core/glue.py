r"""Relevance through the model's code between layers ("glue"), by an allow-list.

The engine traces the model's forward pass to a jaxpr in which every layer is one gate (a
`jax.custom_vjp` that applies the layer's rule), then evaluates that jaxpr again with
`evaluate`, inside `jax.vjp`. What flows backwards is :math:`c = R / a`, the relevance per
unit of activation. Every operation between the layers that touches an input-dependent
(relevant) value is one of:

- **linear or positively homogeneous** (`LINEAR`: add, sub, reshape, transpose, broadcast,
  concatenate, slice, pad, gather, sum and max reductions, multiplication or contraction
  with a constant, division by a constant, max of two relevant values, dtype casts ...):
  evaluated as is, and autodiff hands :math:`c` on; for such an op
  :math:`\sum a \odot J^\top c = \sum y \odot c`, so relevance is conserved (up to the
  share of added constants, which is absorbed as a bias's is);
- an **elementwise non-linear function of one relevant tensor** (a chain of elementwise
  operations from one base tensor: GELU as its tanh polynomial, SiLU, ``jnp.clip``, ...):
  collected and evaluated as one unit under the composite's `ACTIVATION` rule
  (default `rules.identity`: AttnLRP's identity rule);
- a **product of two relevant tensors** (``x * y``, ``q @ k.T``, ``attn @ v``, einsum,
  a convolution of two): the `PRODUCT` rule (default `rules.uniform`);
- a **softmax** (``exp`` normalised by its own sum over an axis, as `jax.nn.softmax` is
  traced): the `SOFTMAX` rule (default `rules.gradient`, AttnLRP's softmax rule;
  `rules.hold_constant` holds the attention weights constant, CP-LRP);
- calls (``jit``, custom derivatives, remat) are walked into;
- operations whose outputs are not floating point (comparisons, argmax) carry no relevance.

Anything else raises `LayerError` with the primitive's name and the model's source line:
never a silently wrong map.

References:
  Achtibat et al. (2024). AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
  Transformers. ICML. Ali et al. (2022). XAI for Transformers: Better Explanations through
  Conservative Propagation. ICML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from lrpjax.core import jaxprs
from lrpjax.core.layer_types import LayerError
from lrpjax.core.rules import HoldConstant, Rule

__all__ = [
    "ACTIVATION",
    "GATE_NAME",
    "LINEAR",
    "NONLINEAR",
    "PRODUCT",
    "SOFTMAX",
    "evaluate",
    "is_gate",
    "relevance_gate",
    "strip_output_softmax",
    "zero_cotangent",
]

#: The kinds of glue with a rule of their own: the keys a composite maps them by
#: (`lrpjax.core.composites` re-exports them).
ACTIVATION = "<activation>"
PRODUCT = "<product>"
SOFTMAX = "<softmax>"

#: The name of the backward function of the engine's layer gates, by which they are found.
GATE_NAME = "_lrpjax_layer_bwd"

#: Linear or positively homogeneous when at most the operands checked in `_linear_ok` are
#: relevant: autodiff passes c through them and conserves relevance.
LINEAR = frozenset(
    [
        "add",
        "add_any",
        "sub",
        "neg",
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "concatenate",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "gather",
        "scatter-add",
        "scatter_add",
        "pad",
        "rev",
        "select_n",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "cumsum",
        "cummax",
        "cummin",
        "reduce_window_sum",
        "reduce_window_max",
        "split",
        "sharding_constraint",
        "optimization_barrier",
        "mul",
        "dot_general",
        "conv_general_dilated",
        "div",
        "max",
        "min",
        "abs",
    ]
)
#: Elementwise functions that may form an activation with the `ACTIVATION` rule.
NONLINEAR = frozenset(
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
        "sinh",
        "cosh",
        "asinh",
        "acosh",
        "atanh",
        "sqrt",
        "rsqrt",
        "cbrt",
        "integer_pow",
        "square",
        "pow",
        "sign",
        "floor",
        "ceil",
        "round",
        "clamp",
        "max",
        "min",
        "div",
    ]
)
#: Elementwise operations that extend an activation already started on the same base.
_ELEMENTWISE = NONLINEAR | frozenset(
    [
        "add",
        "sub",
        "neg",
        "mul",
        "select_n",
        "convert_element_type",
        "abs",
        "copy",
        "copy_p",
        "reduce_precision",
    ]
)
_BILINEAR = frozenset(["mul", "dot_general", "conv_general_dilated"])
_SOFTMAX_CHAIN = frozenset(["broadcast_in_dim", "reshape", "expand_dims", "convert_element_type"])


def _where(eqn, calls: tuple = ()) -> str:
    """The model's source line of an equation: the innermost frame outside jax, flax and
    lrpjax, looking through the calls (jit, ...) it is inside."""
    library = ("/jax/", "/jaxlib/", "/flax/", "/lrpjax/", "/site-packages/")
    for e in (eqn, *reversed(calls)):
        traceback = getattr(e.source_info, "traceback", None)
        for frame in getattr(traceback, "frames", None) or []:  # innermost first
            if not any(part in frame.file_name for part in library):
                return f" at {frame.file_name}:{frame.line_num} ({frame.function_name})"
    return ""


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def zero_cotangent(x: Any) -> Any:
    """The zero cotangent of `x`: zeros for floats, float0 zeros for integers."""
    if _is_float(x):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def relevance_gate(
    rule: Rule, fn: Callable, inputs: tuple[jax.Array, ...], consts: tuple = ()
) -> jax.Array:
    """``fn(*inputs, consts)`` whose backward applies `rule` (``rule.backward(layer, a, y,
    c)``, with ``layer`` fn of the inputs and ``a`` the input, or the tuple of them).

    Constants pass as arguments with zero cotangents, so nothing traced is closed over.
    """

    @jax.custom_vjp
    def gate(inputs, consts):
        return fn(*inputs, consts)

    def fwd(inputs, consts):
        y = fn(*inputs, consts)
        return y, (inputs, consts, y)

    def bwd(residuals, c):
        inputs, consts, y = residuals

        def layer(*xs):
            return fn(*xs, consts)

        a = inputs if len(inputs) > 1 else inputs[0]
        c_in, _ = rule.backward(layer, a, y, c)
        c_in = tuple(c_in) if len(inputs) > 1 else (c_in,)
        c_in = tuple(ci.astype(x.dtype) for ci, x in zip(c_in, inputs, strict=True))
        return c_in, jax.tree.map(zero_cotangent, consts)

    gate.defvjp(fwd, bwd)
    return gate(tuple(inputs), tuple(consts))


class _Activation(NamedTuple):
    """An elementwise function of `base` not yet evaluated: ``fn(base, consts)``."""

    base: jax.Array
    consts: tuple
    fn: Callable


def _bind(eqn, values: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _softmax_groups(jaxpr) -> dict[int, list[int]]:
    """Softmaxes as traced: ``r = exp(u)``; ``d = r / broadcast(reduce_sum(r))``.

    Returns: the index of each softmax's exp -> indices of its equations, exp first and the
    division last.
    """
    flow = jaxprs.Dataflow(jaxpr)
    consumers, outs = flow.consumers, flow.outputs
    groups = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "exp" or eqn.outvars[0] in outs:
            continue
        r = eqn.outvars[0]
        users = flow.uses(r)
        by_name = {jaxpr.eqns[j].primitive.name: j for j in users}
        if len(users) != 2 or set(by_name) != {"reduce_sum", "div"}:
            continue
        div = jaxpr.eqns[by_name["div"]]
        if div.invars[0] is not r:
            continue
        chain, v = [by_name["reduce_sum"]], jaxpr.eqns[by_name["reduce_sum"]].outvars[0]
        while v not in outs and len(consumers.get(v, [])) == 1:
            j = consumers[v][0]
            if j == by_name["div"]:
                break
            if jaxpr.eqns[j].primitive.name not in _SOFTMAX_CHAIN:
                break
            chain.append(j)
            v = jaxpr.eqns[j].outvars[0]
        if div.invars[1] is v and consumers.get(v) == [by_name["div"]]:
            groups[i] = [i, *chain, by_name["div"]]
    return groups


class _Evaluation:
    """One evaluation of a jaxpr: values, which are relevant, pending activations."""

    def __init__(self, glue_rule: Callable[[str], Rule], calls: tuple = ()):
        self.glue_rule = glue_rule
        self.calls = calls  # the call equations this jaxpr is inside, outermost first
        self.values: dict[Any, Any] = {}
        self.relevant: dict[Any, bool] = {}
        self.pending: dict[Any, _Activation] = {}

    def read(self, v) -> Any:
        if jaxprs.is_literal(v):
            return v.val
        if v in self.pending:  # an activation used as a value: evaluate it under its rule
            act = self.pending.pop(v)
            self.values[v] = relevance_gate(
                self.glue_rule(ACTIVATION), act.fn, (act.base,), act.consts
            )
        return self.values[v]

    def is_pending(self, v) -> bool:
        return not jaxprs.is_literal(v) and v in self.pending

    def is_relevant(self, v) -> bool:
        return not jaxprs.is_literal(v) and self.relevant.get(v, False)

    def write(self, v, value: Any, relevant: bool) -> None:
        self.values[v] = value
        self.relevant[v] = relevant and _is_float(value)

    def write_all(self, outvars, values, relevant: bool) -> None:
        for v, value in zip(outvars, values, strict=True):
            self.write(v, value, relevant)


def evaluate(
    jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    relevant: Sequence[bool],
    glue_rule,
    calls: tuple = (),
) -> tuple[list[Any], list[bool]]:
    """Evaluate `jaxpr` on `args` with the glue rules; see the module docstring.

    Args:
      jaxpr: an open jaxpr (`jax.extend.core.Jaxpr`).
      consts: values of its constvars (not relevant).
      args: values of its invars.
      relevant: which args carry relevance (input-dependent floating-point values).
      glue_rule: ``glue_rule(kind) -> Rule`` for `ACTIVATION`, `PRODUCT` and `SOFTMAX`
        (`lrpjax.core.composites.Composite.glue_rule`).
      calls: the call equations (jit, ...) `jaxpr` is inside, for error messages.

    Returns:
      The outputs and which of them carry relevance.

    Raises:
      LayerError: for an operation on relevant values outside the allow-list.
    """
    ev = _Evaluation(glue_rule, calls)
    for v, value in zip(jaxpr.constvars, consts, strict=True):
        ev.write(v, value, False)
    for v, value, rel in zip(jaxpr.invars, args, relevant, strict=True):
        ev.write(v, value, rel)
    softmaxes = _softmax_groups(jaxpr)
    done: set[int] = set()
    for i, eqn in enumerate(jaxpr.eqns):
        if i in done:
            continue
        if i in softmaxes:
            members = [jaxpr.eqns[j] for j in softmaxes[i]]
            done.update(softmaxes[i])
            if ev.is_relevant(eqn.invars[0]):
                _softmax(ev, members)
                continue
            for member in members:
                ev.write_all(
                    member.outvars, _bind(member, [ev.read(v) for v in member.invars]), False
                )
            continue
        _equation(ev, eqn)
    outs = [ev.read(v) for v in jaxpr.outvars]
    return outs, [ev.is_relevant(v) for v in jaxpr.outvars]


def _softmax(ev: _Evaluation, members: list) -> None:
    exp, div = members[0], members[-1]

    def fn(u, consts):
        env = {exp.invars[0]: u}
        for member in members:
            values = [v.val if jaxprs.is_literal(v) else env[v] for v in member.invars]
            env.update(zip(member.outvars, _bind(member, values), strict=True))
        return env[div.outvars[0]]

    rule = ev.glue_rule(SOFTMAX)
    u = ev.read(exp.invars[0])
    if isinstance(rule, HoldConstant):
        ev.write(div.outvars[0], jax.lax.stop_gradient(fn(u, ())), False)
    else:
        ev.write(div.outvars[0], relevance_gate(rule, fn, (u,)), True)


def _equation(ev: _Evaluation, eqn) -> None:
    name = eqn.primitive.name
    relevant = [ev.is_relevant(v) for v in eqn.invars]
    float_out = any(_is_float_aval(v.aval) for v in eqn.outvars)
    if not any(relevant) or not float_out:  # constants, or no relevance can pass
        ev.write_all(eqn.outvars, _bind(eqn, [ev.read(v) for v in eqn.invars]), False)
        return
    if name == "custom_vjp_call" and is_gate(eqn):
        ev.write_all(eqn.outvars, _bind(eqn, [ev.read(v) for v in eqn.invars]), True)
        return
    if name == "stop_gradient":
        ev.write_all(eqn.outvars, _bind(eqn, [ev.read(v) for v in eqn.invars]), False)
        return
    if name in jaxprs.CALL_PARAMS:
        _call(ev, eqn, relevant)
        return
    if _extend_activation(ev, eqn, relevant):
        return
    if name in _BILINEAR and sum(relevant[:2]) == 2:
        x, y = ev.read(eqn.invars[0]), ev.read(eqn.invars[1])

        def product(x, y, consts):
            return _bind(eqn, [x, y])[0]

        ev.write(eqn.outvars[0], relevance_gate(ev.glue_rule(PRODUCT), product, (x, y)), True)
        return
    if name in LINEAR and (_linear_ok(name, relevant) or _relu(eqn, relevant)):
        ev.write_all(eqn.outvars, _bind(eqn, [ev.read(v) for v in eqn.invars]), True)
        return
    raise LayerError(
        f"the model applies `{name}` to input-dependent values between its layers"
        f"{_where(eqn, ev.calls)}; "
        "lrpjax cannot pass relevance through it. Put it in an nnx.Module and map that "
        "module's type or path to a rule in the composite."
    )


def _is_float_aval(aval) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating)


def is_gate(eqn) -> bool:
    """Whether an equation is one of the engine's layer gates."""
    bwd = eqn.params.get("bwd")
    return (
        getattr(bwd, "__name__", None) == GATE_NAME
        or getattr(getattr(bwd, "f", None), "__name__", None) == GATE_NAME
    )


def _relu(eqn, relevant: list[bool]) -> bool:
    """max(x, 0) or min(x, 0) with a literal zero: positively homogeneous, so autodiff's
    relevance (the identity rule's, too) passes without a rule of its own."""
    return (
        eqn.primitive.name in ("max", "min")
        and sum(relevant) == 1
        and any(jaxprs.literal_zero(v) for v in eqn.invars)
    )


def _linear_ok(name: str, relevant: list[bool]) -> bool:
    if name == "div":
        return not relevant[1]  # division by a constant
    if name in ("max", "min"):
        return all(relevant)  # max(x, y) of two relevant values: homogeneous
    if name in _BILINEAR:
        return sum(relevant[:2]) <= 1
    return True


def _call(ev: _Evaluation, eqn, relevant: list[bool]) -> None:
    jaxpr, consts = jaxprs.body(eqn)
    outs, out_relevant = evaluate(
        jaxpr, consts, [ev.read(v) for v in eqn.invars], relevant, ev.glue_rule, (*ev.calls, eqn)
    )
    for v, value, rel in zip(eqn.outvars, outs, out_relevant, strict=True):
        ev.write(v, value, rel)


def _extend_activation(ev: _Evaluation, eqn, relevant: list[bool]) -> bool:
    """Start or extend an elementwise activation; False where the equation is not one."""
    name = eqn.primitive.name
    if name not in _ELEMENTWISE or len(eqn.outvars) != 1:
        return False
    out_shape = eqn.outvars[0].aval.shape
    bases = []
    for v, rel in zip(eqn.invars, relevant, strict=True):
        if rel:
            bases.append(ev.pending[v].base if v in ev.pending else ev.values[v])
    base = bases[0]
    if any(b is not base for b in bases) or np.shape(base) != out_shape:
        return False
    started = any(ev.is_pending(v) for v in eqn.invars)
    if not started and (_relu(eqn, relevant) or not _nonlinear(name, relevant)):
        return False  # a linear op on a plain value: autodiff handles it exactly
    specs, consts = [], []
    for v, rel in zip(eqn.invars, relevant, strict=True):
        if rel and ev.is_pending(v):
            act = ev.pending[v]
            specs.append(("activation", act.fn, len(consts), len(act.consts)))
            consts.extend(act.consts)
        elif rel:
            specs.append(("base",))
        else:
            value = ev.read(v)
            if np.shape(value) not in ((), out_shape):
                return False
            specs.append(("const", len(consts)))
            consts.append(value)

    def fn(b, cs):
        values = []
        for spec in specs:
            if spec[0] == "base":
                values.append(b)
            elif spec[0] == "const":
                values.append(cs[spec[1]])
            else:
                values.append(spec[1](b, cs[spec[2] : spec[2] + spec[3]]))
        return _bind(eqn, values)[0]

    v_out = eqn.outvars[0]
    ev.pending[v_out] = _Activation(base, tuple(consts), fn)
    ev.relevant[v_out] = True
    return True


def _nonlinear(name: str, relevant: list[bool]) -> bool:
    """Whether an op on one relevant base (not yet an activation) is non-linear in it."""
    if name in ("max", "min", "clamp"):
        return not all(relevant)  # relu-like or clipping with a constant
    if name == "div":
        return relevant[1]  # 1 / x, or x / f(x)
    if name in ("mul", "add", "sub"):
        return all(relevant)  # x * x
    return name in NONLINEAR


# --- a softmax or log-softmax at the model's output ---------------------------------------


def _through(flow: jaxprs.Dataflow, v: Any, names: frozenset = _SOFTMAX_CHAIN) -> Any:
    """`v` followed back through broadcasts, reshapes and casts."""
    while (eqn := flow.producer(v)) is not None and eqn.primitive.name in names:
        v = eqn.invars[0]
    return v


def _shift_removed(flow: jaxprs.Dataflow, u: Any) -> Any:
    """``c`` for ``u = c - stop_gradient(max(c))`` (the stable softmax's shift), else u."""
    sub = flow.producer(u, "sub")
    if sub is not None and not jaxprs.is_literal(sub.invars[1]):
        shift = _through(flow, sub.invars[1])
        if flow.producer(shift, "stop_gradient") is not None:
            return sub.invars[0]
    return u


def _normalised_exp(flow: jaxprs.Dataflow, numerator: Any, denominator: Any, axis: int) -> Any:
    """``u`` where ``numerator = exp(u)`` and ``denominator`` is its sum over `axis`."""
    exp = flow.producer(numerator, "exp")
    total = flow.producer(_through(flow, denominator), "reduce_sum")
    if exp is None or total is None or total.invars[0] is not numerator:
        return None
    if tuple(total.params["axes"]) != (axis,):
        return None
    return exp.invars[0]


def _output_normaliser(jaxpr, out: Any) -> tuple[str, Any] | None:
    """``(kind, logits var)`` where `out` is a softmax or log-softmax over the last axis."""
    flow = jaxprs.Dataflow(jaxpr)
    axis = len(out.aval.shape) - 1
    div = flow.producer(out, "div")
    if div is not None:
        u = _normalised_exp(flow, div.invars[0], div.invars[1], axis)
        if u is not None:
            return "softmax", _shift_removed(flow, u)
    sub = flow.producer(out, "sub")
    if sub is not None:
        log = flow.producer(_through(flow, sub.invars[1]), "log")
        if log is not None:
            total = flow.producer(_through(flow, log.invars[0]), "reduce_sum")
            exp = total is not None and flow.producer(total.invars[0], "exp")
            if exp and exp.invars[0] is sub.invars[0] and tuple(total.params["axes"]) == (axis,):
                return "log_softmax", _shift_removed(flow, sub.invars[0])
    call = flow.producer(out)
    if call is not None and call.primitive.name in jaxprs.CALL_PARAMS:
        inner, _ = jaxprs.body(call)
        found = _output_normaliser(inner, inner.outvars[call.outvars.index(out)])
        if found is not None:
            kind, logits = found
            if logits in inner.invars:  # the call is the normaliser itself (jax.nn.log_softmax)
                return kind, call.invars[inner.invars.index(logits)]
            raise LayerError(
                f"the model ends in a {kind} computed inside a `{call.primitive.name}` call "
                f"together with other work{_where(call)}; return the logits (explain the "
                "model without its final softmax)"
            )
    return None


def strip_output_softmax(closed) -> tuple[Any, str | None]:
    """The model's traced forward pass without a softmax or log-softmax at its output.

    LRP explains a score, and a softmax's outputs are not scores: propagated through it,
    relevance sums to the gradient's share, not to the probability (and ``init=
    "probability"`` would apply softmax twice). The logits below it are what is explained;
    the output relevance (``init``) puts the probability back where it is asked for.

    Args:
      closed: the traced forward pass (`jax.extend.core.ClosedJaxpr`) with one (N, C) output.

    Returns:
      ``(closed, kind)``: the pass ending at the logits and ``"softmax"`` or
      ``"log_softmax"``; or the pass unchanged and None.

    Raises:
      LayerError: for a softmax fused with other work in one call, whose logits cannot be
        reached.
    """
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1 or jaxprs.is_literal(jaxpr.outvars[0]):
        return closed, None
    found = _output_normaliser(jaxpr, jaxpr.outvars[0])
    if found is None:
        return closed, None
    kind, logits = found
    stripped = jaxpr.replace(outvars=[logits], eqns=jaxprs.live(jaxpr, [logits]))
    return jax_core.ClosedJaxpr(stripped, closed.consts), kind
