"""Zennit's composites for lrpjax's presets, with the same rules and parameters, checked layer
by layer against lrpjax's; and the torch model of lrpjax's canonized copy they explain.

One table pairs the two libraries' rules: `ZENNIT_RULES`, keyed by lrpjax rule class (beside
it `ZENNIT_COMPOSITES`, keyed by preset: the composite of each preset). See `lrpjax.peers`
for how both sides are made to compute the same explanation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core import canonizers, composites, layer_types, rules
from lrpjax.core.layers import MaxPool, ReLU
from lrpjax.peers.install import require_zennit
from lrpjax.peers.pytorch import torch_model

__all__ = [
    "GRADIENT",
    "PRESETS",
    "ZENNIT_COMPOSITES",
    "ZENNIT_RULES",
    "ZennitRule",
    "canonized",
    "lrpjax_rules",
    "same_rule",
    "zennit_composite",
    "zennit_model",
    "zennit_rule",
]

#: lrpjax's presets that Zennit has a composite for -> the Zennit composite class (plain
#: epsilon has none: a ``LayerMapComposite`` of ``Epsilon``).
ZENNIT_COMPOSITES: dict[str, str] = {
    "epsilon": "LayerMapComposite",
    "epsilon_plus_flat": "EpsilonPlusFlat",
    "epsilon_gamma_box": "EpsilonGammaBox",
    "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
}
#: lrpjax's presets that Zennit has a composite for.
PRESETS: tuple[str, ...] = tuple(ZENNIT_COMPOSITES)

GRADIENT = "gradient"  # the name of "no hook": Zennit leaves the layer to autograd


@dataclasses.dataclass(frozen=True)
class ZennitRule:
    """Zennit's counterpart of an lrpjax rule class: the hook that computes the same rule.

    Attributes:
      name: from the lrpjax rule, the name of the Zennit hook class (in ``zennit.rules``);
        `GRADIENT` where Zennit is to leave the layer to autograd.
      args: from the lrpjax rule, the hook's arguments (the rule's parameters).
    """

    name: Callable[[Any], str]
    args: Callable[[Any], dict[str, Any]] = lambda rule: {}


def _zplus(rule: rules.AlphaBeta) -> bool:
    return (rule.alpha, rule.beta) == (1.0, 0.0)


def _scalar(v: Any) -> float:
    a = np.asarray(v, np.float64)
    if a.ndim:
        raise ValueError("per-channel z^B bounds are not passed to Zennit here")
    return float(a)


#: lrpjax rule class -> the Zennit rule that computes the same (z^+, LRP-alpha1-beta0, is a
#: Zennit class of its own). `zennit_rule` builds the hooks from it, and `same_rule` checks
#: the hooks Zennit's composites choose against it.
ZENNIT_RULES: dict[type, ZennitRule] = {
    rules.Epsilon: ZennitRule(lambda r: "Epsilon", lambda r: {"epsilon": r.eps}),
    rules.AlphaBeta: ZennitRule(
        lambda r: "ZPlus" if _zplus(r) else "AlphaBeta",
        lambda r: (
            {"stabilizer": r.eps}
            if _zplus(r)
            else {"alpha": r.alpha, "beta": r.beta, "stabilizer": r.eps}
        ),
    ),
    rules.Gamma: ZennitRule(lambda r: "Gamma", lambda r: {"gamma": r.gamma, "stabilizer": r.eps}),
    rules.ZBox: ZennitRule(
        lambda r: "ZBox",
        lambda r: {"low": _scalar(r.low), "high": _scalar(r.high), "stabilizer": r.eps},
    ),
    rules.Flat: ZennitRule(lambda r: "Flat", lambda r: {"stabilizer": r.eps}),
    rules.Identity: ZennitRule(lambda r: "Pass"),
    rules.Gradient: ZennitRule(lambda r: GRADIENT),
}


def _counterpart(rule: rules.Rule | None) -> ZennitRule | None:
    """The `ZENNIT_RULES` entry of a rule (of its class or the nearest base), or None."""
    if rule is None:
        return None
    return next((ZENNIT_RULES[c] for c in type(rule).__mro__ if c in ZENNIT_RULES), None)


def zennit_rule(rule: rules.Rule | None) -> Any:
    """The Zennit hook that computes what an lrpjax rule computes (`ZENNIT_RULES`); None for
    the gradient (Zennit then leaves the layer to autograd).

    Raises:
      ValueError: a rule without a counterpart in `ZENNIT_RULES`.
    """
    _, zennit = require_zennit()
    if rule is None:
        return None
    entry = _counterpart(rule)
    if entry is None:
        raise ValueError(f"no Zennit counterpart for the rule {rule!r}")
    name = entry.name(rule)
    return None if name == GRADIENT else getattr(zennit.rules, name)(**entry.args(rule))


def same_rule(rule: rules.Rule | None, layer: Any) -> tuple[str, ...]:
    """Names of the Zennit hooks that compute what lrpjax's rule computes on this layer
    (`GRADIENT`: no hook, autograd): its counterpart in `ZENNIT_RULES`, and on a ReLU also
    ``Pass`` for the gradient.

    On a ReLU, lrpjax's gradient rule passes relevance where the input is positive, and
    Zennit's ``Pass`` passes all of it; the two agree because the relevance at a ReLU
    output of zero is zero: every rule of the layer above is of the form a * c (here
    batch-norm's epsilon, or a dense layer's), zero where its input is zero.
    """
    entry = _counterpart(rule)
    same = (entry.name(rule),) if entry is not None else ()
    if isinstance(rule, rules.Gradient) and isinstance(layer, layer_types.RECTIFIERS):
        same += ("Pass",)
    return same


def _rule_name(rule: Any) -> str:
    """lrpjax's name of a rule, for the report (``"ZPlus"``: alpha 1, beta 0)."""
    if rule is None:
        return GRADIENT
    if isinstance(rule, rules.AlphaBeta) and _zplus(rule):
        return "ZPlus"
    return type(rule).__name__


def _first_affine(model: nnx.Module) -> str | None:
    """The layer lrpjax's engine takes as FIRST: the first with an affine view."""
    return next((n for n in model.LAYERS if layer_types.is_affine(getattr(model, n))), None)


def lrpjax_rules(model: nnx.Module, composite: composites.Composite) -> dict[str, rules.Rule]:
    """The rule lrpjax's composite gives each layer of a sequential model.

    Args:
      model: a model with ``LAYERS`` (as for `torch_model`).
      composite: an lrpjax composite.

    Returns:
      ``{layer name: rule}``, in the model's order; FIRST and LAST are the first and the
      last layer with an affine view, as the engine assigns them.
    """
    affine = [n for n in model.LAYERS if layer_types.is_affine(getattr(model, n))]
    out = {}
    for name in model.LAYERS:
        positions = set()
        if affine and name == affine[0]:
            positions.add(composites.FIRST)
        if affine and name == affine[-1]:
            positions.add(composites.LAST)
        out[name] = composite.rule_for(name, getattr(model, name), frozenset(positions))
    return out


def _one(values: list, what: str) -> Any:
    distinct = {repr(v) for v in values}
    if len(distinct) > 1:
        raise ValueError(f"{what} differ ({', '.join(sorted(distinct))}); one Zennit "
                         "composite cannot express that")  # fmt: skip
    return values[0] if values else None


def zennit_composite(
    model: nnx.Module, preset: str, *, stock: bool = False, **params: Any
) -> tuple[Any, dict]:
    """Zennit's composite for one of lrpjax's presets, with the same parameters.

    Args:
      model: the sequential lrpjax model (its layer types and its first layer).
      preset: a name of `PRESETS`.
      stock: Zennit's composite as Zennit ships it instead: batch-norm passes relevance
        unchanged, and its ``SequentialMergeBatchNorm`` canonizer (meant for the model of
        `torch_model`, not `zennit_model`).
      **params: the preset's parameters (``eps``, ``gamma``, ...), as lrpjax's preset takes
        them.

    Returns:
      ``(composite, info)``: the Zennit composite, and ``info`` with ``"zennit"`` (the
      class and its arguments, as text) and ``"rules"`` (per layer ``[name, lrpjax rule,
      Zennit hook]``, by class name; ``"gradient"`` where the layer is left to autograd).

    Raises:
      ValueError: an unknown preset, layers of one type with different rules, or (unless
        `stock`) a layer whose Zennit hook is not lrpjax's rule.
    """
    torch, zennit = require_zennit()
    zc, zt = zennit.composites, zennit.types
    if preset not in PRESETS:
        raise ValueError(f"no Zennit composite for {preset!r}; presets: {', '.join(PRESETS)}")
    ours = lrpjax_rules(model, composites.PRESETS[preset](**params))
    first = _first_affine(model)

    def rules_of(kind: type) -> list:
        return [ours[n] for n in model.LAYERS if n != first and isinstance(getattr(model, n), kind)]

    dense = _one(rules_of(nnx.Linear), "the rules of dense layers")
    conv = _one(rules_of(nnx.Conv), "the rules of convolutions")
    bn = _one(rules_of(nnx.BatchNorm), "the rules of batch-norm layers")
    first_rule = ours[first]
    stabilizer = getattr(conv, "eps", 1e-6)
    layer_map = [] if stock else [(zt.BatchNorm, zennit_rule(bn))]
    canon = [zennit.canonizers.SequentialMergeBatchNorm()] if stock else None
    bn_text = "" if stock else f"layer_map=[(BatchNorm, Epsilon({bn.eps:g}))], "
    if preset == "epsilon":
        if _rule_name(first_rule) != "Epsilon" or first_rule.eps != conv.eps:
            raise ValueError("epsilon: the first layer's rule is not the convolutions' rule")
        comp = zc.LayerMapComposite(
            [*layer_map, *zc.layer_map_base(), (zt.Convolution, zennit_rule(conv)),
             (torch.nn.Linear, zennit_rule(dense))],
            canonizers=canon,
        )  # fmt: skip
        text = (
            f"LayerMapComposite({bn_text}layer_map_base(), (Convolution, Epsilon("
            f"{conv.eps:g})), (Linear, Epsilon({dense.eps:g})))"
        )
    else:
        kwargs: dict[str, Any] = {"epsilon": dense.eps, "stabilizer": stabilizer}
        if preset == "epsilon_gamma_box":
            kwargs.update(low=_scalar(first_rule.low), high=_scalar(first_rule.high))
            kwargs["gamma"] = conv.gamma
        if getattr(first_rule, "eps", stabilizer) != stabilizer:
            raise ValueError(f"{preset}: the first layer's stabiliser is not the convolutions'")
        text = f"{ZENNIT_COMPOSITES[preset]}({bn_text}" + ", ".join(
            f"{k}={v:g}" for k, v in kwargs.items()
        )
        text += ", canonizers=[SequentialMergeBatchNorm()])" if stock else ")"
        comp = getattr(zc, ZENNIT_COMPOSITES[preset])(
            layer_map=layer_map, canonizers=canon, **kwargs
        )
    pairs = []
    ctx: dict = {}
    for name in model.LAYERS:  # the order Zennit's register visits them (named_modules)
        hook = comp.module_map(ctx, name, _probe_module(model, name))
        theirs = GRADIENT if hook is None else type(hook).__name__
        pairs.append([name, _rule_name(ours[name]), theirs])
    if not stock:
        wrong = [p for p in pairs if p[2] not in same_rule(ours[p[0]], getattr(model, p[0]))]
        if wrong:
            raise ValueError(f"{preset}: Zennit's composite gives other rules: {wrong}")
    return comp, {"zennit": text, "rules": pairs}


def _probe_module(model: nnx.Module, name: str) -> Any:
    """A torch module of the type `torch_model` makes for a layer (for the composite's
    type matching; weights are not needed)."""
    torch, _ = require_zennit()
    layer = getattr(model, name)
    if isinstance(layer, nnx.Conv):
        return torch.nn.Conv2d(1, 1, 1)
    if isinstance(layer, nnx.Linear):
        return torch.nn.Linear(1, 1)
    if isinstance(layer, nnx.BatchNorm):
        return torch.nn.BatchNorm2d(1)
    if isinstance(layer, ReLU):
        return torch.nn.ReLU()
    if isinstance(layer, MaxPool):
        return torch.nn.MaxPool2d(2)
    if isinstance(layer, nnx.Dropout):
        return torch.nn.Dropout()
    return torch.nn.Identity()


def canonized(model: nnx.Module, x: jax.Array | np.ndarray, composite: composites.Composite):
    """A copy of the model after the composite's canonizers, as lrpjax's engine explains it.

    Args:
      model: the NNX model (unchanged).
      x: an input batch (its shapes are what the canonizers trace; one image suffices).
      composite: the lrpjax composite whose ``canonizers`` to apply.

    Returns:
      ``(model copy, merged)``: the canonized copy in eval mode, and the batch-norm pairs
      `lrpjax.core.canonizers.MergeBatchNorm` merged, as ``"bn -> layer"`` / ``"layer -> bn"``.
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)
    copy.eval()
    x = jnp.asarray(x)
    merged = []
    for canonizer in composite.canonizers:
        if isinstance(canonizer, canonizers.MergeBatchNorm):
            for bn, layer, where in canonizer.pairs(copy, x, composite):
                merged.append(f"{layer} -> {bn}" if where == "after" else f"{bn} -> {layer}")
        copy = canonizer(copy, x, composite)
    return copy, merged


def zennit_model(
    model: nnx.Module,
    x: jax.Array | np.ndarray,
    preset: str,
    dtype: str = "float32",
    share_ties: bool = False,
    **params: Any,
) -> tuple[Any, Any, dict]:
    """The torch model and Zennit composite that explain like lrpjax's preset.

    Args:
      model: the sequential NNX model.
      x: an input batch, NHWC (for the canonizers' trace).
      preset: a name of `PRESETS`.
      dtype: ``"float32"`` or ``"float64"``; the weights are canonized in the model's own
        dtype (run under ``jax.enable_x64`` with a float64 model for float64).
      share_ties: max-pooling that shares ties as lrpjax's does (see `torch_model`).
      **params: the preset's parameters.

    Returns:
      ``(net, composite, info)``: `torch_model` of lrpjax's canonized copy, the Zennit
      composite (`zennit_composite`), and ``info`` (its text, the per-layer rules, and
      ``"merged"``: the batch-norm pairs folded).
    """
    composite = composites.PRESETS[preset](**params)
    copy, merged = canonized(model, jnp.asarray(x)[:1], composite)
    comp, info = zennit_composite(model, preset, **params)
    return torch_model(copy, dtype, share_ties), comp, {**info, "merged": merged}
