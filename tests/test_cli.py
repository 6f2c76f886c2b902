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


def test_help_lists_the_commands_in_the_order_a_user_runs_them_without_importing_torch():
    """``--help`` builds every parser without probing CUDA or importing torch (it took 5 s when it did); the package's
    public names still load on first use."""
    code = ("import sys; from med3dinsight_plugin.cli import build_parser; text = build_parser().format_help(); "
            "print('torch' in sys.modules); import med3dinsight_plugin as m; m.build_backbone; "
            "print('torch' in sys.modules); print(text)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after, text = r.stdout.split("\n", 2)
    assert (before, after) == ("False", "True")
    listed = [line.split()[0] for line in text.split("COMMAND", 2)[2].split("options:")[0].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == ["demo", "slices", "caption", "embed", "cache", "pretrain", "export", "inspect", "push",
                      "nnunet-env", "nnunet-attach", "study", "models"]
    assert text.startswith("usage: med3dinsight") and '"""' not in text and "``" not in text


def test_only_user_errors_become_one_line(monkeypatch, capsys):
    """A Med3DInsightError (or OSError) is one line and exit 2; any other exception is a bug and keeps its
    traceback; MED3DINSIGHT_DEBUG=1 re-raises user errors too."""
    import pytest

    from med3dinsight_plugin import cli
    from med3dinsight_plugin.errors import Med3DInsightError

    def user_error(args):
        raise Med3DInsightError("bad.yaml: key 'x' is wrong; use 'y'\ndetails that follow")

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_cmd_models", user_error)
    monkeypatch.delenv("MED3DINSIGHT_DEBUG", raising=False)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "med3dinsight models: error: bad.yaml: key 'x' is wrong; use 'y'\n"
    monkeypatch.setenv("MED3DINSIGHT_DEBUG", "1")
    with pytest.raises(Med3DInsightError):
        cli.main(["models"])
    monkeypatch.delenv("MED3DINSIGHT_DEBUG")
    monkeypatch.setattr(cli, "_cmd_models", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["models"])


def test_known_third_party_noise_is_silenced_in_the_cli_only(monkeypatch):
    import warnings

    from med3dinsight_plugin import cli

    def noisy(args):
        warnings.warn("`torch.jit.interface` is deprecated. Please use `torch.compile` instead.", FutureWarning)
        warnings.warn("a warning of the user's own", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_cmd_models", noisy)
    monkeypatch.delenv("MED3DINSIGHT_DEBUG", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["models"]) == 0
    assert [str(w.message) for w in seen] == ["a warning of the user's own"]
    monkeypatch.setenv("MED3DINSIGHT_DEBUG", "1")  # debugging shows everything
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["models"]) == 0
    assert len(seen) == 2
