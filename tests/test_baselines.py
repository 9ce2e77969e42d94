"""Baseline explainers: gradient, gradient x input, integrated gradients, SmoothGrad, random.

Small hand-built models only (fast on CPU); the shipped model is used in test_metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import baselines, composites
from lrpjax.layers import Flatten, ReLU


class Smooth(nnx.Module):
    """(N, 4, 4, 2) -> (N, 3) logits through a softplus MLP (smooth, non-linear)."""

    def __init__(self, rngs: nnx.Rngs):
        self.flatten = Flatten()
        self.dense1 = nnx.Linear(32, 16, rngs=rngs)
        self.dense2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense2(jax.nn.softplus(self.dense1(self.flatten(x))))


class Linear(nnx.Module):
    """(N, 4, 4, 2) -> (N, 3): logits = flatten(x) @ W + b."""

    def __init__(self, rngs: nnx.Rngs):
        self.flatten = Flatten()
        self.dense = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.flatten(x))


class Conv(nnx.Module):
    """(N, 4, 4, 2) -> (N, 3): Conv-ReLU-Flatten-Linear, explainable by LRP."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
        self.relu = ReLU()
        self.flatten = Flatten()
        self.dense = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.flatten(self.relu(self.conv(x))))


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).random((5, 4, 4, 2), np.float32))


@pytest.fixture(scope="module")
def smooth():
    return Smooth(nnx.Rngs(1))


def _target_grad(model, x, target):
    """Reference: jax.grad of the target logit, per image (vmapped)."""
    return jax.vmap(jax.grad(lambda xi, t: model(xi[None])[0, t]))(x, target)


def _jit(explainer):
    fn, state = explainer
    return jax.jit(fn), state


def test_gradient_is_the_gradient_of_the_target_logit(smooth, x):
    fn, state = _jit(baselines.gradient(smooth))
    target = jnp.array([0, 1, 2, 0, 1])
    np.testing.assert_allclose(
        fn(state, x, target), _target_grad(smooth, x, target), rtol=1e-5, atol=1e-6
    )
    predicted = jnp.argmax(smooth(x), axis=-1)
    np.testing.assert_allclose(
        fn(state, x, jnp.full(5, -1)), _target_grad(smooth, x, predicted), rtol=1e-5, atol=1e-6
    )


def test_sensitivity_and_gradient_x_input(smooth, x):
    target = jnp.array([2, 1, 0, 0, 1])
    grad = _target_grad(smooth, x, target)
    fn, state = _jit(baselines.gradient_x_input(smooth))
    np.testing.assert_allclose(fn(state, x, target), x * grad, rtol=1e-5, atol=1e-6)
    fn, state = _jit(baselines.sensitivity(smooth))
    np.testing.assert_allclose(fn(state, x, target), grad**2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_integrated_gradients_on_a_linear_model_is_exact(x, baseline):
    model = Linear(nnx.Rngs(2))
    target = jnp.array([0, 1, 2, 1, 0])
    fn, state = _jit(baselines.integrated_gradients(model, baseline=baseline, steps=3))
    w = model.dense.kernel.get_value().reshape(4, 4, 2, 3)
    expected = (x - baseline) * jnp.moveaxis(w[..., target], -1, 0)
    np.testing.assert_allclose(fn(state, x, target), expected, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness(smooth, x):
    """sum_i IG_i = f_t(x) - f_t(baseline), up to the quadrature error of 256 steps."""
    baseline = jnp.full((4, 4, 2), 0.5)
    fn, state = baselines.integrated_gradients(smooth, baseline=baseline, steps=256)
    ig = jax.jit(fn)(state, x, jnp.full(5, -1))
    logits = smooth(x)
    t = jnp.argmax(logits, axis=-1)
    gap = logits[jnp.arange(5), t] - smooth(jnp.broadcast_to(baseline, x.shape))[jnp.arange(5), t]
    np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), gap, rtol=1e-3, atol=1e-4)
    assert float(jnp.abs(gap).min()) > 1e-3  # the check is not vacuous
    assert baselines.passes(fn) == 257


def test_smoothgrad(smooth, x):
    target = jnp.array([0, 1, 2, 0, 1])
    grad_fn, state = _jit(baselines.gradient(smooth))
    fn0, _ = _jit(baselines.smoothgrad(smooth, noise=0.0, samples=4))
    np.testing.assert_allclose(fn0(state, x, target), grad_fn(state, x, target), rtol=1e-5)
    fn, _ = _jit(baselines.smoothgrad(smooth, noise=0.2, samples=8, seed=0))
    fn_again, _ = _jit(baselines.smoothgrad(smooth, noise=0.2, samples=8, seed=0))
    fn_other, _ = _jit(baselines.smoothgrad(smooth, noise=0.2, samples=8, seed=1))
    sg = fn(state, x, target)
    np.testing.assert_array_equal(sg, fn_again(state, x, target))
    assert not np.allclose(sg, fn_other(state, x, target))
    assert not np.allclose(sg, grad_fn(state, x, target))


def test_random_map_is_seeded(smooth, x):
    fn, state = _jit(baselines.random_map(smooth, seed=0))
    fn1, _ = _jit(baselines.random_map(smooth, seed=1))
    r = fn(state, x, jnp.zeros(5, jnp.int32))
    assert r.shape == x.shape
    np.testing.assert_array_equal(r, fn(state, x, jnp.full(5, 2)))  # ignores the target
    assert not np.allclose(r, fn1(state, x, jnp.zeros(5, jnp.int32)))
    assert not np.allclose(r[0], r[1])  # different images, different maps
    assert abs(float(r.mean())) < 0.2 and 0.8 < float(r.std()) < 1.2


SPECS = [
    "gradient",
    "sensitivity",
    "gradient_x_input",
    "integrated_gradients:steps=4",
    "smoothgrad:samples=3,noise=0.1",
    "random",
    "lrp:epsilon",
    "lrp:epsilon_gamma_box:gamma=0.5",
    "lrp:epsilon:init=sglrp",
]


@pytest.mark.parametrize("spec", SPECS)
def test_jittable_and_batch_consistent(spec, x):
    model = Conv(nnx.Rngs(3))
    fn, state = baselines.make(model, spec)
    jfn = jax.jit(fn)
    target = jnp.array([0, -1, 2, 1, -1])
    whole = jfn(state, x, target)
    assert whole.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(whole)))
    parts = jnp.concatenate([jfn(state, x[:2], target[:2]), jfn(state, x[2:], target[2:])])
    np.testing.assert_allclose(whole, parts, rtol=1e-4, atol=1e-6)


def test_make_lrp_matches_explain(x):
    model = Conv(nnx.Rngs(4))
    target = jnp.array([0, 1, 2, 1, 0])
    fn, state = _jit(baselines.make(model, "lrp:epsilon:eps=0.25"))
    expected = lrpjax.explain(model, x, composite=composites.epsilon(eps=0.25), target=target)
    np.testing.assert_allclose(fn(state, x, target), expected, rtol=1e-5, atol=1e-7)
    fn, state = _jit(baselines.make(model, "lrp:epsilon_plus_flat:init=probability"))
    expected = lrpjax.explain(
        model, x, composite="epsilon_plus_flat", target=target, init="probability"
    )
    np.testing.assert_allclose(fn(state, x, target), expected, rtol=1e-5, atol=1e-7)


def test_make_parses_parameters(smooth):
    fn, _ = baselines.make(smooth, "integrated_gradients:steps=16")
    assert baselines.passes(fn) == 17
    fn, _ = baselines.make(smooth, "smoothgrad:samples=8,noise=0.2")
    assert baselines.passes(fn) == 9
    assert baselines.passes(baselines.make(smooth, "gradient")[0]) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("saliency", "unknown explainer 'saliency'; known: gradient"),
        ("lrp:nope", "lrp:epsilon_plus_flat"),
        ("integrated_gradients:stepz=3", "bad parameters"),
        ("integrated_gradients:steps", "expected key=value"),
        ("integrated_gradients:steps=0", "steps >= 1"),
        ("lrp:epsilon:init=bogus", "unknown init"),
        ("lrp:epsilon:gamma=0.5", "bad parameters"),
    ],
)
def test_make_rejects_bad_specs(smooth, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        baselines.make(smooth, spec)
