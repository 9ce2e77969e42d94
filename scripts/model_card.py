"""Accuracy overall and per class, and a confusion-matrix figure, for a weight file.

Usage: python scripts/model_card.py WEIGHTS DATA [--out docs]
  WEIGHTS: an .npz from `python -m train` (default: the shipped model)
  DATA:    'cifar10' or an image folder / .tar.gz with a test/ split

Writes OUT/model_card.json and OUT/confusion_matrix.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lrpjax import data, models


def confusion(model: models.MiniVGG, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(classes, classes) counts: rows true class, columns predicted class."""
    graphdef, state = nnx.split(model)
    predict = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).argmax(-1))
    pred = np.concatenate(
        [np.asarray(predict(state, images[i : i + 500])) for i in range(0, len(images), 500)]
    )
    k = models.NUM_CLASSES
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("data")
    p.add_argument("--out", default="docs")
    a = p.parse_args()
    model = models.load(a.weights)
    images, labels = data.load(a.data, "test")
    cm = confusion(model, images, labels)
    per_class = cm.diagonal() / cm.sum(1)
    card = {
        "weights": str(a.weights),
        "data": str(a.data),
        "images": int(cm.sum()),
        "accuracy": float(cm.diagonal().sum() / cm.sum()),
        "per_class_accuracy": dict(zip(models.CLASS_NAMES, map(float, per_class), strict=True)),
        "confusion_matrix": cm.tolist(),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_card.json").write_text(json.dumps(card, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(cm / cm.sum(1, keepdims=True), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > 0.5 * cm[i].sum() else "black")  # fmt: skip
    ax.set_xticks(range(len(cm)), models.CLASS_NAMES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(cm)), models.CLASS_NAMES, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"CIFAR-10 test, accuracy {card['accuracy']:.4f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    print(json.dumps({k: v for k, v in card.items() if k != "confusion_matrix"}, indent=2))


if __name__ == "__main__":
    main()
