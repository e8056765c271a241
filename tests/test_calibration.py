import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import ExitRecord, ThresholdCalibrator, expected_cost, simulate
from offramp.calibration import candidate_thresholds
from offramp.errors import ConfigError


def _random_record(seed: int, e: int = 3, n: int = 80, c: int = 4, skill: float = 2.0):
    """Exits that get better with depth: logits = noise + skill·depth·onehot(label)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, c).float()
    depth = torch.arange(1, e + 1).float()[:, None, None] / e
    logits = torch.randn(e, n, c, generator=g) + skill * depth * onehot[None]
    return ExitRecord(logits, y)


def _brute_force(rec, cum, criterion, num, delta):
    lower = criterion == "entropy"
    scores = rec.scores(criterion)
    cands = [candidate_thresholds(scores[i].numpy(), num, lower) for i in range(rec.num_exits - 1)]
    final = float(rec.correct()[-1].double().mean())
    best = None
    for combo in itertools.product(*cands):
        from offramp import ThresholdPolicy

        d = simulate(rec, ThresholdPolicy(criterion, combo))
        acc = float((d.predictions == rec.labels.numpy()).sum()) / rec.num_samples
        cost = expected_cost(d.exits, cum)
        if acc < final - delta - 1e-12:
            continue
        key = (cost, -acc)
        if best is None or key < best[0]:
            best = (key, combo)
    return best[1]


@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
@pytest.mark.parametrize("delta", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_equals_brute_force(criterion, delta, seed):
    rec = _random_record(seed)
    cum = np.array([1.0, 2.5, 6.0])
    cal = ThresholdCalibrator(criterion, delta, num_candidates=6).fit(rec, cum)
    assert cal.method_ == "exhaustive"
    assert cal.thresholds_ == _brute_force(rec, cum, criterion, 6, delta)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(2, 4),
    st.floats(0.0, 0.2),
    st.sampled_from(["entropy", "max_prob"]),
    st.sampled_from(["exhaustive", "coordinate"]),
)
def test_constraint_met_on_fit_split(seed, e, delta, criterion, method):
    rec = _random_record(seed, e=e, n=60)
    cum = np.cumsum(np.arange(1, e + 1, dtype=float))
    cal = ThresholdCalibrator(
        criterion, delta, num_candidates=8, max_combinations=10**6 if method == "exhaustive" else 1
    ).fit(rec, cum)
    d = simulate(rec, cal.policy_)
    acc = float((d.predictions == rec.labels.numpy()).mean())
    assert acc >= cal.final_accuracy_ - delta - 1e-12
    assert acc == pytest.approx(cal.accuracy_)
    assert expected_cost(d.exits, cum) == pytest.approx(cal.expected_cost_)
    assert cal.expected_cost_ <= cum[-1] + 1e-9  # never worse than no early exit
    assert cal.exit_fractions_.sum() == pytest.approx(1.0)
    assert cal.method_ == method or e == 2


def test_coordinate_not_worse_than_never_and_close_to_exhaustive():
    rec = _random_record(5, e=4, n=200)
    cum = np.array([1.0, 2.0, 3.0, 8.0])
    ex = ThresholdCalibrator(delta=0.02, num_candidates=10).fit(rec, cum)
    co = ThresholdCalibrator(delta=0.02, num_candidates=10, max_combinations=1).fit(rec, cum)
    assert co.method_ == "coordinate" and ex.method_ == "exhaustive"
    assert ex.expected_cost_ <= co.expected_cost_ + 1e-12
    assert co.expected_cost_ < cum[-1]


def test_thresholds_avoid_sample_scores():
    rec = _random_record(3)
    cal = ThresholdCalibrator("max_prob", 0.05).fit(rec, np.array([1.0, 2.0, 3.0]))
    scores = rec.scores("max_prob")[:-1].double().numpy()
    for i, t in enumerate(cal.thresholds_):
        assert not np.any(scores[i] == t)


def test_bad_arguments():
    rec = _random_record(0)
    with pytest.raises(ConfigError, match=r"delta.*1.5"):
        ThresholdCalibrator(delta=1.5).fit(rec, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="no thresholds keep"):
        ThresholdCalibrator(delta=-0.99).fit(rec, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="one value per exit"):
        ThresholdCalibrator().fit(rec, np.array([1.0, 2.0]))


def test_negative_delta_is_a_margin_above_the_final_exit():
    # exit 0 is right on samples 0-2, the final exit on 1-3: exiting sample 0 early beats it
    logits = torch.tensor(
        [
            [[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.1, 0.0]],
            [[0.0, 0.1], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]],
        ]
    )
    rec = ExitRecord(logits, torch.tensor([0, 1, 0, 0]))
    cal = ThresholdCalibrator("max_prob", delta=-0.25).fit(rec, np.array([1.0, 2.0]))
    assert cal.final_accuracy_ == 0.75 and cal.accuracy_ == 1.0
