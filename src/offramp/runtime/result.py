"""What the runtime returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["RuntimeResult"]


@dataclass(frozen=True)
class RuntimeResult:
    """Outputs of the runtime, in input order.

    Attributes:
        predictions: predicted class per sample, ``(N,)``.
        exits: exit each sample left at, ``(N,)``.
        logits: logits of that exit, ``(N, C)``.
        costs: FLOPs spent on each sample, ``C_{exit}``, ``(N,)``, when a cost profile was given.
    """

    predictions: Tensor
    exits: Tensor
    logits: Tensor
    costs: Tensor | None = None
