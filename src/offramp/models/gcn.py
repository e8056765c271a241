"""Graph convolutional networks (Kipf & Welling) with an exit after every layer, deciding per
node.

Layer ``l`` computes ``H_l = σ(Â (H_{l−1} W_l) + b_l)`` with the normalised adjacency ``Â``
(:func:`offramp.data.graphs.gcn_adjacency`); the last layer's output is the final exit's logits
and every earlier layer carries a linear head on the node's own state. A node that has left
still feeds its neighbours, so real skipping is not row compaction:
:class:`offramp.runtime.graph.GraphRuntime` computes each later layer only for the nodes the
undecided ones still need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError, ShapeError
from offramp.network import ExitOutputs

__all__ = ["GraphNetwork", "dropout_nonzero", "gcn"]


def dropout_nonzero(h: Tensor, p: float) -> Tensor:
    """Dropout drawn for the non-zero entries only: the same result in distribution as
    ``F.dropout`` (a zero stays zero either way), without a random draw for each of the many
    zeros of bag-of-words features (Cora: 1.3 % non-zero; the full draw took 3/4 of a step)."""
    if p >= 1:
        return torch.zeros_like(h)
    nz = h.nonzero(as_tuple=True)
    keep = torch.rand(nz[0].numel(), device=h.device) >= p
    out = torch.zeros_like(h)
    out[nz] = h[nz] * keep / (1 - p)
    return out


class GraphNetwork(nn.Module):
    """GCN layers with exit heads after some of them; the last layer is the final exit.

    Args:
        dims: widths ``[F, H_1, …, H_{L−1}, C]``: input features, hidden layers, classes.
        exits_after: hidden layers (0-based) with an early exit.
        dropout: dropout on every layer's input and every head's input (training only).

    Example:
        >>> import torch
        >>> from offramp.data.graphs import gcn_adjacency
        >>> net = GraphNetwork([4, 8, 3], exits_after=[0])
        >>> adj = gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 3)
        >>> [tuple(o.shape) for o in net(torch.randn(3, 4), adj)]
        [(3, 3), (3, 3)]
    """

    def __init__(self, dims: Sequence[int], exits_after: Sequence[int], dropout: float = 0.5):
        super().__init__()
        dims = [int(d) for d in dims]
        n_layers = len(dims) - 1
        if n_layers < 1 or min(dims) < 1:
            raise ConfigError(f"dims must hold ≥ 2 positive widths [F, …, C], got {dims}")
        early = tuple(sorted(int(k) for k in exits_after))
        if any(not 0 <= k < n_layers - 1 for k in early) or len(set(early)) != len(early):
            raise ConfigError(
                f"exits_after must name distinct hidden layers 0 … {n_layers - 2}, got "
                f"{list(exits_after)}"
            )
        self.dims = dims
        self.weights = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(n_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(d)) for d in dims[1:])
        self.exit_layers: tuple[int, ...] = (*early, n_layers - 1)
        self.heads = nn.ModuleList(nn.Linear(dims[k + 1], dims[-1]) for k in early)
        self.drop = nn.Dropout(dropout)

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def transform(self, layer: int, h: Tensor) -> Tensor:
        """``dropout(H) W_l`` for the rows of ``h``: the per-node half of layer ``l``."""
        if layer == 0 and self.training and self.drop.p > 0:
            return self.weights[0](dropout_nonzero(h, self.drop.p))
        return self.weights[layer](self.drop(h))

    def combine(self, layer: int, aggregated: Tensor) -> Tensor:
        """``σ(Â T + b_l)`` from the aggregated rows ``Â T``: bias, then ReLU except at the
        last layer."""
        out = aggregated + self.biases[layer]
        return out if layer == self.num_layers - 1 else torch.relu(out)

    def head(self, i: int, h: Tensor) -> Tensor:
        """Early exit ``i``'s logits from its layer's states ``(n, H) -> (n, C)``."""
        return self.heads[i](self.drop(h))

    def forward(self, x: Tensor, adj: Tensor) -> ExitOutputs:
        """Every exit's logits for every node, ``(N, C)`` each, over the whole graph."""
        return ExitOutputs(tuple(self._layers(x, adj, heads=True)))

    def final(self, x: Tensor, adj: Tensor) -> Tensor:
        """The final exit's logits ``(N, C)`` alone: the plain backbone, no early heads run.

        Example:
            >>> import torch
            >>> from offramp.data.graphs import gcn_adjacency
            >>> net = gcn(4, 3, seed=0).eval()
            >>> x, adj = torch.randn(3, 4), gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 3)
            >>> torch.equal(net.final(x, adj), net(x, adj)[-1])
            True
        """
        return self._layers(x, adj, heads=False)[-1]

    def _layers(self, x: Tensor, adj: Tensor, *, heads: bool) -> list[Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dims[0] or adj.shape != (x.shape[0],) * 2:
            raise ShapeError(
                f"expected node features (N, {self.dims[0]}) and an (N, N) adjacency, got "
                f"{tuple(x.shape)} and {tuple(adj.shape)}"
            )
        outs: list[Tensor] = []
        h = x
        for layer in range(self.num_layers):
            h = self.combine(layer, torch.sparse.mm(adj, self.transform(layer, h)))
            if heads and layer in self.exit_layers[:-1]:
                outs.append(self.head(self.exit_layers.index(layer), h))
        outs.append(h)
        return outs


def gcn(
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (16,),
    exits_after: Sequence[int] | None = None,
    dropout: float = 0.5,
    seed: int | None = None,
) -> GraphNetwork:
    """A GCN with hidden layers ``hidden`` and an early exit after each (by default).

    Args:
        in_features: node feature width.
        num_classes: classes.
        hidden: widths of the hidden layers (``(16,)``: Kipf & Welling's two-layer GCN).
        exits_after: hidden layers with an early exit (default: all).
        dropout: dropout on layer and head inputs (training only).
        seed: seeds parameter initialisation when given.
    """
    if seed is not None:
        torch.manual_seed(seed)
    early = range(len(hidden)) if exits_after is None else exits_after
    return GraphNetwork([in_features, *hidden, num_classes], early, dropout)
