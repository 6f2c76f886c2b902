"""Slice captioning with real (tiny, random) Hugging Face VLMs saved to folders, and the resumable caption file.

The VLMs are built from configs and saved with ``save_pretrained``, then loaded through ``load_vlm`` exactly as a
downloaded model folder is; everything runs offline (conftest sets HF_HUB_OFFLINE=1).
"""
import json
import shutil
import time

import numpy as np
import pytest
import torch

from helpers import interrupted_captioner_class
from med3dinsight_plugin.teacher.captioner import (
    DEFAULT_PROMPTS,
    Captioner,
    CaptionError,
    CaptionFile,
    VLMError,
    caption_key,
    caption_slices,
    load_prompts,
    load_vlm,
    prompt_for,
)
from med3dinsight_plugin.teacher.tiny import save_tiny_llava, save_tiny_qwen2vl


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="module")
def llava(llava_dir):
    return load_vlm(str(llava_dir))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(n)]  # sizes differ on purpose


def _slices(n, case="case_00"):
    planes = ("axial", "coronal", "sagittal")
    return [dict(case=case, plane=planes[i % 3], index=i, position=(i + 0.5) / n, modality="ct", image=im)
            for i, im in enumerate(_images(n))]


# ------------------------------------------------------------------------------------------------- captioning

@pytest.mark.parametrize("which", ["llava", "qwen2vl"])
def test_batched_captions_equal_one_by_one(which, request):
    folder = request.getfixturevalue("llava_dir" if which == "llava" else "qwen_dir")
    vlm = load_vlm(str(folder))
    assert vlm.dtype == torch.float32 and not vlm.model.training
    images = _images(5)
    prompts = [prompt_for(None, "ct", "axial", position=0.1, case="a"), "w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10"]
    batched = Captioner(vlm, batch_size=4, max_new_tokens=6).caption(images, prompts)  # batches of 4 and 1
    single = Captioner(vlm, batch_size=1, max_new_tokens=6).caption(images, prompts)
    assert len(batched) == 5 and all(isinstance(t, str) for t in batched)
    assert any(batched)  # a random model still writes words
    assert batched == single  # left padding: greedy captions do not depend on the batch


def test_dtype_and_bad_inputs(llava_dir, llava):
    assert load_vlm(str(llava_dir), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(VLMError, match="unknown dtype"):
        load_vlm(str(llava_dir), dtype="int8")
    with pytest.raises(VLMError, match="one prompt per image"):
        Captioner(llava).caption(_images(2), ["w1"])
    with pytest.raises(VLMError, match="uint8"):
        Captioner(llava).caption([np.zeros((8, 8, 3), np.float32)], ["w1"])


# ------------------------------------------------------------------------------------------------ load errors

def test_not_a_vlm(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=100),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8),
                         projection_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(VLMError, match=r"not a vision-language model \(its config is CLIPConfig\)"):
        load_vlm(str(tmp_path))


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(VLMError, match=r"not in the local Hugging Face cache.*hf download.*local folder"):
        load_vlm("med3dinsight-test/no-such-vlm")
    assert time.monotonic() - start < 5


def test_missing_folder_custom_code_and_no_chat_template(tmp_path, llava_dir):
    with pytest.raises(VLMError, match="does not exist"):
        load_vlm(str(tmp_path / "nope"))
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_vlm", "auto_map": {
        "AutoConfig": "configuration.MyConfig", "AutoModelForImageTextToText": "modeling.MyVLM"}}))
    with pytest.raises(VLMError, match="--trust-remote-code"):
        load_vlm(str(custom))
    bare = shutil.copytree(llava_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(VLMError, match="no chat template"):
        load_vlm(str(bare))


# ---------------------------------------------------------------------------------------------------- prompts

def test_prompts_file_and_fallbacks(tmp_path):
    assert "axial" in prompt_for(None, "ct", "axial", position=0.421, case="c") and "0.42" in \
        prompt_for(None, "ct", 0, position=0.421)
    good = tmp_path / "p.yaml"
    good.write_text("ct.axial: 'CT {plane} of {case} at {position:.3f}'\n'*.sagittal': 'side {modality}'\n")
    prompts = load_prompts(good)
    assert prompt_for(prompts, "ct", "axial", position=0.5, case="c1") == "CT axial of c1 at 0.500"
    assert prompt_for(prompts, "mri", "sagittal", position=0.5) == "side MRI"
    assert prompt_for(prompts, "mri", "coronal", position=0.5) == DEFAULT_PROMPTS["mri.*"].format(
        plane="coronal", modality="MRI", position="0.50", case="")
    bad_key = tmp_path / "k.json"
    bad_key.write_text(json.dumps({"pet.axial": "x"}))
    with pytest.raises(VLMError, match=r"k\.json.*unknown key 'pet\.axial'"):
        load_prompts(bad_key)
    bad_field = tmp_path / "f.json"
    bad_field.write_text(json.dumps({"ct.*": "a {patient} slice"}))
    with pytest.raises(VLMError, match=r"f\.json.*unknown field \{patient\}.*'ct\.\*'"):
        load_prompts(bad_field)


# ------------------------------------------------------------------------------------------- the caption file

_Interrupted = interrupted_captioner_class()  # Ctrl-C during the 3rd batch


def test_resume_after_interrupt_and_torn_line(tmp_path, llava):
    out = tmp_path / "captions.jsonl"
    settings = {"render": {"window": [-160, 240]}}
    slices = _slices(10)
    with pytest.raises(KeyboardInterrupt):
        caption_slices(slices, _Interrupted(llava, batch_size=3, max_new_tokens=4), out, settings, progress=False)
    first = out.read_text().splitlines()
    assert len(first) == 6  # two complete batches, nothing of the third
    with open(out, "ab") as f:
        f.write(b'{"case": "case_00", "plane": "sag')  # a write torn by a crash
    assert len(CaptionFile.read(out)) == 6
    summary = caption_slices(slices, Captioner(llava, batch_size=3, max_new_tokens=4), out, settings, progress=True)
    assert summary == {"written": 4, "skipped": 6, "path": str(out)}
    lines = out.read_text().splitlines()
    assert lines[:6] == first and len(lines) == 10
    records = CaptionFile.read(out)
    assert set(records) == {caption_key(s["case"], s["plane"], s["position"]) for s in slices}
    assert json.loads((tmp_path / "captions.jsonl.meta.json").read_text())["render"] == settings["render"]
    again = caption_slices(iter(slices), Captioner(llava, batch_size=3, max_new_tokens=4), out, settings,
                           progress=False)
    assert again["written"] == 0 and again["skipped"] == 10


def test_settings_mismatch_is_refused(tmp_path, llava):
    out = tmp_path / "captions.jsonl"
    captioner = Captioner(llava, batch_size=4, max_new_tokens=2)
    caption_slices(_slices(2), captioner, out, {"render": {"window": "abdomen"}}, progress=False)
    with pytest.raises(CaptionError, match=r"captions\.jsonl was written with other settings "
                                           r"\(render\.window .*abdomen.* vs .*lung.*; use a new output file or pass "
                                           r"the same settings"):
        caption_slices(_slices(3), captioner, out, {"render": {"window": "lung"}}, progress=False)
    with pytest.raises(CaptionError, match="differing keys: generation"):
        caption_slices(_slices(3), Captioner(llava, max_new_tokens=3), out, {"render": {"window": "abdomen"}},
                       progress=False)


def test_duplicate_and_malformed_lines_name_file_and_line(tmp_path):
    rec = {"case": "c", "plane": "axial", "index": 1, "position": 0.25, "text": "liver"}
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(r) + "\n" for r in (rec, {**rec, "position": 0.5}, {**rec, "text": "x"})))
    with pytest.raises(CaptionError, match=r"dup\.jsonl line 3: duplicate caption key 'c\|axial\|0\.250000' "
                                           r"\(first on line 1\)"):
        CaptionFile.read(dup)
    assert len(CaptionFile.read(dup, strict=False)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n{not json\n" + json.dumps({**rec, "plane": "oblique"}) + "\n")
    with pytest.raises(CaptionError, match=r"bad\.jsonl line 2: malformed"):
        CaptionFile.read(bad)
    with CaptionFile(tmp_path / "new.jsonl") as f:
        with pytest.raises(CaptionError, match="missing field 'text'"):
            f.write([{k: v for k, v in rec.items() if k != "text"}])
        assert f.write([rec]) == 1
    assert list(CaptionFile.read(tmp_path / "new.jsonl")) == ["c|axial|0.250000"]
