"""The open_clip teacher, embedding into the cache, the cache itself (verify, staleness, memory-mapped reads) and
torchrun sharding -- with tiny random open_clip models saved in open_clip's own folder format."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, dataset_slices
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from med3dinsight_plugin.teacher.cache import CacheError, StaleCacheError, TeacherCache, verify_cache
from med3dinsight_plugin.teacher.captions import CaptionFile, caption_key
from med3dinsight_plugin.teacher.clip import ClipTeacher, TeacherError
from med3dinsight_plugin.teacher.embed import caption_settings_for, embed_dataset
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import open_source

BIN = Path(sys.executable).parent / "med3dinsight"
POLICY = SlicePolicy(per_plane=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    data = write_nnunet_raw_dataset(root / "raw", cases=5, shape=(24, 28, 32))
    clip = save_tiny_open_clip(root / "clip")
    source = open_source(data)
    captions = root / "captions.jsonl"
    render = RenderSettings(size=48)
    cf = CaptionFile(captions)
    cf.check_settings({"model": "test", **caption_settings_for(POLICY, render)})
    with cf:
        cf.write({"case": s.case, "plane": s.plane, "index": s.index, "position": s.position,
                  "text": f"{s.plane} slice {s.index} of {s.case}"} for s in dataset_slices(source, POLICY, render))
    return {"root": root, "data": data, "clip": clip, "source": source, "captions": captions}


def test_teacher_preprocessing_and_embeddings_equal_open_clips_own(world):
    import open_clip
    from PIL import Image

    teacher = ClipTeacher(f"local-dir:{world['clip']}")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{world['clip']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{world['clip']}")
    images = [s.image for s in dataset_slices(world["source"], POLICY, RenderSettings(size=teacher.image_size))][:4]
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        ref_text = model.encode_text(tokenizer(["a", "axial CT slice"]))
    got = teacher.encode_images(images)
    assert torch.allclose(got, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    assert torch.allclose(teacher.encode_texts(["a", "axial CT slice"]),
                          torch.nn.functional.normalize(ref_text, dim=-1), atol=1e-5)
    assert ClipTeacher(str(world["clip"])).identity() == teacher.identity() | {"model": str(world["clip"])}


def test_unknown_hub_id_fails_at_once_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(TeacherError, match="local"):
        ClipTeacher("hf-hub:nobody/no-such-clip")
    with pytest.raises(TeacherError, match="local"):
        ClipTeacher("ViT-B-32", "laion2b_s34b_b79k")  # a real tag: its weights are not cached here
    assert time.perf_counter() - start < 5


def test_not_an_open_clip_model_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="not an open_clip model"):
        ClipTeacher("resnet-not-a-clip")
    (tmp_path / "config.json").write_text("{}")  # a transformers folder
    with pytest.raises(TeacherError, match="open_clip_config.json"):
        ClipTeacher(str(tmp_path))


def _embed(world, out, **kw):
    teacher = ClipTeacher(str(kw.pop("clip", world["clip"])))
    return embed_dataset(world["source"], out, teacher, POLICY, captions=kw.pop("captions", world["captions"]),
                         batch_size=7, cases_per_shard=2, progress=False, **kw)


def test_cache_holds_the_teacher_embeddings_of_every_selected_slice(world, tmp_path):
    _embed(world, tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    teacher = ClipTeacher(str(world["clip"]))
    captions = CaptionFile.read(world["captions"])
    render = RenderSettings(size=teacher.image_size)
    assert cache.cases == world["source"].cases and cache.has_text and cache.embed_dim == 32
    for s in dataset_slices(world["source"], POLICY, render, cases=["case003"]):
        e = cache.entries(s.case)
        plane = ("axial", "coronal", "sagittal").index(s.plane)
        row = int(np.flatnonzero((e.plane == plane) & (e.index == s.index))[0])
        assert e.position[row] == pytest.approx(s.position) and e.shape == (24, 28, 32)
        assert np.allclose(e.image[row], teacher.encode_images([s.image])[0].numpy(), atol=2e-3)  # float16
        text = captions[caption_key(s.case, s.plane, s.position)]["text"]
        assert np.allclose(e.text[row], teacher.encode_texts([text])[0].numpy(), atol=2e-3)
    assert isinstance(cache.entries("case003").image, np.memmap)
    with pytest.raises(CacheError, match="no slices of case"):
        cache.entries("case999")


def test_embedding_resumes_after_a_crash_and_rewrites_only_what_is_missing(world, tmp_path):
    first = _embed(world, tmp_path / "a")
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert first.shards_written == 3
    (tmp_path / "a" / "shard-00001.safetensors").unlink()  # as if killed while writing it
    (tmp_path / "a" / "manifest.json").unlink()
    (tmp_path / "a" / ".shard-00001.safetensors.123.tmp").write_bytes(b"half")  # a crashed temp file is ignored
    again = _embed(world, tmp_path / "a")
    assert (again.shards_written, again.shards_kept) == (1, 2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")} == files


@pytest.mark.slow
def test_verify_catches_a_corrupted_shard(world, tmp_path):
    _embed(world, tmp_path / "c", captions=None)
    ok = subprocess.run([str(BIN), "cache", "verify", str(tmp_path / "c")], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok, 3 shard(s), 5 cases" in ok.stdout and "captions: no" in ok.stdout
    shard = tmp_path / "c" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the embeddings
    shard.write_bytes(bytes(data))
    bad = subprocess.run([str(BIN), "cache", "verify", str(tmp_path / "c")], capture_output=True, text=True)
    assert bad.returncode == 2 and "shard-00002.safetensors: checksum mismatch" in bad.stderr
    assert verify_cache(tmp_path / "c")  # same from Python
    shard.write_bytes(bytes(data[:200]))  # truncated
    assert any("shard-00002" in p for p in verify_cache(tmp_path / "c"))


def test_a_cache_from_another_teacher_or_other_settings_is_refused(world, tmp_path):
    _embed(world, tmp_path / "d")
    other = save_tiny_open_clip(tmp_path / "other_clip", seed=1)
    with pytest.raises(StaleCacheError, match="teacher.weights_fingerprint"):
        _embed(world, tmp_path / "d", clip=other)
    with pytest.raises(StaleCacheError, match="other settings"):
        TeacherCache(tmp_path / "d", expect={"teacher": ClipTeacher(str(other)).identity()})
    with pytest.raises(StaleCacheError, match="slices.per_plane"):
        embed_dataset(world["source"], tmp_path / "d", ClipTeacher(str(world["clip"])), SlicePolicy(per_plane=2),
                      captions=None, cases_per_shard=2, progress=False)


def test_captions_must_cover_every_slice_and_match_the_slice_settings(world, tmp_path):
    lines = world["captions"].read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:-1]))  # last caption missing
    Path(f"{partial}.meta.json").write_text(Path(f"{world['captions']}.meta.json").read_text())
    with pytest.raises(CacheError, match="no caption for 1 selected slice.*case004"):
        _embed(world, tmp_path / "e", captions=partial)
    with pytest.raises(StaleCacheError, match="slices.per_plane"):
        embed_dataset(world["source"], tmp_path / "f", ClipTeacher(str(world["clip"])), SlicePolicy(per_plane=2),
                      captions=world["captions"], progress=False)


@pytest.mark.slow
def test_two_torchrun_processes_write_the_same_cache_as_one(world, tmp_path):
    args = [str(world["data"]), "--clip-model", str(world["clip"]), "--captions", str(world["captions"]),
            "--per-plane", "3", "--cases-per-shard", "1", "--batch-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([str(BIN), "embed", *args, "-o", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", str(BIN), "embed", *args, "-o", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 6
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n


@pytest.mark.slow
def test_a_full_disk_leaves_no_half_written_shard(world, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs (root) to fill a disk for real")
    try:
        proc = subprocess.run([str(BIN), "embed", str(world["data"]), "--clip-model", str(world["clip"]),
                               "--per-plane", "16", "--cases-per-shard", "5", "-o", str(disk / "cache")],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert "shard-00000.safetensors" in line and "No space left" in line
        assert not [p.name for p in (disk / "cache").iterdir()]  # neither a partial shard nor a temp file
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
