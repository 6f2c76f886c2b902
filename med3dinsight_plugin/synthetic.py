"""Small synthetic datasets in nnU-Net's raw format, for the demo, the benchmarks and the tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["write_nnunet_raw_dataset"]


def write_nnunet_raw_dataset(raw: Path, dataset_id: int = 990, cases: int = 5,
                             shape: Sequence[int] = (32, 32, 32), name: str = "Tiny", seed: int = 0) -> Path:
    """Write ``raw/DatasetXXX_NAME`` with ``cases`` noisy CT-like volumes, each with a brighter box and its label.

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
        lo = [int(s * f) for s, f in zip(shape, (0.25, 0.3, 0.2))]
        hi = [int(s * f) for s, f in zip(shape, (0.6, 0.7, 0.55))]
        label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        image[label > 0] += 3
        for array, path in ((image, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "box": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder
