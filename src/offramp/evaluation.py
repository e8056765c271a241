"""Compute once, decide many: the cached per-exit record of a dataset and what derives from it.

One pass of :meth:`ExitRecord.collect` keeps every exit's logits ``(E, N, C)``; accuracy per exit,
the oracle exit, exit histograms, expected cost (eq. 12) and every policy's decisions are then
array work on that record, with no further forward passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from offramp._progress import progress
from offramp.activations import features
from offramp.batches import iterate_batches
from offramp.costs import expected_cost
from offramp.errors import DataError, NonFiniteError, ShapeError
from offramp.files import read_torch, save_torch
from offramp.network import MultiExitNetwork, check_input, input_dtype
from offramp.policies import ExitPolicy, decide_from_logits, get_criterion

__all__ = [
    "Decisions",
    "ExitRecord",
    "exit_histogram",
    "record_splits",
    "simulate",
]


def _check_labels(labels: object, num_classes: int, offset: int = 0) -> None:
    """Raise ``DataError`` unless ``labels`` are integer class indices in ``0 … num_classes − 1``
    (``offset``: position of the first label in the dataset, for the message)."""
    if not isinstance(labels, Tensor):
        kind = type(labels).__name__
        raise DataError(f"labels must be a torch.Tensor of class indices, got a {kind}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        whole = labels.is_floating_point() and bool((labels == labels.round()).all())
        if labels.dtype == torch.bool or whole:
            fix = "they are whole numbers: convert them with y.long()"
        else:
            bad = labels[labels != labels.round()][0].item()
            fix = f"some are not whole numbers (e.g. {bad:g}): pass class ids, not scores"
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}; {fix}")
    out = (labels < 0) | (labels >= num_classes)
    if bool(out.any()):
        first = int(out.nonzero()[0, 0])
        raise DataError(
            f"label {int(labels[first])} at sample {offset + first} is not in 0 … "
            f"{num_classes - 1} ({int(out.sum())} of {labels.numel()} in its batch are not): the "
            f"logits have {num_classes} classes; map the labels to 0 … {num_classes - 1}, or "
            "give every exit one output per class"
        )


@dataclass(frozen=True)
class Decisions:
    """Per-sample outcome of a policy: where each sample left and what it predicted.

    Attributes:
        exits: exit index per sample, ``(N,)`` int64.
        predictions: predicted class per sample, ``(N,)`` int64.
    """

    exits: np.ndarray
    predictions: np.ndarray


@dataclass(frozen=True)
class ExitRecord:
    """Logits of every exit on a dataset, with the labels.

    Attributes:
        logits: ``(E, N, C)`` float32 on the CPU, finite.
        labels: ``(N,)`` int64, class indices in ``0 … C − 1``.
        feature_scores: optional ``(E − 1, N)`` scores of confidence models on the early exits'
            features (the gates of recursive gating), for policies that use them.

    Example:
        >>> import torch
        >>> rec = ExitRecord(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]), torch.tensor([1]))
        >>> rec.exit_accuracy().tolist(), rec.oracle_exits().tolist()
        ([0.0, 1.0], [1])
    """

    logits: Tensor
    labels: Tensor
    feature_scores: Tensor | None = None

    def __post_init__(self) -> None:
        if self.logits.dim() != 3:
            raise ShapeError(f"ExitRecord.logits must be (E, N, C), got {tuple(self.logits.shape)}")
        if self.labels.shape != (self.logits.shape[1],):
            raise ShapeError(
                f"ExitRecord.labels must be (N,) = ({self.logits.shape[1]},), "
                f"got {tuple(self.labels.shape)}"
            )
        finite = torch.isfinite(self.logits)
        if not bool(finite.all()):
            e, n, _ = (~finite).nonzero()[0].tolist()
            raise NonFiniteError(
                f"ExitRecord.logits {tuple(self.logits.shape)} hold {int((~finite).sum())} NaN "
                f"or infinite values (the first at exit {e}, sample {n}); no accuracy or "
                "calibration is meaningful on them: find where the network overflows (or the "
                "input is not finite) and collect the record again"
            )
        _check_labels(self.labels, self.logits.shape[2])
        want = (self.logits.shape[0] - 1, self.logits.shape[1])
        if self.feature_scores is not None and tuple(self.feature_scores.shape) != want:
            raise ShapeError(
                f"ExitRecord.feature_scores must be (E − 1, N) = {want}, "
                f"got {tuple(self.feature_scores.shape)}"
            )

    @classmethod
    @torch.no_grad()
    def collect(
        cls,
        net: MultiExitNetwork,
        data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
        *,
        batch_size: int = 256,
        show_progress: bool = False,
        feature_scorers: Sequence[nn.Module] | None = None,
    ) -> ExitRecord:
        """Run every exit of ``net`` once over ``data`` (eval mode, no gradients).

        Args:
            net: the network.
            data: ``(X, y)`` tensors or an iterable of ``(x, y)`` batches (e.g. a DataLoader).
            batch_size: batch size when ``data`` is a pair of tensors.
            show_progress: show a progress bar.
            feature_scorers: one module per early exit scoring its features ``h_i`` (the gates
                of recursive gating, :class:`~offramp.policies.GateScorer`); their scores are
                kept as ``feature_scores``.

        Raises:
            ShapeError: a batch of the wrong shape or dtype (:func:`~offramp.network.check_input`).
            NonFiniteError: a batch, or the logits, hold NaN or infinite values.
            DataError: labels that are not integer class indices ``0 … C − 1``; no data.
            ConfigError: ``batch_size`` is not a whole number ≥ 1.
        """
        if feature_scorers is not None and len(feature_scorers) != net.num_exits - 1:
            raise ShapeError(
                f"got {len(feature_scorers)} feature scorers for {net.num_exits - 1} early exits"
            )
        batches, total = iterate_batches(data, batch_size)
        dtype = input_dtype(net)
        was_training = net.training
        net.eval()
        logits: list[Tensor] = []
        labels: list[Tensor] = []
        scores: list[Tensor] = []
        try:
            for x, y in progress(batches, total=total, desc="record", enabled=show_progress):
                check_input(x, net.input_shape, dtype=dtype)
                if feature_scorers is None:
                    outs = net(x)
                else:
                    feats, outs = net(x, return_features=True)
                    rows = [
                        sc(features(h)) for sc, h in zip(feature_scorers, feats[:-1], strict=True)
                    ]
                    scores.append(torch.stack(rows).float().cpu())  # (E-1, B)
                stacked = outs.stack().float().cpu()  # (E, B, C)
                _check_labels(y, stacked.shape[2], offset=sum(len(t) for t in labels))
                logits.append(stacked)
                labels.append(y.long().cpu())
        finally:  # a refused batch leaves the network as it was
            net.train(was_training)
        if not logits:
            raise DataError("cannot collect an ExitRecord from an empty dataset")
        fs = torch.cat(scores, dim=1) if scores else None
        return cls(torch.cat(logits, dim=1), torch.cat(labels), fs)

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[1]

    def subset(self, index: Tensor | np.ndarray | slice) -> ExitRecord:
        """The record restricted to some samples."""
        idx = torch.as_tensor(index) if not isinstance(index, slice) else index
        fs = self.feature_scores[:, idx] if self.feature_scores is not None else None
        return ExitRecord(self.logits[:, idx], self.labels[idx], fs)

    def predictions(self) -> Tensor:
        """Predicted class of every sample at every exit, ``(E, N)``."""
        return self.logits.argmax(dim=-1)

    def correct(self) -> Tensor:
        """Whether each exit is right on each sample, ``(E, N)`` bool."""
        return self.predictions() == self.labels[None, :]

    def exit_accuracy(self) -> np.ndarray:
        """Accuracy of every exit on all samples, ``(E,)``."""
        return self.correct().double().mean(dim=1).numpy()

    def scores(self, criterion: str) -> Tensor:
        """Confidence scores of every exit, ``(E, N)``, under a criterion name."""
        return get_criterion(criterion).score(self.logits)

    def oracle_exits(self) -> np.ndarray:
        """Earliest exit that is correct for each sample; exit 0 when none is (wrong anyway,
        so the oracle spends the least there). ``(N,)`` int64."""
        corr = self.correct()
        any_ok = corr.any(dim=0)
        first = corr.to(torch.int8).argmax(dim=0)
        return torch.where(any_ok, first, torch.zeros_like(first)).numpy().astype(np.int64)

    def decisions(self, exits: np.ndarray | Tensor) -> Decisions:
        """Predictions of the chosen exit of each sample."""
        e = torch.as_tensor(np.asarray(exits), dtype=torch.long)
        preds = self.predictions().gather(0, e[None, :])[0]
        return Decisions(exits=e.numpy(), predictions=preds.numpy())

    def accuracy(self, exits: np.ndarray | Tensor) -> float:
        """Accuracy when each sample answers at the given exit."""
        d = self.decisions(exits)
        return float((d.predictions == self.labels.numpy()).mean())

    def summary(self, exits: np.ndarray | Tensor, cumulative: np.ndarray) -> dict[str, object]:
        """Accuracy, expected cost (eq. 12), exit shares and per-exit accuracy of leavers."""
        e = np.asarray(exits, dtype=np.int64)
        d = self.decisions(e)
        ok = d.predictions == self.labels.numpy()
        per_exit = [
            float(ok[e == i].mean()) if (e == i).any() else None for i in range(self.num_exits)
        ]
        return {
            "accuracy": float(ok.mean()),
            "expected_cost": expected_cost(e, cumulative),
            "exit_fractions": exit_histogram(e, self.num_exits).tolist(),
            "accuracy_of_leavers": per_exit,
        }

    def save(self, path: str | Path) -> None:
        """Write the record to ``path`` atomically (:func:`offramp.files.save_torch`)."""
        d = {"logits": self.logits, "labels": self.labels, "feature_scores": self.feature_scores}
        save_torch(path, d)

    @classmethod
    def load(cls, path: str | Path) -> ExitRecord:
        """A record written by :meth:`save` (read without pickle)."""
        d = read_torch(path)
        if not isinstance(d, dict) or "logits" not in d or "labels" not in d:
            raise DataError(f"{path} is not an ExitRecord written by ExitRecord.save")
        return cls(d["logits"], d["labels"], d.get("feature_scores"))


def record_splits(
    net: MultiExitNetwork,
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    feature_scorers: Sequence[nn.Module] | None = None,
) -> tuple[ExitRecord, ExitRecord]:
    """The exit records of a validation split (to fit policies on) and a test split (to report
    them on): what every job that calibrates and evaluates starts from.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> x, y = torch.randn(20, 4), torch.arange(20) % 3
        >>> val, test = record_splits(mlp(4, 3, hidden=(8, 8)), (x[:10], y[:10]), (x[10:], y[10:]))
        >>> val.num_samples, test.num_exits
        (10, 2)
    """
    return (
        ExitRecord.collect(net, val, feature_scorers=feature_scorers),
        ExitRecord.collect(net, test, feature_scorers=feature_scorers),
    )


def simulate(record: ExitRecord, policy: ExitPolicy) -> Decisions:
    """Where each sample of ``record`` would leave under ``policy``, and what it would predict.

    This is the reference the runtime must reproduce exactly: both run the policy's exit tests
    (:func:`offramp.policies.decide`).
    """
    return record.decisions(decide_from_logits(policy, record.logits, record.feature_scores))


def exit_histogram(exits: np.ndarray | Tensor, num_exits: int) -> np.ndarray:
    """Share of samples leaving at each exit, ``(E,)``, summing to 1."""
    e = np.asarray(exits, dtype=np.int64)
    if e.size == 0:
        return np.zeros(num_exits)
    return np.bincount(e, minlength=num_exits) / e.size
