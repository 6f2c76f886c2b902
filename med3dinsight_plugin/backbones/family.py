"""What a backbone family is: one descriptor, :class:`BackboneFamily`.

A *family* is a kind of downstream network (nnU-Net's PlainConvUNet / ResidualEncoderUNet, MONAI's SwinUNETR, MONAI's
UNETR). Everything the package needs to know about it sits in one :class:`BackboneFamily` -- as timm keeps a model's
``pretrained_cfg`` beside it for its one ``load_pretrained`` -- written in the family's own module
(``backbones/<family>.py``) and registered once (:func:`~.registry.register_backbone`). The loader, the exports, the
pretraining step-0 check, ``nnunet-attach`` and the nnU-Net trainers all read these descriptors; none of them names a
family. MONAI and nnU-Net are imported only inside builders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from torch import nn

from ..errors import Med3DInsightError
from .base import Backbone, NetworkSpec

__all__ = ["BackboneFamily"]

# (backbone config, input channels, classes) -> the plain downstream network
NetworkBuilder = Callable[[Dict[str, Any], int, int], nn.Module]
# (backbone config, the plans' patch size) -> (plans 'architecture' dict, patch size to train with)
ArchitectureAdapter = Callable[[Dict[str, Any], Sequence[int]], Tuple[Dict[str, Any], List[int]]]


@dataclass(frozen=True)
class BackboneFamily:
    """Everything the package knows about one family of downstream networks.

    Attributes:
        name: the family's name, as ``nnunet-attach`` records it in plans (``"nnunet"``, ``"swin_unetr"``).
        backbone_class: the :class:`Backbone` subclass wrapping the family's networks; its class attributes say where
            the encoder, input layers, position embedding and segmentation head sit (``network_spec``).
        builders: ``build_backbone`` names -> builders ``(in_channels, patch_size, **kwargs) -> Backbone``; one
            of them is ``name``.
        build_network: ``(backbone config, in_channels, num_classes) -> network``: the plain downstream network a
            checkpoint's metadata (``backbone``) describes, as fine-tuning builds it (another class count).
        nnunet_trainer: the nnU-Net trainer (``nnUNetv2_train -tr``) that fine-tunes the family.
        nnunet_networks: dotted class paths nnU-Net plans name (``architecture.network_class_name``) for the family.
        wrapped_network: for a family nnU-Net has no network class of: the dotted path of the plain network class
            that ``nnunet_trainers.networks`` gives nnU-Net's constructor (``nnunet_networks[0]`` names that
            adapter). ``None``: nnU-Net's own planners describe the family (it is *plans-native*).
        patch_multiple: ``(divisor, minimum)`` per axis of the patch sizes the family's network accepts; used to
            adapt a plans' patch size (``nnunet-attach --adapt-architecture``). ``None``: the adapter decides.
        size_argument: the network constructor's argument that fixes the input size (UNETR's ``img_size``), set to
            the patch size in adapted plans; ``None`` when the network takes any divisible size.
        lpe_token_size: voxels per axis of one token of a learnable position embedding (UNETR: 16), from which the
            embedding grid of a checkpoint follows (``patch_size // lpe_token_size``); ``None``: no position
            embedding.
        adapt_architecture: ``(backbone config, plans patch) -> (architecture, patch)`` for a plans-native family
            (its architecture comes from the checkpoint); ``None`` uses :meth:`plans_architecture`'s generic rule
            for wrapped networks.
        plans_builders: the ``build_backbone`` names that build from nnU-Net plans (``plans=`` + ``configuration=``, or
            a plans ``architecture=``): they need a plans file, and the plans in a checkpoint's metadata are checked
            on read (nnU-Net resolves their class names by import) against :attr:`nnunet_networks`.
        tiny: ``build_backbone`` name -> small but real arguments (``patch_size`` included) that need no file, as
            timm's ``test_input_size``: the tests build every family from these, so a new family is checked by all
            of them.
    """

    name: str
    backbone_class: Type[Backbone]
    builders: Mapping[str, Callable[..., Backbone]]
    build_network: NetworkBuilder
    nnunet_trainer: str
    nnunet_networks: Tuple[str, ...]
    wrapped_network: Optional[str] = None
    patch_multiple: Optional[Tuple[int, int]] = None
    size_argument: Optional[str] = None
    lpe_token_size: Optional[int] = None
    adapt_architecture: Optional[ArchitectureAdapter] = field(default=None, compare=False)
    plans_builders: Tuple[str, ...] = ()
    tiny: Mapping[str, Dict[str, Any]] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.name not in self.builders:
            raise Med3DInsightError(f"backbone family {self.name!r}: builders must include one named {self.name!r}")
        if not self.nnunet_networks:
            raise Med3DInsightError(f"backbone family {self.name!r}: nnunet_networks must name at least one class")
        if self.wrapped_network is None and self.adapt_architecture is None:
            raise Med3DInsightError(f"backbone family {self.name!r}: a plans-native family (wrapped_network=None) "
                                    f"needs adapt_architecture")
        if not set(self.plans_builders) <= set(self.builders):
            raise Med3DInsightError(f"backbone family {self.name!r}: plans_builders names builders it does not have: "
                                    f"{sorted(set(self.plans_builders) - set(self.builders))}")
        if not set(self.tiny) <= set(self.builders):
            raise Med3DInsightError(f"backbone family {self.name!r}: tiny names builders it does not have: "
                                    f"{sorted(set(self.tiny) - set(self.builders))}")
        if self.wrapped_network is not None and self.patch_multiple is None:
            raise Med3DInsightError(f"backbone family {self.name!r}: a wrapped network needs patch_multiple")

    @property
    def plans_native(self) -> bool:
        """Whether nnU-Net's own plans describe this family's networks (``-pretrained_weights``, nnssl exports and
        attaching without ``--adapt-architecture`` work)."""
        return self.wrapped_network is None

    @property
    def network_classes(self) -> Tuple[str, ...]:
        """Class names of the plain networks of this family (a subclass of one of them is recognised too)."""
        return self.backbone_class.network_classes

    @property
    def head_prefixes(self) -> Tuple[str, ...]:
        """``state_dict`` prefixes of the segmentation head: never pretrained, never exported for fine-tuning."""
        return self.backbone_class.head_prefixes

    @property
    def nnunet_network_names(self) -> Tuple[str, ...]:
        """The class names (without module) of :attr:`nnunet_networks`, as nnU-Net's configuration reports them."""
        return tuple(n.rsplit(".", 1)[-1] for n in self.nnunet_networks)

    def network_spec(self, network: nn.Module) -> NetworkSpec:
        """Where the pretrained parts sit in ``network``, a plain network of this family.

        Args:
            network: an instance of one of :attr:`network_classes` (or a subclass).

        Returns:
            Its :class:`NetworkSpec`.
        """
        return self.backbone_class.network_spec(network)

    def position_grid(self, patch_size: Sequence[int]) -> Optional[Tuple[int, ...]]:
        """The token grid of the learnable position embedding of a network built for ``patch_size``.

        Args:
            patch_size: the (D, H, W) the network was built for.

        Returns:
            The grid, or ``None`` when the family has no position embedding.
        """
        if self.lpe_token_size is None:
            return None
        return tuple(int(p) // self.lpe_token_size for p in patch_size)

    def plans_architecture(self, config: Dict[str, Any], patch_size: Sequence[int]) -> Tuple[Dict[str, Any],
                                                                                              List[int]]:
        """The nnU-Net plans ``architecture`` that builds this checkpoint's network, and the patch size to train it
        with (``nnunet-attach --adapt-architecture``).

        Args:
            config: the checkpoint's ``backbone`` metadata (the ``build_backbone`` arguments).
            patch_size: the plans' current patch size.

        Returns:
            ``(architecture, patch size)``.
        """
        if self.adapt_architecture is not None:
            return self.adapt_architecture(config, patch_size)
        divisor, minimum = self.patch_multiple
        patch = [max(minimum, divisor * round(p / divisor)) for p in patch_size]
        kwargs = {k: v for k, v in config.get("network_kwargs", {}).items() if k != "out_channels"}
        if self.size_argument:
            kwargs[self.size_argument] = patch
        return {"network_class_name": self.nnunet_networks[0], "arch_kwargs": kwargs, "_kw_requires_import": []}, patch
