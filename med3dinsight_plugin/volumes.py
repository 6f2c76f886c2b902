"""Reading unlabeled volumes: a folder of NIfTI files, an nnU-Net raw dataset or an nnU-Net preprocessed dataset.

Every volume comes out in one *canonical* array orientation, whatever its file says: ``(C, D, H, W)`` with the axes
pointing superior, posterior and to the patient's left (LPS; the ``"zyx"`` layout of :mod:`.planes`, so axis 0 is
the axial normal, 1 the coronal, 2 the sagittal). The teacher renders slices of this array and the pretraining data
crops it, so a slice's (plane, position) means the same thing to both.

SimpleITK (an nnU-Net dependency) reads the files; nnU-Net's own helpers find a raw dataset's cases. nnU-Net's
preprocessed ``.pkl`` properties are read with an allow-listed unpickler (numpy arrays and builtins only).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import Med3DInsightError

__all__ = ["Volume", "VolumeError", "VolumeSource", "canonical_axes", "open_source", "safe_load_pickle"]

NIFTI_ENDINGS = (".nii.gz", ".nii")


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
    """

    case: str
    array: np.ndarray
    spacing: Tuple[float, float, float]
    modality: str
    normalized: bool = False
    ct_stats: Optional[Tuple[float, float]] = None
    files: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape[1:])

    def native(self, channel: int = 0) -> np.ndarray:
        """One channel in scanner units where known (Hounsfield units for CT, also after nnU-Net normalisation)."""
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
    if array.ndim != 3:
        raise VolumeError(f"{path} is {array.ndim}D (shape {array.shape}); Med3DInsight reads 3D volumes: split 4D "
                          f"series or channels into one 3D file each (nnU-Net raw: _0000, _0001, ...)")
    _check_values(array, path)
    return array, spacing, direction, axes


def _read_nifti(path: str):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel/zlib/gzip raise many types for damaged files
        raise VolumeError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"the file is damaged or truncated: re-export or remove it") from None
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) is 3D
        array = array[..., 0]
    if array.ndim != 3:
        return array, (), np.eye(3), (0, 1, 2)
    affine = np.asarray(img.affine, dtype=np.float64)[:3, :3] * np.array([[-1.0], [-1.0], [1.0]])  # RAS -> LPS
    spacing = np.linalg.norm(affine, axis=0)
    return array, tuple(float(v) for v in spacing), affine / np.where(spacing > 0, spacing, 1.0), (0, 1, 2)


def _read_sitk(path: str):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise VolumeError(f"cannot read {path} ({reason}); re-export or remove it") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return array, (), np.eye(3), (2, 1, 0)
    return array, tuple(image.GetSpacing())[::-1], np.array(image.GetDirection()).reshape(3, 3), (2, 1, 0)


def _guess_modality(array: np.ndarray) -> str:
    # CT is calibrated: air is about -1000 HU; MRI has no negative intensities to speak of
    return "ct" if float(np.percentile(array, 1)) < -500 else "mri"


class VolumeSource:
    """The cases of one dataset and how to read them; build it with :func:`open_source`.

    Attributes:
        kind: ``"nifti"``, ``"nnunet_raw"`` or ``"nnunet_preprocessed"``.
        root: the folder (or file) given.
        cases: sorted case identifiers.
        modality: ``"ct"``, ``"mri"`` or ``"auto"`` (guessed per case from its intensities).
        num_channels: input channels per case.
    """

    def __init__(self, kind: str, root: Path, files: Dict[str, List[str]], modality: str, num_channels: int,
                 extra: Optional[Dict[str, Any]] = None):
        self.kind, self.root, self._files = kind, root, files
        self.cases = sorted(files)
        self.modality, self.num_channels = modality, num_channels
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
        return out

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
        modality = self.modality if self.modality != "auto" else _guess_modality(data[0])
        return Volume(case, data, spacing, modality, files=list(self._files[case]))

    def _read_preprocessed(self, case: str) -> Volume:
        folder = Path(self._extra["data_folder"])
        props = safe_load_pickle(folder / f"{case}.pkl")
        data = _read_preprocessed_array(folder, case)
        if data.ndim != 4:
            raise VolumeError(f"{folder / case} holds a {data.ndim}D array; expected nnU-Net's (C, X, Y, Z)")
        _check_values(data, str(folder / case))
        transpose = self._extra["transpose_forward"]
        sitk_stuff = props.get("sitk_stuff", {}) if isinstance(props, dict) else {}
        direction = np.array(sitk_stuff.get("direction", np.eye(3).ravel())).reshape(3, 3)
        # preprocessed axis p is raw array axis transpose[p], i.e. image index axis 2 - transpose[p]
        permutation, flips = canonical_axes(direction, [2 - t for t in transpose])
        data, spacing = _to_canonical(data, self._extra["spacing"], permutation, flips)
        return Volume(case, data, spacing, self.modality, normalized=True, ct_stats=self._extra.get("ct_stats"),
                      files=[str(folder / case)])


def _read_preprocessed_array(folder: Path, case: str) -> np.ndarray:
    b2nd, npy, npz = (folder / f"{case}{e}" for e in (".b2nd", ".npy", ".npz"))
    try:
        if b2nd.is_file():
            import blosc2
            return np.asarray(blosc2.open(urlpath=str(b2nd), mode="r")[:], dtype=np.float32)
        if npy.is_file():
            return np.load(npy, allow_pickle=False).astype(np.float32)
        return np.load(npz, allow_pickle=False)["data"].astype(np.float32)
    except Exception as e:  # blosc2/numpy raise assorted types for damaged files
        raise VolumeError(f"cannot read the preprocessed case {folder / case} ({e}); rerun nnUNetv2_preprocess") \
            from None


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
                plans: str = "nnUNetPlans") -> VolumeSource:
    """Find the cases of a dataset.

    Args:
        path: a folder of NIfTI volumes (one file per case, or ``CASE_0000.nii.gz`` channel files), a single NIfTI
            file, an nnU-Net raw dataset (``dataset.json`` + ``imagesTr``) or an nnU-Net preprocessed dataset
            (``<plans>.json`` + ``dataset.json``).
        modality: ``"ct"``, ``"mri"`` or ``"auto"`` (from ``dataset.json``, or guessed from the intensities).
        configuration, plans: which preprocessed data to read (nnU-Net preprocessed only).

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
        return VolumeSource("nifti", root, {_case_name(root.name): [str(root)]}, modality, 1)
    if (root / "dataset.json").is_file() and (root / f"{plans}.json").is_file():
        return _preprocessed_source(root, modality, configuration, plans)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return _raw_source(root, modality)
    files = sorted(p for p in root.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
    if not files:
        raise VolumeError(f"{root} has no .nii/.nii.gz files and is not an nnU-Net raw dataset (dataset.json + "
                          f"imagesTr) or preprocessed dataset ({plans}.json + dataset.json)")
    cases: Dict[str, List[str]] = {}
    for f in files:
        cases.setdefault(_case_name(f.name, strip_channel=True), []).append(str(f))
    counts = {len(v) for v in cases.values()}
    if len(counts) != 1:
        raise VolumeError(f"the cases in {root} have different numbers of channel files ({sorted(counts)}); name "
                          f"channels CASE_0000.nii.gz, CASE_0001.nii.gz, ... for every case")
    return VolumeSource("nifti", root, cases, modality, counts.pop())


def _case_name(name: str, strip_channel: bool = False) -> str:
    stem = name[: -len(next(e for e in NIFTI_ENDINGS if name.endswith(e)))]
    if strip_channel and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5]
    return stem


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VolumeError(f"cannot read {path} ({e}); fix or regenerate it") from None


def _dataset_modality(dataset_json: Dict[str, Any], modality: str) -> str:
    if modality != "auto":
        return modality
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    first = str(channels.get("0", "")).strip().lower()
    return "ct" if first == "ct" else "mri"


def _raw_source(root: Path, modality: str) -> VolumeSource:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ds = _load_json(root / "dataset.json")
    try:
        entries = get_filenames_of_train_images_and_targets(str(root), ds)
    except (KeyError, OSError) as e:
        raise VolumeError(f"{root / 'dataset.json'} does not describe the files in imagesTr ({e}); check "
                          f"file_ending and channel_names") from None
    files = {case: list(e["images"]) for case, e in entries.items()}
    if not files:
        raise VolumeError(f"{root / 'imagesTr'} has no cases ending in {ds.get('file_ending')!r}")
    return VolumeSource("nnunet_raw", root, files, _dataset_modality(ds, modality),
                        len(ds.get("channel_names", {"0": ""})))


def _preprocessed_source(root: Path, modality: str, configuration: str, plans_name: str) -> VolumeSource:
    plans = _load_json(root / f"{plans_name}.json")
    ds = _load_json(root / "dataset.json")
    if configuration not in plans.get("configurations", {}):
        raise VolumeError(f"{root / f'{plans_name}.json'} has no configuration {configuration!r}; choose one of "
                          f"{sorted(plans.get('configurations', {}))}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    folder = root / cm.data_identifier
    cases = sorted({p.name.split(".")[0] for p in folder.glob("*.pkl")}) if folder.is_dir() else []
    if not cases:
        raise VolumeError(f"{folder} holds no preprocessed cases; run nnUNetv2_preprocess -d "
                          f"{plans.get('dataset_name')} -c {configuration} -plans_name {plans_name}")
    extra: Dict[str, Any] = {"data_folder": str(folder), "transpose_forward": list(plans["transpose_forward"]),
                             "spacing": list(cm.spacing), "plans_name": plans_name, "configuration": configuration}
    schemes = list(cm.normalization_schemes)
    if schemes and schemes[0] == "CTNormalization":
        stats = plans["foreground_intensity_properties_per_channel"]["0"]
        extra["ct_stats"] = (float(stats["mean"]), float(stats["std"]))
    mod = modality if modality != "auto" else ("ct" if "ct_stats" in extra else _dataset_modality(ds, "auto"))
    return VolumeSource("nnunet_preprocessed", root, {c: [str(folder / c)] for c in cases}, mod,
                        len(ds.get("channel_names", {"0": ""})), extra)
