"""Reference backbones by name, with their defaults in one place.

A training config names a backbone, its early exits and their head; :func:`build_model` turns
that into a network, and :data:`BACKBONES` holds what each name fills in when the config leaves
a setting out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from offramp.errors import ConfigError
from offramp.models.lenet import blenet
from offramp.models.mlp import mlp
from offramp.models.resnet import resnet
from offramp.models.vgg import vgg
from offramp.models.vit import vit
from offramp.network import MultiExitNetwork

__all__ = ["BACKBONES", "Backbone", "build_model"]


@dataclass(frozen=True)
class Backbone:
    """A reference backbone for 1-channel square images.

    Attributes:
        build: ``(in_size, num_classes, exits, head, seed) -> MultiExitNetwork``; ``exits``
            ``None`` keeps the builder's own default.
        head: head of the early exits when the config names none.
        exits: early exits when the config names none (``None``: the builder's default).
        max_exit: largest block an early exit may follow (``None``: any the builder accepts).
        fixed_exits: the exits are part of the architecture; a config may not set ``exits``.
    """

    build: Callable[..., MultiExitNetwork]
    head: str
    exits: tuple[int, ...] | None = None
    max_exit: int | None = None
    fixed_exits: bool = False


BACKBONES: dict[str, Backbone] = {
    "blenet": Backbone(
        lambda s, c, exits, head, seed: blenet(s, c, exits_after=exits, head=head, seed=seed),
        head="conv",
        exits=(0, 1),
        max_exit=2,
    ),
    "mlp": Backbone(
        lambda s, c, exits, head, seed: mlp(
            (1, s, s), c, hidden=(64, 64, 64), head=head, seed=seed
        ),
        head="linear",
        fixed_exits=True,
    ),
    "resnet": Backbone(
        lambda s, c, exits, head, seed: resnet(
            s,
            c,
            widths=(8, 16, 32),
            blocks_per_stage=(2, 2, 2),
            exits_after=exits,
            head=head,
            seed=seed,
        ),
        head="pool",
    ),
    "vgg": Backbone(
        lambda s, c, exits, head, seed: vgg(s, c, exits_after=exits, head=head, seed=seed),
        head="linear",
        exits=(0,),
        max_exit=1,
    ),
    "vit": Backbone(
        # 16 patches: 7×7 on 28×28 images, 2×2 on 8×8 digits
        lambda s, c, exits, head, seed: vit(
            s, c, patch=max(1, s // 4), exits_after=exits, head=head, seed=seed
        ),
        head="cls",
        max_exit=4,
    ),
}


def build_model(
    name: str,
    in_size: int,
    num_classes: int,
    *,
    exits: Sequence[int] | None = None,
    head: str | None = None,
    seed: int | None = None,
) -> MultiExitNetwork:
    """The reference backbone ``name`` with early exits after blocks ``exits`` (default: the
    backbone's own) and heads ``head`` (default: :attr:`Backbone.head`).

    Raises:
        ConfigError: an unknown name, exits the backbone cannot take, or exits given to a
            backbone whose exits are fixed.

    Example:
        >>> build_model("blenet", 8, 10, exits=[1]).exit_blocks
        (1, 3)
        >>> build_model("blenet", 8, 10).exit_blocks
        (0, 1, 3)
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    if spec.fixed_exits and exits is not None:
        raise ConfigError(
            f"backbone {name!r} has fixed exits (one after every hidden layer); remove `exits` "
            "from the config"
        )
    chosen = spec.exits if exits is None else tuple(exits)
    if spec.max_exit is not None and chosen is not None:
        if not all(0 <= e <= spec.max_exit for e in chosen):
            raise ConfigError(
                f"{name} takes early exits after blocks 0 … {spec.max_exit} "
                f"({spec.max_exit + 1} is the final exit), got exits {list(chosen)}"
            )
    return spec.build(in_size, num_classes, chosen, head or spec.head, seed)
