"""Every plot and text table of offramp's results.

matplotlib is imported lazily, here only, with the Agg backend; figures are written atomically
(:func:`offramp.files.save_figure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.files import save_figure
from offramp.policies import ThresholdPolicy

__all__ = [
    "format_table",
    "plot_pareto",
    "plot_placement",
    "plot_policies",
    "plot_tradeoff",
    "policy_groups",
    "tradeoff_curve",
]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8"]


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a ConfigError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("plots need matplotlib: pip install 'offramp[plot]'") from exc
    return plt


def _save(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        return save_figure(fig, path, **kwargs)
    finally:
        plt.close(fig)


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
    fig, ax = _pyplot().subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(curve[:, 0], curve[:, 1], "-", color="0.4", lw=1.5, label="shared-threshold sweep")
    markers = ["*", "s", "o", "^", "D", "v"]
    for k, (label, (x, y)) in enumerate(points.items()):
        ax.plot([x], [y], markers[k % len(markers)], ms=10 if k == 0 else 8, label=label)
    ax.set_xlabel("expected FLOPs / plain backbone FLOPs")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pareto(
    points: Sequence[tuple[float, float]],
    front: Sequence[tuple[float, float]],
    oracle: tuple[float, float],
    path: str | Path,
    title: str = "accuracy–cost",
) -> Path:
    """Every policy's ``(relative cost, accuracy)``, the Pareto front and the oracle, as PNG."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.scatter([c for c, _ in points], [a for _, a in points], s=8, alpha=0.35, label="policies")
    ax.plot(
        [c for c, _ in front], [a for _, a in front], "-o", ms=3, color="C3", label="Pareto front"
    )
    ax.scatter([oracle[0]], [oracle[1]], marker="*", s=120, color="k", label="oracle")
    ax.set_xlabel("expected cost / full network")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path, dpi=120)


def plot_policies(result: dict[str, Any], path: str | Path) -> Path:
    """``offramp calibrate``'s picture: each policy's test accuracy against its relative cost,
    the oracle and the final exit's accuracy. Policies that land on the same spot share one
    marker whose legend entry names them all, so every point stays readable.

    Example:
        >>> import tempfile
        >>> rows = [{"policy": p, "relative_cost": 0.3, "test_accuracy": 0.9} for p in "ab"]
        >>> r = {"policies": rows, "oracle": {"relative_cost": 0.2, "accuracy": 0.95},
        ...      "final_exit_accuracy": 0.91}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plot_policies(r, Path(d) / "c.png").stat().st_size > 0
        True
    """
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.2))
    for k, (cost, acc, names) in enumerate(policy_groups(result["policies"])):
        label = (
            ", ".join(names) if len(names) <= 3 else f"{len(names)} policies: " + ", ".join(names)
        )
        ax.scatter(cost, acc, s=40 + 12 * (len(names) - 1), marker=_MARKERS[k % len(_MARKERS)],
                   color=f"C{k % 10}", label=_wrap(label))  # fmt: skip
    o = result["oracle"]
    ax.scatter([o["relative_cost"]], [o["accuracy"]], marker="*", s=140, color="k", label="oracle")
    ax.axhline(
        result["final_exit_accuracy"], color="grey", lw=0.8, ls="--", label="final exit alone"
    )
    ax.set_xlabel("expected cost / full network (test)")
    ax.set_ylabel("accuracy (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path, dpi=120)


def policy_groups(
    rows: Sequence[dict[str, Any]],
    tolerance: float = 0.01,
    span: tuple[float, float] | None = None,
) -> list[tuple[float, float, list[str]]]:
    """Policies grouped by where they land on a plot: ``(relative cost, test accuracy, names)``
    per spot, at the first member's position, in order of first appearance. Two points share a
    spot when they are within ``tolerance`` of the plot's span on both axes (markers that
    would hide each other); ``span`` is the plot's ``(x span, y span)``, by default that of
    ``rows``.

    Example:
        >>> rows = [{"policy": "a", "relative_cost": 0.3, "test_accuracy": 0.9},
        ...         {"policy": "b", "relative_cost": 0.301, "test_accuracy": 0.9},
        ...         {"policy": "c", "relative_cost": 0.5, "test_accuracy": 0.95}]
        >>> policy_groups(rows)
        [(0.3, 0.9, ['a', 'b']), (0.5, 0.95, ['c'])]
    """
    xs = [float(r["relative_cost"]) for r in rows]
    ys = [float(r["test_accuracy"]) for r in rows]
    if span is None:
        span = ((max(xs) - min(xs)) if xs else 0.0, (max(ys) - min(ys)) if ys else 0.0)
    dx, dy = tolerance * span[0] + 1e-12, tolerance * span[1] + 1e-12
    groups: list[tuple[float, float, list[str]]] = []
    for row, x, y in zip(rows, xs, ys, strict=True):
        for gx, gy, names in groups:
            if abs(x - gx) <= dx and abs(y - gy) <= dy:
                names.append(row["policy"])
                break
        else:
            groups.append((x, y, [row["policy"]]))
    return groups


def _wrap(label: str, width: int = 34) -> str:
    """``label`` broken into lines of at most ``width`` characters, at commas."""
    lines, line = [], ""
    for word in label.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def plot_placement(
    rules: Sequence[tuple[str, float, float]],
    path: str | Path,
    *,
    subsets: Sequence[tuple[float, float]] = (),
    unit: str = "flops",
    target_drop: float = 0.0,
) -> Path:
    """``offramp place``'s picture: each rule's ``(name, relative cost, accuracy)`` on test
    (rules that recommend the same point share one marker), over every exhaustive subset's
    point on validation when given."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    if len(subsets):
        ax.scatter([c for c, _ in subsets], [100 * a for _, a in subsets], s=6, c="0.75",
                   label="every subset (validation)")  # fmt: skip
    rows = [{"policy": n, "relative_cost": c, "test_accuracy": a} for n, c, a in rules]
    xs = [c for c, _ in subsets] + [c for _, c, _ in rules]
    ys = [a for _, a in subsets] + [a for _, _, a in rules]
    span = (max(xs) - min(xs), max(ys) - min(ys))
    for k, (cost, acc, names) in enumerate(policy_groups(rows, span=span)):  # one spot, one marker
        ax.scatter(
            [cost],
            [100 * acc],
            s=40 + 12 * (len(names) - 1),
            color=f"C{k % 10}",
            marker=_MARKERS[k % len(_MARKERS)],
            label=f"{', '.join(names)} (test)",
        )
    ax.set_xlabel(f"expected cost / plain backbone ({unit})")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"exit placement at ≤ {target_drop} pp drop")
    ax.legend(fontsize=7)
    return _save(fig, path, dpi=120)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [
        [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows
    ]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
