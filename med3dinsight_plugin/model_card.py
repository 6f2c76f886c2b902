"""The model card (``README.md``) ``med3dinsight push`` publishes beside a checkpoint, written from its metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

from .backbones import backbone_family
from .errors import short_repr
from .hub import (
    HUB_FILENAME,
    HubSpec,
    parse_hub_spec,
)


def _backbone_name(meta: Dict[str, Any]) -> str:
    cls = str(meta.get("network_class", "")).rsplit(".", 1)[-1]
    return f"{meta['backbone']['name']} ({cls})" if cls else meta["backbone"]["name"]


def _cell(value: Any) -> str:
    """A table cell: one line, pipes escaped."""
    text = value if isinstance(value, str) else _short(value)
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _short(value: Any) -> str:
    """A metadata value in a few words: numbers to 4 significant digits, a list of numbers as ``A x B x C``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return " x ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return short_repr(value, 160)


def _spacing(meta: Dict[str, Any]) -> str:
    """The voxel size the network was pretrained at, as the metadata says: ``data.target_spacing`` (the crop view
    resampled every volume to it), the volume view (body boxes resampled to the patch size), nnU-Net's target spacing
    (preprocessed data of the plans the network was built from), or the volumes' own spacing."""
    backbone = meta["backbone"]
    if isinstance(backbone.get("spacing"), list):
        return f"{_short(backbone['spacing'])} mm"
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    run = (meta.get("pretraining") or {}).get("config") if isinstance(meta.get("pretraining"), dict) else None
    config = run.get("data") if isinstance(run, dict) and isinstance(run.get("data"), dict) else {}
    target = data.get("target_spacing")
    if isinstance(target, list) and len(target) == 3 and all(isinstance(x, (int, float)) for x in target):
        median = config.get("target_spacing") is None and config.get("spacing") == "median"
        return (f"{_short(target)} mm ({'the dataset median; ' if median else ''}each volume resampled to it before "
                f"cropping)")
    if data.get("view", config.get("view")) == "volume":
        return "each volume's body box resampled to the patch size (the voxel size differs per volume)"
    plan = (meta.get("adaptation_plan") or {}).get("pretrain_plan") or {}
    for name, configuration in (plan.get("configurations") or {}).items():
        if isinstance(configuration, dict) and isinstance(configuration.get("spacing"), list):
            return f"{_short(configuration['spacing'])} mm (nnU-Net {name} target spacing)"
    if data.get("kind") == "nnunet_preprocessed":
        return (f"nnU-Net's target spacing of the preprocessed {data.get('plans_name', '?')} / "
                f"{data.get('configuration', '?')} data")
    if data.get("kind") in ("nifti", "nnunet_raw"):
        return "each volume's own spacing (not resampled)"
    return "not recorded"


def _normalisation(meta: Dict[str, Any]) -> str:
    norm = meta.get("intensity_normalization")
    if not isinstance(norm, dict):
        return "not recorded"
    scheme = str(norm.get("scheme", "?"))
    if scheme == "nnunet_preprocessed":
        return f"nnU-Net's own (preprocessed {norm.get('plans_name', '?')} / {norm.get('configuration', '?')} data)"
    rest = {k: v for k, v in norm.items() if k != "scheme"}
    return scheme + (" (" + ", ".join(f"{k} {_short(v)}" for k, v in rest.items()) + ")" if rest else "")


def _teacher(meta: Dict[str, Any]) -> str:
    teacher = meta.get("teacher")
    if not isinstance(teacher, dict):
        return "not recorded"
    parts = [str(teacher.get("model", "?"))]
    if teacher.get("pretrained"):
        parts.append(f"weights {teacher['pretrained']}")
    if teacher.get("embed_dim"):
        parts.append(f"{teacher['embed_dim']}-d")
    if teacher.get("weights_fingerprint"):
        parts.append(f"fingerprint {teacher['weights_fingerprint']}")
    return ", ".join(parts)


def _captions(meta: Dict[str, Any]) -> str:
    if "captions" not in meta:
        return "not recorded"
    captions = meta["captions"]
    if not captions:
        return "none (image embeddings only)"
    if isinstance(captions, dict):
        return str(captions.get("model") or "from label masks / unnamed") + (
            f" (captions sha256 {str(captions['sha256'])[:12]})" if captions.get("sha256") else "")
    return _short(captions)


def _data(meta: Dict[str, Any]) -> str:
    data = meta.get("data")
    if not isinstance(data, dict):
        return "not recorded"
    parts = []
    if isinstance(data.get("root"), str) and data["root"]:
        parts.append(Path(data["root"]).name)  # the dataset's name, not the pretraining machine's path
    for key, label in (("kind", ""), ("modality", "modality "), ("num_cases", ""), ("num_channels", "")):
        if data.get(key) is not None:
            value = data[key]
            parts.append(f"{value} cases" if key == "num_cases" else f"{value} channel(s)" if key == "num_channels"
                         else f"{label}{value}")
    if data.get("plans_name"):
        parts.append(f"{data['plans_name']} / {data.get('configuration', '?')}")
    return ", ".join(str(p) for p in parts) or "not recorded"


def model_card(meta: Dict[str, Any], spec: Union[HubSpec, str]) -> str:
    """The model card (``README.md``) of a pushed checkpoint, from its validated metadata.

    Args:
        meta: the checkpoint's med3dinsight metadata (:class:`~med3dinsight_plugin.checkpoint.Checkpoint`).
        spec: where it is published (``ORG/REPO`` and the revision), for the loading instructions.

    Returns:
        Markdown with a YAML header: the network (backbone, channels, patch size, spacing, intensity normalisation,
        orientation, encoder), the pretraining (teacher, captions model, data, schedule), and how to load it in
        nnU-Net and MONAI.
    """

    hub = spec if isinstance(spec, HubSpec) else parse_hub_spec(spec)
    ref = str(hub)
    name = meta["backbone"]["name"]
    family = backbone_family(name)  # its trainer, and the class its plain network is built from outside nnU-Net
    pretraining = meta.get("pretraining") if isinstance(meta.get("pretraining"), dict) else {}
    alignment = meta.get("alignment") if isinstance(meta.get("alignment"), dict) else {}
    rows = [("backbone", _backbone_name(meta)), ("input channels", meta["in_channels"]),
            ("patch size", _short(meta["patch_size"])), ("spacing", _spacing(meta)),
            ("intensity normalisation", _normalisation(meta)),
            ("orientation", meta.get("orientation", "not recorded")),
            ("encoder", ", ".join(meta["encoder_prefixes"]) or "the whole network"),
            ("teacher (image/text)", _teacher(meta)), ("captions model", _captions(meta)),
            ("pretraining data", _data(meta))]
    if pretraining:
        rows.append(("pretraining run", ", ".join(f"{k.replace('_', ' ')} {pretraining[k]}" for k in
                                                   ("steps", "global_batch", "world_size") if k in pretraining)))
    if alignment:
        rows.append(("alignment", f"{alignment.get('type', '?')}, {alignment.get('embed_dim', '?')}-d"))
    rows.append(("med3dinsight version", meta.get("package_version", "?")))
    table = "\n".join(f"| {label} | {_cell(value)} |" for label, value in rows)
    trainer = family.nnunet_trainer
    if not family.plans_native:  # nnU-Net's plans never build these: the plans must take the checkpoint's network
        attach = (f"med3dinsight nnunet-attach -d DATASET -p nnUNetPlans --checkpoint {ref} --adapt-architecture\n"
                  f"nnUNetv2_train DATASET 3d_fullres FOLD -p nnUNetPlans__med3dinsight -tr {trainer}\n"
                  f"# or, with plans that already build this network (as nnunet-attach --adapt-architecture writes):\n"
                  f"MED3DINSIGHT_CHECKPOINT={ref} nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -tr {trainer}")
    else:
        attach = (f"med3dinsight nnunet-attach -d DATASET -p nnUNetPlans --checkpoint {ref}   # + --adapt-architecture "
                  f"unless your plans build this network\n"
                  f"nnUNetv2_train DATASET 3d_fullres FOLD -p nnUNetPlans__med3dinsight -tr {trainer}\n"
                  f"# or, without new plans:\n"
                  f"MED3DINSIGHT_CHECKPOINT={ref} nnUNetv2_train DATASET 3d_fullres FOLD -tr {trainer}")
    # a wrapped family's plain network is its library's class (monai.networks.nets.SwinUNETR); a plans-native one is
    # whatever nnU-Net's plans build
    module, wrapped = family.wrapped_network.rsplit(".", 1) if family.wrapped_network else (None, None)
    kwargs = {k: v for k, v in (meta["backbone"].get("network_kwargs") or {}).items()
              if k in ("feature_size", "depths", "num_heads", "hidden_size", "mlp_dim", "img_size")}
    example = (f"network = {wrapped}(in_channels={meta['in_channels']}, out_channels=NUM_CLASSES"
               + "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in kwargs.items()) + ")"
               if wrapped else f"network = ...  # your {' / '.join(family.network_classes)}, or any supported network")
    imports = (f"from {module} import {wrapped}\n" if wrapped else "")
    library = module.split(".")[0] if module else "nnunet"  # the library whose network the weights are
    tags = list(dict.fromkeys(["medical-imaging", "3d", "self-supervised-learning", "med3dinsight", name, library]))
    return f"""---
library_name: med3dinsight
tags:
{chr(10).join(f"- {t}" for t in tags)}
---

# {hub.repo_id}

A 3D medical image encoder pretrained without labels with Med3DInsight (Chen, Ye, Hong,
[arXiv 2403.05141](https://arxiv.org/abs/2403.05141)): 2D image/text teachers supervise the encoder's 3D features
through its axial, coronal and sagittal slices. `{HUB_FILENAME}` is self-describing: its header metadata
holds the network's build arguments, an nnssl adaptation plan and the facts below (`med3dinsight inspect {ref}`
prints them).

| | |
|---|---|
{table}

## nnU-Net

```bash
eval "$(med3dinsight nnunet-env)"
{attach}
```

## MONAI / PyTorch

```python
{imports}from med3dinsight_plugin import load_pretrained_encoder

{example}
print(load_pretrained_encoder(network, "{ref}"))   # exact or it raises; the report says what loaded
```

In an Ignite / MONAI bundle: `PretrainedEncoderLoader("{ref}", network)` from `med3dinsight_plugin.monai_support`.

## Offline

`{hub.download_command()}` puts the file into the Hugging Face cache; with `HF_HUB_OFFLINE=1` the
`{ref}` references above then read it from there.
"""
