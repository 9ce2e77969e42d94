"""The localisation family against explicit per-image loops, known cases, and a benchmark
whose evidence is known (a coloured square that alone decides the class)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrpjax import metrics
from lrpjax.analysis import baselines

RNG = np.random.default_rng(0)
N, H, W = 6, 6, 4
MAPS = RNG.normal(size=(N, H, W, 3))
MASKS = RNG.random((N, H, W)) < 0.3
MASKS[0] = False
MASKS[0, 1:3, 1:3] = True  # every mask non-empty and not full
MASKS[1, 0, 0] = True
NAMES = (
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
    "attribution_localisation",
    "auc",
)


def _pixels(m: np.ndarray) -> list[float]:
    """One map's channel sums, pixel by pixel (row-major)."""
    return [float(sum(m[i, j, c] for c in range(m.shape[2]))) for i in range(H) for j in range(W)]


def _mask(s: np.ndarray) -> list[bool]:
    return [bool(s[i, j]) for i in range(H) for j in range(W)]


def _descending(a: list[float]) -> list[int]:
    """Pixel indices by decreasing score, ties by index."""
    return sorted(range(len(a)), key=lambda i: (-a[i], i))


def _pointing(a, s, weighted=False):
    top = max(a)
    hit = any(s[i] for i in range(len(a)) if a[i] == top)
    return (1 - sum(s) / len(s)) * hit if weighted else float(hit)


def _mass(a, s):
    return sum(v for v, m in zip(a, s, strict=True) if m) / sum(a)


def _rank(a, s):
    k = sum(s)
    return sum(s[i] for i in _descending(a)[:k]) / k


def _top_k(a, s, k, concept_influence=False):
    score = sum(s[i] for i in _descending(a)[:k]) / k
    return score * len(s) / sum(s) if concept_influence else score


def _inside(a, s, weighted=False):
    pos = [max(v, 0.0) for v in a]
    ratio = sum(v for v, m in zip(pos, s, strict=True) if m) / sum(pos)
    return ratio * len(s) / sum(s) if weighted else ratio


def _auc(a, s):
    """Mann-Whitney U over every (inside, outside) pair."""
    pos = [v for v, m in zip(a, s, strict=True) if m]
    neg = [v for v, m in zip(a, s, strict=True) if not m]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _loop(fn, maps=MAPS, masks=MASKS, **kw):
    return [fn(_pixels(m), _mask(s), **kw) for m, s in zip(maps, masks, strict=True)]


def _metric(name, maps=MAPS, masks=MASKS, **kw):
    return metrics.get(name)(None, None, maps, None, masks=masks, **kw)


def test_localisation_metrics_match_explicit_loops():
    cases = [
        ("pointing_game", _pointing, {}),
        ("pointing_game", _pointing, {"weighted": True}),
        ("relevance_mass_accuracy", _mass, {}),
        ("relevance_rank_accuracy", _rank, {}),
        ("top_k_intersection", _top_k, {"k": 5}),
        ("top_k_intersection", _top_k, {"k": 3, "concept_influence": True}),
        ("attribution_localisation", _inside, {}),
        ("attribution_localisation", _inside, {"weighted": True}),
        ("auc", _auc, {}),
    ]
    for name, fn, kw in cases:
        np.testing.assert_allclose(_metric(name, **kw), _loop(fn, **kw), rtol=1e-5, err_msg=name)
    assert _metric("auc").dtype == np.float64


def test_absolute_scores_the_absolute_channel_sums():
    flat = np.abs(MAPS.sum(-1))  # an (N, H, W) map is taken as it is
    for name in ("pointing_game", "relevance_mass_accuracy", "auc"):
        np.testing.assert_allclose(
            _metric(name, absolute=True), _metric(name, maps=flat), rtol=1e-6
        )
    # attribution localisation: positive part by default, |a| with absolute=True
    np.testing.assert_allclose(
        _metric("attribution_localisation", absolute=True),
        _loop(_inside, maps=np.abs(MAPS.sum(-1, keepdims=True))),
        rtol=1e-5,
    )


def test_known_cases_mask_inverted_and_constant_maps():
    mask_map = MASKS.astype(float)
    for name in ("pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "auc"):
        np.testing.assert_allclose(_metric(name, maps=mask_map), 1.0, err_msg=name)
    np.testing.assert_allclose(_metric("attribution_localisation", maps=mask_map), 1.0)
    np.testing.assert_allclose(_metric("auc", maps=1.0 - mask_map), 0.0)
    np.testing.assert_allclose(_metric("auc", maps=np.full((N, H, W), 3.0)), 0.5)
    # a uniform map: mass = weighted inside-ratio / (n / |s|) = |s| / n; weighted = 1
    area = MASKS.reshape(N, -1).mean(-1)
    np.testing.assert_allclose(_metric("relevance_mass_accuracy", maps=np.ones((N, H, W))), area)
    np.testing.assert_allclose(
        _metric("attribution_localisation", maps=np.ones((N, H, W)), weighted=True), 1.0
    )
    # constant map: every pixel is maximal, so the pointing game hits any non-empty mask
    np.testing.assert_allclose(_metric("pointing_game", maps=np.zeros((N, H, W))), 1.0)


def test_empty_masks_score_nan_and_bad_masks_raise():
    masks = MASKS.copy()
    masks[2] = False
    for name in NAMES:
        got = _metric(name, masks=masks)
        assert np.isnan(got[2]) and not np.isnan(got[[0, 1, 3]]).any(), name
    full = MASKS.copy()
    full[3] = True
    assert np.isnan(_metric("auc", masks=full)[3])
    for name in NAMES:
        with pytest.raises(ValueError, match=r"needs ground-truth masks"):
            metrics.get(name)(None, None, MAPS, None)
        with pytest.raises(ValueError, match=r"masks must be \(N, H, W\)"):
            _metric(name, masks=MASKS[:, :, :3])
    with pytest.raises(ValueError, match="k must be in"):
        _metric("top_k_intersection", k=H * W + 1)


def test_top_k_default_is_two_percent_of_the_pixels():
    maps = RNG.normal(size=(3, 32, 32))
    masks = RNG.random((3, 32, 32)) < 0.2
    np.testing.assert_allclose(
        _metric("top_k_intersection", maps=maps, masks=masks),
        _metric("top_k_intersection", maps=maps, masks=masks, k=20),
    )


class SquareDetector(nnx.Module):
    """Logit c = sum over pixels of ReLU(x_c - (x_other1 + x_other2) / 2 - 0.3): only a
    strongly coloured pixel of colour c (the square) contributes."""

    def __init__(self):
        self.conv = nnx.Conv(3, 3, (1, 1), rngs=nnx.Rngs(0))
        kernel = np.full((1, 1, 3, 3), -0.5, np.float32)
        np.fill_diagonal(kernel[0, 0], 1.0)
        self.conv.kernel.set_value(jnp.asarray(kernel))
        self.conv.bias.set_value(jnp.full((3,), -0.3))

    def __call__(self, x):
        return nnx.relu(self.conv(x)).sum(axis=(1, 2))


def test_synthetic_benchmark_is_deterministic_and_its_square_decides_the_class():
    images, masks, labels = metrics.synthetic_localisation(64, seed=3)
    again = metrics.synthetic_localisation(64, seed=3)
    for a, b in zip((images, masks, labels), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
    assert masks.shape == (64, 32, 32) and masks.dtype == bool
    assert images.min() >= 0 and images.max() <= 1
    assert (masks.sum((1, 2)) == 64).all() and set(labels) == {0, 1, 2}
    colours = np.asarray(metrics.localisation.COLOURS)
    np.testing.assert_array_equal(images[masks], colours[np.repeat(labels, 64)])
    spread = images[~masks].max(-1) - images[~masks].min(-1)
    assert spread.max() <= 0.1 + 1e-6  # the background is grey: no colour evidence
    logits = np.asarray(SquareDetector()(jnp.asarray(images)))
    np.testing.assert_array_equal(logits.argmax(-1), labels)


@pytest.mark.parametrize("spec", ["gradient_x_input", "lrp:zero"])
def test_informative_maps_point_into_the_square(spec):
    images, masks, labels = metrics.synthetic_localisation(300, size=16, seed=1)
    model = SquareDetector()
    x, t = jnp.asarray(images), jnp.asarray(labels)
    fn, state = baselines.make(model, spec)
    maps = np.asarray(fn(state, x, t))
    assert np.abs(maps.sum(-1)[~masks]).max() == 0  # no relevance off the square
    np.testing.assert_array_equal(metrics.pointing_game(model, x, maps, t, masks=masks), 1)
    np.testing.assert_allclose(
        metrics.relevance_mass_accuracy(model, x, maps, t, masks=masks), 1, rtol=1e-6
    )
    np.testing.assert_allclose(metrics.auc(model, x, maps, t, masks=masks), 1)


def test_random_maps_point_into_the_square_at_chance():
    images, masks, labels = metrics.synthetic_localisation(300, size=16, seed=1)
    # a random map hits the square (4 x 4) with the square's share of the pixels, 1 / 16;
    # over 300 images the hit rate's standard deviation is 0.014: allow 0.05 (3.5 sd)
    noise = np.random.default_rng(2).normal(size=images.shape)
    hits = metrics.pointing_game(None, images, noise, labels, masks=masks)
    assert abs(hits.mean() - 1 / 16) < 0.05
    assert abs(metrics.auc(None, images, noise, labels, masks=masks).mean() - 0.5) < 0.05
