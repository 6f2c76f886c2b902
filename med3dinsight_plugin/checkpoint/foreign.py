"""Foreign torch files (MONAI SSL, nnU-Net, nnssl, state dicts), read with ``torch.load(weights_only=True)`` only."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .format import Checkpoint

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
