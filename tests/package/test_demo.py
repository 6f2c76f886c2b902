"""The README's first command: ``med3dinsight demo`` runs the whole method offline and says where everything went."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT
from med3dinsight_plugin.checkpoint import load_checkpoint


@pytest.mark.slow
@pytest.mark.nnunet  # nnUNetv2_train of the demo
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


def test_the_demo_uses_the_python_api_not_the_cli():
    """No cli <-> demo import cycle: importing and reading the demo needs nothing of the command line."""
    code = ("import sys, med3dinsight_plugin.demo as d; d.run_demo; "
            "assert 'med3dinsight_plugin.cli' not in sys.modules, 'the demo imported the cli'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tree = ast.parse(REPO_ROOT.joinpath("med3dinsight_plugin", "demo.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"cli", "med3dinsight_plugin.cli"} & imported
    # os.environ is written only by the context-limited _environment (subprocesses get theirs explicitly)
    writers = []
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_environment"):
        for node in ast.walk(function):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else \
                node.targets[0].value if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript) \
                else None
            if target is not None and ast.unparse(target) == "os.environ" and not (
                    isinstance(node, ast.Call) and node.func.attr in ("get", "items", "keys", "copy")):
                writers.append(f"{function.name}: {ast.unparse(node)}")
    assert writers == []


def test_the_demo_environment_is_restored_exactly(monkeypatch):
    """What the in-process nnU-Net step sees is set for the block only; the caller's os.environ is unchanged after
    it, also when the block fails."""
    from med3dinsight_plugin.demo import _environment

    monkeypatch.setenv("nnUNet_results", "/callers/results")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    before = dict(os.environ)
    with _environment({"nnUNet_preprocessed": "/demo/pre", "nnUNet_results": "/demo/results"}):
        assert os.environ["nnUNet_preprocessed"] == "/demo/pre" and os.environ["nnUNet_results"] == "/demo/results"
    assert dict(os.environ) == before
    try:
        with _environment({"nnUNet_preprocessed": "/demo/pre"}):
            raise KeyError("a failing step")
    except KeyError:
        pass
    assert dict(os.environ) == before


def test_the_shim_path_is_computed_in_one_place(monkeypatch):
    """nnunet_trainers.shim gives the demo, study and ``nnunet-env`` the same nnUNet_extTrainer: the shim first,
    the user's other folders kept in order."""
    import shlex

    from nnunet_trainers.shim import ENV_EXT_TRAINER, ext_trainer_path, shim_folder, with_shim

    shim = shim_folder()
    assert Path(shim, "med3dinsight_trainers.py").is_file()
    mine = os.pathsep.join(["/my/trainers", shim, "", "/more"])
    assert ext_trainer_path(mine) == os.pathsep.join([shim, "/my/trainers", "/more"])
    assert ext_trainer_path(None) == ext_trainer_path("") == shim
    env = {"PATH": "/bin", ENV_EXT_TRAINER: "/my/trainers"}
    assert with_shim(env) == {"PATH": "/bin", ENV_EXT_TRAINER: os.pathsep.join([shim, "/my/trainers"])}
    assert env[ENV_EXT_TRAINER] == "/my/trainers"  # the input is left alone
    monkeypatch.setenv(ENV_EXT_TRAINER, "/my/trainers")
    r = subprocess.run([str(Path(sys.executable).parent / "med3dinsight"), "nnunet-env"], capture_output=True,
                       text=True, env=dict(os.environ))
    expected = f"export {ENV_EXT_TRAINER}={shlex.quote(ext_trainer_path('/my/trainers'))}"
    assert r.returncode == 0 and r.stdout.strip() == expected
