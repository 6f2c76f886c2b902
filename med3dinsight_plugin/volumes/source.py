"""A dataset's cases and how to read them: :class:`VolumeSource` (built by
:func:`~med3dinsight_plugin.volumes.open_source`) reads a case from its image files (:mod:`.image`) or its nnU-Net
preprocessed files (:mod:`.preprocessed`) into a canonical :class:`~.image.Volume`, in scanner units on the
preprocessed grid when the raw images are known (nnU-Net's preprocessing without its normalisation; nnunetv2 is
imported inside that method). ``_given_or`` is the one ``--modality`` decision every kind of dataset makes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import first_line
from .common import VolumeError
from .headers import check_file_size
from .image import Volume, _check_shape, _check_values, _read_geometry, _to_canonical, canonical_axes, read_image
from .preprocessed import _preprocessed_direction, _read_preprocessed_array, safe_load_pickle


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


def _given_or(modality: str, decide) -> Tuple[str, str]:
    """``(modality, reason)``: the one given, or ``decide()``'s for ``"auto"``."""
    return (modality, "given (--modality / data.modality)") if modality != "auto" else decide()
