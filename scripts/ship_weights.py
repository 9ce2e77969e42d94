"""Copy a training run's final weights and metrics into the package (lrpjax/assets/).

Usage: python scripts/ship_weights.py RUN [EARLIER_RUN ...] [--model minivgg|vit]
  RUN:         the output folder of `python -m train` whose model.npz is shipped
  EARLIER_RUN: runs it started from (`--init`), oldest first; their metrics are kept in
               the shipped metrics file under "earlier_runs", so the whole recipe is there
  --model:     which shipped model (`lrpjax.models.SHIPPED`) the run is; default minivgg

Writes lrpjax/assets/<weights> (e.g. minivgg_cifar10.npz, vit_cifar10.npz: the weights and
header, as training wrote them; checked to load as that model's architecture) and
<weights stem>_metrics.json beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flax import nnx

from lrpjax import models

ASSETS = Path(__file__).resolve().parents[1] / "lrpjax" / "assets"
MAX_BYTES = 10 * 1024 * 1024


def ship(run: Path, earlier_runs: list[Path], model: str = "minivgg", assets: Path = ASSETS):
    """Check and copy ``run/model.npz`` and its metrics into `assets` as shipped `model`.

    Returns:
      The weight file's header.

    Raises:
      SystemExit: an unknown model, a file over 10 MB, or another architecture.
      lrpjax.models.ModelFileError: a corrupt weight file.
    """
    if model not in models.SHIPPED:
        raise SystemExit(f"unknown model {model!r}; shipped: {', '.join(models.SHIPPED)}")
    entry = models.SHIPPED[model]
    weights = run / "model.npz"
    models.load(weights)  # refuse a corrupt or foreign file before copying it
    header = models.read_header(weights)
    expected = type(nnx.eval_shape(entry.factory)).__name__
    if header.get("architecture") != expected:
        raise SystemExit(f"{weights} holds a {header.get('architecture')!r}, not a {expected!r}")
    if weights.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{weights} is over 10 MB")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["earlier_runs"] = [json.loads((r / "metrics.json").read_text()) for r in earlier_runs]
    target = assets / entry.weights
    tmp = assets / f".{entry.weights}.tmp"  # renamed into place: never half-written
    shutil.copyfile(weights, tmp)
    tmp.replace(target)
    models.write_json(assets / f"{target.stem}_metrics.json", metrics)
    return header


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("earlier_runs", nargs="*")
    p.add_argument("--model", default="minivgg", choices=sorted(models.SHIPPED))
    args = p.parse_args()
    header = ship(Path(args.run), [Path(r) for r in args.earlier_runs], args.model)
    print(
        f"shipped {args.run}/model.npz as {args.model}: test accuracy "
        f"{header.get('test_accuracy')}, command {header.get('command')}"
    )


if __name__ == "__main__":
    main()
