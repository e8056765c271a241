"""Train / validation / test splits of the datasets a config can name.

Pure: paths come in as arguments (the job layer resolves ``OFFRAMP_DATA``), nothing is read
from the environment.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from offramp.data.digits import Splits
from offramp.errors import ConfigError

__all__ = ["DATASETS", "DIGITS_TEST_FRACTION", "holdout", "load_splits"]

#: Datasets a config may name. ``digits`` ships with scikit-learn; the others are IDX files.
DATASETS = ("digits", "mnist", "fashion-mnist")

#: Share of scikit-learn digits held out (stratified) as the test split, as in ``offramp demo``.
DIGITS_TEST_FRACTION = 0.2


def holdout(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)``: a seeded split stratified by class, ``round(fraction·N)``
    (at least one) samples held out, both in their original order.

    Example:
        >>> keep, held = holdout(torch.arange(10) % 2, 0.2, seed=0)
        >>> len(keep), len(held), sorted((torch.arange(10) % 2)[held].tolist())
        (8, 2, [0, 1])
    """
    n = y.shape[0]
    k = max(1, round(fraction * n))
    if k >= n:
        raise ConfigError(
            f"val_fraction {fraction} of {n} training samples leaves none to train on; lower "
            "val_fraction or raise train_limit"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, random within
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long()  # evenly spaced
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[pos]] = True
    return (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)


def load_splits(
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """The train, validation and test ``(X, y)`` tensors of ``dataset`` (validation may be
    empty: zero rows when ``val_fraction`` is 0).

    Args:
        dataset: a name in :data:`DATASETS`.
        data_dir: the directory of the IDX files (``mnist``, ``fashion-mnist``).
        train_limit: keep the first ``train_limit`` training samples, before the validation
            split is held out of them.
        val_fraction: share of the training samples held out, stratified, seeded by ``seed``.
        seed: seed of the validation split.

    Example:
        >>> s = load_splits("digits", train_limit=100, val_fraction=0.2)
        >>> len(s.train[1]), len(s.val[1]), tuple(s.test[0].shape[1:])
        (80, 20, (1, 8, 8))
    """
    if dataset == "digits":
        from offramp.data.digits import load_digits_splits

        # Every image outside the stratified test split is a training sample.
        s = load_digits_splits(val_fraction=0.2, test_fraction=DIGITS_TEST_FRACTION, seed=0)
        x = torch.cat([s.train[0], s.val[0]])
        y = torch.cat([s.train[1], s.val[1]])
        if train_limit is not None:
            x, y = x[:train_limit], y[:train_limit]
        test = s.test
    elif dataset in DATASETS:
        from offramp.data.idx import load_mnist

        if data_dir is None:
            raise ConfigError(f"dataset {dataset!r} needs data_dir, the directory of its files")
        x, y = load_mnist(data_dir, "train", limit=train_limit)
        test = load_mnist(data_dir, "test")
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if val_fraction > 0:
        keep, held = holdout(y, val_fraction, seed)
        return Splits((x[keep], y[keep]), (x[held], y[held]), test)
    return Splits((x, y), (x[:0], y[:0]), test)
