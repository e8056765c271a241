import pytest
import torch

from offramp.data.graphs import gcn_adjacency, load_planetoid
from offramp.models.gcn import gcn
from offramp.training.graph import fit_graph, graph_logits

from .conftest import data_dir


def test_joint_training_lowers_every_exits_loss_and_keeps_the_best_epoch():
    g = torch.Generator().manual_seed(0)
    n = 80
    y = torch.arange(n) % 2
    x = torch.randn(n, 6, generator=g) + y[:, None] * 1.5  # separable features
    edges = torch.tensor([[i, (i + 2) % n] for i in range(n)]).T  # same-class neighbours
    adj = gcn_adjacency(torch.cat([edges, edges.flip(0)], dim=1), n)
    net = gcn(6, 2, hidden=(8, 8), seed=0)
    train, val = torch.arange(0, 40), torch.arange(40, 80)
    hist = fit_graph(net, x, adj, y, train, val, epochs=60)
    assert len(hist) == 60 and hist[-1].loss < hist[0].loss
    best = max(sum(h.val_exit_accuracy) for h in hist) / net.num_exits
    acc = (graph_logits(net, x, adj)[:, val].argmax(2) == y[val]).float().mean(1)
    assert float(acc.mean()) == pytest.approx(best) and best >= 0.9  # the best epoch kept
    assert not net.training


def test_gcn_on_cora_reaches_the_published_accuracy():
    graph = load_planetoid(data_dir("graphs") / "cora.npz")
    adj = graph.adjacency()
    net = gcn(graph.x.shape[1], graph.num_classes, seed=0)
    fit_graph(net, graph.x, adj, graph.y, graph.train, graph.val)
    acc = graph_logits(net, graph.x, adj)[:, graph.test].argmax(2) == graph.y[graph.test]
    assert float(acc.float().mean(1)[-1]) >= 0.80  # Kipf & Welling: 81.5 %
