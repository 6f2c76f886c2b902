"""Checkpoint files: the package's own pickle-free format, and safe reading of foreign weight files.

Own format: one ``.safetensors`` file. Tensors are named ``network.<key>`` (the downstream network's own keys),
plus ``psat.*``, ``reconstruction_head.*`` and ``loss.*`` when a whole :class:`Med3DInsightModel` is saved. Tensors
that share storage (nnU-Net's decoder aliases its encoder) are stored once and re-linked on load. The safetensors
header carries the JSON metadata under ``"med3dinsight"``: package version, the backbone's ``build_backbone``
arguments, an nnssl-compatible adaptation plan, PSAT/loss settings, and whatever the caller adds (intensity
normalisation, teacher ids, plans, ...).

Foreign files -- MONAI's SwinUNETR SSL ``model_swinvit.pt``, nnU-Net ``checkpoint_*.pth``, nnssl checkpoints, plain
state dicts -- are read with ``torch.load(weights_only=True)`` only; numpy scalars and arrays (in nnU-Net's logs) are
the only globals allowed. A file that needs anything else is refused before any of it runs.

Nothing is trusted on the file's word: the med3dinsight header is validated once, at read (:func:`validate_metadata`),
so every consumer can use its keys; empty, sparse and over-declaring files are refused before their claimed sizes are
allocated; weights holding NaN or Inf are refused (:func:`check_finite`); :func:`read_checkpoint_info` describes a file
from its header without reading tensors; networks described by metadata are built under :func:`allocation_guard`.

Where a checkpoint is read, :func:`resolve_checkpoint` turns the argument into a local file: a path, a folder with one
``.safetensors`` file, or ``hf-hub:ORG/REPO[@REVISION]`` (a Hugging Face Hub repository's ``med3dinsight.safetensors``,
through huggingface_hub's cache; see :mod:`.hub`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._version import __version__
from .backbones import Backbone, backbone_family, list_backbones
from .errors import CheckpointError, short_repr
from .fileio import OutputError, atomic_write, storage_id, unwrap
from .hub import download_checkpoint, is_hub_spec
from .model import Med3DInsightModel

__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "allocation_guard", "check_finite",
           "load_checkpoint", "read_checkpoint_info", "resolve_checkpoint", "save_pretrained", "RESERVED_METADATA",
           "validate_metadata"]

FORMAT = "med3dinsight-checkpoint"
FORMAT_VERSION = 1
# Header keys save_pretrained writes itself; callers' metadata may not use them.
RESERVED_METADATA = ("format", "format_version", "package_version", "backbone", "network_class", "in_channels",
                     "patch_size", "encoder_prefixes", "adaptation_plan", "aliases", "psat", "alignment")
DEFAULT_FILENAME = "med3dinsight.safetensors"
PathLike = Union[str, os.PathLike]


@dataclass
class Checkpoint:
    """A weight file read into memory.

    Attributes:
        state_dict: the network's tensors by the network's own key names (foreign prefixes kept as found).
        metadata: this package's metadata (empty for foreign files).
        source_format: ``"med3dinsight"``, ``"monai_swin_ssl"``, ``"nnunet"``, ``"nnssl"`` or ``"state_dict"``.
        encoder_prefixes: key prefixes of ``state_dict`` that the file declares as its encoder, or ``None`` when the
            file does not say (a plain state dict).
        extras: other modules saved with the network (``psat``, ``reconstruction_head``, ``loss``).
        path: where it was read from.
    """

    state_dict: Dict[str, torch.Tensor]
    metadata: Dict[str, Any] = field(default_factory=dict)
    source_format: str = "state_dict"
    encoder_prefixes: Optional[Tuple[str, ...]] = None
    extras: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    path: Optional[Path] = None



# ---------------------------------------------------------------------------------------------------------- saving

def save_pretrained(backbone_or_model: nn.Module, path: PathLike, **metadata: Any) -> Path:
    """Write a backbone (or a whole Med3DInsightModel) to a pickle-free ``.safetensors`` checkpoint, atomically.

    Args:
        backbone_or_model: a :class:`~med3dinsight_plugin.backbones.Backbone` or :class:`Med3DInsightModel`,
            possibly wrapped in DDP or torch.compile.
        path: the file to write; an existing folder gets ``med3dinsight.safetensors`` inside it.
        **metadata: JSON-serialisable facts to keep with the weights (e.g. ``intensity_normalization``,
            ``teacher``, ``plans``, ``configuration``).

    Returns:
        The path written.
    """

    module = unwrap(backbone_or_model)
    model = module if isinstance(module, Med3DInsightModel) else None
    backbone = unwrap(model.backbone) if model is not None else module
    if not isinstance(backbone, Backbone):
        raise CheckpointError(f"save_pretrained takes a Backbone (from build_backbone) or a Med3DInsightModel, got "
                              f"{type(module).__name__}")
    parts = {"network": unwrap(backbone.network), "reconstruction_head": backbone.reconstruction_head}
    if model is not None:
        parts.update(psat=model.psat, loss=model.loss)
        if getattr(model, "dense_head", None) is not None:
            parts["dense_head"] = model.dense_head
    tensors, aliases = _dedup({f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "backbone": backbone.config, "network_class": _qualname(unwrap(backbone.network)),
        "in_channels": backbone.in_channels, "patch_size": list(backbone.patch_size),
        "encoder_prefixes": list(backbone.encoder_prefixes), "adaptation_plan": adaptation_plan(backbone, metadata),
        "aliases": aliases,
    }
    if model is not None:
        meta["psat"] = model.psat.config
        meta["alignment"] = {"type": model.loss.alignment, "embed_dim": model.loss.embed_dim,
                             "weights": model.loss.weights}
        if model.loss.text_dim is not None:  # a text space of its own (e.g. timm image + sentence-encoder text)
            meta["alignment"]["text_dim"] = model.loss.text_dim
        if getattr(model, "dense_head", None) is not None:
            head = model.dense_head
            meta["alignment"]["dense"] = {"loss": model.loss.dense_kind, "channels": head.out_dim, "size": head.size}
    for key, value in metadata.items():
        if key in meta or key in RESERVED_METADATA:
            raise CheckpointError(f"metadata key {key!r} is reserved by the checkpoint format; choose another name")
        meta[key] = value
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    try:
        atomic_write(path, lambda tmp: _save_safetensors(tensors, tmp, {"med3dinsight": header}))
    except OutputError as e:
        raise CheckpointError(str(e)) from None
    return path


def adaptation_plan(backbone, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """nnssl's ``nnssl_adaptation_plan`` for a backbone, as nnssl's ``AdaptationPlan.serialize`` writes it
    (architecture, the pretraining ``Plan``, channels, patch, weight locations).

    Args:
        backbone: the pretrained :class:`~med3dinsight_plugin.backbones.Backbone`.
        metadata: the checkpoint's other metadata (``data``, ``intensity_normalization`` of a pretraining run), from
            which the pretraining plan takes the dataset, spacing and normalisation; see :func:`nnssl_pretrain_plan`.
    """
    return {
        "architecture_plans": backbone.nnssl_architecture(),
        "pretrain_plan": nnssl_pretrain_plan(backbone, metadata),
        "pretrain_num_input_channels": backbone.in_channels,
        "recommended_downstream_patchsize": list(backbone.patch_size),
        "key_to_encoder": backbone.key_to_encoder,
        "key_to_stem": backbone.key_to_stem,
        "keys_to_in_proj": list(backbone.keys_to_in_proj),
        "key_to_lpe": backbone.key_to_lpe,
    }


# Normalisation schemes pretraining applies itself to raw images (pretrain.data._normalize), both without a mask.
_OWN_SCHEMES = ("CTNormalization", "ZScoreNormalization")


def nnssl_pretrain_plan(backbone, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``pretrain_plan`` of nnssl's adaptation plan: its ``Plan`` dataclass (``dataset_name``, ``plans_name``,
    ``original_median_spacing_after_transp``, ``image_reader_writer``, ``transpose_forward``, ``transpose_backward``,
    ``configurations``, ``experiment_planner_used``) with exactly one ``ConfigurationPlan`` (``data_identifier``,
    ``preprocessor_name``, ``spacing_style``, ``normalization_schemes``, ``use_mask_for_norm``, ``resampling_fn_data``,
    ``resampling_fn_data_kwargs``, ``resampling_fn_mask``, ``resampling_fn_mask_kwargs``, ``spacing``,
    ``patch_size``) under its spacing style's name, as nnssl's trainers keep only the configuration they used.
    nnU-Net's ``nnUNetv2_preprocess_like_nnssl`` / ``nnUNetv2_plan_like_dynamic`` read that configuration's
    ``spacing`` and ``patch_size``.

    Each field holds what the checkpoint tells, or null where it does not:

    * ``patch_size``: always, the crop the network was pretrained on.
    * From nnU-Net plans -- when the backbone was built from a dataset's plans and the pretraining data were that
      configuration's preprocessed arrays (``data``), or no ``data`` metadata says otherwise: the plans' dataset,
      plans name, median spacing, reader, transposes, planner, and the configuration's data identifier,
      preprocessor, target ``spacing`` (style ``"median"``: nnU-Net's fullres target is the dataset's median),
      normalisation and resampling (nnU-Net's ``resampling_fn_seg`` is nnssl's ``resampling_fn_mask``).
    * Raw images (``data.kind`` nifti / nnunet_raw): pretraining reads them at their own spacing, so style
      ``"noresample"``, spacing and resampling null; the scheme of ``intensity_normalization`` on every channel,
      without a mask.
    * Unknown to us, null: without plans describing the data, the planner's fields (``plans_name`` unless ``data``
      names one, ``original_median_spacing_after_transp``, ``image_reader_writer``, the transposes,
      ``experiment_planner_used``, ``data_identifier``, ``preprocessor_name``): no nnssl or nnU-Net planner prepared
      the data; without pretraining metadata either (a backbone saved by hand), also ``dataset_name``, ``spacing``
      and the normalisation. A null spacing always comes with style ``"noresample"``, the only style nnssl's
      ``ConfigurationPlan.serialize`` accepts without a spacing (nnU-Net's ``like_pretrained`` mode then keeps the
      dataset's own nnU-Net spacing).
    """
    meta = metadata if isinstance(metadata, dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    norm = meta.get("intensity_normalization") if isinstance(meta.get("intensity_normalization"), dict) else {}
    scheme = norm.get("scheme") if norm.get("scheme") in _OWN_SCHEMES else None
    cfg, channels = backbone.config, backbone.in_channels
    plans = cfg.get("plans") if isinstance(cfg.get("plans"), dict) else {}
    planned = getattr(backbone, "plans_configuration", None) if plans else None
    if planned is not None and (scheme is not None or (data and not (
            data.get("kind") == "nnunet_preprocessed" and data.get("plans_name") == plans.get("plans_name")
            and data.get("configuration") == cfg.get("configuration")))):
        planned = None  # the data were not these plans' preprocessed arrays
    planned = planned if isinstance(planned, dict) else {}
    from_plans = {k: plans.get(k) for k in ("dataset_name", "plans_name", "original_median_spacing_after_transp",
                                            "image_reader_writer", "transpose_forward", "transpose_backward",
                                            "experiment_planner_used")} if planned else {}
    spacing = planned.get("spacing")
    spacing = [float(x) for x in spacing] if isinstance(spacing, (list, tuple)) and len(spacing) == 3 else None
    if scheme is not None:
        schemes, masks = [scheme] * channels, [False] * channels
    else:
        schemes, masks = planned.get("normalization_schemes"), planned.get("use_mask_for_norm")
    root = data.get("root")
    style = "median" if spacing is not None else "noresample"
    configuration = {
        "data_identifier": planned.get("data_identifier"),
        "preprocessor_name": planned.get("preprocessor_name"),
        "spacing_style": style,
        "normalization_schemes": schemes,
        "use_mask_for_norm": masks,
        "resampling_fn_data": planned.get("resampling_fn_data"),
        "resampling_fn_data_kwargs": planned.get("resampling_fn_data_kwargs"),
        "resampling_fn_mask": planned.get("resampling_fn_seg"),
        "resampling_fn_mask_kwargs": planned.get("resampling_fn_seg_kwargs"),
        "spacing": spacing,
        "patch_size": [int(p) for p in backbone.patch_size],
    }
    return {
        "dataset_name": Path(root).name if isinstance(root, str) and root else from_plans.get("dataset_name"),
        "plans_name": data.get("plans_name") if isinstance(data.get("plans_name"), str) else
        from_plans.get("plans_name"),
        "original_median_spacing_after_transp": from_plans.get("original_median_spacing_after_transp"),
        "image_reader_writer": from_plans.get("image_reader_writer"),
        "transpose_forward": from_plans.get("transpose_forward"),
        "transpose_backward": from_plans.get("transpose_backward"),
        "configurations": {style: configuration},
        "experiment_planner_used": from_plans.get("experiment_planner_used"),
    }


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _dedup(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Keep one key per storage (safetensors refuses shared tensors); map the others to it."""
    kept: Dict[str, torch.Tensor] = {}
    seen: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for key, tensor in tensors.items():
        ident = storage_id(tensor)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            kept[key] = tensor.detach().cpu().contiguous()
    return kept, aliases



def _save_safetensors(tensors, filename, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(filename), metadata=metadata)



# --------------------------------------------------------------------------------------------------------- loading

_SPARSE_MIN_BYTES = 64 << 20  # files smaller than this are read whatever their layout on disk


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint of this package or a foreign weight file, without executing anything in it.

    Args:
        path: a file, a folder with one ``.safetensors`` file, or ``hf-hub:ORG/REPO[@REVISION]``
            (see :func:`resolve_checkpoint`).

    Returns:
        The :class:`Checkpoint`; its ``path`` is the local file read.

    Raises:
        CheckpointError: missing, empty, truncated, sparse or unknown file; one that needs arbitrary unpickling; a
            med3dinsight metadata header that does not follow the format; weights holding NaN or Inf.
    """
    path = resolve_checkpoint(path)
    _check_on_disk(path)
    if _is_torch_file(path):
        ckpt = _from_torch_file(path)
        stored = ckpt.state_dict
    else:
        ckpt, stored = _from_safetensors(path)
    check_finite(stored, path)
    return ckpt


def resolve_checkpoint(spec: PathLike) -> Path:
    """The local file a checkpoint argument names: the one resolver every entry point goes through (the loader,
    ``read_checkpoint_info``, the MONAI handler, ``nnunet-attach``, the nnU-Net trainers' plans entry and
    ``$MED3DINSIGHT_CHECKPOINT``, ``export``, ``inspect``, ``push``).

    Args:
        spec: a weight file; a folder holding exactly one ``.safetensors`` file; or ``hf-hub:ORG/REPO`` /
            ``hf-hub:ORG/REPO@REVISION``, the ``med3dinsight.safetensors`` of a Hugging Face Hub model repository,
            taken from huggingface_hub's cache (downloaded into it first unless ``HF_HUB_OFFLINE`` is set).

    Returns:
        The path of an existing, non-empty regular file (for ``hf-hub:``, inside the cache's snapshot folder).

    Raises:
        CheckpointError: one line: a missing, empty or ambiguous path; a malformed ``hf-hub:`` reference; a Hub file
            that is not in the cache offline (with the ``hf download`` command that fetches it) or not on the Hub.
    """

    path = download_checkpoint(spec) if is_hub_spec(spec) else Path(spec)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(f"{path} is a folder with {len(candidates)} .safetensors files; pass the file")
        path = candidates[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a regular file; pass the weight file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-save or re-download it")
    return path


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{")  # torch zip or legacy pickle


def _check_on_disk(path: Path) -> None:
    """Refuse a sparse file (far less on disk than its size says) before reading its declared size into memory:
    an interrupted download that reserved the full size, or a crafted file."""
    st = path.stat()
    blocks = getattr(st, "st_blocks", None)
    if blocks is not None and st.st_size > _SPARSE_MIN_BYTES and blocks * 512 < st.st_size // 8:
        raise CheckpointError(f"{path} is {st.st_size / 2**30:.1f} GiB long but only {blocks * 512 / 2**20:.1f} MiB of "
                              f"it is on disk (a sparse file: an interrupted download or copy); re-download it")


def check_finite(tensors: Dict[str, torch.Tensor], source: Any) -> None:
    """Raise :class:`CheckpointError` naming the tensors of ``source`` that hold NaN or Inf (diverged weights)."""
    bad = [key for key, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not _finite(t)]
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} tensors)" if len(bad) > 3 else "")
        raise CheckpointError(f"{source} holds NaN or Inf values in {shown}: the weights diverged; use an earlier "
                              f"checkpoint of the run, or pretrain again with a lower learning rate")


def _finite(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(1 << 24))  # bounded temporary memory


# ------------------------------------------------------------------------------------------- safetensors + metadata

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
              "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError, or safetensors' own ValueErrors on a bad header
        raise CheckpointError(f"{path} is neither a safetensors file nor a torch checkpoint, or it is truncated "
                              f"({_first_line(e)}); re-save or re-download it") from None


def _safetensors_header(f, path: Path) -> Tuple[Optional[Dict[str, Any]], list]:
    """``(validated med3dinsight metadata or None, stored tensor names)``; no tensor data is read."""
    header = f.metadata() or {}
    keys = list(f.keys())
    if "med3dinsight" not in header:  # a plain safetensors state dict (e.g. from another project)
        return None, keys
    try:
        meta = json.loads(header["med3dinsight"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has a corrupt med3dinsight metadata header; re-save the checkpoint") from None
    return validate_metadata(meta, path, keys), keys


def _from_safetensors(path: Path) -> Tuple[Checkpoint, Dict[str, torch.Tensor]]:
    """The checkpoint and its stored tensors (each once, before aliases are re-linked)."""
    from safetensors import SafetensorError

    with _open_safetensors(path) as f:
        meta, keys = _safetensors_header(f, path)  # refused here, before any tensor is read
        try:
            stored = {key: f.get_tensor(key) for key in keys}
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path} has a tensor that cannot be read ({_first_line(e)}); re-save or "
                                  f"re-download it") from None
    if meta is None:
        return Checkpoint(stored, source_format="state_dict", path=path), stored
    tensors = dict(stored)
    for alias, key in meta.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = tensor
    network = parts.pop("network", {})
    prefixes = tuple(meta.get("encoder_prefixes", ())) or None
    return Checkpoint(network, meta, "med3dinsight", prefixes, parts, path), stored


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


# ------------------------------------------------------------------------------------------------ header-only read

@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read from its header: no tensor data is read (``med3dinsight inspect``).

    Attributes:
        path, source_format, metadata, encoder_prefixes: as :class:`Checkpoint` (metadata validated).
        tensors: the network's tensors by key (aliases included): ``(shape, dtype name)``.
        values: the number of distinct network values (aliases counted once).
    """

    path: Path
    source_format: str
    metadata: Dict[str, Any]
    encoder_prefixes: Optional[Tuple[str, ...]]
    tensors: Dict[str, Tuple[Tuple[int, ...], str]]
    values: int


def read_checkpoint_info(path: PathLike) -> CheckpointInfo:
    """Describe a checkpoint from its header (safetensors) or a memory map (torch zip files) without reading the
    tensors, so that a huge or hostile file costs nothing to inspect.

    Args:
        path: as :func:`load_checkpoint` (a file, a folder, or ``hf-hub:ORG/REPO[@REVISION]``).

    Returns:
        The :class:`CheckpointInfo`.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, except that NaN/Inf values are not looked for.
    """
    import math

    path = resolve_checkpoint(path)
    if _is_torch_file(path):
        ckpt = _from_torch_file(path, mmap=True)
        shapes = {k: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in ckpt.state_dict.items()}
        distinct = {storage_id(t): t.numel() for t in ckpt.state_dict.values()}
        return CheckpointInfo(path, ckpt.source_format, ckpt.metadata, ckpt.encoder_prefixes, shapes,
                              sum(distinct.values()))
    with _open_safetensors(path) as f:
        meta, keys = _safetensors_header(f, path)
        stored = {}
        for key in keys:
            view = f.get_slice(key)
            stored[key] = (tuple(view.get_shape()), _ST_DTYPES.get(view.get_dtype(), view.get_dtype()))
    if meta is None:
        return CheckpointInfo(path, "state_dict", {}, None, stored, sum(math.prod(s) for s, _ in stored.values()))
    network = {k: v for k, v in stored.items() if k.startswith("network.")}
    values = sum(math.prod(s) for s, _ in network.values())
    network.update({k: stored[v] for k, v in meta.get("aliases", {}).items() if k.startswith("network.")})
    tensors = {k[len("network."):]: v for k, v in network.items()}
    return CheckpointInfo(path, "med3dinsight", meta, tuple(meta["encoder_prefixes"]) or None, tensors, values)


# ----------------------------------------------------------------------------------- building what a file describes

class _OverBudget(Exception):
    """Raised inside a network's constructor; deliberately not a ValueError/TypeError that builders re-wrap."""


class _AllocationGuard(TorchFunctionMode):
    """Refuses, before it happens, any allocation that takes the elements allocated so far past ``budget``: each
    tensor-creating call is first run on the meta device to learn its output size."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget, self.used, self.tripped = budget, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tripped:
            raise _OverBudget()
        n = _new_elements(func, args, kwargs)
        if n:
            self.used += n
            if self.used > self.budget:
                self.tripped = True
                raise _OverBudget()
        return func(*args, **kwargs)


def _new_elements(func, args, kwargs) -> int:
    """Elements of new memory ``func(*args, **kwargs)`` would allocate (views and in-place results excluded)."""
    from torch.utils._pytree import tree_flatten, tree_map

    name = getattr(func, "__name__", "")
    if name.startswith("__i") or name in ("__get__", "__set__", "__setitem__") or (
            name.endswith("_") and not name.endswith("__")):
        return 0  # attribute access and in-place operations allocate nothing
    inputs = set()
    try:
        if func in _constructors():
            out = func(*args, **{**kwargs, "device": "meta"})
        else:
            if not any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
                return 0

            def to_meta(a):
                if isinstance(a, torch.Tensor):
                    m = a.detach().to("meta")
                    inputs.add(id(m))
                    return m
                return a
            out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    except Exception:  # not computable on meta (data-dependent, e.g. .item()): allocates nothing of note
        return 0
    return sum(t.numel() for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor) and not t._is_view() and id(t) not in inputs)


def _constructors():
    from torch.utils._device import _device_constructors
    return _device_constructors()


@contextlib.contextmanager
def allocation_guard(ckpt: Checkpoint, factor: int = 4, slack: int = 1 << 24):
    """Build networks from ``ckpt``'s metadata inside this context: a network (or anything) whose construction
    would allocate more than ``factor`` times the values stored in the file plus ``slack`` elements is refused
    before the allocation, with a one-line :class:`CheckpointError`. A small file whose metadata claims huge widths
    or depths thus never makes its claimed network."""
    tensors = list(ckpt.state_dict.values()) + [t for part in ckpt.extras.values() for t in part.values()]
    values = sum({storage_id(t): t.numel() for t in tensors}.values())
    guard = _AllocationGuard(factor * values + slack)
    message = (f"{ckpt.path}: its metadata describes a network of more than {guard.budget / 1e6:.0f}M values, far "
               f"more than the {values / 1e6:.2f}M stored in the file, so it was not built: the metadata does not "
               f"belong to these weights; re-save the checkpoint with save_pretrained")
    try:
        with guard:
            yield
    except BaseException:
        if guard.tripped:
            raise CheckpointError(message) from None
        raise
    if guard.tripped:  # a builder swallowed the refusal
        raise CheckpointError(message)


# ------------------------------------------------------------------------------------------------- torch files

_CONVERT_HINT = ("if you trust it, convert it once in a separate Python session: "
                 "sd = torch.load(PATH, weights_only=False); "
                 "torch.save({k: v for k, v in (sd.get('state_dict') or sd.get('network_weights') or sd).items() "
                 "if isinstance(v, torch.Tensor)}, 'weights.pt')")


def _from_torch_file(path: Path, mmap: bool = False) -> Checkpoint:
    import warnings

    zipped = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format; legacy files are read
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about pickle protocols before refusing
            warnings.simplefilter("ignore")
            if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: allow-list for this call only
                with torch.serialization.safe_globals(_numpy_globals()):
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
            else:  # torch 2.4
                torch.serialization.add_safe_globals(_numpy_globals())
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} needs arbitrary unpickling, which could run code, so it was not loaded "
                              f"({_unsafe_reason(e)}); {_CONVERT_HINT}") from None
    except Exception as e:  # whatever a damaged or crafted file makes torch.load raise, it is the file's fault
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({_first_line(e)}); re-download or "
                              f"re-save it") from None
    return _interpret(obj, path)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unsafe = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (unsafe or lines or [type(e).__name__])[0][:200]


def _unsafe_reason(e: BaseException) -> str:
    """What the weights-only unpickler refused, without torch's advice to allow-list it."""
    import re

    text = " ".join(str(e).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds an object of class {found.group(1)}"
    if "Unsupported operand" in text:
        return "it is a plain pickle, not a torch.save file, or uses pickle features torch.load refuses"
    return _first_line(e)


def _numpy_globals():
    """numpy scalar / array reconstruction, as found in nnU-Net's checkpoint logs; nothing else is allowed."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())


def _interpret(obj: Any, path: Path) -> Checkpoint:
    """Recognise the layout of a torch-saved weight file."""
    if isinstance(obj, dict) and _tensor_dict(obj.get("network_weights")):
        weights = obj["network_weights"]
        if "nnssl_adaptation_plan" in obj:
            plan = obj["nnssl_adaptation_plan"] or {}
            if not isinstance(plan, dict) or not all(isinstance(plan.get(k), (str, type(None)))
                                                     for k in ("key_to_encoder", "key_to_stem")):
                raise CheckpointError(f"{path}: its nnssl_adaptation_plan must be a dict whose key_to_encoder and "
                                      f"key_to_stem are strings; re-export the checkpoint with nnssl")
            prefixes = tuple(f"{p}." for p in (plan.get("key_to_encoder"), plan.get("key_to_stem")) if p)
            return Checkpoint(weights, {"nnssl_adaptation_plan": plan}, "nnssl", prefixes or None, path=path)
        meta = {k: obj[k] for k in ("trainer_name", "current_epoch") if k in obj}
        return Checkpoint(weights, meta, "nnunet", ("encoder.",), path=path)
    if isinstance(obj, dict) and _tensor_dict(obj.get("state_dict")):
        weights = obj["state_dict"]
        if any(k.startswith("module.layers1.") or k.startswith("module.patch_embed.") for k in weights):
            # MONAI's official SwinUNETR self-supervised weights: the Swin encoder only, named without swinViT.
            return Checkpoint(weights, {}, "monai_swin_ssl", ("module.",), path=path)
        return Checkpoint(weights, {}, "state_dict", path=path)
    for key in ("model", "network", "model_state_dict"):
        if isinstance(obj, dict) and _tensor_dict(obj.get(key)):
            return Checkpoint(obj[key], {}, "state_dict", path=path)
    if _tensor_dict(obj):
        return Checkpoint(obj, {}, "state_dict", path=path)
    raise CheckpointError(f"{path} holds no recognisable weights (expected a state dict, or a dict with "
                          f"'state_dict', 'network_weights' or 'model'); pass a med3dinsight, MONAI, nnU-Net or "
                          f"nnssl checkpoint")
