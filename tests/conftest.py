"""Shared fixtures: small networks, data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from offramp.models import blenet, mlp


def data_dir(name: str) -> Path:
    """``$OFFRAMP_DATA/name`` (default ``../shared/data``), or skip the test with a reason."""
    root = Path(os.environ.get("OFFRAMP_DATA", Path(__file__).parents[2] / "shared" / "data"))
    path = root / name
    if not path.is_dir():
        pytest.skip(f"dataset {name!r} not found under {root} (set OFFRAMP_DATA to its parent)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def cnn():
    return blenet(8, 10, exits_after=(0, 1), head="conv", seed=0).eval()


@pytest.fixture
def digits_x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(64, 1, 8, 8, generator=g)


@pytest.fixture
def small_mlp():
    return mlp(6, 4, hidden=(16, 16, 16), seed=0).eval()
