"""A sequential lrpjax model (the shipped miniVGG) rebuilt in PyTorch from the same weights:
NHWC/HWIO converted to NCHW/OIHW, the flatten done in NHWC order, and optionally a max-pool
whose gradient shares ties as lrpjax's does (see `lrpjax.peers`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import numpy as np
from flax import nnx

from lrpjax.core.layers import Flatten, MaxPool, ReLU
from lrpjax.peers.install import require_zennit

__all__ = ["nchw", "torch_model"]


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


def nchw(x: np.ndarray | jax.Array, dtype: str) -> Any:
    """NHWC images as an NCHW torch tensor of `dtype` (contiguous)."""
    return _tensor(np.asarray(x).transpose(0, 3, 1, 2), dtype).contiguous()
