"""scikit-learn's 8×8 digits (1,797 images shipped inside scikit-learn; no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.errors import ConfigError

__all__ = ["Splits", "load_digits_splits", "split_tensors"]


@dataclass(frozen=True)
class Splits:
    """Train, validation (for calibration) and test tensors, each ``(X, y)``."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def split_tensors(
    x: Tensor, y: Tensor, val_fraction: float, test_fraction: float, seed: int
) -> Splits:
    """Stratified train/val/test split (scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
            "(0, 1) and sum to less than 1"
        )
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(
        idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=y.numpy()[rest],
        random_state=seed,
    )
    pick = lambda i: (x[torch.as_tensor(i)], y[torch.as_tensor(i)])  # noqa: E731
    return Splits(pick(train), pick(val), pick(test))


def load_digits_splits(
    val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0, *, size: int = 8
) -> Splits:
    """scikit-learn digits as ``(N, 1, size, size)`` float32 in [0, 1], split stratified.

    Args:
        val_fraction: share of the images in the validation split.
        test_fraction: share of the images in the test split.
        seed: seeds the split.
        size: image side; other than 8, the 8×8 images are resized bilinearly (as
            ``torch.nn.functional.interpolate`` does, ``align_corners=False``).

    Needs the ``sklearn`` extra (``pip install 'offramp[sklearn]'``).

    Example:
        >>> s = load_digits_splits()
        >>> tuple(s.train[0].shape[1:])
        (1, 8, 8)
        >>> tuple(load_digits_splits(size=16).test[0].shape[1:])
        (1, 16, 16)
    """
    if size < 1:
        raise ConfigError(f"size must be ≥ 1, got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the digits data comes with scikit-learn: pip install 'offramp[sklearn]'"
        ) from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 8, 8) -> (N, 1, 8, 8)
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    y = torch.tensor(d.target, dtype=torch.long)
    return split_tensors(x, y, val_fraction, test_fraction, seed)
