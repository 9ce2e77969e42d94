"""The ``lrpjax explain`` command line: outputs, options, resume, and input errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lrpjax
from lrpjax import cli, models, pipeline
from lrpjax.data import sample

LIMIT, BATCH = 12, 8
BASE = ["--limit", str(LIMIT), "--batch-size", str(BATCH), "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("summary.json", "heatmaps.png", "class_means.png", *(f"{n}.npy" for n in pipeline.ARRAYS))


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``lrpjax`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def explain_cli(out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("explain", *BASE, "--out", out, *extra)


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy") for name in pipeline.ARRAYS}


class StepSpy:
    """Wraps `pipeline.make_step` so every compiled step call is counted (and can be stopped)."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls = 0
        self.interrupt_at = interrupt_at
        real = pipeline.make_step

        def make_step(*args, **kwargs):
            step, state, num_devices = real(*args, **kwargs)

            def counted(*step_args):
                self.calls += 1
                if self.calls == self.interrupt_at:
                    raise KeyboardInterrupt
                return step(*step_args)

            return counted, state, num_devices

        monkeypatch.setattr(pipeline, "make_step", make_step)


@pytest.fixture(scope="module")
def sample_data() -> tuple[np.ndarray, np.ndarray]:
    return sample()


@pytest.fixture(scope="module")
def pretrained():
    return lrpjax.load_pretrained()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """``lrpjax explain`` with default model, data and rules on the first 12 sample images."""
    out = tmp_path_factory.mktemp("cli") / "default"
    code, stdout, stderr = explain_cli(out)
    assert code == 0, stderr
    return out, stdout


# --- the default run ----------------------------------------------------------------------


def test_default_run_writes_every_output(default_run, sample_data):
    out, stdout = default_run
    for name in FILES:
        assert (out / name).is_file(), name
    rel = np.load(out / "relevance.npy", mmap_mode="r")
    assert isinstance(rel, np.memmap)
    assert rel.shape == (LIMIT, 32, 32, 3) and rel.dtype == np.float32
    a = load_arrays(out)
    for name in ("predictions", "labels", "targets"):
        assert a[name].shape == (LIMIT,) and a[name].dtype == np.int32, name
    assert a["probabilities"].shape == (LIMIT, 10) and a["probabilities"].dtype == np.float32
    assert a["relevance_sum"].shape == (LIMIT,) and a["relevance_sum"].dtype == np.float32
    for png in ("heatmaps.png", "class_means.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    assert not list(out.glob(".partial-*"))
    np.testing.assert_array_equal(a["labels"], sample_data[1][:LIMIT])
    np.testing.assert_allclose(a["probabilities"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a["predictions"], a["probabilities"].argmax(-1))
    np.testing.assert_array_equal(a["targets"], a["predictions"])  # --target pred

    summary = json.loads((out / "summary.json").read_text())
    accuracy = float((a["predictions"] == a["labels"]).mean())
    assert summary["images"] == LIMIT
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert summary["mean_relevance_sum"] == pytest.approx(float(a["relevance_sum"].mean()))
    assert summary["settings"]["composite"] == "epsilon"
    assert summary["settings"]["init"] == "logit"
    assert summary["settings"]["limit"] == LIMIT

    lines = stdout.strip().splitlines()
    assert str(out) in lines[0]
    assert len(lines) == 2
    assert f"explained {LIMIT} images" in lines[1]
    assert f"accuracy {accuracy:.3f}" in lines[1]


def test_default_run_matches_library_explain(default_run, sample_data, pretrained):
    out, _ = default_run
    x = sample_data[0][:LIMIT]
    expected = np.asarray(lrpjax.explain(pretrained, x))
    a = load_arrays(out)
    np.testing.assert_allclose(a["relevance"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        a["relevance_sum"], a["relevance"].reshape(LIMIT, -1).sum(-1), rtol=1e-5, atol=1e-5
    )
    logits = np.asarray(pretrained(x))
    np.testing.assert_array_equal(a["predictions"], logits.argmax(-1))


def test_cli_does_not_import_tensorflow(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; from lrpjax.cli import main; "
        f"rc = main(['explain', '--limit', '4', '--batch-size', '4', '--no-progress', "
        f"'--out', {str(out)!r}]); assert rc == 0, rc; "
        "assert 'tensorflow' not in sys.modules; "
        "assert 'tensorflow_datasets' not in sys.modules"
    )
    env = {**os.environ, "LRPJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert np.load(out / "relevance.npy").shape == (4, 32, 32, 3)


# --- options ------------------------------------------------------------------------------


def test_dtype_float16(tmp_path, default_run):
    code, _, err = explain_cli(tmp_path, "--dtype", "float16")
    assert code == 0, err
    rel = np.load(tmp_path / "relevance.npy")
    assert rel.dtype == np.float16 and rel.shape == (LIMIT, 32, 32, 3)
    full = np.load(default_run[0] / "relevance.npy")
    np.testing.assert_allclose(rel.astype(np.float32), full, rtol=2e-3, atol=1e-4)


def test_target_label(tmp_path, sample_data, pretrained):
    code, _, err = explain_cli(tmp_path, "--target", "label")
    assert code == 0, err
    labels = sample_data[1][:LIMIT]
    np.testing.assert_array_equal(np.load(tmp_path / "targets.npy"), labels)
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["target"] == "label"


def test_target_class_index(tmp_path, sample_data, pretrained):
    code, _, err = explain_cli(tmp_path, "--target", "3")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "targets.npy"), np.full(LIMIT, 3))
    expected = np.asarray(lrpjax.explain(pretrained, sample_data[0][:LIMIT], target=3))
    np.testing.assert_allclose(np.load(tmp_path / "relevance.npy"), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "extra", [("--composite", "epsilon_plus_flat"), ("--init", "sglrp")], ids=lambda e: e[1]
)
def test_other_composite_and_init_run(tmp_path, extra):
    code, stdout, err = explain_cli(tmp_path, *extra)
    assert code == 0, err
    rel = np.load(tmp_path / "relevance.npy")
    assert rel.shape == (LIMIT, 32, 32, 3) and np.isfinite(rel).all()
    assert np.abs(rel).sum() > 0
    settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert settings[extra[0][2:]] == extra[1]
    assert extra[1] in stdout


def test_image_folder_data(tmp_path, image_folder, image_folder_expected):
    """--data-dir with a split/class/image folder (conftest: 3 classes x 4 images)."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "explain", "--data-dir", image_folder, "--batch-size", "8", "--target", "label",
        "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    _, folder_labels = image_folder_expected["test"]
    # Labelled by class name: airplane, cat, dog are CIFAR-10 classes 0, 3, 5 (the folder's
    # sorted order would say 0, 1, 2).
    labels = np.array([0, 3, 5])[folder_labels]
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)
    np.testing.assert_array_equal(np.load(out / "targets.npy"), labels)
    assert np.load(out / "relevance.npy").shape == (len(labels), 32, 32, 3)
    assert f"explained {len(labels)} images ({image_folder}:test)" in stdout


# --- resume -------------------------------------------------------------------------------


def test_interrupted_run_resumes_with_only_missing_chunks(tmp_path, monkeypatch):
    args = ["explain", "--limit", "20", "--batch-size", "8", "--no-progress"]  # 3 chunks
    out = tmp_path / "out"

    spy = StepSpy(monkeypatch, interrupt_at=2)
    code, _, err = run_cli(*args, "--out", out)
    assert code == 130
    assert "interrupted" in err and "resume" in err
    assert spy.calls == 2
    leftover = list(out.iterdir())
    assert len(leftover) == 1 and leftover[0].name.startswith(".partial-"), leftover
    manifest = json.loads((leftover[0] / "manifest.json").read_text())
    assert manifest["done"] == [0]

    spy = StepSpy(monkeypatch)
    code, stdout, err = run_cli(*args, "--out", out)
    assert code == 0, err
    assert "resuming: 1 of 3 chunks" in stdout
    assert spy.calls == 2  # chunks 8..16 and 16..20 only
    assert not list(out.glob(".partial-*"))
    assert json.loads((out / "summary.json").read_text())["images"] == 20

    fresh = tmp_path / "fresh"
    spy = StepSpy(monkeypatch)
    code, stdout, err = run_cli(*args, "--out", fresh)
    assert code == 0, err
    assert "resuming" not in stdout
    assert spy.calls == 3
    resumed, expected = load_arrays(out), load_arrays(fresh)
    for name in pipeline.ARRAYS:
        assert resumed[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


# --- bad input ----------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under a folder (hidden ones too): content hash and modification time."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in files
    }


def small_image_folder(root: Path, size: int, mode: str) -> Path:
    for label, name in enumerate(("cat", "dog")):
        folder = root / "test" / name
        folder.mkdir(parents=True)
        for i in range(2):
            colour = (50 * label + i) if mode == "L" else (50 * label, 100 + i, 3)
            Image.new(mode, (size, size), colour).save(folder / f"{i}.png")
    return root


def wrong_arrays_checkpoint(path: Path) -> Path:
    models.write_arrays(
        path,
        {"model/conv1/kernel": np.zeros((3, 3, 3, 32), np.float32)},
        {"format": "lrpjax-weights", "version": 1, "architecture": "MiniVGG", "num_classes": 10},
    )
    return path


def corrupt_checkpoint(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    return path


def truncated_checkpoint(path: Path) -> Path:
    whole = (Path(lrpjax.__file__).parent / "assets" / lrpjax.PRETRAINED).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def other_architecture(path: Path) -> Path:
    models.write_arrays(path, {"model/x": np.zeros(3)}, {"architecture": "ResNet"})
    return path


# (id, function of a temp dir -> extra CLI arguments, expected part of the message)
BAD_INPUTS = [
    ("composite", lambda d: ["--composite", "nope"], "unknown composite 'nope'"),
    ("init", lambda d: ["--init", "nope"], "unknown init 'nope'"),
    ("target-10", lambda d: ["--target", "10"], "outside the classes 0..9"),
    ("target-foo", lambda d: ["--target", "foo"], "--target must be pred, label or a class"),
    ("limit-0", lambda d: ["--limit", "0"], "--limit must be positive"),
    ("batch-0", lambda d: ["--batch-size", "0"], "--batch-size must be positive"),
    ("missing-ckpt", lambda d: ["--checkpoint", d / "nope.npz"], "weight file not found"),
    (
        "corrupt-ckpt",
        lambda d: ["--checkpoint", corrupt_checkpoint(d / "bad.npz")],
        "not a readable lrpjax weight file",
    ),
    (
        "truncated-ckpt",
        lambda d: ["--checkpoint", truncated_checkpoint(d / "half.npz")],
        "not a readable lrpjax weight file",
    ),
    (
        "other-arch",
        lambda d: ["--checkpoint", other_architecture(d / "resnet.npz")],
        "'ResNet' model, not MiniVGG",
    ),
    (
        "wrong-arrays",
        lambda d: ["--checkpoint", wrong_arrays_checkpoint(d / "wrong.npz")],
        "does not fit MiniVGG",
    ),
    ("missing-data", lambda d: ["--data-dir", d / "no-such-dir"], "does not exist"),
    (
        "no-split",
        lambda d: ["--data-dir", small_image_folder(d / "imgs", 32, "RGB"), "--split", "val"],
        "no 'val' split folder",
    ),
    (
        "28x28",
        lambda d: ["--data-dir", small_image_folder(d / "imgs", 28, "RGB")],
        "expected images of shape (N, 32, 32, 3)",
    ),
    (
        "28x28-grey",
        lambda d: ["--data-dir", small_image_folder(d / "imgs", 28, "L")],
        "got (4, 28, 28, 3)",
    ),
]


@pytest.mark.parametrize(
    ("make_args", "message"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_exits_2_and_keeps_earlier_output(tmp_path, default_run, make_args, message):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)  # copy2: contents and mtimes kept
    before = snapshot(out)
    code, stdout, stderr = run_cli("explain", *BASE, "--out", out, *make_args(tmp_path))
    assert code == 2, stderr
    # Progress bars of the image decoder end in "\r" (see test_no_progress_silences_decoding).
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert message in stderr, stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    assert snapshot(out) == before


def test_no_progress_silences_decoding(tmp_path):
    folder = small_image_folder(tmp_path / "imgs", 28, "RGB")
    code, _, stderr = explain_cli(tmp_path / "out", "--data-dir", folder)
    assert code == 2
    assert stderr.startswith("error: "), repr(stderr)


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    code, _, stderr = explain_cli(tmp_path / "afile" / "out")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: output folder") and "not writable" in stderr, stderr
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_target_label_needs_labels(tmp_path, monkeypatch):
    """Unlabelled images (label -1) cannot be explained for their label."""
    from lrpjax import data

    x, y = sample()
    monkeypatch.setattr(data, "sample", lambda: (x, np.full_like(y, -1)))
    code, _, stderr = explain_cli(tmp_path, "--target", "label")
    assert code == 2
    assert stderr.startswith("error: --target label needs labelled images"), stderr


# --- values outside [0, 1] ----------------------------------------------------------------


def test_check_images_accepts_valid_batch():
    models.check_images(np.zeros((2, 32, 32, 3), np.float32))
    models.check_images(np.ones((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, r"\[0, 1\]"),
        (-0.1, r"\[0, 1\]"),
        (255.0, r"\[0, 1\]"),
        (np.nan, "NaN"),
        (np.inf, "Inf"),
    ],
)
def test_check_images_refuses_bad_values(value, message):
    x = np.full((2, 32, 32, 3), 0.5, np.float32)
    x[1, 3, 4, 2] = value
    with pytest.raises(ValueError, match=message):
        models.check_images(x)


@pytest.mark.parametrize("shape", [(32, 32, 3), (2, 28, 28, 3), (2, 32, 32, 1), (2, 3, 32, 32)])
def test_check_images_refuses_bad_shapes(shape):
    with pytest.raises(ValueError, match="expected images of shape"):
        models.check_images(np.zeros(shape, np.float32))


def test_explain_refuses_nan(pretrained):
    x = np.full((2, 32, 32, 3), 0.5, np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lrpjax.explain(pretrained, x)
