"""``lrpjax bench``: structure of its report (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json

from lrpjax import compilation
from lrpjax.commands import main as cli

METHODS = ("forward", "gradient", "lrp:epsilon", "lrp:epsilon:eps=0.25", "smoothgrad:samples=2")


def test_bench_smoke(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = cli.main(
        ["bench", "--batch-sizes", "2", "--repeats", "1", "--random-model",
         "--methods", ",".join(METHODS), "--json", str(path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(path.read_text())
    rows = report["results"]
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert r["batch_size"] == 2
        assert r["run_s"] > 0 and r["compile_s"] > 0 and r["images_per_second"] > 0
        assert r["images_per_second"] == 2 / r["run_s"]
    forward = next(r for r in rows if r["method"] == "forward")
    gradient = next(r for r in rows if r["method"] == "gradient")
    assert forward["vs_forward"] == 1.0
    assert gradient["vs_gradient"] == 1.0
    epsilon = next(r for r in rows if r["method"] == "lrp:epsilon")
    assert epsilon["vs_epsilon"] == 1.0
    assert gradient["vs_epsilon"] == gradient["run_s"] / epsilon["run_s"]
    assert report["repeats"] == 1 and report["dtype"] == "float32"
    assert "train" not in report
    assert "| 2 | lrp:epsilon |" in out
    assert f"wrote {path}" in out


def test_bench_train(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = cli.main(
        ["bench", "--batch-sizes", "8", "--repeats", "1", "--random-model",
         "--methods", "forward", "--train", "--json", str(path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(path.read_text())
    (train,) = report["train"]
    assert train["batch_size"] == 8
    assert train["run_s"] > 0 and train["images_per_second"] > 0
    assert "train_step" in out
    (row,) = report["results"]
    assert row["vs_gradient"] is None and row["vs_epsilon"] is None  # nothing to compare with


def test_bench_unknown_method(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = cli.main(
        ["bench", "--batch-sizes", "2", "--repeats", "1", "--random-model",
         "--methods", "forward,nope", "--json", str(path)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: unknown explainer 'nope'"), captured.err
    assert "Traceback" not in captured.err
    assert not path.exists()  # refused before any timing


def test_bench_unknown_composite(tmp_path, capsys):
    code = cli.main(
        ["bench", "--batch-sizes", "2", "--repeats", "1", "--random-model",
         "--methods", "lrp:nope", "--json", str(tmp_path / "b.json")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: unknown explainer 'lrp:nope'"), captured.err


def test_bench_dtype_runs_the_whole_model_in_it():
    # Casting the input alone would be promoted back to the float32 weights.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lrpjax import models
    from lrpjax.bench import speed as bench

    model = models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.zeros((2, *models.INPUT_SHAPE), jnp.bfloat16)
    fn, state = bench.method_fn(model, "forward")
    assert jax.jit(fn)(state, x).dtype == jnp.float32
    assert jax.jit(fn)(models.cast(state, "bfloat16"), x).dtype == jnp.bfloat16
    fn, state = bench.method_fn(model, "lrp:epsilon")
    relevance = jax.jit(fn)(models.cast(state, "bfloat16"), x + 0.5)
    assert relevance.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(relevance)))


def test_cast_copies_a_model_in_the_dtype():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lrpjax import models

    def dtypes(m):  # of the weights and statistics (the dropout keys and counts stay as they are)
        return {a.dtype for a in jax.tree.leaves(nnx.state(m, nnx.Param, nnx.BatchStat))}

    model = _tiny_model()
    low = models.cast(model, "bfloat16")
    assert dtypes(low) == {jnp.dtype(jnp.bfloat16)}
    assert dtypes(model) == {jnp.dtype(jnp.float32)}  # a copy: the model is unchanged
    assert nnx.state(low, nnx.RngState) == nnx.state(model, nnx.RngState)
    x = jnp.zeros((1, *models.INPUT_SHAPE), jnp.bfloat16)
    assert low(x).dtype == jnp.bfloat16


def test_bench_jax_defaults_switch(tmp_path):
    ours, plain = tmp_path / "ours.json", tmp_path / "plain.json"
    args = ["bench", "--batch-sizes", "2", "--repeats", "1", "--random-model"]
    assert cli.main([*args, "--methods", "forward,gradient", "--json", str(ours)]) == 0
    assert cli.main([*args, "--methods", "gradient", "--jax-defaults", "--json", str(plain)]) == 0
    assert json.loads(ours.read_text())["compiler_options"] == compilation.compiler_options()
    assert json.loads(ours.read_text())["compiler_options"] is not None  # CPU
    assert json.loads(plain.read_text())["compiler_options"] is None
    assert compilation.compiler_options() is not None  # the switch ends with the run


def _tiny_model():
    from flax import nnx

    from lrpjax import models

    model = models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_fidelity_of_float32_against_itself_is_exact():
    import numpy as np

    from lrpjax import data
    from lrpjax.bench import speed as bench

    images = data.sample()[0][:2]
    (row,) = bench.fidelity(_tiny_model(), images, ["lrp:epsilon"], dtype="float32")
    assert row["images"] == 2 and row["prediction_changes"] == 0
    assert row["relative_l2_median"] == row["relative_l2_max"] == 0.0
    assert np.isfinite(row["aopc_float32"]) and row["aopc_float32_se"] >= 0


def test_fidelity_of_bfloat16_reports_its_error():
    import numpy as np

    from lrpjax import data
    from lrpjax.bench import speed as bench

    images = data.sample()[0][:2]
    methods = ["lrp:epsilon", "lrp:epsilon_plus_flat"]
    rows = bench.fidelity(_tiny_model(), images, methods, dtype="bfloat16")
    assert [r["method"] for r in rows] == methods
    for r in rows:
        # bfloat16 keeps 8 bits of mantissa: the maps differ, but not beyond recognition.
        assert 0 < r["relative_l2_median"] <= r["relative_l2_max"] < 1
        for key in ("aopc_float32", "aopc_float32_se", "aopc_bfloat16", "aopc_bfloat16_se"):
            assert np.isfinite(r[key])
    text = bench.fidelity_table(rows)
    assert "| lrp:epsilon_plus_flat |" in text and "MoRF AOPC bfloat16" in text


def test_bench_low_precision_reports_fidelity(tmp_path, capsys, monkeypatch):
    from lrpjax import data

    sample = data.sample
    monkeypatch.setattr(data, "sample", lambda: tuple(a[:2] for a in sample()))
    path = tmp_path / "b.json"
    code = cli.main(
        ["bench", "--batch-sizes", "2", "--repeats", "1", "--random-model", "--dtype",
         "bfloat16", "--methods", "lrp:epsilon", "--json", str(path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    (row,) = json.loads(path.read_text())["fidelity"]
    assert row["method"] == "lrp:epsilon" and row["dtype"] == "bfloat16" and row["images"] == 2
    assert "MoRF AOPC bfloat16" in out


def test_bench_model_vit_random_weights(tmp_path, capsys):
    path = tmp_path / "b.json"
    methods = "gradient,lrp:epsilon"
    code = cli.main(
        ["bench", "--model", "vit", "--random-model", "--batch-sizes", "2", "--repeats", "1",
         "--methods", methods, "--json", str(path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads(path.read_text())
    assert report["model"] == "vit (random weights)"
    assert [r["method"] for r in report["results"]] == methods.split(",")


def test_bench_model_errors(tmp_path, capsys):
    args = ["bench", "--batch-sizes", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    assert cli.main([*args, "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main([*args, "--model", "pkg.mod:factory", "--random-model"]) == 2
    assert "--random-model builds a shipped architecture" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
