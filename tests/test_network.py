import re

import pytest
import torch
from torch import nn

from offramp import EarlyExitRuntime, MultiExitNetwork, ThresholdPolicy
from offramp.errors import ConfigError, DataError, NonFiniteError, ShapeError
from offramp.models import MODELS
from offramp.network import check_input, input_dtype


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
    # bad values, not a bad shape: a NonFiniteError (a DataError, a ValueError)
    with pytest.raises(NonFiniteError, match=r"\(64, 1, 8, 8\) contains 1 NaN"):
        rt(x)
    with pytest.raises(NonFiniteError, match="NaN"):
        rt.run_one(x[3:4])
    x[3, 0, 2, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="impute") as info:
        check_input(x, (1, 8, 8))
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
    assert not isinstance(info.value, ShapeError)


FIXES = {
    torch.float64: "x.float()",
    torch.float16: "x.float()",
    torch.bfloat16: "x.float()",
    torch.int64: "x.float()",
    torch.bool: "x.float()",
    torch.uint8: "x.float() / 255",
}


@pytest.mark.parametrize("dtype", list(FIXES), ids=str)
def test_wrong_input_dtype_names_the_expected_dtype_and_the_fix(dtype):
    x = torch.ones(2, 1, 8, 8, dtype=dtype)
    with pytest.raises(ShapeError, match=r"torch\.float32.*" + re.escape(str(dtype))) as info:
        check_input(x, (1, 8, 8), dtype=torch.float32)
    assert FIXES[dtype] in str(info.value)
    check_input(x, (1, 8, 8))  # no dtype given: not checked
    check_input(x, (1, 8, 8), dtype=dtype)


def test_input_dtype_is_the_parameters_dtype_unless_the_network_takes_indices(cnn):
    assert input_dtype(cnn) == torch.float32
    net = MultiExitNetwork([nn.Linear(2, 2)], {0: nn.Linear(2, 2)}).double()
    assert input_dtype(net) == torch.float64
    with pytest.raises(ShapeError, match=r"x\.double\(\)"):
        check_input(torch.ones(1, 2), None, dtype=input_dtype(net))
    # token ids go into an embedding: any integer input is right, floats are refused clearly
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten())
    ids = input_dtype(MultiExitNetwork([emb], {0: nn.Linear(8, 2)}))
    assert ids == torch.long
    for ok in (torch.int64, torch.int32, torch.uint8):
        check_input(torch.ones(1, 2, dtype=ok), None, dtype=ids)
    for bad in (torch.float32, torch.bool):
        with pytest.raises(ShapeError, match=r"integer indices.*x\.long\(\)"):
            check_input(torch.ones(1, 2, dtype=bad), None, dtype=ids)
    assert input_dtype(MultiExitNetwork([nn.Flatten()], {0: nn.Flatten()})) is None


def test_exit_index_out_of_range(cnn):
    with pytest.raises(ConfigError, match="out of range"):
        cnn.truncate(3)
