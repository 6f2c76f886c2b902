"""Reading any weight file without executing it: resolving the argument to a local file, safetensors headers, the
checks every file passes (on disk, finite weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..hub import download_checkpoint, is_hub_spec
from .foreign import _first_line, _from_torch_file
from .format import Checkpoint, PathLike
from .metadata import validate_metadata

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
