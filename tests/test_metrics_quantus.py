"""Every metric of `lrpjax.metrics` against Quantus 0.6.0 (Hedström et al. 2023) on the same
model, inputs and maps (issue #26).

Needs PyTorch and Quantus (``pip install "lrpjax[quantus]"``); skipped without them. The model
is the shipped miniVGG and its PyTorch twin (`lrpjax.peers.torch_model`, the same weights),
both in float64 so that float32 rounding, which single-pixel output changes amplify, hides no
difference of definition; the inputs are shipped CIFAR-10 images and the maps their LRP-epsilon
explanations. Quantus gets NCHW arrays. Deterministic metrics agree to ``RTOL``; the random ones
are given the same draws (Quantus's ``perturb_func`` or, where it draws inside the metric, its
``np.random`` calls replaced by ours); where a module docstring states that lrpjax differs
from Quantus, the test asserts that documented difference.

How both are made to compute one definition (each test says which applies):

- **Pixels, not entries.** lrpjax scores the channel-summed relevance of a pixel and removes
  all of a pixel's channels together; Quantus ranks and removes single entries of the map
  broadcast to every channel. Quantus gets the channel-summed map (N, 1, H, W), so the three
  entries of a pixel tie and sort next to each other, and ``features_in_step = 3 s`` removes the
  s pixels that lrpjax's ``features_in_step = s`` does (the maps have no ties between pixels,
  which the fixture checks). Quantus asserts that ``features_in_step`` divides H x W, not
  C x H x W; those metrics get the image as one 3H x W channel (`stacked`: the same entries in
  the same NCHW order) and the model reshapes it back (`Unstack`).
- **Normalisation.** Quantus's ``normalise=True`` divides the whole batch by its largest
  absolute value (`quantus.normalise_by_max` over all axes, batch included), lrpjax (where it
  normalises) each map by its own: a positive scale changes no score of the localisation and
  ranking metrics, and elsewhere Quantus gets ``normalise=False`` or ``batch_size=1``.
- Quantus 0.6.0 integrates with ``np.trapz``, which NumPy 2.4 removed; `np.trapezoid` (the same
  function) stands in for it here.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import data, metrics
from lrpjax.analysis.metrics.scoring import logits
from lrpjax.core.layers import Flatten, ReLU
from lrpjax.peers import pytorch as peers_torch

torch = pytest.importorskip("torch")
quantus = pytest.importorskip("quantus")
skimage_metrics = pytest.importorskip("skimage.metrics")  # a dependency of Quantus

# Quantus warns where a perturbation leaves an input as it was (its monotonicity does so)
pytestmark = pytest.mark.filterwarnings("ignore:The settings for perturbing input:UserWarning")

N, C, H, W = 8, 3, 32, 32
HW = H * W
RTOL = 1e-5


# --- the same model, inputs and maps in both ------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _numpy_trapz():
    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(np, "trapz"):
            mp.setattr(np, "trapz", np.trapezoid, raising=False)
        yield


@pytest.fixture(autouse=True)
def _float64():
    """float64 in both (Quantus's ``torch.Tensor(x)`` makes the default dtype) and one torch
    thread (the JAX side runs beside it)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        with jax.enable_x64(True):
            yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def torch_twin(model):
    """`lrpjax.peers.torch_model` in float64 (it needs PyTorch only; its import guard, made
    for the Zennit comparison, asks for Zennit too)."""
    with mock.patch.object(peers_torch, "require_zennit", lambda: (torch, None)):
        return peers_torch.torch_model(model, "float64")


def nchw(v):
    return np.ascontiguousarray(np.moveaxis(np.asarray(v), -1, 1))


def nhwc(v):
    return np.ascontiguousarray(np.moveaxis(np.asarray(v), 1, -1))


class Unstack(torch.nn.Module):
    """The model of (N, 1, C H, W) images, the channels stacked along the height (`stacked`)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.eval()

    def forward(self, v):
        return self.net(v.reshape(len(v), C, H, W))


@pytest.fixture(scope="module")
def case():
    with jax.enable_x64(True):
        model = lrpjax.models.cast(lrpjax.load_pretrained(), "float64")
        x = data.sample()[0][::12][:N].astype(np.float64)
        target = logits(model, x).argmax(-1).astype(np.int32)
        explain = metrics.explain_fn(model, "lrp:epsilon")
        maps = explain(x, target)
    a = maps.sum(-1)  # (N, H, W) channel-summed relevance per pixel
    for row in a.reshape(N, -1):  # no ties: every ranking is the same in both
        assert np.unique(row).size == HW and np.unique(np.abs(row)).size == HW
    return SimpleNamespace(
        model=model, net=torch_twin(model), x=x, target=target, maps=maps, a=a, explain=explain
    )


def stacked(case):
    """Quantus's view for the metrics with ``features_in_step``: the images as (N, 1, C H, W)
    and the channel-summed map broadcast to every channel, in the same layout."""
    xs = nchw(case.x).reshape(N, 1, C * H, W)
    a = np.broadcast_to(case.a[:, None], (N, C, H, W)).reshape(N, 1, C * H, W)
    return xs, np.ascontiguousarray(a), Unstack(case.net)


def run(metric, net, x, y, a, **kwargs) -> np.ndarray:
    out = metric(
        model=net, x_batch=x, y_batch=y, a_batch=a, channel_first=True, device="cpu", **kwargs
    )
    return np.asarray(out, np.float64)


def close(ours, theirs, rtol: float = RTOL) -> float:
    """Assert agreement to `rtol` (relative); return the largest relative difference."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-300)
    diff = np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-300)
    print(f"max rel diff {float(np.nanmax(diff, initial=0.0)):.1e}")
    return float(np.nanmax(diff, initial=0.0))


# --- complexity: the maps alone --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sparseness", "Sparseness"),
        ("complexity", "Complexity"),
        ("effective_complexity", "EffectiveComplexity"),
    ],
)
def test_complexity(case, name, cls):
    """Quantus's ``abs=True`` of the channel-summed map is lrpjax's :math:`|\\sum_c R_c|`;
    ``normalise=False``, since the Gini index's 1e-7 shift and the threshold of effective
    complexity are not scale-free (lrpjax does not normalise)."""
    eps = {"eps": 1e-3 * float(np.abs(case.a).max())} if name == "effective_complexity" else {}
    metric = getattr(quantus, cls)(abs=True, normalise=False, disable_warnings=True, **eps)
    theirs = run(metric, None, nchw(case.x), case.target, case.a[:, None].copy())
    ours = metrics.get(name)(case.model, case.x, case.maps, case.target, **eps)
    close(ours, theirs)


# --- localisation: the maps and masks ---------------------------------------------------------


@pytest.fixture(scope="module")
def masks(case):
    """Random rectangles; on every other image one around the map's maximum (a hit)."""
    rng = np.random.default_rng(0)
    s = np.zeros((N, H, W), bool)
    for i in range(N):
        h, w = rng.integers(4, 17, 2)
        if i % 2:
            r, c = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        else:
            pr, pc = np.unravel_index(case.a[i].argmax(), (H, W))
            r, c = min(max(pr - h // 2, 0), H - h), min(max(pc - w // 2, 0), W - w)
        s[i, r : r + h, c : c + w] = True
    return s


def localise(case, masks, cls, **kwargs):
    metric = getattr(quantus, cls)(disable_warnings=True, **kwargs)
    return run(
        metric,
        None,
        nchw(case.x),
        case.target,
        case.a[:, None].copy(),
        s_batch=masks[:, None].copy(),
    )


@pytest.mark.parametrize(
    ("name", "cls", "theirs_kw", "ours_kw"),
    [
        ("pointing_game", "PointingGame", {"abs": False}, {}),
        ("relevance_mass_accuracy", "RelevanceMassAccuracy", {"abs": False}, {}),
        ("relevance_mass_accuracy", "RelevanceMassAccuracy", {"abs": True}, {"absolute": True}),
        ("relevance_rank_accuracy", "RelevanceRankAccuracy", {"abs": False}, {}),
        ("top_k_intersection", "TopKIntersection", {"abs": False, "k": 20}, {"k": 20}),
        (
            "top_k_intersection",
            "TopKIntersection",
            {"abs": False, "k": 50, "concept_influence": True},
            {"k": 50, "concept_influence": True},
        ),
        (
            "attribution_localisation",
            "AttributionLocalisation",
            {"abs": False, "positive_attributions": True},
            {},
        ),
        ("attribution_localisation", "AttributionLocalisation", {"abs": True}, {"absolute": True}),
        ("auc", "AUC", {"abs": False}, {}),
        ("auc", "AUC", {"abs": True}, {"absolute": True}),
    ],
)
def test_localisation(case, masks, name, cls, theirs_kw, ours_kw):
    """Quantus's default ``normalise=True`` (a positive scale of the batch) is kept: it changes
    none of these scores."""
    theirs = localise(case, masks, cls, **theirs_kw)
    ours = metrics.get(name)(case.model, case.x, case.maps, case.target, masks=masks, **ours_kw)
    close(ours, theirs)
    if name == "pointing_game":
        assert 0 < ours.sum() < N  # hits and misses


@pytest.mark.filterwarnings("ignore")  # Quantus and scikit-learn warn of the empty mask
def test_empty_mask(case, masks):
    """Documented: an empty mask scores NaN in both, but a hit in Quantus's pointing game
    (it writes the NaN into a boolean array)."""
    s = masks.copy()
    s[0] = False
    for name, cls, kw in [
        ("pointing_game", "PointingGame", {}),
        ("relevance_mass_accuracy", "RelevanceMassAccuracy", {}),
        ("relevance_rank_accuracy", "RelevanceRankAccuracy", {}),
        ("top_k_intersection", "TopKIntersection", {"k": 20}),
        ("attribution_localisation", "AttributionLocalisation", {"positive_attributions": True}),
        ("auc", "AUC", {}),
    ]:
        theirs = localise(case, s, cls, abs=False, **kw)
        kw = {"k": kw["k"]} if "k" in kw else {}
        ours = metrics.get(name)(case.model, case.x, case.maps, case.target, masks=s, **kw)
        assert np.isnan(ours[0]) and not np.isnan(ours[1:]).any()
        assert theirs[0] == 1 if name == "pointing_game" else np.isnan(theirs[0])


def test_weighted_pointing_game_differs(case, masks):
    """Documented: Quantus 0.6.0's weighted pointing game writes the (k, 1) weights of its k
    hits into its 1-D boolean hits, which NumPy refuses (a TypeError); lrpjax's weighted hit
    is the weight 1 - |s| / n."""
    hits = localise(case, masks, "PointingGame")
    with pytest.raises(TypeError, match="boolean array indexing assignment"):
        localise(case, masks, "PointingGame", weighted=True)
    ours = metrics.pointing_game(
        case.model, case.x, case.maps, case.target, masks=masks, weighted=True
    )
    close(ours, hits * (1 - masks.reshape(N, -1).mean(-1)))


def test_weighted_attribution_localisation_differs(case, masks):
    """Documented: Quantus weighs by |s| / size(x_batch[2:]) (the batch less two images),
    lrpjax by n / |s|."""
    kw = {"abs": False, "positive_attributions": True}
    theirs = localise(case, masks, "AttributionLocalisation", weighted=True, **kw)
    plain = localise(case, masks, "AttributionLocalisation", **kw)
    size = masks.reshape(N, -1).sum(-1)
    close(theirs, plain * size / ((N - 2) * C * H * W))
    ours = metrics.attribution_localisation(
        case.model, case.x, case.maps, case.target, masks=masks, weighted=True
    )
    close(ours, plain * HW / size)


# --- axiomatic ----------------------------------------------------------------------------------


def test_completeness(case):
    """Quantus returns ``sum(R) == f(x) - f(baseline)``, an exact float equality (documented):
    its output change, caught through ``output_func``, gives the gap lrpjax scores."""
    changes = []
    metric = quantus.Completeness(
        abs=False,
        normalise=False,
        perturb_baseline="black",
        disable_warnings=True,
        output_func=lambda d: changes.append(np.asarray(d)) or d,
    )
    theirs = run(metric, case.net, nchw(case.x), case.target, nchw(case.maps))
    gap = np.abs(case.maps.reshape(N, -1).sum(-1) - changes[0])
    ours = metrics.completeness(case.model, case.x, case.maps, case.target, baseline="black")
    close(ours, gap)
    assert not theirs.any() and gap.min() > 1e-6


class Tiny(nnx.Module):
    """A small convolutional model of 8 x 8 images whose first layer does not pad."""

    LAYERS = ("conv", "relu", "flatten", "dense")

    def __init__(self, channels: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(channels, 4, (3, 3), padding="VALID", rngs=rngs)
        self.relu = ReLU()
        self.flatten = Flatten()
        self.dense = nnx.Linear(4 * 6 * 6, 10, rngs=rngs)
        self.conv.bias[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (4,), jnp.float32)

    def __call__(self, x):
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        return x


def test_non_sensitivity():
    """A one-channel model, where Quantus's entries are lrpjax's pixels (with C channels
    Quantus replaces single entries in index order, not pixels; documented): its left two
    columns feed only zero weights, so they do not move the logit. Quantus normalises by the
    batch's maximum, lrpjax by each map's: the maps have the same maximum. ``softmax=False``:
    lrpjax scores logits."""
    model = lrpjax.models.cast(Tiny(1), "float64")
    kernel = np.array(model.dense.kernel[...]).reshape(6, 6, 4, 10)
    kernel[:, :2] = 0  # conv outputs of columns 0, 1: the only ones pixels of columns 0, 1 feed
    model.dense.kernel[...] = jnp.asarray(kernel.reshape(-1, 10))
    rng = np.random.default_rng(1)
    x = rng.random((6, 8, 8, 1))
    target = logits(model, x).argmax(-1)
    maps = rng.normal(size=x.shape)
    maps[:, :, 0] = 0  # insensitive and without relevance: no violation
    maps[:, 3, 5] = 0  # sensitive without relevance: a violation (column 1: the others)
    maps /= np.abs(maps).max(axis=(1, 2, 3), keepdims=True)  # the batch's maximum is each map's
    metric = quantus.NonSensitivity(
        eps=1e-5,
        features_in_step=1,
        abs=True,
        normalise=True,
        perturb_baseline="black",
        disable_warnings=True,
    )
    theirs = run(metric, torch_twin(model), nchw(x), target, nchw(maps), softmax=False)
    ours = metrics.non_sensitivity(model, x, maps, target, eps=1e-5, baseline="black")
    np.testing.assert_array_equal(ours, theirs)
    assert ours.min() >= 8  # column 1 (and pixel (3, 5))


@pytest.mark.parametrize("spec", ["gradient", "lrp:epsilon"])
def test_input_invariance(spec):
    """Quantus's shifted model (``add_mean_shift_to_first_layer``) has the first-layer bias of
    `shift_first_layer`; its ``isclose(R, R', atol=1e-4)`` agrees with lrpjax's score: the
    gradient is invariant, LRP-epsilon is not. Quantus's explain_func explains the torch
    model it is given: its twin here, with that model's first-layer bias."""
    model = lrpjax.models.cast(Tiny(3), "float64")
    x = np.random.default_rng(2).random((4, 8, 8, 3))
    target = logits(model, x).argmax(-1)
    explain = metrics.explain_fn(model, spec)
    maps = explain(x, target)
    seen = []

    def explain_torch(model, inputs, targets, **kwargs):
        twin = nnx.merge(*nnx.split(shifted), copy=True)
        twin.conv.bias[...] = jnp.asarray(model.conv.bias.detach().numpy())
        seen.append(np.asarray(twin.conv.bias[...]))
        return nchw(explain(nhwc(inputs), np.asarray(targets), model=twin))

    shifted = metrics.shift_first_layer(model, x, -1.0)
    metric = quantus.InputInvariance(input_shift=-1, disable_warnings=True)
    theirs = run(metric, torch_twin(model), nchw(x), target, nchw(maps), explain_func=explain_torch)
    np.testing.assert_allclose(seen[0], np.asarray(shifted.conv.bias[...]), rtol=1e-12)
    ours = metrics.input_invariance(model, x, maps, target, explain=explain, shift=-1.0)
    if spec == "gradient":
        assert theirs.all() and ours.max() < 1e-12
    else:
        assert not theirs.any() and ours.min() > 1e-3


def test_input_invariance_padded_first_layer_differs(case):
    """Documented: Quantus's ``add_mean_shift_to_first_layer`` sets each channel's bias to
    2 b - (its smallest response to the constant shift): for a zero-padding first layer (the
    miniVGG's 3 x 3 SAME convolution) a border response, so that even the interior is not
    compensated; `shift_first_layer` gives b - m sum(W)."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    shifted = PyTorchModel(case.net, channel_first=True).add_mean_shift_to_first_layer(
        -1, (1, C, H, W)
    )
    theirs = shifted.conv1.bias.detach().numpy()
    ours = np.asarray(metrics.shift_first_layer(case.model, case.x, -1.0).conv1.bias[...])
    b = case.net.conv1.bias.detach().numpy()
    with torch.no_grad():
        response = case.net.conv1(torch.full((1, C, H, W), -1.0))[0].numpy()
    close(ours, b + case.net.conv1.weight.detach().numpy().sum((1, 2, 3)))
    close(theirs, 2 * b - response.min((1, 2)))
    assert np.abs(theirs - ours).min() > 1e-3  # every channel
    print(f"conv1 channel 21: lrpjax {ours[21]:.3f}, Quantus {theirs[21]:.3f}")


# --- faithfulness ----------------------------------------------------------------------------


def test_pixel_flipping(case):
    """Curves and their trapezoidal AUC; 32 pixels per step (96 entries for Quantus)."""
    xs, a, net = stacked(case)
    metric = quantus.PixelFlipping(
        features_in_step=3 * 32, perturb_baseline="black", disable_warnings=True
    )
    theirs = run(metric, net, xs, case.target, a)
    kw = {"features_in_step": 32, "fill": "black", "score": "probability"}
    curves = metrics.pixel_flipping_curves(case.model, case.x, case.maps, case.target, **kw)
    close(curves, theirs)
    ours = metrics.pixel_flipping(case.model, case.x, case.maps, case.target, **kw)
    close(ours, quantus.helpers.utils.calculate_auc(theirs, batched=True))


def test_selectivity(case):
    metric = quantus.Selectivity(patch_size=8, perturb_baseline="black", disable_warnings=True)
    theirs = run(metric, case.net, nchw(case.x), case.target, case.a[:, None].copy())
    kw = {"patch_size": 8, "fill": "black", "score": "probability"}
    close(metrics.selectivity_curves(case.model, case.x, case.maps, case.target, **kw), theirs)
    ours = metrics.selectivity(case.model, case.x, case.maps, case.target, **kw)
    close(ours, quantus.helpers.utils.calculate_auc(theirs, batched=True))


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation(case, order):
    """Quantus's curve is f(x) - f(x^(k)), k = 1..L; lrpjax's AOPC its sum over L + 1.
    Quantus's baseline 0.0 is lrpjax's ``"zero"`` replacement."""
    metric = quantus.RegionPerturbation(
        patch_size=8,
        order=order,
        regions_evaluation=16,
        perturb_baseline=0.0,
        disable_warnings=True,
    )
    theirs = run(metric, case.net, nchw(case.x), case.target, case.a[:, None].copy())
    kw = {"region": 8, "replacement": "zero", "score": "probability", "progress": False}
    curves = metrics.region_perturbation(
        case.model, case.x, case.maps, case.target, order=order, **kw
    )
    close(curves[:, :1] - curves[:, 1:], theirs)
    ours = metrics.get(f"region_perturbation_{order}")(
        case.model, case.x, case.maps, case.target, **kw
    )
    close(ours, theirs.sum(-1) / (theirs.shape[1] + 1))


def test_faithfulness_estimate(case):
    xs, a, net = stacked(case)
    metric = quantus.FaithfulnessEstimate(
        features_in_step=3 * 16, perturb_baseline="black", disable_warnings=True
    )
    theirs = run(metric, net, xs, case.target, a)
    ours = metrics.faithfulness_estimate(
        case.model, case.x, case.maps, case.target, features_in_step=16, fill="black"
    )
    close(ours, theirs)


def test_faithfulness_correlation_same_subsets(case, monkeypatch):
    """Quantus draws each subset with ``np.random.choice`` (run by run, image by image); it is
    handed lrpjax's subsets (documented: ``permutation(fold_in(key, i * runs + r))[:size]``),
    as the entries of all channels of their pixels."""
    runs, size, key = 16, 64, jax.random.key(7)
    pixels = np.asarray(
        [
            [
                jax.random.permutation(jax.random.fold_in(key, i * runs + r), HW)[:size]
                for r in range(runs)
            ]
            for i in range(N)
        ]
    )
    calls = itertools.count()

    def choice(n, k, replace=True):
        r, i = divmod(next(calls), N)
        assert (n, k, replace) == (C * HW, C * size, False)
        return np.concatenate([pixels[i, r] + c * HW for c in range(C)])

    monkeypatch.setattr(np.random, "choice", choice)
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=runs,
        subset_size=C * size,
        perturb_baseline="black",
        return_aggregate=False,
        disable_warnings=True,
    )
    theirs = run(metric, case.net, nchw(case.x), case.target, case.a[:, None].copy())
    monkeypatch.undo()
    assert next(calls) == runs * N
    ours = metrics.faithfulness_correlation(
        case.model,
        case.x,
        case.maps,
        case.target,
        key=key,
        runs=runs,
        subset_size=size,
        fill="black",
    )
    close(ours, theirs)


def test_monotonicity(case):
    """Documented: Quantus 0.6.0 "restores" pixels with the baseline again, so that every map
    is monotonic; given a ``perturb_func`` that restores the image's entries (Arya et al.),
    it scores what lrpjax does."""
    xs, a, net = stacked(case)
    kw = {"features_in_step": 3 * 32, "perturb_baseline": "black", "disable_warnings": True}
    stock = run(quantus.Monotonicity(**kw), net, xs, case.target, a)
    assert stock.all()
    image = xs.reshape(N, -1)

    def restore(arr, indices, **kwargs):
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = image[rows, indices]
        return out

    theirs = run(quantus.Monotonicity(perturb_func=restore, **kw), net, xs, case.target, a)
    ours = metrics.monotonicity(case.model, case.x, case.maps, case.target, features_in_step=32)
    np.testing.assert_array_equal(ours, theirs)
    print(f"lrpjax monotonic: {ours.tolist()}")


def test_monotonicity_correlation_deterministic_fill(case):
    """With the ``"black"`` fill all of Quantus's draws are equal (``nr_samples=1``), and
    lrpjax evaluates once."""
    xs, a, net = stacked(case)
    metric = quantus.MonotonicityCorrelation(
        nr_samples=1, features_in_step=3 * 64, perturb_baseline="black", disable_warnings=True
    )
    theirs = run(metric, net, xs, case.target, a)
    ours = metrics.monotonicity_correlation(
        case.model, case.x, case.maps, case.target, features_in_step=64, fill="black"
    )
    close(ours, theirs)


def test_monotonicity_correlation_same_noise(case):
    """Quantus's ``"uniform"`` fill is one number per image and draw (documented); given a
    ``perturb_func`` with lrpjax's draws (noise per entry; documented: draw s of group k of
    image i from ``fold_in(key, (i K + k) samples + s)``), it scores what lrpjax does."""
    xs, a, net = stacked(case)
    samples, step, key = 3, 64, jax.random.key(11)
    groups = HW // step
    calls = itertools.count()

    def noise(arr, indices, **kwargs):
        k, s = divmod(next(calls), samples)
        out = arr.copy()
        for i in range(N):
            u = jax.random.uniform(
                jax.random.fold_in(key, (i * groups + k) * samples + s), (H, W, C), jnp.float64
            )
            out[i, indices[i]] = nchw(np.asarray(u)[None]).reshape(-1)[indices[i]]
        return out

    metric = quantus.MonotonicityCorrelation(
        nr_samples=samples, features_in_step=3 * step, perturb_func=noise, disable_warnings=True
    )
    theirs = run(metric, net, xs, case.target, a)
    assert next(calls) == groups * samples
    ours = metrics.monotonicity_correlation(
        case.model, case.x, case.maps, case.target, features_in_step=step, samples=samples, key=key
    )
    close(ours, theirs)


def test_noisy_linear_imputation(case):
    """lrpjax's conjugate gradients solve Quantus's sparse system (``spsolve``)."""
    mask = np.zeros(HW, bool)
    mask[np.argsort(-case.a[0].ravel())[:200]] = True
    pixels = np.flatnonzero(mask)
    from quantus.functions.perturb_func import noisy_linear_imputation

    theirs = noisy_linear_imputation(nchw(case.x[:1])[0], pixels, noise=0.0)
    ours = metrics.noisy_linear_imputation(case.x[0], mask.reshape(H, W), noise=0.0, tol=1e-12)
    close(nchw(ours[None])[0], theirs, rtol=1e-8)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road(case, order):
    """Documented: Quantus 0.6.0's ROAD fails on RGB images (it indexes the H W pixels with
    the ranks of the C H W entries). Given a ``perturb_func`` that hands its own imputation
    the pixels of those entries, it scores what lrpjax does, with 3 p % of the entries for
    p % of the pixels; Quantus averages over the images (documented), and scores MoRF only:
    LeRF is its MoRF of the negated map. Both without noise."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    sign = 1 if order == "morf" else -1
    a = sign * case.a[:, None]
    with pytest.raises(IndexError):
        run(
            quantus.ROAD(percentages=[25], noise=0.0, disable_warnings=True),
            case.net,
            nchw(case.x),
            case.target,
            a.copy(),
        )

    def impute(arr, indices, noise, **kwargs):
        return noisy_linear_imputation(arr, np.unique(np.asarray(indices) % HW), noise=noise)

    ours_p = [6.25, 12.5, 25.0]  # 64, 128, 256 pixels; 3 p % of the entries are theirs
    metric = quantus.ROAD(
        percentages=[3 * p for p in ours_p], noise=0.0, perturb_func=impute, disable_warnings=True
    )
    theirs = metric(
        model=case.net,
        x_batch=nchw(case.x),
        y_batch=case.target,
        a_batch=a.copy(),
        channel_first=True,
        device="cpu",
    )
    curves = metrics.road_curves(
        case.model, case.x, case.maps, case.target, order=order, percentages=ours_p, noise=0.0
    )
    np.testing.assert_array_equal(curves.mean(0), list(theirs.values()))
    print(f"ROAD {order} accuracies: {curves.mean(0).tolist()}")


def test_irof(case):
    """Documented: Quantus 0.6.0's IROF fails on RGB images (its (N, 1, H, W) segment mask
    fails the shape check of its own ``baseline_replacement_by_mask``); given that function
    with the mask broadcast to the channels, and a constant fill (Quantus's ``"mean"`` is the
    batch's, documented), ``batch_size=1`` agrees. With the batch, Quantus pads shorter curves
    with zeros (documented): it scores c_L / 2 less for each image with fewer segments than
    the batch's most, c_L the score of the image with every segment removed, over f(x)."""
    from quantus.functions.perturb_func import baseline_replacement_by_mask

    def by_mask(arr, mask, **kwargs):
        return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)

    x, t, maps = case.x[:4], case.target[:4], case.maps[:4]
    a = maps.sum(-1)[:, None].copy()
    kw = {"perturb_baseline": 0.5, "return_aggregate": False, "disable_warnings": True}
    with pytest.raises(AssertionError, match="same as the mask shape"):
        run(quantus.IROF(**kw), case.net, nchw(x), t, a)
    kw["perturb_func"] = by_mask
    single = run(quantus.IROF(**kw), case.net, nchw(x), t, a, batch_size=1)
    ours = metrics.irof(case.model, x, maps, t, fill=0.5)
    close(ours, single)
    batch = run(quantus.IROF(**kw), case.net, nchw(x), t, a, batch_size=4)
    from skimage.segmentation import slic

    counts = np.asarray([np.unique(slic(img, start_label=0)).size for img in x])
    assert counts.min() < counts.max()
    p = np.asarray(jax.nn.softmax(logits(case.model, np.concatenate([x, np.full_like(x, 0.5)]))))
    p = p[np.arange(8), np.r_[t, t]]
    last = p[4:] / p[:4]  # every segment removed: the grey image
    close(batch, ours - np.where(counts < counts.max(), last / 2, 0))


def test_sensitivity_n_differs(case):
    """Documented: Quantus 0.6.0's ``SensitivityN`` removes the top pixels cumulatively and
    returns, for each step n, the Pearson correlation over the images of the batch between
    the output change after n steps and the relevance of step n alone (not one score per
    image: lrpjax's correlates random subsets per image and size)."""
    xs, a, net = stacked(case)
    step = 32
    metric = quantus.SensitivityN(
        features_in_step=3 * step,
        perturb_baseline="black",
        return_aggregate=False,
        disable_warnings=True,
    )
    theirs = run(metric, net, xs, case.target, a)
    curves = metrics.pixel_flipping_curves(
        case.model, case.x, case.maps, case.target, features_in_step=step, fill="black"
    )
    p0 = np.asarray(jax.nn.softmax(logits(case.model, case.x), -1))[np.arange(N), case.target]
    ranked = -np.sort(-case.a.reshape(N, -1), axis=1)
    groups = ranked.reshape(N, -1, step).sum(-1)
    expected = metrics.faithfulness.pearson((p0[:, None] - curves).T, groups.T)
    assert theirs.shape == (int(0.8 * C * HW // (3 * step)),)
    close(theirs, expected[: len(theirs)])
    ours = metrics.sensitivity_n_curves(
        case.model, case.x, case.maps, case.target, runs=4, sizes=[step, 2 * step], fill="black"
    )
    assert ours.shape == (N, 2)


def test_infidelity_differs(case):
    """Documented: Quantus 0.6.0's ``Infidelity`` is deterministic: it replaces square
    patches by the baseline, cumulatively in raster order, and scores the mean squared gap
    between the output change and :math:`\\sum R (x - x')`, the same each of its
    ``n_perturb_samples`` times; lrpjax's draws Gaussian perturbations (Yeh et al.)."""
    metric = quantus.Infidelity(
        perturb_patch_sizes=[8], n_perturb_samples=2, perturb_baseline=0.0, disable_warnings=True
    )
    theirs = run(metric, case.net, nchw(case.x), case.target, nchw(case.maps))
    raster = -np.repeat(np.repeat(np.arange(16).reshape(4, 4), 8, 0), 8, 1)
    curves = metrics.region_perturbation(
        case.model,
        case.x,
        np.broadcast_to(raster, (N, H, W)),
        case.target,
        region=8,
        replacement="zero",
        score="logit",
        progress=False,
    )
    dots = metrics.region_relevance(case.maps * case.x, 8)
    drops = curves[:, :1] - curves[:, 1:]
    close(theirs, ((drops - np.cumsum(dots, 1)) ** 2).mean(-1))
    ours = [
        metrics.infidelity(
            case.model, case.x, case.maps, case.target, samples=4, key=jax.random.key(k)
        )
        for k in (0, 1)
    ]
    assert not np.allclose(ours[0], ours[1])  # random, unlike Quantus's


# --- robustness: Quantus's perturb_func replays lrpjax's perturbed inputs ---------------------


def replay(xs: np.ndarray, batch: int = N):
    """A Quantus ``perturb_func`` returning lrpjax's perturbed inputs (N, S, H, W, C), batch
    by batch, sample by sample, as Quantus asks for them."""
    calls = itertools.count()

    def perturb(arr, indices, **kwargs):
        b, s = divmod(next(calls), xs.shape[1])
        return nchw(xs[b * batch : b * batch + len(arr), s]).reshape(len(arr), -1)

    return perturb


def quantus_explain(explain):
    def fn(model, inputs, targets, **kwargs):
        return nchw(explain(nhwc(inputs), np.asarray(targets)))

    return fn


SAMPLES = 6


@pytest.mark.parametrize(
    ("name", "cls", "noise", "low", "high", "theirs_kw", "ours_kw"),
    [
        ("max_sensitivity", "MaxSensitivity", "uniform", -0.2, 0.2, {}, {}),
        ("avg_sensitivity", "AvgSensitivity", "uniform", -0.2, 0.2, {}, {}),
        (
            "local_lipschitz_estimate",
            "LocalLipschitzEstimate",
            "gaussian",
            0.0,
            0.1,
            {"normalise": False},
            {},
        ),
        (
            "local_lipschitz_estimate",
            "LocalLipschitzEstimate",
            "gaussian",
            0.0,
            0.1,
            {"normalise": True, "batch_size": 1},
            {"normalise": True},
        ),
        (
            "relative_input_stability",
            "RelativeInputStability",
            "uniform",
            0.02,
            0.2,
            {"return_nan_when_prediction_changes": False},
            {"exclude_changed": False},
        ),
        (
            "relative_output_stability",
            "RelativeOutputStability",
            "uniform",
            0.02,
            0.2,
            {"return_nan_when_prediction_changes": False},
            {"exclude_changed": False},
        ),
    ],
)
def test_robustness_same_draws(case, name, cls, noise, low, high, theirs_kw, ours_kw):
    """Quantus's normalisation divides by the batch's maximum, lrpjax's by each map's
    (documented): normalised, Quantus runs one image per batch and explains the images itself
    (a given ``a_batch`` would be normalised as one batch)."""
    key = jax.random.key(3)
    xs = metrics.perturbed_inputs(case.x, SAMPLES, key=key, noise=noise, low=low, high=high)
    theirs_kw = dict(theirs_kw)
    batch = theirs_kw.pop("batch_size", N)
    metric = getattr(quantus, cls)(
        nr_samples=SAMPLES, perturb_func=replay(xs, batch), disable_warnings=True, **theirs_kw
    )
    given = None if theirs_kw.get("normalise") else nchw(case.maps)
    theirs = run(
        metric,
        case.net,
        nchw(case.x),
        case.target,
        given,
        explain_func=quantus_explain(case.explain),
        batch_size=batch,
    )
    ours = metrics.get(name)(
        case.model,
        case.x,
        case.maps,
        case.target,
        explain=case.explain,
        key=key,
        samples=SAMPLES,
        **ours_kw,
    )
    close(ours, theirs)


def test_local_lipschitz_normalised_by_batch_differs(case):
    """Documented: Quantus normalises by the batch's largest |R|, not each map's."""
    key = jax.random.key(3)
    xs = metrics.perturbed_inputs(case.x, SAMPLES, key=key, noise="gaussian", low=0.0, high=0.1)
    metric = quantus.LocalLipschitzEstimate(
        nr_samples=SAMPLES, perturb_func=replay(xs), normalise=True, disable_warnings=True
    )
    theirs = run(
        metric,
        case.net,
        nchw(case.x),
        case.target,
        nchw(case.maps),
        explain_func=quantus_explain(case.explain),
    )
    ours = metrics.local_lipschitz_estimate(
        case.model,
        case.x,
        case.maps,
        case.target,
        explain=case.explain,
        key=key,
        samples=SAMPLES,
        normalise=True,
    )
    assert np.abs(ours / theirs - 1).max() > 1e-2
    print(f"LLE normalised per map / by the batch: {np.round(ours / theirs, 3).tolist()}")


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("relative_input_stability", "RelativeInputStability"),
        ("relative_output_stability", "RelativeOutputStability"),
    ],
)
def test_relative_stability_changed_predictions(case, name, cls):
    """Documented: a sample that changes the prediction makes Quantus's score NaN; lrpjax
    leaves it out of the max (NaN only if every sample changes it)."""
    key = jax.random.key(3)
    xs = metrics.perturbed_inputs(case.x, SAMPLES, key=key, low=0.02, high=0.2)
    metric = getattr(quantus, cls)(
        nr_samples=SAMPLES, perturb_func=replay(xs), disable_warnings=True
    )
    theirs = run(
        metric,
        case.net,
        nchw(case.x),
        case.target,
        nchw(case.maps),
        explain_func=quantus_explain(case.explain),
    )
    fn = metrics.get(name)
    ours = fn(
        case.model, case.x, case.maps, case.target, explain=case.explain, key=key, samples=SAMPLES
    )
    every = fn(
        case.model,
        case.x,
        case.maps,
        case.target,
        explain=case.explain,
        key=key,
        samples=SAMPLES,
        exclude_changed=False,
    )
    kept = ~np.isnan(theirs)
    close(ours[kept], theirs[kept])
    assert ((ours[~kept] <= every[~kept]) | np.isnan(ours[~kept])).all()
    print(f"{name}: {int((~kept).sum())} of {N} images with a changed prediction")


# --- randomisation -----------------------------------------------------------------------------


def ssim_images(a, b, batched=True, **kwargs):
    """skimage's SSIM of the maps as H x W images (Wang et al.'s Gaussian window), with the
    data range Quantus passes."""
    out = []
    for aa, bb in zip(a, b, strict=True):
        both = np.concatenate([aa, bb])
        out.append(
            skimage_metrics.structural_similarity(
                aa.reshape(H, W),
                bb.reshape(H, W),
                data_range=float(both.max() - both.min()),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
        )
    return out


def test_random_logit_same_class(case, monkeypatch):
    """Quantus draws the other class with ``np.random.randint`` among the classes but the
    target; it is handed lrpjax's (documented: ``(t + randint(key, 1, C)) % C``). Quantus
    normalises by the batch's maximum: one image per batch, which it explains itself. Its
    SSIM of the flattened
    maps (documented) is replaced by skimage's of the images, which lrpjax computes; its own
    differs."""
    key, classes = jax.random.key(5), 10
    other = (case.target + np.asarray(jax.random.randint(key, (N,), 1, classes))) % classes
    index = np.where(other < case.target, other, other - 1)  # among the classes but t

    def explain(model, inputs, targets, **kwargs):
        return nchw(case.explain(nhwc(inputs), np.asarray(targets)).sum(-1, keepdims=True))

    def scores(similarity):
        calls = itertools.count()

        def randint(low, high, size=None):
            assert (low, high, size) == (0, classes - 1, 1)
            c = next(calls)
            return index[c : c + 1]

        monkeypatch.setattr(np.random, "randint", randint)
        kw = {} if similarity is None else {"similarity_func": similarity}
        metric = quantus.RandomLogit(num_classes=classes, disable_warnings=True, **kw)
        out = run(
            metric, case.net, nchw(case.x), case.target, None, explain_func=explain, batch_size=1
        )
        monkeypatch.undo()
        return out

    ours = metrics.random_logit(
        case.model, case.x, case.maps, case.target, explain=case.explain, key=key
    )
    close(ours, scores(ssim_images))
    assert np.abs(ours - scores(None)).max() > 1e-2


def test_benchmark_metrics_runs(case):
    """`lrpjax.bench.metrics` times both (its numbers are not asserted)."""
    from lrpjax.bench.metrics import benchmark_metrics, table

    model = lrpjax.load_pretrained()
    report = benchmark_metrics(
        model,
        case.x[:3].astype(np.float32),
        ["sparseness", "auc"],
        repeats=1,
        threads=1,
        verbose=False,
    )
    assert list(report["metrics"]) == ["sparseness", "auc"]
    assert all(r["ours_ms"] > 0 and r["quantus_ms"] > 0 for r in report["metrics"].values())
    assert "ratio" in table(report)
    with pytest.raises(ValueError, match="not timed against Quantus"):
        benchmark_metrics(model, case.x[:3], ["infidelity"], verbose=False)
