"""Baseline explainers: gradient, gradient x input, integrated gradients, SmoothGrad, random.

Small hand-built models only (fast on CPU); the shipped model is used in test_metrics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.layers import Flatten, ReLU

import lrpjax
from lrpjax import baselines, composites


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


# --- attention rollout ---------------------------------------------------------------------


class ClsViT(nnx.Module):
    """(N, 8, 8, 3) -> (N, 3): 4x4 patches, class token, 2 pre-norm attention blocks."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 8, depth: int = 2):
        self.embed = nnx.Conv(3, dim, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 5, dim)))
        self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(depth)])
        self.attns = nnx.List(
            [nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs) for _ in range(depth)]
        )
        self.head = nnx.Linear(dim, 3, rngs=rngs)

    def tokens(self, x):
        t = self.embed(x).reshape(x.shape[0], -1, self.pos.shape[-1])
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, t.shape[-1]))
        return jnp.concatenate([cls, t], axis=1) + self.pos[...]

    def blocks(self):
        return [
            lambda t, n=n, a=a: t + a(n(t)) for n, a in zip(self.norms, self.attns, strict=True)
        ]

    def __call__(self, x):
        t = self.tokens(x)
        for block in self.blocks():
            t = block(t)
        return self.head(t[:, 0])


def _attention_by_hand(attn: nnx.MultiHeadAttention, h: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) per head from the layer's parameters: (N, heads, T, T)."""
    q = np.einsum("ntd,dhk->nhtk", h, np.asarray(attn.query.kernel[...]))
    q = q + np.asarray(attn.query.bias[...])[None, :, None]
    k = np.einsum("ntd,dhk->nhtk", h, np.asarray(attn.key.kernel[...]))
    k = k + np.asarray(attn.key.bias[...])[None, :, None]
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rollout_by_hand(weights: list[np.ndarray], cls: bool, image: tuple[int, int, int]):
    """Abnar & Zuidema's rollout, written out per image with numpy: (N, H, W, C)."""
    out = []
    for i in range(weights[0].shape[0]):
        t = weights[0].shape[-1]
        joint = np.eye(t)
        for w in weights:
            a = 0.5 * w[i].mean(axis=0) + 0.5 * np.eye(t)  # rows of w sum to 1
            joint = a @ joint
        scores = joint[0, 1:] if cls else joint.mean(axis=0)
        g = math.isqrt(scores.size)
        h, w_, c = image
        block = np.kron(scores.reshape(g, g), np.ones((h // g, w_ // g)))
        out.append(np.repeat(block[..., None] / c, c, axis=-1))
    return np.stack(out)


def test_rollout_of_a_class_token_vit_matches_numpy():
    model = ClsViT(nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(1).random((3, 8, 8, 3), np.float32)
    t = np.asarray(model.tokens(x))
    weights = []
    for norm, attn, block in zip(model.norms, model.attns, model.blocks(), strict=True):
        weights.append(_attention_by_hand(attn, np.asarray(norm(t), np.float64)))
        t = np.asarray(block(t))
    assert len(weights) == 2 and weights[0].shape == (3, 2, 5, 5)
    expected = _rollout_by_hand(weights, cls=True, image=(8, 8, 3))
    fn, state = _jit(baselines.make(model, "rollout"))
    got = fn(state, x, jnp.array([0, 1, -1]))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fn(state, x, jnp.array([2, 2, 2])), got)  # class-agnostic
    fn_cls, _ = _jit(baselines.make(model, "rollout:token=cls"))
    np.testing.assert_allclose(fn_cls(state, x, jnp.zeros(3, jnp.int32)), got)
    assert not np.allclose(got[0], got[1])  # depends on the image
    # The heads' weights recorded from the model's own calls are those computed by hand.
    recorded = baselines.attention_weights(nnx.merge(*nnx.split(model)), jnp.asarray(x))
    np.testing.assert_allclose(recorded[1], weights[1], rtol=1e-4, atol=1e-6)


def test_rollout_of_a_sequence_pooled_cct_matches_numpy():
    from lrpjax import models

    model = models.CCT(channels=4, dim=8, depth=3, heads=2, mlp_dim=8, rngs=nnx.Rngs(2))
    model.eval()
    x = np.random.default_rng(3).random((2, 32, 32, 3), np.float32)
    t = model.tokens(x)
    weights = []
    for i in range(3):
        block = getattr(model, f"block{i}")
        weights.append(_attention_by_hand(block.attn, np.asarray(block.norm1(t), np.float64)))
        t = block(t)
    assert weights[0].shape == (2, 2, 64, 64)
    expected = _rollout_by_hand(weights, cls=False, image=(32, 32, 3))
    fn, state = _jit(baselines.make(model, "rollout"))  # auto: 64 tokens tile 32x32
    got = fn(state, x, jnp.array([-1, 3]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # Each image's map is a distribution over the 64 tokens, spread over 4x4x3 values each.
    np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), 16.0, rtol=1e-5)
    # The model's own attention layers are left as they were.
    assert model.block0.attn.attention_fn is nnx.dot_product_attention


def test_rollout_refuses_models_without_attention(smooth):
    from lrpjax import models

    for model in (smooth, models.MiniVGG(rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=r"needs a model with nnx\.MultiHeadAttention"):
            baselines.make(model, "rollout")
    with pytest.raises(ValueError, match="token must be"):
        baselines.make(ClsViT(nnx.Rngs(0)), "rollout:token=first")
    assert "rollout" in baselines.known_specs()
