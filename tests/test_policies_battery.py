"""Every policy decides the same way in the simulation, the batched runtime, the pooled
runtime and the batch-1 runtime (eager, TorchScript and compiled); hand-computed cases for
margin, patience, temperature scaling and learned confidence."""

import math

import numpy as np
import pytest
import torch

from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy, simulate
from offramp.calibration import ThresholdCalibrator, record_scores
from offramp.confidence import (
    expected_calibration_error,
    fit_learned_confidence,
    fit_temperature,
    fit_temperatures,
    temperature_scorers,
)
from offramp.models import mlp
from offramp.policies import PatiencePolicy, decide_from_logits, margin
from offramp.training import FitConfig, fit


@pytest.fixture(scope="module")
def trained():
    """A 4-exit MLP trained briefly on a learnable task, with a held-out record."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 4, generator=g)
    x = torch.randn(600, 10, generator=g)
    y = (x @ w).argmax(1)
    net = mlp(10, 4, hidden=(12, 12, 12, 12), seed=0)
    fit(net, (x[:400], y[:400]), FitConfig(epochs=4, lr=1e-2, show_progress=False))
    net.eval()
    return net, (x[400:], y[400:]), ExitRecord.collect(net, (x[400:], y[400:]))


def _quantile_thresholds(scores, lower, q=0.5):
    s = scores[:-1].double().numpy()
    return tuple(float(t) + (1e-7 if lower else -1e-7) for t in np.quantile(s, q, axis=1))


def _policies(record):
    temps = fit_temperatures(record)
    learned = fit_learned_confidence(record)
    out = {}
    for crit in ("entropy", "max_prob", "margin"):
        lower = crit == "entropy"
        out[crit] = ThresholdPolicy(crit, _quantile_thresholds(record.scores(crit), lower))
        sc = temperature_scorers(crit, temps)
        out[f"{crit}+T"] = ThresholdPolicy(
            crit, _quantile_thresholds(record_scores(record, crit, sc), lower), sc
        )
    out["learned"] = ThresholdPolicy(
        "learned", _quantile_thresholds(record_scores(record, "learned", learned), False), learned
    )
    out["patience1"] = PatiencePolicy(record.num_exits, 1)
    out["patience2"] = PatiencePolicy(record.num_exits, 2)
    return out


POLICY_NAMES = [
    "entropy",
    "max_prob",
    "margin",
    "entropy+T",
    "max_prob+T",
    "margin+T",
    "learned",
    "patience1",
    "patience2",
]


@pytest.mark.parametrize("mode", ["eager", "script"])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_simulation_batched_and_batch1_agree(trained, name, mode):
    net, (x, _), record = trained
    policy = _policies(record)[name]
    sim = simulate(record, policy)
    assert len(np.unique(sim.exits)) >= 2, "degenerate case: every sample leaves at one exit"
    rt = EarlyExitRuntime(net, policy, mode=mode, example_input=x[:4])
    res = rt(x)
    np.testing.assert_array_equal(res.exits.numpy(), sim.exits)
    np.testing.assert_array_equal(res.predictions.numpy(), sim.predictions)
    one = [rt.run_one(x[i : i + 1]) for i in range(0, x.shape[0], 7)]
    np.testing.assert_array_equal([e for _, e, _ in one], sim.exits[::7])
    pooled = list(rt.map(x.split(37), pool=23))  # later stages pooled across batches
    np.testing.assert_array_equal(torch.cat([r.exits for r in pooled]).numpy(), sim.exits)
    preds = torch.cat([r.predictions for r in pooled])
    np.testing.assert_array_equal(preds.numpy(), sim.predictions)


def test_margin_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    assert margin(p.log()).tolist() == pytest.approx([0.2, 0.0], abs=1e-6)


def test_patience_by_hand():
    # predictions per exit (rows) for 4 samples (columns)
    preds = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 0, 1], [1, 1, 0, 0]])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5  # (E=4, N=4, C=3)
    # patience 1: leave at the first exit agreeing with the previous one
    assert decide_from_logits(PatiencePolicy(4, 1), logits).tolist() == [1, 2, 1, 1]
    # patience 2: three consecutive agreeing exits; sample 2 (1, 1, 0, 0) never gets there
    assert decide_from_logits(PatiencePolicy(4, 2), logits).tolist() == [2, 3, 3, 3]
    assert decide_from_logits(PatiencePolicy(4, 9), logits).tolist() == [3, 3, 3, 3]


def test_temperature_known_minimum_and_ece_improves():
    # 3 right in 4 at logit gap 2: NLL is minimal where sigmoid(2 / T) = 3/4, T = 2 / ln 3
    z = torch.tensor([[2.0, 0.0]] * 4)
    assert fit_temperature(z, torch.tensor([0, 0, 0, 1])) == pytest.approx(2 / math.log(3), 1e-4)
    # an overconfident exit: logits 5x too large; scaling fixes its calibration error
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2000, 5, generator=g)
    probs = torch.softmax(true, 1)
    y = torch.multinomial(probs, 1, generator=g)[:, 0]
    over = true * 5
    t = fit_temperature(over, y)
    assert t == pytest.approx(5.0, rel=0.15)
    assert expected_calibration_error(over / t, y) < expected_calibration_error(over, y) / 3


def test_temperature_scaling_never_changes_predictions(trained):
    _, _, record = trained
    for i, t in enumerate(fit_temperatures(record)):
        assert torch.equal((record.logits[i] / t).argmax(1), record.logits[i].argmax(1))


def test_learned_confidence_ranks_right_above_wrong(trained):
    _, _, record = trained
    scorers = fit_learned_confidence(record)
    correct = record.correct()
    for i, sc in enumerate(scorers):
        s = sc(record.logits[i])
        assert ((s >= 0) & (s <= 1)).all()
        assert s[correct[i]].mean() > s[~correct[i]].mean()


def test_calibrator_with_scorers_meets_its_constraint(trained):
    _, _, record = trained
    cum = np.array([1.0, 2.0, 3.0, 4.0])
    for scorers, crit in (
        (fit_learned_confidence(record), "learned"),
        (temperature_scorers("entropy", fit_temperatures(record)), "entropy"),
    ):
        cal = ThresholdCalibrator(crit, delta=0.01, scorers=scorers).fit(record, cum)
        assert cal.accuracy_ >= cal.final_accuracy_ - 0.01 - 1e-12
        assert cal.policy_.scorers is not None
        assert record.accuracy(simulate(record, cal.policy_).exits) == pytest.approx(cal.accuracy_)


@pytest.mark.parametrize(
    "name",
    [
        "patience1",
        # 20-25 s of Inductor compilation each on a cold cache: run with -m slow
        pytest.param("max_prob+T", marks=pytest.mark.slow),
        pytest.param("learned", marks=pytest.mark.slow),
    ],
)
def test_compiled_runtime_agrees_with_simulation(trained, name):
    net, (x, _), record = trained
    policy = _policies(record)[name]
    sim = simulate(record, policy)
    rt = EarlyExitRuntime(net, policy, mode="compile", example_input=x[:8])
    res = rt(x)
    np.testing.assert_array_equal(res.exits.numpy(), sim.exits)
    np.testing.assert_array_equal(res.predictions.numpy(), sim.predictions)
    one = [rt.run_one(x[i : i + 1])[1] for i in range(0, x.shape[0], 25)]
    np.testing.assert_array_equal(one, sim.exits[::25])
    pooled = torch.cat([r.exits for r in rt.map(x.split(50), pool=32)])
    np.testing.assert_array_equal(pooled.numpy(), sim.exits)


def test_compiled_runtime_on_a_cnn_in_channels_last():
    from offramp.models import resnet

    net = resnet(8, 4, widths=(4, 8), blocks_per_stage=(1, 1), exits_after=(1,), seed=0).eval()
    x = torch.rand(64, 1, 8, 8)
    record = ExitRecord.collect(net, (x, torch.zeros(64, dtype=torch.long)))
    policy = ThresholdPolicy("max_prob", _quantile_thresholds(record.scores("max_prob"), False))
    sim = simulate(record, policy)
    rt = EarlyExitRuntime(net, policy, mode="compile", example_input=x[:4])
    np.testing.assert_array_equal(rt(x).exits.numpy(), sim.exits)
    pooled = torch.cat([r.exits for r in rt.map(x.split(16), pool=16)])
    np.testing.assert_array_equal(pooled.numpy(), sim.exits)
    with torch.no_grad():
        torch.testing.assert_close(rt.plain_backbone()(x), net.backbone()(x), rtol=1e-4, atol=1e-5)
