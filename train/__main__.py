"""``python -m train``: train MiniVGG (default) or the CCT vision transformer on CIFAR-10
(tfds) or an image folder."""

from __future__ import annotations

import argparse
import shlex
import sys

from flax import nnx

from train.trainer import MODELS, SCHEDULES, Config, build_model, train


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool]:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train lrpjax's MiniVGG (or --model vit: a compact convolutional "
        "transformer). Defaults are the reference recipe "
        "(Adam 1e-3, batch 64, 40 epochs, no augmentation).",
    )
    p.add_argument(
        "--model",
        default=defaults.model,
        help=f"architecture: {', '.join(MODELS)} (default {defaults.model}); constructor "
        "arguments after a colon, e.g. vit:depth=2,dim=64,channels=32 (channels: widths "
        "separated by /)",
    )
    p.add_argument(
        "--data",
        "--data-dir",
        "--dataset",
        dest="data",
        default=defaults.data,
        help="'cifar10' (tensorflow-datasets) or an image folder / .tar.gz in split/class/image "
        "layout with train/ and test/ splits",
    )
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="decoupled weight decay of the kernels (AdamW); 0: Adam",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="label smoothing of the training loss (e.g. 0.1); 0: none",
    )
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) and horizontal flip")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default=defaults.out, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.npz")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N images")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--init", help="start from these weights (a .npz from lrpjax.models.save)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    config = Config(
        data=a.data,
        epochs=a.epochs,
        batch_size=a.batch_size,
        learning_rate=a.lr,
        schedule=a.schedule,
        weight_decay=a.weight_decay,
        augment=a.augment,
        seed=a.seed,
        out=a.out,
        limit_train=a.limit_train,
        limit_test=a.limit_test,
        init=a.init,
        model=a.model,
        label_smoothing=a.label_smoothing,
    )
    try:
        # A bad spec fails here, in one line, before data loads; built abstractly (no cost).
        nnx.eval_shape(lambda: build_model(config.model))
    except ValueError as e:
        p.error(str(e))
    return config, a.resume, a.no_progress


def main(argv: list[str] | None = None) -> int:
    from lrpjax import data

    config, resume, no_progress = parse_args(argv)
    try:
        x_train, y_train = data.load(config.data, "train")
        x_test, y_test = data.load(config.data, "test")
    except data.DataUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "train", *(sys.argv[1:] if argv is None else argv)])
    train(
        config,
        (x_train, y_train, x_test, y_test),
        resume=resume,
        command=command,
        progress=not no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
