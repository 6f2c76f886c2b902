"""Tie a pretrained checkpoint to an nnU-Net plans file: ``med3dinsight nnunet-attach``.

The new plans file (``nnUNet_preprocessed/DATASET/NAME.json``) is a copy of the original with a ``"med3dinsight"``
key naming the checkpoint and its metadata. nnU-Net copies plans into the results folder, so every run records the
weights it started from; the preprocessed data are shared (the data identifiers do not change). With
``--adapt-architecture`` the configuration's architecture becomes the checkpoint's (a SwinUNETR / UNETR for the MONAI
families, with the patch size made acceptable to them), so ``nnUNetv2_predict`` rebuilds it from the plans alone.
Before anything is written, the network the new plans build is test-loaded: an incompatible checkpoint fails here,
not at epoch 0. The source plans are never overwritten; another existing plans file only with ``overwrite=True``,
unless an earlier attach wrote it from the same source plans (re-attaching).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from med3dinsight_plugin.backbones.nnunet import architecture_from_plans
from med3dinsight_plugin.checkpoint import CheckpointError, load_checkpoint
from med3dinsight_plugin.downstream import build_downstream_network
from med3dinsight_plugin.errors import Med3DInsightError, first_line
from med3dinsight_plugin.fileio import atomic_write, sha256_file
from med3dinsight_plugin.hub import is_hub_spec, pinned_spec
from med3dinsight_plugin.loading import IncompatibleCheckpointError, LoadReport, load_pretrained_encoder
from med3dinsight_plugin.results import Result

from .contract import ENV_CHECKPOINT as ENV_CHECKPOINT  # re-exported for older callers; its home is .contract
from .contract import MONAI_NETWORKS as MONAI_NETWORKS  # re-exported, as above
from .contract import PLANS_KEY, TRAINER_OF, checkpoint_family
from .contract import configured_checkpoint as configured_checkpoint  # re-exported, as above

__all__ = ["AttachResult", "attach_checkpoint", "attached_plans"]


@dataclass(frozen=True)
class AttachResult(Result):
    """What :func:`attach_checkpoint` wrote and how to train with it.

    Attributes:
        plans_file: the plans file written, ``nnUNet_preprocessed/DATASET/NAME.json``.
        plans_name: its plans name (``NAME``; pass it to ``nnUNetv2_train -p``).
        trainer: the nnU-Net trainer that loads the checkpoint (``-tr``).
        command: the ``nnUNetv2_train`` command line, with ``FOLD`` to fill in.
        report: the :class:`~med3dinsight_plugin.loading.LoadReport` of the test load into the network the new
            plans build (``str(report)`` is a readable summary).
        changes: what ``adapt_architecture`` changed in the configuration, one line each (empty without it).
        replaced: whether an existing ``NAME.json`` was replaced.
    """
    plans_file: str
    plans_name: str
    trainer: str
    command: str
    report: LoadReport
    changes: List[str] = field(default_factory=list)
    replaced: bool = False


def attach_checkpoint(dataset: str, plans_name: str, checkpoint: os.PathLike, name: Optional[str] = None,
                      configuration: str = "3d_fullres", adapt_architecture: bool = False,
                      overwrite: bool = False) -> AttachResult:
    """Write ``NAME.json`` beside ``PLANS_NAME.json`` carrying ``checkpoint`` (see the module docstring).

    Args:
        dataset: nnU-Net dataset id or name (``990`` or ``Dataset990_Tiny``).
        plans_name: the plans to start from (``nnUNetPlans``).
        checkpoint: the pretrained checkpoint: a path or ``hf-hub:ORG/REPO[@REVISION]``; the plans record a Hub
            checkpoint pinned to the commit read (``hf-hub:ORG/REPO@COMMIT``).
        name: the new plans name; default ``PLANS_NAME__med3dinsight``.
        configuration: the configuration to train.
        adapt_architecture: replace the configuration's architecture with the checkpoint's.
        overwrite: replace an existing ``NAME.json``. Without it, only plans that an earlier attach wrote from the
            same ``PLANS_NAME`` are replaced (re-attaching, e.g. a newer checkpoint); nnU-Net's own or hand-written
            plans are never touched. The source plans are never overwritten.

    Returns:
        An :class:`AttachResult`: ``plans_file``, ``plans_name``, ``trainer``, ``command`` (the ``nnUNetv2_train``
        line), ``report`` (the test load's :class:`~med3dinsight_plugin.loading.LoadReport`), ``changes`` and
        ``replaced`` (whether an existing ``NAME.json`` was replaced).
    """
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise Med3DInsightError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train")
    try:
        dataset_name = maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as e:
        if isinstance(e, RuntimeError) and "Could not find" not in str(e):
            raise Med3DInsightError(f"dataset {dataset!r}: {first_line(e)}") from None
        raise Med3DInsightError(f"dataset {dataset!r} is not in nnUNet_preprocessed ({nnUNet_preprocessed.get()}), "
                                f"nnUNet_raw or nnUNet_results: pass the id or full name (e.g. 990 or "
                                f"Dataset990_Name) of a dataset planned with nnUNetv2_plan_and_preprocess") from None
    folder = Path(nnUNet_preprocessed) / dataset_name
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        raise Med3DInsightError(f"plans {plans_file} do not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = _read_json(plans_file, f"run nnUNetv2_plan_experiment -d {dataset} to re-create it")
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise Med3DInsightError(f"{plans_file} is not nnU-Net v2 plans (no 'configurations'); pass -p with the name of "
                                f"a plans file of {folder}")
    new_name = name or f"{plans_name}__med3dinsight"
    out = _target(folder, plans_file, plans_name, new_name, overwrite)
    if configuration not in plans.get("configurations", {}):
        raise Med3DInsightError(f"configuration {configuration!r} is not in {plans_file}; available: "
                         f"{sorted(plans.get('configurations', {}))}")
    dataset_json = _read_json(folder / "dataset.json", f"run nnUNetv2_plan_and_preprocess -d {dataset}")
    new_plans, report, changes, family = attached_plans(plans, plans_file, new_name, checkpoint, configuration,
                                                        adapt_architecture, dataset_json, dataset)
    replaced = out.exists()
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(new_plans, indent=2)))
    trainer = TRAINER_OF[family]
    command = f"nnUNetv2_train {dataset} {configuration} FOLD -p {new_name} -tr {trainer}"
    return AttachResult(plans_file=str(out), plans_name=new_name, trainer=trainer, command=command, report=report,
                        changes=list(changes), replaced=replaced)


def attached_plans(plans: Dict[str, Any], plans_file: Path, new_name: str, checkpoint: os.PathLike,
                   configuration: str, adapt_architecture: bool, dataset_json: Any, dataset: str = "DATASET"):
    """The plans ``attach_checkpoint`` writes, without writing them: ``(new plans, load report, changes, family)``.

    The checkpoint is test-loaded into the network the new plans build; an incompatible one raises here.
    """
    plans_name = plans_file.stem
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.metadata
    family = checkpoint_family(ckpt.source_format, meta)

    new_plans = copy.deepcopy(plans)
    new_plans["plans_name"] = new_name
    config = new_plans["configurations"][configuration]
    changes = []
    if not family.plans_native and not adapt_architecture:
        raise Med3DInsightError(f"{ckpt.path} holds a {family.name} network but {plans_file.name} describes "
                                f"{_arch_name(config)}; add --adapt-architecture to train the checkpoint's network")
    if adapt_architecture:
        if ckpt.source_format != "med3dinsight":
            raise Med3DInsightError(f"{ckpt.path} has no med3dinsight metadata, so its architecture is unknown; "
                             f"--adapt-architecture needs a checkpoint written by save_pretrained")
        changes += _adapt(config, configuration, family, meta, new_plans)

    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {}))) \
        if isinstance(dataset_json, dict) else 0
    if channels < 1:
        raise Med3DInsightError(f"{plans_file.parent / 'dataset.json'} names no input channels ('channel_names'); "
                                f"run nnUNetv2_plan_and_preprocess -d {dataset} again")
    report = _test_load(new_plans, configuration, channels, ckpt,
                        can_adapt=not adapt_architecture and ckpt.source_format == "med3dinsight",
                        guarded=adapt_architecture)

    new_plans[PLANS_KEY] = {
        "checkpoint": pinned_spec(checkpoint, ckpt.path) if is_hub_spec(checkpoint) else str(Path(ckpt.path).resolve()),
        "sha256": sha256_file(ckpt.path),
        "source_format": ckpt.source_format,
        "family": family.name,
        "configuration": configuration,
        "attached_to": plans_name,
        "changes": changes,
        "checkpoint_metadata": {k: v for k, v in meta.items()
                                if k not in ("aliases", "adaptation_plan", "backbone", "nnssl_adaptation_plan")},
    }
    return new_plans, report, changes, family.name


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Med3DInsightError(f"{path} does not exist; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Med3DInsightError(f"{path} is not valid JSON ({e}); {fix}") from None


def _target(folder: Path, plans_file: Path, plans_name: str, new_name: str, overwrite: bool) -> Path:
    """The plans file to write: never the source plans, and an existing file only if it may be replaced."""
    if (not new_name or new_name != new_name.strip() or new_name.startswith(".") or new_name.endswith(".json")
            or any(c in new_name for c in '/\\:*?"<>|') or any(ord(c) < 32 for c in new_name)):
        raise Med3DInsightError(f"plans name {new_name!r} must be a plain name such as nnUNetPlans__med3dinsight (no "
                                f"folder, no .json): nnU-Net looks the plans up as {folder}/NAME.json")
    out = folder / f"{new_name}.json"
    if new_name == plans_name or (out.exists() and os.path.samefile(out, plans_file)):
        raise Med3DInsightError(f"-n {new_name} would overwrite the plans it starts from ({plans_file}); choose "
                                f"another name, e.g. the default {plans_name}__med3dinsight")
    if out.exists() and not overwrite:
        try:
            existing = json.loads(out.read_text())
        except (OSError, ValueError):
            existing = None
        entry = existing.get(PLANS_KEY) if isinstance(existing, dict) else None
        if not (isinstance(entry, dict) and entry.get("attached_to") == plans_name):
            raise Med3DInsightError(f"{out} exists and was not written by nnunet-attach from {plans_name}; choose "
                                    f"another name (-n), or add --overwrite to replace it")
    return out


def _arch_name(config: Dict[str, Any]) -> str:
    return str(config.get("architecture", {}).get("network_class_name", "?")).rsplit(".", 1)[-1]


def _adapt(config, configuration, family, meta, plans):
    """Put the checkpoint's architecture (and a patch size it accepts) into the configuration, as its family's
    descriptor says (:meth:`~med3dinsight_plugin.backbones.BackboneFamily.plans_architecture`)."""

    if "inherits_from" in config:  # resolve, so that the architecture we write is not overridden by a parent
        resolved = architecture_from_plans(plans, configuration)[1]
        resolved.pop("inherits_from", None)  # nnU-Net keeps the child's key; the copy is complete now
        config.clear()
        config.update(resolved)
    old_patch = list(config["patch_size"])
    architecture, patch = family.plans_architecture(meta["backbone"], old_patch)
    changes = [f"architecture {_arch_name(config)} -> {architecture['network_class_name'].rsplit('.', 1)[-1]}"]
    config["architecture"] = architecture
    if patch != old_patch:
        changes.append(f"patch size {old_patch} -> {patch}")
        config["patch_size"] = patch
    return changes


def _test_load(plans, configuration, channels, ckpt, can_adapt, guarded):
    """Build the network the trainer will build and load the checkpoint into it (strict). ``guarded``: the
    architecture came from the checkpoint's metadata, so it is built under the checkpoint's allocation guard."""

    network = build_downstream_network(ckpt, plans, configuration=configuration, in_channels=channels, num_classes=2,
                                       guard=guarded)
    try:
        return load_pretrained_encoder(network, ckpt)
    except IncompatibleCheckpointError as e:
        hint = " Add --adapt-architecture to train the checkpoint's own architecture instead." if can_adapt else ""
        raise CheckpointError(f"{str(e).splitlines()[0]}.{hint}\n{e.report}") from None
