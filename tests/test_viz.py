"""Heatmap post-processing and figures (`lrpjax.viz`)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from lrpjax import viz

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def relevance() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 8, 6, 3)).astype(np.float32)


def test_channel_sum(relevance):
    h = viz.channel_sum(relevance)
    assert h.shape == (4, 8, 6) and h.dtype == np.float32
    np.testing.assert_allclose(h, relevance.sum(-1), rtol=1e-6)


def test_clip_quantile_clips_each_map_at_its_quantile():
    h = np.zeros((2, 10, 10), np.float32)
    h[0].flat[:] = np.arange(100)
    h[1].flat[:] = -np.arange(100) * 3.0
    clipped = viz.clip_quantile(h, 0.9)
    bounds = [np.quantile(np.abs(m), 0.9) for m in h]
    for m, c, b in zip(h, clipped, bounds, strict=True):
        assert np.abs(c).max() == pytest.approx(b)
        np.testing.assert_array_equal(c, np.clip(m, -b, b))
    assert bounds[0] != pytest.approx(bounds[1])  # per map, not one global bound
    np.testing.assert_array_equal(viz.clip_quantile(h, 1.0), h)  # 1.0: no clipping


def test_normalize(relevance):
    h = viz.channel_sum(relevance)
    h[1, 2, 3] = 0.0
    n = viz.normalize(h)
    np.testing.assert_allclose(np.abs(n).reshape(4, -1).max(1), 1.0, rtol=1e-6)
    assert n[1, 2, 3] == 0.0
    np.testing.assert_array_equal(np.sign(n), np.sign(h))  # sign kept, symmetric scaling
    ratio = n / np.where(h == 0, 1, h)
    for i in range(4):
        nz = h[i] != 0
        np.testing.assert_allclose(ratio[i][nz], ratio[i][nz][0], rtol=1e-5)


def test_normalize_all_zero_map_stays_zero():
    h = np.zeros((2, 5, 5), np.float32)
    h[1, 0, 0] = -2.0
    with np.errstate(all="raise"):
        n = viz.normalize(h)
    assert np.isfinite(n).all()
    np.testing.assert_array_equal(n[0], 0.0)
    assert n[1, 0, 0] == -1.0


def test_heatmap_in_unit_range(relevance):
    big = relevance * 1e4
    big[0, 0, 0] = 1e9  # an outlier
    h = viz.heatmap(big)
    assert h.shape == (4, 8, 6)
    assert h.min() >= -1.0 and h.max() <= 1.0
    assert np.isclose(np.abs(h).reshape(4, -1).max(1), 1.0).all()
    assert np.isfinite(viz.heatmap(np.zeros((1, 4, 4, 3)))).all()


@pytest.mark.parametrize(("cmap", "neutral"), [("bwr", 1.0), ("seismic", 1.0), ("coldnhot", 0.0)])
def test_colorize_signs(cmap, neutral):
    h = np.array([[[0.0, 1.0, -1.0]]], np.float32)
    rgb = viz.colorize(h, cmap)
    assert rgb.shape == (1, 1, 3, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    zero, plus, minus = rgb[0, 0]
    np.testing.assert_allclose(zero, neutral, atol=0.01)
    assert plus[0] > plus[2], plus  # red-ish (coldnhot: red to yellow)
    assert minus[2] > minus[0], minus  # blue-ish (coldnhot: blue to cyan)


def test_overlay_shape_and_range(relevance):
    images = np.random.default_rng(1).random((4, 8, 6, 3)).astype(np.float32)
    h = viz.heatmap(relevance)
    over = viz.overlay(images, h)
    assert over.shape == (4, 8, 6, 3)
    assert over.min() >= 0.0 and over.max() <= 1.0 + 1e-6
    grey = images.mean(-1)
    none = viz.overlay(images, np.zeros_like(h))  # no relevance: the greyscale image
    np.testing.assert_allclose(none, np.repeat(grey[..., None], 3, -1), rtol=1e-6)


def test_grid_figure_writes_png(tmp_path, relevance):
    images = np.random.default_rng(1).random((3, 8, 6, 3)).astype(np.float32)
    path = tmp_path / "grid.png"
    viz.grid_figure(
        images,
        relevance[:3],
        labels=[0, 1, 2],
        predictions=[0, 2, 2],
        probabilities=[0.9, 0.5, 0.7],
        class_names=["a", "b", "c"],
        path=path,
    )
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_class_mean_figure_writes_png(tmp_path):
    means = np.random.default_rng(2).normal(size=(7, 8, 8)).astype(np.float32)
    means[3] = 0.0  # a class without images
    path = tmp_path / "means.png"
    viz.class_mean_figure(
        means, class_names=[f"c{i}" for i in range(7)], counts=[1, 2, 3, 0, 5, 6, 7], path=path
    )
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_unknown_colour_map():
    with pytest.raises(ValueError, match="unknown colour map 'viridis'"):
        viz.colormap("viridis")
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.colorize(np.zeros((1, 2, 2)), "nope")


def test_grid_figure_names_classes_beyond_the_names_by_index(tmp_path, relevance):
    """A 100-class model's predictions with 10 names given: no IndexError, indices shown."""
    images = np.random.default_rng(1).random((2, 8, 6, 3)).astype(np.float32)
    fig = viz.grid_figure(
        images, relevance[:2], labels=[3, 57], predictions=[99, 3], class_names=list("abcdefghij")
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true d\npred 99", "true 57\npred d"]


def test_class_mean_figure_shows_a_readable_subset_of_many_classes():
    means = np.random.default_rng(3).normal(size=(100, 8, 8)).astype(np.float32)
    counts = np.zeros(100, int)
    counts[[5, 17, 99]] = [4, 9, 1]
    fig = viz.class_mean_figure(
        means, class_names=[f"k{i}" for i in range(100)], counts=counts, max_classes=20
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # only the classes with images: an empty class has no mean to show
    assert titles == ["k5 (n=4)", "k17 (n=9)", "k99 (n=1)"]
    assert "3 of 100 classes" in fig._suptitle.get_text()
    counts = np.arange(100) % 4  # 75 classes with images: the 20 with the most
    fig = viz.class_mean_figure(
        means, class_names=[f"k{i}" for i in range(100)], counts=counts, max_classes=20
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 20 and all(t.endswith("(n=3)") for t in titles)


def test_grid_figure_with_named_maps_side_by_side(tmp_path, relevance):
    images = np.random.default_rng(1).random((3, 8, 6, 3)).astype(np.float32)
    path = tmp_path / "pair.png"
    fig = viz.grid_figure(images, {"LRP a": relevance[:3], "LRP b": -relevance[:3]}, path=path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(fig.axes) == 2 * 6 + 1  # 2 rows of 2 x (image | a | b), and the colour bar
    assert [ax.get_title() for ax in fig.axes[:6]] == ["", "LRP a", "LRP b", "", "LRP a", "LRP b"]
    shown = [ax.images[0].get_array() for ax in fig.axes[1:3]]
    np.testing.assert_allclose(shown[0], viz.heatmap(relevance[:1])[0])
    np.testing.assert_allclose(shown[1], -viz.heatmap(relevance[:1])[0])


@pytest.mark.parametrize("figure", ["grid", "class_means"])
def test_figures_carry_a_colour_bar_that_says_what_red_and_blue_mean(figure, relevance):
    images = np.random.default_rng(1).random((2, 8, 6, 3)).astype(np.float32)
    if figure == "grid":
        fig = viz.grid_figure(images, relevance[:2], labels=[0, 1], class_names=["a", "b"])
    else:
        fig = viz.class_mean_figure(viz.channel_sum(relevance[:2]), class_names=["a", "b"])
    bars = [ax for ax in fig.axes if "red = evidence for" in ax.get_xlabel()]
    assert len(bars) == 1
    ticks = [t.get_text() for t in bars[0].get_xticklabels()]
    assert ticks == ["-1: against the class", "0", "+1: for the class"]
    # the bar sits below every map
    lowest_map = min(ax.get_position().y0 for ax in fig.axes if ax is not bars[0])
    assert bars[0].get_position().y1 < lowest_map
