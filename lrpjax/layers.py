"""Parameter-free layers as NNX modules, so that a model's layer order is its attribute order.

`MaxPool` computes a non-overlapping max-pool with a reshape and a reduction, and its
gradient with elementwise operations (compare with the upsampled maximum, share ties):
XLA's generic select-and-scatter backward of `reduce_window` is about 28x the forward on
CPU at batch 256, which made it the most expensive op of both training and LRP. The
gradient routes everything to the window's maximum, which is also the winner-take-all
LRP rule for max-pooling (Montavon et al. 2019, Sec. 10.2.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Flatten", "MaxPool", "ReLU", "max_pool"]


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
