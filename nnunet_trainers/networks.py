"""Networks nnU-Net has no class of (MONAI's SwinUNETR / UNETR), with nnU-Net's network constructor, so that plans
can name them.

nnU-Net builds the network of a configuration with ``get_network_from_plans``: it locates
``architecture.network_class_name`` by its dotted path and calls it with ``input_channels``, ``num_classes``,
``deep_supervision`` and the plans' ``arch_kwargs``. The classes here accept exactly that, so training and
``nnUNetv2_predict`` rebuild the same network from the plans alone; their ``state_dict`` keys are the wrapped
network's. There is one per backbone family with a ``wrapped_network``, named by the family's ``nnunet_networks``
(``nnunet_trainers.networks.SwinUNETRForNNUNet``), made on first access from the family descriptor.
"""
from __future__ import annotations

import importlib
from typing import List

from med3dinsight_plugin.backbones import list_families

__all__ = ["for_nnunet"]


def for_nnunet(network_class: type, name: str) -> type:
    """A subclass of ``network_class`` with nnU-Net's constructor.

    Args:
        network_class: a network class taking ``in_channels`` and ``out_channels`` (MONAI's convention).
        name: the new class's name (in this module).

    Returns:
        The class: ``name(input_channels, num_classes, deep_supervision=False, **kwargs)`` builds
        ``network_class(in_channels=input_channels, out_channels=num_classes, **kwargs)``; no deep supervision.
    """
    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **kwargs):
        network_class.__init__(self, in_channels=input_channels, out_channels=num_classes, **kwargs)

    doc = (f"{network_class.__module__}.{network_class.__name__}(in_channels=input_channels, "
           f"out_channels=num_classes, **kwargs) with nnU-Net's constructor; no deep supervision.")
    return type(name, (network_class,), {"__init__": __init__, "__module__": __name__, "__doc__": doc})


def _wrapped() -> dict:
    """``class name -> dotted path of the wrapped class`` of every registered family nnU-Net has no class of."""

    return {path.rsplit(".", 1)[-1]: family.wrapped_network for family in list_families() if family.wrapped_network
            for path in family.nnunet_networks if path.rsplit(".", 1)[0] == __name__}


def __getattr__(name: str) -> type:
    target = _wrapped().get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, cls = target.rsplit(".", 1)
    built = globals()[name] = for_nnunet(getattr(importlib.import_module(module), cls), name)
    return built


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_wrapped()))
