"""Opening a dataset: :func:`open_source` tells a NIfTI file or folder from an nnU-Net raw or preprocessed dataset
(:mod:`.nnunet_layout`), finds the cases and channel files of a NIfTI folder, and decides ``--modality auto`` once
for a NIfTI dataset from the intensities of its first cases.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import NIFTI_ENDINGS, VolumeError
from .image import read_image
from .nnunet_layout import _preprocessed_source, _raw_source
from .source import VolumeSource, _given_or

_MODALITY_PROBE_CASES = 3  # --modality auto on a NIfTI folder looks at this many cases


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


def _case_name(name: str, strip_channel: bool = False) -> str:
    stem = name[: -len(next(e for e in NIFTI_ENDINGS if name.endswith(e)))]
    if strip_channel and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isascii() and stem[-4:].isdigit():
        return stem[:-5]
    return stem


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
