"""The robustness family against explicit per-image, per-sample loops over a NumPy copy of
the model and its gradient x input (with the same perturbations, drawn from the same
keys), and known cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrpjax import metrics

RNG = np.random.default_rng(0)
H, W, C = 4, 4, 3
D = H * W * C


class MLP(nnx.Module):
    """Linear -> ReLU -> Linear without biases, of 4 x 4 x 3 images (hidden=0: Linear)."""

    def __init__(self, hidden: int = 8, classes: int = 3, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(D, hidden or classes, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, use_bias=False, rngs=rngs) if hidden else None

    def __call__(self, x):
        z = self.l1(x.reshape(x.shape[0], -1))
        return z if self.l2 is None else self.l2(nnx.relu(z))

    def numpy(self):
        """(logits(img), gradient x input(img, t)) in float64 NumPy."""
        w1 = np.asarray(self.l1.kernel.get_value(), np.float64)
        w2 = None if self.l2 is None else np.asarray(self.l2.kernel.get_value(), np.float64)

        def logits(img):
            z = np.asarray(img, np.float64).reshape(-1) @ w1
            return z if w2 is None else np.maximum(z, 0) @ w2

        def gxi(img, t):
            if w2 is None:
                grad = w1[:, t]
            else:
                active = (np.asarray(img, np.float64).reshape(-1) @ w1) > 0
                grad = w1 @ (active * w2[:, t])
            return np.asarray(img, np.float64) * grad.reshape(img.shape)

        return logits, gxi


@functools.lru_cache
def _setup(n=3, hidden=8, seed=0):
    """A model, its NumPy logits and gradient x input, images, targets and explain (shared
    by the tests: their compiled programs are reused)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, H, W, C)) + 0.05).astype(np.float32)
    model = MLP(hidden)
    t = np.asarray(model(jnp.asarray(x))).argmax(-1)
    explain = metrics.explain_fn(model, "gradient_x_input")
    return model, *model.numpy(), x, t, explain


def _noise(key, i, s, samples, kind, low, high):
    k = jax.random.fold_in(key, i * samples + s)
    if kind == "uniform":
        return np.asarray(jax.random.uniform(k, (H, W, C), jnp.float32, low, high), np.float64)
    return low + high * np.asarray(jax.random.normal(k, (H, W, C), jnp.float32), np.float64)


def _loop(logits, gxi, x, t, key, samples, value, kind="uniform", low=-0.2, high=0.2):
    """(N, samples) values and whether each sample changes the predicted class."""
    values = np.zeros((len(x), samples))
    changed = np.zeros((len(x), samples), bool)
    for i in range(len(x)):
        r = gxi(x[i], t[i])
        for s in range(samples):
            x2 = x[i] + _noise(key, i, s, samples, kind, low, high)
            values[i, s] = value(r, gxi(x2, t[i]), x[i], x2, logits(x[i]), logits(x2))
            changed[i, s] = logits(x2).argmax() != logits(x[i]).argmax()
    return values, changed


def _norm(v):
    return float(np.sqrt((np.asarray(v) ** 2).sum()))


def test_max_and_avg_sensitivity_against_a_loop():
    model, logits, gxi, x, t, explain = _setup()
    key = jax.random.key(3)
    samples = 8
    values, _ = _loop(logits, gxi, x, t, key, samples, lambda r, r2, *_: _norm(r - r2) / _norm(r))
    maps = explain(x, t)
    got = metrics.get("max_sensitivity")(model, x, maps, t, explain=explain, key=key,
                                         samples=samples)  # fmt: skip
    np.testing.assert_allclose(got, values.max(-1), rtol=1e-4)
    got = metrics.get("avg_sensitivity")(model, x, maps, t, explain=explain, key=key,
                                         samples=samples)  # fmt: skip
    np.testing.assert_allclose(got, values.mean(-1), rtol=1e-4)
    assert got.dtype == np.float64 and (values.max(-1) > values.mean(-1)).all()


def test_local_lipschitz_estimate_against_a_loop():
    model, logits, gxi, x, t, explain = _setup()
    key = jax.random.key(4)
    samples = 8
    values, _ = _loop(
        logits, gxi, x, t, key, samples,
        lambda r, r2, x1, x2, *_: _norm(r - r2) / (_norm(x1 - x2) + 1e-10),
        kind="gaussian", low=0.0, high=0.1,
    )  # fmt: skip
    got = metrics.get("local_lipschitz_estimate")(
        model, x, explain(x, t), t, explain=explain, key=key, samples=samples
    )
    np.testing.assert_allclose(got, values.max(-1), rtol=1e-4)


def _relative(r, r2, x1, x2, h, h2, output):
    eps = 1e-6
    num = _norm((r - r2) / (r + (r == 0) * eps))
    den = _norm(h - h2) if output else _norm((x1 - x2) / (x1 + (x1 == 0) * eps))
    return num / max(den, eps)


@pytest.mark.parametrize("output", [False, True])
def test_relative_stability_against_a_loop(output):
    """Noise large enough that some samples change the class: they are left out."""
    model, logits, gxi, x, t, explain = _setup(n=4, seed=1)
    key = jax.random.key(5)
    samples, low, high = 8, -0.6, 0.6
    values, changed = _loop(
        logits, gxi, x, t, key, samples,
        lambda *a: _relative(*a, output=output), low=low, high=high,
    )  # fmt: skip
    assert changed.any() and not changed.all(-1).any()
    name = "relative_output_stability" if output else "relative_input_stability"
    kw = {
        "explain": explain,
        "key": key,
        "samples": samples,
        "lower_bound": 0.6,
        "upper_bound": None,
    }
    maps = explain(x, t)
    got = metrics.get(name)(model, x, maps, t, **kw)
    np.testing.assert_allclose(got, np.where(changed, -np.inf, values).max(-1), rtol=1e-4)
    kept = metrics.get(name)(model, x, maps, t, exclude_changed=False, **kw)
    np.testing.assert_allclose(kept, values.max(-1), rtol=1e-4)
    # a large positive shift moves images 0 and 2 to class 0 in every sample: NaN
    values, changed = _loop(
        logits, gxi, x, t, key, samples, lambda *a: _relative(*a, output=output), low=2, high=3
    )
    np.testing.assert_array_equal(changed.all(-1), [True, False, True, False])
    shifted = metrics.get(name)(model, x, maps, t, **{**kw, "lower_bound": 2, "upper_bound": 3})
    np.testing.assert_array_equal(np.isnan(shifted), changed.all(-1))
    np.testing.assert_allclose(shifted[1::2], values[1::2].max(-1), rtol=1e-4)


def test_relative_stability_defaults_follow_quantus():
    """Quantus's noise U[0.02, 0.2] of the relative stabilities."""
    model, logits, gxi, x, t, explain = _setup()
    key = jax.random.key(6)
    values, changed = _loop(
        logits, gxi, x, t, key, 8, lambda *a: _relative(*a, output=False), low=0.02, high=0.2
    )
    got = metrics.relative_input_stability(model, x, explain(x, t), t, explain=explain,
                                           key=key, samples=8)  # fmt: skip
    np.testing.assert_allclose(got, np.where(changed, -np.inf, values).max(-1), rtol=1e-4)


def test_a_constant_explainer_is_not_sensitive():
    model, _, _, x, t, _ = _setup()
    key = jax.random.key(7)
    constant = lambda xs, ts: np.ones(np.shape(xs))  # noqa: E731
    ones = np.ones_like(x)
    for name in ("max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate"):
        got = metrics.get(name)(model, x, ones, t, explain=constant, key=key, samples=8)
        np.testing.assert_array_equal(got, 0.0)
    # an all-zero map that moves: infinitely sensitive; one that stays: not at all
    zeros = lambda xs, ts: np.zeros(np.shape(xs))  # noqa: E731
    got = metrics.max_sensitivity(model, x, 0 * ones, t, explain=zeros, key=key, samples=8)
    np.testing.assert_array_equal(got, 0.0)
    got = metrics.max_sensitivity(model, x, 0 * ones, t, explain=constant, key=key, samples=8)
    np.testing.assert_array_equal(got, np.inf)


def test_the_gradient_of_a_linear_model_is_stable():
    """The gradient does not depend on the input: nothing moves."""
    model, _, _, x, t, _ = _setup(hidden=0)
    key = jax.random.key(7)
    grad = metrics.explain_fn(model, "gradient")
    g = grad(x, t)
    for name in ("max_sensitivity", "relative_output_stability", "relative_input_stability"):
        got = metrics.get(name)(model, x, g, t, explain=grad, key=key, samples=8)
        np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_gradient_x_input_of_a_linear_model_moves_as_the_input():
    """w * x changes by w * (x - x'): relative input stability exactly 1."""
    model, _, _, x, t, _ = _setup(hidden=0)
    gxi = metrics.explain_fn(model, "gradient_x_input")
    got = metrics.relative_input_stability(
        model, x, gxi(x, t), t, explain=gxi, key=jax.random.key(7), samples=8,
        exclude_changed=False,
    )  # fmt: skip
    np.testing.assert_allclose(got, 1.0, rtol=1e-4)


def test_explanations_are_batched_over_samples_and_images():
    model, _, _, x, t, explain = _setup()
    calls = []

    def recording(xs, ts):
        calls.append(np.shape(xs))
        return explain(xs, ts)

    maps = explain(x, t)
    key = jax.random.key(8)
    one_call = metrics.max_sensitivity(model, x, maps, t, explain=recording, key=key, samples=8)
    assert calls == [(24, H, W, C)]  # all 3 x 8 at once
    calls.clear()
    padded = metrics.max_sensitivity(
        model, x, maps, t, explain=recording, key=key, samples=8, batch_size=16
    )
    assert calls == [(16, H, W, C)] * 2  # 2 images a call, the last call padded
    np.testing.assert_allclose(one_call, padded, rtol=1e-6)
    # the perturbed inputs are those of perturbed_inputs
    xs = metrics.perturbed_inputs(x, 8, key=key)
    noise = _noise(key, 2, 4, 8, "uniform", -0.2, 0.2)
    np.testing.assert_allclose(xs[2, 4] - x[2], noise, atol=1e-6)


def test_the_family_is_registered_and_needs_explain():
    names = {
        "max_sensitivity",
        "avg_sensitivity",
        "local_lipschitz_estimate",
        "relative_input_stability",
        "relative_output_stability",
    }
    assert set(metrics.names("robustness")) == names
    for name in names:
        metric = metrics.get(name)
        assert metric.needs_explain and not metric.higher_is_better and metric.reference
    model, _, _, x, t, explain = _setup()
    with pytest.raises(ValueError, match="need explain"):
        metrics.max_sensitivity(model, x, explain(x, t), t)
    with pytest.raises(ValueError, match="re-explained maps have shape"):
        metrics.max_sensitivity(model, x, explain(x, t)[..., 0], t, explain=explain, samples=8)
