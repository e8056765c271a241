"""The graph runtime against brute force: decisions equal the simulation on the whole graph's
logits, and each layer computes exactly the remaining receptive field of the live nodes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from offramp import ThresholdPolicy
from offramp.data.graphs import gcn_adjacency
from offramp.errors import ConfigError, ShapeError
from offramp.flop_formulas import FORMULAS
from offramp.models.gcn import gcn
from offramp.policies import PatiencePolicy, decide_from_logits
from offramp.runtime.graph import GraphRuntime, graph_flops
from offramp.training.graph import graph_logits


def random_graph(n=60, p=0.05, f=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    upper = (torch.rand(n, n, generator=g) < p).triu(1)  # each pair once, no self loops
    a = upper | upper.T
    edge_index = a.nonzero().T.contiguous()
    return torch.randn(n, f, generator=g), edge_index, a


def ball(a, nodes, hops):
    """Nodes within `hops` of `nodes`, by dense boolean matrix powers."""
    reach = torch.zeros(a.shape[0], dtype=torch.bool)
    reach[nodes] = True
    step = a | torch.eye(a.shape[0], dtype=torch.bool)
    for _ in range(hops):
        reach = (step[:, reach].any(dim=1)) | reach
    return reach


def thresholds_at_median(logits):
    score = logits.softmax(-1).amax(-1)  # (E, N)
    return tuple(float(s.median()) for s in score[:-1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hidden", [(8,), (8, 8, 8)])
def test_runtime_equals_simulation_and_computes_only_what_is_needed(seed, hidden):
    x, edge_index, a = random_graph(seed=seed)
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 4, hidden=hidden, seed=seed)
    logits = graph_logits(net, x, adj)  # (E, N, C)
    count = 25 if seed % 2 else 60  # a few targets, or every node (whole-graph layers first)
    targets = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    policy = ThresholdPolicy("max_prob", thresholds_at_median(logits[:, targets]))
    sim = decide_from_logits(policy, logits[:, targets])
    r = GraphRuntime(net, policy)(x, adj, targets)
    assert r.exits.tolist() == sim.tolist()
    want = logits[sim, targets]
    torch.testing.assert_close(r.logits, want, rtol=0, atol=1e-5)
    # layer l ran on the nodes within L-1-l hops of the targets still undecided before it —
    # or on the whole graph while that covers more than half of it
    live = torch.ones(targets.numel(), dtype=torch.bool)
    layers, n, whole = net.num_layers, x.shape[0], True
    for layer in range(layers):
        need = int(ball(a, targets[live], layers - 1 - layer).sum()) if live.any() else 0
        whole = whole and 2 * need > n
        assert r.rows[layer] == (n if whole else need), layer
        if layer in net.exit_layers[:-1]:
            live &= r.exits != net.exit_layers.index(layer)


def test_never_firing_equals_the_whole_graph_and_its_flops():
    x, edge_index, _ = random_graph()
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 4, hidden=(8, 8), seed=0)
    never = ThresholdPolicy("max_prob", (2.0, 2.0))
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        r = GraphRuntime(net, never)(x, adj)
    assert r.rows == (60, 60, 60) and r.flops == counter.get_total_flops()
    torch.testing.assert_close(r.logits, graph_logits(net, x, adj)[-1], rtol=0, atol=1e-5)
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        net(x, adj)
    assert counter.get_total_flops() == graph_flops(net, 60, adj._nnz())


def test_flops_of_an_early_exit_run_are_what_the_counter_sees():
    x, edge_index, _ = random_graph(seed=3)
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 4, hidden=(8, 8), seed=1)
    policy = ThresholdPolicy("max_prob", thresholds_at_median(graph_logits(net, x, adj)))
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        r = GraphRuntime(net, policy)(x, adj)
    assert 0 < r.flops == counter.get_total_flops() < graph_flops(net, 60, adj._nnz())


def test_patience_runtime_equals_simulation():
    x, edge_index, _ = random_graph(seed=5)
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 3, hidden=(8, 8, 8), seed=2)
    policy = PatiencePolicy(net.num_exits, 1)
    sim = decide_from_logits(policy, graph_logits(net, x, adj))
    assert GraphRuntime(net, policy)(x, adj).exits.tolist() == sim.tolist()


def test_bad_inputs_and_modes():
    x, edge_index, _ = random_graph()
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 4, seed=0).train()
    rt = GraphRuntime(net, ThresholdPolicy("max_prob", (0.5,)))
    rt(x, adj)
    assert net.training  # its own mode back
    with pytest.raises(ShapeError, match="coalesced sparse COO"):
        rt(x, adj.to_dense())
    with pytest.raises(ConfigError, match="node indices 0 … 59"):
        rt(x, adj, torch.tensor([60]))
    with pytest.raises(ShapeError, match="does not match 59 nodes"):
        rt(x[:59], adj)


def test_a_directed_graph_reads_every_column_its_rows_need():
    # a chain 0 -> 1 -> 2 -> 3 given one way only: Â is not symmetric
    n = 12
    edge_index = torch.tensor([[i + 1 for i in range(n - 1)], list(range(n - 1))])
    adj = gcn_adjacency(edge_index, n)
    assert not torch.equal(adj.to_dense(), adj.to_dense().T)
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    net = gcn(5, 3, hidden=(6, 6), seed=0)
    logits = graph_logits(net, x, adj)
    targets = torch.tensor([11, 5])
    never = GraphRuntime(net, ThresholdPolicy("max_prob", (2.0, 2.0)))
    torch.testing.assert_close(
        never(x, adj, targets).logits, logits[-1, targets], rtol=0, atol=1e-6
    )


def test_adjacency_ignores_given_self_loops_and_repeated_edges():
    clean = gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 3).to_dense()
    messy = gcn_adjacency(torch.tensor([[0, 1, 0, 2], [1, 0, 1, 2]]), 3).to_dense()
    assert torch.equal(clean, messy)


def test_the_plain_backbone_is_the_final_exit_at_the_flops_without_heads():
    x, edge_index, _ = random_graph(seed=2)
    adj = gcn_adjacency(edge_index, x.shape[0])
    net = gcn(x.shape[1], 4, hidden=(8, 8), seed=0).eval()
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        out = net.final(x, adj)
    assert torch.equal(out, net(x, adj)[-1])
    assert counter.get_total_flops() == graph_flops(net, 60, adj._nnz(), heads=False)
    heads = 2 * 60 * 8 * 4 * 2  # two early heads (8 -> 4) on 60 nodes
    assert graph_flops(net, 60, adj._nnz()) - graph_flops(net, 60, adj._nnz(), heads=False) == heads


def test_an_adjacency_with_empty_rows_gives_the_whole_graph_decisions():
    x, edge_index, _ = random_graph(seed=4)
    full = gcn_adjacency(edge_index, x.shape[0])
    idx, val = full.indices(), full.values()
    keep = ~torch.isin(idx[0], torch.tensor([0, 7, 59]))  # rows 0, 7 and 59 read nothing
    adj = torch.sparse_coo_tensor(idx[:, keep], val[keep], full.shape, check_invariants=True)
    adj = adj.coalesce()
    net = gcn(x.shape[1], 4, hidden=(8, 8), seed=3)
    logits = graph_logits(net, x, adj)
    targets = torch.tensor([0, 7, 59, 3, 12])
    policy = ThresholdPolicy("max_prob", thresholds_at_median(logits[:, targets]))
    sim = decide_from_logits(policy, logits[:, targets])
    r = GraphRuntime(net, policy)(x, adj, targets)
    assert r.exits.tolist() == sim.tolist() and max(r.rows) < 60
    torch.testing.assert_close(r.logits, logits[sim, targets], rtol=0, atol=1e-5)
