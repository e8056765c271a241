"""Tiers: a multi-exit network split across device, edge and cloud (survey §7.2).

So far: :mod:`offramp.tiers.codecs`, how activations cross the link.
"""

from offramp.tiers.codecs import CODECS, Encoded, decode, encode

__all__ = ["CODECS", "Encoded", "decode", "encode"]
