"""Where nnU-Net finds the Med3DInsight trainers: the ``ext/`` discovery shim and the ``nnUNet_extTrainer`` value
that lists it first -- computed here only (``med3dinsight nnunet-env``, the demo and ``study`` read it).

Imports nothing of nnU-Net.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Mapping, Optional

__all__ = ["ENV_EXT_TRAINER", "ext_trainer_path", "shim_folder", "with_shim"]

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
