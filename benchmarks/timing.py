"""Wall-clock timing shared by the benchmark scripts (which run as ``python benchmarks/NAME.py``)."""
import time
from contextlib import nullcontext

import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work, so that a timer measures it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds ``fn()`` takes on ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns, device: str, repeats: int):
    """Median seconds of each function, after one warm-up call each, timed in turn ``repeats`` times so that the
    machine's drift affects all alike."""
    import statistics

    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn, device))
    return [statistics.median(ts) for ts in times]


def autocast(device: str, amp: str = "off"):
    """The autocast context of a training step: ``amp`` is ``off``, ``bf16`` or ``fp16`` (the engine's choices)."""
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def reset_peak_memory(device: str) -> None:
    """Start a new peak of allocated CUDA memory (nothing on CPU)."""
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: str):
    """Peak allocated CUDA memory since :func:`reset_peak_memory`, in GiB; ``None`` on CPU."""
    if not str(device).startswith("cuda"):
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30
