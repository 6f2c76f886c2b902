"""Torch partial-OT solver vs POT's ``ot.partial.entropic_partial_wasserstein``: same plan, how much faster.

Run: python benchmarks/ot_vs_pot.py [--sizes 64 256] [--repeats 5]

Cost matrices are random in [0, 1] with uniform marginals, reg 0.03, mass 0.95 (the alignment loss defaults).
Three comparisons, timed alternately in one run (medians):
  same-iterations  both run POT's defaults (1000 iterations), float64; plans must agree to 1e-9
  loss-settings    POT defaults vs the torch solver as the loss uses it (float32, stops when the plan moves
                   less than 1e-7); plans must agree to 1e-5
  pair             the loss's image + text problems: two POT calls vs one batched torch call (loss settings)
"""
import argparse
import statistics
import time

import numpy as np
import ot
import torch

from med3dinsight_plugin.ot import entropic_partial_wasserstein


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} threads")
    print(f"{'B':>5} {'comparison':>16} {'POT s':>9} {'torch s':>9} {'speed-up':>9} {'max |dP|':>9}")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        a = np.full(n, 1.0 / n)
        M = rng.random((2, n, n))
        at64, M64 = torch.tensor(a), torch.tensor(M)
        at32, M32 = at64.float(), M64.float()
        pot_one = lambda: ot.partial.entropic_partial_wasserstein(a, a, M[0], 0.03, 0.95)
        rows = [
            ("same-iterations", pot_one, lambda: entropic_partial_wasserstein(at64, at64, M64[0], 0.03, 0.95), 1e-9),
            ("loss-settings", pot_one,
             lambda: entropic_partial_wasserstein(at32, at32, M32[0], 0.03, 0.95, stopThr=1e-7), 1e-5),
            ("pair", lambda: np.stack([ot.partial.entropic_partial_wasserstein(a, a, m, 0.03, 0.95) for m in M]),
             lambda: entropic_partial_wasserstein(at32, at32, M32, 0.03, 0.95, stopThr=1e-7), 1e-5),
        ]
        for name, pot_fn, torch_fn, tol in rows:
            t_pot, t_torch = [], []
            for _ in range(args.repeats):  # alternate, so machine noise hits both sides alike
                t, plan_pot = timed(pot_fn, 1)
                t_pot.append(t)
                t, plan_torch = timed(torch_fn, 1)
                t_torch.append(t)
            diff = float(np.abs(plan_pot - plan_torch.double().numpy()).max())
            p, q = statistics.median(t_pot), statistics.median(t_torch)
            status = "" if diff <= tol else f"  PLANS DIFFER (tolerance {tol})"
            print(f"{n:>5} {name:>16} {p:>9.4f} {q:>9.4f} {p / q:>8.1f}x {diff:>9.1e}{status}")


if __name__ == "__main__":
    main()
