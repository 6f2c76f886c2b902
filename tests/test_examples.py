"""The examples stay runnable."""
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_pretraining_step_example_trains():
    r = subprocess.run([sys.executable, str(EXAMPLES / "pretraining_step.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("step 0: loss ") and lines[1].startswith("step 1: loss ")
    assert "PlainConvUNet: 188 tensors ready for fine-tuning" in r.stdout
