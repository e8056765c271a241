"""Every formula against a hand count (2 FLOPs per multiply-add; bias and element-wise work
not counted), on each path inference really takes."""

import warnings

import pytest
import torch
from torch import nn

from offramp.costs import count_flops, profile

from .families import TextTransformer, padded_ids


def encoder_flops(lengths, d=64, heads=4, ffn=128, layers=3):
    """Per layer: Q/K/V and output projections, feed-forward; Q·Kᵀ and A·V per head."""
    linear = sum(2 * t * (3 * d * d + d * d + 2 * d * ffn) for t in lengths)
    attention = sum(2 * 2 * heads * t * t * (d // heads) for t in lengths)
    return layers * (linear + attention)


def encoder(nested=False):
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=nested)


class Masked(nn.Module):
    def __init__(self, enc, pad):
        super().__init__()
        self.enc, self.pad = enc, pad

    def forward(self, x):
        return self.enc(x, src_key_padding_mask=self.pad)


@pytest.mark.parametrize("path", ["fast path (eval)", "fast path off", "train"])
def test_transformer_encoder_is_counted_on_every_path(path):
    enc = encoder()
    x = torch.randn(1, 28, 64)
    enc.train(path == "train")
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(path != "fast path off")
    try:
        got = count_flops(enc, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    assert got == encoder_flops([28]) == 6_107_136  # was 0 on the fast path


def test_nested_fast_path_counts_real_tokens_only():
    pad = torch.zeros(2, 28, dtype=torch.bool)
    pad[1, 20:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's note that nested tensors are a prototype
        got = count_flops(Masked(encoder(nested=True).eval(), pad), torch.randn(2, 28, 64))
    assert got == encoder_flops([28, 20])


def test_the_issues_transformer_is_not_costed_at_zero():
    # embedding (0 FLOPs), 3 encoder layers over 28 tokens, linear classifier on one token
    model = TextTransformer(d=64, classes=10, mask=False).eval()
    layer = model.encoder.layers[0]
    assert layer.linear1.out_features == 128
    got = count_flops(model, padded_ids(1, 28).clamp_min(1))
    assert got == encoder_flops([28]) + 2 * 64 * 10


@pytest.mark.parametrize(("cell", "gates"), [(nn.GRU, 3), (nn.LSTM, 4)])
def test_recurrent_layers(cell, gates):
    rnn = cell(32, 64, batch_first=True).eval()
    # per token and layer: gates from the input (32) and the state (64)
    assert count_flops(rnn, torch.randn(2, 10, 32)) == 2 * 2 * 10 * gates * 64 * (32 + 64)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("call", ["sparse.mm", "matmul"])
def test_sparse_products_count_stored_entries(layout, call):
    a = torch.eye(50)
    a[0, 1] = 1.0  # 51 stored entries
    a = a.to_sparse() if layout == "coo" else a.to_sparse_csr()
    x = torch.randn(50, 16)

    class Product(nn.Module):
        def forward(self, h):
            return torch.sparse.mm(a, h) if call == "sparse.mm" else a @ h

    assert count_flops(Product(), x) == 2 * 51 * 16  # not 2·50·50·16 as a dense product
    dense = torch.randn(50, 50)
    assert count_flops(nn.Identity(), x) == 0
    assert count_flops(type("D", (nn.Module,), {"forward": lambda s, h: dense @ h})(), x) == (
        2 * 50 * 50 * 16
    )


def test_scaled_dot_product_attention():
    class Attention(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 4, 10, 8)  # (B, heads, T, d_head)
    assert count_flops(Attention(), q) == 2 * (2 * 2 * 4 * 10 * 10 * 8)


def test_profile_of_a_transformer_with_exits_is_per_block():
    from .families import text_transformer_net

    prof = profile(text_transformer_net(), padded_ids(1, 20).clamp_min(1))
    per_layer = encoder_flops([20], d=32, ffn=64, layers=1)
    assert prof.block_flops[:2] == (per_layer, per_layer)
    assert prof.block_flops[2] == per_layer + 2 * 32 * 5


def test_block_sparse_counts_every_stored_scalar():
    a = torch.ones(4, 4).to_sparse_bsr((2, 2))  # 4 blocks of 2×2 = 16 stored values

    class Product(nn.Module):
        def forward(self, h):
            return a @ h

    assert count_flops(Product(), torch.randn(4, 3)) == 2 * 16 * 3
