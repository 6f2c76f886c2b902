"""The voxel data an image file's header claims, checked before any voxel is read or any array allocated.

:func:`check_claimed_size` is the one check every reader makes with what a header claims (voxel type, the
``$MED3DINSIGHT_MAX_VOLUME_GB`` cap, truncation, the 1032-fold compression bound); beside it are its NIfTI form
(``.nii.gz``: the decompressed length too), the SimpleITK header reader (MetaImage / NRRD storage, C++ messages
collected) and :func:`check_file_size`, the check of one file from its header alone. nibabel and SimpleITK are
imported inside the functions.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import first_line, short_repr
from .common import NIFTI_ENDINGS, VolumeError

MAX_COMPRESSION_RATIO = 1032  # deflate never expands a stream more (RFC 1951, 258-byte matches); see check_claimed_size
MAX_VOLUME_ENV = "MED3DINSIGHT_MAX_VOLUME_GB"  # the largest volume read, in GB of float32 voxels
DEFAULT_MAX_VOLUME_GB = 8.0


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
