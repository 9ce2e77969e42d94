r"""Canonizers: function-preserving rewrites of a model before it is explained (as in Zennit).

A canonizer is called as ``canonizer(model, x, composite) -> model`` on a copy of the model
inside the traced explanation; it changes parameter values (a pure tree operation on that
copy), never the function the model computes. A composite carries its canonizers
(``Composite.canonizers``); `lrpjax.core.composites.with_canonizers` adds them to any
composite.

`MergeBatchNorm` folds inference-mode batch-norm, :math:`y = s \odot x + t` with
:math:`s = \gamma / \sqrt{\mathrm{var} + \epsilon}` and :math:`t = \beta - \mu s`, into an
adjacent linear layer and resets the batch-norm to the identity, so that LRP sees one linear
layer whose bias takes the shift's share, instead of a batch-norm layer whose shift absorbs
relevance by itself:

- **Conv/Dense -> BN** (ResNets): :math:`W' = W s`, :math:`b' = b s + t` (on the output
  axis); the layer gets a bias if it had none.
- **BN -> Dense**, or BN -> Conv with VALID padding, where only reshapes or dropout stand
  between: :math:`W' = \mathrm{diag}(s) W`, :math:`b' = b + W^\top t`. A padded convolution
  sees zeros, not :math:`t`, at its border, so BN -> Conv with SAME padding is not merged
  (it would change the function).

A pair qualifies only if the first layer's output goes nowhere else (no residual branch,
not the model's output). Models outputs are equal before and after to float rounding
(tested to 1e-5).

References:
  Anders, Neumann, Samek, Müller, Lapuschkin (2021). Software for dataset-wide XAI: from
  local explanations to global insights with Zennit, CoRelAy, and ViRelAy. arXiv:2106.13200.
  Montavon et al. (2019), LNCS 11700, Sec. 10.3 (batch-norm merged into the linear layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core import jaxprs, layer_types, tracing

__all__ = ["MergeBatchNorm", "merge_batchnorm"]

#: Operations between a batch-norm and the next layer that keep each element's value.
_RESHAPES = frozenset(["reshape", "squeeze", "expand_dims", "copy", "copy_p"])


def _scale_shift(bn: nnx.BatchNorm) -> tuple[jax.Array, jax.Array]:
    affine = layer_types.as_affine(bn)
    return affine.kernel, affine.bias


def _reset(bn: nnx.BatchNorm) -> None:
    """Make a batch-norm the identity: mean 0, var 1 - eps, scale 1, bias 0."""
    bn.mean[...] = jnp.zeros_like(bn.mean[...])
    bn.var[...] = jnp.full_like(bn.var[...], 1.0 - bn.epsilon)
    if bn.scale is not None:
        bn.scale[...] = jnp.ones_like(bn.scale[...])
    if bn.bias is not None:
        bn.bias[...] = jnp.zeros_like(bn.bias[...])


def _set_bias(layer: nnx.Module, bias: jax.Array) -> None:
    if layer.bias is None:
        layer.bias = nnx.Param(bias.astype(layer.kernel[...].dtype))
        layer.use_bias = True
    else:
        layer.bias[...] = bias.astype(layer.bias[...].dtype)


def _plain(layer: Any) -> bool:
    """nnx.Linear, or an ungrouped nnx.Conv without input dilation."""
    if type(layer) is nnx.Linear:
        return True
    if type(layer) is not nnx.Conv or layer.feature_group_count != 1 or layer.mask is not None:
        return False
    dilation = layer.input_dilation
    return dilation is None or all(int(d) == 1 for d in np.atleast_1d(dilation))


def _valid(conv: nnx.Conv) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding.upper() == "VALID"
    return all(tuple(p) == (0, 0) for p in padding) if not isinstance(padding, int) else not padding


@dataclasses.dataclass(frozen=True)
class MergeBatchNorm:
    """Merge inference-mode `nnx.BatchNorm` into the adjacent linear layer; see the module
    docstring for when a pair qualifies."""

    def pairs(self, model: nnx.Module, x: jax.Array, composite) -> list[tuple[str, str, str]]:
        """The pairs merged: ``(batch-norm path, layer path, "after" | "before")``, "after"
        where the batch-norm follows the layer."""
        closed, gates, units = tracing.traced_units(model, x, composite)
        jaxpr = closed.jaxpr
        flow = jaxprs.Dataflow(jaxpr)
        only_use = flow.only_use

        def operand(i: int) -> Any:
            return jaxprs.operand(jaxpr.eqns[i])

        found, merged = [], set()
        for i, path in gates.items():
            if not isinstance(units[path], nnx.BatchNorm) or units[path].axis != -1:
                continue
            a = operand(i)
            j = flow.producers.get(a)
            after = j in gates and _plain(units[gates[j]]) and only_use(a) == i
            if after and gates[j] not in merged:
                found.append((path, gates[j], "after"))
                merged.add(gates[j])
                continue
            v, reshaped = jaxpr.eqns[i].outvars[0], False
            while (k := only_use(v)) is not None:
                eqn = jaxpr.eqns[k]
                if k in gates and isinstance(units[gates[k]], layer_types.RESHAPING):
                    reshaped |= not isinstance(units[gates[k]], nnx.Dropout)
                    v = eqn.outvars[0]
                elif k not in gates and eqn.primitive.name in _RESHAPES:
                    reshaped, v = True, eqn.outvars[0]
                else:
                    break
            k = only_use(v)
            if k not in gates or operand(k) is not v:
                continue
            layer = units[gates[k]]
            if not _plain(layer) or gates[k] in merged:
                continue
            if isinstance(layer, nnx.Conv) and (reshaped or not _valid(layer)):
                continue
            if isinstance(layer, nnx.Linear) and v.aval.ndim != 2:
                continue
            found.append((path, gates[k], "before"))
            merged.add(gates[k])
        return found

    def __call__(self, model: nnx.Module, x: jax.Array, composite) -> nnx.Module:
        modules = dict(nnx.iter_modules(model))
        by_path = {"/".join(map(str, k)): m for k, m in modules.items()}
        for bn_path, layer_path, where in self.pairs(model, x, composite):
            bn, layer = by_path[bn_path], by_path[layer_path]
            s, t = _scale_shift(bn)
            kernel = layer.kernel[...]
            bias = layer.bias[...] if layer.bias is not None else None
            if where == "after":  # y = s (W a + b) + t
                layer.kernel[...] = (kernel * s).astype(kernel.dtype)
                _set_bias(layer, t if bias is None else bias * s + t)
            else:  # y = W (s a + t) + b
                n_in = kernel.shape[-2]
                s_in = jnp.broadcast_to(s, (n_in // s.size, s.size)).reshape(n_in)
                t_in = jnp.broadcast_to(t, (n_in // t.size, t.size)).reshape(n_in)
                if isinstance(layer, nnx.Conv):
                    s_in, t_in = s, t
                shift = jnp.einsum("...io,i->o", kernel, t_in)
                layer.kernel[...] = (kernel * s_in[:, None]).astype(kernel.dtype)
                _set_bias(layer, shift if bias is None else bias + shift)
            _reset(bn)
        return model


def merge_batchnorm() -> MergeBatchNorm:
    """The batch-norm merging canonizer; see `MergeBatchNorm`."""
    return MergeBatchNorm()
