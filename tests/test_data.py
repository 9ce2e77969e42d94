"""Data loaders: image folders, their .tar.gz archives and decoded cache, tfds, the real copy."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrpjax import data
from lrpjax.data import DataUnavailableError

REAL_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def folder(image_folder, tmp_path) -> Path:
    """A private copy of the session's image folder, without any decoded cache in it."""
    copy = tmp_path / "images"
    shutil.copytree(image_folder, copy, ignore=shutil.ignore_patterns(".*"))
    return copy


def make_archive(folder: Path, archive: Path, wrap: str | None) -> Path:
    """A .tar.gz of an image folder's splits, optionally under one top-level directory."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if Path(info.name).name.startswith(".") else info

    with tarfile.open(archive, "w:gz") as tar:
        for split in sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")):
            name = f"{wrap}/{split}" if wrap else split
            tar.add(folder / split, arcname=name, filter=clean)
    return archive


def assert_split(images, labels, expected):
    exp_images, exp_labels = expected
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.shape == exp_images.shape == (12, 32, 32, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, exp_images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(labels, exp_labels)


def assert_names_both_ways(error: BaseException):
    message = str(error)
    assert "cifar10" in message
    assert "--data" in message
    assert "split/class/image" in message


# --- image folders -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_values_and_labels(folder, image_folder_expected, split):
    images, labels = data.image_folder(folder, split)
    assert_split(images, labels, image_folder_expected[split])
    # Sorted class order: airplane=0, cat=1, dog=2, 4 images each.
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
    assert labels[0] == 0 and labels[-1] == 2
    # `load` with a path is the same loader.
    images2, labels2 = data.load(str(folder), split)
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)


def test_splits_differ(folder):
    train_images, _ = data.image_folder(folder, "train")
    test_images, _ = data.image_folder(folder, "test")
    assert not np.array_equal(train_images, test_images)


def test_second_call_uses_the_decoded_cache(folder, image_folder_expected, monkeypatch):
    first = data.image_folder(folder, "train")
    assert (folder / ".train-decoded.npz").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_decode_split", no_decoding)
    second = data.image_folder(folder, "train")
    assert_split(*second, image_folder_expected["train"])
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])


def test_cache_is_refreshed_when_a_class_folder_changes(folder, image_folder_expected):
    data.image_folder(folder, "test")
    extra = folder / "test" / "cat" / "999.png"
    shutil.copy(folder / "test" / "cat" / "000.png", extra)
    images, labels = data.image_folder(folder, "test")
    assert images.shape == (13, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(labels), [4, 5, 4])


def test_cache_is_refreshed_when_an_image_is_rewritten(folder):
    data.image_folder(folder, "test")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "test" / "cat" / "000.png")
    images, labels = data.image_folder(folder, "test")
    assert labels[4] == 1  # cat's first image follows airplane's four
    np.testing.assert_array_equal(images[4], 0.0)


@pytest.mark.parametrize(
    ("name", "wrap"),
    [("mini.tar.gz", None), ("mini.tar.gz", "cifar-mini"), ("other.tgz", "top")],
    ids=["flat", "wrapped", "tgz-wrapped"],
)
def test_archive_gives_the_same_arrays(folder, image_folder_expected, tmp_path, name, wrap):
    archive = make_archive(folder, tmp_path / name, wrap)
    for split in ("train", "test"):
        from_folder = data.image_folder(folder, split)
        from_archive = data.image_folder(archive, split)
        assert_split(*from_archive, image_folder_expected[split])
        np.testing.assert_array_equal(from_archive[0], from_folder[0])
        np.testing.assert_array_equal(from_archive[1], from_folder[1])
    # Extracted under $LRPJAX_CACHE (the session's temp dir), never beside the archive.
    cache = data.cache_dir()
    assert cache == Path(os.environ["LRPJAX_CACHE"])
    assert any(p.name.startswith(name.split(".")[0] + "-") for p in cache.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["images", name])


def test_archive_second_call_uses_extraction_and_cache(
    folder, image_folder_expected, tmp_path, monkeypatch
):
    archive = make_archive(folder, tmp_path / "again.tar.gz", "wrapped")
    first = data.image_folder(archive, "test")

    def fail(*args, **kwargs):
        raise AssertionError("extracted or decoded again")

    monkeypatch.setattr(data, "_decode_split", fail)
    monkeypatch.setattr(data.tarfile, "open", fail)
    second = data.image_folder(archive, "test")
    assert_split(*second, image_folder_expected["test"])
    np.testing.assert_array_equal(second[0], first[0])


# --- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(missing, "train")
    assert str(missing) in str(info.value)
    assert_names_both_ways(info.value)
    with pytest.raises(DataUnavailableError):
        data.load(str(missing), "test")


def test_folder_without_the_split(folder):
    shutil.rmtree(folder / "test")
    data.image_folder(folder, "train")  # the other split still loads
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(folder, "test")
    assert "'test'" in str(info.value)
    assert_names_both_ways(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(tmp_path, "train")
    assert_names_both_ways(info.value)


def test_split_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(tmp_path, "train")
    assert "no images" in str(info.value)
    assert_names_both_ways(info.value)


def test_empty_split_folder(tmp_path):
    (tmp_path / "test").mkdir()
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(tmp_path, "test")
    assert_names_both_ways(info.value)


def test_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(path, "test")
    assert_names_both_ways(info.value)


def _garbage(good: bytes) -> bytes:
    return b"definitely not gzip data\n" * 200


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _not_a_tar(good: bytes) -> bytes:
    import gzip

    return gzip.compress(b"plain text, not a tar archive\n" * 100)


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _not_a_tar], ids=lambda f: f.__name__)
def test_corrupt_archive(folder, tmp_path, corrupt):
    good = make_archive(folder, tmp_path / "good.tar.gz", None).read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(corrupt(good))
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(bad, "test")
    assert str(bad) in str(info.value)
    assert_names_both_ways(info.value)
    # Nothing half-extracted is left in the cache to be taken for a good extraction.
    assert not [p for p in data.cache_dir().glob("bad-*") if (p / ".complete").exists()]


def test_undecodable_image_raises_data_unavailable(folder):
    (folder / "test" / "cat" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(DataUnavailableError):
        data.image_folder(folder, "test")


def stored_tar_gz(folder: Path, notes_size: int = 0, block_at: int | None = None):
    """A .tar.gz of a folder's splits whose deflate blocks are stored, not compressed.

    The tar bytes then appear verbatim in the file, so a test can corrupt exactly what it
    means to. The archive starts with a ``notes.txt`` of `notes_size` bytes (the loader
    ignores it) and ends with 64 KiB of zero blocks after the end-of-archive marker (valid
    tar padding), so tarfile never reads the gzip trailer. A new block starts at tar offset
    `block_at`. Returns the gzip bytes, the tar bytes and the gzip offset of that block.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if notes_size:
            info = tarfile.TarInfo("notes.txt")
            info.size = notes_size
            tar.addfile(info, io.BytesIO(b"n" * notes_size))
        for split in ("test", "train"):
            tar.add(folder / split, arcname=split)
    raw = buffer.getvalue() + bytes(64 * 1024)
    compressor = zlib.compressobj(0, zlib.DEFLATED, 31)  # level 0, gzip wrapper
    out, block = b"", None
    if block_at is not None:
        out = compressor.compress(raw[:block_at]) + compressor.flush(zlib.Z_FULL_FLUSH)
        block = len(out)
        raw_rest = raw[block_at:]
    else:
        raw_rest = raw
    out += compressor.compress(raw_rest) + compressor.flush()
    return bytearray(out), raw, block


def test_stored_tar_gz_helper_makes_valid_archives(folder, image_folder_expected, tmp_path):
    gz, raw, block = stored_tar_gz(folder, notes_size=256 * 1024, block_at=100_000)
    assert gzip.decompress(bytes(gz)) == raw
    assert gz[block + 1 : block + 3] != gz[block + 3 : block + 5]  # LEN, then NLEN = ~LEN
    archive = tmp_path / "stored.tar.gz"
    archive.write_bytes(bytes(gz))
    assert_split(*data.image_folder(archive, "test"), image_folder_expected["test"])


def test_archive_with_corrupted_image_bytes(folder, tmp_path):
    gz, _, _ = stored_tar_gz(folder)
    gz[gz.index(b"IDAT") + 8] ^= 0xFF  # inside the first image's pixel data
    archive = tmp_path / "flipped.tar.gz"
    archive.write_bytes(bytes(gz))
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(archive, "test")
    assert_names_both_ways(info.value)


def test_archive_with_broken_deflate_stream(folder, tmp_path):
    notes_size = 256 * 1024
    _, raw, _ = stored_tar_gz(folder, notes_size)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        notes_start = tar.getmember("notes.txt").offset_data
    gz, _, block = stored_tar_gz(folder, notes_size, block_at=notes_start + notes_size // 2)
    gz[block + 3] ^= 0xFF  # the stored block's NLEN no longer complements its LEN
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(bytes(gz))
    with pytest.raises(DataUnavailableError) as info:
        data.image_folder(archive, "test")
    assert_names_both_ways(info.value)


# --- tensorflow-datasets -------------------------------------------------------------------


def test_cifar10_without_download_raises_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    """TensorFlow present (pretended), no internet: one line; tfds's folders are removed."""
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    (tfds_dir / "mnist").mkdir()  # there before: must stay
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        (Path(kwargs["data_dir"]) / "cifar10" / "3.0.2").mkdir(parents=True)  # as tfds does
        (Path(kwargs["data_dir"]) / "downloads").mkdir()
        raise ConnectionError("no internet here")

    monkeypatch.setattr(data, "_missing_module", lambda name: False)
    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(DataUnavailableError) as info:
        data.load("cifar10", "test")
    assert calls and calls[0][0][0] == "cifar10"
    assert calls[0][1]["split"] == "test"
    assert "no internet here" in str(info.value) and "internet" in str(info.value)
    assert "\n" not in str(info.value)
    assert_names_both_ways(info.value)
    assert sorted(p.name for p in tfds_dir.iterdir()) == ["mnist"]


def test_cifar10_download_in_a_private_folder_moved_in_when_complete(monkeypatch, tmp_path):
    """Another process's download in progress is never touched; a finished download is moved
    into the tfds folder, and the next load reads it from there."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds_dir = tmp_path / "tfds"
    other = tfds_dir / "cifar10" / "3.0.2.incomplete-other"  # another process's download
    other.mkdir(parents=True)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    seen = []

    def fake_load(name, *, split, data_dir, **kwargs):
        seen.append(Path(data_dir))
        version = Path(data_dir) / name / "3.0.2"
        if not (version / "dataset_info.json").exists():
            version.mkdir(parents=True)
            (Path(data_dir) / "downloads").mkdir()
            (version / "dataset_info.json").write_text("{}")
        return np.zeros((2, 32, 32, 3), np.uint8), np.array([3, 5])

    monkeypatch.setattr(data, "_missing_module", lambda name: False)
    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda x: x)
    images, labels = data.load("cifar10", "test")
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 5]
    assert seen[0].parent == tfds_dir and seen[0].name.startswith(".lrpjax-cifar10-")
    assert sorted(p.name for p in tfds_dir.iterdir()) == ["cifar10"]  # no downloads/, no tmp
    assert sorted(p.name for p in (tfds_dir / "cifar10").iterdir()) == [
        "3.0.2", "3.0.2.incomplete-other",
    ]  # fmt: skip
    data.load("cifar10", "test")
    assert seen[1] == tfds_dir  # prepared: read in place


def test_cifar10_without_tensorflow_says_what_to_install(monkeypatch, tmp_path):
    """tensorflow-datasets without TensorFlow (as here): one line naming the install."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
    with pytest.raises(DataUnavailableError) as info:
        data.load("cifar10", "test")
    message = str(info.value)
    assert "\n" not in message
    assert "needs tensorflow (not installed)" in message
    assert "pip install tensorflow-cpu" in message and 'pip install ".[tfds]"' in message
    assert "lrpjax[tfds]" not in message  # not on PyPI
    assert_names_both_ways(info.value)
    assert not (tmp_path / "tfds").exists() and not (tmp_path / "home").exists()


def test_cifar10_without_tfds_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(DataUnavailableError) as info:
        data.load("cifar10", "train")
    assert "tensorflow_datasets" in str(info.value)
    assert_names_both_ways(info.value)


# --- labels by class name ------------------------------------------------------------------

CIFAR10 = data.CIFAR10_CLASSES


def test_image_folder_labels_by_class_name(folder, image_folder_expected):
    """cat/airplane/dog: CIFAR-10 indices 3/0/5, not the folder order 1/0/2."""
    images, labels = data.image_folder(folder, "test", progress=False, class_names=CIFAR10)
    exp_images, exp_labels = image_folder_expected["test"]
    np.testing.assert_array_equal(images, exp_images.astype(np.float32) / 255.0)
    by_name = np.array([CIFAR10.index(n) for n in ("airplane", "cat", "dog")])
    np.testing.assert_array_equal(labels, by_name[exp_labels])
    assert labels.dtype == np.int32
    # the cached decode gives the same (class names are cached too)
    again = data.load(folder, "test", progress=False, class_names=CIFAR10)[1]
    np.testing.assert_array_equal(again, labels)
    _, _, classes = data.load_with_classes(folder, "test", progress=False)
    assert classes == ["airplane", "cat", "dog"]


def test_image_folder_with_an_unknown_class_names_it(folder):
    (folder / "test" / "cat").rename(folder / "test" / "kitten")
    with pytest.raises(DataUnavailableError, match="'kitten'") as info:
        data.image_folder(folder, "test", progress=False, class_names=CIFAR10)
    assert "not among the model's 10 classes" in str(info.value)
    assert "'dog'" not in str(info.value)


def test_match_classes_keeps_unknown_labels():
    labels = np.array([0, 1, -1, 1], np.int32)
    out = data.match_classes(labels, ["b", "a"], ["a", "x", "b"])
    np.testing.assert_array_equal(out, [2, 0, -1, 0])


def test_old_cache_without_class_names_is_decoded_again(folder, image_folder_expected):
    data.image_folder(folder, "test", progress=False)
    cached = folder / ".test-decoded.npz"
    with np.load(cached) as npz:
        old = {k: npz[k] for k in npz.files if k != "classes"}
    np.savez(cached, **old)
    _, labels = data.image_folder(folder, "test", progress=False, class_names=CIFAR10)
    assert labels.max() == CIFAR10.index("dog")
    with np.load(cached) as npz:
        assert list(npz["classes"]) == ["airplane", "cat", "dog"]


def test_truncated_cache_is_decoded_again(folder, image_folder_expected):
    data.image_folder(folder, "test", progress=False)
    cached = folder / ".test-decoded.npz"
    cached.write_bytes(cached.read_bytes()[:200])  # as a kill while writing it would leave
    assert_split(*data.image_folder(folder, "test", progress=False), image_folder_expected["test"])
    with np.load(cached) as npz:  # rewritten whole
        assert npz["images"].shape == (12, 32, 32, 3)


def test_cache_write_failure_leaves_no_temporary_file(folder, image_folder_expected, monkeypatch):
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert_split(*data.image_folder(folder, "test", progress=False), image_folder_expected["test"])
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]


def test_stamp_changes_with_the_files(folder, tmp_path):
    before = data.stamp(folder, "test")
    assert before and before == data.stamp(folder, "test")
    assert data.stamp(folder, "train") != before
    first = next((folder / "test" / "cat").iterdir())
    first.write_bytes(first.read_bytes() + b"\0")
    assert data.stamp(folder, "test") != before
    assert data.stamp("cifar10", "test") == "" and data.stamp(tmp_path / "nothing") == ""


def test_image_folder_does_not_import_tensorflow(folder):
    code = (
        "import sys, lrpjax.data as d\n"
        f"x, y = d.image_folder({str(folder)!r}, 'test')\n"
        "assert x.shape == (12, 32, 32, 3), x.shape\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (folder / ".test-decoded.npz").is_file()  # it did decode, not read a cache


# --- the real dataset copy -----------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10_copy(real_data_cache):
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"no CIFAR-10 copy at {REAL_ARCHIVE}")
    images, labels = data.load(str(REAL_ARCHIVE), "test", progress=False)
    assert data.cache_dir() == real_data_cache
    assert images.shape == (10000, 32, 32, 3)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
    # Pixels are whole multiples of 1/255 (decoded bytes), and the images are not blank.
    np.testing.assert_allclose(images[:10] * 255, np.round(images[:10] * 255), atol=1e-3)
    assert images.std() > 0.1


# --- layouts without splits, file names ------------------------------------------------------


def write_images(folder: Path, names, size: int = 32) -> list[np.ndarray]:
    """PNG (or JPEG, by suffix) images of distinct colours; returns their uint8 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = []
    for i, name in enumerate(names):
        x = np.full((size, size, 3), (20 * i, 250 - 20 * i, 9), np.uint8)
        Image.fromarray(x).save(folder / name)
        pixels.append(x)
    return pixels


def test_flat_folder_is_read_unlabelled_in_name_order(tmp_path, monkeypatch):
    pixels = write_images(tmp_path, ["b.png", "a.png", "c.png"])
    (tmp_path / "notes.txt").write_text("not an image")  # ignored, as in class folders
    read = data.read_folder(tmp_path, progress=False)
    assert (read.layout, read.split, read.classes) == ("flat", None, [])
    assert read.files == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(read.labels, [-1, -1, -1])
    assert read.labels.dtype == np.int32
    expected = np.stack([pixels[1], pixels[0], pixels[2]]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(read.images, expected)
    images, labels = data.image_folder(tmp_path)  # the loaders take it too
    np.testing.assert_array_equal(images, read.images)
    np.testing.assert_array_equal(labels, read.labels)
    # The decoded cache lies in the folder itself: it must not change the folder's stamp.
    assert (tmp_path / ".flat-decoded.npz").is_file()
    assert data.stamp(tmp_path) == read.stamp != ""

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_decode_split", no_decoding)
    np.testing.assert_array_equal(data.read_folder(tmp_path).images, read.images)


def test_class_folders_without_splits(folder, image_folder_expected, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folder / "test", bare)
    read = data.read_folder(bare, progress=False)
    assert (read.layout, read.split, read.classes) == ("classes", None, ["airplane", "cat", "dog"])
    assert_split(read.images, read.labels, image_folder_expected["test"])
    assert read.files == [f"{c}/{i:03d}.png" for c in ("airplane", "cat", "dog") for i in range(4)]
    _, labels = data.load(bare, class_names=data.CIFAR10_CLASSES)  # by name: 0, 3, 5
    np.testing.assert_array_equal(labels, np.array([0, 3, 5])[image_folder_expected["test"][1]])


def test_files_are_relative_to_the_folder_or_the_archive(folder, tmp_path):
    expected = [f"test/{c}/{i:03d}.png" for c in ("airplane", "cat", "dog") for i in range(4)]
    read = data.read_folder(folder)
    assert (read.layout, read.split) == ("split", "test")  # the default split
    assert read.files == expected
    assert data.read_folder(folder, "train").files == [f.replace("test", "train") for f in expected]
    archive = make_archive(folder, tmp_path / "wrapped.tar.gz", "top")
    from_archive = data.read_folder(archive)
    assert from_archive.files == [f"top/{f}" for f in expected]
    assert from_archive.stamp == data.stamp(archive)


def test_names_starting_with_a_dot_are_ignored(folder, image_folder_expected):
    checkpoints = folder / "test" / ".ipynb_checkpoints"
    write_images(checkpoints, ["000-checkpoint.png"])
    write_images(folder / "test" / "cat", [".hidden.png"])
    read = data.read_folder(folder, "test")
    assert read.classes == ["airplane", "cat", "dog"]
    assert_split(read.images, read.labels, image_folder_expected["test"])


def _loose_beside_classes(root: Path) -> str:
    write_images(root, ["loose.png"])
    write_images(root / "cat", ["0.png"])
    return "images directly in it (loose.png) and in sub-folders (cat)"


def _classes_beside_splits(root: Path) -> str:
    write_images(root / "cat", ["0.png"])
    write_images(root / "test" / "dog", ["0.png"])
    return "class folders of images (cat) beside split folders of class folders (test)"


def _class_folder_with_nested_images(root: Path) -> str:
    write_images(root / "cat", ["0.png"])
    write_images(root / "cat" / "kittens", ["1.png"])
    return "cat mixes layouts: images directly in it (0.png) and in sub-folders (kittens)"


@pytest.mark.parametrize(
    "make", [_loose_beside_classes, _classes_beside_splits, _class_folder_with_nested_images]
)
def test_mixed_layouts_are_an_error_naming_them(tmp_path, make):
    message = make(tmp_path)
    with pytest.raises(DataUnavailableError, match="mixes layouts") as info:
        data.read_folder(tmp_path)
    assert message in str(info.value)


def test_a_split_of_a_folder_without_splits_is_an_error(tmp_path):
    write_images(tmp_path / "cat", ["0.png"])
    with pytest.raises(DataUnavailableError, match="has no split folders") as info:
        data.read_folder(tmp_path, "test")
    assert "class folders (cat)" in str(info.value)
    with pytest.raises(DataUnavailableError, match="has no split folders"):
        data.read_folder(tmp_path / "cat", "test")  # images alone


def test_empty_folder_says_no_images(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataUnavailableError, match="no images under") as info:
        data.read_folder(tmp_path)
    assert_names_both_ways(info.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_undecodable_image_in_a_flat_folder_is_named(tmp_path, kind):
    write_images(tmp_path, ["a.png", "b.png"])
    good = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(b"not a png" if kind == "garbage" else good[: len(good) // 2])
    with pytest.raises(DataUnavailableError, match="cannot decode image") as info:
        data.read_folder(tmp_path, progress=False)
    assert str(tmp_path / "b.png") in str(info.value)


def test_images_of_different_sizes_name_an_example_of_each(tmp_path):
    write_images(tmp_path / "cat", ["0.png", "1.png"])
    write_images(tmp_path / "dog", ["small.png"], size=28)
    with pytest.raises(DataUnavailableError, match="differ in size") as info:
        data.read_folder(tmp_path, progress=False)
    message = str(info.value)
    assert "2 of 32x32 (e.g. cat/0.png)" in message and "1 of 28x28 (e.g. dog/small.png)" in message
