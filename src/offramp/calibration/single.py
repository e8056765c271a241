"""One threshold for every exit, tuned by error feedback (Baccarelli et al. 2020; survey §6).

All criteria offramp ships score in ``[0, 1]``, so a single ``τ`` can serve every exit. The
iteration measures the accuracy ``a_k`` of ``τ_k`` on the calibration split and moves ``τ``
against the error ``e_k = a_k − a*`` (``a*`` = final-exit accuracy − δ)::

    τ_{k+1} = τ_k + s · η_k · sign(e_k)        s = +1 when lower scores are confident, else −1

so a policy more accurate than needed exits more, one less accurate exits less. The gain
starts at ``η_0 = 0.25`` and halves whenever the error changes sign — a bisection when accuracy
is monotone in ``τ``, still convergent when it is not.

**Convergence criterion:** stop as soon as ``0 ≤ e_k ≤ tol`` (on target, at most ``tol``
above it), or when the gain falls below ``min_step``, or after ``max_iter`` iterations. The
result is the cheapest threshold seen that meets the target (``accuracy ≥ a*``); if none did,
"never exit early". ``history_`` keeps every ``(τ, accuracy, expected cost)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from offramp.calibration.checks import check_delta
from offramp.calibration.grid import prepare
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy, get_criterion

__all__ = ["SingleThresholdCalibrator"]


class SingleThresholdCalibrator:
    """One threshold for all early exits, by the error-feedback iteration above.

    Args:
        criterion: criterion name (its direction, when ``scorers`` are given).
        delta: accuracy loss allowed relative to the final exit on the calibration split, in
            ``(-1, 1)`` as for :class:`~offramp.calibration.ThresholdCalibrator`.
        tol: accuracy tolerance above the target at which the iteration stops.
        min_step: smallest gain before it stops.
        max_iter: iteration cap.
        scorers: per-early-exit score modules (temperature scaling, learned confidence).

    Attributes:
        threshold_, policy_, accuracy_, expected_cost_, iterations_, converged_, history_.

    Example:
        >>> import torch, numpy as np
        >>> from offramp import ExitRecord
        >>> logits = torch.tensor([[[4.0, 0.0], [0.1, 0.0]], [[4.0, 0.0], [0.0, 4.0]]])
        >>> rec = ExitRecord(logits, torch.tensor([0, 1]))
        >>> cal = SingleThresholdCalibrator("max_prob").fit(rec, np.array([1.0, 2.0]))
        >>> cal.accuracy_, cal.expected_cost_, cal.converged_
        (1.0, 1.5, True)
    """

    def __init__(
        self,
        criterion: str = "entropy",
        delta: float = 0.0,
        tol: float = 1e-3,
        min_step: float = 1e-4,
        max_iter: int = 100,
        scorers: Sequence[nn.Module] | None = None,
    ) -> None:
        self.criterion = criterion
        self.delta = delta
        self.tol = tol
        self.min_step = min_step
        self.max_iter = max_iter
        self.scorers = scorers

    def fit(self, record: ExitRecord, cumulative: np.ndarray) -> SingleThresholdCalibrator:
        """Run the iteration on ``record`` for exits costing ``cumulative`` (``(E,)``)."""
        crit = get_criterion(self.criterion)
        check_delta(self.delta)
        if self.tol < 0 or self.min_step <= 0 or self.max_iter < 1:
            raise ConfigError("need tol ≥ 0, min_step > 0 and max_iter ≥ 1")
        p = prepare(record, self.criterion, self.scorers, cumulative)
        cumulative, scores, correct = p.cumulative, p.scores, p.correct
        e = record.num_exits
        target = float(correct[-1].double().mean()) - self.delta
        sign = 1.0 if crit.lower_is_confident else -1.0

        def evaluate(tau: float) -> tuple[float, float]:
            exits = ThresholdPolicy(self.criterion, (tau,) * (e - 1)).decide(scores)
            acc = float(correct.gather(0, exits[None])[0].double().mean())
            return acc, float(cumulative[exits.numpy()].mean())

        tau, step, last_sign = 0.5, 0.25, 0.0
        self.history_: list[tuple[float, float, float]] = []
        self.converged_ = False
        for _k in range(self.max_iter):
            acc, cost = evaluate(tau)
            self.history_.append((tau, acc, cost))
            err = acc - target
            if 0 <= err <= self.tol:
                self.converged_ = True
                break
            s = 1.0 if err > 0 else -1.0
            if last_sign and s != last_sign:
                step /= 2
            if step < self.min_step:
                self.converged_ = True
                break
            last_sign = s
            tau = min(1.0, max(0.0, tau + sign * step * s))
        self.iterations_ = len(self.history_)
        ok = [h for h in self.history_ if h[1] >= target - 1e-12]
        if ok:
            best = min(ok, key=lambda h: (h[2], -h[1]))
            self.threshold_ = best[0]
        else:
            self.threshold_ = crit.never
            best = (self.threshold_, *evaluate(self.threshold_))
        self.policy_ = ThresholdPolicy(
            self.criterion,
            (self.threshold_,) * (e - 1),
            tuple(self.scorers) if self.scorers else None,
        )
        self.accuracy_, self.expected_cost_ = best[1], best[2]
        if math.isnan(self.accuracy_):  # pragma: no cover - defensive
            raise ConfigError("calibration produced NaN accuracy")
        return self
