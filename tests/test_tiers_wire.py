"""The tier wire: protobuf messages, a gRPC tier server with batching and refusals, the
device's client and runtime, degradation when a tier is slow or killed, TLS, and chained
edge → cloud tiers; in-process servers, and real `offramp serve` processes."""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc", reason="the net extra is not installed: offramp[net]")
pytest.importorskip("google.protobuf", reason="the net extra is not installed: offramp[net]")

from offramp import EarlyExitRuntime, ThresholdPolicy  # noqa: E402
from offramp.errors import ConfigError, DataError, TierError  # noqa: E402
from offramp.export import export_segments, load_bundle, segments  # noqa: E402
from offramp.models import blenet  # noqa: E402
from offramp.tiers.client import AsyncTierClient, TierClient  # noqa: E402
from offramp.tiers.device import TieredRuntime  # noqa: E402
from offramp.tiers.messages import (  # noqa: E402
    pack_reply,
    pack_request,
    unpack_reply,
    unpack_request,
)
from offramp.tiers.process import ServeProcess  # noqa: E402
from offramp.tiers.server import (  # noqa: E402
    SERVICE,
    TOKEN_KEY,
    ServerConfig,
    ServerThread,
    TensorSpec,
    TierServer,
)

TOKEN = "test-token-0123456789abcdef"
H1 = [TensorSpec((5, 5, 5), torch.float32)]  # what B-LeNet's stage 1 takes at 8x8 input


@pytest.fixture(scope="module")
def net_policy():
    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0).eval()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        t = float(net(x)[0].softmax(1).max(1).values.median())
    return net, ThresholdPolicy("max_prob", (t, t)), x


def _server(segment, stages=(1, 3), final=True, next_tier=None, **cfg):
    config = ServerConfig(token=TOKEN, **cfg)
    spec = {
        0: [TensorSpec((1, 8, 8), torch.float32)],  # the input
        1: H1,
        2: [TensorSpec((10, 4, 4), torch.float32)],
    }[stages[0]]
    return ServerThread(
        TierServer(
            segment,
            stages=stages,
            final=final,
            h_spec=spec,
            state_size=0,
            config=config,
            next_tier=next_tier,
        )
    )


def _client(port, **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("stage", 1)
    return TierClient(f"127.0.0.1:{port}", **kw)


# ---------------------------------------------------------------------------- messages


def test_messages_round_trip_with_side_inputs_and_codecs():
    h = (torch.randn(3, 4, 8), torch.tensor([[False] * 4, [False, False, True, True], [True] * 4]))
    state = torch.tensor([[1, 0], [2, 1], [0, 0]])
    for codec in ("fp32", "fp16", "int8", "int8-channel"):
        r = unpack_request(pack_request("id-7", 2, h, state, codec))
        assert r.request_id == "id-7" and r.stage == 2
        assert torch.equal(r.h[1], h[1]) and torch.equal(r.state, state)  # raw: exact
        tol = {"fp32": 0, "fp16": 1e-2, "int8": 0.05, "int8-channel": 0.05}[codec]
        assert float((r.h[0] - h[0]).abs().max()) <= tol * float(h[0].abs().max()) + 1e-12
    rep = unpack_reply(
        pack_reply(
            "x",
            torch.randn(3, 5),
            torch.tensor([0, 2, 1]),
            torch.zeros(3, dtype=torch.bool),
            "cloud",
        )
    )
    assert rep.tier == "cloud" and rep.logits.shape == (3, 5) and rep.degraded.dtype == torch.bool


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\xff\xff\xff", "not an offramp Request"),
        (b"", "at least one activation tensor"),
    ],
)
def test_malformed_requests_are_data_errors(data, words):
    with pytest.raises(DataError, match=words):
        unpack_request(data)


def test_a_reply_whose_tensors_disagree_is_refused():
    data = pack_reply(
        "x", torch.randn(3, 5), torch.tensor([0, 2]), torch.zeros(2, dtype=torch.bool)
    )
    with pytest.raises(DataError, match="do not describe the same rows"):
        unpack_reply(data)


# ---------------------------------------------------------------------------- in-process tiers


def test_tiered_runtime_equals_one_process_and_batches_concurrent_requests(net_policy):
    net, policy, x = net_policy
    want = EarlyExitRuntime(net, policy)(x)
    device, cloud = segments(net, policy, [1])
    srv = _server(cloud, max_wait_ms=50.0)
    try:
        rt = TieredRuntime(device, _client(srv.port), last_exit=0)
        r = rt(x)
        assert torch.equal(r.exits, want.exits) and not r.degraded.any()
        torch.testing.assert_close(r.logits, want.logits)
        assert torch.equal(r.offloaded, want.exits > 0) and r.bytes_sent > 0
        # eight devices at once: their requests share batches
        before = dict(srv.server.stats)
        results = {}

        def one(i):
            results[i] = TieredRuntime(device, _client(srv.port), last_exit=0)(x[i * 8 : i * 8 + 8])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = torch.cat([results[i].exits for i in range(8)])
        assert torch.equal(got, want.exits)
        stats = srv.server.stats
        assert stats["requests"] - before["requests"] == 8
        assert stats["batches"] - before["batches"] < 8  # grouped
    finally:
        srv.stop()


def test_int8_on_the_wire_keeps_the_decisions_and_sends_a_quarter(net_policy):
    net, policy, x = net_policy
    device, cloud = segments(net, policy, [1])
    srv = _server(cloud)
    try:
        fp32 = TieredRuntime(device, _client(srv.port), last_exit=0)(x)
        int8 = TieredRuntime(device, _client(srv.port, codec="int8"), last_exit=0)(x)
    finally:
        srv.stop()
    assert (int8.predictions == fp32.predictions).double().mean() >= 0.95
    assert int8.bytes_sent < 0.4 * fp32.bytes_sent


def test_the_server_refuses_with_clear_statuses_and_keeps_serving(net_policy):
    net, policy, _x = net_policy
    _device, cloud = segments(net, policy, [1])
    srv = _server(cloud, max_batch_rows=16, max_queue_rows=16, max_message_bytes=64 << 10)
    h = torch.rand(2, 5, 5, 5)
    state = torch.zeros(2, 0, dtype=torch.long)
    try:
        with pytest.raises(TierError, match="UNAUTHENTICATED: missing or wrong token") as e:
            _client(srv.port, token="wrong-token-but-long-enough").forward(h, state)
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(TierError, match="this tier runs stage 1; the request is for stage 2"):
            _client(srv.port, stage=2).forward(h, state)
        with pytest.raises(TierError, match=r"h\[0\]: expected \(rows, 5, 5, 5\)"):
            _client(srv.port).forward(torch.rand(2, 5, 4, 5), state)
        with pytest.raises(TierError, match="a request carries 1 … 16 rows, got 20; split it"):
            _client(srv.port).forward(torch.rand(20, 5, 5, 5), torch.zeros(20, 0, dtype=torch.long))
        big = torch.rand(10, 5, 50, 50)  # 500 KB over a 64 KiB cap
        with pytest.raises(TierError, match="RESOURCE_EXHAUSTED"):
            _client(srv.port, max_message_bytes=8 << 20).forward(
                big, torch.zeros(10, 0, dtype=torch.long)
            )
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        call = channel.unary_unary(SERVICE)
        with pytest.raises(grpc.RpcError) as bad:
            call(b"\x08\x96\x01garbage", timeout=5, metadata=((TOKEN_KEY, TOKEN),))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an offramp Request" in bad.value.details()
        channel.close()
        # after all that, the server still answers
        reply = _client(srv.port).forward(h, state)
        assert reply.exits.shape == (2,)
        assert srv.server.stats["refused"] == 5  # the oversize one never reached the handler
    finally:
        srv.stop()


class _Slow(torch.nn.Module):
    """A segment that waits for ``gate`` (or ``delay`` seconds) before computing."""

    def __init__(self, segment, delay=0.0):
        super().__init__()
        self.segment, self.delay, self.gate = segment, delay, threading.Event()
        self.gate.set()

    def forward(self, h, state):
        self.gate.wait(10)
        time.sleep(self.delay)
        return self.segment(h, state)


def test_a_full_queue_answers_resource_exhausted(net_policy):
    net, policy, _x = net_policy
    _, cloud = segments(net, policy, [1])
    slow = _Slow(cloud)
    srv = _server(slow, max_batch_rows=4, max_queue_rows=8, max_wait_ms=0.0)
    h, state = torch.rand(4, 5, 5, 5), torch.zeros(4, 0, dtype=torch.long)
    codes = []
    try:
        slow.gate.clear()  # the first batch blocks the worker; the queue fills behind it
        done = []

        def send():
            try:
                _client(srv.port, timeout_s=20).forward(h, state)
                done.append(True)
            except TierError as exc:
                codes.append(exc.code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        time.sleep(0.3)
        slow.gate.set()
        for t in threads:
            t.join()
    finally:
        srv.stop()
    assert "RESOURCE_EXHAUSTED" in codes  # refused, not queued without bound
    assert len(done) + len(codes) == 6 and len(done) >= 2


def test_a_slow_tier_degrades_then_backs_off_then_offloading_resumes(net_policy):
    net, policy, x = net_policy
    want = EarlyExitRuntime(net, policy)(x)
    device, cloud = segments(net, policy, [1])
    slow = _Slow(cloud, delay=0.6)
    srv = _server(slow)
    try:
        rt = TieredRuntime(device, _client(srv.port, timeout_s=0.2, retry_after_s=0.5), last_exit=0)
        t0 = time.perf_counter()
        r = rt(x)
        assert time.perf_counter() - t0 < 0.5  # the deadline, not the tier's 0.6 s
        assert r.error == "DEADLINE_EXCEEDED"
        assert torch.equal(r.degraded, want.exits > 0)  # every offloaded row, none other
        assert (r.exits[r.degraded] == 0).all()  # answered from the device's exit
        assert torch.equal(r.exits[~r.degraded], want.exits[~r.degraded])
        assert rt(x).error == "BACKING_OFF"  # no call while backing off
        slow.delay = 0.0
        time.sleep(0.6)
        r = rt(x)
        assert r.error is None and not r.degraded.any() and torch.equal(r.exits, want.exits)
        s = rt.stats
        assert s["degraded"] == 2 * int((want.exits > 0).sum()) and s["samples"] == 3 * len(x)
        assert s["failures"] == {"DEADLINE_EXCEEDED": 1, "BACKING_OFF": 1}
    finally:
        srv.stop()


def test_a_hedge_answers_the_rows_the_device_does_not_and_fails_over(net_policy):
    """The input raced to a server running the whole network: the same answers as the
    runtime, the device's own exits never wait for it; when the hedge is down its rows go to
    the next tier (or degrade), and nothing is lost."""
    net, policy, x = net_policy
    want = EarlyExitRuntime(net, policy)(x)
    device, cloud = segments(net, policy, [1])
    (whole,) = segments(net, policy, [])
    hedge_srv = _server(whole, stages=(0, 3))
    cloud_srv = _server(cloud)
    try:
        hedge = _client(hedge_srv.port, stage=0, retry_after_s=0.2)
        with pytest.raises(ConfigError, match="stage 0"):
            TieredRuntime(device, None, last_exit=0, hedge=_client(hedge_srv.port))
        rt = TieredRuntime(device, None, last_exit=0, hedge=hedge, request_rows=16)
        r = rt(x)  # 64 rows: four hedged requests of 16
        assert torch.equal(r.exits, want.exits) and not r.degraded.any()
        torch.testing.assert_close(r.logits, want.logits)
        assert torch.equal(r.offloaded, want.exits > 0)
        assert rt.stats["hedged"] == int((want.exits > 0).sum()) and r.bytes_sent > 0
        easy = (want.exits == 0).nonzero().squeeze(1)[:4]
        assert not rt(x[easy]).offloaded.any()  # answered on the device, the hedge cancelled
        assert hedge_srv.server.stats["requests"] >= 4
        hedge_srv.stop()
        both = TieredRuntime(
            device, _client(cloud_srv.port), last_exit=0, hedge=_client(hedge_srv.port, stage=0)
        )
        r = both(x)  # the hedge is down: the split's tier answers, nothing degraded
        assert r.error is None and not r.degraded.any()
        assert torch.equal(r.exits, want.exits) and both.stats["hedged"] == 0
        assert both.stats["hedge_failures"] == {"UNAVAILABLE": 1} and not both.stats["failures"]
        r = rt(x)  # no tier left: degraded, answered from the device's exit
        assert torch.equal(r.degraded, want.exits > 0) and (r.exits[r.degraded] == 0).all()
        assert r.error in ("UNAVAILABLE", "BACKING_OFF")  # the hedge's failure, unanswered
        (whole_device,) = segments(net, policy, [])
        with pytest.raises(ConfigError, match="ends with the final exit"):
            TieredRuntime(whole_device, None, last_exit=2, hedge=_client(1, stage=0))
    finally:
        hedge_srv.stop()
        cloud_srv.stop()


class _SlowStage(torch.nn.Module):
    """A stage that takes ``seconds`` and lets every row go on; counts its calls."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, h, state):
        self.calls += 1
        time.sleep(self.seconds)
        return h, torch.zeros(h.shape[0], 10), torch.zeros(h.shape[0], dtype=torch.bool), state


class _Final(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return torch.ones(h.shape[0], 10)


def test_a_server_stops_computing_for_a_caller_that_has_gone():
    """A cancelled request (a hedge the device no longer needs) is dropped at the next stage
    boundary of a staged segment, instead of running to its end."""
    from offramp.export import StagedSegment

    stages = [_SlowStage(0.3) for _ in range(3)]
    final = _Final()
    srv = _server(StagedSegment(stages, final, 1), stages=(1, 5))
    try:
        h, state = torch.rand(2, 5, 5, 5), torch.zeros(2, 0, dtype=torch.long)
        client = _client(srv.port, timeout_s=5)
        assert client.forward(h, state).exits.tolist() == [4, 4]  # awaited: every stage
        assert [s.calls for s in stages] == [1, 1, 1] and final.calls == 1
        pending = client.forward_future(h, state)
        time.sleep(0.15)  # during the first stage
        pending.cancel()
        deadline = time.monotonic() + 5
        while srv.server.stats["batches"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [s.calls for s in stages] == [2, 1, 1] and final.calls == 1
        assert srv.server.stats["abandoned_rows"] == 2
    finally:
        srv.stop()


def test_edge_forwards_to_cloud_and_degrades_when_the_cloud_is_gone(net_policy):
    net, policy, x = net_policy
    want = EarlyExitRuntime(net, policy)(x)
    device, edge, cloud = segments(net, policy, [1, 2])
    cloud_srv = _server(cloud, stages=(2, 3))
    nxt = AsyncTierClient(f"127.0.0.1:{cloud_srv.port}", token=TOKEN, stage=2, timeout_s=1.0)
    edge_srv = _server(edge, stages=(1, 2), final=False, next_tier=nxt, tier="edge")
    try:
        rt = TieredRuntime(device, _client(edge_srv.port), last_exit=0)
        r = rt(x)
        assert torch.equal(r.exits, want.exits) and not r.degraded.any()
        torch.testing.assert_close(r.logits, want.logits)
        cloud_srv.stop()
        r = rt(x)
        to_cloud = want.exits == 2
        assert torch.equal(r.degraded, to_cloud)  # the edge answered them from exit 1
        assert (r.exits[to_cloud] == 1).all() and torch.equal(
            r.exits[~to_cloud], want.exits[~to_cloud]
        )
        assert edge_srv.server.stats["degraded_rows"] == int(to_cloud.sum())
    finally:
        edge_srv.stop()
        cloud_srv.stop()


def _self_signed():
    crypto = pytest.importorskip("cryptography", reason="TLS tests need cryptography (dev)")
    del crypto
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls_serves_clients_that_trust_the_certificate_only(net_policy):
    net, policy, x = net_policy
    want = EarlyExitRuntime(net, policy)(x)
    device, cloud = segments(net, policy, [1])
    key, cert = _self_signed()
    srv = _server(cloud, tls=(key, cert))
    try:
        rt = TieredRuntime(device, _client(srv.port, tls_root_cert=cert), last_exit=0)
        assert torch.equal(rt(x).exits, want.exits)
        plain = TieredRuntime(device, _client(srv.port, timeout_s=2), last_exit=0)
        assert plain(x).error == "UNAVAILABLE"  # a plaintext client gets nothing
    finally:
        srv.stop()


def test_server_settings_that_are_unsafe_are_refused():
    with pytest.raises(ConfigError, match="16 characters or more"):
        ServerConfig(token="short").check()
    with pytest.raises(ConfigError, match="refusing to serve plaintext on 0.0.0.0"):
        ServerConfig(token=TOKEN, host="0.0.0.0").check()
    ServerConfig(token=TOKEN, host="0.0.0.0", allow_plaintext_remote=True).check()
    with pytest.raises(ConfigError, match="max_batch_rows"):
        ServerConfig(token=TOKEN, max_batch_rows=8, max_queue_rows=4).check()


# ---------------------------------------------------------------------------- real processes


def _serve(bundle: Path, port: int = 0) -> ServeProcess:
    return ServeProcess(bundle, TOKEN, bind=f"127.0.0.1:{port}", args=["--max-wait-ms", "1"])


def test_a_killed_cloud_process_degrades_nothing_is_lost_and_a_restart_resumes(
    net_policy, tmp_path
):
    net, policy, x = net_policy
    export_segments(net, policy, tmp_path, x[:8], splits=[1], fmt="torchscript", codec="fp16")
    _logits, exits = load_bundle(tmp_path).run(x)
    srv = _serve(tmp_path)
    try:
        rt = TieredRuntime.from_bundle(
            tmp_path, srv.target, token=TOKEN, timeout_s=2.0, retry_after_s=0.2
        )
        assert rt.client.codec == "fp16"  # the bundle's codec
        first = rt(x)
        assert (first.exits == exits).double().mean() >= 0.95 and not first.degraded.any()
        srv.kill()
        answered = [rt(x[i : i + 4]) for i in range(0, 64, 4)]  # the tier is gone
        assert sum(len(r.exits) for r in answered) == 64  # every sample answered
        assert all((r.degraded == r.offloaded).all() for r in answered)
        srv.stop()
        srv = _serve(tmp_path, srv.port)  # back on the same port
        time.sleep(0.5)
        deadline = time.monotonic() + 10
        while (r := rt(x)).degraded.any() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not r.degraded.any() and (r.exits == exits).double().mean() >= 0.95
    finally:
        out = srv.stop()
    assert "stopped;" in out  # a graceful stop on SIGTERM


def test_from_bundle_hedges_to_a_served_whole_network(net_policy, tmp_path):
    net, policy, x = net_policy
    split, whole = tmp_path / "split", tmp_path / "whole"
    export_segments(net, policy, split, x[:8], splits=[1], fmt="torchscript")
    export_segments(net, policy, whole, x[:8], fmt="torchscript")
    _logits, exits = load_bundle(whole).run(x)
    with _serve(whole) as srv:
        rt = TieredRuntime.from_bundle(split, None, hedge=srv.target, token=TOKEN)
        assert rt.hedge is not None and rt.hedge.codec == "fp32"  # the input, as it is
        r = rt(x)
        assert not r.degraded.any() and torch.equal(r.exits, exits)
        assert rt.stats["hedged"] == int((exits > 0).sum()) > 0


def test_serve_process_reports_a_server_that_does_not_start(net_policy, tmp_path):
    net, policy, x = net_policy
    export_segments(net, policy, tmp_path, x[:4], splits=[1], fmt="torchscript")
    with pytest.raises(TierError, match=r"did not start(.|\n)*segment 0 runs on the device"):
        ServeProcess(tmp_path, TOKEN, args=["--segment", "0"])


def test_offramp_serve_refuses_unsafe_or_impossible_settings(
    net_policy, tmp_path, monkeypatch, capsys
):
    from offramp.cli import main

    net, policy, x = net_policy
    export_segments(net, policy, tmp_path, x[:4], splits=[1], fmt="torchscript")
    monkeypatch.delenv("OFFRAMP_TOKEN", raising=False)
    assert main(["serve", str(tmp_path), "--tier", "cloud"]) == 2
    assert "no token: set OFFRAMP_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("OFFRAMP_TOKEN", TOKEN)
    cases = [
        (["--bind", "0.0.0.0:0"], "refusing to serve plaintext on 0.0.0.0"),
        (["--bind", "nowhere"], "--bind takes HOST:PORT"),
        (["--segment", "0"], "segment 0 runs on the device"),
        (["--tls-cert", str(tmp_path / "c.pem")], "TLS needs both --tls-cert and --tls-key"),
        (["--next", "127.0.0.1:1"], "ends with the final exit: there is no next tier"),
    ]
    for extra, words in cases:
        assert main(["serve", str(tmp_path), "--tier", "cloud", *extra]) == 2, extra
        assert words in capsys.readouterr().err, extra
    monkeypatch.setenv("OFFRAMP_TOKEN", "short")
    assert main(["serve", str(tmp_path), "--tier", "cloud"]) == 2
    assert "16 characters or more" in capsys.readouterr().err
