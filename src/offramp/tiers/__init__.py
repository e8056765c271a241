"""Tiers: a multi-exit network split across device, edge and cloud (survey §7.2).

- :mod:`offramp.tiers.codecs`: how activations cross the link (fp32, fp16, int8).
- :mod:`offramp.tiers.measure`: what each codec costs in bytes and accuracy, on real data.
"""

from offramp.tiers.codecs import CODECS, Encoded, decode, encode
from offramp.tiers.measure import codec_report

__all__ = ["CODECS", "Encoded", "codec_report", "decode", "encode"]
