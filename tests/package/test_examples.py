"""The examples stay runnable."""
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


@pytest.mark.slow
def test_pretraining_step_example_trains():
    r = subprocess.run([sys.executable, str(EXAMPLES / "pretraining_step.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("step 0: loss ") and lines[1].startswith("step 1: loss ")
    assert "PlainConvUNet: 188 tensors ready for fine-tuning" in r.stdout


@pytest.mark.slow
def test_monai_swin_unetr_finetune_example():
    r = subprocess.run([sys.executable, str(EXAMPLES / "monai_swin_unetr_finetune.py"), "--epochs", "1",
                        "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "encoder tensors    81/81 (100.0 %)" in r.stdout
    assert "input channels 1->2: repeated, scaled 1/2" in r.stdout and "final loss" in r.stdout


@pytest.mark.slow
def test_monai_classification_example():
    r = subprocess.run([sys.executable, str(EXAMPLES / "monai_classification.py"), "--epochs", "2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "(100.0 %)" in r.stdout and "epoch 1: loss" in r.stdout
