"""The ``med3dinsight`` console script, run as users run it."""
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "med3dinsight"


def _run(*args):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_models_prints_shapes_and_parameter_counts():
    r = _run("models", "--backbones", "plain_conv_unet", "--patch-size", "32", "32", "32", "--slices", "2")
    assert r.returncode == 0, r.stderr
    assert "plain_conv_unet (PlainConvUNet)" in r.stdout
    assert "tokens (2, 64, 256) -> PSAT (2, 2, 512)" in r.stdout
    assert "reconstruction (2, 1, 32, 32, 32)" in r.stdout
    assert "PSAT 57." in r.stdout  # the paper's configuration, with 256-wide tokens projected


@pytest.mark.slow
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


@pytest.mark.slow
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


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subcommands(sub):
                    yield f"{name} {inner}", subsub


def test_every_command_and_option_is_described_and_the_shared_flags_mean_one_thing():
    """A description for every sub-command, help for every option; -c is nnU-Net's configuration wherever it exists;
    --device accepts the same names in every command (auto, cpu, cuda, cuda:N)."""
    import argparse

    from med3dinsight_plugin.cli import build_parser

    commands = dict(_subcommands(build_parser()))
    assert {"demo", "pretrain", "nnunet-attach", "study", "cache verify", "models"} <= set(commands)
    devices = []
    for name, p in commands.items():
        assert p.description and len(p.description) > 20, name
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if "-c" in action.option_strings:
                assert action.dest == "configuration", name
            if "--device" in action.option_strings:
                devices.append((name, action))
    assert {n for n, _ in devices} == {"demo", "caption", "embed", "pretrain", "study", "models"}
    for name, action in devices:
        for good in ("auto", "cpu", "cuda", "cuda:1"):
            assert action.type(good) == good, (name, good)
        for bad in ("mps", "meta", "cuda:", "gpu"):
            with pytest.raises(argparse.ArgumentTypeError, match="must be auto, cpu, cuda or cuda:N"):
                action.type(bad)


def test_attach_with_a_checkpoint_after_c_says_c_is_the_configuration_now(capsys, tmp_path):
    from med3dinsight_plugin import cli

    ckpt = tmp_path / "encoder.safetensors"
    assert cli.main(["nnunet-attach", "-d", "990", "-c", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-c is nnU-Net's configuration" in err[0] and f"--checkpoint '{ckpt}'" in err[0], err
    assert cli.main(["nnunet-attach", "-d", "990"]) == 2
    assert "--checkpoint is required: the pretrained checkpoint" in capsys.readouterr().err


def test_nnunet_gets_its_own_device_name_and_gpu_n_through_the_environment():
    from nnunet_trainers.shim import nnunet_device

    assert nnunet_device("cuda", {}) == ("cuda", {})
    assert nnunet_device("cuda:1", {}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    assert nnunet_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"}) == ("cuda", {"CUDA_VISIBLE_DEVICES": "6"})
    dev, env = nnunet_device("cpu", {"nnUNet_n_proc_DA": "3"})
    assert dev == "cpu" and env == {"nnUNet_n_proc_DA": "3", "nnUNet_def_n_proc": "1"}
    for bad in ("mps", "cuda:", "cpu:0", "cuda:x", "auto"):
        with pytest.raises(ValueError, match="not a device for nnU-Net"):
            nnunet_device(bad, {})


def test_print_config_lists_every_key_with_its_default_and_meaning_as_a_valid_config(capsys, tmp_path, monkeypatch):
    """``pretrain --print-config`` needs no data, cache or output, runs nothing, and prints YAML whose comments name
    every key dotted with its help; read back with --config it is the defaults."""
    from med3dinsight_plugin import cli, schema
    from med3dinsight_plugin.pretrain.config import PretrainConfig, load_config

    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written
    for entry in schema.entries(PretrainConfig):
        assert f"# {entry.key}: {entry.rules.help}\n" in text, entry.key
    assert "  # train.warmup_steps: linear warm-up steps" in text and "\n  warmup_steps: 500\n" in text
    saved = tmp_path / "run.yaml"
    saved.write_text(text)
    assert load_config(saved).to_dict() == PretrainConfig().to_dict()


def test_print_config_shows_the_values_of_config_set_and_the_shortcuts(capsys, tmp_path):
    from med3dinsight_plugin import cli
    from med3dinsight_plugin.pretrain.config import load_config

    given = tmp_path / "given.yaml"
    given.write_text("model:\n  psat: small\n  backbone_kwargs: {feature_size: 24}\ntrain:\n  lr: 3e-4\n")
    overrides = ["train.warmup_steps=20", "model.patch_size=[64,64,64]", "model.backbone_kwargs.depths=[1,1,1,1]",
                 "data.target_spacing=[1.5, 1, 1]", "output='runs/my run: 1'"]
    assert cli.main(["pretrain", "--print-config", "--config", str(given), "--steps", "200", "--set",
                     *overrides]) == 0
    text = capsys.readouterr().out
    for line in ("  steps: 200", "  lr: 0.0003", "  warmup_steps: 20", "  psat: small", "  patch_size: [64, 64, 64]",
                 "  backbone_kwargs: {feature_size: 24, depths: [1, 1, 1, 1]}", "  target_spacing: [1.5, 1.0, 1.0]"):
        assert f"\n{line}\n" in text, line
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    expected = load_config(given, ["train.steps=200", *overrides])
    assert load_config(printed).to_dict() == expected.to_dict()
    assert expected.output == "runs/my run: 1"
    assert cli.main(["pretrain", "--print-config", "--set", "train.stpes=3"]) == 2  # a bad key is still refused
    assert "did you mean 'train.steps'?" in capsys.readouterr().err
