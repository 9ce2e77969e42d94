"""``lrpjax.analysis.evaluate`` and ``lrpjax evaluate``: the report files are written and
parseable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from lrpjax.layers import Flatten, MaxPool, ReLU

from lrpjax import baselines, metrics
from lrpjax.analysis import evaluate
from lrpjax.commands import evaluate as evaluate_command
from lrpjax.commands import main as cli

PNG = b"\x89PNG\r\n\x1a\n"


class Tiny(nnx.Module):
    """(N, 8, 8, 3) -> (N, 4): Conv-ReLU-BN-MaxPool-Flatten-Linear, explainable by LRP."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.relu = ReLU()
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.pool = MaxPool((2, 2))
        self.flatten = Flatten()
        self.dense = nnx.Linear(4 * 4 * 4, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.flatten(self.pool(self.bn(self.relu(self.conv(x))))))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny(nnx.Rngs(0))
    model.eval()
    return model


def test_evaluate_writes_a_parseable_report(tiny, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((6, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int32)
    specs = list(evaluate.DEFAULT_EXPLAINERS)
    specs[3] = "integrated_gradients:steps=4"
    specs[4] = "smoothgrad:samples=2,noise=0.2"
    report = evaluate.evaluate(
        tiny, images, labels, specs, tmp_path, region=2, steps=5, batch_size=8,
        sanity_images=6, progress=False,
    )  # fmt: skip
    for name in ("aopc.md", "aopc.json", "curves.png", "sanity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("curves.png", "sanity.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    data = json.loads((tmp_path / "aopc.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert list(data["explainers"]) == specs
    assert data["settings"]["regions"] == 16 and data["settings"]["steps"] == 5
    predicted = evaluate.predict(tiny, images).argmax(axis=1)
    assert data["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    for spec, r in data["explainers"].items():
        for order in ("morf", "lerf"):
            assert len(r[order]["curve"]) == 6, spec
            assert np.isfinite(r[order]["aopc"]) and r[order]["se"] >= 0, spec
        assert r["morf_minus_lerf"]["mean"] == pytest.approx(
            r["morf"]["aopc"] - r["lerf"]["aopc"], abs=1e-9
        )
        assert -1.0 <= r["randomized_correlation"] <= 1.0
    assert "random" in data["sanity"]["insensitive"]  # a random map ignores the model
    assert data["explainers"]["random"]["insensitive"] is True
    # the report agrees with the metric computed directly
    fn, state = baselines.make(tiny, "gradient")
    rel = evaluate.explain_all(fn, state, images, predicted)
    curves = metrics.region_perturbation(
        tiny, images, rel, predicted, region=2, steps=5, replacement="blur", progress=False
    )
    assert data["explainers"]["gradient"]["morf"]["aopc"] == pytest.approx(
        metrics.aopc(curves).mean(), rel=1e-6
    )
    table = (tmp_path / "aopc.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(specs)  # header and one row per explainer
    assert all(f"| {spec} |" in table for spec in specs)


def test_split_specs_keeps_parameters_together():
    text = (
        "random, smoothgrad:samples=8,noise=0.2,lrp:epsilon:eps=0.25,integrated_gradients:steps=4"
    )
    assert evaluate_command._split_specs(text) == [
        "random",
        "smoothgrad:samples=8,noise=0.2",
        "lrp:epsilon:eps=0.25",
        "integrated_gradients:steps=4",
    ]


def test_cli_evaluate_on_the_shipped_sample(tmp_path, capsys):
    out = tmp_path / "eval"
    explainers = "random,gradient,lrp:epsilon"
    argv = ["evaluate", "--limit", "8", "--steps", "4", "--explainers", explainers,
            "--out", str(out), "--no-progress", "--sanity-images", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "aopc.json").read_text())
    assert list(data["explainers"]) == ["random", "gradient", "lrp:epsilon"]
    assert data["settings"]["images"] == 8 and data["settings"]["data"] == "shipped-sample"
    assert data["sanity"]["layers"][0] == "dense2"
    for name in ("aopc.md", "curves.png", "sanity.png"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "| lrp:epsilon |" in printed and "wrote" in printed


def test_cli_evaluate_rejects_unknown_explainers(tmp_path, capsys):
    argv = ["evaluate", "--explainers", "gradient,saliency", "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: unknown explainer 'saliency'" in err and "lrp:epsilon" in err


def test_registered_metrics_score_every_explainer(tmp_path):
    tiny = Tiny(nnx.Rngs(1))
    tiny.dense = nnx.Linear(8 * 8 * 4, 4, rngs=nnx.Rngs(2))  # 16 x 16 images: SSIM's window fits
    tiny.eval()
    rng = np.random.default_rng(1)
    images = rng.random((5, 16, 16, 3)).astype(np.float32)
    specs = ["gradient", "lrp:epsilon"]
    names = ["sparseness", "complexity", "random_logit"]
    report = evaluate.evaluate(
        tiny, images, None, specs, tmp_path, region=2, steps=4, batch_size=8,
        sanity_images=0, progress=False, scores=names,
    )  # fmt: skip
    target = np.asarray(tiny(images)).argmax(-1)
    for spec in specs:
        fn, state = baselines.make(tiny, spec)
        maps = evaluate.explain_all(fn, state, images, target, 8, False)
        for name in ("sparseness", "complexity"):
            expected = metrics.get(name)(tiny, images, maps, target)
            got = report["explainers"][spec]["metrics"][name]
            assert got["mean"] == pytest.approx(float(expected.mean()), rel=1e-6)
        assert report["explainers"][spec]["metrics"]["random_logit"]["family"] == "randomisation"
    md = (tmp_path / "aopc.md").read_text()
    assert "| explainer | sparseness ↑ | complexity ↓ | random_logit ↓ |" in md
    with pytest.raises(ValueError, match="localisation metrics need masks"):
        evaluate.evaluate(tiny, images, None, specs, tmp_path, scores=["pointing_game"])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate.evaluate(tiny, images, None, specs, tmp_path, scores=["beauty"])
