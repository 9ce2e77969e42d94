"""MiniVGG and CCT: architecture, behaviour, weight files; the max-pool layer; input checks."""

from __future__ import annotations

import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.layers import Flatten, MaxPool, ReLU, max_pool

from lrpjax import models
from lrpjax.models import MiniVGG, ModelFileError

EXPECTED_LAYERS = (
    "conv1", "relu1", "bn1", "conv2", "relu2", "bn2", "pool1", "drop1",
    "conv3", "relu3", "bn3", "conv4", "relu4", "bn4", "pool2", "drop2",
    "flatten", "dense1", "relu5", "bn5", "drop3", "dense2",
)  # fmt: skip
EXPECTED_TYPES = [
    nnx.Conv, ReLU, nnx.BatchNorm, nnx.Conv, ReLU, nnx.BatchNorm, MaxPool, nnx.Dropout,
    nnx.Conv, ReLU, nnx.BatchNorm, nnx.Conv, ReLU, nnx.BatchNorm, MaxPool, nnx.Dropout,
    Flatten, nnx.Linear, ReLU, nnx.BatchNorm, nnx.Dropout, nnx.Linear,
]  # fmt: skip
# Output shape of each layer for a batch of 2.
EXPECTED_SHAPES = {
    "conv1": (2, 32, 32, 32), "bn2": (2, 32, 32, 32), "pool1": (2, 16, 16, 32),
    "conv3": (2, 16, 16, 64), "bn4": (2, 16, 16, 64), "pool2": (2, 8, 8, 64),
    "drop2": (2, 8, 8, 64), "flatten": (2, 4096), "dense1": (2, 512), "drop3": (2, 512),
    "dense2": (2, 10),
}  # fmt: skip


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def model() -> MiniVGG:
    """A fresh MiniVGG in eval mode; tests that change it make their own."""
    m = MiniVGG(rngs=nnx.Rngs(0))
    m.eval()
    return m


# --- architecture ------------------------------------------------------------------------


def test_parameter_count(model):
    assert models.count_params(model) == 2_169_770


def test_layer_names_and_types(model):
    assert MiniVGG.LAYERS == EXPECTED_LAYERS
    assert [type(getattr(model, name)) for name in MiniVGG.LAYERS] == EXPECTED_TYPES


def test_layer_settings(model):
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    features = [(c.in_features, c.out_features) for c in convs]
    assert features == [(3, 32), (32, 32), (32, 64), (64, 64)]
    for c in convs:
        assert tuple(c.kernel_size) == (3, 3)
        assert c.padding == "SAME"
        assert c.kernel[...].shape == (3, 3, c.in_features, c.out_features)
    assert [model.bn1.num_features, model.bn2.num_features, model.bn3.num_features] == [32, 32, 64]
    assert [model.bn4.num_features, model.bn5.num_features] == [64, 512]
    assert [model.pool1.window, model.pool2.window] == [(2, 2), (2, 2)]
    assert [model.drop1.rate, model.drop2.rate, model.drop3.rate] == [0.25, 0.25, 0.5]
    assert (model.dense1.in_features, model.dense1.out_features) == (4096, 512)
    assert (model.dense2.in_features, model.dense2.out_features) == (512, 10)
    assert model.dense1.kernel[...].shape == (4096, 512)
    assert model.dense2.kernel[...].shape == (512, 10)


def test_call_runs_the_layers_in_order():
    m = MiniVGG(rngs=nnx.Rngs(0))
    m.eval()
    x = images(2)
    expected = m(x)
    calls: list[tuple[str, tuple[int, ...]]] = []

    class Recorder(nnx.Module):
        def __init__(self, name: str, inner: nnx.Module):
            self.name, self.inner = name, inner

        def __call__(self, x):
            y = self.inner(x)
            calls.append((self.name, tuple(y.shape)))
            return y

    for name in MiniVGG.LAYERS:
        setattr(m, name, Recorder(name, getattr(m, name)))
    out = m(x)
    assert [name for name, _ in calls] == list(EXPECTED_LAYERS)
    shapes = dict(calls)
    assert {k: shapes[k] for k in EXPECTED_SHAPES} == EXPECTED_SHAPES
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


# --- behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])  # batch sizes the other tests use: no new compiles
def test_logits_shape(model, n):
    out = model(images(n))
    assert out.shape == (n, 10)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_modes_set_dropout_and_batchnorm_flags():
    m = MiniVGG(rngs=nnx.Rngs(0))
    drops, bns = [m.drop1, m.drop2, m.drop3], [m.bn1, m.bn2, m.bn3, m.bn4, m.bn5]
    m.train()
    assert not any(d.deterministic for d in drops)
    assert not any(b.use_running_average for b in bns)
    m.eval()
    assert all(d.deterministic for d in drops)
    assert all(b.use_running_average for b in bns)


def test_eval_mode_is_deterministic_and_per_image(model):
    x = images(4)
    a, b = np.asarray(model(x)), np.asarray(model(x))
    np.testing.assert_array_equal(a, b)
    # Running statistics, not batch statistics: an image's logits do not depend on its batch.
    np.testing.assert_allclose(np.asarray(model(x[:1])), a[:1], rtol=1e-5, atol=1e-5)


def test_train_mode_uses_dropout():
    m = MiniVGG(rngs=nnx.Rngs(0))
    m.train()
    x = images(4)
    a, b = np.asarray(m(x)), np.asarray(m(x))
    assert a.shape == b.shape == (4, 10)
    assert not np.array_equal(a, b)


# --- weight files --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    m = MiniVGG(rngs=nnx.Rngs(1))
    m.train()
    for seed in range(3):  # move the batch statistics away from their initial values
        m(images(4, seed))
    assert not np.allclose(np.asarray(m.bn1.mean[...]), 0.0)
    assert not np.allclose(np.asarray(m.bn5.var[...]), 1.0)
    m.eval()
    x = images(4, seed=9)
    expected = np.asarray(m(x))

    path = tmp_path / "sub" / "weights.npz"
    models.save(m, path, test_accuracy=0.5)
    loaded = models.load(path)
    assert isinstance(loaded, MiniVGG)
    assert loaded.drop1.deterministic and loaded.bn1.use_running_average  # eval mode
    np.testing.assert_array_equal(np.asarray(loaded(x)), expected)

    arrays, meta = models.read_arrays(path)
    assert meta["architecture"] == "MiniVGG"
    assert meta["test_accuracy"] == 0.5
    assert meta["num_classes"] == 10
    np.testing.assert_array_equal(arrays["model/bn1/mean"], np.asarray(m.bn1.mean[...]))
    np.testing.assert_array_equal(arrays["model/dense2/kernel"], np.asarray(m.dense2.kernel[...]))
    assert not list(path.parent.glob("*.tmp"))  # the atomic write leaves nothing behind


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid weight file: its path and its bytes."""
    path = tmp_path_factory.mktemp("weights") / "model.npz"
    models.save(MiniVGG(rngs=nnx.Rngs(0)), path)
    return path, path.read_bytes()


def _array_data_middle(path, member: str) -> int:
    """File offset of the middle of a stored zip member's data."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    raw = path.read_bytes()
    header = raw[info.header_offset : info.header_offset + 30]
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    return start + info.compress_size // 2


def _arrays_and_meta(path):
    return models.read_arrays(path)


def make_truncated(good, path):
    path.write_bytes(good[1][: len(good[1]) // 2])


def make_corrupted(good, path):
    middle = _array_data_middle(good[0], "model/dense1/kernel.npy")
    raw = bytearray(good[1])
    raw[middle : middle + 64] = bytes(b ^ 0xA5 for b in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))


def make_garbage(good, path):
    path.write_bytes(b"this is not a weight file\n" * 100)


def make_empty(good, path):
    path.write_bytes(b"")


def make_missing(good, path):
    pass


def make_headerless(good, path):
    arrays, _ = _arrays_and_meta(good[0])
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def make_other_architecture(good, path):
    models.write_arrays(
        path, {"model/conv/kernel": np.zeros((3, 3, 3, 8), np.float32)}, {"architecture": "ResNet"}
    )


def make_missing_keys(good, path):
    arrays, meta = _arrays_and_meta(good[0])
    del arrays["model/dense2/kernel"]
    models.write_arrays(path, arrays, meta)


def make_wrong_shapes(good, path):
    arrays, meta = _arrays_and_meta(good[0])
    arrays["model/dense2/kernel"] = np.zeros((512, 11), np.float32)
    arrays["model/dense2/bias"] = np.zeros(11, np.float32)
    models.write_arrays(path, arrays, meta)


def make_unexpected_keys(good, path):
    arrays, meta = _arrays_and_meta(good[0])
    arrays["model/dense3/kernel"] = np.zeros((10, 10), np.float32)
    models.write_arrays(path, arrays, meta)


BAD_FILES = [
    (make_missing, ["not found"]),
    (make_truncated, ["truncated or corrupted"]),
    (make_corrupted, ["corrupted", "CRC"]),
    (make_garbage, ["truncated or corrupted"]),
    (make_empty, ["truncated or corrupted"]),
    (make_headerless, ["not a readable lrpjax weight file"]),
    (make_other_architecture, ["'ResNet'", "not MiniVGG"]),
    (make_missing_keys, ["does not fit MiniVGG", "missing", "dense2/kernel"]),
    (make_wrong_shapes, ["does not fit MiniVGG", "wrong shape", "dense2/kernel"]),
    (make_unexpected_keys, ["does not fit MiniVGG", "unexpected", "dense3/kernel"]),
]


@pytest.mark.parametrize(
    ("make", "fragments"),
    [pytest.param(m, f, id=m.__name__.removeprefix("make_")) for m, f in BAD_FILES],
)
def test_bad_weight_files_raise_model_file_error(saved, tmp_path, make, fragments):
    path = tmp_path / "bad.npz"
    make(saved, path)
    with pytest.raises(ModelFileError) as info:
        models.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_npy_file_raises_model_file_error(tmp_path):
    path = tmp_path / "weights.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    with pytest.raises(ModelFileError, match=r"weights\.npz"):
        models.load(path)


# --- max-pool ------------------------------------------------------------------------------


def reference_max_pool(x, window):
    dims = (1, *window, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")


POOL_CASES = [
    ((2, 8, 8, 3), (2, 2)),
    ((2, 7, 6, 4), (2, 2)),  # odd height: the last row is dropped
    ((3, 7, 6, 2), (3, 2)),
    ((1, 5, 5, 1), (5, 5)),
    ((2, 9, 3), (2,)),  # 1D (N, L, C)
    ((2, 10, 3), (3,)),
]
POOL_IDS = [f"{'x'.join(map(str, s))}-w{'x'.join(map(str, w))}" for s, w in POOL_CASES]


def distinct_values(shape, seed=0) -> np.ndarray:
    """Inputs without ties: a random permutation of distinct numbers."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) - n / 2).reshape(shape).astype(np.float32)


@pytest.mark.parametrize(("shape", "window"), POOL_CASES, ids=POOL_IDS)
def test_max_pool_matches_reduce_window(shape, window):
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape).astype(np.float32))
    expected = reference_max_pool(x, window)
    assert max_pool(x, window).shape == expected.shape
    np.testing.assert_array_equal(np.asarray(max_pool(x, window)), np.asarray(expected))
    jitted = jax.jit(max_pool, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(jitted(x, window)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(MaxPool(window)(x)), np.asarray(expected))


@pytest.mark.parametrize(("shape", "window"), POOL_CASES, ids=POOL_IDS)
def test_max_pool_gradient_matches_reduce_window_without_ties(shape, window):
    x = jnp.asarray(distinct_values(shape))
    y, vjp = jax.vjp(lambda v: max_pool(v, window), x)
    _, vjp_ref = jax.vjp(lambda v: reference_max_pool(v, window), x)
    g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape).astype(np.float32))
    (grad,) = vjp(g)
    (grad_ref,) = vjp_ref(g)
    assert grad.shape == x.shape
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_ref))
    # Also through jax.grad under jit.
    loss = jax.jit(lambda v: jnp.sum(max_pool(v, window) * g))
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x)), np.asarray(grad_ref))


def test_max_pool_gradient_splits_all_equal_window():
    x = jnp.ones((1, 4, 4, 1), jnp.float32)
    g = jnp.asarray([[[[1.0], [2.0]], [[4.0], [8.0]]]])
    (grad,) = jax.vjp(lambda v: max_pool(v, (2, 2)), x)[1](g)
    expected = np.repeat(np.repeat(np.asarray(g) / 4, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(grad), expected)


@pytest.mark.parametrize(("shape", "window"), POOL_CASES, ids=POOL_IDS)
def test_max_pool_gradient_shares_ties_and_conserves_sum(shape, window):
    # Few distinct values, so most windows have several tied maxima.
    x = np.random.default_rng(3).integers(0, 3, size=shape).astype(np.float32)
    y, vjp = jax.vjp(lambda v: max_pool(v, window), jnp.asarray(x))
    g = np.random.default_rng(4).uniform(0.5, 2.0, size=y.shape).astype(np.float32)
    (grad,) = vjp(jnp.asarray(g))
    grad = np.asarray(grad)
    y = np.asarray(y)

    index = np.ndindex(*y.shape[1:-1])
    n, c = shape[0], shape[-1]
    assert n * c > 0
    covered = np.zeros(shape, bool)
    for pos in index:
        block = tuple(slice(p * w, (p + 1) * w) for p, w in zip(pos, window, strict=True))
        xs, gs = x[(slice(None), *block)], grad[(slice(None), *block)]
        covered[(slice(None), *block)] = True
        axes = tuple(range(1, 1 + len(window)))
        ymax = y[(slice(None), *pos)]  # (N, C)
        winners = xs == np.expand_dims(ymax, axes)
        ties = winners.sum(axis=axes)
        share = g[(slice(None), *pos)] / ties
        expected = np.where(winners, np.expand_dims(share, axes), 0.0)
        np.testing.assert_allclose(gs, expected, rtol=1e-6)
        np.testing.assert_allclose(gs.sum(axis=axes), g[(slice(None), *pos)], rtol=1e-5)
    # Rows and columns that fill no window get no gradient.
    assert np.all(grad[~covered] == 0)


# --- input checks --------------------------------------------------------------------------


def _bad(value_at=None, value=0.0, shape=(2, 32, 32, 3)):
    x = np.full(shape, 0.5, np.float32)
    if value_at is not None:
        x[value_at] = value
    return x


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.zeros((32, 32, 3), np.float32), "shape"),
        (np.zeros((2, 32, 32, 1), np.float32), "shape"),
        (np.zeros((2, 3, 32, 32), np.float32), "shape"),
        (np.zeros((2, 28, 28, 3), np.float32), "shape"),
        (np.zeros((2, 32, 32, 3, 1), np.float32), "shape"),
        (_bad((1, 5, 5, 0), np.nan), "NaN"),
        (_bad((0, 0, 0, 2), np.inf), "Inf"),
        (_bad((1, 31, 31, 2), 1.5), "[0, 1]"),
        (_bad((0, 3, 3, 1), -0.01), "[0, 1]"),
        (_bad() * 255, "[0, 1]"),
    ],
    ids=["no-batch", "1-chan", "nchw", "28x28", "5d", "nan", "inf", "above-1", "below-0", "x255"],
)
def test_check_images_refuses(x, fragment):
    with pytest.raises(ValueError, match=None) as info:
        models.check_images(x)
    assert fragment in str(info.value)
    with pytest.raises(ValueError):
        models.check_images(jnp.asarray(x))


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((1, 32, 32, 3), np.float32),
        np.ones((2, 32, 32, 3), np.float32),
        images(3),
        np.zeros((0, 32, 32, 3), np.float32),
    ],
    ids=["zeros", "ones", "random", "empty-batch"],
)
def test_check_images_accepts(x):
    assert models.check_images(x) is None
    assert models.check_images(jnp.asarray(x)) is None


# --- any NNX model ---------------------------------------------------------------------------


class TinyNet(nnx.Module):
    """Not a MiniVGG: saved and loaded through a factory."""

    def __init__(self, num_classes: int = 3, *, rngs: nnx.Rngs):
        self.flatten = Flatten()
        self.dense = nnx.Linear(4 * 4 * 3, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.flatten(x))


class OtherNet(TinyNet):
    pass


def test_any_model_round_trip_with_class_names(tmp_path):
    m = TinyNet(rngs=nnx.Rngs(5))
    path = tmp_path / "tiny.npz"
    models.save(m, path, class_names=["x", "y", "z"], input_shape=(4, 4, 3), note="hi")
    meta = models.read_header(path)
    assert meta["architecture"] == "TinyNet" and meta["module"] == __name__
    assert meta["class_names"] == ["x", "y", "z"] and meta["num_classes"] == 3
    assert meta["input_shape"] == [4, 4, 3] and meta["note"] == "hi"
    loaded = models.load(path, factory=lambda: TinyNet(rngs=nnx.Rngs(0)))
    assert isinstance(loaded, TinyNet)
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(m(x)))
    assert models.class_names_of(meta, 3) == ("x", "y", "z")
    assert models.output_size(loaded, (4, 4, 3)) == 3


def test_any_model_errors(tmp_path):
    path = tmp_path / "tiny.npz"
    models.save(TinyNet(rngs=nnx.Rngs(5)), path)
    with pytest.raises(ModelFileError, match="holds a 'TinyNet' model, not MiniVGG"):
        models.load(path)
    with pytest.raises(ModelFileError, match="holds a 'TinyNet' model, but the factory builds"):
        models.load(path, factory=lambda: OtherNet(rngs=nnx.Rngs(0)))
    with pytest.raises(ModelFileError, match="does not fit TinyNet"):
        models.load(path, factory=lambda: TinyNet(5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="2 class names for a model with 10 classes"):
        models.save(MiniVGG(rngs=nnx.Rngs(0)), tmp_path / "m.npz", class_names=["a", "b"])
    with pytest.raises(ValueError, match="does not take images of shape"):
        models.output_size(TinyNet(rngs=nnx.Rngs(0)), (8, 8, 3))


def test_class_names_fall_back():
    assert models.class_names_of({"architecture": "MiniVGG"}, 10) == models.CLASS_NAMES
    assert models.class_names_of({"architecture": "MiniVGG"}, 4) == ("0", "1", "2", "3")
    assert models.class_names_of({"class_names": ["a"]}, 2) == ("0", "1")  # wrong count


def test_shipped_registry_loads_the_minivgg():
    model, header = models.load_shipped("minivgg")
    assert isinstance(model, MiniVGG) and header["architecture"] == "MiniVGG"
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.load_shipped("resnet")


def test_import_factory(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(
        "class A:\n    @staticmethod\n    def make():\n        return 1\n"
    )
    (tmp_path / "userpkg" / "broken.py").write_text("def f(:\n")
    (tmp_path / "userpkg" / "raises.py").write_text("import numpy\nnumpy.nothing_here\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert models.import_factory("userpkg.nets:A.make")() == 1
    for bad, message in [("nocolon", "expected"), ("userpkg.nets:B", "has no 'B'"),
                         ("userpkg.missing:f", "cannot import"),
                         ("userpkg.broken:f", r"cannot import 'userpkg.broken': SyntaxError"),
                         ("userpkg.raises:f", "AttributeError: .*nothing_here")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            models.import_factory(bad)


# --- the compact convolutional transformer (CCT) -------------------------------------------

TINY_CCT = {"channels": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 24}
#: Layer types the LRP engine explains (see the model's docstring); containers aside.
EXPLAINABLE = (
    nnx.Conv, nnx.Linear, nnx.LinearGeneral, nnx.LayerNorm, nnx.MultiHeadAttention, nnx.Dropout,
    MaxPool, ReLU,
)  # fmt: skip


def test_cct_default_size_and_layers():
    m = models.CCT(rngs=nnx.Rngs(0))
    assert models.count_params(m) == 483_659  # CCT-4/3x2 of Hassani et al. (0.48M)
    assert 4 * models.count_params(m) <= 10 * 2**20  # float32 weights fit in 10 MB
    assert [m.conv1.out_features, m.conv2.out_features] == [64, 128]
    assert m.pos_embed[...].shape == (1, 64, 128)  # 8 x 8 tokens
    assert m.depth == 4 and not hasattr(m, "block4")
    assert all(getattr(m, f"block{i}").attn.num_heads == 2 for i in range(4))
    assert (m.block0.mlp1.in_features, m.block0.mlp1.out_features) == (128, 128)
    assert (m.pool_score.out_features, m.head.out_features) == (1, 10)
    assert not m.conv1.use_bias and m.block0.attn.decode is False
    leaves = [
        type(mod)
        for path, mod in nnx.iter_modules(m)
        if path and not isinstance(mod, models.TransformerBlock)
    ]
    assert set(leaves) <= set(EXPLAINABLE), set(leaves) - set(EXPLAINABLE)


def test_cct_forward_by_hand():
    """The logits equal the architecture written out with the layers' own calls."""
    m = models.CCT(**TINY_CCT, rngs=nnx.Rngs(3))
    m.eval()
    x = images(3)
    h = x
    for conv in (m.conv1, m.conv2):
        h = max_pool(jax.nn.relu(conv(h)), (2, 2))
    assert h.shape == (3, 8, 8, 16)
    t = h.reshape(3, 64, 16) + m.pos_embed[...]
    for block in (m.block0, m.block1):
        t = t + block.attn(block.norm1(t))
        t = t + block.mlp2(jax.nn.gelu(block.mlp1(block.norm2(t))))
    t = m.norm(t)
    score = t @ m.pool_score.kernel[...] + m.pool_score.bias[...]  # (3, 64, 1)
    w = np.exp(score - score.max(axis=1, keepdims=True))
    w = w / w.sum(axis=1, keepdims=True)
    expected = m.head((w * t).sum(axis=1))
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_cct_modes_and_per_image_eval():
    m = models.CCT(**TINY_CCT, rngs=nnx.Rngs(0))
    x = images(4)
    m.train()
    assert not m.block0.drop1.deterministic
    a, b = np.asarray(m(x)), np.asarray(m(x))
    assert not np.array_equal(a, b)  # dropout
    m.eval()
    assert m.block1.drop2.deterministic and m.block0.attn.deterministic
    a = np.asarray(m(x))
    assert a.shape == (4, 10) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, np.asarray(m(x)))
    np.testing.assert_allclose(np.asarray(m(x[1:2])), a[1:2], rtol=1e-5, atol=1e-5)


def test_cct_rejects_image_sizes_the_tokenizer_cannot_pool():
    with pytest.raises(ValueError, match="not divisible by 2 \\*\\* 2"):
        models.CCT(image_size=30, rngs=nnx.Rngs(0))


def test_cct_save_load_from_header(tmp_path):
    m = models.CCT(**TINY_CCT, num_classes=4, rngs=nnx.Rngs(7))
    m.eval()
    path = tmp_path / "cct.npz"
    models.save(m, path, class_names=["a", "b", "c", "d"], test_accuracy=0.5)
    meta = models.read_header(path)
    assert meta["architecture"] == "CCT" and meta["num_classes"] == 4
    assert meta["input_shape"] == [32, 32, 3]
    assert meta["hyperparameters"] == {**m.hyperparameters, "channels": [8]}
    loaded = models.load(path)  # no factory: built from the header
    assert isinstance(loaded, models.CCT) and loaded.hyperparameters == m.hyperparameters
    assert loaded.block0.drop1.deterministic
    x = images(2)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(m(x)))
    # A factory of another size is refused, naming what does not fit.
    with pytest.raises(ModelFileError, match="does not fit CCT"):
        models.load(path, factory=lambda: models.CCT(num_classes=4, rngs=nnx.Rngs(0)))
    # MiniVGG files still load without a factory beside it.
    models.save(MiniVGG(rngs=nnx.Rngs(0)), tmp_path / "vgg.npz")
    assert isinstance(models.load(tmp_path / "vgg.npz"), MiniVGG)


def test_shipped_vit_entry(tmp_path, monkeypatch):
    import dataclasses

    import lrpjax

    assert "vit" in models.SHIPPED and "minivgg" in models.SHIPPED
    # The registry's factory builds the architecture the shipped file will hold.
    assert isinstance(nnx.eval_shape(models.SHIPPED["vit"].factory), models.CCT)
    # An absolute file name stands in for the asset (the package folder is left alone).
    missing = dataclasses.replace(models.SHIPPED["vit"], weights=str(tmp_path / "none.npz"))
    monkeypatch.setitem(models.SHIPPED, "vit", missing)
    with pytest.raises(ModelFileError, match=r"weights of the shipped model 'vit'.*not installed"):
        lrpjax.load_pretrained("vit")
    m = models.CCT(**TINY_CCT, rngs=nnx.Rngs(1))
    models.save(m, tmp_path / "vit.npz", test_accuracy=0.9)
    there = dataclasses.replace(missing, weights=str(tmp_path / "vit.npz"))
    monkeypatch.setitem(models.SHIPPED, "vit", there)
    loaded = lrpjax.load_pretrained("vit")  # other sizes than the factory's: from the header
    assert isinstance(loaded, models.CCT) and loaded.hyperparameters["depth"] == 2
    assert loaded.block0.drop1.deterministic
    x = images(1)
    m.eval()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(m(x)))
    assert models.load_shipped("vit")[1]["test_accuracy"] == 0.9
    assert isinstance(lrpjax.load_pretrained(), MiniVGG)  # the default stays the miniVGG
