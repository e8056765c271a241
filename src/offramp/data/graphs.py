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
        missing = [k for k in (*need, "train_idx", "val_idx", "test_idx") if k not in d.files]
        if missing:
            raise DataError(f"{p} lacks the arrays {missing}")
        n, f = (int(v) for v in d["x_shape"])
        x = torch.sparse_csr_tensor(
            torch.from_numpy(d["x_indptr"].astype(np.int64)),
            torch.from_numpy(d["x_indices"].astype(np.int64)),
            torch.from_numpy(d["x_data"].astype(np.float32)),
            (n, f),
        ).to_dense()
        rows = x.sum(dim=1, keepdim=True)  # (N, 1)
        x = x / rows.clamp_min(1e-12)
        return Graph(
            x=x,
            edge_index=torch.from_numpy(d["edge_index"].astype(np.int64)),
            y=torch.from_numpy(d["y"].astype(np.int64)),
            train=torch.from_numpy(d["train_idx"].astype(np.int64)),
            val=torch.from_numpy(d["val_idx"].astype(np.int64)),
            test=torch.from_numpy(d["test_idx"].astype(np.int64)),
        )
