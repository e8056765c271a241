import pytest
import torch

from offramp.costs import profile
from offramp.errors import ConfigError
from offramp.models import MODELS, blenet, build_model, vgg
from offramp.network import block_output_shapes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_battery(name):
    torch.manual_seed(0)
    net = MODELS[name](8, 10)
    x = torch.rand(6, 1, 8, 8)
    outs = net(x)
    assert len(outs) == net.num_exits >= 2
    for o in outs:
        assert o.shape == (6, 10) and torch.isfinite(o).all()
    sum(o.square().sum() for o in outs).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    torch.manual_seed(0)
    again = MODELS[name](8, 10)
    for pa, pb in zip(net.parameters(), again.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_blenet_matches_branchynet_shapes():
    net = blenet(28, 10)
    # BranchyNet: conv1 30×30 -> pool 15, conv2 17 -> pool 9, conv3 11 -> pool 6: 20·6·6 = 720
    assert net.blocks[3][1].in_features == 720
    # BranchyNet's branch: conv 5→10 3×3, pool to 8×8, linear 640 → 10
    assert net.heads[0][-1].in_features == 640
    assert net.exit_blocks == (0, 3)


def test_vgg_exit_after_the_stem_and_shapes():
    net = vgg(16, 10, seed=0)
    assert net.exit_blocks == (0, 2) and net.input_shape == (1, 16, 16)
    shapes = block_output_shapes(net.blocks, (1, 16, 16))
    assert shapes == [(32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert net.heads[0][-1].in_features == 32 * 8 * 8  # linear head on the stem's map
    outs = net(torch.zeros(3, 1, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(3, 10), (3, 10)]
    # the stem and its head are a small share of the plain backbone's FLOPs
    rel = profile(net, torch.zeros(1, 1, 16, 16)).relative_cumulative
    assert rel[0] < 0.06 and rel[-1] > 1.0
    two = vgg(16, 10, exits_after=(0, 1), head="conv")
    assert two.exit_blocks == (0, 1, 2) and len(two(torch.zeros(2, 1, 16, 16))) == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"in_size": 4}, {"exits_after": (2,)}, {"stem": (16,)}, {"widths": ()}],
)
def test_vgg_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        vgg(**{"in_size": 16, **kwargs})


def test_build_model_fills_in_each_backbones_defaults():
    assert build_model("vgg", 16, 10).exit_blocks == (0, 2)
    assert build_model("vgg", 16, 10, exits=[1]).exit_blocks == (1, 2)
    assert build_model("resnet", 8, 10, head="linear").num_exits >= 2
    with pytest.raises(ConfigError, match=r"vgg takes early exits after blocks 0 … 1"):
        build_model("vgg", 16, 10, exits=[2])
    with pytest.raises(ConfigError, match="fixed exits"):
        build_model("mlp", 8, 10, exits=[0])
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'"):
        build_model("vgg16", 16, 10)


def test_vit_tokens_heads_and_costs():
    from offramp.models import vit

    net = vit(28, 10, depth=3, seed=0)
    assert net.exit_blocks == (0, 1, 2)
    h = net.blocks[0](torch.zeros(2, 1, 28, 28))
    assert h.shape == (2, 17, 64)  # class token + 16 patches of 7×7
    # per layer on 17 tokens: attention projections 4·D², feed-forward 2·D·F, Q·Kᵀ and A·V
    d, f, t = 64, 128, 17
    layer = 2 * t * (4 * d * d + 2 * d * f) + 2 * 2 * t * t * d
    patches = 2 * 16 * 49 * d
    prof = profile(net, torch.zeros(1, 1, 28, 28))
    assert prof.block_flops == (patches + layer, layer, layer)
    assert prof.head_flops[0] == 2 * d * 10
    with pytest.raises(ConfigError, match="'cls' or 'mean'"):
        vit(head="linear")
    with pytest.raises(ConfigError, match="multiple of patch"):
        vit(30, patch=7)
    assert build_model("vit", 28, 10, exits=[2], head="mean").exit_blocks == (2, 5)


@pytest.mark.parametrize(("cell", "gates"), [("gru", 3), ("lstm", 4)])
def test_rnn_classifier_costs_and_padding(cell, gates):
    from offramp.models import rnn_classifier

    net = rnn_classifier(30, 6, cell=cell, layers=2, embed_dim=8, hidden=16, seed=0).eval()
    ids = torch.tensor([[5, 9, 2, 0, 0], [7, 3, 0, 0, 0]])
    prof = profile(net, ids[:1, :3])  # 3 tokens
    assert prof.block_flops == (2 * 3 * gates * 16 * (8 + 16), 2 * 3 * gates * 16 * (16 + 16))
    # the last real token's state: the trailing padding changes nothing
    with torch.no_grad():
        full = net(ids)
        alone = net(ids[1:, :2])
    torch.testing.assert_close(full[1][1:], alone[1], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="unknown cell"):
        rnn_classifier(30, 6, cell="rnn")
