"""Wall-clock helpers: every candidate sees every batch, order rotates, sleeps are measured."""

from __future__ import annotations

import time

import pytest

from offramp.errors import ConfigError, OfframpError
from offramp.timing import (
    compare_over_batches,
    compare_wallclock,
    paired_ratio,
    time_over_batches,
)


def test_over_batches_calls_every_callable_on_every_batch_in_shuffled_turns():
    def run(seed):
        seen: list[tuple[str, int]] = []
        fns = {name: (lambda b, name=name: seen.append((name, b))) for name in "abc"}
        t = compare_over_batches(fns, [0, 1, 2, 3, 4], repeats=4, warmup=1, group=2, seed=seed)
        assert sorted(t) == ["a", "b", "c"]
        return seen[5 * 3 :]  # after the warm-up pass

    timed = run(0)
    # groups (0, 1), (2, 3), (4,): a turn is the group's first batch untimed, then the group
    turns = [[0, 0, 1], [2, 2, 3], [4, 4]] * 4
    orders, pos = [], 0
    for turn in turns:
        order = []
        for _ in range(3):  # every callable once per group, each running the whole turn
            name = timed[pos][0]
            assert timed[pos : pos + len(turn)] == [(name, b) for b in turn]
            order.append(name)
            pos += len(turn)
        assert sorted(order) == ["a", "b", "c"]
        orders.append("".join(order))
    assert pos == len(timed)
    assert len(set(orders)) > 1  # shuffled, not one fixed order
    assert run(0) == timed and run(1) != timed  # seeded


def test_over_batches_measures_what_each_callable_costs():
    t = compare_over_batches(
        {"slow": lambda b: time.sleep(0.004), "fast": lambda b: None}, [0, 1, 2], repeats=3
    )
    assert t["slow"] >= 3 * 0.004
    assert t["fast"] < t["slow"] / 4


@pytest.mark.parametrize(
    "fns, batches, group", [({}, [1], 1), ({"a": print}, [], 1), ({"a": print}, [1], 0)]
)
def test_over_batches_refuses_nothing_to_time(fns, batches, group):
    with pytest.raises(ConfigError, match="needs at least one callable and one batch") as err:
        compare_over_batches(fns, batches, group=group)
    assert isinstance(err.value, OfframpError)


def test_wallclock_rotates_and_measures():
    t = compare_wallclock({"slow": lambda: time.sleep(0.004), "fast": lambda: None}, repeats=3)
    assert t["slow"] >= 0.004 > t["fast"]


def test_time_over_batches_gives_every_pass_and_paired_ratio_pairs_them():
    t = time_over_batches(
        {"slow": lambda b: time.sleep(0.002), "fast": lambda b: None}, [0, 1], repeats=4, group=1
    )
    assert len(t["slow"]) == len(t["fast"]) == 4
    assert paired_ratio(t["slow"], t["fast"]) > 4
    assert paired_ratio([3.0, 1.0, 8.0], [1.0, 1.0, 2.0]) == 3.0  # ratios 3, 1, 4 -> 3
    with pytest.raises(ConfigError, match="same number"):
        paired_ratio([1.0], [1.0, 2.0])
