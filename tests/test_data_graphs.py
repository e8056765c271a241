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


def _planetoid(path, indptr, indices, data, shape):
    np.savez(
        path,
        x_indptr=np.array(indptr),
        x_indices=np.array(indices),
        x_data=np.array(data, dtype=np.float32),
        x_shape=np.array(shape),
        edge_index=np.array([[0, 1], [1, 0]]),
        y=np.array([0, 1, 1]),
        train_idx=np.array([0]),
        val_idx=np.array([1]),
        test_idx=np.array([2]),
    )


def test_features_are_the_csr_matrix_repeated_entries_added(tmp_path):
    _planetoid(tmp_path / "g.npz", [0, 2, 2, 5], [1, 3, 0, 0, 2], [1, 3, 1, 1, 2], (3, 4))
    x = load_planetoid(tmp_path / "g.npz").x
    want = torch.tensor([[0, 1, 0, 3], [0, 0, 0, 0], [2, 0, 2, 0]], dtype=torch.float32)
    torch.testing.assert_close(x, want / want.sum(1, keepdim=True).clamp_min(1e-12))


@pytest.mark.parametrize(
    "indptr, indices, data",
    [
        ([0, 1, 1, 2], [0, 4], [1, 1]),  # a column past the 4 features
        ([0, 1, 1, 2], [0, -1], [1, 1]),  # a negative column
        ([0, 2, 1, 2], [0, 1], [1, 1]),  # row pointers going back
        ([0, 1, 2], [0, 1], [1, 1]),  # pointers for 2 rows, not 3
        ([0, 1, 1, 3], [0, 1], [1, 1]),  # more entries promised than given
    ],
)
def test_a_crafted_feature_matrix_is_refused_not_read_out_of_bounds(
    tmp_path, indptr, indices, data
):
    _planetoid(tmp_path / "g.npz", indptr, indices, data, (3, 4))
    with pytest.raises(DataError, match=r"do not describe a 3×4 matrix"):
        load_planetoid(tmp_path / "g.npz")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"edge_index": np.array([[0, 3], [3, 0]])}, "edge_index must be"),
        ({"edge_index": np.array([0, 1])}, "edge_index must be"),
        ({"y": np.array([0, 1])}, "y holds"),
        ({"test_idx": np.array([5])}, "test_idx must list"),
    ],
)
def test_edges_labels_and_splits_must_fit_the_nodes(tmp_path, change, match):
    _planetoid(tmp_path / "g.npz", [0, 1, 1, 2], [0, 1], [1, 1], (3, 4))
    with np.load(tmp_path / "g.npz") as d:
        arrays = {**dict(d), **change}
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_planetoid(tmp_path / "g.npz")
