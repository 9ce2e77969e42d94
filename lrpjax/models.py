"""The reference miniVGG and a compact convolutional transformer for CIFAR-10, their input
convention, weight files for any NNX model, and the registry of shipped models.

Weight files are NumPy ``.npz`` archives read with ``allow_pickle=False``: one array per
model variable (`nnx.Param` and `nnx.BatchStat`), keyed ``model/<path>``, and a JSON header
under ``__meta__`` that names the architecture (the model's class name), and where known its
class names and input shape. The zip container's CRC-32 checks catch truncated and corrupted
files.

Any Flax NNX model can be saved with `save` and loaded back with `load` given a factory that
builds the same architecture (``load(path, factory=make_my_net)``); the factory is run under
`nnx.eval_shape`, so building costs nothing, and the header's architecture must match the
built model's class name. MiniVGG and CCT files load without a factory (a model with a
``hyperparameters`` dict, such as `CCT`, records it in the header, and `load` rebuilds it
from there).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core.layers import Flatten, MaxPool, ReLU

__all__ = [
    "CCT",
    "CLASS_NAMES",
    "INPUT_SHAPE",
    "NUM_CLASSES",
    "SHIPPED",
    "MiniVGG",
    "ModelFileError",
    "ShippedModel",
    "cast",
    "check_images",
    "class_names_of",
    "import_factory",
    "load",
    "load_shipped",
    "output_size",
    "read_arrays",
    "read_header",
    "save",
    "write_arrays",
    "write_json",
]

#: CIFAR-10 class names in label order.
CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
#: One input image: height, width, channels (NHWC batches), float32 values in [0, 1].
INPUT_SHAPE: tuple[int, int, int] = (32, 32, 3)

FORMAT_VERSION = 1
_SAVED = nnx.Any(nnx.Param, nnx.BatchStat)  # what a weight file holds


class MiniVGG(nnx.Module):
    """miniVGG: two Conv-ReLU-BN blocks with max-pool and dropout, then Dense 512 and Dense 10.

    Input: (N, 32, 32, 3) float32 in [0, 1]. Output: (N, 10) logits (softmax is applied
    outside, in the loss and where probabilities are shown). 2,169,770 trainable parameters.
    The layers run in the order of `LAYERS`; each is an attribute of that name.
    """

    LAYERS: tuple[str, ...] = (
        "conv1", "relu1", "bn1", "conv2", "relu2", "bn2", "pool1", "drop1",
        "conv3", "relu3", "bn3", "conv4", "relu4", "bn4", "pool2", "drop2",
        "flatten", "dense1", "relu5", "bn5", "drop3", "dense2",
    )  # fmt: skip

    def __init__(self, *, num_classes: int = NUM_CLASSES, rngs: nnx.Rngs):
        def conv(cin: int, cout: int) -> nnx.Conv:
            return nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)

        self.conv1, self.relu1, self.bn1 = conv(3, 32), ReLU(), nnx.BatchNorm(32, rngs=rngs)
        self.conv2, self.relu2, self.bn2 = conv(32, 32), ReLU(), nnx.BatchNorm(32, rngs=rngs)
        self.pool1, self.drop1 = MaxPool((2, 2)), nnx.Dropout(0.25, rngs=rngs)
        self.conv3, self.relu3, self.bn3 = conv(32, 64), ReLU(), nnx.BatchNorm(64, rngs=rngs)
        self.conv4, self.relu4, self.bn4 = conv(64, 64), ReLU(), nnx.BatchNorm(64, rngs=rngs)
        self.pool2, self.drop2 = MaxPool((2, 2)), nnx.Dropout(0.25, rngs=rngs)
        self.flatten = Flatten()
        self.dense1 = nnx.Linear(8 * 8 * 64, 512, rngs=rngs)
        self.relu5, self.bn5 = ReLU(), nnx.BatchNorm(512, rngs=rngs)
        self.drop3 = nnx.Dropout(0.5, rngs=rngs)
        self.dense2 = nnx.Linear(512, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        return x


class TransformerBlock(nnx.Module):
    """Pre-norm transformer encoder block: ``x + Drop(MHA(LN(x)))``, then
    ``x + Drop(Linear(GELU(Linear(LN(x)))))``.

    Every layer module is called exactly once per forward pass; the two dropouts are
    separate modules (toggled by ``model.train()`` / ``model.eval()``).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float,
        *,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.norm1 = nnx.LayerNorm(dim, use_bias=use_bias, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, use_bias=use_bias, decode=False, rngs=rngs
        )
        self.drop1 = nnx.Dropout(dropout, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, use_bias=use_bias, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, mlp_dim, use_bias=use_bias, rngs=rngs)
        self.mlp2 = nnx.Linear(mlp_dim, dim, use_bias=use_bias, rngs=rngs)
        self.drop2 = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (N, T, dim); mask: None or (N, heads or 1, T, T) booleans (True: attend)."""
        x = x + self.drop1(self.attn(self.norm1(x), mask=mask))
        return x + self.drop2(self.mlp2(nnx.gelu(self.mlp1(self.norm2(x)))))


class CCT(nnx.Module):
    """A Compact Convolutional Transformer (CCT) for 32x32 images (Hassani et al. 2021).

    Architecture (defaults, "CCT-4/3x2" of the paper with non-overlapping pooling):

    - convolutional tokenizer, ``len(channels) + 1`` stages of Conv 3x3 (no bias, SAME) ->
      ReLU -> MaxPool 2x2 with ``*channels, dim`` output channels: 32x32x3 -> 16x16x64 ->
      8x8x128, i.e. 64 tokens of width ``dim``; the paper pools with overlapping 3x3 windows
      of stride 2, here 2x2 windows (`lrpjax.core.layers.MaxPool`), which the LRP engine
      explains with the winner-take-all rule;
    - a learned position embedding added to the tokens;
    - ``depth`` pre-norm transformer blocks (`TransformerBlock`: `nnx.MultiHeadAttention`
      with ``heads`` heads, LayerNorm, GELU MLP of width ``mlp_dim``, residual additions,
      dropout ``dropout``);
    - LayerNorm, then sequence pooling instead of a class token: token weights
      ``softmax_t(Linear(x_t))`` over the tokens, ``z = sum_t w_t x_t``;
    - Linear ``dim -> num_classes``: (N, num_classes) logits.

    The defaults have 483,659 trainable parameters (1.9 MB as float32). Input: (N, 32, 32, 3)
    float32 in [0, 1] (other sizes divisible by ``2 ** (len(channels) + 1)`` work, with a
    matching ``image_size``). Dropout and attention follow ``model.train()`` /
    ``model.eval()``.

    References:
      Hassani, Walton, Shah, Abuduweili, Li, Shi (2021). Escaping the Big Data Paradigm with
      Compact Transformers. arXiv:2104.05704.
      Dosovitskiy et al. (2021). An Image is Worth 16x16 Words: Transformers for Image
      Recognition at Scale. ICLR.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        channels: int | Sequence[int] = (64,),
        dim: int = 128,
        depth: int = 4,
        heads: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
        num_classes: int = NUM_CLASSES,
        rngs: nnx.Rngs,
    ):
        channels = [int(channels)] if isinstance(channels, int) else [int(c) for c in channels]
        stages = [in_channels, *channels, dim]
        self.num_stages = len(stages) - 1
        if image_size % 2**self.num_stages:
            raise ValueError(
                f"image_size {image_size} is not divisible by 2 ** {self.num_stages} "
                "(one 2x2 pooling per tokenizer stage)"
            )
        for i, (cin, cout) in enumerate(itertools.pairwise(stages), start=1):
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs),
            )
            setattr(self, f"relu{i}", ReLU())
            setattr(self, f"pool{i}", MaxPool((2, 2)))
        tokens = (image_size // 2**self.num_stages) ** 2
        init = nnx.initializers.truncated_normal(0.2)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, tokens, dim)))
        self.depth = depth
        for i in range(depth):
            setattr(self, f"block{i}", TransformerBlock(dim, heads, mlp_dim, dropout, rngs=rngs))
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.pool_score = nnx.Linear(dim, 1, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)
        self.num_classes = num_classes
        self.config = (
            ("image_size", image_size), ("in_channels", in_channels), ("channels", tuple(channels)),
            ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim),
            ("dropout", dropout), ("num_classes", num_classes),
        )  # fmt: skip

    @property
    def hyperparameters(self) -> dict:
        """The constructor's arguments (JSON-serialisable): `save` writes them in the header."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config}

    def tokens(self, x: jax.Array) -> jax.Array:
        """The tokenizer: (N, H, W, C) images -> (N, T, dim) tokens with position embedding."""
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"relu{i}")(getattr(self, f"conv{i}")(x)))
        n, dim = x.shape[0], x.shape[-1]
        return x.reshape(n, -1, dim) + self.pos_embed[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.tokens(x)
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
        x = self.norm(x)
        weights = jax.nn.softmax(self.pool_score(x), axis=1)  # (N, T, 1), over the tokens
        return self.head(jnp.sum(weights * x, axis=1))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (`nnx.Param` entries) of a model."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def cast(model, dtype):
    """A model, or a model's state, with its floating-point arrays in `dtype` (integers, keys
    and the like unchanged).

    An input cast alone would be promoted back to the float32 of the weights: to run a model
    in bfloat16 or float64, cast its weights and statistics too.

    Args:
      model: an `nnx.Module` (a copy is returned; the model is unchanged), or any pytree of
        arrays such as an `nnx.State` from `nnx.split` (a new tree is returned).
      dtype: e.g. ``"bfloat16"``, ``"float64"`` (under ``jax.enable_x64``).
    """
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, cast(state, dtype), copy=True)
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, model
    )


class ModelFileError(ValueError):
    """A weight file is missing, truncated, corrupted, or for another architecture."""


def check_images(x: jax.Array | np.ndarray, shape: Sequence[int] | None = INPUT_SHAPE) -> None:
    """Refuse inputs that are not a (N, *shape) batch of finite values in [0, 1].

    Args:
      x: the images, NHWC.
      shape: the shape of one image the model takes (default: the miniVGG's 32x32x3);
        ``None`` checks only that `x` is a batch of 4-D images.

    Raises:
      ValueError: naming what is wrong with the input.
    """
    got = tuple(np.shape(x))
    if shape is None:
        if len(got) != 4:
            raise ValueError(f"expected a batch of images (N, height, width, channels), got {got}")
    elif len(got) != 1 + len(shape) or got[1:] != tuple(shape):
        raise ValueError(
            f"expected images of shape (N, {', '.join(map(str, shape))}) "
            f"(NHWC, {shape[-1]} channels), got {got}"
        )
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf values")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"image values must lie in [0, 1] (pixels / 255), got [{lo:.3g}, {hi:.3g}]"
        )


def output_size(model: nnx.Module, image_shape: Sequence[int]) -> int:
    """The number of classes (last output axis) of `model` on images of `image_shape`.

    Computed abstractly (`jax.eval_shape`), without running the model.

    Raises:
      ValueError: the model does not take images of that shape.
    """
    try:
        out = jax.eval_shape(
            lambda x: model(x), jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        )
    except Exception as e:  # shape errors of user models come as many exception types
        raise ValueError(
            f"the model ({type(model).__name__}) does not take images of shape "
            f"{tuple(image_shape)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(
            f"the model ({type(model).__name__}) must return (N, classes) logits, "
            f"got {getattr(out, 'shape', type(out).__name__)}"
        )
    return int(out.shape[-1])


def _variables(model: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters and batch statistics, keyed by their '/'-joined path."""
    state = nnx.state(model, _SAVED)
    return {"/".join(map(str, path)): np.asarray(value) for path, value in nnx.to_flat_state(state)}


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    """Write arrays and a JSON header to an ``.npz`` file atomically.

    The file is written beside its destination and renamed over it only once complete, so a
    killed write never leaves a truncated file where a good one was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=header, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically: to a temporary file beside `path`, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def read_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read an ``.npz`` file written by `write_arrays`, checking its integrity.

    Raises:
      ModelFileError: the file is missing, truncated, corrupted or has no lrpjax header.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"weight file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with npz:
            arrays = {k: npz[k] for k in npz.files}  # reading each member checks its CRC
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("its header is not a JSON object")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise ModelFileError(
            f"{path} is not a readable lrpjax weight file (truncated or corrupted?): {e}"
        ) from None
    return arrays, meta


def _num_classes(model: nnx.Module) -> int | None:
    """The class count of models that say it: MiniVGG's last layer or a ``num_classes``."""
    if isinstance(model, MiniVGG):
        return int(model.dense2.out_features)
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def save(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    **meta,
) -> None:
    """Save any NNX model's parameters and batch statistics to an ``.npz`` weight file.

    The header names the architecture (``type(model).__name__``), and, where given or known,
    the class names, the class count and the shape of one input image; `load` checks the
    architecture, ``lrpjax explain`` uses the class names to match image folders.

    Args:
      model: the model to save.
      path: destination file; written atomically.
      class_names: the name of each output class, in output order.
      input_shape: the shape of one input (e.g. ``(32, 32, 3)``); MiniVGG's is known.
      **meta: extra JSON-serialisable fields for the header (e.g. accuracy, command).

    Raises:
      ValueError: `class_names` disagrees with the model's class count.
    """
    arrays = {f"model/{k}": v for k, v in _variables(model).items()}
    num_classes = _num_classes(model)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {num_classes} classes"
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError("class names must be distinct")
        num_classes = len(class_names)
    if input_shape is None and isinstance(model, MiniVGG | CCT):
        input_shape = INPUT_SHAPE if isinstance(model, MiniVGG) else _cct_input_shape(model)
    hyper = getattr(model, "hyperparameters", None)
    header = {
        "format": "lrpjax-weights",
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "module": type(model).__module__,
        **({"num_classes": num_classes} if num_classes is not None else {}),
        **({"class_names": class_names} if class_names is not None else {}),
        **({"input_shape": [int(d) for d in input_shape]} if input_shape is not None else {}),
        **({"hyperparameters": dict(hyper)} if isinstance(hyper, Mapping) else {}),
        **meta,
    }
    write_arrays(path, arrays, header)


def _cct_input_shape(model: CCT) -> tuple[int, int, int]:
    h = model.hyperparameters
    return (h["image_size"], h["image_size"], h["in_channels"])


def _cct_from(meta: Mapping) -> CCT:
    """A CCT of the hyperparameters a header records (the class count from the header)."""
    hyper = dict(meta.get("hyperparameters") or {})
    hyper["num_classes"] = int(meta.get("num_classes", hyper.get("num_classes", NUM_CLASSES)))
    try:
        return CCT(**hyper, rngs=nnx.Rngs(0))
    except TypeError as e:
        raise ModelFileError(
            f"the header's CCT hyperparameters {hyper} do not fit CCT: {e}"
        ) from None


def restore(model: nnx.Module, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Copy ``model/<path>`` arrays into a model in place, checking names and shapes."""
    expected = _variables(model)
    given = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
    missing, extra = expected.keys() - given.keys(), given.keys() - expected.keys()
    wrong = [k for k in expected.keys() & given.keys() if given[k].shape != expected[k].shape]
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(sorted(keys)[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        )
        raise ModelFileError(f"{source} does not fit {type(model).__name__} ({detail})")
    state = nnx.state(model, _SAVED)
    flat = [
        (path, jnp.asarray(given["/".join(map(str, path))])) for path, _ in nnx.to_flat_state(state)
    ]
    nnx.update(model, nnx.from_flat_state(flat))


def _unfilled_from(factory: Callable[[], nnx.Module]) -> nnx.Module:
    """The model `factory` builds, with zeros for weights, without running the initialisers.

    Random initialisation runs eagerly and takes seconds on a CPU; loading overwrites every
    parameter anyway. RNG keys (dropout) get a fixed key.
    """
    abstract = nnx.eval_shape(factory)
    if not isinstance(abstract, nnx.Module):
        raise ModelFileError(
            f"the model factory returned {type(abstract).__name__}, not a Flax NNX module"
        )
    graphdef, state = nnx.split(abstract)

    def fill(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(0), leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def _unfilled(num_classes: int) -> MiniVGG:
    """A MiniVGG with zeros for weights (see `_unfilled_from`)."""
    return _unfilled_from(lambda: MiniVGG(num_classes=num_classes, rngs=nnx.Rngs(0)))


#: Architectures `load` builds without a factory: header name -> factory of the header.
ARCHITECTURES: dict[str, Callable[[dict], nnx.Module]] = {
    "MiniVGG": lambda meta: MiniVGG(
        num_classes=int(meta.get("num_classes", NUM_CLASSES)), rngs=nnx.Rngs(0)
    ),
    "CCT": _cct_from,
}


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a weight file (without reading its arrays).

    Raises:
      ModelFileError: the file is missing or is not a readable lrpjax weight file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"weight file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["__meta__"].tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("its header is not a JSON object")
    except (
        zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError,
        AttributeError, TypeError,
    ) as e:  # fmt: skip
        raise ModelFileError(
            f"{path} is not a readable lrpjax weight file (truncated or corrupted?): {e}"
        ) from None
    return meta


def load(
    path: str | os.PathLike,
    factory: Callable[[], nnx.Module] | None = None,
) -> nnx.Module:
    """Load a weight file (from `save` or ``python -m train``) into a model in eval mode.

    Args:
      path: an ``.npz`` weight file or training checkpoint.
      factory: a callable with no arguments that builds the model (e.g.
        ``lambda: MyNet(rngs=nnx.Rngs(0))``); run abstractly, so it costs nothing. ``None``:
        the architecture the header names must be one lrpjax knows (MiniVGG).

    Returns:
      The model, in eval mode (dropout off, batch-norm running statistics).

    Raises:
      ModelFileError: the file is missing, corrupt, or holds another architecture than the
        factory builds (or an unknown one, without a factory).
    """
    arrays, meta = read_arrays(path)
    arch = meta.get("architecture", "unknown")
    if factory is None:
        if arch not in ARCHITECTURES:
            raise ModelFileError(
                f"{path} holds a {arch!r} model, not {' or '.join(ARCHITECTURES)} "
                "(load it with its factory: --model package.module:factory)"
            )
        model = _unfilled_from(lambda: ARCHITECTURES[arch](meta))
    else:
        model = _unfilled_from(factory)
        if type(model).__name__ != arch:
            raise ModelFileError(
                f"{path} holds a {arch!r} model, but the factory builds {type(model).__name__!r}"
            )
    restore(model, arrays, source=str(path))
    model.eval()
    return model


def class_names_of(meta: Mapping, num_classes: int) -> tuple[str, ...]:
    """A model's class names: from its weight file's header, else defaults.

    The header's ``class_names`` if it has as many as the model has classes; else, for a
    10-class MiniVGG (the shipped model's header predates class names), CIFAR-10's names;
    else ``"0"``, ``"1"``, ...
    """
    names = meta.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return tuple(str(n) for n in names)
    if meta.get("architecture") == "MiniVGG" and num_classes == NUM_CLASSES:
        return CLASS_NAMES
    return tuple(str(i) for i in range(num_classes))


def import_factory(spec: str) -> Callable[[], nnx.Module]:
    """The callable named by ``"package.module:factory"`` (attributes may be dotted).

    The current directory is searched first, as ``python -m`` would, and stays on
    ``sys.path`` afterwards (as with ``python -m``), so that a factory which imports a
    neighbouring module when it is called finds it too.

    Raises:
      ValueError: the spec is malformed, or the module cannot be imported (any error while
        importing it, e.g. a SyntaxError in it, named with its cause), or the name cannot
        be found.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--model {spec!r}: expected a shipped model name or package.module:factory"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while it is imported
        detail = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, SyntaxError) and e.filename:
            detail = f"{e.msg} ({e.filename}, line {e.lineno})"
        raise ValueError(
            f"--model {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {detail}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    return obj


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    """A model that ships with lrpjax: its weight file in ``lrpjax/assets`` and how to build it.

    Attributes:
      weights: file name under ``lrpjax/assets``.
      factory: builds the architecture (run abstractly by `load`).
      description: one line for ``--help``.
    """

    weights: str
    factory: Callable[[], nnx.Module]
    description: str


#: Shipped models by ``--model`` name. A new one (e.g. a vision transformer) is one entry.
SHIPPED: dict[str, ShippedModel] = {
    "minivgg": ShippedModel(
        "minivgg_cifar10.npz",
        lambda: MiniVGG(rngs=nnx.Rngs(0)),
        "miniVGG trained on CIFAR-10 (87.13% test accuracy)",
    ),
    "vit": ShippedModel(
        "vit_cifar10.npz",
        lambda: CCT(rngs=nnx.Rngs(0)),
        "compact convolutional transformer (CCT-4/3x2) trained on CIFAR-10",
    ),
}


def load_shipped(name: str = "minivgg") -> tuple[nnx.Module, dict]:
    """A shipped model in eval mode and its weight file's header (offline).

    The architecture is built from the weight file's header where lrpjax knows it (so a
    shipped file with other hyperparameters than the entry's factory still loads), else by
    the entry's factory.

    Raises:
      ValueError: no shipped model has that name.
      ModelFileError: its weight file is not installed (e.g. not trained yet), or is corrupt.
    """
    from importlib import resources

    if name not in SHIPPED:
        raise ValueError(f"unknown model {name!r}; shipped: {', '.join(SHIPPED)}")
    entry = SHIPPED[name]
    with resources.as_file(resources.files("lrpjax") / "assets" / entry.weights) as path:
        if not Path(path).is_file():
            raise ModelFileError(
                f"the weights of the shipped model {name!r} ({entry.description}) are not "
                f"installed: {path} does not exist (train them with "
                f"`python -m train --model {name} ...`, see docs/vit_training.md)"
            )
        header = read_header(path)
        factory = None if header.get("architecture") in ARCHITECTURES else entry.factory
        return load(path, factory=factory), header
