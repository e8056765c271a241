"""Training across tiers: the device trains its stages, streams its last stage's outputs over
gRPC, the next tier trains its own on them — equal to layer-wise training in one process."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("grpc", reason="the net extra is not installed: offramp[net]")

from offramp.errors import ConfigError, TierError
from offramp.models import blenet
from offramp.tiers.server import ServerConfig, ServerThread
from offramp.tiers.training import (
    TrainServer,
    send_training,
    stage_network,
    tier_outputs,
)
from offramp.training.layerwise import fit_layerwise
from offramp.training.loop import FitConfig

TOKEN = "train-token-0123456789abcdef"


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    from offramp.data import load_digits_splits

    return load_digits_splits(seed=0).train


def test_training_across_tiers_equals_single_process_layerwise(digits):
    x, y = digits
    start = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0)
    cfg = FitConfig(epochs=2, batch_size=64, lr=3e-3, seed=3, show_progress=False)
    one = copy.deepcopy(start)
    fit_layerwise(one, (x, y), cfg)

    device_net, cloud_net = copy.deepcopy(start), copy.deepcopy(start)
    mine = device_net.stages()[:1]
    fit_layerwise(stage_network(mine, 10), (x, y), cfg)  # the device's own stage
    h = tier_outputs(mine, x, cfg)
    srv = ServerThread(TrainServer(cloud_net.stages()[1:], 10, ServerConfig(token=TOKEN)))
    try:
        report = send_training(
            f"127.0.0.1:{srv.port}", h, y, cfg, token=TOKEN, rows_per_message=250
        )
    finally:
        srv.stop()
    assert report["rows"] == len(y) and report["stages"] == [1, 2] and report["epochs"] == 4
    want, before = one.state_dict(), start.state_dict()
    moved = 0
    for name, value in want.items():
        tier = device_net if name.startswith(("blocks.0.", "heads.0.")) else cloud_net
        assert torch.equal(tier.state_dict()[name], value), name
        moved += not torch.equal(value, before[name])
    assert moved > 10  # and training really changed the weights of every tier


def test_a_training_tier_refuses_a_wrong_token_and_bad_settings(digits):
    x, y = digits
    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0)
    h = tier_outputs(net.stages()[:1], x[:64], FitConfig())
    srv = ServerThread(TrainServer(net.stages()[1:], 10, ServerConfig(token=TOKEN)))
    try:
        with pytest.raises(TierError, match="UNAUTHENTICATED"):
            send_training(f"127.0.0.1:{srv.port}", h, y[:64], FitConfig(), token="x" * 20)
        with pytest.raises(ConfigError, match="different row counts"):
            send_training(f"127.0.0.1:{srv.port}", h, y[:63], FitConfig(), token=TOKEN)
        import grpc

        from offramp.tiers.messages import pack_train_chunk
        from offramp.tiers.server import TOKEN_KEY
        from offramp.tiers.training import TRAIN_SERVICE

        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        call = channel.stream_unary(TRAIN_SERVICE)
        for stream, words in [
            ([b"\xff\x01junk"], "not an offramp TrainChunk"),
            ([pack_train_chunk(h, y[:64], '{"epochs": 1, "path": "/etc"}')], "unexpected keys"),
            ([], "no training rows"),
        ]:
            with pytest.raises(grpc.RpcError) as bad:
                call(iter(stream), timeout=10, metadata=((TOKEN_KEY, TOKEN),))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in bad.value.details()
        channel.close()
    finally:
        srv.stop()
