"""The conformance check users run on their own network: what the test suite guarantees for the
shipped models, verified on yours.

:func:`check_network` runs each guarantee on an example batch, in order, and stops at the first
that breaks with a :class:`~offramp.errors.ConformanceError` naming it and what differed; when
all hold it returns a :class:`NetworkCheck`, a readable report. It never changes the network:
the gradient check runs on a copy, and modes and gradients are restored.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from offramp.costs import count_flops, profile
from offramp.errors import ConformanceError, OfframpError
from offramp.evaluation import ExitRecord, simulate
from offramp.flop_formulas import FORMULAS
from offramp.models.gcn import GraphNetwork
from offramp.network import MultiExitNetwork, evaluating
from offramp.policies import ThresholdPolicy, max_softmax
from offramp.runtime import EarlyExitRuntime
from offramp.runtime.graph import GraphRuntime, graph_flops

__all__ = ["ZERO_COST_MODULES", "CheckRow", "NetworkCheck", "check_network"]

#: Modules that do no counted arithmetic (lookups, reshapes, element-wise work): a block made
#: of these alone may cost zero FLOPs.
ZERO_COST_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.LayerNorm,
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
)


@dataclass(frozen=True)
class CheckRow:
    """One guarantee: its name, whether it held (``None``: not applicable), and the detail."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class NetworkCheck:
    """What :func:`check_network` verified, one row per guarantee (``str()`` is a table)."""

    rows: list[CheckRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every applicable guarantee held."""
        return all(r.passed is not False for r in self.rows)

    def record(self, name: str, ok: bool | None, detail: str) -> None:
        """Add a row; a broken guarantee (``ok`` False) raises with the report so far.

        Raises:
            ConformanceError: ``ok`` is False.
        """
        self.rows.append(CheckRow(name, ok, detail))
        if ok is False:
            raise ConformanceError(
                f"check_network: '{name}' does not hold: {detail}\n{self}", report=self
            )

    def __str__(self) -> str:
        width = max((len(r.name) for r in self.rows), default=0)
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}
        return "\n".join(f"{mark[r.passed]}  {r.name:<{width}}  {r.detail}" for r in self.rows)


def _close(a: Tensor, b: Tensor, atol: float) -> tuple[bool, float]:
    diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return a.shape == b.shape and diff <= atol, diff


def _outputs(net: MultiExitNetwork, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return list(net(x))


def check_network(
    net: MultiExitNetwork | GraphNetwork,
    example_batch: Tensor | tuple[Tensor, Tensor],
    *,
    modes: Sequence[str] = ("eager", "script"),
    atol: float = 1e-5,
) -> NetworkCheck:
    """Verify on ``example_batch`` what offramp guarantees for its own models.

    In order: every exit gives finite ``(B, C)`` logits; ``truncate(i)`` and ``exit_path(i)``
    reproduce exit ``i``; ``deepcopy`` and a ``state_dict`` round trip (through
    ``torch.save`` / ``torch.load(weights_only=True)``) reproduce the outputs; every block costs
    FLOPs (unless made of :data:`ZERO_COST_MODULES` only) and the blocks and final head add up
    to a count of the plain backbone in one piece; every head receives a gradient; and, in each
    of ``modes``, the runtime with thresholds that never fire reproduces the plain backbone and
    the runtime with thresholds that let samples leave at every exit decides exactly as the
    simulation (batched, batch 1 and bulk inference). A mode the network cannot run in (e.g.
    ``script`` with a scikit-learn head) is reported as not applicable, with the reason.

    A graph network (:class:`~offramp.models.gcn.GraphNetwork`) takes ``(x, adj)`` as its
    example and is checked alike, per node: finite logits, copies, FLOPs counted against the
    whole-graph formula, gradients, and the graph runtime against the simulation (thresholds
    that never fire give the whole graph's logits; thresholds at the median decide as the
    simulation, with the counted FLOPs of the call equal to those it reports).

    Args:
        net: the network to check.
        example_batch: a batch of inputs, ``(B, *input_shape)``; at least 4 samples, varied
            enough that exits disagree on their confidence (for a graph network, ``(x, adj)``).
        modes: runtime execution modes to check (``"compile"`` too, if you deploy with it; it
            takes a while).
        atol: largest absolute difference accepted between logits computed two ways.

    Returns:
        The report; ``str(report)`` is one line per guarantee.

    Raises:
        ConformanceError: the first guarantee that does not hold, with what differed.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> report = check_network(mlp(4, 3, hidden=(8, 8), seed=0), torch.randn(16, 4))
        >>> report.passed
        True
    """
    if isinstance(net, GraphNetwork):
        if not isinstance(example_batch, tuple) or len(example_batch) != 2:
            raise ConformanceError(
                "a graph network is checked on (x, adj): node features and adjacency"
            )
        return _check_graph(net, *example_batch, atol)
    x = example_batch
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 4:
        raise ConformanceError("example_batch must be a batch of at least 4 samples (B, ...)")
    report = NetworkCheck()
    record = report.record
    with evaluating(net):
        _check_outputs(net, x, record)
        outs = _outputs(net, x)
        _check_truncate(net, x, outs, atol, record)
        _check_copies(net, x, outs, atol, record)
        _check_flops(net, x, record)
        _check_gradients(net, x, record)
        for mode in modes:
            _check_runtime(net, x, outs, mode, atol, record)
    return report


Record = Callable[[str, "bool | None", str], None]


def _check_outputs(net: MultiExitNetwork, x: Tensor, record: Record) -> None:
    outs = _outputs(net, x)
    shapes = {tuple(o.shape) for o in outs}
    ok = len(shapes) == 1 and len(next(iter(shapes))) == 2 and shapes.pop()[0] == x.shape[0]
    finite = all(bool(torch.isfinite(o).all()) for o in outs)
    record(
        "exits give finite (B, C) logits",
        ok and finite,
        f"{len(outs)} exits, shapes {[tuple(o.shape) for o in outs]}"
        + ("" if finite else ", with NaN or infinite values"),
    )


def _check_truncate(
    net: MultiExitNetwork, x: Tensor, outs: list[Tensor], atol: float, record: Record
) -> None:
    worst = 0.0
    for i in range(net.num_exits):
        for how, model in (("truncate", net.truncate(i)), ("exit_path", net.exit_path(i))):
            with torch.no_grad():
                got = model(x)
            got = got.final if how == "truncate" else got
            ok, diff = _close(got, outs[i], atol)
            worst = max(worst, diff)
            if not ok:
                record(
                    "truncate(i) / exit_path(i) reproduce exit i",
                    False,
                    f"{how}({i}) differs from exit {i} by {diff:.3g}",
                )
    record(
        "truncate(i) / exit_path(i) reproduce exit i",
        True,
        f"all {net.num_exits} exits, largest difference {worst:.3g}",
    )


def _check_copies(
    net: MultiExitNetwork, x: Tensor, outs: list[Tensor], atol: float, record: Record
) -> None:
    twin = copy.deepcopy(net)
    same = [_close(a, b, atol) for a, b in zip(_outputs(twin, x), outs, strict=True)]
    if not all(ok for ok, _ in same):
        record(
            "deepcopy and state_dict round-trip",
            False,
            f"the deepcopy's exits differ by {[round(d, 9) for _, d in same]}",
        )
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    buf = io.BytesIO()
    try:
        torch.save(net.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        twin.load_state_dict(state)
    except Exception as exc:  # any failure to store or restore is the finding
        record("deepcopy and state_dict round-trip", False, f"{type(exc).__name__}: {exc}"[:300])
        return
    same = [_close(a, b, atol) for a, b in zip(_outputs(twin, x), outs, strict=True)]
    record(
        "deepcopy and state_dict round-trip",
        all(ok for ok, _ in same),
        f"{len(state)} tensors through torch.save / torch.load(weights_only=True)",
    )


def _zero_cost(block: nn.Module) -> bool:
    leaves = [m for m in block.modules() if not list(m.children())]
    return all(isinstance(m, ZERO_COST_MODULES) for m in leaves)


def _check_flops(net: MultiExitNetwork, x: Tensor, record: Record) -> None:
    prof = profile(net, x[:1])
    free = [k for k, f in enumerate(prof.block_flops) if f <= 0 and not _zero_cost(net.blocks[k])]
    if free:
        record(
            "every block costs FLOPs",
            False,
            f"blocks {free} count 0 FLOPs although they hold "
            f"{sorted({type(m).__name__ for k in free for m in net.blocks[k].modules()})}: an "
            "operator the counter does not see (register a formula in "
            "offramp.flop_formulas.FORMULAS) or work outside torch",
        )
    record("every block costs FLOPs", True, f"per block {[int(f) for f in prof.block_flops]}")
    with torch.no_grad():
        whole = count_flops(net.backbone(), x[:1])
    ok = math.isclose(prof.backbone_flops, whole, rel_tol=1e-9)
    record(
        "blocks + final head = the plain backbone counted whole",
        ok,
        f"{prof.backbone_flops:.0f} vs {whole} FLOPs per sample",
    )


def _check_gradients(net: MultiExitNetwork, x: Tensor, record: Record) -> None:
    twin = copy.deepcopy(net).train()  # BatchNorm statistics of the user's net stay as they are
    outs = twin(x)
    loss = sum(o.float().log_softmax(dim=1).mean() for o in outs)
    assert isinstance(loss, Tensor)
    loss.backward()
    dead = [
        f"exit {i}"
        for i, head in enumerate(twin.heads)
        if any(p.requires_grad for p in head.parameters())
        and not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head.parameters())
    ]
    record(
        "every head receives a gradient",
        not dead,
        "heads of " + ", ".join(dead) + " receive none" if dead else f"{len(outs)} heads",
    )


def _runtime(
    net: MultiExitNetwork, policy: ThresholdPolicy, mode: str, x: Tensor, record: Record
) -> EarlyExitRuntime | None:
    try:
        return EarlyExitRuntime(net, policy, mode=mode, example_input=x[:2])
    except OfframpError as exc:
        record(f"runtime in {mode} mode", None, f"not supported: {exc}"[:300])
    except Exception as exc:  # tracing and compiling raise many types
        record(f"runtime in {mode} mode", None, f"not supported: {type(exc).__name__}: {exc}"[:300])
    return None


def _check_runtime(
    net: MultiExitNetwork,
    x: Tensor,
    outs: list[Tensor],
    mode: str,
    atol: float,
    record: Record,
) -> None:
    early = net.num_exits - 1
    never = ThresholdPolicy("max_prob", (math.inf,) * early)
    rt = _runtime(net, never, mode, x, record)
    if rt is None:
        return
    res = rt(x)
    ok, diff = _close(res.logits, outs[-1], atol)
    record(
        f"never-firing thresholds = plain backbone ({mode})",
        ok and bool((res.exits == early).all()),
        f"largest difference {diff:.3g}",
    )
    # thresholds between the two middle scores of each exit: about half the samples leave
    # at every early exit, and no score sits on a threshold
    scores = max_softmax(torch.stack(outs[:-1]))  # (E-1, B)
    taus = []
    for s in scores:
        v = s.sort().values
        mid = v.numel() // 2
        taus.append(float((v[mid - 1] + v[mid]) / 2))
    policy = ThresholdPolicy("max_prob", tuple(taus))
    labels = outs[-1].argmax(dim=1)
    sim = simulate(ExitRecord(torch.stack(outs).float(), labels), policy)
    rt = _runtime(net, policy, mode, x, record)
    if rt is None:
        return
    res = rt(x)
    batched = bool((res.exits.numpy() == sim.exits).all()) and bool(
        (res.predictions.numpy() == sim.predictions).all()
    )
    one = [rt.run_one(x[i : i + 1])[1] for i in range(x.shape[0])]
    single = one == sim.exits.tolist()
    half = x.shape[0] // 2
    bulk = torch.cat([r.exits for r in rt.map([x[:half], x[half:]], pool=half)])
    pooled = bulk.tolist() == sim.exits.tolist()
    counts = torch.bincount(torch.as_tensor(sim.exits), minlength=net.num_exits).tolist()
    detail = f"exits per stage {counts}"
    if not (batched and single and pooled):
        wrong = [
            n for n, ok in (("batched", batched), ("batch 1", single), ("map", pooled)) if not ok
        ]
        detail = f"{', '.join(wrong)} decided otherwise than the simulation ({detail})"
    record(f"runtime = simulation ({mode})", batched and single and pooled, detail)


def _check_graph(net: GraphNetwork, x: Tensor, adj: Tensor, atol: float) -> NetworkCheck:
    report = NetworkCheck()
    record = report.record
    with evaluating(net):
        with torch.no_grad():
            outs = list(net(x, adj))
        finite = all(bool(torch.isfinite(o).all()) for o in outs)
        record("exits give finite (N, C) logits", finite, f"{len(outs)} exits, {x.shape[0]} nodes")
        twin = copy.deepcopy(net)
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        buf.seek(0)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(1.0)
        twin.load_state_dict(torch.load(buf, weights_only=True))
        with torch.no_grad():
            same = [_close(a, b, atol)[0] for a, b in zip(twin(x, adj), outs, strict=True)]
        record("deepcopy and state_dict round-trip", all(same), "through weights_only loading")
        with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter, torch.no_grad():
            net(x, adj)
        want = graph_flops(net, x.shape[0], adj._nnz())
        record(
            "FLOPs counted = the whole-graph formula",
            counter.get_total_flops() == want,
            f"{counter.get_total_flops()} vs {want}",
        )
        twin = copy.deepcopy(net).train()
        loss = sum(o.log_softmax(dim=1).mean() for o in twin(x, adj))
        assert isinstance(loss, Tensor)
        loss.backward()
        dead = [
            i
            for i, h in enumerate(twin.heads)
            if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in h.parameters())
        ]
        record("every head receives a gradient", not dead, f"dead heads {dead}" if dead else "ok")
        early = net.num_exits - 1
        r = GraphRuntime(net, ThresholdPolicy("max_prob", (math.inf,) * early))(x, adj)
        ok, diff = _close(r.logits, outs[-1], atol)
        record("never-firing thresholds = the whole graph", ok, f"largest difference {diff:.3g}")
        scores = max_softmax(torch.stack(outs[:-1]))  # (E-1, N)
        policy = ThresholdPolicy("max_prob", tuple(float(s.median()) for s in scores))
        sim = simulate(ExitRecord(torch.stack(outs).float(), outs[-1].argmax(1)), policy)
        with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
            r = GraphRuntime(net, policy)(x, adj)
        agree = r.exits.tolist() == sim.exits.tolist()
        record(
            "graph runtime = simulation, FLOPs as counted",
            agree and r.flops == counter.get_total_flops(),
            f"rows per layer {list(r.rows)}, {r.flops} FLOPs of {want}",
        )
    return report
