"""What plans, trainers and ``nnunet-attach`` agree on: the plans entry, the checkpoint variable, which trainer and
which nnU-Net network class each backbone family uses.

Imports nothing of nnU-Net or MONAI, so the trainers, ``nnunet-attach`` and ``med3dinsight study`` all read it. The
per-family tables are live views of the backbone-family descriptors
(:class:`~med3dinsight_plugin.backbones.BackboneFamily`): a registered family appears in them without an edit here.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from med3dinsight_plugin.backbones import BackboneFamily, backbone_family, list_families
from med3dinsight_plugin.errors import Med3DInsightError

__all__ = ["ENV_CHECKPOINT", "FamilyTable", "MONAI_NETWORKS", "NNUNET_FAMILY", "PLANS_KEY", "TRAINER_OF",
           "checkpoint_family", "configured_checkpoint", "family_of_architecture"]

PLANS_KEY = "med3dinsight"  # the plans entry nnunet-attach writes and the trainers read
ENV_CHECKPOINT = "MED3DINSIGHT_CHECKPOINT"  # overrides the plans' checkpoint
NNUNET_FAMILY = "nnunet"  # nnU-Net's own networks: what a checkpoint without med3dinsight metadata is fine-tuned as


class FamilyTable(Mapping):
    """A read-only ``family name -> value`` table computed from the registered families when read.

    Args:
        value: ``BackboneFamily -> value``.
        keep: which families have a row (default all).
    """

    def __init__(self, value, keep=lambda family: True):
        self._value, self._keep = value, keep

    def _rows(self) -> Dict[str, Any]:
        return {f.name: self._value(f) for f in list_families() if self._keep(f)}

    def __getitem__(self, name: str) -> Any:
        return self._rows()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())

    def __repr__(self) -> str:
        return repr(self._rows())


# family -> the trainer that fine-tunes it (nnUNetv2_train -tr)
TRAINER_OF: Mapping[str, str] = FamilyTable(lambda f: f.nnunet_trainer)
# families nnU-Net's plans do not describe -> the adapter class the adapted plans name (nnunet_trainers.networks)
MONAI_NETWORKS: Mapping[str, str] = FamilyTable(lambda f: f.nnunet_networks[0], keep=lambda f: not f.plans_native)


def configured_checkpoint(plans: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """The checkpoint a trainer should load: ``$MED3DINSIGHT_CHECKPOINT`` overrides the plans' entry.

    Args:
        plans: the nnU-Net plans the trainer runs with.

    Returns:
        ``(checkpoint, where it came from)``; the checkpoint as written (a path or ``hf-hub:ORG/REPO[@REVISION]``,
        for :func:`~med3dinsight_plugin.checkpoint.resolve_checkpoint`), or ``None`` when neither names one.
    """
    if os.environ.get(ENV_CHECKPOINT):
        return os.environ[ENV_CHECKPOINT], f"${ENV_CHECKPOINT}"
    origin = f"plans '{plans.get('plans_name')}'"
    entry = plans.get(PLANS_KEY)
    if entry is None:
        return None, origin
    if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint"), str) or not entry["checkpoint"]:
        raise Med3DInsightError(f"{origin}: its '{PLANS_KEY}' entry must be an object with a 'checkpoint' path, as "
                                f"med3dinsight nnunet-attach writes it; attach the checkpoint again")
    return entry["checkpoint"], origin


def checkpoint_family(source_format: str, metadata: Mapping[str, Any]) -> BackboneFamily:
    """The family a checkpoint is fine-tuned as: its metadata's for a med3dinsight file, else nnU-Net's own
    networks (nnU-Net and nnssl files, plain state dicts).

    Args:
        source_format: ``Checkpoint.source_format``.
        metadata: ``Checkpoint.metadata``.

    Returns:
        The :class:`~med3dinsight_plugin.backbones.BackboneFamily`.
    """
    name = metadata.get("backbone", {}).get("name") if source_format == "med3dinsight" else None
    return backbone_family(name if isinstance(name, str) else NNUNET_FAMILY)


def family_of_architecture(class_name: str) -> Optional[BackboneFamily]:
    """The family whose networks nnU-Net plans name ``class_name`` (dotted or not), or ``None``.

    Args:
        class_name: ``architecture.network_class_name`` of a plans configuration.
    """
    short = class_name.rsplit(".", 1)[-1]
    return next((f for f in list_families() if short in f.nnunet_network_names), None)
