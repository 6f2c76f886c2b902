"""Shared test setup: offline hubs, small thread counts, real nnU-Net plans of tiny synthetic datasets (the plans
alone, and a planned + preprocessed dataset that nnUNetv2_train runs on)."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub-aware import: an unknown id must fail at once

import numpy as np
import pytest
import torch

from helpers import NNUNET_E2E_DATASET, TINY_BACKBONES, run_tool
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset

torch.set_num_threads(min(2, torch.get_num_threads()))

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def nnunet_plans(tmp_path_factory):
    """Paths of nnUNetPlans.json and nnUNetResEncUNetMPlans.json planned by nnU-Net's own CLI for a tiny dataset."""
    root = tmp_path_factory.mktemp("nnunet")
    write_nnunet_raw_dataset(root / "raw")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # crashes planning
    for cmd in (["nnUNetv2_plan_and_preprocess", "-d", "990", "--no_pp", "-npfp", "1", "-c", "3d_fullres"],
                ["nnUNetv2_plan_experiment", "-d", "990", "-pl", "nnUNetPlannerResEncM"]):
        subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, check=True, capture_output=True)
    folder = root / "pre" / "Dataset990_Tiny"
    return {"plain": folder / "nnUNetPlans.json", "resenc": folder / "nnUNetResEncUNetMPlans.json"}


@pytest.fixture(params=sorted(TINY_BACKBONES))
def tiny_backbone_name(request):
    return request.param


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """A 5-case nnU-Net dataset (991) with a held-out test image, planned and preprocessed by nnU-Net's CLI, and
    the environment that finds the trainers as ``eval "$(med3dinsight nnunet-env)"`` sets it."""
    root = tmp_path_factory.mktemp("nnunet_e2e")
    import SimpleITK as sitk

    folder = write_nnunet_raw_dataset(root / "raw", dataset_id=int(NNUNET_E2E_DATASET), cases=5)  # 5 folds: 5 cases
    (folder / "imagesTs").mkdir()
    held_out = np.random.default_rng(1).normal(size=(30, 32, 34)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(held_out), str(folder / "imagesTs" / "test000_0000.nii.gz"))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with it
    env.pop("MED3DINSIGHT_CHECKPOINT", None)
    run_tool(["nnUNetv2_plan_and_preprocess", "-d", NNUNET_E2E_DATASET, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
             env)
    export = run_tool(["med3dinsight", "nnunet-env"], env).stdout.strip()
    assert export.startswith("export nnUNet_extTrainer=")
    env["nnUNet_extTrainer"] = export.split("=", 1)[1].strip("'")
    env["nnUNet_n_proc_DA"] = "0"  # training only
    pre = root / "pre" / "Dataset991_Tiny"
    return {"env": env, "root": root, "pre": pre, "plans": pre / "nnUNetPlans.json", "raw": folder}


# fixtures that plan (and preprocess) a dataset with nnU-Net's own command-line tools: their tests are marked nnunet
NNUNET_FIXTURES = {"nnunet_plans", "nnunet_dataset", "nnunet"}


def pytest_collection_modifyitems(config, items):
    """Mark ``nnunet`` every test that runs nnU-Net's tools, through one of :data:`NNUNET_FIXTURES` or by living in
    tests/nnunet/ (the other modules that call them directly carry the marker themselves)."""
    for item in items:
        if NNUNET_FIXTURES & set(getattr(item, "fixturenames", ())) or "/nnunet/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.nnunet)
