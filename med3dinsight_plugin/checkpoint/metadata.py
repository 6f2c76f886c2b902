"""Validating a med3dinsight metadata header once, at read, so that every consumer can use its keys.

The header's keys are declared below as schema sections (:mod:`med3dinsight_plugin.schema`): :class:`Header` (the
top level), :class:`BackboneArguments` (``backbone``), :class:`AdaptationPlan` (``adaptation_plan``) and, for
nnU-Net architectures stored in the file, :class:`Architecture` and :class:`ArchitectureArguments`. What a schema
cannot say is checked where the old hand-written checks did it (``check_fields``' ``then``): a format version newer
than this package reads (first), the arguments the backbone's builder takes, the plans or architecture of an nnU-Net
backbone, and aliases that must name other stored tensors.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import schema
from ..backbones import backbone_family, list_backbones
from ..errors import CheckpointError, short_repr
from ..schema import ABSENT, REQUIRED, Rules, rule, setting
from .format import FORMAT, FORMAT_VERSION

_POSITIVE = "a positive integer"
_TRIPLE = "three positive integers"
_OBJECT = "an object"


@dataclass
class BackboneArguments:
    """``backbone``: the arguments ``build_backbone`` is called with (a builder's other arguments are checked against
    its signature; nnU-Net backbones also carry ``plans`` + ``configuration`` or ``architecture``)."""
    name: str = setting(REQUIRED, "the registered backbone", kind="str", expected="one of the registered backbones")
    in_channels: int = setting(REQUIRED, "input channels", kind="int", min=1, expected=_POSITIVE)
    patch_size: Optional[List[int]] = setting(None, "the patch size the network was built for", kind="ints",
                                              length=3, min=1, expected=_TRIPLE)
    network_kwargs: Optional[Dict[str, Any]] = setting(None, "arguments of the network's constructor", kind="dict",
                                                       expected=_OBJECT)
    num_classes: Optional[int] = setting(None, "output classes of the segmentation head", kind="int", min=1,
                                         expected=_POSITIVE)
    base_features: Optional[int] = setting(None, "features of the first stage", kind="int", min=1,
                                           expected=_POSITIVE)
    max_features: Optional[int] = setting(None, "most features of any stage", kind="int", min=1, expected=_POSITIVE)
    spacing: Optional[List[float]] = setting(None, "voxel spacing in mm", kind="floats", length=3, above=0,
                                             expected="three positive numbers")


@dataclass
class AdaptationPlan:
    """``adaptation_plan``: what nnssl's fine-tuning needs to adapt the pretrained network."""
    architecture_plans: Optional[Dict[str, Any]] = setting(None, "the network's nnU-Net architecture", kind="dict",
                                                           expected=_OBJECT)
    pretrain_plan: Optional[Dict[str, Any]] = setting(None, "the pretraining plans (or null)", kind="dict",
                                                      nullable=True, expected="an object or null")
    pretrain_num_input_channels: Optional[int] = setting(None, "input channels of pretraining", kind="int", min=1,
                                                         expected=_POSITIVE)
    recommended_downstream_patchsize: Optional[List[int]] = setting(None, "the patch size to fine-tune with",
                                                                    kind="ints", length=3, min=1, expected=_TRIPLE)
    key_to_encoder: Optional[str] = setting(None, "state-dict prefix of the encoder", kind="str", nullable=True,
                                            expected="a string or null")
    key_to_stem: Optional[str] = setting(None, "state-dict prefix of the stem", kind="str", nullable=True,
                                         expected="a string or null")
    keys_to_in_proj: Optional[List[str]] = setting(None, "state-dict prefixes of the input projection", kind="strs",
                                                   expected="a list of strings")
    key_to_lpe: Optional[str] = setting(None, "state-dict key of a learned positional embedding", kind="str",
                                        nullable=True, expected="a string or null")


@dataclass
class Header:
    """The med3dinsight metadata header of a checkpoint (the ``format`` key, ``med3dinsight-checkpoint``, is checked
    before it). Keys it does not declare (``pretraining``, ``teacher``, ...) are free."""
    format_version: int = setting(REQUIRED, "the header's format version", kind="int", min=1, expected=_POSITIVE)
    package_version: Optional[str] = setting(None, "the med3dinsight version that wrote the file", kind="str",
                                             expected="a string")
    backbone: BackboneArguments = setting(BackboneArguments, "the build_backbone arguments", required=True,
                                          expected="an object (the build_backbone arguments)")
    network_class: str = setting(REQUIRED, "the network's class", kind="str", expected="a string")
    in_channels: int = setting(REQUIRED, "input channels", kind="int", min=1, expected=_POSITIVE)
    patch_size: List[int] = setting(REQUIRED, "the patch size the network was built for", kind="ints", length=3,
                                    min=1, expected=_TRIPLE)
    encoder_prefixes: List[str] = setting(REQUIRED, "state-dict prefixes of the encoder", kind="strs",
                                          expected="a list of key prefixes (strings)")
    aliases: Optional[Dict[str, str]] = setting(None, "tensor names not stored, each naming the stored tensor it "
                                                      "shares", kind="dict", item=Rules("str"),
                                                expected="an object of strings")
    adaptation_plan: AdaptationPlan = setting(AdaptationPlan, "nnssl's adaptation plan", expected=_OBJECT)
    psat: Optional[Dict[str, Any]] = setting(None, "the PSAT that was pretrained with the backbone", kind="dict",
                                             expected=_OBJECT)
    alignment: Optional[Dict[str, Any]] = setting(None, "how slices were aligned with the teacher", kind="dict",
                                                  expected=_OBJECT)


@dataclass
class Architecture:
    """An nnU-Net architecture in the file (``backbone.architecture``, or a configuration's in ``backbone.plans``);
    nnU-Net resolves its class names with ``pydoc.locate``, which imports modules."""
    network_class_name: str = setting(REQUIRED, "the network class (one the backbone family builds)", kind="str")
    arch_kwargs: Dict[str, Any] = setting(REQUIRED, "the network's arguments", kind="dict", expected=_OBJECT)
    _kw_requires_import: Optional[List[str]] = setting(None, "arch_kwargs that name a class (torch.nn ops)",
                                                       kind="strs", expected="a list of strings")


@dataclass
class ArchitectureArguments:
    """``arch_kwargs`` of an :class:`Architecture` (those checked; the network checks the rest)."""
    features_per_stage: List[int] = setting(REQUIRED, "features of each stage", kind="ints", nonempty=True, min=1,
                                            expected="a list of positive integers")
    strides: List[Any] = setting(REQUIRED, "each stage's stride", kind="list", nonempty=True,
                                 item=Rules("either", options=(rule("int", min=1), rule("ints", length=3, min=1))),
                                 expected="a list of strides (positive integers or three of them)")


# A class-valued architecture argument: null, or a torch.nn class (never another module pydoc.locate would import).
_OP = Rules("str", nullable=True, startswith="torch.nn.", expected="null or a torch.nn class name")


def validate_metadata(meta: Any, path: Any, stored_keys) -> Dict[str, Any]:
    """Check a med3dinsight metadata header once, at read, so that every consumer (inspect, export, attach, the
    loader, the trainers) can use its keys as the format defines them. Raises a one-line :class:`CheckpointError`
    naming the file and the key."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} has a 'med3dinsight' metadata entry that is not a {FORMAT} header (found "
                              f"{short_repr(found, 40)}); re-save the checkpoint with save_pretrained")
    source = schema.Source(str(path), CheckpointError, exact=True, value_limit=60, key_limit=None,
                           template="{source}: checkpoint metadata '{key}' must be {expected}, {got}; the file was "
                                    "edited or not written by med3dinsight's save_pretrained: re-save the checkpoint")
    version = schema.check(meta.get("format_version", ABSENT), schema.rules_of(Header, "format_version"),
                           "format_version", source)
    if version > FORMAT_VERSION:  # a newer format may mean other keys: say so before checking them
        raise CheckpointError(f"{path} is {FORMAT} v{version}; this med3dinsight reads up to v{FORMAT_VERSION}: "
                              f"upgrade the package")
    names, stored = list_backbones(), set(stored_keys)

    def aliases_name_stored_tensors(values: Dict[str, Any], source: schema.Source) -> None:
        for alias, key in values.get("aliases", {}).items():
            if key not in stored or alias in stored:
                source.fail(f"aliases.{alias}", "the name of another stored tensor", key)

    schema.check_fields(meta, Header, source,
                        refine={"backbone.name": {"choices": tuple(names), "expected": f"one of {names}"}},
                        then={"backbone.num_classes": _builder_takes_them, "backbone": _nnunet_plans_or_architecture,
                              "aliases": aliases_name_stored_tensors})
    return meta


def _builder_takes_them(cfg: Dict[str, Any], source: schema.Source) -> None:
    """The ``backbone`` keys are arguments of its builder (unless it forwards ``**kwargs``)."""
    params = inspect.signature(backbone_family(cfg["name"]).builders[cfg["name"]]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in cfg:
            if key not in params and key not in ("name", "network_kwargs"):
                source.fail(f"backbone.{key}", f"absent: the {cfg['name']} backbone takes no such argument",
                            cfg[key])


def _nnunet_plans_or_architecture(meta: Dict[str, Any], source: schema.Source) -> None:
    """An nnU-Net backbone's plans + configuration, or its architecture: nnU-Net resolves their class names with
    pydoc.locate, so they are checked here."""
    cfg, w = meta["backbone"], "backbone."
    family = backbone_family(cfg["name"])
    if cfg["name"] not in family.plans_builders:
        return
    classes = family.nnunet_networks
    if ("plans" in cfg) == ("architecture" in cfg):
        source.fail(f"{w}plans", "given, or else backbone.architecture (exactly one of them)",
                    cfg.get("plans", ABSENT))
    if "architecture" in cfg:
        _check_architecture(cfg["architecture"], f"{w}architecture", classes, source)
        return
    plans = cfg["plans"]
    if not (isinstance(plans, dict) and isinstance(plans.get("configurations"), dict)):
        source.fail(f"{w}plans", "an nnU-Net plans object with 'configurations'", plans)
    configurations = plans["configurations"]
    schema.check(cfg.get("configuration", ABSENT), rule(
        "str", required=True, choices=tuple(configurations),
        expected=f"one of the plans' configurations {sorted(map(str, configurations))[:6]}"),
        f"{w}configuration", source)
    name = cfg["configuration"]
    for _ in range(len(configurations) + 1):  # follow nnU-Net's inherits_from to the configuration's architecture
        where = f"{w}plans.configurations.{name}"
        config = configurations.get(name)
        if not isinstance(config, dict):
            source.fail(where, _OBJECT, config)
        if "architecture" in config:
            _check_architecture(config["architecture"], f"{where}.architecture", classes, source)
            return
        name = config.get("inherits_from")
        if name is None:
            source.fail(f"{where}.architecture", "an nnU-Net v2.4+ architecture object")
    source.fail(f"{w}plans.configurations", "free of inherits_from cycles", cfg["configuration"])


def _check_architecture(arch: Any, where: str, classes: Tuple[str, ...], source: schema.Source) -> None:
    """An :class:`Architecture`: only the networks the family builds (``classes``: its ``nnunet_networks``), and
    torch.nn classes for the ops, are accepted from a file."""
    if not isinstance(arch, dict):
        source.fail(where, _OBJECT, arch)
    schema.check_fields(arch, Architecture, source, f"{where}.", refine={
        f"{where}.network_class_name": {"choices": classes, "expected": f"one of {list(classes)}"}})
    schema.check_fields(arch["arch_kwargs"], ArchitectureArguments, source, f"{where}.arch_kwargs.")
    for key in arch.get("_kw_requires_import", []):
        schema.check(arch["arch_kwargs"].get(key, ABSENT), _OP, f"{where}.arch_kwargs.{key}", source)
