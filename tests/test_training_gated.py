"""The gates of recursive gating (eq. 9) as an exit policy: simulated, batched and batch-1
decisions agree in every runtime mode; calibration and records carry the gate scores."""

import numpy as np
import pytest
import torch

from offramp import EarlyExitRuntime, ExitRecord, GateScorer, ThresholdPolicy, simulate
from offramp.calibration import ThresholdCalibrator, record_scores
from offramp.errors import ConfigError
from offramp.models import resnet
from offramp.policies import decide_from_logits, exit_scores
from offramp.training import FitConfig, fit
from offramp.training.gated import GatedTraining


@pytest.fixture(scope="module")
def gated():
    """A small residual CNN with two early exits trained with recursive gating on digits."""
    from offramp.data import load_digits_splits

    s = load_digits_splits(val_fraction=0.2, test_fraction=0.2, seed=0)
    net = resnet(8, 10, widths=(8, 16), blocks_per_stage=(1, 1), exits_after=(0, 1), seed=0)
    strategy = GatedTraining.for_network(net, s.train[0][:2])
    fit(net, s.train, FitConfig(epochs=4, lr=3e-3, show_progress=False), strategy=strategy)
    net.eval()
    scorers = strategy.gate_scorers()
    return net, scorers, s.val, ExitRecord.collect(net, s.val, feature_scorers=scorers)


def _median_thresholds(record):
    fs = record.feature_scores.double().numpy()
    return tuple(float(t) - 1e-6 for t in np.median(fs, axis=1))  # off every sample's score


def test_record_keeps_gate_scores(gated, tmp_path):
    net, scorers, (x, _), record = gated
    assert record.feature_scores.shape == (2, x.shape[0])
    assert ((record.feature_scores >= 0) & (record.feature_scores <= 1)).all()
    with torch.no_grad():
        feats, _ = net(x[:5], return_features=True)
        torch.testing.assert_close(record.feature_scores[1, :5], scorers[1](feats[1]))
    record.save(tmp_path / "r.pt")
    back = ExitRecord.load(tmp_path / "r.pt")
    torch.testing.assert_close(back.feature_scores, record.feature_scores)
    assert record.subset(slice(0, 7)).feature_scores.shape == (2, 7)


@pytest.mark.parametrize("mode", ["eager", "script", "compile"])
def test_gate_policy_runtime_equals_simulation(gated, mode):
    net, scorers, (x, _), record = gated
    policy = ThresholdPolicy("learned", _median_thresholds(record), scorers)
    sim = simulate(record, policy)
    assert len(np.unique(sim.exits)) == 3  # every exit is used: the case is not trivial
    rt = EarlyExitRuntime(net, policy, mode=mode, example_input=x[:4])
    res = rt(x)
    np.testing.assert_array_equal(res.exits.numpy(), sim.exits)
    np.testing.assert_array_equal(res.predictions.numpy(), sim.predictions)
    one = [rt.run_one(x[i : i + 1])[1] for i in range(0, x.shape[0], 9)]
    np.testing.assert_array_equal(one, sim.exits[::9])


def test_gates_at_one_half_are_the_gates_own_rule(gated):
    _, scorers, _, record = gated
    policy = ThresholdPolicy("learned", (0.5, 0.5), scorers)
    g = record.feature_scores
    first = torch.where(g[0] > 0.5, 0, torch.where(g[1] > 0.5, 1, 2))
    np.testing.assert_array_equal(simulate(record, policy).exits, first.numpy())


def test_calibrating_gate_thresholds_meets_the_target(gated):
    _, scorers, _, record = gated
    cum = np.array([1.0, 2.0, 3.0])
    cal = ThresholdCalibrator("learned", delta=0.01, scorers=scorers).fit(record, cum)
    assert cal.accuracy_ >= cal.final_accuracy_ - 0.01 - 1e-12
    assert record.accuracy(simulate(record, cal.policy_).exits) == pytest.approx(cal.accuracy_)
    scores = record_scores(record, "learned", scorers)
    torch.testing.assert_close(scores[:2], record.feature_scores)


def test_gate_scores_need_a_record_that_has_them(gated):
    net, scorers, data, record = gated
    plain = ExitRecord.collect(net, data)
    policy = ThresholdPolicy("learned", (0.5, 0.5), scorers)
    with pytest.raises(ConfigError, match="feature_scorers"):
        simulate(plain, policy)
    with pytest.raises(ConfigError, match="feature_scorers"):
        record_scores(plain, "learned", scorers)
    with pytest.raises(ConfigError, match="exit features"):
        exit_scores(record.logits, "learned", scorers)
    with pytest.raises(ConfigError, match="feature_scorers"):
        decide_from_logits(policy, record.logits)
    assert GateScorer.on_features
