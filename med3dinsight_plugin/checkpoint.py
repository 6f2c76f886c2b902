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
"""
from __future__ import annotations

import json
import os
import pickle
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .errors import Med3DInsightError

__all__ = ["Checkpoint", "CheckpointError", "atomic_write", "load_checkpoint", "save_pretrained", "storage_id",
           "unwrap"]

FORMAT = "med3dinsight-checkpoint"
FORMAT_VERSION = 1
DEFAULT_FILENAME = "med3dinsight.safetensors"
PathLike = Union[str, os.PathLike]


class CheckpointError(Med3DInsightError):
    """A checkpoint file that cannot be read or used; the message names the file and what to do."""


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


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


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
    from . import __version__
    from .backbones import Backbone
    from .model import Med3DInsightModel

    module = unwrap(backbone_or_model)
    model = module if isinstance(module, Med3DInsightModel) else None
    backbone = unwrap(model.backbone) if model is not None else module
    if not isinstance(backbone, Backbone):
        raise CheckpointError(f"save_pretrained takes a Backbone (from build_backbone) or a Med3DInsightModel, got "
                              f"{type(module).__name__}")
    parts = {"network": unwrap(backbone.network), "reconstruction_head": backbone.reconstruction_head}
    if model is not None:
        parts.update(psat=model.psat, loss=model.loss)
    tensors, aliases = _dedup({f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "backbone": backbone.config, "network_class": _qualname(unwrap(backbone.network)),
        "in_channels": backbone.in_channels, "patch_size": list(backbone.patch_size),
        "encoder_prefixes": list(backbone.encoder_prefixes), "adaptation_plan": adaptation_plan(backbone),
        "aliases": aliases,
    }
    if model is not None:
        meta["psat"] = model.psat.config
        meta["alignment"] = {"type": model.loss.alignment, "embed_dim": model.loss.embed_dim,
                             "weights": model.loss.weights}
    for key, value in metadata.items():
        if key in meta:
            raise CheckpointError(f"metadata key {key!r} is reserved by the checkpoint format; choose another name")
        meta[key] = value
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    atomic_write(path, lambda tmp: _save_safetensors(tensors, tmp, {"med3dinsight": header}))
    return path


def adaptation_plan(backbone) -> Dict[str, Any]:
    """nnssl's ``nnssl_adaptation_plan`` fields for a backbone (architecture, channels, patch, weight locations)."""
    cfg = backbone.config
    if cfg["name"] == "nnunet":
        arch = backbone.architecture
        architecture = {"arch_class_name": arch["network_class_name"].rsplit(".", 1)[-1],
                        "arch_kwargs": arch["arch_kwargs"],
                        "arch_kwargs_requiring_import": list(arch.get("_kw_requires_import", []))}
    else:
        architecture = {"arch_class_name": type(unwrap(backbone.network)).__name__,
                        "arch_kwargs": cfg.get("network_kwargs", {}), "arch_kwargs_requiring_import": []}
    return {
        "architecture_plans": architecture,
        "pretrain_plan": getattr(backbone, "plans_configuration", None),
        "pretrain_num_input_channels": backbone.in_channels,
        "recommended_downstream_patchsize": list(backbone.patch_size),
        "key_to_encoder": backbone.key_to_encoder,
        "key_to_stem": backbone.key_to_stem,
        "keys_to_in_proj": list(backbone.keys_to_in_proj),
        "key_to_lpe": backbone.key_to_lpe,
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


def storage_id(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views: aliases (nnU-Net's decoder.encoder.*) share it."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _save_safetensors(tensors, filename, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(filename), metadata=metadata)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the target folder, flush it to disk and rename it into place: a crash or
    a full disk leaves the old file (or none), never a half-written one."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: the folder {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        open(tmp, "xb").close()  # exclusive create: the permissions the umask gives a new file...
        mode = tmp.stat().st_mode & 0o777
        write(str(tmp))
        os.chmod(tmp, mode)  # ...kept even by writers that recreate the file as 0600 (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    except Exception as e:  # writers wrap I/O errors in their own types (safetensors: SafetensorError)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"cannot write {path}: {reason}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------------- loading

def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint of this package or a foreign weight file, without executing anything in it.

    Raises:
        CheckpointError: missing, truncated or unknown file, or one that needs arbitrary unpickling.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(f"{path} is a folder with {len(candidates)} .safetensors files; pass the file")
        path = candidates[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):  # torch zip or legacy pickle
        return _from_torch_file(path)
    return _from_safetensors(path)  # 8-byte header length, then the JSON header


def _from_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is neither a safetensors file nor a torch checkpoint, or it is truncated "
                              f"({e}); re-save or re-download it") from None
    if "med3dinsight" not in header:  # a plain safetensors state dict (e.g. from another project)
        return Checkpoint(tensors, source_format="state_dict", path=path)
    try:
        meta = json.loads(header["med3dinsight"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has a corrupt med3dinsight metadata header; re-save the checkpoint") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is format {meta.get('format')} v{meta.get('format_version')}; this "
                              f"med3dinsight reads {FORMAT} up to v{FORMAT_VERSION}: upgrade the package")
    for alias, key in meta.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = tensor
    network = parts.pop("network", {})
    return Checkpoint(network, meta, "med3dinsight", tuple(meta.get("encoder_prefixes", ())) or None, parts, path)


_CONVERT_HINT = ("if you trust it, convert it once in a separate Python session: "
                 "sd = torch.load(PATH, weights_only=False); "
                 "torch.save({k: v for k, v in (sd.get('state_dict') or sd.get('network_weights') or sd).items() "
                 "if isinstance(v, torch.Tensor)}, 'weights.pt')")


def _from_torch_file(path: Path) -> Checkpoint:
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: allow-list for this call only
            with torch.serialization.safe_globals(_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch 2.4
            torch.serialization.add_safe_globals(_numpy_globals())
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} needs arbitrary unpickling, which could run code, so it was not loaded "
                              f"({_first_line(e)}); {_CONVERT_HINT}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({_first_line(e)}); re-download or "
                              f"re-save it") from None
    return _interpret(obj, path)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unsafe = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (unsafe or lines or [type(e).__name__])[0][:200]


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
