"""Time explainers against the forward pass and the input gradient (``lrpjax bench``).

Each method is one jit-compiled function of (state, x): the forward pass with `jax.jit`,
every method with a backward pass with `lrpjax.jit` (the same XLA options for the gradient
as for LRP; see `lrpjax.core.compilation`). Compile time is measured apart
(first call, blocked on); run time is the median of `repeats` calls after warm-up, each
blocked on with `block_until_ready`. Ratios are taken within one run, on one device, so
they hold on a shared, noisy machine where absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax import models
from lrpjax.analysis import baselines, metrics
from lrpjax.core import compilation

__all__ = [
    "DEFAULT_METHODS",
    "LRP_METHODS",
    "RATIOS",
    "benchmark",
    "fidelity",
    "fidelity_table",
    "interleaved",
    "method_fn",
    "table",
    "train_throughput",
]

DEFAULT_METHODS = (
    "forward",
    "gradient",
    "lrp:epsilon",
    "lrp:epsilon_plus_flat",
    "lrp:epsilon_gamma_box",
    "lrp:epsilon_alpha2_beta1",
    "random",
    "smoothgrad:samples=8",
    "integrated_gradients:steps=8",
)


#: Ratio fields of a result row, and the method each one divides by (timed in the same run).
RATIOS = {"vs_forward": "forward", "vs_gradient": "gradient", "vs_epsilon": "lrp:epsilon"}


def method_fn(model: nnx.Module, method: str) -> tuple[Callable, nnx.State]:
    """A pure function ``f(state, x)`` for a method name, and the state to call it with.

    Methods: ``forward``; ``gradient`` (gradient x input of the predicted logit, by
    `jax.vjp`: the reference of the ratios); any explainer spec of `lrpjax.analysis.baselines.make`
    (``lrp:<composite>[:params]``, ``smoothgrad:samples=8``, ...), explaining the
    predicted class. The training step is timed by `train_throughput`.
    """
    graphdef, state = nnx.split(model)
    if method == "forward":
        return (lambda s, x: nnx.merge(graphdef, s, copy=True)(x)), state
    if method == "gradient":

        def gradient_x_input(s, x):
            logits, vjp = jax.vjp(nnx.merge(graphdef, s, copy=True), x)
            seed = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=logits.dtype)
            return x * vjp(seed)[0]

        return gradient_x_input, state
    fn, state = baselines.make(model, method)  # ValueError naming the known ones
    return (lambda s, x: fn(s, x, jnp.full(x.shape[:1], -1, jnp.int32))), state


def _time(f: Callable, *args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(f(*args))  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        runs.append(time.perf_counter() - t0)
    return compile_s, statistics.median(runs)


def train_throughput(batch_size: int, repeats: int) -> dict:
    """Images per second of the training step of `python -m train` (Adam, train mode)."""
    # Imported here: `train` is the repository's training script, not part of the library
    # (it imports lrpjax, never the other way); a bench without --train never needs it.
    from train import trainer

    config = trainer.Config(batch_size=batch_size)
    model = models.MiniVGG(rngs=nnx.Rngs(0))
    tx = trainer.make_optimizer(config, 100)
    steps = trainer.Steps(model, tx, config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    x = jnp.asarray(np.random.default_rng(0).random((batch_size, *models.INPUT_SHAPE), np.float32))
    y = jnp.zeros(batch_size, jnp.int32)
    key = jax.random.key(0)
    state = [params, rest, opt_state]

    def step():
        out = steps.train_step(*state, x, y, key)
        state[:] = out[:3]
        return out[3]

    compile_s, run_s = _time(lambda: step(), repeats=repeats)
    return {"batch_size": batch_size, "compile_s": compile_s, "run_s": run_s,
            "images_per_second": batch_size / run_s}  # fmt: skip


def benchmark(
    model: nnx.Module,
    batch_sizes=(1, 64, 256, 1024),
    methods=DEFAULT_METHODS,
    repeats: int = 5,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = print,
    inputs: Callable[[int], np.ndarray] | None = None,
) -> dict:
    """Time every method at every batch size.

    Returns:
      ``{"device": ..., "results": [{"batch_size", "method", "compile_s", "run_s",
      "images_per_second", "vs_forward", "vs_gradient", "vs_epsilon"}, ...]}``, the ratios
      None where their reference method was not timed.

    `inputs(n)` gives a batch of n inputs (default: random images of the miniVGG's shape).
    """
    rng = np.random.default_rng(0)
    rows = []
    for bs in batch_sizes:
        if inputs is None:
            x = jnp.asarray(rng.random((bs, *models.INPUT_SHAPE), np.float32).astype(dtype))
        else:
            x = jnp.asarray(inputs(bs))
        times = {}
        for method in methods:
            fn, state = method_fn(model, method)
            state = models.cast(state, dtype)
            compile = jax.jit if method == "forward" else compilation.jit
            compile_s, run_s = _time(compile(fn), state, x, repeats=repeats)
            times[method] = run_s
            rows.append(
                {"batch_size": bs, "method": method, "compile_s": compile_s, "run_s": run_s,
                 "images_per_second": bs / run_s}
            )  # fmt: skip
            if progress:
                ms = run_s * 1e3
                progress(f"  batch {bs:5d} {method:28s} {ms:9.2f} ms  (compile {compile_s:.1f} s)")
        for row in rows:
            if row["batch_size"] == bs:
                for key, reference in RATIOS.items():
                    row[key] = row["run_s"] / times[reference] if reference in times else None
    return {
        "device": str(jax.devices()[0]),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "repeats": repeats,
        "dtype": dtype,
        "compiler_options": compilation.compiler_options(),
        "results": rows,
    }


#: The LRP presets of `DEFAULT_METHODS`: what `fidelity` checks by default.
LRP_METHODS = tuple(m for m in DEFAULT_METHODS if m.startswith("lrp:"))


def fidelity(
    model: nnx.Module,
    images: np.ndarray,
    methods: Sequence[str] = LRP_METHODS,
    dtype: str = "bfloat16",
    region: int = 4,
) -> list[dict]:
    """How far explanations computed in `dtype` are from float32's, per method.

    Both are computed as `benchmark` times them (weights, statistics and images cast to
    `dtype`). Pixel flipping (MoRF, mean replacement, `region` x `region` regions, all of
    them) runs the float32 model on both maps, so that only the maps differ.

    Args:
      model: the model (float32).
      images: (N, H, W, C) float32 images.
      methods: explainer specs of `lrpjax.analysis.baselines.make` (``lrp:<preset>``, ...).
      dtype: the reduced precision, e.g. ``"bfloat16"``.
      region: side of a flipped region in pixels.

    Returns:
      One row per method: ``prediction_changes`` (images whose predicted class differs in
      `dtype`; both maps explain float32's), ``relative_l2_median``, ``relative_l2_max``
      (per image, ``||R_dtype - R_float32|| / ||R_float32||``), ``aopc_float32``,
      ``aopc_<dtype>`` and their standard errors ``..._se``.
    """
    x32 = jnp.asarray(images, jnp.float32)
    # Both maps explain the class float32 predicts (the low-precision model may predict
    # another one for some images; counted in ``prediction_changes``).
    target = jnp.argmax(jax.jit(lambda m, x: m(x))(model, x32), axis=-1)
    graphdef, state = nnx.split(model)
    low_logits = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x))(
        models.cast(state, dtype), x32.astype(dtype)
    )
    changes = int(jnp.sum(jnp.argmax(low_logits, axis=-1) != target))
    rows = []
    for method in methods:
        fn, state = baselines.make(model, method)
        run = compilation.jit(fn)
        r32 = np.asarray(run(state, x32, target), np.float64)
        r_low = np.asarray(run(models.cast(state, dtype), x32.astype(dtype), target), np.float64)
        norm = np.linalg.norm(r32.reshape(len(r32), -1), axis=1)
        diff = np.linalg.norm((r_low - r32).reshape(len(r32), -1), axis=1)
        rel = diff / np.where(norm > 0, norm, 1.0)
        row = {"method": method, "dtype": dtype, "images": len(r32),
               "prediction_changes": changes, "relative_l2_median": float(np.median(rel)),
               "relative_l2_max": float(rel.max())}  # fmt: skip
        for name, rel_map in (("float32", r32), (dtype, r_low)):
            curves = metrics.region_perturbation(
                model, x32, rel_map.astype(np.float32), target, region=region, progress=False
            )
            row[f"aopc_{name}"], row[f"aopc_{name}_se"] = metrics.summary(metrics.aopc(curves))
        rows.append(row)
    return rows


def fidelity_table(rows: list[dict]) -> str:
    """A markdown table of `fidelity` rows."""
    if not rows:
        return ""
    dtype = rows[0]["dtype"]
    lines = [
        f"{rows[0]['images']} images; the predicted class differs in {dtype} for "
        f"{rows[0]['prediction_changes']}; relative L2 per image, "
        f"||R_{dtype} - R_float32|| / ||R_float32||",
        "",
        f"| method | rel. L2 median | rel. L2 max | MoRF AOPC float32 | MoRF AOPC {dtype} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['relative_l2_median']:.4f} | {r['relative_l2_max']:.4f} | "
            f"{r['aopc_float32']:.3f} ± {r['aopc_float32_se']:.3f} | "
            f"{r[f'aopc_{dtype}']:.3f} ± {r[f'aopc_{dtype}_se']:.3f} |"
        )
    return "\n".join(lines)


def table(report: dict) -> str:
    """A markdown table of a `benchmark` report."""
    lines = [
        f"device: {report['device']} ({report['platform']}), jax {report['jax']}, "
        f"flax {report['flax']}, {report['date']}, median of {report['repeats']}, "
        f"XLA options {report.get('compiler_options') or 'default'}",
        "",
        "| batch | method | run ms | images/s | x forward | x gradient | x lrp:epsilon "
        "| compile s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratios = " | ".join(f"{r[key]:.2f}" if r.get(key) is not None else "-" for key in RATIOS)
        lines.append(
            f"| {r['batch_size']} | {r['method']} | {r['run_s'] * 1e3:.2f} | "
            f"{r['images_per_second']:.0f} | {ratios} | {r['compile_s']:.2f} |"
        )
    for t in report.get("train", []):
        lines.append(
            f"| {t['batch_size']} | train_step | {t['run_s'] * 1e3:.2f} | "
            f"{t['images_per_second']:.0f} | - | - | - | {t['compile_s']:.2f} |"
        )
    return "\n".join(lines)


def interleaved(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int
) -> tuple[float, list[float], list[float]]:
    """Compile and warm up both, then time them alternately (who goes first alternates too).

    Returns:
      ``(compile seconds of ours, our run times, their run times)``.
    """
    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    ours()
    theirs()
    theirs()
    mine: list[float] = []
    peer: list[float] = []
    for r in range(repeats):
        pairs = [(ours, mine), (theirs, peer)]
        for fn, runs in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    return compile_s, mine, peer
