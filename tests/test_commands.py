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
from lrpjax import models
from lrpjax.commands import main as cli
from lrpjax.data import sample
from lrpjax.runs import explain as pipeline

LIMIT, BATCH = 12, 8
BASE = ["--limit", str(LIMIT), "--batch-size", str(BATCH), "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = (
    "summary.json", "heatmaps.png", "class_means.png", "files.txt",
    *(f"{n}.npy" for n in pipeline.ARRAYS),
)  # fmt: skip


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
    assert summary["settings"]["composite"] == "epsilon_gamma_box"  # composites.DEFAULT
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
        "import sys; from lrpjax.commands.main import main; "
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


def test_a_saved_composite_file_is_explained_and_recorded(tmp_path, sample_data, pretrained):
    tuned = lrpjax.composites.epsilon_gamma_box(gamma=0.5)
    path = tmp_path / "tuned.json"
    lrpjax.composites.save(tuned, path)
    out = tmp_path / "out"
    code, _, err = explain_cli(out, "--composite", str(path))
    assert code == 0, err
    expected = np.asarray(lrpjax.explain(pretrained, sample_data[0][:LIMIT], composite=tuned))
    np.testing.assert_allclose(np.load(out / "relevance.npy"), expected, rtol=1e-4, atol=1e-6)
    recorded = json.loads((out / "summary.json").read_text())["settings"]["composite"]
    assert lrpjax.composites.from_json(recorded) == tuned  # the contents, not the file name
    path.write_text("{")
    code, _, err = explain_cli(tmp_path / "bad", "--composite", str(path))
    assert code == 2 and "not a readable JSON composite" in err


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


def flat_folder(root: Path, names=("b.png", "a.png", "c.jpg"), sizes=None) -> Path:
    """Unlabelled images directly in `root`, of distinct colours (written out of name order)."""
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        size = sizes[i] if sizes else 32
        Image.new("RGB", (size, size), (40 * i, 200 - 30 * i, 7)).save(root / name)
    return root


def class_folders(root: Path, classes=("cat", "dog")) -> Path:
    """class/image folders (no splits), 2 images each."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (50 * label, 100 + i, 3)).save(root / name / f"{i}.png")
    return root


def mixed_folder(root: Path) -> Path:
    """Class folders and an image beside them."""
    class_folders(root)
    Image.new("RGB", (32, 32)).save(root / "x.png")
    return root


def empty_folder(root: Path) -> Path:
    (root / "cat").mkdir(parents=True)
    return root


def broken_image(folder: Path, name: str, how: str) -> Path:
    good = (folder / "a.png").read_bytes()
    (folder / name).write_bytes(b"not an image" if how == "garbage" else good[: len(good) // 2])
    return folder


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
    (
        "28x28-flat",
        lambda d: ["--data-dir", flat_folder(d / "flat", sizes=(28, 28, 28))],
        "lrpjax does not resize images",
    ),
    (
        "flat-sizes-differ",
        lambda d: ["--data-dir", flat_folder(d / "flat", sizes=(32, 28, 32))],
        "differ in size: 2 of 32x32 (e.g. b.png); 1 of 28x28 (e.g. a.png)",
    ),
    (
        "flat-target-label",
        lambda d: ["--data-dir", flat_folder(d / "flat"), "--target", "label"],
        "--target label needs labelled images",
    ),
    ("empty-dir", lambda d: ["--data-dir", empty_folder(d / "empty")], "no images under"),
    (
        "corrupt-image",
        lambda d: ["--data-dir", broken_image(flat_folder(d / "flat"), "bad.png", "garbage")],
        "/flat/bad.png: ",  # cannot decode image PATH: why
    ),
    (
        "truncated-image",
        lambda d: ["--data-dir", broken_image(flat_folder(d / "flat"), "half.png", "truncated")],
        "/flat/half.png: ",
    ),
    (
        "mixed-images-and-classes",
        lambda d: ["--data-dir", mixed_folder(d / "mixed")],
        "mixes layouts: images directly in it (x.png) and in sub-folders (cat, dog)",
    ),
    (
        "split-of-class-folders",
        lambda d: ["--data-dir", class_folders(d / "pets"), "--split", "test"],
        "has no split folders: it holds class folders (cat, dog)",
    ),
    ("split-without-data", lambda d: ["--split", "train"], "--split needs --data-dir"),
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


# --- a lock on the output folder ----------------------------------------------------------

HOLD_LOCK = (
    "import sys; from lrpjax.runs.store import lock_output\n"
    "with lock_output(sys.argv[1]):\n"
    "    print('locked', flush=True); sys.stdin.read()\n"
)


def test_second_run_on_a_locked_folder_fails_and_changes_nothing(tmp_path, default_run):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        code, stdout, stderr = explain_cli(out)
        assert code == 2, stderr
        assert stderr.startswith("error: output folder") and "in use by another" in stderr
        assert f"pid {holder.pid}" in stderr
        assert len(stderr.strip().splitlines()) == 1 and stdout == ""
        assert snapshot(out) == before
    finally:
        holder.communicate("", timeout=60)
    assert not (out / pipeline.LOCK_NAME).exists()  # removed by its holder
    code, _, stderr = explain_cli(out, "--target", "3")  # free again: runs
    assert code == 0, stderr
    assert not (out / pipeline.LOCK_NAME).exists()


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / pipeline.LOCK_NAME).write_text("pid 1 on elsewhere")  # no process holds it
    code, _, stderr = explain_cli(out)
    assert code == 0, stderr
    assert (out / "summary.json").is_file() and not (out / pipeline.LOCK_NAME).exists()


# --- any model, labels by class name ------------------------------------------------------

#: The README's example of a user-defined model (a module on the current directory).
MYNETS = """
from flax import nnx

from lrpjax.layers import Flatten, ReLU


class SmallNet(nnx.Module):
    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=(4, 4), rngs=rngs)
        self.relu = ReLU()
        self.flatten = Flatten()
        self.dense = nnx.Linear(8 * 8 * 4, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.flatten(self.relu(self.conv(x))))


def make_net():
    return SmallNet(3, rngs=nnx.Rngs(0))


def make_wide():
    return SmallNet(100, rngs=nnx.Rngs(0))


def make_ten():
    return SmallNet(10, rngs=nnx.Rngs(0))


class Other(SmallNet):
    pass


def make_other():
    return Other(3, rngs=nnx.Rngs(0))
"""


@pytest.fixture
def mynets(tmp_path, monkeypatch):
    """`mynets.py` in the current directory, as a user would have it; returns the module."""
    import importlib

    (tmp_path / "mynets.py").write_text(MYNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynets", None)
    module = importlib.import_module("mynets")
    yield module
    sys.modules.pop("mynets", None)


def test_user_model_with_its_class_names(tmp_path, mynets, image_folder, image_folder_expected):
    """A 3-class model whose classes are named in another order than the folder's."""
    from flax import nnx

    model = mynets.SmallNet(3, rngs=nnx.Rngs(3))
    names = ["dog", "airplane", "cat"]
    models.save(model, "mynet.npz", class_names=names, input_shape=(32, 32, 3))
    out = tmp_path / "out"
    code, _stdout, err = run_cli(
        "explain", "--model", "mynets:make_net", "--checkpoint", "mynet.npz",
        "--data-dir", image_folder, "--target", "label", "--batch-size", "8",
        "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    images, folder_labels = image_folder_expected["test"]  # airplane, cat, dog = 0, 1, 2
    labels = np.array([names.index(c) for c in ("airplane", "cat", "dog")])[folder_labels]
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)
    np.testing.assert_array_equal(np.load(out / "targets.npy"), labels)
    assert np.load(out / "probabilities.npy").shape == (len(labels), 3)
    expected = np.asarray(lrpjax.explain(model, images.astype(np.float32) / 255.0, target=labels))
    np.testing.assert_allclose(np.load(out / "relevance.npy"), expected, rtol=1e-4, atol=1e-6)
    assert (out / "heatmaps.png").read_bytes()[:8] == PNG_MAGIC

    code, _, err = run_cli(
        "explain", "--model", "mynets:make_net", "--checkpoint", "mynet.npz",
        "--data-dir", image_folder, "--target", "3", "--out", tmp_path / "out3",
    )  # fmt: skip
    assert code == 2 and "error: --target 3 is outside the classes 0..2" in err, err


def test_hundred_classes_end_to_end(tmp_path, mynets):
    """A 100-class model: labels by name, figures with a readable subset, a summary."""
    from flax import nnx

    names = [f"c{i}" for i in range(100)]
    models.save(mynets.SmallNet(100, rngs=nnx.Rngs(1)), "wide.npz", class_names=names)
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("c7", "c42", "c99"):
        (root / "test" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "test" / name / f"{i}.png")
    out = tmp_path / "out"
    code, _stdout, err = run_cli(
        "explain", "--model", "mynets:make_wide", "--checkpoint", "wide.npz", "--data-dir",
        root, "--target", "57", "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    # folders in sorted order, c42 < c7 < c99; each labelled with its class's index
    np.testing.assert_array_equal(np.load(out / "labels.npy"), np.repeat([42, 7, 99], 3))
    np.testing.assert_array_equal(np.load(out / "targets.npy"), np.full(9, 57))
    assert np.load(out / "probabilities.npy").shape == (9, 100)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 9 and summary["settings"]["target"] == 57
    for png in ("heatmaps.png", "class_means.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_unknown_folder_class_is_an_error_naming_it(tmp_path, default_run):
    root = small_image_folder(tmp_path / "imgs", 32, "RGB")  # cat, dog
    (root / "test" / "dog").rename(root / "test" / "wolf")
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    before = snapshot(out)
    code, _stdout, err = explain_cli(out, "--data-dir", root)
    assert code == 2
    assert err.startswith("error: class 'wolf' of ") and "'cat'" not in err, err
    assert "not among the model's 10 classes" in err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], "unknown model 'resnet'; shipped models: minivgg"),
        (["--model", "mynets:make_net"], "--model mynets:make_net needs --checkpoint"),
        (["--model", "nosuchmodule:make", "--checkpoint", "w.npz"], "cannot import"),
        (["--model", "mynets:nothing", "--checkpoint", "w.npz"], "has no 'nothing'"),
        (["--model", "mynets:make_other", "--checkpoint", "w.npz"],
         "holds a 'SmallNet' model, but the factory builds 'Other'"),
        (["--model", "minivgg", "--checkpoint", "w.npz"],
         "holds a 'SmallNet' model, but --model minivgg builds 'MiniVGG'"),
        (["--checkpoint", "w.npz"], "holds a 'SmallNet' model, not MiniVGG"),
    ],
    ids=["unknown-name", "no-checkpoint", "no-module", "no-factory", "other-class",
         "shipped-arch", "no-model"],
)  # fmt: skip
def test_bad_model_options(tmp_path, mynets, args, message):
    models.save(mynets.make_net(), "w.npz")
    code, _stdout, err = run_cli("explain", *BASE, "--out", tmp_path / "out", *args)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_minivgg_is_the_default(tmp_path, default_run):
    code, _, err = explain_cli(tmp_path / "out", "--model", "minivgg")
    assert code == 0, err
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "relevance.npy"), np.load(default_run[0] / "relevance.npy")
    )


def test_evaluate_does_not_import_cli():
    code = (
        "import sys, lrpjax.analysis.evaluate, lrpjax.commands.common\n"
        "assert 'lrpjax.commands.main' not in sys.modules, 'cycle'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the first picture ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("composite", "other"), [("epsilon", "epsilon_gamma_box"), ("epsilon_gamma_box", "epsilon")]
)
def test_heatmaps_show_the_saved_composite_beside_the_best_preset(
    tmp_path, monkeypatch, sample_data, pretrained, composite, other
):
    from lrpjax import viz

    shown = {}
    real = viz.grid_figure

    def spy(images, relevance, **kwargs):
        shown.update(images=images, relevance=relevance)
        return real(images, relevance, **kwargs)

    monkeypatch.setattr(viz, "grid_figure", spy)
    code, _, err = explain_cli(tmp_path, "--composite", composite)
    assert code == 0, err
    saved, extra = f"LRP {composite} (saved)", f"LRP {other}"
    assert list(shown["relevance"]) == [saved, extra]
    x = sample_data[0][:LIMIT]
    pick = [i for i in range(LIMIT) if any((x[i] == im).all() for im in shown["images"])]
    assert len(pick) == len(shown["images"]) == LIMIT  # 12 images: all shown
    relevance = np.load(tmp_path / "relevance.npy")
    np.testing.assert_array_equal(shown["relevance"][saved], relevance[pick])
    expected = np.asarray(
        lrpjax.explain(
            pretrained, x[pick], composite=other, target=np.load(tmp_path / "targets.npy")
        )
    )
    np.testing.assert_allclose(shown["relevance"][extra], expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(shown["relevance"][extra], relevance[pick], atol=1e-3)
    # what is saved is --composite's
    np.testing.assert_allclose(
        relevance, np.asarray(lrpjax.explain(pretrained, x, composite=composite)), rtol=1e-4,
        atol=1e-6,
    )  # fmt: skip


# --- review fixes: flags, user modules, class numbering, resume keys, finishing order ------


@pytest.mark.parametrize("flag", ["--process-id", "--num-processes"])
def test_distributed_flags_without_distributed_are_an_error_even_if_zero(tmp_path, flag):
    code, _, err = explain_cli(tmp_path / "out", flag, "0")
    assert code == 2 and err.strip() == f"error: {flag} needs --distributed", err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source", "kind"),
    [("def make(:\n", "SyntaxError"), ("undefined_name\n", "NameError"),
     ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here")],
)  # fmt: skip
def test_user_module_that_fails_to_import_is_one_error_line(tmp_path, mynets, source, kind):
    models.save(mynets.make_net(), "w.npz")
    (tmp_path / "broken.py").write_text(source)
    sys.modules.pop("broken", None)
    code, _, err = run_cli(
        "explain", *BASE, "--out", tmp_path / "out", "--model", "broken:make", "--checkpoint",
        "w.npz",
    )  # fmt: skip
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --model 'broken:make'")
    assert "cannot import 'broken'" in err and kind in err, err
    assert not (tmp_path / "out").exists()


def test_factory_may_import_a_neighbouring_module_when_called(tmp_path, monkeypatch):
    """The current directory stays importable while the factory runs (as with python -m)."""
    import importlib.util

    (tmp_path / "helper.py").write_text(MYNETS)
    (tmp_path / "lazy.py").write_text(
        "def make():\n    import helper\n    return helper.make_ten()\n"
    )
    spec = importlib.util.spec_from_file_location("helper_for_saving", tmp_path / "helper.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    models.save(helper.make_ten(), tmp_path / "w.npz", class_names=lrpjax.models.CLASS_NAMES)
    monkeypatch.chdir(tmp_path)
    # as the installed `lrpjax` script runs: the current directory is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("helper", "lazy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    code, _, err = explain_cli(tmp_path / "out", "--model", "lazy:make", "--checkpoint", "w.npz")
    assert code == 0, err
    for name in ("helper", "lazy"):
        sys.modules.pop(name, None)


def test_model_without_class_names_uses_the_data_numbering(tmp_path, mynets, sample_data):
    """A 10-class model saved without names runs on the sample (CIFAR-10 names) anyway."""
    models.save(mynets.make_ten(), "ten.npz")  # no class_names
    out = tmp_path / "out"
    code, _, err = explain_cli(out, "--model", "mynets:make_ten", "--checkpoint", "ten.npz")
    assert code == 0, err
    assert "warning: the model ten.npz has no class names" in err and "airplane" in err
    np.testing.assert_array_equal(np.load(out / "labels.npy"), sample_data[1][:LIMIT])
    # the factory is part of the model's identity (the resume key)
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["model"].endswith(":mynets:make_ten")


def test_shipped_architecture_with_its_own_class_count(tmp_path, image_folder):
    """--model minivgg --checkpoint FILE builds the class count the file's header says."""
    from flax import nnx

    names = ["airplane", "cat", "dog"]
    model = models.MiniVGG(num_classes=3, rngs=nnx.Rngs(0))
    models.save(model, tmp_path / "vgg3.npz", class_names=names)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "explain", "--model", "minivgg", "--checkpoint", tmp_path / "vgg3.npz", "--data-dir",
        image_folder, "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert np.load(out / "probabilities.npy").shape == (12, 3)


def test_folder_content_is_in_the_resume_key(tmp_path):
    root = small_image_folder(tmp_path / "imgs", 32, "RGB")
    out = tmp_path / "out"
    code, _, err = explain_cli(out, "--data-dir", root)
    assert code == 0, err
    first = json.loads((out / "summary.json").read_text())["settings"]["data"]
    assert first.startswith(f"{root}:test@")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "test" / "cat" / "0.png")
    code, _, err = explain_cli(out, "--data-dir", root)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["settings"]["data"] != first


def test_kill_while_moving_results_leaves_no_stale_summary_and_resumes(
    tmp_path, monkeypatch, default_run
):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)  # an earlier run's complete output
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == out / "predictions.npy":
            raise KeyboardInterrupt  # as a kill in the middle of the move would stop it
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    code, _, err = explain_cli(out, "--composite", "epsilon_plus_flat")
    assert code == 130, err
    # some new arrays are in place: the old summary must not vouch for them
    assert not (out / "summary.json").exists()
    (work,) = out.glob(".partial-explain-*")
    assert (work / "summary.json").is_file()

    monkeypatch.setattr(os, "replace", real_replace)
    spy = StepSpy(monkeypatch)
    code, stdout, err = explain_cli(out, "--composite", "epsilon_plus_flat")
    assert code == 0, err
    assert spy.calls == 0 and "moving the results" in stdout
    assert json.loads((out / "summary.json").read_text())["settings"]["composite"] == (
        "epsilon_plus_flat"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    fresh = tmp_path / "fresh"
    assert explain_cli(fresh, "--composite", "epsilon_plus_flat")[0] == 0
    for name, array in load_arrays(fresh).items():
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), array, err_msg=name)


def test_failure_in_the_figures_leaves_the_earlier_output_intact(
    tmp_path, monkeypatch, default_run
):
    from lrpjax import viz

    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(viz, "class_mean_figure", broken)
    code, _, err = explain_cli(out, "--composite", "epsilon_plus_flat")
    assert code == 2 and "cannot draw" in err
    after = {k: v for k, v in snapshot(out).items() if not k.startswith(".partial-explain-")}
    assert after == before


def test_explain_leaves_other_commands_work_folders_alone(tmp_path):
    out = tmp_path / "out"
    other = out / ".partial-concepts-0123456789ab"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text("{}")
    stale = out / ".partial-explain-0123456789ab"
    stale.mkdir()
    code, _, err = explain_cli(out)
    assert code == 0, err
    assert (other / "manifest.json").is_file() and not stale.exists()


def test_evaluate_with_a_bad_model_creates_no_folder(tmp_path):
    out = tmp_path / "eval"
    code, _, err = run_cli("evaluate", "--model", "resnet", "--out", out, "--no-progress")
    assert code == 2 and "unknown model 'resnet'" in err, err
    assert not out.exists()


# --- folder layouts and files.txt ----------------------------------------------------------


def test_flat_folder_is_explained_for_its_predictions(tmp_path, pretrained):
    """Images alone: no labels (-1), targets are the predictions, no accuracy claimed."""
    folder = flat_folder(tmp_path / "flat")
    out = tmp_path / "out"
    code, stdout, err = explain_cli(out, "--data-dir", folder)
    assert code == 0, err
    a = load_arrays(out)
    np.testing.assert_array_equal(a["labels"], [-1, -1, -1])
    np.testing.assert_array_equal(a["targets"], a["predictions"])
    names = (out / "files.txt").read_text().splitlines()
    assert names == ["a.png", "b.png", "c.jpg"]
    # Row i of every array is the image that line i of files.txt names.
    x = np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])
    logits = np.asarray(pretrained(x.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(a["predictions"], logits.argmax(-1))
    np.testing.assert_allclose(a["relevance"].reshape(3, -1).sum(-1), a["relevance_sum"], 1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] is None and summary["labelled_images"] == 0
    assert summary["files"]["input_files"] == "files.txt"
    assert summary["settings"]["data"].startswith(f"{folder}@")  # no split in the source
    assert f"explained 3 images ({folder})" in stdout and "no labels" in stdout, stdout
    assert "accuracy 0" not in stdout


def test_class_folders_without_split(tmp_path, image_folder, image_folder_expected):
    """A bare class/image folder (the fixture's test split alone): no --split needed."""
    folder = tmp_path / "bare"
    shutil.copytree(image_folder / "test", folder, ignore=shutil.ignore_patterns(".*"))
    out = tmp_path / "out"
    code, stdout, err = explain_cli(out, "--data-dir", folder, "--target", "label")
    assert code == 0, err
    labels = np.array([0, 3, 5])[image_folder_expected["test"][1]]  # airplane, cat, dog
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)
    np.testing.assert_array_equal(np.load(out / "targets.npy"), labels)
    assert (out / "files.txt").read_text().splitlines() == [
        f"{c}/{i:03d}.png" for c in ("airplane", "cat", "dog") for i in range(4)
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled_images"] == 12 and summary["accuracy"] is not None
    assert f"explained 12 images ({folder})" in stdout


def test_files_txt_for_a_split_folder_and_an_archive(tmp_path):
    import tarfile

    root = small_image_folder(tmp_path / "imgs", 32, "RGB")  # test/cat, test/dog
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "test", arcname="top/test")  # wrapped in one folder
    expected = [f"test/{c}/{i}.png" for c in ("cat", "dog") for i in range(2)]
    for source, prefix in ((root, ""), (archive, "top/")):
        out = tmp_path / f"out-{source.name}"
        code, _, err = explain_cli(out, "--data-dir", source)
        assert code == 0, err
        assert (out / "files.txt").read_text().splitlines() == [prefix + f for f in expected]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["files"]["input_files"] == "files.txt"
        assert summary["settings"]["data"].startswith(f"{source}:test@")


def test_the_sample_rows_are_named_by_index(default_run):
    out, _ = default_run
    assert (out / "files.txt").read_text().splitlines() == [
        f"shipped-sample:{i}" for i in range(LIMIT)
    ]


def test_a_run_without_files_removes_an_earlier_files_txt(tmp_path, default_run, pretrained):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    (out / "files.txt").write_text("an earlier run's rows\n")
    x, y = sample()
    summary = pipeline.explain_dataset(
        pretrained, x[:4], y[:4], out, settings={"test": "no files"}, batch_size=4,
        progress=False, figures=2,
    )  # fmt: skip
    assert "input_files" not in summary["files"]
    assert not (out / "files.txt").exists()
    assert not list(out.glob(".partial-*"))


def test_file_names_must_fit_files_txt(tmp_path, pretrained):
    x, y = sample()
    for files, message in ((["a.png"], "1 file names for 2 images"), (["a", "b\nc"], "line")):
        with pytest.raises(ValueError, match=message):
            pipeline.explain_dataset(
                pretrained, x[:2], y[:2], tmp_path / "out", settings={}, files=files
            )
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_concepts_and_evaluate_read_the_new_layouts(tmp_path):
    pets = class_folders(tmp_path / "pets")  # cat, dog: CIFAR-10 classes 3, 5
    code, stdout, err = run_cli(
        "concepts", "--data-dir", pets, "--layer", "dense1", "--top-k", "1", "--batch-size",
        "4", "--no-progress", "--out", tmp_path / "concepts",
    )  # fmt: skip
    assert code == 0, err
    assert f"analysed 4 images ({pets})" in stdout
    flat = flat_folder(tmp_path / "flat")
    code, _, err = run_cli("concepts", "--data-dir", flat, "--out", tmp_path / "c2")
    assert code == 2 and "--target label needs labelled images; use --target pred" in err
    code, _, err = run_cli(
        "evaluate", "--data-dir", flat, "--explainers", "gradient", "--steps", "2",
        "--sanity-images", "0", "--no-progress", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "aopc.json").read_text())["accuracy"] is None


# --- --help ---------------------------------------------------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """Each option's help text (after its flags and metavar), whitespace collapsed, keyed by
    every one of its flags."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?: {2,}(.*))?$", line)
        if m:
            flags = [f.split(" ")[0] for f in m.group(1).split(", ")]
            current = [m.group(2) or ""]
            for flag in flags:
                entries[flag] = current
        elif current is not None and line.startswith("    ") and line.strip():
            current.append(line)
        else:
            current = None
    return {flag: " ".join(" ".join(parts).split()) for flag, parts in entries.items()}


@pytest.mark.parametrize("command", [None, "explain", "concepts", "evaluate", "bench"])
def test_help_shows_every_default(command, monkeypatch, capsys):
    import argparse

    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: no word is split
    parser = cli.build_parser()
    if command is not None:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if command not in sub.choices:
            pytest.skip(f"lrpjax {command} is not available here")
        parser = sub.choices[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*([command] if command else []), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    entries = help_entries(text)
    checked = []
    for action in parser._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        entry = entries[action.option_strings[0]]
        assert "default" in entry and str(action.default) in entry, (action.dest, entry)
        checked.append(action.dest)
    if command == "explain":
        assert {"batch_size", "dtype", "no_progress", "composite", "out"} <= set(checked)
        assert "default: test" in entries["--split"]  # resolved where the data has splits
    if command is None:  # the subcommands are listed
        assert all(name in text for name in ("explain", "concepts", "evaluate")), text


def test_data_options_are_the_same_in_every_command():
    import argparse

    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    data_options = {"dataset", "data_dir", "split", "limit"}

    def options(name):
        return {
            (a.dest, tuple(a.option_strings), a.default, a.type)
            for a in sub.choices[name]._actions
            if a.dest in data_options
        }

    assert len(options("explain")) == 4
    assert options("concepts") == options("explain") == options("evaluate")


def test_every_subcommand_comes_from_the_one_registry():
    """`COMMANDS` builds the parser and dispatches: one ``add_parser``/``run`` pair each."""
    import argparse

    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == list(cli.COMMANDS)
    for name, command in cli.COMMANDS.items():
        assert command.__name__ == f"lrpjax.commands.{name}"
        assert callable(command.add_parser) and callable(command.run)
