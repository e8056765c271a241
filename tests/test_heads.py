import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import HEADS, heads, make_head
from offramp.errors import ConfigError
from offramp.heads import TOKEN_HEADS, OnFeatures, TokenPool, max_avg_pool2d

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
                or (name in TOKEN_HEADS and len(shape) == 2)
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


@pytest.mark.parametrize("name", sorted(TOKEN_HEADS))
def test_token_heads_read_only_the_real_tokens(name):
    torch.manual_seed(0)
    head = make_head(name, (6, 4), 3)
    x = torch.randn(2, 6, 4)
    pad = torch.tensor([[False] * 6, [False, False, False, True, True, True]])
    y = x.clone()
    y[1, 3:] = 1e4  # whatever the padding holds
    assert torch.equal(head((x, pad)), head((y, pad)))
    alone = head(x[1:, :3])  # the short sequence on its own, no padding
    torch.testing.assert_close(head((x, pad))[1:], alone, rtol=1e-6, atol=1e-6)


def test_token_pool_by_hand():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])  # (1, 3, 2)
    pad = torch.tensor([[False, False, True]])
    assert TokenPool("mean")((x, pad)).tolist() == [[2.0, 1.0]]
    assert TokenPool("last")((x, pad)).tolist() == [[3.0, 2.0]]
    assert TokenPool("cls")((x, pad)).tolist() == [[1.0, 0.0]]
    assert TokenPool("mean")(x).tolist() == [[3.0, 2.0]]  # no mask: every token is real
    assert TokenPool("last")(x).tolist() == [[5.0, 4.0]]
    left = torch.tensor([[True, False, False]])  # left padding: the last real token is the third
    assert TokenPool("last")((x, left)).tolist() == [[5.0, 4.0]]
    with pytest.raises(ConfigError, match="'mean', 'cls' or 'last'"):
        TokenPool("max")


def test_token_heads_refuse_other_shapes():
    with pytest.raises(ConfigError, match=r"\(T, D\).*\(6, 9, 9\)"):
        make_head("mean", (6, 9, 9), 3)


def test_on_features_gives_the_head_the_features_alone():
    lin = torch.nn.Linear(4, 2)
    h = torch.randn(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(OnFeatures(lin)((h, mask)), lin(h))
    assert torch.equal(OnFeatures(lin)(h), lin(h))


@pytest.mark.parametrize("name", ["pool", "mixpool", "conv"])
def test_spatial_heads_refuse_flat_features(name):
    with pytest.raises(ConfigError, match=r"\(12,\).*'linear'"):
        make_head(name, (12,), 3)


def test_unknown_head():
    with pytest.raises(ConfigError, match="unknown head 'big'.*'linear'"):
        make_head("big", (4,), 2)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    hh=st.integers(1, 17),
    ww=st.integers(1, 17),
    size=st.integers(1, 6),
    channels_last=st.booleans(),
)
def test_max_avg_pool2d_equals_adaptive_pooling(b, c, hh, ww, size, channels_last):
    h = torch.randn(b, c, hh, ww)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    mx, av = max_avg_pool2d(h, size)
    assert torch.equal(mx, F.adaptive_max_pool2d(h, size))
    torch.testing.assert_close(av, F.adaptive_avg_pool2d(h, size), rtol=1e-5, atol=1e-6)


def test_max_avg_pool2d_hand_computed():
    # 3 -> 2: adaptive windows [0, 2) and [1, 3) overlap in the middle row and column
    h = torch.arange(9.0).reshape(1, 1, 3, 3)
    mx, av = max_avg_pool2d(h, 2)
    assert mx.flatten().tolist() == [4.0, 5.0, 7.0, 8.0]
    assert av.flatten().tolist() == [2.0, 3.0, 5.0, 6.0]


@pytest.mark.parametrize("hw", [8, 7])  # equal windows (one reshape) and overlapping ones
def test_compiled_mixpool_takes_the_one_pass_form_and_equals_eager(hw, monkeypatch):
    calls = []

    def counted(h, size):
        calls.append(size)
        return max_avg_pool2d(h, size)

    monkeypatch.setattr(heads, "max_avg_pool2d", counted)
    torch.manual_seed(0)
    head = make_head("mixpool", (3, hw, hw), 5).eval()
    with torch.no_grad():
        head[0].mix.fill_(0.3)
        h = torch.randn(4, 3, hw, hw).contiguous(memory_format=torch.channels_last)
        want = head(h)
        assert not calls  # eager keeps the adaptive poolings
        got = torch.compile(head, dynamic=False)(h)
    assert calls == [head[0].size]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.compile(head, dynamic=False)(h.requires_grad_())  # training keeps adaptive pooling
    assert calls == [head[0].size]
