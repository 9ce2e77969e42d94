"""The axiomatic family (completeness, non-sensitivity, input invariance) and the random
logit metric, which re-explains like input invariance, against explicit per-image loops
and known cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrpjax import metrics

RNG = np.random.default_rng(0)


class ReluNet(nnx.Module):
    """Conv 3x3 -> ReLU -> Linear; without biases its LRP-0 relevance sums to the logit."""

    def __init__(self, bias: bool = True, padding: str = "VALID", size: int = 6, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(3, 4, (3, 3), padding=padding, use_bias=bias, rngs=rngs)
        side = size - 2 if padding == "VALID" else size
        self.dense = nnx.Linear(side * side * 4, 3, use_bias=bias, rngs=rngs)
        if bias:  # non-zero biases, so that a shift that is not compensated shows
            self.conv.bias.set_value(jnp.linspace(-0.2, 0.3, 4))
            self.dense.bias.set_value(jnp.asarray([0.1, -0.2, 0.05]))

    def __call__(self, x):
        return self.dense(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def _logit(model, image: np.ndarray, t: int) -> float:
    return float(np.asarray(model(jnp.asarray(image[None])))[0, t])


# --- completeness ----------------------------------------------------------------------


def test_completeness_is_the_gap_per_image():
    model = ReluNet()
    x = RNG.random((4, 6, 6, 3)).astype(np.float32)
    maps = RNG.normal(size=x.shape)
    t = np.asarray([0, 2, 1, 0])
    expected = [
        abs(maps[i].sum() - (_logit(model, x[i], t[i]) - _logit(model, 0 * x[i], t[i])))
        for i in range(len(x))
    ]
    got = metrics.completeness(model, x, maps, t)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    black = [
        abs(
            maps[i].sum() - (_logit(model, x[i], t[i]) - _logit(model, 0 * x[i] + x[i].min(), t[i]))
        )
        for i in range(len(x))
    ]
    np.testing.assert_allclose(
        metrics.get("completeness")(model, x, maps, t, baseline="black"), black, rtol=1e-5
    )
    predicted = np.asarray(model(jnp.asarray(x))).argmax(-1)
    np.testing.assert_allclose(
        metrics.completeness(model, x, maps, -1), metrics.completeness(model, x, maps, predicted)
    )


@pytest.mark.parametrize("spec", ["lrp:zero", "gradient_x_input"])
def test_conservative_maps_of_a_bias_free_relu_net_are_complete(spec):
    """Bias-free ReLU nets are positively homogeneous: f(0) = 0 and sum(x * grad) = f(x),
    and LRP-0 conserves the logit layer by layer."""
    model = ReluNet(bias=False)
    x = jnp.asarray(RNG.random((4, 6, 6, 3)), jnp.float32)
    t = jnp.asarray([0, 1, 2, 1])
    explain = metrics.explain_fn(model, spec)
    maps = explain(x, t)
    scale = np.abs(np.asarray(model(x))).max()
    assert metrics.completeness(model, x, maps, t).max() < 1e-5 * scale
    # a random map is not
    assert metrics.completeness(model, x, RNG.normal(size=x.shape), t).min() > 1e-2


# --- non-sensitivity -------------------------------------------------------------------


class Partial(nnx.Module):
    """A linear model of a 5 x 5 x 3 image that reads rows 0 and 1 only."""

    def __init__(self):
        self.dense = nnx.Linear(75, 2, rngs=nnx.Rngs(0))
        kernel = RNG.normal(size=(5, 5, 3, 2)).astype(np.float32)
        kernel[2:] = 0.0
        self.dense.kernel.set_value(jnp.asarray(kernel.reshape(75, 2)))

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


READ = np.zeros((5, 5), bool)
READ[:2] = True  # the pixels Partial depends on


def _violations(model, x, maps, t, eps=1e-5):
    """Replace each pixel (all channels) by the image's minimum, one at a time."""
    out = []
    for i in range(len(x)):
        a = np.abs(maps[i].sum(-1))
        a = a / a.max()
        base = _logit(model, x[i], t[i])
        count = 0
        for r in range(5):
            for c in range(5):
                y = x[i].copy()
                y[r, c] = x[i].min()
                insensitive = abs(_logit(model, y, t[i]) - base) < eps
                count += insensitive != (a[r, c] < eps)
        out.append(count)
    return out


def test_non_sensitivity_counts_disagreements_per_pixel():
    model = Partial()
    x = RNG.random((3, 5, 5, 3)).astype(np.float32)
    t = np.asarray([0, 1, 0])
    maps = RNG.normal(size=x.shape)
    maps[0, 3:] = 0.0  # zero relevance on some pixels the model ignores
    maps[1, 0, :3] = 0.0  # ... and on some it reads
    got = metrics.non_sensitivity(model, x, maps, t)
    np.testing.assert_array_equal(got, _violations(model, x, maps, t))
    np.testing.assert_array_equal(got, [15 - 10, 15 + 3, 15])
    gxi = metrics.explain_fn(model, "gradient_x_input")(x, t)
    np.testing.assert_array_equal(metrics.non_sensitivity(model, x, gxi, t), 0)


def test_non_sensitivity_samples_pixels_with_a_key():
    model = Partial()
    x = RNG.random((3, 5, 5, 3)).astype(np.float32)
    t = np.asarray([1, 0, 1])
    wrong = np.where(READ[None, :, :, None], 0.0, 1.0) * np.ones(x.shape)  # every pixel violates
    np.testing.assert_array_equal(metrics.non_sensitivity(model, x, wrong, t), 25)
    key = jax.random.key(3)
    got = metrics.non_sensitivity(model, x, wrong, t, samples=7, key=key)
    np.testing.assert_array_equal(got, 7)
    maps = RNG.normal(size=x.shape)
    a = metrics.non_sensitivity(model, x, maps, t, samples=10, key=key)
    b = metrics.non_sensitivity(model, x, maps, t, samples=10, key=key)
    np.testing.assert_array_equal(a, b)
    assert (a <= 10).all()
    with pytest.raises(ValueError, match="maps of shape"):
        metrics.non_sensitivity(model, x, maps[:, :4], t)


# --- input invariance ------------------------------------------------------------------


def _shifted_by_hand(model: ReluNet, shift: float) -> ReluNet:
    new = ReluNet()
    nnx.update(new, nnx.state(model))
    kernel = np.asarray(model.conv.kernel.get_value(), np.float64)
    bias = np.asarray(model.conv.bias.get_value(), np.float64)
    new.conv.bias.set_value(jnp.asarray(bias - shift * kernel.sum((0, 1, 2)), jnp.float32))
    return new


def test_shift_first_layer_compensates_the_shift():
    model = ReluNet()
    x = jnp.asarray(RNG.random((3, 6, 6, 3)), jnp.float32)
    shifted = metrics.shift_first_layer(model, x, -1.0)
    np.testing.assert_allclose(shifted(x - 1.0), model(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        shifted.conv.bias.get_value(), _shifted_by_hand(model, -1.0).conv.bias.get_value(), 1e-6
    )
    np.testing.assert_array_equal(model.conv.bias.get_value(), jnp.linspace(-0.2, 0.3, 4))
    with pytest.raises(ValueError, match=r"first layer 'conv' is not an nnx\.Linear"):
        metrics.shift_first_layer(ReluNet(bias=False), x, -1.0)


def test_input_invariance_against_an_explicit_gradient_loop():
    model = ReluNet()
    x = RNG.random((3, 6, 6, 3)).astype(np.float32)
    t = np.asarray([0, 1, 2])
    shifted = _shifted_by_hand(model, 0.5)

    def gxi(m, image, c):
        grad = jax.grad(lambda z: m(z[None])[0, c])(jnp.asarray(image))
        return np.asarray(image * grad, np.float64)

    expected = []
    for i in range(len(x)):
        r, r2 = gxi(model, x[i], t[i]), gxi(shifted, x[i] + 0.5, t[i])
        expected.append(np.abs(r - r2).max() / np.abs(r).max())
    explain = metrics.explain_fn(model, "gradient_x_input")
    maps = explain(x, t)
    got = metrics.input_invariance(model, x, maps, t, explain=explain, shift=0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    by_hand = metrics.input_invariance(
        model, x, maps, t, explain=explain, shift=0.5, shifted_model=shifted
    )
    np.testing.assert_allclose(by_hand, got, rtol=1e-5)


@pytest.mark.parametrize(
    ("spec", "invariant"),
    [("gradient", True), ("lrp:epsilon_plus_flat", True), ("gradient_x_input", False),
     ("lrp:zero", False)],
)  # fmt: skip
def test_input_invariance_separates_invariant_explainers(spec, invariant):
    """Kindermans et al.: the gradient (and a flat first-layer rule, which ignores the
    input's values) survive a compensated shift; gradient x input and LRP-0 do not."""
    model = ReluNet()
    x = RNG.random((4, 6, 6, 3)).astype(np.float32)
    explain = metrics.explain_fn(model, spec)
    t = np.asarray(model(jnp.asarray(x))).argmax(-1)
    score = metrics.get("input_invariance")(model, x, explain(x, t), t, explain=explain)
    if invariant:
        assert score.max() < 1e-4
    else:
        assert score.min() > 0.05


def test_input_invariance_refuses_a_shift_it_cannot_compensate():
    model = ReluNet(padding="SAME")  # the zero padding sees no shift
    x = RNG.random((2, 6, 6, 3)).astype(np.float32)
    explain = metrics.explain_fn(model, "gradient")
    maps = explain(x, [0, 1])
    with pytest.raises(ValueError, match="not the same function"):
        metrics.input_invariance(model, x, maps, [0, 1], explain=explain)
    loose = metrics.input_invariance(model, x, maps, [0, 1], explain=explain, strict=False)
    assert np.isfinite(loose).all()
    with pytest.raises(ValueError, match="needs explain"):
        metrics.input_invariance(model, x, maps, [0, 1])
    with pytest.raises(ValueError, match="takes model="):
        metrics.input_invariance(
            ReluNet(), x, maps, [0, 1], explain=lambda x, t: maps
        )  # fmt: skip


# --- random logit ----------------------------------------------------------------------


def _window(kind: str) -> tuple[np.ndarray, float]:
    if kind == "gaussian":  # scipy.ndimage.gaussian_filter, sigma 1.5, truncate 3.5
        g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
        w = np.outer(g, g)
        return w / w.sum(), 1.0
    return np.full((7, 7), 1 / 49), 49 / 48


def _ssim(a: np.ndarray, b: np.ndarray, kind: str = "gaussian") -> float:
    """skimage.metrics.structural_similarity, window by window over the valid region."""
    w, cov = _window(kind)
    k = len(w)
    L = max(a.max(), b.max()) - min(a.min(), b.min())
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    values = []
    for i in range(a.shape[0] - k + 1):
        for j in range(a.shape[1] - k + 1):
            pa, pb = a[i : i + k, j : j + k], b[i : i + k, j : j + k]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va = cov * ((w * pa * pa).sum() - ma * ma)
            vb = cov * ((w * pb * pb).sum() - mb * mb)
            vab = cov * ((w * pa * pb).sum() - ma * mb)
            values.append(
                (2 * ma * mb + c1) * (2 * vab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(values))


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_ssim_matches_an_explicit_window_loop(kind):
    a = RNG.normal(size=(3, 16, 13))
    b = a + RNG.normal(size=a.shape) * np.asarray([0.1, 1.0, 10.0])[:, None, None]
    got = metrics.ssim(a, b, window=kind)
    np.testing.assert_allclose(got, [_ssim(p, q, kind) for p, q in zip(a, b, strict=True)], 2e-4)
    np.testing.assert_allclose(metrics.ssim(a, a, window=kind), 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.ssim(0 * a + 2, 0 * a + 2), 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(a[:, :6], b[:, :6])


class Linear(nnx.Module):
    def __init__(self, classes: int = 4):
        self.dense = nnx.Linear(16 * 16, classes, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


def test_random_logit_compares_with_the_map_of_another_class():
    model = Linear()
    x = RNG.random((20, 16, 16, 1)).astype(np.float32)
    t = np.asarray(model(jnp.asarray(x))).argmax(-1)
    gradient = metrics.explain_fn(model, "gradient")
    asked = []

    def explain(x, target):
        asked.append(np.asarray(target))
        return gradient(x, target)

    maps = gradient(x, t)
    key = jax.random.key(5)
    got = metrics.get("random_logit")(model, x, maps, t, explain=explain, key=key)
    (other,) = asked
    assert (other != t).all() and set(other) <= {0, 1, 2, 3}

    def norm(m):
        return m[..., 0] / np.abs(m[..., 0]).max()

    b = gradient(x, other)
    expected = [_ssim(norm(maps[i]), norm(b[i])) for i in range(len(x))]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got.mean() < 0.3  # independent random weights per class: dissimilar maps
    again = metrics.random_logit(model, x, maps, t, explain=explain, key=key)
    np.testing.assert_array_equal(again, got)
    np.testing.assert_array_equal(asked[1], other)
    rho = metrics.random_logit(model, x, maps, t, explain=gradient, key=key, similarity="spearman")
    np.testing.assert_allclose(rho, metrics.spearman(maps[..., 0], b[..., 0]), atol=1e-6)


def test_random_logit_scores_a_class_blind_explainer_as_identical():
    model = Linear()
    x = RNG.random((5, 16, 16, 1)).astype(np.float32)
    maps = RNG.normal(size=x.shape)
    score = metrics.random_logit(model, x, maps, -1, explain=lambda x, target: 3 * maps)
    np.testing.assert_allclose(score, 1.0, rtol=1e-6)
    # the other class is uniform over the C - 1 others
    t = np.zeros(1200, np.int32)
    many = np.zeros((1200, 16, 16, 1), np.float32)
    asked = []
    metrics.random_logit(
        model, many, many, t, explain=lambda x, c: asked.append(np.asarray(c)) or many
    )
    counts = np.bincount(asked[0], minlength=4)
    assert counts[0] == 0 and (np.abs(counts[1:] - 400) < 60).all()  # sd 16
    with pytest.raises(ValueError, match="needs explain"):
        metrics.random_logit(model, x, maps, -1)
