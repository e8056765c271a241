import pytest
import torch

from offramp.models import MODELS, blenet


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
