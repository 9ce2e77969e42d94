"""The shipped weights and sample: they load offline, fast, and classify as reported."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import data, models

REAL_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def shipped_metrics() -> dict:
    ref = resources.files("lrpjax") / "assets" / "minivgg_cifar10_metrics.json"
    return json.loads(ref.read_text())


def accuracy(model, images, labels) -> float:
    graphdef, state = nnx.split(model)
    predict = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).argmax(-1))
    pred = np.concatenate(
        [np.asarray(predict(state, images[i : i + 500])) for i in range(0, len(images), 500)]
    )
    return float((pred == labels).mean())


def test_sample_has_ten_images_per_class():
    images, labels = data.sample()
    assert images.shape == (100, *models.INPUT_SHAPE) and images.dtype == np.float32
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10
    models.check_images(images)


def test_pretrained_loads_in_eval_mode_offline_without_tensorflow():
    code = (
        "import sys, time; import lrpjax; t = time.perf_counter(); m = lrpjax.load_pretrained();"
        "print(time.perf_counter() - t); assert 'tensorflow' not in sys.modules;"
        "assert m.drop1.deterministic and m.bn1.use_running_average"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print("load_pretrained:", out.stdout.strip(), "s")  # measured, not asserted


def test_header_matches_shipped_metrics():
    ref = resources.files("lrpjax") / "assets" / lrpjax.PRETRAINED
    with resources.as_file(ref) as path:
        _, meta = models.read_arrays(path)
    last = shipped_metrics()["epochs"][-1]
    assert meta["epochs"] == last["epoch"]
    assert meta["test_accuracy"] == pytest.approx(last["test_accuracy"])


def test_sample_accuracy_consistent_with_reported_test_accuracy():
    # 100 images: the sample accuracy's standard error at the reported accuracy p is
    # sqrt(p (1 - p) / 100), about 3.4 points at p = 0.87. Allow 3 standard errors.
    p = shipped_metrics()["epochs"][-1]["test_accuracy"]
    images, labels = data.sample()
    got = accuracy(lrpjax.load_pretrained(), images, labels)
    assert abs(got - p) <= 3 * np.sqrt(p * (1 - p) / len(labels)), (got, p)


@pytest.mark.slow
def test_full_test_split_matches_metrics_json(real_data_cache):
    if not REAL_ARCHIVE.exists():
        pytest.skip(f"{REAL_ARCHIVE} not found (the JPEG copy of CIFAR-10 lives in ../shared)")
    images, labels = data.image_folder(REAL_ARCHIVE, "test", progress=False)
    got = accuracy(lrpjax.load_pretrained(), images, labels)
    reported = shipped_metrics()["epochs"][-1]["test_accuracy"]
    assert abs(got - reported) <= 0.002, (got, reported)
