"""Training strategies and the fit loop; :func:`train` runs any strategy by name."""

from offramp.training.joint import (
    JointTraining,
    constant,
    inception,
    joint_loss,
    linear_in_depth,
    sdn_growing,
)
from offramp.training.loop import (
    EpochLog,
    FitConfig,
    fit,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
)
from offramp.training.registry import OPTIONS, STRATEGIES, make_strategy, train

__all__ = [
    "OPTIONS",
    "STRATEGIES",
    "EpochLog",
    "FitConfig",
    "JointTraining",
    "constant",
    "fit",
    "inception",
    "joint_loss",
    "linear_in_depth",
    "load_checkpoint",
    "make_optimizer",
    "make_strategy",
    "save_checkpoint",
    "sdn_growing",
    "train",
]
