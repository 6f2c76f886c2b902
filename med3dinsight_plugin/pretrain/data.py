"""Pretraining samples: a 3D view of a volume plus K cached teacher slices that lie inside it.

Two views (``data.view``):

- ``crop``: a random crop of ``patch_size`` voxels; the volume is first resampled once to a target spacing (the
  dataset's median voxel size by default, as nnU-Net's fingerprint chooses it; nnU-Net preprocessed data are already
  at the plans' spacing) with nnU-Net's resampling. The teacher's slices are whole slices of the volume, so a crop
  shows the encoder only part of what the teacher saw in-plane.
- ``volume`` (the authors' setup): the body's bounding box, resampled once to ``patch_size`` with nnU-Net's own
  resampling (third order, z separately when anisotropic); every sample is the whole box, so the encoder sees what
  the teacher saw. Slice positions are relative, so they carry over to the resampled box exactly.

Volumes are first *prepared* once: read in canonical orientation (:mod:`..volumes`), normalised as nnU-Net does it
(CT: clip to the dataset's 0.5/99.5 body percentiles, z-score with the dataset's body mean/std; MRI: per-volume
z-score; nnU-Net preprocessed data: as nnU-Net left it) with nnU-Net's own normalisation classes, and stored as
``.npy`` files that the loader memory-maps. Sample ``i`` is a pure function of ``(seed, i)``, so batches do not
depend on the number of loader workers or processes and a resumed run sees the same data.

Slice bookkeeping: the crop is placed so that it contains a randomly chosen cached slice; the K slices are drawn
from the cached slices inside the crop, spread over planes and positions (stratified, so no two are neighbours
when there is choice), and their positions are mapped into crop coordinates: a cached slice ``i`` of an axis of
``n`` voxels has its centre at ``(i + 0.5) / n`` of the axis, which stays where it is when the volume is resampled
(to a target spacing, or the body box to the patch); its position in a crop is that centre's relative position
inside the crop (:func:`~med3dinsight_plugin.planes.crop_position` without resampling). Only intensity
augmentations are applied: a flip or rotation would change what the teacher saw in the slice.
"""
from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..dense import crop_map_target
from ..errors import Med3DInsightError
from ..fileio import atomic_write
from ..slices import body_box
from ..teacher.cache import StaleCacheError, TeacherCache
from ..volumes import VolumeError

__all__ = ["VIEWS", "PretrainDataset", "body_box", "compute_normalization", "median_spacing", "prepare_volumes",
           "prepared_boxes", "resample_box", "split_cases"]

PREPARED = "prepared.json"
_SAMPLES_PER_CASE = 10000  # body voxels per case for the CT statistics (nnU-Net's fingerprint samples likewise)
# No CT holds Hounsfield units beyond this (the extended scale for metal reaches about 3e4; unrescaled 16-bit
# storage 65535); a voxel beyond it is corruption, and one such voxel would dominate the dataset's mean and std.
_CT_LIMIT = 1.0e6


def compute_normalization(source, cases: Sequence[str], seed: int = 0) -> Dict[str, Any]:
    """nnU-Net's intensity normalisation scheme and, for CT, its dataset statistics over body voxels.

    The statistics are computed in float64.

    Raises:
        VolumeError: a CT case with voxels beyond +-1e6 (not Hounsfield units), naming its file.
    """

    if source.kind == "nnunet_preprocessed":
        return {"scheme": "nnunet_preprocessed", **source.describe()}
    if source.modality == "mri":
        return {"scheme": "ZScoreNormalization"}
    rng = np.random.default_rng(seed)
    samples = []
    for case in cases:
        volume = source.read(case)
        v = volume.native(0)
        extreme = float(np.max(np.abs(v))) if v.size else 0.0
        if extreme > _CT_LIMIT:
            raise VolumeError(f"{_files(volume, case)} has voxel values up to {extreme:.3g}, far beyond any CT "
                              f"(|HU| <= {_CT_LIMIT:.0e}); repair the file or remove it from the dataset")
        body = v[v > -500.0]
        if body.size:
            samples.append(rng.choice(body, min(_SAMPLES_PER_CASE, body.size), replace=False).astype(np.float64))
    values = np.concatenate(samples) if samples else np.zeros(1, np.float64)
    return {"scheme": "CTNormalization", "mean": float(values.mean()), "std": float(values.std()),
            "percentile_00_5": float(np.percentile(values, 0.5)), "percentile_99_5": float(np.percentile(values, 99.5))}


def _files(volume, case: str) -> str:
    """The file(s) a case was read from, for messages (else the case name)."""
    files = list(getattr(volume, "files", None) or [])
    return files[0] if len(files) == 1 else f"case {case}" + (f" ({', '.join(files)})" if files else "")


def _normalize(array: np.ndarray, normalization: Dict[str, Any]) -> np.ndarray:
    """Normalise every channel with nnU-Net's scheme, computed in float64 (a float32 mean or std of an MRI with
    huge values overflows), stored as float32."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, ZScoreNormalization
    scheme = normalization["scheme"]
    if scheme == "nnunet_preprocessed":
        return array
    out = np.empty(array.shape, np.float32)
    for c in range(array.shape[0]):
        if scheme == "CTNormalization":
            props = {k: normalization[k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
            norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props, target_dtype=np.float64)
        else:  # per-volume statistics; nnU-Net >= 2.6 asserts intensityproperties is a dict even when unused
            norm = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}, target_dtype=np.float64)
        out[c] = norm.run(array[c].astype(np.float64))
    return out


VIEWS = ("crop", "volume")


def median_spacing(source, cases: Sequence[str]) -> List[float]:
    """The median voxel size (mm) per canonical axis over ``cases``, from their headers: nnU-Net's fingerprint target
    for 3d_fullres (without its rule for very anisotropic data)."""
    return [float(v) for v in np.median(np.array([source.spacing(c) for c in cases], np.float64), axis=0)]


def _resample(data: np.ndarray, spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """``data`` (C, D, H, W) with voxel size ``spacing`` resampled to ``shape`` over the same extent, with nnU-Net's
    data resampling (order 3, order 0 along z when the spacing is anisotropic, as its default plans do)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    extent = [n * float(s) for n, s in zip(data.shape[1:], spacing)]
    new_spacing = [e / n for e, n in zip(extent, shape)]
    out = resample_data_or_seg_to_shape(np.ascontiguousarray(data, dtype=np.float32), tuple(int(n) for n in shape),
                                        list(map(float, spacing)), new_spacing, is_seg=False, order=3, order_z=0,
                                        force_separate_z=None)
    return np.ascontiguousarray(out, dtype=np.float32)


def resample_box(data: np.ndarray, box: Sequence[Sequence[int]], spacing: Sequence[float],
                 shape: Sequence[int]) -> np.ndarray:
    """The ``box`` of ``data`` (C, D, H, W) resampled to ``shape`` with nnU-Net's data resampling."""
    return _resample(data[(slice(None),) + tuple(slice(a, b) for a, b in box)], spacing, shape)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> List[int]:
    """The shape of a ``shape`` volume of voxel size ``spacing`` at voxel size ``target`` (nnU-Net's rounding)."""
    return [max(1, int(round(n * float(s) / float(t)))) for n, s, t in zip(shape, spacing, target)]


MIN_BOX_VOXELS = 4  # the volume view refuses body boxes thinner than this (a 2-slice scan is no 3D field of view)


def prepare_volumes(source, cases: Sequence[str], folder, normalization: Dict[str, Any],
                    cache: Optional[TeacherCache] = None, view: str = "crop",
                    patch_size: Optional[Sequence[int]] = None,
                    spacing: Optional[Sequence[float]] = None) -> Dict[str, List[int]]:
    """Write each case's normalised canonical array to ``folder/CASE.npy`` (atomically) unless a matching one is
    there from an earlier run; returns the canonical shape of every case (as read, before any resampling).

    With ``view="volume"`` the stored array is the body box resampled to ``patch_size`` and the boxes are kept in
    the index (:func:`prepared_boxes`). With ``view="crop"`` and a target ``spacing`` (canonical axes, mm), each
    volume is resampled to it (:func:`resampled_shape`); ``None`` keeps every volume at its own spacing.

    With ``cache``, each volume's content fingerprint must be the one the teacher cache recorded for the case
    (:meth:`~med3dinsight_plugin.teacher.cache.TeacherCache.check_fingerprint`): a cache made from other images
    with the same case names and shapes is refused. Fingerprints are kept in the index, so prepared cases are
    checked on later starts without being read again.
    """
    if view not in VIEWS:
        raise Med3DInsightError(f"data.view must be one of {', '.join(VIEWS)}, got {view!r}")
    if view == "volume" and patch_size is None:
        raise ValueError("prepare_volumes(view='volume') needs the patch_size to resample to")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / PREPARED
    settings = {"source": source.describe(), "normalization": normalization}
    if view == "volume":  # crop-view settings stay as they were, so earlier runs' prepared data remain valid
        settings.update(view=view, patch_size=[int(p) for p in patch_size])
    elif spacing is not None:
        spacing = [float(x) for x in spacing]
        settings["spacing"] = spacing
    old = json.loads(index_path.read_text()) if index_path.is_file() else {}
    same = old.get("settings") == settings
    done = old.get("cases", {}) if same else {}
    fingerprints = old.get("fingerprints", {}) if same else {}
    boxes = old.get("boxes", {}) if same else {}
    shapes = {}
    for case in cases:
        path = folder / f"{case}.npy"
        if case in done and case in fingerprints and path.is_file() and (view == "crop" or case in boxes):
            if cache is not None:
                cache.check_fingerprint(case, fingerprints[case])
            shapes[case] = done[case]
            continue
        volume = source.read(case)
        fingerprints[case] = volume.fingerprint()
        if cache is not None:
            cache.check_fingerprint(case, fingerprints[case])
        data = _normalize(volume.array, normalization)
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise VolumeError(f"{_files(volume, case)} gives {bad} non-finite voxels after {normalization['scheme']} "
                              f"(its values are too extreme to normalise); repair the file or remove it from the "
                              f"dataset")
        if view == "volume":
            boxes[case] = body_box(volume)
            thin = [a for a, (lo, hi) in enumerate(boxes[case]) if hi - lo < MIN_BOX_VOXELS]
            if thin:  # the crop view refuses such a volume too (less than half the patch)
                extent = [hi - lo for lo, hi in boxes[case]]
                raise Med3DInsightError(f"{_files(volume, case)}: its body box is {'x'.join(map(str, extent))} voxels, "
                                        f"fewer than {MIN_BOX_VOXELS} along axis {thin[0]}; resampling it to the "
                                        f"{'x'.join(map(str, patch_size))} patch would invent the anatomy between "
                                        f"its slices: leave the case out of the dataset")
            data = resample_box(data, boxes[case], volume.spacing, patch_size)
        elif spacing is not None and not np.allclose(volume.spacing, spacing, rtol=1e-4, atol=0):
            data = _resample(data, volume.spacing, resampled_shape(volume.shape, volume.spacing, spacing))
        atomic_write(path, lambda tmp, d=data: np.save(open(tmp, "wb"), d, allow_pickle=False))
        shapes[case] = list(volume.shape)
        done[case] = shapes[case]
        index = {"settings": settings, "cases": done, "fingerprints": fingerprints}
        if view == "volume":
            index["boxes"] = boxes
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    return shapes


def prepared_boxes(folder) -> Dict[str, List[List[int]]]:
    """The body boxes :func:`prepare_volumes` recorded for the ``volume`` view (empty for ``crop``)."""
    index_path = Path(folder) / PREPARED
    return json.loads(index_path.read_text()).get("boxes", {}) if index_path.is_file() else {}


@contextmanager
def _global_rngs(seed: int):
    """Seed Python's, numpy's and torch's (CPU) global generators for one sample; restore them afterwards.

    batchgenerators' transforms draw from the global generators (GaussianNoiseTransform from both ``random`` and
    ``np.random``; batchgeneratorsv2's from torch). Seeding all of them from the sample's own generator makes a
    sample the same in any loader worker and in the main process; restoring them leaves the training loop's own
    streams (saved in checkpoints, with ``data.num_workers: 0`` in the same process) exactly as they were.
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed would reseed CUDA's too)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def split_cases(cases: Sequence[str], eval_cases: int, seed: int, subject: Optional[Callable[[str], str]] = None):
    """A seeded split into (train, held-out) cases; no held-out cases when there are too few.

    Args:
        subject: the volume a case comes from (crops as cases: ``CASE@m`` -> ``CASE``); ``eval_cases`` volumes are
            then held out with all their cases, so that no volume is on both sides. Default: every case its own.
    """
    key = subject or (lambda case: case)
    groups = list(dict.fromkeys(key(case) for case in cases))
    order = [groups[i] for i in np.random.default_rng([seed, 7]).permutation(len(groups))]
    held = set(order[:eval_cases if len(groups) > eval_cases else 0])
    return sorted(c for c in cases if key(c) not in held), sorted(c for c in cases if key(c) in held)


def _augmenter():
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform

    # nnU-Net's intensity augmentations and probabilities; no spatial ones (see the module docstring)
    return Compose([
        GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
    ])


class PretrainDataset(Dataset):
    """Crops with K aligned teacher slices; ``dataset[i]`` is deterministic for every ``i >= 0``.

    Args:
        folder: the prepared volumes (:func:`prepare_volumes`).
        cases: the cases to draw from (each visited once per pass over ``len(cases)`` samples).
        shapes: canonical shape of each case (checked against the cache).
        cache: the :class:`~med3dinsight_plugin.teacher.cache.TeacherCache` of the same volumes.
        patch_size: crop size (D, H, W); smaller volumes are padded with their minimum. Prepared arrays resampled to
            a target spacing (another shape than ``shapes``) have the cached slices mapped onto their grid.
        slices: K, slices per crop; a crop with fewer cached slices marks the rest in ``mask``.
        seed: the data seed.
        augment: apply nnU-Net's intensity augmentations.
        length: ``len()`` for a finite (held-out) set, whose sample ``i`` uses case ``i % len(cases)``.
        boxes: for the ``volume`` view, each case's body box (:func:`prepared_boxes`): the prepared arrays are those
            boxes resampled to ``patch_size``, and every sample is a whole box. ``None``: the ``crop`` view.
        maps: also return dense distillation's targets, ``map_target`` (K, C, S, S) and ``map_valid`` (K, S, S):
            the cached teacher maps of the sample's slices resampled onto the crop's extent
            (:func:`~med3dinsight_plugin.dense.crop_map_target`); the cache must hold maps.
    """

    def __init__(self, folder, cases: Sequence[str], shapes: Dict[str, Sequence[int]], cache: TeacherCache,
                 patch_size: Sequence[int], slices: int = 8, seed: int = 0, augment: bool = True,
                 length: Optional[int] = None, boxes: Optional[Dict[str, Sequence[Sequence[int]]]] = None,
                 maps: bool = False):
        self.folder, self.cases, self.cache = Path(folder), list(cases), cache
        if maps and not getattr(cache, "has_maps", False):
            raise StaleCacheError(f"the teacher cache {cache.folder} holds no feature maps, which dense distillation "
                                  f"needs; rerun med3dinsight embed with --feature-maps S into a new folder")
        self.maps = bool(maps)
        self.patch = tuple(int(p) for p in patch_size)
        self.k, self.seed, self.augment, self.length = int(slices), int(seed), augment, length
        self.boxes = None if boxes is None else {c: [tuple(map(int, b)) for b in boxes[c]] for c in self.cases}
        if not self.cases:
            raise Med3DInsightError("no cases to pretrain on")
        self.scale: Dict[str, np.ndarray] = {}  # prepared voxels per voxel as read, per canonical axis
        for case in self.cases:
            entries = cache.entries(case)  # a case the cache lacks is refused here, at start
            if tuple(entries.shape) != tuple(shapes[case]):
                raise StaleCacheError(f"the teacher cache {cache.folder} was made from a volume of shape "
                                      f"{tuple(entries.shape)} for case {case}, but it now has shape "
                                      f"{tuple(shapes[case])}; rerun med3dinsight embed on the current data")
            grid = np.load(self.folder / f"{case}.npy", mmap_mode="r").shape[1:]
            self.scale[case] = np.ones(3) if self.boxes is not None else \
                np.array(grid, np.float64) / np.array(shapes[case], np.float64)
            small = [a for a in range(3) if 2 * grid[a] < self.patch[a]]
            if small and self.boxes is None:
                raise Med3DInsightError(f"case {case} has shape {tuple(grid)}, less than half the patch "
                                 f"{self.patch} along axis {small[0]}; most of each crop would be padding: lower "
                                 f"model.patch_size or leave the case out")
            if len(entries.plane) == 0:
                raise StaleCacheError(f"the teacher cache {cache.folder} has no slices of case {case}; check "
                                      f"the slice settings it was made with")
        self._augment = _augmenter() if augment else None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("the training set is infinite: index it by global sample number")
        return self.length

    def _case(self, i: int) -> str:
        n = len(self.cases)
        if self.length is not None:
            return self.cases[i % n]
        epoch, j = divmod(i, n)
        return self.cases[int(np.random.default_rng([self.seed, 3, epoch]).permutation(n)[j])]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1 if self.length is None else 2, int(i)])
        case = self._case(int(i))
        e = self.cache.entries(case)
        volume = np.load(self.folder / f"{case}.npy", mmap_mode="r")
        # a slice's centre on the sampled grid, from the grid's low edge, in its voxels
        scale = self.scale[case]
        centre = (e.index.astype(np.float64) + 0.5) * scale[e.plane]
        if self.boxes is not None:  # volume view: the whole (resampled) body box
            start, size = [b[0] for b in self.boxes[case]], [b[1] - b[0] for b in self.boxes[case]]
            rows = self._pick(e, centre, start, size, rng)
            crop = np.array(volume, dtype=np.float32)
        else:
            shape, size = volume.shape[1:], self.patch
            anchor = int(rng.integers(len(e.plane)))
            start = []
            for axis in range(3):
                lo, hi = min(0, shape[axis] - self.patch[axis]), max(0, shape[axis] - self.patch[axis])
                if axis == e.plane[anchor]:  # keep the anchor slice inside the crop
                    idx = min(shape[axis] - 1, int(np.floor(centre[anchor])))
                    lo, hi = max(lo, idx - self.patch[axis] + 1), min(hi, idx)
                start.append(int(rng.integers(lo, hi + 1)))
            rows = self._pick(e, centre, start, size, rng)
            crop = self._crop(volume, start)
        if not rows:  # volume view: no cached slice inside the body box (a box that misses the selected slices)
            raise StaleCacheError(f"none of the cached slices of case {case} lies inside its body box "
                                  f"{self.boxes[case]}; re-embed with the current slice settings")
        if self._augment is not None:
            with _global_rngs(int(rng.integers(2 ** 31))):  # batchgenerators draws from Python's and numpy's
                crop = self._augment(data=crop[None])["data"][0].astype(np.float32, copy=False)
        mask = np.zeros(self.k, bool)
        mask[:len(rows)] = True
        rows = rows + [rows[0]] * (self.k - len(rows))
        plane = e.plane[rows].astype(np.int64)
        position = np.array([(centre[r] - start[p]) / size[p] for r, p in zip(rows, plane)], np.float32)
        out = {"volume": torch.from_numpy(np.ascontiguousarray(crop)), "plane": torch.from_numpy(plane),
               "position": torch.from_numpy(position), "mask": torch.from_numpy(mask),
               "image_emb": torch.from_numpy(np.asarray(e.image[rows], np.float32))}
        if e.text is not None:
            out["text_emb"] = torch.from_numpy(np.asarray(e.text[rows], np.float32))
        if self.maps:
            # the crop's extent as fractions of the volume as read (the cached maps cover whole slices of it)
            extent = np.array(e.shape, np.float64) if self.boxes is not None else \
                np.array(volume.shape[1:], np.float64)  # crop view: the prepared grid spans the same volume
            low = np.array(start, np.float64) / extent
            high = (np.array(start, np.float64) + np.array(size, np.float64)) / extent
            target, valid = crop_map_target(e.image_map[rows], plane, low, high, e.image_map.shape[-1])
            out["map_target"], out["map_valid"] = torch.from_numpy(target), torch.from_numpy(valid)
        return out

    def _pick(self, e, centre: np.ndarray, start: Sequence[int], size: Sequence[int], rng) -> List[int]:
        """Up to K cached rows whose slice centre lies inside the box ``start + size``: planes round-robin in random
        order, positions stratified."""
        inside = {}
        for p in range(3):
            rows = np.flatnonzero((e.plane == p) & (centre >= start[p]) & (centre < start[p] + size[p]))
            if len(rows):
                inside[p] = rows[np.argsort(e.index[rows], kind="stable")]
        quota = {p: 0 for p in inside}
        order = list(rng.permutation(sorted(inside)))
        while sum(quota.values()) < self.k and any(quota[p] < len(inside[p]) for p in order):
            for p in order:
                if quota[p] < len(inside[p]) and sum(quota.values()) < self.k:
                    quota[p] += 1
        picked = []
        for p in sorted(inside):
            rows, q = inside[p], quota[p]
            edges = np.floor(np.linspace(0, len(rows), q + 1)).astype(int)
            picked += [int(rows[rng.integers(a, b)]) for a, b in zip(edges[:-1], edges[1:])]
        return picked

    def _crop(self, volume: np.ndarray, start: List[int]) -> np.ndarray:
        shape = volume.shape[1:]
        src = tuple(slice(max(0, s), min(n, s + p)) for s, n, p in zip(start, shape, self.patch))
        dst = tuple(slice(max(0, -s), max(0, -s) + (sl.stop - sl.start)) for s, sl in zip(start, src))
        data = np.asarray(volume[(slice(None),) + src], dtype=np.float32)
        if all(sl.stop - sl.start == p for sl, p in zip(src, self.patch)):
            return np.array(data)
        out = np.empty((volume.shape[0],) + self.patch, np.float32)
        out[:] = data.reshape(data.shape[0], -1).min(axis=1)[:, None, None, None]  # pad with each channel's minimum
        out[(slice(None),) + dst] = data
        return out
