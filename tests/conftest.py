"""Shared test setup: offline hubs, small thread counts, and a real nnU-Net plan of a tiny synthetic dataset."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub-aware import: an unknown id must fail at once

import pytest
import torch

from helpers import TINY_BACKBONES
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
