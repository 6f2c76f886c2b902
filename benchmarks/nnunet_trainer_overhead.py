"""Med3DInsightTrainer vs nnU-Net's own nnUNetTrainer on the same plans and batches, and the weight-loading time.

Run: python benchmarks/nnunet_trainer_overhead.py [--shape 48] [--steps 10] [--device cpu]

Generates a small synthetic dataset, plans and preprocesses it with nnU-Net's CLI, writes a checkpoint for those
plans, builds both trainers in this process (``initialize()`` + dataloaders), then times ``train_step`` on the same
pre-fetched batches, alternating the two trainers (medians; goal: ratio <= 1.03). The loader is timed on its own.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch


def measure(shape=48, steps=10, device="cpu", compile=None, loads=5):
    """Median ``train_step`` seconds of nnUNetTrainer and Med3DInsightTrainer on the same batches of a generated
    ``shape``^3 dataset (planned and preprocessed by nnU-Net's CLI in a temporary folder), and the median time of
    ``load_pretrained_encoder`` of a checkpoint for those plans.

    ``compile``: ``None`` leaves nnU-Net's own choice (torch.compile on CUDA), ``True``/``False`` sets
    ``nnUNet_compile``. Sets the ``nnUNet_*`` environment variables of this process.

    Returns ``nnunet_step_s``, ``med3dinsight_step_s``, ``ratio``, ``load_ms``, ``checkpoint_mb``,
    ``features_per_stage``, ``patch_size``, ``batch_size``, ``steps`` and ``compiled``.
    """
    root = Path(tempfile.mkdtemp(prefix="m3di_bench_"))
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                      nnUNet_results=str(root / "res"), nnUNet_def_n_proc="1")
    os.environ.pop("nnUNet_n_proc_DA", None)
    if compile is not None:
        os.environ["nnUNet_compile"] = "t" if compile else "f"
    from med3dinsight_plugin import build_backbone, load_pretrained_encoder, save_pretrained
    from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset

    write_nnunet_raw_dataset(root / "raw", 992, cases=5, shape=(shape,) * 3, name="Bench")
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "992", "-c",
                    "3d_fullres", "-np", "1", "-npfp", "1"], check=True, capture_output=True)
    os.environ["nnUNet_n_proc_DA"] = "0"
    pre = root / "pre" / "Dataset992_Bench"
    plans_file = pre / "nnUNetPlans.json"
    ckpt = save_pretrained(build_backbone("nnunet", plans=plans_file), root / "pretrained.safetensors")
    os.environ["MED3DINSIGHT_CHECKPOINT"] = str(ckpt)

    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_trainers.trainers import Med3DInsightTrainer

    plans, dataset_json = json.loads(plans_file.read_text()), json.loads((pre / "dataset.json").read_text())
    trainers = {}
    for cls in (nnUNetTrainer, Med3DInsightTrainer):
        p = deepcopy(plans)
        p["continue_training"] = False  # what nnUNetv2_train injects
        trainer = cls(p, "3d_fullres", 0, dataset_json, torch.device(device))
        trainer.on_train_start()
        trainer.num_epochs = 1000
        trainers[cls.__name__] = trainer
    baseline = trainers["nnUNetTrainer"]
    compiled = baseline._do_i_compile()
    batches = [next(baseline.dataloader_train) for _ in range(steps)]
    for trainer in trainers.values():
        trainer.network.train()
        trainer.train_step(batches[0])  # warm-up
    times = {name: [] for name in trainers}
    for i, batch in enumerate(batches):
        order = list(trainers.items()) if i % 2 == 0 else list(trainers.items())[::-1]  # neither always goes first
        for name, trainer in order:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["Med3DInsightTrainer"]), statistics.median(times["nnUNetTrainer"])
    network = baseline.network
    load_times = []
    for _ in range(loads):
        start = time.perf_counter()
        load_pretrained_encoder(network, ckpt)
        load_times.append(time.perf_counter() - start)
    config = plans["configurations"]["3d_fullres"]
    return {"nnunet_step_s": theirs, "med3dinsight_step_s": ours, "ratio": ours / theirs,
            "load_ms": statistics.median(load_times) * 1000, "checkpoint_mb": ckpt.stat().st_size / 1e6,
            "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"],
            "patch_size": config["patch_size"], "batch_size": config["batch_size"], "steps": steps,
            "compiled": bool(compiled)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=48, help="edge of the synthetic volumes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    r = measure(args.shape, args.steps, args.device)
    print(f"torch {torch.__version__}, device {args.device}; PlainConvUNet {r['features_per_stage']}, patch "
          f"{r['patch_size']}, batch {r['batch_size']}, {args.steps} steps")
    print(f"train_step  nnUNetTrainer {r['nnunet_step_s']:.3f} s   Med3DInsightTrainer {r['med3dinsight_step_s']:.3f} s"
          f"   ratio {r['ratio']:.3f}")
    print(f"load_pretrained_encoder (read + map + copy, {r['checkpoint_mb']:.1f} MB): {r['load_ms']:.0f} ms")


if __name__ == "__main__":
    main()
