"""Where a layered model's early exits go: the one check of ``exits_after`` for the builders
whose layers each may carry an exit (transformers, recurrent networks, encoders)."""

from __future__ import annotations

from collections.abc import Sequence

from offramp.errors import ConfigError

__all__ = ["early_exits"]


def early_exits(exits_after: Sequence[int] | None, layers: int) -> tuple[int, ...]:
    """The layers with an early exit, sorted: every layer but the last by default.

    Raises:
        ConfigError: a layer outside ``0 … layers − 2`` (the last carries the final exit), or
            one named twice.

    Example:
        >>> early_exits(None, 4), early_exits([2, 0], 4)
        ((0, 1, 2), (0, 2))
    """
    early = tuple(range(layers - 1)) if exits_after is None else tuple(int(k) for k in exits_after)
    if any(not 0 <= k < layers - 1 for k in early) or len(set(early)) != len(early):
        raise ConfigError(
            f"exits_after must name distinct layers 0 … {layers - 2} (layer {layers - 1} "
            f"carries the final exit), got {list(early)}"
        )
    return tuple(sorted(early))
