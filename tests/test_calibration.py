"""offramp.calibration: calibrators, shared checks, the policy suite, the Pareto front."""

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import ExitRecord, ThresholdPolicy, expected_cost, simulate
from offramp.calibration import (
    BudgetCalibrator,
    SingleThresholdCalibrator,
    ThresholdCalibrator,
    candidate_thresholds,
    non_dominated,
    pareto_front,
)
from offramp.confidence import fit_temperatures, temperature_scorers
from offramp.errors import ConfigError, DataError


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


def _record(seed: int, e: int = 3, n: int = 60, c: int = 4, skill: float = 2.0) -> ExitRecord:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, c).float()
    depth = torch.arange(1, e + 1).float()[:, None, None] / e
    return ExitRecord(torch.randn(e, n, c, generator=g) + skill * depth * onehot[None], y)


CUM = {2: np.array([1.0, 3.0]), 3: np.array([1.0, 2.5, 4.0]), 4: np.array([1.0, 2.0, 3.0, 5.0])}


@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "margin"])
@pytest.mark.parametrize("budget", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_budget_equals_brute_force(criterion, budget, seed):
    rec = _record(seed)
    cum = CUM[3]
    cal = BudgetCalibrator(criterion, budget, num_candidates=6).fit(rec, cum)
    lower = criterion == "entropy"
    scores = rec.scores(criterion)
    cands = [candidate_thresholds(scores[i].numpy(), 6, lower) for i in range(2)]
    best = None
    for combo in itertools.product(*cands):
        d = simulate(rec, ThresholdPolicy(criterion, combo))
        acc = float((d.predictions == rec.labels.numpy()).mean())
        cost = expected_cost(d.exits, cum)
        if cost > budget * cum[-1] * (1 + 1e-12):
            continue
        key = (-acc, cost)
        if best is None or key < best[0]:
            best = (key, combo)
    assert best is not None
    assert cal.thresholds_ == best[1]
    assert cal.expected_cost_ <= budget * cum[-1] + 1e-9


def test_budget_below_the_cheapest_policy_is_refused():
    with pytest.raises(ConfigError, match="raise the budget"):
        BudgetCalibrator("entropy", 0.1).fit(_record(0), CUM[3])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        BudgetCalibrator("entropy", 1.5).fit(_record(0), CUM[3])


def test_single_threshold_iteration_on_a_toy_record():
    # exit 0 is right exactly when its max-prob > 0.8
    probs = torch.tensor([0.95, 0.9, 0.85, 0.7, 0.6, 0.55])
    logits0 = torch.stack([probs.log(), (1 - probs).log()], dim=1)  # class 0 predicted
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    final = torch.nn.functional.one_hot(labels, 2).float() * 5
    rec = ExitRecord(torch.stack([logits0, final]), labels)
    cal = SingleThresholdCalibrator("max_prob").fit(rec, np.array([1.0, 2.0]))
    assert cal.converged_ and cal.accuracy_ == 1.0
    assert 0.7 <= cal.threshold_ < 0.85  # the three confident ones leave early
    assert cal.expected_cost_ == pytest.approx(1.5)
    taus = [h[0] for h in cal.history_]
    assert taus[0] == 0.5 and len(taus) == cal.iterations_


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), e=st.integers(2, 4), delta=st.sampled_from([0.0, 0.02, 0.1]))
def test_single_threshold_meets_its_target_on_its_split(seed, e, delta):
    rec = _record(seed, e=e)
    cal = SingleThresholdCalibrator("entropy", delta).fit(rec, CUM[e])
    final = float(rec.correct()[-1].double().mean())
    assert cal.accuracy_ >= final - delta - 1e-12
    assert rec.accuracy(simulate(rec, cal.policy_).exits) == pytest.approx(cal.accuracy_)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), e=st.integers(2, 4), budget=st.floats(0.5, 1.0))
def test_budget_meets_its_constraint_on_its_split(seed, e, budget):
    rec = _record(seed, e=e)
    cal = BudgetCalibrator("max_prob", budget, num_candidates=8, max_combinations=200).fit(
        rec, CUM[e]
    )
    d = simulate(rec, cal.policy_)
    assert expected_cost(d.exits, CUM[e]) <= budget * CUM[e][-1] + 1e-9
    assert rec.accuracy(d.exits) == pytest.approx(cal.accuracy_)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    e=st.integers(2, 4),
    t=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    drop=st.lists(st.floats(0.0, 0.5), min_size=3, max_size=3),
)
def test_lowering_a_confidence_threshold_never_raises_cost(seed, e, t, drop):
    rec = _record(seed, e=e)
    hi = tuple(t[: e - 1])
    lo = tuple(a - b for a, b in zip(hi, drop, strict=False))
    cost_hi = expected_cost(simulate(rec, ThresholdPolicy("max_prob", hi)).exits, CUM[e])
    cost_lo = expected_cost(simulate(rec, ThresholdPolicy("max_prob", lo)).exits, CUM[e])
    assert cost_lo <= cost_hi + 1e-12


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), e=st.integers(2, 4))
def test_pareto_front_is_monotone(seed, e):
    rec = _record(seed, e=e)
    front = pareto_front(rec, CUM[e], num_sweep=10, deltas=(0.0, 0.05)).front
    costs = [p.relative_cost for p in front]
    accs = [p.accuracy for p in front]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(a < b for a, b in itertools.pairwise(accs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confidence_bound_is_more_conservative_and_holds_by_hand(seed):
    from offramp.calibration.target import lower_bound

    # hand case: 100 samples, policy right on 3 the final exit gets wrong, wrong on 5 it gets
    # right: mean −0.02, second moment 0.08, sd of the mean sqrt((0.08 − 0.0004) / 100)
    lb = lower_bound(np.array([48]), np.array([8]), 50, 100, 1.645)[0]
    assert lb == pytest.approx(-0.02 - 1.645 * np.sqrt((0.08 - 0.0004) / 100))
    rec = _record(seed, e=3, n=400)
    plain = ThresholdCalibrator("entropy", 0.01).fit(rec, CUM[3])
    sure = ThresholdCalibrator("entropy", 0.01, confidence=0.95).fit(rec, CUM[3])
    assert sure.expected_cost_ >= plain.expected_cost_
    assert sure.accuracy_ >= plain.accuracy_ - 1e-12 or sure.expected_cost_ > plain.expected_cost_


def test_non_dominated_equals_brute_force():
    g = np.random.default_rng(0)
    pol = ThresholdPolicy.never(2)
    from offramp.calibration import ParetoPoint

    pts = [
        ParetoPoint(str(i), float(a), float(c), pol) for i, (a, c) in enumerate(g.random((40, 2)))
    ]
    front = {p.label for p in non_dominated(pts)}
    brute = {
        p.label
        for p in pts
        if not any(
            (q.accuracy >= p.accuracy and q.relative_cost <= p.relative_cost)
            and (q.accuracy > p.accuracy or q.relative_cost < p.relative_cost)
            for q in pts
        )
    }
    assert front == brute


def test_pareto_export_and_plot(tmp_path):
    rec = _record(0, e=3, n=200)
    temps = fit_temperatures(rec)
    pf = pareto_front(
        rec, CUM[3], scorers={"entropy+T": ("entropy", temperature_scorers("entropy", temps))}
    )
    d = json.loads(json.dumps(pf.to_dict()))
    assert d["front"] and d["oracle"]["relative_cost"] <= 1.0
    assert any(p["label"].startswith("patience") for p in d["points"])
    assert any(p["label"].startswith("entropy+T") for p in d["points"])
    png = pf.plot(tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a wall-clock assertion: run on a quiet machine (`make test-slow`)
def test_target_calibration_is_fast_on_10k_samples_and_5_exits():
    import time

    rec = _record(0, e=5, n=10_000, c=10, skill=3.0)
    cum = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    t0 = time.perf_counter()
    for crit in ("entropy", "max_prob"):
        cal = ThresholdCalibrator(crit, 0.0).fit(rec, cum)
        assert cal.accuracy_ >= cal.final_accuracy_ - 1e-12
    assert (time.perf_counter() - t0) / 2 < 1.0


def test_policy_suite_honours_the_confidence_level():
    from offramp.calibration import calibrate_policies

    rec = _record(3, e=3, n=600, skill=3.0)
    plain = {c.name: c for c in calibrate_policies(rec, CUM[3], delta=0.01)}
    sure = {c.name: c for c in calibrate_policies(rec, CUM[3], delta=0.01, confidence=0.95)}
    for name in ("entropy", "max_prob", "margin", "entropy+T", "learned"):
        if name in sure:
            assert sure[name].val_bound >= -0.01 - 1e-12, name
            assert sure[name].val_cost >= plain[name].val_cost - 1e-12, name
    # the bound costs something: some family had to keep more samples going
    assert any(sure[n].val_cost > plain[n].val_cost for n in sure if n != "patience")


CALIBRATORS = {
    "target": lambda: ThresholdCalibrator("entropy", 0.05),
    "budget": lambda: BudgetCalibrator("entropy", 0.9),
    "single": lambda: SingleThresholdCalibrator("entropy", 0.05),
}
BAD_COSTS = {
    "decreasing": ([1.0, 3.0, 2.0], r"non-decreasing"),
    "negative": ([-1.0, 2.5, 4.0], r"≥ 0"),
    "nan": ([1.0, float("nan"), 4.0], r"finite"),
    "inf": ([1.0, 2.5, float("inf")], r"finite"),
    "zero total": ([0.0, 0.0, 0.0], r"C_L > 0"),
}


@pytest.mark.parametrize("bad", list(BAD_COSTS))
@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_calibrators_refuse_costs_that_are_not_cumulative(name, bad):
    cum, match = BAD_COSTS[bad]
    with pytest.raises(ConfigError, match=r"cumulative costs must be.*" + match) as info:
        CALIBRATORS[name]().fit(_record(0), np.array(cum))
    assert "profile(net, x).cumulative" in str(info.value)


@pytest.mark.parametrize("bad", list(BAD_COSTS))
def test_policy_suite_pareto_and_report_refuse_bad_costs_up_front(bad):
    from offramp.calibration import calibrate_policies, report_on_test

    cum = np.array(BAD_COSTS[bad][0])
    rec = _record(0)
    with pytest.raises(ConfigError, match="cumulative costs must be"):
        calibrate_policies(rec, cum, delta=0.05)
    with pytest.raises(ConfigError, match="cumulative costs must be"):
        report_on_test([], rec, cum, delta=0.05)
    with pytest.raises(ConfigError, match="cumulative costs must be"):
        pareto_front(rec, cum)


@pytest.mark.parametrize("delta", [1.5, 5, -2, float("nan"), float("inf")])
def test_single_threshold_refuses_delta_outside_minus_one_to_one(delta):
    with pytest.raises(
        ConfigError, match=r"delta is the accuracy loss.*\(-1, 1\), got " + str(delta)
    ):
        SingleThresholdCalibrator("entropy", delta).fit(_record(0), CUM[3])


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_a_one_sample_record_warns_and_an_empty_one_is_refused(name):
    rec = _record(0)
    with pytest.warns(UserWarning, match=r"1 sample.*no cut between two scores"):
        CALIBRATORS[name]().fit(rec.subset(slice(0, 1)), CUM[3])
    with pytest.raises(DataError, match="no samples"):
        CALIBRATORS[name]().fit(rec.subset(slice(0, 0)), CUM[3])


def test_a_two_sample_record_calibrates_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for make in CALIBRATORS.values():
            make().fit(_record(0).subset(slice(0, 2)), CUM[3])


NAN = float("nan")


GOALS = [
    ({"delta": NAN}, r"delta.*got nan"),
    ({"budget": NAN}, r"budget.*got nan"),
    ({"budget": 1.5}, r"budget.*\(0, 1\].*got 1.5"),
    ({"delta": 0.05, "budget": 0.5}, r"exactly one goal"),
    ({}, r"exactly one goal"),
]


@pytest.mark.parametrize(
    "goal, match", [*GOALS, ({"delta": 0.05, "confidence": NAN}, r"confidence.*got nan")]
)
def test_policy_suite_refuses_nan_goals_before_they_reach_a_results_file(goal, match):
    from offramp.calibration import calibrate_policies

    with pytest.raises(ConfigError, match=match):
        calibrate_policies(_record(0), CUM[3], **goal)


@pytest.mark.parametrize("goal, match", GOALS)
def test_report_refuses_nan_goals_before_they_reach_a_results_file(goal, match):
    from offramp.calibration import report_on_test

    with pytest.raises(ConfigError, match=match):
        report_on_test([], _record(0), CUM[3], **goal)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ThresholdCalibrator(delta=NAN), r"delta.*got nan"),
        (lambda: ThresholdCalibrator(confidence=NAN), r"confidence.*got nan"),
        (lambda: BudgetCalibrator(budget=NAN), r"budget.*got nan"),
        (lambda: SingleThresholdCalibrator(delta=NAN), r"delta.*got nan"),
    ],
)
def test_calibrators_refuse_nan_arguments(make, match):
    with pytest.raises(ConfigError, match=match):
        make().fit(_record(0), CUM[3])


def test_pareto_front_refuses_a_nan_delta():
    with pytest.raises(ConfigError, match=r"delta.*got nan"):
        pareto_front(_record(0), CUM[3], deltas=(0.0, NAN))
