"""The ``lrpjax`` command line: `main`, and `COMMANDS`, the one registry of subcommands.

Each subcommand is a module of `lrpjax.commands` with ``add_parser(sub)`` (registers its
options on the subparsers object) and ``run(args) -> int`` (the exit status); `main` builds
the parser from `COMMANDS`, runs the chosen one, and prints a user's error as one line
(exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from lrpjax.commands import bench, concepts, evaluate, explain
from lrpjax.commands.common import ArgumentParser, CLIError
from lrpjax.core.layer_types import LayerError
from lrpjax.data import DataUnavailableError
from lrpjax.models import ModelFileError
from lrpjax.runs.distributed import ProcessFailedError
from lrpjax.runs.store import OutputLockedError

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]

#: Subcommand name -> its module (``add_parser``, ``run``), in the order ``--help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "explain": explain,
    "concepts": concepts,
    "bench": bench,
    "evaluate": evaluate,
}

#: What a subcommand raises for a problem with the user's input, model, data or output
#: folder: printed as one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    ModelFileError,
    DataUnavailableError,
    LayerError,
    OutputLockedError,
    ProcessFailedError,
    ValueError,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``lrpjax`` argument parser with every subcommand; ``--help`` shows defaults."""
    parser = ArgumentParser(prog="lrpjax", description="Layer-wise Relevance Propagation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lrpjax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except USER_ERRORS as e:
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
