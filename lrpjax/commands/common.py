"""What the ``lrpjax`` subcommands share: input errors, model and data options, distributed setup.

Every subcommand's module imports this one; it imports none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from lrpjax import data, models
from lrpjax.core import composites
from lrpjax.core.engine import INITS

__all__ = [
    "ArgumentParser",
    "CLIError",
    "Data",
    "DefaultsHelpFormatter",
    "Fitted",
    "LoadedModel",
    "add_data_arguments",
    "add_model_arguments",
    "check_rules",
    "check_target",
    "check_writable",
    "fit_data",
    "init_distributed",
    "load_data",
    "load_model",
    "model_identity",
    "parse_target",
]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default: appended as ``(default: ...)`` unless the
    help text already says it (options whose default is ``None`` say it in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `DefaultsHelpFormatter`; its subcommands' parsers
    (``add_subparsers().add_parser``) are of this class too."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--checkpoint``."""
    p.add_argument(
        "--model",
        help="a shipped model (" + ", ".join(models.SHIPPED) + "; default: minivgg), or "
        "package.module:factory, a function that builds your own Flax NNX model (its weights "
        "from lrpjax.models.save in --checkpoint)",
    )
    p.add_argument(
        "--checkpoint",
        help="weight file (from lrpjax.models.save or `python -m train`); without --model, "
        "its header must name a MiniVGG",
    )


def add_data_arguments(p: argparse.ArgumentParser, verb: str = "explain") -> None:
    """``--dataset`` or ``--data-dir``, ``--split`` and ``--limit``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--dataset",
        choices=["cifar10"],
        help="a tensorflow-datasets dataset (default: the shipped 100-image sample)",
    )
    src.add_argument(
        "--data-dir",
        help="an image folder, its layout told from its contents: split/class/image "
        "(choose the split with --split), class/image (no --split), or images alone "
        "(unlabelled: no accuracy, --target pred); or a .tar.gz of one",
    )
    p.add_argument(
        "--split",
        help=f"split to {verb}, of --dataset or of a --data-dir with split folders "
        "(default: test; a folder without split folders takes no --split)",
    )
    p.add_argument("--limit", type=int, help=f"{verb} only the first N images (default: all)")


def check_rules(composite: str, init: str) -> None:
    """``--composite`` and ``--init`` are names lrpjax knows.

    Raises:
      CLIError: naming the choices.
    """
    if composite.endswith(".json"):  # a composite saved by lrpjax.composites.save
        try:
            composites.load(composite)
        except ValueError as error:
            raise CLIError(str(error)) from None
    elif composite not in composites.PRESETS:
        raise CLIError(
            f"unknown composite {composite!r}; choose from {', '.join(composites.PRESETS)} "
            "or a .json file saved by lrpjax.composites.save"
        )
    if init not in INITS:
        raise CLIError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


def composite_setting(composite: str) -> str | dict:
    """What a run records of ``--composite``: the preset name, or a saved file's contents
    (so that a changed file is another run, not a resumed one)."""
    if composite.endswith(".json"):
        return composites.to_json(composites.load(composite))
    return composite


def check_writable(out: Path) -> None:
    """Create `out` if needed and check that files can be written in it.

    Raises:
      CLIError: it cannot be created or written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain, and what the command line knows about it.

    Attributes:
      model: in eval mode.
      header: its weight file's JSON header.
      identity: a string that changes when the weights change (resume keys).
      description: for messages, e.g. ``"minivgg"`` or the checkpoint path.
    """

    model: object
    header: dict
    identity: str
    description: str

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One input's shape from the header (None where the header does not say)."""
        shape = self.header.get("input_shape")
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            return tuple(shape)
        return None


def model_identity(
    path: str | os.PathLike | None, name: str = "minivgg", factory: str | None = None
) -> str:
    """A string that changes when the model changes (resume keys).

    A shipped model: its name and its weight file's size and modification time; a weight
    file: its path, size and modification time, and the factory spec that builds it.
    """
    if path is None:
        label = "shipped" if name == "minivgg" else f"shipped:{name}"
        ref = resources.files("lrpjax") / "assets" / models.SHIPPED[name].weights
        with resources.as_file(ref) as file:
            try:
                st = Path(file).stat()
            except OSError:
                return label
        return f"{label}:{st.st_size}:{st.st_mtime_ns}"
    st = Path(path).stat()
    identity = f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{identity}:{factory}" if factory else identity


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The model that ``--model`` and ``--checkpoint`` name (default: the shipped miniVGG).

    Raises:
      CLIError: an unknown shipped name, a factory without ``--checkpoint``.
      lrpjax.models.ModelFileError: a missing, corrupt or mismatching weight file.
    """
    spec = getattr(args, "model", None)
    checkpoint = getattr(args, "checkpoint", None)
    if spec is not None and ":" not in spec:
        if spec not in models.SHIPPED:
            raise CLIError(
                f"unknown model {spec!r}; shipped models: {', '.join(models.SHIPPED)} "
                "(or package.module:factory with --checkpoint)"
            )
        if checkpoint is None:
            model, header = models.load_shipped(spec)
            return LoadedModel(model, header, model_identity(None, spec), spec)
        header = models.read_header(checkpoint)
        expected = type(nnx.eval_shape(models.SHIPPED[spec].factory)).__name__
        if header.get("architecture") != expected:
            raise models.ModelFileError(
                f"{checkpoint} holds a {header.get('architecture', 'unknown')!r} model, but "
                f"--model {spec} builds {expected!r}"
            )
        # built from the header where lrpjax knows the architecture: its class count
        factory = None if expected in models.ARCHITECTURES else models.SHIPPED[spec].factory
    elif spec is not None:
        if checkpoint is None:
            raise CLIError(f"--model {spec} needs --checkpoint FILE (saved by lrpjax.models.save)")
        try:
            factory = models.import_factory(spec)
        except ValueError as e:
            raise CLIError(str(e)) from None
    else:
        if checkpoint is None:
            model, header = models.load_shipped("minivgg")
            return LoadedModel(model, header, model_identity(None), "minivgg")
        factory = None
    try:
        model = models.load(checkpoint, factory=factory)
    except Exception as e:  # a user's factory may fail in any way
        if isinstance(e, models.ModelFileError):
            raise  # says what is wrong with the file
        what = f"--model {spec}" if spec is not None else f"--checkpoint {checkpoint}"
        raise CLIError(f"{what}: building the model failed: {type(e).__name__}: {e}") from None
    user = spec if spec is not None and ":" in spec else None
    return LoadedModel(
        model,
        models.read_header(checkpoint),
        model_identity(checkpoint, factory=user),
        str(checkpoint),
    )


class Data(NamedTuple):
    """Images as the data options name them, labelled in the data's own class numbering."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]  # labels index into these
    source: str  # for messages and resume keys
    stamp: str = ""  # changes when the files change (resume keys); "" for fixed data
    #: Each row's input: its file relative to --data-dir (an archive's member name), or
    #: ``<source>:<index>`` for data without files (``shipped-sample:0``, ``cifar10:test:0``).
    files: tuple[str, ...] = ()


def load_data(args: argparse.Namespace) -> Data:
    """The images the data options name (default: the shipped sample).

    A ``--data-dir`` in any layout of `lrpjax.data.read_folder`: a flat folder's labels
    are -1 (unknown), and its source is the folder alone (a folder of splits:
    ``FOLDER:split``).

    Args:
      args: with ``dataset``, ``data_dir``, ``split``, ``limit``, ``no_progress``.

    Raises:
      CLIError: a bad ``--limit``.
      lrpjax.data.DataUnavailableError: no data.
    """
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be positive, got {args.limit}")
    files = None
    if args.data_dir:
        folder = data.read_folder(args.data_dir, args.split, progress=not args.no_progress)
        images, labels, classes, files = folder.images, folder.labels, folder.classes, folder.files
        name = f"{args.data_dir}:{folder.split}" if folder.split else str(args.data_dir)
        stamp = folder.stamp
    elif args.dataset:
        split = args.split or "test"
        images, labels, classes = data.load_with_classes(
            args.dataset, split, progress=not args.no_progress
        )
        name, stamp = f"{args.dataset}:{split}", ""
    else:
        if args.split is not None:
            raise CLIError("--split needs --data-dir or --dataset (the shipped sample has none)")
        images, labels = data.sample()
        classes = list(data.CIFAR10_CLASSES)
        name, stamp = "shipped-sample", ""
    if files is None:
        files = [f"{name}:{i}" for i in range(len(images))]
    if args.limit is not None:
        images, labels, files = images[: args.limit], labels[: args.limit], files[: args.limit]
    return Data(images, labels, list(classes), name, stamp, tuple(files))


class Fitted(NamedTuple):
    """Data checked against a model, labelled by the model's class names."""

    images: np.ndarray
    labels: np.ndarray  # indices into class_names (-1: unknown)
    class_names: tuple[str, ...]
    source: str
    stamp: str = ""
    files: tuple[str, ...] = ()  # each row's input, as `Data.files`

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def identity(self) -> str:
        """The data for resume keys: the source, and its content stamp where it has one."""
        return f"{self.source}@{self.stamp}" if self.stamp else self.source


def fit_data(loaded: LoadedModel, data_: Data) -> Fitted:
    """Check the images against the model and label them by the model's class names.

    The class count is the model's output size on these images; the names come from the
    weight file's header (`lrpjax.models.class_names_of`). Data classes are matched by name.
    A model whose header has no class names keeps the data's own numbering (with a
    warning on stderr): its labels then only serve the accuracy.

    Raises:
      ValueError: images of the wrong shape or values, or a model that cannot take them.
      lrpjax.data.DataUnavailableError: a class of the data that the model does not know.
    """
    shape = loaded.input_shape or (
        models.INPUT_SHAPE if isinstance(loaded.model, models.MiniVGG) else None
    )
    try:
        models.check_images(data_.images, shape)
    except ValueError as e:
        resize = shape is not None and data_.images.shape[1:] != tuple(shape)
        hint = "; lrpjax does not resize images: give images of the model's size" if resize else ""
        raise ValueError(f"{data_.source}: {e}{hint}") from None
    num_classes = models.output_size(loaded.model, data_.images.shape[1:])
    class_names = models.class_names_of(loaded.header, num_classes)
    labels = data_.labels
    numbered = tuple(str(i) for i in range(num_classes))
    if list(data_.classes) != list(class_names):
        if class_names == numbered and not set(data_.classes) <= set(numbered):
            if len(data_.classes) > num_classes:
                raise data.DataUnavailableError(
                    f"{data_.source} has {len(data_.classes)} classes, the model "
                    f"{loaded.description} only {num_classes} (and no class names in its "
                    "weight file to match them by)"
                )
            print(
                f"warning: the model {loaded.description} has no class names (save it with "
                "lrpjax.models.save(..., class_names=...)); its classes are taken to be "
                f"{data_.source}'s in their order: {', '.join(data_.classes[:10])}"
                f"{' ...' if len(data_.classes) > 10 else ''}",
                file=sys.stderr,
            )
            if len(data_.classes) == num_classes:
                class_names = tuple(data_.classes)
        else:
            labels = data.match_classes(labels, data_.classes, class_names, data_.source)
    return Fitted(data_.images, labels, class_names, data_.source, data_.stamp, data_.files)


def parse_target(value: str, num_classes: int) -> str | int:
    """``pred``, ``label`` or a class index checked against the model's class count."""
    if value in ("pred", "label"):
        return value
    try:
        t = int(value)
    except ValueError:
        raise CLIError(f"--target must be pred, label or a class index, got {value!r}") from None
    if not 0 <= t < num_classes:
        raise CLIError(f"--target {t} is outside the classes 0..{num_classes - 1}")
    return t


def check_target(value: str, fitted: Fitted, hint: str = "") -> str | int:
    """`parse_target` against the model's classes, and ``label`` only for labelled images.

    Raises:
      CLIError: a bad target, or ``label`` with images that have no label.
    """
    target = parse_target(value, fitted.num_classes)
    if target == "label" and (fitted.labels < 0).any():
        raise CLIError(f"--target label needs labelled images{hint}")
    return target


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"{name} must be an integer, got {text!r}") from None


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """`jax.distributed.initialize` with the address, process count and id given or from the
    environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
    what is still missing, JAX detects on clusters it knows (SLURM, Open MPI, ...).

    Must run before anything touches a JAX backend. ``JAX_COORDINATOR_BIND_ADDRESS`` (read
    by JAX) sets the interface process 0's coordinator listens on (default: all).

    Returns:
      (process index, process count).

    Raises:
      CLIError: malformed settings, or the processes could not connect.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES", num_processes)
    process_id = _env_int("JAX_PROCESS_ID", process_id)
    if num_processes is not None and num_processes < 1:
        raise CLIError(f"the process count must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise CLIError(f"process id {process_id} is outside 0..{num_processes - 1}")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    except (RuntimeError, ValueError, TypeError) as e:
        detail = " ".join(str(e).split())[:400]
        raise CLIError(
            f"jax.distributed.initialize() failed: {detail} (set "
            "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run "
            "under a cluster JAX detects)"
        ) from None
    return jax.process_index(), jax.process_count()
