"""Fixed crops of a dataset's volumes, each a case of its own: what the teacher sees is exactly what the encoder sees.

``CropSource(source, per_volume=M, size_mm=(S, P, L))`` wraps a :class:`~med3dinsight_plugin.volumes.VolumeSource`:
every volume ``CASE`` gives M cases ``CASE@0`` ... ``CASE@{M-1}``, each the sub-volume of one box of ``size_mm``
(canonical axes: superior, posterior, left) whose centre is drawn inside the body's bounding box. A box larger than
a volume, or thinner than two voxels, along an axis is refused, naming the case (:func:`crop_voxels`). The boxes are
a pure function of ``(seed, CASE, the volume's shape and spacing)``, so ``slices``, ``caption``, ``embed`` and
``pretrain`` given the same settings cut the same boxes, and each box's content fingerprint (recorded in the teacher
cache) proves it when pretraining prepares it.

Rendered slices of a crop case cover the crop's in-plane field of view only, so captions and embeddings describe the
crop. With ``data.view: volume`` each sample is then one whole crop (its body box resampled to the patch), so the
encoder sees what the teacher saw, at about the resolution of ``size_mm`` / patch. Cost: M times the captions and
embeddings of whole-volume slicing (the same slices per plane per case), and M reads of each volume when embedding.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .errors import Med3DInsightError
from .slices import body_box
from .volumes import MIN_VOXELS, VolumeError

__all__ = ["CropSource", "crop_boxes", "crop_voxels", "split_crop_case"]

SEPARATOR = "@"


def split_crop_case(case: str) -> Tuple[str, int]:
    """``"CASE@m"`` -> ``("CASE", m)``."""
    base, _, index = case.rpartition(SEPARATOR)
    if not base or not index.isdigit():
        raise Med3DInsightError(f"{case!r} is not a crop case (CASE{SEPARATOR}N)")
    return base, int(index)


def crop_boxes(case: str, shape: Sequence[int], spacing: Sequence[float], body: Sequence[Sequence[int]],
               per_volume: int, size_mm: Sequence[float], seed: int = 0) -> List[List[List[int]]]:
    """The ``per_volume`` boxes ``[[start, stop], ...]`` (canonical axes) of one volume.

    Args:
        case: the volume's case name (part of the random stream, so volumes get different boxes).
        shape, spacing: the volume's canonical shape and voxel size (mm).
        body: the body's bounding box (``pretrain.data.body_box``); each box's centre is drawn inside it.
        per_volume: M.
        size_mm: the box's extent in mm per canonical axis (at most the volume's, at least two voxels).
        seed: the crop seed.

    Returns:
        M boxes, each ``[[start, stop]] * 3`` inside the volume.

    Raises:
        VolumeError: the crop is larger than the volume, or thinner than two voxels, along an axis
            (:func:`crop_voxels`).
    """
    size = crop_voxels(case, shape, spacing, size_mm)
    digest = hashlib.sha256(f"{seed}:{case}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    boxes = []
    for _ in range(per_volume):
        box = []
        for n, k, (lo, hi) in zip(shape, size, body):
            centre = int(rng.integers(lo, max(lo + 1, hi)))
            start = min(max(0, centre - k // 2), n - k)
            box.append([start, start + k])
        boxes.append(box)
    return boxes


_AXES = ("superior", "posterior", "left")


def _axes(indices: Sequence[int]) -> str:
    """``[0, 2]`` -> ``"superior and left axes"``."""
    names = [_AXES[i] for i in indices]
    return (f"{', '.join(names[:-1])} and {names[-1]} axes" if len(names) > 1 else f"{names[0]} axis")


def crop_voxels(case: str, shape: Sequence[int], spacing: Sequence[float], size_mm: Sequence[float]) -> List[int]:
    """The crop's size in voxels of one volume, per canonical axis: ``size_mm`` / spacing, rounded.

    A crop larger than the volume along an axis is refused, not clipped: its crops would be smaller in mm than the
    other volumes' (and, larger along every axis, M copies of the whole volume); so is a crop thinner than
    :data:`~med3dinsight_plugin.volumes.MIN_VOXELS` voxels along an axis, which cannot be sliced in three planes.

    Raises:
        VolumeError: one line naming the case, the crop's and the volume's sizes and the fix.
    """

    size = [int(round(float(mm) / float(s))) for mm, s in zip(size_mm, spacing)]
    mm = "x".join(f"{float(x):g}" for x in size_mm)
    at = f"{mm} mm crops are {'x'.join(map(str, size))} voxels at case {case}'s spacing " \
         f"({'x'.join(f'{float(s):g}' for s in spacing)} mm)"
    over = [a for a in range(3) if size[a] > shape[a]]
    if over:
        fits = " ".join(f"{n * float(sp):g}" for n, sp in zip(shape, spacing))
        raise VolumeError(f"{at}, larger than its {'x'.join(map(str, shape))}-voxel volume along the {_axes(over)}; "
                          f"pass a --crop-mm (data.crop_mm) that fits every volume (this one: at most {fits} mm), or "
                          f"remove case {case} from the dataset")
    thin = [a for a in range(3) if size[a] < MIN_VOXELS]
    if thin:
        need = " ".join(f"{MIN_VOXELS * float(sp):g}" for sp in spacing)
        raise VolumeError(f"{at}, fewer than {MIN_VOXELS} voxels along the {_axes(thin)}; pass a larger --crop-mm "
                          f"(data.crop_mm): at least {need} mm here")
    return size


class CropSource:
    """``per_volume`` fixed crops of every volume of ``source``, each read as a case ``CASE@m``.

    Args:
        source: the :class:`~med3dinsight_plugin.volumes.VolumeSource` to crop.
        per_volume: M, crops per volume (at least 1).
        size_mm: (superior, posterior, left) extent of a crop in mm, e.g. the patch size times the target spacing.
        seed: the crop seed (recorded by :meth:`describe`).

    It has the interface the rest of the package reads (``cases``, ``read``, ``spacing``, ``describe``,
    ``modality``, ``num_channels``, ``kind``, ``root``).
    """

    def __init__(self, source, per_volume: int, size_mm: Sequence[float], seed: int = 0):
        if isinstance(per_volume, bool) or not isinstance(per_volume, int) or per_volume < 1:
            raise Med3DInsightError(f"crops per volume must be a positive integer, got {per_volume!r}")
        size_mm = [float(x) for x in size_mm]
        if len(size_mm) != 3 or not all(np.isfinite(x) and x > 0 for x in size_mm):
            raise Med3DInsightError(f"the crop size must be three positive lengths in mm, got {size_mm!r}")
        self.source, self.per_volume, self.size_mm, self.seed = source, per_volume, size_mm, int(seed)
        self.kind, self.root, self.modality = source.kind, source.root, source.modality
        self.num_channels, self.modality_reason = source.num_channels, source.modality_reason
        self.cases = [f"{c}{SEPARATOR}{m}" for c in source.cases for m in range(per_volume)]
        self._last: Tuple[str, Any, List] = ("", None, [])

    def __len__(self) -> int:
        return len(self.cases)

    def describe(self) -> Dict[str, Any]:
        """The wrapped source's description plus the crop settings."""
        return {**self.source.describe(), "crops": {"per_volume": self.per_volume, "size_mm": self.size_mm,
                                                    "seed": self.seed}}

    @staticmethod
    def volume_of(case: str) -> str:
        """The volume a crop case comes from: ``"CASE@m"`` -> ``"CASE"``."""
        return split_crop_case(case)[0]

    def spacing(self, case: str) -> Tuple[float, float, float]:
        return self.source.spacing(self.volume_of(case))

    def boxes(self, base: str) -> Tuple[Any, List[List[List[int]]]]:
        """The volume ``base`` (read once and kept until another is asked for) and its crop boxes."""
        if self._last[0] != base:

            volume = self.source.read(base)
            self._last = (base, volume, crop_boxes(base, volume.shape, volume.spacing, body_box(volume),
                                                   self.per_volume, self.size_mm, self.seed))
        return self._last[1], self._last[2]

    def read(self, case: str):
        """The crop ``CASE@m``: a :class:`~med3dinsight_plugin.volumes.Volume` of the box's voxels, same spacing;
        its :meth:`~med3dinsight_plugin.volumes.Volume.native` is the whole volume's, cut to the box."""

        base, m = split_crop_case(case)
        if base not in self.source.cases or m >= self.per_volume:
            raise VolumeError(f"case {case!r} is not one of the {self.per_volume} crops per volume of "
                              f"{self.source.root}")
        volume, boxes = self.boxes(base)
        cut = (slice(None),) + tuple(slice(a, b) for a, b in boxes[m])
        scanner = None
        if volume.scanner is not None:
            channels = range(volume.array.shape[0])
            scanner = lambda: np.stack([volume.native(c) for c in channels])[cut]
        return replace(volume, case=case, array=np.ascontiguousarray(volume.array[cut]), scanner=scanner)
