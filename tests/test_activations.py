import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import EarlyExitRuntime, ThresholdPolicy
from offramp.activations import (
    check_activation,
    concat,
    nbytes_per_sample,
    padding_mask,
    select_rows,
    trim_padding,
)
from offramp.errors import ConversionError

from .families import padded_ids, text_transformer_net


def test_select_rows_keeps_side_inputs_with_their_rows():
    h = torch.arange(12.0).view(4, 3)
    pad = torch.tensor([[True], [False], [True], [False]])
    got_h, got_pad = select_rows((h, pad), torch.tensor([3, 1]))
    assert got_h.tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]
    assert got_pad.tolist() == [[False], [False]]


def test_padding_mask_needs_bool_batch_by_tokens():
    h = torch.zeros(2, 5, 4)
    assert padding_mask(h) is None
    assert padding_mask((h, torch.zeros(2, 5))) is None  # not boolean
    assert padding_mask((h, torch.zeros(2, 4, dtype=torch.bool))) is None  # not (B, T)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert padding_mask((h, torch.ones(2), mask)) is mask


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), extra=st.integers(0, 3))
def test_trim_padding_drops_only_columns_that_are_padding_in_every_row(lengths, extra):
    t = max(lengths) + extra
    pad = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T), right-padded
    h = torch.randn(len(lengths), t, 3)
    other = torch.randn(len(lengths))  # per sample, not per token: kept as it is
    got_h, got_pad, got_other = trim_padding((h, pad, other))
    longest = max(max(lengths), 1) if t else 0
    assert got_h.shape[1] == got_pad.shape[1] == min(longest, t)
    assert torch.equal(got_h, h[:, : got_h.shape[1]]) and torch.equal(got_other, other)
    assert (~pad[:, got_pad.shape[1] :]).sum() == 0  # nothing real was dropped


def test_concat_pads_shorter_token_batches():
    a = (torch.ones(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    b = (torch.full((1, 2, 3), 2.0), torch.zeros(1, 2, dtype=torch.bool))
    h, pad = concat([a, b])
    assert h.shape == (3, 4, 3) and pad[2].tolist() == [False, False, True, True]
    assert h[2, 2:].abs().sum() == 0 and torch.equal(h[2, :2], b[0][0])
    assert torch.equal(
        concat([torch.ones(1, 2), torch.zeros(2, 2)]),
        torch.tensor([[1.0] * 2, [0.0] * 2, [0.0] * 2]),
    )


def test_bytes_count_side_inputs():
    h = torch.zeros(4, 10, 8)  # 320 bytes a sample
    assert nbytes_per_sample(h) == 320
    assert nbytes_per_sample((h, torch.zeros(4, 10, dtype=torch.bool))) == 330


def test_check_activation_names_the_producer_and_the_fix():
    with pytest.raises(
        ConversionError, match=r"block 1 \(GRU\) produced tuple of Tensor, tuple.*out, _ = self.rnn"
    ):
        check_activation((torch.zeros(2, 3), (torch.zeros(1, 2),)), "block 1 (GRU)")
    with pytest.raises(ConversionError, match="different batch sizes"):
        check_activation((torch.zeros(2, 3), torch.zeros(3)), "block 0")


def test_runtime_runs_later_stages_only_up_to_the_longest_live_sequence():
    net = text_transformer_net()
    x = padded_ids(16, 20)
    seen = []
    net.blocks[2].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].shape))
    # exit 0 takes every sample whose max-softmax beats a low threshold; the long ones stay
    policy = ThresholdPolicy("max_prob", (0.0, 2.0))
    lengths = (x != 0).sum(1)
    rt = EarlyExitRuntime(net, policy)
    with torch.no_grad():
        res = rt(x)
    assert res.exits.tolist() == [0] * 16 and not seen  # everyone left at exit 0
    # the long half leaves at exit 0 and never needs the columns beyond the short half
    short = lengths <= lengths.median()
    order = torch.argsort(short.long(), descending=True)
    x = x[order]
    with torch.no_grad():
        logits = net(x)[0]
    score = logits.softmax(1).amax(1)
    tau = float(score[~short[order]].min()) - 1e-6
    keep = score <= tau
    policy = ThresholdPolicy("max_prob", (tau, 2.0))
    seen.clear()
    with torch.no_grad():
        res = EarlyExitRuntime(net, policy)(x)
    stayed = res.exits > 0
    assert stayed.any() and torch.equal(stayed, keep)
    live_max = int(lengths[order][stayed].max())
    assert seen and seen[0][1] == live_max < x.shape[1]


def test_bulk_inference_pools_trimmed_batches_of_different_lengths():
    net = text_transformer_net()
    xs = [padded_ids(8, 20, seed=s) for s in range(3)]
    with torch.no_grad():
        scores = torch.cat([net(x)[0].softmax(1).amax(1) for x in xs])
    policy = ThresholdPolicy("max_prob", (float(scores.median()), 0.0))
    rt = EarlyExitRuntime(net, policy)
    for got, x in zip(rt.map(xs, pool=5), xs, strict=True):
        want = rt(x)
        assert torch.equal(got.exits, want.exits) and torch.equal(got.predictions, want.predictions)


def test_batch_one_and_a_batch_nobody_leaves_drop_their_own_padding():
    net = text_transformer_net()
    x = torch.nn.functional.pad(padded_ids(4, 20), (0, 5))  # padded to 25, longest ≤ 20
    lengths = (x != 0).sum(1).tolist()
    seen = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].shape[1]))
    rt = EarlyExitRuntime(net, ThresholdPolicy("max_prob", (2.0, 2.0)))  # never fires
    for i in range(4):
        rt.run_one(x[i : i + 1])
    assert seen == lengths
    seen.clear()
    rt(x)
    assert seen == [max(lengths)]


def test_bulk_refuses_to_pad_batches_of_a_network_that_does_not_mask_padding():
    from torch import nn

    from offramp.errors import ShapeError

    from .families import recurrent_net

    net = recurrent_net(nn.GRU)
    net.input_shape = (None,)  # as a user might declare it
    rt = EarlyExitRuntime(net, ThresholdPolicy("max_prob", (2.0,)))
    with pytest.raises(ShapeError, match="pad token ids to one length"):
        list(rt.map([padded_ids(4, 20), padded_ids(4, 12)], pool=8))


def test_forward_drops_the_batchs_own_padding_and_gives_the_same_logits():
    net = text_transformer_net()
    x = padded_ids(6, 20)
    wide = torch.nn.functional.pad(x, (0, 30))  # padded to 50
    seen = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].shape[1]))
    with torch.no_grad():
        a, b = net(x), net(wide)
    assert seen == [int((x != 0).sum(1).max())] * 2
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-6)
