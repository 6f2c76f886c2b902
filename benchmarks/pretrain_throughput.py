"""Aligned slices per second of training with the cached teacher (K slices per volume) against the authors' design,
and the data loader's rate against what a training step consumes.

Run: python benchmarks/pretrain_throughput.py [--backbone swin_unetr] [--patch 64] [--batch 2] [--slices 8]
                                               [--teacher ViT-B-16] [--repeats 3] [--workers 2] [--device cpu]

Same backbone, PSAT and loss on both sides, timed alternately in one process (medians):
  cached    one training step on K slices per volume whose teacher embeddings come from the cache
  authors   one training step on 1 slice per volume with an open_clip teacher of BiomedCLIP's size (ViT-B/16 image
            tower + 12-layer text tower, random weights) embedding the slice and its caption inside the step
Printed: aligned slices/s of each and their ratio (goal >= 6), then loader batches/s from the real
PretrainDataset (memory-mapped cache, prepared volumes, augmentation) with ``--workers`` processes, over the
steps/s of the cached step (goal >= 2).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from timing import alternate




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="swin_unetr")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--teacher", default="ViT-B-16")
    parser.add_argument("--psat", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import open_clip

    from med3dinsight_plugin import Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone
    from med3dinsight_plugin.alignment import Med3DInsightLoss

    dev, b, k = args.device, args.batch, args.slices
    kwargs = {"feature_size": 12} if args.backbone == "swin_unetr" else {}
    backbone = build_backbone(args.backbone, patch_size=(args.patch,) * 3, **kwargs)
    teacher = open_clip.create_model(args.teacher, pretrained=None).to(dev).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(args.teacher)
    width = teacher.text_projection.shape[1] if hasattr(teacher, "text_projection") else 512
    psat = PlaneSliceAwareTransformer.from_preset(args.psat, in_dim=backbone.token_dim, out_dim=width)
    model = Med3DInsightModel(backbone, psat, Med3DInsightLoss("ot", embed_dim=width)).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vol = torch.randn(b, 1, *(args.patch,) * 3, device=dev)
    norm = lambda t: torch.nn.functional.normalize(t, dim=-1)
    cached = {"plane": torch.randint(0, 3, (b, k), device=dev), "position": torch.rand(b, k, device=dev),
              "image_emb": norm(torch.randn(b, k, width, device=dev)), "text_emb": norm(torch.randn(b, k, width, device=dev))}
    slices = torch.randn(b, 3, 224, 224, device=dev)
    tokens = tokenizer(["axial CT slice showing the liver and the right kidney with no focal lesion"] * b).to(dev)

    def step(**batch):
        out = model(vol, **batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_cached():
        step(**cached)

    def step_authors():
        with torch.no_grad():
            img, txt = norm(teacher.encode_image(slices)), norm(teacher.encode_text(tokens))
        step(plane=torch.randint(0, 3, (b,), device=dev), position=torch.rand(b, device=dev), image_emb=img,
             text_emb=txt)

    c, a = alternate([step_cached, step_authors], dev, args.repeats)
    print(f"{args.backbone} patch {args.patch}^3, batch {b}, PSAT {args.psat}, device {dev}; authors' teacher "
          f"{args.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M params)")
    print(f"cached teacher, K={k}:   {b * k / c:7.2f} aligned slices/s ({c:.2f} s/step)")
    print(f"teacher in the step, K=1: {b / a:7.2f} aligned slices/s ({a:.2f} s/step)")
    print(f"ratio {(b * k / c) / (b / a):.1f}x (goal >= 6)")
    loader_rate(args, c, width)


def loader_rate(args, step_seconds, width):
    """Batches/s of the real pretraining loader (cache on disk, prepared volumes) over the step's steps/s."""
    from torch.utils.data import DataLoader

    from med3dinsight_plugin.pretrain.data import PretrainDataset, compute_normalization, prepare_volumes
    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
    from med3dinsight_plugin.teacher.cache import TeacherCache, settings_hash, write_manifest, write_shard
    from med3dinsight_plugin.volumes import open_source

    tmp = Path(tempfile.mkdtemp())
    source = open_source(write_nnunet_raw_dataset(tmp / "raw", cases=8, shape=(96, 128, 128), ct=True))
    shapes = prepare_volumes(source, source.cases, tmp / "prepared", compute_normalization(source, source.cases))
    rng = np.random.default_rng(0)
    cols = {"plane": [], "index": [], "position": [], "case": []}
    for ci, case in enumerate(source.cases):
        for p in range(3):
            for idx in np.linspace(0, shapes[case][p] - 1, 16).astype(int):
                cols["plane"].append(p), cols["index"].append(idx), cols["case"].append(ci)
                cols["position"].append((idx + 0.5) / shapes[case][p])
    rows = {k: np.asarray(v) for k, v in cols.items()}
    emb = rng.normal(size=(len(rows["plane"]), width)).astype(np.float32)
    rows["image"] = rows["text"] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    settings = {"teacher": {"embed_dim": width}, "captions": {"sha256": "-"}}
    (tmp / "cache").mkdir()
    write_shard(tmp / "cache", 0, source.cases, shapes, rows, settings_hash(settings))
    write_manifest(tmp / "cache", settings, {0: source.cases})
    ds = PretrainDataset(tmp / "prepared", source.cases, shapes, TeacherCache(tmp / "cache"), (args.patch,) * 3,
                         args.slices, augment=True)
    loader = DataLoader(ds, batch_size=args.batch, sampler=range(10 ** 6), num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    it = iter(loader)
    next(it)  # start the workers
    n, start = 20, time.perf_counter()
    for _ in range(n):
        next(it)
    rate = n / (time.perf_counter() - start)
    print(f"loader ({args.workers} workers, 96x128x128 volumes, augmentation on): {rate:.1f} batches/s = "
          f"{rate * step_seconds:.1f}x what the cached step consumes (goal >= 2)")


if __name__ == "__main__":
    main()
