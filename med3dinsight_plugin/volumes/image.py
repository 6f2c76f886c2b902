"""Reading one 3D image file into the canonical array orientation.

:func:`read_image` reads a NIfTI file with nibabel and any other format (an nnU-Net dataset's ``.mha``/``.nrrd``)
with SimpleITK, its header's claim checked first (:mod:`.headers`), and refuses non-3D, thin, badly placed, NaN or
constant volumes; :func:`canonical_axes` says how to turn its array into the canonical ``(C, D, H, W)`` LPS one held
by a :class:`Volume`. nibabel and SimpleITK are imported inside the functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import first_line, short_repr
from .common import NIFTI_ENDINGS, VolumeError
from .headers import _check_claimed_size, _sitk_reader, _stderr_to

_FINGERPRINT_SAMPLES = 4096
MIN_VOXELS = 2  # along every axis: a volume thinner than this is a slice (slices and crops need two)


@dataclass
class Volume:
    """One case in canonical orientation.

    Attributes:
        case: case identifier.
        array: ``(C, D, H, W)`` float32, axes toward superior, posterior, patient's left.
        spacing: voxel size in mm along the three canonical axes.
        modality: ``"ct"`` or ``"mri"``.
        normalized: ``True`` for nnU-Net preprocessed arrays (already normalised by nnU-Net).
        ct_stats: ``(mean, std)`` that nnU-Net's CT normalisation divided by, to recover Hounsfield units.
        scanner: for nnU-Net preprocessed data with their raw images, a function returning the ``(C, D, H, W)``
            array in scanner units on the same canonical grid as ``array`` (computed on first use, then kept).
    """

    case: str
    array: np.ndarray
    spacing: Tuple[float, float, float]
    modality: str
    normalized: bool = False
    ct_stats: Optional[Tuple[float, float]] = None
    files: List[str] = field(default_factory=list)
    scanner: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape[1:])

    def fingerprint(self) -> str:
        """A cheap content fingerprint of the array as read: shape, spacing, a fixed strided sample of voxels and the
        central slice of every plane and channel.

        Computed from the canonical array, so the same image stored in another orientation, compression or file
        format (same voxel values) has the same fingerprint, while another image with the same case name and shape
        almost surely has not. A teacher cache records it per case (``TeacherCache.fingerprint``).
        """
        a = np.ascontiguousarray(self.array, dtype=np.float32)
        h = hashlib.sha256(json.dumps({"shape": list(a.shape), "spacing": [round(float(s), 4) for s in self.spacing]},
                                      sort_keys=True).encode())
        flat = a.reshape(-1)
        step = max(1, flat.size // _FINGERPRINT_SAMPLES)
        parts = [flat[::step][:_FINGERPRINT_SAMPLES]]
        for c in range(a.shape[0]):
            parts += [a[c, a.shape[1] // 2], a[c, :, a.shape[2] // 2], a[c, :, :, a.shape[3] // 2]]
        for part in parts:
            h.update((np.ascontiguousarray(part, dtype=np.float32) + np.float32(0)).tobytes())  # -0.0 as 0.0
        return f"v1:{h.hexdigest()[:32]}"

    def native(self, channel: int = 0) -> np.ndarray:
        """One channel in scanner units where known (Hounsfield units for CT, also after nnU-Net normalisation: from
        the raw image on the preprocessed grid when it is available, else by undoing the z-score)."""
        if self.scanner is not None:
            if not isinstance(self.scanner, np.ndarray):
                self.scanner = self.scanner()
            return self.scanner[channel]
        data = self.array[channel]
        if self.normalized and self.ct_stats is not None:
            return data * np.float32(self.ct_stats[1]) + np.float32(self.ct_stats[0])
        return data


def canonical_axes(direction: np.ndarray, array_axes_to_index: Sequence[int] = (2, 1, 0)):
    """How to permute and flip an array into canonical LPS orientation.

    Args:
        direction: 3x3 direction matrix (SimpleITK, LPS world); column ``i`` is image index axis ``i``.
        array_axes_to_index: image index axis of each array axis (``(2, 1, 0)`` for ``GetArrayFromImage``).

    Returns:
        ``(permutation, flips)``: ``np.transpose(array, permutation)`` then flipping the axes in ``flips`` gives the
        canonical array (axis 0 superior, 1 posterior, 2 patient's left).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    world = []  # dominant world axis (0 L, 1 P, 2 S) and its sign, per array axis
    for index_axis in array_axes_to_index:
        v = d[:, index_axis]
        w = int(np.argmax(np.abs(v)))
        world.append((w, 1 if v[w] >= 0 else -1))
    if sorted(w for w, _ in world) != [0, 1, 2]:
        raise VolumeError(f"direction matrix {d.tolist()} does not map the image axes to three distinct anatomical "
                          f"axes (oblique by 45 degrees?); resample the volume to an axis-aligned grid")
    permutation = [next(a for a, (w, _) in enumerate(world) if w == 2 - c) for c in range(3)]
    flips = tuple(c for c, a in enumerate(permutation) if world[a][1] < 0)
    return tuple(permutation), flips


def _to_canonical(array: np.ndarray, spacing: Sequence[float], permutation, flips):
    out = np.transpose(array, (0, *(1 + p for p in permutation)))
    if flips:
        out = np.flip(out, axis=tuple(1 + f for f in flips))
    return np.ascontiguousarray(out, dtype=np.float32), tuple(float(spacing[p]) for p in permutation)


def _check_values(array: np.ndarray, path: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise VolumeError(f"{path} has {bad} NaN/Inf voxels; repair the file or remove it from the dataset")
    if array.size and float(array.min()) == float(array.max()):
        raise VolumeError(f"{path} is constant (every voxel is {float(array.min()):g}); remove it from the dataset")


def read_image(path: str) -> Tuple[np.ndarray, Tuple[float, ...], np.ndarray, Tuple[int, ...]]:
    """One 3D image file -> ``(array, spacing, direction, array_axes_to_index)`` for :func:`canonical_axes`.

    NIfTI goes through nibabel: SimpleITK's NIfTI reader turns NaN voxels into 0 and zero-fills a truncated
    ``.nii.gz`` without complaint, which would hide exactly the files that must be refused. Other formats (an
    nnU-Net dataset's ``.mha``/``.nrrd``) go through SimpleITK. Bad files raise :class:`VolumeError`.
    """
    if str(path).endswith(NIFTI_ENDINGS):
        array, spacing, direction, axes = _read_nifti(path)
    else:
        array, spacing, direction, axes = _read_sitk(path)
    if array.ndim > 3:
        raise VolumeError(f"{path} is {array.ndim}D (shape {array.shape}); Med3DInsight reads 3D volumes: split 4D "
                          f"series or channels into one 3D file each (nnU-Net raw: _0000, _0001, ...)")
    if array.ndim < 3:
        raise VolumeError(f"{path} is {array.ndim}D (shape {array.shape}), a single image, not a volume; Med3DInsight "
                          f"reads 3D volumes: stack the slices of the series into one 3D file, or remove it")
    _check_shape(array.shape, path)
    _check_geometry(path, spacing, direction)
    _check_values(array, path)
    return array, spacing, direction, axes


def _check_shape(shape: Sequence[int], path: str) -> None:
    """A volume must have at least :data:`MIN_VOXELS` voxels along each axis (slices are rendered, and crops cut,
    along all three)."""
    if min(shape) < MIN_VOXELS:
        raise VolumeError(f"{path} is {'x'.join(map(str, shape))} voxels: fewer than {MIN_VOXELS} along an axis, a "
                          f"slice rather than a volume, which cannot be sliced in three planes; remove it from the "
                          f"dataset, or stack the slices of its series into one 3D file")


def _check_geometry(path: str, spacing: Sequence[float], direction: np.ndarray) -> None:
    """The voxel size must be positive and finite and the direction matrix finite (a damaged affine or spacing)."""
    sp, d = np.asarray(spacing, dtype=np.float64), np.asarray(direction, dtype=np.float64)
    if np.isfinite(sp).all() and np.isfinite(d).all() and (sp > 0).all():
        return
    finite = np.isfinite(sp).all() and np.isfinite(d).all()
    raise VolumeError(f"{path}: its header's geometry is {'a zero voxel size' if finite else 'not finite'} (voxel "
                      f"size {short_repr(sp.tolist(), 60)}, direction {short_repr(d.tolist(), 100)}); repair its "
                      f"affine / spacing (e.g. copy them from a good scan of the series) or re-export the file")


def _read_nifti(path: str):
    import nibabel as nib

    if not os.path.isfile(path):
        raise VolumeError(f"{path} is {'a folder' if os.path.isdir(path) else 'not a regular file'}, not a NIfTI "
                          f"file; move it out of the dataset folder")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel/zlib/gzip raise many types for damaged files
        raise VolumeError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"the file is damaged or truncated: re-export or remove it") from None
    _check_claimed_size(str(path), img.header)  # before any voxel is read: a damaged header can claim gigabytes
    try:
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise VolumeError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"the file is damaged or truncated: re-export or remove it") from None
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) is 3D
        array = array[..., 0]
    if array.ndim != 3:
        return array, (), np.eye(3), (0, 1, 2)
    return (array, *_nifti_geometry(img.affine))


def _nifti_geometry(affine):
    """``(spacing, LPS direction, array_axes_to_index)`` of a NIfTI affine (RAS world)."""
    lps = np.asarray(affine, dtype=np.float64)[:3, :3] * np.array([[-1.0], [-1.0], [1.0]])  # RAS -> LPS
    spacing = np.linalg.norm(lps, axis=0)
    return tuple(float(v) for v in spacing), lps / np.where(spacing > 0, spacing, 1.0), (0, 1, 2)


def _read_geometry(path: str):
    """``(spacing, direction, array_axes_to_index)`` of a 3D image file from its header, as :func:`read_image`
    gives them."""
    try:
        if str(path).endswith(NIFTI_ENDINGS):
            import nibabel as nib

            geometry = _nifti_geometry(nib.load(str(path)).affine)
            _check_geometry(path, geometry[0], geometry[1])
            return geometry
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.GetDimension() != 3:
            raise ValueError(f"{reader.GetDimension()}D")
        geometry = tuple(reader.GetSpacing())[::-1], np.array(reader.GetDirection()).reshape(3, 3), (2, 1, 0)
    except Exception as e:  # nibabel / SimpleITK raise many types for damaged headers
        raise VolumeError(f"cannot read the header of {path} ({type(e).__name__}: {first_line(e)}); re-export or "
                          f"remove the file") from None
    _check_geometry(path, geometry[0], geometry[1])
    return geometry


def _read_sitk(path: str):
    import SimpleITK as sitk

    reader = _sitk_reader(path)
    printed: List[str] = []
    try:
        with _stderr_to(printed):
            image = reader.Execute()
            array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    except RuntimeError as e:
        # the header was read: its voxel data is what fails (ITK's last line is often a stale errno, "No such file")
        reason = printed[0] if printed else first_line(e)
        raise VolumeError(f"cannot read the voxel data of {path} ({short_repr(reason, 120)}); the file is truncated or "
                          f"damaged: re-export or remove it") from None
    if printed:  # warnings of a file that was read: shown as before
        print("\n".join(printed), file=sys.stderr)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return array, (), np.eye(3), (2, 1, 0)
    return array, tuple(image.GetSpacing())[::-1], np.array(image.GetDirection()).reshape(3, 3), (2, 1, 0)
