import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import ThresholdPolicy, max_softmax, normalized_entropy
from offramp.errors import ConfigError


def test_entropy_one_hot_and_uniform():
    one_hot = torch.tensor([[200.0, 0.0, 0.0, 0.0]])
    assert normalized_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_entropy(torch.zeros(3, 7)).tolist() == pytest.approx([1.0] * 3)


def test_entropy_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25])
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert normalized_entropy(p.log()[None]).item() == pytest.approx(want, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=12),
)
def test_scores_in_range(logits):
    z = torch.tensor([logits], dtype=torch.float64)
    h = normalized_entropy(z).item()
    p = max_softmax(z).item()
    assert -1e-9 <= h <= 1 + 1e-9
    assert 1 / len(logits) - 1e-9 <= p <= 1 + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4),
    st.integers(1, 30),
    st.sampled_from(["entropy", "max_prob"]),
    st.integers(0, 2**31 - 1),
)
def test_decide_equals_brute_force(e, n, criterion, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(e, n, generator=g)
    thr = torch.rand(e - 1, generator=g).tolist()
    pol = ThresholdPolicy(criterion, tuple(thr))
    got = pol.decide(scores).numpy()
    for j in range(n):
        want = e - 1
        for i in range(e - 1):
            s = float(scores[i, j])
            if (s < thr[i]) if criterion == "entropy" else (s > thr[i]):
                want = i
                break
        assert got[j] == want


def test_never_policy_never_fires():
    pol = ThresholdPolicy.never(3, "max_prob")
    scores = torch.tensor([[1.0, 0.5], [1.0, 0.1], [0.3, 0.3]])
    assert pol.decide(scores).tolist() == [2, 2]


def test_bad_policies():
    with pytest.raises(ConfigError, match="unknown exit criterion 'confidence'"):
        ThresholdPolicy("confidence", (0.1,))
    with pytest.raises(ConfigError, match="needs scorers"):
        ThresholdPolicy("learned", (0.1,))
    with pytest.raises(ConfigError, match="NaN"):
        ThresholdPolicy("entropy", (float("nan"),))
    with pytest.raises(ConfigError, match="3 exits"):
        ThresholdPolicy("entropy", (0.1,)).check(3)
    assert np.isinf(ThresholdPolicy.never(2).thresholds[0])
