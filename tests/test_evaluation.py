import re

import numpy as np
import pytest
import torch

from offramp import ExitRecord, ThresholdPolicy, simulate
from offramp.batches import check_batch_size, iterate_batches
from offramp.errors import ConfigError, DataError, NonFiniteError, ShapeError
from offramp.evaluation import exit_histogram


def _record() -> ExitRecord:
    # 3 exits, 4 samples, 2 classes; labels [0, 1, 1, 0]
    logits = torch.tensor(
        [
            [[3.0, 0.0], [2.0, 0.0], [0.0, 0.1], [0.0, 3.0]],  # exit 0 predicts 0 0 1 1
            [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 1.0]],  # exit 1 predicts 1 1 1 1
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],  # exit 2 predicts 0 0 1 1
        ]
    )
    return ExitRecord(logits, torch.tensor([0, 1, 1, 0]))


def test_accuracy_and_oracle_by_hand():
    rec = _record()
    np.testing.assert_allclose(rec.exit_accuracy(), [0.5, 0.5, 0.5])
    # sample 0: exit 0 right; 1: exit 1 first right; 2: exit 0; 3: none right -> 0
    assert rec.oracle_exits().tolist() == [0, 1, 0, 0]
    assert rec.accuracy(rec.oracle_exits()) == 0.75


def test_summary_by_hand():
    rec = _record()
    s = rec.summary(np.array([0, 1, 2, 2]), np.array([1.0, 2.0, 4.0]))
    assert s["expected_cost"] == pytest.approx((1 + 2 + 4 + 4) / 4)
    assert s["exit_fractions"] == [0.25, 0.25, 0.5]
    assert s["accuracy"] == 0.75  # right, right, right, wrong
    assert s["accuracy_of_leavers"] == [1.0, 1.0, 0.5]


def test_simulate_uses_first_firing_exit():
    rec = _record()
    d = simulate(rec, ThresholdPolicy("max_prob", (0.85, 0.85)))
    # exit 0 max probs: .95 .88 .52 .95 -> samples 0, 1, 3 leave; sample 2 at exit 1 (p=.95)
    assert d.exits.tolist() == [0, 0, 1, 0]
    assert d.predictions.tolist() == [0, 0, 1, 1]


def test_histogram():
    np.testing.assert_allclose(exit_histogram(np.array([0, 2, 2, 2]), 3), [0.25, 0, 0.75])


def test_record_shape_checks_and_roundtrip(tmp_path):
    with pytest.raises(ShapeError, match=r"\(E, N, C\)"):
        ExitRecord(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        ExitRecord(torch.zeros(2, 4, 3), torch.zeros(3, dtype=torch.long))
    rec = _record()
    rec.save(tmp_path / "r.pt")
    back = ExitRecord.load(tmp_path / "r.pt")
    assert torch.equal(back.logits, rec.logits) and torch.equal(back.labels, rec.labels)
    sub = rec.subset(np.array([1, 3]))
    assert sub.num_samples == 2 and sub.labels.tolist() == [1, 0]


def test_collect_matches_forward(cnn, digits_x):
    y = torch.arange(64) % 10
    rec = ExitRecord.collect(cnn, (digits_x, y), batch_size=17)
    with torch.no_grad():
        full = cnn(digits_x).stack()
    torch.testing.assert_close(rec.logits, full)
    assert rec.labels.tolist() == y.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool], ids=str)
def test_collect_refuses_a_batch_of_the_wrong_dtype(cnn, digits_x, dtype):
    y = torch.arange(64) % 10
    with pytest.raises(ShapeError, match=r"dtype torch\.float32.*x\.float\(\)"):
        ExitRecord.collect(cnn, (digits_x.to(dtype), y))


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([0, 1, 99, 0]), r"label 99.*0 … 1.*2 classes"),
        (torch.tensor([0, -1, 1, 0]), r"label -1.*0 … 1"),
        (torch.tensor([0.0, 1.7, 1.0, 0.0]), r"integer class indices.*torch\.float32.*1\.7"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), r"torch\.float32.*y\.long\(\)"),
        (torch.tensor([False, True, True, False]), r"torch\.bool.*y\.long\(\)"),
    ],
)
def test_record_refuses_labels_that_are_not_class_indices(labels, match):
    with pytest.raises(DataError, match=match):
        ExitRecord(_record().logits, labels)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.full((64,), 99), r"label 99.*0 … 9.*10 classes"),
        (torch.full((64,), -1), r"label -1"),
        (torch.full((64,), 1.7), r"integer class indices.*1\.7"),
        (torch.ones(64), r"torch\.float32.*y\.long\(\)"),
    ],
)
def test_collect_refuses_labels_that_are_not_class_indices(cnn, digits_x, labels, match):
    with pytest.raises(DataError, match=match):
        ExitRecord.collect(cnn, (digits_x, labels), batch_size=16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_record_refuses_non_finite_logits(bad):
    logits = _record().logits.clone()
    logits[1, 2, 0] = bad
    with pytest.raises(NonFiniteError, match=r"1 NaN or infinite.*exit 1, sample 2") as info:
        ExitRecord(logits, _record().labels)
    assert isinstance(info.value, DataError)


def test_a_refused_batch_leaves_the_network_in_its_mode(cnn, digits_x):
    cnn.train()
    with pytest.raises(DataError):
        ExitRecord.collect(cnn, (digits_x, torch.full((64,), 99)))
    assert cnn.training


@pytest.mark.parametrize("bs", [0, -1, 2.5, True, "8", None])
def test_batch_size_below_one_or_not_whole_is_a_config_error(cnn, digits_x, bs):
    y = torch.arange(64) % 10
    with pytest.raises(
        ConfigError, match=r"batch_size must be a whole number ≥ 1, got " + re.escape(repr(bs))
    ):
        ExitRecord.collect(cnn, (digits_x, y), batch_size=bs)
    # the one check, whatever form the data has
    with pytest.raises(ConfigError, match="batch_size"):
        iterate_batches([(digits_x, y)], bs)
    assert check_batch_size(np.int64(3)) == 3


def test_collect_accepts_a_numpy_batch_size(cnn, digits_x):
    rec = ExitRecord.collect(cnn, (digits_x, torch.arange(64) % 10), batch_size=np.int64(20))
    assert rec.num_samples == 64
