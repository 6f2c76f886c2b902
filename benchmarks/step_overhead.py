"""Cost of Med3DInsight's alignment on top of training the backbone alone.

Run: python benchmarks/step_overhead.py [--backbones swin_unetr plain_conv_unet] [--patch 64] [--batch 2]
                                         [--slices 8] [--repeats 5] [--psat paper|small] [--device cpu]
                                         [--amp off|bf16|fp16]

For each backbone, two training steps are timed alternately in one process (medians):
  backbone  forward + reconstruction loss + backward of the backbone alone
  full      backbone + PSAT on K slices per volume + image/text partial-OT alignment + reconstruction, backward
and their ratio is printed (goal <= 1.20). ``--psat paper`` is the authors' PSAT (6 layers, width 768,
300 queries); ``--psat small`` a 4-layer, 384-wide, 32-query PSAT. ``--amp bf16`` runs both steps under autocast,
as the pretraining engine does on CUDA.
"""
import argparse

import torch

from med3dinsight_plugin import Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone, reconstruction_loss
from med3dinsight_plugin.psat import PSAT_PRESETS
from timing import alternate, autocast, peak_memory_gib, reset_peak_memory


def measure(name, preset, patch=64, batch=2, slices=8, repeats=5, device="cpu", amp="off", backbone_kwargs=None):
    """Median seconds of the backbone-only and the full training step of backbone ``name`` with PSAT ``preset``.

    Returns ``backbone``, ``psat``, ``backbone_step_s``, ``full_step_s``, ``ratio`` (full / backbone),
    ``pairs_per_step`` (B x K aligned pairs) and ``peak_memory_gib`` (the larger step's peak of allocated CUDA
    memory, model included; ``None`` on CPU).
    """
    dev = device
    torch.manual_seed(0)
    backbone = build_backbone(name, patch_size=(patch,) * 3, **(backbone_kwargs or {}))
    psat = PlaneSliceAwareTransformer.from_preset(preset, in_dim=backbone.token_dim)
    model = Med3DInsightModel(backbone, psat).to(dev).train()
    b, k = batch, slices
    volume = torch.randn(b, 1, *backbone.patch_size, device=dev)
    plane = torch.randint(0, 3, (b, k), device=dev)
    position = torch.rand(b, k, device=dev)
    image, text = torch.randn(2, b, k, psat.out_dim, device=dev).unbind(0)

    def backbone_step():
        model.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            loss = reconstruction_loss(model.backbone(volume).reconstruction, volume)
        loss.backward()

    def full_step():
        model.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            loss = model(volume, plane, position, image, text)["loss"]
        loss.backward()

    reset_peak_memory(dev)
    tb, tf = alternate([backbone_step, full_step], dev, repeats)
    return {"backbone": name, "psat": preset, "backbone_step_s": tb, "full_step_s": tf, "ratio": tf / tb,
            "pairs_per_step": b * k, "peak_memory_gib": peak_memory_gib(dev)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["swin_unetr", "plain_conv_unet"])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--psat", choices=sorted(PSAT_PRESETS), nargs="+", default=["paper", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    args = parser.parse_args()
    dev = args.device
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads; patch {args.patch}^3, "
          f"batch {args.batch}, K={args.slices} slices per volume" + (f", autocast {args.amp}" if args.amp != "off"
                                                                         else ""))
    print(f"{'backbone':>16} {'PSAT':>6} {'backbone s':>11} {'full s':>9} {'ratio':>7} {'pairs/step':>11}")
    for name, preset in [(n, p) for n in args.backbones for p in args.psat]:
        r = measure(name, preset, args.patch, args.batch, args.slices, args.repeats, dev, args.amp)
        print(f"{name:>16} {preset:>6} {r['backbone_step_s']:>11.3f} {r['full_step_s']:>9.3f} {r['ratio']:>7.2f} "
              f"{r['pairs_per_step']:>11}")


if __name__ == "__main__":
    main()
