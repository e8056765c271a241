"""What a codec costs, measured on real data before deployment: bytes on the wire against
accuracy lost.

:func:`codec_report` cuts the network at a split, runs the device segment on the inputs, sends
the rows that go on through each codec — encoded a request at a time, as a device would send
them — and finishes them on the server segment; it reports, per codec, the bytes per
forwarded sample and what changed against sending float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from offramp.activations import concat, select_rows
from offramp.errors import ConfigError
from offramp.export.segment import segment_output, segments
from offramp.network import MultiExitNetwork
from offramp.policies import ExitPolicy
from offramp.tiers.codecs import CODECS, decode_activation, encode_activation

__all__ = ["codec_report"]


@torch.no_grad()
def codec_report(
    net: MultiExitNetwork,
    policy: ExitPolicy,
    x: Tensor,
    y: Tensor,
    split: int = 1,
    *,
    codecs: Sequence[str] = tuple(CODECS),
    request_rows: int = 1,
    axis: int = 1,
) -> list[dict[str, Any]]:
    """Bytes per forwarded sample and accuracy of the tiered network, per codec.

    Args:
        net: the network (eval mode).
        policy: its exit policy.
        x, y: inputs and labels (a test split).
        split: the stage the server starts at.
        codecs: names of :data:`~offramp.tiers.CODECS`.
        request_rows: rows per request: each request's activation is encoded on its own (so
            int8's scale is one request's).
        axis: the channel dimension for ``int8-channel``.

    Returns:
        One row per codec: ``codec``, ``bytes_per_sample`` (payload and quantisation
        parameters of a forwarded sample), ``ratio_to_fp32`` (fp32's bytes over this codec's),
        ``forwarded`` (share of samples sent), ``accuracy``, ``accuracy_drop_pp`` (fp32's
        accuracy minus this codec's, percentage points), ``predictions_changed`` and
        ``exits_changed`` (samples, against fp32).

    Example:
        >>> from offramp import ThresholdPolicy
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8), seed=0).eval()
        >>> rows = codec_report(net, ThresholdPolicy("max_prob", (0.5,)), torch.randn(20, 4),
        ...                     torch.randint(0, 3, (20,)), codecs=["fp32", "int8"])
        >>> [r["codec"] for r in rows], rows[0]["accuracy_drop_pp"]
        (['fp32', 'int8'], 0.0)
    """
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs:
        raise ConfigError(f"unknown codecs {unknown}; choose from {sorted(CODECS)}")
    if request_rows < 1:
        raise ConfigError(f"request_rows must be ≥ 1, got {request_rows}")
    device, server = segments(net.eval(), policy, [split])
    n = x.shape[0]
    out = segment_output(device(x, policy.initial_state(n)))
    logits, exits, rows, h, state = out
    assert rows is not None and h is not None and state is not None
    m = rows.numel()
    results: dict[str, dict[str, Any]] = {}
    for codec in ("fp32", *[c for c in codecs if c != "fp32"]):
        sent, parts = 0, []
        for start in range(0, m, request_rows):
            chunk = torch.arange(start, min(start + request_rows, m))
            enc = encode_activation(select_rows(h, chunk), codec, axis=axis)
            sent += sum(e.nbytes for e in enc)
            parts.append(decode_activation(enc))
        out_logits, out_exits = logits.clone(), exits.clone()
        if m:
            got_logits, got_exits = server(concat(parts), state)
            out_logits[rows], out_exits[rows] = got_logits, got_exits
        pred = out_logits.argmax(1)
        results[codec] = {
            "codec": codec,
            "bytes_per_sample": sent / m if m else 0.0,
            "forwarded": m / n,
            "accuracy": float((pred == y).double().mean()),
            "pred": pred,
            "exits": out_exits,
        }
    ref = results["fp32"]
    out = []
    for codec in codecs:
        r = results[codec]
        out.append(
            {
                "codec": codec,
                "bytes_per_sample": r["bytes_per_sample"],
                "ratio_to_fp32": ref["bytes_per_sample"] / r["bytes_per_sample"]
                if r["bytes_per_sample"]
                else 1.0,
                "forwarded": r["forwarded"],
                "accuracy": r["accuracy"],
                "accuracy_drop_pp": 100 * (ref["accuracy"] - r["accuracy"]),
                "predictions_changed": int((r["pred"] != ref["pred"]).sum()),
                "exits_changed": int((r["exits"] != ref["exits"]).sum()),
            }
        )
    return out
