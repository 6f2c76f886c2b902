"""End to end through nnU-Net's own command-line tools: plan, attach, train with each trainer family, predict.

Runs PyPI's unmodified nnunetv2 in subprocesses, finding the trainers only through ``nnUNet_extTrainer`` as
``eval "$(med3dinsight nnunet-env)"`` sets it.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import NNUNET_E2E_DATASET as DATASET
from helpers import carries_pretrained, tiny_backbone
from helpers import run_tool as run
from med3dinsight_plugin import build_backbone, save_pretrained

BIN = Path(sys.executable).parent


def _train_and_predict(nnunet, ckpt, trainer, plans_name, attach_args=()):
    env, root = nnunet["env"], nnunet["root"]
    r = run(["med3dinsight", "nnunet-attach", "-d", DATASET, "-p", "nnUNetPlans", "--checkpoint", ckpt,
             "-n", plans_name, *attach_args], env)
    assert "(100.0 %)" in r.stdout and f"-p {plans_name} -tr {trainer.replace('_smoke', '')}" in r.stdout
    run(["nnUNetv2_train", DATASET, "3d_fullres", "0", "-p", plans_name, "-tr", trainer, "-device", "cpu"], env)
    fold = root / "res" / "Dataset991_Tiny" / f"{trainer}__{plans_name}__3d_fullres" / "fold_0"
    report = json.loads((fold / "pretrained_load_report.json").read_text())
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert report["coverage"] == 100.0 and report["applied"] and "Pretrained encoder loaded" in log
    assert "Learning rates: encoder" in log
    out = root / f"pred_{plans_name}"
    run(["nnUNetv2_predict", "-i", nnunet["raw"] / "imagesTs", "-o", out, "-d", DATASET, "-c", "3d_fullres",
         "-f", "0", "-p", plans_name, "-tr", trainer, "-chk", "checkpoint_final.pth", "-device", "cpu",
         "-npp", "1", "-nps", "1"], env)
    import SimpleITK as sitk
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test000.nii.gz")))
    assert prediction.shape == (30, 32, 34)
    return torch.load(fold / "checkpoint_final.pth", weights_only=False)["network_weights"]


@pytest.mark.slow
def test_plain_conv_unet_from_the_datasets_own_plans(nnunet, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("nnunet", plans=nnunet["plans"])
    ckpt = save_pretrained(backbone, tmp_path / "plain.safetensors")
    weights = _train_and_predict(nnunet, ckpt, "Med3DInsightTrainer_smoke", "plansPlain")
    carries_pretrained(weights, backbone.network.state_dict(), ("encoder.",))
    # --val re-initialises the trainer but loads the training checkpoint: the pretrained file is not needed
    env = {**nnunet["env"], "MED3DINSIGHT_CHECKPOINT": str(tmp_path / "moved_away.safetensors")}
    run(["nnUNetv2_train", DATASET, "3d_fullres", "0", "-p", "plansPlain", "-tr", "Med3DInsightTrainer_smoke",
         "-device", "cpu", "--val"], env)
    fold = nnunet["root"] / "res" / "Dataset991_Tiny" / "Med3DInsightTrainer_smoke__plansPlain__3d_fullres" / "fold_0"
    assert any("A training checkpoint is being loaded" in p.read_text() for p in fold.glob("training_log_*.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("name,trainer,network,patch", [
    ("swin_unetr", "Med3DInsightTrainer_SwinUNETR_smoke", "SwinUNETRForNNUNet", [64, 64, 64]),  # 32 -> >= 64
    ("unetr", "Med3DInsightTrainer_UNETR_smoke", "UNETRForNNUNet", [32, 32, 32]),
])
def test_monai_networks_through_nnunet(nnunet, tmp_path, name, trainer, network, patch):
    backbone = tiny_backbone(name)
    ckpt = save_pretrained(backbone, tmp_path / f"{name}.safetensors")
    weights = _train_and_predict(nnunet, ckpt, trainer, f"plans_{name}", ["--adapt-architecture"])
    carries_pretrained(weights, backbone.network.state_dict(), backbone.encoder_prefixes)
    plans = json.loads((nnunet["pre"] / f"plans_{name}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"]["network_class_name"] == f"nnunet_trainers.networks.{network}"
    assert config["patch_size"] == patch and plans["med3dinsight"]["family"] == name


def _spoiled(src, dst, poison=False, meta=None):
    """A copy of a checkpoint with a NaN in an encoder tensor and/or its metadata changed by ``meta``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        header = f.metadata()
    if poison:
        key = next(k for k, t in tensors.items() if k.startswith("network.encoder.") and t.is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
    if meta is not None:
        header = {"med3dinsight": json.dumps(meta(json.loads(header["med3dinsight"])))}
    save_file(tensors, str(dst), metadata=header)
    return dst


@pytest.mark.slow
def test_failures_stop_before_training(nnunet, tmp_path):
    env, root = nnunet["env"], nnunet["root"]
    resenc = save_pretrained(build_backbone("nnunet", plans=nnunet["pre"] / "nnUNetPlans.json"),
                             tmp_path / "plain.safetensors")
    other = save_pretrained(tiny_backbone("resenc_unet"), tmp_path / "resenc.safetensors")
    # another architecture: refused when attaching, with the fix named
    r = run(["med3dinsight", "nnunet-attach", "-d", DATASET, "--checkpoint", other, "-n", "plansBad"], env, check=False)
    assert r.returncode == 2 and "--adapt-architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (nnunet["pre"] / "plansBad.json").exists()
    r = run(["med3dinsight", "nnunet-attach", "-d", DATASET, "--checkpoint", resenc, "-c", "3d_lowres"], env,
            check=False)
    assert r.returncode == 2 and "configuration '3d_lowres' is not in" in r.stderr
    run(["med3dinsight", "nnunet-attach", "-d", DATASET, "--checkpoint", resenc, "-n", "plansOk"], env)
    results = root / "res" / "Dataset991_Tiny"
    cases = [
        ({}, "nnUNetPlans", "Med3DInsightTrainer_smoke", "has no pretrained checkpoint"),
        ({"MED3DINSIGHT_CHECKPOINT": str(other)}, "plansOk", "Med3DInsightTrainer_smoke", "does not fit"),
        ({"MED3DINSIGHT_CHECKPOINT": str(tmp_path / "missing.safetensors")}, "plansOk",
         "Med3DInsightTrainer_smoke", "does not exist"),
        ({}, "plansOk", "Med3DInsightTrainer_SwinUNETR_smoke", "builds PlainConvUNet"),
        # diverged weights used to fine-tune with loss nan and exit 0; malformed metadata used to crash
        ({"MED3DINSIGHT_CHECKPOINT": str(_spoiled(resenc, tmp_path / "nan.safetensors", poison=True))}, "plansOk",
         "Med3DInsightTrainer_smoke", "holds NaN or Inf values"),
        ({"MED3DINSIGHT_CHECKPOINT": str(_spoiled(resenc, tmp_path / "meta.safetensors",
                                                  meta=lambda m: {**m, "encoder_prefixes": "encoder."}))},
         "plansOk", "Med3DInsightTrainer_smoke", "checkpoint metadata 'encoder_prefixes' must be"),
    ]
    for fold_id, (extra, plans_name, trainer, message) in enumerate(cases, start=1):  # a fresh fold folder each
        r = run(["nnUNetv2_train", DATASET, "3d_fullres", fold_id, "-p", plans_name, "-tr", trainer, "-device",
                 "cpu"], {**env, **extra}, check=False)
        assert r.returncode == 2 and "med3dinsight: error: " in r.stderr and message in r.stderr, r.stderr[-2000:]
        fold = results / f"{trainer}__{plans_name}__3d_fullres" / f"fold_{fold_id}"
        assert not list(fold.glob("checkpoint_*.pth"))
        assert message in next(fold.glob("training_log_*.txt")).read_text()


def test_adapt_architecture_of_an_inheriting_configuration(nnunet, tmp_path, monkeypatch):
    from nnunet_trainers.attach import attach_checkpoint

    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet["root"] / "pre"))
    plans = json.loads(nnunet["plans"].read_text())
    plans["configurations"]["3d_child"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    (nnunet["pre"] / "plansInherit.json").write_text(json.dumps(plans))
    ckpt = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "swin.safetensors")
    result = attach_checkpoint(DATASET, "plansInherit", ckpt, name="plansInheritSwin", configuration="3d_child",
                               adapt_architecture=True)
    child = json.loads(Path(result.plans_file).read_text())["configurations"]["3d_child"]
    assert child["architecture"]["network_class_name"].endswith("SwinUNETRForNNUNet")
    assert child["batch_size"] == 1 and child["patch_size"] == [64, 64, 64] and "inherits_from" not in child
    assert result.report.coverage == 100.0
