"""nnU-Net preprocessed cases come out in the same canonical orientation as their raw images, whichever nnU-Net
image reader wrote them: SimpleITKIO keeps the orientation in the properties' ``sitk_stuff``, NibabelIO and
NibabelIOWithReorient in ``nibabel_stuff`` (the NIfTI affine, RAS). Checked on real ``nnUNetv2_plan_and_preprocess``
output of NIfTI files stored RAS, LPS and axis-permuted, whose intensity rises toward superior, posterior and the
patient's left (so any flip or swapped axis shows)."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from helpers import run_tool, write_nifti
from med3dinsight_plugin.volumes import VolumeError, open_source

pytestmark = pytest.mark.nnunet  # every test here reads data nnUNetv2_plan_and_preprocess wrote

SHAPE = (8, 18, 22)  # file index axes i, j, k
SPACING = (3.0, 1.0, 1.0)  # i is thick (and runs left-right in every case): nnU-Net transposes it first, no resampling
WEIGHT = {"L": 100.0, "P": 10.0, "S": 1.0}  # intensity per mm toward the patient's left, posterior, superior
# direction of index axes i, j, k in RAS world (what the NIfTI affine holds)
ORIENTATIONS = {
    "ras": [(1, 0, 0), (0, 1, 0), (0, 0, 1)],
    "lps": [(-1, 0, 0), (0, -1, 0), (0, 0, 1)],
    "lia": [(-1, 0, 0), (0, 0, -1), (0, 1, 0)],  # j runs inferior, k anterior
}
READERS = {971: "SimpleITKIO", 972: "NibabelIO", 973: "NibabelIOWithReorient"}


def _affine(orientation):
    a = np.eye(4)
    a[:3, :3] = np.array(ORIENTATIONS[orientation], float).T * np.array(SPACING)
    a[:3, 3] = (7.0, -11.0, 13.0)
    return a


def _ramp(affine):
    """Intensity of each voxel from its world position: 5000 + 100 L + 10 P + 1 S (mm, LPS), everywhere nonzero so
    that nnU-Net crops nothing."""
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1).astype(float)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (5000.0 + WEIGHT["L"] * -ras[..., 0] + WEIGHT["P"] * -ras[..., 1] + WEIGHT["S"] * ras[..., 2]) \
        .astype(np.float32)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_io")
    raws = {}
    for dataset_id, reader in READERS.items():
        ds = root / "raw" / f"Dataset{dataset_id}_{reader}"
        (ds / "imagesTr").mkdir(parents=True)
        (ds / "labelsTr").mkdir()
        for case in ORIENTATIONS:
            affine = _affine(case)
            label = np.zeros(SHAPE, np.uint8)
            label[2:6, 4:14, 5:17] = 1
            write_nifti(ds / "imagesTr" / f"{case}_0000.nii.gz", _ramp(affine), affine)
            write_nifti(ds / "labelsTr" / f"{case}.nii.gz", label, affine)
        meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "box": 1},
                "numTraining": len(ORIENTATIONS), "file_ending": ".nii.gz"}
        if reader != "SimpleITKIO":  # nnU-Net's default for .nii.gz
            meta["overwrite_image_reader_writer"] = reader
        (ds / "dataset.json").write_text(json.dumps(meta))
        raws[reader] = ds
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    run_tool(["nnUNetv2_plan_and_preprocess", "-d", *READERS, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    return {reader: (raw, root / "pre" / raw.name) for reader, raw in raws.items()}


def _z(a):
    return (a - a.mean()) / a.std()


@pytest.mark.slow
def test_raw_nifti_cases_are_canonical(datasets):
    raw = open_source(datasets["SimpleITKIO"][0])
    for case in ORIENTATIONS:
        vol = raw.read(case)
        assert vol.spacing == (1.0, 1.0, 3.0)  # superior, posterior, left
        assert vol.shape == ((SHAPE[2], SHAPE[1], SHAPE[0]) if case != "lia" else (SHAPE[1], SHAPE[2], SHAPE[0]))
        for axis, side in enumerate("SPL"):  # rises by weight x spacing per voxel along every canonical axis
            assert np.allclose(np.diff(vol.array[0], axis=axis), WEIGHT[side] * vol.spacing[axis]), (case, side)


@pytest.mark.parametrize("reader", list(READERS.values()))
def test_preprocessed_cases_match_their_raw_images(datasets, reader):
    raw_path, pre_path = datasets[reader]
    pre = open_source(pre_path)
    plans = json.loads((pre_path / "nnUNetPlans.json").read_text())
    assert plans["transpose_forward"] != [0, 1, 2] and pre.kind == "nnunet_preprocessed"
    pkl = pre_path / "nnUNetPlans_3d_fullres" / "lps.pkl"
    with open(pkl, "rb") as f:
        stored = pickle.load(f)
    assert ("sitk_stuff" in stored) == (reader == "SimpleITKIO")  # the nibabel readers store an affine instead
    raw = open_source(raw_path)
    for case in ORIENTATIONS:
        a, b = raw.read(case), pre.read(case)
        assert b.shape == a.shape and b.spacing == a.spacing, (reader, case)
        assert np.allclose(_z(b.array[0]), _z(a.array[0]), atol=1e-4), (reader, case)


def _copy(pre_path, tmp_path):
    out = tmp_path / pre_path.name
    shutil.copytree(pre_path, out)
    return out, out / "nnUNetPlans_3d_fullres" / "lps.pkl"


def _rewrite(pkl, change):
    with open(pkl, "rb") as f:
        props = pickle.load(f)
    change(props)
    with open(pkl, "wb") as f:
        pickle.dump(props, f)


@pytest.mark.parametrize("damage", ["no_orientation", "affine_shape", "affine_nan", "direction_len", "not_a_dict"])
def test_properties_without_a_usable_orientation_are_refused(datasets, tmp_path, damage):
    reader = "SimpleITKIO" if damage == "direction_len" else "NibabelIOWithReorient"
    pre, pkl = _copy(datasets[reader][1], tmp_path)

    def change(props):
        if damage == "no_orientation":
            del props["nibabel_stuff"]
        elif damage == "affine_shape":
            props["nibabel_stuff"]["reoriented_affine"] = np.eye(3)
        elif damage == "affine_nan":
            props["nibabel_stuff"]["reoriented_affine"][0, 0] = np.nan
        elif damage == "direction_len":
            props["sitk_stuff"]["direction"] = (1.0, 0.0, 0.0)
        else:
            props.clear()

    if damage == "not_a_dict":
        pkl.write_bytes(pickle.dumps([1, 2]))
    else:
        _rewrite(pkl, change)
    source = open_source(pre)
    with pytest.raises(VolumeError) as e:
        source.read("lps")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(pkl) in msg and "nnUNetv2_preprocess" in msg
    if damage == "no_orientation":
        assert "sitk_stuff" in msg and "nibabel_stuff" in msg
    source.read("ras")  # the other cases still read


def test_a_tiff_dataset_has_no_orientation_to_read(datasets, tmp_path):
    """nnU-Net's Tiff3DIO stores no orientation (TIFF has none): its cases are read with the array axes as they are,
    like SimpleITK reads the raw .tif files."""
    pre, pkl = _copy(datasets["NibabelIO"][1], tmp_path)
    _rewrite(pkl, lambda props: props.pop("nibabel_stuff"))
    for name, key, value in (("dataset.json", "file_ending", ".tif"), ("nnUNetPlans.json", "image_reader_writer",
                                                                          "Tiff3DIO")):
        meta = json.loads((pre / name).read_text())
        meta.pop("overwrite_image_reader_writer", None)
        (pre / name).write_text(json.dumps({**meta, key: value}))
    vol = open_source(pre).read("lps")
    ref = open_source(datasets["NibabelIO"][1]).read("lps")  # LPS on file: identity direction
    assert np.array_equal(vol.array, ref.array)


def test_a_raw_image_claiming_too_much_is_refused_before_nnunet_reads_it(datasets, tmp_path):
    """Scanner units come from nnU-Net's own reader of the raw image, which allocates whatever a header claims: the
    raw files' headers pass the same claimed-size check first."""
    import gzip

    import nibabel as nib

    raw_path, pre_path = datasets["SimpleITKIO"]
    raw = tmp_path / raw_path.name
    shutil.copytree(raw_path, raw)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((200, 200, 200))  # 32 MB of float32 in a file of a few dozen bytes
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.eye(4), 1)
    bomb = raw / "imagesTr" / "lps_0000.nii.gz"
    bomb.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 24, mtime=0))
    vol = open_source(pre_path, raw=raw).read("lps")
    with pytest.raises(VolumeError) as e:
        vol.native(0)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(bomb) in msg and "claims 200x200x200 float32" in msg
