"""Describing a checkpoint from its header and tensor shapes, without reading tensor data (``med3dinsight inspect``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..fileio import storage_id
from .foreign import _from_torch_file
from .format import PathLike
from .reading import (
    _ST_DTYPES,
    _is_torch_file,
    _open_safetensors,
    _safetensors_header,
    resolve_checkpoint,
)


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
