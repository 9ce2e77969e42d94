"""Copy a training run's final weights and metrics into the package (lrpjax/assets/).

Usage: python scripts/ship_weights.py RUN [EARLIER_RUN ...]
  RUN:         the output folder of `python -m train` whose model.npz is shipped
  EARLIER_RUN: runs it started from (`--init`), oldest first; their metrics are kept in
               the shipped metrics file under "earlier_runs", so the whole recipe is there

Writes lrpjax/assets/minivgg_cifar10.npz (the weights and header, as training wrote them;
checked to load) and lrpjax/assets/minivgg_cifar10_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lrpjax import models

ASSETS = Path(__file__).resolve().parents[1] / "lrpjax" / "assets"
MAX_BYTES = 10 * 1024 * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("earlier_runs", nargs="*")
    args = p.parse_args()
    run = Path(args.run)
    weights = run / "model.npz"
    models.load(weights)  # refuse a corrupt or foreign file before copying it
    if weights.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{weights} is over 10 MB")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["earlier_runs"] = [
        json.loads((Path(r) / "metrics.json").read_text()) for r in args.earlier_runs
    ]
    _, meta = models.read_arrays(weights)
    tmp = ASSETS / ".minivgg_cifar10.npz.tmp"  # renamed into place: never half-written
    shutil.copyfile(weights, tmp)
    tmp.replace(ASSETS / "minivgg_cifar10.npz")
    models.write_json(ASSETS / "minivgg_cifar10_metrics.json", metrics)
    print(f"shipped {weights}: test accuracy {meta['test_accuracy']}, command {meta['command']}")


if __name__ == "__main__":
    main()
