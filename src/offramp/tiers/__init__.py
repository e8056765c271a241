"""Tiers: a multi-exit network split across device, edge and cloud (survey §7.2).

- :mod:`offramp.tiers.codecs`: how activations cross the link (fp32, fp16, int8).
- :mod:`offramp.tiers.measure`: what each codec costs in bytes and accuracy, on real data.
- :mod:`offramp.tiers.messages`: the wire's protobuf messages (no pickle).
- :mod:`offramp.tiers.server`: a tier server (gRPC, batching, refusals, token, TLS).
- :mod:`offramp.tiers.client`, :mod:`offramp.tiers.device`: the next tier's clients, and the
  device's :class:`TieredRuntime` (answers locally, offloads, degrades).
- :mod:`offramp.tiers.link`: link models and a relay that emulates one for real sockets.
- :mod:`offramp.tiers.plan`: communication-aware choice of split and thresholds.
- :mod:`offramp.tiers.training`: layer-wise training across tiers, over the wire.
- :mod:`offramp.tiers.process`: ``offramp serve`` as a child process (tests, benchmarks).

See ``docs/tiers.md``. The wire needs the ``net`` extra (grpcio, protobuf), imported when used.
"""

from offramp.tiers.client import AsyncTierClient, Backoff, TierClient
from offramp.tiers.codecs import CODECS, Encoded, decode, encode
from offramp.tiers.device import TieredResult, TieredRuntime
from offramp.tiers.link import LINKS, Link, LinkRelay
from offramp.tiers.measure import codec_report
from offramp.tiers.plan import Plan, TierCosts, plan, sample_latencies, split_costs, stage_seconds
from offramp.tiers.process import ServeProcess
from offramp.tiers.server import ServerConfig, ServerThread, TensorSpec, TierServer
from offramp.tiers.training import TrainServer, send_training, stage_network, tier_outputs

__all__ = [
    "CODECS",
    "LINKS",
    "AsyncTierClient",
    "Backoff",
    "Encoded",
    "Link",
    "LinkRelay",
    "Plan",
    "ServeProcess",
    "ServerConfig",
    "ServerThread",
    "TensorSpec",
    "TierClient",
    "TierCosts",
    "TierServer",
    "TieredResult",
    "TieredRuntime",
    "TrainServer",
    "codec_report",
    "decode",
    "encode",
    "plan",
    "sample_latencies",
    "send_training",
    "split_costs",
    "stage_network",
    "stage_seconds",
    "tier_outputs",
]
