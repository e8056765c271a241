"""Training strategies and the fit loop."""

from offramp.training.joint import (
    JointTraining,
    constant,
    inception,
    joint_loss,
    linear_in_depth,
    sdn_growing,
)
from offramp.training.loop import EpochLog, FitConfig, fit, load_checkpoint, save_checkpoint

__all__ = [
    "EpochLog",
    "FitConfig",
    "JointTraining",
    "constant",
    "fit",
    "inception",
    "joint_loss",
    "linear_in_depth",
    "load_checkpoint",
    "save_checkpoint",
    "sdn_growing",
]
