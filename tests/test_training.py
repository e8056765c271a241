import pytest
import torch

from offramp.errors import CheckpointError, ConfigError
from offramp.models import blenet, mlp
from offramp.training import (
    FitConfig,
    JointTraining,
    constant,
    fit,
    inception,
    joint_loss,
    linear_in_depth,
    sdn_growing,
)
from offramp.training.freezeout import Freezeout


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, 0, 0] > 0.5).long()
    return x, y


def test_joint_loss_by_hand():
    outs = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    y = torch.tensor([0])
    total, per = joint_loss(outs, y, [0.3, 0.5])
    l2 = torch.log1p(torch.exp(torch.tensor(-2.0)))
    want = 0.3 * torch.log(torch.tensor(2.0)) + 0.5 * l2 + torch.log(torch.tensor(2.0))
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert per.shape == (3,)
    with pytest.raises(ConfigError, match="2 λ weights for 1"):
        joint_loss(outs[:2], y, [0.1, 0.2])


def test_schedules():
    assert constant(0.5)(3, 10, 2) == [0.5, 0.5]
    assert inception()(0, 1, 1) == [0.3]
    assert linear_in_depth(1.0)(0, 1, 3) == pytest.approx([0.25, 0.5, 0.75])
    s = sdn_growing()
    assert s(0, 5, 2) == pytest.approx([0.15 * 0.01, 0.3 * 0.01])
    assert s(4, 5, 2) == pytest.approx([0.15, 0.3])
    assert s(2, 5, 2)[1] == pytest.approx(0.3 * (0.01 + 0.99 * 0.5))
    with pytest.raises(ConfigError):
        constant(-1.0)


def test_training_learns_and_logs_per_exit():
    x, y = _data()
    net = blenet(8, 4, exits_after=(0, 1), seed=0)
    hist = fit(net, (x, y), FitConfig(epochs=8, lr=5e-3, show_progress=False), val=(x, y))
    assert len(hist) == 8
    assert len(hist[-1].exit_losses) == 3 and len(hist[-1].val_exit_accuracy) == 3
    assert hist[-1].loss < hist[0].loss
    assert all(0 <= a <= 1 for a in hist[-1].exit_accuracy)


@pytest.mark.parametrize(
    "strategy", [JointTraining(), JointTraining(sdn_growing()), JointTraining(inception())]
)
def test_seeded_runs_are_identical(strategy):
    x, y = _data()
    a = mlp((1, 8, 8), 4, hidden=(16, 16), seed=1)
    b = mlp((1, 8, 8), 4, hidden=(16, 16), seed=1)
    cfg = FitConfig(epochs=3, show_progress=False, seed=7)
    fit(a, (x, y), cfg, strategy=strategy)
    fit(b, (x, y), cfg, strategy=strategy)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


class _Interrupt(Exception):
    pass


def _stop_after(k):
    def cb(entry):
        if entry.epoch == k:
            raise _Interrupt

    return cb


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_after_interruption_gives_same_weights(tmp_path, optimizer):
    x, y = _data()

    # dropout inside makes the global RNG part of the state that must be restored
    def build():
        net = mlp((1, 8, 8), 4, hidden=(16, 16, 16), seed=3)
        net.blocks[1].append(torch.nn.Dropout(0.3))
        return net

    cfg = dict(epochs=5, lr=1e-2, optimizer=optimizer, lr_schedule="cosine", show_progress=False)
    full = build()
    fit(full, (x, y), FitConfig(**cfg))

    ckpt = tmp_path / "run.pt"
    part = build()
    with pytest.raises(_Interrupt):
        fit(part, (x, y), FitConfig(checkpoint=str(ckpt), **cfg), callbacks=[_stop_after(1)])
    assert ckpt.exists() and not (tmp_path / "run.pt.tmp").exists()
    resumed = build()  # fresh process: new weights, the checkpoint must restore everything
    hist = fit(resumed, (x, y), FitConfig(checkpoint=str(ckpt), **cfg))
    assert [h.epoch for h in hist] == [0, 1, 2, 3, 4]
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    x, y = _data(32)
    ckpt = str(tmp_path / "c.pt")
    net = mlp((1, 8, 8), 4, hidden=(8, 8), seed=0)
    fit(net, (x, y), FitConfig(epochs=1, checkpoint=ckpt, show_progress=False))
    with pytest.raises(CheckpointError, match="settings"):
        fit(net, (x, y), FitConfig(epochs=1, lr=0.5, checkpoint=ckpt, show_progress=False))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        fit(net, (x, y), FitConfig(epochs=1, checkpoint=str(tmp_path / "bad.pt")))


@pytest.mark.parametrize("missing", [["rng"], ["history"], ["epoch", "optimizer"], ["model"]])
def test_checkpoint_missing_keys_is_refused_by_name(tmp_path, missing):
    x, y = _data(32)
    ckpt = tmp_path / "c.pt"
    net = mlp((1, 8, 8), 4, hidden=(8, 8), seed=0)
    cfg = FitConfig(epochs=2, checkpoint=str(ckpt), show_progress=False)
    fit(net, (x, y), cfg)
    state = torch.load(ckpt, weights_only=True)
    for k in missing:
        del state[k]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError) as err:
        fit(mlp((1, 8, 8), 4, hidden=(8, 8), seed=0), (x, y), cfg)
    msg = str(err.value)
    assert str(ckpt) in msg and str(missing) in msg and "delete it" in msg


def test_a_finished_run_extends_to_more_epochs_like_a_longer_run(tmp_path):
    """With a constant learning rate and λ, continuing a 1-epoch checkpoint to 3 epochs gives
    the weights of a 3-epoch run; fewer epochs than the checkpoint holds are refused."""
    x, y = _data()
    cfg = dict(lr=1e-2, show_progress=False)
    full = mlp((1, 8, 8), 4, hidden=(16, 16), seed=3)
    fit(full, (x, y), FitConfig(epochs=3, **cfg), strategy=JointTraining(inception()))
    ckpt = str(tmp_path / "c.pt")
    fit(
        mlp((1, 8, 8), 4, hidden=(16, 16), seed=3),
        (x, y),
        FitConfig(epochs=1, checkpoint=ckpt, **cfg),
        strategy=JointTraining(inception()),
    )
    longer = mlp((1, 8, 8), 4, hidden=(16, 16), seed=3)
    hist = fit(
        longer,
        (x, y),
        FitConfig(epochs=3, checkpoint=ckpt, **cfg),
        strategy=JointTraining(inception()),
    )
    assert [h.epoch for h in hist] == [0, 1, 2]
    for pa, pb in zip(full.parameters(), longer.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(CheckpointError, match="holds 3 epochs trained"):
        fit(longer, (x, y), FitConfig(epochs=2, checkpoint=ckpt, **cfg))


@pytest.mark.parametrize(
    ("settings", "make", "words"),
    [
        ({"lr_schedule": "cosine"}, JointTraining, "lr_schedule cosine"),
        ({}, lambda: JointTraining(sdn_growing()), "λ schedule sdn"),
        ({}, lambda: Freezeout(t0=0.5), "freezeout"),
        ({}, lambda: JointTraining(lambda e, n, k: [e / n] * k), "custom"),
    ],
)
def test_more_epochs_are_refused_when_training_depends_on_the_total(
    tmp_path, settings, make, words
):
    x, y = _data(32)
    ckpt = str(tmp_path / "c.pt")
    cfg = dict(checkpoint=ckpt, show_progress=False, **settings)
    net = mlp((1, 8, 8), 4, hidden=(8, 8), seed=0)
    fit(net, (x, y), FitConfig(epochs=2, **cfg), strategy=make())
    with pytest.raises(CheckpointError) as err:
        fit(net, (x, y), FitConfig(epochs=3, **cfg), strategy=make())
    assert words in str(err.value) and "epochs" in str(err.value)


def test_bad_config():
    x, y = _data(8)
    net = mlp((1, 8, 8), 4, hidden=(8, 8))
    with pytest.raises(ConfigError, match="optimizer"):
        fit(net, (x, y), FitConfig(epochs=1, optimizer="rmsprop"))
    with pytest.raises(ConfigError, match="epochs"):
        fit(net, (x, y), FitConfig(epochs=0))
    with pytest.raises(ConfigError, match="diverged"):
        fit(net, (x * float("inf"), y), FitConfig(epochs=1, show_progress=False))


def test_a_stage_by_stage_fit_refuses_another_total(tmp_path):
    from offramp.training.layerwise import fit_layerwise

    x, y = _data(32)
    ckpt = str(tmp_path / "c.pt")
    net = mlp((1, 8, 8), 4, hidden=(8, 8), seed=0)
    fit_layerwise(net, (x, y), FitConfig(epochs=1, checkpoint=ckpt, show_progress=False))
    net = mlp((1, 8, 8), 4, hidden=(8, 8), seed=0)
    with pytest.raises(CheckpointError, match="layer-wise training trains every stage"):
        fit_layerwise(net, (x, y), FitConfig(epochs=2, checkpoint=ckpt, show_progress=False))
