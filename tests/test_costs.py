import numpy as np
import pytest
import torch
from torch import nn

from offramp import MultiExitNetwork, expected_cost, profile
from offramp.costs import count_flops
from offramp.errors import ConfigError, ShapeError


def test_linear_flops_by_hand():
    # y = W x: 3 outputs × 4 inputs multiply–adds = 12 MACs = 24 FLOPs per sample
    assert count_flops(nn.Linear(4, 3), torch.randn(1, 4)) == 24
    assert count_flops(nn.Linear(4, 3), torch.randn(5, 4)) == 5 * 24


def test_conv_flops_by_hand():
    # 2 · Cout · Hout · Wout · Cin · k · k = 2 · 5 · 30 · 30 · 1 · 5 · 5 (padding 3 on 28×28)
    conv = nn.Conv2d(1, 5, 5, padding=3)
    assert count_flops(conv, torch.randn(1, 1, 28, 28)) == 2 * 5 * 30 * 30 * 1 * 25


def _toy() -> MultiExitNetwork:
    blocks = [nn.Linear(4, 8, bias=False), nn.Linear(8, 6, bias=False), nn.Linear(6, 6)]
    heads = {0: nn.Linear(8, 2), 2: nn.Linear(6, 2)}
    return MultiExitNetwork(blocks, heads, input_shape=(4,))


def test_cumulative_cost_by_hand():
    prof = profile(_toy(), torch.randn(3, 4))
    # blocks: 2·4·8 = 64, 2·8·6 = 96, 2·6·6 = 72; heads: 2·8·2 = 32, 2·6·2 = 24
    assert prof.block_flops == (64.0, 96.0, 72.0)
    assert prof.head_flops == (32.0, 24.0)
    # C_0 = f1 + c1 = 96; C_1 = f1 + f2 + f3 + c1 + c2 = 288 (every head on the way is paid)
    np.testing.assert_array_equal(prof.cumulative, [96.0, 288.0])
    assert prof.backbone_flops == 64 + 96 + 72 + 24
    assert prof.activation_bytes == (32, 24, 24)
    assert prof.input_bytes == 16
    assert prof.block_params == (32, 48, 42)


def test_eq12_by_hand():
    # 2 samples exit at 0 (C=96), 1 at exit 1 (C=288): (2·96 + 288) / 3 = 160
    assert expected_cost(np.array([0, 1, 0]), np.array([96.0, 288.0])) == pytest.approx(160.0)
    assert expected_cost(torch.tensor([1, 1]), np.array([96.0, 288.0])) == 288.0
    assert expected_cost(np.array([], dtype=int), np.array([1.0])) == 0.0


def test_profile_table_mentions_every_exit(cnn, digits_x):
    text = profile(cnn, digits_x[:2]).table()
    assert len(text.splitlines()) == 1 + cnn.num_exits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool], ids=str)
def test_profile_refuses_an_example_of_the_wrong_dtype(cnn, digits_x, dtype):
    with pytest.raises(ShapeError, match=r"dtype torch\.float32.*x\.float\(\)"):
        profile(cnn, digits_x[:2].to(dtype))


def test_each_sequence_is_costed_at_its_own_length():
    from offramp.costs import per_sample_cumulative

    from .families import padded_ids, text_transformer_net

    net = text_transformer_net()
    x = padded_ids(6, 20)
    c = per_sample_cumulative(net, x)
    for n in range(6):
        length = int((x[n] != 0).sum())
        alone = profile(net, x[n : n + 1, :length]).cumulative
        assert np.array_equal(c[n], alone)
    padded = profile(net, x[:1].clamp_min(1)).cumulative  # all 20 tokens real
    assert (c <= padded).all() and (c[:, -1] < padded[-1]).any()
    assert expected_cost(np.zeros(6, dtype=int), c) == c[:, 0].mean()
    with pytest.raises(ConfigError, match="token ids"):
        per_sample_cumulative(net, torch.randn(2, 3))
