"""Activation codecs: how ``h_i`` crosses the link between tiers.

A codec turns one tensor into an :class:`Encoded` — a name, the tensor's dtype and shape, its
payload as raw bytes and, for int8, the quantisation parameters — and back. Nothing is pickled:
every field is a string, integers or bytes, ready for any wire format.

- ``fp32``: the tensor as float32, lossless for float32 activations;
- ``fp16``: half the bytes of float32, relative error ≤ 2⁻¹¹ in range (values past ±65,504 are
  refused: they would become infinite);
- ``int8``: affine quantisation with one scale and zero point for the whole tensor, a quarter
  of float32's bytes, error ≤ scale / 2 (min–max parameters with zero exactly representable,
  as PyTorch's observers choose them; rounding half to even);
- ``int8-channel``: one scale and zero point per channel (dimension 1: CNN channels; pass
  ``axis=-1`` for token features), for activations whose channels differ in range.

Integer and boolean tensors (padding masks, lengths, token ids) travel raw whatever the codec
(:func:`encode_activation`): they are exact and small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.activations import Activation
from offramp.errors import ConfigError, DataError, NonFiniteError

__all__ = [
    "CODECS",
    "Encoded",
    "affine_int8",
    "decode",
    "decode_activation",
    "encode",
    "encode_activation",
]

#: Codec names, and what each sends per value.
CODECS: dict[str, str] = {
    "fp32": "float32, lossless for float32 activations",
    "fp16": "float16",
    "int8": "int8, one scale and zero point per tensor",
    "int8-channel": "int8, one scale and zero point per channel",
}

_WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _WIRE_DTYPES.items()}
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class Encoded:
    """One tensor as it crosses the wire.

    Attributes:
        codec: ``fp32``, ``fp16``, ``int8``, ``int8-channel`` or ``raw`` (integer and boolean
            tensors, sent as they are).
        dtype: the original dtype's name (``"float32"``); decoding gives it back.
        shape: the original shape.
        payload: the values, C-contiguous, in the codec's storage dtype.
        scale: int8 only: one scale per tensor or per channel (float32 bytes).
        zero_point: int8 only: the matching zero points (int32 bytes).
        axis: ``int8-channel`` only: the channel dimension (non-negative).
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload: bytes
    scale: bytes = b""
    zero_point: bytes = b""
    axis: int = -1

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the values and the quantisation parameters (the few bytes of
        name, dtype and shape aside)."""
        return len(self.payload) + len(self.scale) + len(self.zero_point)


def encode(t: Tensor, codec: str = "fp32", *, axis: int = 1) -> Encoded:
    """Encode one tensor with ``codec`` (integer and boolean tensors travel ``raw``).

    Args:
        t: the tensor (any device; the payload is copied to the host).
        codec: a name of :data:`CODECS`.
        axis: ``int8-channel`` only: the channel dimension (default 1, CNN channels).

    Raises:
        ConfigError: an unknown codec, or an axis the tensor does not have.
        NonFiniteError: ``fp16`` / ``int8`` on NaN or infinite values, or ``fp16`` on values
            it cannot hold.

    Example:
        >>> import torch
        >>> e = encode(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "int8")
        >>> e.codec, e.shape, len(e.payload), decode(e).tolist()
        ('int8', (2, 2), 4, [[0.0, 1.0], [2.0, 3.0]])
    """
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if t.dtype not in _NAMES:
        raise ConfigError(f"cannot send a {t.dtype} tensor; supported: {sorted(_WIRE_DTYPES)}")
    t = t.detach().cpu().contiguous()
    dtype, shape = _NAMES[t.dtype], tuple(t.shape)
    if not t.is_floating_point():
        return Encoded("raw", dtype, shape, _bytes(t))
    if codec == "fp32":
        return Encoded(codec, dtype, shape, _bytes(t.float()))
    _check_finite(t, codec)
    if codec == "fp16":
        big = float(t.abs().max()) if t.numel() else 0.0
        if big > _FP16_MAX:
            raise NonFiniteError(
                f"fp16 cannot hold values up to {big:.3g} (max {_FP16_MAX:.0f}): they would "
                "become infinite; use fp32 or int8"
            )
        return Encoded(codec, dtype, shape, _bytes(t.half()))
    if codec == "int8":
        axis, count, rest = -1, 1, list(range(t.dim()))  # one scale for every value
    elif not -t.dim() <= axis < t.dim():
        raise ConfigError(f"int8-channel axis {axis} is out of range for shape {shape}")
    else:
        axis %= t.dim()
        count, rest = shape[axis], [d for d in range(t.dim()) if d != axis]
    x = t.float()
    if x.numel() == 0:
        lo = hi = torch.zeros(count)
    elif not rest:  # a 0-d tensor, or a 1-d one with a scale per value
        lo = hi = x.reshape(count)
    else:  # (count,) each
        lo, hi = x.amin(dim=rest).reshape(count), x.amax(dim=rest).reshape(count)
    scale, zp = affine_int8(lo, hi)
    view = _channel_view(len(shape), axis, count)
    q = (torch.round(x / scale.reshape(view)) + zp.reshape(view)).clamp(-128, 127)
    return Encoded(codec, dtype, shape, _bytes(q.to(torch.int8)), _bytes(scale), _bytes(zp), axis)


def affine_int8(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) mapping ``[lo, hi]`` onto int8 ``−128 … 127``,
    the range widened to hold 0 so that zero (padding, ReLU's zeros) is exact.

    Example:
        >>> s, z = affine_int8(torch.tensor([0.0]), torch.tensor([2.55]))
        >>> round(float(s), 4), int(z)
        (0.01, -128)
    """
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps).float()
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127).int()
    return scale, zp


def _channel_view(ndim: int, axis: int, count: int) -> list[int]:
    """The shape broadcasting ``count`` parameters along ``axis`` (every axis for ``-1``)."""
    view = [1] * ndim
    if axis >= 0:
        view[axis] = count  # (C,) -> (1, …, C, …, 1)
    return view


def decode(e: Encoded) -> Tensor:
    """The tensor back from an :class:`Encoded` (the original dtype and shape).

    Raises:
        DataError: a malformed message — unknown codec or dtype, a payload or parameters of the
            wrong size, a channel axis out of range.
    """
    if e.dtype not in _WIRE_DTYPES or e.codec not in (*CODECS, "raw"):
        raise DataError(f"unknown dtype {e.dtype!r} or codec {e.codec!r} in an encoded tensor")
    if any(not isinstance(s, int) or s < 0 for s in e.shape):
        raise DataError(f"bad shape {e.shape} in an encoded tensor")
    dtype, n = _WIRE_DTYPES[e.dtype], math.prod(e.shape)
    if e.codec == "raw" and dtype.is_floating_point:
        raise DataError(f"a raw payload must hold integers or booleans, not {e.dtype}")
    store = {"raw": dtype, "fp32": torch.float32, "fp16": torch.float16}.get(e.codec, torch.int8)
    values = _tensor(e.payload, store, n, "payload").reshape(e.shape)
    if e.codec in ("raw", "fp32", "fp16"):
        return values.to(dtype)
    if e.codec == "int8":
        count = 1
    elif 0 <= e.axis < len(e.shape):
        count = e.shape[e.axis]
    else:
        raise DataError(f"channel axis {e.axis} is out of range for shape {e.shape}")
    view = _channel_view(len(e.shape), e.axis if e.codec == "int8-channel" else -1, count)
    scale = _tensor(e.scale, torch.float32, count, "scale").reshape(view)
    zp = _tensor(e.zero_point, torch.int32, count, "zero_point").reshape(view)
    return ((values.float() - zp.float()) * scale).to(dtype)


def encode_activation(h: Activation, codec: str = "fp32", *, axis: int = 1) -> list[Encoded]:
    """Every tensor of an activation (``h`` or ``(h, *side)``): float ones with ``codec``,
    integer and boolean ones (masks, lengths) raw."""
    return [encode(t, codec, axis=axis) for t in (h if isinstance(h, tuple) else (h,))]


def decode_activation(parts: list[Encoded]) -> Activation:
    """The inverse of :func:`encode_activation`: one tensor, or a tuple of them."""
    if not parts:
        raise DataError("an encoded activation holds at least one tensor")
    out = tuple(decode(e) for e in parts)
    return out[0] if len(out) == 1 else out


def _bytes(t: Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _tensor(data: bytes, dtype: torch.dtype, n: int, what: str) -> Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if len(data) != n * size:
        raise DataError(f"the {what} holds {len(data)} bytes, not {n} × {size}")
    if n == 0:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)  # a writable copy


def _check_finite(t: Tensor, codec: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"{codec} cannot encode NaN or infinite values ({int((~torch.isfinite(t)).sum())} "
            f"in a tensor of shape {tuple(t.shape)}); use fp32 or clean the activations"
        )
