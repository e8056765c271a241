import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offramp import attach_exits
from offramp.errors import ConversionError, ShapeError


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h)) * self.scale
        h = F.max_pool2d(h, 2).flatten(1)
        return self.fc(h) * self.scale  # `scale` is used on both sides of a cut


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.out(h)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.a(x)
        return x


def test_sequential_slicing_equals_model():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    x = torch.rand(5, 1, 8, 8)
    net = attach_exits(model, at=[2, "4"], example_input=x[:1], head="mlp")
    assert net.num_exits == 3 and net.input_shape == (1, 8, 8) and net.num_classes == 10
    with torch.no_grad():
        assert torch.equal(net(x).final, model(x))
    assert net(x)[0].shape == (5, 10)
    assert net.blocks[0][1] is model[1]  # parameters are shared, not copied


def test_fx_split_equals_model():
    model = SmallCNN().eval()
    x = torch.rand(3, 1, 16, 16)
    net = attach_exits(model, at=["conv1", "conv2"], example_input=x[:1], head=["pool", "linear"])
    with torch.no_grad():
        torch.testing.assert_close(net(x).final, model(x), rtol=0, atol=0)
        assert [tuple(o.shape) for o in net(x)] == [(3, 10)] * 3


def test_fx_cut_after_whole_residual_block():
    model = Res()
    x = torch.rand(4, 6)
    net = attach_exits(model, at=["block"], example_input=x)
    with torch.no_grad():
        assert torch.equal(net(x).final, model(x))


def test_fx_cut_inside_residual_block_is_refused():
    with pytest.raises(ConversionError, match=r"cannot cut after 'block.0': 2 values cross"):
        attach_exits(Res(), at=["block.0"], example_input=torch.rand(1, 6))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConversionError, match=r"unknown layer name 'conv9'.*'conv1'.*'fc'"):
        attach_exits(SmallCNN(), at=["conv9"], example_input=torch.rand(1, 1, 16, 16))
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match=r"out of range"):
        attach_exits(seq, at=[7], example_input=torch.rand(1, 4))


def test_untraceable_model_explains():
    with pytest.raises(ConversionError, match="torch.fx could not trace Branchy"):
        attach_exits(Branchy(), at=["a"], example_input=torch.rand(1, 4))


def test_exit_after_last_layer_is_refused():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="last layer"):
        attach_exits(seq, at=[1], example_input=torch.rand(1, 4))


class _ConvBnRelu(nn.Module):
    """A block whose forward ends in a functional op: ``F.relu(self.bn(self.conv(x)))``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.nn.functional.relu(self.bn(self.conv(x)))


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = _ConvBnRelu(1, 4), _ConvBnRelu(4, 4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).flatten(1))


def test_an_exit_is_cut_at_the_named_modules_output_functional_ops_included():
    torch.manual_seed(0)
    model = _TwoBlocks().eval()
    x = torch.randn(5, 1, 8, 8)
    net = attach_exits(model, at=["b1"], example_input=x, head="linear").eval()
    h = net.blocks[0](x)
    torch.testing.assert_close(h, model.b1(x))  # post-ReLU: what b1 returns
    assert (h >= 0).all()
    torch.testing.assert_close(net(x).final, model(x))  # the ReLU did not move to block 1


# --- networks beyond CNNs: transformer layers, recurrent layers, token features ---------------


def test_transformer_encoder_layers_are_cut_points():
    from .families import TextTransformer, padded_ids

    model = TextTransformer().eval()
    x = padded_ids(6, 12)
    # was: unknown layer name 'encoder.layers.0'; valid names … ['embed', 'encoder', 'fc']
    net = attach_exits(
        model, at=["encoder.layers.0", "encoder.layers.1"], example_input=x[:2], trim_padding=True
    )
    assert net.num_exits == 3
    with torch.no_grad():
        torch.testing.assert_close(net(x).final, model(x), rtol=0, atol=1e-5)
    # the padding mask travels with the hidden states: (h, pad) after every layer
    h, pad = net.blocks[0](x)
    assert h.shape == (6, 12, 32) and pad.dtype == torch.bool and torch.equal(pad, x == 0)
    # token ids of any length: the example's length is not the only one accepted
    assert net.input_shape == (None,)
    with torch.no_grad():
        assert net(padded_ids(3, 7)).final.shape == (3, 5)
    with pytest.raises(ShapeError, match=r"\(B, any\)"):
        net(padded_ids(3, 7)[None])


def test_pool_head_on_tokens_pools_over_tokens_not_features():
    from offramp.heads import TokenPool

    from .families import TextTransformer, padded_ids

    model = TextTransformer(mask=False).eval()
    net = attach_exits(model, at=["encoder.layers.0"], example_input=padded_ids(2, 12), head="pool")
    pool, linear = net.heads[0]
    # was Linear(12 -> 5): the mean over the 32 features, tokens taken for channels
    assert isinstance(pool, TokenPool) and linear.in_features == 32


def test_flat_heads_are_refused_on_padded_tokens():
    from .families import TextTransformer, padded_ids

    with pytest.raises(ConversionError, match=r"head 'linear' after 'encoder.layers.0'.*'mean'"):
        attach_exits(
            TextTransformer(), at=["encoder.layers.0"], example_input=padded_ids(2), head="linear"
        )


@pytest.mark.parametrize("cell", [torch.nn.GRU, torch.nn.LSTM])
def test_recurrent_layers_are_cut_after_their_output_is_unpacked(cell):
    from .families import RecurrentNet, padded_ids

    model = RecurrentNet(cell).eval()
    x = padded_ids(4, 9)
    # was: a block produced tuple, not a tensor
    net = attach_exits(model, at=["rnn1"], example_input=x[:2], head="last")
    with torch.no_grad():
        assert torch.equal(net(x).final, model(x))
        assert net.blocks[0](x).shape == (4, 9, 24)


def test_a_tuple_output_that_cannot_be_cut_names_the_layer():
    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(3, 5, batch_first=True)
            self.keep = torch.nn.Identity()  # a layer that takes the tuple whole

        def forward(self, x):
            return self.keep(self.gru(x))[0][:, -1]

    with pytest.raises(
        ConversionError, match=r"cannot cut after 'gru' \(GRU\): its output is a tuple of 2"
    ):
        attach_exits(Direct(), at=["gru"], example_input=torch.randn(2, 4, 3))


def test_nested_tensor_container_is_matched_at_padding_too():
    from .families import TextTransformer, padded_ids

    class MeanOverTokens(TextTransformer):  # reads the padded positions too
        def forward(self, x):
            h = self.encoder(self.embed(x), src_key_padding_mask=x == 0)
            return self.fc(h.mean(1))

    model = MeanOverTokens(nested=True).eval()
    assert model.encoder.use_nested_tensor
    x = padded_ids(8, 12)
    net = attach_exits(model, at=["encoder.layers.0"], example_input=x[:2])
    with torch.no_grad():
        torch.testing.assert_close(net(x).final, model(x), rtol=0, atol=1e-5)
