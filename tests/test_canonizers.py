"""Canonizers: batch-norm merged into adjacent linear layers, the function unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import canonizers, composites, rules, zoo

EPSILON = composites.get("epsilon")


def _random_statistics(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Batch-norm statistics and affine parameters far from the identity."""
    key = jax.random.key(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            key, *keys = jax.random.split(key, 5)
            shape = module.mean[...].shape
            module.mean[...] = 0.3 * jax.random.normal(keys[0], shape)
            module.var[...] = jax.random.uniform(keys[1], shape, minval=0.3, maxval=2.0)
            module.scale[...] = jax.random.uniform(keys[2], shape, minval=0.5, maxval=1.5)
            module.bias[...] = 0.2 * jax.random.normal(keys[3], shape)
    return model


def _copy(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state, copy=True)


class Sequence(nnx.Module):
    """Conv -> BN (merged after); BN -> Conv VALID (merged before); BN -> Conv SAME (not);
    Dense -> BN whose output also feeds a residual (not); BN -> Flatten -> Dense (merged)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), padding="VALID", rngs=rngs)
        self.bn3 = nnx.BatchNorm(4, rngs=rngs)
        self.conv3 = nnx.Conv(4, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn4 = nnx.BatchNorm(4, rngs=rngs)
        self.flatten = lrpjax.layers.Flatten()
        self.dense1 = nnx.Linear(4 * 6 * 6, 8, rngs=rngs)
        self.dense2 = nnx.Linear(8, 8, rngs=rngs)
        self.bn5 = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.conv2(self.bn2(x)))
        x = nnx.relu(self.conv3(self.bn3(x)))
        h = nnx.relu(self.dense1(self.flatten(self.bn4(x))))
        y = self.dense2(h)
        return self.head(nnx.relu(self.bn5(y) + y))


def test_which_pairs_merge():
    model = Sequence(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3), np.float32))
    pairs = canonizers.MergeBatchNorm().pairs(model, x, EPSILON)
    assert sorted(pairs) == [
        ("bn1", "conv1", "after"),
        ("bn2", "conv2", "before"),
        ("bn4", "dense1", "before"),
    ]


@pytest.mark.parametrize("name", ["sequence", "resnet", "minivgg", "mlp"])
def test_merging_keeps_the_function(name):
    if name == "sequence":
        model, shape = Sequence(nnx.Rngs(1)), (3, 8, 8, 3)
    else:
        model, shape = zoo.make(name, seed=1), (3, *zoo.ZOO[name][1])
    model = _random_statistics(model)
    model.eval()
    x = jnp.asarray(np.random.default_rng(2).random(shape, np.float32))
    merged = canonizers.MergeBatchNorm()(_copy(model), x, EPSILON)
    before, after = np.asarray(model(x)), np.asarray(merged(x))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_the_resnet_merges_every_batch_norm_into_its_convolution():
    model = zoo.make("resnet")
    x = jnp.asarray(zoo.example_input("resnet", 2))
    pairs = canonizers.MergeBatchNorm().pairs(model, x, EPSILON)
    assert {(bn, layer) for bn, layer, _ in pairs} == {
        ("bn", "stem"),
        ("block0/bn1", "block0/conv1"),
        ("block0/bn2", "block0/conv2"),
        ("block1/bn1", "block1/conv1"),
        ("block1/bn2", "block1/conv2"),
    }


def test_the_shipped_minivgg_merges_only_its_last_batch_norm():
    """bn1..bn4 follow a ReLU and precede a max-pool or a SAME-padded convolution."""
    model = lrpjax.load_pretrained()
    x, _ = lrpjax.data.sample()
    pairs = canonizers.MergeBatchNorm().pairs(model, jnp.asarray(x[:2]), EPSILON)
    assert pairs == [("bn5", "dense2", "before")]


def test_presets_carry_the_canonizer_and_explanations_use_it():
    assert composites.get("epsilon_gamma_box").canonizers == (canonizers.MergeBatchNorm(),)
    model = _random_statistics(zoo.make("resnet", seed=3))
    model.eval()
    x = zoo.example_input("resnet", 2, seed=4)
    lrp0 = {nnx.Conv: rules.z(), nnx.Linear: rules.z(), nnx.BatchNorm: rules.z()}
    merged = composites.with_canonizers(lrp0, canonizers.merge_batchnorm())
    R_plain = lrpjax.explain(model, x, composite=lrp0)
    R_merged, layers = lrpjax.explain(model, x, composite=merged, layerwise=True)
    # LRP-0 of Conv then BN equals LRP-0 of the merged Conv: a W s / (z s + t) R either way
    scale = float(jnp.abs(R_plain).max())
    np.testing.assert_allclose(R_merged, R_plain, rtol=1e-3, atol=1e-4 * scale)
    # the merged batch-norm is the identity: LRP-0 passes its relevance unchanged
    np.testing.assert_allclose(layers["block0/bn1"].sum(), layers["block0/conv2"].sum(), rtol=1e-4)
    # rules that split contributions by sign see the merged weights W s, not W then s
    gamma = {**lrp0, nnx.Conv: rules.gamma(0.25)}
    R_gamma = lrpjax.explain(model, x, composite=gamma)
    R_gamma_merged = lrpjax.explain(
        model, x, composite=composites.with_canonizers(gamma, canonizers.merge_batchnorm())
    )
    assert np.all(np.isfinite(np.asarray(R_gamma_merged)))
    difference = np.linalg.norm(np.asarray(R_gamma_merged) - np.asarray(R_gamma))
    assert difference > 1e-2 * np.linalg.norm(np.asarray(R_gamma))
