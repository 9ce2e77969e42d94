"""The ``lrpjax`` command line: ``lrpjax explain``, ``lrpjax concepts`` (and ``lrpjax bench``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lrpjax.commands.common import (
    ArgumentParser,
    CLIError,
    add_data_arguments,
    add_model_arguments,
    check_rules,
    check_target,
    check_writable,
    fit_data,
    init_distributed,
    load_data,
    load_model,
)

__all__ = ["CLIError", "build_parser", "main"]

#: Shown beside the saved composite in heatmaps.png: LRP-epsilon, the reference study's
#: rule (or, when that is the one saved, the default composite).
COMPARE = "epsilon"


def _explain_parser(sub) -> None:
    from lrpjax import INITS
    from lrpjax.core.composites import DEFAULT, PRESETS

    p = sub.add_parser(
        "explain",
        help="explain a dataset with LRP and write heatmaps and relevance arrays",
        description="Explain images with LRP. With no arguments: the shipped model on the "
        "shipped 100-image CIFAR-10 sample, offline.",
    )
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument(
        "--composite",
        default=DEFAULT,
        help=f"one of: {', '.join(PRESETS)} (epsilon: LRP-epsilon, the reference's rule)",
    )
    p.add_argument("--init", default="logit", help=f"output relevance: {', '.join(INITS)}")
    p.add_argument("--target", default="pred", help="pred, label, or a class index")
    p.add_argument("--batch-size", type=int, default=256, help="images per compiled call")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the stored relevance.npy",
    )
    p.add_argument(
        "--out",
        default="lrp-out",
        help="output folder (default: ./lrp-out): relevance.npy and the other arrays, "
        "files.txt (each row's input file), summary.json, heatmaps.png, class_means.png",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one process per host: call jax.distributed.initialize() first (coordinator, "
        "process count and id from the flags below or JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster JAX detects); each process explains "
        "a contiguous share of the images and process 0 merges them into --out (which must "
        "be on a file system all processes share)",
    )
    p.add_argument("--coordinator", help="with --distributed: process 0's host:port")
    p.add_argument("--num-processes", type=int, help="with --distributed: how many processes")
    p.add_argument("--process-id", type=int, help="with --distributed: this process's index")


def cmd_explain(args) -> int:
    """Run ``lrpjax explain`` from parsed arguments."""
    from lrpjax.core.composites import DEFAULT

    check_rules(args.composite, args.init)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    flags = ("coordinator", "num_processes", "process_id")
    given = [f for f in flags if getattr(args, f) is not None]
    if given and not args.distributed:
        raise CLIError(f"--{given[0].replace('_', '-')} needs --distributed")
    process, processes = 0, 1
    if args.distributed:  # before anything touches a JAX backend (loading the model does)
        process, processes = init_distributed(args.coordinator, args.num_processes, args.process_id)
    from lrpjax.runs import pipeline

    out = Path(args.out)
    # With several processes, an error on one ends them all with its message.
    with pipeline.ProcessGroup("explain-cli").phase("prepared"):
        loaded = load_model(args)
        check_writable(out)
        fitted = fit_data(loaded, load_data(args))
        target = check_target(args.target, fitted)
    images, labels, source = fitted.images, fitted.labels, fitted.source
    settings = {
        "model": loaded.identity,
        "data": fitted.identity,
        "limit": args.limit,
        "composite": args.composite,
        "init": args.init,
        "target": target,
    }
    summary = pipeline.explain_dataset(
        loaded.model,
        images,
        labels,
        out,
        settings=settings,
        composite=args.composite,
        init=args.init,
        target=target,
        batch_size=args.batch_size,
        dtype=args.dtype,
        class_names=fitted.class_names,
        progress=not args.no_progress,
        files=fitted.files,
        compare=COMPARE if args.composite != COMPARE else DEFAULT,
    )
    acc = summary["accuracy"]
    who = f"process {process} of {processes}: " if processes > 1 else ""
    print(
        f"{who}wrote {out}/: relevance.npy, predictions.npy, probabilities.npy, files.txt, "
        "heatmaps.png, ..."
    )
    print(
        f"{who}explained {summary['images']} images ({source}) with LRP {args.composite}, "
        f"init {args.init}, target {target}: "
        f"{f'accuracy {acc:.3f}' if acc is not None else 'no labels, no accuracy'}, "
        f"mean relevance sum {summary['mean_relevance_sum']:.4f}, {summary['seconds']:.1f} s"
    )
    return 0


def _concepts_parser(sub) -> None:
    from lrpjax import INITS
    from lrpjax.core.composites import PRESETS

    p = sub.add_parser(
        "concepts",
        help="Concept Relevance Propagation over a dataset: channel relevance, reference "
        "images, class statistics, a concept atlas",
        description="Concept Relevance Propagation (Achtibat et al. 2023) over a dataset: "
        "the relevance of every channel of the chosen layers for every image, the top-k "
        "images per channel (by relevance and by activation), mean channel relevance per "
        "class, and atlas.png. With no arguments: the shipped model on the shipped "
        "100-image CIFAR-10 sample, offline.",
    )
    add_data_arguments(p, verb="analyse")
    add_model_arguments(p)
    p.add_argument(
        "--layer",
        action="append",
        help="a layer whose output channels are analysed (repeatable; 'all': every layer "
        "whose output relevance can be read; default: the convolution and dense layers)",
    )
    p.add_argument("--top-k", type=int, default=8, help="reference images per channel")
    p.add_argument("--composite", default="epsilon", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--init", default="logit", help=f"output relevance: {', '.join(INITS)}")
    p.add_argument(
        "--target", default="label", help="label (the default, as CRP), pred, or a class index"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per compiled call")
    p.add_argument("--atlas-channels", type=int, default=2, help="channels per class in atlas")
    p.add_argument("--atlas-images", type=int, default=3, help="images per channel in atlas")
    p.add_argument("--out", default="concepts-out", help="output folder (default: ./concepts-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_concepts)


def cmd_concepts(args) -> int:
    """Run ``lrpjax concepts`` from parsed arguments."""
    from lrpjax.analysis import concepts

    check_rules(args.composite, args.init)
    for flag in ("batch_size", "top_k", "atlas_channels", "atlas_images"):
        if getattr(args, flag) < 1:
            raise CLIError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    loaded = load_model(args)
    fitted = fit_data(loaded, load_data(args))
    images, labels, source = fitted.images, fitted.labels, fitted.source
    target = check_target(args.target, fitted, "; use --target pred")
    info = concepts.concept_layers(loaded.model, images[:1], args.composite)  # traced once
    if args.layer and "all" in args.layer:
        layers = [p for p, i in info.items() if i.reader]
    else:
        layers = args.layer or concepts.default_layers(info)
    layers = concepts.check_layers(info, layers)  # before anything is written
    out = Path(args.out)
    check_writable(out)
    # --top-k is not in the resume key: the streamed arrays do not depend on it.
    settings = {"model": loaded.identity, "data": fitted.identity, "limit": args.limit}
    summary = concepts.concepts_dataset(
        loaded.model,
        images,
        labels,
        out,
        settings=settings,
        layers={p: info[p] for p in layers},
        composite=args.composite,
        init=args.init,
        target=target,
        batch_size=args.batch_size,
        k=args.top_k,
        class_names=fitted.class_names,
        progress=not args.no_progress,
        atlas_channels=args.atlas_channels,
        atlas_references=args.atlas_images,
    )
    print(f"wrote {out}/: concepts.json, atlas.png, <layer>/relevance.npy, ...")
    print(
        f"analysed {summary['images']} images ({source}) at layers {', '.join(layers)} with "
        f"LRP {args.composite}, init {args.init}, target {target}: {summary['seconds']:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lrpjax`` argument parser with every subcommand; ``--help`` shows defaults."""
    parser = ArgumentParser(prog="lrpjax", description="Layer-wise Relevance Propagation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _explain_parser(sub)
    _concepts_parser(sub)
    try:
        from lrpjax.bench import speed as bench

        bench.add_parser(sub)
    except ImportError:
        pass
    try:
        from lrpjax.analysis import evaluate

        evaluate.add_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lrpjax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    from lrpjax import LayerError
    from lrpjax.data import DataUnavailableError
    from lrpjax.models import ModelFileError
    from lrpjax.runs.pipeline import OutputLockedError, ProcessFailedError

    try:
        if args.command == "explain":
            return cmd_explain(args)
        return args.func(args)
    except (
        CLIError,
        ModelFileError,
        DataUnavailableError,
        LayerError,
        OutputLockedError,
        ProcessFailedError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not getattr(args, "distributed", False):
            raise
        # The distributed runtime's own failures (a lost coordinator, a barrier timeout).
        print(f"error: distributed run failed: {' '.join(str(e).split())[:500]}", file=sys.stderr)
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
