"""Concept Relevance Propagation (`lrpjax.concepts`, ``lrpjax concepts``): channel relevance,
conditional heatmaps against an explicit per-layer loop, the partition of relevance over
channels, top-k against brute force, receptive fields, class statistics, and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.layer_types import LayerError
from lrpjax.layers import Flatten, ReLU

from lrpjax import concepts, data, zoo
from lrpjax.commands import main as cli
from lrpjax.runs import batches, explain, store
from lrpjax.runs import concepts as concept_run

EPS = 0.1  # LRP-epsilon's eps in the hand-written loop and the engine's composite
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyNet(nnx.Module):
    """Conv 3x3 (3->4) -> ReLU -> Conv 3x3 (4->5) -> ReLU -> Flatten -> Dense (->3), 6x6 input."""

    def __init__(self, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding="SAME", use_bias=use_bias, rngs=rngs)
        self.relu1 = ReLU()
        self.conv2 = nnx.Conv(4, 5, (3, 3), padding="SAME", use_bias=use_bias, rngs=rngs)
        self.relu2 = ReLU()
        self.flatten = Flatten()
        self.dense = nnx.Linear(6 * 6 * 5, 3, use_bias=use_bias, rngs=rngs)
        if use_bias:  # biases that matter, so that epsilon's absorption shows
            for layer in (self.conv1, self.conv2, self.dense):
                layer.bias[...] = 0.1 * jax.random.normal(rngs.params(), layer.bias[...].shape)

    def __call__(self, x):
        h = self.relu1(self.conv1(x))
        h = self.relu2(self.conv2(h))
        return self.dense(self.flatten(h))


def tiny(use_bias: bool = True, seed: int = 0) -> tuple[TinyNet, np.ndarray]:
    model = TinyNet(use_bias=use_bias, rngs=nnx.Rngs(seed))
    x = np.random.default_rng(seed).uniform(0.05, 1.0, (3, 6, 6, 3)).astype(np.float32)
    return model, x


def composite() -> dict:
    from lrpjax import composites

    return composites.epsilon(eps=EPS)


# --------------------------------------------------------------------------- the hand loop


def _stabilize(z: np.ndarray) -> np.ndarray:
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def _conv(kernel: np.ndarray, a: np.ndarray) -> np.ndarray:
    """SAME 3x3 convolution without bias, written out as a sum over the window, (N,H,W,Ci)."""
    n, h, w, _ = a.shape
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for di in range(3):
        for dj in range(3):
            out += padded[:, di : di + h, dj : dj + w, :] @ kernel[di, dj]
    return out


def _conv_transposed(kernel: np.ndarray, s: np.ndarray, shape) -> np.ndarray:
    """Send s (N,H,W,Co) back through the window: sum_k w_jk s_k for every input j."""
    n, h, w, ci = shape
    out = np.zeros((n, h + 2, w + 2, ci))
    for di in range(3):
        for dj in range(3):
            out[:, di : di + h, dj : dj + w, :] += s @ kernel[di, dj].T
    return out[:, 1:-1, 1:-1, :]


def _epsilon_conv(kernel, bias, a, R_out):
    """LRP-epsilon: R_j = a_j sum_k w_jk R_k / stabilize(z_k)."""
    z = _conv(kernel, a) + bias
    return a * _conv_transposed(kernel, R_out / _stabilize(z), a.shape)


def hand_lrp(
    model: TinyNet, x: np.ndarray, target: np.ndarray, masks: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """LRP-epsilon through TinyNet layer by layer in NumPy (float64), with the relevance at
    the output of each layer in `masks` multiplied by its mask. Returns the input relevance
    and the relevance at every layer's output (before its mask)."""
    masks = masks or {}
    k1, k2 = (np.asarray(c.kernel[...], np.float64) for c in (model.conv1, model.conv2))
    b = {
        name: np.zeros(layer.kernel[...].shape[-1])
        if layer.bias is None
        else np.asarray(layer.bias[...], np.float64)
        for name, layer in (("conv1", model.conv1), ("conv2", model.conv2), ("dense", model.dense))
    }
    wd = np.asarray(model.dense.kernel[...], np.float64)
    a0 = x.astype(np.float64)
    z1 = _conv(k1, a0) + b["conv1"]
    a1 = np.maximum(z1, 0)
    z2 = _conv(k2, a1) + b["conv2"]
    a2 = np.maximum(z2, 0)
    flat = a2.reshape(len(x), -1)
    logits = flat @ wd + b["dense"]
    R = np.zeros_like(logits)
    R[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    outputs = {"dense": R}
    R = R * masks.get("dense", 1.0)
    R = flat * ((R / _stabilize(logits)) @ wd.T)  # dense
    R = R.reshape(a2.shape)  # flatten
    outputs["relu2"] = R
    R = R * masks.get("relu2", 1.0)
    R = np.where(z2 > 0, R, 0.0)  # ReLU passes relevance where it is active
    outputs["conv2"] = R
    R = R * masks.get("conv2", 1.0)
    R = _epsilon_conv(k2, b["conv2"], a1, R)
    outputs["relu1"] = R
    R = R * masks.get("relu1", 1.0)
    R = np.where(z1 > 0, R, 0.0)
    outputs["conv1"] = R
    R = R * masks.get("conv1", 1.0)
    return _epsilon_conv(k1, b["conv1"], a0, R), outputs


def _onehot(c: int, n: int) -> np.ndarray:
    return np.eye(n)[c]


# --------------------------------------------------------------------------- layers


def test_concept_layers_find_each_layers_reader() -> None:
    model, x = tiny()
    layers = concepts.concept_layers(model, x)
    assert list(layers) == ["conv1", "relu1", "conv2", "relu2", "flatten", "dense"]
    readers = {p: info.reader for p, info in layers.items()}
    assert readers == {
        "conv1": "relu1",
        "relu1": "conv2",
        "conv2": "relu2",
        "relu2": "flatten",
        "flatten": "dense",
        "dense": None,  # the model's output
    }
    assert layers["conv2"].shape == (6, 6, 5) and layers["conv2"].positions == 36
    assert layers["flatten"].channels == 180
    assert concepts.default_layers(layers) == ["conv1", "conv2"]


def test_outputs_through_glue_or_residuals_have_no_reader() -> None:
    model = zoo.make("resnet")
    layers = concepts.concept_layers(model, zoo.example_input("resnet", 1))
    # stem -> bn is direct; bn's output goes through nnx.relu (glue) into a residual block
    assert layers["stem"].reader == "bn"
    assert layers["bn"].reader is None and layers["block0/bn2"].reader is None
    with pytest.raises(LayerError, match=r"'bn'.*cannot be read; layers that can: stem"):
        concepts.check_layers(layers, ["bn"])
    with pytest.raises(LayerError, match=r"unknown layer 'nope'.*block0/conv1"):
        concepts.check_layers(layers, ["nope"])


# --------------------------------------------------------------------------- relevance


@pytest.mark.parametrize("use_bias", [True, False])
def test_channel_relevance_equals_the_hand_loop(use_bias: bool) -> None:
    model, x = tiny(use_bias)
    target = np.array([0, 2, 1])
    layers = concepts.concept_layers(model, x, composite())
    fn, state = concepts.channel_explainer(
        model, {p: layers[p] for p in ("conv1", "conv2", "relu2")}, composite=composite(),
        activations=True, peaks=True,
    )  # fmt: skip
    out = jax.jit(fn)(state, x, jnp.asarray(target))
    _, R_out = hand_lrp(model, x, target)
    for path in ("conv1", "conv2", "relu2"):
        want = R_out[path].reshape(3, -1, R_out[path].shape[-1])
        np.testing.assert_allclose(out.relevance[path], want.sum(1), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out.peak[path], want.argmax(1))
    # activations: the explicit forward pass of the hand loop, per channel over positions
    k1, k2 = (np.asarray(c.kernel[...], np.float64) for c in (model.conv1, model.conv2))
    b1, b2 = (
        np.zeros(c.kernel[...].shape[-1]) if c.bias is None else np.asarray(c.bias[...])
        for c in (model.conv1, model.conv2)
    )
    z1 = _conv(k1, x.astype(np.float64)) + b1
    z2 = _conv(k2, np.maximum(z1, 0)) + b2
    a2 = np.maximum(z2, 0)
    for path, a in (("conv1", z1), ("conv2", z2), ("relu2", a2)):
        a = a.reshape(3, -1, a.shape[-1])
        np.testing.assert_allclose(out.activation[path], a.max(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.activation_peak[path], a.argmax(1))


@pytest.mark.parametrize(
    "conditions",
    [
        {"conv2": [3]},
        {"conv1": [1]},
        {"conv2": [0, 4], "conv1": [2]},  # two layers at once
        {"relu2": [1], "relu1": [0, 3], "conv1": [1, 3]},  # three, one of them twice masked
    ],
    ids=["conv2", "conv1", "conv2+conv1", "three-layers"],
)
def test_conditional_heatmap_equals_the_hand_loop(conditions: dict) -> None:
    model, x = tiny()
    target = np.array([1, 0, 2])
    layers = concepts.concept_layers(model, x, composite())
    (first, channels), *rest = conditions.items()
    got = concepts.conditional_heatmaps(
        model, x, first, channels, target=target, conditions=dict(rest), composite=composite()
    )
    assert got.shape == (3, len(channels), 6, 6, 3)
    for k, c in enumerate(channels):
        masks = {first: _onehot(c, layers[first].channels)}
        for path, kept in rest:
            masks[path] = np.eye(layers[path].channels)[kept].sum(0)
        want, _ = hand_lrp(model, x, target, masks)
        assert np.abs(want).max() > 1e-3  # the condition leaves something to compare
        np.testing.assert_allclose(got[:, k], want, rtol=1e-4, atol=1e-6)


def test_other_channels_get_no_relevance() -> None:
    """A sanity check of the hand loop itself: conditioning zeroes the other channels."""
    model, x = tiny()
    target = np.array([0, 1, 2])
    _, plain = hand_lrp(model, x, target)
    _, conditioned = hand_lrp(model, x, target, {"relu2": _onehot(2, 5)})
    np.testing.assert_allclose(conditioned["conv2"][..., [0, 1, 3, 4]], 0)
    np.testing.assert_allclose(conditioned["conv2"][..., 2], plain["conv2"][..., 2])


@pytest.mark.parametrize("layer", ["conv1", "relu1", "conv2", "flatten"])
def test_concepts_partition_the_relevance(layer: str) -> None:
    """Summed over all channels of a layer, the conditional heatmaps are the plain heatmap."""
    model, x = tiny()
    info = concepts.concept_layers(model, x, composite())[layer]
    target = np.array([2, 0, 1])
    every = concepts.conditional_heatmaps(
        model, x, layer, np.arange(info.channels), target=target, composite=composite()
    )
    fn, state = concepts.engine.explainer(model, composite=composite())
    plain = np.asarray(fn(state, jnp.asarray(x), jnp.asarray(target)).relevance)
    scale = np.abs(plain).max()
    np.testing.assert_allclose(np.asarray(every).sum(1), plain, atol=1e-5 * scale, rtol=0)
    assert np.abs(np.asarray(every)).max() > 0.01 * scale


def test_partition_on_the_shipped_model() -> None:
    import lrpjax

    model = lrpjax.load_pretrained()
    x, _ = data.sample()
    x = x[:2]
    fn, state = concepts.conditional_explainer(model, "bn3")
    masks = concepts.channel_masks(64, np.arange(64), 4)
    target = jnp.array([-1, 3])
    every = np.asarray(lrpjax.jit(fn)(state, x, target, masks))
    target = np.array([int(model(x[:1]).argmax()), 3])
    plain = np.asarray(lrpjax.explain(model, x, composite="epsilon", target=target))
    err = np.abs(every.sum(1) - plain).max() / np.abs(plain).max()
    assert err < 1e-4, err


def test_a_neurons_heatmap_stays_in_its_receptive_field() -> None:
    """conv2 after conv1 (3x3, SAME): a neuron at (i, j) sees the 5x5 window around it, so
    its conditional heatmap is zero outside that window and its box lies inside it."""
    model, x = tiny(use_bias=False)
    layers = concepts.concept_layers(model, x, composite())
    target = np.array([0, 1, 2])
    fn, state = concepts.channel_explainer(
        model, {"conv2": layers["conv2"]}, composite=composite(), peaks=True
    )
    out = fn(state, jnp.asarray(x), jnp.asarray(target))
    channels = np.asarray(out.relevance["conv2"]).argmax(1)  # each image's most relevant channel
    positions = np.asarray(out.peak["conv2"])[np.arange(3), channels]
    heat = concepts.reference_heatmaps(
        model, x, target, layers["conv2"], channels, positions, composite=composite()
    )
    boxes = concepts.receptive_field_box(heat, min_size=1)
    for n, p in enumerate(positions):
        i, j = divmod(int(p), 6)
        rf = (max(i - 2, 0), min(i + 3, 6), max(j - 2, 0), min(j + 3, 6))
        assert np.abs(heat[n]).max() > 0
        t, b, left, right = boxes[n]
        assert rf[0] <= t and b <= rf[1] and rf[2] <= left and right <= rf[3], (boxes[n], rf)
        outside = np.ones((6, 6), bool)
        outside[rf[0] : rf[1], rf[2] : rf[3]] = False
        assert np.abs(heat[n][outside]).max() == 0.0
        # the neuron's heatmap is the channel's conditional heatmap restricted to one position
        masks = {"conv2": np.zeros((6, 6, 5))}
        masks["conv2"][i, j, channels[n]] = 1.0
        want, _ = hand_lrp(model, x[n : n + 1], target[n : n + 1], masks)
        np.testing.assert_allclose(heat[n], want[0], rtol=1e-4, atol=1e-6)


def test_receptive_field_box_widens_small_boxes_within_the_image() -> None:
    h = np.zeros((3, 10, 10))
    h[0, 0, 0] = 1.0  # corner pixel: widened to 4x4 at the corner
    h[1, 4:6, 5] = -1.0
    boxes = concepts.receptive_field_box(h, min_size=4)
    np.testing.assert_array_equal(boxes[0], [0, 4, 0, 4])
    np.testing.assert_array_equal(boxes[1], [3, 7, 3, 7])
    np.testing.assert_array_equal(boxes[2], [0, 10, 0, 10])  # nothing: the whole image


def test_bad_channels_and_layers() -> None:
    model, x = tiny()
    with pytest.raises(ValueError, match=r"channels outside 0..3"):
        concepts.conditional_heatmaps(model, x, "conv1", [4], composite=composite())
    with pytest.raises(LayerError, match="unknown layer 'conv9'"):
        concepts.conditional_heatmaps(model, x, "conv9", [0], composite=composite())


# --------------------------------------------------------------------------- maximisation


def brute_top_k(scores: np.ndarray, k: int, where: np.ndarray | None = None) -> np.ndarray:
    """Every image scored, sorted per channel by (score desc, index asc), first k."""
    n, c = scores.shape
    result = np.full((c, k), -1)
    for ch in range(c):
        pool = [(-float(scores[i, ch]), i) for i in range(n) if where is None or where[i]]
        best = [i for _, i in sorted(pool)[:k]]
        result[ch, : len(best)] = best
    return result


@pytest.mark.parametrize("block", [1, 7, 64])
def test_top_k_equals_brute_force(block: int) -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(-3, 4, (37, 6)).astype(np.float32)  # many ties
    got = concepts.top_k(scores, 5, block=block)
    np.testing.assert_array_equal(got.index, brute_top_k(scores, 5))
    np.testing.assert_array_equal(got.score, np.take_along_axis(scores, got.index.T, 0).T)
    where = rng.random(37) < 0.2  # fewer than k images qualify for some channels
    got = concepts.top_k(scores, 9, where=where, block=block)
    np.testing.assert_array_equal(got.index, brute_top_k(scores, 9, where))
    assert np.isneginf(got.score[got.index < 0]).all()


def test_normalize_and_class_statistics() -> None:
    rng = np.random.default_rng(2)
    rel = rng.normal(size=(20, 4)).astype(np.float32)
    classes = rng.integers(0, 3, 20)
    classes[classes == 2] = 0  # class 2 has no images
    normed = concepts.normalize(rel)
    np.testing.assert_allclose(np.abs(normed).sum(1), 1, rtol=1e-5)
    stats = concepts.class_statistics(rel, classes, 3, block=3)
    for k in range(3):
        members = rel[classes == k]
        want = members.mean(0) if len(members) else np.zeros(4)
        np.testing.assert_allclose(stats.mean[k], want, rtol=1e-5, atol=1e-6)
        assert stats.count[k] == len(members)
    np.testing.assert_array_equal(stats.order[0], np.argsort(-stats.mean[0], kind="stable"))
    for f in (0.5, 0.9):
        for k in (0, 1):
            m = np.clip(np.sort(stats.mean[k])[::-1], 0, None)
            need = int(np.argmax(np.cumsum(m) / m.sum() >= f - 1e-6)) + 1
            assert stats.channels_for[f][k] == need
    # the empty class: no images, a zero mean, and no channel carries anything
    assert stats.count[2] == 0
    np.testing.assert_array_equal(stats.mean[2], 0)
    np.testing.assert_array_equal(stats.share[2], 0)
    assert stats.channels_for[0.5][2] == 0 and stats.channels_for[0.9][2] == 0


def test_channels_for_stays_within_the_channels() -> None:
    """A class with no positive mean relevance needs no channels (it used to get C + 1); a
    tiny positive total still needs at most C."""
    rel = np.array(
        [[-1.0, -2.0, -0.5], [1e-12, 0.0, -1.0], [0.6, 0.25, 0.15]], np.float32
    )  # class 0: all negative; class 1: a tiny positive part; class 2: ordinary; class 3: none
    stats = concepts.class_statistics(rel, np.array([0, 1, 2]), 4)
    for f in (0.5, 0.9):
        np.testing.assert_array_equal(stats.channels_for[f], [0, 1, 1 if f == 0.5 else 3, 0])
        assert (stats.channels_for[f] <= 3).all()


def test_normalized_top_k_streams_blocks() -> None:
    """Top-k by relevance normalised per image, read block by block, equals top-k of the
    whole normalised array, also for a subset of channels (normalised by all of them)."""
    rng = np.random.default_rng(3)
    rel = rng.normal(size=(23, 5)).astype(np.float32)
    normed = concepts.normalize(rel)
    got = concepts.top_k(concept_run._Normalized(rel), 4, block=4)
    np.testing.assert_array_equal(got.index, brute_top_k(normed, 4))
    got = concepts.top_k(concept_run._Normalized(rel, np.array([3, 1])), 2, block=5)
    np.testing.assert_array_equal(got.index, brute_top_k(normed[:, [3, 1]], 2))


# --------------------------------------------------------------------------- CLI

BASE = ["--limit", "20", "--batch-size", "8", "--no-progress", "--top-k", "3"]
LAYERS = ["--layer", "conv3", "--layer", "dense1"]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class StepSpy:
    """Counts compiled steps of `lrpjax.runs.concepts.make_step` (and can stop the run at one)."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls = 0
        real = concept_run.make_step

        def make_step(*args, **kwargs):
            step, state, devices = real(*args, **kwargs)

            def counted(*a):
                self.calls += 1
                if self.calls == interrupt_at:
                    raise KeyboardInterrupt
                return step(*a)

            return counted, state, devices

        monkeypatch.setattr(concept_run, "make_step", make_step)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("concepts") / "out"
    code, stdout, err = run_cli("concepts", *BASE, *LAYERS, "--out", out)
    assert code == 0, err
    assert "analysed 20 images" in stdout
    return out


def test_cli_writes_statistics_json_and_atlas(full_run: Path) -> None:
    out = full_run
    summary = json.loads((out / "concepts.json").read_text())
    assert list(summary["layers"]) == ["conv3", "dense1"]
    assert summary["layers"]["conv3"]["read_at_input_of"] == "relu3"
    assert (out / "atlas.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".partial-*")) and not (out / ".lock").exists()
    targets = np.load(out / "targets.npy")
    _, labels = data.sample()
    np.testing.assert_array_equal(targets, labels[:20])  # --target label by default
    for layer, c in (("conv3", 64), ("dense1", 512)):
        rel = np.load(out / layer / "relevance.npy")
        assert rel.shape == (20, c)
        top = np.load(out / layer / "top_relevance_index.npy")
        np.testing.assert_array_equal(top, brute_top_k(concepts.normalize(rel), 3))
        act = np.load(out / layer / "activation.npy")
        np.testing.assert_array_equal(
            np.load(out / layer / "top_activation_index.npy"), brute_top_k(act, 3)
        )
        mean = np.load(out / layer / "class_mean.npy")
        for k in np.unique(targets):
            np.testing.assert_allclose(mean[k], rel[targets == k].mean(0), rtol=1e-5, atol=1e-6)
        for name, cls in summary["layers"][layer]["classes"].items():
            k = summary["class_names"].index(name)
            assert cls["top_channels"][0] == int(np.argmax(mean[k]))


def test_cli_channel_relevance_matches_the_layerwise_explanation(full_run: Path) -> None:
    import lrpjax

    model = lrpjax.load_pretrained()
    x, y = data.sample()
    _, layers = lrpjax.explain(model, x[:4], composite="epsilon", target=y[:4], layerwise=True)
    rel = np.load(full_run / "conv3" / "relevance.npy")[:4]
    want = np.asarray(layers["relu3"]).sum((1, 2))
    np.testing.assert_allclose(rel, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # the position of each reference: where the channel's relevance peaks on that image
    index = np.load(full_run / "conv3" / "top_relevance_index.npy")
    position = np.load(full_run / "conv3" / "top_relevance_position.npy")
    assert (np.load(full_run / "dense1" / "top_relevance_position.npy") == 0).all()
    images = index[:6, 0]
    _, layers = lrpjax.explain(
        model, x[images], composite="epsilon", target=y[images], layerwise=True
    )
    R = np.asarray(layers["relu3"]).reshape(6, -1, 64)
    np.testing.assert_array_equal(position[:6, 0], R[np.arange(6), :, np.arange(6)].argmax(1))


def test_cli_resumes_after_an_interrupt(tmp_path: Path, monkeypatch, full_run: Path) -> None:
    out = tmp_path / "out"
    spy = StepSpy(monkeypatch, interrupt_at=2)
    code, _, err = run_cli("concepts", *BASE, *LAYERS, "--out", out)
    assert code == 130 and "rerun the same command" in err
    assert not (out / "concepts.json").exists() and list(out.glob(".partial-concepts-*"))
    spy = StepSpy(monkeypatch)
    traced = []
    real = concepts.concept_layers
    monkeypatch.setattr(concepts, "concept_layers", lambda *a: traced.append(a) or real(*a))
    # another --top-k resumes too: it only changes what is derived from the streamed arrays
    code, stdout, err = run_cli("concepts", *BASE, *LAYERS, "--top-k", "2", "--out", out)
    assert code == 0, err
    assert spy.calls == 2  # batches 2 and 3 of 3 (8, 8, 4 images)
    assert "resuming: 1 of 3 batches" in stdout
    assert len(traced) == 1  # the model's layers are found once per command
    for name in ("conv3/relevance", "dense1/activation", "targets"):
        a, b = np.load(out / f"{name}.npy"), np.load(full_run / f"{name}.npy")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    top = np.load(out / "dense1/top_relevance_index.npy")
    assert top.shape == (512, 2)
    np.testing.assert_array_equal(top, np.load(full_run / "dense1/top_relevance_index.npy")[:, :2])
    assert json.loads((out / "concepts.json").read_text())["k"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer", "conv9"], "unknown layer 'conv9'; the model's layers are conv1, relu1,"),
        (["--layer", "dense2"], "layer 'dense2': its output is not the input of exactly one"),
        (["--top-k", "0"], "--top-k must be positive"),
        (["--composite", "nope"], "unknown composite 'nope'"),
        (["--target", "10"], "--target 10 is outside the classes 0..9"),
        (["--model", "resnet9"], "unknown model 'resnet9'"),
    ],
)
def test_cli_errors(tmp_path: Path, argv: list, message: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("concepts", *BASE, *argv, "--out", out)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


def test_cli_refuses_a_locked_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with store.lock_output(out):
        code, _, err = run_cli("concepts", *BASE, "--layer", "dense1", "--out", out)
    assert code == 2 and "in use by another lrpjax run" in err
    assert sorted(os.listdir(out)) == []


# --------------------------------------------------------------------------- dataset runs


def tiny_run(out: Path, layers: list[str], n: int = 10) -> dict:
    """`concepts_dataset` on TinyNet: n images in batches of 4, k = 2."""
    model, _ = tiny()
    x = np.random.default_rng(5).uniform(0.05, 1.0, (n, 6, 6, 3)).astype(np.float32)
    return concept_run.concepts_dataset(
        model, x, np.arange(n) % 3, out, settings={"model": "tiny"}, layers=layers,
        composite=composite(), batch_size=4, k=2, progress=False,
    )  # fmt: skip


class KilledError(Exception):
    """Stands for the process being killed at that point."""


def kill_publish_at(monkeypatch, when) -> None:
    """Make `lrpjax.runs.store.publish` stop at the first file operation `when(op, path)`
    selects."""
    real = store.publish

    def guard(op, fn):
        def call(*args, **kwargs):
            if when(op, Path(args[-1] if op == "replace" else args[0])):
                raise KilledError(op)
            return fn(*args, **kwargs)

        return call

    def publish(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(os, "unlink", guard("remove", os.unlink))
            m.setattr(os, "replace", guard("replace", os.replace))
            m.setattr(shutil, "rmtree", guard("rmtree", shutil.rmtree))
            return real(*args, **kwargs)

    monkeypatch.setattr(store, "publish", publish)


def published_layers(out: Path) -> list[str] | None:
    """The layers of the result in `out` if it has a concepts.json, after checking that
    exactly their folders are there, complete; None (and a work folder to resume) if not."""
    if not (out / "concepts.json").exists():
        assert list(out.glob(f"{concept_run.WORK_PREFIX}*")), "neither a result nor work to resume"
        return None
    summary = json.loads((out / "concepts.json").read_text())
    layers = list(summary["layers"])
    folders = {d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")}
    assert folders == set(layers), (folders, layers)
    for layer in layers:
        for name in ("relevance", "activation", "top_relevance_index", "class_mean"):
            assert (out / layer / f"{name}.npy").exists(), (layer, name)
    for name in ("targets.npy", "predictions.npy", "labels.npy", "atlas.png"):
        assert (out / name).exists(), name
    return layers


def test_a_kill_while_publishing_leaves_the_old_result_or_a_resumable_run(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """KilledError at each step of moving the results into place, the folder holds either the
    previous complete result or no concepts.json and a work folder; the rerun finishes the
    same result as an undisturbed run, without the previous run's other layer folders."""
    clean = tmp_path / "clean"
    tiny_run(clean, ["conv2"])
    out = tmp_path / "out"
    tiny_run(out, ["conv1", "conv2"])  # the previous result
    assert published_layers(out) == ["conv1", "conv2"]
    capsys.readouterr()
    prefix = concept_run.WORK_PREFIX
    kills = [  # (where, what the folder then holds)
        (lambda op, p: op == "remove" and p.name == "concepts.json", ["conv1", "conv2"]),
        (lambda op, p: op == "replace" and p.name == "relevance.npy", None),
        (lambda op, p: op == "rmtree" and p.name == "conv1", None),
        (lambda op, p: op == "replace" and p.name == "concepts.json", None),
        (lambda op, p: op == "rmtree" and p.name.startswith(prefix), ["conv2"]),
    ]
    for i, (when, holds) in enumerate(kills):
        with monkeypatch.context() as m:
            kill_publish_at(m, when)
            with pytest.raises(KilledError):
                tiny_run(out, ["conv2"])
        assert published_layers(out) == holds, i
        ran = capsys.readouterr().out
        # after the first kill every rerun resumed: no batch computed again
        assert i == 0 or "resuming: 3 of 3 batches" in ran, (i, ran)
    tiny_run(out, ["conv2"])
    assert published_layers(out) == ["conv2"]
    assert not list(out.glob(f"{prefix}*")) and not (out / "conv1").exists()
    for name in ("conv2/relevance", "conv2/top_relevance_index", "conv2/class_mean", "labels"):
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), np.load(clean / f"{name}.npy"))


def test_concepts_leaves_other_commands_work_folders_alone(tmp_path: Path) -> None:
    """Only `.partial-concepts-*` folders of other settings are cleaned up: the resumable
    work of `lrpjax explain` (`.partial-explain-*`) in the same folder stays."""
    out = tmp_path / "out"
    explain_work = out / ".partial-explain-0123456789ab"
    explain_work.mkdir(parents=True)
    (explain_work / "manifest.json").write_text("{}")
    (out / f"{concept_run.WORK_PREFIX}0123456789ab").mkdir()
    tiny_run(out, ["conv2"], n=4)
    assert (explain_work / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in out.glob(".partial-*")) == [explain_work.name]


def test_explain_and_concepts_runs_share_one_machinery(tmp_path: Path, monkeypatch) -> None:
    """Both dataset runs stream through the one chunk loop (`lrpjax.runs.batches.stream`)
    and move their result into place through the one publish step
    (`lrpjax.runs.store.publish`), each with its own work folders and summary."""
    calls = []
    real_stream, real_publish = batches.stream, store.publish

    def stream(*args, **kwargs):
        manifest = args[6]
        calls.append(("stream", manifest.path.parent.name.rsplit("-", 1)[0]))
        return real_stream(*args, **kwargs)

    def publish(final, out, names, summary, **kwargs):
        calls.append(("publish", summary))
        return real_publish(final, out, names, summary, **kwargs)

    monkeypatch.setattr(batches, "stream", stream)
    monkeypatch.setattr(store, "publish", publish)
    model, _ = tiny()
    x = np.random.default_rng(5).uniform(0.05, 1.0, (4, 6, 6, 3)).astype(np.float32)
    explain.explain_dataset(
        model, x, np.arange(4) % 3, tmp_path / "explain", settings={"model": "tiny"},
        composite=composite(), batch_size=4, progress=False, figures=2,
    )  # fmt: skip
    tiny_run(tmp_path / "concepts", ["conv2"], n=4)
    assert calls == [
        ("stream", ".partial-explain"),
        ("publish", "summary.json"),
        ("stream", ".partial-concepts"),
        ("publish", "concepts.json"),
    ]
    assert (tmp_path / "explain" / "summary.json").is_file()
    assert (tmp_path / "concepts" / "concepts.json").is_file()


def test_the_crp_library_imports_no_dataset_run() -> None:
    """`lrpjax.concepts` (the library) sits below `lrpjax.runs`: it imports none of it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(concepts))
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m.startswith("lrpjax.runs")], imported
