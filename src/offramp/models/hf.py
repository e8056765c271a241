"""Hugging Face encoders (BERT, MiniLM, RoBERTa, DistilBERT) with exits after their layers,
without editing the model.

:func:`hf_encoder` wraps a loaded ``transformers`` encoder: block 0 is the embeddings and the
first layer, block ``k`` layer ``k``. What travels between blocks is ``(hidden, pad)``: the
hidden states ``(B, T, D)`` and the padding mask ``(B, T)`` (``True`` at padding, read off the
token ids), which every layer turns into the additive attention mask it expects — so the mask
is compacted with the hidden states and the padding no live sentence needs is trimmed
(:mod:`offramp.activations`). Inputs are token ids ``(B, T)``, right-padded with the model's pad
token; :func:`encode` makes them from text with the model's tokenizer.

Needs the ``hf`` extra (``pip install 'offramp[hf]'``: ``transformers``, ``tokenizers``).
Pretrained weights are read with ``transformers``' own loader (safetensors, no pickle).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import TokenPool
from offramp.models.exits import early_exits
from offramp.network import MultiExitNetwork

__all__ = ["HF_HEADS", "encode", "hf_encoder"]

#: Heads of an encoder's exits: ``cls`` (the ``[CLS]`` token), ``mean`` (mean over the real
#: tokens, as sentence-transformers pool) or ``pooler`` (``[CLS]`` through the model's own
#: pretrained pooler, dense + tanh, as ``BertForSequenceClassification``).
HF_HEADS = ("cls", "mean", "pooler")


def _parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, bool]:
    """The embeddings, the layers, and whether the model is DistilBERT-shaped."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return model.embeddings, encoder.layer, False  # BERT, MiniLM, RoBERTa
    transformer = getattr(model, "transformer", None)
    if transformer is not None and isinstance(getattr(transformer, "layer", None), nn.ModuleList):
        return model.embeddings, transformer.layer, True  # DistilBERT
    raise ConfigError(
        f"hf_encoder takes a BERT-family encoder (BERT, MiniLM, RoBERTa: model.encoder.layer; "
        f"DistilBERT: model.transformer.layer), got {type(model).__name__}; for a task model "
        "such as BertForSequenceClassification pass its encoder (model.bert)"
    )


class _Embed(nn.Module):
    """Token ids ``(B, T)`` → ``(hidden (B, T, D), pad (B, T))``."""

    def __init__(self, embeddings: nn.Module, pad_id: int, distil: bool) -> None:
        super().__init__()
        self.embeddings, self.pad_id, self.distil = embeddings, int(pad_id), distil

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        pad = ids == self.pad_id
        hidden = self.embeddings(ids) if self.distil else self.embeddings(input_ids=ids)
        return hidden, pad


class _Layer(nn.Module):
    """One encoder layer on ``(hidden, pad)``, given the additive mask it expects."""

    def __init__(self, layer: nn.Module, distil: bool) -> None:
        super().__init__()
        self.layer, self.distil = layer, distil

    def forward(self, h: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        hidden, pad = h
        # (B, T) -> (B, 1, 1, T): 0 where attended, the dtype's minimum at padding
        mask = pad[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, mask) if self.distil else self.layer(hidden, attention_mask=mask)
        return (out[0] if isinstance(out, tuple) else out), pad  # transformers 4.x: a tuple


def _head(kind: str, model: nn.Module, d: int, num_classes: int, dropout: float) -> nn.Module:
    if kind == "pooler":
        pooler = getattr(model, "pooler", None)
        if pooler is None or not hasattr(pooler, "dense"):
            raise ConfigError(
                f"head 'pooler' needs the model's pooler, but {type(model).__name__} has none "
                "(DistilBERT, or loaded with add_pooling_layer=False): use 'cls' or 'mean'"
            )
        return nn.Sequential(
            TokenPool("cls"),
            copy.deepcopy(pooler.dense),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(d, num_classes),
        )
    return nn.Sequential(TokenPool(kind), nn.Dropout(dropout), nn.Linear(d, num_classes))


def hf_encoder(
    model: nn.Module,
    num_classes: int,
    *,
    exits_after: Sequence[int] | None = None,
    head: str = "cls",
    shared_head: bool = False,
    dropout: float = 0.1,
    pad_token_id: int | None = None,
) -> MultiExitNetwork:
    """A Hugging Face encoder as a multi-exit network, exits after the chosen layers.

    Args:
        model: a loaded encoder (``AutoModel.from_pretrained(...)``): BERT, MiniLM, RoBERTa
            or DistilBERT. Its modules are shared, not copied.
        num_classes: classes of every exit.
        exits_after: layer indices with an early exit (default: every layer but the last,
            which carries the final exit).
        head: ``cls``, ``mean`` or ``pooler`` (:data:`HF_HEADS`).
        shared_head: one head for every exit (as PABEE shares its classifier) instead of one
            per exit.
        dropout: dropout before each head's output layer (training only).
        pad_token_id: the padding token (default: the model config's ``pad_token_id``).

    Raises:
        ConfigError: not a BERT-family encoder, an unknown head, exits outside the layers.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
        ...                             num_attention_heads=2, intermediate_size=32))
        >>> net = hf_encoder(bert.eval(), 2)
        >>> net.exit_blocks, net.input_shape
        ((0, 1, 2), (None,))
        >>> ids = torch.tensor([[2, 7, 9, 0], [2, 5, 0, 0]])  # right-padded with 0
        >>> [tuple(o.shape) for o in net(ids)]
        [(2, 2), (2, 2), (2, 2)]
    """
    embeddings, layers, distil = _parts(model)
    n = len(layers)
    if head not in HF_HEADS:
        raise ConfigError(f"unknown head {head!r}; choose one of {list(HF_HEADS)}")
    early = early_exits(exits_after, n)
    config = getattr(model, "config", None)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        raise ConfigError("the model's config names no pad_token_id: pass pad_token_id=")
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise ConfigError(
            f"hf_encoder passes each layer an additive attention mask, which attention "
            f"{impl!r} does not take; load the model with attn_implementation='sdpa' or 'eager'"
        )
    if distil and impl == "eager" and _transformers_major() < 5:
        raise ConfigError(
            "DistilBERT's eager attention in transformers 4.x reads a 0/1 mask, not the "
            "additive one hf_encoder passes: load it with attn_implementation='sdpa'"
        )
    d = int(getattr(config, "hidden_size", None) or getattr(config, "dim", 0))
    blocks: list[nn.Module] = [
        nn.Sequential(_Embed(embeddings, pad, distil), _Layer(layers[0], distil))
    ]
    blocks += [_Layer(layer, distil) for layer in layers[1:]]
    shared = _head(head, model, d, num_classes, dropout) if shared_head else None
    heads = {
        k: shared if shared is not None else _head(head, model, d, num_classes, dropout)
        for k in (*sorted(early), n - 1)
    }
    net = MultiExitNetwork(
        blocks, heads, input_shape=(None,), num_classes=num_classes, trim_padding=True
    )
    net.pad_token_id = int(pad)  # what per_sample_cumulative reads
    return net


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def encode(tokenizer: object, texts: Sequence[str], *, max_length: int = 128) -> Tensor:
    """Token ids ``(N, T)`` of ``texts``, right-padded with the tokenizer's pad token to the
    longest (at most ``max_length`` tokens, ``[CLS]`` and ``[SEP]`` included).

    Args:
        tokenizer: a ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(...)``).
        texts: the sentences.
        max_length: longer sentences are truncated.
    """
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ConfigError("encode needs a tokenizer that pads on the right (padding_side='right')")
    out = tokenizer(  # type: ignore[operator]
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return out["input_ids"].long()
