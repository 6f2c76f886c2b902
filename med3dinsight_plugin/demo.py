"""``med3dinsight demo``: the whole method end to end on generated data, offline, in a few minutes on a CPU.

1. a small synthetic CT dataset in nnU-Net's raw format, planned and preprocessed by nnU-Net's own CLI;
2. tiny *random* teachers built locally (a LLaVA captioner and an open_clip model; no download, so the captions
   are word salad -- the plumbing is what is shown);
3. caption -> embed (teacher cache) -> pretrain an nnU-Net PlainConvUNet from the dataset's plans and a small
   MONAI SwinUNETR -> export;
4. fine-tune: ``nnUNetv2_train ... -tr Med3DInsightTrainer_smoke`` through nnU-Net's CLI, and a MONAI SwinUNETR
   with :class:`Med3DInsightSupervisedTrainer`; the load reports are printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

from .errors import Med3DInsightError

__all__ = ["run_demo"]

DATASET_ID = 977
SWIN = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str = ""):
    print(f"   {what}({time.perf_counter() - start:.1f} s)", flush=True)


def _run(cmd, env, log: Path):
    """A command-line tool in a subprocess, its output kept in ``log``; raise with the log's tail if it fails."""
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {proc.returncode}); see {log}: {' | '.join(tail)}")


def run_demo(out, device: str = "cpu", steps: int = 12, cases: int = 6) -> Dict[str, str]:
    """Run the demo into the folder ``out``; returns where every output went."""
    from .cli import main as cli
    from .pretrain.config import PretrainConfig
    from .pretrain.run import run_pretraining
    from .synthetic import write_nnunet_raw_dataset
    from .teacher.tiny import save_tiny_llava, save_tiny_open_clip

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise Med3DInsightError(f"{out} is not empty; give the demo a new folder")
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    nn = {"nnUNet_raw": out / "nnUNet_raw", "nnUNet_preprocessed": out / "nnUNet_preprocessed",
          "nnUNet_results": out / "nnUNet_results"}
    env = {**os.environ, **{k: str(v) for k, v in nn.items()}, "nnUNet_def_n_proc": "1", "HF_HUB_OFFLINE": "1"}
    os.environ.update({k: str(v) for k, v in nn.items()})
    env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planning crashes with it; training gets it below
    outputs: Dict[str, str] = {}

    t = _step(f"1/7 synthetic CT dataset ({cases} cases, 48^3) + nnUNetv2_plan_and_preprocess")
    write_nnunet_raw_dataset(nn["nnUNet_raw"], DATASET_ID, cases=cases, shape=(48, 48, 48), name="Demo", ct=True)
    _run([bindir / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
         env, out / "nnunet_plan.log")
    pre = nn["nnUNet_preprocessed"] / f"Dataset{DATASET_ID}_Demo"
    outputs["nnU-Net preprocessed data"] = str(pre)
    _done(t)

    t = _step("2/7 tiny random teachers, built and saved locally (LLaVA captioner, open_clip)")
    vlm, clip = save_tiny_llava(out / "teachers" / "tiny-llava"), save_tiny_open_clip(out / "teachers" / "tiny-clip")
    outputs["teachers"] = str(out / "teachers")
    _done(t)

    slices = ["--per-plane", "4"]
    t = _step("3/7 med3dinsight caption (resumable JSONL)")
    captions = out / "captions.jsonl"
    _cli(cli, ["caption", pre, "--vlm", vlm, "-o", captions, "--max-new-tokens", "12", "--size", "64",
               "--device", device, *slices])
    print(f"   e.g. {json.loads(captions.read_text().splitlines()[0])}")
    outputs["captions"] = str(captions)
    _done(t)

    t = _step("4/7 med3dinsight embed (teacher cache) + cache verify")
    cache = out / "teacher_cache"
    _cli(cli, ["embed", pre, "--clip-model", clip, "--captions", captions, "-o", cache, "--device", device,
               *slices])
    _cli(cli, ["cache", "verify", cache])
    outputs["teacher cache"] = str(cache)
    _done(t)

    common = {"data": {"source": str(pre), "cache": str(cache), "num_workers": 0, "eval_cases": 2,
                       "slices_per_sample": 6},
              "train": {"steps": steps, "batch_size": 2, "lr": 3e-4, "warmup_steps": 2, "checkpoint_every": 6,
                        "eval_every": 6, "log_every": 3, "device": device}}
    t = _step(f"5/7 med3dinsight pretrain: nnU-Net PlainConvUNet from the dataset's plans ({steps} steps)")
    run_nn = out / "pretrain_nnunet"
    cfg = PretrainConfig.from_dict({**common, "model": {"backbone": "nnunet", "psat": "small"},
                                    "output": str(run_nn)})
    result = run_pretraining(cfg)
    print(f"   last losses {result['losses']}; held-out retrieval {result.get('eval')}")
    outputs["pretrained nnU-Net checkpoint"] = result["checkpoint"]
    _done(t)

    t = _step(f"5b/7 med3dinsight pretrain: MONAI SwinUNETR (feature_size 12), patch 64^3 ({steps // 2} steps)")
    run_swin = out / "pretrain_swin_unetr"
    cfg = PretrainConfig.from_dict({**common, "train": {**common["train"], "steps": steps // 2},
                                    "model": {"backbone": "swin_unetr", "backbone_kwargs": SWIN, "psat": "small",
                                              "patch_size": [64, 64, 64]}, "output": str(run_swin)})
    swin = run_pretraining(cfg)
    outputs["pretrained SwinUNETR checkpoint"] = swin["checkpoint"]
    _done(t)

    t = _step("6/7 fine-tune with nnU-Net: nnunet-attach + nnUNetv2_train -tr Med3DInsightTrainer_smoke")
    _cli(cli, ["export", result["checkpoint"], "--to", "nnunet", "-o", out / "pretrained_for_nnunet.pth",
               "--plans", pre / "nnUNetPlans.json"])
    outputs["export for nnUNetv2_train -pretrained_weights"] = str(out / "pretrained_for_nnunet.pth")
    _cli(cli, ["nnunet-attach", "-d", DATASET_ID, "-c", result["checkpoint"]])
    from importlib.util import find_spec
    train_env = {**env, "nnUNet_n_proc_DA": "0",
                 "nnUNet_extTrainer": find_spec("nnunet_trainers.ext").submodule_search_locations[0]}
    _run([bindir / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "Med3DInsightTrainer_smoke", "-p",
          "nnUNetPlans__med3dinsight", "-device", device.split(":")[0]], train_env, out / "nnunet_train.log")
    fold = nn["nnUNet_results"] / f"Dataset{DATASET_ID}_Demo" / \
        "Med3DInsightTrainer_smoke__nnUNetPlans__med3dinsight__3d_fullres" / "fold_0"
    report = json.loads((fold / "pretrained_load_report.json").read_text())
    print(f"   nnU-Net's trainer loaded {report['loaded']}/{report['expected']} encoder tensors "
          f"({report['loaded_params'] / 1e6:.2f}M parameters, {report['coverage']:.1f} %) from {report['source']}; "
          f"the report is in {fold / 'pretrained_load_report.json'} and the nnU-Net log")
    outputs["nnU-Net fine-tuning"] = str(fold)
    _done(t)

    t = _step("7/7 fine-tune a MONAI SwinUNETR (Med3DInsightSupervisedTrainer, 2 epochs)")
    _monai_finetune(swin["checkpoint"], device)
    _done(t)

    print("\nOutputs:")
    for what, where in outputs.items():
        print(f"  {what:<46} {where}")
    return outputs


def _cli(cli, args):
    code = cli([str(a) for a in args])
    if code:
        raise RuntimeError(f"med3dinsight {args[0]} failed (exit {code})")


def _monai_finetune(checkpoint: str, device: str) -> None:
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    from .monai_support import Med3DInsightSupervisedTrainer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(2):
        label = (torch.rand(1, 64, 64, 64, generator=g) > 0.9).long()
        items.append({"image": torch.randn(1, 64, 64, 64, generator=g) + 2.0 * label, "label": label})
    network = SwinUNETR(in_channels=1, out_channels=2, **SWIN).to(device)
    trainer = Med3DInsightSupervisedTrainer(
        device, max_epochs=2, train_data_loader=DataLoader(Dataset(items), batch_size=2), network=network,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), checkpoint=checkpoint, lr=1e-3, encoder_lr=2e-4,
        warmup_epochs=1)
    print("   " + str(trainer.load_report).replace("\n", "\n   "))
    trainer.run()
    print(f"   final loss {trainer.state.output[0]['loss']:.4f}")
