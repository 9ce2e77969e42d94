"""The faithfulness family against explicit per-image loops over a NumPy copy of the model
(with the same random draws, made from the same keys), and known cases."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.sparse import csc_matrix, lil_matrix
from scipy.sparse.linalg import spsolve
from scipy.stats import pearsonr, spearmanr

from lrpjax import metrics

RNG = np.random.default_rng(0)
H, W, C = 6, 6, 3
F = H * W


class MLP(nnx.Module):
    """Linear -> ReLU -> Linear without biases, of 6 x 6 x 3 images."""

    def __init__(self, hidden: int = 8, classes: int = 3, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(F * C, hidden, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1))))

    def numpy(self):
        w1 = np.asarray(self.l1.kernel.get_value(), np.float64)
        w2 = np.asarray(self.l2.kernel.get_value(), np.float64)
        return lambda img: np.maximum(np.asarray(img, np.float64).reshape(-1) @ w1, 0) @ w2


class Linear(nnx.Module):
    """One bias-free Linear layer: f(x) = W x, for which gradient x input is exact."""

    def __init__(self, classes: int = 3, positive: bool = False):
        self.dense = nnx.Linear(F * C, classes, use_bias=False, rngs=nnx.Rngs(1))
        if positive:
            self.dense.kernel.set_value(jnp.abs(self.dense.kernel.get_value()))

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


def _score(f, img, t, kind="logit"):
    z = f(img)
    if kind == "probability":
        z = np.exp(z - z.max())
        z = z / z.sum()
    return float(z[t])


@functools.lru_cache
def _setup(n=3, seed=0):
    """A model, its NumPy copy, images, maps and targets (shared by the tests, read-only:
    their compiled programs are reused)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, H, W, C)).astype(np.float32)
    maps = rng.normal(size=x.shape).astype(np.float32)
    model = MLP()
    t = np.asarray(model(jnp.asarray(x))).argmax(-1)
    for a in (x, maps, t):
        a.flags.writeable = False
    return model, model.numpy(), x, maps, t


def _pixels(idx):
    return np.unravel_index(np.asarray(idx), (H, W))


def _black(img):
    return np.full_like(img, img.min())


def _auc(c):
    return sum((c[k] + c[k + 1]) / 2 for k in range(len(c) - 1))


# --- pixel flipping, selectivity ---------------------------------------------------------


def _flipping_loop(f, x, maps, t, step, kind):
    curves = []
    for i in range(len(x)):
        order = np.argsort(-maps[i].sum(-1).reshape(-1), kind="stable")
        y, fill, curve = x[i].copy(), _black(x[i]), []
        for k in range(math.ceil(F / step)):
            rows, cols = _pixels(order[k * step : (k + 1) * step])
            y[rows, cols] = fill[rows, cols]
            curve.append(_score(f, y, t[i], kind))
        curves.append(curve)
    return np.asarray(curves)


@pytest.mark.parametrize(("step", "kind"), [(1, "probability"), (5, "logit")])
def test_pixel_flipping_against_a_loop(step, kind):
    model, f, x, maps, t = _setup()
    got = metrics.pixel_flipping_curves(model, x, maps, t, features_in_step=step, score=kind)
    expected = _flipping_loop(f, x, maps, t, step, kind)
    assert got.shape == (3, math.ceil(F / step))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    auc = metrics.get("pixel_flipping")(model, x, maps, t, features_in_step=step, score=kind)
    np.testing.assert_allclose(auc, [_auc(c) for c in expected], rtol=1e-5)
    # the last step has removed every pixel: the score of the all-black image
    np.testing.assert_allclose(
        got[:, -1], [_score(f, _black(x[i]), t[i], kind) for i in range(3)], 1e-5
    )


def test_selectivity_against_a_loop_and_pixel_flipping():
    model, f, x, maps, t = _setup()
    size = 4  # a 2 x 2 grid of patches, the edge ones 4 x 2, 2 x 4 and 2 x 2
    expected = []
    for i in range(len(x)):
        a = maps[i].sum(-1)
        corners = [(r, c) for r in range(0, H, size) for c in range(0, W, size)]
        sums = [a[r : r + size, c : c + size].sum() for r, c in corners]
        y, fill, curve = x[i].copy(), _black(x[i]), []
        for p in np.argsort(-np.asarray(sums), kind="stable"):
            r, c = corners[p]
            y[r : r + size, c : c + size] = fill[r : r + size, c : c + size]
            curve.append(_score(f, y, t[i], "probability"))
        expected.append(curve)
    got = metrics.selectivity_curves(model, x, maps, t, patch_size=size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        metrics.get("selectivity")(model, x, maps, t, patch_size=size),
        [_auc(c) for c in expected],
        rtol=1e-5,
    )
    # patches of one pixel are pixel flipping
    np.testing.assert_allclose(
        metrics.selectivity_curves(model, x, maps, t, patch_size=1),
        metrics.pixel_flipping_curves(model, x, maps, t),
        rtol=1e-6,
    )


# --- faithfulness correlation, sensitivity-n --------------------------------------------


def _draws(key, count, fn):
    """fn(fold_in(key, j)) for j < count, one draw at a time."""
    return np.stack([np.asarray(fn(jax.random.fold_in(key, j))) for j in range(count)])


def test_faithfulness_correlation_and_sensitivity_n_against_a_loop():
    model, f, x, maps, t = _setup()
    key = jax.random.key(7)
    runs, sizes = 12, [3, 10]
    perms = _draws(key, len(x) * len(sizes) * runs, lambda k: jax.random.permutation(k, F))
    expected = np.zeros((len(x), len(sizes)))
    for i in range(len(x)):
        a = maps[i].sum(-1).reshape(-1)
        f0, fill = _score(f, x[i], t[i], "logit"), _black(x[i])
        for j, size in enumerate(sizes):
            sums, drops = [], []
            for r in range(runs):
                subset = perms[(i * len(sizes) + j) * runs + r][:size]
                y = x[i].copy()
                rows, cols = _pixels(subset)
                y[rows, cols] = fill[rows, cols]
                sums.append(a[subset].sum())
                drops.append(f0 - _score(f, y, t[i], "logit"))
            expected[i, j] = pearsonr(sums, drops)[0]
    got = metrics.sensitivity_n_curves(
        model, x, maps, t, key=key, sizes=sizes, runs=runs, score="logit"
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        metrics.get("sensitivity_n")(model, x, maps, t, key=key, sizes=sizes, runs=runs,
                                     score="logit"),
        expected.mean(-1), rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_faithfulness_correlation_against_a_loop():
    model, f, x, maps, t = _setup()
    key = jax.random.key(8)
    runs, size = 12, 5
    perms = _draws(key, len(x) * runs, lambda k: jax.random.permutation(k, F))
    expected = []
    for i in range(len(x)):
        a = maps[i].sum(-1).reshape(-1)
        sums, drops = [], []
        for r in range(runs):
            subset = perms[i * runs + r][:size]
            y = x[i].copy()
            y[_pixels(subset)] = x[i].min()
            sums.append(a[subset].sum())
            drops.append(_score(f, x[i], t[i]) - _score(f, y, t[i]))
        expected.append(pearsonr(sums, drops)[0])
    got = metrics.get("faithfulness_correlation")(
        model, x, maps, t, key=key, runs=runs, subset_size=size
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"subset sizes must lie in 1\.\.36"):
        metrics.faithfulness_correlation(model, x, maps, t, subset_size=37)


def test_gradient_x_input_of_a_linear_model_is_perfectly_correlated():
    """f(x) - f(x with S zeroed) = sum over S of w x: the relevance of S, exactly."""
    model = Linear()
    x = jnp.asarray(RNG.random((4, H, W, C)), jnp.float32)
    t = jnp.asarray([0, 1, 2, 0])
    maps = metrics.explain_fn(model, "gradient_x_input")(x, t)
    key = jax.random.key(1)
    fc = metrics.faithfulness_correlation(model, x, maps, t, key=key, fill=0.0, subset_size=9)
    np.testing.assert_allclose(fc, 1.0, atol=1e-5)
    fe = metrics.faithfulness_estimate(model, x, maps, t, fill=0.0, features_in_step=4)
    np.testing.assert_allclose(fe, 1.0, atol=1e-5)
    sn = metrics.sensitivity_n_curves(model, x, maps, t, key=key, fill=0.0, runs=10, score="logit")
    np.testing.assert_allclose(sn, 1.0, atol=1e-5)
    # a random map is not
    noise = RNG.normal(size=x.shape)
    assert (
        np.abs(metrics.faithfulness_correlation(model, x, noise, t, fill=0.0, subset_size=9)).max()
        < 0.6
    )


def test_the_gradient_of_a_linear_model_has_no_infidelity():
    """I . grad = f(x) - f(x - I) exactly for a linear f."""
    model = Linear()
    x = jnp.asarray(RNG.random((4, H, W, C)), jnp.float32)
    t = jnp.asarray([0, 1, 2, 0])
    grad = metrics.explain_fn(model, "gradient")(x, t)
    infd = metrics.infidelity(model, x, grad, t, key=jax.random.key(1), samples=20)
    assert infd.max() < 1e-9
    assert metrics.infidelity(model, x, RNG.normal(size=x.shape), t, samples=20).min() > 1e-2


# --- faithfulness estimate, monotonicity --------------------------------------------------


def test_faithfulness_estimate_against_a_loop():
    model, f, x, maps, t = _setup()
    step = 3
    expected = []
    for i in range(len(x)):
        a = maps[i].sum(-1).reshape(-1)
        order = np.argsort(-a, kind="stable")
        f0, sums, drops = _score(f, x[i], t[i]), [], []
        for k in range(F // step):
            group = order[k * step : (k + 1) * step]
            y = x[i].copy()
            y[_pixels(group)] = x[i].min()
            sums.append(a[group].sum())
            drops.append(f0 - _score(f, y, t[i]))
        expected.append(pearsonr(sums, drops)[0])
    got = metrics.get("faithfulness_estimate")(model, x, maps, t, features_in_step=step)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_monotonicity_against_a_loop():
    model, f, x, maps, t = _setup(n=8, seed=3)
    step = 12  # three steps: a mixture of monotonic and not
    expected = []
    for i in range(len(x)):
        order = np.argsort(np.abs(maps[i].sum(-1)).reshape(-1), kind="stable")
        y, preds = _black(x[i]), []
        for k in range(F // step):
            rows, cols = _pixels(order[k * step : (k + 1) * step])
            y[rows, cols] = x[i][rows, cols]
            preds.append(_score(f, y, t[i], "probability"))
        expected.append(float(np.all(np.diff(preds) >= 0)))
    got = metrics.get("monotonicity")(model, x, maps, t, features_in_step=step)
    np.testing.assert_array_equal(got, expected)
    assert 0 < np.sum(expected) < len(x)


def test_monotonicity_known_cases():
    """Restoring positive pixels through positive weights only raises the logit."""
    x = jnp.asarray(RNG.random((3, H, W, C)) + 0.1, jnp.float32)
    t = jnp.asarray([0, 1, 2])
    model = Linear(positive=True)
    maps = metrics.explain_fn(model, "gradient_x_input")(x, t)
    got = metrics.monotonicity(model, x, maps, t, fill=0.0, score="logit")
    np.testing.assert_array_equal(got, 1.0)
    negative = Linear(positive=True)
    negative.dense.kernel.set_value(-negative.dense.kernel.get_value())
    got = metrics.monotonicity(negative, x, -maps, t, fill=0.0, score="logit")
    np.testing.assert_array_equal(got, 0.0)


def test_monotonicity_correlation_against_a_loop():
    model, f, x, maps, t = _setup(n=2)
    key = jax.random.key(4)
    step, samples = 4, 3
    groups = F // step
    noise = _draws(key, len(x) * groups * samples, lambda k: jax.random.uniform(k, (H, W, C)))
    expected = []
    for i in range(len(x)):
        a = np.abs(maps[i].sum(-1)).reshape(-1)
        order = np.argsort(a, kind="stable")
        f0 = _score(f, x[i], t[i], "probability")
        scale = 1 / f0**2 if abs(f0) >= 1e-5 else 1.0
        sums, variances = [], []
        for k in range(groups):
            group = order[k * step : (k + 1) * step]
            rows, cols = _pixels(group)
            squares = []
            for s in range(samples):
                y = x[i].copy()
                y[rows, cols] = noise[(i * groups + k) * samples + s][rows, cols]
                squares.append((f0 - _score(f, y, t[i], "probability")) ** 2)
            sums.append(a[group].sum())
            variances.append(np.mean(squares) * scale)
        expected.append(spearmanr(sums, variances)[0])
    got = metrics.get("monotonicity_correlation")(
        model, x, maps, t, key=key, samples=samples, features_in_step=step
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_monotonicity_correlation_with_a_deterministic_fill_draws_once():
    model, f, x, maps, t = _setup(n=2)
    once = metrics.monotonicity_correlation(model, x, maps, t, fill="black", samples=1)
    many = metrics.monotonicity_correlation(model, x, maps, t, fill="black", samples=50)
    np.testing.assert_array_equal(once, many)
    # ... as the loop of the one draw
    expected = []
    for i in range(len(x)):
        a = np.abs(maps[i].sum(-1)).reshape(-1)
        f0 = _score(f, x[i], t[i], "probability")
        changes = []
        for p in np.argsort(a, kind="stable"):
            y = x[i].copy()
            y[_pixels(p)] = x[i].min()
            changes.append((f0 - _score(f, y, t[i], "probability")) ** 2)
        expected.append(spearmanr(np.sort(a), changes)[0])
    np.testing.assert_allclose(once, expected, rtol=1e-5, atol=1e-6)


def test_spearman_and_pearson_handle_ties_and_constants():
    a = RNG.normal(size=(3, 20)).round(1)  # ties
    b = RNG.normal(size=(3, 20))
    expected = [spearmanr(a[i], b[i])[0] for i in range(3)]
    np.testing.assert_allclose(metrics.faithfulness.spearman_rank(a, b), expected, rtol=1e-5)
    np.testing.assert_allclose(
        metrics.faithfulness.pearson(a, b), [pearsonr(a[i], b[i])[0] for i in range(3)], 1e-5
    )
    assert np.isnan(metrics.faithfulness.pearson(np.ones((1, 5)), b[:1, :5])).all()


# --- ROAD --------------------------------------------------------------------------------


def _impute_scipy(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The sparse system of noisy linear imputation, solved directly (noise-free)."""
    h, w, c = img.shape
    unknown = np.flatnonzero(mask.reshape(-1))
    where = {p: j for j, p in enumerate(unknown)}
    a = lil_matrix((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    flat = np.asarray(img, np.float64).reshape(-1, c)
    for j, p in enumerate(unknown):
        r, q = divmod(int(p), w)
        total = 0.0
        for dr in (-1, 0, 1):
            for dq in (-1, 0, 1):
                if (dr, dq) == (0, 0) or not (0 <= r + dr < h and 0 <= q + dq < w):
                    continue
                weight = 1 / 12 if dr and dq else 1 / 6
                total += weight
                other = (r + dr) * w + q + dq
                if mask.reshape(-1)[other]:
                    a[j, where[other]] -= weight
                else:
                    b[j] += weight * flat[other]
        a[j, j] = total
    out = flat.copy()
    out[unknown] = np.asarray(spsolve(csc_matrix(a), b)).reshape(len(unknown), c)
    return out.reshape(h, w, c)


def test_noisy_linear_imputation_solves_the_sparse_system():
    img = RNG.random((H, W, C)).astype(np.float32)
    mask = RNG.random((H, W)) < 0.6
    got = metrics.noisy_linear_imputation(img, mask, noise=0.0)
    np.testing.assert_allclose(got, _impute_scipy(img, mask), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[~mask], img[~mask])
    # a linear ramp is its own neighbourhood average away from the border
    ramp = (0.3 * np.arange(H)[:, None, None] - 0.2 * np.arange(W)[None, :, None]) * np.ones(C)
    inner = np.zeros((H, W), bool)
    inner[1:-1, 1:-1] = RNG.random((H - 2, W - 2)) < 0.8
    np.testing.assert_allclose(
        metrics.noisy_linear_imputation(ramp.astype(np.float32), inner, noise=0.0), ramp, atol=1e-5
    )
    # the noise: N(0, 1) draws of the key, scaled, on the imputed pixels only
    key = jax.random.key(5)
    noisy = metrics.noisy_linear_imputation(img, mask, noise=0.1, key=key)
    draw = np.asarray(jax.random.normal(key, img.shape))
    np.testing.assert_allclose(noisy - got, np.where(mask[..., None], 0.1 * draw, 0), atol=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_against_a_loop(order):
    model, f, x, maps, t = _setup(n=2)
    key = jax.random.key(2)
    percentages = [10, 40, 70, 95]
    noise = _draws(key, len(x) * 4, lambda k: jax.random.normal(k, (H, W, C)))
    expected, correct = np.zeros((2, 4)), np.zeros((2, 4))
    for i in range(len(x)):
        a = maps[i].sum(-1).reshape(-1)
        ranking = np.argsort(-a if order == "morf" else a, kind="stable")
        for j, p in enumerate(percentages):
            mask = np.zeros(F, bool)
            mask[ranking[: int(F * p / 100)]] = True
            mask = mask.reshape(H, W)
            y = _impute_scipy(x[i], mask) + np.where(mask[..., None], 0.01 * noise[i * 4 + j], 0)
            expected[i, j] = _score(f, y, t[i], "logit")
            correct[i, j] = float(np.argmax(f(y)) == t[i])
    kw = {"order": order, "percentages": percentages, "key": key}
    got = metrics.road_curves(model, x, maps, t, score="logit", **kw)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(metrics.road_curves(model, x, maps, t, **kw), correct)
    registered = metrics.get(f"road_{order}")(model, x, maps, t, percentages=percentages, key=key)
    np.testing.assert_allclose(registered, correct.mean(-1))


# --- infidelity ----------------------------------------------------------------------------


@pytest.mark.parametrize("normalise", [False, True])
def test_infidelity_against_a_loop(normalise):
    model, f, x, maps, t = _setup()
    key = jax.random.key(9)
    samples = 16
    draws = _draws(key, len(x) * samples, lambda k: jax.random.normal(k, (H, W, C)))
    expected = []
    for i in range(len(x)):
        f0 = _score(f, x[i], t[i])
        dots, drops = [], []
        for s in range(samples):
            perturbation = 0.2 * draws[i * samples + s].astype(np.float64)
            dots.append((perturbation * maps[i]).sum())
            drops.append(f0 - _score(f, x[i] - perturbation, t[i]))
        dots, drops = np.asarray(dots), np.asarray(drops)
        if normalise:
            dots *= (dots * drops).mean() / (dots * dots).mean()
        expected.append(((dots - drops) ** 2).mean())
    got = metrics.get("infidelity")(
        model, x, maps, t, key=key, samples=samples, normalise=normalise
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # a channel-summed (N, H, W) map is broadcast over the channels
    summed = maps.sum(-1, keepdims=True) * np.ones(C)
    np.testing.assert_allclose(
        metrics.infidelity(model, x, maps.sum(-1), t, key=key, samples=samples),
        metrics.infidelity(model, x, summed, t, key=key, samples=samples),
        rtol=1e-5,
    )


# --- IROF ----------------------------------------------------------------------------------


def _blocks(n):
    """Superpixels: 3 x 3 blocks of 2 x 2 pixels, labelled 10, 20, ... (relabelled)."""
    labels = 10 * (1 + np.arange(9).reshape(3, 3).repeat(2, 0).repeat(2, 1))
    return np.repeat(labels[None], n, axis=0)


def test_irof_against_a_loop():
    model, f, x, maps, t = _setup()
    segments = _blocks(len(x))
    segments[1][segments[1] == 90] = 80  # image 1 has 8 segments
    expected = []
    for i in range(len(x)):
        a = maps[i].sum(-1)
        labels = np.unique(segments[i])
        means = [a[segments[i] == s].mean() for s in labels]
        f0, y, curve = _score(f, x[i], t[i], "probability"), x[i].copy(), []
        for s in np.argsort(-np.asarray(means), kind="stable"):
            y[segments[i] == labels[s]] = x[i].mean()
            curve.append(_score(f, y, t[i], "probability") / f0)
        expected.append(len(labels) - _auc(curve))
    got = metrics.get("irof")(model, x, maps, t, segments=segments)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_irof_uses_slic_superpixels():
    slic = pytest.importorskip("skimage.segmentation", reason="needs scikit-image").slic
    model, _, x, maps, t = _setup(n=2)
    segments = np.stack([slic(img.astype(np.float64), start_label=0) for img in x])
    np.testing.assert_allclose(
        metrics.irof(model, x, maps, t), metrics.irof(model, x, maps, t, segments=segments)
    )


def test_irof_without_scikit_image_says_how_to_install_it():
    try:
        import skimage  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("scikit-image is installed")
    model, _, x, maps, t = _setup(n=2)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        metrics.irof(model, x, maps, t)


# --- the registry ----------------------------------------------------------------------------


def test_the_family_is_registered_with_its_directions():
    expected = {
        "pixel_flipping": False,
        "selectivity": False,
        "faithfulness_correlation": True,
        "faithfulness_estimate": True,
        "sensitivity_n": True,
        "monotonicity": True,
        "monotonicity_correlation": True,
        "road_morf": False,
        "road_lerf": True,
        "infidelity": False,
        "irof": True,
    }
    for name, higher in expected.items():
        metric = metrics.get(name)
        assert metric.family == "faithfulness" and not metric.needs_explain
        assert metric.higher_is_better is higher and metric.reference
    model, _, x, maps, t = _setup(n=1)
    with pytest.raises(ValueError, match="unknown fill 'grey'"):
        metrics.pixel_flipping(model, x, maps, t, fill="grey")
    with pytest.raises(ValueError, match="maps of shape"):
        metrics.pixel_flipping(model, x, maps[:, :4], t)
