"""Hostile and unlucky inputs to the teacher side (volumes, slices, captions, embedding, the cache): each gives one
line on stderr naming the file or key and the fix, exit code 2, no traceback, nothing half-written -- and damaged
or foreign data is never used silently. Everything goes through the real code paths (nibabel, safetensors,
open_clip, transformers) with tiny local models."""
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PAPER_RECIPE, ct_like, ct_world
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, dataset_slices
from med3dinsight_plugin.teacher.cache import (
    CacheError,
    StaleCacheError,
    TeacherCache,
    verify_cache,
    write_manifest,
    write_shard,
)
from med3dinsight_plugin.teacher.captioner import Captioner, VLMError, load_prompts, load_vlm, prompt_for
from med3dinsight_plugin.teacher.clip import ClipTeacher, TeacherError
from med3dinsight_plugin.teacher.tiny import save_tiny_llava
from med3dinsight_plugin.volumes import VolumeError, open_source

COMMON = ["model.patch_size=[32,32,32]", "model.psat=small", "train.steps=1", "data.num_workers=0",
          "data.eval_cases=0"]
TINY = ["--set", *PAPER_RECIPE,
        "model.backbone=plain_conv_unet", "model.backbone_kwargs={base_features: 4, max_features: 16}",
        *COMMON]
SHARD = "shard-00000.safetensors"


def _nifti(path, array, affine=None):
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4) if affine is None else affine), str(path))


_ct = ct_like


def _mri(seed=0, shape=(32, 32, 32)):
    rng = np.random.default_rng(seed)
    a = np.abs(rng.normal(20, 5, shape)).astype(np.float32)
    a[6:26, 6:26, 6:26] += 300 + np.abs(50 * rng.normal(size=(20, 20, 20))).astype(np.float32)
    return a


def _run(capsys, *argv):
    """Exit code, stderr lines (without tqdm progress bars, which are not messages) and stdout of the CLI."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not re.match(r"^[\w ]+:\s*\d+%\|", line)]
    return code, err, captured.out


def _one_line(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return ct_world(tmp_path_factory.mktemp("robust"))


def _copy_cache(base, tmp_path):
    return Path(shutil.copytree(base / "cache", tmp_path / "cache"))


def _tensor_offset(shard: Path, name: str) -> int:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]


def _assert_no_checkpoint(out):
    if Path(out).exists():
        written = {p.name for p in Path(out).rglob("*")}
        assert not written & {"med3dinsight.safetensors", "last.pt"}, written
        assert not [n for n in written if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- 5: damaged cache shards

def _flip_header_length(shard):
    data = bytearray(shard.read_bytes())
    data[4] ^= 0x01  # one bit: the header now claims 4 GiB more than it has
    shard.write_bytes(bytes(data))


def _nan_embedding(shard):
    data = bytearray(shard.read_bytes())
    data[_tensor_offset(shard, "image") + 1] = 0x7E  # high byte of the first float16: NaN
    shard.write_bytes(bytes(data))


def _inf_embedding(shard):
    data = bytearray(shard.read_bytes())
    at = _tensor_offset(shard, "image") + 2 * 5
    data[at:at + 2] = b"\x00\x7c"  # float16 +Inf
    shard.write_bytes(bytes(data))


def _truncate(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])


DAMAGE = {"header_length_bit": (_flip_header_length, "header claims"), "nan": (_nan_embedding, "not finite"),
          "inf": (_inf_embedding, "not finite"), "truncated": (_truncate, "bytes but manifest.json recorded")}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_shard_stops_pretraining_with_one_line(base, tmp_path, capsys, kind):
    cache = _copy_cache(base, tmp_path)
    damage, why = DAMAGE[kind]
    damage(cache / SHARD)
    out = tmp_path / "run"
    code, err, _ = _run(capsys, "pretrain", "--data", base / "vols", "--cache", cache, "-o", out, *TINY)
    _one_line(code, err, SHARD, why, "cache verify", "med3dinsight embed")
    _assert_no_checkpoint(out)
    assert any(SHARD in p for p in verify_cache(cache))  # what verify says too


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_shard_is_refused_by_teacher_cache(base, tmp_path, kind):
    cache = _copy_cache(base, tmp_path)
    damage, why = DAMAGE[kind]
    damage(cache / SHARD)
    with pytest.raises(CacheError, match=why) as info:
        TeacherCache(cache).entries("case0")
    assert str(cache / SHARD) in str(info.value)


def test_damaged_row_metadata_and_pre_size_manifests(base, tmp_path):
    cache = _copy_cache(base, tmp_path)
    shard = cache / SHARD
    pristine = shard.read_bytes()
    data = bytearray(pristine)
    data[_tensor_offset(shard, "case") + 4 * 3] = 0x41  # case id 65 of a 3-case shard
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="case column"):
        TeacherCache(cache)
    data = bytearray(pristine)
    data[_tensor_offset(shard, "plane")] = 7
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="plane id"):
        TeacherCache(cache)
    # a manifest without recorded sizes (format 1): a truncated shard is still caught by its tensor offsets
    manifest = json.loads((cache / "manifest.json").read_text())
    for s in manifest["shards"]:
        s.pop("bytes")
    manifest["format_version"] = 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    shard.write_bytes(pristine[:-64])
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache(cache)
    shard.write_bytes(pristine)
    assert TeacherCache(cache).entries("case0").image.shape[1] == 32


# --------------------------------------------------------------------------- 7: volume fingerprints

def test_fingerprint_follows_the_content_not_the_file(tmp_path):
    import SimpleITK as sitk

    a = _ct(seed=1, shape=(20, 24, 28))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.5, 2.0))
    sitk.WriteImage(img, str(tmp_path / "a" / "x.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(img, "RAS"), str(tmp_path / "b" / "x.nii"))  # other orientation, uncompressed
    other = a.copy()
    other[10, 12, 14] += 1  # one voxel of the central slices differs
    img2 = sitk.GetImageFromArray(other)
    img2.SetSpacing((1.0, 1.5, 2.0))
    sitk.WriteImage(img2, str(tmp_path / "c" / "x.nii.gz"))
    fa, fb, fc = (open_source(tmp_path / d, modality="ct").read("x").fingerprint() for d in "abc")
    assert fa == fb and fa != fc and fa.startswith("v1:")


def test_cache_from_another_folder_with_the_same_names_and_shapes_is_detected(base, tmp_path):
    cache = TeacherCache(base / "cache")
    manifest = json.loads((base / "cache" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    same = open_source(base / "vols", modality="ct")
    for case in same.cases:
        volume = same.read(case)
        assert cache.fingerprint(case) == manifest["cases"][case]["fingerprint"] == volume.fingerprint()
        cache.check_volume(volume)  # the folder the cache was made from passes
    other = Path(shutil.copytree(base / "vols", tmp_path / "other"))
    _nifti(other / "case1.nii.gz", _ct(seed=99))  # same name and shape, other image
    volume = open_source(other, modality="ct").read("case1")
    assert volume.shape == tuple(cache.entries("case1").shape)
    with pytest.raises(StaleCacheError, match=r"another image for case 'case1'.*med3dinsight embed"):
        cache.check_volume(volume)


def test_a_cache_without_fingerprints_is_accepted_with_a_warning(tmp_path):
    rows = {"plane": np.zeros(2), "index": np.array([0, 1]), "position": np.array([0.1, 0.9]),
            "case": np.zeros(2), "image": np.eye(2, 4, dtype=np.float32)}
    settings = {"teacher": {"embed_dim": 4}, "captions": None}
    from med3dinsight_plugin.teacher.cache import settings_hash
    write_shard(tmp_path, 0, ["c"], {"c": [4, 4, 4]}, rows, settings_hash(settings))  # no fingerprints: as before
    write_manifest(tmp_path, settings, {0: ["c"]})
    cache = TeacherCache(tmp_path)
    assert cache.fingerprint("c") is None
    with pytest.warns(UserWarning, match="before volume fingerprints"):
        cache.check_fingerprint("c", "v1:whatever")


def test_pretraining_refuses_a_cache_made_from_other_images(base, tmp_path, capsys):
    other = Path(shutil.copytree(base / "vols", tmp_path / "other"))
    _nifti(other / "case1.nii.gz", _ct(seed=99))
    out = tmp_path / "run"
    code, err, _ = _run(capsys, "pretrain", "--data", other, "--cache", base / "cache", "-o", out, *TINY)
    _one_line(code, err, "case1", "med3dinsight embed")
    _assert_no_checkpoint(out)


def test_a_resumed_run_checks_prepared_cases_against_the_cache_without_rereading(base, tmp_path, capsys):
    """The second start reuses the prepared volumes: their recorded fingerprints still have to match the cache."""
    vols = Path(shutil.copytree(base / "vols", tmp_path / "vols"))
    out = tmp_path / "run"
    code, err, _ = _run(capsys, "pretrain", "--data", vols, "--cache", base / "cache", "-o", out, *TINY)
    assert code == 0, err
    index = json.loads((out / "prepared" / "prepared.json").read_text())
    assert set(index["fingerprints"]) == set(index["cases"])
    index["fingerprints"]["case1"] = "v1:" + "0" * 16  # as if case1's image had changed since it was prepared
    (out / "prepared" / "prepared.json").write_text(json.dumps(index))
    code, err, _ = _run(capsys, "pretrain", "--data", vols, "--cache", base / "cache", "-o", out, *TINY,
                        "train.steps=2")
    _one_line(code, err, "case1", "med3dinsight embed")


# ------------------------------------------------------------------------------ 10: memory bomb

def _bomb(path, shape=(900, 900, 900)):
    """A NIfTI header claiming ``shape`` float32 voxels, gzipped with no voxel data: about 66 bytes."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 24, compresslevel=9, mtime=0))
    return path


def test_memory_bomb_is_refused_before_allocating_by_slices(tmp_path):
    folder = tmp_path / "vols"
    folder.mkdir()
    assert _bomb(folder / "bomb.nii.gz").stat().st_size < 100
    script = ("import resource, sys\n"
              "from med3dinsight_plugin.cli import main\n"
              "import med3dinsight_plugin.slices, nibabel, torch\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "code = main(sys.argv[1:])\n"
              "print(code, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", script, "slices", str(folder), "-o", str(tmp_path / "png")],
                          capture_output=True, text=True)
    code, grown_mb = (int(v) for v in proc.stdout.split())
    err = proc.stderr.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "bomb.nii.gz" in err[0] and "900x900x900 float32" in err[0] and "2.9 GB" in err[0]
    assert grown_mb < 300, grown_mb  # reading the claimed 2.9 GB would have grown the process by that much
    assert not (tmp_path / "png").exists() or not list((tmp_path / "png").iterdir())


def _peak_mb(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def test_memory_bomb_is_refused_by_embed_and_pretrain(base, tmp_path, capsys):
    folder = tmp_path / "only"
    folder.mkdir()
    _bomb(folder / "bomb.nii.gz")
    (code, err, _), peak = _peak_mb(lambda: _run(capsys, "embed", folder, "-o", tmp_path / "cache", "--clip-model",
                                                 base / "clip", "--modality", "ct"))
    _one_line(code, err, "bomb.nii.gz", "900x900x900 float32", "re-export or remove it")
    assert peak < 200 and not (tmp_path / "cache" / SHARD).exists()
    vols = Path(shutil.copytree(base / "vols", tmp_path / "vols"))
    _bomb(vols / "zbomb.nii.gz")
    (code, err, _), peak = _peak_mb(lambda: _run(capsys, "pretrain", "--data", vols, "--cache", base / "cache",
                                                 "-o", tmp_path / "run", *TINY))
    _one_line(code, err, "zbomb.nii.gz", "900x900x900 float32")
    assert peak < 200
    _assert_no_checkpoint(tmp_path / "run")


def test_size_checks_on_plain_and_multi_member_files(tmp_path):
    a = _ct(seed=3, shape=(16, 16, 16))
    (tmp_path / "one").mkdir()
    _nifti(tmp_path / "one" / "x.nii", a)
    raw = (tmp_path / "one" / "x.nii").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "x.nii").write_bytes(raw[:-1000])
    with pytest.raises(VolumeError, match=r"x\.nii: its header claims 16x16x16 float32 .* but the file has"):
        open_source(tmp_path / "cut", modality="ct").read("x")
    (tmp_path / "multi").mkdir()  # two gzip members (as bgzip writes): the trailer holds only the last one's size
    (tmp_path / "multi" / "x.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    expected = open_source(tmp_path / "one", modality="ct").read("x").array
    assert np.array_equal(open_source(tmp_path / "multi", modality="ct").read("x").array, expected)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "x.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:-3000]))
    with pytest.raises(VolumeError, match="holds only"):
        open_source(tmp_path / "short", modality="ct").read("x")


# ------------------------------------------------------------------------ 12: pickled weights

class _Payload:
    """What a malicious checkpoint carries: unpickling it would create the marker folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_vlm_with_pickled_weights_is_refused_and_nothing_runs(base, tmp_path, capsys):
    folder = save_tiny_llava(tmp_path / "vlm")
    for f in list(folder.glob("*.safetensors*")):
        f.unlink()
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"weight": _Payload(marker)}, folder / "pytorch_model.bin")
    code, err, _ = _run(capsys, "caption", base / "vols", "--vlm", folder, "-o", tmp_path / "c.jsonl",
                        "--per-plane", "1", "--device", "cpu")
    _one_line(code, err, str(folder / "pytorch_model.bin"), "safetensors", "weights_only=True", "posix.mkdir")
    assert not marker.exists() and not (tmp_path / "c.jsonl").exists()


def test_open_clip_with_pickled_weights_is_refused_and_nothing_runs(base, tmp_path, capsys):
    folder = tmp_path / "clip"
    folder.mkdir()
    shutil.copy(base / "clip" / "open_clip_config.json", folder)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"state_dict": {"w": _Payload(marker)}}, folder / "open_clip_pytorch_model.bin")
    code, err, _ = _run(capsys, "embed", base / "vols", "-o", tmp_path / "cache", "--clip-model", folder,
                        "--modality", "ct")
    _one_line(code, err, str(folder / "open_clip_pytorch_model.bin"), "safetensors", "weights_only=True")
    assert not marker.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ 13: one modality per dataset

@pytest.fixture(scope="module")
def mri(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    vols = root / "vols"
    vols.mkdir()
    for i in range(3):
        _nifti(vols / f"case{i}.nii.gz", _mri(seed=i))
    assert main(["embed", str(vols), "-o", str(root / "cache"), "--clip-model", str(base / "clip"), "--per-plane",
                 "4"]) == 0  # --modality auto
    return root


def test_mri_folder_is_decided_once_and_rendered_and_recorded_as_mri(mri):
    source = open_source(mri / "vols")
    assert source.modality == "mri" and source.describe()["modality"] == "mri"
    assert "intensities of case0, case1, case2" in source.modality_reason
    assert {s.modality for s in dataset_slices(source, SlicePolicy(per_plane=1), RenderSettings(size=32))} == {"mri"}
    assert TeacherCache(mri / "cache").settings["source"]["modality"] == "mri"
    with pytest.raises(StaleCacheError, match="source.modality"):
        TeacherCache(mri / "cache", expect={"source": {"modality": "ct"}})
    assert open_source(mri / "vols", modality="ct").modality == "ct"  # --modality overrides


def test_mri_folder_pretrains_with_zscore_normalisation(mri, tmp_path, capsys):
    from med3dinsight_plugin.checkpoint import load_checkpoint

    out = tmp_path / "run"
    code, err, _ = _run(capsys, "pretrain", "--data", mri / "vols", "--cache", mri / "cache", "-o", out, *TINY)
    assert code == 0, err
    meta = load_checkpoint(out / "med3dinsight.safetensors").metadata
    assert meta["intensity_normalization"]["scheme"] == "ZScoreNormalization"
    assert meta["data"]["modality"] == "mri"


def test_a_cache_rendered_as_mri_is_refused_for_ct_pretraining(mri, tmp_path, capsys):
    code, err, _ = _run(capsys, "pretrain", "--data", mri / "vols", "--cache", mri / "cache", "-o", tmp_path / "r",
                        *TINY, "data.modality=ct")
    _one_line(code, err, "source.modality")


@pytest.mark.slow
def test_nnunet_channel_names_and_mixed_folders(tmp_path):
    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset

    ds = write_nnunet_raw_dataset(tmp_path / "raw", cases=2, shape=(8, 8, 8))
    assert open_source(ds).modality == "ct"
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T2"}}))
    source = open_source(ds)
    assert source.modality == "mri" and "T2" in source.modality_reason
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _nifti(mixed / "a.nii.gz", _ct())
    _nifti(mixed / "b.nii.gz", _mri())
    with pytest.raises(VolumeError, match=r"case a looks like CT .* case b does not; pass --modality ct"):
        open_source(mixed)
    assert open_source(mixed, modality="mri").modality == "mri"


# ------------------------------------------------------------------------ 15: prompt templates

LEAK = "{position.__format__.__globals__[os].environ}"


def test_prompt_templates_cannot_reach_module_globals(tmp_path, monkeypatch):
    monkeypatch.setenv("MED3D_TEST_SECRET", "s3cr3t")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"ct.*": f"describe {LEAK}"}))
    with pytest.raises(VLMError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message and "'ct.*'" in message and "{plane}, {modality}, {position}, {case}" in message
    assert "attribute or index access" in message and "s3cr3t" not in message
    with pytest.raises(VLMError, match="attribute or index access"):
        prompt_for({"*": LEAK}, "ct", "axial", position=0.5)
    for bad in ("{plane[0]}", "{position:{case}}", "{position:>999999999}", "{0}", "{}", "{plane!x}"):
        path.write_text(json.dumps({"*": bad}))
        with pytest.raises(VLMError, match=r"prompts\.json.*'\*'"):
            load_prompts(path)
    path.write_text(json.dumps({"*": "{plane!r:>10} at {position:.3f} of {case}"}))
    assert prompt_for(load_prompts(path), "mri", "axial", position=0.5, case="c") == "   'axial' at 0.500 of c"


def test_a_leaking_prompts_file_stops_caption_before_the_model_loads(base, tmp_path, capsys):
    path = tmp_path / "prompts.yaml"
    path.write_text(f"'*': 'x {LEAK}'\n")
    code, err, _ = _run(capsys, "caption", base / "vols", "--vlm", tmp_path / "no-such-model", "--prompts", path,
                        "-o", tmp_path / "c.jsonl")
    _one_line(code, err, "prompts.yaml", "'*'", "{position}")
    assert not (tmp_path / "c.jsonl").exists()


def test_captioner_checks_templates_given_as_a_dict(tmp_path):
    vlm = load_vlm(str(save_tiny_llava(tmp_path / "vlm")))
    with pytest.raises(VLMError, match=r"prompts: .*'ct\.axial'"):
        Captioner(vlm, prompts={"ct.axial": LEAK})


# -------------------------------------------------------------------------- 14: the sweep

def test_caption_files_with_bad_bytes_or_settings(base, tmp_path, capsys):
    rec = {"case": "case0", "plane": "axial", "index": 1, "position": 0.25, "text": "liver"}
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(json.dumps(rec).encode() + b"\n" + b'{"case": "\xff\xfe"}\n')
    (tmp_path / "c.jsonl.meta.json").write_text("{}")
    code, err, _ = _run(capsys, "embed", base / "vols", "-o", tmp_path / "e1", "--clip-model", base / "clip",
                        "--captions", bad, "--modality", "ct")
    _one_line(code, err, "c.jsonl line 2", "malformed")
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps(rec) + "\n")
    (tmp_path / "g.jsonl.meta.json").write_bytes(b"\xff{not json")
    code, err, _ = _run(capsys, "embed", base / "vols", "-o", tmp_path / "e2", "--clip-model", base / "clip",
                        "--captions", good, "--modality", "ct")
    _one_line(code, err, "g.jsonl.meta.json", "med3dinsight caption")
    assert not (tmp_path / "e2" / SHARD).exists()


@pytest.mark.parametrize("content,needle", [(b"- a\n- b\n", "must hold a mapping"),
                                            (b"'*': '\xff\xfe'\n", "not UTF-8")])
def test_bad_prompts_files(base, tmp_path, capsys, content, needle):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    code, err, _ = _run(capsys, "caption", base / "vols", "--vlm", tmp_path / "nope", "--prompts", path, "-o",
                        tmp_path / "c.jsonl")
    _one_line(code, err, "p.yaml", needle)


def _raw_dataset(tmp_path, dataset_json: bytes):
    ds = tmp_path / "Dataset001_X"
    (ds / "imagesTr").mkdir(parents=True)
    _nifti(ds / "imagesTr" / "a_0000.nii.gz", _ct(shape=(8, 8, 8)))
    (ds / "dataset.json").write_bytes(dataset_json)
    return ds


DATASETS = {
    "not_json": (b"{channel_names", "dataset.json"),
    "a_list": (b"[1, 2]", "not an object"),
    "no_channel_names": (b'{"file_ending": ".nii.gz", "labels": {}}', "lacks channel_names"),
    "no_file_ending": (b'{"channel_names": {"0": "CT"}}', "lacks file_ending"),
    "two_channels_one_file": (b'{"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}',
                              "names 2 channel(s)"),
}


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_bad_dataset_json(tmp_path, capsys, kind):
    content, needle = DATASETS[kind]
    ds = _raw_dataset(tmp_path, content)
    code, err, _ = _run(capsys, "slices", ds, "-o", tmp_path / "png")
    _one_line(code, err, "dataset.json", needle)


def test_preprocessed_folder_without_or_with_broken_plans(tmp_path, capsys, nnunet_plans):
    ds = tmp_path / "pre"
    ds.mkdir()
    (ds / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}')
    shutil.copy(nnunet_plans["resenc"], ds)
    code, err, _ = _run(capsys, "slices", ds, "-o", tmp_path / "png")
    _one_line(code, err, "nnUNetPlans.json", "nnUNetResEncUNetMPlans", "--plans")
    plans = json.loads(Path(nnunet_plans["plain"]).read_text())
    del plans["transpose_forward"]
    (ds / "nnUNetPlans.json").write_text(json.dumps(plans))
    code, err, _ = _run(capsys, "slices", ds, "-o", tmp_path / "png")
    _one_line(code, err, "nnUNetPlans.json", "transpose_forward", "nnUNetv2_plan_and_preprocess")


def test_a_nifti_name_that_is_a_folder(tmp_path, capsys):
    vols = tmp_path / "vols"
    (vols / "a.nii.gz").mkdir(parents=True)
    code, err, _ = _run(capsys, "slices", vols, "-o", tmp_path / "png", "--modality", "ct")
    _one_line(code, err, "a.nii.gz", "is a folder", "move it out")


@pytest.mark.parametrize("args,needle", [(["--channel", "3"], "--channel takes 0 to 0"),
                                         (["--channel", "-1"], "--channel"),
                                         (["--per-plane", "0"], "--per-plane"),
                                         (["--size", "100000"], "--size")])
def test_bad_slice_arguments(base, tmp_path, capsys, args, needle):
    code, err, _ = _run(capsys, "slices", base / "vols", "-o", tmp_path / "png", *args)
    _one_line(code, err, needle)
    assert not (tmp_path / "png").exists() or not list((tmp_path / "png").iterdir())


def test_embed_checks_the_channel_before_writing(base, tmp_path, capsys):
    code, err, _ = _run(capsys, "embed", base / "vols", "-o", tmp_path / "c", "--clip-model", base / "clip",
                        "--channel", "2")
    _one_line(code, err, "--channel takes 0 to 0")
    assert not (tmp_path / "c" / SHARD).exists()


MANIFESTS = {
    "not_json": (b"{garbage", "cannot read"),
    "not_utf8": (b"\xff\xfe\x00", "cannot read"),
    "a_list": (b"[]", "not a med3dinsight teacher cache manifest"),
    "no_shards": (json.dumps({"format": "med3dinsight-teacher-cache", "format_version": 2}).encode(), "damaged"),
    "escaping_shard": (None, "damaged"),
    "future_version": (None, "upgrade med3dinsight"),
}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_garbage_manifest(base, tmp_path, capsys, kind):
    cache = _copy_cache(base, tmp_path)
    content, needle = MANIFEST_CONTENT(cache, kind)
    (cache / "manifest.json").write_bytes(content)
    code, err, _ = _run(capsys, "pretrain", "--data", base / "vols", "--cache", cache, "-o", tmp_path / "r", *TINY)
    _one_line(code, err, "manifest.json", needle)
    proc_err = verify_cache(cache)
    assert len(proc_err) == 1 and "manifest.json" in proc_err[0]
    code, err, _ = _run(capsys, "cache", "verify", cache)
    assert code == 2 and "Traceback" not in "".join(err) and "manifest.json" in err[0]


def MANIFEST_CONTENT(cache, kind):
    content, needle = MANIFESTS[kind]
    if content is None:
        m = json.loads((cache / "manifest.json").read_text())
        if kind == "escaping_shard":
            m["shards"][0]["file"] = "../../etc/passwd"
        else:
            m["format_version"] = 99
        content = json.dumps(m).encode()
    return content, needle


def test_bad_open_clip_folders_and_names(base, tmp_path):
    bad = tmp_path / "bad_config"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text("{not json")
    with pytest.raises(TeacherError, match=r"cannot read .*open_clip_config\.json"):
        ClipTeacher(str(bad))
    (bad / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(TeacherError, match="no model_cfg"):
        ClipTeacher(str(bad))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(base / "clip" / "open_clip_config.json", empty)
    with pytest.raises(TeacherError, match="holds no weights"):
        ClipTeacher(str(empty))  # was a silently random teacher
    (empty / "open_clip_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(TeacherError, match="cannot load open_clip model"):
        ClipTeacher(str(empty))
    with pytest.raises(TeacherError, match="without weights.*--clip-pretrained"):
        ClipTeacher("ViT-B-32")  # an architecture alone: random


def test_damaged_vlm_folders_give_one_line(base, tmp_path, capsys):
    good = save_tiny_llava(tmp_path / "vlm")

    def truncate_weights(d):
        f = next(d.glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:1000])

    damage = {"weights": (truncate_weights, "cannot load the weights"),
              "tokenizer": (lambda d: (d / "tokenizer.json").write_text("{garbage"), "cannot load the processor"),
              "template": (lambda d: (d / "chat_template.jinja").write_text("{% for %}"), "chat template")}
    for name, (hurt, needle) in damage.items():
        folder = Path(shutil.copytree(good, tmp_path / name))
        hurt(folder)
        code, err, _ = _run(capsys, "caption", base / "vols", "--vlm", folder, "-o", tmp_path / f"{name}.jsonl",
                            "--per-plane", "1", "--device", "cpu")
        _one_line(code, err, name, needle)
        assert not (tmp_path / f"{name}.jsonl").exists()


@pytest.mark.parametrize("args,needle", [(["--planes", "oblique"], "--planes"),
                                         (["--cases-per-shard", "0"], "--cases-per-shard"),
                                         (["--batch-size", "0"], "--batch-size")])
def test_bad_embed_arguments(base, tmp_path, capsys, args, needle):
    code, err, _ = _run(capsys, "embed", base / "vols", "-o", tmp_path / "c", "--clip-model", base / "clip", *args)
    _one_line(code, err, needle)
    assert not (tmp_path / "c" / SHARD).exists()
