"""Cost profile of a multi-exit network: FLOPs, parameters and activation sizes per stage, and
the one place cost vectors ``C_i`` are built (:func:`cumulative_costs`: FLOPs or measured
latency).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and
convolutions (2 FLOPs per multiply–add) and ignores element-wise ops, pooling and activations,
with formulas of our own for what it misses on a CPU (:mod:`offramp.flop_formulas`).
All numbers are **per sample**: the example batch's totals divided by its batch size.

The cumulative cost of exit ``i`` is ``C_i = Σ_{k ≤ b_i} C(f_k) + Σ_{j ≤ i} C(c_j)``: every block
up to the exit plus every head evaluated on the way (DESIGN.md, "Cost").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from offramp.activations import Activation, batch_size, nbytes_per_sample
from offramp.errors import ConfigError
from offramp.flop_formulas import FORMULAS
from offramp.network import MultiExitNetwork, check_input, input_dtype

__all__ = [
    "COSTS",
    "CostProfile",
    "count_flops",
    "cumulative_costs",
    "expected_cost",
    "per_sample_cumulative",
    "profile",
]

#: What a cost vector can measure.
COSTS = ("flops", "latency")


def count_flops(module: nn.Module, x: Activation) -> int:
    """Total FLOPs of ``module(x)`` for the whole batch ``x`` (no gradient, module as is), with
    the work the counter alone misses on a CPU included (:mod:`offramp.flop_formulas`: fused
    transformer layers, attention, oneDNN LSTM layers, sparse products).

    Example:
        >>> import torch
        >>> count_flops(torch.nn.Linear(4, 3, bias=False), torch.randn(1, 4))
        24
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FORMULAS) as mode:
        module(x)
    # modules computing outside torch (scikit-learn heads) report an estimate of their own
    n = batch_size(x)
    extra = sum(m.extra_flops(n) for m in module.modules() if hasattr(m, "extra_flops"))
    return int(mode.get_total_flops()) + int(extra)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class CostProfile:
    """Per-sample costs of every block and head of a ``MultiExitNetwork``.

    Attributes:
        exit_blocks: block index of each exit.
        block_flops: FLOPs of each block ``f_k`` per sample.
        head_flops: FLOPs of each head ``c_i`` per sample.
        block_params: parameters of each block.
        head_params: parameters of each head.
        activation_bytes: bytes of each block's output ``h_k`` per sample (side inputs such as
            a padding mask included).
        input_bytes: bytes of one input sample.
    """

    exit_blocks: tuple[int, ...]
    block_flops: tuple[float, ...]
    head_flops: tuple[float, ...]
    block_params: tuple[int, ...]
    head_params: tuple[int, ...]
    activation_bytes: tuple[int, ...]
    input_bytes: int

    @property
    def cumulative(self) -> np.ndarray:
        """``C_i`` for every exit, ``(E,)`` float64: blocks to the exit plus heads on the way."""
        blocks = np.cumsum(np.asarray(self.block_flops, dtype=np.float64))
        heads = np.cumsum(np.asarray(self.head_flops, dtype=np.float64))
        return blocks[list(self.exit_blocks)] + heads

    @property
    def backbone_flops(self) -> float:
        """FLOPs of the plain backbone: every block and the final head, no intermediate heads."""
        return float(sum(self.block_flops) + self.head_flops[-1])

    @property
    def relative_cumulative(self) -> np.ndarray:
        """``C_i`` divided by the plain backbone's FLOPs."""
        return self.cumulative / self.backbone_flops

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cumulative"] = self.cumulative.tolist()
        d["backbone_flops"] = self.backbone_flops
        return d

    def table(self) -> str:
        """A small text table: one row per exit with its stage and cumulative FLOPs."""
        rows = ["exit  block  stage FLOPs  head FLOPs  C_i        C_i/backbone"]
        start = 0
        for i, b in enumerate(self.exit_blocks):
            stage = sum(self.block_flops[start : b + 1])
            start = b + 1
            rows.append(
                f"{i:>4}  {b:>5}  {stage:>11.0f}  {self.head_flops[i]:>10.0f}  "
                f"{self.cumulative[i]:<9.0f}  {self.relative_cumulative[i]:.3f}"
            )
        return "\n".join(rows)


def profile(net: MultiExitNetwork, example_input: Tensor) -> CostProfile:
    """Measure the per-sample cost of every block and head of ``net`` on ``example_input``.

    Args:
        net: the network.
        example_input: a batch ``(B, *input_shape)``; costs are divided by ``B``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from offramp import MultiExitNetwork
        >>> net = MultiExitNetwork([nn.Linear(4, 4, bias=False)], {0: nn.Linear(4, 2, bias=False)})
        >>> profile(net, torch.randn(1, 4)).cumulative.tolist()
        [48.0]
    """
    check_input(example_input, net.input_shape, dtype=input_dtype(net))
    b = example_input.shape[0]
    was_training = net.training
    net.eval()
    block_flops, block_params, act_bytes = [], [], []
    head_flops: dict[int, float] = {}
    h: Activation = example_input
    with torch.no_grad():
        for k, block in enumerate(net.blocks):
            block_flops.append(count_flops(block, h) / b)
            h = block(h)
            block_params.append(_params(block))
            act_bytes.append(nbytes_per_sample(h))
            if k in net.exit_blocks:
                i = net.exit_blocks.index(k)
                head_flops[i] = count_flops(net.heads[i], h) / b
    net.train(was_training)
    return CostProfile(
        exit_blocks=net.exit_blocks,
        block_flops=tuple(block_flops),
        head_flops=tuple(head_flops[i] for i in range(net.num_exits)),
        block_params=tuple(block_params),
        head_params=tuple(_params(hd) for hd in net.heads),
        activation_bytes=tuple(act_bytes),
        input_bytes=int(example_input[0].numel() * example_input.element_size()),
    )


def expected_cost(exits: np.ndarray | Tensor, cumulative: np.ndarray) -> float:
    """Eq. 12: the mean of ``C_{exit(n)}`` over samples, ``(1/N) Σ_n Σ_i 1[n exits at i]·C_i``.

    Args:
        exits: exit index of each sample, ``(N,)``.
        cumulative: ``C_i`` for every exit, ``(E,)``; or each sample's own, ``(N, E)``
            (:func:`per_sample_cumulative`: sequences of different lengths).

    Example:
        >>> import numpy as np
        >>> expected_cost(np.array([0, 0, 1, 2]), np.array([10.0, 30.0, 100.0]))
        37.5
        >>> expected_cost(np.array([0, 1]), np.array([[1.0, 2.0], [10.0, 20.0]]))  # own costs
        10.5
    """
    e = np.asarray(exits.cpu() if isinstance(exits, Tensor) else exits, dtype=np.int64)
    c = np.asarray(cumulative, dtype=np.float64)
    if e.size == 0:
        return 0.0
    if c.ndim == 2:
        if c.shape[0] != e.size:
            raise ConfigError(f"per-sample costs for {c.shape[0]} samples, exits for {e.size}")
        return float(c[np.arange(e.size), e].mean())
    counts = np.bincount(e, minlength=len(c))
    return float(counts @ c / e.size)


def per_sample_cumulative(
    net: MultiExitNetwork, x: Tensor, *, pad_id: int | None = None
) -> np.ndarray:
    """Every sample's own ``C_i``, ``(N, E)`` FLOPs, for token ids ``x`` ``(N, T)`` padded on
    the right with ``pad_id``: a transformer's or recurrent network's cost grows with the
    sequence length, and each sample is costed at its real length, not the batch's padded one.
    A sample's length runs to its last token that is not ``pad_id`` (default: the network's
    ``pad_token_id`` attribute, set by :func:`offramp.models.hf.hf_encoder`, else 0).

    Each distinct length is profiled once (:func:`profile` on a sample of that length, cut to
    it), so the costs are counted, not modelled.

    Example:
        >>> from offramp.models import rnn_classifier
        >>> net = rnn_classifier(20, 3, layers=2, embed_dim=4, hidden=4)
        >>> c = per_sample_cumulative(net, torch.tensor([[5, 6, 7], [5, 0, 0]]))
        >>> c[0, -1] > c[1, -1], c.shape
        (np.True_, (2, 2))
    """
    if x.dim() != 2 or x.is_floating_point():
        raise ConfigError(f"per_sample_cumulative takes token ids (N, T), got {tuple(x.shape)}")
    pad = int(getattr(net, "pad_token_id", 0)) if pad_id is None else pad_id
    t = x.shape[1]
    real = (x != pad).cpu()
    last = torch.where(real, torch.arange(t), -1).amax(dim=1)  # (N,) last real position
    lengths = (last + 1).clamp_min(1)
    out = np.zeros((x.shape[0], net.num_exits))
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(1)
        sample = x[rows[:1].to(x.device), :length]  # (1, length): one of them, at its length
        out[rows.numpy()] = profile(net, sample).cumulative
    return out


def cumulative_costs(
    net: MultiExitNetwork, x: Tensor, cost: str = "flops", *, repeats: int = 5
) -> np.ndarray:
    """The cost ``C_i`` of reaching every exit, ``(E,)``: FLOPs per sample counted on ``x[:1]``
    (:func:`profile`), or seconds per sample measured on the batch ``x``
    (:func:`offramp.timing.exit_latencies`, median of ``repeats``). A later exit runs everything
    an earlier one does, so measured costs are made non-decreasing (a running maximum) where
    timing noise put them out of order.

    Example:
        >>> from offramp.models import mlp
        >>> cumulative_costs(mlp(4, 3, hidden=(8, 8)), torch.randn(16, 4)).tolist()
        [112.0, 288.0]
    """
    if cost == "flops":
        return profile(net, x[:1]).cumulative
    if cost == "latency":
        from offramp.timing import exit_latencies

        measured = np.asarray(exit_latencies(net, x, repeats=repeats), dtype=np.float64)
        return np.maximum.accumulate(measured)
    raise ConfigError(f"unknown cost {cost!r}; choose one of {list(COSTS)}")
