"""The ``lrpjax`` command line: ``lrpjax explain`` (and ``lrpjax bench``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _explain_parser(sub) -> None:
    from lrpjax import INITS
    from lrpjax.composites import PRESETS

    p = sub.add_parser(
        "explain",
        help="explain a dataset with LRP and write heatmaps and relevance arrays",
        description="Explain images with LRP. With no arguments: the shipped model on the "
        "shipped 100-image CIFAR-10 sample, offline.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["cifar10"], help="a tensorflow-datasets dataset")
    src.add_argument("--data-dir", help="image folder (split/class/image) or a .tar.gz of one")
    p.add_argument("--split", default="test", help="split to explain (default: test)")
    p.add_argument("--checkpoint", help="weights from `python -m train` (default: shipped model)")
    p.add_argument("--composite", default="epsilon", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--init", default="logit", help=f"output relevance: {', '.join(INITS)}")
    p.add_argument("--target", default="pred", help="pred, label, or a class index")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="explain only the first N images")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--out", default="lrp-out", help="output folder (default: ./lrp-out)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (one process per host); each process "
        "explains its contiguous share of the images into <out>/process-<i>",
    )


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None


def _load_data(args) -> tuple:
    from lrpjax import data

    if args.dataset or args.data_dir:
        source = args.dataset or args.data_dir
        images, labels = data.load(source, args.split, progress=not args.no_progress)
        name = f"{source}:{args.split}"
    else:
        images, labels = data.sample()
        name = "shipped-sample"
    if args.limit is not None:
        if args.limit < 1:
            raise CLIError(f"--limit must be positive, got {args.limit}")
        images, labels = images[: args.limit], labels[: args.limit]
    return images, labels, name


def _parse_target(value: str, num_classes: int) -> str | int:
    if value in ("pred", "label"):
        return value
    try:
        t = int(value)
    except ValueError:
        raise CLIError(f"--target must be pred, label or a class index, got {value!r}") from None
    if not 0 <= t < num_classes:
        raise CLIError(f"--target {t} is outside the classes 0..{num_classes - 1}")
    return t


def _model_identity(path: str | None) -> str:
    if path is None:
        return "shipped"
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def cmd_explain(args) -> int:
    from lrpjax import INITS, composites, models, pipeline

    if args.composite not in composites.PRESETS:
        raise CLIError(
            f"unknown composite {args.composite!r}; choose from {', '.join(composites.PRESETS)}"
        )
    if args.init not in INITS:
        raise CLIError(f"unknown init {args.init!r}; choose from {', '.join(INITS)}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    target = _parse_target(args.target, models.NUM_CLASSES)
    out = Path(args.out)
    _check_writable(out)
    if args.checkpoint:
        model = models.load(args.checkpoint)
    else:
        from lrpjax import load_pretrained

        model = load_pretrained()
    images, labels, source = _load_data(args)
    models.check_images(images)
    if args.distributed:
        import jax

        jax.distributed.initialize()
        share = -(-len(images) // jax.process_count())
        lo = jax.process_index() * share
        images, labels = images[lo : lo + share], labels[lo : lo + share]
        out = out / f"process-{jax.process_index()}"
    if target == "label" and (labels < 0).any():
        raise CLIError("--target label needs labelled images")
    settings = {
        "model": _model_identity(args.checkpoint),
        "data": source,
        "limit": args.limit,
        "composite": args.composite,
        "init": args.init,
        "target": target,
    }
    summary = pipeline.explain_dataset(
        model,
        images,
        labels,
        out,
        settings=settings,
        composite=args.composite,
        init=args.init,
        target=target,
        batch_size=args.batch_size,
        dtype=args.dtype,
        class_names=models.CLASS_NAMES,
        progress=not args.no_progress,
    )
    acc = summary["accuracy"]
    print(f"wrote {out}/: relevance.npy, predictions.npy, probabilities.npy, heatmaps.png, ...")
    print(
        f"explained {summary['images']} images ({source}) with LRP {args.composite}, "
        f"init {args.init}, target {target}: accuracy {acc:.3f}, "
        f"mean relevance sum {summary['mean_relevance_sum']:.4f}, {summary['seconds']:.1f} s"
        if acc is not None
        else f"explained {summary['images']} images in {summary['seconds']:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lrpjax", description="Layer-wise Relevance Propagation in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _explain_parser(sub)
    try:
        from lrpjax import bench

        bench.add_parser(sub)
    except ImportError:
        pass
    try:
        from lrpjax import evaluate

        evaluate.add_parser(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    from lrpjax import LayerError
    from lrpjax.data import DataUnavailableError
    from lrpjax.models import ModelFileError

    try:
        if args.command == "explain":
            return cmd_explain(args)
        return args.func(args)
    except (CLIError, ModelFileError, DataUnavailableError, LayerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
