"""The one plane / slice-position convention shared by PSAT, the teacher pipeline and the pretraining data.

Planes are integers: ``0`` axial, ``1`` coronal, ``2`` sagittal.

A slice is located by its *relative position* in ``[0, 1]`` along the plane's normal axis, measured at voxel centres:
slice index ``i`` of ``n`` lies at ``(i + 0.5) / n`` (the ``align_corners=False`` convention). This makes positions
independent of the volume size and of resampling, and keeps the crop mapping exact: a slice at index ``i`` of a volume
lies at ``(i - start + 0.5) / length`` inside the crop ``[start, start + length)``.

Which array axis is the normal of which plane depends on how the volume was read:

====================================  ====================  =============================================
array layout                          normal axis (A, C, S)  position grows toward
====================================  ====================  =============================================
``"zyx"``: nnU-Net / SimpleITK        (0, 1, 2)             +z, +y, +x of the image grid; for an identity
arrays (``sitk.GetArrayFromImage``)                         direction (LPS) that is superior, posterior,
                                                            patient's left
``"xyz"``: RAS-canonical NIfTI        (2, 1, 0)             superior, anterior, patient's right
(``nibabel.as_closest_canonical``)
====================================  ====================  =============================================

nnU-Net *preprocessed* arrays are additionally transposed by the plans' ``transpose_forward``; map the axis through
it (``axis_after = transpose_forward.index(axis_before)``) before calling :func:`normal_axis` on raw-order axes.
"""
from __future__ import annotations

import math
from typing import Union

import torch

PLANES = ("axial", "coronal", "sagittal")
AXIAL, CORONAL, SAGITTAL = 0, 1, 2

_NORMAL_AXES = {"zyx": (0, 1, 2), "xyz": (2, 1, 0)}

PlaneLike = Union[int, str]


def plane_id(plane: PlaneLike) -> int:
    """Return the integer id of ``plane`` given as 0..2 or a name (``"axial"``, ``"coronal"``, ``"sagittal"``)."""
    if isinstance(plane, str):
        key = plane.strip().lower()
        if key not in PLANES:
            raise ValueError(f"unknown plane {plane!r}: expected one of {PLANES}")
        return PLANES.index(key)
    if isinstance(plane, bool) or not isinstance(plane, int) or not 0 <= plane <= 2:
        raise ValueError(f"plane must be 0 (axial), 1 (coronal) or 2 (sagittal), got {plane!r}")
    return plane


def normal_axis(plane: PlaneLike, layout: str = "zyx") -> int:
    """Array axis (of a spatial-only 3D array) perpendicular to ``plane`` for the given ``layout``.

    Args:
        plane: plane id or name.
        layout: ``"zyx"`` for nnU-Net / SimpleITK arrays, ``"xyz"`` for RAS-canonical NIfTI arrays.
    """
    if layout not in _NORMAL_AXES:
        raise ValueError(f"unknown array layout {layout!r}: expected one of {sorted(_NORMAL_AXES)}")
    return _NORMAL_AXES[layout][plane_id(plane)]


def slice_position(index: int, size: int) -> float:
    """Relative position in (0, 1) of slice ``index`` of an axis with ``size`` slices (voxel-centre convention)."""
    if size < 1 or not 0 <= index < size:
        raise ValueError(f"slice index {index} is outside an axis of {size} slices")
    return (index + 0.5) / size


def slice_index(position: float, size: int) -> int:
    """Nearest slice index for a relative ``position`` in [0, 1] on an axis with ``size`` slices."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"slice position must lie in [0, 1], got {position}")
    return min(size - 1, max(0, math.floor(position * size)))


def crop_position(index: int, start: int, length: int) -> float:
    """Relative position of volume slice ``index`` inside the crop ``[start, start + length)``."""
    return slice_position(index - start, length)


def position_bins(position: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin relative positions in [0, 1] into ``num_bins`` equal bins (1.0 falls into the last bin)."""
    return (position * num_bins).floor().long().clamp_(0, num_bins - 1)


def check_plane_position(plane: torch.Tensor, position: torch.Tensor, batch: int) -> None:
    """Validate PSAT slice arguments at the API boundary; raise ``ValueError`` naming what was expected.

    ``plane`` (long) and ``position`` (float) must both have shape ``(batch,)`` or ``(batch, K)``.
    """
    for name, t in (("plane", plane), ("position", position)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B,) or (B, K), got {type(t).__name__}")
        if t.dim() not in (1, 2) or t.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) or ({batch}, K), got {tuple(t.shape)}")
    if plane.shape != position.shape:
        raise ValueError(f"plane and position must have the same shape, got {tuple(plane.shape)} and "
                         f"{tuple(position.shape)}")
    if plane.dtype.is_floating_point or plane.dtype == torch.bool:
        raise ValueError(f"plane must be an integer tensor (0 axial, 1 coronal, 2 sagittal), got {plane.dtype}")
    if not position.dtype.is_floating_point:
        raise ValueError(f"position must be a float tensor of relative positions in [0, 1], got {position.dtype}")
    if plane.numel() and (int(plane.min()) < 0 or int(plane.max()) > 2):
        raise ValueError(f"plane values must be 0 (axial), 1 (coronal) or 2 (sagittal), got values in "
                         f"[{int(plane.min())}, {int(plane.max())}]")
    if position.numel():
        lo, hi = float(position.min()), float(position.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"position values must be relative positions in [0, 1], got values in [{lo}, {hi}]")

