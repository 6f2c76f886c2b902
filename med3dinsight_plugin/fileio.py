"""Small helpers every writer and reader of the package shares: atomic writes, file digests, nested-dict diffs,
module unwrapping and parameter freezing. Torch-only; nothing here knows about checkpoints, caches or configs.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping

import torch
from torch import nn

from .errors import Med3DInsightError

__all__ = ["OutputError", "atomic_write", "atomic_write_text", "diff_keys", "freeze", "sha256_file", "storage_id",
           "unwrap"]


class OutputError(Med3DInsightError):
    """An output file cannot be written (missing folder, no permission, full disk)."""


def atomic_write(path: os.PathLike, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the target folder, flush it to disk and rename it into place: a crash or
    a full disk leaves the old file (or none), never a half-written one.

    Args:
        path: the file to (re)place.
        write: called with the temporary file's name; writes the whole content there.

    Raises:
        OutputError: the folder is missing or the write failed; the message names ``path``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: the folder {path.parent} does not exist")
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
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except Med3DInsightError:
        raise
    except Exception as e:  # writers wrap I/O errors in their own types (safetensors: SafetensorError)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise OutputError(f"cannot write {path}: {reason}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_file(path: os.PathLike, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "",
              leaves: Iterable[str] = ()) -> List[str]:
    """Dotted keys whose values differ between two nested dicts, sorted.

    Args:
        a, b: the dicts; a key missing on one side compares as ``None`` (a setting added with a ``None`` default
            matches files written before it existed).
        prefix: prepended to every key (used by the recursion).
        leaves: dotted keys compared as whole values even when both sides are dicts.
    """
    leaves = tuple(leaves)
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict) and name not in leaves:
            out += diff_keys(va, vb, f"{name}.", leaves)
        elif va != vb:
            out.append(name)
    return out


def storage_id(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views: aliases (nnU-Net's decoder.encoder.*) share it."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def freeze(module: nn.Module, names: Iterable[str]) -> List[str]:
    """Set ``requires_grad=False`` on the named parameters of ``module`` (names as ``named_parameters`` gives them),
    so that DDP need not wait for their gradients (and need not search for unused ones every step).

    Returns:
        The names frozen, in ``named_parameters`` order; names that are not parameters of ``module`` are ignored.
    """
    wanted = set(names)
    frozen = []
    for name, p in module.named_parameters():
        if name in wanted:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
