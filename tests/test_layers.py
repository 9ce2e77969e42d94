"""`lrpjax.layers.few_channel_conv` against XLA's convolution: values and both gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.layers import few_channel_conv

from lrpjax import layer_types


def _reference_conv(x, kernel, padding):
    spatial = "DHW"[3 - (x.ndim - 2) :]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * (x.ndim - 2), padding, dimension_numbers=dims
    )


CASES = {
    "rgb_3x3_same": ((2, 9, 8, 3), (3, 3, 3, 5), "SAME"),
    "gray_even_kernel_same": ((2, 9, 8, 1), (2, 4, 1, 5), "SAME"),
    "4ch_valid": ((2, 9, 8, 4), (3, 2, 4, 5), "VALID"),
    "1d_same": ((2, 11, 3), (4, 3, 6), "SAME"),
    "3d_same": ((1, 5, 6, 7, 2), (3, 3, 3, 2, 4), "SAME"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_few_channel_conv_matches_xla_conv(case):
    x_shape, k_shape, padding = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    y, vjp = jax.vjp(lambda x, k: few_channel_conv(x, k, padding), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, k: _reference_conv(x, k, padding), x, kernel)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_few_channel_conv_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    f = jax.jit(jax.vmap(lambda x: few_channel_conv(x, kernel, "SAME")))
    want = jnp.stack([_reference_conv(xi, kernel, "SAME") for xi in x])
    np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-5)


def test_few_channel_conv_promotes_dtypes_like_nnx_conv():
    """bfloat16 images with float32 weights: float32 result, gradients in input dtypes."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((2, 6, 6, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    y, vjp = jax.vjp(lambda x, k: few_channel_conv(x, k, "SAME"), x, kernel)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _reference_conv(x.astype(jnp.float32), kernel, "SAME"), atol=1e-5)
    g_x, g_kernel = vjp(jnp.ones_like(y))
    assert g_x.dtype == jnp.bfloat16 and g_kernel.dtype == jnp.float32


@pytest.mark.parametrize(
    ("kwargs", "fast"),
    [
        ({"in_features": 3}, True),
        ({"in_features": 3, "padding": "VALID"}, True),
        ({"in_features": 8}, False),
        ({"in_features": 3, "strides": 2}, False),
        ({"in_features": 3, "kernel_dilation": 2}, False),
        ({"in_features": 3, "padding": ((1, 1), (1, 1))}, False),
    ],
)
def test_which_convolutions_take_the_few_channel_path(kwargs, fast):
    kwargs = {"out_features": 4, "kernel_size": (3, 3), "padding": "SAME", **kwargs}
    conv = nnx.Conv(**kwargs, rngs=nnx.Rngs(0))
    assert layer_types.few_channels(conv) is fast
    x = jnp.asarray(np.random.default_rng(2).random((2, 7, 7, kwargs["in_features"])), jnp.float32)
    aff = layer_types.as_affine(conv)
    np.testing.assert_allclose(aff.apply(x, aff.kernel, aff.bias), conv(x), rtol=1e-5, atol=1e-5)
