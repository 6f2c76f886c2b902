"""Data-parallel scaling of the pretraining engine: N torchrun processes against 1, same global batch.

Run: python benchmarks/ddp_scaling.py [--nproc 2] [--steps 12] [--backbone plain_conv_unet] [--patch 48]
                                      [--global-batch 4] [--threads-total 2]

Each run is the real engine (``pretrain``) on a generated in-memory dataset, gloo on CPU (NCCL on GPUs), with the
CPU threads split evenly so both runs use the same cores. Samples/s come from the run's metrics.jsonl, the first
logged interval (start-up) left out. Printed: samples/s of each and the speed-up (ideal = nproc on separate devices;
on one CPU the cores are shared, so this measures the engine's overhead: gather, all-reduce, loader).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


class SyntheticSet(torch.utils.data.Dataset):
    """Deterministic random volumes with K slices and unit teacher embeddings per sample number."""

    def __init__(self, patch, k=8, width=64):
        self.patch, self.k, self.width = patch, k, width

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        emb = torch.nn.functional.normalize(torch.randn(2, self.k, self.width, generator=g), dim=-1)
        return {"volume": torch.randn(1, *self.patch, generator=g),
                "plane": torch.randint(0, 3, (self.k,), generator=g), "position": torch.rand(self.k, generator=g),
                "image_emb": emb[0], "text_emb": emb[1]}


def worker(args):
    torch.set_num_threads(args.threads)
    from med3dinsight_plugin.pretrain import build_model, pretrain
    from med3dinsight_plugin.pretrain.config import PretrainConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = PretrainConfig.from_dict({
        "model": {"backbone": args.backbone, "patch_size": [args.patch] * 3, "psat": "small",  # the paper's loss
                  "loss_weights": {"image": 1.0, "text": 1.0}, "loss_balance": {"dense": None}},
        "data": {"num_workers": 1},
        "train": {"steps": args.steps, "batch_size": args.global_batch // world, "log_every": 2, "warmup_steps": 1,
                  "checkpoint_every": 0, "eval_every": 0},
        "output": args.out})
    model = build_model(cfg, 64)
    pretrain(cfg, model, SyntheticSet((args.patch,) * 3), progress=False)


def rate(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return sum(rates) / len(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backbone", default="plain_conv_unet")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--threads-total", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(tempfile.mkdtemp())
    results = {}
    for n in (1, args.nproc):
        out = tmp / f"n{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29600 + n), __file__, "--worker", "--out", str(out),
               "--threads", str(max(1, args.threads_total // n)),
               "--steps", str(args.steps), "--backbone", args.backbone, "--patch", str(args.patch),
               "--global-batch", str(args.global_batch)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads_total // n))},
                       capture_output=True)
        results[n] = rate(out)
    print(f"{args.backbone} {args.patch}^3, global batch {args.global_batch}, {args.threads_total} CPU threads in all")
    for n, r in results.items():
        print(f"{n} process(es): {r:.2f} samples/s")
    print(f"speed-up {results[args.nproc] / results[1]:.2f}x with {args.nproc} processes")


if __name__ == "__main__":
    main()
