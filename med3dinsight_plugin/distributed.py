"""One way to join torchrun's process group: validate the device, select this process's GPU, then join.

Every command that may run under ``torchrun`` (``pretrain``, ``embed``) starts here::

    from med3dinsight_plugin.distributed import init_distributed

    with init_distributed("auto", option="train.device") as ctx:   # destroys the group on exit if it made it
        if ctx.is_main:
            payload = prepare()
        payload = ctx.broadcast_object(payload if ctx.is_main else None)
        train(device=ctx.device)

The order matters under NCCL: a collective (``broadcast_object_list`` included) runs on the *current* CUDA device,
so ``torch.cuda.set_device`` must come before the first one, or every rank addresses GPU 0. :func:`init_distributed`
sets the device first, then creates the group (NCCL for CUDA, gloo for CPU) when ``WORLD_SIZE > 1`` and no group
exists yet. A group created by someone else is used, never destroyed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import Med3DInsightError, short_repr

__all__ = ["DeviceError", "DistributedContext", "init_distributed", "resolve_device"]


class DeviceError(Med3DInsightError):
    """A device that cannot be used (bad name, or CUDA asked for where there is none)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, its device, and whether it created the process group.

    Attributes:
        rank: global rank (0 when alone).
        local_rank: rank on this machine (``LOCAL_RANK``; selects the GPU).
        world_size: number of processes (1 when alone).
        device: this process's device (``cuda:LOCAL_RANK`` under torchrun with CUDA), already made current.
        owns_group: this context created the process group, and :meth:`close` destroys it.
    """
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that writes shared files)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing when alone)."""
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (a picklable, plain object; nothing to do when alone)."""
        if not self.distributed:
            return obj
        payload = [obj]
        backend = torch.distributed.get_backend()
        device = self.device if backend == "nccl" else None
        torch.distributed.broadcast_object_list(payload, src=src, device=device)
        return payload[0]

    def close(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        if self.owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> "DistributedContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_device(name: str, local_rank: int = 0, option: str = "device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` as a checked :class:`torch.device`; a bare ``cuda`` (and ``auto``
    with CUDA) is ``cuda:local_rank``. ``option`` names the setting in error messages."""
    try:
        if name == "auto":
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(name)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", local_rank)
    except (RuntimeError, TypeError):
        raise DeviceError(f"'{option}' must be auto, cpu, cuda or cuda:N, got {short_repr(name)}") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xla, ...: devices this package does not train or embed on
        raise DeviceError(f"'{option}' must be auto, cpu, cuda or cuda:N, got {short_repr(name)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"'{option}' is {short_repr(name)} but CUDA is not available; use auto or cpu")
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"'{option}' is {short_repr(name)} (process {local_rank} on this machine: {device}) "
                              f"but only {torch.cuda.device_count()} GPU(s) are visible; start fewer processes per "
                              f"node")
    return device


def init_distributed(device: str = "auto", option: str = "device") -> DistributedContext:
    """This process's :class:`DistributedContext` from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``); a single process without it.

    Validates ``device`` (:func:`resolve_device`), makes it the current CUDA device, and only then creates the
    process group -- NCCL for CUDA, gloo for CPU -- when ``WORLD_SIZE > 1`` and none exists (an existing one is
    used as it is and left alone by :meth:`DistributedContext.close`).

    Raises:
        DeviceError: a bad device name, CUDA where there is none, or more processes than GPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if initialized:  # the caller set up the group
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    resolved = resolve_device(device, local_rank, option)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # before any collective: NCCL works on the current device
    created = False
    if world > 1 and not initialized:
        torch.distributed.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        created = True
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world, device=resolved,
                              owns_group=created)
