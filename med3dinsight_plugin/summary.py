"""Build a backbone + PSAT + loss and run it once on random data: shapes and parameter counts at a glance."""
from __future__ import annotations

import time
from typing import Any, Dict, Sequence

import torch

from .backbones import build_backbone
from .model import Med3DInsightModel
from .psat import PlaneSliceAwareTransformer


def count_parameters(module: torch.nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def summarize(name: str, patch_size: Sequence[int] = (64, 64, 64), batch: int = 2, slices: int = 4,
              device: str = "cpu", seed: int = 0, psat: str = "paper", **network_kwargs) -> Dict[str, Any]:
    """Build ``name`` with a PSAT preset and the default loss; run one forward pass on random volumes and teacher
    embeddings.

    Returns:
        A dict with parameter counts (network, PSAT, total), the token, prediction and reconstruction shapes, the
        loss terms and the forward time in seconds.
    """
    torch.manual_seed(seed)
    backbone = build_backbone(name, in_channels=1, patch_size=patch_size, **network_kwargs)
    transformer = PlaneSliceAwareTransformer.from_preset(psat, in_dim=backbone.token_dim)
    model = Med3DInsightModel(backbone, transformer).to(device).eval()
    volume = torch.randn(batch, 1, *backbone.patch_size, device=device)
    plane = torch.randint(0, 3, (batch, slices), device=device)
    position = torch.rand(batch, slices, device=device)
    image_emb, text_emb = torch.randn(2, batch, slices, transformer.out_dim, device=device).unbind(0)
    start = time.perf_counter()
    with torch.no_grad():
        tokens, reconstruction = backbone(volume)  # one pass; the shapes of every stage are shown
        z3d = transformer(tokens, plane, position)
        losses = model.compute_losses(z3d, reconstruction, volume, image_emb, text_emb)
    return {
        "backbone": name,
        "network": type(backbone.network).__name__,
        "network_params": count_parameters(backbone.network),
        "psat_params": count_parameters(transformer),
        "total_params": count_parameters(model),
        "input": tuple(volume.shape),
        "tokens": tuple(tokens.shape),
        "prediction": tuple(z3d.shape),
        "reconstruction": tuple(reconstruction.shape),
        "losses": {k: round(float(v), 4) for k, v in losses.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }
