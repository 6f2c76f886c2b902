"""Pretraining configuration: nested dataclasses read from YAML plus ``--set key=value`` overrides, validated.

Each key is a :func:`~med3dinsight_plugin.schema.setting`: its default, its rules and its meaning in one place
(:func:`describe_config`, ``med3dinsight pretrain --print-config``, lists them all). Every mistake is a
:class:`ConfigError` of one line that names where it came from (the file or ``--set``), the dotted key and what is
expected, with a close-match suggestion for misspelt keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from .. import schema
from ..backbones import backbone_family, list_backbones
from ..errors import Med3DInsightError, cut, short_repr
from ..fileio import atomic_write, diff_keys
from ..psat import PSAT_PRESETS
from ..schema import setting

__all__ = ["ConfigError", "DataConfig", "LossBalance", "LossWeights", "ModelConfig", "PretrainConfig", "TrainConfig",
           "check_backbone_kwargs", "describe_config", "diff_configs", "load_config", "save_config",
           "RESUMABLE_CHANGES"]

# Keys that may differ between a run and its resumption: they change how long or how verbosely it runs, not what
# a step computes (the data loader's worker count does not change the batches either).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.eval_every",
                     "data.num_workers", "output")


class ConfigError(Med3DInsightError):
    """An invalid configuration; the message names the source, the key and what is expected."""


_MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding (and so batchgenerators') takes no larger seed


@dataclass
class DataConfig:
    """``data:`` where the volumes and teacher embeddings come from and how samples are drawn."""
    source: Optional[str] = setting(None, "the volumes: a NIfTI folder, an nnU-Net raw or preprocessed dataset "
                                          "(--data)", kind="str", nullable=True)
    cache: Optional[str] = setting(None, "the teacher cache from med3dinsight embed (--cache)", kind="str",
                                   nullable=True)
    configuration: str = setting("3d_fullres", "nnU-Net preprocessed sources: the configuration", kind="str")
    plans: str = setting("nnUNetPlans", "nnU-Net preprocessed sources: the plans identifier", kind="str")
    raw: Optional[str] = setting(None, "nnU-Net preprocessed sources: their raw dataset (default "
                                       "$nnUNet_raw/<dataset_name>), as given to embed --raw", kind="str",
                                 nullable=True)
    modality: str = setting("auto", "auto, ct or mri: how volumes are normalised (auto: nnU-Net's dataset.json "
                                    "channel name, else guessed from the intensities)", kind="str")
    view: str = setting("crop", "crop: random patch_size crops at the volume's spacing; volume: the body box "
                                "resampled to patch_size (the authors' setup: the whole field of view the teacher "
                                "saw)", kind="str", choices=("crop", "volume"))
    spacing: str = setting("median", "crop view of NIfTI / nnU-Net raw sources: resample every volume once to the "
                                     "dataset's median voxel size (nnU-Net's target); native: not at all",
                           kind="str", choices=("median", "native"))
    target_spacing: Optional[List[float]] = setting(None, "[S, P, L] voxel size in mm (superior, posterior, left) "
                                                          "to resample to, used instead of data.spacing",
                                                    kind="floats", length=3, above=0.0, nullable=True)
    crops: int = setting(0, "fixed crops per volume, each a case of its own (0: whole volumes); as embed --crops "
                            "made the cache; use with data.view: volume", kind="int", min=0)
    crop_mm: Optional[List[float]] = setting(None, "the crops' size [S, P, L] in mm, as embed --crop-mm",
                                             kind="floats", length=3, above=0.0, nullable=True)
    crop_seed: int = setting(0, "the seed that placed the crops, as embed --crop-seed", kind="int", min=0,
                             max=_MAX_SEED)
    slices_per_sample: int = setting(8, "K: cached slices per sample", kind="int", min=1)
    num_workers: int = setting(2, "data loader worker processes (0: load in the training process)", kind="int",
                               min=0)
    augment: bool = setting(True, "nnU-Net's intensity augmentations", kind="bool")
    eval_cases: int = setting(4, "volumes held out for the retrieval metrics (with crops: every crop of that many "
                                 "volumes)", kind="int", min=0)
    seed: int = setting(0, "seed of the held-out split and of the samples", kind="int", min=0, max=_MAX_SEED)


@dataclass
class LossWeights:
    """``model.loss_weights:`` weight of each loss term (0 skips it)."""
    image: float = setting(0.0, "weight of the paper's slice-image alignment term (0 skips it; 0 by default: it did "
                                "not help in docs/simulation.md's teacher protocol)", kind="float", min=0.0)
    text: float = setting(0.0, "weight of the paper's caption-text alignment term (0 skips it; 0 by default: it did "
                               "not help in docs/simulation.md's teacher protocol)", kind="float", min=0.0)
    reconstruction: float = setting(1.0, "weight of the reconstruction term (0 skips it)", kind="float", min=0.0)
    dense: float = setting(0.0, "weight of dense distillation (med3dinsight_plugin.dense; needs a cache embedded "
                                "with --feature-maps; 0 skips it)", kind="float", min=0.0)


@dataclass
class LossBalance:
    """``model.loss_balance:`` set a term's weight before the first step so that its gradient norm on the encoder is
    this multiple of the reconstruction term's (measured on the first batch; null: the weight in loss_weights)."""
    image: Optional[float] = setting(None, "image term's encoder gradient norm as a multiple of reconstruction's, "
                                           "set at step 0 (null: loss_weights.image)", kind="float", above=0.0,
                                     nullable=True)
    text: Optional[float] = setting(None, "text term's encoder gradient norm as a multiple of reconstruction's, set "
                                          "at step 0 (null: loss_weights.text)", kind="float", above=0.0,
                                    nullable=True)
    dense: Optional[float] = setting(0.5, "dense term's encoder gradient norm as a multiple of reconstruction's, "
                                          "set at step 0 (null: loss_weights.dense); 0.5 by default, the recipe "
                                          "that helped in docs/simulation.md's teacher protocol", kind="float",
                                     above=0.0, nullable=True)


@dataclass
class ModelConfig:
    """``model:`` backbone, PSAT and alignment (see :func:`~med3dinsight_plugin.pretrain.build_model`)."""
    backbone: str = setting("swin_unetr", "the backbone: swin_unetr, unetr, nnunet, plain_conv_unet, resenc_unet "
                                          "(--backbone)", kind="str")
    backbone_kwargs: Dict[str, Any] = setting({}, "arguments of the backbone network's constructor (checked against "
                                                  "it before any volume is prepared)", kind="dict")
    patch_size: Optional[List[int]] = setting(None, "input patch [S, P, L] in voxels; null: the backbone's default "
                                                    "(96^3 for MONAI networks; the plans' patch size for nnunet)",
                                              kind="ints", length=3, min=1, nullable=True)
    in_channels: int = setting(1, "input channels", kind="int", min=1)
    psat: str = setting("paper", "the PSAT preset: paper (6 layers, 768 wide, 300 queries) or small", kind="str",
                        choices=tuple(PSAT_PRESETS))
    psat_kwargs: Dict[str, Any] = setting({}, "PSAT arguments that change the preset", kind="dict")
    alignment: str = setting("ot", "ot (partial optimal transport) or clip (InfoNCE)", kind="str",
                             choices=("ot", "clip"))
    loss_weights: LossWeights = setting(LossWeights, "weight of each loss term (0 skips it)")
    loss_balance: LossBalance = setting(LossBalance, "set a term's weight from its gradient on the encoder at step 0 "
                                                     "(null: the weight in loss_weights)")
    dense_loss: str = setting("cosine", "dense distillation's distance per location: cosine (1 - cos) or mse",
                              kind="str", choices=("cosine", "mse"))
    reconstruction: str = setting("plain", "plain: the decoder rebuilds the whole input; masked: inputs lose "
                                           "mask_ratio of their mask_block^3 blocks (set to 0) and only those are "
                                           "rebuilt (MAE-style)", kind="str", choices=("plain", "masked"))
    mask_ratio: float = setting(0.6, "masked reconstruction: the share of blocks set to 0", kind="float", above=0.0,
                                below=1.0)
    mask_block: int = setting(16, "masked reconstruction: the edge of a block in voxels", kind="int", min=1)


@dataclass
class TrainConfig:
    """``train:`` optimisation, precision, and how often to log, evaluate and checkpoint."""
    steps: int = setting(10000, "optimizer steps (--steps)", kind="int", min=0)
    batch_size: int = setting(2, "volumes per step and process", kind="int", min=1)
    lr: float = setting(1.0e-5, "peak learning rate", kind="float", min=0.0)
    optimizer: str = setting("adamw", "adamw: decoupled weight decay; adam_l2: Adam with the decay added to the "
                                      "gradient (the authors'); sgd: nnU-Net's, Nesterov momentum 0.99, L2 decay",
                             kind="str", choices=("adamw", "adam_l2", "sgd"))
    weight_decay: float = setting(1.0e-5, "weight decay (CLIP's temperature is never decayed)", kind="float",
                                  min=0.0)
    betas: List[float] = setting([0.9, 0.999], "Adam's betas (sgd: unused)", kind="floats", length=2, min=0.0,
                                 max=0.999999)
    warmup_steps: int = setting(500, "linear warm-up steps (the first step already uses lr/warmup_steps, never 0)",
                                kind="int", min=0)
    schedule: str = setting("cosine", "after the warm-up: cosine or poly (power 0.9) decay to min_lr_ratio x lr at "
                                      "train.steps, or constant", kind="str", choices=("cosine", "poly", "constant"))
    min_lr_ratio: float = setting(0.0, "the learning rate cosine / poly decay ends at, as a fraction of lr",
                                  kind="float", min=0.0, max=1.0)
    grad_clip: float = setting(1.0, "gradient-norm clipping; <= 0: none", kind="float")
    amp: str = setting("auto", "auto (bf16 on a CUDA GPU that has it, else off), bf16, fp16 or off", kind="str",
                       choices=("auto", "bf16", "fp16", "off"))
    compile: bool = setting(False, "torch.compile the model (ignored on CPU)", kind="bool")
    seed: int = setting(0, "seed of the initial weights, dropout and the loader", kind="int", min=0, max=_MAX_SEED)
    checkpoint_every: int = setting(500, "steps between training-state saves (0: only at the end)", kind="int",
                                    min=0)
    log_every: int = setting(10, "steps between log lines (each also measures every term's encoder gradient)",
                             kind="int", min=1)
    eval_every: int = setting(500, "steps between held-out evaluations (0: only at the end)", kind="int", min=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (--device)", kind="str")


@dataclass
class PretrainConfig:
    """The whole pretraining configuration: every key with its default and meaning is in :func:`describe_config`
    (``med3dinsight pretrain --print-config``) and docs/pretraining.md."""
    data: DataConfig = setting(DataConfig, "where the volumes and teacher embeddings come from and how samples are "
                                           "drawn")
    model: ModelConfig = setting(ModelConfig, "backbone, PSAT, alignment and the loss terms")
    train: TrainConfig = setting(TrainConfig, "optimisation, precision, and how often to log, evaluate and "
                                              "checkpoint")
    output: Optional[str] = setting(None, "the run folder (-o)", kind="str", nullable=True)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable), the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "<dict>") -> "PretrainConfig":
        """Validated config from a nested dict; missing keys keep their defaults."""
        config = cls()
        schema.merge(config, values, _source(source))
        return config


def _source(name: str) -> schema.Source:
    """Values read from ``name`` (a file name, ``--set``): text-read, each mistake a one-line :class:`ConfigError`."""
    return schema.Source(name, ConfigError)


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
            value = _load_yaml(text, f"--set {cut(key)}") if text.strip() else None
        except yaml.YAMLError:
            value = text  # let the type check say what is wrong
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge_checked(config, nested, "--set")
    return config


def _merge_checked(config: PretrainConfig, values: Dict[str, Any], source: str) -> None:
    """:func:`schema.merge` at the top level; a value nested past Python's recursion limit is a :class:`ConfigError`."""
    try:
        schema.merge(config, values, _source(source))
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
        raise ConfigError(f"{where}{line} uses the YAML alias *{cut(str(e.anchor), 40)}; aliases and anchors "
                          f"are not supported in configurations: write the value out") from None
    finally:
        loader.dispose()


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
        where = f"model.backbone_kwargs.{cut(key, 60)}"
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


# Free-form keyword sections (the dict settings: backbone_kwargs, psat_kwargs) compared as whole values.
_WHOLE_VALUES = tuple(e.key for e in schema.entries(PretrainConfig) if e.rules.kind == "dict")


# ------------------------------------------------------------------------------------------------------- listing

def describe_config(config: Optional[PretrainConfig] = None) -> str:
    """Every key of ``config`` (default: the defaults) with its value and meaning, as YAML a user can save, edit and
    pass back with ``--config`` (``load_config`` of it gives ``config``): ``med3dinsight pretrain --print-config``.

    Each key is preceded by a comment naming it dotted, as ``--set`` takes it, and saying what it means.
    """
    config = config if config is not None else PretrainConfig()
    lines = ["# med3dinsight pretraining configuration: every key, its value and its meaning. Save it, edit it and",
             "# pass it back with --config FILE; --set KEY=VALUE takes the dotted names below."]
    for entry in schema.entries(config):
        depth = entry.key.count(".")
        indent, name = "  " * depth, entry.key.rsplit(".", 1)[-1]
        if depth == 0:
            lines.append("")  # a blank line before each top-level key
        lines.append(f"{indent}# {entry.key}: {entry.rules.help}")
        lines.append(f"{indent}{name}:" if entry.rules.kind == "section" else
                     f"{indent}{name}: {_yaml_value(entry.value)}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (flow style) that reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text
