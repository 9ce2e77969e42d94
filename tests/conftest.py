"""Shared fixtures: a tiny image folder with known pixels, and a private cache directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

SPLITS = ("train", "test")
#: Written in this (unsorted) order; the loaders must label them in sorted order.
CLASSES_WRITTEN = ("cat", "airplane", "dog")
CLASSES_SORTED = tuple(sorted(CLASSES_WRITTEN))  # airplane=0, cat=1, dog=2
IMAGES_PER_CLASS = 4
SIZE = 32
MARK_PIXEL = (0, 1)  # (row, column) painted with MARK_COLOUR, so a transpose shows
MARK_COLOUR = (255, 0, 255)
#: The cache directory the caller configured, if any, before the session replaced it.
OUTER_LRPJAX_CACHE = os.environ.get("LRPJAX_CACHE")


def image_pixels(split: str, label: int, index: int) -> np.ndarray:
    """The uint8 (32, 32, 3) pixels of one fixture image: a constant colour, one marked pixel."""
    s = SPLITS.index(split)
    colour = (40 * label + 10 * index + 5 * s, 255 - 30 * label - index, 7 * index + 100 * s)
    pixels = np.empty((SIZE, SIZE, 3), np.uint8)
    pixels[...] = colour
    pixels[MARK_PIXEL] = MARK_COLOUR
    return pixels


def expected_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and int32 labels of a fixture split, in the order the loader must give."""
    images, labels = [], []
    for label in range(len(CLASSES_SORTED)):
        for index in range(IMAGES_PER_CLASS):
            images.append(image_pixels(split, label, index))
            labels.append(label)
    return np.stack(images), np.array(labels, np.int32)


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
    """Point LRPJAX_CACHE (and JAX's compilation cache) at session temp dirs, then restore."""
    old_env = os.environ.get("LRPJAX_CACHE")
    os.environ["LRPJAX_CACHE"] = str(tmp_path_factory.mktemp("lrpjax-cache"))
    # Identical programs compiled again (each `train` call builds new jitted steps) load from
    # disk instead of recompiling: the train tests take seconds instead of a minute.
    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax-cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    old_options = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    yield
    for name, value in old_options.items():
        jax.config.update(name, value)
    if old_env is None:
        os.environ.pop("LRPJAX_CACHE", None)
    else:
        os.environ["LRPJAX_CACHE"] = old_env


@pytest.fixture
def real_data_cache(monkeypatch) -> Path:
    """The cache for the real dataset: the caller's LRPJAX_CACHE, else one kept in the temp dir.

    Extracting the 60,000 files of the CIFAR-10 copy takes from seconds to minutes depending
    on the disk, so it is done once per machine rather than once per session: a configured
    LRPJAX_CACHE usually holds it already; otherwise it goes to ``$TMPDIR/lrpjax-test-cache``,
    which later sessions reuse. (Never ``~/.cache``.)
    """
    if OUTER_LRPJAX_CACHE and Path(OUTER_LRPJAX_CACHE).is_dir():
        cache = Path(OUTER_LRPJAX_CACHE)
    else:
        cache = Path(tempfile.gettempdir()) / "lrpjax-test-cache"
    monkeypatch.setenv("LRPJAX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A split/class/image folder: train and test, classes cat/airplane/dog, 4 PNGs each."""
    root = tmp_path_factory.mktemp("image-folder")
    for split in SPLITS:
        for name in CLASSES_WRITTEN:
            folder = root / split / name
            folder.mkdir(parents=True)
            label = CLASSES_SORTED.index(name)
            for index in range(IMAGES_PER_CLASS):
                Image.fromarray(image_pixels(split, label, index)).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder_expected() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: the uint8 images and int32 labels that `image_folder` holds, loader order."""
    return {split: expected_split(split) for split in SPLITS}


def pytest_collection_modifyitems(config, items):
    """The notebooks (the longest tests, a minute or more each) first: pytest-xdist hands
    the first tests out in turn, so they start on different workers instead of one of
    them finishing the suite alone."""
    items.sort(key=lambda item: item.path.name != "test_notebooks.py")  # stable sort
