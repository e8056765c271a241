"""Exit criteria as pure scoring functions, and the policies built on them.

A criterion turns an exit's logits ``(B, C)`` into one confidence score per sample ``(B,)``.
For ``entropy`` (eq. 11) lower means more confident and a sample leaves exit ``i`` when
``H(y_i) < τ_i``; for ``max_prob`` and ``margin`` (top-1 minus top-2 probability) higher means
more confident and it leaves when the score exceeds ``τ_i``. The final exit takes every sample
that is left.

Policies:

- :class:`ThresholdPolicy` — one threshold per early exit on a criterion, optionally on
  per-exit *scorers* instead of the plain criterion: temperature-scaled logits
  (:class:`TemperatureScorer`) or a learned confidence model (:mod:`offramp.confidence`);
- :class:`PatiencePolicy` — PABEE: leave at exit ``i`` once the predictions of ``patience + 1``
  consecutive exits agree.

Every policy exposes the same *exit tests*, one small module per early exit,
``test(logits (B, C), state (B, S)) -> (leave (B,), state)``. The simulation on an
``ExitRecord`` (:func:`decide`), the batched runtime and the batch-1 runtime all run these same
modules, so their decisions agree by construction (and the tests check it).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError, ShapeError

__all__ = [
    "CRITERIA",
    "Criterion",
    "ExitPolicy",
    "GateScorer",
    "PatiencePolicy",
    "PatienceTest",
    "TemperatureScorer",
    "ThresholdPolicy",
    "ThresholdTest",
    "decide_from_logits",
    "exit_scores",
    "fires",
    "get_criterion",
    "margin",
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


def margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability, ``(..., C) -> (...)``, in ``[0, 1]``.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.6, 0.3, 0.1]])
        >>> round(float(margin(p.log())[0]), 4)
        0.3
    """
    if logits.shape[-1] < 2:
        return torch.ones(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values  # (..., 2)
    return top[..., 0] - top[..., 1]


def _learned_placeholder(logits: Tensor) -> Tensor:
    raise ConfigError(
        "criterion 'learned' has no fixed score: fit one with offramp.confidence."
        "fit_learned_confidence and pass its scorers to the policy"
    )


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion("entropy", normalized_entropy, lower_is_confident=True),
    "max_prob": Criterion("max_prob", max_softmax, lower_is_confident=False),
    "margin": Criterion("margin", margin, lower_is_confident=False),
    "learned": Criterion("learned", _learned_placeholder, lower_is_confident=False),
}


def get_criterion(name: str | Criterion) -> Criterion:
    """Look a criterion up by name (``entropy``, ``max_prob``, ``margin``, ``learned``)."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise ConfigError(f"unknown exit criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def fires(scores: Tensor, threshold: Tensor | float, lower_is_confident: bool) -> Tensor:
    """The exit test: ``scores < τ`` (lower is confident) or ``scores > τ``; strict both ways."""
    return scores < threshold if lower_is_confident else scores > threshold


def exit_scores(
    logits: Tensor, criterion: str, scorers: Sequence[nn.Module] | None = None
) -> Tensor:
    """Scores of every exit, ``(E, N, C) -> (E, N)``: the plain criterion, or per-exit
    ``scorers`` for the ``E − 1`` early exits (the final exit's row, never used to decide, is
    then zeros).

    Example:
        >>> import torch
        >>> exit_scores(torch.zeros(2, 3, 4), "entropy").tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if scorers is None:
        return get_criterion(criterion).score(logits)
    if len(scorers) != logits.shape[0] - 1:
        raise ConfigError(
            f"got {len(scorers)} scorers for {logits.shape[0] - 1} early exits; give one each"
        )
    if any(getattr(sc, "on_features", False) for sc in scorers):
        raise ConfigError(
            "these scorers score exit features (gates), not logits: take their scores from a "
            "record collected with ExitRecord.collect(net, data, feature_scorers=scorers)"
        )
    with torch.no_grad():
        rows = [sc(z) for sc, z in zip(scorers, logits[:-1], strict=True)]
    rows.append(logits.new_zeros(logits.shape[1]))
    return torch.stack(rows).float()


class TemperatureScorer(nn.Module):
    """A criterion on temperature-scaled logits: ``score(logits / T)``.

    Args:
        criterion: the criterion's name.
        temperature: ``T > 0`` (fitted per exit by :func:`offramp.confidence.fit_temperatures`).
    """

    def __init__(self, criterion: str, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.criterion = criterion
        self.score = get_criterion(criterion).score
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        return self.score(logits / self.temperature)


class ThresholdTest(nn.Module):
    """Exit test of one early exit: ``score(logits)`` against a threshold; state untouched.

    A scorer with ``on_features = True`` (a gate of recursive gating, :class:`GateScorer`)
    scores the exit's features ``h_i`` instead of its logits: the runtime then hands the test
    ``h_i``, and the simulation the score recorded from the same module
    (``ExitRecord.collect(..., feature_scorers=...)``), compared by the same :meth:`compare`.
    """

    def __init__(
        self, scorer: nn.Module | Callable[[Tensor], Tensor], threshold: float, lower: bool
    ) -> None:
        super().__init__()
        self.scorer = scorer
        self.lower = bool(lower)
        self.on_features = bool(getattr(scorer, "on_features", False))
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=False)

    def compare(self, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The decision from scores ``s`` ``(B,)``."""
        return fires(s, self.threshold, self.lower), state

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.compare(self.scorer(x), state)


class GateScorer(nn.Module):
    """A confidence model on an exit's features ``h_i`` (not its logits), scoring in ``[0, 1]``
    with higher = leave — the gates of recursive gating (eq. 9,
    :meth:`offramp.training.GatedTraining.gate_scorers`). Use with criterion ``"learned"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> g = GateScorer(nn.Sequential(nn.Linear(4, 1), nn.Sigmoid(), nn.Flatten(0)))
        >>> g.on_features, tuple(g(torch.randn(3, 4)).shape)
        (True, (3,))
    """

    on_features = True

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, h: Tensor) -> Tensor:
        return self.gate(h).reshape(h.shape[0])  # (B, 1) or (B,) -> (B,)


class PatienceTest(nn.Module):
    """PABEE's exit test: ``state = (previous prediction, agreement count)`` per sample."""

    def __init__(self, patience: int, first: bool) -> None:
        super().__init__()
        self.patience = int(patience)
        self.first = bool(first)

    def forward(self, logits: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        pred = logits.argmax(dim=-1)  # (B,)
        if self.first:
            count = torch.zeros_like(pred)
        else:
            count = torch.where(pred == state[:, 0], state[:, 1] + 1, torch.zeros_like(pred))
        return count >= self.patience, torch.stack([pred, count], dim=1)  # (B, 2)


class ExitPolicy(ABC):
    """What every policy provides: its exit tests, a size check, the initial state.

    Attributes:
        num_exits: exits of the network the policy is for.
        state_size: columns of the per-sample state the exit tests carry (0 for stateless).
    """

    num_exits: int
    state_size: ClassVar[int] = 0

    @abstractmethod
    def exit_tests(self) -> list[nn.Module]:
        """One module per early exit: ``(logits (B, C), state (B, S)) -> (leave (B,), state)``."""

    def check(self, num_exits: int) -> None:
        """Raise ``ConfigError`` unless the policy fits a network with ``num_exits`` exits."""
        if self.num_exits != num_exits:
            raise ConfigError(
                f"the policy is for {self.num_exits} exits but the network has {num_exits}; "
                "build or calibrate it for this network"
            )

    def initial_state(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """The state before the first exit, ``(n, state_size)`` int64."""
        return torch.zeros((n, self.state_size), dtype=torch.long, device=device)


def decide_from_logits(
    policy: ExitPolicy, logits: Tensor, feature_scores: Tensor | None = None
) -> Tensor:
    """Exit of every sample from all exits' logits ``(E, N, C) -> (N,)``: the simulation.

    Runs the policy's exit tests over whole exits (vectorised over samples): a sample leaves at
    the first exit whose test fires, the final exit otherwise. Tests scoring features (gates)
    compare the recorded ``feature_scores`` ``(E − 1, N)`` instead.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[5.0, 0.0], [0.0, 0.1]], [[0.0, 5.0], [0.0, 5.0]]])
        >>> decide_from_logits(ThresholdPolicy("max_prob", (0.9,)), logits).tolist()
        [0, 1]
    """
    e, n = logits.shape[0], logits.shape[1]
    policy.check(e)
    exits = torch.full((n,), e - 1, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    state = policy.initial_state(n, logits.device)
    with torch.no_grad():
        for i, test in enumerate(policy.exit_tests()):
            if getattr(test, "on_features", False):
                if feature_scores is None:
                    raise ConfigError(
                        "the policy scores exit features (gates): collect the record with "
                        "ExitRecord.collect(net, data, feature_scorers=policy.scorers)"
                    )
                leave, state = test.compare(feature_scores[i], state)
            else:
                leave, state = test(logits[i], state)
            exits[leave & ~done] = i
            done |= leave
    return exits


@dataclass(frozen=True)
class ThresholdPolicy(ExitPolicy):
    """Per-exit thresholds on one criterion.

    Args:
        criterion: ``"entropy"``, ``"max_prob"``, ``"margin"`` or ``"learned"`` (its direction).
        thresholds: one threshold per early exit (``E − 1`` values; the final exit takes all).
        scorers: optional per-early-exit score modules ``logits (B, C) -> (B,)`` used instead
            of the plain criterion — :class:`TemperatureScorer` or a learned confidence model
            (:mod:`offramp.confidence`); they must score in the criterion's direction.

    Example:
        >>> import torch
        >>> policy = ThresholdPolicy("max_prob", (0.9,))
        >>> policy.fires(torch.tensor([[5.0, 0.0], [0.1, 0.0]]), 0).tolist()
        [True, False]
    """

    criterion: str
    thresholds: tuple[float, ...]
    scorers: tuple[nn.Module, ...] | None = None

    def __post_init__(self) -> None:
        get_criterion(self.criterion)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if any(math.isnan(t) for t in self.thresholds):
            raise ConfigError(f"thresholds must not be NaN, got {self.thresholds}")
        if self.scorers is not None:
            object.__setattr__(self, "scorers", tuple(self.scorers))
            if len(self.scorers) != len(self.thresholds):
                raise ConfigError(
                    f"got {len(self.scorers)} scorers for {len(self.thresholds)} early exits; "
                    "give one per early exit"
                )
        elif self.criterion == "learned":
            raise ConfigError(
                "criterion 'learned' needs scorers: fit them with "
                "offramp.confidence.fit_learned_confidence"
            )

    @classmethod
    def never(cls, num_exits: int, criterion: str = "entropy") -> ThresholdPolicy:
        """A policy whose early exits never fire: every sample reaches the final exit."""
        return cls(criterion, (get_criterion(criterion).never,) * (num_exits - 1))

    @property
    def num_exits(self) -> int:  # type: ignore[override]
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

    def scorer(self, i: int) -> nn.Module | Callable[[Tensor], Tensor]:
        """The score function of early exit ``i``."""
        if self.scorers is not None:
            return self.scorers[i]
        return get_criterion(self.criterion).score

    def scores(self, logits: Tensor) -> Tensor:
        """Scores of every exit, ``(E, N, C) -> (E, N)`` (:func:`exit_scores`)."""
        return exit_scores(logits, self.criterion, self.scorers)

    def fires(self, logits: Tensor, i: int) -> Tensor:
        """Which samples leave at early exit ``i``, from that exit's logits ``(B, C) -> (B,)``."""
        if not 0 <= i < len(self.thresholds):
            raise ShapeError(
                f"exit {i} has no threshold; valid early exits: 0 … {len(self.thresholds) - 1}"
            )
        return fires(self.scorer(i)(logits), self.thresholds[i], self.lower_is_confident)

    def decide(self, scores: Tensor) -> Tensor:
        """Exit index of every sample from all exits' scores ``(E, N) -> (N,)`` (first firing)."""
        e = scores.shape[0]
        self.check(e)
        thr = torch.tensor(self.thresholds, dtype=scores.dtype, device=scores.device)
        fire = fires(scores[:-1], thr[:, None], self.lower_is_confident)  # (E-1, N)
        fire = torch.cat([fire, torch.ones_like(fire[:1])], dim=0)  # (E, N), final always fires
        return fire.to(torch.int8).argmax(dim=0)  # first True along exits

    def exit_tests(self) -> list[nn.Module]:
        """One :class:`ThresholdTest` per early exit."""
        lower = self.lower_is_confident
        return [ThresholdTest(self.scorer(i), t, lower) for i, t in enumerate(self.thresholds)]

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"criterion": self.criterion, "thresholds": list(self.thresholds)}
        if self.scorers is not None:
            d["scorers"] = [type(m).__name__ for m in self.scorers]
        return d


@dataclass(frozen=True)
class PatiencePolicy(ExitPolicy):
    """PABEE (Zhou et al. 2020): leave at exit ``i`` once exits ``i − patience … i`` all predict
    the same class; the final exit takes the rest.

    Args:
        num_exits: exits of the network.
        patience: consecutive agreements needed (``≥ 1``); ``patience ≥ num_exits`` never exits
            early.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]]])  # 0, 0, 1
        >>> decide_from_logits(PatiencePolicy(3, 1), logits).tolist()  # exits 0 and 1 agree
        [1]
    """

    num_exits: int  # type: ignore[misc]
    patience: int
    state_size: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.num_exits < 1 or self.patience < 1:
            raise ConfigError(
                f"patience needs num_exits ≥ 1 and patience ≥ 1, got {self.num_exits}, "
                f"{self.patience}"
            )

    def exit_tests(self) -> list[nn.Module]:
        """One :class:`PatienceTest` per early exit."""
        return [PatienceTest(self.patience, i == 0) for i in range(self.num_exits - 1)]

    def to_dict(self) -> dict[str, object]:
        return {"policy": "patience", "patience": self.patience}
