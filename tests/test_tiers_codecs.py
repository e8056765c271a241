"""Activation codecs: exact where they promise it, within their error bounds elsewhere, the
bytes they promise, and malformed messages refused (they come from the network)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.errors import ConfigError, DataError, NonFiniteError
from offramp.tiers.codecs import (
    CODECS,
    affine_int8,
    decode,
    decode_activation,
    encode,
    encode_activation,
)


def features(seed=0, shape=(4, 8, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    return torch.relu(torch.randn(shape, generator=g)) * scales  # channels of unequal range


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_keeps_dtype_and_shape_within_the_codecs_bound(codec, dtype):
    x = features().to(dtype)
    e = encode(x, codec)
    y = decode(e)
    assert y.dtype == dtype and y.shape == x.shape and e.dtype == str(dtype).split(".")[1]
    err = (y.double() - x.double()).abs()
    if codec == "fp32" and dtype != torch.float64:
        assert torch.equal(y, x)  # lossless for every dtype float32 holds exactly
    elif codec == "fp16":
        assert bool((err <= x.double().abs() * 2**-11 + 1e-7).all())
    elif codec == "int8":
        scale = torch.frombuffer(bytearray(e.scale), dtype=torch.float32)
        assert float(err.max()) <= float(scale) / 2 * 1.001 + _rounding(dtype, x)
    elif codec == "int8-channel":
        scale = torch.frombuffer(bytearray(e.scale), dtype=torch.float32).reshape(1, -1, 1, 1)
        assert bool((err <= scale.double() / 2 * 1.001 + _rounding(dtype, x)).all())


def _rounding(dtype, x):
    """What casting the decoded float32 back to ``dtype`` may add."""
    if dtype in (torch.float16, torch.bfloat16):
        return float(x.double().abs().max()) * torch.finfo(dtype).eps
    return 0.0


def test_int8_sends_a_quarter_of_fp32s_bytes_and_fp16_half():
    x = features(shape=(64, 32, 8, 8))
    sizes = {c: encode(x, c).nbytes for c in CODECS}
    assert sizes["fp32"] == x.numel() * 4 and sizes["fp16"] == x.numel() * 2
    assert sizes["int8"] == x.numel() + 8  # one float32 scale, one int32 zero point
    assert sizes["int8-channel"] == x.numel() + 32 * 8
    assert sizes["fp32"] / sizes["int8-channel"] > 3.9


def test_per_channel_int8_is_more_accurate_on_channels_of_unequal_range():
    x = features(shape=(16, 8, 6, 6))
    per_tensor = (decode(encode(x, "int8")) - x).abs()
    per_channel = (decode(encode(x, "int8-channel")) - x).abs()
    quiet = slice(0, 4)  # the channels of smallest range
    assert per_channel[:, quiet].max() < per_tensor[:, quiet].max() / 10


def test_zero_is_exact_in_int8_and_the_hand_computed_parameters():
    x = torch.tensor([0.0, 0.5, 2.55, 1.0])
    assert decode(encode(x, "int8"))[0] == 0.0
    scale, zp = affine_int8(torch.tensor([-1.0]), torch.tensor([1.55]))
    assert float(scale) == pytest.approx(0.01) and int(zp) == -28  # -1.0 -> -128, 0 -> -28
    scale, zp = affine_int8(torch.tensor([3.0]), torch.tensor([3.0]))  # range widened to hold 0
    assert float(scale) == pytest.approx(3 / 255) and int(zp) == -128


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
    st.sampled_from(["int8", "int8-channel"]),
)
def test_int8_error_is_at_most_half_a_step(values, codec):
    x = torch.tensor(values, dtype=torch.float32).reshape(1, -1)  # (1, N): N channels
    e = encode(x, codec, axis=1)
    scale = torch.frombuffer(bytearray(e.scale), dtype=torch.float32)
    err = (decode(e) - x).abs().reshape(-1)
    assert bool((err <= scale / 2 * 1.0001 + 1e-6).all())


def test_token_features_per_channel_on_the_last_axis_and_masks_travel_raw():
    h = features(shape=(3, 7, 16)).reshape(3, 7, 16)
    pad = torch.tensor([[False] * 5 + [True] * 2, [False] * 7, [False] * 3 + [True] * 4])
    parts = encode_activation((h, pad), "int8-channel", axis=-1)
    assert [p.codec for p in parts] == ["int8-channel", "raw"] and parts[0].axis == 2
    back_h, back_pad = decode_activation(parts)
    assert torch.equal(back_pad, pad) and back_h.shape == h.shape
    ids = torch.tensor([[2049, 70000, 0]])
    assert torch.equal(decode(encode(ids, "int8")), ids)  # integers are never quantised
    assert decode_activation(encode_activation(h, "fp32")).shape == h.shape


def test_empty_and_constant_tensors():
    for codec in CODECS:
        assert decode(encode(torch.zeros(0, 4), codec)).shape == (0, 4)
        assert torch.equal(decode(encode(torch.zeros(2, 3), codec)), torch.zeros(2, 3))


def test_bad_inputs_are_refused_with_the_fix():
    x = features()
    with pytest.raises(ConfigError, match="unknown codec 'int4'"):
        encode(x, "int4")
    with pytest.raises(ConfigError, match="axis 4 is out of range"):
        encode(x, "int8-channel", axis=4)
    with pytest.raises(ConfigError, match="complex"):
        encode(torch.zeros(2, dtype=torch.complex64))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for codec in ("fp16", "int8", "int8-channel"):
        with pytest.raises(NonFiniteError, match="NaN or infinite"):
            encode(bad, codec)
    with pytest.raises(NonFiniteError, match="fp16 cannot hold"):
        encode(torch.tensor([1e5]), "fp16")
    assert torch.isnan(decode(encode(bad, "fp32"))).any()  # fp32 carries what it is given


def test_malformed_messages_are_refused_not_read():
    e = encode(features(), "int8-channel")
    cases = [
        (dataclasses.replace(e, payload=e.payload[:-1]), "payload holds"),
        (dataclasses.replace(e, shape=(4, 8, 5, 6)), "payload holds"),
        (dataclasses.replace(e, scale=e.scale[:4]), "scale holds"),
        (dataclasses.replace(e, zero_point=b""), "zero_point holds"),
        (dataclasses.replace(e, axis=7), "axis 7 is out of range"),
        (dataclasses.replace(e, codec="zip"), "unknown dtype"),
        (dataclasses.replace(e, dtype="object"), "unknown dtype"),
        (dataclasses.replace(e, shape=(4, -8, 5, 5)), "bad shape"),
        (dataclasses.replace(e, codec="raw", dtype="float32"), "must hold integers"),
    ]
    for msg, match in cases:
        with pytest.raises(DataError, match=match):
            decode(msg)
    with pytest.raises(DataError, match="at least one tensor"):
        decode_activation([])


def test_codec_report_counts_bytes_by_hand_and_fp32_is_the_runtime():
    from offramp import EarlyExitRuntime, ThresholdPolicy
    from offramp.models import blenet
    from offramp.tiers import codec_report

    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0).eval()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = net(x)[0].softmax(1).max(1).values
    t = float(first.median())
    policy = ThresholdPolicy("max_prob", (t, t))  # half the rows leave at exit 0
    want = EarlyExitRuntime(net, policy)(x)
    rows = {r["codec"]: r for r in codec_report(net, policy, x, y, split=1)}
    forwarded = float((want.exits > 0).double().mean())
    assert 0 < forwarded < 1  # some rows leave on the device, some are sent
    assert rows["fp32"]["accuracy"] == float((want.predictions == y).double().mean())
    assert rows["fp32"]["forwarded"] == forwarded and rows["fp32"]["exits_changed"] == 0
    c, hw = 5, 5 * 5  # stage 1 receives B-LeNet's first block: (5, 5, 5) at 8x8 input
    values = c * hw
    assert rows["fp32"]["bytes_per_sample"] == 4 * values
    assert rows["fp16"]["bytes_per_sample"] == 2 * values
    assert rows["int8"]["bytes_per_sample"] == values + 8  # a scale and a zero point
    assert rows["int8-channel"]["bytes_per_sample"] == values + 8 * c
    assert rows["int8"]["ratio_to_fp32"] == 4 * values / (values + 8)
    # a request of 4 rows shares one scale and zero point
    four = codec_report(net, policy, x, y, split=1, codecs=["int8"], request_rows=4)[0]
    assert four["bytes_per_sample"] < values + 8
    with pytest.raises(ConfigError, match="unknown codecs"):
        codec_report(net, policy, x, y, codecs=["int4"])
