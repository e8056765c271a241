"""Reference backbones with exits. :data:`MODELS` maps names to small default builders;
:func:`build_model` builds one by name with the settings a config gives."""

from collections.abc import Callable
from functools import partial

from offramp.models.build import BACKBONES, Backbone, build_model
from offramp.models.lenet import BRANCHYNET_HEAD, blenet
from offramp.models.mlp import mlp
from offramp.models.resnet import resnet
from offramp.models.rnn import rnn_classifier
from offramp.models.vgg import vgg
from offramp.models.vit import vit
from offramp.network import MultiExitNetwork

__all__ = [
    "BACKBONES",
    "BRANCHYNET_HEAD",
    "MODELS",
    "Backbone",
    "blenet",
    "build_model",
    "mlp",
    "resnet",
    "rnn_classifier",
    "vgg",
    "vit",
]

#: name -> builder ``(in_size, num_classes) -> MultiExitNetwork`` for 1-channel square images,
#: each with its defaults (:data:`BACKBONES`).
MODELS: dict[str, Callable[[int, int], MultiExitNetwork]] = {
    name: partial(build_model, name) for name in BACKBONES
}
