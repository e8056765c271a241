"""DDP on gloo: 2 ranks spawned on this machine (file rendezvous) keep identical parameters
and follow the single-process run on the same global batches."""

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker


@pytest.mark.parametrize("strategy", ["joint", "layerwise", "gated", "final_only"])
def test_ddp_two_ranks_match_single_process(strategy, tmp_path):
    mp.spawn(
        _ddp_worker.worker,
        args=(2, str(tmp_path), strategy),
        nprocs=2,
        join=True,
    )
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    single = _ddp_worker.run(strategy).state_dict()
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{strategy}: ranks disagree on {k}"
        assert torch.allclose(r0[k], single[k], atol=1e-5), f"{strategy}: DDP != single on {k}"
    if strategy == "final_only":  # the unused early heads did not move, and nothing hung
        init = _ddp_worker.mlp(12, 3, hidden=(16, 16, 16), seed=0).state_dict()
        assert torch.equal(r0["heads.0.1.weight"], init["heads.0.1.weight"])


def test_ddp_odd_tail_batch_does_not_hang(tmp_path):
    mp.spawn(
        _ddp_worker.worker,
        args=(2, str(tmp_path), "joint_odd_tail"),
        nprocs=2,
        join=True,
    )
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_undeclared_unused_exits_fail_with_a_hint(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="used_exits"):
        mp.spawn(
            _ddp_worker.worker,
            args=(2, str(tmp_path), "final_only_undeclared"),
            nprocs=2,
            join=True,
        )


def test_strategies_that_change_trainable_sets_refuse_ddp():
    from offramp.errors import ConfigError
    from offramp.training.distributed import ddp_wrap
    from offramp.training.freezeout import Freezeout
    from offramp.training.local import LocalErrorLearning

    net = _ddp_worker.mlp(4, 2, hidden=(4,))
    for strategy in (Freezeout(), LocalErrorLearning.for_network(net, torch.randn(2, 4))):
        with pytest.raises(ConfigError, match="cannot run under DDP"):
            ddp_wrap(net, strategy)
