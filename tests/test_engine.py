"""The LRP engine (`lrpjax.explain`, `lrpjax.explainer`) on small models.

Models are written here: an MLP with ``nnx.relu`` calls, a 1D CNN with max-pooling and a
reshape, a net with a residual addition, and MiniVGG with random weights and batch-norm
statistics. Conservation, bias accounting and LRP-0 = gradient x input are checked
against quantities computed independently (NumPy forward passes, `jax.grad`).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from lrpjax.composites import FIRST
from lrpjax.layers import Flatten, MaxPool, ReLU

import lrpjax
from lrpjax import rules
from lrpjax.models import MiniVGG

# --- models ----------------------------------------------------------------------------


class MLP(nnx.Module):
    """Dense layers with ReLU written as function calls; last layer gives logits."""

    def __init__(self, sizes, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(i, o, use_bias=use_bias, rngs=rngs) for i, o in itertools.pairwise(sizes)]
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.relu(x)
        return x


class CNN1D(nnx.Module):
    """Conv1D (SAME) -> relu -> MaxPool(2) -> reshape -> Linear, on (N, 8, 2) series."""

    def __init__(self, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3,), padding="SAME", use_bias=use_bias, rngs=rngs)
        self.pool = MaxPool((2,))
        self.dense = nnx.Linear(4 * 4, 3, use_bias=use_bias, rngs=rngs)

    def __call__(self, x):
        x = self.pool(nnx.relu(self.conv(x)))
        return self.dense(x.reshape((x.shape[0], -1)))


class SkipNet(nnx.Module):
    """h = relu(lin1(x)); h = h + lin3(relu(lin2(h))); logits = out(h)."""

    def __init__(self, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(4, 6, use_bias=use_bias, rngs=rngs)
        self.lin2 = nnx.Linear(6, 6, use_bias=use_bias, rngs=rngs)
        self.lin3 = nnx.Linear(6, 6, use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(6, 3, use_bias=use_bias, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.lin1(x))
        h = h + self.lin3(nnx.relu(self.lin2(h)))
        return self.out(h)


INPUT_SHAPES = {"mlp": (6,), "cnn": (8, 2), "skip": (4,)}


def build(kind: str, *, use_bias: bool = False, seed: int = 0, alive: bool = False):
    """A model of `kind` with random weights.

    ``alive``: positive weights but one small negative weight per output neuron (on an
    input that is always positive), for positive inputs: every hidden unit is active and
    every neuron has both positive and negative contributions, the conditions under which
    alpha-beta, flat and w^2 conserve at every layer.
    """
    rngs = nnx.Rngs(seed)
    model = {
        "mlp": lambda: MLP([6, 8, 8, 3], use_bias=use_bias, rngs=rngs),
        "cnn": lambda: CNN1D(use_bias=use_bias, rngs=rngs),
        "skip": lambda: SkipNet(use_bias=use_bias, rngs=rngs),
    }[kind]()
    rng = np.random.default_rng(seed + 100)
    for _, m in nnx.iter_modules(model):
        if not isinstance(m, nnx.Linear | nnx.Conv):
            continue
        shape = m.kernel.shape
        fan_in = int(np.prod(shape[:-1]))
        if alive:
            w = rng.uniform(0.1, 1.0, size=shape) / np.sqrt(fan_in)
            negative = -rng.uniform(0.2, 0.4, size=shape[-1]) / np.sqrt(fan_in)
            if isinstance(m, nnx.Conv):
                w[shape[0] // 2, 0, :] = negative  # centre tap: always inside the input
            else:
                w[0, :] = negative
        else:
            w = rng.normal(size=shape) / np.sqrt(fan_in)
        m.kernel[...] = jnp.asarray(w, jnp.float32)
        if m.bias is not None:
            m.bias[...] = jnp.asarray(rng.normal(scale=0.3, size=m.bias.shape), jnp.float32)
    return model


def inputs(kind: str, n: int = 3, seed: int = 1, positive: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, *INPUT_SHAPES[kind])
    if positive:
        return rng.uniform(0.2, 1.0, size=shape).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)


def per_sample_sum(r) -> np.ndarray:
    r = np.asarray(r, np.float64)
    return r.reshape(r.shape[0], -1).sum(axis=1)


def target_logit(model, x, target) -> np.ndarray:
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    return logits[np.arange(len(x)), np.asarray(target)]


def on_linear(rule) -> dict:
    return {nnx.Linear: rule, nnx.Conv: rule}


@pytest.fixture
def eager():
    """Run op by op: these small models are explained faster than they compile (the jitted
    path is the same function; see the jit-versus-no-jit tests)."""
    with jax.disable_jit():
        yield


# --- conservation ----------------------------------------------------------------------

ALL_LAYER_RULES = {
    "z": rules.z(),
    "epsilon1e-9": rules.epsilon(1e-9),
    "alpha2beta1": rules.alpha_beta(2, 1),
    "alpha1beta0": rules.alpha_beta(1, 0),
    "gamma": rules.gamma(0.25),
    "flat": rules.flat(),
    "wsquare": rules.wsquare(),
}


def assert_layers_conserve(kind, layers, relevance, expected):
    scale = np.abs(expected)
    assert np.all(scale > 1e-3), "test setup: target logits too close to zero"
    np.testing.assert_allclose(per_sample_sum(relevance), expected, rtol=1e-4, atol=1e-6)
    block = {"lin2", "lin3"}  # inside the residual branch: only that branch's share
    for path, r in layers.items():
        if kind == "skip" and path in block:
            continue
        np.testing.assert_allclose(per_sample_sum(r), expected, rtol=1e-4, atol=1e-6, err_msg=path)
    if kind == "skip":
        branch = per_sample_sum(layers["lin3"])
        np.testing.assert_allclose(per_sample_sum(layers["lin2"]), branch, rtol=1e-4, atol=1e-6)
        assert np.all(np.abs(branch) > 1e-3)  # the branch does carry relevance


@pytest.mark.parametrize("kind", ["mlp", "cnn", "skip"])
@pytest.mark.parametrize("name", list(ALL_LAYER_RULES))
def test_conservation_every_layer(kind, name, eager):
    """Bias-free, all units active: every rule conserves at every layer's input."""
    model = build(kind, alive=True, seed=2)
    x = inputs(kind, positive=True)
    target = np.argmax(np.asarray(model(jnp.asarray(x))), axis=-1)
    relevance, layers = lrpjax.explain(
        model, x, composite=on_linear(ALL_LAYER_RULES[name]), target=target, layerwise=True
    )
    assert relevance.shape == x.shape
    assert_layers_conserve(kind, layers, relevance, target_logit(model, x, target))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "skip"])
@pytest.mark.parametrize(
    "composite",
    [
        on_linear(rules.z()),
        on_linear(rules.epsilon(1e-9)),
        on_linear(rules.gamma(0.25)),
        {**on_linear(rules.z()), FIRST: rules.flat()},
        {**on_linear(rules.z()), FIRST: rules.wsquare()},
        {**on_linear(rules.epsilon(1e-9)), FIRST: rules.zbox(-3.0, 3.0)},
    ],
    ids=["z", "epsilon", "gamma", "first_flat", "first_wsquare", "first_zbox"],
)
def test_conservation_signed_random(kind, composite, eager):
    """Random signed weights and inputs, dead units included, bias-free."""
    model = build(kind, seed=3)
    x = np.clip(inputs(kind, seed=4), -3, 3)
    x[0, 0] = 0.0  # a zero input: flat, w^2 and z^B still give it relevance
    target = np.argmax(np.asarray(model(jnp.asarray(x))), axis=-1)
    relevance, layers = lrpjax.explain(model, x, composite=composite, target=target, layerwise=True)
    assert_layers_conserve(kind, layers, relevance, target_logit(model, x, target))


def test_flat_first_layer_relevance_reaches_zero_inputs(eager):
    model = build("mlp", seed=5)
    x = np.zeros((2, 6), np.float32)
    x[:, :3] = [[1.0, -2.0, 0.5], [0.3, 0.2, 0.1]]
    target = np.zeros(2, np.int32)
    comp = {**on_linear(rules.z()), FIRST: rules.flat(eps=0.0)}
    relevance = np.asarray(lrpjax.explain(model, x, composite=comp, target=target))
    # flat: every input of the first layer gets an equal share of each output's relevance
    # (here the layer's relevance, so all six inputs get 1/6 of the total).
    total = target_logit(model, x, target)
    np.testing.assert_allclose(relevance, np.repeat(total[:, None] / 6, 6, axis=1), rtol=1e-5)


# --- biases ----------------------------------------------------------------------------


def test_single_linear_with_bias_keeps_the_inputs_share():
    """A bare Linear layer as the model: sum R_in = sum_k (z_k - b_k) / stab(z_k) R_k."""
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    layer.kernel[...], layer.bias[...] = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    eps = 1e-3
    relevance = lrpjax.explain(layer, x, composite={nnx.Linear: rules.epsilon(eps)}, target=1)
    z = x.astype(np.float64) @ w + b
    zk = z[:, 1]
    expected = (zk - b[1]) / (zk + eps * np.where(zk >= 0, 1, -1)) * zk  # R_k = logit
    np.testing.assert_allclose(per_sample_sum(relevance), expected, rtol=1e-5, atol=1e-6)


def test_biases_absorb_exactly_their_share_layer_by_layer(eager):
    """MLP with biases, epsilon rule: what each layer does not pass on is what its biases
    (and the stabiliser) take, computed from a NumPy forward pass; the totals telescope."""
    model = build("mlp", use_bias=True, seed=7)
    x = inputs("mlp", seed=8)
    eps = 1e-6
    target = np.array([0, 1, 2])
    relevance, layers = lrpjax.explain(
        model, x, composite={nnx.Linear: rules.epsilon(eps)}, target=target, layerwise=True
    )
    ws = [np.asarray(lay.kernel[...], np.float64) for lay in model.layers]
    bs = [np.asarray(lay.bias[...], np.float64) for lay in model.layers]
    acts, a = [], x.astype(np.float64)
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        z = a @ w + b
        acts.append((a, z))
        a = np.maximum(z, 0) if i < len(ws) - 1 else z
    logits = a
    R_out = np.zeros_like(logits)
    R_out[np.arange(3), target] = logits[np.arange(3), target]
    absorbed = np.zeros(3)
    for i in reversed(range(len(ws))):
        _, z = acts[i]
        assert np.all(np.abs(z) > 1e-2), "test setup: a pre-activation is near zero"
        stab = z + eps * np.where(z >= 0, 1.0, -1.0)
        R_in = np.asarray(layers[f"layers/{i}"], np.float64)
        kept = ((z - bs[i]) / stab * R_out).sum(axis=1)
        np.testing.assert_allclose(R_in.sum(axis=1), kept, rtol=1e-5, atol=1e-6, err_msg=str(i))
        absorbed += ((bs[i] + eps * np.where(z >= 0, 1.0, -1.0)) / stab * R_out).sum(axis=1)
        R_out = R_in  # relevance at the ReLU's output = at the previous layer's output
    start = logits[np.arange(3), target]
    np.testing.assert_allclose(per_sample_sum(relevance), start - absorbed, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(absorbed) > 1e-3)  # the biases do take a visible share


# --- LRP-0 is gradient x input ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "skip"])
def test_lrp0_equals_gradient_times_input(kind, eager):
    model = build(kind, seed=9)
    x = inputs(kind, seed=10)
    target = np.array([2, 0, 1])
    relevance = lrpjax.explain(model, x, composite=on_linear(rules.z()), target=target)

    def target_sum(x):
        logits = model(x)
        return jnp.sum(logits[jnp.arange(3), target])

    expected = x * jax.grad(target_sum)(jnp.asarray(x))
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)


# --- output relevance ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_setup():
    model = build("mlp", seed=11)
    x = inputs("mlp", n=4, seed=12)
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    return model, x, logits


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_init_logit_probability_one_sglrp(mlp_setup):
    model, x, logits = mlp_setup
    target = np.array([0, 1, 2, 1])
    rows = np.arange(4)
    p = _softmax(logits)
    expected = {
        "logit": logits[rows, target],
        "probability": p[rows, target],
        "one": np.ones(4),
        "sglrp": np.zeros(4),
    }
    comp = on_linear(rules.z())
    for init, total in expected.items():
        r = lrpjax.explain(model, x, composite=comp, target=target, init=init)
        scale = np.abs(np.asarray(r)).max()
        np.testing.assert_allclose(per_sample_sum(r), total, rtol=1e-5, atol=1e-5 * scale)
        assert np.all(np.isfinite(r))
    # sglrp is contrastive: not the zero map, with both signs.
    r = np.asarray(lrpjax.explain(model, x, composite=comp, target=target, init="sglrp"))
    assert r.max() > 0 > r.min()


def test_output_relevance_values():
    logits = jnp.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    target = jnp.array([1, 0])
    p = _softmax(np.asarray(logits, np.float64))
    onehot = np.eye(3)[np.asarray(target)]
    out = lrpjax.output_relevance(logits, target, "sglrp")
    pt = p[np.arange(2), np.asarray(target)][:, None]
    np.testing.assert_allclose(out, pt * (onehot - p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lrpjax.output_relevance(logits, target, "one"), onehot)
    np.testing.assert_allclose(
        lrpjax.output_relevance(logits, target, "probability"), onehot * p, rtol=1e-5
    )


def test_callable_init(mlp_setup, eager):
    model, x, _ = mlp_setup
    target = np.array([0, 1, 2, 1])
    comp = on_linear(rules.z())

    def double_logit(logits, t):
        return 2.0 * jax.nn.one_hot(t, logits.shape[-1]) * logits

    r2 = lrpjax.explain(model, x, composite=comp, target=target, init=double_logit)
    r1 = lrpjax.explain(model, x, composite=comp, target=target, init="logit")
    np.testing.assert_allclose(r2, 2 * np.asarray(r1), rtol=1e-5, atol=1e-7)


def test_unknown_init_raises(mlp_setup):
    model, x, _ = mlp_setup
    with pytest.raises(ValueError, match="init"):
        lrpjax.explain(model, x, init="logits")


# --- targets ---------------------------------------------------------------------------


def test_targets(mlp_setup, eager):
    model, x, logits = mlp_setup
    comp = on_linear(rules.epsilon(0.01))
    predicted = np.argmax(logits, axis=1)
    r_none = lrpjax.explain(model, x, composite=comp)
    np.testing.assert_array_equal(
        r_none, lrpjax.explain(model, x, composite=comp, target=predicted)
    )
    r_int = lrpjax.explain(model, x, composite=comp, target=2)
    np.testing.assert_array_equal(
        r_int, lrpjax.explain(model, x, composite=comp, target=np.full(4, 2))
    )
    multi = np.array([[0, 1], [2, 0], [1, 1], [0, 2]])
    r_multi = lrpjax.explain(model, x, composite=comp, target=multi)
    assert r_multi.shape == (4, 2, 6)
    for k in range(2):
        single = lrpjax.explain(model, x, composite=comp, target=multi[:, k])
        np.testing.assert_allclose(r_multi[:, k], single, rtol=1e-6, atol=1e-7)
    # different targets do give different maps
    assert not np.allclose(r_multi[:, 0], r_multi[:, 1])


def test_multi_target_layerwise_shapes(mlp_setup, eager):
    model, x, _ = mlp_setup
    multi = np.array([[0, 1], [2, 0], [1, 1], [0, 2]])
    r, layers = lrpjax.explain(model, x, target=multi, layerwise=True)
    assert r.shape == (4, 2, 6)
    assert layers["layers/1"].shape == (4, 2, 8)


@pytest.mark.parametrize(
    "target", [3, -2, np.array([0, 1, 3, 0]), np.array([0, 1]), np.zeros((4,), np.float32)]
)
def test_bad_targets_raise(mlp_setup, target):
    model, x, _ = mlp_setup
    with pytest.raises(ValueError, match="target"):
        lrpjax.explain(model, x, target=target)


# --- jit, vmap, batches ----------------------------------------------------------------


def test_explainer_jit_equals_no_jit_and_explain():
    model = build("cnn", use_bias=True, seed=13)
    x = inputs("cnn", seed=14)
    target = jnp.array([0, 2, 1])
    fn, state = lrpjax.explainer(model, composite="epsilon_plus")
    jitted = jax.jit(fn)(state, x, target)
    with jax.disable_jit():
        eager = fn(state, x, target)
    np.testing.assert_allclose(jitted.relevance, eager.relevance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jitted.logits, model(x), rtol=1e-6)
    np.testing.assert_array_equal(jitted.target, target)
    direct = lrpjax.explain(model, x, composite="epsilon_plus", target=target)
    np.testing.assert_allclose(jitted.relevance, direct, rtol=1e-6, atol=1e-7)


def test_explainer_predicted_target_and_vmap_over_targets():
    model = build("cnn", use_bias=True, seed=15)
    x = inputs("cnn", seed=16)
    fn, state = lrpjax.explainer(model, composite="epsilon")
    fn = jax.jit(fn)
    predicted = jnp.argmax(model(x), axis=-1)
    out = fn(state, x, jnp.full((3,), -1))  # -1: the predicted class
    np.testing.assert_array_equal(out.target, predicted)
    np.testing.assert_allclose(out.relevance, fn(state, x, predicted).relevance, rtol=1e-6)
    targets = jnp.array([[0, 1, 2], [2, 2, 0], [1, 0, 0]])  # (N, K)
    vmapped = jax.vmap(fn, in_axes=(None, None, 1))(state, x, targets)
    together = fn(state, x, targets)
    assert together.relevance.shape == (3, 3, 8, 2)
    np.testing.assert_allclose(
        jnp.moveaxis(vmapped.relevance, 0, 1), together.relevance, rtol=1e-5, atol=1e-6
    )


# --- MiniVGG ---------------------------------------------------------------------------


def random_minivgg(seed: int = 0) -> MiniVGG:
    model = MiniVGG(rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2", "bn3", "bn4", "bn5"):
        bn = getattr(model, name)
        c = bn.mean.shape
        bn.mean[...] = jnp.asarray(rng.uniform(0.0, 0.5, size=c), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=c), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(scale=0.1, size=c), jnp.float32)
    for name in ("conv1", "conv2", "conv3", "conv4", "dense1", "dense2"):
        layer = getattr(model, name)
        layer.bias[...] = jnp.asarray(rng.normal(scale=0.05, size=layer.bias.shape), jnp.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def vgg():
    return random_minivgg()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def robust_images() -> np.ndarray:
    """All zeros, a constant image, a random image."""
    x = np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), 0.5), images(1, seed=1)[0]])
    return x.astype(np.float32)


def test_minivgg_batch_equals_one_by_one(vgg):
    x = robust_images()
    batch = np.asarray(lrpjax.explain(vgg, x))  # compiled once, shared with robustness
    assert np.all(np.isfinite(batch)) and np.abs(batch).max() > 0
    for i in range(3):
        single = np.asarray(lrpjax.explain(vgg, x[i : i + 1]))
        scale = np.abs(single).max() or 1.0
        np.testing.assert_allclose(batch[i : i + 1], single, rtol=1e-5, atol=1e-5 * scale)


def test_minivgg_train_mode_is_explained_in_eval_mode(vgg):
    """A model left in training mode is explained (and its class predicted) in eval mode,
    and is not switched to eval mode itself."""
    x = robust_images()
    training = nnx.clone(vgg)
    training.train()
    r_train = lrpjax.explain(training, x)
    assert training.bn1.use_running_average is False and training.drop1.deterministic is False
    np.testing.assert_allclose(r_train, lrpjax.explain(vgg, x), rtol=1e-6, atol=1e-8)


def test_minivgg_layerwise(vgg):
    x = robust_images()
    relevance, layers = lrpjax.explain(vgg, x, layerwise=True)
    assert set(layers) == set(MiniVGG.LAYERS)
    a = jnp.asarray(x)
    for name in MiniVGG.LAYERS:
        assert layers[name].shape == a.shape, name
        assert np.all(np.isfinite(layers[name])), name
        a = getattr(vgg, name)(a)
    np.testing.assert_allclose(layers["conv1"], relevance, rtol=1e-5, atol=1e-7)
    # parameter-free layers pass relevance on unchanged in total
    for before, after in (("relu1", "bn1"), ("pool1", "drop1"), ("drop1", "conv3"),
                          ("flatten", "dense1")):  # fmt: skip
        np.testing.assert_allclose(
            per_sample_sum(layers[before]), per_sample_sum(layers[after]), rtol=1e-4
        )


def test_minivgg_bfloat16_images(vgg):
    """bfloat16 images, float32 weights (the layers promote): the float32 maps, rounded."""
    x = jnp.asarray(images(2, seed=4), jnp.bfloat16)
    r16 = lrpjax.explain(vgg, x)
    r32 = np.asarray(lrpjax.explain(vgg, x.astype(jnp.float32)))
    assert r16.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(r16, np.float32) - r32) <= 2e-2 * np.linalg.norm(r32)


def test_minivgg_layerwise_keys_in_call_order(vgg):
    _, layers = lrpjax.explain(vgg, robust_images(), layerwise=True)
    assert list(layers) == list(MiniVGG.LAYERS)


def _definition_only(rule: rules.Rule):
    """The same rule as a plain function: the engine has no per-unit form for it."""
    return lambda layer, a, R: rule(layer, a, R)


@pytest.mark.parametrize(
    "mapping",
    [
        {nnx.Linear: rules.epsilon(), nnx.Conv: rules.epsilon(), nnx.BatchNorm: rules.epsilon()},
        {nnx.Linear: rules.z(), nnx.Conv: rules.alpha_beta(2, 1), nnx.BatchNorm: rules.z()},
        {nnx.Linear: rules.epsilon(0.1), nnx.Conv: rules.gamma(0.25), nnx.BatchNorm: rules.zplus()},
        # z+ before a ReLU (conv1-4, dense1): the three-product form from the layer's output
        {nnx.Linear: rules.zplus(), nnx.Conv: rules.zplus(), nnx.BatchNorm: rules.epsilon()},
    ],
    ids=["epsilon", "z_alpha2beta1", "gamma_zplus", "zplus_rectified"],
)
def test_minivgg_per_unit_forms_equal_rule_definitions(vgg, mapping):
    """The engine's per-unit path (each rule's own `backward`) gives the relevance of the
    rules' definitions at every layer."""
    x = images(2, seed=3)
    plain = {key: _definition_only(rule) for key, rule in mapping.items()}
    fast, fast_layers = lrpjax.explain(vgg, x, composite=mapping, layerwise=True)
    slow, slow_layers = lrpjax.explain(vgg, x, composite=plain, layerwise=True)
    # Relative L2 error: a neuron with z near 0 amplifies float32 rounding of z, which the
    # per-unit form takes from the forward pass and the definition recomputes.
    for name in MiniVGG.LAYERS:
        error = np.linalg.norm(fast_layers[name] - slow_layers[name])
        assert error <= 1e-4 * np.linalg.norm(slow_layers[name]), name
    assert np.linalg.norm(fast - slow) <= 1e-4 * np.linalg.norm(slow)


PRESETS = ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
TINY = 1e-12
#: Every stabilised rule of those presets at once, all with eps = 1e-12.
TINY_EPS = {
    "conv1": rules.zbox(0.0, 1.0, TINY),
    "conv2": rules.alpha_beta(2, 1, TINY),
    "conv3": rules.gamma(0.25, TINY),
    "conv4": rules.zplus(TINY),
    "dense1": rules.flat(TINY),
    nnx.Linear: rules.epsilon(TINY),
    nnx.Conv: rules.epsilon(TINY),
    nnx.BatchNorm: rules.epsilon(TINY),
}


def dead_copy(model: MiniVGG) -> MiniVGG:
    """The model with large negative biases: every ReLU unit is dead."""
    dead = nnx.clone(model)
    for name in ("conv1", "conv2", "conv3", "conv4", "dense1"):
        layer = getattr(dead, name)
        layer.bias[...] = jnp.full(layer.bias.shape, -1e3)
    return dead


@pytest.mark.parametrize("preset", [*PRESETS, "tiny_eps"])
def test_minivgg_robust_inputs(vgg, preset):
    """Zero, constant and random images, on the model and on an all-dead-ReLU copy (the
    same graph: explained by the same compiled function)."""
    x = robust_images()
    comp = TINY_EPS if preset == "tiny_eps" else preset
    relevance = np.asarray(lrpjax.explain(vgg, x, composite=comp))
    assert np.all(np.isfinite(relevance))
    assert np.abs(relevance[2]).max() > 0  # the random image is explained
    dead = dead_copy(vgg)
    assert np.all(np.isfinite(dead(jnp.asarray(x))))
    assert np.all(np.isfinite(lrpjax.explain(dead, x, composite=comp)))


def test_dead_relu_mlp_all_rules(eager):
    model = build("mlp", use_bias=True, seed=17)
    model.layers[0].bias[...] = jnp.full((8,), -1e3)
    x = inputs("mlp", seed=18)
    for rule in ALL_LAYER_RULES.values():
        r, layers = lrpjax.explain(model, x, composite=on_linear(rule), layerwise=True)
        assert np.all(np.isfinite(r))
        assert all(np.all(np.isfinite(v)) for v in layers.values())
        # nothing reaches the input through dead units (flat and w^2 do hand relevance to
        # the dead units at layers/1's input, but it stops there)
        np.testing.assert_allclose(r, 0.0, atol=1e-6)


def test_nan_input_raises(mlp_setup):
    model, x, _ = mlp_setup
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lrpjax.explain(model, bad)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        lrpjax.explain(model, bad)


def test_unbatched_input_raises(mlp_setup):
    model, x, _ = mlp_setup
    with pytest.raises(ValueError, match="batch"):
        lrpjax.explain(model, x[0])


# --- errors ----------------------------------------------------------------------------


class Scale(nnx.Module):
    """A user's layer with parameters: lrpjax knows no rule for it."""

    def __init__(self, n):
        self.w = nnx.Param(jnp.linspace(0.5, 1.5, n))

    def __call__(self, x):
        return x * self.w[...]


class WithCustomLayer(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.norm = Scale(4)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.dense(x)))


def test_layer_without_rule_raises_with_path():
    model = WithCustomLayer(nnx.Rngs(0))
    with pytest.raises(lrpjax.LayerError, match="'norm'") as info:
        lrpjax.explain(model, np.ones((2, 4), np.float32))
    assert "Scale" in str(info.value)
    # mapping its path to a rule makes it explainable
    r = lrpjax.explain(
        model,
        np.ones((2, 4), np.float32),
        composite={nnx.Linear: rules.epsilon(), "norm": rules.identity()},
    )
    assert r.shape == (2, 4)


class Twice(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense(nnx.relu(self.dense(x)))


class Hybrid(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jnp.ones((4, 4)))
        self.dense = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense(x @ self.w[...])


def test_layer_called_twice_raises_layer_error():
    with pytest.raises(lrpjax.LayerError, match="more than once"):
        lrpjax.explain(Twice(nnx.Rngs(0)), np.ones((2, 4), np.float32))


def test_parameters_used_in_glue_are_constants_of_a_linear_map():
    """A module's own parameter used between layers (``x @ w``) is a linear map with
    constant weights there: LRP-0 through it, which on this bias-free ReLU-free path is
    gradient x input."""
    model = Hybrid(nnx.Rngs(0))
    model.dense.bias[...] = jnp.zeros_like(model.dense.bias[...])
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    R = lrpjax.explain(model, x, composite={nnx.Linear: rules.z()})
    target = np.asarray(model(x)).argmax(-1)
    grad = jax.grad(lambda x: jnp.sum(model(x)[jnp.arange(3), target]))(jnp.asarray(x))
    np.testing.assert_allclose(R, x * np.asarray(grad), rtol=1e-4, atol=1e-6)


class TanhGlue(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.dense(x)))


def test_tanh_glue_takes_the_identity_rule_and_conserves():
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    model = TanhGlue(nnx.Rngs(0))
    R, layers = lrpjax.explain(model, x, composite={nnx.Linear: rules.z()}, layerwise=True)
    logits = np.asarray(model(x)).max(-1)
    np.testing.assert_allclose(np.asarray(R).sum(-1), logits, rtol=1e-4, atol=1e-6)
    # identity: the relevance at the head's input is what reaches the dense layer's output
    np.testing.assert_allclose(np.asarray(layers["head"]).sum(-1), logits, rtol=1e-4, atol=1e-6)


class SortGlue(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.sort(self.dense(x), axis=-1))


def test_glue_outside_the_allow_list_raises_layer_error_with_its_line():
    with pytest.raises(lrpjax.LayerError, match="sort") as info:
        lrpjax.explain(SortGlue(nnx.Rngs(0)), np.ones((2, 4), np.float32))
    assert "test_engine.py" in str(info.value)


def test_unknown_composite_raises(mlp_setup):
    model, x, _ = mlp_setup
    with pytest.raises(ValueError, match="composite"):
        lrpjax.explain(model, x, composite="epsilon_pluss")


def test_explain_refuses_tracers(mlp_setup):
    model, x, _ = mlp_setup
    with pytest.raises(TypeError, match="explainer"):
        jax.jit(lambda x: lrpjax.explain(model, x))(x)


# --- properties ------------------------------------------------------------------------


def _layer_identity(kind, p, a, w, R_out):
    """sum_j R_j of one bias-free dense layer from its rule's exact bookkeeping (NumPy)."""
    c = a[:, :, None] * w[None]  # contributions z_jk, (N, J, K)
    if kind == "epsilon":
        z = c.sum(1)
        return (z / (z + p["eps"] * np.where(z >= 0, 1, -1)) * R_out).sum(1)
    if kind == "gamma":
        z = c.sum(1)
        part = np.where(z[:, None, :] > 0, np.maximum(c, 0), np.minimum(c, 0))
        zg = (c + p["gamma"] * part).sum(1)
        return (zg / (zg + p["eps"] * np.where(zg >= 0, 1, -1)) * R_out).sum(1)
    zp, zn = np.maximum(c, 0).sum(1), np.minimum(c, 0).sum(1)
    kept = p["alpha"] * zp / (zp + p["eps"]) - p["beta"] * zn / (zn - p["eps"])
    return (kept * R_out).sum(1)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(2, 6), min_size=2, max_size=4),
    eps=st.floats(1e-9, 1e-3),
    alpha=st.floats(1.0, 3.0),
    kind=st.sampled_from(["epsilon", "gamma", "alpha_beta"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_mlp_conserves(widths, eps, alpha, kind, seed):
    """Random bias-free MLPs (1..3 layers): each layer keeps exactly what its rule's
    bookkeeping says, which for tiny eps is all of it; everything stays finite."""
    model = MLP(widths, use_bias=False, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, widths[0])).astype(np.float32)
    p = {"eps": eps, "gamma": alpha - 1.0, "alpha": alpha, "beta": alpha - 1.0}
    rule = {
        "epsilon": rules.epsilon(eps),
        "gamma": rules.gamma(p["gamma"], eps),
        "alpha_beta": rules.alpha_beta(alpha, alpha - 1.0, eps),
    }[kind]
    target = rng.integers(0, widths[-1], size=2)
    with jax.disable_jit():  # op by op: faster than compiling each random architecture
        relevance, layers = lrpjax.explain(
            model, x, composite={nnx.Linear: rule}, target=target, layerwise=True
        )
    assert np.all(np.isfinite(relevance))
    assert all(np.all(np.isfinite(v)) for v in layers.values())
    ws = [np.asarray(lay.kernel[...], np.float64) for lay in model.layers]
    acts, a = [], x.astype(np.float64)
    for i, w in enumerate(ws):
        acts.append(a)
        a = a @ w
        a = np.maximum(a, 0) if i < len(ws) - 1 else a
    R_out = np.zeros_like(a)
    R_out[np.arange(2), target] = a[np.arange(2), target]
    for i in reversed(range(len(ws))):
        R_in = np.asarray(layers[f"layers/{i}"], np.float64)
        expected = _layer_identity(
            "alpha_beta" if kind == "alpha_beta" else kind, p, acts[i], ws[i], R_out
        )
        scale = max(np.abs(R_out).sum(), 1e-6) * (2 * alpha)
        np.testing.assert_allclose(R_in.sum(1), expected, rtol=1e-3, atol=1e-4 * scale)
        R_out = R_in
    np.testing.assert_allclose(
        per_sample_sum(relevance), per_sample_sum(layers["layers/0"]), rtol=1e-4, atol=1e-6
    )


# --- layers before a ReLU ------------------------------------------------------------------


class _Rectified(nnx.Module):
    """Convolutions whose outputs meet a ReLU in the ways models write one, and ones that
    do not: a `ReLU` layer, ``nnx.relu`` (jit and custom_jvp around ``max(., 0)``), a
    ReLU plus a second use, ``min(., 0)``, GELU, and the logits."""

    def __init__(self, rngs: nnx.Rngs):
        def conv(cin: int, cout: int) -> nnx.Conv:
            return nnx.Conv(cin, cout, (3, 3), rngs=rngs)

        self.layer_relu, self.relu = conv(2, 3), ReLU()
        self.function_relu, self.branched, self.min_zero = conv(3, 3), conv(3, 3), conv(3, 3)
        self.gelu, self.last = conv(3, 3), nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        x = self.relu(self.layer_relu(x))
        x = nnx.relu(self.function_relu(x))
        h = self.branched(x)
        x = nnx.relu(h) + 0.5 * h
        x = jnp.minimum(self.min_zero(x), 0.0)
        x = nnx.gelu(self.gelu(x))
        return self.last(x.mean(axis=(1, 2)))


def _clear_compiled() -> None:
    from lrpjax.core import engine

    engine._explain_fn.cache_clear()
    engine._jitted.cache_clear()


def _found_by(analysis: str, model, x) -> list[set[str]]:
    """What one of the engine's structure analyses (`lrpjax.core.structure`) returns while
    explaining x."""
    from lrpjax.core import structure

    found = []
    original = getattr(structure, analysis)

    def spy(*args):
        found.append(original(*args))
        return found[-1]

    setattr(structure, analysis, spy)
    try:
        lrpjax.explain(model, x, composite="epsilon")
    finally:
        setattr(structure, analysis, original)
    return found


def _explained_without(analysis: str, model, x, composite) -> np.ndarray:
    """The explanation with one of the engine's structure analyses (``rectified``,
    ``nonnegative_inputs``) finding nothing: the general forms of the rules."""
    from lrpjax.core import structure

    original = getattr(structure, analysis)
    setattr(structure, analysis, lambda *args: set())
    _clear_compiled()
    try:
        return np.asarray(lrpjax.explain(model, x, composite=composite))
    finally:
        setattr(structure, analysis, original)
        _clear_compiled()


def test_layers_before_a_relu_are_found():
    model = _Rectified(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 2)), jnp.float32)
    found = _found_by("rectified", model, x)
    assert found == [{"layer_relu", "function_relu"}]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zplus_before_a_relu_equals_the_stacked_form(dtype):
    """z+ from the layer's output (three products) is the exact stacked z+ (four) wherever
    relevance flows: the miniVGG's convolutions and dense layer all feed a ReLU."""

    model = random_minivgg(seed=3)
    x = images(3, seed=5).astype(dtype)
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        graphdef, state = nnx.split(model)
        state = jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
        )
        model = nnx.merge(graphdef, state)
        mapping = {nnx.Linear: rules.zplus(), nnx.Conv: rules.zplus(), nnx.BatchNorm: rules.z()}
        fast = np.asarray(lrpjax.explain(model, x, composite=mapping))
        stacked = _explained_without("rectified", model, x, mapping)
    finally:
        jax.config.update("jax_enable_x64", False)
    error = np.abs(fast - stacked).max(axis=(1, 2, 3)) / np.abs(stacked).max(axis=(1, 2, 3))
    assert error.max() <= (1e-12 if dtype == "float64" else 1e-5)
    assert np.abs(stacked).max() > 0


class _NonNegativeInputs(nnx.Module):
    """Layers whose inputs are >= 0 by the model's structure, and ones whose are not: after
    a `ReLU` layer and max-pooling, after ``nnx.relu`` and zero padding, after a ReLU and
    a `Flatten`; not after a sum with a signed value, a scaling, or at the signed input; a
    layer called once on each kind counts as not."""

    def __init__(self, rngs: nnx.Rngs):
        def conv(cin: int, cout: int) -> nnx.Conv:
            return nnx.Conv(cin, cout, (3, 3), rngs=rngs)

        self.first, self.relu, self.pool = conv(2, 3), ReLU(), MaxPool((2, 2))
        self.after_pool, self.after_padding = conv(3, 3), conv(3, 3)
        self.after_sum, self.after_scaling = conv(3, 3), conv(3, 3)
        self.flatten, self.dense = Flatten(), nnx.Linear(3 * 2 * 2, 2, rngs=rngs)

    def __call__(self, x):
        h = self.pool(self.relu(self.first(x)))  # (N, 4, 4, 3) from (N, 8, 8, 2)
        h = self.after_pool(h)
        h = self.after_padding(jnp.pad(nnx.relu(h), ((0, 0), (1, 1), (1, 1), (0, 0))))
        h = self.after_sum(nnx.relu(h) + h)
        h = self.after_scaling(-0.5 * nnx.relu(h))
        h = h[:, 1:5:2, 1:5:2]
        return self.dense(self.flatten(nnx.relu(h)))


def test_layers_with_nonnegative_inputs_are_found():
    model = _NonNegativeInputs(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 2)), jnp.float32)
    found = _found_by("nonnegative_inputs", model, x)
    # The pool and the flatten (sign-keeping units) see non-negative inputs too.
    assert found == [{"after_pool", "after_padding", "pool", "flatten", "dense"}]


@pytest.mark.parametrize("preset", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_nonnegative_input_forms_equal_the_general_ones_in_float64(preset):
    """The two-product alpha-beta and one-product z+ on layers after a ReLU give the
    four-product forms' relevance (float64: to rounding), on a ReLU CNN without
    batch-norm (conv-ReLU-pool, as VGG)."""

    model = _NonNegativeInputs(nnx.Rngs(1))
    jax.config.update("jax_enable_x64", True)
    try:
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
        model = nnx.merge(graphdef, state)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, 8, 2)))
        fast = np.asarray(lrpjax.explain(model, x, composite=preset))
        general = _explained_without("nonnegative_inputs", model, x, preset)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert np.abs(general).max() > 0
    np.testing.assert_allclose(fast, general, rtol=1e-10, atol=1e-12 * np.abs(general).max())
