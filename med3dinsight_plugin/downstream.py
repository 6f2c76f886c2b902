"""The network a checkpoint is fine-tuned in, built fresh: :func:`build_downstream_network`.

The one place that builds it, from the checkpoint's metadata (its family's ``build_network``) or from nnU-Net plans
(exactly as nnU-Net's trainer does), under the checkpoint's allocation guard where the architecture came from the
file. The loader's test-loads, ``export``, ``nnunet-attach`` and the pretraining step-0 check build here.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Optional, Union

from torch import nn

from .backbones import family_of_checkpoint
from .backbones.nnunet import network_from_plans
from .checkpoint import Checkpoint, allocation_guard, load_checkpoint
from .errors import CheckpointError, Med3DInsightError, first_line

__all__ = ["build_downstream_network", "building_from_metadata"]


@contextlib.contextmanager
def building_from_metadata(ckpt) -> Iterator[None]:
    """Context for building a network from a checkpoint's metadata: under the checkpoint's
    :func:`~med3dinsight_plugin.checkpoint.allocation_guard` (a network far larger than the file's weights is
    refused before it is allocated), and a builder's refusal of arguments that came from the file becomes a
    :class:`~med3dinsight_plugin.checkpoint.CheckpointError` naming the file.

    Args:
        ckpt: the loaded :class:`~med3dinsight_plugin.checkpoint.Checkpoint`.
    """
    try:
        with allocation_guard(ckpt):
            yield
    except CheckpointError:
        raise
    except Med3DInsightError as e:  # the builder's own words, about arguments that came from the file
        raise CheckpointError(f"{ckpt.path}: the backbone in its metadata cannot be built ({first_line(e)}); the "
                              f"file was edited or written by another version: re-save the checkpoint") from None


def build_downstream_network(checkpoint, plans: Union[str, os.PathLike, Dict[str, Any], None] = None, *,
                             configuration: str = "3d_fullres", in_channels: Optional[int] = None,
                             num_classes: int = 3, guard: bool = False) -> nn.Module:
    """The plain network a checkpoint is fine-tuned in, freshly built: what every test-load loads into.

    Args:
        checkpoint: a path, ``hf-hub:ORG/REPO[@REVISION]`` or a loaded
            :class:`~med3dinsight_plugin.checkpoint.Checkpoint`.
        plans: nnU-Net plans (a plans.json path or dict): build the network the plans' ``configuration`` describes,
            exactly as nnU-Net's trainer does (whatever class they name). ``None``: the network the checkpoint's own
            metadata describes (its family's ``build_network``, under :func:`building_from_metadata`); that needs a
            med3dinsight checkpoint.
        configuration: the plans' configuration.
        in_channels: input channels; default the checkpoint's.
        num_classes: segmentation classes of the new head (never loaded, so any count; pretraining used 2).
        guard: with ``plans``, build under the checkpoint's allocation guard too: for plans whose architecture was
            copied from the checkpoint (``nnunet-attach --adapt-architecture``).

    Returns:
        The network (nnU-Net's or MONAI's class, or its nnU-Net adapter), with its own fresh weights.

    Raises:
        CheckpointError: the checkpoint has no med3dinsight metadata (``plans=None``), or describes a network that
            cannot or may not be built.
        Med3DInsightError: the plans or the configuration are unusable (the message names the configuration).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if in_channels is None:
        in_channels = int(ckpt.metadata.get("in_channels", 1))
    if plans is not None:
        with allocation_guard(ckpt) if guard else contextlib.nullcontext():
            return network_from_plans(plans, configuration, in_channels, num_classes)
    family = family_of_checkpoint(ckpt.metadata) if ckpt.source_format == "med3dinsight" else None
    if family is None:
        raise CheckpointError(f"{ckpt.path} is a {ckpt.source_format} file without med3dinsight metadata, so its "
                              f"architecture is unknown; pass the nnU-Net plans to build instead, or use a checkpoint "
                              f"written by save_pretrained")
    with building_from_metadata(ckpt):
        return family.build_network(dict(ckpt.metadata["backbone"]), in_channels, num_classes)
