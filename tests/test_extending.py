"""The README's "Extending lrpjax" examples: a new rule, a new layer type."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import layer_types, rules


@dataclasses.dataclass(frozen=True)
class WPlus(rules.Rule):
    """R_j = sum_k w+_jk / sum_j' w+_j'k R_k: the w^2 rule's cousin, positive weights only."""

    eps: float = 1e-6

    def __call__(self, layer, a, R):
        affine = layer_types.as_affine(layer, a)
        w = jnp.maximum(affine.kernel, 0)
        z, vjp = jax.vjp(lambda x: affine.apply(x, w, None), jnp.ones_like(a))
        return vjp(R / rules.stabilize(z, self.eps))[0]


class Scale(nnx.Module):
    """A user's layer: y = x * w + b, elementwise."""

    def __init__(self, n: int):
        self.w, self.b = nnx.Param(jnp.linspace(0.5, 1.5, n)), nnx.Param(jnp.full(n, 0.1))

    def __call__(self, x):
        return x * self.w[...] + self.b[...]


@layer_types.register_affine(Scale)
def _scale(layer, a=None):
    def apply(x, kernel, bias):
        return x * kernel if bias is None else x * kernel + bias

    return layer_types.Affine(apply, layer.w[...], layer.b[...])


class Net(nnx.Module):
    def __init__(self, rngs):
        self.first, self.scale, self.head = (
            nnx.Linear(4, 5, rngs=rngs),
            Scale(5),
            nnx.Linear(5, 2, rngs=rngs),
        )

    def __call__(self, x):
        return self.head(nnx.relu(self.scale(self.first(x))))


def test_a_new_rule_is_one_definition():
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.abs(layer.kernel[...])  # every output has positive weights
    a = jnp.ones((2, 4))
    R = jnp.arange(6.0).reshape(2, 3)
    R_in = WPlus()(layer, a, R)
    np.testing.assert_allclose(R_in.sum(-1), R.sum(-1), rtol=1e-5)
    w = np.asarray(layer.kernel[...])
    np.testing.assert_allclose(R_in, np.asarray(R) @ (w / w.sum(0)).T, rtol=1e-5)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    composite = {nnx.Linear: rules.epsilon(), lrpjax.composites.FIRST: WPlus(), Scale: rules.z()}
    assert lrpjax.explain(Net(nnx.Rngs(1)), x, composite=composite).shape == x.shape


def test_a_new_layer_type_is_one_registry_entry():
    model = Net(nnx.Rngs(2))
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    for rule in (rules.epsilon(), rules.alpha_beta(2, 1), rules.gamma()):
        R = lrpjax.explain(model, x, composite={nnx.Linear: rules.epsilon(), Scale: rule})
        assert np.all(np.isfinite(np.asarray(R)))
    # the affine view is the layer itself: LRP-0 on it equals the epsilon rule's definition
    a = jnp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, (3, 5)), jnp.float32)
    R_out = jnp.ones((3, 5))
    expected = a * model.scale.w[...] / (a * model.scale.w[...] + model.scale.b[...]) * R_out
    np.testing.assert_allclose(rules.z()(model.scale, a, R_out), expected, rtol=1e-5)


class Shift(Scale):
    """Registered with the convolutions' group."""


@layer_types.register_affine(Shift, group=layer_types.CONV)
def _shift(layer, a=None):
    return _scale(layer, a)


@pytest.mark.parametrize("name", sorted(lrpjax.composites.PRESETS))
def test_a_registered_layer_type_is_covered_by_every_preset(name):
    composite = lrpjax.composites.get(name)
    none = frozenset()
    dense_rule = composite.rule_for("x", nnx.Linear(2, 2, rngs=nnx.Rngs(0)), none)
    assert composite.rule_for("scale", Scale(2), none) == dense_rule
    conv_rule = composite.rule_for("x", nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)), none)
    assert composite.rule_for("shift", Shift(2), none) == conv_rule
    x = np.random.default_rng(1).uniform(0, 1, (3, 4)).astype(np.float32)  # z^B's bounds
    R = lrpjax.explain(Net(nnx.Rngs(1)), x, composite=name)
    assert np.all(np.isfinite(np.asarray(R)))


def test_a_type_key_beats_the_group_of_the_type():
    composite = lrpjax.composites.from_mapping(
        {layer_types.DENSE: rules.epsilon(), Scale: rules.zplus()}
    )
    assert composite.rule_for("s", Scale(2), frozenset()) == rules.zplus()
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    assert composite.rule_for("d", linear, frozenset()) == rules.epsilon()


def test_a_type_registered_without_a_group_needs_an_explicit_composite():
    class Loose(nnx.Module):  # Scale's twin, not a subclass
        __init__, __call__ = Scale.__init__, Scale.__call__

    layer_types.register_affine(Loose, group=None)(_scale)
    assert lrpjax.composites.get("epsilon").rule_for("l", Loose(2), frozenset()) is None
