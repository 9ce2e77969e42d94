"""``lrpjax evaluate``: compare explainers by region perturbation (AOPC) and the
model-randomization sanity check (the library: `lrpjax.analysis.evaluate`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lrpjax.analysis import baselines, metrics
from lrpjax.analysis.evaluate import DEFAULT_EXPLAINERS, evaluate, table
from lrpjax.commands.common import (
    CLIError,
    add_data_arguments,
    add_model_arguments,
    check_writable,
    fit_data,
    load_data,
    load_model,
)
from lrpjax.runs.store import lock_output

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lrpjax evaluate`` on an argparse subparsers object."""
    p = sub.add_parser(
        "evaluate",
        help="compare explainers: pixel-flipping AOPC and model-randomization sanity check",
        description="Score explainers by region perturbation (AOPC, MoRF and LeRF) and the "
        "model-randomization check. With no data arguments: the shipped model on the shipped "
        "100-image CIFAR-10 sample, offline.",
    )
    p.add_argument(
        "--explainers",
        default=",".join(DEFAULT_EXPLAINERS),
        help="comma-separated specs, e.g. gradient, integrated_gradients:steps=16, "
        "smoothgrad:samples=8,noise=0.2 (parameters follow their name), lrp:epsilon:eps=0.25, "
        "lrp:epsilon:init=sglrp; known: " + ", ".join(baselines.known_specs()),
    )
    add_data_arguments(p, verb="use")
    add_model_arguments(p)
    p.add_argument("--region", type=int, default=4, help="region side in pixels (default 4)")
    p.add_argument("--steps", type=int, default=16, help="regions removed (default 16)")
    p.add_argument(
        "--replacement",
        default="blur",
        choices=metrics.REPLACEMENTS,
        help="what a removed region is filled with",
    )
    p.add_argument(
        "--score", default="logit", choices=metrics.SCORES, help="the target's score tracked"
    )
    p.add_argument(
        "--metrics",
        default="",
        help="comma-separated registered metrics to score the maps with as well, of: "
        + ", ".join(n for n in metrics.REGISTRY if metrics.get(n).family != "localisation"),
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per model pass")
    p.add_argument(
        "--sanity-images",
        type=int,
        default=16,
        help="images (the first ones) for the model-randomization check; 0 skips it",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="rank correlation above which an explainer is flagged insensitive",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of random maps, noise and re-initialisation"
    )
    p.add_argument("--out", default="eval-out", help="output folder (default: ./eval-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs; commas inside a spec's parameters stay."""
    specs: list[str] = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if specs and "=" in part and ":" not in part.split("=", 1)[0]:
            specs[-1] += "," + part  # a further key=value of the previous spec
        else:
            specs.append(part)
    return specs


def run(args: argparse.Namespace) -> int:
    """Run ``lrpjax evaluate`` from parsed arguments."""
    specs = _split_specs(args.explainers)
    if not specs:
        raise CLIError("--explainers is empty")
    if args.batch_size < 1 or args.region < 1:
        raise CLIError("--batch-size and --region must be positive")
    if args.sanity_images < 0:
        raise CLIError(f"--sanity-images must be >= 0, got {args.sanity_images}")
    scores = [name.strip() for name in args.metrics.split(",") if name.strip()]
    for name in scores:
        try:
            if metrics.get(name).family == "localisation":
                raise CLIError(f"--metrics {name}: localisation metrics need evidence masks")
        except ValueError as error:
            raise CLIError(str(error)) from None
    out = Path(args.out)
    loaded = load_model(args)  # model, explainers and data are checked before out is made
    model = loaded.model
    for spec in specs:
        baselines.make(model, spec)  # unknown specs fail before any work
    fitted = fit_data(loaded, load_data(args))
    images, labels = fitted.images, fitted.labels
    check_writable(out)
    t0 = time.perf_counter()
    with lock_output(out):  # as lrpjax explain: one run per output folder at a time
        report = evaluate(
            model, images, labels, specs, out, region=args.region, steps=args.steps,
            replacement=args.replacement, score=args.score, batch_size=args.batch_size,
            sanity_images=args.sanity_images, threshold=args.threshold, seed=args.seed,
            progress=not args.no_progress,
            settings={"data": fitted.identity, "model": loaded.identity}, scores=scores,
        )  # fmt: skip
    print(table(report))
    print(
        f"wrote {out}/: {', '.join(report['files'])} ({time.perf_counter() - t0:.1f} s)",
    )
    return 0
