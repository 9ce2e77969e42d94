"""Training: optimizer steps, checkpoints and resume, determinism, output files, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train
from lrpjax import models
from train import trainer
from train.__main__ import parse_args

N_TRAIN, N_TEST, BATCH = 128, 64, 32
METRIC_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


class InterruptError(Exception):
    """Raised from `on_epoch` to stop a run as a kill would, after a checkpoint."""


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    x_train = rng.random((N_TRAIN, 32, 32, 3), dtype=np.float32)
    y_train = rng.integers(0, 10, N_TRAIN).astype(np.int32)
    x_test = rng.random((N_TEST, 32, 32, 3), dtype=np.float32)
    y_test = rng.integers(0, 10, N_TEST).astype(np.int32)
    return x_train, y_train, x_test, y_test


def config_for(out: Path, **changes) -> train.Config:
    # Evaluation in batches of 48: the second of the 64 test images' batches is padded.
    base = train.Config(out=str(out), epochs=2, batch_size=BATCH, eval_batch_size=48)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data):
    """A 2-epoch run that was never interrupted: (out dir, returned model, history)."""
    out = tmp_path_factory.mktemp("straight")
    model, history = train.train(config_for(out), tiny_data, progress=False)
    return out, model, history


def weights(path: Path) -> dict[str, np.ndarray]:
    return models.read_arrays(path)[0]


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def numbers(history: list[dict]) -> list[dict]:
    """A history without its timings."""
    return [{k: r[k] for k in ("epoch", *METRIC_KEYS)} for r in history]


# --- steps ---------------------------------------------------------------------------------


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_data):
    config = config_for(Path("unused"))
    model = models.MiniVGG(rngs=nnx.Rngs(0))
    tx = train.make_optimizer(config, steps_per_epoch=N_TRAIN // BATCH)
    steps = trainer.Steps(model, tx, config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    before = {k: np.array(v, copy=True) for k, v in nnx.to_flat_state(params)}
    opt_state = tx.init(params)
    x, y = tiny_data[0][:BATCH], tiny_data[1][:BATCH]
    losses = []
    for i in range(5):
        params, rest, opt_state, loss, correct = steps.train_step(
            params, rest, opt_state, x, y, jax.random.key(i)
        )
        losses.append(float(loss))
        assert 0 <= int(correct) <= BATCH
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(params)}
    assert not np.array_equal(after[("dense2", "kernel")], before[("dense2", "kernel")])


# --- runs, checkpoints, resume -------------------------------------------------------------


def test_final_model_file_and_metrics(straight, tiny_data):
    out, model, history = straight
    assert [r["epoch"] for r in history] == [1, 2]
    x_test, y_test = tiny_data[2], tiny_data[3]

    # The returned model is in eval mode and is what model.npz (and the checkpoint) hold.
    assert model.drop1.deterministic and model.bn1.use_running_average

    def logits_of(m):  # in batches of 4, a shape the other tests have compiled already
        return np.concatenate([np.asarray(m(x_test[i : i + 4])) for i in range(0, N_TEST, 4)])

    logits = logits_of(model)
    for name in ("model.npz", "checkpoint.npz"):
        np.testing.assert_array_equal(logits_of(models.load(out / name)), logits)
    # Evaluation in padded batches counts each test image once, and the padding never.
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean())
    assert history[-1]["test_loss"] == pytest.approx(loss, rel=1e-4)
    accuracy = float(np.mean(logits.argmax(-1) == y_test))
    assert history[-1]["test_accuracy"] == pytest.approx(accuracy)

    _, meta = models.read_arrays(out / "model.npz")
    assert meta["architecture"] == "MiniVGG"
    assert meta["epochs"] == 2
    assert meta["test_accuracy"] == history[-1]["test_accuracy"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == dataclasses.asdict(config_for(out))
    assert numbers(metrics["epochs"]) == numbers(history)
    for record in metrics["epochs"]:
        for key in METRIC_KEYS:
            assert math.isfinite(record[key])
        assert 0.0 <= record["train_accuracy"] <= 1.0
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert record["train_seconds"] > 0
    # 128 images with random labels: the second epoch fits them better than the first.
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_interrupted_run_resumes_to_identical_weights(straight, tiny_data, tmp_path, capsys):
    out_a, _, history_a = straight
    config = config_for(tmp_path)

    def stop_after_epoch_1(record):
        if record["epoch"] == 1:
            raise InterruptError

    with pytest.raises(InterruptError):
        train.train(config, tiny_data, progress=False, on_epoch=stop_after_epoch_1)
    assert not (tmp_path / "model.npz").exists()
    _, meta = models.read_arrays(tmp_path / "checkpoint.npz")
    assert meta["epoch"] == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1]
    capsys.readouterr()

    seen = []
    _, history_b = train.train(
        config, tiny_data, resume=True, progress=False, on_epoch=lambda r: seen.append(r["epoch"])
    )
    printed = capsys.readouterr().out
    assert "resuming" in printed and "after epoch 1" in printed
    assert "epoch 1:" not in printed and "epoch 2:" in printed
    assert seen == [2]
    assert [r["epoch"] for r in history_b] == [1, 2]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]

    assert numbers(history_b) == numbers(history_a)
    assert_same_arrays(weights(tmp_path / "model.npz"), weights(out_a / "model.npz"))
    # Optimizer state and dropout RNG state too.
    assert_same_arrays(weights(tmp_path / "checkpoint.npz"), weights(out_a / "checkpoint.npz"))


@pytest.mark.parametrize(
    "change",
    [{"learning_rate": 5e-4}, {"seed": 1}, {"batch_size": 16}, {"epochs": 3}, {"augment": True}],
    ids=lambda c: next(iter(c)),
)
def test_resume_with_other_settings_raises(straight, tiny_data, tmp_path, change):
    shutil.copy(straight[0] / "checkpoint.npz", tmp_path / "checkpoint.npz")
    config = config_for(tmp_path, **change)
    with pytest.raises(ValueError, match=next(iter(change))):
        train.train(config, tiny_data, resume=True, progress=False)
    assert not (tmp_path / "model.npz").exists()


def test_resume_of_a_finished_run_with_free_settings_changed(straight, tiny_data, tmp_path):
    out_a, model_a, _ = straight
    shutil.copy(out_a / "checkpoint.npz", tmp_path / "checkpoint.npz")
    config = config_for(tmp_path, eval_batch_size=16, data="elsewhere")  # free to differ
    model, history = train.train(config, tiny_data, resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]  # nothing left to train
    assert_same_arrays(weights(tmp_path / "model.npz"), weights(out_a / "model.npz"))
    x = tiny_data[2][:8]
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model_a(x)))


def test_runs_are_deterministic(tiny_data, tmp_path, capsys):
    def run(name, resume=False, **changes):
        out = tmp_path / name
        train.train(config_for(out, epochs=1, **changes), tiny_data, resume=resume, progress=False)
        return weights(out / "model.npz")

    first = run("first")
    second = run("second", resume=True)  # no checkpoint there: starts from scratch
    assert "no checkpoint" in capsys.readouterr().out
    assert_same_arrays(first, second)
    other_seed = run("other-seed", seed=1)
    assert not np.array_equal(first["model/dense2/kernel"], other_seed["model/dense2/kernel"])


def test_too_few_images_for_a_batch(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="128 training images do not fill one batch of 256"):
        train.train(config_for(tmp_path, batch_size=256), tiny_data, progress=False)
    assert not (tmp_path / "checkpoint.npz").exists()


# --- optimizer, augmentation, subsets, config ----------------------------------------------


@pytest.mark.parametrize("schedule", trainer.SCHEDULES)
def test_make_optimizer_schedules(schedule):
    tx = train.make_optimizer(train.Config(schedule=schedule, epochs=2), steps_per_epoch=3)
    params = {"w": np.ones(3, np.float32)}
    state = tx.init(params)
    updates, _ = tx.update({"w": np.ones(3, np.float32)}, state, params)
    step = np.asarray(updates["w"])
    assert np.all(np.isfinite(step)) and np.all(step <= 0)  # descends along the gradient


def test_make_optimizer_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        train.make_optimizer(train.Config(schedule="linear"), steps_per_epoch=3)


def test_augment_crops_and_flips():
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    key = jax.random.key(0)
    augment = jax.jit(trainer.augment, static_argnames="pad")
    flipped_only = np.asarray(augment(x, key, pad=0))
    is_same = np.all(flipped_only == x, axis=(1, 2, 3))
    is_flip = np.all(flipped_only == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(is_same | is_flip)
    assert is_same.any() and is_flip.any()

    out = np.asarray(augment(x, key, pad=2))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, np.asarray(augment(x, key, pad=2)))
    assert not np.array_equal(out, np.asarray(augment(x, jax.random.key(1), pad=2)))
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for img, src in zip(out, padded, strict=True):  # each is a crop of the padded image
        crops = [
            c
            for dy in range(5)
            for dx in range(5)
            for c in (src[dy : dy + 8, dx : dx + 8], src[dy : dy + 8, dx : dx + 8][:, ::-1])
        ]
        assert any(np.array_equal(img, c) for c in crops)


def test_subset_is_fixed_and_aligned(tiny_data):
    x, y = tiny_data[0], tiny_data[1]
    xs, ys = trainer._subset(x, y, 20)
    xs2, _ = trainer._subset(x, y, 20)
    assert len(xs) == len(ys) == 20
    np.testing.assert_array_equal(xs, xs2)
    assert not np.array_equal(xs, x[:20])  # not a prefix
    rows = [int(np.flatnonzero(np.all(x == img, axis=(1, 2, 3)))[0]) for img in xs]
    assert rows == sorted(rows)
    np.testing.assert_array_equal(ys, y[rows])
    assert trainer._subset(x, y, None)[0] is x


def test_init_starts_from_a_weight_file(straight, tiny_data, tmp_path):
    """--init: the run starts from the given weights (learning rate 0 keeps every Param)."""
    out, trained, _ = straight
    config = config_for(tmp_path, epochs=1, learning_rate=0.0, init=str(out / "model.npz"))
    tuned, _ = train.train(config, tiny_data, progress=False)
    params_of = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for got, want in zip(params_of(tuned), params_of(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    fresh = models.MiniVGG(rngs=nnx.Rngs(config.seed))
    assert not np.array_equal(params_of(fresh)[0], params_of(trained)[0])
    with pytest.raises(models.ModelFileError):
        train.train(config_for(tmp_path, init=str(tmp_path / "missing.npz")), tiny_data)


def test_defaults_are_the_reference_recipe():
    c = train.Config()
    assert (c.epochs, c.batch_size, c.learning_rate) == (40, 64, 1e-3)
    assert (c.schedule, c.augment, c.data) == ("constant", False, "cifar10")
    config, resume, no_progress = parse_args([])
    assert config == c and not resume and not no_progress
    config, resume, no_progress = parse_args(
        [
            *("--data", "d", "--epochs", "3", "--batch-size", "8", "--lr", "2e-3"),
            *("--schedule", "onecycle", "--augment", "--seed", "5", "--out", "o", "--resume"),
            *("--limit-train", "10", "--limit-test", "5", "--no-progress", "--init", "w.npz"),
        ]
    )
    assert config == train.Config(
        data="d",
        epochs=3,
        batch_size=8,
        learning_rate=2e-3,
        schedule="onecycle",
        augment=True,
        seed=5,
        out="o",
        limit_train=10,
        limit_test=5,
        init="w.npz",
    )
    assert resume and no_progress


def test_cli_accepts_the_flags_its_data_error_names():
    assert parse_args(["--dataset", "cifar10"])[0].data == "cifar10"
    assert parse_args(["--data-dir", "some/folder"])[0].data == "some/folder"


# --- command line --------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if jax.config.jax_compilation_cache_dir:  # share the session's compiled programs
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def test_cli_trains_on_an_image_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "--data", str(image_folder), "--epochs", "1", "--batch-size", "4",
        "--out", str(out), "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "epoch 1:" in result.stdout
    assert (out / "model.npz").is_file() and (out / "checkpoint.npz").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1]
    assert metrics["config"]["data"] == str(image_folder)
    assert metrics["config"]["batch_size"] == 4
    assert metrics["command"].startswith("python -m train --data ")
    model = models.load(out / "model.npz")
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)


def test_cli_without_data_fails_with_both_ways(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere"
    result = run_cli("--data", str(missing), "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode != 0
    message = result.stderr
    assert str(missing) in message
    assert "cifar10" in message and "--data" in message and "split/class/image" in message
    assert "Traceback" not in message
    assert not (out / "model.npz").exists()


def test_weight_decay_shrinks_kernels_only():
    config = train.Config(weight_decay=0.1, learning_rate=0.5, epochs=1)
    tx = train.make_optimizer(config, steps_per_epoch=1)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.5 * 0.1)  # p - lr * wd * p
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)
    assert parse_args(["--weight-decay", "0.05"])[0].weight_decay == 0.05


# --- the vision transformer (--model vit) --------------------------------------------------

TINY_VIT = "vit:channels=8,dim=16,depth=1,heads=2,mlp_dim=16"


@pytest.fixture(scope="module")
def vit_straight(tmp_path_factory, tiny_data):
    """A 2-epoch tiny CCT run with label smoothing: (out dir, returned model, history)."""
    out = tmp_path_factory.mktemp("vit-straight")
    config = config_for(out, model=TINY_VIT, label_smoothing=0.1, weight_decay=0.05)
    model, history = train.train(config, tiny_data, progress=False)
    return out, model, history


def test_build_model_specs():
    vit = trainer.build_model("vit:channels=8/12,dim=16,depth=3,heads=4,mlp_dim=24,dropout=0.2")
    assert isinstance(vit, models.CCT)
    assert vit.hyperparameters == {
        "image_size": 32, "in_channels": 3, "channels": [8, 12], "dim": 16, "depth": 3,
        "heads": 4, "mlp_dim": 24, "dropout": 0.2, "num_classes": 10,
    }  # fmt: skip
    assert vit.conv3.out_features == 16 and vit.block2.attn.num_heads == 4
    assert isinstance(trainer.build_model("minivgg"), models.MiniVGG)
    for bad, message in [("resnet", "unknown model 'resnet'"), ("vit:depth", "key=value"),
                         ("vit:width=3", "bad arguments")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            trainer.build_model(bad)


def test_label_smoothing_loss(tiny_data):
    """The training loss is cross-entropy against (1 - a) one_hot + a / classes."""
    x, y = tiny_data[0][:4], tiny_data[1][:4]
    for smoothing in (0.0, 0.2):
        config = config_for(Path("unused"), model=TINY_VIT, label_smoothing=smoothing)
        model = trainer.build_model(config.model)
        steps = trainer.Steps(model, train.make_optimizer(config, 1), config)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        loss, (logits, _) = steps._loss(params, rest, x, y)  # the loss of these logits
        targets = (1 - smoothing) * np.eye(10)[y] + smoothing / 10
        logp = np.asarray(jax.nn.log_softmax(logits))
        assert float(loss) == pytest.approx(-(targets * logp).sum(-1).mean(), rel=1e-5)


def test_vit_run_saves_a_loadable_model(vit_straight, tiny_data):
    out, model, history = vit_straight
    assert isinstance(model, models.CCT)
    assert model.block0.drop1.deterministic and model.block0.attn.deterministic in (None, True)
    assert [r["epoch"] for r in history] == [1, 2]
    x = tiny_data[2][:4]
    for name in ("model.npz", "checkpoint.npz"):
        loaded = models.load(out / name)  # no factory: the header names CCT and its sizes
        assert isinstance(loaded, models.CCT)
        assert loaded.hyperparameters == model.hyperparameters
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    meta = models.read_header(out / "model.npz")
    assert meta["architecture"] == "CCT" and meta["input_shape"] == [32, 32, 3]
    assert meta["hyperparameters"]["dim"] == 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == TINY_VIT
    assert metrics["config"]["label_smoothing"] == 0.1
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_vit_run_resumes_to_identical_weights(vit_straight, tiny_data, tmp_path):
    out_a, _, history_a = vit_straight
    config = config_for(tmp_path, model=TINY_VIT, label_smoothing=0.1, weight_decay=0.05)

    def stop_after_epoch_1(record):
        if record["epoch"] == 1:
            raise InterruptError

    with pytest.raises(InterruptError):
        train.train(config, tiny_data, progress=False, on_epoch=stop_after_epoch_1)
    _, history_b = train.train(config, tiny_data, resume=True, progress=False)
    assert numbers(history_b) == numbers(history_a)
    assert_same_arrays(weights(tmp_path / "model.npz"), weights(out_a / "model.npz"))
    assert_same_arrays(weights(tmp_path / "checkpoint.npz"), weights(out_a / "checkpoint.npz"))
    # Another architecture or label smoothing cannot resume this checkpoint.
    for change in ({"model": "vit:channels=8,dim=16,depth=2,heads=2,mlp_dim=16"},
                   {"label_smoothing": 0.0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(change))):
            train.train(dataclasses.replace(config, **change), tiny_data, resume=True)


def test_cli_model_and_label_smoothing_flags():
    config, _, _ = parse_args(["--model", "vit", "--label-smoothing", "0.1"])
    assert (config.model, config.label_smoothing) == ("vit", 0.1)
    assert parse_args([])[0].model == "minivgg"
    with pytest.raises(SystemExit):
        parse_args(["--model", "transformer"])


def test_cli_trains_the_vit(image_folder, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "--data", str(image_folder), "--epochs", "1", "--batch-size", "4", "--model", TINY_VIT,
        "--out", str(out), "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = models.load(out / "model.npz")
    assert isinstance(model, models.CCT) and model.hyperparameters["depth"] == 1
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)


def _script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ship_weights_ships_a_vit_run_under_its_name(vit_straight, tmp_path):
    out, model, _ = vit_straight
    ship = _script("ship_weights").ship
    assets = tmp_path / "assets"
    assets.mkdir()
    header = ship(out, [], "vit", assets)
    assert header["architecture"] == "CCT"
    assert sorted(p.name for p in assets.iterdir()) == [
        "vit_cifar10.npz",
        "vit_cifar10_metrics.json",
    ]
    loaded = models.load(assets / "vit_cifar10.npz")
    assert loaded.hyperparameters == model.hyperparameters
    metrics = json.loads((assets / "vit_cifar10_metrics.json").read_text())
    assert metrics["config"]["model"] == TINY_VIT and metrics["earlier_runs"] == []
    with pytest.raises(SystemExit, match="not a 'MiniVGG'"):
        ship(out, [], "minivgg", tmp_path)  # a CCT is not shipped as the miniVGG
    assert not (tmp_path / "minivgg_cifar10.npz").exists()
