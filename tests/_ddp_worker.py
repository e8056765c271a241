"""Rank entry point for the DDP tests (spawned by torch.multiprocessing; importable by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.models import mlp
from offramp.training import FitConfig, fit, train
from offramp.training.distributed import destroy_process_group, init_process_group


def data(n: int = 128, d: int = 12, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g)
    return x, (x @ w).argmax(dim=1)


class FinalOnly:
    """Trains the final exit only: the early heads get no gradient (unused under DDP)."""

    used_exits = (-1,)

    def step(self, net, batch):
        x, y = batch
        outs = net(x)
        loss = F.cross_entropy(outs.final, y)
        with torch.no_grad():
            correct = (outs.stack().argmax(-1) == y[None]).sum(1)
            per = torch.stack([F.cross_entropy(o, y) for o in outs])
        return {"loss": loss, "exit_losses": per, "correct": correct}


class FinalOnlyUndeclared(FinalOnly):
    """The same, without saying so: DDP cannot know the early heads are unused."""

    used_exits = None


def run(strategy: str) -> torch.nn.Module:
    """Train the test network with ``strategy`` in this process (distributed or not)."""
    torch.manual_seed(0)
    net = mlp(12, 3, hidden=(16, 16, 16), seed=0)
    cfg = FitConfig(epochs=2, batch_size=32, lr=1e-2, show_progress=False)
    if strategy == "joint_odd_tail":  # 129 samples: a last batch of 1 cannot be split in 2
        fit(net, data(129), cfg)
    elif strategy == "final_only":
        fit(net, data(), cfg, strategy=FinalOnly())
    elif strategy == "final_only_undeclared":
        fit(net, data(), cfg, strategy=FinalOnlyUndeclared())
    else:
        train(net, data(), cfg, strategy)
    return net


def worker(rank: int, world: int, out_dir: str, strategy: str) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, world, init_file=str(Path(out_dir) / "rendezvous"))
    try:
        net = run(strategy)
        torch.save(net.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - manual use
    print(run(sys.argv[1]))
