"""Linen models (flax.linen, bridged with nnx.bridge.ToNNX): explained as their NNX twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from lrpjax.linen import LinenModel, convert, from_linen

import lrpjax
from lrpjax import rules

N = 2


class LinenCNN(nn.Module):
    """Conv-ReLU-BatchNorm-maxpool-Dense, with the flags of a training script."""

    use_bias: bool = True
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=self.use_bias)(x))
        if self.use_bias:  # batch-norm shifts: a bias
            x = nn.BatchNorm(use_running_average=not self.train)(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Dropout(0.5, deterministic=not self.train)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3, use_bias=self.use_bias)(x)


class NNXCNN(nnx.Module):
    """LinenCNN by hand in NNX, attribute names as Linen names the layers."""

    def __init__(self, use_bias: bool = True):
        rngs = nnx.Rngs(0)
        self.Conv_0 = nnx.Conv(3, 4, (3, 3), use_bias=use_bias, rngs=rngs)
        self.use_bias = use_bias
        if use_bias:
            self.BatchNorm_0 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.Dropout_0 = nnx.Dropout(0.5, deterministic=True)
        self.Dense_0 = nnx.Linear(64, 3, use_bias=use_bias, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.Conv_0(x))
        if self.use_bias:
            x = self.BatchNorm_0(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = self.Dropout_0(x)
        return self.Dense_0(x.reshape(x.shape[0], -1))


class LinenTransformer(nn.Module):
    """Dense embedding, pre-norm self-attention with a residual, GELU, Dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm()(x))
        x = nn.gelu(x + y)
        return nn.Dense(3)(x.mean(axis=1))


class NNXTransformer(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.Dense_0 = nnx.Linear(6, 8, rngs=rngs)
        self.LayerNorm_0 = nnx.LayerNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.Dense_1 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = self.Dense_0(x)
        x = nnx.gelu(x + self.attn(self.LayerNorm_0(x)))
        return self.Dense_1(x.mean(axis=1))


CNN_PATHS = ["Conv_0", "BatchNorm_0", "Dropout_0", "Dense_0"]
TRANSFORMER_PATHS = [
    "Dense_0", "LayerNorm_0", "attn/query", "attn/key", "attn/value", "attn/out", "Dense_1",
]  # fmt: skip


def _images(n=N, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, 8, 8, 3))


def _tokens(n=N, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, 5, 6))


_BRIDGED: dict = {}


def _bridged(module: nn.Module, x) -> nnx.bridge.ToNNX:
    """``module`` bridged (a model per module and input shape: Linen's eager init is slow)."""
    key = (repr(module), x.shape)
    if key not in _BRIDGED:
        _BRIDGED[key] = _new_bridged(module, x)
    return _BRIDGED[key]


def _new_bridged(module: nn.Module, x) -> nnx.bridge.ToNNX:
    model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x)
    for path, var in nnx.iter_graph(model):  # batch statistics that are not the identity
        if isinstance(var, nnx.BatchStat):
            key = jax.random.key(len(path))
            if path[-1] == "mean":
                var[...] = 0.1 * jax.random.normal(key, var.shape)
            else:
                var[...] = jax.random.uniform(key, var.shape, minval=0.5, maxval=2.0)
    return model


def _twin(nnx_model: nnx.Module, bridged: nnx.bridge.ToNNX) -> nnx.Module:
    """The NNX model with the bridged model's variables, read by path (Linen's names)."""
    copied = 0
    for path, var in nnx.iter_graph(nnx_model):
        if isinstance(var, nnx.Param | nnx.BatchStat):
            node = getattr(bridged, path[0])
            for key in path[1:]:
                node = node[key]
            assert node.shape == var.shape, path
            var[...] = node[...]
            copied += 1
    linen = [v for _, v in nnx.iter_graph(bridged) if isinstance(v, nnx.Param | nnx.BatchStat)]
    assert copied == len(linen)
    return nnx_model


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


CASES = {
    "cnn": (LinenCNN, NNXCNN, _images, CNN_PATHS),
    "transformer": (LinenTransformer, NNXTransformer, _tokens, TRANSFORMER_PATHS),
}


@pytest.mark.parametrize(
    "case, composite",
    [
        ("cnn", "epsilon"),
        ("cnn", "epsilon_gamma_box"),
        ("cnn", "epsilon_alpha2_beta1"),
        ("transformer", "epsilon"),
        ("transformer", "cp_lrp"),
    ],
)
def test_relevance_equals_the_nnx_twin(case, composite):
    linen_cls, nnx_cls, inputs, paths = CASES[case]
    x = inputs()
    bridged = _bridged(linen_cls(), x)
    twin = _twin(nnx_cls(), bridged)
    _close(bridged(x), twin(x), 1e-6)
    R, layers = lrpjax.explain(bridged, x, composite=composite, layerwise=True)
    R_twin, layers_twin = lrpjax.explain(twin, x, composite=composite, layerwise=True)
    assert list(layers) == list(layers_twin) == paths
    _close(R, R_twin)
    for path in paths:
        _close(layers[path], layers_twin[path])


def test_nested_and_explicit_conversion_keep_the_paths():
    x = _tokens()
    bridged = _bridged(LinenTransformer(), x)

    class Outer(nnx.Module):
        def __init__(self):
            self.body = bridged

        def __call__(self, x):
            return self.body(x)

    calls = lrpjax.core.engine.layer_calls(Outer(), x)
    assert [path for path, _ in calls] == [f"body/{p}" for p in TRANSFORMER_PATHS]
    converted = convert(bridged, x)
    assert isinstance(converted, LinenModel)
    assert isinstance(converted.attn.query, nnx.LinearGeneral)
    assert isinstance(converted.LayerNorm_0, nnx.LayerNorm)
    assert convert(converted, x) is converted  # nothing left to convert
    assert isinstance(bridged, nnx.bridge.ToNNX)  # the bridged model is left as it was


class LinenTokens(nn.Module):
    """Token ids through nn.Embed (whose variable Linen makes in setup) to a Dense head."""

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(3)(nn.Embed(10, 8)(tokens).mean(axis=1))


def test_token_model_converts():
    tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
    bridged = _bridged(LinenTokens(), tokens)
    converted = convert(bridged, tokens)
    assert isinstance(converted.Embed_0, nnx.Embed)
    _close(converted(tokens), bridged(tokens), 1e-6)
    paths = [path for path, _ in lrpjax.core.engine.layer_calls(bridged, tokens)]
    assert paths == ["Embed_0", "Dense_0"]


def test_explainer_takes_the_converted_model():
    x = _images()
    bridged = _bridged(LinenCNN(), x)
    with pytest.raises(lrpjax.LayerError, match=r"lrpjax\.linen\.convert\(model, x\)"):
        lrpjax.explainer(bridged)
    fn, state = lrpjax.explainer(convert(bridged, x), composite="epsilon")
    out = jax.jit(fn)(state, x, jnp.zeros((N,), jnp.int32))
    _close(out.relevance, lrpjax.explain(bridged, x, composite="epsilon", target=0))


def test_from_linen_and_eval_mode():
    """From Linen's own variables; flags set for training still explain eval mode."""
    x = _images()
    variables = LinenCNN().init(jax.random.key(0), x)
    model = from_linen(LinenCNN(train=True), variables, x)
    _close(model(x), LinenCNN().apply(variables, x), 1e-6)
    R = lrpjax.explain(model, x, composite="epsilon")
    assert R.shape == x.shape and bool(jnp.all(jnp.isfinite(R)))


LRP0 = {nnx.Conv: rules.z(), nnx.Linear: rules.z()}  # Linen layers take NNX types' rules


@pytest.mark.parametrize("composite", [LRP0, "epsilon"])
def test_conservation_on_a_bias_free_relu_net(composite):
    x = _images()
    bridged = _bridged(LinenCNN(use_bias=False), x)
    logits = bridged(x)
    target = jnp.argmax(logits, axis=-1)
    R = lrpjax.explain(bridged, x, composite=composite)
    _close(R.reshape(N, -1).sum(-1), logits[jnp.arange(N), target], 1e-4)


def test_lrp0_is_gradient_times_input():
    x = _images()
    bridged = _bridged(LinenCNN(use_bias=False), x)
    graphdef, state = nnx.split(bridged)

    def logit(x, t):
        return nnx.merge(graphdef, state, copy=True)(x)[jnp.arange(N), t].sum()

    target = jnp.argmax(bridged(x), axis=-1)
    grad = jax.grad(logit)(x, target)
    _close(lrpjax.explain(bridged, x, composite=LRP0, target=target), x * grad, 1e-5)


class OwnParam(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1], 3))
        return x @ w


class WithUnknown(nn.Module):
    layer: str

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        if self.layer == "own_param":
            x = OwnParam()(x)
        elif self.layer == "group_norm":
            x = nn.GroupNorm(num_groups=2)(x)
        elif self.layer == "remat":
            x = nn.remat(nn.Dense)(3)(x)
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "layer, match",
    [
        ("own_param", r"'OwnParam_0' \(OwnParam\) holds variables \(params/w\)"),
        ("group_norm", r"'GroupNorm_0' \(GroupNorm\) holds variables"),
        ("remat", r"inside a JAX transform"),
    ],
)
def test_unknown_linen_layers_are_refused(layer, match):
    x = jnp.ones((N, 6))
    bridged = _bridged(WithUnknown(layer), x)
    with pytest.raises(lrpjax.LayerError, match=match):
        lrpjax.explain(bridged, x)
