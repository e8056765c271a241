import numpy as np
import pytest
import torch

from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy, profile, simulate
from offramp.errors import ConfigError
from offramp.models import MODELS


def _policy(record: ExitRecord, criterion: str, q: float) -> ThresholdPolicy:
    """Thresholds at a quantile of each exit's scores, nudged off any sample's score."""
    s = record.scores(criterion)[:-1].double().numpy()
    thr = np.quantile(s, q, axis=1)
    return ThresholdPolicy(criterion, tuple(float(t) + 1e-7 for t in thr))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
@pytest.mark.parametrize("q", [0.2, 0.5, 0.8])
def test_runtime_equals_simulation(name, criterion, q):
    net = MODELS[name](8, 10).eval()
    x = torch.rand(120, 1, 8, 8)
    y = torch.randint(0, 10, (120,))
    rec = ExitRecord.collect(net, (x, y), batch_size=50)
    pol = _policy(rec, criterion, q)
    sim = simulate(rec, pol)
    assert len(np.unique(sim.exits)) >= 2  # the case is not trivial
    rt = EarlyExitRuntime(net, pol, costs=profile(net, x[:1]))
    res = rt(x)
    np.testing.assert_array_equal(res.exits.numpy(), sim.exits)
    np.testing.assert_array_equal(res.predictions.numpy(), sim.predictions)
    # logits come back in input order: they equal the chosen exit's recorded logits
    chosen = rec.logits[torch.as_tensor(sim.exits), torch.arange(120)]
    torch.testing.assert_close(res.logits, chosen, rtol=1e-5, atol=1e-5)
    one = [rt.run_one(x[i : i + 1]) for i in range(120)]
    np.testing.assert_array_equal([e for _, e, _ in one], sim.exits)
    np.testing.assert_array_equal([p for p, _, _ in one], sim.predictions)


def test_costs_per_sample(cnn, digits_x):
    prof = profile(cnn, digits_x[:1])
    rec = ExitRecord.collect(cnn, (digits_x, torch.zeros(64, dtype=torch.long)))
    pol = _policy(rec, "entropy", 0.5)
    res = EarlyExitRuntime(cnn, pol, costs=prof)(digits_x)
    assert res.costs is not None
    np.testing.assert_allclose(res.costs.numpy(), prof.cumulative[res.exits.numpy()])


def test_everyone_leaves_early(cnn, digits_x):
    pol = ThresholdPolicy("entropy", (float("inf"), float("inf")))
    res = EarlyExitRuntime(cnn, pol)(digits_x)
    assert (res.exits == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(res.logits, cnn(digits_x)[0])


def test_script_mode_equals_eager(cnn, digits_x):
    rec = ExitRecord.collect(cnn, (digits_x, torch.zeros(64, dtype=torch.long)))
    pol = _policy(rec, "max_prob", 0.5)
    eager = EarlyExitRuntime(cnn, pol)(digits_x)
    scripted_rt = EarlyExitRuntime(cnn, pol, mode="script", example_input=digits_x[:2])
    scripted = scripted_rt(digits_x)
    np.testing.assert_array_equal(scripted.exits.numpy(), eager.exits.numpy())
    torch.testing.assert_close(scripted.logits, eager.logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            scripted_rt.plain_backbone()(digits_x), cnn.backbone()(digits_x), rtol=1e-4, atol=1e-4
        )


def test_policy_must_fit_network(cnn):
    with pytest.raises(ConfigError, match="2 thresholds.*3 exits|1 thresholds"):
        EarlyExitRuntime(cnn, ThresholdPolicy("entropy", (0.5,)))
    with pytest.raises(ConfigError, match="example_input"):
        EarlyExitRuntime(cnn, ThresholdPolicy.never(3), mode="script")
    with pytest.raises(ConfigError, match="unknown runtime mode"):
        EarlyExitRuntime(cnn, ThresholdPolicy.never(3), mode="turbo")
