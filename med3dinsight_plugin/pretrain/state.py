"""A run's training-state files (``checkpoints/last.pt`` and ``previous.pt``): saving atomically, resuming with a
fallback, refusing a state written with another configuration, and the random streams saved with them."""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..errors import first_line
from ..fileio import atomic_write
from .config import RESUMABLE_CHANGES, ConfigError, PretrainConfig, diff_configs

STATE_FORMAT = "med3dinsight-pretrain-state"


_STATE_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "rng", "config")


class _Unusable(Exception):
    """A state file that cannot be resumed from (unreadable, foreign, incomplete, non-finite); the reason."""


class _States:
    """``checkpoints/last.pt`` and the state saved before it, ``previous.pt``.

    Saving moves a good ``last.pt`` (one this run wrote or resumed from) to ``previous.pt`` and writes the new state
    atomically; resuming falls back to ``previous.pt``, with a warning, when ``last.pt`` is missing or unusable
    (truncated by a full disk, replaced by a foreign file).
    """

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank
        self.last, self.previous = folder / "last.pt", folder / "previous.pt"
        self.rotate = False  # last.pt is known good: keep it as previous.pt when writing the next one
        self.saved_step: Optional[int] = None  # the step of the newest good state on disk

    def resume(self, config: PretrainConfig, device: torch.device) -> Optional[Dict[str, Any]]:
        """The newest usable state, or ``None`` when there is none to resume."""
        candidates = [p for p in (self.last, self.previous) if p.is_file()]
        if not candidates:
            return None
        problems = [] if self.last.is_file() else [f"{self.last} is missing"]
        for path in candidates:
            try:
                state = _load_state(path, config, device)
            except _Unusable as e:
                problems.append(f"{path} {e}")
                continue
            if problems and self.rank == 0:
                warnings.warn(f"{'; '.join(problems)}: resuming from {path} (step {int(state['step'])}) instead",
                              stacklevel=5)
            self.rotate = path == self.last
            self.saved_step = int(state["step"])
            return state
        raise CheckpointError(f"{'; '.join(problems)}: cannot resume the run in {self.folder.parent}; move "
                              f"{self.folder} out of the way, or pass --no-resume (resume=False) to start over")

    def forget_previous(self) -> None:
        """A fresh start: drop an older run's previous.pt, so no later fallback resumes another run."""
        if self.rank == 0 and self.previous.is_file():
            self.previous.unlink()

    def save(self, model, optimizer, scheduler, scaler, step, config, world, device) -> None:
        """All ranks' RNG states gathered; rank 0 writes atomically; the others wait so nobody runs ahead."""
        rng = _get_rng(device)
        rngs = [rng]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if self.rank == 0:
            state = {"format": STATE_FORMAT, "version": 1, "step": step, "world_size": world,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                     "config": config.to_dict()}
            if hasattr(model, "loss"):  # the weights in force (model.loss_balance may have set them)
                state["loss_weights"] = dict(model.loss.weights)
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.rotate and self.last.is_file():
                self._keep_last_as_previous()
            atomic_write(self.last, lambda tmp: torch.save(state, tmp))
        self.rotate, self.saved_step = True, step
        if world > 1:
            dist.barrier()

    def _keep_last_as_previous(self) -> None:
        """previous.pt := last.pt, atomically, and last.pt stays in place (a hard link: no copy) until the new
        state replaces it; where hard links are unsupported, last.pt is moved (a crash before the new one is
        written then leaves previous.pt, which resuming falls back to)."""
        tmp = self.folder / f".previous.pt.{os.getpid()}.tmp"
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(self.last, tmp)
            os.replace(tmp, self.previous)
        except OSError:
            if tmp.exists():
                tmp.unlink()
            os.replace(self.last, self.previous)


def _load_state(path: Path, config: PretrainConfig, device: torch.device) -> Dict[str, Any]:
    """The saved training state; :class:`_Unusable` if it cannot be resumed from, :class:`ConfigError` when it was
    written with another configuration."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated zip, foreign pickle, ...: torch raises assorted types
        raise _Unusable(f"is unreadable ({type(e).__name__}: {first_line(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise _Unusable("is not a med3dinsight pretraining state")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["config"], dict):
        raise _Unusable(f"is incomplete (no {', '.join(missing) or 'model/config mapping'})")
    if not all(torch.isfinite(v).all() for v in state["model"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()):
        raise _Unusable("holds non-finite weights")
    changed = diff_configs(_with_defaults(state["config"]), config.to_dict())
    if changed:
        raise ConfigError(f"{path} was written with a different configuration ({', '.join(changed)} differ); use a "
                          f"new output folder, or resume with the same configuration (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change)")
    return state


def _with_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A saved configuration with the keys added since it was written at their defaults (which behave as before)."""
    try:
        return PretrainConfig.from_dict(saved).to_dict()
    except ConfigError:
        return saved  # a key since removed: the comparison names it


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng(device: torch.device) -> Dict[str, Any]:
    """RNG states as tensors / ints / lists, so that ``torch.load(weights_only=True)`` reads them back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def _set_rng(rng: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
