"""Training of the reference miniVGG on CIFAR-10: ``python -m train --help``."""

from train.trainer import Config, evaluate, make_optimizer, train

__all__ = ["Config", "evaluate", "make_optimizer", "train"]
