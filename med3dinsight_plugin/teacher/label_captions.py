"""Slice captions written from label masks (automatic segmentations such as TotalSegmentator's) instead of a VLM.

For every slice that ``med3dinsight caption`` / ``embed`` select (same selection, same keys), the text says what a
careful reader of the masks would: the plane, modality and location of the slice, then the labelled structures it
cuts, largest first, with their area in cm2 and their side, e.g.::

    Axial CT slice through the upper abdomen at 62 % of the scan height: liver (large, 96 cm2, right), stomach
    (31 cm2, left), spleen (12 cm2, left), right kidney (8 cm2) and 2 smaller structures.

The pretraining model is given every slice's plane and position, so these alone explain much of such captions'
embeddings; ``with_plane=False`` / ``with_position=False`` (``--no-plane`` / ``--no-position``) leave them out, and
with both a caption says only what the slice cuts (``CT slice: liver (large, 96 cm2), stomach (31 cm2), ...``).

Geometry comes from the canonical arrays of :mod:`..volumes` (axes toward superior, posterior and the patient's
left), so a label file stored in any orientation gives the same text. The body's midline (left/right) and centre
(anterior/posterior) are the centroid of the image's body mask over the whole volume; a structure's side is its
centroid in the slice relative to that midline, with a dead zone of :data:`MIDLINE_MM` either side ("midline").
The captions go through :class:`~.captions.CaptionFile`, so they resume like the VLM's and ``embed --captions``
accepts them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..crops import CropSource, split_crop_case
from ..errors import Med3DInsightError, first_line, short_repr
from ..fileio import sha256_file
from ..planes import PLANES, plane_id
from ..results import Result
from ..slices import RenderSettings, SlicePolicy, body_mask, extract_slice, volume_slices
from ..volumes import NIFTI_ENDINGS, VolumeError, canonical_axes
from ..volumes.image import _read_nifti, _read_sitk, _to_canonical
from .captions import CaptionError, CaptionFile, caption_lock
from .embed import caption_settings_for

__all__ = ["GENERATOR", "LABEL_DIGESTS", "LABEL_ENDINGS", "LabelCaptionError", "LabelCaptionResult", "MIDLINE_MM",
           "caption_from_labels", "describe_slice", "humanize_name", "label_file_digest", "load_class_names",
           "read_labels", "slice_structures"]

GENERATOR = "med3dinsight-label-captions/1"  # recorded with the captions: change it when the wording changes
LABEL_ENDINGS = (*NIFTI_ENDINGS, ".mha", ".mhd", ".nrrd", ".nhdr")  # label files: NIfTI, or what SimpleITK reads
LABEL_DIGESTS = "label_sha256"  # settings key: case -> label_file_digest of its label file when it was captioned
MIDLINE_MM = 15.0  # a centroid within this distance of the body's midline is "midline"
LARGE_CM2 = 50.0  # "large" from this area in the slice
SMALL_CM2 = 1.0  # "small" below this area
SPACING_RTOL = 1e-3
_MODALITY = {"ct": "CT", "mri": "MRI"}
_SIDES = ("left", "right")
# Body region of an axial slice, guessed from the words of the names of the structures it cuts: an area-weighted
# vote among these regions; bowel, which lies anywhere from the upper abdomen to the pelvis, says "abdomen" only
# when nothing else votes; a slice whose structures match none of these words gets no region.
_REGIONS = (("head", {"brain", "skull"}),
            ("neck", {"thyroid", "larynx", "pharynx"}),
            ("chest", {"lung", "heart", "trachea", "pulmonary", "atrial", "sternum"}),
            ("upper abdomen", {"liver", "spleen", "stomach", "pancreas", "gallbladder", "adrenal", "kidney",
                               "duodenum"}),
            ("pelvis", {"bladder", "prostate", "rectum", "uterus", "sacrum", "hip", "femur", "gluteus"}))
_BOWEL = {"bowel", "colon", "jejunum", "ileum"}

PathLike = Union[str, os.PathLike]


class LabelCaptionError(CaptionError):
    """A label folder, label file or class-name file that cannot be used; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------- class names

def _is_label_number(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_class_names(path_or_dict: Union[PathLike, Mapping]) -> Dict[int, str]:
    """Label value -> class name, from a dict or a JSON file in any of the usual layouts.

    Layouts: TotalSegmentator-style ``{"1": "spleen", ...}``; nnU-Net's ``dataset.json``
    (``{"labels": {"background": 0, "liver": 1, ...}}``, whose region-based entries, lists such as
    ``"tumour core": [2, 3]``, name only values no plain entry names, each after the smallest region that holds it);
    or ``{"liver": 1, ...}``. Value 0 is background and never named.

    Args:
        path_or_dict: a mapping in one of the layouts, or the path of a JSON file holding one.

    Returns:
        dict from label value (int >= 1) to name, sorted by value.

    Raises:
        LabelCaptionError: unreadable file, not a JSON object, a value that is not a label number, a label named
            twice, or no label named at all; the message names the file.
    """
    if isinstance(path_or_dict, Mapping):
        data, where = dict(path_or_dict), "class names"
    else:
        path = Path(path_or_dict).expanduser()
        where = f"class-name file {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise LabelCaptionError(f"cannot read {where} ({first_line(e)}); pass a JSON file such as "
                                    f"{{\"1\": \"spleen\"}} or nnU-Net's dataset.json") from None
    return _parse_class_names(data, where)


def _parse_class_names(data, where: str) -> Dict[int, str]:
    hint = "expected {\"1\": \"spleen\", ...}, nnU-Net's dataset.json (\"labels\": {\"liver\": 1}) or {\"liver\": 1}"
    if not isinstance(data, dict):
        raise LabelCaptionError(f"{where} holds a JSON {type(data).__name__}, not an object; {hint}")
    if "labels" in data:  # nnU-Net dataset.json (v2: name -> value; v1: "value" -> name, handled alike below)
        data = data["labels"]
        if not isinstance(data, dict):
            raise LabelCaptionError(f"{where}: \"labels\" must be an object, got {type(data).__name__}; {hint}")
    names: Dict[int, str] = {}
    regions: List[Tuple[str, set]] = []
    by_value = bool(data) and all(_is_label_number(k) or (isinstance(k, str) and k.strip().isdigit()) for k in data)
    for key, value in data.items():
        if by_value:  # {"1": "spleen"}
            number, name = int(key), value
            if not isinstance(name, str) or not name.strip():
                raise LabelCaptionError(f"{where}: the name of label {key} must be a non-empty string, got "
                                        f"{short_repr(name)}; {hint}")
        else:  # {"liver": 1} / {"background": 0, "tumour": [1, 2]}
            number, name = value, key
            if not isinstance(name, str) or not name.strip():
                raise LabelCaptionError(f"{where}: class name {short_repr(name)} must be a non-empty string")
            if isinstance(number, list) and number and all(_is_label_number(v) for v in number):
                regions.append((name.strip(), set(number)))
                continue
            if not _is_label_number(number):
                raise LabelCaptionError(f"{where}: the value of {name!r} must be a label number >= 0 (or a list of "
                                        f"them for a region), got {short_repr(number)}; {hint}")
        if number == 0:
            continue  # background
        if number in names:
            raise LabelCaptionError(f"{where}: label {number} is named twice ({names[number]!r} and {name!r}); keep "
                                    f"one name per label value")
        names[number] = name.strip()
    for number in sorted(set().union(*(r for _, r in regions)) - set(names) - {0}):
        names[number] = min((r for r in regions if number in r[1]), key=lambda r: len(r[1]))[0]  # first smallest
    if not names:
        raise LabelCaptionError(f"{where} names no label; {hint}")
    return dict(sorted(names.items()))


def _default_class_names(folder: Path) -> Dict[int, str]:
    """The names of nnU-Net's raw layout (``dataset.json`` next to ``labelsTr``), or none."""
    ds = folder.parent / "dataset.json"
    if not ds.is_file():
        return {}
    try:
        data = json.loads(ds.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LabelCaptionError(f"cannot read {ds} ({first_line(e)}) for the class names; fix it or pass "
                                f"--class-names FILE") from None
    if not isinstance(data, dict) or "labels" not in data:
        return {}  # not an nnU-Net dataset.json: labels stay "label N"
    return _parse_class_names(data, f"{ds} (class names; pass --class-names FILE to use others)")


# ------------------------------------------------------------------------------------------------------- wording

def humanize_name(name: str) -> str:
    """A class name as a reader writes it: underscores to spaces, the side first, ``vertebrae_L1`` -> ``L1
    vertebra`` (``kidney_right`` -> ``right kidney``, ``rib_left_7`` -> ``left rib 7``).

    Args:
        name: the class name.

    Returns:
        the readable name (the name itself if nothing is left of it).
    """
    tokens = [t for t in re.split(r"[_\s]+", str(name).strip()) if t]
    sides = [t for t in tokens if t.lower() in _SIDES]
    if len(sides) == 1 and len(tokens) > 1:
        tokens.remove(sides[0])
        tokens.insert(0, sides[0].lower())
    if len(tokens) == 2 and tokens[0].lower() == "vertebrae":
        tokens = [tokens[1], "vertebra"]
    return " ".join(tokens) or str(name)


def _words(name: str) -> set:
    return {t.lower() for t in re.split(r"[_\s]+", str(name)) if t}


def slice_structures(labels2d: np.ndarray, pixel_spacing: Sequence[float], class_names: Optional[Mapping] = None,
                     midline: Optional[float] = None, midline_mm: float = MIDLINE_MM) -> List[dict]:
    """The labelled structures one 2D slice cuts, largest first.

    Args:
        labels2d: 2D array of whole-number labels (0 = background).
        pixel_spacing: (row, column) pixel size in mm.
        class_names: label value -> name (from :func:`load_class_names`); other values are named ``"label N"``.
        midline: the body's midline as a fractional column index, for slices whose columns run toward the
            patient's left (axial and coronal slices of a canonical volume); None gives no sides.
        midline_mm: centroids closer than this to the midline are ``"midline"``.

    Returns:
        list of ``{"value", "name", "area_cm2", "side"}`` sorted by decreasing area (ties: by value); ``side`` is
        ``"left"``, ``"right"``, ``"midline"`` (the patient's) or None.
    """
    lab = np.asarray(labels2d)
    if lab.ndim != 2:
        raise ValueError(f"labels2d must be 2D, got shape {lab.shape}")
    names = class_names or {}
    fg = lab.ravel() > 0
    values, inverse, counts = np.unique(lab.ravel()[fg], return_inverse=True, return_counts=True)
    columns = np.broadcast_to(np.arange(lab.shape[1], dtype=np.float64), lab.shape).ravel()[fg]
    column_sums = np.bincount(inverse.ravel(), weights=columns, minlength=len(values))
    pixel_cm2 = float(pixel_spacing[0]) * float(pixel_spacing[1]) / 100.0
    out = []
    for value, count, column_sum in zip(values.tolist(), counts.tolist(), column_sums.tolist()):
        side = None
        if midline is not None:
            offset = (column_sum / count - midline) * float(pixel_spacing[1])  # + toward the patient's left
            side = "midline" if abs(offset) < midline_mm else ("left" if offset > 0 else "right")
        value = int(value)
        out.append({"value": value, "name": names.get(value, f"label {value}"), "area_cm2": count * pixel_cm2,
                    "side": side})
    out.sort(key=lambda s: (-s["area_cm2"], s["value"]))
    return out


def _phrase(s: dict, sides: bool = True) -> str:
    whole, tenth = f"{s['area_cm2']:.0f}", f"{s['area_cm2']:.1f}"  # "small"/"large" agree with the printed number
    if float(tenth) >= SMALL_CM2:
        qualities = (["large"] if int(whole) >= LARGE_CM2 else []) + [f"{whole} cm2"]
    else:
        qualities = ["small", f"{tenth} cm2" if float(tenth) > 0 else "<0.1 cm2"]
    if sides and s.get("side") and not (_words(s["name"]) & set(_SIDES)):
        qualities.append(s["side"])
    return f"{humanize_name(s['name'])} ({', '.join(qualities)})"


def _region(structures: Sequence[dict]) -> Optional[str]:
    votes, bowel = [0.0] * len(_REGIONS), False
    for s in structures:
        words = _words(s["name"])
        bowel = bowel or bool(words & _BOWEL)
        for i, (_, keys) in enumerate(_REGIONS):
            if words & keys:
                votes[i] += s["area_cm2"]
                break
    if max(votes) > 0:
        return _REGIONS[int(np.argmax(votes))][0]  # ties: the first region
    return "abdomen" if bowel else None


def describe_slice(plane, modality: str, structures: Sequence[dict], position: float,
                   offset_mm: Optional[float] = None, max_structures: int = 6, *, with_plane: bool = True,
                   with_position: bool = True) -> str:
    """The caption of one slice from its measured structures (pure text: no files, no arrays).

    Args:
        plane: plane name or id.
        modality: ``"ct"`` or ``"mri"``.
        structures: from :func:`slice_structures` (largest first): dicts with ``name``, ``area_cm2`` and ``side``.
        position: the slice's relative position in [0, 1] (:mod:`..planes`); axial slices are located by it, as a
            percentage of the scan height from inferior.
        offset_mm: coronal: distance of the slice from the body's centre (+ posterior); sagittal: from the
            body's midline (+ toward the patient's left). None locates them by ``position`` instead.
        max_structures: how many structures are named; the rest are counted.
        with_plane: name the plane. False leaves out, besides the plane's name, everything that would still tell
            the plane: the body region (said of axial slices only), the structures' sides (not given in sagittal
            slices, whose side is their position) and the plane's own way of locating a slice (a kept position is
            then ``"at 62 % along its axis"`` in every plane).
        with_position: locate the slice. False leaves out the percentage or the distance in mm (the body region of
            an axial slice, a function of the structures it names, stays while the plane is named).

    Returns:
        one sentence, e.g. ``"Axial CT slice at 10 % of the scan height: no labelled structure."``;
        ``"CT slice: liver (large, 96 cm2) and spleen (12 cm2)."`` with neither plane nor position, the same for
        every slice that cuts the same structures with the same areas.
    """
    p = plane_id(plane)
    modality_name = _MODALITY.get(str(modality).lower(), str(modality))
    percent = round(100 * float(position))
    if not with_plane:
        head = f"{modality_name} slice" + (f" at {percent} % along its axis" if with_position else "")
    else:
        head = f"{PLANES[p].capitalize()} {modality_name} slice"
        if p == 0:
            region = _region(structures)
            head += (f" through the {region}" if region else "") + \
                (f" at {percent} % of the scan height" if with_position else "")
        elif not with_position:
            pass
        elif offset_mm is None:
            head += f" at {percent} % of the scan {'depth from anterior' if p == 1 else 'width from the right'}"
        else:
            mm = round(float(offset_mm))
            if p == 1:
                head += " through the body's centre" if mm == 0 else \
                    f" {abs(mm)} mm {'posterior' if mm > 0 else 'anterior'} to the body's centre"
            else:
                head += " through the midline" if mm == 0 else \
                    f" {abs(mm)} mm {'left' if mm > 0 else 'right'} of the midline"
    if not structures:
        return f"{head}: no labelled structure."
    parts = [_phrase(s, sides=with_plane) for s in structures[:max_structures]]
    rest = len(structures) - len(parts)
    if rest:
        parts.append(f"{rest} smaller structure{'s' if rest > 1 else ''}")
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{head}: {listing}."


# ------------------------------------------------------------------------------------------------- label files

def _label_files(source, folder: Path) -> Dict[str, str]:
    """The label file of every case of ``source`` in ``folder``; refuses a missing or ambiguous one."""
    present = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    files, missing = {}, []
    for case in source.cases:
        found = [f"{case}{e}" for e in LABEL_ENDINGS if f"{case}{e}" in present]
        if len(found) > 1:
            raise LabelCaptionError(f"{folder} holds {len(found)} label files for case {case} ({', '.join(found)}); "
                                    f"keep one")
        if found:
            files[case] = str(folder / found[0])
        else:
            missing.append(case)
    if missing:
        more = f" (and {len(missing) - 1} other case(s))" if len(missing) > 1 else ""
        raise LabelCaptionError(f"no label file for case {missing[0]}{more} in {folder} (looked for "
                                f"{missing[0]}{' / '.join(LABEL_ENDINGS)}); add it or caption a dataset without "
                                f"that case")
    return files


_DETACHED = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.MULTILINE),
             ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)}


def label_file_digest(path: PathLike) -> str:
    """The SHA-256 (hex) of a label file's bytes, what the caption settings record per case to tell changed labels.

    A detached header (``.mhd``, ``.nhdr``) that names one data file: the SHA-256 of the two files' digests, so a
    change of either counts. (Headers that list several data files or a file pattern are hashed alone.)
    """
    path = Path(path)
    digest = sha256_file(path)
    pattern = _DETACHED.get(path.suffix.lower())
    if pattern is None:
        return digest
    with open(path, "rb") as f:
        m = pattern.search(f.read(1 << 16).decode("latin-1"))
    name = m.group(1) if m else ""
    if not name or name.upper() in ("LOCAL", "LIST") or " " in name or "%" in name:
        return digest
    data = path.parent / name
    if not data.is_file():
        raise LabelCaptionError(f"{path} names the data file {name}, which does not exist next to it; restore it")
    return hashlib.sha256(f"{digest} {sha256_file(data)}".encode()).hexdigest()


def read_labels(path: str, volume, source=None) -> np.ndarray:
    """The label file at ``path`` on ``volume``'s canonical grid, as the smallest unsigned integer array
    (``source``, when given, only sharpens the message for a grid mismatch)."""
    # volumes.read_image would refuse an all-background mask as "constant"; an empty segmentation is valid here,
    # so its two readers are called directly and the values are checked below.
    reader = _read_nifti if path.endswith(NIFTI_ENDINGS) else _read_sitk
    array, spacing, direction, axes = reader(path)
    if array.ndim != 3:
        raise LabelCaptionError(f"{path} is {array.ndim}D (shape {array.shape}); a label file holds one 3D "
                                f"label map per case")
    try:
        permutation, flips = canonical_axes(direction, axes)
    except VolumeError as e:
        raise LabelCaptionError(f"{path}: {first_line(e)}") from None
    labels, spacing = _to_canonical(array[None], spacing, permutation, flips)
    labels = labels[0]
    del array
    if labels.shape != volume.shape:
        hint = " (nnU-Net preprocessed data are cropped and resampled: caption the raw dataset)" \
            if getattr(source, "kind", "") == "nnunet_preprocessed" else ""
        raise LabelCaptionError(f"{path} has shape {labels.shape} but its image has {volume.shape} (both as "
                                f"superior, posterior, left); the labels must lie on the image's voxel grid{hint}")
    if np.any(np.abs(np.subtract(spacing, volume.spacing)) > SPACING_RTOL * np.abs(volume.spacing)):
        raise LabelCaptionError(f"{path} has voxel spacing {tuple(round(s, 4) for s in spacing)} mm but its image "
                                f"has {tuple(round(s, 4) for s in volume.spacing)} mm; the labels must lie on the "
                                f"image's voxel grid (resample them with nearest neighbour)")
    bad = int(np.count_nonzero(~np.isfinite(labels)))
    if bad:
        raise LabelCaptionError(f"{path} has {bad} NaN/Inf voxels; a label file holds whole numbers 0, 1, 2, ...")
    low = float(labels.min()) if labels.size else 0.0
    if low < 0:
        raise LabelCaptionError(f"{path} has negative values (down to {low:g}); labels are whole numbers 0 "
                                f"(background), 1, 2, ...")
    fractional = labels != np.rint(labels)
    if fractional.any():
        raise LabelCaptionError(f"{path} holds non-integer values (e.g. {float(labels[fractional][0]):g}); pass "
                                f"label maps (whole numbers), not images or probability maps")
    high = int(labels.max()) if labels.size else 0
    return labels.astype(np.min_scalar_type(high))


# ------------------------------------------------------------------------------------------------------ captions

def _body_centre(volume, channel: int) -> np.ndarray:
    """Centroid (fractional indices along the three canonical axes) of the volume's body mask."""
    mask = body_mask(volume.native(channel), volume.modality)
    centre = []
    for axis in range(3):
        weights = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64)
        total = weights.sum()
        centre.append(float(np.dot(np.arange(len(weights)), weights) / total) if total else (len(weights) - 1) / 2)
    return np.asarray(centre)


def _records(volume, labels: np.ndarray, slices, class_names, max_structures: int, channel: int,
             with_plane: bool = True, with_position: bool = True) -> List[dict]:
    centre = _body_centre(volume, channel)
    out = []
    for s in slices:
        p = plane_id(s.plane)
        labels2d, pixel_spacing = extract_slice(labels, volume.spacing, p, s.index)
        structures = slice_structures(labels2d, pixel_spacing, class_names, midline=centre[2] if p != 2 else None)
        offset = None if p == 0 else (s.index - centre[p]) * volume.spacing[p]
        text = describe_slice(p, volume.modality, structures, s.position, offset, max_structures,
                              with_plane=with_plane, with_position=with_position)
        out.append({"case": s.case, "plane": s.plane, "index": int(s.index), "position": float(s.position),
                    "modality": volume.modality, "text": text, "structures": [x["name"] for x in structures]})
    return out


@dataclass(frozen=True)
class LabelCaptionResult(Result):
    """What :func:`caption_from_labels` did.

    Attributes:
        written: captions written now.
        skipped: selected slices already captioned in the file (an earlier run).
        path: the caption file.
        relabelled: the cases whose label file changed since they were captioned, captioned again now.
        replaced: their old captions, removed from the file.
    """
    written: int
    skipped: int
    path: str
    relabelled: Tuple[str, ...] = ()
    replaced: int = 0


def caption_from_labels(source, labels: PathLike, out: PathLike, policy: Optional[SlicePolicy] = None,
                        render: Optional[RenderSettings] = None, class_names=None, max_structures: int = 6,
                        progress: bool = True, *, with_plane: bool = True,
                        with_position: bool = True) -> LabelCaptionResult:
    """Caption the selected slices of every case of ``source`` from its label masks into a caption JSONL.

    The slices and keys are those ``caption`` and ``embed`` select with the same ``policy`` / ``render``, and the
    settings recorded in ``<out>.meta.json`` include :func:`~.embed.caption_settings_for`, so
    ``embed --captions`` accepts the file. Resumable: keys already in ``out`` are skipped, a resume with other
    settings (class names, ``max_structures``, slice settings, wording) is refused. Nothing is written before the
    first case's labels have been read and checked.

    Changed labels: the settings record each case's :func:`label_file_digest` (``"label_sha256"``). A case whose
    label file changed since it was captioned (edited or replaced in place) is captioned again: its old captions are
    removed from ``out`` (rewritten under a temporary name) and the new ones appended; ``relabelled`` and
    ``replaced`` of the result say which and how many. A file written before the digests were recorded is resumed
    with a warning (a change since cannot be seen) and the digests are recorded from then on.

    Args:
        source: a :class:`~med3dinsight_plugin.volumes.VolumeSource` (the images), or a
            :class:`~med3dinsight_plugin.crops.CropSource` (each crop case captioned from its box of the labels).
        labels: folder with one label file per case, ``{case}.nii.gz`` (or ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``,
            ``.nhdr``): nnU-Net's ``labelsTr``, or TotalSegmentator's multi-label outputs named like the images.
            Each must lie on its image's voxel grid (any orientation) and hold whole numbers >= 0.
        out: the caption ``.jsonl`` (created, or resumed).
        policy: slice selection (default :class:`~med3dinsight_plugin.slices.SlicePolicy`).
        render: rendering settings; only ``channel`` (the body mask) matters here, but all of them are recorded
            so that ``embed`` can check them.
        class_names: dict or JSON file for :func:`load_class_names`; default: the ``dataset.json`` next to the
            label folder (nnU-Net raw layout) if it has labels, else ``"label N"``.
        max_structures: structures named per slice (largest first); the rest are counted.
        progress: show a tqdm bar over the cases.
        with_plane: name the slice's plane (``--no-plane``: False). The pretraining model is given each slice's
            plane and position, so captions that state them teach it what it already knows; without the plane,
            the body region and the structures' sides are left out too, since they are said of some planes only
            (:func:`describe_slice`).
        with_position: locate the slice in the scan (``--no-position``: False): no percentage, no distance in mm.
            With neither, two slices that cut the same structures with the same areas get the same caption,
            whatever their plane and position. Recorded in the settings (``"without"``), so a resume with another
            choice is refused.

    Returns:
        A :class:`LabelCaptionResult`: ``written`` (captions written now), ``skipped`` (already in the file),
        ``path``, ``relabelled`` (the cases whose label file changed since they were captioned, captioned again now)
        and ``replaced`` (their old captions, removed from the file).

    Raises:
        LabelCaptionError: missing label folder or file, label file off its image's grid or with values that are
            not whole numbers >= 0, bad class names; the message names the file or case.
        CaptionError: the output holds captions made with other settings.
        RunLockedError: another run holds the caption file's lock (``<out>.lock``, :func:`.captions.caption_lock`,
            held from reading the file to the last caption written).

    Warns:
        UserWarning: ``out`` was written before the label files' digests were recorded.
    """
    from tqdm.auto import tqdm

    policy = policy or SlicePolicy()
    render = render or RenderSettings()
    if isinstance(max_structures, bool) or not isinstance(max_structures, int) or max_structures < 1:
        raise LabelCaptionError(f"max_structures must be a whole number of at least 1, got {max_structures!r}")
    folder = Path(labels).expanduser()
    if not folder.is_dir():
        raise LabelCaptionError(f"label folder {folder} {'is a file' if folder.exists() else 'does not exist'}; pass "
                                f"the folder that holds one label file per case (CASE.nii.gz, e.g. labelsTr)")
    names = _default_class_names(folder) if class_names is None else load_class_names(class_names)
    channels = getattr(source, "num_channels", 1)
    if render.channel >= channels:
        raise LabelCaptionError(f"{source.root} has {channels} channel(s) per case; channel {render.channel} does "
                                f"not exist (--channel takes 0 to {channels - 1})")

    crops = source if isinstance(source, CropSource) else None  # crop cases: each labelled by its box of the volume
    files = _label_files(crops.source if crops else source, folder)
    last: list = [None, None]

    def labels_of(case, volume):
        if crops is None:
            return read_labels(files[case], volume, source)
        base, m = split_crop_case(case)
        whole, boxes = crops.boxes(base)
        if last[0] != base:
            last[:] = [base, read_labels(files[base], whole, crops.source)]
        return last[1][tuple(slice(a, b) for a, b in boxes[m])]

    settings = {"model": "labels", "generator": GENERATOR, "class_names": {str(k): v for k, v in names.items()},
                "max_structures": max_structures, **caption_settings_for(policy, render)}
    without = [w for w, keep in (("plane", with_plane), ("position", with_position)) if not keep]
    if without:  # recorded only when used: files written with the full wording resume as before
        settings["without"] = without
    digests = {case: label_file_digest(path) for case, path in files.items()}

    def volume_of(case):  # the case whose label file captions ``case``
        if crops is None:
            return case
        try:
            return split_crop_case(case)[0]
        except Med3DInsightError:
            return None  # not a crop case: not from this dataset

    with caption_lock(out):  # one run per caption file: a second one fails naming this one's pid
        store = CaptionFile(out)
        existing = CaptionFile.read(store.path)
        recorded: dict = {}
        if existing:  # a resume: refuse other settings before any work (even if every slice is done already)
            store.check_settings(settings, ignore=(LABEL_DIGESTS,))
            recorded = store.stored_settings().get(LABEL_DIGESTS)
            if recorded is None:
                warnings.warn(f"{store.path} was captioned before the label files' digests were recorded, so a "
                              f"change of them since cannot be seen: its captions are kept and the digests recorded "
                              f"from now on (delete it and its {store.meta_path.name} to caption every case again)",
                              UserWarning, stacklevel=2)
                recorded = dict(digests)  # taken as they are
            if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
                raise CaptionError(f"{store.meta_path}: {LABEL_DIGESTS!r} must map each case to the SHA-256 of its "
                                   f"label file; restore the file or use a new output file")
        relabelled = sorted({c for c in map(volume_of, (r["case"] for r in existing.values()))
                             if c in digests and recorded.get(c) != digests[c]})
        done = {k for k, r in existing.items() if volume_of(r["case"]) not in relabelled}
        full = {**settings, LABEL_DIGESTS: {**recorded, **digests}}
        replaced, committed = 0, False

        def commit():  # before the first caption is appended (or at the end): old captions of changed labels out, then
            nonlocal replaced, committed  # the sidecar, so that it never vouches for captions of other labels
            if not existing:
                store.check_settings(full)
            else:
                replaced = store.drop_cases({r["case"] for r in existing.values()
                                             if volume_of(r["case"]) in relabelled})
                if store.stored_settings() != json.loads(json.dumps(full)):
                    store.record_settings(full)
            committed = True

        opened, written, skipped, bar = False, 0, 0, None
        try:
            for case in source.cases:
                volume = source.read(case)
                todo = []
                for s in volume_slices(volume, policy, render, render=False):
                    if s.key in done:
                        skipped += 1
                    else:
                        done.add(s.key)
                        todo.append(s)
                if todo:
                    records = _records(volume, labels_of(case, volume), todo, names, max_structures, render.channel,
                                       with_plane=with_plane, with_position=with_position)
                    if not opened:  # the sidecar (and the file) only once there is something to write
                        commit()
                        store.open()
                        opened = True
                    written += store.write(records)
                if bar is None:  # shown once the first case went through: an error in it stays the only output line
                    bar = tqdm(total=len(source.cases), initial=1, unit="case", disable=not progress,
                               desc=f"captioning {store.path.name} from labels", dynamic_ncols=True)
                else:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            store.close()
        if existing and not committed:  # nothing to write: still record the digests of a file from before them
            commit()
        return LabelCaptionResult(written=written, skipped=skipped, path=str(store.path), relabelled=tuple(relabelled),
                                  replaced=replaced)
