"""Hugging Face Hub access for the teachers: offline detection, so a missing model fails at once, not after retries."""
from __future__ import annotations

import os

__all__ = ["hub_offline"]


def hub_offline() -> bool:
    """Whether hub downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    The variables are read here too: huggingface_hub reads them once at import, which may precede the user's setting.
    """
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)
