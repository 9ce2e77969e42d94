"""`lrpjax.jit`: XLA options on CPU, same numbers as `jax.jit`, a switch back to the defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import compilation
from lrpjax.core import engine
from lrpjax.models import MiniVGG


def test_options_on_cpu_and_the_switch_back(monkeypatch):
    assert jax.default_backend() == "cpu"  # the test suite runs on the CPU
    monkeypatch.delenv(compilation.DEFAULTS_VARIABLE, raising=False)
    assert compilation.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    with compilation.jax_defaults():
        assert compilation.compiler_options() is None
    assert compilation.compiler_options() is not None  # restored
    monkeypatch.setenv(compilation.DEFAULTS_VARIABLE, "1")
    assert compilation.compiler_options() is None
    with compilation.jax_defaults():
        pass
    assert compilation.compiler_options() is None  # the caller's setting is kept
    monkeypatch.setenv(compilation.DEFAULTS_VARIABLE, "0")
    assert compilation.compiler_options() is not None


def test_the_option_reaches_the_compiler():
    """A convolution that XLA hands to a YNNPACK fusion by default does not get one."""
    x = jnp.ones((1, 32, 32, 32))  # smaller ones stay with XLA's own convolution
    w = jnp.ones((3, 3, 32, 32))

    def conv(x):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    default = jax.jit(conv).lower(x).compile().as_text()
    if "ynn_fusion" not in default:
        pytest.skip("this jaxlib makes no YNNPACK fusions")
    assert "ynn_fusion" not in compilation.jit(conv).lower(x).compile().as_text()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_explanations_equal_plain_jax_jit(composite):
    model = MiniVGG(rngs=nnx.Rngs(3))
    model.eval()
    x = jnp.asarray(np.random.default_rng(4).random((4, 32, 32, 3), np.float32))
    fn, state = lrpjax.explainer(model, composite=composite)
    target = jnp.full((4,), -1)
    ours = lrpjax.jit(fn)(state, x, target)
    plain = jax.jit(fn)(state, x, target)
    scale = float(jnp.max(jnp.abs(plain.relevance)))
    np.testing.assert_allclose(ours.relevance, plain.relevance, atol=1e-4 * scale)
    np.testing.assert_allclose(ours.logits, plain.logits, rtol=1e-4, atol=1e-5)


def test_explain_follows_the_switch():
    """`lrpjax.explain` caches compiled functions; the switch must not reuse the other's."""
    model = MiniVGG(rngs=nnx.Rngs(5))
    model.eval()
    x = jnp.asarray(np.random.default_rng(6).random((2, 32, 32, 3), np.float32))
    ours = lrpjax.explain(model, x)
    before = engine._jitted.cache_info().misses  # not its size: the cache may be full
    with compilation.jax_defaults():
        plain = lrpjax.explain(model, x)
    assert engine._jitted.cache_info().misses == before + 1
    np.testing.assert_allclose(ours, plain, atol=1e-4 * float(jnp.max(jnp.abs(plain))))
