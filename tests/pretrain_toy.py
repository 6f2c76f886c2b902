"""Run the pretraining engine on the toy dataset of helpers.py (alone or under torchrun).

Used by the subprocess tests: ``python pretrain_toy.py --set KEY=VALUE ...``; prints the summary as the last line.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from helpers import EMBED, ToyDataset  # noqa: E402
from med3dinsight_plugin.pretrain import build_model, load_config, pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per training sample")
    parser.add_argument("--maps", type=int, nargs=2, metavar=("C", "S"), help="dense targets: C channels, S x S")
    parser.add_argument("--grads", help="file to save the last step's (all-reduced) gradients to, from rank 0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None, args.overrides)
    maps = tuple(args.maps) if args.maps else None
    model = build_model(config, EMBED, map_shape=None if maps is None else (maps[0], maps[1], maps[1]))
    summary = pretrain(config, model, ToyDataset(delay=args.delay, maps=maps), ToyDataset(seed=99, length=4, maps=maps),
                       progress=False)
    if args.grads and int(os.environ.get("RANK", "0")) == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, args.grads)
    print(json.dumps(summary.to_dict()))


if __name__ == "__main__":
    main()
