"""Export: segments (stages with their exit tests, compaction inside) to ONNX and TorchScript
decide exactly as the eager runtime on a real test set, for every policy; bundles check their
files; the ONNX Runtime backend equals eager."""

import json

import pytest
import torch
from torch import nn

from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy
from offramp.errors import ConfigError, ConversionError, DataError
from offramp.export import (
    MANIFEST,
    check_splits,
    export_segments,
    load_bundle,
    segments,
)
from offramp.models import blenet
from offramp.training import FitConfig, fit

# the families and the policy battery: the same nine policies, calibrated on validation
from .families import FAMILIES
from .test_policies_battery import POLICY_NAMES, _policies

onnx_missing = None
try:
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    onnx_missing = f"the onnx extra is not installed ({exc}): pip install 'offramp[onnx]'"
needs_onnx = pytest.mark.skipif(onnx_missing is not None, reason=onnx_missing or "")


@pytest.fixture(scope="module")
def digits():
    """B-LeNet with three exits trained briefly on scikit-learn digits (real images); its
    validation record and the test images."""
    pytest.importorskip("sklearn", reason="the digits need scikit-learn: offramp[sklearn]")
    from offramp.data import load_digits_splits

    s = load_digits_splits(seed=0)
    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0)
    fit(net, s.train, FitConfig(epochs=6, lr=3e-3, show_progress=False, seed=0))
    net.eval()
    return net, ExitRecord.collect(net, s.val), s.test[0]


def _eager(net, policy, x):
    r = EarlyExitRuntime(net, policy)(x)
    return r.logits, r.exits


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_torchscript_bundle_decides_as_eager_for_every_policy(digits, name, tmp_path):
    net, val, x = digits
    policy = _policies(val)[name]
    logits, exits = _eager(net, policy, x)
    assert 0 < (exits < 2).sum() < len(x) or name.startswith("patience")  # exits really mix
    export_segments(net, policy, tmp_path, x[:16], splits=[1], fmt="torchscript")
    got_logits, got_exits = load_bundle(tmp_path).run(x)
    assert torch.equal(got_exits, exits)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)


# three policies in the default run (a threshold, a learned scorer, a stateful test), the
# other six with -m slow: each ONNX export takes 5-8 s
_QUICK = ("entropy", "learned", "patience2")


@needs_onnx
@pytest.mark.parametrize(
    "name",
    [n if n in _QUICK else pytest.param(n, marks=pytest.mark.slow) for n in POLICY_NAMES],
)
def test_onnx_segment_decides_as_eager_for_every_policy(digits, name, tmp_path):
    net, val, x = digits
    policy = _policies(val)[name]
    logits, exits = _eager(net, policy, x)
    export_segments(net, policy, tmp_path, x[:16], fmt="onnx")  # the network as one segment
    got_logits, got_exits = load_bundle(tmp_path).run(x)
    assert torch.equal(got_exits, exits), f"{int((got_exits != exits).sum())} decisions differ"
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)


@needs_onnx
def test_onnx_bundle_cut_in_three_tiers_equals_eager_at_every_batch_size(digits, tmp_path):
    net, val, x = digits
    policy = _policies(val)["entropy"]
    logits, exits = _eager(net, policy, x)
    path = export_segments(net, policy, tmp_path, x[:16], splits=[1, 2], fmt="onnx")
    manifest = json.loads(path.read_text())
    assert [s["stages"] for s in manifest["segments"]] == [[0, 1], [1, 2], [2, 3]]
    assert manifest["policy"]["thresholds"] == list(policy.thresholds)
    assert manifest["input"] == {"shape": [1, 8, 8], "dtype": "float32"}
    bundle = load_bundle(tmp_path)
    got_logits, got_exits = bundle.run(x)
    assert torch.equal(got_exits, exits)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    for n in (1, 2, 3):  # a batch of one, and batches whose rows all leave or all go on
        assert torch.equal(bundle.run(x[:n])[1], exits[:n])


@needs_onnx
def test_onnx_runtime_mode_equals_eager_batched_and_at_batch_one(digits):
    net, val, x = digits
    policy = _policies(val)["patience2"]  # carries a state from exit to exit
    eager = EarlyExitRuntime(net, policy)(x)
    rt = EarlyExitRuntime(net, policy, mode="onnx", example_input=x[:2])
    got = rt(x)
    assert torch.equal(got.exits, eager.exits)
    torch.testing.assert_close(got.logits, eager.logits, rtol=1e-4, atol=1e-5)
    assert [rt.run_one(x[i : i + 1])[1] for i in range(20)] == eager.exits[:20].tolist()
    plain = rt.plain_backbone()
    torch.testing.assert_close(plain(x), net(x)[-1], rtol=1e-4, atol=1e-5)


def test_segments_chained_in_eager_equal_the_runtime(digits):
    net, val, x = digits
    policy = _policies(val)["max_prob"]
    _, exits = _eager(net, policy, x)
    for splits in ([], [1], [2], [1, 2]):
        rows, h, state = torch.arange(len(x)), x, policy.initial_state(len(x))
        got = torch.full_like(exits, -1)
        for seg in segments(net, policy, splits):
            out = seg(h, state)
            left = out[1] >= 0
            got[rows[left]] = out[1][left]
            if not seg.is_final:
                rows, h, state = rows[out[2]], out[3], out[4]
        assert torch.equal(got, exits), splits


def test_splits_are_checked():
    assert check_splits([1, 2], 3) == (1, 2)
    with pytest.raises(ConfigError, match="outside 1 … 2"):
        check_splits([3], 3)
    with pytest.raises(ConfigError, match="increase strictly"):
        check_splits([1, 1], 3)


def test_bundle_refuses_changed_missing_and_malformed_files(digits, tmp_path):
    net, val, x = digits
    policy = _policies(val)["entropy"]
    export_segments(net, policy, tmp_path, x[:4], splits=[1], fmt="torchscript")
    seg = tmp_path / "segment-1.pt"
    data = seg.read_bytes()
    seg.write_bytes(data[:-10])
    with pytest.raises(DataError, match="checksum differs"):
        load_bundle(tmp_path)
    seg.unlink()
    with pytest.raises(DataError, match="segment file 'segment-1.pt' is missing"):
        load_bundle(tmp_path)
    seg.write_bytes(data)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["segments"][0]["files"][0]["file"] = "../elsewhere.pt"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is missing"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text('{"offramp_bundle": 1, "format": "onnx"}')
    with pytest.raises(DataError, match="malformed"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(DataError, match="not an offramp bundle"):
        load_bundle(tmp_path / MANIFEST)
    with pytest.raises(DataError, match="has no manifest.json"):
        load_bundle(tmp_path / "nowhere")


def test_export_refuses_bad_arguments(digits, tmp_path):
    net, val, x = digits
    policy = _policies(val)["entropy"]
    with pytest.raises(ConfigError, match="unknown export format"):
        export_segments(net, policy, tmp_path, x[:4], fmt="tflite")
    with pytest.raises(ConfigError, match="unknown codec"):
        export_segments(net, policy, tmp_path, x[:4], codec="int4")
    with pytest.raises(ConfigError, match="two or more"):
        export_segments(net, policy, tmp_path, x[:1])
    with pytest.raises(ConfigError, match="outside"):
        export_segments(net, policy, tmp_path, x[:4], splits=[5])
    assert not (tmp_path / MANIFEST).exists()


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if bool(x.sum() > 0) else x  # a Python branch on a value


@needs_onnx
def test_to_onnx_refuses_what_does_not_export_with_the_reason():
    from offramp.export import to_onnx

    with pytest.raises(ConversionError, match="batch of at least 2"):
        to_onnx(nn.Linear(3, 2), (torch.zeros(1, 3),))
    with pytest.raises(ConversionError, match="_Branchy does not export to ONNX"):
        to_onnx(_Branchy(), (torch.randn(4, 3),))


def test_a_missing_onnx_extra_is_named(monkeypatch):
    import sys

    from offramp.export import require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'offramp\[onnx\]'"):
        require_onnx()
    with pytest.raises(ConfigError, match="onnxruntime"):
        EarlyExitRuntime(
            blenet(8, 10), _never(), mode="onnx", example_input=torch.zeros(2, 1, 8, 8)
        )


def _never():
    from offramp import ThresholdPolicy

    return ThresholdPolicy.never(2)


def test_rows_that_go_on_carry_their_last_local_exit_as_a_fallback(digits):
    net, val, x = digits
    policy = _policies(val)["entropy"]
    with torch.no_grad():
        every = net(x)  # every exit's logits, every row
        for split in (1, 2):
            device = segments(net, policy, [split])[0]
            logits, exits, rows, *_ = device(x, policy.initial_state(len(x)))
            going = exits < 0
            assert torch.equal(going.nonzero().squeeze(1), rows) and 0 < going.sum() < len(x)
            torch.testing.assert_close(logits[going], every[split - 1][going])
            left = ~going
            for e in exits[left].unique().tolist():
                torch.testing.assert_close(logits[exits == e], every[e][exits == e])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torchscript_segments_of_every_family_decide_as_eager(family, tmp_path):
    """CNNs, a ViT, a text transformer with a padding mask, GRUs and LSTMs: cut after their
    first exit, traced with compaction inside, the same decisions as the runtime."""
    from offramp.policies import exit_scores

    make, data = FAMILIES[family]
    net, x = make().eval(), data()
    with torch.no_grad():
        scores = exit_scores(torch.stack(tuple(net(x))), "max_prob")
    policy = ThresholdPolicy(
        "max_prob", tuple(float(scores[i].median()) for i in range(net.num_exits - 1))
    )
    want = EarlyExitRuntime(net, policy)(x)
    splits = [1] if net.num_exits > 2 else []
    export_segments(net, policy, tmp_path, x[:8], splits=splits, fmt="torchscript")
    logits, exits = load_bundle(tmp_path).run(x)
    assert torch.equal(exits, want.exits)
    torch.testing.assert_close(logits, want.logits, rtol=1e-4, atol=1e-5)


def _median_policy(net, x):
    """Thresholds halfway between the two middle scores of each exit: half the rows leave,
    and no row sits within float32 rounding of a threshold (ONNX Runtime's fused kernels
    differ from eager by ~1e-7, which could flip a row exactly on it)."""
    from offramp.policies import exit_scores

    with torch.no_grad():
        scores = exit_scores(torch.stack(tuple(net(x))), "max_prob")
    mids = []
    for i in range(net.num_exits - 1):
        s = scores[i].sort().values
        k = len(s) // 2
        mids.append(float(s[k - 1] + s[k]) / 2)
    return ThresholdPolicy("max_prob", tuple(mids))


def _onnx_family(family, tmp_path):
    make, data = FAMILIES[family]
    net, x = make().eval(), data()
    policy = _median_policy(net, x)
    want = EarlyExitRuntime(net, policy)(x)
    path = export_segments(net, policy, tmp_path, x[:8], splits=[1], fmt="onnx")
    bundle = load_bundle(tmp_path)
    logits, exits = bundle.run(x)
    assert torch.equal(exits, want.exits)
    torch.testing.assert_close(logits, want.logits, rtol=1e-4, atol=1e-5)
    for n in (1, 3):
        assert torch.equal(bundle.run(x[:n])[1], want.exits[:n])
    return [s["form"] for s in json.loads(path.read_text())["segments"]]


@needs_onnx
def test_a_segment_that_is_not_one_onnx_graph_is_exported_stage_by_stage(tmp_path):
    # ResNet's batch norm cannot take a data-dependent row count inside one graph
    forms = _onnx_family("resnet", tmp_path)
    assert "staged" in forms


@needs_onnx
@pytest.mark.slow  # about a minute of ONNX export
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_segments_of_every_family_decide_as_eager(family, tmp_path):
    _onnx_family(family, tmp_path)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_an_encoder_that_refuses_empty_batches_exports_stage_by_stage(fmt, tmp_path):
    """Hugging Face attention reshapes with ``view(n, t, -1, d)``, which refuses zero rows, so
    one graph would fail whenever every row leaves early: the segment goes stage by stage
    (host compaction, stages skipped once no row is left) and decides as the runtime."""
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    from offramp.models.hf import hf_encoder

    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    net = hf_encoder(bert.eval(), 2, head="mean").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 50, (16, 10), generator=g)
    for i, n in enumerate(torch.randint(3, 11, (16,), generator=g).tolist()):
        x[i, n:] = 0  # right-padded
    policy = _median_policy(net, x)
    want = EarlyExitRuntime(net, policy)(x)
    path = export_segments(net, policy, tmp_path, x[:8], splits=[1], fmt=fmt)
    assert {s["form"] for s in json.loads(path.read_text())["segments"]} == {"staged"}
    bundle = load_bundle(tmp_path)
    logits, exits = bundle.run(x)
    assert torch.equal(exits, want.exits)
    torch.testing.assert_close(logits, want.logits, rtol=1e-4, atol=1e-5)
    easy = (want.exits == 0).nonzero().squeeze(1)
    assert easy.numel() and torch.equal(bundle.run(x[easy])[1], want.exits[easy])  # none go on
