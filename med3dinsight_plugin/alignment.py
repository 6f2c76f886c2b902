"""Med3DInsight's losses: 3D-to-2D alignment (CLIP InfoNCE or partial optimal transport) and reconstruction.

* :func:`clip_loss` -- symmetric InfoNCE as in CLIP and open_clip's ``ClipLoss`` (the paper's first version).
* :class:`PartialOTAlignment` -- the journal version: a learnable diagonal metric gives pairwise costs, entropic
  partial OT (:mod:`.ot`) couples predictions and teacher embeddings while leaving 1 - m of the mass untransported
  (tolerance to noisy captions), and the loss is the cross-entropy between the identity coupling and the plan.
* :func:`reconstruction_loss` -- MSE between the backbone decoder's reconstruction and the input (optionally on the
  masked voxels only: masked reconstruction, see :class:`~med3dinsight_plugin.model.Med3DInsightModel`).
* :class:`Med3DInsightLoss` -- the weighted sum: image alignment + text alignment + reconstruction.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DENSE_LOSSES, dense_loss
from .errors import Med3DInsightError
from .ot import log_entropic_partial_wasserstein

__all__ = ["clip_loss", "reconstruction_loss", "ClipAlignment", "PartialOTAlignment", "Med3DInsightLoss"]


def clip_loss(z3d: torch.Tensor, z2d: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of paired embeddings, identical to open_clip's ``ClipLoss``.

    Args:
        z3d: (B, E) predictions (the "image" side of ``ClipLoss``); expected L2-normalised.
        z2d: (B, E) teacher embeddings paired row by row; expected L2-normalised.
        logit_scale: the multiplier of the cosine similarities (``exp`` of CLIP's learnable log-temperature).

    Returns:
        Scalar loss: mean of the cross-entropies over rows and over columns, with the diagonal as targets.
    """
    _check_pairs(z3d, z2d)
    logits = logit_scale * z3d @ z2d.T
    labels = torch.arange(z3d.shape[0], device=z3d.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reconstruction_loss(reconstruction: torch.Tensor, volume: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between the reconstruction and the input volume (same shape), in float32.

    Args:
        reconstruction: (B, C, D, H, W) the backbone's output.
        volume: (B, C, D, H, W) the target: the original (unmasked) input.
        mask: ``None`` averages over every voxel; else a bool (B, 1, D, H, W) or (B, C, D, H, W) tensor, True where
            the voxel counts (the masked input voxels of masked reconstruction; a (B, 1, ...) mask applies to every
            channel). The mean is then over the selected voxels of all channels, computed without a host sync; an
            all-False mask gives 0.

    Returns:
        Scalar float32 loss.
    """
    if reconstruction.shape != volume.shape:
        raise ValueError(f"reconstruction has shape {tuple(reconstruction.shape)} but the input volume has "
                         f"{tuple(volume.shape)}")
    if mask is None:
        return F.mse_loss(reconstruction.float(), volume.float())
    if (mask.dim() != volume.dim() or mask.shape[0] != volume.shape[0] or mask.shape[2:] != volume.shape[2:]
            or mask.shape[1] not in (1, volume.shape[1])):
        raise ValueError(f"the reconstruction mask must have shape {(volume.shape[0], 1, *volume.shape[2:])} or "
                         f"{tuple(volume.shape)}, got {tuple(mask.shape)}")
    squared = (reconstruction.float() - volume.float()).square()
    count = mask.sum() * (volume.shape[1] // mask.shape[1])  # selected elements once broadcast over channels
    return torch.where(mask.bool(), squared, 0.0).sum() / count.clamp_min(1)


def _check_pairs(z3d: torch.Tensor, z2d: torch.Tensor) -> None:
    if z3d.dim() != 2 or z2d.dim() != 2 or z3d.shape != z2d.shape:
        raise ValueError(f"alignment expects two (B, E) tensors of paired embeddings with the same shape, got "
                         f"{tuple(z3d.shape)} and {tuple(z2d.shape)}")
    if z3d.shape[0] < 2:
        raise ValueError("alignment needs at least 2 pairs in the batch (the other pairs are the negatives)")


class ClipAlignment(nn.Module):
    """CLIP alignment with a learnable temperature, initialised at 1/0.07 and kept at a logit scale of at most 100 as
    CLIP does.

    As in CLIP and open_clip, the bound is applied to the parameter after each optimizer step (:meth:`clamp_`; the
    pretraining loop calls it through :meth:`Med3DInsightModel.after_optimizer_step
    <med3dinsight_plugin.model.Med3DInsightModel.after_optimizer_step>`), not inside the forward pass: a clamp there
    would give the temperature a zero gradient beyond the bound, where it could stay for good. The temperature is
    not weight-decayed (:meth:`no_weight_decay`).

    Args:
        init_temperature: the initial temperature (logit scale ``1 / init_temperature``).
        max_logit_scale: the largest logit scale :meth:`clamp_` allows.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log = math.log(max_logit_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of the cosine similarities, ``exp(log_logit_scale)`` (differentiable, never clamped here)."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the log logit scale into ``[0, log(max_logit_scale)]`` in place (after an optimizer step)."""
        self.log_logit_scale.clamp_(0.0, self.max_log)

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters an optimizer must not decay (timm's convention): the temperature.

        Returns:
            ``{"log_logit_scale"}``.
        """
        return {"log_logit_scale"}

    def forward(self, z3d: torch.Tensor, z2d: torch.Tensor) -> torch.Tensor:
        """Loss for (P, E) targets, or (T,) losses for T target sets stacked as (T, P, E)."""
        if z2d.dim() == 3:
            return torch.stack([clip_loss(z3d, t, self.logit_scale) for t in z2d.unbind(0)])
        return clip_loss(z3d, z2d, self.logit_scale)


class PartialOTAlignment(nn.Module):
    """Partial-OT alignment loss (journal version of Med3DInsight).

    Cost: ``C_ij = sqrt(sum_k w_k (z3d_ik - z2d_jk)^2)``, divided by its maximum, with a learnable positive diagonal
    metric ``w`` (the authors learn a full matrix but their einsum reads only its diagonal; this makes that explicit,
    with the same initial diagonal, 1 + U[0, 1)). The plan is entropic partial OT between uniform marginals moving
    mass ``m``; the loss is ``-(1/B) sum_i log P_ii``, the cross-entropy between the identity coupling and the plan,
    with the gradient flowing through the plan.

    Args:
        dim: embedding width.
        reg: entropic regularisation (authors: 0.03).
        mass: fraction of mass transported (authors: 0.95).
        num_iter: solver iterations at most; stops earlier when the plan changes by less than ``stop_thr``.
        stop_thr: convergence threshold on the plan (Frobenius norm of the change).
        grad_iters: ``None`` backpropagates through all iterations; an int bounds memory (see :mod:`.ot`).
    """

    def __init__(self, dim: int = 512, reg: float = 0.03, mass: float = 0.95, num_iter: int = 1000,
                 stop_thr: float = 1e-7, grad_iters: Optional[int] = None):
        super().__init__()
        if not 0 < mass <= 1:
            raise Med3DInsightError(f"mass must lie in (0, 1], got {mass}")
        self.reg, self.mass, self.num_iter, self.stop_thr, self.grad_iters = reg, mass, num_iter, stop_thr, grad_iters
        self.log_metric = nn.Parameter(torch.log1p(torch.rand(dim)))

    def cost(self, z3d: torch.Tensor, z2d: torch.Tensor) -> torch.Tensor:
        """Metric distances divided by their maximum: (P, E) x (..., P, E) -> (..., P, P)."""
        diff = z3d[:, None, :] - z2d[..., None, :, :]
        dist = (diff.square() * self.log_metric.exp()).sum(-1).add(1e-12).sqrt()  # eps: finite grad at 0
        return dist / dist.amax((-2, -1), keepdim=True)

    def forward(self, z3d: torch.Tensor, z2d: torch.Tensor) -> torch.Tensor:
        """Loss for predictions (P, E) against targets (P, E), or against T target sets (T, P, E) solved as one
        batched transport problem -> scalar or (T,)."""
        for target in z2d.unbind(0) if z2d.dim() == 3 else (z2d,):
            _check_pairs(z3d, target)
        if z3d.shape[-1] != self.log_metric.numel():
            raise ValueError(f"embeddings are {z3d.shape[-1]} wide but this alignment's metric has "
                             f"{self.log_metric.numel()} entries; build it with dim={z3d.shape[-1]}")
        dtype = torch.promote_types(z3d.dtype, torch.float32)  # never solve OT in half precision...
        with torch.autocast(z3d.device.type, enabled=False):  # ...not even inside an AMP region
            cost = self.cost(z3d.to(dtype), z2d.to(dtype))
            n = cost.shape[-1]
            uniform = cost.new_full((n,), 1.0 / n)
            log_plan = log_entropic_partial_wasserstein(uniform, uniform, cost, self.reg, self.mass, self.num_iter,
                                                        self.stop_thr, grad_iters=self.grad_iters)
        return -log_plan.diagonal(dim1=-2, dim2=-1).mean(-1)


class Med3DInsightLoss(nn.Module):
    """Image alignment + text alignment + reconstruction (+ dense distillation), weighted (default 1, 1, 1, 0).

    Args:
        alignment: ``"ot"`` (partial optimal transport, journal version) or ``"clip"`` (InfoNCE, first version).
        embed_dim: the image teacher's embedding width (and the text teacher's, when they share a space).
        image_weight, text_weight, reconstruction_weight: term weights; a zero weight skips the term.
        text_dim: ``None``: image and text targets share one space (open_clip; the paper) and one alignment module
            (one metric or one temperature, as in the authors' code) serves both. Else the width of a text space of
            its own: the text term gets its own alignment module and is computed on PSAT's text-head predictions.
        dense_weight: weight of dense distillation (:mod:`.dense`; 0, the default, leaves it off).
        dense_loss: ``"cosine"`` or ``"mse"``, the per-location distance of dense distillation.
        **alignment_kwargs: passed to :class:`PartialOTAlignment` or :class:`ClipAlignment`.

    ``weights`` is a plain dict (``image``, ``text``, ``reconstruction``, ``dense``): pretraining may set it once
    before the first step (``model.loss_balance``) and saves it with its state.
    """

    def __init__(self, alignment: str = "ot", embed_dim: int = 512, image_weight: float = 1.0,
                 text_weight: float = 1.0, reconstruction_weight: float = 1.0, text_dim: Optional[int] = None,
                 dense_weight: float = 0.0, dense_loss: str = "cosine", **alignment_kwargs):
        super().__init__()
        if alignment not in ("ot", "clip"):
            raise Med3DInsightError(f"alignment must be 'ot' or 'clip', got {alignment!r}")

        if dense_loss not in DENSE_LOSSES:
            raise Med3DInsightError(f"dense_loss must be one of {', '.join(map(repr, DENSE_LOSSES))}, got "
                                    f"{dense_loss!r}")

        def make(dim):
            return PartialOTAlignment(dim, **alignment_kwargs) if alignment == "ot" else \
                ClipAlignment(**alignment_kwargs)
        self.align = make(embed_dim)
        self.align_text = make(text_dim) if text_dim is not None else None
        self.alignment, self.embed_dim, self.text_dim, self.dense_kind = alignment, embed_dim, text_dim, dense_loss
        self.weights = {"image": float(image_weight), "text": float(text_weight),
                        "reconstruction": float(reconstruction_weight), "dense": float(dense_weight)}

    def forward(self, z3d: torch.Tensor, image_emb: Optional[torch.Tensor], text_emb: Optional[torch.Tensor],
                reconstruction: Optional[torch.Tensor] = None, volume: Optional[torch.Tensor] = None,
                reconstruction_mask: Optional[torch.Tensor] = None, z_text: Optional[torch.Tensor] = None,
                dense: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
                ) -> Dict[str, torch.Tensor]:
        """Losses for ``P`` aligned pairs.

        Args:
            z3d: (P, E) L2-normalised PSAT predictions in the image space (and the text space, when shared).
            image_emb, text_emb: (P, E) / (P, text width) teacher embeddings (normalised here), or ``None`` to skip
                that term.
            reconstruction, volume: the backbone's reconstruction and its (original, unmasked) input, or ``None`` to
                skip that term.
            reconstruction_mask: ``None`` (plain reconstruction: MSE over all voxels) or the bool mask of masked
                reconstruction, True on the voxels hidden from the backbone: the MSE is taken on those only (see
                :func:`reconstruction_loss`).
            z_text: (P, text_dim) PSAT's text-head predictions; required when the text space is separate
                (``text_dim`` set), ignored otherwise.
            dense: ``(pred, target, valid)`` or ``(pred, target, valid, count)`` of dense distillation (see
                :func:`~med3dinsight_plugin.dense.dense_loss`) or ``None`` to skip that term.

        Returns:
            ``{"loss", "image", "text", "reconstruction", "dense"}`` -- the weighted total and each unweighted term
            present.
        """
        if z3d.dim() != 2 or z3d.shape[-1] != self.embed_dim:
            raise ValueError(f"predictions must have shape (P, {self.embed_dim}), got {tuple(z3d.shape)}; the loss "
                             f"was built with embed_dim={self.embed_dim}")
        terms: Dict[str, torch.Tensor] = {}
        names, targets = [], []
        separate = self.align_text is not None
        for name, target in (("image", image_emb), ("text", text_emb)):
            if target is None or not self.weights[name]:
                continue
            pred = z_text if name == "text" and separate else z3d
            if pred is None:
                raise ValueError("the text space is separate (text_dim set): pass PSAT's text-head predictions as "
                                 "z_text")
            if target.shape != pred.shape:
                raise ValueError(f"{name}_emb has shape {tuple(target.shape)} but the predictions have "
                                 f"{tuple(pred.shape)}: the teacher's embedding width must equal PSAT's "
                                 f"{'text_dim' if pred is z_text else 'out_dim'} ({pred.shape[-1]})")
            target = F.normalize(target.to(pred.dtype), dim=-1)
            if pred is z_text:
                terms["text"] = self.align_text(z_text, target)
            else:
                names.append(name)
                targets.append(target)
        if names:  # the terms of the shared space in one batched call: one OT solve instead of two
            terms.update(zip(names, self.align(z3d, torch.stack(targets)).unbind(0)))
        if reconstruction is not None and volume is not None and self.weights["reconstruction"]:
            terms["reconstruction"] = reconstruction_loss(reconstruction, volume, reconstruction_mask)
        if dense is not None and self.weights["dense"]:

            terms["dense"] = dense_loss(*dense[:3], kind=self.dense_kind, count=dense[3] if len(dense) > 3 else None)
        if not terms:
            raise ValueError("no loss term to compute: pass image_emb, text_emb or a reconstruction with a "
                             "non-zero weight")
        terms = {k: terms[k] for k in self.weights if k in terms}  # always in the order of ``weights``
        total = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}
