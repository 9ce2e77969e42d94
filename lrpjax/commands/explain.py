"""``lrpjax explain``: explain a dataset with LRP and write heatmaps and relevance arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

from lrpjax.commands.common import (
    CLIError,
    add_data_arguments,
    add_model_arguments,
    check_rules,
    check_target,
    check_writable,
    composite_setting,
    fit_data,
    init_distributed,
    load_data,
    load_model,
)
from lrpjax.core.composites import DEFAULT, PRESETS
from lrpjax.core.engine import INITS
from lrpjax.runs import explain as pipeline

__all__ = ["COMPARE", "add_parser", "run"]

#: Shown beside the saved composite in heatmaps.png: LRP-epsilon, the reference study's
#: rule (or, when that is the one saved, the default composite).
COMPARE = "epsilon"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lrpjax explain`` on an argparse subparsers object."""
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
        help=f"one of: {', '.join(PRESETS)} (epsilon: LRP-epsilon, the reference's rule), or "
        "a .json file written by lrpjax.composites.save",
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
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lrpjax explain`` from parsed arguments."""
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
        "composite": composite_setting(args.composite),
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
