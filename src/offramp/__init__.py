"""offramp: multi-exit (early-exit) neural networks in PyTorch.

The few names most users need are exported here; everything else lives in its module.
"""

from offramp.calibration import ThresholdCalibrator
from offramp.check import check_network
from offramp.convert import attach_exits
from offramp.costs import CostProfile, expected_cost, profile
from offramp.errors import OfframpError
from offramp.evaluation import ExitRecord, simulate
from offramp.heads import HEADS, make_head, register_head
from offramp.network import ExitOutputs, MultiExitNetwork
from offramp.policies import GateScorer, ThresholdPolicy, max_softmax, normalized_entropy
from offramp.runtime import EarlyExitRuntime, RuntimeResult
from offramp.training import FitConfig, JointTraining, fit

__version__ = "0.1.0"

__all__ = [
    "HEADS",
    "CostProfile",
    "EarlyExitRuntime",
    "ExitOutputs",
    "ExitRecord",
    "FitConfig",
    "GateScorer",
    "JointTraining",
    "MultiExitNetwork",
    "OfframpError",
    "RuntimeResult",
    "ThresholdCalibrator",
    "ThresholdPolicy",
    "__version__",
    "attach_exits",
    "check_network",
    "expected_cost",
    "fit",
    "make_head",
    "max_softmax",
    "normalized_entropy",
    "profile",
    "register_head",
    "simulate",
]
