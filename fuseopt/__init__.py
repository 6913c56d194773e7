"""fuseopt: torch.optim, re-implemented with fused kernels. ``import fuseopt as optim``."""

from fuseopt import lr_scheduler, optimizer, swa_utils
from fuseopt._adafactor import Adafactor
from fuseopt._muon import Muon
from fuseopt._stateless import swap_in_optimizer_params_and_state
from fuseopt.adadelta import Adadelta
from fuseopt.adagrad import Adagrad
from fuseopt.adam import Adam
from fuseopt.adamax import Adamax
from fuseopt.adamw import AdamW
from fuseopt.adan import Adan
from fuseopt.ademamix import AdEMAMix
from fuseopt.adopt import ADOPT
from fuseopt.asgd import ASGD
from fuseopt.in_backward import step_in_backward
from fuseopt.lamb import Lamb
from fuseopt.lars import LARS
from fuseopt.lbfgs import LBFGS
from fuseopt.lion import Lion
from fuseopt.nadam import NAdam
from fuseopt.optimizer import Optimizer
from fuseopt.param_groups import param_groups
from fuseopt.prodigy import Prodigy
from fuseopt.radam import RAdam
from fuseopt.rmsprop import RMSprop
from fuseopt.rprop import Rprop
from fuseopt.schedulefree import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from fuseopt.sgd import SGD
from fuseopt.sparse_adam import SparseAdam

__version__ = "0.1.0"

__all__ = [
    "ADOPT",
    "ASGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "AdamWScheduleFree",
    "Adan",
    "AdEMAMix",
    "Adamax",
    "LARS",
    "Lamb",
    "LBFGS",
    "Lion",
    "Muon",
    "NAdam",
    "Optimizer",
    "Prodigy",
    "RAdam",
    "RAdamScheduleFree",
    "RMSprop",
    "Rprop",
    "SGD",
    "SGDScheduleFree",
    "SparseAdam",
    "lr_scheduler",
    "optimizer",
    "param_groups",
    "step_in_backward",
    "swa_utils",
    "swap_in_optimizer_params_and_state",
]
