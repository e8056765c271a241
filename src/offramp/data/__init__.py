"""Data loaders that never touch the network."""

from offramp.data.digits import Splits, load_digits_splits, split_tensors
from offramp.data.idx import load_mnist, read_idx
from offramp.data.splits import DATASETS, holdout, load_splits

__all__ = [
    "DATASETS",
    "Splits",
    "holdout",
    "load_digits_splits",
    "load_mnist",
    "load_splits",
    "read_idx",
    "split_tensors",
]
