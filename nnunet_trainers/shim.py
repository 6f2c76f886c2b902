"""The environment of an ``nnUNetv2_train`` this package starts: the ``ext/`` discovery shim and the
``nnUNet_extTrainer`` value that lists it first, and the device -- computed here only (``med3dinsight nnunet-env``,
the demo and ``study`` read it).

Imports nothing of nnU-Net.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Mapping, Optional, Tuple

__all__ = ["ENV_EXT_TRAINER", "ext_trainer_path", "nnunet_device", "shim_folder", "with_shim"]

ENV_EXT_TRAINER = "nnUNet_extTrainer"  # nnU-Net (>= 2.8) imports trainer modules from the folders it lists


def shim_folder() -> str:
    """The folder ``nnUNet_extTrainer`` must list: this package's ``ext/``, wherever the package is installed.

    Returns:
        Its absolute path.
    """
    return importlib.util.find_spec("nnunet_trainers.ext").submodule_search_locations[0]


def ext_trainer_path(current: Optional[str] = None) -> str:
    """The value of ``nnUNet_extTrainer`` that lists the shim first.

    Args:
        current: the variable's present value (``os.pathsep``-separated folders), or ``None``.

    Returns:
        The shim, then the other folders of ``current`` in their order (empty entries and the shim itself left
        out), joined with ``os.pathsep``.
    """
    shim = shim_folder()
    others = [p for p in (current or "").split(os.pathsep) if p and p != shim]
    return os.pathsep.join([shim, *others])


def with_shim(env: Mapping[str, str]) -> Dict[str, str]:
    """A copy of ``env`` (e.g. a subprocess's environment) whose ``nnUNet_extTrainer`` lists the shim first.

    Args:
        env: an environment mapping; not modified.

    Returns:
        The new environment.
    """
    return {**env, ENV_EXT_TRAINER: ext_trainer_path(env.get(ENV_EXT_TRAINER))}


def nnunet_device(device: str, env: Mapping[str, str]) -> Tuple[str, Dict[str, str]]:
    """``nnUNetv2_train``'s ``-device`` for one of the package's device names, and the environment that goes with it.

    nnU-Net takes ``cuda`` or ``cpu`` (and trains on the first visible GPU), so ``cuda:N`` becomes ``cuda`` with
    ``CUDA_VISIBLE_DEVICES`` narrowed to GPU N (of those ``env`` already makes visible); on the CPU nnU-Net's data
    augmentation runs in the main process (``nnUNet_n_proc_DA=0``) unless ``env`` says otherwise.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` resolved before).
        env: the environment to start from; not modified.

    Returns:
        ``(device for -device, the new environment)``.
    """
    env = dict(env)
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (colon and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"not a device for nnU-Net: {device!r} (cpu, cuda or cuda:N)")
    if index:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible and int(index) < len(visible) else index
    if kind == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
    return kind, env
