"""Tiny models of every family, for the batteries (random weights, fast)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from offramp import MultiExitNetwork, attach_exits
from offramp.models import blenet, mlp, resnet, rnn_classifier, vgg, vit


class TextTransformer(nn.Module):
    """Token ids (0 = padding) -> embedding -> nn.TransformerEncoder -> first token -> classes."""

    def __init__(
        self,
        vocab: int = 50,
        d: int = 32,
        layers: int = 3,
        classes: int = 5,
        *,
        mask: bool = True,
        nested: bool = False,
    ) -> None:
        super().__init__()
        self.mask = mask
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)
        self.fc = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        pad = x == 0
        h = self.encoder(self.embed(x), src_key_padding_mask=pad if self.mask else None)
        return self.fc(h[:, 0])


class RecurrentNet(nn.Module):
    """Token ids -> embedding -> two stacked GRU or LSTM layers -> last step -> classes."""

    def __init__(
        self,
        cell: type[nn.RNNBase] = nn.GRU,
        vocab: int = 50,
        d: int = 16,
        hidden: int = 24,
        classes: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn1 = cell(d, hidden, batch_first=True)
        self.rnn2 = cell(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn1(self.embed(x))
        out, _ = self.rnn2(out)
        return self.fc(out[:, -1])


def padded_ids(n: int = 16, t: int = 20, vocab: int = 50, seed: int = 0) -> Tensor:
    """``(n, t)`` token ids in 1 … vocab − 1, right-padded with 0 to lengths 3 … t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    x[torch.arange(t) >= lengths[:, None]] = 0
    return x


def text_transformer_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    model = TextTransformer().eval()
    return attach_exits(
        model,
        at=["encoder.layers.0", "encoder.layers.1"],
        example_input=padded_ids()[:2],
        head="mean",
        trim_padding=True,
    )


def recurrent_net(cell: type[nn.RNNBase], seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    model = RecurrentNet(cell).eval()
    return attach_exits(model, at=["rnn1"], example_input=padded_ids()[:2], head="last")


#: family name -> (network builder, example batch builder)
FAMILIES: dict[str, tuple[Callable[[], MultiExitNetwork], Callable[[], Tensor]]] = {
    "mlp": (lambda: mlp(6, 4, hidden=(16, 16), seed=0), lambda: torch.randn(16, 6)),
    "blenet": (lambda: blenet(8, 10, exits_after=(0, 1), seed=0), lambda: torch.rand(16, 1, 8, 8)),
    "resnet": (
        lambda: resnet(8, 10, widths=(4, 8, 8), blocks_per_stage=(1, 1, 1), seed=0),
        lambda: torch.rand(16, 1, 8, 8),
    ),
    "vgg": (lambda: vgg(16, 10, seed=0), lambda: torch.rand(16, 1, 16, 16)),
    "vit": (lambda: vit(16, 10, patch=4, depth=3, seed=0), lambda: torch.rand(16, 1, 16, 16)),
    "transformer": (text_transformer_net, padded_ids),
    "gru": (lambda: recurrent_net(nn.GRU), padded_ids),
    "rnn_classifier-gru": (
        lambda: rnn_classifier(50, 4, layers=3, hidden=16, seed=0).eval(),
        padded_ids,
    ),
    "rnn_classifier-lstm": (
        lambda: rnn_classifier(50, 4, cell="lstm", layers=2, hidden=16, head="mean", seed=0),
        padded_ids,
    ),
    "lstm": (lambda: recurrent_net(nn.LSTM), padded_ids),
}
