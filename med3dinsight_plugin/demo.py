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

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Mapping, Sequence

from nnunet_trainers.attach import attach_checkpoint
from nnunet_trainers.shim import nnunet_device, with_shim

from .distributed import resolve_device
from .errors import Med3DInsightError
from .export import export_checkpoint
from .pretrain.config import PretrainConfig
from .pretrain.run import run_pretraining
from .slices import RenderSettings, SlicePolicy
from .synthetic import write_nnunet_raw_dataset
from .teacher.cache import read_manifest, verify_cache
from .teacher.captioner import Captioner, caption_dataset, load_vlm
from .teacher.clip import ClipTeacher
from .teacher.embed import embed_dataset
from .teacher.tiny import save_tiny_llava, save_tiny_open_clip
from .volumes import open_source

__all__ = ["run_demo"]

DATASET_ID = 977
DATASET = f"Dataset{DATASET_ID}_Demo"
SWIN = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str = "") -> None:
    print(f"   {what}({time.perf_counter() - start:.1f} s)", flush=True)


def _run(cmd: Sequence, env: Mapping[str, str], log: Path) -> None:
    """A command-line tool in a subprocess with the environment ``env``, its output kept in ``log``.

    Args:
        cmd: the program and its arguments (converted with ``str``).
        env: the subprocess's whole environment (the caller's ``os.environ`` is not touched).
        log: where stdout and stderr go.

    Raises:
        RuntimeError: the tool failed; the message holds the log's tail.
    """
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], env=dict(env), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {proc.returncode}); see {log}: {' | '.join(tail)}")


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` inside the block only, restored exactly afterwards (also on an error).

    For the in-process nnU-Net call that reads its folders from the environment when it runs (nnU-Net 2.8's
    ``nnunetv2.paths``); subprocesses get their environments explicitly instead.
    """
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_demo(out, device: str = "cpu", steps: int = 12, cases: int = 6) -> Dict[str, str]:
    """Run the demo into the folder ``out`` through the package's Python API (nnU-Net's own tools in subprocesses).

    Args:
        out: a new or empty folder for everything the demo writes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        steps: pretraining steps of the nnU-Net backbone (the SwinUNETR gets half of them).
        cases: cases of the synthetic dataset.

    Returns:
        What was produced -> where it went.

    Raises:
        Med3DInsightError: ``out`` is not empty, or a step refused its input.
        RuntimeError: one of nnU-Net's tools failed (the message names its log).
    """

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise Med3DInsightError(f"{out} is not empty; give the demo a new folder")
    device = str(resolve_device(device))
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    folders = {"nnUNet_raw": out / "nnUNet_raw", "nnUNet_preprocessed": out / "nnUNet_preprocessed",
               "nnUNet_results": out / "nnUNet_results"}
    nnunet = {k: str(v) for k, v in folders.items()}
    # nnU-Net's tools run in subprocesses with these environments; this process's os.environ stays the caller's.
    env = {**os.environ, **nnunet, "nnUNet_def_n_proc": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planning crashes with it; training gets it below
    outputs: Dict[str, str] = {}

    t = _step(f"1/7 synthetic CT dataset ({cases} cases, 48^3) + nnUNetv2_plan_and_preprocess")
    write_nnunet_raw_dataset(folders["nnUNet_raw"], DATASET_ID, cases=cases, shape=(48, 48, 48), name="Demo",
                             ct=True)
    _run([bindir / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
         env, out / "nnunet_plan.log")
    pre = folders["nnUNet_preprocessed"] / DATASET
    outputs["nnU-Net preprocessed data"] = str(pre)
    _done(t)

    t = _step("2/7 tiny random teachers, built and saved locally (LLaVA captioner, open_clip)")
    vlm, clip = save_tiny_llava(out / "teachers" / "tiny-llava"), save_tiny_open_clip(out / "teachers" / "tiny-clip")
    outputs["teachers"] = str(out / "teachers")
    _done(t)

    policy = SlicePolicy(per_plane=4)  # the slices captioned and embedded: 4 per plane and volume
    source = open_source(pre)
    t = _step("3/7 caption (caption_dataset: resumable JSONL)")
    captions = out / "captions.jsonl"
    captioner = Captioner(load_vlm(str(vlm), device=device), max_new_tokens=12)
    r = caption_dataset(source, captioner, captions, policy, RenderSettings(size=64),
                        settings={"model": str(vlm), "max_new_tokens": 12})
    print(f"   {r.written} captions written to {captions}, e.g. {json.loads(captions.read_text().splitlines()[0])}")
    outputs["captions"] = str(captions)
    _done(t)

    t = _step("4/7 embed (embed_dataset: the teacher cache) + verify_cache")
    cache = out / "teacher_cache"
    teacher = ClipTeacher(str(clip), device=device, precision="bf16" if device.startswith("cuda") else "fp32")
    # feature maps for the default recipe (dense distillation); the captions serve the paper's recipe
    embed_dataset(source, cache, teacher, policy, RenderSettings(size=224), captions=str(captions), feature_maps=7)
    problems = verify_cache(cache)
    if problems:
        raise Med3DInsightError(f"the teacher cache {cache} has {len(problems)} problem(s): {problems[0]}")
    manifest = read_manifest(cache)
    print(f"   {cache}: ok, {len(manifest['shards'])} shard(s), {len(manifest['cases'])} cases, "
          f"{sum(s['rows'] for s in manifest['shards'])} slices")
    outputs["teacher cache"] = str(cache)
    _done(t)

    common = {"data": {"source": str(pre), "cache": str(cache), "num_workers": 0, "eval_cases": 2,
                       "slices_per_sample": 6},
              "train": {"steps": steps, "batch_size": 2, "lr": 3e-4, "warmup_steps": 2, "checkpoint_every": 6,
                        "eval_every": 6, "log_every": 3, "device": device}}
    t = _step(f"5/7 pretrain (run_pretraining): nnU-Net PlainConvUNet from the dataset's plans ({steps} steps)")
    run_nn = out / "pretrain_nnunet"
    cfg = PretrainConfig.from_dict({**common, "model": {"backbone": "nnunet", "psat": "small"},
                                    "output": str(run_nn)})
    result = run_pretraining(cfg)
    print(f"   last losses {result.losses}; held-out retrieval {result.eval}")
    outputs["pretrained nnU-Net checkpoint"] = result.checkpoint
    _done(t)

    t = _step(f"5b/7 pretrain: MONAI SwinUNETR (feature_size 12), patch 64^3 ({steps // 2} steps)")
    run_swin = out / "pretrain_swin_unetr"
    cfg = PretrainConfig.from_dict({**common, "train": {**common["train"], "steps": steps // 2},
                                    "model": {"backbone": "swin_unetr", "backbone_kwargs": SWIN, "psat": "small",
                                              "patch_size": [64, 64, 64]}, "output": str(run_swin)})
    swin = run_pretraining(cfg)
    outputs["pretrained SwinUNETR checkpoint"] = swin.checkpoint
    _done(t)

    t = _step("6/7 fine-tune with nnU-Net: export_checkpoint, attach_checkpoint + nnUNetv2_train "
              "-tr Med3DInsightTrainer_smoke")
    exported = export_checkpoint(result.checkpoint, "nnunet", out / "pretrained_for_nnunet.pth",
                                 plans=pre / "nnUNetPlans.json")
    print(f"   wrote {exported.path} ({exported.format}, {exported.tensors} tensors)")
    outputs["export for nnUNetv2_train -pretrained_weights"] = str(out / "pretrained_for_nnunet.pth")
    with _environment({"nnUNet_preprocessed": nnunet["nnUNet_preprocessed"]}):  # where attach finds the plans
        attached = attach_checkpoint(DATASET, "nnUNetPlans", result.checkpoint)
    print("   " + str(attached.report).replace("\n", "\n   "))
    print(f"   wrote {attached.plans_file}")
    # nnU-Net finds the trainers through the shim; cuda:N is GPU N; augmentation in this process (tiny data)
    nnunet_dev, train_env = nnunet_device(device, with_shim({**env, "nnUNet_n_proc_DA": "0"}))
    _run([bindir / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "Med3DInsightTrainer_smoke", "-p",
          attached.plans_name, "-device", nnunet_dev], train_env, out / "nnunet_train.log")
    fold = folders["nnUNet_results"] / DATASET / \
        f"Med3DInsightTrainer_smoke__{attached.plans_name}__3d_fullres" / "fold_0"
    report = json.loads((fold / "pretrained_load_report.json").read_text())
    print(f"   nnU-Net's trainer loaded {report['loaded']}/{report['expected']} encoder tensors "
          f"({report['loaded_params'] / 1e6:.2f}M parameters, {report['coverage']:.1f} %) from {report['source']}; "
          f"the report is in {fold / 'pretrained_load_report.json'} and the nnU-Net log")
    outputs["nnU-Net fine-tuning"] = str(fold)
    _done(t)

    t = _step("7/7 fine-tune a MONAI SwinUNETR (Med3DInsightSupervisedTrainer, 2 epochs)")
    _monai_finetune(swin.checkpoint, device)
    _done(t)

    print("\nOutputs:")
    for what, where in outputs.items():
        print(f"  {what:<46} {where}")
    return outputs


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
