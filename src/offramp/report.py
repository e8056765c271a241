"""Plots and text tables of early-exit results (matplotlib is imported lazily, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy

__all__ = ["format_table", "plot_tradeoff", "tradeoff_curve"]


def tradeoff_curve(
    record: ExitRecord, cumulative: np.ndarray, criterion: str = "entropy", points: int = 41
) -> np.ndarray:
    """Accuracy vs relative cost when one shared threshold is swept over all early exits.

    Returns:
        ``(points, 2)``: relative cost (to the final exit's ``C_L``) and accuracy per threshold.
    """
    scores = record.scores(criterion)[:-1].flatten().numpy()
    qs = np.quantile(scores, np.linspace(0, 1, points))
    out = []
    for t in qs:
        pol = ThresholdPolicy(criterion, (float(t),) * (record.num_exits - 1))
        exits = pol.decide(record.scores(criterion)).numpy()
        cost = np.bincount(exits, minlength=record.num_exits) @ cumulative / len(exits)
        out.append((cost / cumulative[-1], record.accuracy(exits)))
    return np.asarray(sorted(out))


def plot_tradeoff(
    path: str | Path,
    curve: np.ndarray,
    *,
    points: dict[str, tuple[float, float]],
    title: str = "accuracy vs relative cost",
) -> Path:
    """Write a PNG of the accuracy–cost curve with labelled points (oracle, final exit, …).

    Args:
        path: output file.
        curve: ``(K, 2)`` relative cost and accuracy, e.g. from :func:`tradeoff_curve`.
        points: label -> (relative cost, accuracy) to mark.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(curve[:, 0], curve[:, 1], "-", color="0.4", lw=1.5, label="shared-threshold sweep")
    markers = ["*", "s", "o", "^", "D", "v"]
    for k, (label, (x, y)) in enumerate(points.items()):
        ax.plot([x], [y], markers[k % len(markers)], ms=10 if k == 0 else 8, label=label)
    ax.set_xlabel("expected FLOPs / plain backbone FLOPs")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [
        [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows
    ]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
