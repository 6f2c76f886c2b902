"""Med3DInsightModel: backbone + PSAT + loss, one forward pass per volume for K aligned slices."""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .alignment import ClipAlignment, Med3DInsightLoss
from .backbones import Backbone
from .dense import DenseHead, real_slice_points
from .errors import Med3DInsightError
from .psat import PlaneSliceAwareTransformer

__all__ = ["Med3DInsightModel", "MaskedReconstruction", "RECONSTRUCTIONS", "SliceOutputs", "block_mask",
           "masked_block_count"]

RECONSTRUCTIONS = ("plain", "masked")


class MaskedReconstruction(NamedTuple):
    """What :meth:`Med3DInsightModel.encode` returns as the reconstruction when it masked the input."""
    output: torch.Tensor  # (B, C, D, H, W) the backbone's reconstruction of the masked volume
    mask: torch.Tensor  # (B, 1, D, H, W) bool, True on the voxels that were hidden (set to 0)


class SliceOutputs(NamedTuple):
    """What :meth:`Med3DInsightModel.encode` returns as the predictions of a model with a text space of its own or
    dense distillation (a model with neither returns the image-space tensor alone, as the paper's model does)."""
    image: torch.Tensor  # (B[, K], out_dim) L2-normalised, the image space (and the text space when shared)
    text: Optional[torch.Tensor]  # (B[, K], text_dim) L2-normalised, or None: the text space is the image space
    dense: Optional[torch.Tensor]  # (B, K, R, R, C) dense-distillation predictions, or None


def masked_block_count(blocks: int, ratio: float) -> int:
    """How many of a volume's ``blocks`` mask blocks are masked: ``ratio * blocks`` rounded half up, at least 1 and at
    most ``blocks - 1`` (something is always hidden and something always visible).

    Args:
        blocks: the number of blocks on the volume's grid (>= 2).
        ratio: the mask ratio, 0 < ratio < 1.

    Returns:
        The count, the same for every sample.
    """
    if blocks < 2:
        raise Med3DInsightError(f"masked reconstruction needs at least 2 mask blocks per volume, got {blocks}; lower "
                                f"model.mask_block (the block edge in voxels) or use a larger patch")
    return min(max(math.floor(ratio * blocks + 0.5), 1), blocks - 1)


def block_mask(batch: int, spatial: Sequence[int], ratio: float, block: int,
               device: Union[torch.device, str, None] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random block mask per sample, for masked (MAE / Spark-style) reconstruction.

    The volume is tiled by a grid of ``block``^3 cubes starting at voxel 0; where a size is not a multiple of
    ``block``, the last (partial) cube of that axis is a block like the others. Each sample gets its own mask with
    exactly :func:`masked_block_count` blocks masked, chosen uniformly: the blocks with the smallest of one uniform
    draw per block. The draw is ``torch.rand`` on ``device`` (its global generator unless ``generator`` is given),
    so a seeded run, and one resumed with its saved RNG state, draws the same masks; everything stays on the device
    (no host sync, no Python loop over voxels or samples).

    Args:
        batch: the number of samples B.
        spatial: the volume's (D, H, W).
        ratio: the fraction of blocks masked, 0 < ratio < 1.
        block: the block edge in voxels, >= 1.
        device: where the mask is drawn and kept.
        generator: an explicit generator (on ``device``) instead of the global one.

    Returns:
        (B, 1, D, H, W) bool, True on masked voxels (each block all True or all False).
    """
    if not 0 < ratio < 1:
        raise Med3DInsightError(f"mask_ratio must lie strictly between 0 and 1, got {ratio}")
    if int(block) != block or block < 1:
        raise Med3DInsightError(f"mask_block must be a positive integer, got {block}")
    block = int(block)
    d, h, w = (int(s) for s in spatial)
    grid = [-(-s // block) for s in (d, h, w)]  # ceil: partial blocks count
    blocks = grid[0] * grid[1] * grid[2]
    count = masked_block_count(blocks, ratio)
    noise = torch.rand(batch, blocks, device=device, generator=generator)
    chosen = noise.topk(count, dim=1, largest=False).indices
    flags = torch.zeros(batch, blocks, dtype=torch.bool, device=noise.device).scatter_(1, chosen, True)
    gd, gh, gw = grid
    voxels = flags.view(batch, 1, gd, 1, gh, 1, gw, 1).expand(batch, 1, gd, block, gh, block, gw, block)
    return voxels.reshape(batch, 1, gd * block, gh * block, gw * block)[:, :, :d, :h, :w]


class Med3DInsightModel(nn.Module):
    """The pretraining model.

    Args:
        backbone: a :class:`~med3dinsight_plugin.backbones.Backbone` (see ``build_backbone``).
        psat: a :class:`PlaneSliceAwareTransformer` whose ``in_dim`` equals the backbone's token width.
        loss: a :class:`Med3DInsightLoss` whose embedding width equals PSAT's ``out_dim``.
        reconstruction: ``"plain"``: the backbone sees the whole volume and the reconstruction MSE covers every
            voxel. ``"masked"``: in training mode (``model.train()``) and when the reconstruction term has a non-zero
            weight, each sample loses a random ``mask_ratio`` of its ``mask_block``^3 blocks (:func:`block_mask`):
            those voxels are set to 0 -- the mean of the z-scored inputs -- on every channel, the backbone runs
            once on the masked volume (its tokens also feed PSAT), and the MSE against the original volume covers
            the masked voxels only. A U-Net's first skip connection carries its input to the decoder, so plain
            reconstruction is close to an identity map; masking makes it an inpainting task. Evaluation mode
            never masks.
        mask_ratio: the fraction of blocks masked, 0 < mask_ratio < 1 (masked reconstruction only).
        mask_block: the edge of the cubic mask blocks in voxels, >= 1 (masked reconstruction only).
        dense_head: a :class:`~med3dinsight_plugin.dense.DenseHead` reading the backbone's bottleneck (``in_dim`` =
            the token width) for dense distillation, or ``None`` (off).
    """

    def __init__(self, backbone: Backbone, psat: PlaneSliceAwareTransformer, loss: Optional[Med3DInsightLoss] = None,
                 reconstruction: str = "plain", mask_ratio: float = 0.6, mask_block: int = 16,
                 dense_head: Optional[DenseHead] = None):
        super().__init__()
        if reconstruction not in RECONSTRUCTIONS:
            raise Med3DInsightError(f"reconstruction must be one of {', '.join(map(repr, RECONSTRUCTIONS))}, got "
                                    f"{reconstruction!r}")
        if not 0 < mask_ratio < 1:
            raise Med3DInsightError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
        if isinstance(mask_block, bool) or int(mask_block) != mask_block or mask_block < 1:
            raise Med3DInsightError(f"mask_block must be a positive integer, got {mask_block!r}")
        self.reconstruction, self.mask_ratio, self.mask_block = reconstruction, float(mask_ratio), int(mask_block)
        if psat.in_dim != backbone.token_dim:
            raise ValueError(f"PSAT in_dim is {psat.in_dim} but the {backbone.config['name']} backbone gives "
                             f"{backbone.token_dim}-wide tokens; build PSAT with in_dim={backbone.token_dim}")
        loss = loss if loss is not None else Med3DInsightLoss(embed_dim=psat.out_dim)
        if loss.embed_dim != psat.out_dim:
            raise ValueError(f"the loss expects {loss.embed_dim}-wide embeddings but PSAT outputs {psat.out_dim}")
        if loss.text_dim != psat.text_dim:
            raise ValueError(f"the loss's text space ({loss.text_dim or 'shared'}) differs from PSAT's "
                             f"({psat.text_dim or 'shared'}); build both with the same text_dim")
        if dense_head is not None and dense_head.in_dim != backbone.token_dim:
            raise ValueError(f"the dense head reads {dense_head.in_dim}-wide features but the backbone gives "
                             f"{backbone.token_dim}-wide tokens")
        self.backbone, self.psat, self.loss, self.dense_head = backbone, psat, loss, dense_head

    def param_groups(self) -> List[Dict[str, Any]]:
        """The trainable parameters (``requires_grad``) as optimizer parameter groups, in ``parameters()`` order.

        Parameters a submodule names in its ``no_weight_decay()`` (timm's convention; CLIP's temperature, see
        :class:`~med3dinsight_plugin.alignment.ClipAlignment`) get a group of their own without weight decay; every
        other parameter takes the optimizer's ``weight_decay``.

        Returns:
            ``[{"params": decayed}]``, followed by ``{"params": exempt, "weight_decay": 0.0}`` when there are
            exempt parameters.
        """
        exempt = set()
        for prefix, module in self.named_modules():
            names = getattr(module, "no_weight_decay", None)
            if callable(names):
                exempt.update(f"{prefix}.{name}" if prefix else name for name in names())
        decayed, kept = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (kept if name in exempt else decayed).append(p)
        return [{"params": decayed}] + ([{"params": kept, "weight_decay": 0.0}] if kept else [])

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Bring parameters back into their bounds; call it after every ``optimizer.step()`` (the pretraining loop
        does): CLIP's logit scale is clamped to at most 100 here, as CLIP does, not in the forward pass."""
        for module in self.modules():
            if isinstance(module, ClipAlignment):
                module.clamp_()

    @property
    def masks_input(self) -> bool:
        """Whether :meth:`encode` masks its input now: masked reconstruction, training mode, and a reconstruction
        term that is computed (a zero weight would only hide input from PSAT for nothing)."""
        return self.reconstruction == "masked" and self.training and bool(self.loss.weights["reconstruction"])

    @property
    def plain_outputs(self) -> bool:
        """Whether :meth:`encode` returns the image-space tensor alone (no text head, no dense head)."""
        return self.psat.text_head is None and self.dense_head is None

    def encode(self, volume: torch.Tensor, plane: torch.Tensor, position: torch.Tensor):
        """PSAT predictions for the given slices and the backbone's reconstruction.

        Args:
            volume: (B, C, D, H, W), z-scored intensities.
            plane, position: the slices, as in :meth:`forward`.

        Returns:
            ``(z3d, reconstruction)``: z3d (B, out_dim) or (B, K, out_dim), L2-normalised -- or, for a model with a
            text space of its own or a dense head (not :attr:`plain_outputs`), a :class:`SliceOutputs`;
            reconstruction the (B, C, D, H, W) tensor, or -- when :attr:`masks_input` (masked reconstruction in
            training mode) -- a :class:`MaskedReconstruction` of it and the mask drawn for this call, which
            :meth:`compute_losses` takes as it is. The mask comes from ``torch.rand`` on the volume's device (its
            global generator).
        """
        mask = None
        if self.masks_input:
            if volume.dim() != 5:
                self.backbone.check_input(volume)  # says what shape is expected
            mask = block_mask(volume.shape[0], volume.shape[2:], self.mask_ratio, self.mask_block, volume.device)
            tokens, reconstruction = self.backbone(volume.masked_fill(mask, 0))  # 0: the z-scored mean
            reconstruction = MaskedReconstruction(reconstruction, mask)
        else:
            tokens, reconstruction = self.backbone(volume)
        image, text = self.psat.forward_spaces(tokens, plane, position)
        if self.plain_outputs:
            return image, reconstruction
        dense = None
        if self.dense_head is not None and self.loss.weights["dense"]:
            grid = self.backbone.token_grid(volume.shape[2:])
            if grid[0] * grid[1] * grid[2] != tokens.shape[1]:
                raise ValueError(f"the backbone gave {tokens.shape[1]} tokens, not the {'x'.join(map(str, grid))} "
                                 f"grid its token_grid() describes")
            features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
            dense = self.dense_head(features, plane if plane.dim() == 2 else plane[:, None],
                                    position if position.dim() == 2 else position[:, None])
        return SliceOutputs(image, text, dense), reconstruction

    def forward(self, volume: torch.Tensor, plane: torch.Tensor, position: torch.Tensor,
                image_emb: Optional[torch.Tensor] = None, text_emb: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, map_target: Optional[torch.Tensor] = None,
                map_valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses for a batch of volumes with one or K slices each.

        Args:
            volume: (B, C, D, H, W).
            plane: (B,) or (B, K) long, 0 axial / 1 coronal / 2 sagittal.
            position: same shape, float relative slice positions in [0, 1] inside ``volume``.
            image_emb, text_emb: the slices' teacher embeddings, (B, E) or (B, K, E); ``None`` skips the term.
            mask: optional bool, same shape as ``plane``: which slices are real (a crop holding fewer than K cached
                slices pads with masked ones, which are left out of the alignment and of dense distillation).
            map_target, map_valid: dense distillation's targets (B, K, C, R, R) and valid points (B, K, R, R)
                (:func:`~med3dinsight_plugin.dense.crop_map_target` per sample); ``None`` skips the term.

        Returns:
            ``{"loss", "image", "text", "reconstruction", "dense"}`` (the terms present); the alignment runs over all
            (unmasked) B*K pairs.
        """
        z3d, reconstruction = self.encode(volume, plane, position)
        map_valid = real_slice_points(map_valid, mask)
        return self.compute_losses(z3d, reconstruction, volume, image_emb, text_emb, mask, map_target, map_valid)

    def compute_losses(self, z3d: Union[torch.Tensor, SliceOutputs],
                       reconstruction: Union[torch.Tensor, MaskedReconstruction],
                       volume: torch.Tensor, image_emb: Optional[torch.Tensor] = None,
                       text_emb: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       map_target: Optional[torch.Tensor] = None, map_valid: Optional[torch.Tensor] = None,
                       map_count: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The losses of :meth:`forward` from the outputs of :meth:`encode` (all B*K pairs aligned together).

        Args:
            z3d, reconstruction: what :meth:`encode` returned (a :class:`MaskedReconstruction` restricts the
                reconstruction MSE to its masked voxels). Under DDP the image/text predictions may be those of every
                rank, gathered; the dense ones stay this rank's.
            volume: the original (unmasked) input volume, the reconstruction target.
            image_emb, text_emb, mask: as in :meth:`forward` (matching the predictions' leading shape).
            map_target, map_valid: as in :meth:`forward`, for this rank's dense predictions; ``mask`` is not applied
                to them here: padding slices must already be False in ``map_valid`` (:meth:`forward` does that).
            map_count: the valid locations dense distillation averages over (see
                :func:`~med3dinsight_plugin.dense.dense_loss`); ``None``: those of ``map_valid``.

        Returns:
            ``{"loss", "image", "text", "reconstruction", "dense"}`` (the terms present).
        """
        voxel_mask = None
        if isinstance(reconstruction, MaskedReconstruction):
            reconstruction, voxel_mask = reconstruction
        outputs = z3d if isinstance(z3d, SliceOutputs) else SliceOutputs(z3d, None, None)
        image = outputs.image
        text = image if outputs.text is None else outputs.text
        for name, emb, pred in (("image_emb", image_emb, image), ("text_emb", text_emb, text)):
            if emb is not None and (emb.shape[:-1] != pred.shape[:-1]):
                raise ValueError(f"{name} must have shape {tuple(pred.shape[:-1])} + (E,) to match plane/position, "
                                 f"got {tuple(emb.shape)}")
        if mask is not None and mask.shape != image.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(image.shape[:-1])} to match plane/position, got "
                             f"{tuple(mask.shape)}")
        keep = None if mask is None else mask.reshape(-1).bool()

        def flat(t):
            if t is None:
                return None
            t = t.reshape(-1, t.shape[-1])
            return t if keep is None else t[keep]
        dense = None
        if outputs.dense is not None and map_target is not None:
            dense = (outputs.dense, map_target, map_valid, map_count)
        return self.loss(flat(image), flat(image_emb), flat(text_emb), reconstruction, volume, voxel_mask,
                         z_text=flat(outputs.text), dense=dense)
