"""Data loaders that never touch the network."""

from offramp.data.digits import Splits, load_digits_splits, split_tensors
from offramp.data.idx import load_mnist, read_idx

__all__ = ["Splits", "load_digits_splits", "load_mnist", "read_idx", "split_tensors"]
