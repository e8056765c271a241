import pytest
import torch
from torch import nn

from offramp import EarlyExitRuntime, MultiExitNetwork, ThresholdPolicy
from offramp.errors import ConfigError, ShapeError
from offramp.models import MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
def test_never_firing_equals_plain_backbone(name, criterion):
    net = MODELS[name](8, 10).eval()
    x = torch.rand(40, 1, 8, 8)
    policy = ThresholdPolicy.never(net.num_exits, criterion)
    res = EarlyExitRuntime(net, policy)(x)
    with torch.no_grad():
        plain = net.backbone()(x)
    assert torch.equal(res.logits, plain)
    assert torch.equal(res.predictions, plain.argmax(1))
    assert (res.exits == net.num_exits - 1).all()
    for i in range(1):
        assert res.exits.shape == (40,)
        assert int(EarlyExitRuntime(net, policy).run_one(x[i : i + 1])[1]) == net.num_exits - 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_truncate_and_exit_path_equal_exit_logits(name):
    net = MODELS[name](8, 10).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        outs = net(x)
        for i in range(net.num_exits):
            assert torch.equal(net.truncate(i)(x).final, outs[i])
            assert torch.equal(net.exit_path(i)(x), outs[i])
            assert net.truncate(i).num_exits == i + 1


def test_stages_compose_to_forward(cnn, digits_x):
    with torch.no_grad():
        outs = cnn(digits_x)
        h = digits_x
        for s in cnn.stages():
            h = s.body(h)
            assert torch.equal(s.head(h), outs[s.index])


def test_exit_outputs_behave_like_a_tuple(cnn, digits_x):
    outs = cnn(digits_x)
    assert len(outs) == 3
    assert outs.stack().shape == (3, 64, 10)
    assert outs.final is outs[-1]


def test_last_block_needs_a_head():
    with pytest.raises(ConfigError, match="last block"):
        MultiExitNetwork([nn.Linear(2, 2), nn.Linear(2, 2)], {0: nn.Linear(2, 2)})


def test_heads_sequence_must_align():
    with pytest.raises(ConfigError, match="align"):
        MultiExitNetwork([nn.Linear(2, 2)], [None, nn.Linear(2, 2)])


def test_wrong_input_shape_names_both_shapes(cnn):
    with pytest.raises(ShapeError, match=r"\(B, 1, 8, 8\).*\(3, 8, 8\).*unsqueeze"):
        cnn(torch.rand(3, 8, 8))
    with pytest.raises(ShapeError, match=r"\(2, 1, 9, 9\)"):
        EarlyExitRuntime(cnn, ThresholdPolicy.never(3))(torch.rand(2, 1, 9, 9))


def test_nan_input_is_refused(cnn, digits_x):
    x = digits_x.clone()
    x[3, 0, 2, 2] = float("nan")
    rt = EarlyExitRuntime(cnn, ThresholdPolicy.never(3))
    with pytest.raises(ShapeError, match=r"\(64, 1, 8, 8\) contains 1 NaN"):
        rt(x)
    with pytest.raises(ShapeError, match="NaN"):
        rt.run_one(x[3:4])


def test_exit_index_out_of_range(cnn):
    with pytest.raises(ConfigError, match="out of range"):
        cnn.truncate(3)
