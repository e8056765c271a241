"""Confidence that can be trusted: per-exit temperature scaling, learned confidence, and ECE.

- **Temperature scaling** (Guo et al. 2017): one scalar ``T_i`` per exit, fitted on held-out
  data by minimising the negative log-likelihood of ``softmax(y_i / T_i)``. It never changes an
  exit's prediction, only how confident it claims to be — which is what entropy and max-prob
  thresholds read. :func:`fit_temperatures` returns them; :func:`temperature_scorers` turns them
  into policy scorers.
- **Learned confidence** (IDK cascades, Wang et al. 2018): a small logistic model per early exit,
  on features of its logits (max-prob, margin, 1 − normalised entropy, the top probabilities),
  trained on held-out data to predict *whether that exit is right*. Its output is a probability
  of being right; thresholds on it are calibrated like any criterion (``criterion="learned"``).
- **Expected calibration error**: ``Σ_b (n_b / N) · |acc_b − conf_b|`` over equal-width
  confidence bins of the max-prob.

All fitting happens on an :class:`~offramp.evaluation.ExitRecord` (compute once, decide many).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import TemperatureScorer, max_softmax, normalized_entropy

__all__ = [
    "LogisticConfidence",
    "confidence_features",
    "expected_calibration_error",
    "fit_learned_confidence",
    "fit_temperature",
    "fit_temperatures",
    "temperature_scorers",
]


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The ``T > 0`` minimising ``NLL(softmax(logits / T), labels)``.

    NLL is convex in ``1/T``; L-BFGS on ``log T`` finds the minimum in a few steps.

    Example:
        >>> import torch
        >>> # two classes, logit gap 2; right 3 times in 4: the optimum is sigmoid(2/T) = 3/4
        >>> z = torch.tensor([[2.0, 0.0]] * 4)
        >>> y = torch.tensor([0, 0, 0, 1])
        >>> round(fit_temperature(z, y), 3), round(2 / math.log(3), 3)
        (1.82, 1.82)
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"need logits (N, C) and labels (N,), got {tuple(logits.shape)}")
    z = logits.detach().double()
    y = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature fitting diverged (T = {t}); is the record degenerate?")
    return t


def fit_temperatures(record: ExitRecord) -> list[float]:
    """``T_i`` of every exit, fitted on ``record`` (held-out data)."""
    return [fit_temperature(record.logits[i], record.labels) for i in range(record.num_exits)]


def temperature_scorers(criterion: str, temperatures: list[float]) -> tuple[nn.Module, ...]:
    """Scorers for the early exits: ``criterion`` on ``logits / T_i``."""
    return tuple(TemperatureScorer(criterion, t) for t in temperatures[:-1])


def confidence_features(logits: Tensor, top: int = 3) -> Tensor:
    """Features of an exit's logits for learned confidence, ``(B, C) -> (B, 3 + top)``:
    max-prob, margin, 1 − normalised entropy, and the ``top`` largest probabilities."""
    p = torch.softmax(logits, dim=-1)  # once: max-prob, margin and the top-k all read it
    c = p.shape[-1]
    ranked = p.topk(min(max(top, 2), c), dim=-1).values  # (B, ≥ min(2, C)) largest first
    gap = ranked[:, 0] - ranked[:, 1] if c >= 2 else torch.ones_like(ranked[:, 0])
    tops = ranked[:, : min(top, c)]
    if c < top:
        tops = F.pad(tops, (0, top - c))
    feats = [ranked[:, 0], gap, 1 - normalized_entropy(logits)]
    return torch.cat([torch.stack(feats, dim=-1), tops], dim=-1)


class LogisticConfidence(nn.Module):
    """``P(exit is right | logits) = σ(w · φ(logits) + b)`` — a traceable scorer.

    Args:
        weight: ``(F,)`` coefficients of :func:`confidence_features`.
        bias: intercept.
        top: the ``top`` of those features.
    """

    def __init__(self, weight: Tensor, bias: float, top: int = 3) -> None:
        super().__init__()
        self.top = int(top)
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", torch.tensor(float(bias)))

    def forward(self, logits: Tensor) -> Tensor:
        phi = confidence_features(logits, self.top).to(self.weight.dtype)
        return torch.sigmoid(phi @ self.weight + self.bias)


def fit_learned_confidence(
    record: ExitRecord, *, top: int = 3, l2: float = 1e-3, max_iter: int = 200
) -> tuple[LogisticConfidence, ...]:
    """One :class:`LogisticConfidence` per early exit, fitted on ``record`` (held-out data) to
    predict whether that exit's prediction is right (L2-regularised logistic regression).

    Example:
        >>> import torch
        >>> from offramp.evaluation import ExitRecord
        >>> g = torch.Generator().manual_seed(0)
        >>> rec = ExitRecord(torch.randn(2, 64, 3, generator=g) * 3, torch.arange(64) % 3)
        >>> (scorer,) = fit_learned_confidence(rec)
        >>> tuple(scorer(rec.logits[0]).shape)
        (64,)
    """
    correct = record.correct()
    scorers = []
    for i in range(record.num_exits - 1):
        phi = confidence_features(record.logits[i], top).double()  # (N, F)
        w, b = _fit_logistic(phi, correct[i].double(), l2, max_iter)
        scorers.append(LogisticConfidence(w, b, top))
    return tuple(scorers)


def _fit_logistic(phi: Tensor, target: Tensor, l2: float, max_iter: int) -> tuple[Tensor, float]:
    """L2-regularised logistic regression by L-BFGS: ``(weights (F,), bias)``."""
    w = torch.zeros(phi.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(phi @ w + b, target) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE of max-prob confidence: ``Σ_b (n_b / N) · |accuracy_b − mean confidence_b|``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[10.0, 0.0], [10.0, 0.0]])  # ~100 % sure, right once in two
        >>> round(expected_calibration_error(z, torch.tensor([0, 1])), 3)
        0.5
    """
    if bins < 1:
        raise ConfigError(f"bins must be ≥ 1, got {bins}")
    conf = max_softmax(logits.double())
    right = (logits.argmax(dim=-1) == labels).double()
    which = torch.clamp((conf * bins).long(), max=bins - 1)  # bin of each sample
    n = conf.numel()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / n * (right[m].mean() - conf[m].mean()).abs()
    return float(total)
