"""MONAI networks with nnU-Net's network constructor, so that plans can name them.

nnU-Net builds the network of a configuration with ``get_network_from_plans``: it locates
``architecture.network_class_name`` by its dotted path and calls it with ``input_channels``, ``num_classes``,
``deep_supervision`` and the plans' ``arch_kwargs``. These subclasses accept exactly that, so training and
``nnUNetv2_predict`` rebuild the same SwinUNETR / UNETR from the plans alone. Their ``state_dict`` keys are MONAI's.
"""
from monai.networks.nets import UNETR, SwinUNETR

__all__ = ["SwinUNETRForNNUNet", "UNETRForNNUNet"]


class SwinUNETRForNNUNet(SwinUNETR):
    """MONAI ``SwinUNETR(in_channels=input_channels, out_channels=num_classes, **kwargs)``; no deep supervision."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **kwargs):
        super().__init__(in_channels=input_channels, out_channels=num_classes, **kwargs)


class UNETRForNNUNet(UNETR):
    """MONAI ``UNETR(in_channels=input_channels, out_channels=num_classes, img_size=..., **kwargs)``; no deep
    supervision. ``img_size`` must equal the configuration's patch size."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **kwargs):
        super().__init__(in_channels=input_channels, out_channels=num_classes, **kwargs)
