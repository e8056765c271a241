"""Communication-aware planning: where to split the network and which thresholds to use,
given what each tier computes in, what the link costs, and how samples exit (survey §4 with
link costs; the question Neurosurgeon, Edgent and SPINN each answer part of).

A sample that leaves at exit ``e`` with the network split before stage ``k`` (stages ``0 …
k−1`` on the device) takes

    T(e, k) = l + Σ_{i ≤ min(e, k−1)} d_i + [e ≥ k] · (o + link(up_k, down) + Σ_{k ≤ i ≤ e} s_i)

seconds: ``d_i`` and ``s_i`` are stage ``i``'s seconds per sample on the device and on the
server, ``l`` the device runtime's own cost per request, ``o`` a request's fixed cost beyond
the link (serialisation, gRPC, the server's batching wait — measured once through the same
path at a known delay, which it then subtracts), and ``link(up, down)`` the link's round trip for
``up_k`` request bytes (the codec's bytes of ``h_k`` plus framing) and the reply's bytes. For a
split, ``T(e, k)`` over ``e`` is a cost vector ``C_i`` like any other, so the thresholds that
minimise the expected latency under an accuracy target are the calibrators' own problem
(:class:`~offramp.calibration.ThresholdCalibrator`); :func:`plan` solves it for every split,
and also evaluates each plan's p95 from the samples of the record, then picks the best by the
chosen objective. ``k = E`` is "all on the device"; ``k = 0`` sends the input.

A *hedged* split (:class:`~offramp.tiers.TieredRuntime`'s ``hedge``) sends the input to a
server running the whole network while the device computes; a sample the device's exits do not
answer is answered when both the device has given up and the server has answered:

    T_h(e, k) = h + T(e, k)                                                     for e < k
    T_h(e, k) = h + max(l + Σ_{i < k} d_i, o + link(up_0, down) + Σ_{i ≤ e} s_i)   for e ≥ k

with ``h`` the device's own cost of sending (or cancelling) the hedge: it takes the device's
compute off the tail wherever the server's answer is not later, for ``h`` on every sample. The
model takes the server as idle when a hedge arrives; a server busy finishing hedges nobody
waits for any more (a one-graph segment runs to its end; a staged one stops at its next stage)
answers later than ``T_h`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offramp.calibration import ThresholdCalibrator
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ExitPolicy, ThresholdPolicy, decide_from_logits
from offramp.tiers.link import Link

__all__ = ["OBJECTIVES", "Plan", "TierCosts", "plan", "sample_latencies", "split_costs"]

#: What :func:`plan` minimises: mean, p95, or their sum (both kept low).
OBJECTIVES = ("mean", "p95", "mean+p95")


@dataclass(frozen=True)
class TierCosts:
    """Measured costs of running a network across two tiers.

    Attributes:
        device_s: seconds per sample of each stage on the device (``E`` values).
        server_s: the same on the server.
        call_s: a request's fixed cost beyond the link, seconds.
        up_bytes: bytes of a one-sample request at each split ``k = 0 … E − 1`` (``k = 0``:
            the input), framing included.
        down_bytes: bytes of a one-sample reply.
        local_s: the device runtime's fixed cost per request (bookkeeping around the stages),
            paid by every sample.
        hedge_s: the device's own cost of a hedge per request (sending the input, and
            cancelling the call when its exits answer), paid by every sample of a hedged plan.
    """

    device_s: Sequence[float]
    server_s: Sequence[float]
    call_s: float
    up_bytes: Sequence[float]
    down_bytes: float = 100.0
    local_s: float = 0.0
    hedge_s: float = 0.0

    def __post_init__(self) -> None:
        e = len(self.device_s)
        if e < 1 or len(self.server_s) != e or len(self.up_bytes) != e:
            raise ConfigError(
                f"TierCosts needs E device and server stage costs and E request sizes (splits "
                f"0 … E−1); got {len(self.device_s)}, {len(self.server_s)}, {len(self.up_bytes)}"
            )


def split_costs(costs: TierCosts, link: Link, split: int, *, hedge: bool = False) -> np.ndarray:
    """``T(e, split)`` (or, hedged, ``T_h(e, split)``) for every exit ``e`` (the module
    docstring's formulas), seconds.

    Example:
        >>> c = TierCosts([1.0, 2.0], [0.5, 1.0], 0.1, [40.0, 20.0], 10.0)
        >>> split_costs(c, Link(8.0, 0.0), 1).tolist()  # bytes at 8 bit/s: 1 s per byte
        [1.0, 32.1]
        >>> split_costs(c, Link(8e3, 0.0), 1, hedge=True).tolist()  # 1 ms per byte
        [1.0, 1.65]
    """
    d, s = np.asarray(costs.device_s, float), np.asarray(costs.server_s, float)
    e = len(d)
    if not 0 <= split <= e:
        raise ConfigError(f"split {split} is outside 0 … {e}")
    if hedge and not 0 < split < e:
        raise ConfigError(f"a hedged split is 1 … {e - 1} (the device runs exits), got {split}")
    out = np.cumsum(d) + costs.local_s
    if hedge:
        remote = costs.call_s + link.round_trip_s(costs.up_bytes[0], costs.down_bytes)
        given_up = d[:split].sum() + costs.local_s
        out[split:] = np.maximum(given_up, remote + np.cumsum(s)[split:])
        out += costs.hedge_s
    elif split < e:
        remote = costs.call_s + link.round_trip_s(costs.up_bytes[split], costs.down_bytes)
        base = d[:split].sum() + costs.local_s + remote
        out[split:] = base + np.cumsum(s[split:])
    return out


def sample_latencies(
    exits: np.ndarray, costs: TierCosts, link: Link, split: int, *, hedge: bool = False
) -> np.ndarray:
    """Each sample's predicted seconds, from its exit."""
    return split_costs(costs, link, split, hedge=hedge)[np.asarray(exits)]


@dataclass
class Plan:
    """A split and a policy, with the latency they are predicted to take.

    Attributes:
        split: the stage the server starts at (``E``: all on the device; ``0``: all remote).
        policy: the exit policy.
        mean_s, p95_s: predicted mean and 95th-percentile seconds per sample (on the record).
        accuracy: accuracy on the record.
        offload: share of samples answered by the server.
        hedge: the input also goes to a server running the whole network (module docstring).
        table: every split considered, with the same figures.
    """

    split: int
    policy: ExitPolicy
    mean_s: float
    p95_s: float
    accuracy: float
    offload: float
    hedge: bool = False
    table: list[dict[str, Any]] = field(default_factory=list)


def plan(
    record: ExitRecord,
    costs: TierCosts,
    link: Link,
    *,
    delta: float = 0.0,
    criterion: str = "entropy",
    objective: str = "mean",
    splits: Sequence[int] | None = None,
    exits: bool = True,
    confidence: float | None = None,
    hedge: bool = False,
) -> Plan:
    """The split and thresholds with the lowest predicted latency at accuracy ≥ the final
    exit's − ``delta`` on ``record`` (see the module docstring).

    Args:
        record: an exit record of held-out data (validation).
        costs: the tiers' measured costs.
        link: the link between them.
        delta: accuracy loss allowed against the final exit (a fraction).
        criterion: the thresholds' criterion.
        objective: ``"mean"``, ``"p95"`` or ``"mean+p95"`` (:data:`OBJECTIVES`).
        splits: the splits to consider (default every one, ``0 … E``).
        exits: ``False`` plans without early exits (the best split of the plain network).
        confidence: the calibrator's one-sided confidence level, if any.
        hedge: also consider hedged splits (``1 … E − 1``; the module docstring).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[4.0, 0.0], [0.1, 0.0]], [[4.0, 0.0], [0.0, 4.0]]])
        >>> rec = ExitRecord(logits, torch.tensor([0, 1]))
        >>> c = TierCosts([0.01, 0.01], [0.001, 0.001], 0.001, [800.0, 400.0], 100.0)
        >>> p = plan(rec, c, Link(1e6, 0.05))
        >>> p.split, p.offload  # the link's 100 ms round trip: cheaper to stay on the device
        (2, 0.0)
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective is one of {OBJECTIVES}, got {objective!r}")
    e = record.num_exits
    ks = list(range(e + 1)) if splits is None else [int(k) for k in splits]
    candidates = [(k, False) for k in ks]
    if hedge and exits:
        candidates += [(k, True) for k in ks if 0 < k < e]
    final_correct = record.correct()[-1].numpy()
    rows: list[dict[str, Any]] = []
    best: Plan | None = None
    for k, hedged in candidates:
        cum = split_costs(costs, link, k, hedge=hedged)
        if exits:
            policy: ExitPolicy = (
                ThresholdCalibrator(criterion, delta=delta, confidence=confidence)
                .fit(record, cum)
                .policy_
            )
        else:
            policy = ThresholdPolicy.never(e, criterion)
        ex = decide_from_logits(policy, record.logits).numpy()
        lat = cum[ex]
        acc = float(record.correct().numpy()[ex, np.arange(len(ex))].mean())
        row = {
            "split": k,
            "hedge": hedged,
            "mean_s": float(lat.mean()),
            "p95_s": float(np.quantile(lat, 0.95)),
            "accuracy": acc,
            "final_accuracy": float(final_correct.mean()),
            "offload": float((ex >= k).mean()) if k < e else 0.0,
            "thresholds": list(getattr(policy, "thresholds", ())),
        }
        rows.append(row)
        candidate = Plan(k, policy, row["mean_s"], row["p95_s"], acc, row["offload"], hedged)
        if best is None or _key(candidate, objective) < _key(best, objective):
            best = candidate
    assert best is not None
    best.table = rows
    return best


def _key(p: Plan, objective: str) -> float:
    return {"mean": p.mean_s, "p95": p.p95_s, "mean+p95": p.mean_s + p.p95_s}[objective]


def stage_seconds(
    net: Any, policy: ExitPolicy, x: Any, *, samples: int = 50, repeats: int = 5
) -> list[float]:
    """Seconds per sample of each stage at batch 1 on this machine, each stage on its real
    input (the median of ``repeats`` passes over ``samples`` inputs)."""
    import time

    import torch

    from offramp.runtime.core import stage_modules

    steps, final = stage_modules(net.eval(), policy.exit_tests())
    inputs: list[list[Any]] = [[] for _ in range(len(steps) + 1)]
    with torch.no_grad():
        for j in range(min(samples, x.shape[0])):
            h, state = x[j : j + 1], policy.initial_state(1)
            for i, st in enumerate(steps):
                inputs[i].append((h, state))
                h, _, _, state = st(h, state)
            inputs[-1].append((h,))
        out = []
        for i, mod in enumerate([*steps, final]):
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for args in inputs[i]:
                    mod(*args)
                times.append((time.perf_counter() - t0) / len(inputs[i]))
            out.append(float(np.median(times[1:])))
    return out
