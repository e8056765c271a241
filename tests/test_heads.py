import pytest
import torch

from offramp import HEADS, make_head
from offramp.errors import ConfigError

SHAPES = [(6, 9, 9), (3, 4, 4), (12,), (4, 10)]


def _cases():
    for name in sorted(HEADS):
        for shape in SHAPES:
            spatial = len(shape) >= 2
            needs3 = name in ("mixpool", "conv")
            if (
                name in ("linear", "mlp")
                or (name == "pool" and spatial)
                or (needs3 and len(shape) == 3)
            ):
                yield name, shape


@pytest.mark.parametrize("name,shape", list(_cases()))
def test_head_battery(name, shape):
    torch.manual_seed(0)
    head = make_head(name, shape, 7)
    h = torch.randn(5, *shape, requires_grad=True)
    out = head(h)
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_every_head_is_covered():
    assert {n for n, _ in _cases()} == set(HEADS)


@pytest.mark.parametrize("name", ["pool", "mixpool", "conv"])
def test_spatial_heads_refuse_flat_features(name):
    with pytest.raises(ConfigError, match=r"\(12,\).*'linear'"):
        make_head(name, (12,), 3)


def test_unknown_head():
    with pytest.raises(ConfigError, match="unknown head 'big'.*'linear'"):
        make_head("big", (4,), 2)
