"""A few Med3DInsight pretraining steps with the Python API, on random data (CPU: seconds).

Run: python examples/pretraining_step.py [--backbone plain_conv_unet] [--steps 3] [--alignment ot|clip]

Real pretraining reads volumes and cached teacher embeddings from disk; here random tensors stand in for both so
that every piece of the model is visible in a dozen lines.
"""
import argparse

import torch

from med3dinsight_plugin import Med3DInsightLoss, Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="plain_conv_unet")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--alignment", choices=["ot", "clip"], default="ot")
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1. The real downstream network, wrapped to give bottleneck tokens and a reconstruction.
    backbone = build_backbone(args.backbone, in_channels=1, patch_size=(args.patch,) * 3)
    # 2. PSAT reads those tokens and predicts a slice's teacher embedding (512-wide, as BiomedCLIP's).
    psat = PlaneSliceAwareTransformer.from_preset("small", in_dim=backbone.token_dim)
    # 3. Image + text alignment (partial OT or CLIP InfoNCE) + reconstruction.
    model = Med3DInsightModel(backbone, psat, Med3DInsightLoss(args.alignment, embed_dim=psat.out_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)

    batch, slices = 2, 8  # 8 slices per volume are aligned from one backbone pass
    for step in range(args.steps):
        volume = torch.randn(batch, 1, *backbone.patch_size)
        plane = torch.randint(0, 3, (batch, slices))  # 0 axial, 1 coronal, 2 sagittal
        position = torch.rand(batch, slices)  # relative slice position in [0, 1] inside the crop
        image_emb = torch.randn(batch, slices, psat.out_dim)  # cached teacher image embeddings
        text_emb = torch.randn(batch, slices, psat.out_dim)  # cached teacher text embeddings of the captions
        losses = model(volume, plane, position, image_emb, text_emb)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        print(f"step {step}: " + ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items()))

    # The pretrained weights live in the plain network: backbone.network.state_dict() has its usual keys.
    print(f"{type(backbone.network).__name__}: {len(backbone.network.state_dict())} tensors ready for fine-tuning")


if __name__ == "__main__":
    main()
