"""Captions written from label masks (``med3dinsight caption --from-labels``), on TotalSegmentator's real abdominal CT
and its labels: the texts against expectations computed independently from the label array, orientation
independence, the nnU-Net raw layout through the real command line and into ``embed``, resume, and bad input."""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from helpers import REPO_ROOT, run_tool
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.slices import SlicePolicy
from med3dinsight_plugin.teacher.cache import TeacherCache
from med3dinsight_plugin.teacher.captions import CaptionError, CaptionFile
from med3dinsight_plugin.teacher.label_captions import (
    LabelCaptionError,
    caption_from_labels,
    describe_slice,
    humanize_name,
    load_class_names,
    slice_structures,
)
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import open_source

DATA = REPO_ROOT / "benchmarks" / "data" / "totalsegmentator"
CT, SEG, NAMES = DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz", DATA / "example_seg.labels.json"
POLICY = SlicePolicy(per_plane=8)


def _reoriented(path: Path, codes=("L", "P", "S")):
    img = nib.load(str(path))
    out = img.as_reoriented(ornt_transform(axcodes2ornt(nib.aff2axcodes(img.affine)), axcodes2ornt(codes)))
    assert nib.aff2axcodes(out.affine) == codes
    return out


def _dataset(root: Path, image, labels) -> Path:
    """``root/img/ct.nii.gz`` and ``root/lab/ct.nii.gz``; image/labels are paths to copy or nibabel images."""
    for folder, item in (("img", image), ("lab", labels)):
        (root / folder).mkdir(parents=True)
        if isinstance(item, Path):
            shutil.copy(item, root / folder / "ct.nii.gz")
        else:
            nib.save(item, str(root / folder / "ct.nii.gz"))
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Captions of the real CT stored as in the repository (RAS) and as an LPS copy."""
    root = tmp_path_factory.mktemp("label_captions")
    out = {}
    for name, image, labels in (("ras", CT, SEG), ("lps", _reoriented(CT), _reoriented(SEG))):
        folder = _dataset(root / name, image, labels)
        result = caption_from_labels(open_source(folder / "img"), folder / "lab", folder / "captions.jsonl", POLICY,
                                     class_names=NAMES, progress=False)
        assert result.written == 24 and result.skipped == 0
        out[name] = list(CaptionFile.read(folder / "captions.jsonl").values())
        out[f"{name}_sha256"] = hashlib.sha256((folder / "captions.jsonl").read_bytes()).hexdigest()
    assert not np.array_equal(np.asarray(nib.load(str(CT)).dataobj),
                              np.asarray(_reoriented(CT).dataobj))  # really stored otherwise
    return out


def _truth():
    """The label array as the RAS file stores it (axis 0 toward the patient's right, 1 anterior, 2 superior), the
    class names and the spinal cord's mean x index: the patient's midline, from the labels alone."""
    seg_img = nib.load(str(SEG))
    assert nib.aff2axcodes(seg_img.affine) == ("R", "A", "S")
    seg = np.asarray(seg_img.dataobj).astype(np.int64)
    names = {int(k): v for k, v in json.loads(NAMES.read_text()).items()}
    value = {v: k for k, v in names.items()}
    midline_x = np.nonzero(seg == value["spinal_cord"])[0].mean()
    return seg, seg_img.header.get_zooms()[:3], names, value, midline_x


def _qualities(text: str, name: str):
    """The parenthesised qualities of ``name`` in a caption (None if it is not named)."""
    m = re.search(rf"(?:: |, | and ){re.escape(name)} \(([^)]*)\)", text)
    return m.group(1).split(", ") if m else None


def test_axial_captions_name_liver_and_spleen_with_their_size_and_side(real):
    seg, zooms, names, value, midline_x = _truth()
    pixel_cm2 = zooms[0] * zooms[1] / 100
    axial = [r for r in real["ras"] if r["plane"] == "axial"]
    assert len(axial) == 8
    sides_checked = {"liver": 0, "spleen": 0}
    for rec in axial:
        z = rec["index"]  # canonical axis 0 (superior) is the RAS file's third axis, unflipped
        assert rec["position"] == pytest.approx((z + 0.5) / seg.shape[2])
        assert rec["text"].startswith(f"Axial CT slice through the upper abdomen at {round(100 * rec['position'])} "
                                      f"% of the scan height: ")
        cut = seg[:, :, z]
        values, counts = np.unique(cut[cut > 0], return_counts=True)
        assert rec["structures"] == [names[int(v)] for _, v in sorted(zip(-counts, values))]
        assert rec["text"].endswith(f" and {len(values) - 6} smaller structures.")
        for organ, side in (("liver", "right"), ("spleen", "left")):
            mask = cut == value[organ]
            if not mask.any() or sorted(-counts).index(-mask.sum()) >= 6:
                continue  # not among the six largest: counted, not named
            q = _qualities(rec["text"], organ)
            assert q is not None, rec["text"]
            assert f"{mask.sum() * pixel_cm2:.0f} cm2" in q
            offset_mm = (np.nonzero(mask)[0].mean() - midline_x) * zooms[0]  # + toward the patient's right
            if abs(offset_mm) > 30:
                assert q[-1] == ("right" if offset_mm > 0 else "left"), (rec["text"], offset_mm)
                assert q[-1] == side
                sides_checked[organ] += 1
    assert sides_checked["liver"] == 8 and sides_checked["spleen"] >= 5  # the liver is in every axial slice


def test_coronal_and_sagittal_slices_are_located_from_the_body(real):
    seg, zooms, names, value, midline_x = _truth()
    ct = np.asarray(nib.load(str(CT)).dataobj)
    centre_y = np.nonzero(ct > -500)[1].mean()  # body's centre along the RAS file's anterior axis
    seen = set()
    for rec in real["ras"]:
        if rec["plane"] == "sagittal":  # canonical axis 2 (patient's left) runs against the file's x (right)
            offset = (seg.shape[0] - 1 - rec["index"] - midline_x) * zooms[0]  # + right
            words = ("right", "left")
            m = re.match(r"Sagittal CT slice (\d+) mm (left|right) of the midline: ", rec["text"])
        elif rec["plane"] == "coronal":  # canonical axis 1 (posterior) runs against the file's y (anterior)
            offset = (seg.shape[1] - 1 - rec["index"] - centre_y) * zooms[1]  # + anterior
            words = ("anterior", "posterior")
            m = re.match(r"Coronal CT slice (\d+) mm (anterior|posterior) to the body's centre: ", rec["text"])
        else:
            continue
        assert m, rec["text"]
        if abs(offset) > 10:
            assert m.group(2) == words[0 if offset > 0 else 1] and abs(int(m.group(1)) - abs(offset)) < 5
            seen.add((rec["plane"], m.group(2)))
        if rec["plane"] == "sagittal" and abs(offset) > 60:  # far right: no spleen; far left: no liver
            assert ("spleen" if offset > 0 else "liver") not in rec["text"], rec["text"]
    assert seen == {("sagittal", "left"), ("sagittal", "right"), ("coronal", "anterior"), ("coronal", "posterior")}
    empty = [r["text"] for r in real["ras"] if r["text"].endswith("no labelled structure.")]
    assert all(t.startswith("Coronal CT slice") for t in empty)  # the body wall in front of the organs


def test_an_lps_stored_copy_gives_identical_captions(real):
    assert real["lps"] == real["ras"]


# The caption file of the real CT (RAS, POLICY, NAMES) as written before --no-plane / --no-position existed: the
# default wording must stay the same, byte for byte.
DEFAULT_SHA256 = "19b6704688120de799c4a4b93d775bfac679745dfcdd8e1e23ca61b1ae7463b3"


def test_the_default_wording_is_unchanged_byte_for_byte(real):
    assert real["ras_sha256"] == DEFAULT_SHA256


_LOCATION = re.compile(r" at \d+ % of the scan height| \d+ mm (anterior|posterior) to the body's centre| through the "
                       r"body's centre| \d+ mm (left|right) of the midline| through the midline")
_SIDE = re.compile(r", (left|right|midline)\)")
_PLANES = re.compile(r"axial|coronal|sagittal", re.IGNORECASE)


@pytest.fixture(scope="module")
def real_without(real, tmp_path_factory):
    """Captions of the real CT with each of --no-position, --no-plane and both, keyed like the default's."""
    folder = _dataset(tmp_path_factory.mktemp("without"), CT, SEG)
    out = {}
    for name, kwargs in (("position", {"with_position": False}), ("plane", {"with_plane": False}),
                         ("both", {"with_plane": False, "with_position": False})):
        path = folder / f"{name}.jsonl"
        caption_from_labels(open_source(folder / "img"), folder / "lab", path, POLICY, class_names=NAMES,
                            progress=False, **kwargs)
        out[name] = list(CaptionFile.read(path).values())
        assert [(r["case"], r["plane"], r["index"]) for r in out[name]] == \
            [(r["case"], r["plane"], r["index"]) for r in real["ras"]]
        meta = json.loads(Path(f"{path}.meta.json").read_text())
        assert meta["without"] == [k for k in ("plane", "position") if kwargs.get(f"with_{k}") is False]
    return out


def test_without_position_or_plane_the_caption_says_only_what_the_slice_cuts(real, real_without):
    for default, position, plane, both in zip(real["ras"], real_without["position"], real_without["plane"],
                                              real_without["both"]):
        text = default["text"]
        # --no-position: the default text less its location (the axial region, from the structures, stays)
        assert position["text"] == _LOCATION.sub("", text)
        assert "%" not in position["text"] and " mm " not in position["text"]
        # both: modality and structures only; no plane, no position, no region, no sides
        listing = text.split(": ", 1)[1]
        assert both["text"] == "CT slice: " + _SIDE.sub(")", listing)
        assert not re.search(r"%| mm |scan|midline|centre|through|abdomen", both["text"]), both["text"]
        assert not _PLANES.search(both["text"]) and not _PLANES.search(plane["text"])
        # --no-plane alone: one plane-free way of locating every slice
        assert plane["text"] == f"CT slice at {round(100 * default['position'])} % along its axis: " + \
            _SIDE.sub(")", listing)
    assert sum(bool(_SIDE.search(r["text"])) for r in real["ras"]) > 10  # sides were there to leave out


def _cube_dataset(root: Path) -> Path:
    """A CT whose body is a cube of soft tissue, labelled 1 throughout: every selected slice of every plane cuts the
    same 30 x 30 mm square of label 1, at another plane and position."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-stored 1 mm voxels
    image = np.full((40, 40, 40), -1000, np.int16)
    labels = np.zeros((40, 40, 40), np.uint8)
    image[5:35, 5:35, 5:35] = 40
    labels[5:35, 5:35, 5:35] = 1
    return _dataset(root, nib.Nifti1Image(image, affine), nib.Nifti1Image(labels, affine))


def test_slices_cutting_the_same_structures_get_one_caption_whatever_their_plane_and_position(tmp_path, capsys):
    folder = _cube_dataset(tmp_path)
    names = tmp_path / "names.json"
    names.write_text('{"1": "liver"}')
    texts = {}
    for name, flags in (("default", []), ("position", ["--no-position"]), ("both", ["--no-plane", "--no-position"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["caption", str(folder / "img"), "--from-labels", str(folder / "lab"), "-o", str(out),
                     "--class-names", str(names), "--modality", "ct", "--per-plane", "3", *flags]) == 0
        assert capsys.readouterr().out.strip() == f"{out}: 9 captions written, 0 already there"
        texts[name] = {(r["plane"], r["position"]): r["text"] for r in CaptionFile.read(out).values()}
    assert len(set(texts["default"].values())) == 9  # the default says where each slice is
    assert set(texts["both"].values()) == {"CT slice: liver (9 cm2)."}
    assert set(texts["position"].values()) == {"Axial CT slice through the upper abdomen: liver (9 cm2, midline).",
                                               "Coronal CT slice: liver (9 cm2, midline).",
                                               "Sagittal CT slice: liver (9 cm2)."}


def test_resume_with_another_wording_is_refused(tmp_path, capsys):
    folder = _cube_dataset(tmp_path)
    source, out = open_source(folder / "img", modality="ct"), tmp_path / "c.jsonl"
    policy = SlicePolicy(per_plane=2)
    assert caption_from_labels(source, folder / "lab", out, policy, progress=False, with_plane=False,
                               with_position=False).written == 6
    assert caption_from_labels(source, folder / "lab", out, policy, progress=False, with_plane=False,
                               with_position=False).skipped == 6
    before = out.read_bytes()
    for kwargs in ({}, {"with_plane": False}, {"with_position": False}):
        with pytest.raises(CaptionError, match=r"c\.jsonl was written with other settings \(without "):
            caption_from_labels(source, folder / "lab", out, policy, progress=False, **kwargs)
    assert out.read_bytes() == before
    default = tmp_path / "d.jsonl"
    caption_from_labels(source, folder / "lab", default, policy, progress=False)
    assert "without" not in json.loads(Path(f"{default}.meta.json").read_text())  # old files resume as before
    code = main(["caption", str(folder / "img"), "--vlm", "some/model", "--no-plane", "-o", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "med3dinsight caption: error: --no-plane goes with --from-labels; with --vlm, leave the plane and position "
        "out of the prompts (--prompts)"]


def test_wording_of_one_slice():
    structures = [{"name": "liver", "area_cm2": 96.2, "side": "right"},
                  {"name": "stomach", "area_cm2": 31.4, "side": "left"},
                  {"name": "spleen", "area_cm2": 12.0, "side": "left"},
                  {"name": "kidney_right", "area_cm2": 8.1, "side": "right"},
                  {"name": "aorta", "area_cm2": 3.0, "side": "midline"},
                  {"name": "adrenal_gland_left", "area_cm2": 0.4, "side": "left"}]
    assert describe_slice("axial", "ct", structures, 0.62, max_structures=4) == (
        "Axial CT slice through the upper abdomen at 62 % of the scan height: liver (large, 96 cm2, right), stomach "
        "(31 cm2, left), spleen (12 cm2, left), right kidney (8 cm2) and 2 smaller structures.")
    assert describe_slice(0, "ct", [], 0.1) == "Axial CT slice at 10 % of the scan height: no labelled structure."
    assert describe_slice("sagittal", "mri", structures[4:], 0.3, offset_mm=-41.6) == (
        "Sagittal MRI slice 42 mm right of the midline: aorta (3 cm2, midline) and left adrenal gland (small, "
        "0.4 cm2).")
    assert describe_slice("coronal", "ct", structures[:1], 0.5, offset_mm=0.3).startswith(
        "Coronal CT slice through the body's centre: liver (")
    assert describe_slice("coronal", "ct", [{"name": "label 7", "area_cm2": 2, "side": None}], 0.5, 12) == \
        "Coronal CT slice 12 mm posterior to the body's centre: label 7 (2 cm2)."
    assert [humanize_name(n) for n in ("kidney_right", "rib_left_7", "vertebrae_L1", "costal_cartilages",
                                       "Left lung", "urinary_bladder")] == \
        ["right kidney", "left rib 7", "L1 vertebra", "costal cartilages", "left lung", "urinary bladder"]


def test_structures_of_a_slice_area_and_side():
    labels = np.zeros((10, 40), np.uint8)
    labels[2:4, 0:5] = 3  # columns 0-4: far toward the patient's right (columns run toward the left)
    labels[5:9, 18:22] = 1  # on the midline (column 20)
    labels[0:1, 35:40] = 2  # left
    found = slice_structures(labels, (2.0, 2.0), {1: "aorta", 3: "liver"}, midline=19.5)
    assert [(s["name"], s["side"]) for s in found] == [("aorta", "midline"), ("liver", "right"), ("label 2", "left")]
    assert [s["area_cm2"] for s in found] == pytest.approx([16 * 0.04, 10 * 0.04, 5 * 0.04])
    assert all(s["side"] is None for s in slice_structures(labels, (1, 1)))


def test_class_name_layouts(tmp_path):
    assert load_class_names(NAMES)[5] == "liver" and load_class_names(NAMES)[1] == "spleen"
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {
        "background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3, "liver": 4}}))
    assert load_class_names(ds) == {1: "whole tumour", 2: "tumour core", 3: "enhancing", 4: "liver"}
    assert load_class_names({"liver": 1, "background": 0}) == {1: "liver"}
    assert load_class_names({"labels": {"0": "background", "1": "liver"}}) == {1: "liver"}  # nnU-Net v1
    for content, message in (("{nope", "cannot read"), ("[1, 2]", "JSON list"),
                             ('{"liver": 1, "hepar": 1}', "named twice"), ('{"liver": 1.5}', "label number"),
                             ('{"labels": {"background": 0}}', "names no label"), ('{"1": ""}', "non-empty")):
        ds.write_text(content)
        with pytest.raises(LabelCaptionError, match=message) as e:
            load_class_names(ds)
        assert str(ds) in str(e.value)


@pytest.mark.slow
def test_nnunet_raw_layout_through_the_cli_then_embed(tmp_path):
    raw = tmp_path / "Dataset777_Abdomen"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    shutil.copy(CT, raw / "imagesTr" / "ras_0000.nii.gz")
    shutil.copy(SEG, raw / "labelsTr" / "ras.nii.gz")
    nib.save(_reoriented(CT), str(raw / "imagesTr" / "lps_0000.nii.gz"))
    nib.save(_reoriented(SEG), str(raw / "labelsTr" / "lps.nii.gz"))
    labels = {"background": 0, **{name: int(v) for v, name in json.loads(NAMES.read_text()).items()}}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2,
                                                  "file_ending": ".nii.gz"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    captions = tmp_path / "captions.jsonl"
    r = run_tool(["med3dinsight", "caption", raw, "--from-labels", raw / "labelsTr", "-o", captions,
                  "--per-plane", "3"], env)
    assert r.stdout.strip() == f"{captions}: 18 captions written, 0 already there"
    records = list(CaptionFile.read(captions).values())
    assert [r["case"] for r in records] == ["lps"] * 9 + ["ras"] * 9
    assert [r["text"] for r in records[:9]] == [r["text"] for r in records[9:]]
    assert all("liver (" in r["text"] for r in records if r["plane"] == "axial")  # names from dataset.json
    meta = json.loads(Path(f"{captions}.meta.json").read_text())
    assert meta["model"] == "labels" and meta["class_names"]["5"] == "liver" and meta["slices"]["per_plane"] == 3
    clip = save_tiny_open_clip(tmp_path / "clip")
    run_tool(["med3dinsight", "embed", raw, "--captions", captions, "--clip-model", clip, "--per-plane", "3",
              "-o", tmp_path / "cache"], env)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.has_text and cache.cases == ["lps", "ras"] and len(cache.entries("ras").plane) == 9


def test_resume_skips_written_captions_and_other_settings_are_refused(tmp_path):
    folder = _dataset(tmp_path, CT, SEG)
    source, out = open_source(folder / "img"), tmp_path / "captions.jsonl"
    policy = SlicePolicy(per_plane=4)
    assert caption_from_labels(source, folder / "lab", out, policy, class_names=NAMES, progress=False).written == 12
    full = out.read_bytes()
    out.write_bytes(b"".join(full.splitlines(keepends=True)[:-3]) + b'{"case": "ct", "pla')  # + a torn line
    again = caption_from_labels(source, folder / "lab", out, policy, class_names=NAMES, progress=False)
    assert (again.written, again.skipped) == (3, 9) and out.read_bytes() == full
    assert caption_from_labels(source, folder / "lab", out, policy, class_names=NAMES,
                               progress=False).written == 0
    for other in ({"class_names": {"5": "hepar"}}, {"class_names": NAMES, "max_structures": 3}):
        with pytest.raises(CaptionError, match="other settings"):
            caption_from_labels(source, folder / "lab", out, policy, progress=False, **other)
    assert out.read_bytes() == full


def _two_cubes(root: Path):
    """Cases a and b: the cube CT of _cube_dataset, labelled 1 (liver) throughout the cube; returns (image folder,
    label folder, class-name file, the label array, its affine)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    image = np.full((40, 40, 40), -1000, np.int16)
    labels = np.zeros((40, 40, 40), np.uint8)
    image[5:35, 5:35, 5:35] = 40
    labels[5:35, 5:35, 5:35] = 1
    for folder in ("img", "lab"):
        (root / folder).mkdir()
    for case in ("a", "b"):
        nib.save(nib.Nifti1Image(image, affine), str(root / "img" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(root / "lab" / f"{case}.nii.gz"))
    (root / "names.json").write_text('{"1": "liver", "2": "spleen"}')
    return root / "img", root / "lab", root / "names.json", labels, affine


def test_label_files_changed_in_place_are_captioned_again(tmp_path, capsys):
    img, lab, names, labels, affine = _two_cubes(tmp_path)
    out, fresh = tmp_path / "c.jsonl", tmp_path / "fresh.jsonl"

    def caption(output=out):
        code = main(["caption", str(img), "--from-labels", str(lab), "-o", str(output), "--class-names", str(names),
                     "--modality", "ct", "--per-plane", "3"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out.strip()

    assert caption() == f"{out}: 18 captions written, 0 already there"
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["label_sha256"] == {c: hashlib.sha256((lab / f"{c}.nii.gz").read_bytes()).hexdigest() for c in "ab"}
    edited = labels.copy()
    edited[5:35, 5:35, 5:20] = 2  # case a's labels corrected in place: half of the cube is the spleen
    nib.save(nib.Nifti1Image(edited, affine), str(lab / "a.nii.gz"))
    assert caption() == f"{out}: 9 captions written, 9 already there (9 old captions replaced: the label file of a " \
                        f"changed)"
    # what a fresh run on the corrected labels writes (a's captions now come last in the file)
    assert caption(fresh) == f"{fresh}: 18 captions written, 0 already there"
    assert CaptionFile.read(out) == CaptionFile.read(fresh)
    assert Path(f"{out}.meta.json").read_text() == Path(f"{fresh}.meta.json").read_text()
    assert {r["case"] for r in CaptionFile.read(out).values() if "spleen" in r["text"]} == {"a"}
    assert caption() == f"{out}: 0 captions written, 18 already there"
    os.utime(lab / "b.nii.gz", (1e9, 1e9))  # touched, same bytes: not a change
    shutil.copy(lab / "a.nii.gz", tmp_path / "copy.nii.gz")
    shutil.copy(tmp_path / "copy.nii.gz", lab / "a.nii.gz")
    assert caption() == f"{out}: 0 captions written, 18 already there"
    nib.save(nib.Nifti1Image(labels, affine), str(lab / "a.nii.gz"))  # both changed back and forth
    nib.save(nib.Nifti1Image(edited, affine), str(lab / "b.nii.gz"))
    assert caption() == f"{out}: 18 captions written, 0 already there (18 old captions replaced: the label files " \
                        f"of a, b changed)"


def test_a_caption_file_from_before_label_digests_is_kept_with_a_warning(tmp_path):
    img, lab, names, labels, affine = _two_cubes(tmp_path)
    source, out = open_source(img, modality="ct"), tmp_path / "c.jsonl"
    meta_path = Path(f"{out}.meta.json")
    policy = SlicePolicy(per_plane=2)
    assert caption_from_labels(source, lab, out, policy, class_names=names, progress=False).written == 12
    before, meta = out.read_bytes(), json.loads(meta_path.read_text())
    digests = meta.pop("label_sha256")
    meta_path.write_text(json.dumps(meta))  # as written before the digests were recorded
    with pytest.warns(UserWarning, match=r"c\.jsonl was captioned before the label files' digests were recorded"):
        result = caption_from_labels(source, lab, out, policy, class_names=names, progress=False)
    assert (result.written, result.skipped, result.relabelled) == (0, 12, ())
    assert out.read_bytes() == before and json.loads(meta_path.read_text())["label_sha256"] == digests
    nib.save(nib.Nifti1Image(labels * 2, affine), str(lab / "b.nii.gz"))  # from now on a change is seen
    result = caption_from_labels(source, lab, out, policy, class_names=names, progress=False)
    assert (result.written, result.skipped, result.relabelled, result.replaced) == (6, 6, ("b",), 6)
    meta_path.write_text(json.dumps({**meta, "label_sha256": ["x"]}))
    with pytest.raises(CaptionError, match=r"c\.jsonl\.meta\.json: 'label_sha256' must map each case"):
        caption_from_labels(source, lab, out, policy, class_names=names, progress=False)


def test_label_file_digest_covers_the_data_file_of_a_detached_header(tmp_path):
    import SimpleITK as sitk

    from med3dinsight_plugin.teacher.label_captions import label_file_digest

    img = sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    sitk.WriteImage(img, str(tmp_path / "x.mhd"), False)  # header x.mhd + data x.raw
    sitk.WriteImage(img, str(tmp_path / "y.nii"))
    raw = tmp_path / "x.raw"
    assert raw.is_file()
    first = label_file_digest(tmp_path / "x.mhd")
    assert label_file_digest(tmp_path / "y.nii") == hashlib.sha256((tmp_path / "y.nii").read_bytes()).hexdigest()
    raw.write_bytes(raw.read_bytes()[:-1] + b"\x07")  # the header unchanged, one voxel changed
    assert label_file_digest(tmp_path / "x.mhd") != first
    raw.unlink()
    with pytest.raises(LabelCaptionError, match=r"x\.mhd names the data file x\.raw, which does not exist"):
        label_file_digest(tmp_path / "x.mhd")


def test_an_empty_segmentation_gives_no_labelled_structure(tmp_path):
    seg = nib.load(str(SEG))
    folder = _dataset(tmp_path, CT, nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine))
    caption_from_labels(open_source(folder / "img"), folder / "lab", tmp_path / "c.jsonl", SlicePolicy(per_plane=2),
                        progress=False)
    texts = [r["text"] for r in CaptionFile.read(tmp_path / "c.jsonl").values()]
    assert len(texts) == 6 and all(t.endswith(": no labelled structure.") for t in texts)


def _bad_labels(kind: str):
    seg = nib.load(str(SEG))
    data = np.asarray(seg.dataobj)
    if kind == "shape":
        return nib.Nifti1Image(data[:, :, :-1], seg.affine)
    if kind == "spacing":
        affine = seg.affine.copy()
        affine[0, 0] = 3.1
        return nib.Nifti1Image(data, affine)
    if kind == "fraction":
        return nib.Nifti1Image(data.astype(np.float32) * 0.5, seg.affine)
    return nib.Nifti1Image(data.astype(np.int16) - 1, seg.affine)  # negative


@pytest.mark.parametrize("kind, message", [
    ("missing", "no label file for case ct in {lab}"), ("shape", "{lab}/ct.nii.gz has shape"),
    ("spacing", "{lab}/ct.nii.gz has voxel spacing"), ("fraction", "{lab}/ct.nii.gz holds non-integer values"),
    ("negative", "{lab}/ct.nii.gz has negative values"), ("class_names", "class-name file {root}/names.json"),
    ("neither", "one of the arguments --vlm --from-labels is required"),
    ("both", "argument --vlm: not allowed with argument --from-labels")])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, kind, message):
    root = tmp_path
    folder = _dataset(root, CT, _bad_labels(kind) if kind in ("shape", "spacing", "fraction", "negative") else SEG)
    out = root / "out" / "captions.jsonl"
    args = ["caption", str(folder / "img"), "-o", str(out), "--modality", "ct", "--per-plane", "2"]
    if kind == "missing":
        (folder / "lab" / "ct.nii.gz").rename(folder / "lab" / "other.nii.gz")
    if kind == "class_names":
        (root / "names.json").write_text('{"1": "spleen",}')
        args += ["--class-names", str(root / "names.json")]
    if kind != "neither":
        args += ["--from-labels", str(folder / "lab")]
    if kind == "both":
        args += ["--vlm", "some/model"]
    capsys.readouterr()
    if kind in ("neither", "both"):
        with pytest.raises(SystemExit) as e:
            main(args)
        code = e.value.code
    else:
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("med3dinsight caption: error: ")
    assert message.format(lab=folder / "lab", root=root) in err
    assert not (root / "out").exists()
