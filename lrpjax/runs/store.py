"""A dataset run's files: the lock on the output folder, the work folder a run streams into,
its manifest, and the publish step that moves a finished result into the output folder.

Every dataset run (``lrpjax explain``, ``lrpjax concepts``) keeps its output folder ``out``
in one of two states, whatever point it is killed at:

- a complete result, marked by its summary file (``summary.json``, ``concepts.json``),
  written last;
- no summary file, and a work folder ``out/<prefix><key>/`` (`work_folder`) from which the
  same command resumes.

While it runs, the run's arrays are memory-mapped ``.npy`` files in the work folder
(`open_arrays`) beside a `Manifest` of the chunks already done; the run key (`run_key`) is
a hash of everything that determines the numbers, so a rerun with the same settings finds
its work folder and computes only what is missing. Each command cleans up only work
folders with its own prefix (`stale_work`): another command's work in the same folder
survives. `publish` moves the finished result in: the old summary out first, the files in,
an earlier result's leftovers out, the new summary in last, the work folder removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from lrpjax import models

__all__ = [
    "LOCK_NAME",
    "MANIFEST",
    "Manifest",
    "OutputLockedError",
    "lock_output",
    "merge_shares",
    "open_arrays",
    "publish",
    "read_json",
    "resumable",
    "run_key",
    "stale_work",
    "work_folder",
]

LOCK_NAME = ".lock"
#: The manifest of a work folder (or of one process's part of it).
MANIFEST = "manifest.json"

#: ``{name: (shape, dtype)}``: the arrays a run declares; ``name`` may hold ``/`` (a
#: subfolder), the file is ``<name>.npy``.
Arrays = Mapping[str, tuple[tuple[int, ...], str]]


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


def run_key(settings: dict) -> str:
    """A short hash of everything that determines a run's numbers."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def work_folder(out: Path, prefix: str, key: str) -> Path:
    """The work folder of the run with `key` of the command whose folders start with
    `prefix` (``.partial-explain-``, ``.partial-concepts-``)."""
    return out / f"{prefix}{key}"


def stale_work(out: Path, prefix: str, key: str) -> list[Path]:
    """The work folders in `out` of the same command (their names start with `prefix`) but
    of other runs than `key`'s: stale, to be removed. Other commands' are not listed."""
    work = work_folder(out, prefix, key)
    return [p for p in out.glob(f"{prefix}*") if p != work]


def resumable(folder: Path, key: str, names: Sequence[str]) -> dict | None:
    """The manifest in `folder` if it is of the run with `key` and each of the files `names`
    is there (the run then resumes from it), else None (the run starts over)."""
    manifest = read_json(folder / MANIFEST)
    if not manifest or manifest.get("key") != key:
        return None
    if not all((folder / name).exists() for name in names):
        return None
    return manifest


class Manifest:
    """A work folder's ``manifest.json``: the run key, the settings, the chunks done (by
    their first row), the images this call computed, and the run's own `fields`. Rewritten
    atomically after every chunk, so it never claims a chunk whose rows are not on disk.

    Args:
      folder: the work folder (or a process's part of it).
      key, settings: the run's (`run_key` of the settings it keyed).
      resumed: the manifest found there (`resumable`): its chunks count as done.
      fields: more entries, written as they are (`write` updates them).
    """

    def __init__(self, folder: Path, key: str, settings: dict, *, resumed=None, **fields):
        self.path = folder / MANIFEST
        self.key, self.settings, self.fields = key, settings, fields
        self.done: set[int] = set(resumed["done"]) if resumed else set()
        self.computed = 0

    def write(self, **fields) -> None:
        """Write the manifest (with `fields` updated first)."""
        self.fields.update(fields)
        models.write_json(
            self.path,
            {
                "key": self.key, "settings": self.settings, "done": sorted(self.done),
                "computed": self.computed, **self.fields,
            },
        )  # fmt: skip


def open_arrays(folder: Path, arrays: Arrays, *, resume: bool) -> dict[str, np.memmap]:
    """The memory-mapped ``.npy`` files of `arrays` in `folder`: opened as they are to
    resume (``r+``), else created (``w+``, zeros)."""
    opened = {}
    for name, (shape, dtype) in arrays.items():
        path = folder / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        opened[name] = np.lib.format.open_memmap(
            path, mode="r+" if resume else "w+", dtype=dtype, shape=shape
        )
    return opened


def merge_shares(parts: Sequence[tuple[Path, int, int]], merged: Path, arrays: Arrays) -> None:
    """Join the processes' shares of `arrays` into `merged`, copied in blocks so that memory
    stays bounded.

    Args:
      parts: ``(folder, lo, hi)`` per process: its arrays hold rows [lo, hi) of the whole.
      merged: the folder of the joined arrays (created).
      arrays: ``{name: (shape, dtype)}`` of the whole.
    """
    merged.mkdir(exist_ok=True)
    for name, (shape, dtype) in arrays.items():
        dst = np.lib.format.open_memmap(merged / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        for folder, lo, hi in parts:
            src = np.load(folder / f"{name}.npy", mmap_mode="r")
            for a in range(0, hi - lo, 1024):
                dst[lo + a : lo + min(a + 1024, hi - lo)] = src[a : a + 1024]
            del src
        dst.flush()
        del dst


def _removable(name: str) -> bool:
    """A plain name in the output folder (no path, not ``.`` or ``..``)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def publish(
    final: Path,
    out: Path,
    names: Sequence[str],
    summary: str,
    *,
    remove: Sequence[str] = (),
    work: Path | None = None,
) -> None:
    """Move a finished result from `final` into `out`, in an order that a kill cannot turn
    into a result that looks complete but is not:

    1. the previous ``out/<summary>`` is removed;
    2. the files `names` (relative paths) move from `final` into `out` (those that an
       interrupted earlier call moved already are skipped);
    3. the files or folders `remove` (plain names in `out`: an earlier result's that this
       one does not have) are removed;
    4. ``final/<summary>`` moves to ``out/<summary>``;
    5. the work folder `work` (default `final`) is removed.

    Killed before 1, `out` holds the previous result; after, it has no summary until 4.
    """
    (out / summary).unlink(missing_ok=True)
    for name in names:
        if (final / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final / name, out / name)
    for name in filter(_removable, remove):
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)
        else:
            (out / name).unlink(missing_ok=True)
    os.replace(final / summary, out / summary)
    shutil.rmtree(work or final, ignore_errors=True)
