"""offramp.batches: one iterator for evaluation and training, one set of errors."""

import pytest
import torch

from offramp.batches import iterate_batches
from offramp.errors import ConfigError, ShapeError
from offramp.evaluation import ExitRecord
from offramp.models import mlp
from offramp.training import FitConfig, fit


@pytest.mark.parametrize("bs", [0, -1, 2.5, True])
def test_training_and_evaluation_refuse_a_bad_batch_size_alike(bs):
    net = mlp(4, 3, hidden=(8,))
    data = (torch.randn(10, 4), torch.randint(0, 3, (10,)))
    with pytest.raises(ConfigError, match="batch_size must be a whole number ≥ 1") as a:
        ExitRecord.collect(net, data, batch_size=bs)
    with pytest.raises(ConfigError, match="batch_size must be a whole number ≥ 1") as b:
        fit(net, data, FitConfig(epochs=1, batch_size=bs, show_progress=False))
    assert str(a.value) == str(b.value)


def test_training_and_evaluation_refuse_misaligned_tensors_alike():
    net = mlp(4, 3, hidden=(8,))
    data = (torch.randn(10, 4), torch.randint(0, 3, (9,)))
    with pytest.raises(ShapeError, match="differ in length") as a:
        ExitRecord.collect(net, data)
    with pytest.raises(ShapeError, match="differ in length") as b:
        fit(net, data, FitConfig(epochs=1, show_progress=False))
    assert str(a.value) == str(b.value)


def test_ranks_split_each_shuffled_global_batch_between_them():
    x = torch.arange(23)
    whole = list(iterate_batches((x, x), 8, generator=torch.Generator().manual_seed(5))[0])
    ranks = [
        list(iterate_batches((x, x), 8, generator=torch.Generator().manual_seed(5), rank=r,
                             world=2)[0])
        for r in (0, 1)
    ]  # fmt: skip
    for full, b0, b1 in zip(whole, *ranks, strict=True):
        k = len(full[0]) - len(full[0]) % 2  # equal shards: a tail of 7 loses its last sample
        assert torch.equal(torch.cat([b0[0], b1[0]]), full[0][:k])
    assert sorted(torch.cat([b[0] for b in whole]).tolist()) == list(range(23))
    ordered, n = iterate_batches((x, x), 8)
    assert n == 3 and torch.equal(torch.cat([b[0] for b in ordered]), x)
