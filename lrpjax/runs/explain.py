"""Explain a whole dataset: one compiled function, batches sharded over all local devices,
results streamed to disk in chunks, resumable, on one process or several.

Output folder layout (all arrays are ``.npy``, readable with ``np.load(..., mmap_mode="r")``):

- ``relevance.npy`` (N, H, W, C) in the chosen dtype;
- ``predictions.npy``, ``labels.npy``, ``targets.npy`` (N,) int32; ``probabilities.npy``
  (N, classes) float32; ``relevance_sum.npy`` (N,) float32;
- ``summary.json``, ``heatmaps.png`` (image | heatmap | overlay), ``class_means.png``;
- ``files.txt`` (given `files`): each row's input, one per line in row order (UTF-8; the
  bytes of a file name that is not UTF-8 kept as they are); ``summary.json`` names it.

While a run is in progress its arrays live in ``.partial-explain-<key>/`` beside a manifest
of the finished chunks (other commands' work folders in ``out`` are left alone). A rerun with
the same arguments finds the manifest and computes only the chunks that are missing. When
every chunk is done, the figures and ``summary.json`` are written in the work folder, the
previous ``out/summary.json`` is removed, the new files are moved into ``out``
(``summary.json`` last) and the work folder is removed: a failure before the move leaves
the earlier output as it was; a kill during the move leaves ``out`` without a
``summary.json`` (so it is never mistaken for a finished result) and a rerun completes it.

Several processes (`jax.distributed`, one per host, all given the whole data and the same
``out`` on a shared file system): the chunks are split into contiguous shares, one per
process; process ``i`` explains its share on its local devices into
``.partial-explain-<key>/process-<i>/`` (its own memmapped arrays and manifest, so no two
processes ever write the same file). When every process is done, process 0 checks every
manifest, merges the shares into the work folder (copied in blocks, so memory stays
bounded), draws the figures, writes ``summary.json`` and moves the result into ``out`` as
above (the same files a one-process run writes); then every process returns that summary.
The processes meet at the end of each phase (`ProcessGroup`): a process that fails
publishes its error in the distributed runtime's key-value store, and every process then
raises `ProcessFailedError` with that message, naming the process. A rerun after any
process was killed resumes each process's share from its own manifest: only missing chunks
are computed. The run key includes the process count, so a rerun with another count starts
over.

A lock (``out/.lock``, `fcntl.flock`; held by process 0) keeps a second run off a folder
that a run is using: it fails with `OutputLockedError` before changing anything.

The machinery is the one every dataset run shares: `lrpjax.runs.store` (lock, work folder,
manifest, publish), `lrpjax.runs.batches` (sharded step, chunk loop) and
`lrpjax.runs.distributed` (process phases); this module declares the arrays, fills their
rows from the step, merges the shares, and draws the figures and the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lrpjax import models, viz
from lrpjax.core import composites, engine
from lrpjax.runs import batches, store
from lrpjax.runs.distributed import ProcessFailedError, ProcessGroup
from lrpjax.runs.store import LOCK_NAME, OutputLockedError

__all__ = [
    "ARRAYS",
    "FIGURES",
    "FILES_NAME",
    "LOCK_NAME",
    "WORK_PREFIX",
    "OutputLockedError",
    "ProcessFailedError",
    "ProcessGroup",
    "explain_dataset",
    "make_step",
]

ARRAYS = ("relevance", "predictions", "labels", "targets", "probabilities", "relevance_sum")
#: Work folders of ``lrpjax explain`` in the output folder start with this (other commands'
#: work folders are left alone).
WORK_PREFIX = ".partial-explain-"
#: The files of a finished result besides the arrays; ``summary.json`` is written last.
FIGURES = ("heatmaps.png", "class_means.png")
#: Each row's input, one per line (written when `explain_dataset` is given `files`).
FILES_NAME = "files.txt"
SUMMARY = "summary.json"


def make_step(model: nnx.Module, composite, init, devices=None):
    """A jit-compiled explanation step with the batch axis sharded over `devices`
    (`lrpjax.runs.batches.sharded_step`).

    Returns:
      ``(step, state, num_devices)``: ``step(state, x, target)`` takes NumPy arrays and
      returns (relevance, probabilities, targets); x and target must have a batch size
      divisible by num_devices. ``target`` -1 means the predicted class.
    """
    fn, state = engine.explainer(model, composite=composite, init=init)

    def step(state, x, target):
        out = fn(state, x, target)
        return out.relevance, jax.nn.softmax(out.logits), out.target

    return batches.sharded_step(step, state, devices)


def explain_dataset(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: dict,
    composite=composites.DEFAULT,
    init="logit",
    target: str | int = "pred",
    batch_size: int = 256,
    dtype: str = "float32",
    class_names=None,
    progress: bool = True,
    figures: int = 16,
    compare: str | None = None,
    files=None,
) -> dict:
    """Explain every image and stream the results into `out`.

    With several JAX processes (after `jax.distributed.initialize`), every process calls
    this with the same arguments (the whole dataset, the same `out` on a shared file
    system); each explains its contiguous share of the chunks, and process 0 merges them
    into one result (see the module docstring).

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
      class_names: the model's class names (figure titles); default ``"0"``, ``"1"``, ...
      figures: how many images the heatmap grid shows.
      compare: a composite shown beside `composite` in ``heatmaps.png`` for the figure's
        images (computed for them alone; not saved); ``None`` shows `composite` alone.
      files: each image's input (e.g. its file's path), one string per image: written to
        ``out/files.txt`` in row order and named in the summary (``files.input_files``);
        ``None`` writes none (and removes an earlier run's).

    Returns:
      The summary (also written to ``out/summary.json``), on every process.

    Raises:
      OutputLockedError: another run holds `out`.
      ValueError: `files` does not have one entry per image, or an entry holds a line break.
    """
    if files is not None:
        files = [str(f) for f in files]
        if len(files) != len(images):
            raise ValueError(f"{len(files)} file names for {len(images)} images")
        broken = next((f for f in files if "\n" in f or "\r" in f), None)
        if broken is not None:
            raise ValueError(f"the file name {broken!r} holds a line break: rename it")
    out = Path(out)
    group = ProcessGroup()
    with contextlib.ExitStack() as stack:
        with group.phase("locked"):
            if group.index == 0:
                stack.enter_context(store.lock_output(out))
        return _explain_locked(
            model, images, labels, out, group, settings=settings, composite=composite,
            init=init, target=target, batch_size=batch_size, dtype=dtype,
            class_names=class_names, progress=progress, figures=figures, compare=compare,
            files=files,
        )  # fmt: skip


def _explain_locked(
    model, images, labels, out: Path, group: ProcessGroup, *, settings, composite, init,
    target, batch_size, dtype, class_names, progress, figures, compare, files,
) -> dict:  # fmt: skip
    """The run, with `out` locked. Process 0's steps after the computation are ordered so
    that a kill at any point leaves `out` either as it was before or without a
    ``summary.json`` and with the work folder in place, and a rerun finishes the job:

    1. the final arrays are assembled in the work folder (moved, or merged from the
       processes' shares into ``merged/``), the figures and ``summary.json`` are written
       beside them (``summary.json`` last: it marks the work folder as complete);
    2. `lrpjax.runs.store.publish`: the previous ``out/summary.json`` is removed, then the
       arrays and figures are moved into ``out``, then ``summary.json``;
    3. the work folder is removed last.

    A rerun that finds a complete work folder (step 1 done) only repeats steps 2 and 3.
    """
    n = len(images)
    with group.phase("prepared"):
        step, state, num_devices = make_step(model, composite, init)
        batch_size = batches.device_multiple(batch_size, num_devices)
        keyed = {**settings, "batch_size": batch_size, "n": n, "dtype": dtype}
        if group.count > 1:
            keyed["processes"] = group.count
        if files is not None:  # a complete work folder's files.txt is theirs
            listing = "\n".join(files).encode(errors="surrogateescape")
            keyed["files"] = hashlib.sha256(listing).hexdigest()[:16]
        key = store.run_key(keyed)
        num_classes = models.output_size(model, images.shape[1:])
        work = store.work_folder(out, WORK_PREFIX, key)
        final = work if group.count == 1 else work / "merged"
        if group.index == 0:
            for stale in store.stale_work(out, WORK_PREFIX, key):
                shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
    # Process 0 alone reads this; the others' shares are complete then anyway.
    complete = group.index == 0 and store.read_json(final / SUMMARY) is not None

    with group.phase("computed", timeout=group.COMPUTE_TIMEOUT_S):
        if complete:
            print(f"resuming: every chunk is done; moving the results from {final}")
            seconds, computed = 0.0, 0
        else:
            seconds, computed = _compute(
                images, labels, work, group, key, step, state, num_classes,
                settings=settings, target=target, batch_size=batch_size, dtype=dtype,
                progress=progress,
            )  # fmt: skip

    with group.phase("written"):
        if group.index == 0:
            if not complete:
                if group.count > 1:
                    whole = _arrays(n, images.shape[1:], num_classes, dtype)
                    computed = _merge(work, final, group.count, whole, batch_size, n)
                _finish(
                    final, images, n, seconds, computed, settings, group, class_names,
                    num_classes, figures, model, composite, init, compare, files,
                )  # fmt: skip
            listed = "input_files" in json.loads((final / SUMMARY).read_text())["files"]
            names = (*(f"{a}.npy" for a in ARRAYS), *FIGURES, FILES_NAME)
            # an earlier run's files.txt goes when the new result has none
            store.publish(
                final, out, names, SUMMARY, remove=() if listed else (FILES_NAME,), work=work
            )
    return json.loads((out / SUMMARY).read_text())


def _arrays(n: int, image_shape, num_classes: int, dtype: str) -> dict:
    """The arrays of `n` rows, ``{name: (shape, dtype)}``."""
    return {
        "relevance": ((n, *image_shape), dtype),
        "predictions": ((n,), "int32"),
        "labels": ((n,), "int32"),
        "targets": ((n,), "int32"),
        "probabilities": ((n, num_classes), "float32"),
        "relevance_sum": ((n,), "float32"),
    }


def _compute(
    images, labels, work: Path, group: ProcessGroup, key: str, step, state, num_classes: int,
    *, settings, target, batch_size, dtype, progress,
) -> tuple[float, int]:  # fmt: skip
    """This process's share of the chunks, into its part of the work folder (resumed from
    its manifest). Returns (seconds, images computed)."""
    n = len(images)
    part = work if group.count == 1 else work / f"process-{group.index}"
    part.mkdir(parents=True, exist_ok=True)
    mine = batches.shares(batches.chunks(n, batch_size), group.count)[group.index]
    lo, hi = (mine[0][0], mine[-1][1]) if mine else (n, n)
    resumed = store.resumable(part, key, [f"{a}.npy" for a in ARRAYS])
    arrays = (
        store.open_arrays(
            part, _arrays(hi - lo, images.shape[1:], num_classes, dtype), resume=bool(resumed)
        )
        if mine
        else {}
    )
    manifest = store.Manifest(
        part, key, settings, resumed=resumed, range=[lo, hi], process=group.index,
        processes=group.count,
    )  # fmt: skip
    manifest.write()

    def rows(result, start, stop) -> dict:
        relevance, probs, targets = result
        k = stop - start
        return {
            "relevance": relevance[:k],
            "probabilities": probs[:k],
            "predictions": probs[:k].argmax(-1),
            "targets": targets[:k],
            "labels": labels[start:stop],
            "relevance_sum": relevance[:k].reshape(k, -1).sum(-1),
        }

    seconds = batches.stream(
        step, state, images, labels, arrays, mine, manifest, rows, target=target,
        batch_size=batch_size, offset=lo, progress=progress, check=group.check,
    )  # fmt: skip
    del arrays
    return seconds, manifest.computed


def _merge(work: Path, merged: Path, count: int, arrays: dict, batch_size: int, n: int) -> int:
    """Process 0: join every process's share into `merged`; returns the images computed.

    Raises:
      ProcessFailedError: a process's share is incomplete.
    """
    computed = 0
    parts = []
    for p, share in enumerate(batches.shares(batches.chunks(n, batch_size), count)):
        if not share:
            continue
        folder = work / f"process-{p}"
        manifest = store.read_json(folder / store.MANIFEST) or {}
        missing = {a for a, _ in share} - set(manifest.get("done", []))
        if missing:
            raise ProcessFailedError(
                f"process {p} left {len(missing)} of its {len(share)} chunks undone in "
                f"{folder}; rerun the same command on all processes to resume"
            )
        computed += int(manifest.get("computed", 0))
        parts.append((folder, share[0][0], share[-1][1]))
    store.merge_shares(parts, merged, arrays)
    return computed


def _finish(
    final: Path, images, n: int, seconds: float, computed: int, settings: dict, group,
    class_names, num_classes: int, figures: int, model, composite, init, compare, files=None,
) -> dict:  # fmt: skip
    """Process 0: the figures, ``files.txt`` and (last) the summary, beside the final arrays
    in `final`."""
    result = {name: np.load(final / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    known = result["labels"] >= 0
    accuracy = (
        float((result["predictions"][known] == result["labels"][known]).mean())
        if known.any()
        else None
    )
    summary = {
        "images": n,
        "labelled_images": int(known.sum()),  # 0: no labels (accuracy None)
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
        "images_per_second": computed / seconds if computed else None,
        "processes": group.count,
        "devices": [str(d) for d in jax.devices()],
        "settings": settings,
        "files": {name: f"{name}.npy" for name in ARRAYS}
        | {
            "heatmaps": "heatmaps.png",
            "class_means": "class_means.png",
        }
        | ({"input_files": FILES_NAME} if files is not None else {}),
    }
    if class_names is None or len(class_names) != num_classes:
        class_names = [str(i) for i in range(num_classes)]
    compared = (model, composite, compare, init) if compare and compare != composite else None
    _figures(final, images, result, list(class_names), num_classes, figures, compared)
    del result
    if files is not None:
        text = "".join(f"{f}\n" for f in files)
        (final / FILES_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
    models.write_json(final / SUMMARY, summary)
    return summary


def _figures(
    out: Path, images, result, class_names, num_classes: int, count: int, compared=None
) -> None:
    """The heatmap grid of `count` images spread over the set, and per-class mean heatmaps.

    `compared` is ``(model, composite, other composite, init)``: the grid then
    shows the saved composite's maps beside the other composite's for the same images and
    targets (computed here for those images only). If the model has no rule for the other
    composite, the grid shows the saved maps alone.
    """
    pick = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).astype(int))
    labels = result["labels"][pick]
    relevance = np.asarray(result["relevance"][pick], np.float32)
    shown = relevance
    if compared is not None:
        model, composite, other, init = compared
        try:
            extra = np.asarray(
                engine.explain(
                    model, images[pick], composite=other, init=init,
                    target=np.asarray(result["targets"][pick]),
                ),
                np.float32,
            )  # fmt: skip
            saved = composite if isinstance(composite, str) else "composite"
            shown = {f"LRP {saved} (saved)": relevance, f"LRP {other}": extra}
        except engine.LayerError:
            pass
    viz.grid_figure(
        images[pick],
        shown,
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
        # Each image's heatmap in [-1, 1]: every image weighs the same in its class's mean,
        # not by the size of its logit.
        maps = viz.heatmap(result["relevance"][start : start + 1024])
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
