"""Glue rules (lrpjax.core.glue) against explicit float64 implementations on small models.

Each model is bias-free Dense layers with LRP-0 around one piece of glue. The relevance
at the glue's output is read from the engine (the next layer's input relevance); the test
applies the glue rule's formula to it by hand, in float64 and per neuron, then LRP-0 of
the first layer(s), and compares with the engine's input relevance.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import composites, rules
from lrpjax.core import jaxprs

LRP0 = {nnx.Linear: rules.z(), nnx.LayerNorm: rules.z(), nnx.Embed: rules.embedding()}


def dense(n_in: int, n_out: int, seed: int) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, rngs=nnx.Rngs(seed))


def lrp0_explicit(x: np.ndarray, W: np.ndarray, R_out: np.ndarray) -> np.ndarray:
    """LRP-0 of a bias-free dense layer, neuron by neuron: R_j = sum_k x_j w_jk / z_k R_k."""
    x, W, R_out = (np.asarray(v, np.float64) for v in (x, W, R_out))
    R_in = np.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(W.shape[1]):
            zk = sum(x[n, j] * W[j, k] for j in range(W.shape[0]))
            for j in range(W.shape[0]):
                R_in[n, j] += x[n, j] * W[j, k] / zk * R_out[n, k]
    return R_in


def kernel(layer: nnx.Linear) -> np.ndarray:
    return np.asarray(layer.kernel[...], np.float64)


X = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)


class Activation(nnx.Module):
    def __init__(self, fn):
        self.fn = fn
        self.first, self.head = dense(4, 5, 1), dense(5, 2, 2)

    def __call__(self, x):
        return self.head(self.fn(self.first(x)))


@pytest.mark.parametrize(
    "fn",
    [
        nnx.gelu,
        nnx.silu,
        jnp.tanh,
        nnx.sigmoid,
        nnx.softplus,
        nnx.elu,
        lambda u: jnp.clip(u, 0, 0.05),
    ],
    ids=["gelu", "silu", "tanh", "sigmoid", "softplus", "elu", "clip"],
)
def test_identity_rule_for_elementwise_activations(fn):
    """AttnLRP's identity rule: R at the activation's input = R at its output."""
    model = Activation(fn)
    R, layers = lrpjax.explain(model, X, composite=LRP0, layerwise=True)
    u = np.asarray(model.first(X), np.float64)
    R_u = np.asarray(layers["head"], np.float64)  # identity: the same relevance
    expected = lrp0_explicit(X, kernel(model.first), R_u)
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)
    assert u.shape == R_u.shape


class Product(nnx.Module):
    def __init__(self):
        self.a, self.b, self.head = dense(4, 5, 1), dense(4, 5, 2), dense(5, 2, 3)

    def __call__(self, x):
        return self.head(nnx.relu(self.a(x)) * nnx.relu(self.b(x)))


def test_uniform_rule_for_a_product_of_two_branches():
    """The case that summed to 2x the logit: now each factor takes half, and it conserves."""
    model = Product()
    R, layers = lrpjax.explain(model, X, composite=LRP0, layerwise=True)
    R_p = np.asarray(layers["head"], np.float64)
    # relu is positively homogeneous: its identity rule passes R where the input is > 0
    ua, ub = np.asarray(model.a(X)), np.asarray(model.b(X))
    R_a, R_b = np.where(ua > 0, R_p / 2, 0.0), np.where(ub > 0, R_p / 2, 0.0)
    expected = lrp0_explicit(X, kernel(model.a), R_a) + lrp0_explicit(X, kernel(model.b), R_b)
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)
    logit = np.asarray(model(X)).max(-1)
    np.testing.assert_allclose(np.asarray(R).sum(-1), logit, rtol=1e-4, atol=1e-6)


class QueryKey(nnx.Module):
    """Scores q @ k.T of two projections of a sequence, flattened into a dense head."""

    def __init__(self):
        self.q, self.k, self.head = dense(4, 3, 1), dense(4, 3, 2), dense(9, 2, 3)

    def __call__(self, x):
        scores = jnp.einsum("ntd,nsd->nts", self.q(x), self.k(x))
        return self.head(scores.reshape(x.shape[0], -1))


def test_uniform_rule_for_a_contraction():
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    model = QueryKey()
    R, layers = lrpjax.explain(model, x, composite=LRP0, layerwise=True)
    q = np.asarray(model.q(x), np.float64)
    k = np.asarray(model.k(x), np.float64)
    R_s = np.asarray(layers["head"], np.float64).reshape(2, 3, 3)
    R_q, R_k = np.zeros_like(q), np.zeros_like(k)
    for n in range(2):
        for t in range(3):
            for s in range(3):
                y = sum(q[n, t, d] * k[n, s, d] for d in range(3))
                for d in range(3):
                    share = q[n, t, d] * k[n, s, d] / y * R_s[n, t, s]
                    R_q[n, t, d] += share / 2
                    R_k[n, s, d] += share / 2
    expected = np.stack(
        [
            lrp0_explicit(x[n], kernel(model.q), R_q[n])
            + lrp0_explicit(x[n], kernel(model.k), R_k[n])
            for n in range(2)
        ]
    )
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)


class Softmax(nnx.Module):
    def __init__(self):
        self.first, self.head = dense(4, 5, 1), dense(5, 2, 2)

    def __call__(self, x):
        return self.head(jax.nn.softmax(self.first(x), axis=-1))


@pytest.mark.parametrize("softmax_rule", ["attnlrp", "cp_lrp"])
def test_softmax_rules(softmax_rule):
    """AttnLRP: R_i = u_i (R_i - s_i sum_j R_j) at the softmax input u (Achtibat et al.
    2024); CP-LRP: the softmax holds its output constant and passes nothing."""
    model = Softmax()
    mapping = dict(LRP0)
    if softmax_rule == "cp_lrp":
        mapping[composites.SOFTMAX] = rules.hold_constant()
    R, layers = lrpjax.explain(model, X, composite=mapping, layerwise=True)
    u = np.asarray(model.first(X), np.float64)
    s = np.exp(u - u.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    R_s = np.asarray(layers["head"], np.float64)
    if softmax_rule == "attnlrp":
        R_u = u * (R_s - s * R_s.sum(-1, keepdims=True))
    else:
        R_u = np.zeros_like(u)
    expected = lrp0_explicit(X, kernel(model.first), R_u)
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)


class Attention(nnx.Module):
    """One head: softmax(q k^T) v on a sequence, flattened into a dense head."""

    def __init__(self):
        self.q, self.k, self.v = dense(4, 3, 1), dense(4, 3, 2), dense(4, 3, 3)
        self.head = dense(9, 2, 4)

    def __call__(self, x):
        scores = jnp.einsum("ntd,nsd->nts", self.q(x), self.k(x))
        out = jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), self.v(x))
        return self.head(out.reshape(x.shape[0], -1))


def test_cp_lrp_on_attention_is_lrp0_through_constant_weights():
    """CP-LRP (Ali et al. 2022): with A = softmax(q k^T) held constant, out = A v is linear
    in v, and v takes all the relevance: R_v[s,d] = sum_t A_ts v_sd / out_td R_out[t,d]."""
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    model = Attention()
    mapping = {**LRP0, composites.SOFTMAX: rules.hold_constant()}
    R, layers = lrpjax.explain(model, x, composite=mapping, layerwise=True)
    q, k, v = (np.asarray(f(x), np.float64) for f in (model.q, model.k, model.v))
    scores = np.einsum("ntd,nsd->nts", q, k)
    A = np.exp(scores - scores.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    out = np.einsum("nts,nsd->ntd", A, v)
    R_out = np.asarray(layers["head"], np.float64).reshape(2, 3, 3)
    R_v = np.zeros_like(v)
    for n in range(2):
        for t in range(3):
            for s in range(3):
                for d in range(3):
                    R_v[n, s, d] += A[n, t, s] * v[n, s, d] / out[n, t, d] * R_out[n, t, d]
    expected = np.stack([lrp0_explicit(x[n], kernel(model.v), R_v[n]) for n in range(2)])
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(R).sum((1, 2)), R_out.sum((1, 2)), rtol=1e-4)


def test_layer_norm_rule_holds_the_scale_constant():
    """LRP-epsilon on LayerNorm: the linear map (x - mean(x)) * gamma / sigma(a) with sigma
    from the input a, as an explicit matrix, neuron by neuron in float64."""
    n = 5
    layer = nnx.LayerNorm(n, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=n) * 0.1, jnp.float32)
    a = rng.normal(size=(2, n)).astype(np.float32)
    R = rng.normal(size=(2, n)).astype(np.float32)
    got = np.asarray(rules.epsilon(0.01)(layer, jnp.asarray(a), jnp.asarray(R)))
    gamma, beta = np.asarray(layer.scale[...], np.float64), np.asarray(layer.bias[...], np.float64)
    expected = np.zeros((2, n))
    for i in range(2):
        x = a[i].astype(np.float64)
        sigma = np.sqrt(x.var() + layer.epsilon)
        A = (np.eye(n) - np.ones((n, n)) / n) * (gamma / sigma)[:, None]  # A[k, j]
        for k in range(n):
            zk = sum(A[k, j] * x[j] for j in range(n)) + beta[k]
            zk += 0.01 * (1.0 if zk >= 0 else -1.0)
            for j in range(n):
                expected[i, j] += x[j] * A[k, j] / zk * R[i, k]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_rms_norm_with_lrp0_passes_relevance_unchanged():
    layer = nnx.RMSNorm(5, rngs=nnx.Rngs(0))
    a = np.random.default_rng(4).normal(size=(2, 5)).astype(np.float32)
    R = np.random.default_rng(5).normal(size=(2, 5)).astype(np.float32)
    np.testing.assert_allclose(rules.z()(layer, jnp.asarray(a), jnp.asarray(R)), R, rtol=1e-5)


def test_sign_splitting_rules_refuse_layer_norm():
    layer = nnx.LayerNorm(5, rngs=nnx.Rngs(0))
    a = jnp.ones((2, 5)).at[:, 0].set(2.0)
    with pytest.raises(lrpjax.LayerError, match="entrywise"):
        rules.alpha_beta(2, 1)(layer, a, jnp.ones((2, 5)))


class Tokens(nnx.Module):
    def __init__(self):
        self.embed = nnx.Embed(7, 4, rngs=nnx.Rngs(0))
        self.head = dense(4, 2, 1)

    def __call__(self, tokens):
        return self.head(jnp.mean(self.embed(tokens), axis=1))


def test_embedding_relevance_per_token():
    """R_t = sum_d R_{t,d}; mean pooling is linear: R_{t,d} = e_{t,d} / T / m_d R_m[d]."""
    model = Tokens()
    tokens = np.array([[1, 2, 3], [4, 4, 6]], np.int32)
    R, layers = lrpjax.explain(model, tokens, composite=LRP0, layerwise=True)
    e = np.asarray(model.embed(tokens), np.float64)
    m = e.mean(1)
    R_m = np.asarray(layers["head"], np.float64)
    expected = np.einsum("ntd,nd->nt", e / e.shape[1], R_m / m)
    np.testing.assert_allclose(R, expected, rtol=1e-4, atol=1e-6)


class Division(nnx.Module):
    def __init__(self):
        self.a, self.b, self.head = dense(4, 5, 1), dense(4, 5, 2), dense(5, 2, 3)

    def __call__(self, x):
        return self.head(self.a(x) / (1.0 + jnp.abs(self.b(x))))


def test_a_division_of_two_branches_is_refused():
    with pytest.raises(lrpjax.LayerError, match="div") as info:
        lrpjax.explain(Division(), X)
    assert "test_glue.py" in str(info.value)


def test_no_state_leaves_a_trace_after_many_explainers():
    """64 and more explainer configurations, then a layerwise explanation: once an
    AttributeError, from a call order set during tracing and evicted from another cache."""
    model = Activation(nnx.relu)
    for i in range(70):
        lrpjax.explainer(model, composite=composites.epsilon(eps=1e-3 * (i + 1)))
    _, layers = lrpjax.explain(model, X, layerwise=True)
    assert list(layers) == ["first", "head"]


# --- input checks ----------------------------------------------------------------------


def test_uint8_images_are_refused_with_advice():
    model = lrpjax.zoo.make("minivgg")
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        lrpjax.explain(model, x)


def test_a_single_image_without_batch_axis_is_named():
    model = lrpjax.zoo.make("minivgg")
    with pytest.raises(ValueError, match=r"x\[None\]"):
        lrpjax.explain(model, np.zeros((32, 32, 3), np.float32))


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        lrpjax.explain(Activation(nnx.relu), np.zeros((0, 4), np.float32))


def test_pixels_outside_the_zbox_bounds_warn():
    model = lrpjax.zoo.make("minivgg")
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="outside the bounds"):
        lrpjax.explain(model, x, composite="epsilon_gamma_box")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrpjax.explain(model, x / 255, composite="epsilon_gamma_box")


class Reused(nnx.Module):
    """One ReLU and one Dropout module used twice, as Flax code often does."""

    def __init__(self, shared: bool):
        self.first, self.second, self.head = dense(4, 5, 1), dense(5, 5, 2), dense(5, 2, 3)
        self.act, self.drop = lrpjax.layers.ReLU(), nnx.Dropout(0.5, rngs=nnx.Rngs(0))
        self.shared = shared
        if not shared:
            self.act2, self.drop2 = lrpjax.layers.ReLU(), nnx.Dropout(0.5, rngs=nnx.Rngs(0))

    def __call__(self, x):
        act2, drop2 = (self.act, self.drop) if self.shared else (self.act2, self.drop2)
        h = self.drop(self.act(self.first(x)))
        return self.head(drop2(act2(self.second(h))))


def test_parameter_free_layers_called_twice_are_glue():
    shared, separate = Reused(shared=True), Reused(shared=False)
    R_shared, layers = lrpjax.explain(shared, X, composite=LRP0, layerwise=True)
    R_separate = lrpjax.explain(separate, X, composite=LRP0)
    np.testing.assert_allclose(R_shared, R_separate, rtol=1e-5, atol=1e-7)
    assert list(layers) == ["first", "second", "head"]


class NewLayerTypes(nnx.Module):
    """ConvTranspose, Einsum and LinearGeneral, bias-free, between ReLUs."""

    def __init__(self):
        rngs = nnx.Rngs(5)
        self.up = nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
        self.mix = nnx.Einsum("nhwc,cd->nhwd", (3, 4), rngs=rngs)
        self.head = nnx.LinearGeneral((8, 4), 2, axis=(-2, -1), use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.mix(nnx.relu(self.up(x))))  # (N, 8, 8, 4)
        return self.head(jnp.mean(h, axis=2))


@pytest.mark.parametrize("rule", [rules.z(), rules.alpha_beta(2, 1), rules.gamma()], ids=repr)
def test_conv_transpose_einsum_and_linear_general(rule):
    """LRP-0 equals gradient x input on this bias-free ReLU net; the sign-splitting rules
    run on the same layers through their affine views."""
    model = NewLayerTypes()
    assert model.mix.bias is None
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 4, 2)), jnp.float32)
    mapping = {nnx.ConvTranspose: rule, nnx.Einsum: rule, nnx.LinearGeneral: rule}
    R = lrpjax.explain(model, x, composite=mapping)
    assert np.all(np.isfinite(np.asarray(R)))
    if isinstance(rule, rules.Z):
        target = jnp.argmax(model(x), axis=-1)
        grad = jax.grad(lambda x: jnp.sum(model(x)[jnp.arange(2), target]))(x)
        np.testing.assert_allclose(R, x * grad, rtol=1e-4, atol=1e-6)


def test_jaxpr_helpers_on_a_relu_a_call_and_a_residual():
    def f(x):
        y = jnp.maximum(x, 0.0)
        return jax.jit(lambda v: v * 2.0)(y) + y

    jaxpr = jax.make_jaxpr(f)(jnp.ones(3)).jaxpr
    relu, call, add = jaxpr.eqns
    flow = jaxprs.Dataflow(jaxpr)
    (y,) = relu.outvars
    assert flow.uses(y) == [1, 2] and flow.only_use(y) is None  # the residual: two uses
    assert flow.only_use(call.outvars[0]) == 2
    assert flow.only_use(add.outvars[0]) is None  # the output
    assert flow.producer(y) is relu and flow.producer(y, "max") is relu
    assert flow.producer(y, "add") is None and flow.producer(jaxpr.invars[0]) is None
    assert jaxprs.literal_zero(relu.invars[1]) and jaxprs.literal_nonnegative(relu.invars[1])
    assert not jaxprs.is_literal(relu.invars[0])
    inner, consts = jaxprs.body(call)
    assert [e.primitive.name for e in inner.eqns] == ["mul"] and not consts
    assert jaxprs.body(relu) is None
    assert jaxprs.live(jaxpr, [y]) == [relu]
