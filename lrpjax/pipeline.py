"""Explain a whole dataset: one compiled function, batches sharded over all local devices,
results streamed to disk in chunks, resumable.

Output folder layout (all arrays are ``.npy``, readable with ``np.load(..., mmap_mode="r")``):

- ``relevance.npy`` (N, H, W, C) in the chosen dtype;
- ``predictions.npy``, ``labels.npy``, ``targets.npy`` (N,) int32; ``probabilities.npy``
  (N, classes) float32; ``relevance_sum.npy`` (N,) float32;
- ``summary.json``, ``heatmaps.png`` (image | heatmap | overlay), ``class_means.png``.

While a run is in progress its arrays live in ``.partial-<key>/`` beside a manifest of the
finished chunks; they are moved to their final names only when every chunk is done, and
``summary.json`` is written last. A rerun with the same arguments finds the manifest and
computes only the chunks that are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrpjax import compilation, engine, models, viz

__all__ = ["ARRAYS", "explain_dataset", "make_step"]

ARRAYS = ("relevance", "predictions", "labels", "targets", "probabilities", "relevance_sum")


def make_step(model: nnx.Module, composite, init, devices=None):
    """A jit-compiled explanation step with the batch axis sharded over `devices`.

    Returns:
      ``(step, state, num_devices)``: ``step(state, x, target)`` returns (relevance,
      probabilities, targets); x and target must have a batch size divisible by
      num_devices. ``target`` -1 means the predicted class.
    """
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    fn, state = engine.explainer(model, composite=composite, init=init)

    def step(state, x, target):
        out = fn(state, x, target)
        return out.relevance, jax.nn.softmax(out.logits), out.target

    step = compilation.jit(step, in_shardings=(replicated, batch, batch), out_shardings=batch)
    return step, jax.device_put(state, replicated), len(devices)


def run_key(settings: dict) -> str:
    """A short hash of everything that determines a run's numbers."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def explain_dataset(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: dict,
    composite="epsilon",
    init="logit",
    target: str | int = "pred",
    batch_size: int = 256,
    dtype: str = "float32",
    class_names=None,
    progress: bool = True,
    figures: int = 16,
) -> dict:
    """Explain every image and stream the results into `out`.

    Args:
      model: the model (explained in eval mode).
      images: (N, H, W, C) float32 in [0, 1] (checked by the caller).
      labels: (N,) int true classes (-1 where unknown).
      out: output folder.
      settings: everything that determines the results (model, data, rule choices); a rerun
        with equal settings resumes, other settings start over.
      composite, init: as for `lrpjax.explain`.
      target: ``"pred"``, ``"label"`` or a class index.
      batch_size: images per compiled call, rounded up to a multiple of the device count.
      dtype: ``"float32"`` or ``"float16"`` for the stored relevance.
      figures: how many images the heatmap grid shows.

    Returns:
      The summary (also written to ``out/summary.json``).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    n = len(images)
    step, state, num_devices = make_step(model, composite, init)
    batch_size = -(-batch_size // num_devices) * num_devices
    key = run_key({**settings, "batch_size": batch_size, "n": n, "dtype": dtype})
    work = out / f".partial-{key}"
    manifest_path = work / "manifest.json"
    for stale in out.glob(".partial-*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest and not all((work / f"{name}.npy").exists() for name in ARRAYS):
        manifest = None  # stopped while moving the finished arrays out: start over
    num_classes = int(
        jax.eval_shape(lambda x: model(x), jnp.zeros((1, *images.shape[1:]))).shape[-1]
    )
    shapes = {
        "relevance": ((n, *images.shape[1:]), dtype),
        "predictions": ((n,), "int32"),
        "labels": ((n,), "int32"),
        "targets": ((n,), "int32"),
        "probabilities": ((n, num_classes), "float32"),
        "relevance_sum": ((n,), "float32"),
    }
    mode = "r+" if manifest else "w+"
    arrays = {
        name: np.lib.format.open_memmap(work / f"{name}.npy", mode=mode, dtype=dt, shape=shape)
        for name, (shape, dt) in shapes.items()
    }
    done = set(manifest["done"]) if manifest else set()
    chunks = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    todo = [c for c in chunks if c[0] not in done]
    if done:
        print(f"resuming: {len(done)} of {len(chunks)} chunks already done in {work}")
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=n - sum(b - a for a, b in todo), unit="img", disable=not progress)
    for start, stop in todo:
        x = images[start:stop]
        if target == "pred":
            t = np.full(stop - start, -1, np.int32)
        elif target == "label":
            t = labels[start:stop].astype(np.int32)
        else:
            t = np.full(stop - start, int(target), np.int32)
        pad = batch_size - len(x)  # one compiled shape; also covers a batch < device count
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            t = np.concatenate([t, np.zeros(pad, np.int32)])
        relevance, probs, targets = jax.device_get(step(state, x, t))
        k = stop - start
        arrays["relevance"][start:stop] = relevance[:k].astype(dtype)
        arrays["probabilities"][start:stop] = probs[:k]
        arrays["predictions"][start:stop] = probs[:k].argmax(-1)
        arrays["targets"][start:stop] = targets[:k]
        arrays["labels"][start:stop] = labels[start:stop]
        arrays["relevance_sum"][start:stop] = relevance[:k].reshape(k, -1).sum(-1)
        for a in arrays.values():
            a.flush()
        done.add(start)
        models.write_json(manifest_path, {"key": key, "settings": settings, "done": sorted(done)})
        bar.update(k)
    bar.close()
    seconds = time.perf_counter() - t0

    for a in arrays.values():
        a.flush()
    del arrays
    for name in ARRAYS:
        os.replace(work / f"{name}.npy", out / f"{name}.npy")
    shutil.rmtree(work, ignore_errors=True)

    result = {name: np.load(out / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    known = result["labels"] >= 0
    accuracy = (
        float((result["predictions"][known] == result["labels"][known]).mean())
        if known.any()
        else None
    )
    summary = {
        "images": n,
        "accuracy": accuracy,
        "mean_relevance_sum": float(np.mean(result["relevance_sum"])),
        "mean_target_probability": float(
            np.mean(
                np.take_along_axis(
                    result["probabilities"], result["targets"][:, None].astype(np.int64), 1
                )
            )
        ),
        "seconds": seconds,
        "images_per_second": sum(b - a for a, b in todo) / seconds if todo else None,
        "devices": [str(d) for d in jax.local_devices()],
        "settings": settings,
        "files": {name: f"{name}.npy" for name in ARRAYS}
        | {
            "heatmaps": "heatmaps.png",
            "class_means": "class_means.png",
        },
    }
    _figures(out, images, result, class_names, num_classes, figures)
    models.write_json(out / "summary.json", summary)
    return summary


def _figures(out: Path, images, result, class_names, num_classes: int, count: int) -> None:
    """The heatmap grid of `count` images spread over the set, and per-class mean heatmaps."""
    pick = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).astype(int))
    labels = result["labels"][pick]
    viz.grid_figure(
        images[pick],
        np.asarray(result["relevance"][pick], np.float32),
        labels=labels if (labels >= 0).all() else None,
        predictions=result["predictions"][pick],
        probabilities=result["probabilities"][pick, result["predictions"][pick]],
        class_names=class_names,
        path=out / "heatmaps.png",
    )
    # Per-class means, accumulated in chunks so memory stays bounded.
    group = np.where(result["labels"] >= 0, result["labels"], result["predictions"])
    h, w = images.shape[1:3]
    sums = np.zeros((num_classes, h, w), np.float64)
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, len(images), 1024):
        maps = viz.channel_sum(result["relevance"][start : start + 1024])
        g = group[start : start + 1024]
        np.add.at(sums, g, maps)
        counts += np.bincount(g, minlength=num_classes)
    means = sums / np.maximum(counts, 1)[:, None, None]
    viz.class_mean_figure(
        means,
        class_names=class_names or [str(i) for i in range(num_classes)],
        counts=counts,
        path=out / "class_means.png",
    )
