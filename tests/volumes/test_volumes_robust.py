"""Hostile and unlucky volume files and dataset folders (issue #22): each is refused through the command line with
exit code 2 and one line on stderr naming the file and the fix, before anything large is allocated -- never a
traceback, a gigabyte allocation or a silent misreading. Every file is crafted in the test, tiny."""
import json
import pickle
import re
import resource
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from helpers import ct_like, one_line_failure, write_nifti
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.volumes import VolumeError, check_claimed_size, open_source


def _cli(capfd, *argv):
    """Exit code and stderr lines (progress bars aside) of the command line. ``capfd``: what C++ libraries print on
    file descriptor 2 counts too (a one-line error must be the only line)."""
    capfd.readouterr()
    code = main([str(a) for a in argv])
    lines = capfd.readouterr().err.strip().splitlines()
    return code, [line for line in lines if not re.match(r"^[\w ]+:\s*\d+%\|", line)]  # not tqdm's progress bars


def _slices(capfd, data, tmp_path, *extra):
    return _cli(capfd, "slices", data, "-o", tmp_path / "png", "--modality", "ct", *extra)


def _small_peak(run, limit_mb=100):
    """Run ``run()``: the Python-visible allocations (numpy's included) and the growth of the process's peak resident
    memory stay under ``limit_mb``. Returns what ``run`` returns."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    tracemalloc.start()
    try:
        result = run()
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 10
    assert peak < limit_mb and grown < limit_mb, (peak, grown)
    return result


# ----------------------------------------------------------------------------------- 1: claimed sizes, every reader

def _raw_dataset(root, files, ending=".mha", channels=1):
    """An nnU-Net raw dataset whose imagesTr holds ``files`` ({name: bytes or array})."""
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {str(i): "CT" for i in range(channels)},
                                                   "labels": {"background": 0, "x": 1}, "numTraining": len(files),
                                                   "file_ending": ending}))
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / "imagesTr" / name).write_bytes(content)
        else:
            sitk.WriteImage(sitk.GetImageFromArray(content), str(root / "imagesTr" / name))
    return root


def _mha(array=None, compressed=False, dims=None, data=None):
    """A MetaImage file: the header of ``array`` (or of ``dims`` float32), its voxels (or ``data``)."""
    dims = dims or array.shape[::-1]
    payload = data if data is not None else np.ascontiguousarray(array, np.float32).tobytes()
    if compressed and data is None:
        payload = zlib.compress(payload)
    header = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
              f"CompressedData = {compressed}", "ElementSpacing = 1 1 1", f"DimSize = {' '.join(map(str, dims))}",
              "ElementType = MET_FLOAT"]
    if compressed:
        header.append(f"CompressedDataSize = {len(payload)}")
    return ("\n".join(header + ["ElementDataFile = LOCAL"]) + "\n").encode() + payload


def test_a_compressed_mha_claiming_a_gigavoxel_is_refused_before_reading(tmp_path, capfd):
    """341 bytes of .mha whose header claims 1000^3 float32 (4 GB): SimpleITK would allocate it all first."""
    bomb = _mha(dims=(1000, 1000, 1000), compressed=True, data=zlib.compress(bytes(100_000), 9))
    assert len(bomb) < 600
    ds = _raw_dataset(tmp_path / "raw", {"case_0000.mha": bomb})
    code, err = _small_peak(lambda: _slices(capfd, ds, tmp_path))
    one_line_failure(code, err, "case_0000.mha", "claims 1000x1000x1000 float32", "1032-fold", "re-export or remove")


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_mha_is_called_truncated(tmp_path, capfd, compressed):
    """Not "No such file or directory" (ITK's stale errno), and no MetaIO lines printed beside the error."""
    whole = _mha(ct_like(seed=1, shape=(16, 16, 16)), compressed=compressed)
    ds = _raw_dataset(tmp_path / "raw", {"case_0000.mha": whole[:-3000]})
    code, err = _slices(capfd, ds, tmp_path)
    line = one_line_failure(code, err, "case_0000.mha", "truncated", "re-export or remove it")
    assert "No such file" not in line
    if not compressed:  # refused from the header and the file size alone
        assert "claims 16x16x16 float32" in line and "but the file has" in line


def test_good_mha_and_nrrd_files_still_read(tmp_path):
    """The header sniffing finds local, detached and compressed data (MetaImage, NRRD) without false refusals."""
    import SimpleITK as sitk

    a = ct_like(seed=2, shape=(12, 14, 16))
    for name, compress in (("a.mha", False), ("b.mha", True), ("c.mhd", False), ("d.mhd", True), ("e.nrrd", True),
                           ("f.nhdr", False), ("g.nrrd", False)):
        sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / name), useCompression=compress)
        from med3dinsight_plugin.volumes import read_image

        np.testing.assert_array_equal(read_image(str(tmp_path / name))[0], a)


def _preprocessed(root, write, name="Dataset999_Bomb"):
    """A minimal nnU-Net preprocessed dataset of one case ``c0`` whose data file ``write(folder / "c0")`` writes."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}))
    arch = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    (root / "nnUNetPlans.json").write_text(json.dumps({
        "dataset_name": name, "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
        "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [1.0, 1.0, 1.0],
                                          "normalization_schemes": ["ZScoreNormalization"], "architecture": arch}}}))
    folder = root / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    with open(folder / "c0.pkl", "wb") as f:
        pickle.dump({"sitk_stuff": {"direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}}, f)
    write(folder / "c0")
    return root


def _npy_bytes(shape, data=b""):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


def _b2nd_bomb(stem):
    import blosc2

    blosc2.zeros((1, 600, 600, 600), dtype=np.float32, urlpath=str(stem) + ".b2nd", mode="w")  # zero chunks: 278 B


def _npy_short(stem):
    (stem.parent / f"{stem.name}.npy").write_bytes(_npy_bytes((1, 600, 600, 600), bytes(400)))


def _npz_bomb(stem):
    with zipfile.ZipFile(stem.parent / f"{stem.name}.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.npy", _npy_bytes((1, 600, 600, 600), bytes(4000)))


@pytest.mark.parametrize("write,needle", [(_b2nd_bomb, "c0.b2nd: its header claims 1x600x600x600 float32"),
                                          (_npy_short, "c0.npy: its header claims 1x600x600x600 float32"),
                                          (_npz_bomb, "c0.npz: its header claims 1x600x600x600 float32")])
def test_preprocessed_files_claiming_too_much_are_refused_before_reading(tmp_path, capfd, monkeypatch, write, needle):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    ds = _preprocessed(tmp_path / "pre", write)
    assert sum(p.stat().st_size for p in (ds / "nnUNetPlans_3d_fullres").glob("c0.*")) < 5000
    code, err = _small_peak(lambda: _slices(capfd, ds, tmp_path))
    one_line_failure(code, err, needle, "rerun nnUNetv2_preprocess")


def test_good_preprocessed_files_still_read(tmp_path, monkeypatch):
    import blosc2

    monkeypatch.delenv("nnUNet_raw", raising=False)
    data = ct_like(seed=3, shape=(12, 14, 16))[None]
    writers = {"b2nd": lambda stem: blosc2.asarray(data, urlpath=str(stem) + ".b2nd", mode="w"),
               "npy": lambda stem: np.save(str(stem) + ".npy", data),
               "npz": lambda stem: np.savez_compressed(str(stem) + ".npz", data=data),
               "npz_stored": lambda stem: np.savez(str(stem) + ".npz", data=data)}
    for kind, write in writers.items():
        vol = open_source(_preprocessed(tmp_path / kind, write), modality="ct").read("c0")
        assert vol.shape == (12, 14, 16), kind  # identity direction, no transpose: the array as stored
        np.testing.assert_array_equal(vol.array, data)


def test_the_volume_size_cap_is_an_environment_variable(tmp_path, capfd, monkeypatch):
    vols = tmp_path / "vols"
    vols.mkdir()
    write_nifti(vols / "a.nii.gz", ct_like(seed=4, shape=(16, 16, 16)).astype(np.int16))
    monkeypatch.setenv("MED3DINSIGHT_MAX_VOLUME_GB", "1e-5")  # 10 KB
    code, err = _slices(capfd, vols, tmp_path)
    one_line_failure(code, err, "a.nii.gz", "16x16x16 int16", "16.4 KB as float32", "more than the 10.0 KB allowed",
                     "set MED3DINSIGHT_MAX_VOLUME_GB higher")
    monkeypatch.setenv("MED3DINSIGHT_MAX_VOLUME_GB", "lots")
    code, err = _slices(capfd, vols, tmp_path)
    one_line_failure(code, err, "MED3DINSIGHT_MAX_VOLUME_GB='lots'", "positive number of gigabytes")
    monkeypatch.setenv("MED3DINSIGHT_MAX_VOLUME_GB", "0.01")
    assert _slices(capfd, vols, tmp_path)[0] == 0


def test_check_claimed_size_directly():
    check_claimed_size("x", (4, 4, 4), np.float32, 256 + 10, 10, uncompressed=True)
    with pytest.raises(VolumeError, match="x: its header claims 4x4x4 float32 voxels .* but the file has"):
        check_claimed_size("x", (4, 4, 4), np.float32, 256 + 9, 10, uncompressed=True)
    check_claimed_size("x", (1000, 1000, 1000), np.float32, 4_000_000, uncompressed=False)  # 1000-fold: possible
    with pytest.raises(VolumeError, match="1032-fold"):
        check_claimed_size("x", (1000, 1000, 1000), np.float32, 3_000_000, uncompressed=False)


# ------------------------------------------------------------------------- 2: plain ValueErrors become one line

def _nifti_with_srow(path, array, rows):
    """A NIfTI file whose sform (the affine nibabel reads) is ``rows``, written as given (no decomposition)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, None)
    img.header["qform_code"], img.header["sform_code"] = 0, 1
    for name, row in zip(("srow_x", "srow_y", "srow_z"), rows):
        img.header[name] = row
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("rows,needle", [([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "not finite"),
                                         ([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "a zero voxel size")])
def test_a_damaged_nifti_affine_is_one_line(tmp_path, capfd, rows, needle):
    vols = tmp_path / "vols"
    vols.mkdir()
    _nifti_with_srow(vols / "a.nii.gz", ct_like(seed=5, shape=(16, 16, 16)), rows)
    code, err = _slices(capfd, vols, tmp_path)
    one_line_failure(code, err, "a.nii.gz", needle, "repair its affine")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip

    return save_tiny_open_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.mark.parametrize("command", ["slices", "embed"])
def test_a_volume_one_voxel_thin_is_refused_at_read(tmp_path, capfd, clip, command):
    """48x48x1 used to end in torch's "negative stride" ValueError while rendering."""
    vols = tmp_path / "vols"
    vols.mkdir()
    write_nifti(vols / "a.nii.gz", ct_like(seed=6, shape=(32, 32, 32)))
    write_nifti(vols / "thin.nii.gz", ct_like(seed=6, shape=(48, 48, 1)))
    extra = ["--clip-model", clip] if command == "embed" else []
    code, err = _cli(capfd, command, vols, "-o", tmp_path / "out", "--modality", "ct", *extra)
    one_line_failure(code, err, "thin.nii.gz", "48x48x1 voxels", "fewer than 2 along an axis", "remove it")


def test_a_preprocessed_case_one_voxel_thin_is_refused(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    ds = _preprocessed(tmp_path / "pre", lambda stem: np.save(str(stem) + ".npy", ct_like(shape=(12, 14, 1))[None]))
    code, err = _slices(capfd, ds, tmp_path)
    one_line_failure(code, err, "c0", "12x14x1 voxels", "fewer than 2")


def test_a_2d_image_is_told_what_to_do_with_a_2d_image(tmp_path, capfd):
    vols = tmp_path / "vols"
    vols.mkdir()
    write_nifti(vols / "a.nii.gz", ct_like(seed=7, shape=(48, 48, 16))[:, :, 0])
    code, err = _slices(capfd, vols, tmp_path)
    line = one_line_failure(code, err, "a.nii.gz", "is 2D (shape (48, 48))", "a single image", "stack the slices")
    assert "4D" not in line and "_0000" not in line


# ----------------------------------------------------------------------------- 3: inputs no longer read silently

@pytest.mark.parametrize("names,needles", [
    (["a.nii", "a.nii.gz"], ["a.nii and a.nii.gz", "two files of one image of case a", "move the other out"]),
    (["a_0000.nii", "a_0000.nii.gz", "a_0001.nii.gz"], ["a_0000.nii and a_0000.nii.gz", "case a"]),
    (["a_0000.nii.gz", "a_0002.nii.gz"], ["a_0000.nii.gz, a_0002.nii.gz but no a_0001", "without gaps"]),
    (["a_0001.nii.gz"], ["has a_0001.nii.gz but no a_0000", "rename them"]),
    (["a.nii.gz", "a_0000.nii.gz"], ["a.nii.gz and a_0000.nii.gz", "both belong to case a", "rename or move"]),
])
def test_ambiguous_channel_files_in_a_nifti_folder_are_refused(tmp_path, capfd, names, needles):
    vols = tmp_path / "vols"
    vols.mkdir()
    for name in ["b.nii.gz", *names]:  # b: an ordinary case beside them
        write_nifti(vols / name, ct_like(seed=len(name), shape=(16, 16, 16)))
    code, err = _slices(capfd, vols, tmp_path)
    one_line_failure(code, err, str(vols), *needles)


def test_well_numbered_channels_still_read_in_order(tmp_path):
    for name, seed in (("a_0001.nii.gz", 1), ("a_0000.nii.gz", 0), ("b_0000.nii", 2), ("b_0001.nii.gz", 3)):
        write_nifti(tmp_path / name, ct_like(seed=seed, shape=(16, 16, 16)))
    source = open_source(tmp_path, modality="ct")
    assert source.cases == ["a", "b"] and source.num_channels == 2
    vol = source.read("a")
    assert [p.rsplit("/", 1)[1] for p in vol.files] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    np.testing.assert_array_equal(vol.array[1], open_source(tmp_path / "a_0001.nii.gz", modality="ct").read(
        "a_0001").array[0])


def test_a_raw_dataset_with_a_channel_gap_is_refused(tmp_path, capfd):
    a = ct_like(seed=8, shape=(16, 16, 16))
    ds = _raw_dataset(tmp_path / "raw", {"c_0000.mha": a, "c_0002.mha": a + 1, "d_0000.mha": a, "d_0001.mha": a},
                      channels=2)
    code, err = _slices(capfd, ds, tmp_path)
    one_line_failure(code, err, "case c", "c_0000.mha, c_0002.mha", "are c_0000.mha, c_0001.mha", "without gaps")


def test_a_complex_nifti_is_refused_not_cut_to_its_real_part(tmp_path, capfd):
    vols = tmp_path / "vols"
    vols.mkdir()
    a = ct_like(seed=9, shape=(16, 16, 16))
    write_nifti(vols / "a.nii.gz", (a + 1j * a).astype(np.complex64))
    code, err = _slices(capfd, vols, tmp_path)
    one_line_failure(code, err, "a.nii.gz", "complex voxels (complex64)", "save the magnitude")


# ---------------------------------------------------------------------------------- 4: inconsistent crop options

@pytest.fixture
def vols(tmp_path):
    """Two CT-like cases, 32^3 voxels of 1 mm and 24x32x32 voxels of (2, 1, 1) mm (canonical S, P, L)."""
    folder = tmp_path / "vols"
    folder.mkdir()
    write_nifti(folder / "big.nii.gz", ct_like(seed=10, shape=(32, 32, 32)))
    write_nifti(folder / "short.nii.gz", ct_like(seed=11, shape=(32, 32, 24)), np.diag([1.0, 1.0, 2.0, 1.0]))
    return folder


@pytest.mark.parametrize("args,needles", [
    (["--crops", "0", "--crop-mm", "16", "16", "16"], ["--crop-mm goes with --crops N", "--crops is 0"]),
    (["--crop-mm", "16", "16", "16"], ["--crop-mm goes with --crops N"]),
    (["--crop-seed", "3"], ["--crop-seed goes with --crops N"]),
    (["--crops", "-2", "--crop-mm", "16", "16", "16"], ["--crops -2", "positive number of crops"]),
])
def test_crop_options_without_crops_are_refused(vols, tmp_path, capfd, args, needles):
    code, err = _slices(capfd, vols, tmp_path, *args)
    one_line_failure(code, err, *needles)
    assert not (tmp_path / "png").exists()


def test_crops_larger_than_a_volume_are_refused_naming_the_case(vols, tmp_path, capfd):
    # 40 mm along superior: 40 voxels of big (32) and 20 of short (24)
    code, err = _slices(capfd, vols, tmp_path, "--crops", "2", "--crop-mm", "40", "16", "16")
    one_line_failure(code, err, "40x16x16 mm crops are 40x16x16 voxels at case big's spacing (1x1x1 mm)",
                     "larger than its 32x32x32-voxel volume along the superior axis", "at most 32 32 32 mm",
                     "remove case big")
    assert _slices(capfd, vols, tmp_path, "--crops", "2", "--crop-mm", "32", "16", "16")[0] == 0  # fits both


def test_crops_thinner_than_two_voxels_are_refused(vols, tmp_path, capfd):
    """A one-voxel-thin crop used to end in torch's "negative stride" ValueError while rendering."""
    code, err = _slices(capfd, vols, tmp_path, "--crops", "2", "--crop-mm", "1", "16", "16")
    one_line_failure(code, err, "1x16x16 mm crops", "case big", "fewer than 2 voxels along the superior axis",
                     "at least 2 2 2 mm")


# -------------------------------------------------------------------- 5: user-facing errors are Med3DInsightErrors

def test_a_non_finite_ot_cost_reaching_the_command_line_is_one_line(tmp_path, capfd, monkeypatch):
    """NonFiniteCostError was a bare ValueError: wherever it surfaced outside pretraining's own handler (which
    explains it as divergence) the command line printed a traceback."""
    import torch

    from med3dinsight_plugin import cli
    from med3dinsight_plugin.errors import Med3DInsightError
    from med3dinsight_plugin.ot import NonFiniteCostError, entropic_partial_wasserstein

    assert issubclass(NonFiniteCostError, Med3DInsightError) and issubclass(NonFiniteCostError, ValueError)
    cost = torch.rand(3, 4)
    cost[1, 2] = float("nan")
    monkeypatch.setattr(cli, "_cmd_slices", lambda args: entropic_partial_wasserstein(
        torch.tensor([]), torch.tensor([]), cost, reg=0.1))
    code, err = _cli(capfd, "slices", tmp_path, "-o", tmp_path / "png")
    one_line_failure(code, err, "cost matrix M contains NaN or Inf")
