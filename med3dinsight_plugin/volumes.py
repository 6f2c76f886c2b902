"""Reading unlabeled volumes: a folder of NIfTI files, an nnU-Net raw dataset or an nnU-Net preprocessed dataset.

Every volume comes out in one *canonical* array orientation, whatever its file says: ``(C, D, H, W)`` with the axes
pointing superior, posterior and to the patient's left (LPS; the ``"zyx"`` layout of :mod:`.planes`, so axis 0 is
the axial normal, 1 the coronal, 2 the sagittal). The teacher renders slices of this array and the pretraining data
crops it, so a slice's (plane, position) means the same thing to both.

nibabel reads NIfTI and SimpleITK (an nnU-Net dependency) the other formats (:func:`read_image` says why);
nnU-Net's own helpers find a raw dataset's cases. nnU-Net's
preprocessed ``.pkl`` properties are read with an allow-listed unpickler (numpy arrays and builtins only).

The teacher sees scanner units. For an nnU-Net preprocessed dataset whose raw dataset is found (``raw=``, else
``$nnUNet_raw/<dataset_name>``), :meth:`Volume.native` is the raw image put through nnU-Net's own preprocessing
(its reader, transpose, crop to non-zero and resampling) without the normalisation, so it lies voxel for voxel on
the preprocessed grid in Hounsfield units: air, fat and bone keep their contrast, which nnU-Net's clip to the
foreground percentiles removes. Without the raw dataset it falls back to undoing the z-score (clipped values).

No voxel is read before the file's header has been checked (:func:`check_claimed_size`, every reader): a header
claiming more voxel data than the file holds (uncompressed), or than its compressed bytes can expand to (1032-fold,
deflate's limit), is refused as truncated or damaged, and so is a volume larger than ``$MED3DINSIGHT_MAX_VOLUME_GB``
gigabytes as float32 (default 8; raise it for larger real volumes), before anything is allocated.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import Med3DInsightError, first_line, short_repr

__all__ = ["Volume", "VolumeError", "VolumeSource", "canonical_axes", "check_claimed_size", "open_source",
           "safe_load_pickle"]

NIFTI_ENDINGS = (".nii.gz", ".nii")
_FINGERPRINT_SAMPLES = 4096
MAX_COMPRESSION_RATIO = 1032  # deflate never expands a stream more (RFC 1951, 258-byte matches); see check_claimed_size
MAX_VOLUME_ENV = "MED3DINSIGHT_MAX_VOLUME_GB"  # the largest volume read, in GB of float32 voxels
DEFAULT_MAX_VOLUME_GB = 8.0
_MODALITY_PROBE_CASES = 3  # --modality auto on a NIfTI folder looks at this many cases
MIN_VOXELS = 2  # along every axis: a volume thinner than this is a slice (slices and crops need two)


class VolumeError(Med3DInsightError):
    """A volume or dataset that cannot be used; the message names the file and what to do."""


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


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return ""


# ------------------------------------------------------------------------------------------- claimed sizes
#
# Every reader (NIfTI, SimpleITK's .mha/.nrrd/..., nnU-Net's preprocessed .b2nd/.npy/.npz) reads its file's header
# first and passes what it claims to check_claimed_size before any voxel is read or any array allocated: a damaged or
# crafted header of a few hundred bytes can claim gigabytes, which the libraries would allocate before failing.


def _max_volume_bytes() -> float:
    """The largest volume read, in bytes of float32 voxels: ``$MED3DINSIGHT_MAX_VOLUME_GB`` (default 8) x 1e9."""
    text = os.environ.get(MAX_VOLUME_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOLUME_GB * 1e9
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not (np.isfinite(gb) and gb > 0):
        raise VolumeError(f"{MAX_VOLUME_ENV}={short_repr(text, 40)} is not a positive number of gigabytes; set it to "
                          f"e.g. 32, or unset it for the default {DEFAULT_MAX_VOLUME_GB:g}")
    return gb * 1e9


def check_claimed_size(path: str, shape: Sequence[int], dtype: Any, size: Optional[int], offset: int = 0,
                       uncompressed: bool = False, held_in: str = "the file", fix: str = "re-export or remove it") \
        -> None:
    """Refuse, before anything is allocated, a file whose header claims voxels that cannot be real or are too many.

    The one check every reader makes with what the file's header claims (read without the voxel data):

    * the voxel type must be real numbers (not complex, RGB or other records);
    * the volume as float32 (what every reader makes of it) must fit ``$MED3DINSIGHT_MAX_VOLUME_GB`` (default 8 GB);
    * uncompressed data (``uncompressed``): ``size`` (the bytes of ``held_in``) must cover ``offset`` plus the claimed
      voxel bytes, else the file is truncated;
    * compressed or unknown storage: the claimed voxel bytes must be at most :data:`MAX_COMPRESSION_RATIO` times
      ``size`` (plus 64 KB). Deflate cannot expand more than 1032-fold; blosc2 and zstd can only on data that is more
      than 99.9 % one value, which is no image (and a constant volume is refused anyway).

    Args:
        path: the file, for messages.
        shape: the claimed array shape (components included); dtype: the claimed voxel type.
        size: the bytes that hold the voxel data (``None``: unknown, only the type and the cap are checked).
        offset: where the voxel data starts in ``held_in`` (uncompressed storage).
        held_in: what ``size`` measures, for messages (``"the file"``, ``"its data file X"``, ...).
        fix: what to do about a damaged file, for messages.

    Raises:
        VolumeError: one line naming the file, what its header claims and the fix.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    if dtype.kind == "c":
        raise VolumeError(f"{path} holds complex voxels ({dtype.name}); Med3DInsight reads real intensities: save the "
                          f"magnitude (e.g. numpy.abs) or the real part as a float32 image and use that file")
    if dtype.kind not in "biuf":
        raise VolumeError(f"{path} holds {short_repr(str(dtype), 60)} voxels, not single numbers (an RGB or vector "
                          f"image?); save each channel as a scalar 3D image (nnU-Net raw: CASE_0000, CASE_0001, ...)")
    if any(n < 0 for n in shape):
        raise VolumeError(f"{path}: its header claims the shape {shape}; the header is damaged: {fix}")
    voxels = int(np.prod(shape, dtype=object)) if shape else 1
    stored = voxels * dtype.itemsize
    claim = f"its header claims {'x'.join(map(str, shape))} {dtype.name} voxels ({_human(stored)})"
    limit = _max_volume_bytes()
    if voxels * 4 > limit:
        as_float = "" if dtype.itemsize == 4 else f", {_human(voxels * 4)} as float32,"
        raise VolumeError(f"{path}: {claim}{as_float} more than the {_human(limit)} allowed for one volume "
                          f"({MAX_VOLUME_ENV}); if the volume is real, set {MAX_VOLUME_ENV} higher (reading takes "
                          f"about three times that memory), else {fix}")
    if size is None:
        return
    if uncompressed:
        if size < offset + stored:
            raise VolumeError(f"{path}: {claim} but {held_in} has {_human(size)}; it is truncated or its header is "
                              f"damaged: {fix}")
    elif stored > MAX_COMPRESSION_RATIO * size + (1 << 16):
        raise VolumeError(f"{path}: {claim} but {held_in}, {_human(size)} compressed, cannot hold that much (no "
                          f"image compresses more than {MAX_COMPRESSION_RATIO}-fold); it is truncated or its header "
                          f"is damaged: {fix}")


def _check_claimed_size(path: str, header) -> None:
    """A NIfTI file's claim (:func:`check_claimed_size`), then for ``.nii.gz`` the decompressed length itself.

    The gzip trailer's uncompressed size (mod 2^32) must match, else the decompressed length is counted in a
    streaming pass (multi-member gzip files) without keeping the data.
    """
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get_data_offset())
    except Exception as e:
        raise VolumeError(f"cannot read the header of {path} ({type(e).__name__}: {e}); the file is damaged: "
                          f"re-export or remove it") from None
    size = os.path.getsize(path)
    gz = path.endswith(".gz")
    check_claimed_size(path, shape, dtype, size, offset, uncompressed=not gz,
                       held_in="a gzip file" if gz else "the file")
    if not gz:
        return
    need = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(max(0, size - 4))
        trailer = f.read(4)
    if len(trailer) == 4 and int.from_bytes(trailer, "little") == need % (1 << 32):
        return
    held = 0
    try:
        with gzip.open(path, "rb") as f:
            while held < need:
                block = f.read(min(1 << 22, need - held))
                if not block:
                    break
                held += len(block)
    except Exception as e:  # zlib.error, EOFError, BadGzipFile
        raise VolumeError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"the file is damaged or truncated: re-export or remove it") from None
    if held < need:
        claim = f"its header claims {'x'.join(map(str, shape))} {dtype.name} voxels ({_human(need)})"
        raise VolumeError(f"{path}: {claim} but the file holds only {_human(held)} once decompressed; it is "
                          f"truncated or its header is damaged: re-export or remove it")


@contextlib.contextmanager
def _stderr_to(lines: List[str]):
    """Collect what C++ libraries print on file descriptor 2 (ITK's MetaIO writes its read errors there) into
    ``lines`` instead of the terminal, so a refused file is still one line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, closed): nothing to collect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line.strip() for line in tmp.read().decode("utf-8", "replace").splitlines() if line.strip())


def _header_fields(head: bytes, separator: bytes, end_key: Optional[str] = None):
    """``({key: value}, offset after the header)`` of a text header ending at a blank line (NRRD) or after the line
    of ``end_key`` (MetaImage); offset ``None`` when the end is not within ``head``."""
    fields, pos = {}, 0
    while True:
        end = head.find(b"\n", pos)
        if end < 0:
            return fields, None
        line, pos = head[pos:end].rstrip(b"\r"), end + 1
        if end_key is None and not line.strip():
            return fields, pos
        key, sep, value = (part.strip().decode("latin-1") for part in line.partition(separator))
        if sep:
            fields[key.lower()] = value
        if key.lower() == end_key:
            return fields, pos


def _sitk_storage(path: str) -> Tuple[Optional[int], int, bool, str]:
    """Where a file read by SimpleITK keeps its voxel data: ``(bytes, offset, uncompressed, what the bytes are)``.

    MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) say it in their header text (local or detached data,
    compressed or raw); any other format counts as the file itself, storage unknown (so only the compression bound
    applies). ``bytes`` is ``None`` where the data's file is not known (file lists and patterns)."""
    lower = path.lower()
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if lower.endswith((".mha", ".mhd")):
        fields, offset = _header_fields(head, b"=", end_key="elementdatafile")
        data = fields.get("elementdatafile", "")
        uncompressed = fields.get("compresseddata", "false").lower() != "true"
    elif lower.endswith((".nrrd", ".nhdr")):
        fields, offset = _header_fields(head, b":")
        data = fields.get("data file", fields.get("datafile", "LOCAL"))
        uncompressed = fields.get("encoding", "raw").lower() == "raw"
    else:
        return os.path.getsize(path), 0, False, "the file"
    if data.upper() == "LOCAL":
        return (None, 0, False, "the file") if offset is None else (os.path.getsize(path), offset, uncompressed,
                                                                        "the file")
    if not data or len(data.split()) > 1 or data.split()[0].upper() == "LIST" or "%" in data:
        return None, 0, False, "the file"
    target = Path(path).parent / data
    if not target.is_file():
        raise VolumeError(f"{path} keeps its voxels in {target}, which does not exist; put the data file beside the "
                          f"header or re-export the image as one file")
    return target.stat().st_size, 0, uncompressed, f"its data file {target}"


_SITK_TYPES = ("UInt8", "Int8", "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64", "Float32", "Float64")


def _sitk_dtype(pixel_id: int) -> np.dtype:
    import SimpleITK as sitk

    for name in _SITK_TYPES:
        if pixel_id in (getattr(sitk, f"sitk{name}", None), getattr(sitk, f"sitkVector{name}", None)):
            return np.dtype(name.lower())
    for name, dtype in (("ComplexFloat32", np.complex64), ("ComplexFloat64", np.complex128)):
        if pixel_id == getattr(sitk, f"sitk{name}", None):
            return np.dtype(dtype)
    return np.dtype([("unknown", np.uint8)])  # refused by check_claimed_size as "not single numbers"


def _sitk_reader(path: str):
    """A SimpleITK reader of ``path`` with its header read and its claim checked (:func:`check_claimed_size`)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    printed: List[str] = []
    try:
        with _stderr_to(printed):
            reader.ReadImageInformation()
        size = reader.GetSize()[::-1]
        components = int(reader.GetNumberOfComponents())
        dtype = _sitk_dtype(reader.GetPixelID())
    except RuntimeError as e:
        reason = printed[0] if printed else first_line(e).split("Reason:")[-1].strip()
        raise VolumeError(f"cannot read the header of {path} ({short_repr(reason, 120)}); re-export or remove "
                          f"it") from None
    if components > 1:
        raise VolumeError(f"{path} holds {components} values per voxel (a vector, RGB or complex image); save each "
                          f"channel as a scalar 3D image (nnU-Net raw: CASE_0000, CASE_0001, ...)")
    try:
        stored, offset, uncompressed, held_in = _sitk_storage(str(path))
    except OSError as e:
        raise VolumeError(f"cannot read {path} ({first_line(e)}); re-export or remove it") from None
    check_claimed_size(str(path), size, dtype, stored, offset, uncompressed, held_in)
    return reader


def check_file_size(path: str) -> None:
    """:func:`check_claimed_size` of one image file from its header alone (NIfTI by nibabel, the rest by
    SimpleITK), as :func:`read_image` checks it: for files other libraries (nnU-Net's readers) are about to read."""
    if str(path).endswith(NIFTI_ENDINGS):
        import nibabel as nib

        try:
            header = nib.load(str(path)).header
        except Exception as e:  # nibabel/zlib/gzip raise many types for damaged files
            raise VolumeError(f"cannot read {path} ({type(e).__name__}: {first_line(e)}); the file is damaged or "
                              f"truncated: re-export or remove it") from None
        _check_claimed_size(str(path), header)
    else:
        _sitk_reader(str(path))


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


def _guess_modality(array: np.ndarray) -> str:
    # CT is calibrated: air is about -1000 HU; MRI has no negative intensities to speak of
    return "ct" if float(np.percentile(array, 1)) < -500 else "mri"


def _nifti_modality(files: Dict[str, List[str]], root: Path) -> Tuple[str, str]:
    """One modality for a NIfTI folder: the intensities (channel 0) of its first few cases, which must agree."""
    probed = sorted(files)[:_MODALITY_PROBE_CASES]
    guesses = {case: _guess_modality(read_image(files[case][0])[0]) for case in probed}
    kinds = sorted(set(guesses.values()))
    if len(kinds) > 1:
        ct = next(c for c, g in guesses.items() if g == "ct")
        mri = next(c for c, g in guesses.items() if g == "mri")
        raise VolumeError(f"--modality auto cannot decide for {root}: case {ct} looks like CT (air near -1000 HU) but "
                          f"case {mri} does not; pass --modality ct or --modality mri (data.modality), or keep one "
                          f"modality per folder")
    return kinds[0], f"the intensities of {', '.join(probed)} (air near -1000 HU: CT, else MRI)"


class VolumeSource:
    """The cases of one dataset and how to read them; build it with :func:`open_source`.

    Attributes:
        kind: ``"nifti"``, ``"nnunet_raw"`` or ``"nnunet_preprocessed"``.
        root: the folder (or file) given.
        cases: sorted case identifiers.
        modality: ``"ct"`` or ``"mri"``: one decision for the whole dataset (given, or made once by
            :func:`open_source` from ``dataset.json`` or the first cases' intensities), used both to render the
            teacher's slices and to choose pretraining's intensity normalisation.
        modality_reason: how that decision was made (for messages).
        num_channels: input channels per case.
    """

    def __init__(self, kind: str, root: Path, files: Dict[str, List[str]], modality: str, num_channels: int,
                 extra: Optional[Dict[str, Any]] = None, modality_reason: str = "given"):
        if modality not in ("ct", "mri"):
            raise VolumeError(f"modality must be ct or mri once a dataset is opened, got {modality!r}")
        self.kind, self.root, self._files = kind, root, files
        self.cases = sorted(files)
        self.modality, self.num_channels = modality, num_channels
        self.modality_reason = modality_reason
        self._extra = extra or {}

    def __len__(self) -> int:
        return len(self.cases)

    def describe(self) -> Dict[str, Any]:
        """What identifies this dataset in a cache manifest or checkpoint metadata."""
        out = {"kind": self.kind, "root": str(self.root), "modality": self.modality,
               "num_channels": self.num_channels, "num_cases": len(self.cases)}
        for key in ("plans_name", "configuration"):
            if key in self._extra:
                out[key] = self._extra[key]
        if self.kind == "nnunet_preprocessed":  # what the teacher's renders are made from
            out["scanner_units"] = "raw" if "raw_files" in self._extra else "undone z-score"
        return out

    def spacing(self, case: str) -> Tuple[float, float, float]:
        """The voxel size (mm) of ``case`` along the canonical axes, from its file header (no voxel is read)."""
        if case not in self._files:
            raise VolumeError(f"case {case!r} is not in {self.root}")
        if self.kind == "nnunet_preprocessed":
            return self.read(case).spacing
        path = self._files[case][0]
        spacing, direction, axes = _read_geometry(path)
        permutation, _ = canonical_axes(direction, axes)
        return tuple(float(spacing[p]) for p in permutation)

    def read(self, case: str) -> Volume:
        """Read ``case`` into canonical orientation; unreadable, non-3D, NaN or constant volumes raise
        :class:`VolumeError` naming the file."""
        if case not in self._files:
            raise VolumeError(f"case {case!r} is not in {self.root}")
        if self.kind == "nnunet_preprocessed":
            return self._read_preprocessed(case)
        arrays, geometry = [], None
        for path in self._files[case]:
            array, *geo = read_image(path)
            if arrays and array.shape != arrays[0].shape:
                raise VolumeError(f"{path} has shape {array.shape} but channel 0 of case {case} has "
                                  f"{arrays[0].shape}; all channels of a case must share one grid")
            arrays.append(array)
            geometry = geometry or geo
        spacing, direction, axes = geometry
        permutation, flips = canonical_axes(direction, axes)
        data, spacing = _to_canonical(np.stack(arrays), spacing, permutation, flips)
        return Volume(case, data, spacing, self.modality, files=list(self._files[case]))

    def _read_preprocessed(self, case: str) -> Volume:
        folder = Path(self._extra["data_folder"])
        props = safe_load_pickle(folder / f"{case}.pkl")
        data = _read_preprocessed_array(folder, case)
        if data.ndim != 4:
            raise VolumeError(f"{folder / case} holds a {data.ndim}D array, not nnU-Net's (C, X, Y, Z); rerun "
                              f"nnUNetv2_preprocess")
        _check_shape(data.shape[1:], str(folder / case))
        _check_values(data, str(folder / case))
        transpose = self._extra["transpose_forward"]
        direction = _preprocessed_direction(props, folder / f"{case}.pkl", self._extra.get("reader"))
        # preprocessed axis p is raw array axis transpose[p], i.e. image index axis 2 - transpose[p] (nnU-Net's
        # readers all give arrays in SimpleITK's (z, y, x) order: the nibabel ones transpose (x, y, z))
        permutation, flips = canonical_axes(direction, [2 - t for t in transpose])
        grid = tuple(data.shape)
        data, spacing = _to_canonical(data, self._extra["spacing"], permutation, flips)
        scanner = None
        if case in self._extra.get("raw_files", {}):
            scanner = lambda: _to_canonical(self._raw_on_grid(case, grid), spacing, permutation, flips)[0]
        return Volume(case, data, spacing, self.modality, normalized=True, ct_stats=self._extra.get("ct_stats"),
                      files=[str(folder / case)], scanner=scanner)

    def _raw_on_grid(self, case: str, grid: Sequence[int]) -> np.ndarray:
        """The raw image of ``case`` through nnU-Net's preprocessing without its normalisation: scanner units on the
        preprocessed grid (nnU-Net's layout)."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        class _Unnormalized(DefaultPreprocessor):
            def _normalize(self, data, seg, configuration_manager, foreground_intensity_properties_per_channel):
                return data

        files = self._extra["raw_files"][case]
        for path in files:  # nnU-Net's readers allocate whatever a header claims
            check_file_size(path)
        plans = PlansManager(self._extra["plans"])
        try:
            data, _, _ = _Unnormalized(verbose=False).run_case(
                files, None, plans, plans.get_configuration(self._extra["configuration"]), self._extra["dataset_json"])
        except (OSError, RuntimeError, ValueError) as e:
            raise VolumeError(f"cannot read the raw image(s) {', '.join(files)} of case {case} ({first_line(e)}); "
                              f"fix them or pass the raw dataset that was preprocessed (raw=)") from None
        data = np.asarray(data, dtype=np.float32)
        if tuple(data.shape) != tuple(grid):
            raise VolumeError(f"the raw image(s) {', '.join(files)} of case {case} give shape {data.shape} on "
                              f"nnU-Net's grid, not the preprocessed {tuple(grid)}: they are not the images that "
                              f"were preprocessed; set nnUNet_raw (or raw=) to the dataset that was, or rerun "
                              f"nnUNetv2_preprocess")
        _check_values(data, files[0])
        return data


_TIFF_READER = "Tiff3DIO"


def _preprocessed_direction(props: Any, pkl: Path, reader: Optional[str]) -> np.ndarray:
    """The LPS direction matrix (SimpleITK's: column ``i`` is image index axis ``i``) of the image array nnU-Net's
    reader produced, from a preprocessed case's properties.

    SimpleITKIO (and SimpleITKIOWithReorient, after its reorientation) store ``sitk_stuff["direction"]``. NibabelIO
    stores ``nibabel_stuff["original_affine"]``; NibabelIOWithReorient reorients to RAS first, so the stored array is
    described by ``nibabel_stuff["reoriented_affine"]``. Nibabel affines map index axes to RAS world: the first two
    rows are negated for LPS. Tiff3DIO stores no orientation (TIFF has none): identity, as SimpleITK reads the raw
    ``.tif``. Anything else raises :class:`VolumeError` rather than guessing.
    """
    redo = "rerun nnUNetv2_preprocess for this dataset"
    if not isinstance(props, dict):
        raise VolumeError(f"{pkl} holds a {type(props).__name__}, not nnU-Net's properties dict; {redo}")
    if "sitk_stuff" not in props and "nibabel_stuff" not in props:
        if reader == _TIFF_READER:
            return np.eye(3)
        by = f", written by {reader}," if reader else ""
        raise VolumeError(f"{pkl}{by} has neither sitk_stuff (nnU-Net's SimpleITKIO) nor nibabel_stuff (NibabelIO) "
                          f"to give the image orientation (only Tiff3DIO, for .tif data, writes neither); {redo}")
    what = 'sitk_stuff["direction"]' if "sitk_stuff" in props else "nibabel_stuff"
    try:
        if "sitk_stuff" in props:
            direction = np.asarray(props["sitk_stuff"]["direction"], dtype=np.float64).reshape(3, 3)
        else:
            stuff = props["nibabel_stuff"]
            key = "reoriented_affine" if "reoriented_affine" in stuff else "original_affine"
            what = f'nibabel_stuff["{key}"]'
            affine = np.asarray(stuff[key], dtype=np.float64)
            if affine.shape != (4, 4):
                raise ValueError(f"shape {affine.shape}, not 4x4")
            if not np.isfinite(affine).all():
                raise ValueError(f"not finite: {short_repr(affine.tolist())}")
            spacing, direction, _ = _nifti_geometry(affine)
            if not all(s > 0 for s in spacing):
                raise ValueError(f"a zero column: {short_repr(affine.tolist())}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise VolumeError(f"{pkl} has no usable {what} ({type(e).__name__}: {first_line(e)}) for the image "
                          f"orientation; {redo}") from None
    if not np.isfinite(direction).all():
        raise VolumeError(f"{pkl} has no usable {what} (not finite: {short_repr(direction.tolist())}) for the image "
                          f"orientation; {redo}")
    return direction


def _image_reader(plans: Dict[str, Any], ds: Dict[str, Any]) -> Optional[str]:
    """The nnU-Net image reader class that preprocessed a dataset: the plans' ``image_reader_writer`` (the planner
    records it), else dataset.json's ``overwrite_image_reader_writer``, else Tiff3DIO for a ``.tif`` file_ending."""
    for name in (plans.get("image_reader_writer"), ds.get("overwrite_image_reader_writer")):
        if isinstance(name, str) and name:
            return name
    ending = ds.get("file_ending")
    return _TIFF_READER if isinstance(ending, str) and ending.lower() in (".tif", ".tiff") else None


def _npy_header(f) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, bytes of the header)`` of a ``.npy`` stream, without reading its data."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    shape, _, dtype = read(f) if read else fmt._read_array_header(f, version)  # 3.0: no public reader
    return tuple(shape), np.dtype(dtype), f.tell()


def _read_preprocessed_array(folder: Path, case: str) -> np.ndarray:
    """A preprocessed case's ``(C, X, Y, Z)`` data as float32 (``.b2nd``, ``.npy`` or ``.npz``), its header's claim
    checked first (:func:`check_claimed_size`)."""
    b2nd, npy, npz = (folder / f"{case}{e}" for e in (".b2nd", ".npy", ".npz"))
    path = next((p for p in (b2nd, npy) if p.is_file()), npz)
    redo = "rerun nnUNetv2_preprocess"
    try:
        if path == b2nd:
            import blosc2

            array = blosc2.open(urlpath=str(b2nd), mode="r")  # the metadata and chunk index; nothing decompressed
            check_claimed_size(str(b2nd), array.shape, array.dtype, b2nd.stat().st_size, held_in="a blosc2 file",
                               fix=redo)
            return np.asarray(array[:], dtype=np.float32)
        if path == npy:
            with open(npy, "rb") as f:
                shape, dtype, offset = _npy_header(f)
            check_claimed_size(str(npy), shape, dtype, npy.stat().st_size, offset, uncompressed=True, fix=redo)
            return np.load(npy, allow_pickle=False).astype(np.float32)
        with zipfile.ZipFile(npz) as zf:
            info = zf.getinfo("data.npy")
            with zf.open(info) as f:
                shape, dtype, offset = _npy_header(f)
            stored = info.compress_type == zipfile.ZIP_STORED
            check_claimed_size(str(npz), shape, dtype, min(info.compress_size, npz.stat().st_size), offset,
                               uncompressed=stored, held_in="its data.npy" + ("" if stored else " (deflated)"),
                               fix=redo)
        return np.load(npz, allow_pickle=False)["data"].astype(np.float32)
    except VolumeError:
        raise
    except Exception as e:  # blosc2/numpy/zipfile raise assorted types for damaged files
        raise VolumeError(f"cannot read the preprocessed case {folder / case} ({first_line(e)}); rerun "
                          f"nnUNetv2_preprocess") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "slice")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith(("Float64DType", "Int64DType",
                                                                                    "Float32DType", "Int32DType"))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def safe_load_pickle(path: Path) -> Any:
    """Read an nnU-Net properties ``.pkl`` allowing only numpy arrays/scalars and builtins (nothing executes)."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise VolumeError(f"cannot read {path} safely ({e}); rerun nnUNetv2_preprocess for this dataset") from None


# ------------------------------------------------------------------------------------------------------ discovery

def open_source(path, modality: str = "auto", configuration: str = "3d_fullres",
                plans: str = "nnUNetPlans", raw: Optional[os.PathLike] = None) -> VolumeSource:
    """Find the cases of a dataset.

    Args:
        path: a folder of NIfTI volumes (one file per case, or ``CASE_0000.nii.gz`` channel files), a single NIfTI
            file, an nnU-Net raw dataset (``dataset.json`` + ``imagesTr``) or an nnU-Net preprocessed dataset
            (``<plans>.json`` + ``dataset.json``).
        modality: ``"ct"``, ``"mri"`` or ``"auto"``: decided once for the whole dataset, here -- nnU-Net data from
            ``dataset.json``'s first channel name (``CT`` is CT, anything else MRI-like, as nnU-Net normalises), a
            NIfTI folder from the intensities of its first three cases (air near -1000 HU is CT; cases that disagree
            are refused). The result is ``source.modality`` (never ``"auto"``), recorded by ``describe()``.
        configuration, plans: which preprocessed data to read (nnU-Net preprocessed only).
        raw: the nnU-Net raw dataset a preprocessed one was made from (default ``$nnUNet_raw/<dataset_name>`` when
            it exists): the teacher then sees its scanner units on the preprocessed grid (:meth:`Volume.native`).

    Returns:
        A :class:`VolumeSource`.
    """
    if modality not in ("auto", "ct", "mri"):
        raise VolumeError(f"modality must be ct, mri or auto, got {modality!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise VolumeError(f"{root} does not exist; pass a NIfTI folder or an nnU-Net raw/preprocessed dataset")
    if root.is_file():
        if not root.name.endswith(NIFTI_ENDINGS):
            raise VolumeError(f"{root} is not a NIfTI file (.nii/.nii.gz); pass a NIfTI file or a dataset folder")
        cases = {_case_name(root.name): [str(root)]}
        mod, why = _given_or(modality, lambda: _nifti_modality(cases, root))
        return VolumeSource("nifti", root, cases, mod, 1, modality_reason=why)
    has_dataset_json = (root / "dataset.json").is_file()
    if has_dataset_json and (root / f"{plans}.json").is_file():
        return _preprocessed_source(root, modality, configuration, plans, raw)
    if has_dataset_json and (root / "imagesTr").is_dir():
        return _raw_source(root, modality)
    files = sorted(p for p in root.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
    if not files:
        if has_dataset_json:
            others = sorted(p.stem for p in root.glob("*.json") if p.name != "dataset.json" and "lans" in p.name)
            hint = f"; plans found: {', '.join(others)} (pass --plans NAME)" if others else \
                "; run nnUNetv2_plan_and_preprocess, or pass the raw dataset folder (with imagesTr)"
            raise VolumeError(f"{root} has a dataset.json but neither imagesTr (nnU-Net raw) nor {plans}.json "
                              f"(nnU-Net preprocessed){hint}")
        raise VolumeError(f"{root} has no .nii/.nii.gz files and is not an nnU-Net raw dataset (dataset.json + "
                          f"imagesTr) or preprocessed dataset ({plans}.json + dataset.json)")
    cases = _nifti_cases(files, root)
    counts = {len(v) for v in cases.values()}
    if len(counts) != 1:
        raise VolumeError(f"the cases in {root} have different numbers of channel files ({sorted(counts)}); name "
                          f"channels CASE_0000.nii.gz, CASE_0001.nii.gz, ... for every case")
    mod, why = _given_or(modality, lambda: _nifti_modality(cases, root))
    return VolumeSource("nifti", root, cases, mod, counts.pop(), modality_reason=why)


def _nifti_cases(files: Sequence[Path], root: Path) -> Dict[str, List[str]]:
    """The channel files of each case of a NIfTI folder, in channel order: ``CASE.nii[.gz]`` is a one-channel case,
    ``CASE_0000``, ``CASE_0001``, ... the channels of ``CASE``. Two files of one case and channel (``a.nii`` beside
    ``a.nii.gz``), a plain file beside channel files, and a gap in the channel numbers are refused: they would be
    read as extra channels."""
    grouped: Dict[str, Dict[int, List[Path]]] = {}
    for f in files:
        stem, case = _case_name(f.name), _case_name(f.name, strip_channel=True)
        grouped.setdefault(case, {}).setdefault(-1 if case == stem else int(stem[-4:]), []).append(f)
    out = {}
    for case, channels in sorted(grouped.items()):
        for same in channels.values():
            if len(same) > 1:
                raise VolumeError(f"{' and '.join(p.name for p in same)} in {root} are two files of one image of "
                                  f"case {case} (they would be read as two channels); keep one and move the other "
                                  f"out of the folder")
        if -1 in channels and len(channels) > 1:
            other = next(p[0].name for c, p in sorted(channels.items()) if c >= 0)
            raise VolumeError(f"{channels[-1][0].name} and {other} in {root} both belong to case {case}: a case is one "
                              f"file CASE.nii.gz or channel files CASE_0000.nii.gz, CASE_0001.nii.gz, ...; rename or "
                              f"move one of them")
        numbers = sorted(channels)
        if numbers != list(range(len(numbers))) and numbers != [-1]:
            missing = next(i for i in range(len(numbers) + 1) if i not in channels)
            names = ", ".join(channels[c][0].name for c in numbers)
            raise VolumeError(f"case {case} in {root} has {names} but no {case}_{missing:04d}: channel files are "
                              f"numbered _0000, _0001, ... without gaps; rename them (or, if these are separate "
                              f"cases, not channels, name them without the 4-digit _NNNN ending)")
        out[case] = [str(channels[c][0]) for c in numbers]
    return out


def _given_or(modality: str, decide) -> Tuple[str, str]:
    """``(modality, reason)``: the one given, or ``decide()``'s for ``"auto"``."""
    return (modality, "given (--modality / data.modality)") if modality != "auto" else decide()


def _case_name(name: str, strip_channel: bool = False) -> str:
    stem = name[: -len(next(e for e in NIFTI_ENDINGS if name.endswith(e)))]
    if strip_channel and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isascii() and stem[-4:].isdigit():
        return stem[:-5]
    return stem


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise VolumeError(f"cannot read {path} ({first_line(e)}); fix or regenerate it") from None
    if not isinstance(data, dict):
        raise VolumeError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or regenerate it")
    return data


def _channel_names(ds: Dict[str, Any], path: Path) -> Dict[str, str]:
    """``channel_names`` of a dataset.json (nnU-Net v2; v1's ``modality`` is accepted), checked."""
    channels = ds.get("channel_names", ds.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise VolumeError(f"{path} lacks channel_names (nnU-Net v2 needs it, e.g. \"channel_names\": "
                          f"{{\"0\": \"CT\"}}); add it")
    if sorted(channels) != [str(i) for i in range(len(channels))]:
        raise VolumeError(f"{path}: channel_names keys must be \"0\", \"1\", ... in order, got "
                          f"{short_repr(sorted(channels))}; fix it")
    return {str(k): str(v) for k, v in channels.items()}


def _dataset_modality(channels: Dict[str, str], path: Path) -> Tuple[str, str]:
    # as nnU-Net: channel name "CT" (any case) gets CTNormalization, anything else a z-score: MRI-like
    name = channels["0"].strip()
    return ("ct" if name.casefold() == "ct" else "mri"), f"channel_names[\"0\"] = {name!r} in {path}"


def _raw_source(root: Path, modality: str) -> VolumeSource:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ds_path = root / "dataset.json"
    ds = _load_json(ds_path)
    channels = _channel_names(ds, ds_path)
    if "dataset" not in ds and not isinstance(ds.get("file_ending"), str):
        raise VolumeError(f"{ds_path} lacks file_ending (e.g. \"file_ending\": \".nii.gz\"); add it")
    try:
        entries = get_filenames_of_train_images_and_targets(str(root), ds)
    except (KeyError, OSError, TypeError, AttributeError) as e:
        raise VolumeError(f"{ds_path} does not describe the files in imagesTr ({type(e).__name__}: {e}); check "
                          f"file_ending and channel_names") from None
    files = {case: list(e["images"]) for case, e in entries.items()}
    if not files:
        raise VolumeError(f"{root / 'imagesTr'} has no cases ending in {ds.get('file_ending')!r}")
    for case, images in files.items():
        if len(images) != len(channels):
            raise VolumeError(f"case {case} in {root / 'imagesTr'} has {len(images)} channel file(s) but {ds_path} "
                              f"names {len(channels)} channel(s); add the missing _000N files or fix channel_names")
        expected = [f"{case}_{i:04d}{ds['file_ending']}" for i in range(len(channels))]
        if "dataset" not in ds and [os.path.basename(p) for p in images] != expected:
            raise VolumeError(f"case {case} in {root / 'imagesTr'} has {', '.join(map(os.path.basename, images))} but "
                              f"the {len(channels)} channel(s) of {ds_path} are {', '.join(expected)}; number the "
                              f"channel files _0000, _0001, ... without gaps (rename them) or fix channel_names")
    mod, why = _given_or(modality, lambda: _dataset_modality(channels, ds_path))
    return VolumeSource("nnunet_raw", root, files, mod, len(channels), modality_reason=why)


def _find_raw(raw: Optional[os.PathLike], plans: Dict[str, Any]) -> Optional[Path]:
    """The raw dataset of a preprocessed one: ``raw`` when given (it must be one), else
    ``$nnUNet_raw/<plans' dataset_name>`` when that is an nnU-Net raw dataset, else None."""
    if raw is not None:
        root = Path(raw).expanduser()
        if not ((root / "dataset.json").is_file() and (root / "imagesTr").is_dir()):
            raise VolumeError(f"raw={root} is not an nnU-Net raw dataset (dataset.json + imagesTr); pass the raw "
                              f"dataset that was preprocessed")
        return root
    base, name = os.environ.get("nnUNet_raw"), plans.get("dataset_name")
    if base and isinstance(name, str) and name:
        root = Path(base) / name
        if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
            return root
    return None


def _preprocessed_source(root: Path, modality: str, configuration: str, plans_name: str,
                         raw: Optional[os.PathLike] = None) -> VolumeSource:
    plans_path = root / f"{plans_name}.json"
    plans = _load_json(plans_path)
    ds_path = root / "dataset.json"
    ds = _load_json(ds_path)
    channels = _channel_names(ds, ds_path)
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise VolumeError(f"{plans_path} has no configuration {configuration!r}; choose one of "
                          f"{sorted(configurations) if isinstance(configurations, dict) else []} (--configuration)")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        cm = PlansManager(plans).get_configuration(configuration)
        data_identifier, spacing = cm.data_identifier, list(cm.spacing)
        schemes = list(cm.normalization_schemes)
        transpose = [int(t) for t in plans["transpose_forward"]]
        if sorted(transpose) != [0, 1, 2]:
            raise ValueError(f"transpose_forward {transpose} is not a permutation of 0, 1, 2")
        ct_stats = None
        if schemes and schemes[0] == "CTNormalization":
            stats = plans["foreground_intensity_properties_per_channel"]["0"]
            ct_stats = (float(stats["mean"]), float(stats["std"]))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise VolumeError(f"{plans_path} is not a complete nnU-Net plans file ({type(e).__name__}: {e}); rerun "
                          f"nnUNetv2_plan_and_preprocess") from None
    folder = root / data_identifier
    cases = sorted({p.name.split(".")[0] for p in folder.glob("*.pkl")}) if folder.is_dir() else []
    if not cases:
        raise VolumeError(f"{folder} holds no preprocessed cases; run nnUNetv2_preprocess -d "
                          f"{plans.get('dataset_name')} -c {configuration} -plans_name {plans_name}")
    extra: Dict[str, Any] = {"data_folder": str(folder), "transpose_forward": transpose, "spacing": spacing,
                             "plans_name": plans_name, "configuration": configuration,
                             "reader": _image_reader(plans, ds)}
    raw_root = _find_raw(raw, plans)
    if raw_root is not None:
        raw_files = _raw_source(raw_root, "ct")._files
        missing = [c for c in cases if c not in raw_files]
        if missing:
            raise VolumeError(f"the raw dataset {raw_root} lacks {len(missing)} preprocessed case(s) (e.g. "
                              f"{missing[0]}); pass the raw dataset that was preprocessed (raw=), or unset nnUNet_raw "
                              f"to render from the preprocessed data")
        extra.update(raw_root=str(raw_root), raw_files=raw_files, plans=plans, dataset_json=ds)
    if ct_stats is not None:
        extra["ct_stats"] = ct_stats
    mod, why = _given_or(modality, lambda: ("ct", f"CTNormalization in {plans_path}") if ct_stats is not None
                         else _dataset_modality(channels, ds_path))
    return VolumeSource("nnunet_preprocessed", root, {c: [str(folder / c)] for c in cases}, mod, len(channels), extra,
                        modality_reason=why)
