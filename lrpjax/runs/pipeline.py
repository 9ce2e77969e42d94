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
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrpjax.core import compilation, composites, engine
from lrpjax import models, viz

__all__ = [
    "ARRAYS",
    "OutputLockedError",
    "ProcessFailedError",
    "ProcessGroup",
    "explain_dataset",
    "lock_output",
    "make_step",
]

ARRAYS = ("relevance", "predictions", "labels", "targets", "probabilities", "relevance_sum")
LOCK_NAME = ".lock"
#: Work folders of ``lrpjax explain`` in the output folder start with this (other commands'
#: work folders are left alone).
WORK_PREFIX = ".partial-explain-"


class OutputLockedError(RuntimeError):
    """Another run is using the output folder."""


@contextlib.contextmanager
def lock_output(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `out` (created if needed).

    The lock is `fcntl.flock` on ``out/.lock``: the kernel releases it when the holder exits,
    even by ``kill -9``, so a stale file never blocks a later run. The file is removed on
    release. (On network file systems this relies on their flock support: NFSv4 has it.)

    Raises:
      OutputLockedError: another process holds the lock; nothing in `out` was changed.
    """
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise OutputLockedError(
                f"output folder {out} is in use by another lrpjax run"
                f"{f' ({holder})' if holder else ''}; wait for it to end or choose another --out"
            ) from None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new inode
        os.close(fd)


_CALLS = itertools.count()


class ProcessFailedError(RuntimeError):
    """A process of a multi-process run failed (or did not come): every process raises this,
    with the failing process's message."""


def _client():
    """The distributed runtime's key-value client (a JAX internal, tested with jax 0.10)."""
    try:
        from jax._src import distributed

        client = distributed.global_state.client
    except (ImportError, AttributeError):
        client = None
    needed = ("key_value_set", "key_value_dir_get")
    if client is None or not all(hasattr(client, m) for m in needed):
        raise ProcessFailedError(
            f"several JAX processes need the distributed runtime's key-value store, which "
            f"this jax ({jax.__version__}) does not expose as lrpjax expects; lrpjax is "
            "tested with jax 0.10: install it, or run one process"
        )
    return client


def describe(error: BaseException) -> str:
    """One line for an exception, as ``lrpjax`` prints it."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename or ''}".rstrip(": ")
    elif str(error) and (
        isinstance(error, ValueError | RuntimeError) or type(error).__module__.startswith("lrpjax")
    ):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text


class ProcessGroup:
    """This process's place among the JAX processes, and their meeting points.

    Every process goes through the same named phases in the same order. A phase ends with
    each process publishing "done" (or, if it failed, its error) in the distributed
    runtime's key-value store and waiting until all have published done; as soon as any
    process has published an error, every process raises `ProcessFailedError` with it (the
    failing process too), so one failure ends the run everywhere with one message naming
    the process. With one process, phases do nothing.
    """

    #: Seconds to wait for the other processes at the end of a phase (env
    #: ``LRPJAX_PHASE_TIMEOUT_S``), and at the end of the computation (their whole share;
    #: env ``LRPJAX_COMPUTE_TIMEOUT_S``).
    PHASE_TIMEOUT_S = float(os.environ.get("LRPJAX_PHASE_TIMEOUT_S", 3600))
    COMPUTE_TIMEOUT_S = float(os.environ.get("LRPJAX_COMPUTE_TIMEOUT_S", 48 * 3600))

    def __init__(self, scope: str = "explain") -> None:
        self.index, self.count = jax.process_index(), jax.process_count()
        # every process creates its groups in the same order: the same prefix everywhere
        self.prefix = f"lrpjax/{next(_CALLS)}-{scope}"
        self.client = _client() if self.count > 1 else None

    def _failure(self) -> ProcessFailedError | None:
        errors = []
        for key, value in self.client.key_value_dir_get(f"{self.prefix}/error/"):
            errors.append((int(key.rsplit("/", 1)[-1]), value))
        if not errors:
            return None
        process, message = min(errors)
        return ProcessFailedError(f"process {process} of {self.count}: {message}")

    def check(self) -> None:
        """Raise `ProcessFailedError` if another process has failed (cheap: one lookup)."""
        if self.client is not None and (failure := self._failure()) is not None:
            raise failure

    def sync(self, phase: str, timeout: float | None = None) -> None:
        """Publish that this process finished `phase` and wait for all the others.

        Raises:
          ProcessFailedError: a process published an error, or not all arrived within `timeout`.
        """
        if self.client is None:
            return
        timeout = self.PHASE_TIMEOUT_S if timeout is None else timeout
        self.client.key_value_set(f"{self.prefix}/{phase}/{self.index}", "done")
        deadline, delay = time.monotonic() + timeout, 0.02
        while True:
            if (failure := self._failure()) is not None:
                raise failure
            arrived = {
                int(key.rsplit("/", 1)[-1])
                for key, _ in self.client.key_value_dir_get(f"{self.prefix}/{phase}/")
            }
            if len(arrived) >= self.count:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.count)) - arrived)
                raise ProcessFailedError(
                    f"process{'es' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))} of {self.count} did not finish "
                    f"{phase!r} within {timeout:.0f} s; rerun the same command on all "
                    "processes to resume"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    @contextlib.contextmanager
    def phase(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Run the body, then `sync`. If the body raises, publish the error first: then
        every process raises `ProcessFailedError` naming this one (KeyboardInterrupt stays)."""
        try:
            yield
        except ProcessFailedError:
            raise
        except BaseException as e:
            if self.client is None:
                raise
            message = describe(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            with contextlib.suppress(Exception):
                self.client.key_value_set(f"{self.prefix}/error/{self.index}", message)
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise ProcessFailedError(f"process {self.index} of {self.count}: {message}") from e
        self.sync(name, timeout)


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


def make_step(model: nnx.Module, composite, init, devices=None):
    """A jit-compiled explanation step with the batch axis sharded over `devices`.

    Returns:
      ``(step, state, num_devices)``: ``step(state, x, target)`` takes NumPy arrays and
      returns (relevance, probabilities, targets); x and target must have a batch size
      divisible by num_devices. ``target`` -1 means the predicted class.
    """
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    fn, state = engine.explainer(model, composite=composite, init=init)

    def step(state, x, target):
        out = fn(state, x, target)
        return out.relevance, jax.nn.softmax(out.logits), out.target

    compiled = compilation.jit(step, in_shardings=(replicated, batch, batch), out_shardings=batch)

    def run(state, x, target):
        # Placed explicitly: with several processes, jit refuses NumPy inputs it must shard.
        return compiled(state, jax.device_put(x, batch), jax.device_put(target, batch))

    return run, jax.device_put(state, replicated), len(devices)


def run_key(settings: dict) -> str:
    """A short hash of everything that determines a run's numbers."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
                stack.enter_context(lock_output(out))
        return _explain_locked(
            model, images, labels, out, group, settings=settings, composite=composite,
            init=init, target=target, batch_size=batch_size, dtype=dtype,
            class_names=class_names, progress=progress, figures=figures, compare=compare,
            files=files,
        )  # fmt: skip


#: The files of a finished result besides the arrays; ``summary.json`` is written last.
FIGURES = ("heatmaps.png", "class_means.png")
#: Each row's input, one per line (written when `explain_dataset` is given `files`).
FILES_NAME = "files.txt"


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
    2. the previous ``out/summary.json`` is removed, then the arrays and figures are moved
       into ``out``, then ``summary.json``;
    3. the work folder is removed last.

    A rerun that finds a complete work folder (step 1 done) only repeats steps 2 and 3.
    """
    n = len(images)
    with group.phase("prepared"):
        step, state, num_devices = make_step(model, composite, init)
        batch_size = -(-batch_size // num_devices) * num_devices
        keyed = {**settings, "batch_size": batch_size, "n": n, "dtype": dtype}
        if group.count > 1:
            keyed["processes"] = group.count
        if files is not None:  # a complete work folder's files.txt is theirs
            listing = "\n".join(files).encode(errors="surrogateescape")
            keyed["files"] = hashlib.sha256(listing).hexdigest()[:16]
        key = run_key(keyed)
        work = out / f"{WORK_PREFIX}{key}"
        final = work if group.count == 1 else work / "merged"
        if group.index == 0:
            for stale in out.glob(f"{WORK_PREFIX}*"):
                if stale != work:
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
    # Process 0 alone reads this; the others' shares are complete then anyway.
    complete = group.index == 0 and _read_json(final / "summary.json") is not None

    with group.phase("computed", timeout=group.COMPUTE_TIMEOUT_S):
        if complete:
            print(f"resuming: every chunk is done; moving the results from {final}")
            seconds, computed, num_classes, shapes, chunks, per = 0.0, 0, 0, {}, [], 1
        else:
            seconds, computed, num_classes, shapes, chunks, per = _compute(
                model, images, labels, work, group, key, step, state, settings=settings,
                target=target, batch_size=batch_size, dtype=dtype, progress=progress,
            )  # fmt: skip

    with group.phase("written"):
        if group.index == 0:
            if not complete:
                if group.count == 1:
                    total = computed
                else:
                    total = _merge(work, final, group.count, chunks, per, shapes, n)
                _finish(
                    final, images, n, seconds, total, settings, group, class_names,
                    num_classes, figures, model, composite, init, compare, files,
                )  # fmt: skip
            _publish(final, out)
            shutil.rmtree(work, ignore_errors=True)
    return json.loads((out / "summary.json").read_text())


def _publish(final: Path, out: Path) -> None:
    """Move a complete result from `final` into `out`: the old summary out first, the new
    one in last (files already moved by an interrupted earlier call are skipped). An
    earlier run's ``files.txt`` goes when the new result has none."""
    listed = "input_files" in json.loads((final / "summary.json").read_text())["files"]
    (out / "summary.json").unlink(missing_ok=True)
    if not listed:
        (out / FILES_NAME).unlink(missing_ok=True)
    for name in (*(f"{a}.npy" for a in ARRAYS), *FIGURES, FILES_NAME):
        if (final / name).exists():
            os.replace(final / name, out / name)
    os.replace(final / "summary.json", out / "summary.json")


def _compute(
    model, images, labels, work: Path, group: ProcessGroup, key: str, step, state, *,
    settings, target, batch_size, dtype, progress,
):  # fmt: skip
    """This process's share of the chunks, into its part of the work folder (resumed from
    its manifest). Returns (seconds, images computed, class count, array shapes of a
    share, all chunks, chunks per process)."""
    from tqdm.auto import tqdm

    n = len(images)
    part = work if group.count == 1 else work / f"process-{group.index}"
    part.mkdir(parents=True, exist_ok=True)
    chunks = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    per = -(-len(chunks) // group.count)
    mine = chunks[group.index * per : (group.index + 1) * per]
    lo, hi = (mine[0][0], mine[-1][1]) if mine else (n, n)
    manifest_path = part / "manifest.json"
    manifest = _read_json(manifest_path)
    if manifest and (
        manifest.get("key") != key or not all((part / f"{a}.npy").exists() for a in ARRAYS)
    ):
        manifest = None
    num_classes = int(
        jax.eval_shape(lambda x: model(x), jnp.zeros((1, *images.shape[1:]))).shape[-1]
    )
    shapes = {
        "relevance": ((hi - lo, *images.shape[1:]), dtype),
        "predictions": ((hi - lo,), "int32"),
        "labels": ((hi - lo,), "int32"),
        "targets": ((hi - lo,), "int32"),
        "probabilities": ((hi - lo, num_classes), "float32"),
        "relevance_sum": ((hi - lo,), "float32"),
    }
    mode = "r+" if manifest else "w+"
    arrays = (
        {
            name: np.lib.format.open_memmap(part / f"{name}.npy", mode=mode, dtype=dt, shape=shape)
            for name, (shape, dt) in shapes.items()
        }
        if mine
        else {}
    )
    done = set(manifest["done"]) if manifest else set()
    todo = [c for c in mine if c[0] not in done]
    if done:
        print(f"resuming: {len(done)} of {len(mine)} chunks already done in {part}")

    def write_manifest(computed: int) -> None:
        models.write_json(
            manifest_path,
            {
                "key": key, "settings": settings, "done": sorted(done), "range": [lo, hi],
                "process": group.index, "processes": group.count, "computed": computed,
            },
        )  # fmt: skip

    t0 = time.perf_counter()
    computed = 0
    write_manifest(computed)
    bar = tqdm(
        total=hi - lo, initial=hi - lo - sum(b - a for a, b in todo), unit="img",
        disable=not progress,
    )  # fmt: skip
    for start, stop in todo:
        group.check()  # another process failed: stop now
        x, t = padded_batch(images, labels, start, stop, target, batch_size)
        relevance, probs, targets = jax.device_get(step(state, x, t))
        k = stop - start
        a, b = start - lo, stop - lo
        arrays["relevance"][a:b] = relevance[:k].astype(dtype)
        arrays["probabilities"][a:b] = probs[:k]
        arrays["predictions"][a:b] = probs[:k].argmax(-1)
        arrays["targets"][a:b] = targets[:k]
        arrays["labels"][a:b] = labels[start:stop]
        arrays["relevance_sum"][a:b] = relevance[:k].reshape(k, -1).sum(-1)
        for arr in arrays.values():
            arr.flush()
        done.add(start)
        computed += k
        write_manifest(computed)
        bar.update(k)
    bar.close()
    for arr in arrays.values():
        arr.flush()
    del arrays
    return time.perf_counter() - t0, computed, num_classes, shapes, chunks, per


def _merge(work: Path, merged: Path, count: int, chunks, per: int, shapes: dict, n: int) -> int:
    """Process 0: join every process's share into `merged`; returns the images computed.

    Raises:
      ProcessFailedError: a process's share is incomplete.
    """
    computed = 0
    ranges = []
    for p in range(count):
        share = chunks[p * per : (p + 1) * per]
        if not share:
            continue
        manifest = _read_json(work / f"process-{p}" / "manifest.json") or {}
        missing = {a for a, _ in share} - set(manifest.get("done", []))
        if missing:
            raise ProcessFailedError(
                f"process {p} left {len(missing)} of its {len(share)} chunks undone in "
                f"{work / f'process-{p}'}; rerun the same command on all processes to resume"
            )
        computed += int(manifest.get("computed", 0))
        ranges.append((p, share[0][0], share[-1][1]))
    merged.mkdir(exist_ok=True)
    for name in ARRAYS:
        (_, *rest), dt = shapes[name]
        dst = np.lib.format.open_memmap(
            merged / f"{name}.npy", mode="w+", dtype=dt, shape=(n, *rest)
        )
        for p, lo, hi in ranges:
            src = np.load(work / f"process-{p}" / f"{name}.npy", mmap_mode="r")
            for a in range(0, hi - lo, 1024):
                dst[lo + a : lo + min(a + 1024, hi - lo)] = src[a : a + 1024]
            del src
        dst.flush()
        del dst
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
    models.write_json(final / "summary.json", summary)
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
