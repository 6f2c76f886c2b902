"""The files of one nnU-Net preprocessed case: its ``(C, X, Y, Z)`` array (``.b2nd``, ``.npy`` or ``.npz``, the
header's claim checked first), its properties ``.pkl``, read with an allow-listed unpickler (:func:`safe_load_pickle`:
numpy arrays and builtins only, nothing executes), and the image orientation nnU-Net's reader recorded there.
blosc2 is imported inside the function.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import first_line, short_repr
from .common import VolumeError
from .headers import check_claimed_size
from .image import _nifti_geometry

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
