"""The metric protocol and registry, and the complexity family against explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from lrpjax import metrics

RNG = np.random.default_rng(0)
MAPS = RNG.normal(size=(5, 6, 4, 3))


def _pixels(m: np.ndarray) -> list[float]:
    """One map's absolute channel sums, pixel by pixel."""
    h, w, _ = m.shape
    return [abs(sum(m[i, j, c] for c in range(m.shape[2]))) for i in range(h) for j in range(w)]


def _gini(values: list[float]) -> float:
    a = sorted(v + 1e-7 for v in values)
    n = len(a)
    return sum((2 * (i + 1) - n - 1) * v for i, v in enumerate(a)) / (n * sum(a))


def _entropy(values: list[float]) -> float:
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0)


def test_sparseness_is_the_gini_index_per_image():
    got = metrics.get("sparseness")(None, None, MAPS, None)
    np.testing.assert_allclose(got, [_gini(_pixels(m)) for m in MAPS], rtol=1e-5)


def test_complexity_is_the_entropy_per_image():
    got = metrics.get("complexity")(None, None, MAPS, None)
    np.testing.assert_allclose(got, [_entropy(_pixels(m)) for m in MAPS], rtol=1e-5)


def test_effective_complexity_counts_pixels_above_eps():
    maps = MAPS.copy()
    maps[0] = 0.0
    maps[1, :2] = 0.0
    got = metrics.get("effective_complexity")(None, None, maps, None)
    expected = [sum(v > 1e-5 for v in _pixels(m)) for m in maps]
    np.testing.assert_array_equal(got, expected)
    assert got[0] == 0


def test_complexity_extremes():
    one = np.zeros((1, 6, 4, 3))
    one[0, 2, 1, 0] = 5.0
    flat = np.ones((1, 6, 4, 3))
    n = 24
    np.testing.assert_allclose(metrics.sparseness(None, None, one, None), 1 - 1 / n, atol=1e-6)
    np.testing.assert_allclose(metrics.sparseness(None, None, flat, None), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.entropy(None, None, one, None), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.entropy(None, None, flat, None), math.log(n), rtol=1e-6)
    np.testing.assert_allclose(metrics.entropy(None, None, 0 * flat, None), math.log(n), rtol=1e-6)


def test_registry_lists_every_metric_with_its_family():
    assert set(metrics.names("complexity")) == {"sparseness", "complexity", "effective_complexity"}
    assert {"region_perturbation_morf", "region_perturbation_lerf"} <= set(
        metrics.names("faithfulness")
    )
    for metric in metrics.REGISTRY.values():
        assert metric.family in metrics.FAMILIES and metric.reference
    with pytest.raises(ValueError, match=r"unknown metric 'gini'.*sparseness"):
        metrics.get("gini")


def test_a_new_metric_is_one_function_and_its_decorator():
    name = "test_only_mean_magnitude"

    @metrics.register(name, family="complexity", higher_is_better=False, reference="none")
    def mean_magnitude(model, x, maps, target, *, explain=None, key=None):
        return np.abs(maps).reshape(len(maps), -1).mean(-1)

    try:
        assert metrics.get(name).fn is mean_magnitude
        np.testing.assert_allclose(
            metrics.get(name)(None, None, MAPS, None), np.abs(MAPS).mean((1, 2, 3))
        )
        with pytest.raises(ValueError, match="registered already"):
            metrics.register(name, family="complexity", higher_is_better=False, reference="")(
                mean_magnitude
            )
    finally:
        del metrics.REGISTRY[name]
    with pytest.raises(ValueError, match="unknown metric family"):
        metrics.register("x", family="beauty", higher_is_better=True, reference="")


def test_registered_region_perturbation_is_the_aopc_of_the_curves():
    class Net(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
            self.dense = nnx.Linear(8 * 8 * 4, 3, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.dense(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    model = Net()
    x = RNG.random((3, 8, 8, 3)).astype(np.float32)
    maps = RNG.normal(size=x.shape).astype(np.float32)
    target = np.asarray(model(x)).argmax(-1)
    for order in ("morf", "lerf"):
        curves = metrics.region_perturbation(
            model, x, maps, target, region=2, steps=5, order=order, progress=False
        )
        got = metrics.get(f"region_perturbation_{order}")(model, x, maps, target, region=2, steps=5)
        np.testing.assert_allclose(got, metrics.aopc(curves))
