"""lrpjax and PyTorch/Zennit timed side by side on the same CPU threads, interleaved; the
report of ``lrpjax bench --peer zennit`` (agreement, then timing) and its tables.

Threads. PyTorch runs on ``torch.set_num_threads(threads)``, by default as many as the
process may use (``os.sched_getaffinity``). XLA sizes its CPU thread pool when JAX starts,
from the CPUs the process may use; to give both the same cores, start the process pinned
(``taskset -c 0 lrpjax bench --peer zennit`` for one core). The report records the
affinity, PyTorch's thread counts and ``XLA_FLAGS``.
"""

from __future__ import annotations

import os
import platform
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
from lrpjax.bench import speed
from lrpjax.core import compilation
from lrpjax.peers.agreement import compare
from lrpjax.peers.install import require_zennit
from lrpjax.peers.pytorch import nchw, torch_model
from lrpjax.peers.zennit_rules import PRESETS, zennit_model

__all__ = ["METHODS", "benchmark_peer", "environment", "run_peer", "table"]

#: What `benchmark_peer` times: the forward pass, gradient x input, and LRP per preset.
METHODS: tuple[str, ...] = ("forward", "gradient", *(f"lrp:{p}" for p in PRESETS))


def _torch_method(
    model: nnx.Module, net: Any, method: str, x: np.ndarray
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The PyTorch / Zennit counterpart of a method, as a closure, and its clean-up."""
    torch, zennit = require_zennit()
    xt = nchw(x, "float32")
    if method == "forward":

        def forward():
            with torch.no_grad():
                return net(xt)

        return forward, lambda: None
    if method == "gradient":

        def gradient_x_input():
            xg = xt.detach().requires_grad_(True)
            out = net(xg)
            seed = torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).to(out)
            (grad,) = torch.autograd.grad(out, xg, seed)
            return xg.detach() * grad

        return gradient_x_input, lambda: None
    preset = method.removeprefix("lrp:")
    zennit_net, comp, _ = zennit_model(model, x[:1], preset)
    attributor = zennit.attribution.Gradient(zennit_net, comp)
    attributor.__enter__()  # hooks registered once, as for a loop over batches

    def seed(out):
        onehot = torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).to(out)
        return onehot * out.detach()

    def lrp():
        return attributor(xt.detach(), seed)[1]

    return lrp, lambda: attributor.__exit__(None, None, None)


def environment(threads: int) -> dict:
    """Versions and thread settings of both libraries, for the report."""
    torch, zennit = require_zennit()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "platform": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compilation.compiler_options(),
        "torch": torch.__version__,
        "zennit": getattr(zennit, "__version__", _version("zennit")),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def benchmark_peer(
    model: nnx.Module | None = None,
    batch_size: int = 256,
    repeats: int = 5,
    methods: Sequence[str] = METHODS,
    threads: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Time lrpjax and PyTorch/Zennit on one batch, interleaved, on the same threads.

    Each method is compiled (lrpjax) and run twice on both sides, then timed `repeats`
    times, alternating lrpjax and Zennit; the report has the medians. lrpjax's calls are
    blocked on (``block_until_ready``); the forward pass runs under ``torch.no_grad``,
    gradient x input and Zennit with autograd (Zennit needs it), with Zennit's hooks
    registered once before the timing.

    Args:
      model: a sequential NNX model (default: the shipped miniVGG).
      batch_size: images per call (random images in [0, 1], float32).
      repeats: timed calls per side and method.
      methods: names of `METHODS`.
      threads: PyTorch's intra-op threads (default: the CPUs this process may use, which is
        also what XLA's thread pool is sized to; pin the process with ``taskset`` to
        choose them).
      progress: called with a line per method, or None.

    Returns:
      ``{"batch_size", "repeats", "environment", "results": [{"method", "lrpjax_s",
      "zennit_s", "speedup", "lrpjax_compile_s", "lrpjax_runs_s", "zennit_runs_s"}]}``,
      ``speedup = zennit_s / lrpjax_s`` (above 1: lrpjax is faster).
    """
    torch, _ = require_zennit()
    if model is None:
        model = models.load_shipped("minivgg")[0]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"no Zennit counterpart for {unknown}; methods: {', '.join(METHODS)}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = np.random.default_rng(0).random((batch_size, *models.INPUT_SHAPE), np.float32)
        xj = jnp.asarray(x)
        net = torch_model(model)
        rows = []
        for method in methods:
            fn, state = speed.method_fn(model, method)
            compiled = (jax.jit if method == "forward" else compilation.jit)(fn)
            theirs, cleanup = _torch_method(model, net, method, x)
            try:
                compile_s, mine, peer = speed.interleaved(
                    lambda compiled=compiled, state=state: jax.block_until_ready(
                        compiled(state, xj)
                    ),
                    theirs,
                    repeats,
                )
            finally:
                cleanup()
            ours_s, zennit_s = statistics.median(mine), statistics.median(peer)
            rows.append(
                {"method": method, "lrpjax_s": ours_s, "zennit_s": zennit_s,
                 "speedup": zennit_s / ours_s, "lrpjax_compile_s": compile_s,
                 "lrpjax_runs_s": mine, "zennit_runs_s": peer}
            )  # fmt: skip
            if progress:
                progress(
                    f"  {method:26s} lrpjax {ours_s * 1e3:8.1f} ms  zennit {zennit_s * 1e3:8.1f}"
                    f" ms  x{zennit_s / ours_s:.2f}"
                )
        return {"batch_size": batch_size, "repeats": repeats,
                "environment": environment(threads), "results": rows}  # fmt: skip
    finally:
        torch.set_num_threads(before)


def run_peer(
    model: nnx.Module | None = None,
    batch_size: int = 256,
    repeats: int = 5,
    methods: Sequence[str] = METHODS,
    images: np.ndarray | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """`compare` (float32 and float64) on `images`, then `benchmark_peer`: the report of
    ``lrpjax bench --peer zennit``.

    Returns:
      ``{"peer": "zennit", "model", "agreement": compare(...), "timing": benchmark_peer(...)}``.
    """
    if model is None:
        model = models.load_shipped("minivgg")[0]
    presets = [m.removeprefix("lrp:") for m in methods if m.startswith("lrp:")]
    if progress:
        progress("agreement (lrpjax against Zennit, float32 and float64) ...")
    agreement = compare(model, images, presets or PRESETS)
    if progress:
        progress(f"timing at batch {batch_size}, median of {repeats}, interleaved ...")
    timing = benchmark_peer(model, batch_size, repeats, methods, threads, progress)
    return {"peer": "zennit", "model": type(model).__name__, "agreement": agreement,
            "timing": timing}  # fmt: skip


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def table(report: dict) -> str:
    """Markdown tables of a `run_peer` report: agreement (with the Zennit composites used
    below it), then timing."""
    lines = []
    agreement = report.get("agreement")
    if agreement:
        rows = agreement["rows"]
        columns = [(d, f"{d}") for d in agreement["dtypes"]]
        extra = [
            ("lrpjax_float32_error", "lrpjax f32 vs f64"),
            ("zennit_float32_error", "Zennit f32 vs f64"),
            ("torch_pool_float32", "f32, PyTorch max-pool"),
            ("stock_float32", "f32, stock Zennit"),
        ]
        columns += [(k, t) for k, t in extra if any(k in r for r in rows)]
        lines += [
            f"Agreement on {agreement['images']} images: worst image's max |lrpjax - Zennit| "
            "/ max |Zennit| (max-pool ties shared in both unless noted)",
            "",
            "| | " + " | ".join(t for _, t in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in rows:
            lines.append(
                f"| {row['method']} | " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |"
            )
        lines.append("")
        for row in rows:
            if row.get("zennit"):
                merged = f"; lrpjax's canonizer merged {', '.join(row['merged'])}"
                lines.append(f"- {row['method']}: {row['zennit']}{merged if row['merged'] else ''}")
    timing = report.get("timing")
    if timing:
        env = timing["environment"]
        if lines:
            lines.append("")
        lines += [
            f"Batch {timing['batch_size']}, median of {timing['repeats']} interleaved runs; "
            f"{env['cpu']}, CPUs {env['affinity']}, torch {env['torch']} on "
            f"{env['torch_threads']} thread(s), zennit {env['zennit']}, jax {env['jax']}, "
            f"XLA_FLAGS={env['xla_flags'] or '(none)'}",
            "",
            "| method | lrpjax ms | Zennit ms | lrpjax speed-up |",
            "|---|---:|---:|---:|",
        ]
        for r in timing["results"]:
            lines.append(
                f"| {r['method']} | {r['lrpjax_s'] * 1e3:.1f} | {r['zennit_s'] * 1e3:.1f} | "
                f"{r['speedup']:.2f}x |"
            )
    return "\n".join(lines)
