"""3D classification from a Med3DInsight encoder (CPU: under a minute): bright vs dark lesions.

Run: python examples/monai_classification.py [--checkpoint med3dinsight.safetensors] [--epochs 3]

Without --checkpoint, a stand-in checkpoint of a small nnU-Net ResEncUNet is written first (``med3dinsight
pretrain`` produces real ones). Any of the four encoders works: the classifier is built from the checkpoint.
"""
import argparse
import tempfile
from pathlib import Path

import torch

from med3dinsight_plugin import build_backbone, save_pretrained
from med3dinsight_plugin.monai_support import Med3DInsightClassifier, finetune_param_groups


def lesions(n, size=32, seed=0):
    """Noisy volumes with one spherical lesion of random size and place: bright (class 0) or dark (class 1)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")).float()
    images, labels = [], []
    for i in range(n):
        centre = torch.randint(10, size - 10, (3,), generator=g).float().view(3, 1, 1, 1)
        inside = ((grid - centre).norm(dim=0) < 4 + 4 * torch.rand(1, generator=g)).float()
        sign = 1.0 if i % 2 == 0 else -1.0
        images.append((sign * inside + 0.3 * torch.randn(size, size, size, generator=g))[None])
        labels.append(i % 2)
    return torch.stack(images), torch.tensor(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp()) / "stand_in.safetensors"
        save_pretrained(build_backbone("resenc_unet", patch_size=(32, 32, 32), base_features=8, max_features=64),
                        checkpoint)

    model = Med3DInsightClassifier.from_pretrained(checkpoint, num_classes=2, pooling="avg")
    print(model.load_report)
    optimizer = torch.optim.AdamW(finetune_param_groups(model, lr=1e-3, encoder_lr=1e-4), weight_decay=5e-2)
    images, labels = lesions(16)
    test_images, test_labels = lesions(8, seed=1)
    for epoch in range(args.epochs):
        model.train()
        for start in range(0, len(images), 4):
            loss = torch.nn.functional.cross_entropy(model(images[start:start + 4]), labels[start:start + 4])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.4f}, held-out accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
