"""Early exit on a graph, per node: each layer computed only where an undecided node needs it.

On a graph a node's state at layer ``l`` depends on its neighbours' states at layer ``l − 1``,
so a node that has left still feeds its neighbours and the batch cannot simply be compacted.
:class:`GraphRuntime` keeps the set of target nodes still undecided; at layer ``l`` it computes
states only on their remaining receptive field — the nodes within ``L − 1 − l`` hops of them —
and the per-node half of the layer (``H W``) only on those nodes' neighbourhoods. States
computed there equal the whole-graph ones (every row of ``Â`` is read whole), so the decisions
equal the simulation on the whole graph's logits. A layer whose receptive field covers more than
half the graph runs on the whole graph instead (the plain network's own arithmetic, cheaper
than gathering most of it): ``rows`` then counts every node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.errors import ConfigError, ShapeError
from offramp.models.gcn import GraphNetwork
from offramp.network import evaluating
from offramp.policies import ExitPolicy

__all__ = ["GraphResult", "GraphRuntime", "graph_flops", "layer_flops"]


@dataclass(frozen=True)
class GraphResult:
    """What :class:`GraphRuntime` returns for its target nodes, in their order.

    Attributes:
        predictions: class of every target ``(n,)``.
        exits: exit each target left at ``(n,)``.
        logits: the logits it left with ``(n, C)``.
        rows: nodes whose state each layer computed (``L`` counts).
        transformed: nodes each layer's ``H W`` ran on (``L`` counts).
        edges: entries of ``Â`` each layer aggregated over (``L`` counts).
        heads: nodes each early exit's head ran on (``E − 1`` counts).
        flops: FLOPs the call computed (2 per multiply–add, as ``torch.utils.flop_counter``
            counts them; tested against it): every layer's ``H W`` and ``Â T``, every head.
    """

    predictions: Tensor
    exits: Tensor
    logits: Tensor
    rows: tuple[int, ...]
    transformed: tuple[int, ...]
    edges: tuple[int, ...]
    heads: tuple[int, ...]
    flops: int


def layer_flops(net: GraphNetwork, transformed: int, edges: int, layer: int) -> int:
    """FLOPs of layer ``layer`` run on ``transformed`` rows with ``edges`` entries of ``Â``."""
    d_in, d_out = net.dims[layer], net.dims[layer + 1]
    return 2 * transformed * d_in * d_out + 2 * edges * d_out


def graph_flops(net: GraphNetwork, nodes: int, edges: int, *, heads: bool = True) -> int:
    """FLOPs of the whole-graph forward with ``edges`` entries in ``Â`` (self loops included):
    every layer and, with ``heads``, every early exit's head on every node (what ``net(x, adj)``
    computes); without them, the plain backbone's (``net.final(x, adj)``)."""
    total = sum(layer_flops(net, nodes, edges, k) for k in range(net.num_layers))
    if heads:
        total += sum(2 * nodes * net.dims[k + 1] * net.dims[-1] for k in net.exit_layers[:-1])
    return total


class GraphRuntime:
    """Run a :class:`~offramp.models.gcn.GraphNetwork` with an exit policy, per node.

    Args:
        net: the network (run in eval mode; modes restored after each call).
        policy: any :class:`~offramp.policies.ExitPolicy` over ``net.num_exits`` exits.

    Example:
        >>> import torch
        >>> from offramp import ThresholdPolicy
        >>> from offramp.data.graphs import gcn_adjacency
        >>> from offramp.models.gcn import gcn
        >>> net = gcn(4, 3, hidden=(8, 8), seed=0)
        >>> adj = gcn_adjacency(torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), 4)
        >>> r = GraphRuntime(net, ThresholdPolicy("max_prob", (0.0, 0.0)))(torch.randn(4, 4), adj)
        >>> r.exits.tolist(), r.rows  # everyone leaves at exit 0: later layers compute nothing
        ([0, 0, 0, 0], (4, 0, 0))
    """

    def __init__(self, net: GraphNetwork, policy: ExitPolicy) -> None:
        policy.check(net.num_exits)
        self.net, self.policy = net, policy
        self._tests = list(policy.exit_tests())
        if any(getattr(t, "on_features", False) for t in self._tests):
            raise ConfigError(
                "GraphRuntime decides on each exit's logits; policies that score features "
                "(gates) are not supported on graphs"
            )

    @torch.no_grad()
    def __call__(self, x: Tensor, adj: Tensor, targets: Tensor | None = None) -> GraphResult:
        """Decide for ``targets`` (default: every node) on the graph ``(x, adj)``; ``adj`` is
        the coalesced COO adjacency the network was trained with."""
        n = x.shape[0]
        if adj.layout != torch.sparse_coo or not adj.is_coalesced():
            raise ShapeError("adj must be a coalesced sparse COO tensor (gcn_adjacency gives one)")
        if adj.shape != (n, n):
            raise ShapeError(f"adjacency {tuple(adj.shape)} does not match {n} nodes")
        targets = torch.arange(n, device=x.device) if targets is None else targets.long()
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n):
            raise ConfigError(f"targets must be node indices 0 … {n - 1}")
        with evaluating(self.net):
            return self._run(x, adj, targets)

    def _run(self, x: Tensor, adj: Tensor, targets: Tensor) -> GraphResult:
        net, n = self.net, x.shape[0]
        src, dst = adj.indices()  # row (receiving node), column (neighbour); rows sorted
        values = adj.values()
        count = targets.numel()
        dev = x.device
        exits = torch.full((count,), net.num_exits - 1, dtype=torch.long, device=dev)
        out = x.new_zeros((count, net.dims[-1]))
        live = torch.arange(count, device=dev)  # positions in `targets` still undecided
        state = self.policy.initial_state(count, x.device)
        h, have = x, torch.arange(n, device=dev)  # previous layer's states, for nodes `have`
        crow: Tensor | None = None
        rows, transformed, edges = [], [], []
        heads = [0] * (net.num_exits - 1)
        for layer in range(net.num_layers):
            if live.numel() == 0:  # everyone has left: nothing more to compute
                break
            # nodes whose state this layer must give: within (L − 1 − layer) hops of the live
            need = torch.zeros(n, dtype=torch.bool, device=dev)
            need[targets[live]] = True
            for _ in range(net.num_layers - 1 - layer):
                need[dst[need[src]]] = True  # one hop: every column a needed row reads
            whole = have.numel() == n and 2 * int(need.sum()) > n
            if whole:
                # most of the graph needs this layer: run it on the whole graph, the plain
                # network's own arithmetic, instead of gathering rows and a sub-adjacency
                h = net.combine(layer, torch.sparse.mm(adj, net.transform(layer, h)))  # `have`: all
                rows.append(n), transformed.append(n), edges.append(int(src.numel()))
            else:
                if crow is None:  # row r of Â is entries crow[r] … crow[r + 1] − 1
                    deg = torch.bincount(src, minlength=n)
                    crow = torch.cat([deg.new_zeros(1), deg.cumsum(0)])
                row_nodes = need.nonzero().squeeze(1)  # sorted node ids
                starts = crow[row_nodes]
                counts = crow[row_nodes + 1] - starts  # entries per needed row
                ends = counts.cumsum(0)
                total = int(ends[-1]) if ends.numel() else 0
                # (total,) the entries of the needed rows, whole and in adj's order
                entry = torch.repeat_interleave(starts - (ends - counts), counts, output_size=total)
                entry += torch.arange(total, device=dev)
                cols = dst[entry]
                read = torch.zeros(n, dtype=torch.bool, device=dev)
                read[cols] = True
                col_nodes = read.nonzero().squeeze(1)  # sorted node ids
                pos_col = torch.empty(n, dtype=torch.long, device=dev)  # node -> column of sub
                pos_col[col_nodes] = torch.arange(col_nodes.numel(), device=dev)
                if have.numel() == n:  # the previous layer computed every node
                    prev = col_nodes
                else:
                    where = torch.full((n,), -1, dtype=torch.long, device=dev)  # node -> prev row
                    where[have] = torch.arange(have.numel(), device=dev)
                    prev = where[col_nodes]
                    if bool((prev < 0).any()):  # pragma: no cover - the field covers it
                        raise ConfigError("internal: a node's neighbour was not computed")
                t = net.transform(layer, h[prev])  # (|cols|, d_out)
                local_rows = torch.repeat_interleave(
                    torch.arange(row_nodes.numel(), device=dev), counts, output_size=total
                )
                sub = torch.sparse_coo_tensor(
                    torch.stack([local_rows, pos_col[cols]]),
                    values[entry],
                    (row_nodes.numel(), col_nodes.numel()),
                    is_coalesced=True,  # rows and columns keep the node order of adj's indices
                    check_invariants=False,  # built here from a valid adjacency
                )
                h = net.combine(layer, torch.sparse.mm(sub, t))  # (|rows|, d_out)
                have = row_nodes
                rows.append(row_nodes.numel())
                transformed.append(col_nodes.numel())
                edges.append(total)
            # the live targets' rows of h (every node's after a whole layer)
            at = targets[live] if have.numel() == n else torch.searchsorted(have, targets[live])
            if layer == net.num_layers - 1:
                out[live] = h[at]
                break
            if layer not in net.exit_layers:
                continue
            i = net.exit_layers.index(layer)
            heads[i] = int(at.numel())
            logits = net.head(i, h[at])
            leave, state_live = self._tests[i](logits, state[live])
            state[live] = state_live
            gone = leave.nonzero().squeeze(1)  # the one host sync of this layer
            out[live[gone]] = logits[gone]
            exits[live[gone]] = i
            live = live[~leave]
        missing = net.num_layers - len(rows)  # layers nobody needed any more
        rows, transformed, edges = (v + [0] * missing for v in (rows, transformed, edges))
        flops = sum(
            layer_flops(net, t, e, k)
            for k, (t, e) in enumerate(zip(transformed, edges, strict=True))
        ) + sum(
            2 * c * net.dims[k + 1] * net.dims[-1]
            for c, k in zip(heads, net.exit_layers[:-1], strict=True)
        )
        return GraphResult(
            predictions=out.argmax(dim=1),
            exits=exits,
            logits=out,
            rows=tuple(rows),
            transformed=tuple(transformed),
            edges=tuple(edges),
            heads=tuple(heads),
            flops=int(flops),
        )
