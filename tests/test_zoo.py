"""The model zoo: models written the way Flax users write them, explained without changes.

Every preset on every zoo model; conservation where the rules conserve (bias-free models
with LRP-0, and CP-LRP for the transformers); LRP-0 equals gradient x input on bias-free
ReLU networks; layers called with keyword arguments; a non-leaf module as one unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import composites, layer_types, rules, zoo

#: The miniVGG runs every preset in test_engine.py already.
MODELS = [name for name in zoo.ZOO if name != "minivgg"]


def _bias_free(model: nnx.Module) -> nnx.Module:
    """Zero every bias, batch-norm shift and additive embedding: nothing absorbs relevance."""
    for _, module in nnx.iter_modules(model):
        for name, value in vars(module).items():
            if isinstance(value, nnx.Param) and name in ("bias", "pos_embed", "cls_token"):
                value[...] = jnp.zeros_like(value[...])
        if isinstance(module, nnx.BatchNorm):
            module.mean[...] = jnp.zeros_like(module.mean[...])
    return model


def _lrp0(softmax=None) -> dict:
    mapping = {t: rules.z() for t in (*layer_types.DENSE, *layer_types.CONV)}
    mapping.update({t: rules.z() for t in (*layer_types.BATCH_NORMS, *layer_types.LAYER_NORMS)})
    if softmax is not None:
        mapping[composites.SOFTMAX] = softmax
    return mapping


def _explained_logit(model, x):
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    return logits.max(-1)


@pytest.mark.parametrize("preset", list(composites.PRESETS))
@pytest.mark.parametrize("name", MODELS)
def test_every_preset_explains_every_zoo_model(name, preset):
    model = zoo.make(name)
    x = zoo.example_input(name, 2)
    R = np.asarray(lrpjax.explain(model, x, composite=preset))
    assert R.shape == x.shape
    assert np.all(np.isfinite(R))
    assert np.abs(R).sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_conservation_on_bias_free_models(name):
    """LRP-0 everywhere (and CP-LRP's constant attention weights in the transformers, whose
    AttnLRP softmax rule absorbs a bias-like share): the input relevance sums to the logit."""
    model = _bias_free(zoo.make(name, seed=1))
    x = zoo.example_input(name, 3, seed=2)
    R = np.asarray(lrpjax.explain(model, x, composite=_lrp0(rules.hold_constant())), np.float64)
    total = R.reshape(len(x), -1).sum(-1)
    np.testing.assert_allclose(total, _explained_logit(model, x), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_conservation_at_every_layer_of_sequential_models(name):
    model = _bias_free(zoo.make(name, seed=3))
    x = zoo.example_input(name, 2, seed=4)
    _, layers = lrpjax.explain(model, x, composite=_lrp0(), layerwise=True)
    logit = _explained_logit(model, x)
    for path, R in layers.items():
        total = np.asarray(R, np.float64).reshape(len(x), -1).sum(-1)
        np.testing.assert_allclose(total, logit, rtol=2e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "resnet"])
def test_lrp0_equals_gradient_times_input_on_bias_free_relu_nets(name):
    model = _bias_free(zoo.make(name, seed=5))
    x = jnp.asarray(zoo.example_input(name, 3, seed=6))
    R = lrpjax.explain(model, x, composite=_lrp0())
    target = jnp.argmax(model(x), axis=-1)
    grad = jax.grad(lambda x: jnp.sum(model(x)[jnp.arange(len(x)), target]))(x)
    scale = float(jnp.abs(x * grad).max())
    np.testing.assert_allclose(R, x * grad, rtol=1e-4, atol=1e-5 * scale)


def test_token_relevance_of_the_text_transformer():
    """Integer tokens in, relevance per token out; with CP-LRP and no biases it conserves."""
    model = _bias_free(zoo.make("text_transformer", seed=7))
    tokens = zoo.example_input("text_transformer", 2, seed=8)
    R, layers = lrpjax.explain(
        model, tokens, composite=_lrp0(rules.hold_constant()), layerwise=True
    )
    assert R.shape == tokens.shape and R.dtype == jnp.float32
    np.testing.assert_allclose(R, layers["embed"], rtol=1e-6)


def test_keyword_arguments_reach_the_layers():
    """BatchNorm(use_running_average=...), Dropout(deterministic=...), attention(mask=...):
    layers are called as the model calls them, here with train=True's opposite."""
    model = zoo.make("resnet")
    x = zoo.example_input("resnet", 2)
    calls = dict(lrpjax.core.engine.layer_calls(model, jnp.asarray(x)))
    assert isinstance(calls["block0/bn1"], nnx.BatchNorm)
    R = lrpjax.explain(model, x)
    assert np.all(np.isfinite(np.asarray(R)))


def test_a_module_mapped_by_type_is_one_unit():
    model = zoo.make("vit")
    x = zoo.example_input("vit", 2)
    mapping = {**_lrp0(), nnx.MultiHeadAttention: rules.gradient()}
    _, layers = lrpjax.explain(model, x, composite=mapping, layerwise=True)
    assert "block0/attn" in layers
    assert not any(path.startswith("block0/attn/") for path in layers)
    _, walked = lrpjax.explain(model, x, composite=_lrp0(), layerwise=True)
    assert {"block0/attn/query", "block0/attn/key", "block0/attn/value"} <= set(walked)


def test_cp_lrp_gives_queries_and_keys_no_relevance():
    model = zoo.make("vit")
    x = zoo.example_input("vit", 2)
    _, layers = lrpjax.explain(model, x, composite="cp_lrp", layerwise=True)
    for path in ("block0/attn/query", "block0/attn/key"):
        assert float(jnp.abs(layers[path]).max()) == 0.0
    assert float(jnp.abs(layers["block0/attn/value"]).max()) > 0.0
    _, attn = lrpjax.explain(model, x, composite="epsilon", layerwise=True)
    assert float(jnp.abs(attn["block0/attn/query"]).max()) > 0.0  # AttnLRP: q and k too


def test_unknown_zoo_model():
    with pytest.raises(ValueError, match="vit"):
        zoo.make("vitt")
