"""The compute side of a dataset run: one compiled step sharded over the local devices,
padded batches of one shape, the dataset cut into chunks (and into contiguous shares, one
per process), and the chunk loop that streams the step's results into a run's memmapped
arrays and records each finished chunk in the work folder's manifest.

A run declares its arrays as ``{name: (shape, dtype)}`` (`lrpjax.runs.store.open_arrays`)
and says how one step's result fills their rows (the ``rows`` function of `stream`); the
rest is the same for every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrpjax.core import compilation
from lrpjax.runs.store import Manifest

__all__ = ["chunks", "device_multiple", "padded_batch", "sharded_step", "shares", "stream"]

#: A chunk of the dataset: rows [start, stop).
Chunk = tuple[int, int]


def padded_batch(
    images: np.ndarray,
    labels: np.ndarray | None,
    start: int,
    stop: int,
    target: str | int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Images [start, stop) and their targets, zero-padded to `batch_size` rows.

    One compiled shape for every batch, the last one too (and a batch smaller than the device
    count). `target`: ``"pred"`` (-1, the predicted class), ``"label"`` or a class index.

    Returns:
      x (batch_size, ...) and t (batch_size,) int32.
    """
    x = images[start:stop]
    if target == "pred":
        t = np.full(stop - start, -1, np.int32)
    elif target == "label":
        t = labels[start:stop].astype(np.int32)
    else:
        t = np.full(stop - start, int(target), np.int32)
    pad = batch_size - len(x)
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        t = np.concatenate([t, np.zeros(pad, np.int32)])
    return x, t


def sharded_step(fn: Callable, state, devices=None) -> tuple[Callable, Any, int]:
    """`fn` jit-compiled with the batch axis sharded over `devices` (default: the local ones)
    and the state replicated.

    Args:
      fn: ``fn(state, x, target) -> outputs`` (any pytree of batch-major arrays).
      state: its first argument (the model's state).

    Returns:
      ``(step, state, num_devices)``: ``step(state, x, target)`` takes NumPy arrays whose
      batch size is divisible by num_devices; `state` is placed on the devices.
    """
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled = compilation.jit(fn, in_shardings=(replicated, batch, batch), out_shardings=batch)

    def run(state, x, target):
        # Placed explicitly: with several processes, jit refuses NumPy inputs it must shard.
        return compiled(state, jax.device_put(x, batch), jax.device_put(target, batch))

    return run, jax.device_put(state, replicated), len(devices)


def device_multiple(batch_size: int, num_devices: int) -> int:
    """`batch_size` rounded up to a multiple of the device count."""
    return -(-batch_size // num_devices) * num_devices


def chunks(n: int, batch_size: int) -> list[Chunk]:
    """Rows 0..n-1 in chunks of `batch_size` (the last one shorter)."""
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def shares(all_chunks: Sequence[Chunk], count: int) -> list[list[Chunk]]:
    """`all_chunks` split into `count` contiguous shares of equal length (but the last ones,
    which may be shorter or empty): process ``i`` computes share ``i``."""
    per = -(-len(all_chunks) // count)
    return [list(all_chunks[p * per : (p + 1) * per]) for p in range(count)]


def stream(
    step: Callable,
    state,
    images: np.ndarray,
    labels: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    todo: Sequence[Chunk],
    manifest: Manifest,
    rows: Callable[[Any, int, int], Mapping[str, np.ndarray]],
    *,
    target: str | int,
    batch_size: int,
    offset: int = 0,
    progress: bool = True,
    check: Callable[[], None] | None = None,
    unit: str = "chunks",
) -> float:
    """The chunk loop: `step` on each chunk of `todo` that `manifest` does not list as done,
    its rows written into `arrays`, the arrays flushed, the manifest rewritten.

    A kill at any point loses at most the chunk in progress: the manifest lists only chunks
    whose rows are on disk. Prints a ``resuming: ...`` line where chunks were done already.

    Args:
      step, state: from `sharded_step`.
      images, labels: the whole dataset (`padded_batch`).
      arrays: the run's memmapped arrays (`lrpjax.runs.store.open_arrays`); their row 0 is
        dataset row `offset`.
      todo: the chunks this process computes (done or not).
      manifest: the work folder's, written by the caller before (so that it exists even
        when there is nothing to do); updated here after every chunk.
      rows: ``rows(result, start, stop) -> {array name: its rows [start, stop)}`` from the
        step's result (padding rows already dropped: the first ``stop - start``).
      target, batch_size: as for `padded_batch`.
      progress: show a progress bar (images).
      check: called before each chunk (raises to stop: another process failed).
      unit: what the ``resuming`` line calls the chunks.

    Returns:
      The seconds this call computed for (``manifest.computed`` counts its images).
    """
    from tqdm import tqdm  # a text bar; tqdm.auto warns in notebooks without widgets

    left = [c for c in todo if c[0] not in manifest.done]
    if manifest.done:
        print(
            f"resuming: {len(manifest.done)} of {len(todo)} {unit} already done in "
            f"{manifest.path.parent}"
        )
    total = sum(b - a for a, b in todo)
    t0 = time.perf_counter()
    bar = tqdm(
        total=total, initial=total - sum(b - a for a, b in left), unit="img",
        disable=not progress,
    )  # fmt: skip
    for start, stop in left:
        if check is not None:
            check()
        x, t = padded_batch(images, labels, start, stop, target, batch_size)
        result = jax.device_get(step(state, x, t))
        for name, values in rows(result, start, stop).items():
            arrays[name][start - offset : stop - offset] = values
        for arr in arrays.values():
            arr.flush()
        manifest.done.add(start)
        manifest.computed += stop - start
        manifest.write()
        bar.update(stop - start)
    bar.close()
    return time.perf_counter() - t0
