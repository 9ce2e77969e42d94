"""``lrpjax bench``: time explainers against the forward pass and the input gradient
(`lrpjax.bench.speed`); with ``--peer zennit``, check lrpjax against Zennit and time both
side by side (`lrpjax.peers`)."""

from __future__ import annotations

import argparse
import contextlib
import json
from functools import partial
from pathlib import Path

from flax import nnx

from lrpjax import data, models, peers, zoo
from lrpjax.bench import speed
from lrpjax.commands.common import CLIError, add_model_arguments, load_model
from lrpjax.core import compilation

__all__ = ["add_parser", "run", "run_peer"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``lrpjax bench`` on an argparse subparsers object."""
    p = sub.add_parser("bench", help="time LRP against the forward pass and the gradient")
    p.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default 1,64,256,1024; --peer: 256)"
    )
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the weights and inputs timed",
    )
    add_model_arguments(p)
    p.add_argument(
        "--random-model",
        action="store_true",
        help="the --model architecture (a shipped one) with random weights: speed alone",
    )
    p.add_argument(
        "--zoo",
        choices=sorted(zoo.ZOO),
        help="a model of lrpjax.zoo with random weights (e.g. vit) instead of the miniVGG",
    )
    p.add_argument("--train", action="store_true", help="also time the training step")
    p.add_argument(
        "--jax-defaults",
        action="store_true",
        help="compile with plain jax.jit, without lrpjax's XLA options (for comparison)",
    )
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument(
        "--peer",
        choices=["zennit"],
        help="instead: check lrpjax's relevance against Zennit (PyTorch) on the shipped "
        'images, then time both side by side (needs: pip install "lrpjax[peers]")',
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lrpjax bench`` from parsed arguments."""
    if args.peer:  # lrpjax bench --peer zennit
        return run_peer(args)
    args.batch_sizes = args.batch_sizes or "1,64,256,1024"
    args.methods = args.methods or ",".join(speed.DEFAULT_METHODS)
    inputs = None
    if args.zoo:
        model = zoo.make(args.zoo)
        inputs = partial(zoo.example_input, args.zoo)
    elif args.random_model:
        name = args.model or "minivgg"
        if name not in models.SHIPPED:
            raise CLIError(
                f"--random-model builds a shipped architecture ({', '.join(models.SHIPPED)}), "
                f"not {name!r}"
            )
        model = models.SHIPPED[name].factory()
        model.eval()
    else:
        model = load_model(args).model
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        speed.method_fn(model, m)  # unknown names fail before any timing
    with compilation.jax_defaults() if args.jax_defaults else contextlib.nullcontext():
        report = speed.benchmark(model, sizes, methods, args.repeats, args.dtype, inputs=inputs)
        report["model"] = f"zoo:{args.zoo}" if args.zoo else (args.model or "minivgg")
        if args.random_model:
            report["model"] += " (random weights)"
        lrp = [m for m in methods if m.startswith("lrp:")]
        if args.dtype != "float32" and lrp and not args.zoo:
            images, _ = data.sample()  # the shipped 100 images: fidelity against float32
            report["fidelity"] = speed.fidelity(model, images, lrp, args.dtype)
        if args.train:
            report["train"] = [speed.train_throughput(bs, args.repeats) for bs in sizes if bs >= 8]
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(speed.table(report))
    if report.get("fidelity"):
        print()
        print(speed.fidelity_table(report["fidelity"]))
    print(f"wrote {args.json}")
    return 0


def run_peer(args: argparse.Namespace) -> int:
    """Run ``lrpjax bench --peer zennit`` from the parsed arguments of ``lrpjax bench``:
    `lrpjax.peers.run_peer`, the JSON report to ``--json``, the tables printed.

    Args:
      args: the ``bench`` subcommand's arguments (`add_parser`).

    Returns:
      The exit status, 0.

    Raises:
      lrpjax.commands.common.CLIError: PyTorch or Zennit missing (with the install command), or
        options the comparison does not take; printed as one line by the CLI.
    """
    try:
        peers.require_zennit()
    except peers.PeerMissingError as e:
        raise CLIError(str(e)) from None
    if (
        args.zoo
        or args.dtype != "float32"
        or args.train
        or args.jax_defaults
        or args.model not in (None, "minivgg")
    ):
        raise CLIError("--peer compares the miniVGG in float32: no --zoo, --model, --dtype, "
                       "--train or --jax-defaults")  # fmt: skip
    model = models.load(args.checkpoint) if args.checkpoint else None
    if args.random_model:
        model = models.MiniVGG(rngs=nnx.Rngs(0))
        model.eval()
    methods = [m for m in (args.methods or ",".join(peers.METHODS)).split(",") if m]
    unknown = [m for m in methods if m not in peers.METHODS]
    if unknown:
        raise CLIError(f"no Zennit counterpart for {', '.join(unknown)}; "
                       f"--peer methods: {', '.join(peers.METHODS)}")  # fmt: skip
    sizes = [int(b) for b in (args.batch_sizes or "256").split(",") if b]
    if len(sizes) != 1 or sizes[0] < 1:
        raise CLIError(f"--peer times one batch size, got --batch-sizes {args.batch_sizes}")
    report = peers.run_peer(model, sizes[0], args.repeats, methods)
    models.write_json(args.json, report)
    print(peers.table(report))
    print(f"wrote {args.json}")
    return 0
