"""Distributed training on PyTorch DDP (gloo on CPU, nccl where there are GPUs).

:func:`~offramp.training.loop.fit` checks :func:`world_info`: when ``torch.distributed`` is
initialised with more than one rank it wraps the network in ``DistributedDataParallel`` (exits
a strategy declares unused — ``used_exits`` — come back detached and DDP skips their heads),
gives each rank its share of every global batch, averages the gradients of a strategy's own
parameters (gates, mixing weights) by hand, sums the epoch statistics over ranks, and writes
checkpoints from rank 0 only.

Start ranks with ``torchrun`` — ``offramp train CONFIG --nproc N`` does this for you — or, in
tests, with :func:`torch.multiprocessing.spawn` and :func:`init_process_group` through a shared
file (no TCP port to pick, so no race with other sockets on the machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import ExitOutputs

__all__ = [
    "DDPNet",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "ddp_wrap",
    "destroy_process_group",
    "init_process_group",
    "world_info",
]


def world_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(
    rank: int,
    world_size: int,
    *,
    port: int | None = None,
    init_file: str | None = None,
    backend: str = "gloo",
) -> tuple[int, int]:
    """Join the process group as ``rank`` of ``world_size``: through a shared file
    (``init_file``: no port to choose, nothing to collide with — what the tests use), on
    127.0.0.1:``port``, or, with neither, at the address ``torchrun`` published
    (``env://``). The caller says who this rank is (``offramp train`` reads it from
    ``torchrun``'s environment); this function reads and writes no environment variable.

    Returns:
        ``(rank, world size)``.
    """
    if init_file is not None:
        init_method = f"file://{init_file}"
    elif port is not None:
        init_method = f"tcp://127.0.0.1:{port}"
    else:
        init_method = "env://"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return rank, world_size


def destroy_process_group() -> None:
    """Leave the process group cleanly: wait for every rank, then tear it down (no-op outside
    distributed training)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op outside distributed training)."""
    if world_info()[1] > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (a copy; ``t`` itself is left alone)."""
    out = t.clone()
    if world_info()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in place; a missing gradient counts as 0
    on that rank, so every rank takes part in every reduction."""
    _, world = world_info()
    if world == 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


class _PlainOutputs(nn.Module):
    """The network with plain-tuple outputs, which DDP can trace through (it does not look
    inside :class:`~offramp.network.ExitOutputs`); exits outside ``used`` come back detached,
    so DDP sees their heads as unused instead of waiting for their gradients."""

    def __init__(self, net: nn.Module, used: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.used = None if used is None else {int(i) % net.num_exits for i in used}

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        out = self.net(x, **kwargs)
        feats, outs = out if kwargs.get("return_features") else (None, out)
        logits = tuple(
            o if self.used is None or i in self.used else o.detach() for i, o in enumerate(outs)
        )
        return logits if feats is None else (tuple(feats), logits)


class DDPNet:
    """The network as a strategy sees it under DDP: calls go through ``DistributedDataParallel``
    (so gradients are synchronised), attributes (``num_exits``, ``stages`` …) come from the
    wrapped :class:`~offramp.network.MultiExitNetwork`."""

    def __init__(self, net: nn.Module, ddp: nn.parallel.DistributedDataParallel) -> None:
        self._net = net
        self._ddp = ddp

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        out = self._ddp(x, **kwargs)
        if kwargs.get("return_features"):
            return out[0], ExitOutputs(out[1])
        return ExitOutputs(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net, name)


def ddp_wrap(net: nn.Module, strategy: object) -> DDPNet:
    """Wrap ``net`` in DDP for ``strategy``; refuse strategies that say they cannot run there.

    A strategy whose loss leaves some exits out says which exits it uses with a
    ``used_exits`` attribute (a sequence of exit indices): the other exits' logits then come
    back detached, and DDP (with ``find_unused_parameters=True``) marks their heads as unused
    instead of waiting for gradients that never come. Strategies that freeze parts of the
    network while training set ``ddp_compatible = False``.
    """
    if getattr(strategy, "ddp_compatible", True) is False:
        raise ConfigError(
            f"{type(strategy).__name__} cannot run under DDP (it changes which parameters "
            "train while training); run it in one process"
        )
    used = getattr(strategy, "used_exits", None)
    ddp = nn.parallel.DistributedDataParallel(
        _PlainOutputs(net, used), find_unused_parameters=used is not None
    )
    return DDPNet(net, ddp)
