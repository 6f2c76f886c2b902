"""Volumes come out in one canonical orientation whatever their files say, and slices are rendered as radiologists
view them: checked with an asymmetric marker at a known anatomical place, written in several orientations."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med3dinsight_plugin.planes import slice_position
from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, select_slices, volume_slices
from med3dinsight_plugin.volumes import VolumeError, canonical_axes, open_source

SHAPE = (20, 24, 28)  # canonical (superior, posterior, left) sizes
MARK = (15, 5, 20)  # superior, anterior, patient's left


def _phantom():
    """CT-like canonical LPS array: air, a soft-tissue box, and a bright marker cube near MARK."""
    a = np.full(SHAPE, -1000.0, np.float32)
    a[2:-2, 2:-2, 2:-2] = 40.0
    z, y, x = MARK
    a[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 240.0  # white in the soft-tissue window
    return a


def _write(path, canonical, orientation):
    """Write the phantom so that SimpleITK stores it in ``orientation`` (e.g. "RAS", "LPI", "ASL")."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(canonical)  # identity direction: the array is LPS
    img.SetSpacing((1.0, 1.5, 2.0))  # x, y, z
    img = sitk.DICOMOrient(img, orientation)
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LPI", "ASL", "SRA"])
def test_every_file_orientation_gives_the_same_canonical_array(tmp_path, orientation):
    folder = tmp_path / "vols"
    folder.mkdir()
    img = _write(folder / "case.nii.gz", _phantom(), orientation)
    vol = open_source(folder).read("case")
    assert vol.shape == SHAPE and np.array_equal(vol.array[0], _phantom())
    assert vol.spacing == (2.0, 1.5, 1.0)  # superior, posterior, left
    if orientation != "LPS":
        assert tuple(img.GetDirection()) != (1, 0, 0, 0, 1, 0, 0, 0, 1)  # the file really differs


def _bright(image):
    gray = image[:, :, 0].astype(float)
    rows, cols = np.nonzero(gray == gray.max())
    return rows.mean() / gray.shape[0], cols.mean() / gray.shape[1]


@pytest.mark.parametrize("orientation", ["RAS", "LPI"])
def test_rendered_slices_are_in_radiological_orientation(tmp_path, orientation):
    folder = tmp_path / "vols"
    folder.mkdir()
    _write(folder / "case.nii.gz", _phantom(), orientation)
    vol = open_source(folder, modality="ct").read("case")
    render = RenderSettings(size=64)
    slices = {s.plane: s for s in volume_slices(vol, SlicePolicy(per_plane=40, min_foreground=0.0), render)
              if s.index == MARK[("axial", "coronal", "sagittal").index(s.plane)]}
    (ar, ac), (cr, cc), (sr, sc) = (_bright(slices[p].image) for p in ("axial", "coronal", "sagittal"))
    assert ar < 0.5 and ac > 0.5  # axial: anterior at the top, patient's left on the image's right
    assert cr < 0.5 and cc > 0.5  # coronal: head up, patient's left on the image's right
    assert sr < 0.5 and sc < 0.5  # sagittal: head up, anterior on the left
    for plane, s in slices.items():
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        axis = ("axial", "coronal", "sagittal").index(plane)
        assert s.position == pytest.approx(slice_position(MARK[axis], SHAPE[axis]))


def test_rendering_keeps_the_physical_aspect_ratio(tmp_path):
    folder = tmp_path / "vols"
    folder.mkdir()
    tissue = np.full(SHAPE, 40.0, np.float32)
    tissue[0, 0, 0] = 41.0  # not constant
    _write(folder / "case.nii.gz", tissue, "LPS")  # all tissue
    vol = open_source(folder, modality="ct").read("case")
    sag = next(s for s in volume_slices(vol, SlicePolicy(per_plane=1, planes=("sagittal",)), RenderSettings(size=80)))
    # sagittal: 20 slices x 2 mm tall, 24 x 1.5 mm wide -> 40 x 36 mm: full height, 72 px wide letterboxed
    nonblack = np.nonzero(sag.image[:, :, 0].max(axis=0))[0]
    assert (sag.image[:, :, 0].max(axis=1) > 0).all() and len(nonblack) == 72


def test_slice_policy_spreads_picks_over_the_body_and_skips_background():
    mask = np.zeros((40, 10, 10), bool)
    mask[10:30] = True  # body only in axial slices 10..29
    picks = [i for p, i in select_slices(mask, SlicePolicy(per_plane=4, planes=("axial",))) if p == 0]
    assert picks == [12, 17, 22, 27]
    assert select_slices(np.zeros((5, 5, 5), bool), SlicePolicy()) == []


def test_canonical_axes_refuses_a_45_degree_oblique_grid():
    c = np.sqrt(0.5)
    with pytest.raises(VolumeError, match="oblique"):
        canonical_axes(np.array([[c, -c, 0], [c, c, 0], [0, 0, 1]]))


def test_slices_cli_writes_pngs(tmp_path):
    from med3dinsight_plugin.cli import main

    folder = tmp_path / "vols"
    folder.mkdir()
    _write(folder / "a.nii.gz", _phantom(), "RAS")
    assert main(["slices", str(folder), "-o", str(tmp_path / "png"), "--per-plane", "2", "--size", "32"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert len(pngs) == 6 and all(n.startswith("a_") and n.endswith(".png") for n in pngs)
    assert not [p for p in (tmp_path / "png").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "4d", "2d", "nan", "constant", "not_nifti"])
def test_bad_volumes_give_one_line_errors_naming_the_file(tmp_path, case):
    import SimpleITK as sitk

    folder = tmp_path / "vols"
    folder.mkdir()
    path = folder / "bad.nii.gz"
    if case == "truncated":
        _write(path, _phantom(), "LPS")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "4d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4, 4), np.float32), isVector=False), str(path))
    elif case == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 8).astype(np.float32)), str(path))
    elif case == "nan":
        a = _phantom()
        a[3, 3, 3] = np.nan
        _write(path, a, "LPS")
    elif case == "constant":
        _write(path, np.zeros(SHAPE, np.float32), "LPS")
    else:
        path.write_text("hello")
    proc = subprocess.run([str(Path(sys.executable).parent / "med3dinsight"), "slices", str(folder),
                           "-o", str(tmp_path / "png")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.nii.gz" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "png").exists() or not list((tmp_path / "png").iterdir())


@pytest.mark.slow
@pytest.mark.nnunet
def test_nnunet_preprocessed_cases_read_like_their_raw_images(tmp_path):
    """nnU-Net transposes (thick axis first), crops and normalises; reading a preprocessed case undoes the axis
    order and the file's orientation, and native() recovers the (clipped) Hounsfield units."""
    import os

    import SimpleITK as sitk

    ds = tmp_path / "raw" / "Dataset981_Orient"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        ct = _phantom() + rng.normal(0, 5, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        label[4:16, 6:18, 8:20] = 1
        for array, path in ((ct, ds / "imagesTr" / f"c{i}_0000.nii.gz"), (label, ds / "labelsTr" / f"c{i}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((3.0, 1.0, 1.0))  # x is the thick axis: nnU-Net moves it first
            sitk.WriteImage(sitk.DICOMOrient(img, "RAS"), str(path))
    (ds / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "box": 1}, '
                                     '"numTraining": 2, "file_ending": ".nii.gz"}')
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "981", "-c",
                    "3d_fullres", "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True)
    pre = open_source(tmp_path / "pre" / "Dataset981_Orient")
    plans = json.loads((tmp_path / "pre" / "Dataset981_Orient" / "nnUNetPlans.json").read_text())
    assert plans["transpose_forward"] != [0, 1, 2] and pre.kind == "nnunet_preprocessed" and pre.modality == "ct"
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    raw = open_source(ds)
    for case in ("c0", "c1"):
        a, b = raw.read(case), pre.read(case)
        assert b.shape == a.shape == SHAPE and b.spacing == a.spacing
        expected = np.clip(a.array[0], props["percentile_00_5"], props["percentile_99_5"])
        assert np.allclose(b.native(0), expected, atol=1e-2)


def test_dataset_slices_hint_their_count_for_progress_bars(tmp_path):
    """No ``len`` (it would read every volume twice), but an exact length hint for ordinary volumes, so captioning
    shows an ETA."""
    import operator

    from helpers import ct_like, write_nifti
    from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, dataset_slices
    from med3dinsight_plugin.volumes import open_source

    for i in range(2):
        write_nifti(tmp_path / f"c{i}.nii.gz", ct_like(seed=i))
    source = open_source(str(tmp_path), modality="ct")
    slices = dataset_slices(source, SlicePolicy(per_plane=3), RenderSettings(size=16))
    assert operator.length_hint(slices) == 2 * 3 * 3 == sum(1 for _ in slices)
