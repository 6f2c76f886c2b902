"""A few Med3DInsight pretraining steps with the Python API, on random data (CPU: seconds).

Run: python examples/pretraining_step.py [--backbone plain_conv_unet] [--steps 3] [--alignment ot|clip]

Real pretraining reads volumes and cached teacher embeddings from disk; here random tensors stand in for both so
that the model is built as pretraining builds it (``build_model``) and one training step fits in a dozen lines.
"""
import argparse

import torch

from med3dinsight_plugin.pretrain import PretrainConfig, build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="plain_conv_unet")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--alignment", choices=["ot", "clip"], default="ot")
    args = parser.parse_args()

    # The model section of a pretraining configuration (the same keys as a run's YAML), built as pretraining builds
    # it, with the weights drawn from train.seed:
    # The paper's recipe (image + text alignment; the package's default is dense distillation, which needs the
    # teacher's feature maps: docs/pretraining.md):
    config = PretrainConfig.from_dict({"model": {"backbone": args.backbone, "patch_size": [args.patch] * 3,
                                                 "psat": "small", "alignment": args.alignment,
                                                 "loss_weights": {"image": 1.0, "text": 1.0},
                                                 "loss_balance": {"dense": None}},
                                       "train": {"seed": 0}})
    model = build_model(config, embed_dim=512)  # 512: the teacher's embedding width (BiomedCLIP's)
    # 1. model.backbone: the real downstream network, wrapped to give bottleneck tokens and a reconstruction.
    # 2. model.psat: PSAT reads those tokens and predicts a slice's teacher embedding.
    # 3. model.loss: image + text alignment (partial OT or CLIP InfoNCE) + reconstruction.
    backbone, psat = model.backbone, model.psat
    # Weight decay on every trainable tensor but CLIP's temperature (model.param_groups()), as pretraining does.
    optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-4, weight_decay=1e-5)

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
        model.after_optimizer_step()  # CLIP's logit scale back to at most 100, as CLIP does after each step
        print(f"step {step}: " + ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items()))

    # The pretrained weights live in the plain network: backbone.network.state_dict() has its usual keys.
    print(f"{type(backbone.network).__name__}: {len(backbone.network.state_dict())} tensors ready for fine-tuning")


if __name__ == "__main__":
    main()
