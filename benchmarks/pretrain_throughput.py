"""Aligned slices per second of training with the cached teacher (K slices per volume) against the authors' design,
and the data loader's rate against what a training step consumes.

Run: python benchmarks/pretrain_throughput.py [--backbone swin_unetr] [--patch 64] [--batch 2] [--slices 8]
                                               [--teacher ViT-B-16] [--repeats 3] [--workers 2] [--device cpu]
                                               [--amp off|bf16|fp16]

Same backbone, PSAT and loss on both sides, timed alternately in one process (medians):
  cached    one training step on K slices per volume whose teacher embeddings come from the cache
  authors   one training step on 1 slice per volume with an open_clip teacher of BiomedCLIP's size (ViT-B/16 image
            tower + 12-layer text tower, random weights) embedding the slice and its caption inside the step
Printed: aligned slices/s of each and their ratio (goal >= 10, from [signal]), then loader batches/s from the real
PretrainDataset (memory-mapped cache, prepared volumes, augmentation) with ``--workers`` processes, over the
steps/s of the cached step (goal >= 2). ``--teacher`` also takes an open_clip folder (``local-dir:PATH``).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from timing import alternate, autocast, peak_memory_gib, reset_peak_memory


def measure(backbone="swin_unetr", patch=64, batch=2, slices=8, teacher="ViT-B-16", psat="small", repeats=3,
            device="cpu", amp="off", backbone_kwargs=None):
    """Seconds per training step with cached teacher embeddings (K slices per volume) and with an open_clip
    teacher embedding one slice per volume inside the step.

    Returns ``cached_step_s``, ``teacher_step_s``, ``cached_slices_per_s``, ``teacher_slices_per_s``, ``ratio``
    (of the two slice rates), ``teacher_params_m``, ``embed_dim`` (the teacher's width) and ``peak_memory_gib``
    (peak allocated CUDA memory over both steps, AdamW states included; ``None`` on CPU).
    """
    import open_clip

    from med3dinsight_plugin import Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone
    from med3dinsight_plugin.alignment import Med3DInsightLoss

    dev, b, k = device, batch, slices
    kwargs = {"feature_size": 12} if backbone == "swin_unetr" else {}
    kwargs.update(backbone_kwargs or {})
    net = build_backbone(backbone, patch_size=(patch,) * 3, **kwargs)
    clip = open_clip.create_model(teacher, pretrained=None).to(dev).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(teacher)
    width = clip.text_projection.shape[1] if hasattr(clip, "text_projection") else 512
    size = clip.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    head = PlaneSliceAwareTransformer.from_preset(psat, in_dim=net.token_dim, out_dim=width)
    model = Med3DInsightModel(net, head, Med3DInsightLoss("ot", embed_dim=width)).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vol = torch.randn(b, 1, *(patch,) * 3, device=dev)
    norm = lambda t: torch.nn.functional.normalize(t, dim=-1)
    cached = {"plane": torch.randint(0, 3, (b, k), device=dev), "position": torch.rand(b, k, device=dev),
              "image_emb": norm(torch.randn(b, k, width, device=dev)),
              "text_emb": norm(torch.randn(b, k, width, device=dev))}
    images = torch.randn(b, 3, *size, device=dev)
    tokens = tokenizer(["axial CT slice showing the liver and the right kidney with no focal lesion"] * b).to(dev)

    def step(**batch):
        with autocast(dev, amp):
            loss = model(vol, **batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_cached():
        step(**cached)

    def step_authors():
        with torch.no_grad(), autocast(dev, amp):
            img, txt = norm(clip.encode_image(images).float()), norm(clip.encode_text(tokens).float())
        step(plane=torch.randint(0, 3, (b,), device=dev), position=torch.rand(b, device=dev), image_emb=img,
             text_emb=txt)

    reset_peak_memory(dev)
    c, a = alternate([step_cached, step_authors], dev, repeats)
    return {"cached_step_s": c, "teacher_step_s": a, "cached_slices_per_s": b * k / c, "teacher_slices_per_s": b / a,
            "ratio": (b * k / c) / (b / a), "teacher_params_m": sum(p.numel() for p in clip.parameters()) / 1e6,
            "embed_dim": width, "peak_memory_gib": peak_memory_gib(dev)}


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
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    args = parser.parse_args()

    r = measure(args.backbone, args.patch, args.batch, args.slices, args.teacher, args.psat, args.repeats,
                args.device, args.amp)
    b, k, c, a = args.batch, args.slices, r["cached_step_s"], r["teacher_step_s"]
    print(f"{args.backbone} patch {args.patch}^3, batch {b}, PSAT {args.psat}, device {args.device}; authors' teacher "
          f"{args.teacher} ({r['teacher_params_m']:.0f}M params)" + (f", autocast {args.amp}" if args.amp != "off"
                                                                   else ""))
    print(f"cached teacher, K={k}:   {b * k / c:7.2f} aligned slices/s ({c:.2f} s/step)")
    print(f"teacher in the step, K=1: {b / a:7.2f} aligned slices/s ({a:.2f} s/step)")
    print(f"ratio {(b * k / c) / (b / a):.1f}x (goal >= 10)")
    loader_rate(args, c, r["embed_dim"])


def measure_loader(patch=64, batch=2, slices=8, width=512, workers=2, cases=8, shape=(96, 128, 128), batches=20):
    """Batches/s of the real pretraining loader: a teacher cache on disk (random unit embeddings of ``width``),
    ``cases`` generated CT volumes of ``shape`` prepared as pretraining prepares them, crops of ``patch``^3 with
    ``slices`` cached slices each, nnU-Net's intensity augmentations, ``workers`` processes."""
    from torch.utils.data import DataLoader

    from med3dinsight_plugin.pretrain.data import PretrainDataset, compute_normalization, prepare_volumes
    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
    from med3dinsight_plugin.teacher.cache import TeacherCache, settings_hash, write_manifest, write_shard
    from med3dinsight_plugin.volumes import open_source

    tmp = Path(tempfile.mkdtemp())
    source = open_source(write_nnunet_raw_dataset(tmp / "raw", cases=cases, shape=tuple(shape), ct=True))
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
    ds = PretrainDataset(tmp / "prepared", source.cases, shapes, TeacherCache(tmp / "cache"), (patch,) * 3,
                         slices, augment=True)
    loader = DataLoader(ds, batch_size=batch, sampler=range(10 ** 6), num_workers=workers,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # start the workers
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches / (time.perf_counter() - start)
    del it, loader  # stops the workers
    return rate


def loader_rate(args, step_seconds, width):
    """Batches/s of the real pretraining loader (cache on disk, prepared volumes) over the step's steps/s."""
    rate = measure_loader(args.patch, args.batch, args.slices, width, args.workers)
    print(f"loader ({args.workers} workers, 96x128x128 volumes, augmentation on): {rate:.1f} batches/s = "
          f"{rate * step_seconds:.1f}x what the cached step consumes (goal >= 2)")


if __name__ == "__main__":
    main()
