"""Parameter-free layers as NNX modules, so that a model's layer order is its attribute order.

`MaxPool` computes a non-overlapping max-pool with a reshape and a reduction, and its
gradient with elementwise operations (compare with the upsampled maximum, share ties):
XLA's generic select-and-scatter backward of `reduce_window` is about 28x the forward on
CPU at batch 256, which made it the most expensive op of both training and LRP. The
gradient routes everything to the window's maximum, which is also the winner-take-all
LRP rule for max-pooling (Montavon et al. 2019, Sec. 10.2.2).

`few_channel_conv` is a convolution with the same values as XLA's, for inputs with few
channels (an RGB input layer), where XLA's CPU convolution is slow; the LRP engine and rules
use it for such layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Flatten", "MaxPool", "ReLU", "few_channel_conv", "max_pool"]


def _windowed(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Reshape (N, *spatial, C) into (N, s1, w1, s2, w2, ..., C), cropping remainders."""
    n, *spatial, c = x.shape
    crop = tuple(slice(0, (s // w) * w) for s, w in zip(spatial, window, strict=True))
    x = x[(slice(None), *crop, slice(None))]
    shape = [n]
    for s, w in zip(spatial, window, strict=True):
        shape += [s // w, w]
    return x.reshape((*shape, c))


def _unwindowed(xw: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `_windowed`: back to (N, *spatial, C) of `shape`, zeros where cropped."""
    n, c = xw.shape[0], xw.shape[-1]
    spatial = tuple(xw.shape[1 + 2 * i] * xw.shape[2 + 2 * i] for i in range((xw.ndim - 2) // 2))
    x = xw.reshape((n, *spatial, c))
    pad = [(0, 0)] + [(0, s - k) for s, k in zip(shape[1:-1], spatial, strict=True)] + [(0, 0)]
    return jnp.pad(x, pad)


def _window_axes(window: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(2 + 2 * i for i in range(len(window)))


def _upsample(y: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Inverse of a reduction over the window axes: (N, s1, s2, .., C) -> windowed shape."""
    return jnp.expand_dims(y, _window_axes(window))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Non-overlapping max-pool over the spatial axes of a channels-last array.

    Args:
      x: (N, *spatial, C) array.
      window: window size per spatial axis; the stride equals the window (no overlap) and
        trailing rows or columns that do not fill a window are dropped, as with VALID padding.

    Returns:
      (N, *[s // w for s, w in zip(spatial, window)], C) array of window maxima.
    """
    return jnp.max(_windowed(x, window), axis=_window_axes(window))


def _max_pool_fwd(x, window):
    y = max_pool(x, window)
    return y, (x, y)


def _max_pool_bwd(window, residuals, g):
    x, y = residuals
    xw = _windowed(x, window)
    winners = (xw == _upsample(y, window)).astype(g.dtype)
    # Ties share the gradient equally, so relevance routed through here is conserved.
    ties = jnp.sum(winners, axis=_window_axes(window), keepdims=True)
    return (_unwindowed(winners * (_upsample(g, window) / ties), x.shape),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


#: Convolutions with at most this many input channels (an RGB input layer) use
#: `few_channel_conv`.
FEW_CHANNELS = 4


def _conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    spatial = "DHW"[3 - (x.ndim - 2) :]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * (x.ndim - 2), padding, dimension_numbers=dims
    )


def _patches(x: jax.Array, window: tuple[int, ...], padding: str) -> jax.Array:
    """(N, *spatial, C) -> (N, *out_spatial, prod(window) * C), window-major, as slices."""
    if padding == "SAME":
        pads = [((w - 1) // 2, w - 1 - (w - 1) // 2) for w in window]
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [s - w + 1 for s, w in zip(x.shape[1:-1], window, strict=True)]
    slices = [
        x[(slice(None), *(slice(o, o + n) for o, n in zip(offset, out, strict=True)))]
        for offset in itertools.product(*(range(w) for w in window))
    ]
    return jnp.concatenate(slices, axis=-1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def few_channel_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """Unit-stride convolution of an input with few channels (e.g. RGB), fast on CPU.

    The same values as `jax.lax.conv_general_dilated`. Why: XLA's CPU convolution is slow
    for 3 input channels, forward and, above all, backward (the input gradient of
    miniVGG's first layer took 29 ms at batch 256, as long as the 32-channel layer after
    it). Forward: channels zero-padded to `FEW_CHANNELS` (1.6x faster there); backward:
    the cotangent times the kernel matrix, summed back over shifted windows (6x faster).

    Args:
      x: (N, *spatial, C) channels-last input.
      kernel: (*window, C, O).
      padding: ``"SAME"`` or ``"VALID"``.

    Returns:
      (N, *out_spatial, O).
    """
    dtype = jnp.result_type(x, kernel)  # as nnx.Conv promotes, e.g. bfloat16 images
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    channels = x.shape[-1]
    if channels < FEW_CHANNELS:
        extra = FEW_CHANNELS - channels
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
        kernel = jnp.pad(kernel, [(0, 0)] * (kernel.ndim - 2) + [(0, extra), (0, 0)])
    return _conv(x, kernel, padding)


def _few_channel_conv_fwd(x, kernel, padding):
    return few_channel_conv(x, kernel, padding), (x, kernel)


def _few_channel_conv_bwd(padding, residuals, g):
    x, kernel = residuals
    window = kernel.shape[:-2]
    patches, patches_vjp = jax.vjp(lambda x: _patches(x, window, padding), x)
    matrix = kernel.reshape(-1, kernel.shape[-1])
    g_matrix = g.reshape(-1, g.shape[-1])
    g_x = patches_vjp((g_matrix @ matrix.T).reshape(patches.shape).astype(x.dtype))[0]
    g_kernel = (patches.reshape(-1, matrix.shape[0]).T @ g_matrix).reshape(kernel.shape)
    return g_x, g_kernel.astype(kernel.dtype)


few_channel_conv.defvjp(_few_channel_conv_fwd, _few_channel_conv_bwd)


class MaxPool(nnx.Module):
    """Max-pooling layer with non-overlapping windows (see `max_pool`).

    Args:
      window: window size per spatial axis, e.g. (2, 2) for images, (2,) for sequences.
    """

    def __init__(self, window: Sequence[int] = (2, 2)):
        self.window = tuple(int(w) for w in window)

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.window)


class ReLU(nnx.Module):
    """Rectified linear unit, max(x, 0), as a layer."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class Flatten(nnx.Module):
    """Flatten all axes but the batch axis: (N, ...) -> (N, prod(...))."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape((x.shape[0], -1))
