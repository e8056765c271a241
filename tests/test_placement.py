import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.errors import ConfigError, ShapeError
from offramp.evaluation import ExitRecord
from offramp.placement import (
    RULES,
    Candidates,
    PlacementRecord,
    candidate_costs,
    evaluate_subsets,
    exhaustive,
    flops_spacing,
    greedy,
    members,
    operating_points,
    pays,
    place,
    prune,
    subset_mask,
    train_candidate_heads,
    with_candidate_exits,
)


def _record(scores: np.ndarray, correct: np.ndarray, thresholds=None) -> PlacementRecord:
    """A placement record straight from max-prob-like scores (higher = confident)."""
    s = torch.as_tensor(scores, dtype=torch.float32)
    if thresholds is None:
        thresholds = np.concatenate([[np.inf], np.unique(scores[:-1])[::-1] - 1e-6, [-np.inf]])
    return PlacementRecord(
        s, torch.as_tensor(correct, dtype=torch.bool), np.asarray(thresholds), False
    )


def _brute(cands: Candidates, rec: PlacementRecord, subset: int, tau: float) -> tuple[float, float]:
    """Expected cost and accuracy by walking every sample through the subset's exits."""
    k, n = rec.scores.shape
    cum = cands.cumulative(subset) / cands.full_cost
    cost = acc = 0.0
    for i in range(n):
        for j in range(k):
            if not (subset >> j) & 1:
                continue
            if j == k - 1 or float(rec.scores[j, i]) > tau:
                cost += cum[j]
                acc += float(rec.correct[j, i])
                break
    return cost / n, acc / n


def _random_problem(seed: int, k: int, n: int) -> tuple[Candidates, PlacementRecord]:
    rng = np.random.default_rng(seed)
    cands = Candidates(tuple(range(k)), rng.uniform(0.5, 2.0, k), rng.uniform(0.0, 0.3, k))
    scores = rng.choice(np.linspace(0, 1, 7), size=(k, n))  # ties on purpose
    correct = rng.random((k, n)) < np.linspace(0.5, 0.9, k)[:, None]
    return cands, _record(scores, correct)


# ----------------------------------------------------------------------------- cost model


def test_cumulative_costs_by_hand():
    c = Candidates((1, 2, 3), np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.25, 1.0]))
    # subset {0, final}: exit 0 = blocks 0-1 + head 0; final = all blocks + head 0 + final head
    np.testing.assert_allclose(c.cumulative(subset_mask([0], 3)), [3.5, 6.5, 11.5])
    np.testing.assert_allclose(c.cumulative(subset_mask([1], 3)), [3.0, 6.25, 11.25])
    assert c.full_cost == 11.0
    np.testing.assert_allclose(c.depth_fraction, [0.3, 0.6, 1.0])


def test_candidates_reject_bad_costs():
    with pytest.raises(ConfigError, match="end at the last block"):
        Candidates((0, 1), np.ones(3), np.ones(2))
    with pytest.raises(ConfigError, match="one head cost per candidate"):
        Candidates((0, 2), np.ones(3), np.ones(3))
    with pytest.raises(ConfigError, match="non-negative"):
        Candidates((0, 2), np.array([1.0, -1.0, 1.0]), np.ones(2))


# ------------------------------------------------------------------- vectorised = brute force


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 40))
def test_evaluate_subsets_equals_brute_force(seed, k, n):
    cands, rec = _random_problem(seed, k, n)
    subsets = np.arange(1 << (k - 1))
    cost, acc = evaluate_subsets(cands, rec, subsets)
    for s in subsets:
        full = int(s) | (1 << (k - 1))
        for t, tau in enumerate(rec.thresholds):
            want = _brute(cands, rec, full, tau)
            assert cost[s, t] == pytest.approx(want[0])
            assert acc[s, t] == pytest.approx(want[1])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.sampled_from([0.0, 0.02, 0.1]))
def test_exhaustive_equals_brute_force(seed, k, delta):
    cands, rec = _random_problem(seed, k, 30)
    final = float(rec.correct[-1].double().mean())
    best = np.inf
    for s in range(1 << (k - 1)):
        full = s | (1 << (k - 1))
        for tau in rec.thresholds:
            c, a = _brute(cands, rec, full, tau)
            if a >= final - delta - 1e-12:
                best = min(best, c)
    got = exhaustive(cands, rec, delta)
    assert got.cost == pytest.approx(best)
    assert got.accuracy >= final - delta - 1e-12


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 7), st.sampled_from([0.0, 0.05]))
def test_search_never_costs_more_than_flops_spacing_with_as_many_exits(seed, k, delta):
    cands, rec = _random_problem(seed, k, 40)
    spaced = flops_spacing(cands, (0.15, 0.9))
    size = len(members(spaced, k))
    spaced_point = operating_points(cands, rec, np.array([spaced]), delta)[0]
    assert exhaustive(cands, rec, delta, size=size).cost <= spaced_point.cost + 1e-12
    assert exhaustive(cands, rec, delta).cost <= spaced_point.cost + 1e-12


def test_exhaustive_refuses_too_many_candidates():
    cands = Candidates(tuple(range(14)), np.ones(14), np.zeros(14))
    rec = _record(np.zeros((14, 3)), np.ones((14, 3), dtype=bool))
    with pytest.raises(ConfigError, match="at most 12"):
        exhaustive(cands, rec, 0.0)


# -------------------------------------------------------------------------------- eq. 4


def test_eq4_by_hand():
    # 100 reach the exit, 50 leave there and save 6 each: a head of 1 pays (100 < 300) ...
    assert pays(1.0, 0.5, head_cost=1.0, final_cost=10.0, exit_cost=4.0)
    # ... one of 4 does not (400 > 300), nor does any head when nobody leaves
    assert not pays(1.0, 0.5, head_cost=4.0, final_cost=10.0, exit_cost=4.0)
    assert not pays(0.5, 0.0, head_cost=0.01, final_cost=10.0, exit_cost=4.0)


def _eq4_case(leave_at_1: int) -> PlacementRecord:
    """Ten samples, three blocks of cost 1. Exit 0 is confident and right on samples 0-5 and
    wrong on 6-9 (so the threshold must keep those from leaving there); exit 1 is confident on
    ``leave_at_1`` of samples 6-9 and right everywhere, as is the final exit."""
    n = 10
    scores = np.zeros((3, n))
    scores[0, :6] = 1.0
    scores[1, 6 : 6 + leave_at_1] = 1.0
    correct = np.ones((3, n), dtype=bool)
    correct[0, 6:] = False
    return _record(scores, correct)


@pytest.mark.parametrize(
    ("head_1", "leave_at_1", "kept"),
    [
        # r_1 = 0.4 of the samples reach exit 1; each one leaving saves C_L − C_1 = 1.1
        (0.6, 2, [0]),  # γ_1 = 0.2: r·C(c) = 0.24 > γ·1.1 = 0.22, pruned
        (0.5, 2, [0, 1]),  # 0.20 < 0.22: pays (just)
        (0.0, 2, [0, 1]),  # a free head pays as soon as anyone leaves there
        (0.6, 4, [0, 1]),  # γ_1 = 0.4: 0.24 < 0.44, pays
    ],
)
def test_eq4_prunes_exactly_the_exit_that_does_not_pay(head_1, leave_at_1, kept):
    cands = Candidates((0, 1, 2), np.ones(3), np.array([0.01, head_1, 0.1]))
    point, trace = prune(cands, _eq4_case(leave_at_1), delta=0.0)
    assert point.accuracy == 1.0  # the threshold keeps exit 0's wrong samples from leaving
    assert members(point.subset, 3) == kept
    assert [t["removed"] for t in trace] == ([] if 1 in kept else [1])


# -------------------------------------------------------------------------------- eq. 5


def test_greedy_rule_on_a_synthetic_profile():
    # blocks of cost 10; heads cost 1 except candidate 3's (6); accuracies grow with depth
    cands = Candidates(
        (0, 1, 2, 3, 4, 5), np.full(6, 10.0), np.array([1.0, 1.0, 1.0, 6.0, 1.0, 1.0])
    )
    acc = [0.70, 0.85, 0.86, 0.95, 0.97, 1.00]
    # ρ_j = head / blocks ahead: 1/50, 1/40, 1/30, 6/20, 1/10. With ρ ≤ 0.05: candidates 0-2.
    # Accuracy ≥ 0.8 of final (0.8): drops 0. Gain ≥ 0.02 over the last kept: 1 yes (first
    # kept), 2 no (0.86 < 0.87). Candidate 3 fails ρ, 4 fails ρ (0.1 > 0.05).
    got = greedy(cands, acc, max_ratio=0.05, min_accuracy_ratio=0.8, min_gain=0.02)
    assert members(got, 6) == [1]
    # a looser ratio admits candidate 4 (ρ = 0.1) but still not 3 (ρ = 0.3)
    got = greedy(cands, acc, max_ratio=0.1, min_accuracy_ratio=0.8, min_gain=0.02)
    assert members(got, 6) == [1, 4]
    with pytest.raises(ConfigError, match="accuracy of all 6"):
        greedy(cands, acc[:3])


def test_flops_spacing_picks_nearest_candidates():
    cands = Candidates(tuple(range(10)), np.ones(10), np.zeros(10))
    # the candidates reach 10 %, 20 %, …, 90 % of the block cost
    assert members(flops_spacing(cands, (0.12, 0.33, 0.78)), 10) == [0, 2, 7]
    assert members(flops_spacing(cands, (0.33, 0.34)), 10) == [2]  # duplicates collapse
    assert len(members(flops_spacing(cands), 10)) == 6  # SDN's six fractions


# ------------------------------------------------------------------- candidates, end to end


@pytest.fixture(scope="module")
def digits_splits():
    from offramp.data import load_digits_splits

    return load_digits_splits(val_fraction=0.2, test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def candidate_run(digits_splits):
    from offramp.models import resnet

    torch.manual_seed(0)
    net = resnet(8, 10, widths=(8, 16), blocks_per_stage=(2, 2), exits_after=(), seed=0)
    cand = with_candidate_exits(net, "pool")
    before = [p.requires_grad for p in cand.blocks.parameters()]
    train_candidate_heads(cand, digits_splits.train, epochs=2, show_progress=False)
    assert [p.requires_grad for p in cand.blocks.parameters()] == before
    return cand, digits_splits


def test_candidates_at_every_boundary(candidate_run):
    cand, _ = candidate_run
    assert cand.exit_blocks == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("cost", ["flops", "latency"])
def test_place_runs_every_rule(candidate_run, cost):
    cand, s = candidate_run
    cands = candidate_costs(cand, s.val[0][:64], cost, repeats=2)
    assert cands.unit == ("flops" if cost == "flops" else "seconds")
    assert (cands.block_costs > 0).all()
    val, test = ExitRecord.collect(cand, s.val), ExitRecord.collect(cand, s.test)
    out = place(cands, val, test, delta=0.01)
    assert [p.rule for p in out] == list(RULES)
    by = {p.rule: p for p in out}
    final = float(val.correct()[-1].double().mean())
    for p in out:
        assert p.val_accuracy >= final - 0.01 - 1e-12
        assert set(p.exits) <= {0, 1, 2, 3}
        assert sum(p.exit_fractions) == pytest.approx(1.0)
        d = p.to_dict()
        assert {"rule", "exits", "expected_cost", "accuracy"} <= set(d)
    assert by["exhaustive"].val_cost <= min(p.val_cost for p in out) + 1e-12
    assert by["all"].exits == [0, 1, 2, 3]


def test_with_candidate_exits_needs_an_input_shape():
    from torch import nn

    from offramp.network import MultiExitNetwork

    net = MultiExitNetwork([nn.Linear(4, 4), nn.Linear(4, 3)], {1: nn.Identity()})
    with pytest.raises(ConfigError, match="input_shape"):
        with_candidate_exits(net)


def test_candidates_of_an_attach_exits_model_are_its_named_modules():
    from torch import nn

    from offramp.convert import attach_exits

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).eval()  # fmt: skip
    x = torch.rand(6, 1, 8, 8)
    net = attach_exits(model, at=["1", "3"], example_input=x[:1], head="pool")
    cand = with_candidate_exits(net, "mixpool")  # one candidate per cut, new heads
    assert cand.exit_blocks == (0, 1, 2)
    with torch.no_grad():
        outs = cand(x)
        torch.testing.assert_close(outs.final, model(x))  # the model's own output is final
    assert [tuple(o.shape) for o in outs] == [(6, 5)] * 3
    assert candidate_costs(cand, x).num == 3


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.sampled_from([0.0, 0.05]))
def test_every_exit_left_by_eq4_pruning_pays(seed, k, delta):
    cands, rec = _random_problem(seed, k, 40)
    point, trace = prune(cands, rec, delta)
    exits = rec.exits(point.subset, point.threshold)
    cum = cands.cumulative(point.subset)
    for j in members(point.subset, k):
        reach, leave = float((exits >= j).mean()), float((exits == j).mean())
        assert pays(reach, leave, cands.head_costs[j], cum[-1], cum[j])
    removed = [t["removed"] for t in trace]
    assert len(set(removed)) == len(removed)
    assert not set(removed) & set(members(point.subset, k))


def test_place_skips_exhaustive_beyond_twelve_candidates(caplog):
    rng = np.random.default_rng(0)
    k = 14
    cands = Candidates(tuple(range(k)), np.ones(k), np.full(k, 0.01))
    rec = ExitRecord(torch.as_tensor(rng.normal(size=(k, 30, 3)), dtype=torch.float32),
                     torch.as_tensor(rng.integers(0, 3, 30)))  # fmt: skip
    with caplog.at_level("WARNING"):
        out = place(cands, rec, rules=("all", "exhaustive"))
    assert [p.rule for p in out] == ["all"]
    assert "exhaustive placement skipped" in caplog.text


def test_a_single_candidate_is_just_the_final_exit():
    cands = Candidates((0,), np.ones(1), np.full(1, 0.1))
    rec = ExitRecord(torch.randn(1, 20, 3), torch.randint(0, 3, (20,)))
    out = place(cands, rec, rec)
    assert all(p.exits == [] and p.cost == pytest.approx(1.0) for p in out)


def test_place_checks_both_records():
    cands = Candidates((0, 1), np.ones(2), np.full(2, 0.1))
    good = ExitRecord(torch.randn(2, 9, 3), torch.zeros(9, dtype=torch.long))
    bad = ExitRecord(torch.randn(3, 9, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ConfigError, match="the test record has 3 exits"):
        place(cands, good, bad)


def test_with_candidate_exits_checks_blocks_and_leaves_the_caller_alone():
    from offramp.models import resnet

    net = resnet(8, 3, widths=(4, 8), blocks_per_stage=(1, 1)).train()
    with pytest.raises(ConfigError, match="out of range"):
        with_candidate_exits(net, blocks=[4])
    with pytest.raises(ConfigError, match="final exit"):
        with_candidate_exits(net, blocks=[2])
    assert with_candidate_exits(net, blocks=[-2]).exit_blocks == (1, 2)
    state = torch.random.get_rng_state()
    with_candidate_exits(net, seed=3)
    assert net.training
    assert torch.equal(torch.random.get_rng_state(), state)


def test_candidates_on_token_models_get_token_heads_and_train():
    # placement once sized a 'pool' head on ViT tokens (B, 17, 64) as Linear(17 -> C) and failed
    # with a raw TypeError on a text network (input_shape (None,)); heads-only training could not
    # cache (states, padding mask) activations
    import sys
    from pathlib import Path

    from offramp.heads import TokenPool
    from offramp.models import rnn_classifier, vit

    sys.path.insert(0, str(Path(__file__).parent))
    from families import padded_ids

    cand = with_candidate_exits(vit(28, 10, depth=3, seed=0))
    assert cand.heads[0][-1].in_features == 64  # mean over the tokens, then width -> classes
    text = rnn_classifier(50, 3, layers=3, seed=0)
    with pytest.raises(ConfigError, match="example=x"):
        with_candidate_exits(text)
    x = padded_ids(48)
    y = x[:, 0] % 3
    with pytest.raises(ShapeError, match="x.long"):
        with_candidate_exits(text, example=x[:2].float())  # ids as floats: the clear error
    with pytest.raises(ConfigError, match="empty batch"):
        with_candidate_exits(text, example=x[:0])
    cand = with_candidate_exits(text, example=x)  # a whole batch is fine: two samples are used
    assert cand.trim_padding and isinstance(cand.heads[0][0], TokenPool)
    before = [h[-1].weight.clone() for h in cand.heads[:-1]]
    with torch.no_grad():
        final = cand.eval()(x).final.clone()
    train_candidate_heads(cand, (x, y), epochs=2, show_progress=False)
    after = [h[-1].weight for h in cand.heads[:-1]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(cand.eval()(x).final, final)  # the backbone is left alone
    assert candidate_costs(cand, x).num == 3
