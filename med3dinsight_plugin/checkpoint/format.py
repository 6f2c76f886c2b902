"""The med3dinsight checkpoint format (one ``.safetensors`` file with a JSON metadata header) and writing it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .._version import __version__
from ..backbones import Backbone
from ..errors import CheckpointError
from ..fileio import OutputError, atomic_write, storage_id, unwrap
from ..model import Med3DInsightModel
from .plans import adaptation_plan

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
