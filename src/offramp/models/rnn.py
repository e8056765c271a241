"""Stacked recurrent text classifiers (GRU or LSTM) with an exit after every layer.

Blocks: 0 = word embedding and recurrent layer 0; block ``k`` = recurrent layer ``k``. Inputs
are token ids ``(B, T)`` right-padded with 0 (:class:`offramp.data.text.Vocabulary`); what
travels between blocks is ``(states (B, T, H), pad (B, T))``. The layers run forwards only, so
the states of real tokens never depend on the padding after them: the runtime may trim padding
no live sentence needs, and the heads read the last real token's state (or the mean over real
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import TokenPool
from offramp.models.exits import early_exits
from offramp.network import MultiExitNetwork

__all__ = ["CELLS", "rnn_classifier"]

#: Recurrent cells by name.
CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM}


class _Embed(nn.Module):
    """Token ids ``(B, T)`` → ``(vectors (B, T, E), pad (B, T))``."""

    def __init__(self, vocab_size: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.drop(self.embed(ids)), ids == 0


class _Recurrent(nn.Module):
    """One recurrent layer on ``(x, pad)``: its output states, the mask passed on."""

    def __init__(self, cell: type[nn.RNNBase], d_in: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.rnn = cell(d_in, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, pad = h
        out, _ = self.rnn(x)
        return self.drop(out), pad


def rnn_classifier(
    vocab_size: int,
    num_classes: int,
    *,
    cell: str = "gru",
    layers: int = 3,
    embed_dim: int = 64,
    hidden: int = 128,
    dropout: float = 0.2,
    exits_after: Sequence[int] | None = None,
    head: str = "last",
    seed: int | None = None,
) -> MultiExitNetwork:
    """Build a stacked GRU/LSTM text classifier with early exits after its layers.

    Args:
        vocab_size: words in the vocabulary (ids ``0 … vocab_size − 1``, 0 = padding).
        num_classes: number of classes.
        cell: ``gru`` or ``lstm``.
        layers: recurrent layers.
        embed_dim: word vector width.
        hidden: state width of every layer.
        dropout: dropout on the word vectors and every layer's output (training only).
        exits_after: layers with an early exit (default: every layer but the last).
        head: ``last`` (the last real token's state) or ``mean`` (mean over real tokens).
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = rnn_classifier(100, 6, cell="lstm", layers=2)
        >>> ids = torch.tensor([[5, 9, 2, 0], [7, 0, 0, 0]])
        >>> net.exit_blocks, [tuple(o.shape) for o in net(ids)]
        ((0, 1), [(2, 6), (2, 6)])
    """
    if cell not in CELLS:
        raise ConfigError(f"unknown cell {cell!r}; choose one of {sorted(CELLS)}")
    if head not in ("last", "mean"):
        raise ConfigError(f"recurrent heads read the 'last' or 'mean' token, got {head!r}")
    if layers < 1 or vocab_size < 2:
        raise ConfigError(f"need layers ≥ 1 and vocab_size ≥ 2, got {layers}, {vocab_size}")
    early = early_exits(exits_after, layers)
    if seed is not None:
        torch.manual_seed(seed)
    kind = CELLS[cell]
    blocks: list[nn.Module] = [
        nn.Sequential(
            _Embed(vocab_size, embed_dim, dropout), _Recurrent(kind, embed_dim, hidden, dropout)
        )
    ]
    blocks += [_Recurrent(kind, hidden, hidden, dropout) for _ in range(layers - 1)]
    heads = {
        k: nn.Sequential(TokenPool(head), nn.Linear(hidden, num_classes))
        for k in (*sorted(early), layers - 1)
    }
    return MultiExitNetwork(
        blocks, heads, input_shape=(None,), num_classes=num_classes, trim_padding=True
    )
