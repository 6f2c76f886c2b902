"""nnU-Net backbones: PlainConvUNet / ResidualEncoderUNet built exactly as nnU-Net builds them.

``"nnunet"`` reads the architecture from an nnU-Net plans file and configuration and builds it with nnU-Net's own
``get_network_from_plans``, so the weights fit that dataset's trainer. ``"plain_conv_unet"`` and ``"resenc_unet"``
derive the topology from a patch size (and spacing) with nnU-Net's ``get_pool_and_conv_props``, as its planners do.
Tokens are the bottleneck (the encoder's last skip); the reconstruction comes from the last decoder stage.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

from ..errors import Med3DInsightError
from .base import Backbone, NetworkSpec, positive_triple
from .family import BackboneFamily

__all__ = ["FAMILY", "NNUNetBackbone", "architecture_for_patch", "architecture_from_plans", "build_nnunet",
           "network_from_plans", "stride_product"]

_MODULE = "dynamic_network_architectures.architectures.unet"
_SUPPORTED = ("PlainConvUNet", "ResidualEncoderUNet")
# Constants of nnU-Net 2.8's ExperimentPlanner / ResEncUNetPlanner (instance attributes there, so not importable).
_BASE_FEATURES, _MAX_FEATURES_3D, _MIN_FEATURE_MAP_EDGE = 32, 320, 4
_PLAIN_CONVS_ENCODER, _PLAIN_CONVS_DECODER = 2, 2
_RESENC_BLOCKS_ENCODER, _RESENC_CONVS_DECODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), 1


class NNUNetBackbone(Backbone):
    network_classes = _SUPPORTED
    encoder_prefixes = ("encoder.",)  # nnU-Net's decoder aliases it as decoder.encoder (same tensors)
    bottleneck_prefixes = ("encoder.",)  # what encoder_features runs
    head_prefixes = ("decoder.seg_layers.",)

    @classmethod
    def network_spec(cls, network):
        # dynamic_network_architectures keeps the weight locations beside the network
        return NetworkSpec(cls.encoder_prefixes, network.key_to_encoder, tuple(network.keys_to_in_proj), None,
                           head_prefixes=cls.head_prefixes)

    def nnssl_architecture(self):
        arch = self.architecture  # the plans' architecture it was built from
        return {"arch_class_name": arch["network_class_name"].rsplit(".", 1)[-1], "arch_kwargs": arch["arch_kwargs"],
                "arch_kwargs_requiring_import": list(arch.get("_kw_requires_import", []))}

    def spatial_divisor(self):
        return stride_product(self.architecture["arch_kwargs"]["strides"])

    def encoder_features(self, x):
        return self.network.encoder(x)[-1]

    def features(self, x):
        # UNetDecoder.forward (dynamic_network_architectures 0.4) without its segmentation layers.
        skips = self.network.encoder(x)
        decoder = self.network.decoder
        lres = skips[-1]
        for s in range(len(decoder.stages)):
            up = decoder.transpconvs[s](lres)
            lres = decoder.stages[s](torch.cat((up, skips[-(s + 2)]), 1))
        return skips[-1], lres


def stride_product(strides) -> tuple:
    """What every spatial size must be divisible by: the product of the stages' strides, per axis."""
    divisor = [1, 1, 1]
    for stride in strides:
        stride = [stride] * 3 if isinstance(stride, int) else stride
        divisor = [d * s for d, s in zip(divisor, stride)]
    return tuple(divisor)


def _load_plans(plans: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(plans, dict):
        return plans
    try:
        with open(plans) as f:
            return json.load(f)
    except OSError as e:
        raise Med3DInsightError(f"cannot read the nnU-Net plans file {plans}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise Med3DInsightError(f"the nnU-Net plans file {plans} is not valid JSON ({e}); pass nnU-Net's "
                                f"nnUNetPlans.json from nnUNet_preprocessed/DATASET/") from None


def architecture_from_plans(plans: Union[str, os.PathLike, Dict[str, Any]],
                            configuration: str = "3d_fullres") -> tuple[Dict[str, Any], Dict[str, Any]]:
    """``(plans dict, resolved configuration dict)``: the configuration with nnU-Net's inheritance resolved."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _load_plans(plans)
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise Med3DInsightError("the plans have no 'configurations' key: pass an nnU-Net v2 plans file "
                                "(nnUNetPlans.json)")
    if configuration not in plans["configurations"]:
        raise Med3DInsightError(f"configuration {configuration!r} is not in the plans; available: "
                                f"{sorted(plans['configurations'])}")
    resolved = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration)
    if "architecture" not in resolved:
        raise Med3DInsightError(f"configuration {configuration!r} of the plans has no 'architecture'; nnU-Net v2.4+ "
                                f"plans describe the network there: re-plan with nnUNetv2_plan_experiment")
    return plans, resolved


def architecture_for_patch(patch_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           family: str = "plain", base_features: int = _BASE_FEATURES,
                           max_features: int = _MAX_FEATURES_3D) -> Dict[str, Any]:
    """nnU-Net's planned 3D architecture (``plans['configurations'][c]['architecture']``) for a patch size.

    Topology from nnU-Net's ``get_pool_and_conv_props``; widths, blocks and ops as its ``ExperimentPlanner``
    (``family="plain"``) or ``ResEncUNetPlanner`` (``family="resenc"``) write them; ``base_features`` and
    ``max_features`` are the planners' ``UNet_base_num_features`` and ``UNet_max_features_3d``.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props(list(spacing), list(patch_size),
                                                                    _MIN_FEATURE_MAP_EDGE, 999999)
    if tuple(int(p) for p in planned_patch) != tuple(patch_size):
        raise Med3DInsightError(f"patch size {tuple(patch_size)} does not fit nnU-Net's pooling for spacing "
                                f"{tuple(spacing)}; nnU-Net would use {tuple(int(p) for p in planned_patch)}")
    n = len(strides)
    kwargs: Dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": [min(max_features, base_features * 2 ** i) for i in range(n)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
    }
    if family == "plain":
        cls = f"{_MODULE}.PlainConvUNet"
        kwargs["n_conv_per_stage"] = [_PLAIN_CONVS_ENCODER] * n
        kwargs["n_conv_per_stage_decoder"] = [_PLAIN_CONVS_DECODER] * (n - 1)
    elif family == "resenc":
        cls = f"{_MODULE}.ResidualEncoderUNet"
        kwargs["n_blocks_per_stage"] = list(_RESENC_BLOCKS_ENCODER[:n])
        kwargs["n_conv_per_stage_decoder"] = [_RESENC_CONVS_DECODER] * (n - 1)
    else:
        raise Med3DInsightError(f"family must be 'plain' or 'resenc', got {family!r}")
    kwargs.update({"conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}})
    return {"network_class_name": cls, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build_nnunet(in_channels: int = 1, patch_size: Optional[Sequence[int]] = None, *,
                 plans: Union[str, os.PathLike, Dict[str, Any], None] = None, configuration: str = "3d_fullres",
                 architecture: Optional[Dict[str, Any]] = None, num_classes: int = 2) -> Backbone:
    """The network ``get_network_from_plans`` builds for ``plans`` + ``configuration`` (or for a plans-style
    ``architecture`` dict). ``patch_size`` defaults to the configuration's. ``num_classes`` only sizes the unused
    segmentation layers, which nnU-Net's ``-pretrained_weights`` skips."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if (plans is None) == (architecture is None):
        raise Med3DInsightError("the nnunet backbone needs exactly one of plans= (a plans.json path or dict, with "
                         "configuration=) or architecture= (a plans 'architecture' dict)")
    config: Dict[str, Any] = dict(name="nnunet", in_channels=in_channels)
    plans_configuration = None
    if plans is not None:
        plans, plans_configuration = architecture_from_plans(plans, configuration)
        architecture = plans_configuration["architecture"]
        patch_size = patch_size or plans_configuration["patch_size"]
        config.update(plans=plans, configuration=configuration)
    else:
        config["architecture"] = architecture
    if not isinstance(architecture, dict) or not {"network_class_name", "arch_kwargs"} <= set(architecture):
        raise Med3DInsightError("architecture must be a plans 'architecture' dict with network_class_name and "
                                "arch_kwargs")
    class_name = architecture["network_class_name"].rsplit(".", 1)[-1]
    if class_name not in _SUPPORTED:
        raise Med3DInsightError(f"nnU-Net architecture {architecture['network_class_name']} is not supported; "
                                f"supported: {', '.join(_SUPPORTED)}")
    if "Conv3d" not in str(architecture["arch_kwargs"].get("conv_op", "")):
        raise Med3DInsightError("the nnU-Net configuration is not 3D (conv_op "
                                f"{architecture['arch_kwargs'].get('conv_op')}); use a 3d_* configuration")
    if patch_size is None:
        raise Med3DInsightError("patch_size is required when building the nnunet backbone from an architecture dict")
    patch = positive_triple("patch_size", patch_size)
    try:
        network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                         architecture.get("_kw_requires_import", ()), in_channels, num_classes,
                                         allow_init=True, deep_supervision=False)
    except (TypeError, ValueError, KeyError, AssertionError, ImportError) as e:
        raise Med3DInsightError(f"nnU-Net could not build {class_name} from the architecture's arch_kwargs: "
                                f"{e}") from None
    features = architecture["arch_kwargs"]["features_per_stage"]
    config.update(patch_size=list(patch), num_classes=num_classes)
    backbone = NNUNetBackbone(network, in_channels, patch, token_dim=features[-1], decoder_dim=features[0],
                              config=config)
    backbone.architecture, backbone.plans_configuration = architecture, plans_configuration
    # dynamic_network_architectures keeps these beside the network (nnssl's adaptation-plan fields)
    backbone.key_to_encoder, backbone.key_to_stem = network.key_to_encoder, network.key_to_stem
    backbone.keys_to_in_proj = tuple(network.keys_to_in_proj)
    backbone.check_spatial_shape(patch)
    return backbone


def _planned(family: str, description: str):
    """A builder of nnU-Net's planned topology of ``family`` for a patch size, without a plans file."""
    def build(in_channels: int = 1, patch_size: Optional[Sequence[int]] = None,
              spacing: Sequence[float] = (1.0, 1.0, 1.0), num_classes: int = 2,
              base_features: int = _BASE_FEATURES, max_features: int = _MAX_FEATURES_3D) -> Backbone:
        patch = positive_triple("patch_size", patch_size or (96, 96, 96))
        arch = architecture_for_patch(patch, spacing, family, base_features, max_features)
        return build_nnunet(in_channels, patch, architecture=arch, num_classes=num_classes)
    build.__doc__ = f"{description} for ``patch_size`` (default 96^3) at ``spacing``."
    return build


build_plain_conv_unet = _planned("plain", "nnU-Net's default PlainConvUNet")
build_resenc_unet = _planned("resenc", "nnU-Net's ResidualEncoderUNet (ResEnc planner topology)")


def _architecture_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The plans ``architecture`` a backbone config (checkpoint metadata) was built with."""
    if "architecture" in config:
        return config["architecture"]
    return architecture_from_plans(config["plans"], config.get("configuration", "3d_fullres"))[1]["architecture"]


def _build_from_architecture(architecture: Dict[str, Any], in_channels: int, num_classes: int, allow_init: bool,
                             what: str):
    """``get_network_from_plans`` on a plans ``architecture``, as nnU-Net's trainer calls it (deep supervision on)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    try:
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      architecture.get("_kw_requires_import", ()), in_channels, num_classes,
                                      allow_init=allow_init, deep_supervision=True)
    except (TypeError, ValueError, KeyError, AssertionError, ImportError) as e:
        raise Med3DInsightError(f"{what} cannot be built: {e}") from None


def network_from_plans(plans: Union[str, os.PathLike, Dict[str, Any]], configuration: str, in_channels: int,
                       num_classes: int):
    """The network nnU-Net's trainer builds for ``plans`` + ``configuration`` (whatever class the plans name).

    Args:
        plans: a plans.json path or dict.
        configuration: the configuration (nnU-Net's ``inherits_from`` resolved).
        in_channels: the dataset's input channels.
        num_classes: the segmentation classes.

    Returns:
        The network, with nnU-Net's own initialisation skipped (it is built to be loaded into).
    """
    _, resolved = architecture_from_plans(plans, configuration)
    return _build_from_architecture(resolved["architecture"], in_channels, num_classes, allow_init=False,
                                    what=f"the plans' {configuration} network")


def _network_of_config(config: Dict[str, Any], in_channels: int, num_classes: int):
    """The PlainConvUNet / ResidualEncoderUNet of a checkpoint's backbone config, as nnU-Net builds it."""
    return _build_from_architecture(_architecture_of(config), in_channels, num_classes, allow_init=True,
                                    what="the checkpoint's nnU-Net architecture")


def _adapt_to_plans(config: Dict[str, Any], patch_size: Sequence[int]):
    """The checkpoint's own architecture; the plans' patch size when the network's strides divide it, else the
    pretraining patch size."""
    architecture = _architecture_of(config)
    divisor = stride_product(architecture["arch_kwargs"]["strides"])
    patch = list(patch_size)
    if any(p % d for p, d in zip(patch, divisor)):
        patch = list(config["patch_size"])
    return architecture, patch


FAMILY = BackboneFamily(
    name="nnunet", backbone_class=NNUNetBackbone,
    builders={"nnunet": build_nnunet, "plain_conv_unet": build_plain_conv_unet, "resenc_unet": build_resenc_unet},
    build_network=_network_of_config, nnunet_trainer="Med3DInsightTrainer",
    nnunet_networks=tuple(f"{_MODULE}.{c}" for c in _SUPPORTED), adapt_architecture=_adapt_to_plans,
    plans_builders=("nnunet",),
    tiny={"plain_conv_unet": dict(patch_size=(32, 32, 32), base_features=4, max_features=32),
          "resenc_unet": dict(patch_size=(32, 32, 32), base_features=4, max_features=32)})
