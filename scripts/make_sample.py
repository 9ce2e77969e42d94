"""Write lrpjax/assets/cifar10_sample.npz: the first 10 test images of each CIFAR-10 class.

Usage: python scripts/make_sample.py PATH  (an image folder or .tar.gz with a test/ split)
"""

import sys
from pathlib import Path

import numpy as np

from lrpjax import data

PER_CLASS = 10


def main(source: str) -> None:
    images, labels = data.load(source, "test")
    keep = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
    out = Path(__file__).resolve().parents[1] / "lrpjax" / "assets" / "cifar10_sample.npz"
    pixels = np.round(images[keep] * 255).astype(np.uint8)
    np.savez_compressed(out, images=pixels, labels=labels[keep].astype(np.int32))
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(keep)} images)")


if __name__ == "__main__":
    main(sys.argv[1])
