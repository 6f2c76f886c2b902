"""The teacher sees Hounsfield units for nnU-Net preprocessed CT: ``Volume.native`` is the raw image put through
nnU-Net's own crop to non-zero and resampling (no normalisation), on the preprocessed grid.

Checked on real ``nnUNetv2_plan_and_preprocess`` output of two CT cases with different slice spacings (so nnU-Net
resamples both to the median) and a zero border (so nnU-Net crops it): the raw intensity is a linear function of the
world position, so the value at any preprocessed voxel says where the voxel lies, and interpolation keeps it exact
away from the borders. nnU-Net's CT normalisation clips to the foreground percentiles, which the old path (undoing
the z-score) could not undo."""
import json
import os
import shutil

import numpy as np
import pytest

from helpers import run_tool, write_nifti
from med3dinsight_plugin.volumes import VolumeError, open_source

pytestmark = pytest.mark.nnunet  # every test here reads data nnUNetv2_plan_and_preprocess wrote

SHAPE = (24, 20, 10)  # file index axes i (R->L... see AFFINE), j, k
BORDER = 3  # zero voxels on the low side of every axis: nnU-Net's crop to non-zero removes them
SPACINGS = {"thin": 2.0, "thick": 3.0}  # slice spacing (k) per case; nnU-Net resamples both to their median 2.5
# HU per mm toward the patient's left, posterior and superior (LPS world); the offset puts air, fat, soft tissue and
# bone inside every volume, so nnU-Net's percentile clip cuts real values
SLOPE = np.array([40.0, 30.0, 40.0])
OFFSET = -1900.0


def _affine(spacing_k):
    """RAS affine with index axes i -> left (RAS -x), j -> posterior (RAS -y), k -> superior: an LPS-stored file."""
    a = np.diag([-1.0, -1.0, spacing_k, 1.0])
    a[:3, 3] = (5.0, -3.0, 11.0)
    return a


def _hu(lps):
    return OFFSET + lps @ SLOPE


def _image(spacing_k):
    affine = _affine(spacing_k)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1).astype(float)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    image = _hu(lps).astype(np.float32)
    image[:BORDER] = 0.0
    image[:, :BORDER] = 0.0
    image[:, :, :BORDER] = 0.0
    return image, affine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scanner_units")
    raw = root / "raw" / "Dataset981_Ramp"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case, spacing in SPACINGS.items():
        image, affine = _image(spacing)
        label = np.zeros(SHAPE, np.uint8)
        label[8:16, 8:14, 5:8] = 1
        write_nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        write_nifti(raw / "labelsTr" / f"{case}.nii.gz", label, affine)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                  "numTraining": len(SPACINGS), "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    run_tool(["nnUNetv2_plan_and_preprocess", "-d", "981", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    return root, raw, root / "pre" / raw.name


def _expected(case, shape):
    """HU at the centre of every canonical voxel of the preprocessed grid (axes superior, posterior, left), from
    the box nnU-Net cropped (the non-zero region) divided evenly into ``shape`` voxels."""
    affine = _affine(SPACINGS[case])
    lo = affine[:3, :3] @ np.full(3, BORDER - 0.5) + affine[:3, 3]  # outer corner of the first non-zero voxel
    hi = affine[:3, :3] @ (np.array(SHAPE) - 0.5) + affine[:3, 3]
    lo_lps, hi_lps = lo * [-1, -1, 1], hi * [-1, -1, 1]
    # canonical axis 0: superior (LPS z), 1: posterior (LPS y), 2: left (LPS x)
    axes = []
    for canonical, lps_axis in enumerate((2, 1, 0)):
        a, b = sorted((lo_lps[lps_axis], hi_lps[lps_axis]))
        n = shape[canonical]
        axes.append(a + (np.arange(n) + 0.5) / n * (b - a))
    sup, post, left = np.meshgrid(*axes, indexing="ij")
    return _hu(np.stack([left, post, sup], axis=-1))


@pytest.mark.slow
def test_preprocessed_ct_renders_from_raw_hounsfield_units(dataset, monkeypatch):
    root, raw, pre = dataset
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    source = open_source(pre)
    assert source.describe()["scanner_units"] == "raw"
    for case in SPACINGS:
        volume = source.read(case)
        hu = volume.native(0)
        assert hu.shape == volume.shape
        expected = _expected(case, volume.shape)
        inner = (slice(2, -2),) * 3  # cubic interpolation with edge padding bends a ramp at the borders only
        np.testing.assert_allclose(hu[inner], expected[inner], atol=3.0)  # one voxel off would be 30-100 HU
        # the full range reaches the teacher: air and bone, which nnU-Net's percentile clip removes
        assert hu.min() < -900 and hu.max() > 500
    # the same volume without its raw images: nnU-Net's clip survives undoing the z-score
    monkeypatch.delenv("nnUNet_raw")
    fallback = open_source(pre)
    assert fallback.describe()["scanner_units"] == "undone z-score"
    clipped = fallback.read("thin").native(0)
    assert clipped.min() > source.read("thin").native(0).min() + 50
    # air (below -600 HU, what the body mask and the CT window treat as outside) exists only in the raw units
    assert (source.read("thin").native(0) < -600).mean() > 0.05 and (clipped < -600).sum() == 0


def test_raw_dataset_given_explicitly(dataset, monkeypatch):
    root, raw, pre = dataset
    monkeypatch.delenv("nnUNet_raw", raising=False)
    source = open_source(pre, raw=raw)
    np.testing.assert_allclose(source.read("thick").native(0)[2:-2, 2:-2, 2:-2],
                               _expected("thick", source.read("thick").shape)[2:-2, 2:-2, 2:-2], atol=3.0)


@pytest.mark.slow
def test_other_raw_images_are_refused(dataset, tmp_path, monkeypatch):
    root, raw, pre = dataset
    other = tmp_path / raw.name
    shutil.copytree(raw, other)
    image, affine = _image(SPACINGS["thin"])
    write_nifti(other / "imagesTr" / "thin_0000.nii.gz", image[:-4], affine)  # not the image that was preprocessed
    source = open_source(pre, raw=other)
    with pytest.raises(VolumeError, match=r"thin_0000\.nii\.gz of case thin give shape .* not the preprocessed .*"
                                          r"set nnUNet_raw \(or raw=\) to the dataset that was"):
        source.read("thin").native(0)
    (other / "imagesTr" / "thick_0000.nii.gz").unlink()
    with pytest.raises(VolumeError, match=r"lacks 1 preprocessed case\(s\) \(e\.g\. thick\)"):
        open_source(pre, raw=other)
    with pytest.raises(VolumeError, match=r"raw=.* is not an nnU-Net raw dataset"):
        open_source(pre, raw=tmp_path)


def test_the_data_commands_take_the_raw_dataset(dataset, tmp_path, monkeypatch, capsys):
    from med3dinsight_plugin.cli import main

    root, raw, pre = dataset
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["slices", str(pre), "--raw", str(raw), "-o", str(tmp_path / "png"), "--per-plane", "1"]) == 0
    assert list((tmp_path / "png").glob("*.png"))
    capsys.readouterr()
    assert main(["slices", str(pre), "--raw", str(tmp_path), "-o", str(tmp_path / "png2")]) == 2
    assert "is not an nnU-Net raw dataset" in capsys.readouterr().err
