"""The ``med3dinsight`` console script, run as users run it."""
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "med3dinsight"


def _run(*args):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600)


def test_models_prints_shapes_and_parameter_counts():
    r = _run("models", "--backbones", "plain_conv_unet", "--patch-size", "32", "32", "32", "--slices", "2")
    assert r.returncode == 0, r.stderr
    assert "plain_conv_unet (PlainConvUNet)" in r.stdout
    assert "tokens (2, 64, 256) -> PSAT (2, 2, 512)" in r.stdout
    assert "reconstruction (2, 1, 32, 32, 32)" in r.stdout
    assert "PSAT 57." in r.stdout  # the paper's configuration, with 256-wide tokens projected


def test_bad_arguments_give_one_line_and_exit_code_2():
    for args, message in ((("models", "--backbones", "vnet"), "unknown backbone 'vnet'"),
                          (("models", "--backbones", "swin_unetr", "--patch-size", "48", "64", "64"),
                           "divisible by (32, 32, 32)")):
        r = _run(*args)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_version_and_help():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("med3dinsight ")
    r = _run()
    assert r.returncode == 0 and "models" in r.stdout
