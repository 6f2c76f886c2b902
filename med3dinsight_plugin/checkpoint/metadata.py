"""Validating a med3dinsight metadata header once, at read, so that every consumer can use its keys."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from ..backbones import backbone_family, list_backbones
from ..errors import CheckpointError, short_repr
from .format import FORMAT, FORMAT_VERSION


class _Bad(Exception):
    """A metadata value of the wrong type: ``(key, what it must be, the value)``."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(d: Dict[str, Any], key: str, where: str, check, what: str, required: bool = True) -> None:
    if key not in d:
        if required:
            raise _Bad(f"{where}{key}", what, _MISSING)
        return
    if not check(d[key]):
        raise _Bad(f"{where}{key}", what, d[key])


_MISSING = object()


_pos_int = lambda v: _is_int(v) and v > 0  # noqa: E731


_triple = lambda v: isinstance(v, list) and len(v) == 3 and all(_pos_int(x) for x in v)  # noqa: E731


_str_list = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731


_opt_str = lambda v: v is None or isinstance(v, str)  # noqa: E731


_is_dict = lambda v: isinstance(v, dict)  # noqa: E731


def validate_metadata(meta: Any, path: Any, stored_keys) -> Dict[str, Any]:
    """Check a med3dinsight metadata header once, at read, so that every consumer (inspect, export, attach, the
    loader, the trainers) can use its keys as the format defines them. Raises a one-line :class:`CheckpointError`
    naming the file and the key."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} has a 'med3dinsight' metadata entry that is not a {FORMAT} header (found "
                              f"{short_repr(found, 40)}); re-save the checkpoint with save_pretrained")
    try:
        _need(meta, "format_version", "", _pos_int, "a positive integer")
        if meta["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"{path} is {FORMAT} v{meta['format_version']}; this med3dinsight reads up to "
                                  f"v{FORMAT_VERSION}: upgrade the package")
        _need(meta, "package_version", "", lambda v: isinstance(v, str), "a string", required=False)
        _need(meta, "backbone", "", _is_dict, "an object (the build_backbone arguments)")
        _check_backbone(meta["backbone"])
        _need(meta, "network_class", "", lambda v: isinstance(v, str), "a string")
        _need(meta, "in_channels", "", _pos_int, "a positive integer")
        _need(meta, "patch_size", "", _triple, "three positive integers")
        _need(meta, "encoder_prefixes", "", _str_list, "a list of key prefixes (strings)")
        _need(meta, "aliases", "", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()), "an object of strings", required=False)
        stored = set(stored_keys)
        for alias, key in meta.get("aliases", {}).items():
            if key not in stored or alias in stored:
                raise _Bad(f"aliases.{alias}", "the name of another stored tensor", key)
        _need(meta, "adaptation_plan", "", _is_dict, "an object", required=False)
        plan = meta.get("adaptation_plan", {})
        for key, check, what in (("architecture_plans", _is_dict, "an object"),
                                 ("pretrain_plan", lambda v: v is None or isinstance(v, dict), "an object or null"),
                                 ("pretrain_num_input_channels", _pos_int, "a positive integer"),
                                 ("recommended_downstream_patchsize", _triple, "three positive integers"),
                                 ("key_to_encoder", _opt_str, "a string or null"),
                                 ("key_to_stem", _opt_str, "a string or null"),
                                 ("keys_to_in_proj", _str_list, "a list of strings"),
                                 ("key_to_lpe", _opt_str, "a string or null")):
            _need(plan, key, "adaptation_plan.", check, what, required=False)
        for key in ("psat", "alignment"):
            _need(meta, key, "", _is_dict, "an object", required=False)
    except _Bad as e:
        key, what, value = e.args
        got = "it is missing" if value is _MISSING else f"got {short_repr(value, 60)}"
        raise CheckpointError(f"{path}: checkpoint metadata '{key}' must be {what}, {got}; the file was edited or "
                              f"not written by med3dinsight's save_pretrained: re-save the checkpoint") from None
    return meta


def _check_backbone(cfg: Dict[str, Any]) -> None:
    import inspect

    w, names = "backbone.", list_backbones()
    _need(cfg, "name", w, lambda v: isinstance(v, str) and v in names, f"one of {names}")
    family = backbone_family(cfg["name"])
    _need(cfg, "in_channels", w, _pos_int, "a positive integer")
    _need(cfg, "patch_size", w, _triple, "three positive integers", required=False)
    _need(cfg, "network_kwargs", w, _is_dict, "an object", required=False)
    _need(cfg, "num_classes", w, _pos_int, "a positive integer", required=False)
    params = inspect.signature(family.builders[cfg["name"]]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in cfg:
            if key not in params and key not in ("name", "network_kwargs"):
                raise _Bad(f"{w}{key}", f"absent: the {cfg['name']} backbone takes no such argument", cfg[key])
    for key in ("base_features", "max_features"):
        _need(cfg, key, w, _pos_int, "a positive integer", required=False)
    _need(cfg, "spacing", w, lambda v: isinstance(v, list) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v), "three positive numbers",
        required=False)
    if cfg["name"] not in family.plans_builders:  # nnU-Net plans (or their architecture) in the file: nnU-Net
        return  # resolves their class names with pydoc.locate, so they are checked here
    classes = family.nnunet_networks
    if ("plans" in cfg) == ("architecture" in cfg):
        raise _Bad(f"{w}plans", "given, or else backbone.architecture (exactly one of them)",
                   cfg.get("plans", _MISSING))
    if "architecture" in cfg:
        _check_architecture(cfg["architecture"], f"{w}architecture", classes)
        return
    _need(cfg, "plans", w, lambda v: isinstance(v, dict) and isinstance(v.get("configurations"), dict),
          "an nnU-Net plans object with 'configurations'")
    configurations = cfg["plans"]["configurations"]
    _need(cfg, "configuration", w, lambda v: isinstance(v, str) and v in configurations,
          f"one of the plans' configurations {sorted(map(str, configurations))[:6]}")
    name = cfg["configuration"]
    for _ in range(len(configurations) + 1):  # follow nnU-Net's inherits_from to the configuration's architecture
        where = f"{w}plans.configurations.{name}"
        config = configurations.get(name)
        if not isinstance(config, dict):
            raise _Bad(where, "an object", config)
        if "architecture" in config:
            _check_architecture(config["architecture"], f"{where}.architecture", classes)
            return
        name = config.get("inherits_from")
        if name is None:
            raise _Bad(f"{where}.architecture", "an nnU-Net v2.4+ architecture object", _MISSING)
    raise _Bad(f"{w}plans.configurations", "free of inherits_from cycles", cfg["configuration"])


def _check_architecture(arch: Any, where: str, classes: Tuple[str, ...]) -> None:
    """nnU-Net resolves class names of an architecture with pydoc.locate, which imports modules: only the networks
    the family builds (``classes``: its ``nnunet_networks``), and torch.nn classes for the ops, are accepted from a
    file."""
    if not isinstance(arch, dict):
        raise _Bad(where, "an object", arch)
    _need(arch, "network_class_name", f"{where}.", lambda v: v in classes, f"one of {list(classes)}")
    _need(arch, "arch_kwargs", f"{where}.", _is_dict, "an object")
    _need(arch, "_kw_requires_import", f"{where}.", _str_list, "a list of strings", required=False)
    kwargs, w = arch["arch_kwargs"], f"{where}.arch_kwargs."
    _need(kwargs, "features_per_stage", w, lambda v: isinstance(v, list) and v and all(_pos_int(x) for x in v),
          "a list of positive integers")
    _need(kwargs, "strides", w, lambda v: isinstance(v, list) and v and all(
        _pos_int(x) or (isinstance(x, list) and len(x) == 3 and all(_pos_int(y) for y in x)) for x in v),
        "a list of strides (positive integers or three of them)")
    for key in arch.get("_kw_requires_import", []):
        _need(arch["arch_kwargs"], key, f"{where}.arch_kwargs.", lambda v: v is None or (
            isinstance(v, str) and v.startswith("torch.nn.")), "null or a torch.nn class name", required=False)
