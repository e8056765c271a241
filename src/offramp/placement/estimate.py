"""Candidate exits for a backbone, a quick estimate of how they behave, and what they cost.

:func:`with_candidate_exits` puts a head from the head zoo, sized from ``h_i``'s shape, after
every block boundary (or the ones given); :func:`train_candidate_heads` trains them on the
frozen backbone (classifier-wise, a few epochs on a sample of the training data), which is
enough to estimate the share ``γ_i`` of samples that would leave at each candidate;
:func:`candidate_costs` returns the costs placement needs, counted in FLOPs or measured in
seconds. For a plain ``nn.Module``, ``attach_exits(model, at=[...every candidate module...])``
first gives a network whose block boundaries are the candidate modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from offramp.convert import SEQUENCE_MODULES
from offramp.costs import COSTS, profile
from offramp.errors import ConfigError
from offramp.heads import HeadFactory, head_for
from offramp.network import (
    MultiExitNetwork,
    block_outputs,
    check_input,
    evaluating,
    input_dtype,
)
from offramp.placement.problem import Candidates

__all__ = [
    "COSTS",
    "candidate_costs",
    "cost_table",
    "format_cost_table",
    "train_candidate_heads",
    "with_candidate_exits",
]


def with_candidate_exits(
    net: MultiExitNetwork,
    head: str | HeadFactory = "pool",
    blocks: Sequence[int] | None = None,
    *,
    seed: int | None = 0,
    example: Tensor | None = None,
) -> MultiExitNetwork:
    """A network sharing ``net``'s blocks and final head, with a fresh head after every
    candidate block.

    Token features (``(B, T, D)`` from a block holding a transformer or recurrent layer, or
    features carrying a padding mask) get token heads: ``"pool"`` means the mean over real
    tokens there, as in :func:`offramp.attach_exits`.

    Args:
        net: the backbone (its early heads, if any, are not used).
        head: head zoo name or factory, built for each candidate's ``h_i`` shape.
        blocks: candidate block indices; default every block but the last.
        seed: seeds the new heads' initialisation.
        example: an example batch, for networks whose input size varies (text: ``input_shape``
            with ``None``); default one zero sample of ``input_shape``.

    Example:
        >>> from offramp.models import resnet
        >>> net = resnet(8, 3, widths=(4, 8), blocks_per_stage=(1, 1))
        >>> with_candidate_exits(net).exit_blocks
        (0, 1, 2)
    """
    if example is None and (net.input_shape is None or None in net.input_shape):
        raise ConfigError(
            "candidate heads are sized from each block's output: build the network with "
            "input_shape=(C, H, W), or pass example=x[:2] when its input size varies "
            f"(input_shape={net.input_shape})"
        )
    n = len(net.blocks)
    wanted = list(range(n - 1)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in wanted if not -n <= b < n - 1 or b == -1]
    if bad:
        raise ConfigError(
            f"candidate blocks {bad} are out of range: an early exit can follow blocks 0 … "
            f"{n - 2} (or −{n} … −2); the last block ({n - 1}) always carries the final exit"
        )
    chosen = sorted({b % n for b in wanted})
    if example is not None:
        check_input(example, net.input_shape, dtype=input_dtype(net))
        if example.shape[0] == 0:
            raise ConfigError("example is an empty batch: pass example=x[:2]")
        example = example[:2]  # sizing heads needs no more than two samples
    probe = example if example is not None else net.input_shape
    assert probe is not None
    outputs = block_outputs(list(net.blocks), probe)
    with torch.no_grad(), evaluating(net):
        classes = int(net.heads[-1](outputs[-1]).shape[1])
    with torch.random.fork_rng(devices=[]):  # seeds the new heads, not the caller's stream
        if seed is not None:
            torch.manual_seed(seed)
        heads: dict[int, nn.Module] = {
            b: head_for(
                head,
                outputs[b],
                classes,
                tokens=any(isinstance(m, SEQUENCE_MODULES) for m in net.blocks[b].modules()),
                where=f"after block {b}",
            )
            for b in chosen
        }
    heads[n - 1] = net.heads[-1]
    return MultiExitNetwork(
        list(net.blocks),
        heads,
        input_shape=net.input_shape,
        num_classes=classes,
        trim_padding=net.trim_padding,
    )


def train_candidate_heads(
    net: MultiExitNetwork,
    data: tuple[Tensor, Tensor],
    *,
    epochs: int = 2,
    limit: int | None = 10_000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    memory_budget_mb: float = 2048.0,
    show_progress: bool = True,
) -> list[object]:
    """Train every early head on the frozen backbone (backbone untouched): ``epochs`` passes
    over the first ``limit`` training samples, features cached once
    (:func:`offramp.training.heads_only.fit_backbone_then_heads`, spilled to disk beyond
    ``memory_budget_mb``). The backbone's ``requires_grad`` flags and train/eval modes are
    restored afterwards; its weights are not touched.

    Returns:
        The epoch logs.
    """
    from offramp.training.heads_only import fit_backbone_then_heads
    from offramp.training.loop import FitConfig

    x, y = data
    if limit is not None:
        x, y = x[:limit], y[:limit]
    cfg = FitConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, show_progress=show_progress
    )
    frozen = [*net.blocks, net.heads[-1]]
    flags = [[p.requires_grad for p in m.parameters()] for m in frozen]
    modes = [[sub.training for sub in m.modules()] for m in frozen]
    try:
        return list(
            fit_backbone_then_heads(
                net, (x, y), cfg, train_backbone=False, memory_budget_mb=memory_budget_mb
            )
        )
    finally:  # the backbone is the caller's: leave its flags and modes as they were
        for m, fl, md in zip(frozen, flags, modes, strict=True):
            for p, f in zip(m.parameters(), fl, strict=True):
                p.requires_grad_(f)
            for sub, t in zip(m.modules(), md, strict=True):
                sub.training = t


def candidate_costs(
    net: MultiExitNetwork, x: Tensor, cost: str = "flops", *, repeats: int = 5
) -> Candidates:
    """Costs of the blocks and candidate heads of ``net``: FLOPs counted on ``x[:1]``, or
    seconds per sample measured on the batch ``x`` (:func:`offramp.timing.block_latencies`).

    Example:
        >>> from offramp.models import resnet
        >>> net = with_candidate_exits(resnet(8, 3, widths=(4, 8), blocks_per_stage=(1, 1)))
        >>> candidate_costs(net, torch.rand(2, 1, 8, 8)).num
        3
    """
    if cost not in COSTS:
        raise ConfigError(f"unknown cost {cost!r}; choose one of {COSTS}")
    if cost == "flops":
        return Candidates.from_profile(profile(net, x[:1]))
    from offramp.timing import block_latencies

    blocks, heads = block_latencies(net, x, repeats=repeats)
    return Candidates(tuple(net.exit_blocks), np.asarray(blocks), np.asarray(heads), "seconds")


def cost_table(
    net: MultiExitNetwork, x: Tensor, *, repeats: int = 5
) -> list[dict[str, float | int | None]]:
    """Counted and measured cost of every block and head of ``net``, one row per block: FLOPs
    and parameters, bytes of its output ``h_k``, and milliseconds — at batch 1 and per sample
    at the batch ``x`` — for the block and, where an exit follows it, its head.

    Example:
        >>> from offramp.models import mlp
        >>> rows = cost_table(mlp(4, 3, hidden=(8, 8)), torch.randn(16, 4), repeats=2)
        >>> sorted(rows[0])[:4]
        ['batch', 'block', 'block_flops', 'block_ms_b1']
    """
    from offramp.timing import block_latencies

    prof = profile(net, x[:1])
    one = block_latencies(net, x[:1], repeats=repeats)
    many = block_latencies(net, x, repeats=repeats)
    exit_of = {b: i for i, b in enumerate(prof.exit_blocks)}
    rows: list[dict[str, float | int | None]] = []
    for k in range(len(prof.block_flops)):
        i = exit_of.get(k)
        rows.append(
            {
                "block": k,
                "batch": int(x.shape[0]),
                "block_flops": prof.block_flops[k],
                "block_params": prof.block_params[k],
                "h_bytes": prof.activation_bytes[k],
                "block_ms_b1": 1e3 * one[0][k],
                "block_ms_per_sample": 1e3 * many[0][k],
                "head_flops": None if i is None else prof.head_flops[i],
                "head_params": None if i is None else prof.head_params[i],
                "head_ms_b1": None if i is None else 1e3 * one[1][i],
                "head_ms_per_sample": None if i is None else 1e3 * many[1][i],
            }
        )
    return rows


def format_cost_table(rows: list[dict[str, float | int | None]]) -> str:
    """:func:`cost_table` as a text table."""
    from offramp.report import format_table

    def num(v: object, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    batch = rows[0]["batch"] if rows else 0
    head = ["block", "FLOPs", "params", "h bytes", "ms b=1", f"ms/sample b={batch}",
            "head FLOPs", "head ms b=1", f"head ms/sample b={batch}"]  # fmt: skip
    body = [
        [
            r["block"],
            num(r["block_flops"], ".0f"),
            r["block_params"],
            r["h_bytes"],
            num(r["block_ms_b1"], ".3f"),
            num(r["block_ms_per_sample"], ".4f"),
            num(r["head_flops"], ".0f"),
            num(r["head_ms_b1"], ".3f"),
            num(r["head_ms_per_sample"], ".4f"),
        ]
        for r in rows
    ]
    return format_table(head, body)
