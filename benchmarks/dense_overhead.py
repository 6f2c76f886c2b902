"""Cost of dense distillation and of the per-term encoder-gradient norms on top of a Med3DInsight training step.

Run: python benchmarks/dense_overhead.py [--backbones plain_conv_unet swin_unetr] [--patch 64] [--batch 2]
                                         [--slices 8] [--channels 1280] [--map 7] [--repeats 5] [--psat small]
                                         [--device cpu] [--amp off|bf16|fp16] [--backbone-kwargs JSON]

Three training steps of the same model, timed alternately in one process (medians):
  paper    backbone + PSAT on K slices + image/text partial-OT alignment + reconstruction, backward
  dense    the same + dense distillation (a C-channel S x S teacher map per slice: EfficientNet-Lite0's 1280 x 7 x 7)
  logged   paper + each term's encoder-gradient norm (one extra backward per term: what a log step costs)
Printed: dense / paper (goal <= 1.20, issue [evidence]) and logged / paper (paid once per train.log_every steps).
Also the data loader's side of dense distillation: resampling a sample's K cached maps onto the crop
(``crop_map_target``), per sample, which runs in the loader's workers.
"""
import argparse
import json
import time

import numpy as np
import torch

from med3dinsight_plugin import Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone
from med3dinsight_plugin.alignment import Med3DInsightLoss
from med3dinsight_plugin.balance import encoder_parameters, term_gradient_norms
from med3dinsight_plugin.dense import DenseHead, crop_map_target
from timing import alternate, autocast


def measure(name, preset="small", patch=64, batch=2, slices=8, channels=1280, size=7, repeats=5, device="cpu",
            amp="off", backbone_kwargs=None):
    """Median seconds of the three steps of backbone ``name`` (see the module docstring) and their ratios."""
    dev = device
    torch.manual_seed(0)
    backbone = build_backbone(name, patch_size=(patch,) * 3, **(backbone_kwargs or {}))
    psat = PlaneSliceAwareTransformer.from_preset(preset, in_dim=backbone.token_dim)
    loss = Med3DInsightLoss("ot", embed_dim=psat.out_dim, dense_weight=1.0)
    model = Med3DInsightModel(backbone, psat, loss, dense_head=DenseHead(backbone.token_dim, channels, size))
    model = model.to(dev).train()
    b, k = batch, slices
    batch_kwargs = {"volume": torch.randn(b, 1, *backbone.patch_size, device=dev),
                    "plane": torch.randint(0, 3, (b, k), device=dev), "position": torch.rand(b, k, device=dev),
                    "image_emb": torch.randn(b, k, psat.out_dim, device=dev),
                    "text_emb": torch.randn(b, k, psat.out_dim, device=dev)}
    maps = {"map_target": torch.randn(b, k, channels, size, size, device=dev),
            "map_valid": torch.ones(b, k, size, size, dtype=torch.bool, device=dev)}
    params = encoder_parameters(model)

    def step(dense: bool, logged: bool = False):
        def run():
            model.zero_grad(set_to_none=True)
            model.loss.weights["dense"] = 1.0 if dense else 0.0
            with autocast(dev, amp):
                losses = model(**batch_kwargs, **(maps if dense else {}))
            if logged:
                term_gradient_norms(losses, model.loss.weights, params)
            losses["loss"].backward()
        return run

    paper, dense, logged = alternate([step(False), step(True), step(False, logged=True)], dev, repeats)
    return {"backbone": name, "paper_s": paper, "dense_s": dense, "logged_s": logged, "dense_ratio": dense / paper,
            "logged_ratio": logged / paper}


def loader_cost(slices=8, channels=1280, size=7, repeats=50):
    """Milliseconds per sample of ``crop_map_target`` for K cached float16 maps (the loader's side)."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(slices, channels, size, size)).astype(np.float16)
    plane = rng.integers(0, 3, slices)
    start = time.perf_counter()
    for _ in range(repeats):
        crop_map_target(maps, plane, [0.1, 0.2, 0.3], [0.6, 0.8, 0.9], size)
    return 1000 * (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["plain_conv_unet", "swin_unetr"])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--map", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--psat", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--backbone-kwargs", type=json.loads, default={},
                        help='JSON of build_backbone arguments, e.g. \'{"feature_size": 12}\' for a small SwinUNETR')
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; patch {args.patch}^3, "
          f"batch {args.batch}, K={args.slices}, PSAT {args.psat}, teacher maps {args.channels} x {args.map} x "
          f"{args.map}" + (f", autocast {args.amp}" if args.amp != "off" else ""))
    print(f"{'backbone':>16} {'paper s':>8} {'dense s':>8} {'logged s':>9} {'dense/paper':>12} {'logged/paper':>13}")
    for name in args.backbones:
        r = measure(name, args.psat, args.patch, args.batch, args.slices, args.channels, args.map, args.repeats,
                    args.device, args.amp, args.backbone_kwargs)
        print(f"{name:>16} {r['paper_s']:>8.3f} {r['dense_s']:>8.3f} {r['logged_s']:>9.3f} {r['dense_ratio']:>12.2f} "
              f"{r['logged_ratio']:>13.2f}")
    print(f"loader: crop_map_target for {args.slices} maps: {loader_cost(args.slices, args.channels, args.map):.2f} ms "
          f"per sample")


if __name__ == "__main__":
    main()
