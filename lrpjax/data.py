"""Datasets: CIFAR-10 through tensorflow-datasets, image folders, and the shipped sample.

Every loader returns ``(images, labels)``: images (N, H, W, C) float32 in [0, 1]
(``pixels / 255``, as the reference), labels (N,) int32.

Sources, given to `load` as one string:

- ``"cifar10"``: `tfds.load` (needs internet the first time, and TensorFlow).
- a folder in ``split/class/image`` layout, the layout `tfds.folder_dataset.ImageFolder`
  reads. `image_folder` labels the images by their class folder's *name*: with
  ``class_names`` (a model's classes) a folder ``cat`` gets the index of ``"cat"`` among
  them, whichever classes the folder holds, and a folder class not among them is an error
  naming it; without, the class folders in sorted order (CIFAR-10's label order for its
  class names);
- a ``.tar.gz`` of such a folder, extracted once into a cache directory
  (``$LRPJAX_CACHE`` or ``~/.cache/lrpjax``).

Image folders are decoded with Pillow and the decoded split is cached as
``.<split>-decoded.npz`` in the dataset folder (or the extraction), so TensorFlow is never
imported for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "DataUnavailableError",
    "cache_dir",
    "image_folder",
    "load",
    "load_with_classes",
    "match_classes",
    "sample",
    "stamp",
]

#: CIFAR-10's class names in its label order (tfds and the shipped sample).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataUnavailableError(RuntimeError):
    """No dataset could be read from the source given."""


def _how_to_get_data(problem: str) -> str:
    return (
        f"{problem}\nlrpjax reads data in two ways:\n"
        "  1. --dataset cifar10: tensorflow-datasets downloads CIFAR-10 (needs internet once,\n"
        "     and `pip install tensorflow-cpu`);\n"
        "  2. --data-dir PATH: a folder in split/class/image layout (e.g. test/cat/0001.jpg),\n"
        "     or a .tar.gz of one.\n"
        "Without either, `lrpjax.data.sample()` gives the 100 shipped CIFAR-10 test images."
    )


def cache_dir() -> Path:
    """Where extracted archives and decoded splits are kept."""
    return Path(os.environ.get("LRPJAX_CACHE", Path.home() / ".cache" / "lrpjax"))


def _extract(archive: Path) -> Path:
    """Extract a ``.tar.gz`` once; a marker file written last says the extraction is whole."""
    st = archive.stat()
    digest = hashlib.sha256(
        f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()
    target = cache_dir() / f"{archive.name.split('.')[0]}-{digest[:12]}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
            while tar.fileobj.read(1 << 20):  # read to the end: the gzip CRC is checked there
                pass
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataUnavailableError(_how_to_get_data(f"cannot extract {archive}: {e}")) from None
    (target / ".complete").touch()
    return target


def _dataset_root(folder: Path, split: str) -> Path:
    """The folder that holds ``split/`` (an archive may wrap everything in one folder)."""
    if (folder / split).is_dir():
        return folder
    children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1 and (children[0] / split).is_dir():
        return children[0]
    found = sorted(c.name for c in children)
    raise DataUnavailableError(
        _how_to_get_data(f"{folder} has no '{split}' split folder (found: {found or 'nothing'})")
    )


def _decode_split(
    split_dir: Path, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image
    from tqdm.auto import tqdm

    classes = sorted(c.name for c in split_dir.iterdir() if c.is_dir())
    if not classes:
        raise DataUnavailableError(_how_to_get_data(f"no class folders under {split_dir}"))
    files = [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((split_dir / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataUnavailableError(_how_to_get_data(f"no images under {split_dir}"))
    images = []
    bar = tqdm(
        files, desc=f"decoding {split_dir.name}", unit="img", leave=False, disable=not progress
    )
    for f, _ in bar:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise DataUnavailableError(f"cannot decode image {f}: {e}") from None
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataUnavailableError(f"images under {split_dir} differ in size: {sorted(shapes)}")
    return np.stack(images), np.array([label for _, label in files], np.int32), classes


def match_classes(
    labels: np.ndarray, data_classes: Sequence[str], class_names: Sequence[str], source: str = ""
) -> np.ndarray:
    """Relabel `labels` (indices into `data_classes`) as indices into `class_names`, by name.

    Labels below 0 (unknown) stay -1.

    Raises:
      DataUnavailableError: a class of the data that has images is not in `class_names`;
        the message names it.
    """
    index = {name: i for i, name in enumerate(class_names)}
    used = sorted({int(v) for v in np.unique(labels) if v >= 0})
    unknown = [data_classes[i] for i in used if data_classes[i] not in index]
    if unknown:
        shown = ", ".join(list(class_names)[:12]) + (" ..." if len(class_names) > 12 else "")
        raise DataUnavailableError(
            f"class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} of "
            f"{source or 'the data'} {'are' if len(unknown) > 1 else 'is'} not among the "
            f"model's {len(class_names)} classes ({shown})"
        )
    table = np.array([index.get(name, -1) for name in data_classes] or [-1], np.int32)
    labels = np.asarray(labels)
    return np.where(labels >= 0, table[np.maximum(labels, 0)], -1).astype(np.int32)


def _image_folder(
    path: str | os.PathLike, split: str, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels by sorted class folder, and the sorted class folder names."""
    path = Path(path)
    if not path.exists():
        raise DataUnavailableError(_how_to_get_data(f"{path} does not exist"))
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise DataUnavailableError(_how_to_get_data(f"{path} is not a folder or .tar.gz"))
        path = _extract(path)
    root = _dataset_root(path, split)
    split_dir = root / split
    cached = split_dir.parent / f".{split}-decoded.npz"
    stamp = _tree_stamp(split_dir)  # any added, removed or rewritten file invalidates it
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                if str(npz["stamp"]) == stamp and "classes" in npz.files:
                    classes = [str(c) for c in npz["classes"]]
                    return npz["images"].astype(np.float32) / 255.0, npz["labels"], classes
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass  # a damaged cache: decode again
    images, labels, classes = _decode_split(split_dir, progress)
    tmp = None
    try:  # a private temporary name, then an atomic rename: concurrent runs never collide
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{split}-decoded.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, images=images, labels=labels, stamp=np.array(stamp), classes=np.array(classes)
            )
        os.replace(tmp, cached)
    except OSError:  # a read-only dataset folder or a full disk: decode again next time
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return images.astype(np.float32) / 255.0, labels, classes


def _tree_stamp(folder: Path) -> str:
    """A hash of every path under `folder` with its size and modification time."""
    return hashlib.sha256(
        "\n".join(
            f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}"
            for p in sorted(folder.rglob("*"))
            for st in [p.stat()]
        ).encode()
    ).hexdigest()


def stamp(source: str | os.PathLike, split: str = "test") -> str:
    """A short string that changes when an image folder's split (or an archive) changes:
    for resume keys. Sizes and modification times only (no file is read); ``""`` for
    ``"cifar10"`` and for a path that cannot be read."""
    path = Path(source)
    if str(source) == "cifar10":
        return ""
    try:
        if path.is_file():
            st = path.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        return _tree_stamp(_dataset_root(path, split) / split)[:16]
    except (OSError, DataUnavailableError):
        return ""


def image_folder(
    path: str | os.PathLike,
    split: str = "test",
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an image folder (or ``.tar.gz`` of one).

    Args:
      path: folder with ``split/class/image`` files, or a ``.tar.gz`` archive of it.
      split: the split folder's name, e.g. ``"train"`` or ``"test"``.
      progress: show a progress bar while decoding.
      class_names: a model's class names in output order: each image is labelled with the
        index of its class folder's name among them (a folder holding only some classes
        is labelled right). ``None``: the index among the split's class folders, sorted.

    Returns:
      images (N, H, W, 3) float32 in [0, 1]; labels (N,) int32.

    Raises:
      DataUnavailableError: the path is missing, unreadable, or has no such split; or a
        class folder's name is not in `class_names` (the message names it).
    """
    images, labels, classes = _image_folder(path, split, progress)
    if class_names is not None:
        labels = match_classes(labels, classes, class_names, f"{path}:{split}")
    return images, labels


def tfds_dataset(name: str = "cifar10", split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Load a split of a tensorflow-datasets image classification dataset into memory.

    Needs TensorFlow and tensorflow-datasets (``pip install tensorflow-cpu
    tensorflow-datasets``, or ``pip install ".[tfds]"`` in a checkout of lrpjax), and
    internet the first time. The first time, tfds downloads and prepares the dataset in a
    private temporary folder inside the tfds data folder (``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``), moved to its place only when complete; a failed download
    removes it (and nothing else).

    Raises:
      DataUnavailableError: in one line: what to install, or that the download failed.
    """
    alternative = "or give --data-dir with a split/class/image folder or .tar.gz of one"
    missing = [m for m in ("tensorflow_datasets", "tensorflow") if _missing_module(m)]
    if missing:
        raise DataUnavailableError(
            f"--dataset {name} needs {' and '.join(missing)} (not installed): install "
            "TensorFlow and tensorflow-datasets (pip install tensorflow-cpu "
            'tensorflow-datasets, or pip install ".[tfds]" in a checkout of lrpjax), '
            f"{alternative}"
        )
    root = Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
    prepared = any(root.glob(f"{name}/*/dataset_info.json"))
    made_root = not root.exists()
    tmp = None
    try:
        import tensorflow_datasets as tfds

        if prepared:
            where = root
        else:
            root.mkdir(parents=True, exist_ok=True)
            where = tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".lrpjax-{name}-"))
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=str(where))
        )
    except Exception as e:  # tfds raises many types: no network, bad split, broken install
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty: another process may be using it
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataUnavailableError(
            f"tensorflow-datasets could not load {name!r} ({split}); the download needs "
            f"internet ({detail}); {alternative}"
        ) from None
    if tmp is not None:  # move the prepared versions in; another process may have won
        for version in (tmp / name).glob("*") if (tmp / name).is_dir() else []:
            (root / name).mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                os.replace(version, root / name / version.name)
        shutil.rmtree(tmp, ignore_errors=True)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def _missing_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def load_with_classes(
    source: str | os.PathLike, split: str = "test", progress: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Like `load`, and the data's class names: labels index into them.

    For an image folder, its split's class folders in sorted order; for ``"cifar10"``,
    CIFAR-10's classes. Use `match_classes` to relabel by a model's class names.
    """
    if str(source) == "cifar10":
        return (*tfds_dataset("cifar10", split), list(CIFAR10_CLASSES))
    return _image_folder(source, split, progress)


def load(
    source: str | os.PathLike,
    split: str = "test",
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split from ``"cifar10"`` (tfds), an image folder, or a ``.tar.gz`` of one.

    Args:
      class_names: label by class name, as a model with these classes numbers them (see
        `image_folder`); ``None``: the source's own numbering.

    Returns:
      images (N, H, W, C) float32 in [0, 1]; labels (N,) int32.
    """
    images, labels, classes = load_with_classes(source, split, progress)
    if class_names is not None:
        labels = match_classes(labels, classes, class_names, f"{source}:{split}")
    return images, labels


def sample() -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample: 100 CIFAR-10 test images, 10 per class, with their labels.

    Returns:
      images (100, 32, 32, 3) float32 in [0, 1]; labels (100,) int32.
    """
    ref = resources.files("lrpjax") / "assets" / "cifar10_sample.npz"
    with resources.as_file(ref) as f, np.load(f, allow_pickle=False) as npz:
        return npz["images"].astype(np.float32) / 255.0, npz["labels"].astype(np.int32)
