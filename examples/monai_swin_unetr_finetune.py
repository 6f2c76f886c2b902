"""Fine-tune a MONAI SwinUNETR from a Med3DInsight checkpoint with MONAI's engine (CPU: about a minute).

Run: python examples/monai_swin_unetr_finetune.py [--checkpoint med3dinsight.safetensors] [--epochs 2]

Without --checkpoint, a stand-in checkpoint is written from a freshly built backbone (``med3dinsight pretrain``
produces real ones). The data are generated: noisy volumes with a bright sphere to segment.
"""
import argparse
import logging
import tempfile
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR

from med3dinsight_plugin import build_backbone, save_pretrained
from med3dinsight_plugin.monai_support import Med3DInsightSupervisedTrainer


def sphere_volumes(n, size=64, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")).float()
    items = []
    for _ in range(n):
        centre = torch.randint(20, size - 20, (3,), generator=g).float().view(3, 1, 1, 1)
        radius = 6 + 6 * torch.rand(1, generator=g)
        label = ((grid - centre).norm(dim=0) < radius).long()[None]
        image = torch.randn(channels, size, size, size, generator=g) * 0.5 + 2.0 * label
        items.append({"image": image, "label": label})
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a med3dinsight checkpoint of a swin_unetr backbone")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    swin_kwargs = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))  # small enough for a CPU
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp()) / "stand_in.safetensors"
        save_pretrained(build_backbone("swin_unetr", patch_size=(64, 64, 64), **swin_kwargs), checkpoint)

    # Two input channels (e.g. two MRI sequences): the 1-channel pretrained input layers are adapted, and the
    # report says so.
    network = SwinUNETR(in_channels=2, out_channels=2, **swin_kwargs).to(args.device)
    loader = DataLoader(Dataset(sphere_volumes(4, channels=2)), batch_size=2, shuffle=True)
    trainer = Med3DInsightSupervisedTrainer(
        args.device, max_epochs=args.epochs, train_data_loader=loader, network=network,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), checkpoint=checkpoint,
        lr=1e-3, encoder_lr=2e-4, frozen_encoder_epochs=1, warmup_epochs=1)
    print(trainer.load_report)
    trainer.run()
    print(f"final loss {trainer.state.output[0]['loss']:.4f}; learning rates per epoch: {trainer.schedule.history}")


if __name__ == "__main__":
    main()
