"""Hugging Face Hub access for the teachers: offline detection, so a missing model fails at once, not after retries."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from ..hub import hub_offline  # shared with the checkpoint resolver; re-exported here for the teacher modules

__all__ = ["hub_offline", "pickle_files", "unsafe_pickle_message"]

SAFE_FORMATS = ("safetensors weights (e.g. model.safetensors / open_clip_model.safetensors) or a torch file that "
                "loads with torch.load(weights_only=True)")


def pickle_files(folder: Optional[Path]) -> list:
    """The pickle-based weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) directly in ``folder``, sorted."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and p.is_file())


def unsafe_pickle_message(error: BaseException, files: Iterable, what: str) -> str:
    """One line for a weight file that ``torch.load(weights_only=True)`` refused (an ``UnpicklingError``): the file,
    the foreign object it asked for, and the safe formats. Nothing in the file was run."""
    files = [str(f) for f in files]
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    holds = f" (it asks for {found.group(1)}, not only tensors)" if found else ""
    where = files[0] if len(files) == 1 else (f"one of {', '.join(files[:3])}" if files else f"the weights of {what}")
    return (f"{where} is a pickle that torch.load(weights_only=True) refuses{holds}; nothing in it was run. Use "
            f"{SAFE_FORMATS}")
