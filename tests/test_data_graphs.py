import numpy as np
import pytest
import torch

from offramp.data.graphs import gcn_adjacency, load_planetoid
from offramp.errors import DataError

from .conftest import data_dir


def test_adjacency_is_symmetric_normalised_with_self_loops():
    edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # a path 0-1-2
    a = gcn_adjacency(edges, 3).to_dense()
    deg = torch.tensor([2.0, 3.0, 2.0])  # with self loops
    want = (torch.eye(3) + torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])) / (
        deg[:, None] * deg
    ).sqrt()
    torch.testing.assert_close(a, want)


def test_planetoid_as_shipped():
    g = load_planetoid(data_dir("graphs") / "cora.npz")
    assert g.x.shape == (2708, 1433) and g.num_classes == 7
    assert g.edge_index.shape == (2, 10556) and g.adjacency()._nnz() == 10556 + 2708
    assert (len(g.train), len(g.val), len(g.test)) == (140, 500, 1000)
    torch.testing.assert_close(g.x.sum(1), torch.ones(2708))  # rows normalised


def test_missing_file_and_array(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_planetoid(tmp_path / "cora.npz")
    np.savez(tmp_path / "bad.npz", y=np.zeros(3))
    with pytest.raises(DataError, match=r"lacks the arrays \['x_indptr'"):
        load_planetoid(tmp_path / "bad.npz")
