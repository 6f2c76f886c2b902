"""Pretraining configuration: nested dataclasses read from YAML plus ``--set key=value`` overrides, validated.

Every mistake is a :class:`ConfigError` of one line that names where it came from (the file or ``--set``), the dotted
key and what is expected, with a close-match suggestion for misspelt keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from ..backbones import backbone_family, list_backbones
from ..errors import Med3DInsightError, short_repr
from ..fileio import atomic_write, diff_keys
from ..psat import PSAT_PRESETS

__all__ = ["ConfigError", "DataConfig", "LossBalance", "LossWeights", "ModelConfig", "PretrainConfig", "TrainConfig",
           "check_backbone_kwargs", "diff_configs", "load_config", "save_config", "RESUMABLE_CHANGES"]

# Keys that may differ between a run and its resumption: they change how long or how verbosely it runs, not what
# a step computes (the data loader's worker count does not change the batches either).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.eval_every",
                     "data.num_workers", "output")


class ConfigError(Med3DInsightError):
    """An invalid configuration; the message names the source, the key and what is expected."""


_MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding (and so batchgenerators') takes no larger seed


def _f(default, **rules):
    """A dataclass field with validation rules in its metadata (``kind``, ``min``, ``max``, ``choices``, ...)."""
    if isinstance(default, (list, dict)):  # mutable: every config gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    """``data:`` where the volumes and teacher embeddings come from and how samples are drawn."""
    source: Optional[str] = _f(None, kind="str", optional=True)
    cache: Optional[str] = _f(None, kind="str", optional=True)
    configuration: str = _f("3d_fullres", kind="str")
    plans: str = _f("nnUNetPlans", kind="str")  # nnU-Net preprocessed sources: the plans identifier
    # nnU-Net preprocessed sources: their raw dataset (default $nnUNet_raw/<dataset_name>), as given to embed --raw
    raw: Optional[str] = _f(None, kind="str", optional=True)
    modality: str = _f("auto", kind="str")
    # crop: random patch_size crops at the volume's spacing; volume: the body box resampled to patch_size (the
    # authors' setup; the encoder sees the whole field of view the teacher saw)
    view: str = _f("crop", kind="str", choices=("crop", "volume"))
    # crop view, NIfTI / nnU-Net raw sources: resample every volume once to this voxel size (mm, canonical axes:
    # superior, posterior, left); "median": the dataset's median (nnU-Net's fingerprint target); "native": none;
    # target_spacing, when set, is used instead
    spacing: str = _f("median", kind="str", choices=("median", "native"))
    target_spacing: Optional[List[float]] = _f(None, kind="floats", length=3, above=0.0, optional=True)
    # fixed crops, each a case of its own (med3dinsight_plugin.crops): 0 = whole volumes; the teacher cache must have
    # been made with the same crops (embed --crops N --crop-mm S P L --crop-seed K); use with view: volume
    crops: int = _f(0, kind="int", min=0)
    crop_mm: Optional[List[float]] = _f(None, kind="floats", length=3, above=0.0, optional=True)
    crop_seed: int = _f(0, kind="int", min=0, max=_MAX_SEED)
    slices_per_sample: int = _f(8, kind="int", min=1)
    num_workers: int = _f(2, kind="int", min=0)
    augment: bool = _f(True, kind="bool")
    # volumes held out for the retrieval metrics (with crops: every crop of that many volumes)
    eval_cases: int = _f(4, kind="int", min=0)
    seed: int = _f(0, kind="int", min=0, max=_MAX_SEED)


@dataclass
class LossWeights:
    """``model.loss_weights:`` weight of each loss term (0 skips it)."""
    image: float = _f(1.0, kind="float", min=0.0)
    text: float = _f(1.0, kind="float", min=0.0)
    reconstruction: float = _f(1.0, kind="float", min=0.0)
    # dense distillation (med3dinsight_plugin.dense): needs a cache embedded with --feature-maps; off by default
    dense: float = _f(0.0, kind="float", min=0.0)


@dataclass
class LossBalance:
    """``model.loss_balance:`` set a term's weight before the first step so that its gradient norm on the encoder is
    this multiple of the reconstruction term's (measured on the first batch; null: the weight in loss_weights)."""
    image: Optional[float] = _f(None, kind="float", above=0.0, optional=True)
    text: Optional[float] = _f(None, kind="float", above=0.0, optional=True)
    dense: Optional[float] = _f(None, kind="float", above=0.0, optional=True)


@dataclass
class ModelConfig:
    """``model:`` backbone, PSAT and alignment (see :func:`~med3dinsight_plugin.pretrain.build_model`)."""
    backbone: str = _f("swin_unetr", kind="str")
    backbone_kwargs: Dict[str, Any] = _f({}, kind="dict")
    # None: the backbone's default (96^3 for MONAI networks; the plans' patch size for backbone nnunet)
    patch_size: Optional[List[int]] = _f(None, kind="ints", length=3, min=1, optional=True)
    in_channels: int = _f(1, kind="int", min=1)
    psat: str = _f("paper", kind="str", choices=tuple(PSAT_PRESETS))
    psat_kwargs: Dict[str, Any] = _f({}, kind="dict")
    alignment: str = _f("ot", kind="str", choices=("ot", "clip"))
    loss_weights: LossWeights = field(default_factory=LossWeights)
    loss_balance: LossBalance = field(default_factory=LossBalance)
    # dense distillation's per-location distance: cosine (1 - cos) or mse
    dense_loss: str = _f("cosine", kind="str", choices=("cosine", "mse"))
    # plain: the decoder rebuilds the whole input it sees; masked: training inputs lose a random mask_ratio of their
    # mask_block^3 blocks (set to 0, the z-scored mean) and the MSE is taken on those voxels only (Med3DInsightModel)
    reconstruction: str = _f("plain", kind="str", choices=("plain", "masked"))
    mask_ratio: float = _f(0.6, kind="float", above=0.0, below=1.0)
    mask_block: int = _f(16, kind="int", min=1)


@dataclass
class TrainConfig:
    """``train:`` optimisation, precision, and how often to log, evaluate and checkpoint."""
    steps: int = _f(10000, kind="int", min=0)
    batch_size: int = _f(2, kind="int", min=1)  # per process
    lr: float = _f(1.0e-5, kind="float", min=0.0)
    # adamw: AdamW(betas, weight_decay), decoupled weight decay; adam_l2: Adam(betas, weight_decay), the decay added
    # to the gradient (coupled L2), as the authors train; sgd: SGD with Nesterov momentum 0.99 and weight_decay as
    # L2, as nnU-Net trains (an update linear in the gradients; betas unused). CLIP's temperature is never decayed.
    optimizer: str = _f("adamw", kind="str", choices=("adamw", "adam_l2", "sgd"))
    weight_decay: float = _f(1.0e-5, kind="float", min=0.0)
    betas: List[float] = _f([0.9, 0.999], kind="floats", length=2, min=0.0, max=0.999999)
    warmup_steps: int = _f(500, kind="int", min=0)
    schedule: str = _f("cosine", kind="str", choices=("cosine", "poly", "constant"))
    min_lr_ratio: float = _f(0.0, kind="float", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, kind="float")  # <= 0: no clipping
    amp: str = _f("auto", kind="str", choices=("auto", "bf16", "fp16", "off"))
    compile: bool = _f(False, kind="bool")
    seed: int = _f(0, kind="int", min=0, max=_MAX_SEED)
    checkpoint_every: int = _f(500, kind="int", min=0)  # 0: only at the end
    log_every: int = _f(10, kind="int", min=1)
    eval_every: int = _f(500, kind="int", min=0)  # 0: only at the end
    device: str = _f("auto", kind="str")


@dataclass
class PretrainConfig:
    """The whole pretraining configuration (docs/pretraining.md gives the meaning and default of each key)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: Optional[str] = _f(None, kind="str", optional=True)  # the run folder

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable), the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "<dict>") -> "PretrainConfig":
        """Validated config from a nested dict; missing keys keep their defaults."""
        config = cls()
        _merge(config, values, "", source)
        return config


# ------------------------------------------------------------------------------------------------------ loading

def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> PretrainConfig:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: strings like ``"train.lr=3e-4"`` or ``"model.patch_size=[64,64,64]"``; the value is parsed as
            YAML, and a dotted key may reach into ``backbone_kwargs``/``psat_kwargs``.

    Returns:
        The validated :class:`PretrainConfig`.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type or range.
    """
    config = PretrainConfig()
    if path is not None:
        path = Path(path)
        try:
            values = _load_yaml(path.read_text(encoding="utf-8"), str(path))
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save the config as UTF-8 YAML") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, output), "
                              f"got {type(values).__name__}")
        _merge_checked(config, values or {}, path.name)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=3e-4), got {short_repr(item)}")
        try:
            value = _load_yaml(text, f"--set {_show_key(key)}") if text.strip() else None
        except yaml.YAMLError:
            value = text  # let the type check say what is wrong
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge_checked(config, nested, "--set")
    return config


def _merge_checked(config: PretrainConfig, values: Dict[str, Any], source: str) -> None:
    """:func:`_merge` at the top level; a value nested past Python's recursion limit is a :class:`ConfigError`."""
    try:
        _merge(config, values, "", source)
    except RecursionError:
        raise ConfigError(f"{source} nests mappings or lists too deeply to be a configuration; the config has three "
                          f"sections (data, model, train) of plain values") from None


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``, and ``<<: *name`` merges).

    A configuration has no need for them, and an alias is how a few hundred bytes describe gigabytes (anchors
    nested a few levels deep, "billion laughs"): harmless while shared, but any later walk or copy of the value
    (an error message, ``dataclasses.asdict``, saving the config) would expand it.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(event.anchor, event.start_mark)
        return super().compose_node(parent, index)


class _AliasFound(Exception):
    def __init__(self, anchor, mark):
        super().__init__(anchor)
        self.anchor, self.mark = anchor, mark


def _load_yaml(text: str, where: str) -> Any:
    """YAML without aliases; an alias is a :class:`ConfigError` naming ``where`` and the line."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{where} nests mappings or lists too deeply to be a configuration; the config has three "
                          f"sections (data, model, train) of plain values") from None
    except _AliasFound as e:
        line = f" line {e.mark.line + 1}" if e.mark is not None else ""
        raise ConfigError(f"{where}{line} uses the YAML alias *{_show_key(str(e.anchor), 40)}; aliases and anchors "
                          f"are not supported in configurations: write the value out") from None
    finally:
        loader.dispose()


def _show_key(key: str, limit: int = 80) -> str:
    """A key as written, cut to ``limit`` characters for one-line messages."""
    key = str(key)
    return key if len(key) <= limit else key[:limit - 3] + "..."


# Backbones whose builder forwards **kwargs to a network class: where its constructor's arguments come from.
# Builder arguments set elsewhere in the configuration (or by the builder itself), never in backbone_kwargs.
_SET_ELSEWHERE = {"in_channels": "model.in_channels", "patch_size": "model.patch_size",
                  "img_size": "model.patch_size"}


def backbone_arguments(name: str) -> Optional[Dict[str, Any]]:
    """The ``model.backbone_kwargs`` keys ``model.backbone`` accepts, each with its default (``inspect``'s
    ``Parameter.empty`` if required), or ``None`` where they cannot be known (a registered builder that forwards
    ``**kwargs`` to an unknown network).

    Raises:
        ConfigError: ``name`` is not a registered backbone.
    """
    import importlib

    if name not in list_backbones():
        raise ConfigError(f"unknown model.backbone {short_repr(name)}; expected one of {', '.join(list_backbones())}")
    family = backbone_family(name)
    accepted: Dict[str, Any] = {}
    signatures = [inspect.signature(family.builders[name])]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signatures[0].parameters.values()):
        if family.wrapped_network is None:
            return None
        module, cls = family.wrapped_network.rsplit(".", 1)
        signatures.append(inspect.signature(getattr(importlib.import_module(module), cls)))
    for sig in signatures:
        for arg, p in sig.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and arg not in _SET_ELSEWHERE:
                accepted.setdefault(arg, p.default)
    return accepted


def check_backbone_kwargs(model: "ModelConfig") -> None:
    """Refuse ``model.backbone_kwargs`` keys the backbone's builder (and its network's constructor) does not take,
    and nulls for arguments that have a non-null default, before any work is done.

    Raises:
        ConfigError: naming ``model.backbone_kwargs.KEY`` and the accepted keys.
    """
    accepted = backbone_arguments(model.backbone)
    for key, value in model.backbone_kwargs.items():
        where = f"model.backbone_kwargs.{_show_key(key, 60)}"
        if key in _SET_ELSEWHERE:
            raise ConfigError(f"{where} cannot be set there; set {_SET_ELSEWHERE[key]} instead")
        if accepted is None:
            continue
        if key not in accepted:
            hint = ""
            if ":" in key:  # YAML reads {a:4} (no space after the colon) as the key "a:4"
                hint = " (YAML needs a space after the colon: {a: 4}, not {a:4})"
            else:
                match = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
                hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"{where} is not an argument of backbone {model.backbone!r}{hint}; accepted: "
                              f"{', '.join(sorted(accepted))}")
        default = accepted[key]
        if value is None and default is not None and default is not inspect.Parameter.empty:
            raise ConfigError(f"{where} is null; give it a value (default {short_repr(default, 40)}) or remove it")


def save_config(config: PretrainConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML, atomically (a crash leaves the old file or none)."""

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def diff_configs(old: Dict[str, Any], new: Dict[str, Any], ignore: Iterable[str] = RESUMABLE_CHANGES) -> List[str]:
    """Dotted keys whose values differ between two ``to_dict()`` configs, except ``ignore``."""

    ignored = set(ignore)
    return [k for k in diff_keys(old, new, leaves=_WHOLE_VALUES) if k not in ignored]


# Free-form keyword sections compared as whole values.
_WHOLE_VALUES = ("model.backbone_kwargs", "model.psat_kwargs")


def _all_keys(obj, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
    return keys


def _merge(obj, values: Dict[str, Any], prefix: str, source: str, root=None) -> None:
    """Set the dataclass ``obj``'s fields from ``values``, recursing into sections; validate each value."""
    root = root if root is not None else obj
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in fields:
            match = _suggest(str(name), list(fields), prefix, _all_keys(root))
            hint = f"; did you mean '{match}'?" if match else \
                f"; expected one of: {', '.join(f'{prefix}{n}' for n in fields)}"
            raise ConfigError(f"unknown key '{_show_key(key)}' in {source}{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{_show_key(key)}' in {source} must be a mapping of keys "
                                  f"({', '.join(_all_keys(current))}), got {short_repr(value)}")
            _merge(current, value, key + ".", source, root)
        elif fields[name].metadata.get("kind") == "dict" and isinstance(value, dict) and isinstance(current, dict):
            merged = dict(current)
            _deep_update(merged, value)  # an override reaches one entry of backbone_kwargs without erasing the rest
            setattr(obj, name, _check(merged, fields[name].metadata, key, source))
        else:
            setattr(obj, name, _check(value, fields[name].metadata, key, source))


def _suggest(name: str, siblings: List[str], prefix: str, everything: List[str]) -> Optional[str]:
    """The key a misspelt ``name`` most likely meant: a sibling it extends or abbreviates (``lr_rate`` -> ``lr``),
    else the same name in another section, else the closest sibling, else the closest key anywhere."""
    lowered = name.lower()
    stems = [s for s in siblings if lowered.startswith(s + "_") or (len(lowered) >= 3 and s.startswith(lowered))]
    if stems:
        return prefix + max(stems, key=len)
    elsewhere = [k for k in everything if k.rsplit(".", 1)[-1] == lowered]
    if elsewhere:
        return elsewhere[0]
    match = difflib.get_close_matches(lowered, siblings, n=1, cutoff=0.6)
    if match:
        return prefix + match[0]
    match = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in everything], n=1, cutoff=0.8)
    return next((k for k in everything if match and k.rsplit(".", 1)[-1] == match[0]), None)


def _deep_update(target: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


def _check(value: Any, rules: Dict[str, Any], key: str, source: str) -> Any:
    """Validate (and lightly coerce) one value according to its field's rules."""
    kind = rules["kind"]

    def fail(expected: str):
        raise ConfigError(f"'{_show_key(key)}' in {source} must be {expected}, got {short_repr(value)}")

    if value is None:
        if rules.get("optional"):
            return None
        fail(_describe(rules))
    if kind == "str":
        if not isinstance(value, str):
            fail(_describe(rules))
        if "choices" in rules and value not in rules["choices"]:
            fail("one of " + ", ".join(repr(c) for c in rules["choices"]))
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind == "dict":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail("a mapping of argument names to values")
        return value
    if kind in ("int", "float"):
        number = _number(value, kind)
        if number is None or not _in_range(number, rules):
            fail(_describe(rules))
        return number
    if kind in ("ints", "floats"):
        scalar = kind[:-1]
        items = [_number(v, scalar) for v in value] if isinstance(value, (list, tuple)) else None
        if items is None or len(items) != rules["length"] or any(v is None or not _in_range(v, rules) for v in items):
            fail(_describe(rules))
        return items
    raise AssertionError(kind)


def _number(value: Any, kind: str):
    """``value`` as an int/float, or ``None``; YAML reads ``3e-4`` (no dot) as a string, so numeric strings count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind == "int":
        return int(value) if float(value).is_integer() else None
    return float(value)


def _in_range(v, rules) -> bool:
    """``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones."""
    return (("min" not in rules or v >= rules["min"]) and ("max" not in rules or v <= rules["max"])
            and ("above" not in rules or v > rules["above"]) and ("below" not in rules or v < rules["below"]))


def _describe(rules: Dict[str, Any]) -> str:
    kind = rules["kind"]
    bounds = ""
    if "min" in rules and "max" in rules:
        bounds = f" in [{rules['min']}, {rules['max']}]"
    elif "min" in rules:
        bounds = " >= 0" if rules["min"] == 0 else f" >= {rules['min']}"
    elif "above" in rules and "below" in rules:
        bounds = f" strictly between {rules['above']:g} and {rules['below']:g}"
    names = {"int": "an integer", "float": "a number", "str": "a string", "ints": "integers", "floats": "numbers"}
    text = names.get(kind, kind) + bounds
    if kind in ("ints", "floats"):
        text = f"a list of {rules['length']} {text}"
    return text + (" or null" if rules.get("optional") else "")
