"""`lrpjax.peers`: the miniVGG in PyTorch and LRP in Zennit agree with lrpjax; and
``lrpjax bench --peer zennit`` without PyTorch fails with the install command."""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrpjax
from lrpjax import data
from lrpjax.commands import main as cli

IMAGES = 3  # shipped CIFAR-10 images: real ones, with the flat regions that tie max-pools


@pytest.fixture(scope="module")
def peers():
    pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from lrpjax import peers

    return peers


@pytest.fixture(scope="module")
def model():
    return lrpjax.load_pretrained()


@pytest.fixture(scope="module")
def images():
    return data.sample()[0][::37][:IMAGES]  # three classes


def test_logits_agree(peers, model, images):
    import torch

    with torch.no_grad():
        theirs = peers.torch_model(model)(peers.nchw(images, "float32")).numpy()
    ours = np.asarray(model(jnp.asarray(images)))
    assert peers.max_rel_diff(ours, theirs) < 1e-5
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("preset", ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box",
                                    "epsilon_alpha2_beta1"])  # fmt: skip
def test_relevance_agrees(peers, model, images, preset):
    target = np.asarray(model(jnp.asarray(images))).argmax(-1)
    ours = np.asarray(lrpjax.explain(model, images, composite=preset, target=jnp.asarray(target)))
    net, comp, info = peers.zennit_model(model, images, preset, share_ties=True)
    theirs = peers.zennit_relevance(net, comp, images, target)
    assert peers.max_rel_diff(ours, theirs) < 1e-4
    assert info["merged"] == ["bn5 -> dense2"]
    first = {"epsilon": "Epsilon", "epsilon_plus_flat": "Flat", "epsilon_gamma_box": "ZBox",
             "epsilon_alpha2_beta1": "AlphaBeta"}[preset]  # fmt: skip
    assert info["rules"][0] == ["conv1", first, first]
    assert ["bn1", "Epsilon", "Epsilon"] in info["rules"]


def test_epsilon_agrees_in_float64(peers, model, images):
    with jax.enable_x64(True):
        m = lrpjax.models.cast(model, "float64")
        x = jnp.asarray(images, jnp.float64)
        target = np.asarray(m(x)).argmax(-1)
        ours = np.asarray(lrpjax.explain(m, x, composite="epsilon", target=jnp.asarray(target)))
        net, comp, _ = peers.zennit_model(m, x, "epsilon", "float64", share_ties=True)
    theirs = peers.zennit_relevance(net, comp, images, target)
    assert ours.dtype == theirs.dtype == np.float64
    assert peers.max_rel_diff(ours, theirs) < 1e-12


def test_stock_zennit_differs(peers, model, images):
    """Zennit as shipped passes relevance through batch-norm: another explanation."""
    target = np.asarray(model(jnp.asarray(images))).argmax(-1)
    ours = np.asarray(
        lrpjax.explain(model, images, composite="epsilon", target=jnp.asarray(target))
    )
    comp, info = peers.zennit_composite(model, "epsilon", stock=True)
    theirs = peers.zennit_relevance(peers.torch_model(model), comp, images, target)
    assert ["bn1", "Epsilon", "Pass"] in info["rules"]
    assert peers.max_rel_diff(ours, theirs) > 0.1


def test_benchmark_peer_report(peers, model):
    report = peers.benchmark_peer(model, batch_size=2, repeats=2, methods=["forward", "gradient"],
                                  threads=1, progress=None)  # fmt: skip
    rows = report["results"]
    assert [r["method"] for r in rows] == ["forward", "gradient"]
    for r in rows:
        assert len(r["lrpjax_runs_s"]) == len(r["zennit_runs_s"]) == 2
        assert r["speedup"] == r["zennit_s"] / r["lrpjax_s"]
    assert report["environment"]["torch_threads"] == 1
    text = peers.table({"timing": report})
    assert "| forward |" in text and "| gradient |" in text
    json.dumps(report)


@pytest.mark.parametrize(
    "extra",
    [["--zoo", "vit"], ["--model", "vit"], ["--methods", "smoothgrad"], ["--batch-sizes", "8,16"]],
)
def test_cli_peer_refuses_options(peers, tmp_path, capsys, extra):
    code = cli.main(["bench", "--peer", "zennit", "--json", str(tmp_path / "p.json"), *extra])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("missing", ["torch", "zennit"])
def test_cli_without_torch(tmp_path, capsys, monkeypatch, missing):
    # The message names the first missing import: torch, where it is not installed at all.
    named = missing if importlib.util.find_spec("torch") is not None else "torch"
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    code = cli.main(["bench", "--peer", "zennit", "--json", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert 'pip install "lrpjax[peers]"' in err and f"({named} is not installed)" in err
    assert not (tmp_path / "p.json").exists()
