"""lrpjax's metrics and Quantus 0.6.0's timed side by side (issue #26): per-image milliseconds
of each on the same model, inputs and maps, and their ratio; measured, never asserted.

Each metric is one call over the batch, as each library is used: lrpjax's on the NHWC batch
with the Flax model (jit-compiled; compiled and warmed up before timing), Quantus's metric
object on the NCHW batch with the model's PyTorch twin (`lrpjax.peers.torch_model`, the
same weights, float32) and the channel-summed map. The settings are matched as in
``tests/test_metrics_quantus.py``, which checks that they compute the same scores (where
Quantus's ``features_in_step`` counts entries, it gets the image as one 3H x W channel and
three entries per pixel; where Quantus 0.6.0 fails on RGB images, ROAD and IROF, it gets
the repaired ``perturb_func`` of that test; its random metrics draw their own numbers, the
same number of them). Metrics whose definitions differ (`metrics.sensitivity_n`,
`metrics.infidelity`, `metrics.non_sensitivity`, `metrics.input_invariance`) are not timed.

Both run alternately, who goes first alternating too, on the same CPU threads: PyTorch on
``torch.set_num_threads(threads)`` (default: the CPUs the process may use), XLA on the pool
it sized at start-up from the same CPUs (pin the process, ``taskset -c 0``, for one core).
Needs PyTorch and Quantus: ``pip install "lrpjax[quantus]"``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import jax
import numpy as np
from flax import nnx

from lrpjax.analysis import metrics
from lrpjax.analysis.metrics.scoring import logits
from lrpjax.bench import speed
from lrpjax.peers import pytorch as peers_torch

__all__ = ["METRICS", "benchmark_metrics", "table"]

#: The metrics `benchmark_metrics` times by default (in this order).
METRICS: tuple[str, ...] = (
    "sparseness", "complexity", "effective_complexity",
    "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
    "top_k_intersection", "attribution_localisation", "auc",
    "completeness",
    "pixel_flipping", "selectivity", "region_perturbation_morf", "faithfulness_estimate",
    "faithfulness_correlation", "monotonicity", "monotonicity_correlation", "road_morf", "irof",
    "max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate",
    "relative_input_stability", "relative_output_stability",
    "random_logit",
)  # fmt: skip

#: Pixels per step of the metrics with ``features_in_step``; samples of the random ones.
STEP = 32
SAMPLES = 10


def _require_quantus() -> tuple[Any, Any]:
    try:
        import quantus
        import torch
    except ImportError as e:
        raise ImportError(
            f"the comparison with Quantus needs PyTorch and Quantus ({e.name} is not "
            'installed): pip install "lrpjax[quantus]"'
        ) from None
    return torch, quantus


@contextlib.contextmanager
def _numpy_trapz() -> Iterator[None]:
    """Quantus 0.6.0 integrates with ``np.trapz``, which NumPy 2.4 removed: `np.trapezoid`
    (the same function) stands in for it while Quantus runs."""
    added = not hasattr(np, "trapz")
    if added:
        np.trapz = np.trapezoid
    try:
        yield
    finally:
        if added:
            del np.trapz


def _nchw(v) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(v), -1, 1))


def _masks(a: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random rectangles (every other one around the map's maximum)."""
    rng = np.random.default_rng(seed)
    n, h, w = a.shape
    s = np.zeros((n, h, w), bool)
    for i in range(n):
        mh, mw = rng.integers(h // 8, h // 2 + 1), rng.integers(w // 8, w // 2 + 1)
        if i % 2:
            r, c = rng.integers(0, h - mh + 1), rng.integers(0, w - mw + 1)
        else:
            pr, pc = np.unravel_index(a[i].argmax(), (h, w))
            r, c = min(max(pr - mh // 2, 0), h - mh), min(max(pc - mw // 2, 0), w - mw)
        s[i, r : r + mh, c : c + mw] = True
    return s


def _pairs(model: nnx.Module, x: np.ndarray, names: Sequence[str]) -> dict[str, tuple]:
    """name -> (ours, theirs): closures running each library's metric once on the batch."""
    torch, quantus = _require_quantus()
    from quantus.functions.perturb_func import (
        baseline_replacement_by_mask,
        noisy_linear_imputation,
    )

    with mock.patch.object(peers_torch, "require_zennit", lambda: (torch, None)):
        net = peers_torch.torch_model(model, "float32")  # needs PyTorch only
    n, h, w, c = x.shape
    target = logits(model, x).argmax(-1).astype(np.int32)
    explain = metrics.explain_fn(model, "lrp:epsilon")
    maps = explain(x, target)
    a = maps.sum(-1)
    masks = _masks(a)
    xq, a1, s1, full = _nchw(x), a[:, None].copy(), masks[:, None].copy(), _nchw(maps)
    stacked_x = xq.reshape(n, 1, c * h, w)
    stacked_a = np.ascontiguousarray(np.broadcast_to(a1, xq.shape).reshape(stacked_x.shape))

    class Unstack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.eval()

        def forward(self, v):
            return self.net(v.reshape(len(v), c, h, w))

    unstack = Unstack()

    def q_explain(model, inputs, targets, **kwargs):
        return _nchw(explain(np.moveaxis(inputs, 1, -1), np.asarray(targets)))

    def q_explain_summed(model, inputs, targets, **kwargs):
        return q_explain(model, inputs, targets).sum(1, keepdims=True)

    image = stacked_x.reshape(n, -1)

    def restore(arr, indices, **kwargs):  # Arya et al.'s monotonicity (see the test)
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = image[rows, indices]
        return out

    def impute(arr, indices, noise, **kwargs):  # ROAD of RGB images (see the test)
        return noisy_linear_imputation(arr, np.unique(np.asarray(indices) % (h * w)), noise=noise)

    def by_mask(arr, mask, **kwargs):  # IROF of RGB images (see the test)
        return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)

    def q(cls, net_, xb, ab, call=None, **init):
        metric = getattr(quantus, cls)(disable_warnings=True, **init)
        call = call or {}
        return lambda: metric(model=net_, x_batch=xb, y_batch=target, a_batch=ab,
                              channel_first=True, device="cpu", batch_size=n, **call)  # fmt: skip

    def ours(name, **kw):
        fn = metrics.get(name)
        return lambda: fn(model, x, maps, target, **kw)

    key = jax.random.key(0)
    robust = {"explain": explain, "key": key, "samples": SAMPLES}
    q_robust = {"explain_func": q_explain}
    table: dict[str, tuple[Callable, Callable]] = {
        "sparseness": (ours("sparseness"), q("Sparseness", None, xq, a1, normalise=False)),
        "complexity": (ours("complexity"), q("Complexity", None, xq, a1, normalise=False)),
        "effective_complexity": (
            ours("effective_complexity"),
            q("EffectiveComplexity", None, xq, a1, normalise=False),
        ),
        "pointing_game": (
            ours("pointing_game", masks=masks),
            q("PointingGame", None, xq, a1, {"s_batch": s1}, abs=False),
        ),
        "relevance_mass_accuracy": (
            ours("relevance_mass_accuracy", masks=masks),
            q("RelevanceMassAccuracy", None, xq, a1, {"s_batch": s1}, abs=False),
        ),
        "relevance_rank_accuracy": (
            ours("relevance_rank_accuracy", masks=masks),
            q("RelevanceRankAccuracy", None, xq, a1, {"s_batch": s1}, abs=False),
        ),
        "top_k_intersection": (
            ours("top_k_intersection", masks=masks, k=20),
            q("TopKIntersection", None, xq, a1, {"s_batch": s1}, abs=False, k=20),
        ),
        "attribution_localisation": (
            ours("attribution_localisation", masks=masks),
            q(
                "AttributionLocalisation",
                None,
                xq,
                a1,
                {"s_batch": s1},
                abs=False,
                positive_attributions=True,
            ),
        ),
        "auc": (ours("auc", masks=masks), q("AUC", None, xq, a1, {"s_batch": s1}, abs=False)),
        "completeness": (
            ours("completeness", baseline="black"),
            q("Completeness", net, xq, full, normalise=False),
        ),
        "pixel_flipping": (
            ours("pixel_flipping", features_in_step=STEP),
            q(
                "PixelFlipping",
                unstack,
                stacked_x,
                stacked_a,
                features_in_step=3 * STEP,
                return_auc_per_sample=True,
            ),
        ),
        "selectivity": (ours("selectivity", patch_size=8), q("Selectivity", net, xq, a1)),
        "region_perturbation_morf": (
            ours("region_perturbation_morf", region=8, replacement="zero", score="probability"),
            q(
                "RegionPerturbation",
                net,
                xq,
                a1,
                patch_size=8,
                regions_evaluation=(h * w) // 64,
                perturb_baseline=0.0,
            ),
        ),
        "faithfulness_estimate": (
            ours("faithfulness_estimate", features_in_step=STEP),
            q("FaithfulnessEstimate", unstack, stacked_x, stacked_a, features_in_step=3 * STEP),
        ),
        "faithfulness_correlation": (
            ours("faithfulness_correlation", key=key, subset_size=64),
            q("FaithfulnessCorrelation", net, xq, a1, subset_size=3 * 64, return_aggregate=False),
        ),
        "monotonicity": (
            ours("monotonicity", features_in_step=STEP),
            q(
                "Monotonicity",
                unstack,
                stacked_x,
                stacked_a,
                features_in_step=3 * STEP,
                perturb_func=restore,
            ),
        ),
        "monotonicity_correlation": (
            ours("monotonicity_correlation", key=key, samples=SAMPLES, features_in_step=STEP),
            q(
                "MonotonicityCorrelation",
                unstack,
                stacked_x,
                stacked_a,
                nr_samples=SAMPLES,
                features_in_step=3 * STEP,
            ),
        ),
        "road_morf": (
            ours("road_morf", percentages=[6.25, 12.5, 25.0], noise=0.0),
            q("ROAD", net, xq, a1, percentages=[18.75, 37.5, 75.0], noise=0.0, perturb_func=impute),
        ),
        "irof": (
            ours("irof", fill=0.5),
            q(
                "IROF",
                net,
                xq,
                a1,
                perturb_baseline=0.5,
                perturb_func=by_mask,
                return_aggregate=False,
            ),
        ),
        "max_sensitivity": (
            ours("max_sensitivity", **robust),
            q("MaxSensitivity", net, xq, full, q_robust, nr_samples=SAMPLES),
        ),
        "avg_sensitivity": (
            ours("avg_sensitivity", **robust),
            q("AvgSensitivity", net, xq, full, q_robust, nr_samples=SAMPLES),
        ),
        "local_lipschitz_estimate": (
            ours("local_lipschitz_estimate", **robust),
            q(
                "LocalLipschitzEstimate",
                net,
                xq,
                full,
                q_robust,
                nr_samples=SAMPLES,
                normalise=False,
            ),
        ),
        "relative_input_stability": (
            ours("relative_input_stability", **robust),
            q("RelativeInputStability", net, xq, full, q_robust, nr_samples=SAMPLES),
        ),
        "relative_output_stability": (
            ours("relative_output_stability", **robust),
            q("RelativeOutputStability", net, xq, full, q_robust, nr_samples=SAMPLES),
        ),
        "random_logit": (
            ours("random_logit", explain=explain, key=key),
            q(
                "RandomLogit",
                net,
                xq,
                a1,
                {"explain_func": q_explain_summed},
                num_classes=int(logits(model, x[:1]).shape[-1]),
            ),
        ),
    }
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(
            f"not timed against Quantus: {', '.join(unknown)}; choose from {', '.join(table)}"
        )
    return {name: table[name] for name in names}


def benchmark_metrics(
    model: nnx.Module,
    images: np.ndarray,
    names: Sequence[str] | None = None,
    repeats: int = 3,
    *,
    threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time lrpjax's and Quantus's metrics on the same model, images and maps.

    Args:
      model: a sequential Flax NNX model that `lrpjax.peers.torch_model` converts (the
        shipped miniVGG), float32.
      images: (N, H, W, C) float32 images (N >= 3: Quantus's weighted localisation uses
        ``x_batch[2:]``).
      names: the metrics (default `METRICS`).
      repeats: timed calls of each library per metric (after two warm-up calls).
      threads: PyTorch's threads (default: the CPUs the process may use).
      verbose: print the `table` as each metric is done.

    Returns:
      ``{"images": N, "threads": threads, "metrics": {name: {"ours_ms", "quantus_ms",
      "ratio"}}}``: median milliseconds per image of each and Quantus's over lrpjax's.

    Raises:
      ImportError: PyTorch or Quantus is missing (with the install command).
      ValueError: a metric that is not timed against Quantus.
    """
    torch, _ = _require_quantus()
    images = np.asarray(images, np.float32)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    report: dict[str, Any] = {"images": len(images), "threads": threads, "metrics": {}}
    try:
        with _numpy_trapz():
            pairs = _pairs(model, images, METRICS if names is None else tuple(names))
            for name, (ours, theirs) in pairs.items():
                _, mine, peer = speed.interleaved(ours, theirs, repeats)
                o = 1e3 * statistics.median(mine) / len(images)
                t = 1e3 * statistics.median(peer) / len(images)
                report["metrics"][name] = {"ours_ms": o, "quantus_ms": t, "ratio": t / o}
                if verbose:
                    print(table({**report, "metrics": {name: report["metrics"][name]}}, False))
    finally:
        torch.set_num_threads(before)
    if verbose:
        print(table(report))
    return report


def table(report: dict[str, Any], header: bool = True) -> str:
    """The report as a text table: per-image ms of each library and Quantus / lrpjax."""
    rows = [
        f"{name:<26} {r['ours_ms']:>10.3f} {r['quantus_ms']:>11.3f} {r['ratio']:>8.1f}x"
        for name, r in report["metrics"].items()
    ]
    if not header:
        return "\n".join(rows)
    head = (
        f"{report['images']} images, {report['threads']} torch threads; ms per image\n"
        f"{'metric':<26} {'lrpjax':>10} {'Quantus':>11} {'ratio':>9}"
    )
    return "\n".join([head, *rows])
