"""Both views (``data.view: crop | volume``) with masked reconstruction, end to end on every kind of source: a NIfTI
folder, an nnU-Net raw dataset, and that dataset preprocessed by nnU-Net with SimpleITKIO and with NibabelIO.

The CT phantom is stored LPS, with three slice spacings (2, 2.5 and 3 mm: the crop view resamples to the 2.5 mm
median, as nnU-Net's 3d_fullres plans do), an air slab on the anterior side (the volume view's body box cuts it off)
and a bone block in the patient's left-posterior-superior corner. Whatever the source, the prepared arrays the encoder
trains on must show the bone block in the same place: a mirrored or swapped axis, a missed resampling or a body box
taken from other units moves it."""
import json
import os

import numpy as np
import pytest

from helpers import FAST_PRETRAIN, one_line_failure, run_tool, write_nifti
from med3dinsight_plugin import load_checkpoint
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import open_source

pytestmark = pytest.mark.nnunet  # every test here reads data nnUNetv2_plan_and_preprocess wrote

IN_PLANE = 1.5  # mm, i (toward the patient's left) and j (toward posterior)
SLICES = {"thin": (2.0, 30), "mid": (2.5, 24), "thick": (3.0, 20)}  # slice spacing (k, superior) and count: 60 mm
NX, NY = 28, 24  # i, j
AIR_J = 4  # j < 4: air in front of the patient (anterior)
MEDIAN = [2.5, IN_PLANE, IN_PLANE]  # canonical (superior, posterior, left)
READERS = {"SimpleITKIO": 991, "NibabelIO": 992}
FAST = [*FAST_PRETRAIN, "model.reconstruction=masked", "model.mask_ratio=0.5", "model.mask_block=4"]


def _phantom(spacing_k, n_k):
    """HU of an LPS-stored file (index axes i -> left, j -> posterior, k -> superior) and its RAS affine."""
    affine = np.diag([-IN_PLANE, -IN_PLANE, spacing_k, 1.0])
    affine[:3, 3] = (20.0, 10.0, -30.0)
    i, j, k = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(n_k), indexing="ij")
    z_mm = (k + 0.5) * spacing_k  # from the bottom of the 60 mm field
    hu = 40.0 + 20.0 * np.sin(i / 5.0) + 15.0 * np.cos(j / 4.0)  # soft tissue, smoothly varying
    hu[(i >= 20) & (j >= 17) & (z_mm >= 42.0)] = 900.0  # bone: left, posterior, superior
    hu[j < AIR_J] = -1000.0
    return hu.astype(np.float32), affine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The raw datasets (one per nnU-Net image reader, the same images), their preprocessed versions, a tiny
    open_clip and the sources by name."""
    root = tmp_path_factory.mktemp("views_sources")
    for reader, dataset_id in READERS.items():
        raw = root / "raw" / f"Dataset{dataset_id}_Views{reader}"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        for case, (spacing_k, n_k) in SLICES.items():
            hu, affine = _phantom(spacing_k, n_k)
            write_nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", hu, affine)
            write_nifti(raw / "labelsTr" / f"{case}.nii.gz", (hu > -500).astype(np.uint8), affine)  # the body
        meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "body": 1}, "numTraining": len(SLICES),
                "file_ending": ".nii.gz"}
        if reader != "SimpleITKIO":
            meta["overwrite_image_reader_writer"] = reader
        (raw / "dataset.json").write_text(json.dumps(meta))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    run_tool(["nnUNetv2_plan_and_preprocess", "-d", *READERS.values(), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
             env)
    sitk_raw = root / "raw" / "Dataset991_ViewsSimpleITKIO"
    nib_raw = root / "raw" / "Dataset992_ViewsNibabelIO"
    sources = {"nifti": (sitk_raw / "imagesTr", None), "nnunet_raw": (sitk_raw, None),
               "preprocessed_sitk": (root / "pre" / sitk_raw.name, sitk_raw),
               "preprocessed_nibabel": (root / "pre" / nib_raw.name, nib_raw)}
    return {"root": root, "clip": save_tiny_open_clip(root / "clip"), "sources": sources, "caches": {}}


def _cache(world, name):
    """The teacher cache of one source, made once by ``med3dinsight embed`` (preprocessed: with ``--raw``)."""
    if name not in world["caches"]:
        data, raw = world["sources"][name]
        cache = world["root"] / f"cache_{name}"
        assert main(["embed", str(data), "-o", str(cache), "--clip-model", str(world["clip"]), "--per-plane", "4",
                     "--modality", "ct", *(["--raw", str(raw)] if raw else [])]) == 0
        world["caches"][name] = cache
    return world["caches"][name]


def _pretrain(world, name, view, out, capsys, *settings):
    data, raw = world["sources"][name]
    code = main(["pretrain", "--data", str(data), "--cache", str(_cache(world, name)), "-o", str(out), "--set", *FAST,
                 f"data.view={view}", *([f"data.raw={raw}"] if raw else []), *settings])
    err = capsys.readouterr().err
    return code, err


def _bone_centre(array):
    """Where the bone block lies in a prepared (1, D, H, W) array: the mean of (index + 0.5) / size over its voxels
    along each canonical axis (superior, posterior, left)."""
    a = array[0].astype(np.float64)
    bone = a > np.median(a) + 0.5 * (a.max() - np.median(a))
    assert 0 < bone.mean() < 0.2
    return np.array([((np.flatnonzero(bone.any(axis=tuple(x for x in range(3) if x != axis))) + 0.5)
                      / a.shape[axis]).mean() for axis in range(3)])


@pytest.mark.slow
@pytest.mark.parametrize("view", ["crop", "volume"])
def test_both_views_pretrain_with_masked_reconstruction_on_every_source(world, tmp_path, capsys, view):
    centres, shapes = {}, {}
    for name, (data, raw) in world["sources"].items():
        if raw is not None:
            assert open_source(data, raw=raw).describe()["scanner_units"] == "raw", name
        out = tmp_path / name
        code, err = _pretrain(world, name, view, out, capsys)
        assert code == 0, (name, err)
        index = json.loads((out / "prepared" / "prepared.json").read_text())
        assert index["settings"].get("view", "crop") == view, name  # the crop view is the unnamed default
        meta = load_checkpoint(out / "med3dinsight.safetensors").metadata
        model = meta["pretraining"]["config"]["model"]
        assert (model["reconstruction"], model["mask_ratio"], model["mask_block"]) == ("masked", 0.5, 4), name
        assert meta["pretraining"]["config"]["data"]["view"] == view, name
        losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["reconstruction"]) and r["reconstruction"] > 0 for r in losses), (name, losses)
        for case in SLICES:
            array = np.load(out / "prepared" / f"{case}.npy")
            shapes[name, case] = array.shape
            centres[name, case] = _bone_centre(array)
        if view == "volume":
            for case in SLICES:  # the air slab (anterior: low posterior index) cut off, the rest kept
                box = index["boxes"][case]
                (s0, s1), (p0, p1), (l0, l1) = box
                assert p0 > 0 and (s0, l0) == (0, 0), (name, case, box)
        elif raw is None:  # NIfTI and raw: resampled to the median spacing, as nnU-Net's plans are
            assert index["settings"]["spacing"] == MEDIAN, name
            assert meta["data"]["target_spacing"] == MEDIAN, name
    for case in SLICES:
        expected_shape = (1, 16, 16, 16) if view == "volume" else (1, 24, 24, NX)  # 60 / 2.5, 24, 28 voxels
        assert {shapes[name, case] for name in world["sources"]} == {expected_shape}, (case, shapes)
        reference = centres["nifti", case]
        assert (reference > 0.55).all(), (case, reference)  # superior, posterior, left: the bone's corner
        for name in world["sources"]:
            assert np.abs(centres[name, case] - reference).max() < 1 / 16, (name, case, centres[name, case],
                                                                             reference)


def test_volume_view_refuses_a_cache_chosen_in_other_scanner_units(world, tmp_path, capsys, monkeypatch):
    """A cache whose slices were chosen in raw Hounsfield units, and a volume-view pretraining that cannot find the
    raw dataset (so it would cut body boxes from the undone z-score): one line naming the cache and the fix. The crop
    view reads only the preprocessed arrays and goes ahead."""
    monkeypatch.delenv("nnUNet_raw", raising=False)
    data, _ = world["sources"]["preprocessed_sitk"]
    cache = _cache(world, "preprocessed_sitk")
    capsys.readouterr()  # embed's own lines when this test made the cache (run alone, e.g. in the fast subset)
    common = ["pretrain", "--data", str(data), "--cache", str(cache), "--set", *FAST]
    code = main([*common[:5], "-o", str(tmp_path / "volume"), *common[5:], "data.view=volume"])
    one_line_failure(code, capsys.readouterr().err.strip().splitlines(), str(cache), "data.raw", "raw scanner units")
    code = main([*common[:5], "-o", str(tmp_path / "crop"), *common[5:], "data.view=crop"])
    assert code == 0, capsys.readouterr().err
