"""Side by side with Zennit: the same model and the same LRP rules in PyTorch, to check that
lrpjax gives the same relevance and to time both on the same CPU (``lrpjax bench --peer
zennit``).

Zennit (Anders et al. 2021) is the reference LRP library for PyTorch. This module rebuilds
a sequential lrpjax model (the shipped miniVGG, `lrpjax.models.MiniVGG`) as a
``torch.nn.Sequential`` from the same weights, NHWC/HWIO converted to NCHW/OIHW and the
flatten done in NHWC order, and explains it with the Zennit composite of each of lrpjax's
presets, with the same parameters (epsilon, gamma, the bounds of z^B, the stabilisers).

How both sides are made to compute the same explanation (`zennit_composite`,
`zennit_model`, `compare`):

- **Rules.** Zennit's own composites (``EpsilonPlusFlat``, ``EpsilonGammaBox`` with
  ``low=0, high=1``, ``EpsilonAlpha2Beta1``; for plain epsilon, which Zennit has no class
  for, a ``LayerMapComposite`` of ``Epsilon`` on convolutions and dense layers) are built
  with the parameters of the rules lrpjax resolves for each layer
  (`lrpjax.core.composites.Composite.rule_for`), and each layer's Zennit hook is checked
  against lrpjax's rule (the report lists the pairs). The first layer is the same in both
  (the first convolution), and so are the stabilisers: ``z + eps * sign(z)``, sign(0) = +1.
- **Batch-norm.** lrpjax's presets explain batch-norm with LRP-epsilon (the shift absorbs
  its share of relevance) and carry the `lrpjax.core.canonizers.MergeBatchNorm` canonizer;
  Zennit's presets pass relevance through batch-norm unchanged (``Pass``) and merge it with
  ``SequentialMergeBatchNorm`` only where it directly follows a linear layer, which in the
  miniVGG's Conv-ReLU-BN blocks is nowhere. So Zennit gets batch-norm -> ``Epsilon`` (the
  ``layer_map`` argument of its composites, matched before its defaults) and the weights
  lrpjax's canonizer produces (in the miniVGG: ``bn5`` folded into ``dense2``, ``bn5`` reset
  to the identity). What Zennit gives as shipped is reported beside (``stock_float32``).
- **ReLU and dropout** pass relevance in both: Zennit's ``Pass`` on ReLU gives it all of
  the relevance at its output, lrpjax's gradient rule only where the input is positive,
  which is the same here, since the layer above (batch-norm) gives none to zero inputs.
- **Max-pooling** is winner-take-all in both (the gradient), but ties differ: PyTorch's
  gradient gives a tied window's relevance to its first maximum, lrpjax's shares it
  equally. Ties are common in real images (flat regions, saturated pixels), and move
  relevance between neighbouring pixels by up to a few percent of the image's largest
  relevance. The comparison therefore gives the torch model a max-pool with lrpjax's tie
  sharing (`torch_model` with ``share_ties``; same forward pass), and reports the
  difference with PyTorch's own max-pool beside (``torch_pool_float32``). The timing uses
  PyTorch's own.
- **Output relevance**: the logit of the class lrpjax predicts, one-hot (lrpjax's default
  ``init="logit"``).

Threads. PyTorch runs on ``torch.set_num_threads(threads)``, by default as many as the
process may use (``os.sched_getaffinity``). XLA sizes its CPU thread pool when JAX starts,
from the CPUs the process may use; to give both the same cores, start the process pinned
(``taskset -c 0 lrpjax bench --peer zennit`` for one core). The report records the
affinity, PyTorch's thread counts and ``XLA_FLAGS``.

References:
  Anders, Neumann, Samek, Müller, Lapuschkin (2021). Software for dataset-wide XAI: from
  local explanations to global insights with Zennit, CoRelAy, and ViRelAy. arXiv:2106.13200.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax import data, models
from lrpjax.analysis import baselines
from lrpjax.bench import speed as bench
from lrpjax.core import canonizers, compilation, composites, layer_types, rules
from lrpjax.core.layers import Flatten, MaxPool, ReLU

__all__ = [
    "INSTALL_HINT",
    "METHODS",
    "PRESETS",
    "PeerMissingError",
    "benchmark_peer",
    "cli",
    "compare",
    "require_zennit",
    "run_peer",
    "table",
    "torch_model",
    "zennit_composite",
    "zennit_model",
]

#: lrpjax's presets that Zennit has a composite for.
PRESETS: tuple[str, ...] = (
    "epsilon",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
)
#: What `benchmark_peer` times: the forward pass, gradient x input, and LRP per preset.
METHODS: tuple[str, ...] = ("forward", "gradient", *(f"lrp:{p}" for p in PRESETS))
INSTALL_HINT = 'pip install "lrpjax[peers]"'
DTYPES: tuple[str, ...] = ("float32", "float64")

_ZENNIT_CLASS = {
    "epsilon": "LayerMapComposite",
    "epsilon_plus_flat": "EpsilonPlusFlat",
    "epsilon_gamma_box": "EpsilonGammaBox",
    "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
}


class PeerMissingError(ImportError):
    """PyTorch or Zennit is not installed; the message says how to install them."""


def require_zennit() -> tuple[Any, Any]:
    """Import PyTorch and Zennit, only when a comparison is asked for.

    Returns:
      ``(torch, zennit)``, the modules.

    Raises:
      PeerMissingError: either is missing, with the command that installs both.
    """
    try:
        import torch
        import zennit
        import zennit.attribution
        import zennit.canonizers
        import zennit.composites
        import zennit.rules
        import zennit.types
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise PeerMissingError(
            f"the comparison with Zennit needs PyTorch and Zennit ({missing} is not "
            f"installed): {INSTALL_HINT}"
        ) from None
    return torch, zennit


# ---------------------------------------------------------------------------------------
# The model in PyTorch


def _torch_dtype(dtype: str) -> Any:
    torch, _ = require_zennit()
    return {"float32": torch.float32, "float64": torch.float64}[dtype]


def _tensor(a: Any, dtype: str) -> Any:
    torch, _ = require_zennit()
    return torch.from_numpy(np.array(a, dtype=dtype))


def _flatten_nhwc() -> Any:
    """A torch module flattening NCHW activations in NHWC order, as `lrpjax.core.layers.Flatten`
    flattens NHWC ones (so the dense kernel's rows need no permutation)."""
    torch, _ = require_zennit()

    class FlattenNHWC(torch.nn.Module):
        def forward(self, x):
            return (x.permute(0, 2, 3, 1) if x.ndim == 4 else x).flatten(1)

    return FlattenNHWC()


def _max_pool_sharing_ties(window: tuple[int, int]) -> Any:
    """A torch 2-D max-pool whose gradient shares ties equally, as `lrpjax.core.layers.max_pool`
    does (``torch.nn.MaxPool2d`` gives all of it to the first maximum of each window).

    Ties are common in real images: flat regions (sky, white backgrounds, saturated
    pixels) give equal activations side by side. Winner-take-all LRP then sends the
    window's relevance to one of them (PyTorch) or shares it (lrpjax); totals agree.
    """
    torch, _ = require_zennit()
    kh, kw = window

    class _SharedMax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.nn.functional.max_pool2d(x, window)
            ctx.save_for_backward(x, y)
            return y

        @staticmethod
        def backward(ctx, g):
            x, y = ctx.saved_tensors
            h, w = y.shape[-2] * kh, y.shape[-1] * kw
            up = y.repeat_interleave(kh, -2).repeat_interleave(kw, -1)
            winners = (x[..., :h, :w] == up).to(g.dtype)
            ties = torch.nn.functional.avg_pool2d(winners, window) * (kh * kw)
            share = (g / ties).repeat_interleave(kh, -2).repeat_interleave(kw, -1)
            grad = torch.zeros_like(x)
            grad[..., :h, :w] = winners * share
            return grad

    class MaxPoolSharingTies(torch.nn.Module):
        def forward(self, x):
            return _SharedMax.apply(x)

    return MaxPoolSharingTies()


def _conv(layer: nnx.Conv, dtype: str) -> Any:
    torch, _ = require_zennit()
    kernel = np.asarray(layer.kernel[...])
    window = kernel.shape[:-2]
    strides = np.atleast_1d(layer.strides if layer.strides is not None else 1)
    dilations = [layer.kernel_dilation, layer.input_dilation]
    if (
        len(window) != 2
        or layer.feature_group_count != 1
        or any(int(s) != 1 for s in strides)
        or any(d not in (None, 1) and any(int(v) != 1 for v in np.atleast_1d(d)) for d in dilations)
    ):
        raise ValueError("only 2-D, ungrouped, undilated convolutions of stride 1 are converted")
    padding = layer.padding.upper() if isinstance(layer.padding, str) else layer.padding
    if padding == "SAME" and all(w % 2 for w in window):
        pad: Any = tuple(w // 2 for w in window)
    elif padding == "VALID":
        pad = 0
    else:
        raise ValueError(f"convolution padding {layer.padding!r} is not converted")
    conv = torch.nn.Conv2d(
        kernel.shape[-2], kernel.shape[-1], window, padding=pad, bias=layer.bias is not None
    )
    conv.weight.data = _tensor(kernel.transpose(3, 2, 0, 1), dtype)  # HWIO -> OIHW
    if layer.bias is not None:
        conv.bias.data = _tensor(layer.bias[...], dtype)
    return conv


def _linear(layer: nnx.Linear, dtype: str) -> Any:
    torch, _ = require_zennit()
    kernel = np.asarray(layer.kernel[...])
    dense = torch.nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.bias is not None)
    dense.weight.data = _tensor(kernel.T, dtype)
    if layer.bias is not None:
        dense.bias.data = _tensor(layer.bias[...], dtype)
    return dense


def _batchnorm(layer: nnx.BatchNorm, flat: bool, dtype: str) -> Any:
    torch, _ = require_zennit()
    if layer.axis != -1:
        raise ValueError("only batch-norm over the last (channel) axis is converted")
    features = layer.mean[...].shape[-1]
    kind = torch.nn.BatchNorm1d if flat else torch.nn.BatchNorm2d
    bn = kind(features, eps=float(layer.epsilon))
    ones = np.ones(features)
    bn.weight.data = _tensor(layer.scale[...] if layer.scale is not None else ones, dtype)
    bn.bias.data = _tensor(layer.bias[...] if layer.bias is not None else 0 * ones, dtype)
    bn.running_mean = _tensor(layer.mean[...], dtype)
    bn.running_var = _tensor(layer.var[...], dtype)
    return bn


def torch_model(model: nnx.Module, dtype: str = "float32", share_ties: bool = False) -> Any:
    """The model as a ``torch.nn.Sequential`` in eval mode, NCHW, with the same weights.

    Args:
      model: an NNX model that runs its layers in sequence and names them in a ``LAYERS``
        attribute (`lrpjax.models.MiniVGG`): 2-D `nnx.Conv` (SAME with odd windows, or
        VALID), `nnx.Linear`, `nnx.BatchNorm` (inference mode: running statistics and its
        epsilon), `lrpjax.core.layers.ReLU`, `MaxPool`, `Flatten` and `nnx.Dropout`.
      dtype: ``"float32"`` or ``"float64"``.
      share_ties: max-pooling whose gradient shares ties in a window equally, as lrpjax's
        does, instead of ``torch.nn.MaxPool2d`` (which gives it all to the first maximum).
        The same forward pass; slower backward.

    Returns:
      The torch model; its submodules carry the lrpjax layer names. It takes (N, C, H, W)
      images: ``torch_model(m)(x.permute(0, 3, 1, 2))`` equals ``m(x)``.

    Raises:
      ValueError: a model without ``LAYERS``, or a layer this conversion does not know.
    """
    torch, _ = require_zennit()
    names = getattr(model, "LAYERS", None)
    if names is None:
        raise ValueError(
            f"{type(model).__name__} has no LAYERS sequence; the comparison with Zennit "
            "rebuilds sequential models such as lrpjax.models.MiniVGG"
        )
    layers: OrderedDict[str, Any] = OrderedDict()
    flat = False
    for name in names:
        layer = getattr(model, name)
        if isinstance(layer, nnx.Conv):
            layers[name] = _conv(layer, dtype)
        elif isinstance(layer, nnx.Linear):
            layers[name] = _linear(layer, dtype)
        elif isinstance(layer, nnx.BatchNorm):
            layers[name] = _batchnorm(layer, flat, dtype)
        elif isinstance(layer, ReLU):
            layers[name] = torch.nn.ReLU()
        elif isinstance(layer, MaxPool):
            pool = _max_pool_sharing_ties if share_ties else torch.nn.MaxPool2d
            layers[name] = pool(layer.window)
        elif isinstance(layer, nnx.Dropout):
            layers[name] = torch.nn.Dropout(layer.rate)
        elif isinstance(layer, Flatten):
            layers[name] = _flatten_nhwc()
            flat = True
        else:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) is not converted to torch")
    net = torch.nn.Sequential(layers).to(_torch_dtype(dtype))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)  # gradients are taken with respect to the input only
    return net


def _nchw(x: np.ndarray | jax.Array, dtype: str) -> Any:
    return _tensor(np.asarray(x).transpose(0, 3, 1, 2), dtype).contiguous()


# ---------------------------------------------------------------------------------------
# The composites


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


def _zennit_rule(rule: rules.Rule | None) -> Any:
    """The Zennit hook that computes what an lrpjax rule computes; None for the gradient
    (Zennit then leaves the layer to autograd).

    Raises:
      ValueError: a rule without a counterpart here.
    """
    _, zennit = require_zennit()
    zr = zennit.rules
    if rule is None or isinstance(rule, rules.Gradient):
        return None
    if isinstance(rule, rules.Epsilon):
        return zr.Epsilon(epsilon=rule.eps)
    if isinstance(rule, rules.AlphaBeta):
        if (rule.alpha, rule.beta) == (1.0, 0.0):
            return zr.ZPlus(stabilizer=rule.eps)
        return zr.AlphaBeta(alpha=rule.alpha, beta=rule.beta, stabilizer=rule.eps)
    if isinstance(rule, rules.Gamma):
        return zr.Gamma(gamma=rule.gamma, stabilizer=rule.eps)
    if isinstance(rule, rules.ZBox):
        return zr.ZBox(low=_scalar(rule.low), high=_scalar(rule.high), stabilizer=rule.eps)
    if isinstance(rule, rules.Flat):
        return zr.Flat(stabilizer=rule.eps)
    if isinstance(rule, rules.Identity):
        return zr.Pass()
    raise ValueError(f"no Zennit counterpart for the rule {rule!r}")


def _scalar(v: Any) -> float:
    a = np.asarray(v, np.float64)
    if a.ndim:
        raise ValueError("per-channel z^B bounds are not passed to Zennit here")
    return float(a)


#: lrpjax rule -> the Zennit hook class of the same rule (by class name).
_SAME_RULE = {
    "Epsilon": "Epsilon",
    "ZPlus": "ZPlus",
    "AlphaBeta": "AlphaBeta",
    "Gamma": "Gamma",
    "ZBox": "ZBox",
    "Flat": "Flat",
    "Identity": "Pass",
    "Gradient": "gradient",
}


def _same_rule(ours: str, layer: Any) -> tuple[str, ...]:
    """Zennit hooks that compute what lrpjax's rule (by name) computes on this layer.

    On a ReLU, lrpjax's gradient rule passes relevance where the input is positive, and
    Zennit's ``Pass`` passes all of it; the two agree because the relevance at a ReLU
    output of zero is zero: every rule of the layer above is of the form a * c (here
    batch-norm's epsilon, or a dense layer's), zero where its input is zero.
    """
    same = (_SAME_RULE[ours],) if ours in _SAME_RULE else ()
    if ours == "Gradient" and isinstance(layer, layer_types.RECTIFIERS):
        same += ("Pass",)
    return same


def _rule_name(rule: Any) -> str:
    if rule is None:
        return "gradient"
    if isinstance(rule, rules.AlphaBeta) and (rule.alpha, rule.beta) == (1.0, 0.0):
        return "ZPlus"
    return type(rule).__name__


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
    layer_map = [] if stock else [(zt.BatchNorm, _zennit_rule(bn))]
    canon = [zennit.canonizers.SequentialMergeBatchNorm()] if stock else None
    bn_text = "" if stock else f"layer_map=[(BatchNorm, Epsilon({bn.eps:g}))], "
    if preset == "epsilon":
        if _rule_name(first_rule) != "Epsilon" or first_rule.eps != conv.eps:
            raise ValueError("epsilon: the first layer's rule is not the convolutions' rule")
        comp = zc.LayerMapComposite(
            [*layer_map, *zc.layer_map_base(), (zt.Convolution, _zennit_rule(conv)),
             (torch.nn.Linear, _zennit_rule(dense))],
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
        text = f"{_ZENNIT_CLASS[preset]}({bn_text}" + ", ".join(
            f"{k}={v:g}" for k, v in kwargs.items()
        )
        text += ", canonizers=[SequentialMergeBatchNorm()])" if stock else ")"
        comp = getattr(zc, _ZENNIT_CLASS[preset])(layer_map=layer_map, canonizers=canon, **kwargs)
    pairs = []
    ctx: dict = {}
    for name in model.LAYERS:  # the order Zennit's register visits them (named_modules)
        hook = comp.module_map(ctx, name, _probe_module(model, name))
        theirs = "gradient" if hook is None else type(hook).__name__
        pairs.append([name, _rule_name(ours[name]), theirs])
    if not stock:
        wrong = [p for p in pairs if p[2] not in _same_rule(p[1], getattr(model, p[0]))]
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


# ---------------------------------------------------------------------------------------
# Agreement


def _seed(target: Any) -> Callable[[Any], Any]:
    """Zennit's output relevance: the logit of `target` (one-hot times the output)."""
    torch, _ = require_zennit()

    def attr_output(out):
        onehot = torch.nn.functional.one_hot(target, out.shape[-1]).to(out)
        return onehot * out.detach()

    return attr_output


def zennit_relevance(net: Any, composite: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Zennit's LRP relevance of `target`'s logit for NHWC images, returned NHWC.

    Args:
      net: a torch model (`torch_model` / `zennit_model`), float32 or float64.
      composite: a Zennit composite.
      x: (N, H, W, C) images.
      target: (N,) class indices.

    Returns:
      (N, H, W, C) relevance, as a NumPy array of the net's dtype.
    """
    torch, zennit = require_zennit()
    dtype = "float64" if next(net.parameters()).dtype == torch.float64 else "float32"
    xt = _nchw(x, dtype)
    seed = _seed(torch.as_tensor(np.asarray(target), dtype=torch.long))
    with zennit.attribution.Gradient(net, composite) as attributor:
        _, relevance = attributor(xt, seed)
    return relevance.detach().permute(0, 2, 3, 1).numpy()


def max_rel_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Worst image's ``max |ours - theirs| / max |theirs|`` (0 where both are all zero).

    Args:
      ours, theirs: (N, ...) arrays of one shape.

    Returns:
      The largest per-image relative difference.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    n = ours.shape[0]
    diff = np.abs(ours - theirs).reshape(n, -1).max(axis=1)
    scale = np.abs(theirs).reshape(n, -1).max(axis=1)
    rel = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.where(diff > 0, np.inf, 0))
    return float(rel.max())


def _as_dtype(model: nnx.Module, dtype: str) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, bench._cast_floats(state, dtype), copy=True)


def compare(
    model: nnx.Module | None = None,
    images: np.ndarray | None = None,
    presets: Sequence[str] = PRESETS,
    dtypes: Sequence[str] = DTYPES,
    variants: bool = True,
) -> dict:
    """Logits and relevance of lrpjax against Zennit on the same images.

    The main comparison gives the torch model lrpjax's max-pool tie sharing (see
    `torch_model`), so that both compute one definition and any difference is the
    implementation's. With `variants`, two more float32 columns: PyTorch's own max-pool
    (the first maximum takes a tied window's relevance), and Zennit's composite as shipped
    (batch-norm passes relevance, its own canonizer, PyTorch's max-pool).

    Args:
      model: a sequential NNX model (default: the shipped miniVGG).
      images: (N, H, W, C) images in [0, 1] (default: the 100 shipped CIFAR-10 images).
      presets: names of `PRESETS`.
      dtypes: ``"float32"`` and/or ``"float64"`` (JAX with x64 enabled, torch in double);
        the model's weights are cast to it.
      variants: also compute the two float32 variants above.

    Returns:
      ``{"images", "dtypes", "rows": [...]}``: a row for the logits and one per preset,
      with ``"method"``, and per dtype the worst image's ``max |lrpjax - Zennit| / max
      |Zennit|``; ``"torch_pool_float32"`` and ``"stock_float32"`` for the variants; for
      presets ``"zennit"`` (the composite), ``"rules"`` and ``"merged"`` (as `zennit_model`
      gives them), and with both dtypes each library's float32 rounding error, its float32
      relevance against its own float64 one (``"lrpjax_float32_error"``,
      ``"zennit_float32_error"``): the scale the float32 difference is to be read against
      (LRP-epsilon divides by outputs near zero, which magnifies rounding).
    """
    torch, _ = require_zennit()
    if model is None:
        import lrpjax

        model = lrpjax.load_pretrained()
    if images is None:
        images = data.sample()[0]
    images = np.asarray(images)
    models.check_images(images, images.shape[1:])
    rows: dict[str, dict] = {"logits": {"method": "logits"}}
    results: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    rows.update({f"lrp:{p}": {"method": f"lrp:{p}"} for p in presets})
    for dtype in dtypes:
        with jax.enable_x64(dtype == "float64"):
            m = _as_dtype(model, dtype)
            x = jnp.asarray(images, dtype)
            logits = np.asarray(m(x))
            target = logits.argmax(-1)  # both explain the class lrpjax predicts
            with torch.no_grad():
                theirs = torch_model(m, dtype)(_nchw(images, dtype)).numpy()
            rows["logits"][dtype] = max_rel_diff(logits, theirs)
            for preset in presets:
                row = rows[f"lrp:{preset}"]
                fn, state = baselines.make(m, f"lrp:{preset}")
                ours = np.asarray(compilation.jit(fn)(state, x, jnp.asarray(target)))
                net, comp, info = zennit_model(m, x, preset, dtype, share_ties=True)
                theirs = zennit_relevance(net, comp, images, target)
                row[dtype] = max_rel_diff(ours, theirs)
                row.update(info)
                results[preset, dtype] = ours, theirs
                if variants and dtype == "float32":
                    net, comp, _ = zennit_model(m, x, preset, dtype)
                    row["torch_pool_float32"] = max_rel_diff(
                        ours, zennit_relevance(net, comp, images, target)
                    )
                    comp, _ = zennit_composite(m, preset, stock=True)
                    row["stock_float32"] = max_rel_diff(
                        ours, zennit_relevance(torch_model(m, dtype), comp, images, target)
                    )
    if {"float32", "float64"} <= set(dtypes):  # each library's own float32 rounding error
        for preset in presets:
            (ours32, theirs32), (ours64, theirs64) = (results[preset, d] for d in DTYPES)
            rows[f"lrp:{preset}"]["lrpjax_float32_error"] = max_rel_diff(ours32, ours64)
            rows[f"lrp:{preset}"]["zennit_float32_error"] = max_rel_diff(theirs32, theirs64)
    return {"images": len(images), "dtypes": list(dtypes), "rows": list(rows.values())}


# ---------------------------------------------------------------------------------------
# Timing


def _interleaved(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int
) -> tuple[float, list[float], list[float]]:
    """Compile and warm up both, then time them alternately (who goes first alternates too).

    Returns:
      ``(compile seconds of ours, our run times, their run times)``.
    """
    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    ours()
    theirs()
    theirs()
    mine: list[float] = []
    peer: list[float] = []
    for r in range(repeats):
        pairs = [(ours, mine), (theirs, peer)]
        for fn, runs in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    return compile_s, mine, peer


def _torch_method(
    model: nnx.Module, net: Any, method: str, x: np.ndarray
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The PyTorch / Zennit counterpart of a method, as a closure, and its clean-up."""
    torch, zennit = require_zennit()
    xt = _nchw(x, "float32")
    if method == "forward":

        def forward():
            with torch.no_grad():
                return net(xt)

        return forward, lambda: None
    if method == "gradient":

        def gradient_x_input():
            xg = xt.detach().requires_grad_(True)
            out = net(xg)
            seed = torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).to(out)
            (grad,) = torch.autograd.grad(out, xg, seed)
            return xg.detach() * grad

        return gradient_x_input, lambda: None
    preset = method.removeprefix("lrp:")
    zennit_net, comp, _ = zennit_model(model, x[:1], preset)
    attributor = zennit.attribution.Gradient(zennit_net, comp)
    attributor.__enter__()  # hooks registered once, as for a loop over batches

    def seed(out):
        onehot = torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).to(out)
        return onehot * out.detach()

    def lrp():
        return attributor(xt.detach(), seed)[1]

    return lrp, lambda: attributor.__exit__(None, None, None)


def environment(threads: int) -> dict:
    """Versions and thread settings of both libraries, for the report."""
    torch, zennit = require_zennit()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "platform": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compilation.compiler_options(),
        "torch": torch.__version__,
        "zennit": getattr(zennit, "__version__", _version("zennit")),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def benchmark_peer(
    model: nnx.Module | None = None,
    batch_size: int = 256,
    repeats: int = 5,
    methods: Sequence[str] = METHODS,
    threads: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Time lrpjax and PyTorch/Zennit on one batch, interleaved, on the same threads.

    Each method is compiled (lrpjax) and run twice on both sides, then timed `repeats`
    times, alternating lrpjax and Zennit; the report has the medians. lrpjax's calls are
    blocked on (``block_until_ready``); the forward pass runs under ``torch.no_grad``,
    gradient x input and Zennit with autograd (Zennit needs it), with Zennit's hooks
    registered once before the timing.

    Args:
      model: a sequential NNX model (default: the shipped miniVGG).
      batch_size: images per call (random images in [0, 1], float32).
      repeats: timed calls per side and method.
      methods: names of `METHODS`.
      threads: PyTorch's intra-op threads (default: the CPUs this process may use, which is
        also what XLA's thread pool is sized to; pin the process with ``taskset`` to
        choose them).
      progress: called with a line per method, or None.

    Returns:
      ``{"batch_size", "repeats", "environment", "results": [{"method", "lrpjax_s",
      "zennit_s", "speedup", "lrpjax_compile_s", "lrpjax_runs_s", "zennit_runs_s"}]}``,
      ``speedup = zennit_s / lrpjax_s`` (above 1: lrpjax is faster).
    """
    torch, _ = require_zennit()
    if model is None:
        import lrpjax

        model = lrpjax.load_pretrained()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"no Zennit counterpart for {unknown}; methods: {', '.join(METHODS)}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = np.random.default_rng(0).random((batch_size, *models.INPUT_SHAPE), np.float32)
        xj = jnp.asarray(x)
        net = torch_model(model)
        rows = []
        for method in methods:
            fn, state = bench.method_fn(model, method)
            compiled = (jax.jit if method == "forward" else compilation.jit)(fn)
            theirs, cleanup = _torch_method(model, net, method, x)
            try:
                compile_s, mine, peer = _interleaved(
                    lambda compiled=compiled, state=state: jax.block_until_ready(
                        compiled(state, xj)
                    ),
                    theirs,
                    repeats,
                )
            finally:
                cleanup()
            ours_s, zennit_s = statistics.median(mine), statistics.median(peer)
            rows.append(
                {"method": method, "lrpjax_s": ours_s, "zennit_s": zennit_s,
                 "speedup": zennit_s / ours_s, "lrpjax_compile_s": compile_s,
                 "lrpjax_runs_s": mine, "zennit_runs_s": peer}
            )  # fmt: skip
            if progress:
                progress(
                    f"  {method:26s} lrpjax {ours_s * 1e3:8.1f} ms  zennit {zennit_s * 1e3:8.1f}"
                    f" ms  x{zennit_s / ours_s:.2f}"
                )
        return {"batch_size": batch_size, "repeats": repeats,
                "environment": environment(threads), "results": rows}  # fmt: skip
    finally:
        torch.set_num_threads(before)


def run_peer(
    model: nnx.Module | None = None,
    batch_size: int = 256,
    repeats: int = 5,
    methods: Sequence[str] = METHODS,
    images: np.ndarray | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """`compare` (float32 and float64) on `images`, then `benchmark_peer`: the report of
    ``lrpjax bench --peer zennit``.

    Returns:
      ``{"peer": "zennit", "model", "agreement": compare(...), "timing": benchmark_peer(...)}``.
    """
    if model is None:
        import lrpjax

        model = lrpjax.load_pretrained()
    presets = [m.removeprefix("lrp:") for m in methods if m.startswith("lrp:")]
    if progress:
        progress("agreement (lrpjax against Zennit, float32 and float64) ...")
    agreement = compare(model, images, presets or PRESETS)
    if progress:
        progress(f"timing at batch {batch_size}, median of {repeats}, interleaved ...")
    timing = benchmark_peer(model, batch_size, repeats, methods, threads, progress)
    return {"peer": "zennit", "model": type(model).__name__, "agreement": agreement,
            "timing": timing}  # fmt: skip


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def table(report: dict) -> str:
    """Markdown tables of a `run_peer` report: agreement (with the Zennit composites used
    below it), then timing."""
    lines = []
    agreement = report.get("agreement")
    if agreement:
        rows = agreement["rows"]
        columns = [(d, f"{d}") for d in agreement["dtypes"]]
        extra = [
            ("lrpjax_float32_error", "lrpjax f32 vs f64"),
            ("zennit_float32_error", "Zennit f32 vs f64"),
            ("torch_pool_float32", "f32, PyTorch max-pool"),
            ("stock_float32", "f32, stock Zennit"),
        ]
        columns += [(k, t) for k, t in extra if any(k in r for r in rows)]
        lines += [
            f"Agreement on {agreement['images']} images: worst image's max |lrpjax - Zennit| "
            "/ max |Zennit| (max-pool ties shared in both unless noted)",
            "",
            "| | " + " | ".join(t for _, t in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in rows:
            lines.append(
                f"| {row['method']} | " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |"
            )
        lines.append("")
        for row in rows:
            if row.get("zennit"):
                merged = f"; lrpjax's canonizer merged {', '.join(row['merged'])}"
                lines.append(f"- {row['method']}: {row['zennit']}{merged if row['merged'] else ''}")
    timing = report.get("timing")
    if timing:
        env = timing["environment"]
        if lines:
            lines.append("")
        lines += [
            f"Batch {timing['batch_size']}, median of {timing['repeats']} interleaved runs; "
            f"{env['cpu']}, CPUs {env['affinity']}, torch {env['torch']} on "
            f"{env['torch_threads']} thread(s), zennit {env['zennit']}, jax {env['jax']}, "
            f"XLA_FLAGS={env['xla_flags'] or '(none)'}",
            "",
            "| method | lrpjax ms | Zennit ms | lrpjax speed-up |",
            "|---|---:|---:|---:|",
        ]
        for r in timing["results"]:
            lines.append(
                f"| {r['method']} | {r['lrpjax_s'] * 1e3:.1f} | {r['zennit_s'] * 1e3:.1f} | "
                f"{r['speedup']:.2f}x |"
            )
    return "\n".join(lines)


def cli(args: Any) -> int:
    """Run ``lrpjax bench --peer zennit`` from the parsed arguments of ``lrpjax bench``:
    `run_peer`, the JSON report to ``--json``, the tables printed.

    Args:
      args: the ``bench`` subcommand's arguments (`lrpjax.bench.speed.add_parser`).

    Returns:
      The exit status, 0.

    Raises:
      lrpjax.commands.common.CLIError: PyTorch or Zennit missing (with the install command), or
        options the comparison does not take; printed as one line by the CLI.
    """
    from lrpjax.commands.common import CLIError

    try:
        require_zennit()
    except PeerMissingError as e:
        raise CLIError(str(e)) from None
    if (
        args.zoo
        or args.dtype != "float32"
        or args.train
        or args.jax_defaults
        or args.model not in (None, "minivgg")
    ):
        raise CLIError("--peer compares the miniVGG in float32: no --zoo, --model, --dtype, "
                       "--train or --jax-defaults")  # fmt: skip
    model = models.load(args.checkpoint) if args.checkpoint else None
    if args.random_model:
        model = models.MiniVGG(rngs=nnx.Rngs(0))
        model.eval()
    methods = [m for m in (args.methods or ",".join(METHODS)).split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"no Zennit counterpart for {', '.join(unknown)}; "
                       f"--peer methods: {', '.join(METHODS)}")  # fmt: skip
    sizes = [int(b) for b in (args.batch_sizes or "256").split(",") if b]
    if len(sizes) != 1 or sizes[0] < 1:
        raise CLIError(f"--peer times one batch size, got --batch-sizes {args.batch_sizes}")
    report = run_peer(model, sizes[0], args.repeats, methods)
    models.write_json(args.json, report)
    print(table(report))
    print(f"wrote {args.json}")
    return 0
