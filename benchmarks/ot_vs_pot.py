"""Torch partial-OT solver vs POT's ``ot.partial.entropic_partial_wasserstein``: same plan, how much faster.

Run: python benchmarks/ot_vs_pot.py [--sizes 64 256] [--repeats 5] [--device cpu]

Cost matrices are random in [0, 1] with uniform marginals, reg 0.03, mass 0.95 (the alignment loss defaults).
Three comparisons, each side called once to warm up, then timed alternately (timing.alternate, medians):
  same-iterations  both with POT's defaults (at most 1000 iterations, stopThr 1e-100: the torch solver stops when
                   the plan no longer changes at all), float64; plans must agree to 1e-9
  loss-settings    POT defaults vs the torch solver as the loss uses it (float32, stops when the plan moves
                   less than 1e-7); plans must agree to 1e-5
  pair             the loss's image + text problems: two POT calls vs one batched torch call (loss settings)
``iters`` is the torch solver's iteration count. POT runs on the CPU; ``--device cuda`` runs the torch side there.
MED3DINSIGHT_OT_COMPILE=1 times the torch.compile'd block instead of the CPU's in-place eager one.
"""
import argparse
import os
import sys

import numpy as np
import ot
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from med3dinsight_plugin.ot import entropic_partial_wasserstein  # noqa: E402
from timing import alternate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    compile_setting = os.environ.get("MED3DINSIGHT_OT_COMPILE", "auto")
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} threads, torch on "
          f"{args.device}, MED3DINSIGHT_OT_COMPILE={compile_setting}")
    print(f"{'B':>5} {'comparison':>16} {'POT s':>9} {'torch s':>9} {'speed-up':>9} {'iters':>6} {'max |dP|':>9}")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        a = np.full(n, 1.0 / n)
        M = rng.random((2, n, n))
        at64, M64 = torch.tensor(a, device=args.device), torch.tensor(M, device=args.device)
        at32, M32 = at64.float(), M64.float()
        pot_one = lambda: ot.partial.entropic_partial_wasserstein(a, a, M[0], 0.03, 0.95)
        rows = [
            ("same-iterations", pot_one,
             lambda **kw: entropic_partial_wasserstein(at64, at64, M64[0], 0.03, 0.95, **kw), 1e-9),
            ("loss-settings", pot_one,
             lambda **kw: entropic_partial_wasserstein(at32, at32, M32[0], 0.03, 0.95, stopThr=1e-7, **kw), 1e-5),
            ("pair", lambda: np.stack([ot.partial.entropic_partial_wasserstein(a, a, m, 0.03, 0.95) for m in M]),
             lambda **kw: entropic_partial_wasserstein(at32, at32, M32, 0.03, 0.95, stopThr=1e-7, **kw), 1e-5),
        ]
        for name, pot_fn, torch_fn, tol in rows:
            p, q = alternate([pot_fn, torch_fn], args.device, args.repeats)
            plan_torch, info = torch_fn(log=True)
            diff = float(np.abs(pot_fn() - plan_torch.double().cpu().numpy()).max())
            status = "" if diff <= tol else f"  PLANS DIFFER (tolerance {tol})"
            print(f"{n:>5} {name:>16} {p:>9.4f} {q:>9.4f} {p / q:>8.1f}x {info['n_iter']:>6} {diff:>9.1e}{status}",
                  flush=True)


if __name__ == "__main__":
    main()
