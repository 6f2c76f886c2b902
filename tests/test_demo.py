"""The README's first command: ``med3dinsight demo`` runs the whole method offline and says where everything went."""
import os
import subprocess
import sys
from pathlib import Path

from med3dinsight_plugin.checkpoint import load_checkpoint


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # the demo sets its own
    proc = subprocess.run([str(Path(sys.executable).parent / "med3dinsight"), "demo", "-o", str(out), "--steps", "4",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for step in range(1, 8):
        assert f"== {step}/7" in text
    assert "Loaded" in text or "loaded" in text  # the load reports are printed
    nn = load_checkpoint(out / "pretrain_nnunet" / "med3dinsight.safetensors")
    assert nn.metadata["backbone"]["name"] == "nnunet" and nn.metadata["captions"]["sha256"]
    assert nn.metadata["intensity_normalization"]["scheme"] == "nnunet_preprocessed"
    swin = load_checkpoint(out / "pretrain_swin_unetr" / "med3dinsight.safetensors")
    assert swin.metadata["backbone"]["name"] == "swin_unetr"
    fold = next((out / "nnUNet_results").glob("Dataset977_Demo/Med3DInsightTrainer_smoke__*/fold_0"))
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "pretrained_load_report.json").is_file()
    assert (out / "pretrained_for_nnunet.pth").is_file() and (out / "pretrain_nnunet" / "metrics.png").is_file()
    assert "Outputs:" in text and str(out) in text.split("Outputs:")[1]
    again = subprocess.run([str(Path(sys.executable).parent / "med3dinsight"), "demo", "-o", str(out)],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites a previous run
