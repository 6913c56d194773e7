"""fuseopt: torch.optim, re-implemented with fused kernels. ``import fuseopt as optim``."""

from fuseopt import optimizer
from fuseopt.adam import Adam
from fuseopt.adamw import AdamW
from fuseopt.optimizer import Optimizer
from fuseopt.sgd import SGD

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "Optimizer", "SGD", "optimizer"]
