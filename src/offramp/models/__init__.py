"""Reference backbones with exits. :data:`MODELS` maps names to small default builders."""

from collections.abc import Callable

from offramp.models.lenet import BRANCHYNET_HEAD, blenet
from offramp.models.mlp import mlp
from offramp.models.resnet import resnet
from offramp.models.vgg import vgg
from offramp.network import MultiExitNetwork

__all__ = ["BRANCHYNET_HEAD", "MODELS", "blenet", "mlp", "resnet", "vgg"]

#: name -> builder ``(in_size, num_classes) -> MultiExitNetwork`` for 1-channel square images.
MODELS: dict[str, Callable[[int, int], MultiExitNetwork]] = {
    "blenet": lambda size, c: blenet(size, c, exits_after=(0, 1)),
    "mlp": lambda size, c: mlp((1, size, size), c, hidden=(64, 64, 64)),
    "resnet": lambda size, c: resnet(size, c, widths=(8, 16, 32), blocks_per_stage=(2, 2, 2)),
    "vgg": lambda size, c: vgg(size, c),
}
