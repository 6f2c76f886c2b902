"""med3dinsight: Med3DInsight pretraining (3D encoders taught by 2D CLIP/MLLM slice embeddings) for nnU-Net and MONAI.

The core imports only torch; MONAI, nnU-Net, open_clip and transformers are imported by the parts that need them.
The names below are loaded on first use (PEP 562), so that ``import med3dinsight_plugin.cli`` (``med3dinsight
--help``) does not pay for importing torch.
"""
from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "alignment": ("ClipAlignment", "Med3DInsightLoss", "PartialOTAlignment", "clip_loss", "reconstruction_loss"),
    "backbones": ("Backbone", "BackboneOutput", "build_backbone", "list_backbones", "register_backbone"),
    "checkpoint": ("Checkpoint", "CheckpointError", "load_checkpoint", "save_pretrained"),
    "loading": ("IncompatibleCheckpointError", "LoadReport", "load_pretrained_encoder"),
    "downstream": ("build_downstream_network",),
    "model": ("Med3DInsightModel",),
    "pretrain": ("build_model",),
    "psat": ("PlaneSliceAwareTransformer",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .alignment import ClipAlignment, Med3DInsightLoss, PartialOTAlignment, clip_loss, reconstruction_loss  # noqa: F401
    from .backbones import Backbone, BackboneOutput, build_backbone, list_backbones, register_backbone  # noqa: F401
    from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_pretrained  # noqa: F401
    from .downstream import build_downstream_network  # noqa: F401
    from .loading import IncompatibleCheckpointError, LoadReport, load_pretrained_encoder  # noqa: F401
    from .model import Med3DInsightModel  # noqa: F401
    from .pretrain import build_model  # noqa: F401
    from .psat import PlaneSliceAwareTransformer  # noqa: F401
