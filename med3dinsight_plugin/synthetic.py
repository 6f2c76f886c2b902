"""Small synthetic datasets in nnU-Net's raw format, for the demo, the benchmarks and the tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["write_nnunet_raw_dataset"]


def write_nnunet_raw_dataset(raw: Path, dataset_id: int = 990, cases: int = 5,
                             shape: Sequence[int] = (32, 32, 32), name: str = "Tiny", seed: int = 0,
                             ct: bool = False) -> Path:
    """Write ``raw/DatasetXXX_NAME`` with ``cases`` noisy volumes, each with a brighter box and its label.

    Args:
        ct: CT-like Hounsfield units (air, a body ellipse, a spine and the labelled organ, each varying per case)
            instead of unit-variance noise.

    Returns:
        The dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``).
    """
    import SimpleITK as sitk

    folder = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    for i in range(cases):
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        jitter = rng.uniform(-0.05, 0.05, 3) if ct else np.zeros(3)
        lo = [int(s * (f + j)) for s, f, j in zip(shape, (0.25, 0.3, 0.2), jitter)]
        hi = [int(s * (f + j)) for s, f, j in zip(shape, (0.6, 0.7, 0.55), jitter)]
        label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        if ct:
            image = _ct_phantom(shape, label, rng)
        else:
            image[label > 0] += 3
        for array, path in ((image, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "box": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


def _ct_phantom(shape, label, rng) -> np.ndarray:
    """Hounsfield units: air around an elliptic body of soft tissue, a bony spine posteriorly, the organ brighter."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ry, rx = rng.uniform(0.75, 0.9), rng.uniform(0.8, 0.95)
    body = (y / ry) ** 2 + (x / rx) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, shape)
    spine = ((y - 0.55 * ry) / 0.15) ** 2 + (x / 0.12) ** 2 < 1  # +y is posterior in the LPS array
    hu[spine & body] = 700.0 + rng.normal(0, 40, int((spine & body).sum()))
    hu[label > 0] += rng.uniform(40, 80)
    return hu.astype(np.float32)
