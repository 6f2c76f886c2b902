"""Wall-clock timing shared by the benchmark scripts (which run as ``python benchmarks/NAME.py``)."""
import time

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
