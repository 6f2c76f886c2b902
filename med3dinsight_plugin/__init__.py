"""med3dinsight: Med3DInsight pretraining (3D encoders taught by 2D CLIP/MLLM slice embeddings) for nnU-Net and MONAI.

The core imports only torch; MONAI, nnU-Net, open_clip and transformers are imported by the parts that need them.
"""
from .alignment import ClipAlignment, Med3DInsightLoss, PartialOTAlignment, clip_loss, reconstruction_loss
from .backbones import Backbone, BackboneOutput, build_backbone, list_backbones, register_backbone
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_pretrained
from .loading import IncompatibleCheckpointError, LoadReport, load_pretrained_encoder
from .model import Med3DInsightModel
from .psat import PlaneSliceAwareTransformer

__version__ = "0.1.0"

__all__ = [
    "Backbone", "BackboneOutput", "Checkpoint", "CheckpointError", "ClipAlignment", "IncompatibleCheckpointError",
    "LoadReport", "Med3DInsightLoss", "Med3DInsightModel", "PartialOTAlignment", "PlaneSliceAwareTransformer",
    "build_backbone", "clip_loss", "list_backbones", "load_checkpoint", "load_pretrained_encoder",
    "reconstruction_loss", "register_backbone", "save_pretrained", "__version__",
]
