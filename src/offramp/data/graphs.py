"""Node-classification graphs: Cora and Citeseer in the Planetoid split, read from pickle-free
NumPy archives, with the GCN's normalised adjacency.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from offramp.errors import DataError

__all__ = ["Graph", "gcn_adjacency", "load_planetoid"]


@dataclass(frozen=True)
class Graph:
    """One graph for node classification.

    Attributes:
        x: node features ``(N, F)`` float32 (rows normalised to sum 1, as the GCN does).
        edge_index: ``(2, E)`` int64, both directions of every edge, no self loops.
        y: class of every node ``(N,)`` (-1 where unlabelled).
        train, val, test: node indices of the splits.
    """

    x: Tensor
    edge_index: Tensor
    y: Tensor
    train: Tensor
    val: Tensor
    test: Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def adjacency(self) -> Tensor:
        """The GCN's normalised adjacency (:func:`gcn_adjacency`)."""
        return gcn_adjacency(self.edge_index, self.num_nodes)


def gcn_adjacency(edge_index: Tensor, n: int) -> Tensor:
    """``D^{-1/2} (A + I) D^{-1/2}`` as a sparse COO tensor ``(n, n)`` (Kipf & Welling, eq. 2),
    coalesced (rows in order, columns sorted within each row). ``edge_index`` lists both
    directions of every undirected edge; self loops and repeated edges in it are dropped.

    Example:
        >>> a = gcn_adjacency(torch.tensor([[0, 1], [1, 0]]), 3)  # one edge, one lone node
        >>> a.to_dense().tolist()
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    """
    e = edge_index.long()
    e = e[:, e[0] != e[1]]  # self loops given in edge_index would count twice
    e = torch.unique(e, dim=1)  # so would repeated edges
    loops = torch.arange(n).repeat(2, 1)  # (2, n): every node to itself
    idx = torch.cat([e, loops], dim=1)
    deg = torch.bincount(idx[0], minlength=n).double()
    val = (deg[idx[0]] * deg[idx[1]]).rsqrt().float()  # 1/√(d_i d_j), rounded once
    return torch.sparse_coo_tensor(idx, val, (n, n), check_invariants=True).coalesce()


_SPLITS = ("train_idx", "val_idx", "test_idx")


def _dense_from_csr(
    p: Path, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n: int, f: int
) -> Tensor:
    """The ``(n, f)`` float32 matrix of CSR parts read from a file, checked first (a crafted
    file must not index out of bounds: torch's sparse tensors skip that check by default)."""
    nnz = len(indices)
    if (
        n < 0
        or f < 0
        or indptr.shape != (n + 1,)
        or len(data) != nnz
        or indptr[0] != 0
        or indptr[-1] != nnz
        or (np.diff(indptr) < 0).any()
        or (nnz and not 0 <= int(indices.min()) <= int(indices.max()) < f)
    ):
        raise DataError(f"{p}: the feature matrix's CSR parts do not describe a {n}×{f} matrix")
    rows = np.repeat(np.arange(n), np.diff(indptr))
    x = np.zeros((n, f), dtype=np.float32)
    np.add.at(x, (rows, indices), data)  # repeated entries add up, as in a sparse matrix
    return torch.from_numpy(x)


def load_planetoid(path: str | Path) -> Graph:
    """A Planetoid graph from its ``.npz`` archive (``cora.npz``, ``citeseer.npz``: features as
    CSR parts, ``edge_index``, ``y``, ``train_idx`` / ``val_idx`` / ``test_idx``).

    Raises:
        DataError: the file is missing or lacks an array (named).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} not found: point load_planetoid at cora.npz or citeseer.npz")
    with np.load(p, allow_pickle=False) as d:
        need = ("x_indptr", "x_indices", "x_data", "x_shape", "edge_index", "y")
        missing = [k for k in (*need, *_SPLITS) if k not in d.files]
        if missing:
            raise DataError(f"{p} lacks the arrays {missing}")
        n, f = (int(v) for v in d["x_shape"])
        x = _dense_from_csr(
            p, d["x_indptr"].astype(np.int64), d["x_indices"].astype(np.int64), d["x_data"], n, f
        )
        rows = x.sum(dim=1, keepdim=True)  # (N, 1)
        x = x / rows.clamp_min(1e-12)
        arrays = {k: d[k].astype(np.int64) for k in ("edge_index", "y", *_SPLITS)}
    _check_nodes(p, arrays, n)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Graph(x, t["edge_index"], t["y"], t["train_idx"], t["val_idx"], t["test_idx"])


def _check_nodes(p: Path, a: dict[str, np.ndarray], n: int) -> None:
    """Refuse edges, labels and splits that do not fit ``n`` nodes, naming the array."""
    e = a["edge_index"]
    if e.ndim != 2 or e.shape[0] != 2 or (e.size and not 0 <= e.min() <= e.max() < n):
        raise DataError(f"{p}: edge_index must be (2, E) node indices 0 … {n - 1}")
    if a["y"].shape != (n,):
        raise DataError(f"{p}: y holds {a['y'].shape} labels for {n} nodes")
    for k in _SPLITS:
        if a[k].ndim != 1 or (a[k].size and not 0 <= a[k].min() <= a[k].max() < n):
            raise DataError(f"{p}: {k} must list node indices 0 … {n - 1}")
