"""Which slices the 2D teacher sees, and how they are rendered for it.

Slices are taken from a :class:`~med3dinsight_plugin.volumes.Volume` in canonical orientation and located with the
convention of :mod:`.planes` (plane id, relative position at voxel centres). Rendering shows each slice the way a
radiologist reads it -- head up, patient's left on the image's right, anterior on the left of a sagittal view -- at
its physical aspect ratio, letterboxed into a square of the teacher's input size, 3 channels, uint8.

The geometry is explicit so that it can be undone: :func:`letterbox_box` is where a slice lands on the square canvas,
``DISPLAY_FLIPS`` which in-plane axes :func:`extract_slice` reverses, and :func:`feature_map_grid` maps a regular grid
on the slice's canonical in-plane axes back onto the canvas (for a teacher's spatial feature maps).
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Med3DInsightError
from .fileio import atomic_write
from .planes import PLANES, plane_id, slice_position

__all__ = ["DISPLAY_FLIPS", "IN_PLANE_AXES", "RenderSettings", "Slice", "SlicePolicy", "body_box", "body_mask",
           "dataset_slices", "extract_slice", "feature_map_grid", "intensity_window", "letterbox_box", "render_slice",
           "select_slices", "slice_key", "volume_slices", "write_slice_pngs"]

CT_SOFT_TISSUE = (40.0, 400.0)  # window centre, width in HU
# The canonical axes a slice of each plane spans, as (display rows, display columns), in increasing axis order.
IN_PLANE_AXES = ((1, 2), (0, 2), (0, 1))
# Whether the display reverses (rows, columns) of each plane: coronal and sagittal slices are shown superior up, i.e.
# with canonical axis 0 (toward superior) reversed; nothing else is flipped.
DISPLAY_FLIPS = ((False, False), (True, False), (True, False))


@dataclass(frozen=True)
class SlicePolicy:
    """Which slices to take from each volume.

    Args:
        per_plane: slices per plane, spread evenly over the slices that show enough of the body.
        planes: plane names to take slices from.
        min_foreground: skip slices whose body fraction is below this (mostly air / background).
    """

    per_plane: int = 16
    planes: Tuple[str, ...] = PLANES
    min_foreground: float = 0.05

    def __post_init__(self):
        if isinstance(self.per_plane, bool) or not isinstance(self.per_plane, numbers.Integral) or self.per_plane < 1:
            raise Med3DInsightError(f"per_plane (--per-plane) must be a whole number of at least 1, got "
                                    f"{self.per_plane!r}")
        if not 0.0 <= self.min_foreground < 1.0:
            raise Med3DInsightError(f"min_foreground (--min-foreground) must lie in [0, 1), got {self.min_foreground}")
        if not self.planes:
            raise Med3DInsightError("planes (--planes) must name at least one of axial, coronal, sagittal")
        try:
            planes = tuple(PLANES[plane_id(p)] for p in self.planes)
        except (ValueError, TypeError, IndexError, KeyError):
            raise Med3DInsightError(f"planes (--planes) must be among axial, coronal, sagittal, got "
                                    f"{list(self.planes)}") from None
        object.__setattr__(self, "planes", planes)

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "planes": list(self.planes)}


@dataclass(frozen=True)
class RenderSettings:
    """How a slice becomes a teacher image.

    Args:
        size: output width and height in pixels (the teacher's input size).
        ct_window: CT window ``(centre, width)`` in HU; the default is a soft-tissue window.
        mri_percentiles: MRI intensities between these percentiles of the body voxels map to black..white.
        channel: which input channel to render (multi-channel MRI).
    """

    size: int = 224
    ct_window: Tuple[float, float] = CT_SOFT_TISSUE
    mri_percentiles: Tuple[float, float] = (0.5, 99.5)
    channel: int = 0

    def __post_init__(self):
        if not 8 <= self.size <= 4096:
            raise Med3DInsightError(f"render size (--size) must be 8 to 4096 pixels, got {self.size}")
        if not all(np.isfinite(self.ct_window)) or self.ct_window[1] <= 0:
            raise Med3DInsightError(f"CT window (--ct-window CENTRE WIDTH) needs a finite centre and a positive width, "
                                    f"got {self.ct_window}")
        lo, hi = self.mri_percentiles
        if not 0 <= lo < hi <= 100:
            raise Med3DInsightError(f"MRI percentiles (--mri-percentiles) must satisfy 0 <= low < high <= 100, got "
                                    f"{self.mri_percentiles}")
        if isinstance(self.channel, bool) or not isinstance(self.channel, numbers.Integral) or self.channel < 0:
            raise Med3DInsightError(f"render channel (--channel) must be 0 or more, got {self.channel!r}")
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        object.__setattr__(self, "mri_percentiles", tuple(float(v) for v in self.mri_percentiles))

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Slice:
    """One selected slice: where it lies and (once rendered) its image."""

    case: str
    plane: str
    index: int
    position: float
    modality: str
    image: Optional[np.ndarray] = field(default=None, repr=False)
    box: Optional[Tuple[int, int, int, int]] = None  # where the slice lies on the rendered canvas (letterbox_box)

    @property
    def key(self) -> str:
        return slice_key(self.case, self.plane, self.position)


def slice_key(case: str, plane, position: float) -> str:
    """Identity of a slice across captions and cache: ``"{case}|{plane name}|{position:.6f}"``.

    Args:
        case: case identifier.
        plane: plane name or id (0 axial, 1 coronal, 2 sagittal).
        position: relative slice position in [0, 1] (see :mod:`.planes`).
    """
    return f"{case}|{PLANES[plane_id(plane)]}|{float(position):.6f}"


def body_mask(data: np.ndarray, modality: str) -> np.ndarray:
    """Voxels that show the patient rather than air or background, from scanner-unit intensities."""
    if modality == "ct":
        return data > -500.0
    lo, hi = np.percentile(data, (1.0, 99.5))
    return data > lo + 0.05 * (hi - lo)


def body_box(volume) -> List[List[int]]:
    """``[[start, stop], ...]`` per canonical axis of the body (:func:`body_mask` of the first channel in scanner
    units); the whole volume when no voxel counts as body."""
    mask = body_mask(volume.native(0), volume.modality)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    return box


def select_slices(mask: np.ndarray, policy: SlicePolicy) -> List[Tuple[int, int]]:
    """``(plane id, index)`` pairs: per plane, ``policy.per_plane`` indices spread evenly over the slices whose
    body fraction reaches ``policy.min_foreground`` (all of them if there are fewer)."""
    out = []
    for name in policy.planes:
        p = plane_id(name)
        fraction = mask.mean(axis=tuple(a for a in range(3) if a != p))
        candidates = np.flatnonzero(fraction >= policy.min_foreground)
        if len(candidates) == 0:
            continue
        n = min(policy.per_plane, len(candidates))
        picks = candidates[((np.arange(n) + 0.5) * len(candidates) / n).astype(int)]
        out.extend((p, int(i)) for i in picks)
    return out


def extract_slice(data: np.ndarray, spacing, plane: int, index: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """The 2D slice of a canonical (D, H, W) array in radiological display orientation, with its pixel spacing.

    Axial: anterior up, patient's right on the left. Coronal: superior up, patient's right on the left.
    Sagittal: superior up, anterior on the left. The rows and columns run along ``IN_PLANE_AXES[plane]``, reversed
    where ``DISPLAY_FLIPS[plane]`` says so.
    """
    take: List[Any] = [slice(None)] * 3
    take[plane] = index
    flips = tuple(slice(None, None, -1) if f else slice(None) for f in DISPLAY_FLIPS[plane])
    rows, cols = IN_PLANE_AXES[plane]
    return data[tuple(take)][flips], (spacing[rows], spacing[cols])


def letterbox_box(shape2d, pixel_spacing, size: int) -> Tuple[int, int, int, int]:
    """Where :func:`render_slice` puts a 2D slice of ``shape2d`` pixels of ``pixel_spacing`` mm on its ``size``
    square: ``(top, left, height, width)`` in canvas pixels (the rest is the black letterbox)."""
    h_mm, w_mm = shape2d[0] * pixel_spacing[0], shape2d[1] * pixel_spacing[1]
    scale = size / max(h_mm, w_mm)
    h, w = min(size, max(1, round(h_mm * scale))), min(size, max(1, round(w_mm * scale)))
    return (size - h) // 2, (size - w) // 2, h, w


def feature_map_grid(plane: int, box: Tuple[int, int, int, int], size: int, out_size: int) -> np.ndarray:
    """Sampling grid that turns a feature map of a rendered ``size`` canvas into an ``out_size`` square map on the
    slice's canonical in-plane axes.

    Returns ``(out_size, out_size, 2)`` float32 ``(x, y)`` coordinates for :func:`torch.nn.functional.grid_sample`
    (``align_corners=False``, so a feature map of any resolution covers the whole canvas): cell ``(i, j)`` lies at
    fraction ``((i + 0.5) / out_size, (j + 0.5) / out_size)`` along ``IN_PLANE_AXES[plane]`` of the volume (fraction
    0 at voxel 0's low edge), i.e. inside the slice's letterbox ``box`` with the display flips undone.
    """
    top, left, h, w = box
    frac = (np.arange(out_size, dtype=np.float64) + 0.5) / out_size
    flip_rows, flip_cols = DISPLAY_FLIPS[plane]
    u = 1.0 - frac if flip_rows else frac  # display row fraction of canonical cell i
    v = 1.0 - frac if flip_cols else frac
    y = (top + u * h) / size * 2.0 - 1.0
    x = (left + v * w) / size * 2.0 - 1.0
    grid = np.empty((out_size, out_size, 2), np.float32)
    grid[..., 0] = x[None, :]
    grid[..., 1] = y[:, None]
    return grid


def intensity_window(data: np.ndarray, modality: str, settings: RenderSettings) -> Tuple[float, float]:
    """The intensity range shown from black to white: the CT window, or the volume's MRI body percentiles."""
    if modality == "ct":
        c, w = settings.ct_window
        return c - w / 2, c + w / 2
    body = data[body_mask(data, modality)]
    lo, hi = (float(v) for v in np.percentile(body if body.size else data, settings.mri_percentiles))
    return lo, (hi if hi > lo else lo + 1.0)


def render_slice(slice2d: np.ndarray, pixel_spacing, window: Tuple[float, float], size: int) -> np.ndarray:
    """Window a 2D slice to [0, 1], resize it to its physical aspect ratio inside a ``size`` square (black
    letterbox, placed at :func:`letterbox_box`) and return ``(size, size, 3)`` uint8."""
    top, left, h, w = letterbox_box(slice2d.shape, pixel_spacing, size)
    t = torch.from_numpy(np.ascontiguousarray(slice2d, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    lo, hi = window
    t = ((t - lo) / (hi - lo)).clamp_(0, 1)
    canvas = torch.zeros(size, size)
    canvas[top:top + h, left:left + w] = t
    gray = (canvas * 255).round_().to(torch.uint8).numpy()
    return np.repeat(gray[:, :, None], 3, axis=2)


def volume_slices(volume, policy: SlicePolicy, settings: RenderSettings, render: bool = True) -> Iterator[Slice]:
    """Select and (optionally) render the slices of one :class:`~med3dinsight_plugin.volumes.Volume`.

    Raises:
        ValueError: the volume shows no body in any slice (wrong modality?), or the channel does not exist.
    """
    if not 0 <= settings.channel < volume.array.shape[0]:
        raise Med3DInsightError(f"case {volume.case} has {volume.array.shape[0]} channel(s); render channel "
                                f"{settings.channel} does not exist (--channel takes 0 to "
                                f"{volume.array.shape[0] - 1})")
    data = volume.native(settings.channel)
    picks = select_slices(body_mask(data, volume.modality), policy)
    if not picks:
        where = f" ({volume.files[0]})" if volume.files else ""
        raise Med3DInsightError(f"no slice of case {volume.case}{where} shows enough "
                         f"body (min_foreground {policy.min_foreground}); check its modality ({volume.modality}) "
                         f"or lower min_foreground")
    window = intensity_window(data, volume.modality, settings) if render else None
    for p, i in picks:
        image = box = None
        if render:
            slice2d, pixel_spacing = extract_slice(data, volume.spacing, p, i)
            image = render_slice(slice2d, pixel_spacing, window, settings.size)
            box = letterbox_box(slice2d.shape, pixel_spacing, settings.size)
        yield Slice(volume.case, PLANES[p], i, slice_position(i, data.shape[p]), volume.modality, image, box)


class _DatasetSlices:
    """Iterable of the rendered slices of every case of a source, read one volume at a time.

    It has no ``len`` (counting would read every volume twice) but a length hint (:func:`operator.length_hint`):
    cases x planes x ``per_plane``, exact unless a volume has fewer slices that show enough body, so progress bars
    can show an ETA."""

    def __init__(self, source, policy: SlicePolicy, settings: RenderSettings, cases=None):
        self.source, self.policy, self.settings = source, policy, settings
        self.cases = list(cases if cases is not None else source.cases)
        channels = getattr(source, "num_channels", None)
        if channels is not None and settings.channel >= channels:  # before any model runs or file is written
            raise Med3DInsightError(f"{source.root} has {channels} channel(s) per case; render channel "
                                    f"{settings.channel} does not exist (--channel takes 0 to {channels - 1})")

    def __iter__(self) -> Iterator[Slice]:
        for case in self.cases:
            yield from volume_slices(self.source.read(case), self.policy, self.settings)

    def __length_hint__(self) -> int:
        return len(self.cases) * len(self.policy.planes) * self.policy.per_plane


def dataset_slices(source, policy: SlicePolicy, settings: RenderSettings, cases=None):
    """The rendered slices of every case (or of ``cases``) of a :class:`~med3dinsight_plugin.volumes.VolumeSource`,
    read one volume at a time."""
    return _DatasetSlices(source, policy, settings, cases)


def write_slice_pngs(source, out, policy: SlicePolicy, settings: RenderSettings, max_cases: int = 3) -> List[str]:
    """Write the rendered slices of the first ``max_cases`` cases as PNGs, for a person to check the orientation
    and windowing; each file is named ``CASE_PLANE_POSITION.png`` and written atomically.

    Returns:
        The files written.
    """
    from pathlib import Path

    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in dataset_slices(source, policy, settings, source.cases[:max_cases]):
        path = out / f"{s.case}_{s.plane}_{s.position:.3f}.png"
        atomic_write(path, lambda tmp, img=s.image: Image.fromarray(img).save(tmp, format="PNG"))
        written.append(str(path))
    return written
