"""Spatial feature maps in the teacher cache: their geometry (the letterbox cropped away, the display flips undone,
on the canonical in-plane axes), their size bound, staleness, damage checks, and old caches still read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3dinsight_plugin.slices import IN_PLANE_AXES, SlicePolicy, extract_slice, letterbox_box
from med3dinsight_plugin.teacher.cache import CacheError, StaleCacheError, TeacherCache, _read_header, verify_cache
from med3dinsight_plugin.teacher.clip import ClipTeacher, TeacherError
from med3dinsight_plugin.teacher.embed import embed_dataset
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import Volume

BIN = Path(sys.executable).parent / "med3dinsight"
SHAPE, SPACING = (16, 40, 24), (4.0, 0.8, 1.5)  # non-square, anisotropic: letterboxed differently in every plane
BLOCK = ((0, 5), (0, 10), (16, 24))  # bright voxels: low along axis 0 and 1, high along axis 2
CANVAS, S = 64, 12


class ArraySource:
    """A dataset of in-memory CT volumes (canonical arrays as read), enough for embed_dataset."""

    def __init__(self, volumes):
        self.volumes, self.root, self.num_channels = volumes, Path("in-memory"), 1
        self.cases = sorted(volumes)

    def read(self, case):
        array, spacing = self.volumes[case]
        return Volume(case, array[None].astype(np.float32), spacing, "ct")

    def describe(self):
        return {"kind": "in-memory", "cases": self.cases}


class GrayMapTeacher:
    """A deterministic stand-in teacher whose feature map is the rendered image itself, 2x2-averaged (channel 0),
    and its negative (channel 1); the pooled embedding is a normalised summary of the image."""

    image_size, embed_dim, map_channels, device = CANVAS, 3, 2, torch.device("cpu")

    def identity(self):
        return {"model": "gray-map-test-teacher", "embed_dim": self.embed_dim, "image_size": self.image_size}

    def encode_images(self, images):
        return self.encode_images_with_maps(images)[0]

    def encode_images_with_maps(self, images):
        x = torch.from_numpy(np.stack(images)).float()[..., 0][:, None] / 255.0
        fmap = F.avg_pool2d(x, 2)
        pooled = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), torch.ones(len(x))], 1)
        return F.normalize(pooled, dim=-1), torch.cat([fmap, -fmap], 1)

    def encode_texts(self, texts):
        raise AssertionError("no captions in these tests")


def _block_volume():
    vol = np.zeros(SHAPE, np.float32)  # 0 HU: grey (0.4) in the soft-tissue window
    vol[tuple(slice(lo, hi) for lo, hi in BLOCK)] = 1000.0  # white
    return vol


def test_stored_maps_show_the_block_where_it_is_in_canonical_coordinates(tmp_path):
    source = ArraySource({"block": (_block_volume(), SPACING)})
    everything = SlicePolicy(per_plane=64, min_foreground=0.05)
    embed_dataset(source, tmp_path / "cache", GrayMapTeacher(), everything, progress=False, feature_maps=S)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.has_maps and cache.map_shape == (2, S, S)
    e = cache.entries("block")
    assert isinstance(e.image_map, np.memmap) and e.image_map.dtype == np.float16
    assert sorted(np.bincount(e.plane)) == sorted(SHAPE)  # every slice of every plane
    frac = (np.arange(S) + 0.5) / S
    checked = {0: 0, 1: 0, 2: 0}
    for row, (plane, index) in enumerate(zip(e.plane, e.index)):
        m = np.asarray(e.image_map[row], np.float32)
        assert np.allclose(m[1], -m[0], atol=1e-3)  # channels kept apart and in order
        (a1, a2) = IN_PLANE_AXES[plane]
        n1, n2 = SHAPE[a1], SHAPE[a2]
        # the slice's letterbox on the canvas: 3 canvas pixels of blur (antialiasing, 2x2 cells, bilinear) either side
        display, spacing = extract_slice(np.zeros(SHAPE), SPACING, int(plane), 0)
        _, _, h, w = letterbox_box(display.shape, spacing, CANVAS)
        m1, m2 = 3.0 / h, 3.0 / w
        in_block = BLOCK[plane][0] <= index < BLOCK[plane][1]
        (lo1, hi1), (lo2, hi2) = BLOCK[a1], BLOCK[a2]
        inside = ((frac[:, None] > lo1 / n1 + m1) & (frac[:, None] < hi1 / n1 - m1)
                  & (frac[None, :] > lo2 / n2 + m2) & (frac[None, :] < hi2 / n2 - m2))
        outside = ((frac[:, None] < lo1 / n1 - m1) | (frac[:, None] > hi1 / n1 + m1)
                   | (frac[None, :] < lo2 / n2 - m2) | (frac[None, :] > hi2 / n2 + m2))
        if in_block:
            assert inside.any() and (m[0][inside] > 0.9).all(), (plane, index, np.round(m[0], 2))
            checked[int(plane)] += 1
        # outside the block: the grey body, never the black letterbox (so the crop is exact) nor white
        dark = outside if in_block else np.ones((S, S), bool)
        assert (np.abs(m[0][dark] - 0.4) < 0.05).all(), (plane, index, np.round(m[0], 2))
    assert all(checked[p] == BLOCK[p][1] - BLOCK[p][0] for p in range(3))


def test_a_wrong_flip_or_crop_would_be_caught():
    """The geometry test above relies on the block not being symmetric under the flips and crops it checks."""
    vol = _block_volume()
    for plane in range(3):
        a1, a2 = IN_PLANE_AXES[plane]
        canonical = np.take(vol, BLOCK[plane][0], axis=plane) > 0
        assert canonical.shape == (SHAPE[a1], SHAPE[a2])
        assert not np.array_equal(canonical, canonical[::-1]) and not np.array_equal(canonical, canonical[:, ::-1])
        display, spacing = extract_slice(vol, SPACING, plane, BLOCK[plane][0])
        box = letterbox_box(display.shape, spacing, CANVAS)
        assert box[2] < CANVAS or box[3] < CANVAS  # a letterbox to crop away in every plane


def test_open_clip_vit_maps_are_its_patch_tokens_and_pooled_embeddings_unchanged(tmp_path):
    teacher = ClipTeacher(str(save_tiny_open_clip(tmp_path / "clip")))
    images = [np.random.default_rng(i).integers(0, 255, (teacher.image_size,) * 2 + (3,), np.uint8) for i in range(3)]
    pooled, fmap = teacher.encode_images_with_maps(images)
    assert torch.allclose(pooled, teacher.encode_images(images), atol=1e-6)
    assert fmap.shape == (3, 32, 2, 2) and teacher.map_channels == 32
    source = ArraySource({"a": (_block_volume(), SPACING)})
    embed_dataset(source, tmp_path / "c", teacher, SlicePolicy(per_plane=2), progress=False, feature_maps=3)
    cache = TeacherCache(tmp_path / "c")
    assert cache.map_shape == (32, 3, 3) and cache.entries("a").image_map.shape[1:] == (32, 3, 3)


def test_map_size_is_bounded_part_of_the_settings_and_needs_a_teacher_with_maps(tmp_path):
    source = ArraySource({"a": (_block_volume(), SPACING)})
    policy = SlicePolicy(per_plane=2)
    for bad in (0, 33, 2.5, True):
        with pytest.raises(CacheError, match="feature_maps .--feature-maps. must be a whole number from 1 to 32"):
            embed_dataset(source, tmp_path / "x", GrayMapTeacher(), policy, progress=False, feature_maps=bad)
    assert not (tmp_path / "x").exists()
    embed_dataset(source, tmp_path / "m", GrayMapTeacher(), policy, progress=False, feature_maps=4)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["settings"]["feature_maps"] == 4 and manifest["format_version"] == 3
    again = embed_dataset(source, tmp_path / "m", GrayMapTeacher(), policy, progress=False, feature_maps=4)
    assert (again.shards_written, again.shards_kept) == (0, 1)
    for other in (5, None):
        with pytest.raises(StaleCacheError, match="feature_maps"):
            embed_dataset(source, tmp_path / "m", GrayMapTeacher(), policy, progress=False, feature_maps=other)

    class NoMaps:  # pooled embeddings only
        image_size, embed_dim, device = CANVAS, 3, torch.device("cpu")

        def identity(self):
            return {"model": "no-maps-test-teacher", "embed_dim": 3, "image_size": CANVAS}

        def encode_images(self, images):
            return GrayMapTeacher().encode_images(images)

    no_maps = NoMaps()
    with pytest.raises(TeacherError, match="feature maps .--feature-maps. need a teacher with spatial features"):
        embed_dataset(source, tmp_path / "n", no_maps, policy, progress=False, feature_maps=4)
    embed_dataset(source, tmp_path / "n", no_maps, policy, progress=False)  # fine without maps
    cache = TeacherCache(tmp_path / "n")
    assert cache.manifest["format_version"] == 2  # nothing new in it: older releases still read it
    assert not cache.has_maps and cache.map_shape is None and cache.entries("a").image_map is None


@pytest.mark.slow
def test_the_cli_refuses_a_map_size_above_the_bound_in_one_line(tmp_path):
    proc = subprocess.run([str(BIN), "embed", str(tmp_path), "-o", str(tmp_path / "c"), "--feature-maps", "64"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--feature-maps" in lines[0] and "from 1 to 32" in lines[0]


def test_damaged_maps_are_refused_on_first_read_and_by_verify(tmp_path):
    source = ArraySource({"a": (_block_volume(), SPACING)})
    embed_dataset(source, tmp_path / "d", GrayMapTeacher(), SlicePolicy(per_plane=2), progress=False, feature_maps=4)
    shard = tmp_path / "d" / "shard-00000.safetensors"
    _, entries = _read_header(shard)
    offset = entries["image_map"][2]
    data = bytearray(shard.read_bytes())
    data[offset + 10:offset + 12] = np.array([np.nan], np.float16).tobytes()
    shard.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path / "d")  # opening checks only the layout
    with pytest.raises(CacheError, match="feature maps of case a are not finite"):
        cache.entries("a")
    assert any("feature maps are not finite" in p or "checksum" in p for p in verify_cache(tmp_path / "d"))


def test_old_caches_read_as_shared_space_without_maps(tmp_path):
    """A cache written before text widths, spaces and maps were recorded (format 2) still opens."""
    source = ArraySource({"a": (_block_volume(), SPACING)})
    embed_dataset(source, tmp_path / "old", GrayMapTeacher(), SlicePolicy(per_plane=2), progress=False)
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("text_dim", "shared_space"):
        manifest["settings"]["teacher"].pop(key)
    manifest["format_version"] = 2
    path.write_text(json.dumps(manifest))  # settings_hash kept: the shards still match
    cache = TeacherCache(tmp_path / "old")
    assert (cache.embed_dim, cache.text_dim, cache.shared_space, cache.has_maps, cache.map_shape) == \
        (3, 3, True, False, None)
    assert cache.entries("a").image_map is None and verify_cache(tmp_path / "old") == []
