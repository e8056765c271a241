"""The wire's messages: protobuf, defined here at import time (no ``protoc`` step, no
generated code to drift from the runtime), and nothing pickled.

The schema, in ``.proto`` terms (package ``offramp.tier``)::

    message Tensor  { string codec = 1; string dtype = 2; repeated int64 shape = 3;
                      bytes payload = 4; bytes scale = 5; bytes zero_point = 6; int32 axis = 7; }
    message Request { string request_id = 1; int32 stage = 2; repeated Tensor h = 3;
                      Tensor state = 4; }
    message Reply   { string request_id = 1; Tensor logits = 2; Tensor exits = 3;
                      Tensor degraded = 4; string tier = 5; }
    message TrainChunk { repeated Tensor h = 1; Tensor y = 2; string config = 3; }
    message TrainReply { string report = 1; }

A request carries the rows a tier forwards — their activation at ``stage`` (each member
encoded with a codec, :mod:`offramp.tiers.codecs`) and their exit tests' state; the reply
carries every row's logits (float32), exit index and whether it was answered degraded
(a later tier did not answer and this one fell back on its last exit). Training across tiers
streams ``TrainChunk`` messages — rows of the activations a tier trains on, their labels, and
(in the first) the training settings as JSON — and gets one ``TrainReply`` (JSON).

:func:`pack_request` / :func:`unpack_request` and :func:`pack_reply` / :func:`unpack_reply`
turn tensors into bytes and back; bytes that are not such a message, or whose tensors do not
decode, raise :class:`~offramp.errors.DataError` saying what was wrong.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from offramp.activations import Activation
from offramp.errors import ConfigError, DataError
from offramp.tiers.codecs import Encoded, decode, decode_activation, encode, encode_activation

__all__ = [
    "Reply",
    "Request",
    "merge_reply",
    "pack_reply",
    "pack_request",
    "pack_train_chunk",
    "pack_train_reply",
    "unpack_reply",
    "unpack_request",
    "unpack_train_chunk",
    "unpack_train_reply",
]

_STRING, _BYTES, _INT64, _INT32, _MESSAGE = 9, 12, 3, 5, 11  # FieldDescriptorProto types
_OPTIONAL, _REPEATED = 1, 3


def _schema() -> dict[str, Any]:
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as exc:
        raise ConfigError(
            "the tier wire needs protobuf and grpcio: pip install 'offramp[net]'"
        ) from exc
    fdp = descriptor_pb2.FileDescriptorProto(
        name="offramp/tier.proto", package="offramp.tier", syntax="proto3"
    )

    def message(name: str, fields: list[tuple[str, int, int, str]]) -> None:
        m = fdp.message_type.add(name=name)
        for number, (field, kind, label, type_name) in enumerate(fields, start=1):
            f = m.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".offramp.tier.{type_name}"

    message(
        "Tensor",
        [
            ("codec", _STRING, _OPTIONAL, ""),
            ("dtype", _STRING, _OPTIONAL, ""),
            ("shape", _INT64, _REPEATED, ""),
            ("payload", _BYTES, _OPTIONAL, ""),
            ("scale", _BYTES, _OPTIONAL, ""),
            ("zero_point", _BYTES, _OPTIONAL, ""),
            ("axis", _INT32, _OPTIONAL, ""),
        ],
    )
    message(
        "Request",
        [
            ("request_id", _STRING, _OPTIONAL, ""),
            ("stage", _INT32, _OPTIONAL, ""),
            ("h", _MESSAGE, _REPEATED, "Tensor"),
            ("state", _MESSAGE, _OPTIONAL, "Tensor"),
        ],
    )
    message(
        "Reply",
        [
            ("request_id", _STRING, _OPTIONAL, ""),
            ("logits", _MESSAGE, _OPTIONAL, "Tensor"),
            ("exits", _MESSAGE, _OPTIONAL, "Tensor"),
            ("degraded", _MESSAGE, _OPTIONAL, "Tensor"),
            ("tier", _STRING, _OPTIONAL, ""),
        ],
    )
    message(
        "TrainChunk",
        [
            ("h", _MESSAGE, _REPEATED, "Tensor"),
            ("y", _MESSAGE, _OPTIONAL, "Tensor"),
            ("config", _STRING, _OPTIONAL, ""),
        ],
    )
    message("TrainReply", [("report", _STRING, _OPTIONAL, "")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"offramp.tier.{name}"))
        for name in ("Tensor", "Request", "Reply", "TrainChunk", "TrainReply")
    }


_classes: dict[str, Any] = {}


def _cls(name: str) -> Any:
    if not _classes:
        _classes.update(_schema())
    return _classes[name]


class Request(NamedTuple):
    """A decoded request: rows forwarded to the tier that runs ``stage``."""

    request_id: str
    stage: int
    h: Activation
    state: Tensor


class Reply(NamedTuple):
    """A decoded reply: per row, logits ``(n, C)``, exit ``(n,)``, degraded ``(n,)`` bool."""

    request_id: str
    logits: Tensor
    exits: Tensor
    degraded: Tensor
    tier: str


def _to_proto(e: Encoded) -> Any:
    return _cls("Tensor")(
        codec=e.codec,
        dtype=e.dtype,
        shape=list(e.shape),
        payload=e.payload,
        scale=e.scale,
        zero_point=e.zero_point,
        axis=e.axis,
    )


def _from_proto(m: Any, what: str) -> Encoded:
    if any(s < 0 for s in m.shape):
        raise DataError(f"{what}: negative dimension in shape {list(m.shape)}")
    return Encoded(
        codec=m.codec,
        dtype=m.dtype,
        shape=tuple(int(s) for s in m.shape),
        payload=bytes(m.payload),
        scale=bytes(m.scale),
        zero_point=bytes(m.zero_point),
        axis=int(m.axis),
    )


def _put_activation(field: Any, h: Activation, codec: str) -> None:
    field.extend(_to_proto(e) for e in encode_activation(h, codec))


def _get_activation(field: Any, what: str) -> Activation:
    if not field:
        raise DataError(f"{what} carries at least one activation tensor; got none")
    return decode_activation([_from_proto(t, f"h[{i}]") for i, t in enumerate(field)])


def _parse(name: str, data: bytes) -> Any:
    msg = _cls(name)()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise DataError(f"not an offramp {name} message ({type(exc).__name__}: {exc})") from exc
    return msg


def pack_request(
    request_id: str, stage: int, h: Activation, state: Tensor, codec: str = "fp32"
) -> bytes:
    """A request's bytes: ``h`` with ``codec`` (integer and boolean members raw), ``state``
    raw.

    Example:
        >>> import torch
        >>> data = pack_request("r1", 1, torch.ones(2, 3), torch.zeros(2, 0, dtype=torch.long))
        >>> r = unpack_request(data)
        >>> r.request_id, r.stage, tuple(r.h.shape), tuple(r.state.shape)
        ('r1', 1, (2, 3), (2, 0))
    """
    msg = _cls("Request")(request_id=request_id, stage=stage)
    _put_activation(msg.h, h, codec)
    msg.state.CopyFrom(_to_proto(encode(state)))
    return msg.SerializeToString()


def unpack_request(data: bytes) -> Request:
    """The request in ``data``; ``DataError`` when it is not one or a tensor does not decode."""
    msg = _parse("Request", data)
    h = _get_activation(msg.h, "a request")
    state = decode(_from_proto(msg.state, "state"))
    return Request(msg.request_id, int(msg.stage), h, state)


def pack_reply(
    request_id: str, logits: Tensor, exits: Tensor, degraded: Tensor, tier: str = ""
) -> bytes:
    """A reply's bytes: logits as float32, exits and the degraded flags raw."""
    msg = _cls("Reply")(request_id=request_id, tier=tier)
    msg.logits.CopyFrom(_to_proto(encode(logits.float())))
    msg.exits.CopyFrom(_to_proto(encode(exits)))
    msg.degraded.CopyFrom(_to_proto(encode(degraded)))
    return msg.SerializeToString()


def unpack_reply(data: bytes) -> Reply:
    """The reply in ``data``, its three tensors checked to describe the same rows."""
    msg = _parse("Reply", data)
    logits = decode(_from_proto(msg.logits, "logits"))
    exits = decode(_from_proto(msg.exits, "exits"))
    degraded = decode(_from_proto(msg.degraded, "degraded"))
    n = exits.shape[0] if exits.dim() == 1 else -1
    if logits.dim() != 2 or logits.shape[0] != n or degraded.shape != exits.shape:
        raise DataError(
            f"a reply's logits {tuple(logits.shape)}, exits {tuple(exits.shape)} and degraded "
            f"{tuple(degraded.shape)} do not describe the same rows"
        )
    return Reply(msg.request_id, logits, exits, degraded.bool(), msg.tier)


def pack_train_chunk(h: Activation, y: Tensor, config: str = "", codec: str = "fp32") -> bytes:
    """Training rows: ``h`` with ``codec`` (fp32 keeps training identical), labels raw, and
    the settings (JSON) in the stream's first chunk."""
    msg = _cls("TrainChunk")(config=config)
    _put_activation(msg.h, h, codec)
    msg.y.CopyFrom(_to_proto(encode(y)))
    return msg.SerializeToString()


def unpack_train_chunk(data: bytes) -> tuple[Activation, Tensor, str]:
    """``(h, y, config)`` of a training chunk; ``DataError`` when malformed or misaligned."""
    msg = _parse("TrainChunk", data)
    h = _get_activation(msg.h, "a training chunk")
    y = decode(_from_proto(msg.y, "y"))
    members = h if isinstance(h, tuple) else (h,)
    if y.dim() != 1 or any(t.shape[0] != y.shape[0] for t in members):
        raise DataError("a training chunk's activation and labels have different row counts")
    return h, y, msg.config


def pack_train_reply(report: str) -> bytes:
    """The trainer's answer: a JSON report."""
    return _cls("TrainReply")(report=report).SerializeToString()


def unpack_train_reply(data: bytes) -> str:
    """The JSON report of a training reply."""
    return str(_parse("TrainReply", data).report)


def merge_reply(
    logits: Tensor,
    exits: Tensor,
    degraded: Tensor,
    where: Tensor,
    reply: Reply | None,
    fallback_exit: int,
) -> None:
    """Write the next tier's answers for rows ``where`` into ``logits``, ``exits`` and
    ``degraded`` (in place); without a reply, those rows keep their logits (this tier's last
    exit), take ``fallback_exit`` and are marked degraded. The one place a tier — device or
    server — takes in what the next one said."""
    if reply is None:
        exits[where] = fallback_exit
        degraded[where] = True
        return
    logits[where] = reply.logits.to(logits.dtype)
    exits[where] = reply.exits
    degraded[where] = reply.degraded
