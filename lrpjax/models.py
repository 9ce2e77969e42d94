"""The reference miniVGG for CIFAR-10, its input convention, and its weight files.

Weight files are NumPy ``.npz`` archives read with ``allow_pickle=False``: one array per
model variable, keyed ``model/<path>``, and a JSON header under ``__meta__`` that names the
architecture. The zip container's CRC-32 checks catch truncated and corrupted files.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.layers import Flatten, MaxPool, ReLU

__all__ = [
    "CLASS_NAMES",
    "INPUT_SHAPE",
    "NUM_CLASSES",
    "MiniVGG",
    "ModelFileError",
    "check_images",
    "load",
    "read_arrays",
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


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (`nnx.Param` entries) of a model."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


class ModelFileError(ValueError):
    """A weight file is missing, truncated, corrupted, or for another architecture."""


def check_images(x: jax.Array | np.ndarray) -> None:
    """Refuse inputs that are not a (N, 32, 32, 3) batch of finite values in [0, 1].

    Raises:
      ValueError: naming what is wrong with the input.
    """
    shape = tuple(np.shape(x))
    if len(shape) != 4 or shape[1:] != INPUT_SHAPE:
        raise ValueError(
            f"expected images of shape (N, {', '.join(map(str, INPUT_SHAPE))}) "
            f"(NHWC, {INPUT_SHAPE[-1]} channels), got {shape}"
        )
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf values")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"image values must lie in [0, 1] (pixels / 255), got [{lo:.3g}, {hi:.3g}]"
        )


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


def save(model: MiniVGG, path: str | os.PathLike, **meta) -> None:
    """Save a model's parameters and batch statistics to an ``.npz`` weight file.

    Args:
      model: the model to save.
      path: destination file; written atomically.
      **meta: extra JSON-serialisable fields for the header (e.g. accuracy, command).
    """
    arrays = {f"model/{k}": v for k, v in _variables(model).items()}
    header = {
        "format": "lrpjax-weights",
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "num_classes": int(model.dense2.out_features),
        **meta,
    }
    write_arrays(path, arrays, header)


def restore(model: MiniVGG, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
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


def _unfilled(num_classes: int) -> MiniVGG:
    """A MiniVGG with zeros for weights, built without running the initialisers.

    Random initialisation runs eagerly and takes seconds on a CPU; loading overwrites every
    parameter anyway. RNG keys (dropout) get a fixed key.
    """
    abstract = nnx.eval_shape(lambda: MiniVGG(num_classes=num_classes, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def fill(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(0), leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def load(path: str | os.PathLike) -> MiniVGG:
    """Load a miniVGG weight file (from `save` or ``python -m train``) in eval mode.

    Args:
      path: an ``.npz`` weight file or training checkpoint.

    Returns:
      The model, in eval mode (dropout off, batch-norm running statistics).

    Raises:
      ModelFileError: the file is missing, corrupt, or holds another architecture.
    """
    arrays, meta = read_arrays(path)
    if meta.get("architecture") != "MiniVGG":
        raise ModelFileError(
            f"{path} holds a {meta.get('architecture', 'unknown')!r} model, not MiniVGG"
        )
    model = _unfilled(int(meta.get("num_classes", NUM_CLASSES)))
    restore(model, arrays, source=str(path))
    model.eval()
    return model
