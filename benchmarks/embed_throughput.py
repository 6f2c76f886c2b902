"""Teacher embedding throughput against open_clip's raw batched forward of the same model and batch size.

Run: python benchmarks/embed_throughput.py [--model ViT-B-16] [--batch 32] [--repeats 5] [--device cpu]
                                           [--cases 4] [--shape 64 96 96]

The model is built from open_clip's own config with random weights (nothing is downloaded), saved in open_clip's
folder format and loaded back through ``ClipTeacher`` as a user's local model is. Timed alternately (medians):
  raw       ``model.encode_image`` on an already preprocessed (B, 3, S, S) float batch: the bare forward
  teacher   ``ClipTeacher.encode_images`` on B rendered uint8 slices (upload, normalisation, forward, L2 norm)
  pipeline  ``embed_dataset`` end to end on a synthetic dataset (read volumes, select, render, embed, write the
            shards), as slices per second
Ratios teacher/raw and pipeline/raw are printed as throughputs (goal >= 0.90).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from timing import alternate, sync


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (BiomedCLIP is a ViT-B/16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", nargs=3, type=int, default=[64, 96, 96])
    args = parser.parse_args()

    import open_clip

    from med3dinsight_plugin.slices import SlicePolicy
    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
    from med3dinsight_plugin.teacher.clip import ClipTeacher
    from med3dinsight_plugin.teacher.embed import embed_dataset
    from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
    from med3dinsight_plugin.volumes import open_source

    tmp = Path(tempfile.mkdtemp())
    cfg = open_clip.get_model_config(args.model)
    save_tiny_open_clip(tmp / "clip", config=cfg)
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    teacher = ClipTeacher(str(tmp / "clip"), device=args.device, precision=precision)
    model, size = teacher.model, teacher.image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.batch)]
    x = torch.randn(args.batch, 3, size, size, device=args.device)

    def raw():
        with torch.no_grad(), teacher._autocast():
            model.encode_image(x)

    r, t = alternate([raw, lambda: teacher.encode_images(images)], args.device, args.repeats)

    data = write_nnunet_raw_dataset(tmp / "raw", cases=args.cases, shape=tuple(args.shape))
    source = open_source(data)
    policy = SlicePolicy(per_plane=16)
    start = time.perf_counter()
    result = embed_dataset(source, tmp / "cache", teacher, policy, batch_size=args.batch, progress=False)
    sync(args.device)
    t_pipe = time.perf_counter() - start
    n = result.slices_embedded_here

    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {size}px, batch "
          f"{args.batch}, device {args.device}, precision {precision}")
    print(f"raw open_clip forward   {args.batch / r:8.1f} slices/s")
    print(f"ClipTeacher             {args.batch / t:8.1f} slices/s   ratio {r / t:.2f}")
    print(f"embed_dataset pipeline  {n / t_pipe:8.1f} slices/s   ratio {n / t_pipe / (args.batch / r):.2f} "
          f"({n} slices of {args.cases} volumes {tuple(args.shape)}, incl. reading, rendering, writing)")


if __name__ == "__main__":
    main()
