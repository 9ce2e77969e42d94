"""`lrpjax.runs.explain.explain_dataset`: sharding over devices, memmapped output, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import models
from lrpjax.data import sample
from lrpjax.runs import explain, store

SETTINGS = {"model": "test", "data": "test", "composite": "epsilon"}


class StepSpy:
    """Wraps `explain.make_step`: counts compiled step calls, records batch shapes, and can
    raise KeyboardInterrupt at a given call (as Ctrl-C would)."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []
        self.interrupt_at = interrupt_at
        real = explain.make_step

        def make_step(*args, **kwargs):
            step, state, num_devices = real(*args, **kwargs)

            def counted(state, x, target):
                self.calls += 1
                self.shapes.append(x.shape)
                if self.calls == self.interrupt_at:
                    raise KeyboardInterrupt
                return step(state, x, target)

            return counted, state, num_devices

        monkeypatch.setattr(explain, "make_step", make_step)


@pytest.fixture(scope="module")
def pretrained():
    return lrpjax.load_pretrained()


@pytest.fixture(scope="module")
def data20() -> tuple[np.ndarray, np.ndarray]:
    x, y = sample()
    return x[:20], y[:20]


# --- eight simulated devices --------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from lrpjax import models
    from lrpjax.runs import explain

    assert jax.device_count() == 8, jax.devices()
    folder = sys.argv[1]
    model = models.load(f"{folder}/model.npz")
    images = np.load(f"{folder}/images.npy")
    labels = np.load(f"{folder}/labels.npy")

    shapes = []
    real = explain.make_step

    def make_step(*args, **kwargs):
        step, state, num_devices = real(*args, **kwargs)
        assert num_devices == 8, num_devices

        def recorded(state, x, target):
            shapes.append(list(x.shape))
            return step(state, x, target)

        return recorded, state, num_devices

    explain.make_step = make_step
    report = {}
    # 13 images, batch 4 rounded up to 8: chunks of 8 and 5 (fewer than the devices).
    # 3 images: one chunk smaller than the device count.
    for case, n, target in (("thirteen", 13, "pred"), ("three", 3, "label")):
        shapes.clear()
        summary = explain.explain_dataset(
            model, images[:n], labels[:n], f"{folder}/{case}",
            settings={"model": "random", "n": n, "target": target},
            target=target, batch_size=4, progress=False, figures=4,
        )
        report[case] = {"shapes": list(shapes), "devices": summary["devices"]}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    """A random MiniVGG explained on 8 simulated CPU devices in a subprocess."""
    folder = tmp_path_factory.mktemp("eight-devices")
    model = models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    models.save(model, folder / "model.npz")
    rng = np.random.default_rng(0)
    images = rng.random((13, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, 13).astype(np.int32)
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "LRPJAX_CACHE": str(folder / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return folder, report, models.load(folder / "model.npz"), images, labels


def test_eight_devices_pad_batches_to_the_device_count(eight_device_run):
    _, report, *_ = eight_device_run
    assert report["thirteen"]["shapes"] == [[8, 32, 32, 3], [8, 32, 32, 3]]
    assert report["three"]["shapes"] == [[8, 32, 32, 3]]
    assert len(report["thirteen"]["devices"]) == 8


def _explained_class(model, x: np.ndarray, target) -> np.ndarray:
    """The explained class: `target`, or the float32 model's prediction."""
    return np.asarray(model(x)).argmax(-1) if target is None else np.asarray(target)


def _float64_relevance(model, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LRP-epsilon of `model` cast to float64, on `x` in float64: the exact reference."""
    with jax.enable_x64(True):
        graphdef, state = nnx.split(model)
        state = jax.tree.map(
            lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
            state,
        )
        wide = nnx.merge(graphdef, state, copy=True)
        return np.asarray(
            lrpjax.explain(wide, jnp.asarray(x, jnp.float64), target=jnp.asarray(target))
        )


@pytest.mark.parametrize("case", ["thirteen", "three"])
def test_eight_devices_match_one_device(eight_device_run, case):
    folder, _, model, images, labels = eight_device_run
    n, target = {"thirteen": (13, None), "three": (3, labels[:3])}[case]
    x = images[:n]
    out = folder / case
    relevance = np.load(out / "relevance.npy")
    assert relevance.shape == (n, 32, 32, 3)
    one_device = np.asarray(lrpjax.explain(model, x, target=target))
    # Both float32 programs approximate the same exact relevance; they sum in different orders
    # (one image per device here, 13 in one program there), and LRP-epsilon with eps 1e-6
    # amplifies the rounding in near-cancelling neurons of a random model. So the 8-device
    # result is held to the accuracy the 1-device program itself reaches against float64,
    # not to agreement with it: a sharding fault (a wrong image, target or padding) is off by
    # the map's own size, rounding by the float32 error.
    exact = _float64_relevance(model, x, _explained_class(model, x, target))
    scale = np.abs(exact).max(axis=(1, 2, 3))
    one_device_error = np.abs(one_device - exact).max(axis=(1, 2, 3))
    eight_device_error = np.abs(relevance - exact).max(axis=(1, 2, 3))
    assert np.all(one_device_error < 1e-2 * scale)  # the float64 reference is the same map
    assert np.all(eight_device_error <= 4 * one_device_error + 1e-6 * scale), (
        eight_device_error / scale,
        one_device_error / scale,
    )
    logits = np.asarray(model(x))
    np.testing.assert_array_equal(np.load(out / "predictions.npy"), logits.argmax(-1))
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.load(out / "probabilities.npy"), probabilities, rtol=1e-4)
    targets = logits.argmax(-1) if target is None else labels[:n]
    np.testing.assert_array_equal(np.load(out / "targets.npy"), targets)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels[:n])
    assert json.loads((out / "summary.json").read_text())["images"] == n


# --- memmapped output ---------------------------------------------------------------------


def test_streams_to_memmaps_and_matches_batchwise_explain(
    tmp_path, monkeypatch, pretrained, data20
):
    opened = []
    real_open = np.lib.format.open_memmap

    def open_memmap(path, *args, **kwargs):
        # written in the work folder (not the reads of np.load(mmap_mode="r") for the figures)
        if Path(path).parent.name.startswith(".partial-") and kwargs.get("mode") != "r":
            opened.append((Path(path).name, kwargs.get("mode")))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    spy = StepSpy(monkeypatch)
    x, y = data20
    summary = explain.explain_dataset(
        pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False, figures=4
    )
    assert sorted(opened) == sorted((f"{name}.npy", "w+") for name in explain.ARRAYS)
    assert spy.shapes == [(8, 32, 32, 3)] * 3  # one compiled shape; the last chunk padded

    expected = np.concatenate(
        [np.asarray(lrpjax.explain(pretrained, x[i : i + 8])) for i in range(0, 20, 8)]
    )
    relevance = np.load(tmp_path / "relevance.npy", mmap_mode="r")
    assert relevance.dtype == np.float32 and relevance.shape == (20, 32, 32, 3)
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.load(tmp_path / "relevance_sum.npy"), expected.reshape(20, -1).sum(-1), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["images"] == summary["images"] == 20
    assert on_disk["settings"] == SETTINGS
    assert summary["images_per_second"] > 0
    assert not list(tmp_path.glob(".partial-*"))


# --- restarts -----------------------------------------------------------------------------


def test_other_settings_start_over(tmp_path, monkeypatch, capsys, pretrained, data20):
    x, y = data20
    spy = StepSpy(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        explain.explain_dataset(
            pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False
        )
    (stale,) = tmp_path.glob(".partial-*")
    assert json.loads((stale / "manifest.json").read_text())["done"] == [0]
    capsys.readouterr()

    spy = StepSpy(monkeypatch)
    other = {**SETTINGS, "composite": "epsilon_plus_flat"}
    explain.explain_dataset(
        pretrained, x, y, tmp_path, settings=other, composite="epsilon_plus_flat",
        batch_size=8, progress=False, figures=4,
    )  # fmt: skip
    assert "resuming" not in capsys.readouterr().out
    assert spy.calls == 3  # all chunks computed again
    assert not stale.exists() and not list(tmp_path.glob(".partial-*"))
    expected = np.asarray(lrpjax.explain(pretrained, x, composite="epsilon_plus_flat"))
    np.testing.assert_allclose(np.load(tmp_path / "relevance.npy"), expected, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["settings"] == other


def test_same_settings_other_dtype_start_over(tmp_path, monkeypatch, capsys, pretrained, data20):
    x, y = data20
    StepSpy(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        explain.explain_dataset(
            pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False
        )
    capsys.readouterr()
    spy = StepSpy(monkeypatch)
    explain.explain_dataset(
        pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, dtype="float16",
        progress=False, figures=4,
    )  # fmt: skip
    assert "resuming" not in capsys.readouterr().out
    assert spy.calls == 3
    assert np.load(tmp_path / "relevance.npy").dtype == np.float16


def test_interrupt_while_moving_results_resumes(tmp_path, monkeypatch, pretrained, data20):
    x, y = data20
    real_replace = os.replace

    def interrupted_replace(src, dst):
        if ".partial-" in str(src) and Path(src).name == "predictions.npy":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        explain.explain_dataset(
            pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False
        )
    monkeypatch.setattr(os, "replace", real_replace)
    explain.explain_dataset(
        pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False, figures=4
    )
    expected = np.asarray(lrpjax.explain(pretrained, x))
    np.testing.assert_allclose(np.load(tmp_path / "relevance.npy"), expected, rtol=1e-4, atol=1e-6)


# --- the lock on the output folder --------------------------------------------------------


def test_locked_output_refuses_before_changing_anything(tmp_path, monkeypatch, pretrained, data20):
    x, y = data20
    spy = StepSpy(monkeypatch)
    with store.lock_output(tmp_path):
        assert (tmp_path / store.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(store.OutputLockedError, match="in use by another lrpjax run"):
            explain.explain_dataset(
                pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False
            )
        assert spy.calls == 0
        assert [p.name for p in tmp_path.iterdir()] == [store.LOCK_NAME]
    assert not list(tmp_path.iterdir())  # released and removed
    explain.explain_dataset(
        pretrained, x, y, tmp_path, settings=SETTINGS, batch_size=8, progress=False, figures=4
    )
    assert spy.calls == 3 and not (tmp_path / store.LOCK_NAME).exists()
