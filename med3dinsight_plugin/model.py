"""Med3DInsightModel: backbone + PSAT + loss, one forward pass per volume for K aligned slices."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .alignment import Med3DInsightLoss
from .backbones import Backbone
from .psat import PlaneSliceAwareTransformer

__all__ = ["Med3DInsightModel"]


class Med3DInsightModel(nn.Module):
    """The pretraining model.

    Args:
        backbone: a :class:`~med3dinsight_plugin.backbones.Backbone` (see ``build_backbone``).
        psat: a :class:`PlaneSliceAwareTransformer` whose ``in_dim`` equals the backbone's token width.
        loss: a :class:`Med3DInsightLoss` whose embedding width equals PSAT's ``out_dim``.
    """

    def __init__(self, backbone: Backbone, psat: PlaneSliceAwareTransformer, loss: Optional[Med3DInsightLoss] = None):
        super().__init__()
        if psat.in_dim != backbone.token_dim:
            raise ValueError(f"PSAT in_dim is {psat.in_dim} but the {backbone.config['name']} backbone gives "
                             f"{backbone.token_dim}-wide tokens; build PSAT with in_dim={backbone.token_dim}")
        loss = loss if loss is not None else Med3DInsightLoss(embed_dim=psat.out_dim)
        if loss.embed_dim != psat.out_dim:
            raise ValueError(f"the loss expects {loss.embed_dim}-wide embeddings but PSAT outputs {psat.out_dim}")
        self.backbone, self.psat, self.loss = backbone, psat, loss

    def encode(self, volume: torch.Tensor, plane: torch.Tensor, position: torch.Tensor):
        """PSAT predictions for the given slices and the backbone's reconstruction.

        Returns:
            ``(z3d, reconstruction)``: z3d (B, out_dim) or (B, K, out_dim), L2-normalised.
        """
        tokens, reconstruction = self.backbone(volume)
        return self.psat(tokens, plane, position), reconstruction

    def forward(self, volume: torch.Tensor, plane: torch.Tensor, position: torch.Tensor,
                image_emb: Optional[torch.Tensor] = None, text_emb: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses for a batch of volumes with one or K slices each.

        Args:
            volume: (B, C, D, H, W).
            plane: (B,) or (B, K) long, 0 axial / 1 coronal / 2 sagittal.
            position: same shape, float relative slice positions in [0, 1] inside ``volume``.
            image_emb, text_emb: the slices' teacher embeddings, (B, E) or (B, K, E); ``None`` skips the term.
            mask: optional bool, same shape as ``plane``: which slices are real (a crop holding fewer than K cached
                slices pads with masked ones, which are left out of the alignment).

        Returns:
            ``{"loss", "image", "text", "reconstruction"}``; the alignment runs over all (unmasked) B*K pairs.
        """
        z3d, reconstruction = self.encode(volume, plane, position)
        return self.compute_losses(z3d, reconstruction, volume, image_emb, text_emb, mask)

    def compute_losses(self, z3d: torch.Tensor, reconstruction: torch.Tensor, volume: torch.Tensor,
                       image_emb: Optional[torch.Tensor] = None, text_emb: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The losses of :meth:`forward` from the outputs of :meth:`encode` (all B*K pairs aligned together)."""
        for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
            if emb is not None and (emb.shape[:-1] != z3d.shape[:-1]):
                raise ValueError(f"{name} must have shape {tuple(z3d.shape[:-1])} + (E,) to match plane/position, "
                                 f"got {tuple(emb.shape)}")
        if mask is not None and mask.shape != z3d.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(z3d.shape[:-1])} to match plane/position, got "
                             f"{tuple(mask.shape)}")
        keep = None if mask is None else mask.reshape(-1).bool()

        def flat(t):
            if t is None:
                return None
            t = t.reshape(-1, t.shape[-1])
            return t if keep is None else t[keep]
        return self.loss(flat(z3d), flat(image_emb), flat(text_emb), reconstruction, volume)
