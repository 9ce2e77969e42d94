"""Datasets: CIFAR-10 through tensorflow-datasets, image folders, and the shipped sample.

Every loader returns ``(images, labels)``: images (N, H, W, C) float32 in [0, 1]
(``pixels / 255``, as the reference), labels (N,) int32.

Sources, given to `load` as one string:

- ``"cifar10"``: `tfds.load` (needs internet the first time, and TensorFlow).
- an image folder, in one of three layouts (`read_folder` tells them apart):

  - ``split/class/image`` (the layout `tfds.folder_dataset.ImageFolder` reads): the split
    is chosen by name (default ``test``);
  - ``class/image``: class folders of images, no splits;
  - images alone (no sub-folders with images): unlabelled, every label is -1.

  Images are labelled by their class folder's *name*: with ``class_names`` (a model's
  classes) a folder ``cat`` gets the index of ``"cat"`` among them, whichever classes the
  folder holds, and a folder class not among them is an error naming it; without, the
  class folders in sorted order (CIFAR-10's label order for its class names). Names
  starting with ``.`` are ignored. A folder that mixes layouts, has no images, or holds a
  file that cannot be decoded is an error naming the folder or file;
- a ``.tar.gz`` of such a folder, extracted once into a cache directory
  (``$LRPJAX_CACHE`` or ``~/.cache/lrpjax``).

Image folders are decoded with Pillow and the decoded images are cached as
``.<split>-decoded.npz`` in the dataset folder (``.classes-decoded.npz`` or
``.flat-decoded.npz`` for the other layouts; in the extraction for an archive), so
TensorFlow is never imported for them.
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
from typing import NamedTuple

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "DataUnavailableError",
    "Folder",
    "cache_dir",
    "image_folder",
    "load",
    "load_with_classes",
    "match_classes",
    "read_folder",
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
        "     of class folders (cat/0001.jpg), or of images alone (unlabelled), or a .tar.gz\n"
        "     of one.\n"
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


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files and the sub-folders directly in `folder`, each sorted by name
    (names starting with ``.`` skipped: caches, markers, ``.ipynb_checkpoints``)."""
    images, folders = [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                folders.append(Path(e.path))
            elif e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(Path(e.path))
    return sorted(images), sorted(folders)


def _names(paths: Sequence[Path], at_most: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:at_most])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > at_most else "")


def _layout(folder: Path, split: str | None) -> tuple[str, Path]:
    """Which layout `folder` has, and the folder whose images are read.

    Returns ``("split", folder/split)``, ``("classes", folder)`` or ``("flat", folder)``
    (`folder` after stepping into a lone wrapping folder, as archives often have).

    Args:
      split: the split to read; ``None``: ``"test"`` in the split layout, and the other
        layouts (which have no splits) only without a split.

    Raises:
      DataUnavailableError: no images, mixed layouts, a missing split, or a split asked
        of a folder without split folders.
    """
    top = folder
    for _ in range(4):  # a lone folder wrapping the data (an archive's top folder)
        loose, folders = _scan(folder)
        class_dirs, split_dirs = [], []
        for d in folders:
            direct, inner = _scan(d)
            nested = [c for c in inner if _scan(c)[0]]
            if direct and nested:
                raise DataUnavailableError(
                    f"{d} mixes layouts: images directly in it ({_names(direct)}) and in "
                    f"sub-folders ({_names(nested)}); keep one layout: class/image, "
                    "split/class/image, or images alone"
                )
            if direct:
                class_dirs.append(d)
            elif nested:
                split_dirs.append(d)
        if loose and (class_dirs or split_dirs):
            raise DataUnavailableError(
                f"{folder} mixes layouts: images directly in it ({_names(loose)}) and in "
                f"sub-folders ({_names(class_dirs + split_dirs)}); keep one layout: images "
                "alone, class/image, or split/class/image"
            )
        if class_dirs and split_dirs:
            raise DataUnavailableError(
                f"{folder} mixes layouts: class folders of images ({_names(class_dirs)}) "
                f"beside split folders of class folders ({_names(split_dirs)}); keep one "
                "layout: class/image or split/class/image"
            )
        if split_dirs:
            wanted = split or "test"
            for d in split_dirs:
                if d.name == wanted:
                    return "split", d
            raise DataUnavailableError(
                _how_to_get_data(
                    f"{folder} has no '{wanted}' split folder with images (found: "
                    f"{_names(split_dirs, 20)}); choose one with --split"
                )
            )
        if class_dirs or loose:
            if split is not None:
                what = (
                    f"class folders ({_names(class_dirs)})"
                    if class_dirs
                    else f"images directly ({_names(loose)})"
                )
                raise DataUnavailableError(
                    f"split '{split}' was asked for, but {folder} has no split folders: it "
                    f"holds {what}; give no split (leave out --split) to read them"
                )
            return ("classes" if class_dirs else "flat"), folder
        if len(folders) != 1:
            break
        folder = folders[0]
    raise DataUnavailableError(_how_to_get_data(f"no images under {top}"))


def _listing(layout: str, where: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image files of a layout's folder in loader order, their labels (-1: none) and
    the class names (the sorted class folders, empty ones too; none for ``flat``)."""
    if layout == "flat":
        files = _scan(where)[0]
        return files, np.full(len(files), -1, np.int32), []
    class_dirs = _scan(where)[1]
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        images = _scan(d)[0]
        files += images
        labels += [label] * len(images)
    if not files:
        raise DataUnavailableError(_how_to_get_data(f"no images under {where}"))
    return files, np.array(labels, np.int32), [d.name for d in class_dirs]


def _decode_split(files: Sequence[Path], where: Path, progress: bool = True) -> np.ndarray:
    """Decode `files` (under `where`, for messages) to one uint8 (N, H, W, 3) array.

    Raises:
      DataUnavailableError: a file that cannot be read or decoded (named), or images of
        different sizes (an example of each named).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    images = []
    bar = tqdm(files, desc=f"decoding {where.name}", unit="img", leave=False, disable=not progress)
    for f in bar:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        # PIL.UnidentifiedImageError is an OSError; a broken PNG chunk raises SyntaxError.
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise DataUnavailableError(f"cannot decode image {f}: {e}") from None
    sizes: dict[tuple[int, ...], list[Path]] = {}
    for f, im in zip(files, images, strict=True):
        sizes.setdefault(im.shape, []).append(f)
    if len(sizes) > 1:
        shown = "; ".join(
            f"{len(fs)} of {w}x{h} (e.g. {fs[0].relative_to(where)})"
            for (h, w, _), fs in sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        )
        raise DataUnavailableError(
            f"images under {where} differ in size: {shown}; lrpjax does not resize images: "
            "give images of one size, the model's input size"
        )
    return np.stack(images)


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


class Folder(NamedTuple):
    """An image folder as `read_folder` reads it."""

    images: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    labels: np.ndarray  # (N,) int32 indices into `classes`; -1 (unknown) in a flat folder
    classes: list[str]  # the sorted class folders; [] for a flat folder
    files: list[str]  # each row's file, relative to the folder (to the archive's top)
    layout: str  # "split", "classes" or "flat"
    split: str | None  # the split read (the split layout), else None
    stamp: str  # changes when the files change: `stamp`


def read_folder(path: str | os.PathLike, split: str | None = None, progress: bool = True) -> Folder:
    """Read an image folder (or ``.tar.gz`` of one) in whichever layout it has.

    The layout is told from the folder: sub-folders that hold class folders of images are
    splits (``split/class/image``; a lone folder wrapping everything is stepped into),
    sub-folders that hold images are classes (``class/image``), images directly in it are
    unlabelled (every label -1, no classes). Names starting with ``.`` are ignored.

    Args:
      path: the folder, or a ``.tar.gz`` of one (extracted once into `cache_dir`).
      split: the split to read from a folder of splits (``None``: ``"test"``); a folder
        without splits is only read without one.
      progress: show a progress bar while decoding.

    Raises:
      DataUnavailableError: the path is missing or unreadable; no images; a layout mixed
        with another (images beside class folders, class folders beside split folders);
        no such split, or a split asked of a folder without splits; an image that cannot
        be decoded (named); images of different sizes. The message names the folder or file.
    """
    path = Path(path)
    if not path.exists():
        raise DataUnavailableError(_how_to_get_data(f"{path} does not exist"))
    archive = path if path.is_file() else None
    if archive is not None:
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise DataUnavailableError(_how_to_get_data(f"{path} is not a folder or .tar.gz"))
        path = _extract(path)
    layout, where = _layout(path, split)
    listed, labels, classes = _listing(layout, where)
    files = [str(f.relative_to(path)) for f in listed]
    tree = _tree_stamp(where)  # any added, removed or rewritten file invalidates the cache
    if archive is not None:
        st = archive.stat()
        content = f"{st.st_size}:{st.st_mtime_ns}"
    else:
        content = tree[:16]
    which = where.name if layout == "split" else None
    name = which if layout == "split" else layout
    cached = (where.parent if layout == "split" else where) / f".{name}-decoded.npz"

    def result(images: np.ndarray) -> Folder:
        x = images.astype(np.float32) / 255.0
        return Folder(x, labels, classes, files, layout, which, content)

    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                if (
                    str(npz["stamp"]) == tree
                    and "classes" in npz.files
                    and [str(c) for c in npz["classes"]] == classes
                    and np.array_equal(npz["labels"], labels)
                ):
                    return result(npz["images"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass  # a damaged cache: decode again
    images = _decode_split(listed, where, progress)
    tmp = None
    try:  # a private temporary name, then an atomic rename: concurrent runs never collide
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{name}-decoded.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=images,
                labels=labels,
                stamp=np.array(tree),
                classes=np.array(classes, dtype=str),
            )
        os.replace(tmp, cached)
    except OSError:  # a read-only dataset folder or a full disk: decode again next time
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return result(images)


def _image_folder(
    path: str | os.PathLike, split: str | None, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels by sorted class folder, and the sorted class folder names."""
    folder = read_folder(path, split, progress)
    return folder.images, folder.labels, folder.classes


def _tree_stamp(folder: Path) -> str:
    """A hash of every path under `folder` with its size and modification time (names
    starting with ``.``, which the loader ignores, and what is in them left out: the decoded
    cache of a folder without splits lies in it)."""
    return hashlib.sha256(
        "\n".join(
            f"{rel}:{st.st_size}:{st.st_mtime_ns}"
            for p in sorted(folder.rglob("*"))
            for rel in [p.relative_to(folder)]
            if not any(part.startswith(".") for part in rel.parts)
            for st in [p.stat()]
        ).encode()
    ).hexdigest()


def stamp(source: str | os.PathLike, split: str | None = None) -> str:
    """A short string that changes when an image folder's split (or an archive) changes:
    for resume keys. Sizes and modification times only (no file is read); ``""`` for
    ``"cifar10"`` and for a path that cannot be read. `split` as for `read_folder`."""
    path = Path(source)
    if str(source) == "cifar10":
        return ""
    try:
        if path.is_file():
            st = path.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        return _tree_stamp(_layout(path, split)[1])[:16]
    except (OSError, DataUnavailableError):
        return ""


def image_folder(
    path: str | os.PathLike,
    split: str | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an image folder (or ``.tar.gz`` of one), in any layout of
    `read_folder` (a flat folder's labels are -1).

    Args:
      path: folder with ``split/class/image``, ``class/image`` or image files, or a
        ``.tar.gz`` archive of one.
      split: the split folder's name, e.g. ``"train"`` or ``"test"``; ``None``:
        ``"test"`` for a folder of splits, and the folder itself for the other layouts.
      progress: show a progress bar while decoding.
      class_names: a model's class names in output order: each image is labelled with the
        index of its class folder's name among them (a folder holding only some classes
        is labelled right). ``None``: the index among the split's class folders, sorted.

    Returns:
      images (N, H, W, 3) float32 in [0, 1]; labels (N,) int32.

    Raises:
      DataUnavailableError: as `read_folder`; or a class folder's name is not in
        `class_names` (the message names it).
    """
    images, labels, classes = _image_folder(path, split, progress)
    if class_names is not None:
        labels = match_classes(
            labels, classes, class_names, f"{path}:{split}" if split else str(path)
        )
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
    source: str | os.PathLike, split: str | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Like `load`, and the data's class names: labels index into them.

    For an image folder, its split's class folders in sorted order (none for a flat
    folder); for ``"cifar10"``, CIFAR-10's classes. Use `match_classes` to relabel by a
    model's class names. `split` ``None``: ``"test"`` where the source has splits.
    """
    if str(source) == "cifar10":
        return (*tfds_dataset("cifar10", split or "test"), list(CIFAR10_CLASSES))
    return _image_folder(source, split, progress)


def load(
    source: str | os.PathLike,
    split: str | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split from ``"cifar10"`` (tfds), an image folder, or a ``.tar.gz`` of one.

    Args:
      split: as for `image_folder` (``None``: ``"test"`` where the source has splits).
      class_names: label by class name, as a model with these classes numbers them (see
        `image_folder`); ``None``: the source's own numbering.

    Returns:
      images (N, H, W, C) float32 in [0, 1]; labels (N,) int32.
    """
    images, labels, classes = load_with_classes(source, split, progress)
    if class_names is not None:
        where = f"{source}:{split}" if split else str(source)
        labels = match_classes(labels, classes, class_names, where)
    return images, labels


def sample() -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample: 100 CIFAR-10 test images, 10 per class, with their labels.

    Returns:
      images (100, 32, 32, 3) float32 in [0, 1]; labels (100,) int32.
    """
    ref = resources.files("lrpjax") / "assets" / "cifar10_sample.npz"
    with resources.as_file(ref) as f, np.load(f, allow_pickle=False) as npz:
        return npz["images"].astype(np.float32) / 255.0, npz["labels"].astype(np.int32)
