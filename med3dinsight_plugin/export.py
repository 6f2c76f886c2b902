"""Export a med3dinsight checkpoint to the files other tools load unmodified.

* ``nnunet``: ``{"network_weights": full state dict}``, which ``nnUNetv2_train ... -pretrained_weights FILE`` accepts
  with the plain nnUNetTrainer -- it requires every non-segmentation key with the same shape, so the network must be
  the one the target plans build. Pass those plans to have that checked here instead of at training time.
* ``monai``: the SwinUNETR / UNETR state dict without the segmentation head ``out.*``: plain
  ``model.load_state_dict(sd, strict=False)`` loads it with no unexpected key and every encoder key present.
* ``nnssl``: ``network_weights`` + ``nnssl_adaptation_plan``, as nnssl writes them (loads with ``weights_only=True``),
  with its pretraining ``Plan`` (:func:`~med3dinsight_plugin.checkpoint.nnssl_pretrain_plan`) that nnU-Net's
  ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_plan_like_dynamic`` read. PlainConvUNet / ResidualEncoderUNet
  backbones only: nnU-Net builds nothing else (but Primus) from such a file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .backbones import backbone_family, build_backbone_from_config, family_of_network, list_families
from .checkpoint import Checkpoint, CheckpointError, adaptation_plan, load_checkpoint
from .downstream import build_downstream_network, building_from_metadata
from .errors import Med3DInsightError, first_line
from .fileio import atomic_write
from .results import Result

__all__ = ["ExportError", "ExportResult", "export_checkpoint", "rebuild_backbone", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("nnunet", "monai", "nnssl")
PathLike = Union[str, os.PathLike]


class ExportError(CheckpointError):
    """A checkpoint whose network the chosen ``--to`` target cannot take; the message names the export to use."""


@dataclass(frozen=True)
class ExportResult(Result):
    """What :func:`export_checkpoint` wrote.

    Attributes:
        format: the target format, one of :data:`EXPORT_FORMATS`.
        path: the file written.
        tensors: the number of network tensors in it.
        note: what to know before loading it (how it was checked, or how to load it); ``""`` if nothing.
    """
    format: str
    path: str
    tensors: int
    note: str = ""


def rebuild_backbone(checkpoint: Union[PathLike, Checkpoint], in_channels: Optional[int] = None,
                     load_weights: bool = True):
    """Rebuild the backbone a med3dinsight checkpoint was saved from, with its weights (strict).

    The network is built under :func:`~med3dinsight_plugin.checkpoint.allocation_guard`: metadata that describes a
    network far larger than the weights in the file is refused before anything that large is allocated.

    Args:
        checkpoint: a path, ``hf-hub:ORG/REPO[@REVISION]`` or a loaded :class:`Checkpoint` written by
            ``save_pretrained``.
        in_channels: build for another number of input channels (then load the encoder with
            ``load_pretrained_encoder``, which adapts the input layer, and pass ``load_weights=False``).
        load_weights: load the file's network (strict) and reconstruction head.

    Returns:
        The :class:`~med3dinsight_plugin.backbones.Backbone`.
    """

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if ckpt.source_format != "med3dinsight":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.source_format} file without med3dinsight metadata, so its "
                              f"architecture is unknown; export needs a checkpoint written by save_pretrained")
    config = dict(ckpt.metadata["backbone"])
    if in_channels is not None:
        config["in_channels"] = in_channels
    with building_from_metadata(ckpt):
        backbone = build_backbone_from_config(config)
    if not load_weights:
        return backbone
    try:
        backbone.network.load_state_dict(ckpt.state_dict)
        if "reconstruction_head" in ckpt.extras:
            backbone.reconstruction_head.load_state_dict(ckpt.extras["reconstruction_head"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path} does not match the architecture in its own metadata "
                              f"({_mismatch(e)}); the file is damaged, re-save it") from None
    return backbone


def _mismatch(e: RuntimeError) -> str:
    """The first concrete problem of a load_state_dict error (its first line only says where)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((line for line in lines[1:]), lines[0] if lines else "")
    return detail[:300]


def export_checkpoint(checkpoint: PathLike, to: str, out: PathLike, *, plans: Optional[PathLike] = None,
                      configuration: str = "3d_fullres") -> ExportResult:
    """Write ``checkpoint`` in the format ``to`` (one of :data:`EXPORT_FORMATS`) to ``out``, atomically.

    Args:
        checkpoint: a checkpoint written by :func:`save_pretrained`: a path or ``hf-hub:ORG/REPO[@REVISION]``.
        to: ``"nnunet"``, ``"monai"`` or ``"nnssl"``.
        out: the file to write.
        plans, configuration: for ``nnunet``, the target dataset's plans; the export is refused unless the network
            those plans build takes every non-segmentation tensor of the checkpoint with the same shape.

    Returns:
        An :class:`ExportResult`: ``format``, ``path``, ``tensors`` (network tensors written) and ``note``.
    """
    if to not in EXPORT_FORMATS:
        raise Med3DInsightError(f"--to must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    if out.exists() and os.path.samefile(out, ckpt.path):
        raise Med3DInsightError(f"-o {out} is the checkpoint being exported; write the export to another file")

    backbone = rebuild_backbone(ckpt)
    name = backbone.config["name"]
    family = backbone_family(name)
    native = "/".join(c for f in list_families() if f.plans_native for c in f.network_classes)
    state = backbone.network.state_dict()
    note = ""
    if to == "nnunet":
        if not family.plans_native:
            raise ExportError(f"{ckpt.path} holds a {name} backbone; nnU-Net's -pretrained_weights only takes "
                              f"{native} weights built from the dataset's plans. Use nnUNetv2_train -tr "
                              f"{family.nnunet_trainer}")
        if plans is not None:
            _check_nnunet_plans(ckpt, state, backbone.in_channels, plans, configuration, family.nnunet_trainer)
            note = f"checked against {plans} ({configuration}): every non-segmentation tensor fits"
        elif "plans" not in backbone.config:
            note = ("pretrained on an architecture derived from a patch size, not from your dataset's plans: "
                    "-pretrained_weights accepts it only if your plans build the identical network (check with "
                    "--plans), otherwise use nnUNetv2_train -tr Med3DInsightTrainer")
        payload: Dict[str, Any] = {"network_weights": state}
    elif to == "monai":
        if family.plans_native:
            wrapped = "/".join(c for f in list_families() if not f.plans_native for c in f.network_classes)
            raise ExportError(f"{ckpt.path} holds a {name} backbone; --to monai exports {wrapped} weights. "
                              f"Use --to nnunet or --to nnssl for nnU-Net networks")
        payload = {k: v for k, v in state.items() if not k.startswith(family.head_prefixes)}
        note = "load with model.load_state_dict(torch.load(path, weights_only=True), strict=False)"
    else:
        if not family.plans_native:  # nnU-Net builds PlainConvUNet / ResidualEncoderUNet / Primus from nnssl files
            arch = family.network_classes[0]
            raise ExportError(f"{ckpt.path} holds a {name} backbone; nnU-Net's nnssl fine-tuning builds only "
                              f"{native}/Primus. Use --to monai (MONAI's {arch}) or nnUNetv2_train -tr "
                              f"{family.nnunet_trainer}")
        payload = {"network_weights": state, "nnssl_adaptation_plan": adaptation_plan(backbone, ckpt.metadata)}
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    tensors = len(payload.get("network_weights", payload))
    return ExportResult(format=to, path=str(out), tensors=tensors, note=note)


def _check_nnunet_plans(ckpt, state, in_channels, plans, configuration, trainer):
    """Refuse unless the network the plans build has every non-segmentation key of ``state`` with its shape,
    exactly what nnU-Net's load_pretrained_weights asserts."""

    try:
        target = build_downstream_network(ckpt, plans, configuration=configuration, in_channels=in_channels)
    except CheckpointError:
        raise
    except Med3DInsightError as e:
        message = first_line(e)
        raise Med3DInsightError(message if str(plans) in message else f"--plans {plans}: {message}") from None
    family = family_of_network(target)
    heads = family.head_prefixes if family is not None else ()
    problems = []
    for key, tensor in target.state_dict().items():
        if key.startswith(heads):
            continue
        if key not in state:
            problems.append(f"{key} missing")
        elif state[key].shape != tensor.shape:
            problems.append(f"{key} {list(state[key].shape)} vs plans {list(tensor.shape)}")
    if problems:
        raise CheckpointError(f"{ckpt.path} was not pretrained on the network that {plans} ({configuration}) builds: "
                              f"{len(problems)} tensors differ ({'; '.join(problems[:3])}). nnU-Net's "
                              f"-pretrained_weights cannot load it; use nnUNetv2_train -tr {trainer}, "
                              f"which loads the encoder it can match and reports the rest")
