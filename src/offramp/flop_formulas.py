"""FLOP formulas for the operators ``torch.utils.flop_counter`` does not see on a CPU.

``FlopCounterMode`` counts matrix products and convolutions, but what inference really runs
on a CPU hides work from it:

- ``nn.TransformerEncoderLayer`` in eval mode without gradients takes PyTorch's fused fast path
  (``aten._transformer_encoder_layer_fwd``), counted as zero — on nested tensors (padding
  dropped) too;
- attention (``F.scaled_dot_product_attention``, and the layer above with the fast path off)
  runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula;
- ``nn.LSTM`` in float32 runs oneDNN's ``aten.mkldnn_rnn_layer``, counted as zero (``nn.GRU``
  decomposes into matrix products and is counted as it is);
- a sparse matrix product either counts nothing (``torch.sparse.mm`` →
  ``aten._sparse_addmm``) or counts as dense (``A @ X`` → ``aten.mm``).

:data:`FORMULAS` fills these in, with the counter's convention (a multiply–add is 2 FLOPs;
element-wise work, softmax and normalisation are not counted). They are passed to each counter
(``custom_mapping``), never registered process-wide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import mm_flop, sdpa_flop_count

__all__ = ["FORMULAS", "SPARSE_LAYOUTS"]

aten = torch.ops.aten

#: Layouts of sparse tensors (a product with one of them costs 2 FLOPs per stored entry and
#: output column).
SPARSE_LAYOUTS = frozenset(
    {torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc}
)


def _raw(fn: Callable[..., int]) -> Callable[..., int]:
    fn._get_raw = True  # type: ignore[attr-defined]  # the counter passes tensors, not shapes
    return fn


@_raw
def _sdpa_cpu(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> int:
    # (B, heads, T, d_head) each: Q·Kᵀ and A·V, 2·B·h·T·S·d each
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


@_raw
def _encoder_layer_fast_path(
    src: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    *args: Any,
    **kwargs: Any,
) -> int:
    # args: qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps, norm_weight_1,
    # norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1 (F, D), ffn_bias_1, ...
    ffn = args[10].shape[0]
    d, dh = embed_dim, embed_dim // num_heads
    if src.is_nested:  # padding dropped: each sequence at its own length
        lengths = [int(s[0]) for s in src._nested_tensor_size()]
    else:  # batch-first (B, T, D); the fast path needs batch_first
        lengths = [src.shape[1]] * src.shape[0]
    tokens = sum(lengths)
    pairs = sum(t * t for t in lengths)
    # in-projection (3D), out-projection (D), feed-forward (D→F→D); Q·Kᵀ and A·V
    return 2 * tokens * (d * 3 * d + d * d + 2 * d * ffn) + 2 * 2 * num_heads * pairs * dh


@_raw
def _mkldnn_rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, *args: Any, **kwargs: Any
) -> int:
    # one layer, one direction: per token, gates (G·H rows) from the input (I) and the state (H)
    tokens = input.shape[0] * input.shape[1] if input.dim() == 3 else input.shape[0]
    rows, i = weight_ih.shape
    return 2 * tokens * rows * (i + weight_hh.shape[1])


def _stored(t: Tensor) -> int:
    """Scalars a sparse tensor stores (blocks and dense dimensions of hybrid tensors counted
    in full)."""
    return int((t._values() if t.layout == torch.sparse_coo else t.values()).numel())


def _sparse_product(a: Tensor, b: Tensor) -> int | None:
    if a.layout in SPARSE_LAYOUTS:
        return 2 * _stored(a) * b.shape[-1]
    if b.layout in SPARSE_LAYOUTS:
        return 2 * _stored(b) * a.shape[0]
    return None


@_raw
def _sparse_addmm(self: Tensor, mat1: Tensor, mat2: Tensor, *args: Any, **kwargs: Any) -> int:
    n = _sparse_product(mat1, mat2)
    return int(n) if n is not None else int(mm_flop(mat1.shape, mat2.shape))


@_raw
def _mm(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    n = _sparse_product(a, b)
    return int(n) if n is not None else int(mm_flop(a.shape, b.shape))


#: ``custom_mapping`` for ``FlopCounterMode``: operator packet → formula on the real tensors.
FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._transformer_encoder_layer_fwd: _encoder_layer_fast_path,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer,
    aten._sparse_addmm: _sparse_addmm,
    aten.mm: _mm,
}
