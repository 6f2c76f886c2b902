"""``--to nnssl``: the adaptation plan as nnssl writes it and as nnU-Net's nnssl fine-tuning reads it.

The dataclasses below restate only the field names and types of nnssl's ``AdaptationPlan``, ``ArchitecturePlans``
(as its ``serialize`` writes it), ``DynamicArchitecturePlans``, ``Plan`` and ``ConfigurationPlan`` (MIC-DKFZ/nnssl
7044864, src/nnssl/adaptation_planning/adaptation_plan.py and src/nnssl/experiment_planning/experiment_planners/
plan.py). Building them with ``Cls(**d)``, as nnssl's ``from_dict`` does, fails on any missing or extra key.
:func:`like_nnssl_reads` follows what nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` and
``nnUNetv2_plan_like_dynamic`` (nnunetv2/experiment_planning/like_nnssl.py) read from the file.
"""
import copy
import json
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import pytest
import torch

from helpers import TINY_BACKBONES, run_tool, tiny_backbone
from med3dinsight_plugin import build_backbone, load_checkpoint, load_pretrained_encoder, save_pretrained
from med3dinsight_plugin.checkpoint import adaptation_plan
from med3dinsight_plugin.export import ExportError, export_checkpoint

Spacing = Optional[List[float]]


@dataclass
class ConfigurationPlan:
    data_identifier: Optional[str]
    preprocessor_name: Optional[str]
    spacing_style: str
    normalization_schemes: Optional[List[str]]
    use_mask_for_norm: Optional[List[bool]]
    resampling_fn_data: Optional[str]
    resampling_fn_data_kwargs: Optional[Dict[str, Any]]
    resampling_fn_mask: Optional[str]
    resampling_fn_mask_kwargs: Optional[Dict[str, Any]]
    spacing: Spacing = None
    patch_size: Optional[List[int]] = None


@dataclass
class Plan:
    dataset_name: Optional[str]
    plans_name: Optional[str]
    original_median_spacing_after_transp: Spacing
    image_reader_writer: Optional[str]
    transpose_forward: Optional[List[int]]
    transpose_backward: Optional[List[int]]
    configurations: Dict[str, ConfigurationPlan]
    experiment_planner_used: Optional[str]


@dataclass
class ArchitecturePlans:
    arch_class_name: str
    arch_kwargs: Optional[Dict[str, Any]]
    arch_kwargs_requiring_import: Optional[List[str]]


@dataclass
class DynamicArchitecturePlans:  # what nnssl's AdaptationPlan.from_dict builds arch_kwargs into
    n_stages: int
    features_per_stage: list
    conv_op: str
    kernel_sizes: list
    strides: list
    n_blocks_per_stage: list
    n_conv_per_stage_decoder: list
    conv_bias: bool
    norm_op: str
    norm_op_kwargs: dict
    dropout_op: Optional[str]
    dropout_op_kwargs: Optional[dict]
    nonlin: str
    nonlin_kwargs: dict


@dataclass
class AdaptationPlan:
    architecture_plans: ArchitecturePlans
    pretrain_plan: Plan
    pretrain_num_input_channels: int
    recommended_downstream_patchsize: List[int]
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: List[str]
    key_to_lpe: Optional[str] = None


def _typed(value, hint) -> bool:
    """``value`` fits the (simple) type hint ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union:
        return any(_typed(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_typed(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_typed(k, args[0]) and _typed(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check(obj):
    for f in fields(obj):
        hint = typing.get_type_hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if isinstance(value, (ConfigurationPlan, Plan, ArchitecturePlans)):
            _check(value)
        elif f.name == "configurations":
            assert all(_check(v) is None for v in value.values())
        else:
            assert _typed(value, hint), f"{type(obj).__name__}.{f.name} = {value!r} is not {hint}"


def nnssl_view(plan: dict) -> AdaptationPlan:
    """The file's adaptation plan rebuilt into nnssl's dataclasses (field for field), with the invariants nnssl's
    ``ConfigurationPlan.serialize`` asserts and its trainers keep (one configuration)."""
    pretrain = dict(plan["pretrain_plan"])
    pretrain["configurations"] = {k: ConfigurationPlan(**v) for k, v in pretrain["configurations"].items()}
    view = AdaptationPlan(**{**plan, "architecture_plans": ArchitecturePlans(**plan["architecture_plans"]),
                             "pretrain_plan": Plan(**pretrain)})
    _check(view)
    assert len(view.pretrain_plan.configurations) == 1
    for name, config in view.pretrain_plan.configurations.items():
        assert config.spacing_style in ("onemmiso", "median", "noresample") and name == config.spacing_style
        assert config.spacing is not None or config.spacing_style == "noresample"
        assert config.patch_size is not None and len(config.patch_size) == 3
        assert config.spacing is None or len(config.spacing) == 3
    return view


def like_nnssl_reads(plan: dict):
    """``(pretrain spacing, pretrain_info, architecture)`` as nnU-Net master's like_nnssl.py takes them from the
    adaptation plan; both end up in a plans JSON file."""
    plan = copy.deepcopy(plan)
    configurations = plan["pretrain_plan"]["configurations"]
    spacing = list(configurations.values())[0]["spacing"]
    name = list(configurations.keys())[0]
    architecture = plan["architecture_plans"]
    architecture["network_class_name"] = architecture.pop("arch_class_name")
    architecture["_kw_requires_import"] = architecture.pop("arch_kwargs_requiring_import")
    info = {"key_to_encoder": plan["key_to_encoder"], "key_to_stem": plan["key_to_stem"],
            "keys_to_in_proj": plan["keys_to_in_proj"], "key_to_lpe": plan["key_to_lpe"],
            "pt_num_in_channels": plan["pretrain_num_input_channels"],
            "pt_used_patchsize": configurations[name]["patch_size"],
            "pt_recommended_downstream_patchsize": plan["recommended_downstream_patchsize"]}
    json.dumps([info, architecture])
    if spacing is not None:  # -am like_pretrained names the preprocessed data after it
        "Spacing__{}_{}_{}".format(*[f"{x:.2f}" for x in spacing])
    return spacing, info, architecture


def _export(backbone, tmp_path, **metadata):
    ckpt = save_pretrained(backbone, tmp_path / "c.safetensors", **metadata)
    out = export_checkpoint(ckpt, "nnssl", tmp_path / "nnssl.pth")
    assert out.format == "nnssl" and out.tensors == len(backbone.network.state_dict())
    payload = torch.load(tmp_path / "nnssl.pth", weights_only=True)
    assert set(payload) == {"network_weights", "nnssl_adaptation_plan"}
    return payload


@pytest.mark.slow
def test_plans_backbone_export_reads_as_nnssl_and_like_nnssl(nnunet_plans, tmp_path):
    plans = json.loads(nnunet_plans["resenc"].read_text())
    torch.manual_seed(0)
    backbone = build_backbone("nnunet", plans=nnunet_plans["resenc"])  # ResEnc-M from the dataset's own plans
    plan = _export(backbone, tmp_path)["nnssl_adaptation_plan"]
    view = nnssl_view(plan)
    DynamicArchitecturePlans(**plan["architecture_plans"]["arch_kwargs"])
    assert view.architecture_plans.arch_class_name == "ResidualEncoderUNet"
    fullres = plans["configurations"]["3d_fullres"]
    pretrain = view.pretrain_plan
    assert (pretrain.dataset_name, pretrain.plans_name) == ("Dataset990_Tiny", "nnUNetResEncUNetMPlans")
    assert pretrain.experiment_planner_used == plans["experiment_planner_used"]
    assert pretrain.transpose_forward == plans["transpose_forward"]
    assert pretrain.original_median_spacing_after_transp == plans["original_median_spacing_after_transp"]
    config = pretrain.configurations["median"]
    assert config.spacing == fullres["spacing"] and config.patch_size == fullres["patch_size"]
    assert config.normalization_schemes == fullres["normalization_schemes"]
    assert config.data_identifier == fullres["data_identifier"]
    assert config.resampling_fn_mask == fullres["resampling_fn_seg"]
    spacing, info, architecture = like_nnssl_reads(plan)
    assert spacing == fullres["spacing"] and info["pt_used_patchsize"] == list(backbone.patch_size)
    assert architecture["arch_kwargs"] == fullres["architecture"]["arch_kwargs"]
    assert info["key_to_encoder"] == "encoder.stages" and info["pt_num_in_channels"] == 1

    ckpt = load_checkpoint(tmp_path / "nnssl.pth")  # our own loader still reads the export
    assert ckpt.source_format == "nnssl" and ckpt.metadata["nnssl_adaptation_plan"] == plan
    target = build_backbone("nnunet", plans=nnunet_plans["resenc"]).network
    report = load_pretrained_encoder(target, tmp_path / "nnssl.pth")
    assert report.coverage == 100.0
    for key, value in backbone.network.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["plain_conv_unet", "resenc_unet"])
def test_plans_free_export_reads_as_nnssl_and_like_nnssl(name, tmp_path):
    backbone = tiny_backbone(name)
    plan = _export(backbone, tmp_path)["nnssl_adaptation_plan"]
    view = nnssl_view(plan)
    if name == "resenc_unet":  # nnssl's DynamicArchitecturePlans has no n_conv_per_stage (PlainConvUNet's)
        DynamicArchitecturePlans(**plan["architecture_plans"]["arch_kwargs"])
    config = view.pretrain_plan.configurations["noresample"]
    assert config.spacing is None and config.patch_size == list(TINY_BACKBONES[name]["patch_size"])
    assert config.normalization_schemes is None and view.pretrain_plan.dataset_name is None  # nothing says
    spacing, info, architecture = like_nnssl_reads(plan)
    assert spacing is None and info["pt_used_patchsize"] == [32, 32, 32]
    assert architecture["network_class_name"] == ("PlainConvUNet" if name == "plain_conv_unet" else
                                                  "ResidualEncoderUNet")
    report = load_pretrained_encoder(tiny_backbone(name, seed=1).network, tmp_path / "nnssl.pth")
    assert report.source_format == "nnssl" and report.coverage == 100.0


def test_pretrain_plan_tells_what_pretraining_metadata_says(nnunet_plans, tmp_path):
    # raw images: read at their own spacing, normalised by pretraining itself
    raw = {"data": {"kind": "nnunet_raw", "root": "/d/nnUNet_raw/Dataset990_Tiny", "num_channels": 1},
           "intensity_normalization": {"scheme": "CTNormalization", "mean": 1.0, "std": 2.0}}
    plan = _export(tiny_backbone("resenc_unet"), tmp_path, **raw)["nnssl_adaptation_plan"]
    pretrain = nnssl_view(plan).pretrain_plan
    config = pretrain.configurations["noresample"]
    assert pretrain.dataset_name == "Dataset990_Tiny" and config.spacing is None
    assert config.normalization_schemes == ["CTNormalization"] and config.use_mask_for_norm == [False]
    assert config.resampling_fn_data is None
    assert load_checkpoint(tmp_path / "c.safetensors").metadata["adaptation_plan"] == plan  # stored alike

    backbone = build_backbone("nnunet", plans=nnunet_plans["plain"])
    fullres = json.loads(nnunet_plans["plain"].read_text())["configurations"]["3d_fullres"]
    same = {"kind": "nnunet_preprocessed", "root": "/p/Dataset990_Tiny", "plans_name": "nnUNetPlans",
            "configuration": "3d_fullres"}
    cases = {  # metadata -> (spacing style, spacing, normalisation)
        "preprocessed by these plans": ({"data": same, "intensity_normalization": {"scheme": "nnunet_preprocessed"}},
                                        "median", fullres["spacing"], fullres["normalization_schemes"]),
        "preprocessed by other plans": ({"data": {**same, "plans_name": "nnUNetResEncUNetMPlans"}},
                                        "noresample", None, None),
        "raw images": (raw, "noresample", None, ["CTNormalization"]),
        "unknown scheme": ({"intensity_normalization": {"scheme": "CT"}, "data": [1]},
                           "median", fullres["spacing"], fullres["normalization_schemes"]),
    }
    for case, (metadata, style, spacing, schemes) in cases.items():
        config = nnssl_view(adaptation_plan(backbone, metadata)).pretrain_plan.configurations[style]
        assert (config.spacing, config.normalization_schemes) == (spacing, schemes), case


@pytest.mark.slow
@pytest.mark.parametrize("name,cls", [("swin_unetr", "SwinUNETR"), ("unetr", "UNETR")])
def test_cli_refuses_nnssl_export_of_monai_networks(name, cls, tmp_path):
    ckpt = save_pretrained(tiny_backbone(name), tmp_path / "m.safetensors")
    with pytest.raises(ExportError, match="--to monai"):
        export_checkpoint(ckpt, "nnssl", tmp_path / "x.pth")
    r = run_tool(["med3dinsight", "export", ckpt, "--to", "nnssl", "-o", tmp_path / "x.pth"], dict(os.environ),
                 check=False, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "PlainConvUNet/ResidualEncoderUNet/Primus" in r.stderr and "--to monai" in r.stderr
    assert f"Med3DInsightTrainer_{cls}" in r.stderr and not (tmp_path / "x.pth").exists()
