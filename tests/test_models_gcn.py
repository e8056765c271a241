import pytest
import torch

from offramp.data.graphs import gcn_adjacency
from offramp.errors import ConfigError, ShapeError
from offramp.models.gcn import GraphNetwork, gcn


def test_layer_by_hand():
    # two nodes joined by one edge: Â = [[.5, .5], [.5, .5]]
    adj = gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 2)
    net = GraphNetwork([2, 1], exits_after=[], dropout=0.0)
    with torch.no_grad():
        net.weights[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.biases[0].fill_(0.25)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # H W = [1, 2]
    assert net(x, adj).final.tolist() == [[1.75], [1.75]]  # mean of 1 and 2, + 0.25


def test_every_exit_gets_a_gradient_and_settings_are_checked():
    adj = gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 3)
    net = gcn(4, 3, hidden=(8, 8), seed=0)
    assert net.exit_layers == (0, 1, 2)
    sum(o.square().sum() for o in net(torch.randn(3, 4), adj)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.heads.parameters())
    with pytest.raises(ConfigError, match="hidden layers 0 … 1"):
        gcn(4, 3, hidden=(8, 8), exits_after=[2])
    with pytest.raises(ShapeError, match=r"\(N, 4\)"):
        net(torch.randn(3, 5), adj)


def test_input_dropout_keeps_zeros_and_the_expectation():
    net = gcn(1000, 2, seed=0).train()
    x = torch.zeros(400, 1000)
    x[:, :10] = 1.0
    from offramp.models.gcn import dropout_nonzero

    d = dropout_nonzero(x, 0.5)
    assert (d[:, 10:] == 0).all() and set(d.unique().tolist()) <= {0.0, 2.0}
    assert abs(float(d[:, :10].mean()) - 1.0) < 0.05
    assert net.transform(0, x).shape == (400, 16)
