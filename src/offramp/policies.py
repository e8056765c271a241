"""Exit criteria as pure scoring functions, and per-exit threshold policies.

A criterion turns an exit's logits ``(B, C)`` into one confidence score per sample ``(B,)``.
For ``entropy`` (eq. 11) lower means more confident and a sample leaves exit ``i`` when
``H(y_i) < τ_i``; for ``max_prob`` higher means more confident and it leaves when
``max_c softmax(y_i)_c > τ_i``. The final exit takes every sample that is left.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.errors import ConfigError, ShapeError

__all__ = [
    "CRITERIA",
    "Criterion",
    "ThresholdPolicy",
    "fires",
    "get_criterion",
    "max_softmax",
    "normalized_entropy",
]


def normalized_entropy(logits: Tensor) -> Tensor:
    """Eq. 11: ``H(y) = −(1/log C) Σ_c p_c log p_c`` with ``p = softmax(y)``, in ``[0, 1]``.

    Args:
        logits: ``(..., C)``.

    Returns:
        ``(...)``: 0 for a one-hot distribution, 1 for a uniform one.

    Example:
        >>> import torch
        >>> normalized_entropy(torch.zeros(1, 4)).tolist()
        [1.0]
    """
    c = logits.shape[-1]
    if c < 2:
        return torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return h / math.log(c)


def max_softmax(logits: Tensor) -> Tensor:
    """The largest softmax probability of each sample, ``(..., C) -> (...)``."""
    return torch.softmax(logits, dim=-1).amax(dim=-1)


@dataclass(frozen=True)
class Criterion:
    """A named confidence score and its direction.

    Attributes:
        name: registry name.
        score: ``(B, C) logits -> (B,)`` scores.
        lower_is_confident: ``True`` when small scores mean "exit" (entropy).
    """

    name: str
    score: Callable[[Tensor], Tensor]
    lower_is_confident: bool

    @property
    def never(self) -> float:
        """A threshold with which this criterion never fires."""
        return -math.inf if self.lower_is_confident else math.inf

    @property
    def always(self) -> float:
        """A threshold with which this criterion always fires (for finite scores)."""
        return math.inf if self.lower_is_confident else -math.inf


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion("entropy", normalized_entropy, lower_is_confident=True),
    "max_prob": Criterion("max_prob", max_softmax, lower_is_confident=False),
}


def get_criterion(name: str | Criterion) -> Criterion:
    """Look a criterion up by name (``entropy`` or ``max_prob``)."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise ConfigError(f"unknown exit criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def fires(scores: Tensor, threshold: Tensor | float, lower_is_confident: bool) -> Tensor:
    """The exit test: ``scores < τ`` (lower is confident) or ``scores > τ``; strict both ways."""
    return scores < threshold if lower_is_confident else scores > threshold


@dataclass(frozen=True)
class ThresholdPolicy:
    """Per-exit thresholds on one criterion.

    Args:
        criterion: ``"entropy"`` or ``"max_prob"``.
        thresholds: one threshold per early exit (``E − 1`` values; the final exit takes all).

    Example:
        >>> import torch
        >>> policy = ThresholdPolicy("max_prob", (0.9,))
        >>> policy.fires(torch.tensor([[5.0, 0.0], [0.1, 0.0]]), 0).tolist()
        [True, False]
    """

    criterion: str
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        get_criterion(self.criterion)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if any(math.isnan(t) for t in self.thresholds):
            raise ConfigError(f"thresholds must not be NaN, got {self.thresholds}")

    @classmethod
    def never(cls, num_exits: int, criterion: str = "entropy") -> ThresholdPolicy:
        """A policy whose early exits never fire: every sample reaches the final exit."""
        return cls(criterion, (get_criterion(criterion).never,) * (num_exits - 1))

    @property
    def num_exits(self) -> int:
        return len(self.thresholds) + 1

    @property
    def lower_is_confident(self) -> bool:
        return get_criterion(self.criterion).lower_is_confident

    def check(self, num_exits: int) -> None:
        """Raise ``ConfigError`` unless the policy fits a network with ``num_exits`` exits."""
        if self.num_exits != num_exits:
            raise ConfigError(
                f"policy has {len(self.thresholds)} thresholds but the network has {num_exits} "
                f"exits; give one threshold per early exit ({num_exits - 1})"
            )

    def scores(self, logits: Tensor) -> Tensor:
        """Scores of ``(..., C)`` logits under this policy's criterion."""
        return get_criterion(self.criterion).score(logits)

    def fires(self, logits: Tensor, i: int) -> Tensor:
        """Which samples leave at early exit ``i``, from that exit's logits ``(B, C) -> (B,)``."""
        if not 0 <= i < len(self.thresholds):
            raise ShapeError(
                f"exit {i} has no threshold; valid early exits: 0 … {len(self.thresholds) - 1}"
            )
        return fires(self.scores(logits), self.thresholds[i], self.lower_is_confident)

    def decide(self, scores: Tensor) -> Tensor:
        """Exit index of every sample from all exits' scores ``(E, N) -> (N,)`` (first firing)."""
        e = scores.shape[0]
        self.check(e)
        thr = torch.tensor(self.thresholds, dtype=scores.dtype, device=scores.device)
        fire = fires(scores[:-1], thr[:, None], self.lower_is_confident)  # (E-1, N)
        fire = torch.cat([fire, torch.ones_like(fire[:1])], dim=0)  # (E, N), final always fires
        return fire.to(torch.int8).argmax(dim=0)  # first True along exits

    def to_dict(self) -> dict[str, object]:
        return {"criterion": self.criterion, "thresholds": list(self.thresholds)}
