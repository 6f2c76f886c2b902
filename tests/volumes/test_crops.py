"""Fixed crops as cases (``--crops`` / ``data.crops``): a crop case is exactly its box of the volume, for the encoder
and for the teacher's renders, the boxes are reproducible, and the cache and pretraining must agree on them."""
import json

import numpy as np
import pytest

from helpers import FAST_PRETRAIN, ct_like, write_nifti
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.crops import CropSource, crop_boxes, split_crop_case
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.pretrain.data import body_box
from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, volume_slices
from med3dinsight_plugin.teacher.cache import TeacherCache
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import open_source


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    (root / "vols").mkdir()
    for i in range(3):
        # 2 x 1 x 1 mm voxels along RAS x, y, z: canonical (superior, posterior, left) spacing (1, 1, 2)
        write_nifti(root / "vols" / f"case{i}.nii.gz", ct_like(seed=i), np.diag([2.0, 1.0, 1.0, 1.0]))
    save_tiny_open_clip(root / "clip")
    return root


def test_a_crop_case_is_its_box_of_the_volume(world):
    source = open_source(world / "vols", modality="ct")
    crops = CropSource(source, per_volume=3, size_mm=(12, 20, 16), seed=5)
    assert crops.cases[:4] == ["case0@0", "case0@1", "case0@2", "case1@0"] and len(crops) == 9
    assert crops.describe()["crops"] == {"per_volume": 3, "size_mm": [12.0, 20.0, 16.0], "seed": 5}
    assert crops.describe()["kind"] == "nifti" and crops.spacing("case1@2") == source.spacing("case1")
    whole = source.read("case1")
    body = body_box(whole)
    boxes = crop_boxes("case1", whole.shape, whole.spacing, body, 3, (12, 20, 16), seed=5)
    assert boxes == crop_boxes("case1", whole.shape, whole.spacing, body, 3, (12, 20, 16), seed=5)  # reproducible
    assert boxes != crop_boxes("case2", whole.shape, whole.spacing, body, 3, (12, 20, 16), seed=5)
    for m, box in enumerate(boxes):
        assert [b - a for a, b in box] == [12, 20, 8]  # mm / spacing
        assert all(0 <= a < b <= n for (a, b), n in zip(box, whole.shape))
        cut = (slice(None),) + tuple(slice(a, b) for a, b in box)
        crop = crops.read(f"case1@{m}")
        assert crop.case == f"case1@{m}" and crop.spacing == whole.spacing
        np.testing.assert_array_equal(crop.array, whole.array[cut])
        # the teacher renders the crop: its slices are the crop's, positions relative to the crop
        slices = list(volume_slices(crop, SlicePolicy(per_plane=2, min_foreground=0.0), RenderSettings(size=32)))
        assert {s.case for s in slices} == {f"case1@{m}"} and len(slices) == 6
        assert all(0 < s.position < 1 for s in slices)
    assert crops.read("case1@0").fingerprint() != whole.fingerprint()
    assert split_crop_case("a@b@12") == ("a@b", 12)


def test_bad_crop_settings_are_one_line_errors(world):
    source = open_source(world / "vols", modality="ct")
    with pytest.raises(Med3DInsightError, match="crops per volume must be a positive integer"):
        CropSource(source, 0, (10, 10, 10))
    with pytest.raises(Med3DInsightError, match="three positive lengths in mm"):
        CropSource(source, 2, (10, -1, 10))
    with pytest.raises(Med3DInsightError, match="is not one of the 2 crops per volume"):
        CropSource(source, 2, (10, 10, 10)).read("case0@2")


def test_embed_and_pretrain_on_crops_and_a_mismatch_is_refused(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["embed", str(world / "vols"), "-o", str(cache), "--clip-model", str(world / "clip"), "--per-plane",
                 "3", "--modality", "ct", "--crops", "2", "--crop-mm", "16", "16", "16"]) == 0
    assert TeacherCache(cache).cases == [f"case{i}@{m}" for i in range(3) for m in range(2)]
    fast = [*FAST_PRETRAIN, "data.modality=ct"]
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(world / "vols"), "--cache", str(cache), "-o", str(out), "--set", *fast,
                 "data.view=volume", "data.crops=2", "data.crop_mm=[16,16,16]"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((out / "prepared" / "prepared.json").read_text())
    assert sorted(index["cases"]) == [f"case{i}@{m}" for i in range(3) for m in range(2)]
    # the cache's crops must be the pretraining's: whole volumes, or other crops, are refused in one line
    for other in ([], ["data.crops=2", "data.crop_mm=[16,16,12]"]):
        capsys.readouterr()
        code = main(["pretrain", "--data", str(world / "vols"), "--cache", str(cache), "-o", str(tmp_path / "x"),
                     "--set", *fast, "data.view=volume", *other])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "source.crops" in err[-1] and "rerun med3dinsight embed" in err[-1], err
    code = main(["embed", str(world / "vols"), "-o", str(tmp_path / "c2"), "--crops", "2"])
    assert code == 2 and "--crops needs --crop-mm" in capsys.readouterr().err


def test_crop_cases_are_captioned_from_their_box_of_the_labels(world, tmp_path):
    """``caption --from-labels --crops``: a crop case's captions describe the structures inside its box only."""
    from med3dinsight_plugin.teacher.captions import CaptionFile
    from med3dinsight_plugin.teacher.label_captions import caption_from_labels

    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        lab = np.zeros((32, 32, 32), np.uint8)  # file axes x, y, z; canonical (superior, posterior, left) = (z, y, x)
        lab[:, :, :16] = 1  # inferior half (z < 16): class 1
        lab[:, :, 16:] = 2  # superior half: class 2
        write_nifti(labels / f"case{i}.nii.gz", lab, np.diag([2.0, 1.0, 1.0, 1.0]))
    crops = CropSource(open_source(world / "vols", modality="ct"), 3, (8, 8, 8), seed=1)
    out = tmp_path / "captions.jsonl"
    r = caption_from_labels(crops, labels, out, SlicePolicy(per_plane=2, min_foreground=0.0),
                            class_names={1: "lower", 2: "upper"}, progress=False)
    assert r.written == 3 * 3 * 6
    records = CaptionFile.read(out)
    for case in crops.cases:
        base, m = split_crop_case(case)
        _, boxes = crops.boxes(base)
        (lo, hi) = boxes[m][0]  # superior extent of the box
        texts = " ".join(rec["text"] for rec in records.values() if rec["case"] == case)
        assert ("lower" in texts) == (lo < 16) and ("upper" in texts) == (hi > 16), (case, boxes[m], texts[:200])
