"""Pretraining samples: every slice handed to PSAT is, in crop coordinates, exactly the volume slice whose teacher
embedding comes with it -- proven with volumes whose voxels encode their own coordinates."""
import numpy as np
import pytest
import torch

from med3dinsight_plugin.planes import slice_index
from med3dinsight_plugin.pretrain.data import PretrainDataset, split_cases
from med3dinsight_plugin.teacher.cache import StaleCacheError, TeacherCache, settings_hash, write_manifest, write_shard

SHAPES = {"a": (40, 36, 30), "b": (20, 50, 24)}  # "b" is smaller than the patch along two axes
PATCH = (24, 24, 24)
E = 8


def _coded_volume(shape):
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return np.stack([z, y, x]).astype(np.float32)  # 3 channels: each voxel's own (z, y, x)


def _embedding(plane, index):
    v = np.zeros(E, np.float32)
    v[plane] = 1.0
    v[3] = index / 100.0
    return v / np.linalg.norm(v)


def _world(tmp_path, per_plane=6):
    for case, shape in SHAPES.items():
        np.save(tmp_path / f"{case}.npy", _coded_volume(shape))
    cols = {"plane": [], "index": [], "position": [], "case": [], "image": []}
    for ci, (case, shape) in enumerate(SHAPES.items()):
        for p in range(3):
            for idx in np.linspace(0, shape[p] - 1, per_plane).astype(int):
                cols["plane"].append(p), cols["index"].append(idx), cols["position"].append((idx + .5) / shape[p])
                cols["case"].append(ci), cols["image"].append(_embedding(p, idx))
    rows = {k: np.asarray(v) for k, v in cols.items()}
    rows["text"] = rows["image"][:, ::-1].copy()
    settings = {"teacher": {"embed_dim": E}, "captions": {"sha256": "x"}}
    write_shard(tmp_path, 0, list(SHAPES), SHAPES, rows, settings_hash(settings))
    write_manifest(tmp_path, settings, {0: list(SHAPES)})
    return TeacherCache(tmp_path)


def test_slices_map_from_volume_to_crop_coordinates_exactly(tmp_path):
    cache = _world(tmp_path)
    ds = PretrainDataset(tmp_path, list(SHAPES), SHAPES, cache, PATCH, slices=8, seed=3, augment=False)
    for i in range(40):
        s = ds[i]
        vol = s["volume"].numpy()
        assert vol.shape == (3, *PATCH)
        real = s["mask"].numpy()
        assert real.sum() >= 1
        for k in np.flatnonzero(real):
            p, pos = int(s["plane"][k]), float(s["position"][k])
            j = slice_index(pos, PATCH[p])  # the crop slice PSAT is asked about
            coords = np.take(vol[p], j, axis=p)  # channel p holds each voxel's coordinate along axis p
            emb = s["image_emb"][k].numpy()
            index = round(emb[3] / emb[:3].max() * 100)  # the cached slice's volume index, from its embedding
            assert int(np.argmax(emb[:3])) == p
            assert coords.max() == index  # padding (the channel minimum) never exceeds the real coordinate
            assert np.allclose(s["text_emb"][k].numpy(), emb[::-1])
        planes_positions = {(int(p), round(float(q), 4)) for p, q, m in zip(s["plane"], s["position"], real) if m}
        assert len(planes_positions) == real.sum()  # no duplicate slices among the real ones
    assert ds[5]["position"].equal(ds[5]["position"])  # deterministic per index
    assert torch.equal(ds[7]["volume"], PretrainDataset(tmp_path, list(SHAPES), SHAPES, cache, PATCH, slices=8,
                                                         seed=3, augment=False)[7]["volume"])


def test_k_slices_are_spread_over_planes_and_positions(tmp_path):
    cache = _world(tmp_path, per_plane=12)
    ds = PretrainDataset(tmp_path, ["a"], SHAPES, cache, PATCH, slices=6, seed=0, augment=False)
    for i in range(20):
        s = ds[i]
        assert s["mask"].all()
        counts = np.bincount(s["plane"].numpy(), minlength=3)
        assert counts.max() - counts.min() <= 1  # round-robin over planes when each has enough slices
        for p in range(3):
            idx = sorted(int(slice_index(float(q), PATCH[p])) for q, pp in zip(s["position"], s["plane"]) if pp == p)
            assert all(b - a >= 2 for a, b in zip(idx, idx[1:]))  # stratified: never neighbours here


def test_augmentation_keeps_geometry_and_is_deterministic(tmp_path):
    cache = _world(tmp_path)
    ds = PretrainDataset(tmp_path, list(SHAPES), SHAPES, cache, PATCH, slices=4, seed=1, augment=True)
    a, b = ds[11], ds[11]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = PretrainDataset(tmp_path, list(SHAPES), SHAPES, cache, PATCH, slices=4, seed=1, augment=False)[11]
    assert torch.equal(a["position"], plain["position"]) and torch.equal(a["plane"], plain["plane"])


def test_a_cache_made_from_other_volumes_is_refused(tmp_path):
    cache = _world(tmp_path)
    with pytest.raises(StaleCacheError, match="shape"):
        PretrainDataset(tmp_path, ["a"], {"a": (41, 36, 30)}, cache, PATCH)
    with pytest.raises(ValueError, match="no slices of case 'c'"):
        PretrainDataset(tmp_path, ["a", "c"], {**SHAPES, "c": (30, 30, 30)}, cache, PATCH)


def test_split_is_seeded_and_disjoint():
    cases = [f"c{i}" for i in range(10)]
    train, held = split_cases(cases, 3, seed=0)
    assert len(held) == 3 and not set(train) & set(held) and sorted(train + held) == cases
    assert split_cases(cases, 3, seed=0) == (train, held)
    assert split_cases(cases[:3], 3, seed=0) == (cases[:3], [])


def test_split_of_crops_as_cases_holds_out_whole_volumes():
    """With crops as cases (``CASE@m``) the held-out cases are every crop of ``eval_cases`` volumes: no volume has
    crops on both sides of the split."""
    from med3dinsight_plugin.crops import CropSource

    cases = [f"c{i}@{m}" for i in range(10) for m in range(4)]
    subject = CropSource.volume_of
    train, held = split_cases(cases, 3, seed=0, subject=subject)
    assert len(held) == 12 and {subject(c) for c in held}.isdisjoint({subject(c) for c in train})
    assert sorted(train + held) == sorted(cases)
    assert {subject(c) for c in held} == set(split_cases([f"c{i}" for i in range(10)], 3, seed=0)[1])


@pytest.mark.parametrize("name", ["plain_conv_unet", "unetr"])
def test_step_zero_check_rebuilds_the_downstream_network_and_loads_the_whole_encoder(name):
    from helpers import tiny_backbone, tiny_psat_kwargs
    from med3dinsight_plugin import Med3DInsightModel, PlaneSliceAwareTransformer
    from med3dinsight_plugin.pretrain import check_downstream_load

    backbone = tiny_backbone(name)
    model = Med3DInsightModel(backbone, PlaneSliceAwareTransformer(**tiny_psat_kwargs(backbone.token_dim)))
    report = check_downstream_load(model, {"teacher": {"model": "x"}})
    assert report.applied and report.loaded == report.expected > 0 and not report.missing


def test_volume_view_maps_slices_into_the_resampled_body_box(tmp_path):
    """``data.view: volume``: the sample is the body box resampled to the patch (nnU-Net's resampling), and every
    slice handed to PSAT is, in the resampled box, the cached volume slice -- to within half a resampled voxel, the
    most a resampling can keep of a slice position. Slices outside the box are never picked."""
    from med3dinsight_plugin.pretrain.data import resample_box

    cache = _world(tmp_path, per_plane=12)
    boxes = {"a": [[4, 36], [2, 30], [5, 25]], "b": [[0, 20], [10, 50], [3, 24]]}
    (tmp_path / "vol").mkdir()
    for case, shape in SHAPES.items():
        np.save(tmp_path / "vol" / f"{case}.npy", resample_box(_coded_volume(shape), boxes[case], (1, 1, 1), PATCH))
    ds = PretrainDataset(tmp_path / "vol", list(SHAPES), SHAPES, cache, PATCH, slices=8, seed=3, augment=False,
                         boxes=boxes)
    for i in range(30):
        s = ds[i]
        vol = s["volume"].numpy()
        assert vol.shape == (3, *PATCH) and s["mask"].all()
        for k in range(len(s["plane"])):
            p, pos = int(s["plane"][k]), float(s["position"][k])
            emb = s["image_emb"][k].numpy()
            index = round(emb[3] / emb[:3].max() * 100)
            j = slice_index(pos, PATCH[p])
            coord = float(np.take(vol[p], j, axis=p).mean())  # the original coordinate the resampled slice shows
            fits = [c for c, b in boxes.items() if b[p][0] <= index < b[p][1] and
                    abs(coord - index) <= 0.5 * (b[p][1] - b[p][0]) / PATCH[p] + 0.05]
            assert fits, (i, p, index, coord)
    with pytest.raises(ValueError, match="less than half the patch"):  # the crop view refuses "b"; volume does not
        PretrainDataset(tmp_path, ["b"], SHAPES, cache, (48, 48, 48))
    PretrainDataset(tmp_path / "vol", ["b"], SHAPES, cache, (48, 48, 48), boxes=boxes)


def test_crop_view_maps_slices_onto_a_volume_resampled_to_the_target_spacing(tmp_path):
    """``data.view: crop`` at a target spacing: each volume is resampled once (nnU-Net's resampling) and the crops
    are taken from it; every slice handed to PSAT is the cached volume slice to within half a resampled voxel, and
    the anchor slice's crop always holds it."""
    from med3dinsight_plugin.pretrain.data import _resample, resampled_shape

    cache = _world(tmp_path, per_plane=12)
    spacing, target = (1.0, 1.0, 1.0), (1.6, 0.8, 1.25)  # coarser, finer and coarser along the three axes
    (tmp_path / "res").mkdir()
    grids = {}
    for case, shape in SHAPES.items():
        grids[case] = resampled_shape(shape, spacing, target)
        np.save(tmp_path / "res" / f"{case}.npy", _resample(_coded_volume(shape), spacing, grids[case]))
    assert grids["a"] == [25, 45, 24]
    ds = PretrainDataset(tmp_path / "res", list(SHAPES), SHAPES, cache, PATCH, slices=8, seed=3, augment=False)
    seen = 0
    for i in range(40):
        s = ds[i]
        vol = s["volume"].numpy()
        for k in np.flatnonzero(s["mask"].numpy()):
            p, pos = int(s["plane"][k]), float(s["position"][k])
            assert 0.0 < pos < 1.0
            emb = s["image_emb"][k].numpy()
            index = round(emb[3] / emb[:3].max() * 100)
            j = slice_index(pos, PATCH[p])
            coord = float(np.take(vol[p], j, axis=p).max())  # padding is the minimum: the max is the real coordinate
            half_voxel = 0.5 * target[p] / spacing[p]
            assert abs(coord - index) <= half_voxel + 0.05, (i, p, index, coord)
            seen += 1
    assert seen > 100
