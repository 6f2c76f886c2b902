"""Dense distillation: a 2D teacher's feature map of a slice as the target of the 3D features at that slice's voxels.

The paper aligns one global vector per slice (:mod:`.alignment`). Dense distillation, an option beside it, matches
the teacher's *spatial* feature map of the slice (cached by ``med3dinsight embed --feature-maps S``) with the
encoder's bottleneck features sampled on the same slice, location by location, through a light linear head.

Geometry, in the convention of :mod:`.planes`: a slice of plane ``p`` at relative position ``t`` of the crop is the
set of points whose canonical axis ``p`` sits at fraction ``t``; its two in-plane axes ``(a, b)`` are the other two
canonical axes in increasing order. Both sides are sampled on the same ``R x R`` grid of points at fractions
``(i + 0.5) / R`` of the crop along ``a`` (rows) and ``b`` (columns):

* :func:`sample_slice_features` reads the 3D feature map there (trilinear, inside the model);
* :func:`crop_map_target` reads the cached teacher map there (bilinear, in the data loader). A cached map covers the
  whole slice of the volume as read (``map[:, i, j]`` at fractions ``((i + 0.5) / S, (j + 0.5) / S)`` along
  ``(a, b)``), so a crop's points are mapped into the volume's fractions first; points outside the volume (a crop
  padded beyond it) are marked invalid and left out of the loss.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import Med3DInsightError

__all__ = ["DENSE_LOSSES", "DenseHead", "crop_map_target", "dense_loss", "real_slice_points", "sample_slice_features",
           "slice_grid"]

DENSE_LOSSES = ("cosine", "mse")


def _in_plane_axes(plane: int) -> Tuple[int, int]:
    return tuple(a for a in range(3) if a != plane)  # type: ignore[return-value]


def slice_grid(plane: torch.Tensor, position: torch.Tensor, size: int) -> torch.Tensor:
    """The canonical fractions of a ``size x size`` grid of points on each slice.

    Args:
        plane: (B, K) long plane ids (0 axial, 1 coronal, 2 sagittal).
        position: (B, K) relative positions of the slices along their plane's normal, in [0, 1].
        size: R, points per in-plane axis.

    Returns:
        (B, K, R, R, 3): for point (i, j) of slice (b, k), its fraction along canonical axes (D, H, W); the in-plane
        axes (a, b) of the plane take ``(i + 0.5) / R`` and ``(j + 0.5) / R``, the normal axis the position.
    """
    u = (torch.arange(size, device=position.device, dtype=torch.float32) + 0.5) / size
    rows, cols = u[:, None].expand(size, size), u[None, :].expand(size, size)
    templates, normals = [], []
    for p in range(3):
        a, b = _in_plane_axes(p)
        t = torch.zeros(size, size, 3, device=position.device)
        t[..., a], t[..., b] = rows, cols
        templates.append(t)
        normals.append(torch.nn.functional.one_hot(torch.tensor(p), 3).float())
    template = torch.stack(templates)[plane]  # (B, K, R, R, 3)
    normal = torch.stack(normals).to(position.device)[plane]  # (B, K, 3)
    return template + (normal * position.float()[..., None])[:, :, None, None, :]


def sample_slice_features(features: torch.Tensor, plane: torch.Tensor, position: torch.Tensor,
                          size: int) -> torch.Tensor:
    """The 3D feature map sampled (trilinearly) on a ``size x size`` grid of each slice.

    Args:
        features: (B, C, d, h, w) features covering the crop (e.g. the bottleneck on its grid).
        plane, position: (B, K) the slices (see :func:`slice_grid`).
        size: R.

    Returns:
        (B, K, R, R, C).
    """
    if features.dim() != 5:
        raise ValueError(f"features must be (B, C, d, h, w), got {tuple(features.shape)}")
    grid = slice_grid(plane, position, size) * 2 - 1  # align_corners=False: -1 / +1 are the outer voxel edges
    grid = grid.flip(-1).to(features.dtype)  # canonical (D, H, W) -> grid_sample's (x=W, y=H, z=D)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 4, 1)  # (B, C, K, R, R) -> (B, K, R, R, C)


def crop_map_target(maps: np.ndarray, plane: Sequence[int], low: Sequence[float], high: Sequence[float],
                    size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The cached teacher maps of a crop's slices, resampled onto the crop's ``size x size`` slice grids.

    Args:
        maps: (K, C, S, S) the slices' cached maps over the whole slice of the volume as read (see the module doc).
        plane: (K,) the slices' planes.
        low, high: the crop's extent as fractions of the volume as read along canonical (D, H, W); a crop padded
            beyond the volume reaches below 0 or above 1.
        size: R.

    Returns:
        ``(target, valid)``: (K, C, R, R) float32 and (K, R, R) bool, False where the point lies outside the volume.
    """
    maps_t = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    k = maps_t.shape[0]
    u = (np.arange(size) + 0.5) / size
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    grids, valid = np.empty((k, size, size, 2), np.float32), np.empty((k, size, size), bool)
    for s, p in enumerate(plane):
        a, b = _in_plane_axes(int(p))
        fa, fb = low[a] + u * (high[a] - low[a]), low[b] + u * (high[b] - low[b])
        grids[s, ..., 0] = 2 * fb[None, :] - 1  # x: the map's columns (axis b)
        grids[s, ..., 1] = 2 * fa[:, None] - 1  # y: its rows (axis a)
        valid[s] = ((fa >= 0) & (fa <= 1))[:, None] & ((fb >= 0) & (fb <= 1))[None, :]
    target = F.grid_sample(maps_t, torch.from_numpy(grids), mode="bilinear", padding_mode="border",
                           align_corners=False)
    return target.numpy(), valid


class DenseHead(nn.Module):
    """The light head of dense distillation: a linear map from the 3D features to the teacher map's channels.

    Args:
        in_dim: the 3D features' width (the backbone's token width).
        out_dim: the teacher map's channels C.
        size: R, the points per in-plane axis of each slice's grid (the cached maps' size S).
    """

    def __init__(self, in_dim: int, out_dim: int, size: int):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Med3DInsightError(f"dense head {name} must be a positive integer, got {value!r}")
        self.in_dim, self.out_dim, self.size = in_dim, out_dim, size
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor, plane: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(B, C3, d, h, w) features, (B, K) slices -> (B, K, R, R, out_dim) predictions on the slices' grids."""
        return self.proj(sample_slice_features(features, plane, position, self.size))


def real_slice_points(map_valid: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The valid points of dense distillation without those of padding slices.

    Args:
        map_valid: (B, K, R, R) bool, the teacher map's valid points per slice, or ``None``.
        mask: which of the B x K slices are real (any shape with B*K elements), or ``None``: all.

    Returns:
        ``map_valid`` with every point of a padding slice False (``map_valid`` itself when either is ``None``).
    """
    if map_valid is None or mask is None:
        return map_valid
    return map_valid & mask.reshape(map_valid.shape[:2])[..., None, None].bool()


def dense_loss(pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None,
               kind: str = "cosine", count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-location distance between predicted and teacher features, averaged over the valid locations.

    Args:
        pred: (..., R, R, C) predictions (:class:`DenseHead`).
        target: (..., C, R, R) teacher features (:func:`crop_map_target`, batched).
        valid: (..., R, R) bool, or ``None`` for all; an all-False mask gives 0.
        kind: ``"cosine"``: 1 - cosine similarity per location; ``"mse"``: mean squared error over the channels.
        count: the number of valid locations to average over, instead of this call's own (under DDP: the global
            count over the ranks divided by their number, so that DDP's averaging of the ranks' gradients gives
            exactly the mean over the global batch).

    Returns:
        Scalar float32 loss.
    """
    if kind not in DENSE_LOSSES:
        raise Med3DInsightError(f"dense loss must be one of {', '.join(map(repr, DENSE_LOSSES))}, got {kind!r}")
    target = target.movedim(-3, -1)
    if pred.shape != target.shape:
        raise ValueError(f"dense predictions {tuple(pred.shape)} and targets {tuple(target.shape)} (channels moved "
                         f"last) differ: the head's width must equal the teacher map's channels")
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        per = 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    else:
        per = (pred - target).square().mean(-1)
    if valid is None:
        return per.mean()
    valid = valid.bool()
    return torch.where(valid, per, 0.0).sum() / (valid.sum() if count is None else count).clamp_min(1)
