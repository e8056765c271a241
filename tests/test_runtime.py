import logging

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy, profile, simulate
from offramp.errors import ConfigError, ShapeError
from offramp.models import MODELS
from offramp.runtime import bucket_size


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool], ids=str)
def test_runtime_refuses_a_batch_of_the_wrong_dtype(cnn, digits_x, dtype):
    rt = EarlyExitRuntime(cnn, ThresholdPolicy.never(3))
    with pytest.raises(ShapeError, match=r"dtype torch\.float32.*x\.float\(\)"):
        rt(digits_x.to(dtype))
    with pytest.raises(ShapeError, match=r"dtype torch\.float32.*x\.float\(\)"):
        rt.run_one(digits_x[:1].to(dtype))
    with pytest.raises(ShapeError, match=r"dtype torch\.float32.*x\.float\(\)"):
        next(rt.map([digits_x.to(dtype)]))


def test_runtime_runs_inference_even_after_net_train(cnn, digits_x):
    """net.train() after the runtime was built: BatchNorm still uses (and never updates) its
    running statistics, and every module gets its own mode back."""
    net = MODELS["resnet"](8, 10).eval()
    x = digits_x[:40]
    rt = EarlyExitRuntime(net, ThresholdPolicy.never(net.num_exits))
    want = rt(x).logits
    net.train()
    net.blocks[0].eval()  # a mode of the user's own, which must survive
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    torch.testing.assert_close(rt(x).logits, want)
    torch.testing.assert_close(rt.run_one(x[:1])[2], want[0])
    torch.testing.assert_close(next(rt.map([x])).logits, want)
    for k, v in stats.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net.training and not net.blocks[0].training and net.blocks[1].training


@pytest.mark.slow  # 20 s of compilation; compile mode's equivalence stays in the default run
def test_compile_raises_dynamo_limits_only_around_its_own_calls():
    import torch._dynamo.config as dc

    from offramp.runtime.backends import dynamo_limits

    before = dc.recompile_limit
    with dynamo_limits(before + 100):
        assert dc.recompile_limit == before + 100
    assert dc.recompile_limit == before
    net = MODELS["blenet"](8, 10).eval()
    x = torch.rand(6, 1, 8, 8)
    rt = EarlyExitRuntime(
        net, ThresholdPolicy.never(net.num_exits), mode="compile", example_input=x
    )
    rt(x[:3])
    assert dc.recompile_limit == before  # no process-wide side effect left behind


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


def test_bucket_sizes_by_hand():
    assert [bucket_size(n) for n in (1, 8, 9, 16, 17, 100, 129, 256)] == [
        1, 8, 10, 16, 20, 112, 160, 256
    ]  # fmt: skip
    assert [bucket_size(n, 1) for n in (1, 2, 3, 5, 100)] == [1, 2, 4, 8, 128]
    with pytest.raises(ConfigError, match="power of two"):
        bucket_size(5, 3)


@given(st.integers(1, 5000), st.sampled_from([1, 2, 4, 8]))
def test_bucket_padding_is_bounded(n, per_octave):
    b = bucket_size(n, per_octave)
    assert n <= b < n * (1 + 1 / per_octave)
    assert bucket_size(b, per_octave) == b  # a bucket is its own bucket


def test_compiled_padding_keeps_inputs_order_and_global_config():
    import torch._inductor.config as inductor_config

    net = MODELS["resnet"](8, 10).eval()
    x = torch.rand(37, 1, 8, 8)  # not a bucket: padded to 48, then to each survivor count's
    rec = ExitRecord.collect(net, (x, torch.zeros(37, dtype=torch.long)))
    pol = _policy(rec, "max_prob", 0.5)
    before = inductor_config.freezing
    rt = EarlyExitRuntime(net, pol, mode="compile", example_input=x[:3], buckets_per_octave=2)
    res = rt(x)
    assert inductor_config.freezing == before  # switched on only while compiling
    sim = simulate(rec, pol)
    np.testing.assert_array_equal(res.exits.numpy(), sim.exits)
    chosen = rec.logits[torch.as_tensor(sim.exits), torch.arange(37)]
    torch.testing.assert_close(res.logits, chosen, rtol=1e-4, atol=1e-5)
    plain = rt.plain_backbone()(x)  # inference only, even when called with grad enabled
    assert not plain.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(plain, net(x)[-1], rtol=1e-4, atol=1e-5)


def test_compiled_stages_take_activations_with_side_inputs():
    # token models pass (states, padding mask) between stages: compile mode keyed its
    # variants on `h.shape` and failed on the tuple with a misleading "needs a C++ compiler"
    from offramp.models import rnn_classifier

    net = rnn_classifier(30, 3, layers=2, embed_dim=8, hidden=8, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 30, (6, 7), generator=g)
    x[torch.arange(7) >= torch.tensor([7, 5, 3, 7, 2, 6])[:, None]] = 0
    pol = ThresholdPolicy("max_prob", (0.5,))
    rt = EarlyExitRuntime(net, pol, mode="compile", example_input=x)
    res, want = rt(x), EarlyExitRuntime(net, pol)(x)
    assert torch.equal(res.exits, want.exits)
    torch.testing.assert_close(res.logits, want.logits, rtol=1e-4, atol=1e-5)


def test_compiled_variants_are_one_per_signature_and_respect_strides():
    from offramp.runtime.backends import _Compiled

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    c = _Compiled(conv)
    x = torch.rand(2, 3, 6, 6)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # same shape, other strides
    with torch.no_grad():
        want = conv(x)
        for inp in (x, x_cl, x, x_cl, x[:1]):  # same shape, other strides: another variant
            torch.testing.assert_close(c(inp), conv(inp), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-6)
    assert len(c._variants) == 3


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: export refuses it, torch.compile breaks the
    graph around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else x - 1


def test_compiled_takes_standalone_path_for_inference_and_dynamo_otherwise(caplog):
    from offramp.runtime.backends import _Compiled

    caplog.set_level(logging.DEBUG, logger="offramp.runtime")

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    c = _Compiled(conv)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(c(x), conv(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c(x), conv(x), rtol=1e-5, atol=1e-6)  # grad enabled
    assert {key[0]: kind for key, kind in c.kinds.items()} == {False: "standalone", True: "dynamo"}

    d = _Compiled(_DataDependent())
    with torch.no_grad():
        for sign in (1.0, -1.0):  # one Dynamo variant: its graph break runs either branch
            x = sign * torch.ones(3)
            torch.testing.assert_close(d(x), _DataDependent()(x))
    assert set(d.kinds.values()) == {"dynamo"}
    assert "_DataDependent not compiled ahead of time" in caplog.text  # says why, at debug level

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # not exported: Dynamo
        x = torch.rand(2, 3, 6, 6)
        torch.testing.assert_close(c(x), conv(x), rtol=2e-2, atol=2e-2)
    assert sorted(c.kinds.values()) == ["dynamo", "dynamo", "standalone"]


@pytest.mark.slow  # 30 s of compilation, one per bucket
def test_compiled_runtime_compiles_each_bucket_once():
    net = MODELS["resnet"](8, 10).eval()
    x = torch.rand(40, 1, 8, 8)
    rec = ExitRecord.collect(net, (x, torch.zeros(40, dtype=torch.long)))
    pol = _policy(rec, "max_prob", 0.5)
    rt = EarlyExitRuntime(net, pol, mode="compile", example_input=x[:3], buckets_per_octave=2)
    for _ in range(2):
        for n in (1, 3, 40, 17):
            rt(x[:n])
    first = rt._steps[0]._variants
    # stage 0 sees the raw batch sizes' buckets (1, 3, 48, 24); no duplicates on the rerun
    assert sorted(k[2][0][0] for k in first) == [1, 3, 24, 48]
    assert set(rt._steps[0].kinds.values()) == {"standalone"}  # exported, no Dynamo per call
    np.testing.assert_array_equal(rt(x).exits.numpy(), simulate(rec, pol).exits)


def test_cpp_wrapper_needs_compile_mode():
    net = MODELS["resnet"](8, 10).eval()
    with pytest.raises(ConfigError, match="cpp_wrapper=True applies to mode='compile' only"):
        EarlyExitRuntime(net, ThresholdPolicy.never(net.num_exits), mode="script", cpp_wrapper=True)


@pytest.mark.slow  # about a minute of C++ compilation
def test_cpp_wrapper_runtime_equals_simulation(monkeypatch):
    import torch._inductor
    import torch._inductor.config as inductor_config

    seen = []  # Inductor's cpp_wrapper setting at each ahead-of-time compilation
    compile_ = torch._inductor.standalone_compile

    def spy(*args, **kwargs):
        seen.append(inductor_config.cpp_wrapper)
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", spy)
    net = MODELS["resnet"](8, 10).eval()
    x = torch.rand(12, 1, 8, 8)
    rec = ExitRecord.collect(net, (x, torch.zeros(12, dtype=torch.long)))
    pol = _policy(rec, "max_prob", 0.5)
    rt = EarlyExitRuntime(net, pol, mode="compile", example_input=x[:2], cpp_wrapper=True)
    np.testing.assert_array_equal(rt(x).exits.numpy(), simulate(rec, pol).exits)
    assert rt.run_one(x[:1])[1] == simulate(rec, pol).exits[0]
    assert set(rt._steps[0].kinds.values()) == {"standalone"}
    rt.plain_backbone()(x)
    assert seen and all(seen) and not inductor_config.cpp_wrapper  # on only while compiling
