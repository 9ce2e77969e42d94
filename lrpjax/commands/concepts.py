"""``lrpjax concepts``: Concept Relevance Propagation over a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from lrpjax.analysis import concepts
from lrpjax.commands.common import (
    CLIError,
    add_data_arguments,
    add_model_arguments,
    check_rules,
    check_target,
    check_writable,
    fit_data,
    load_data,
    load_model,
)
from lrpjax.core.composites import PRESETS
from lrpjax.core.engine import INITS
from lrpjax.runs.concepts import concepts_dataset

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lrpjax concepts`` on an argparse subparsers object."""
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
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lrpjax concepts`` from parsed arguments."""
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
    summary = concepts_dataset(
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
