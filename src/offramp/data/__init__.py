"""Data loaders that never touch the network."""

from offramp.data.digits import Splits, load_digits_splits, split_tensors
from offramp.data.idx import load_mnist, read_idx
from offramp.data.splits import DATASETS, holdout, load_splits
from offramp.data.text import Vocabulary, load_sst2, load_trec

__all__ = [
    "DATASETS",
    "Splits",
    "Vocabulary",
    "holdout",
    "load_digits_splits",
    "load_mnist",
    "load_splits",
    "load_sst2",
    "load_trec",
    "read_idx",
    "split_tensors",
]
