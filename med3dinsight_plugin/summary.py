"""Build a backbone + PSAT + loss and run it once on random data: shapes and parameter counts at a glance."""
from __future__ import annotations

import time
from typing import Any, Dict, Sequence

import torch

from .backbones import list_backbones
from .distributed import resolve_device
from .errors import Med3DInsightError, short_repr
from .pretrain.config import PretrainConfig
from .pretrain.factory import build_model


def count_parameters(module: torch.nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def summarize(name: str, patch_size: Sequence[int] = (64, 64, 64), batch: int = 2, slices: int = 4,
              device: str = "cpu", seed: int = 0, psat: str = "paper", **network_kwargs) -> Dict[str, Any]:
    """Build ``name`` with a PSAT preset and the paper's alignment loss (image and text; ``build_model``, as
    pretraining does); run one forward pass on random volumes and teacher embeddings.

    Args:
        name: a registered backbone (``list_backbones()``).
        patch_size: the input patch (D, H, W).
        batch: volumes per forward pass.
        slices: slices aligned per volume (K).
        device: where to run.
        seed: the seed of the weights (``train.seed``).
        psat: the PSAT preset (``paper`` or ``small``).
        **network_kwargs: the backbone's arguments (``model.backbone_kwargs``).

    Returns:
        A dict with parameter counts (network, PSAT, total), the token, prediction and reconstruction shapes, the
        loss terms and the forward time in seconds.

    Raises:
        Med3DInsightError: an unknown backbone, a batch or slice count below 1 (or a single slice pair), a device
            other than cpu/cuda; ConfigError: an unknown PSAT preset or backbone argument.
    """

    for arg, value in (("batch", batch), ("slices", slices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise Med3DInsightError(f"summarize(): {arg} must be a positive integer, got {short_repr(value)}")
    if batch * slices < 2:
        raise Med3DInsightError(f"summarize(): batch {batch} x slices {slices} gives {batch * slices} slice pair; the "
                                f"alignment needs at least 2 (the other pairs are its negatives)")
    device = str(resolve_device(str(device), option="device"))
    if name not in list_backbones():  # said as the backbone registry says it, not as a configuration key
        raise Med3DInsightError(f"unknown backbone {name!r}: expected one of {list_backbones()}")
    # the paper's loss (PSAT's image and text alignment): what PSAT's size and the forward pass are measured with
    config = PretrainConfig.from_dict({"model": {"backbone": name, "patch_size": list(patch_size), "psat": psat,
                                                 "backbone_kwargs": dict(network_kwargs),
                                                 "loss_weights": {"image": 1.0, "text": 1.0},
                                                 "loss_balance": {"dense": None}},
                                       "train": {"seed": seed}}, source="summarize()")
    model = build_model(config).to(device).eval()
    backbone, transformer = model.backbone, model.psat
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch failing to allocate (CPU or GPU memory): a size the user chose, not a bug."""
    import torch

    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):  # torch.* from 2.5 on
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
