"""Joint training of a graph network's exits on the whole graph (transductive, full batch).

Every epoch is one pass over the graph: each exit's cross-entropy on the training nodes,
summed with weights (eq. 6, as :class:`~offramp.training.JointTraining` for images), one Adam
step — Kipf & Welling's recipe (200 epochs, lr 0.01, weight decay 5e-4 on the first layer,
dropout 0.5). The weights of the epoch with the best mean validation accuracy over the exits
are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from offramp._progress import progress
from offramp.errors import ConfigError
from offramp.models.gcn import GraphNetwork
from offramp.network import evaluating

__all__ = ["GraphEpoch", "fit_graph", "graph_logits"]


@dataclass(frozen=True)
class GraphEpoch:
    """One epoch: the weighted training loss and each exit's validation accuracy."""

    epoch: int
    loss: float
    val_exit_accuracy: tuple[float, ...]


@torch.no_grad()
def graph_logits(net: GraphNetwork, x: Tensor, adj: Tensor) -> Tensor:
    """Every exit's logits for every node, ``(E, N, C)``, in eval mode (modes restored) — the
    record the simulation, the calibration and the oracle read (``ExitRecord(logits[:, idx],
    y[idx])``)."""
    with evaluating(net):
        return net(x, adj).stack()


def fit_graph(
    net: GraphNetwork,
    x: Tensor,
    adj: Tensor,
    y: Tensor,
    train: Tensor,
    val: Tensor | None = None,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    exit_weights: Sequence[float] | None = None,
    seed: int | None = 0,
    show_progress: bool = False,
) -> list[GraphEpoch]:
    """Train every exit of ``net`` on the nodes ``train`` of the graph ``(x, adj)``.

    Args:
        net: the network (trained in place; ends in eval mode).
        x: node features ``(N, F)``.
        adj: normalised adjacency (:func:`offramp.data.graphs.gcn_adjacency`).
        y: node classes ``(N,)``.
        train: training node indices.
        val: validation node indices; with them, the best epoch's weights are kept.
        epochs: full-graph steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the first layer's weights (Adam's ``weight_decay``).
        exit_weights: weight of each exit's loss (default: 1 each).
        seed: seeds dropout.
        show_progress: a progress bar.

    Returns:
        One :class:`GraphEpoch` per epoch.
    """
    if epochs < 1 or lr <= 0:
        raise ConfigError(f"epochs must be ≥ 1 and lr > 0, got {epochs}, {lr}")
    w = [1.0] * net.num_exits if exit_weights is None else [float(v) for v in exit_weights]
    if len(w) != net.num_exits:
        raise ConfigError(f"got {len(w)} exit weights for {net.num_exits} exits")
    if seed is not None:
        torch.manual_seed(seed)
    first = list(net.weights[0].parameters())
    rest = [p for p in net.parameters() if all(p is not q for q in first)]
    opt = torch.optim.Adam(  # L2 on the first layer only, as Kipf & Welling
        [{"params": first, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
    )
    history: list[GraphEpoch] = []
    best, best_state = -1.0, None
    for epoch in progress(range(epochs), total=epochs, desc="train", enabled=show_progress):
        net.train()
        opt.zero_grad()
        outs = net(x, adj)
        loss = sum(wi * F.cross_entropy(o[train], y[train]) for wi, o in zip(w, outs, strict=True))
        assert isinstance(loss, Tensor)
        loss.backward()
        opt.step()
        accs: tuple[float, ...] = ()
        if val is not None:
            logits = graph_logits(net, x, adj)[:, val]  # (E, V, C)
            accs = tuple((logits.argmax(2) == y[val]).float().mean(1).tolist())
            if sum(accs) / len(accs) > best:
                best, best_state = sum(accs) / len(accs), copy.deepcopy(net.state_dict())
        history.append(GraphEpoch(epoch, float(loss.detach()), accs))
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history
