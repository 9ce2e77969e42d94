"""Training of lrpjax's models with Optax: jit-compiled steps, checkpoints, resume.

Models (`MODELS`, ``Config.model``): ``"minivgg"`` (`lrpjax.models.MiniVGG`, the default)
and ``"vit"`` (`lrpjax.models.CCT`, a compact convolutional transformer); a spec such as
``"vit:depth=2,dim=64,channels=32"`` sets constructor arguments (``channels`` takes
``/``-separated widths, e.g. ``32/64``).

The reference recipe is the default: Adam, learning rate 1e-3, batch 64, 40 epochs,
categorical cross-entropy, evaluation on the test split after every epoch. Each step is
one jit-compiled call, dispatched asynchronously; the host reads losses back only every
`SYNC_EVERY` steps. (Steps are not fused with `jax.lax.scan`: XLA's CPU backend runs
convolutions inside a loop about 25x slower than outside one.)

Everything that changes during training (parameters, batch statistics, the dropout RNG
stream, the optimizer state, the epoch) is checkpointed after every epoch, atomically, and
shuffling and augmentation keys derive from (seed, epoch, step): a run killed and resumed
gives the same numbers as one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrpjax import models
from lrpjax.analysis import baselines
from lrpjax.core import compilation

__all__ = [
    "MODELS",
    "Config",
    "Steps",
    "build_model",
    "checkpoint_path",
    "evaluate",
    "make_optimizer",
    "train",
]

SCHEDULES = ("constant", "cosine", "onecycle")
SYNC_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. The defaults are the reference recipe."""

    data: str = "cifar10"
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0  # decoupled (AdamW); 0 is plain Adam, the reference
    augment: bool = False
    seed: int = 0
    out: str = "runs/minivgg"
    eval_batch_size: int = 500
    limit_train: int | None = None  # use the first N training images (quick runs, tests)
    limit_test: int | None = None
    init: str | None = None  # start from this weight file (fine-tuning) instead of at random
    model: str = "minivgg"  # a name of MODELS, optionally with ":key=value,..." arguments
    label_smoothing: float = 0.0  # of the training loss's targets (Szegedy et al. 2016)


#: Trainable architectures by name: constructor taking ``rngs`` and keyword arguments.
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "minivgg": lambda rngs, **kw: models.MiniVGG(rngs=rngs, **kw),
    "vit": lambda rngs, **kw: models.CCT(rngs=rngs, **kw),
}


def build_model(spec: str, seed: int = 0) -> nnx.Module:
    """The model a spec names, ``"<name>"`` or ``"<name>:key=value,..."``, freshly initialised.

    Values are ints, floats, or ``/``-separated int tuples (``channels=32/64``).

    Raises:
      ValueError: an unknown name or bad arguments.
    """
    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    kwargs = baselines.spec_params(rest, spec, "model")
    try:
        return MODELS[name](nnx.Rngs(seed), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments in model spec {spec!r}: {e}") from None


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with the configured learning-rate schedule; AdamW if ``config.weight_decay``.

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    total = config.epochs * steps_per_epoch
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule: optax.Schedule | float = lr
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, total)
    elif config.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(total, lr)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose from {SCHEDULES}")
    if config.weight_decay:
        # Decay the kernels only: biases and BatchNorm scales are left free, as usual.
        return optax.adamw(
            schedule,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map_with_path(
                lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params
            ),
        )
    return optax.adam(schedule)


def augment(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding by `pad` pixels, and random horizontal flip.

    Args:
      images: (N, H, W, C) batch.
      key: PRNG key; each image gets its own crop offset and flip.

    Returns:
      (N, H, W, C) augmented batch.
    """
    n, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


class Steps:
    """Jit-compiled training and evaluation functions for one model structure.

    ``train_step(params, rest, opt_state, x, y, key) -> (params, rest, opt_state, loss,
    correct)`` is one optimizer step (its first three arguments donated), with ``params,
    rest = nnx.split(model, nnx.Param, ...)[1:]`` and ``opt_state = tx.init(params)``;
    ``eval_batch(params, rest, x, y, valid)`` the summed loss and correct count of a batch.
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, config: Config):
        model.train()
        self.train_graph, _, _ = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
        model.train()
        self.tx = tx
        self.config = config
        self.train_step = compilation.jit(self._train_step, donate_argnums=(0, 1, 2))
        self.eval_batch = jax.jit(self._eval_batch)

    def _loss(self, params, rest, x, y):
        model = nnx.merge(self.train_graph, params, rest, copy=True)
        logits = model(x)
        if self.config.label_smoothing:
            targets = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
            targets = optax.smooth_labels(targets, self.config.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return loss, (logits, rest)

    def _train_step(self, params, rest, opt_state, x, y, key):
        """One optimizer step on a batch. x: (B, H, W, C), y: (B,), key: PRNG key."""
        if self.config.augment:
            x = augment(x, key)
        grads, (logits, rest) = jax.grad(self._loss, has_aux=True)(params, rest, x, y)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return params, rest, opt_state, loss, correct

    def _eval_batch(self, params, rest, x, y, valid):
        logits = nnx.merge(self.eval_graph, params, rest, copy=True)(x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, -1) == y
        return jnp.sum(losses * valid), jnp.sum(correct * valid)


def evaluate(steps: Steps, params, rest, images: np.ndarray, labels: np.ndarray) -> dict:
    """Mean loss and accuracy over a dataset, in fixed-size (padded) batches."""
    bs = steps.config.eval_batch_size
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(images), bs):
        x, y = images[start : start + bs], labels[start : start + bs]
        valid = np.ones(bs, np.float32)
        if len(x) < bs:  # pad to one compiled shape
            valid[len(x) :] = 0
            x = np.concatenate([x, np.zeros((bs - len(x), *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(bs - len(y), y.dtype)])
        loss, correct = steps.eval_batch(params, rest, x, y, valid)
        total_loss += float(loss)
        total_correct += int(correct)
    return {"loss": total_loss / len(images), "accuracy": total_correct / len(images)}


def _subset(images: np.ndarray, labels: np.ndarray, limit: int | None):
    """A fixed random subset (folders are sorted by class, so a prefix would not do)."""
    if not limit or limit >= len(images):
        return images, labels
    keep = np.sort(np.random.default_rng(0).permutation(len(images))[:limit])
    return images[keep], labels[keep]


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoint.npz"


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    """Pytree leaves keyed by prefix + key path; PRNG keys stored as their raw key data."""
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return arrays


def _unflatten(prefix: str, template, arrays: dict[str, np.ndarray]):
    """Inverse of `_flatten`, given a pytree of the same structure."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, old in leaves_with_paths:
        key = prefix + jax.tree_util.keystr(path)
        if key not in arrays:
            raise models.ModelFileError(f"checkpoint lacks {key!r}: written by another config?")
        new = jnp.asarray(arrays[key])
        if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
            new = jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
        leaves.append(new)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _save_checkpoint(path: Path, model, rest, opt_state, epoch: int, history: list, config: Config):
    arrays = {f"model/{k}": v for k, v in models._variables(model).items()}
    arrays |= _flatten("rest", rest) | _flatten("opt", opt_state)
    meta = {
        "format": "lrpjax-checkpoint",
        "version": models.FORMAT_VERSION,
        "architecture": type(model).__name__,
        "num_classes": models._num_classes(model) or models.NUM_CLASSES,
        **({"hyperparameters": model.hyperparameters} if hasattr(model, "hyperparameters") else {}),
        "epoch": epoch,
        "history": history,
        "config": dataclasses.asdict(config),
    }
    models.write_arrays(path, arrays, meta)


# Fields that may differ between a run and its resumption without changing the numbers.
_RESUME_FREE = {"out", "data", "eval_batch_size"}


def train(
    config: Config,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[nnx.Module, list[dict]]:
    """Train the model ``config.model`` names, checkpointing after every epoch.

    Args:
      config: the run's settings.
      data: (train_images, train_labels, test_images, test_labels); images float32 in [0, 1].
      resume: continue from ``<out>/checkpoint.npz`` at the epoch after the saved one.
      command: the command line, recorded in the metrics and weight files.
      progress: show a progress bar per epoch.
      on_epoch: called with each epoch's metrics (after its checkpoint is written).

    Returns:
      The trained model in eval mode, and the per-epoch metrics.
    """
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = data
    x_train, y_train = _subset(x_train, y_train, config.limit_train)
    x_test, y_test = _subset(x_test, y_test, config.limit_test)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = len(x_train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(x_train)} training images do not fill one batch of {config.batch_size}"
        )

    model = build_model(config.model, config.seed)
    if config.init:
        models.restore(model, models.read_arrays(config.init)[0], source=config.init)
    tx = make_optimizer(config, steps_per_epoch)
    steps = Steps(model, tx, config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    history: list[dict] = []
    start_epoch = 1

    ckpt = checkpoint_path(out)
    if resume and ckpt.exists():
        arrays, meta = models.read_arrays(ckpt)
        # Fields added after the checkpoint was written count at their defaults.
        saved = dataclasses.asdict(Config()) | meta["config"]
        saved = {k: v for k, v in saved.items() if k not in _RESUME_FREE}
        mine = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUME_FREE}
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise ValueError(f"--resume with other settings than the checkpoint's: {diff}")
        models.restore(model, arrays, source=str(ckpt))
        _, params, _ = nnx.split(model, nnx.Param, ...)
        rest = _unflatten("rest", rest, arrays)
        opt_state = _unflatten("opt", opt_state, arrays)
        history = meta["history"]
        start_epoch = meta["epoch"] + 1
        print(f"resuming {ckpt} after epoch {meta['epoch']}")
    elif resume:
        print(f"no checkpoint at {ckpt}: starting from scratch")

    base_key = jax.random.key(config.seed)
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(x_train))
        order = order[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)
        epoch_key = jax.random.fold_in(base_key, epoch)
        loss_sum, correct_sum = jnp.zeros(()), jnp.zeros((), jnp.int32)
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=not progress
        )
        for step in range(steps_per_epoch):
            idx = order[step]
            params, rest, opt_state, loss, correct = steps.train_step(
                params,
                rest,
                opt_state,
                x_train[idx],
                y_train[idx],
                jax.random.fold_in(epoch_key, step),
            )
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps_per_epoch:
                bar.update(step + 1 - bar.n)
                bar.set_postfix(
                    loss=f"{float(loss_sum) / (step + 1):.4f}",
                    acc=f"{int(correct_sum) / ((step + 1) * config.batch_size):.4f}",
                )
        seen = steps_per_epoch * config.batch_size
        loss_sum, correct_sum = float(loss_sum) * config.batch_size, int(correct_sum)
        bar.close()
        train_seconds = time.perf_counter() - t0
        test = evaluate(steps, params, rest, x_test, y_test)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct_sum / seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "train_seconds": train_seconds,
            "train_images_per_second": seen / train_seconds,
        }
        history.append(record)
        nnx.update(model, params, rest)
        _save_checkpoint(ckpt, model, rest, opt_state, epoch, history, config)
        models.write_json(
            out / "metrics.json",
            {"command": command, "config": dataclasses.asdict(config), "epochs": history},
        )
        print(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}"
            f" acc {record['train_accuracy']:.4f}"
            f" | test loss {test['loss']:.4f} acc {test['accuracy']:.4f}"
            f" | {record['train_images_per_second']:.0f} img/s"
        )
        if on_epoch:
            on_epoch(record)

    nnx.update(model, params, rest)
    model.eval()
    if history:
        models.save(
            model,
            out / "model.npz",
            test_accuracy=history[-1]["test_accuracy"],
            epochs=history[-1]["epoch"],
            command=command,
        )
    return model, history
