"""What a newcomer running the README met (issue #22): each defect where the user meets it, mostly through the
command line (``med3dinsight_plugin.cli.main``)."""
import pytest
import torch

from helpers import tiny_backbone
from med3dinsight_plugin import IncompatibleCheckpointError, load_pretrained_encoder, save_pretrained
from med3dinsight_plugin.cli import main


def _cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors exit
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


# ------------------------------------------------------------- 1. another width is not blamed on input channels

@pytest.mark.parametrize("in_channels", [1, 4])
def test_monai_load_of_another_width_names_the_architecture_not_the_channels(tmp_path, in_channels):
    """A SwinUNETR of feature_size 24 (1 or 4 input channels) and a checkpoint of feature_size 12: the refusal says
    that the architecture differs, names a tensor whose shape differs beyond the input channels and the checkpoint's
    architecture arguments, and how to fix it; it no longer says "only 1 -> N can be adapted"."""
    from monai.networks.nets import SwinUNETR

    path = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "fs12.safetensors")  # feature_size 12
    network = SwinUNETR(in_channels=in_channels, out_channels=3, feature_size=24, depths=(1, 1, 1, 1),
                        num_heads=(1, 1, 2, 2))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_pretrained_encoder(network, path)
    line = str(info.value).splitlines()[0]
    assert "only 1 -> N" not in line and "input channel(s)" not in line, line
    assert "the architecture differs" in line
    assert "swinViT.patch_embed.proj.weight is [12, 1, 2, 2, 2] in the checkpoint but " \
           f"[24, {in_channels}, 2, 2, 2] in the model" in line
    assert ("swin_unetr(in_channels=1, patch_size=[64, 64, 64], feature_size=12, depths=[1, 1, 1, 1], "
            "num_heads=[1, 1, 2, 2])") in line
    assert "build the model with these arguments" in line and "med3dinsight inspect" in line
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())  # nothing loaded


def test_the_architecture_fix_of_the_refusal_loads(tmp_path):
    """The arguments the refusal names build a network the checkpoint loads into (4 channels: adapted 1 -> 4)."""
    from monai.networks.nets import SwinUNETR

    path = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "fs12.safetensors")
    network = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    report = load_pretrained_encoder(network, path)
    assert report.coverage == 100.0 and report.adapted


def test_other_depth_and_other_network_are_named(tmp_path):
    path = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "fs12.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match=r"the architecture differs: the model's "
                       r"swinViT\.layers1\.0\.blocks\.1\.\S+ is not in the checkpoint.*depths=\[1, 1, 1, 1\]"):
        load_pretrained_encoder(tiny_backbone("swin_unetr", depths=(2, 2, 2, 2)).network, path)
    with pytest.raises(IncompatibleCheckpointError, match="the checkpoint holds a SwinUNETR, the model is a UNETR"):
        load_pretrained_encoder(tiny_backbone("unetr").network, path)


def test_input_channels_alone_are_still_named_as_such(tmp_path):
    path = save_pretrained(tiny_backbone("resenc_unet", in_channels=2), tmp_path / "two.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match=r"reads 2 input channel\(s\), the model 3; only 1 -> N"):
        load_pretrained_encoder(tiny_backbone("resenc_unet", in_channels=3).network, path)


# ---------------------------------------------------------- 2. inspect prints what the loader's refusal points to

@pytest.mark.parametrize("name, needles", [
    ("swin_unetr", ["feature_size=12", "depths=[1, 1, 1, 1]", "num_heads=[1, 1, 2, 2]"]),
    ("unetr", ["feature_size=8", "hidden_size=48", "mlp_dim=96", "num_heads=4"]),
    ("resenc_unet", ["features_per_stage=[4, 8, 16, 32]", "n_blocks_per_stage=[1, 3, 4, 6]", "strides="]),
])
def test_inspect_prints_the_architecture_arguments(tmp_path, capsys, name, needles):
    path = save_pretrained(tiny_backbone(name), tmp_path / "c.safetensors")
    code, out, err = _cli(capsys, "inspect", path)
    assert code == 0, err
    line = next(row for row in out.splitlines() if row.strip().startswith("architecture"))
    assert "in_channels=1" in line and "patch_size=[" in line, line
    for needle in needles:
        assert needle in line, line


def test_inspect_prints_what_the_refusal_names(tmp_path, capsys):
    """The refusal of item 1 says "The checkpoint is ARGS ... (med3dinsight inspect CHECKPOINT lists them)": inspect
    prints the same ARGS."""
    path = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "fs12.safetensors")
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_pretrained_encoder(tiny_backbone("swin_unetr", feature_size=24).network, path)
    named = str(info.value).split("The checkpoint is ", 1)[1].split("): build", 1)[0] + ")"
    code, out, _ = _cli(capsys, "inspect", path)
    assert code == 0 and f"  architecture  {named}\n" in out, (named, out)


# ---------------------------------------------------------------------- 6. bad numbers of `models`: one line each

@pytest.mark.parametrize("args, needle", [
    (["--batch", "-1"], "--batch -1"),
    (["--batch", "0"], "--batch 0"),
    (["--slices", "0"], "--slices 0"),
    (["--slices", "-2"], "--slices -2"),
    (["--batch", "1", "--slices", "1"], "--batch 1 --slices 1"),
    (["--patch-size", "0", "32", "32"], "--patch-size 0 32 32"),
    (["--patch-size", "-32", "32", "32"], "--patch-size -32 32 32"),
    (["--batch", "two"], "argument --batch"),
    (["--device", "bogus"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--device", "meta"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--batch", str(10 ** 9)], "--batch 1000000000"),  # 10^15 bytes of input: more than any address space
])
def test_models_refuses_bad_numbers_in_one_line(capsys, args, needle):
    from helpers import one_line_failure

    code, _, err = _cli(capsys, "models", "--backbones", "plain_conv_unet", "--patch-size", "32", "32", "32",
                        "--psat", "small", *args)
    one_line_failure(code, err, "med3dinsight models: error: ", needle)


def test_models_device_cuda_without_cuda_is_one_line(capsys):
    from helpers import one_line_failure

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _cli(capsys, "models", "--device", "cuda")
    one_line_failure(code, err, "'--device' is 'cuda' but CUDA is not available")


def test_summarize_refuses_bad_numbers():
    from med3dinsight_plugin.errors import Med3DInsightError
    from med3dinsight_plugin.summary import summarize

    for kwargs, needle in ((dict(batch=-1), "batch must be a positive integer"),
                           (dict(slices=0), "slices must be a positive integer"),
                           (dict(batch=1, slices=1), "at least 2")):
        with pytest.raises(Med3DInsightError, match=needle):
            summarize("plain_conv_unet", (32, 32, 32), **{"batch": 2, "slices": 4, **kwargs})


# ------------------------------------- 4. a run that never leaves its warm-up; 5. only the outputs that exist listed

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A newcomer's short run (train.steps=2 with the default 500 warm-up steps) without TensorBoard installed,
    through the command line; returns (run folder, exit code, stdout lines, stderr lines)."""
    import contextlib
    import io
    import sys

    from helpers import FAST_PRETRAIN, ct_world

    root = ct_world(tmp_path_factory.mktemp("short"))
    out, stdout, stderr = root / "run", io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setitem(sys.modules, "torch.utils.tensorboard", None)  # import torch.utils.tensorboard: ImportError
        code = main(["pretrain", "--data", str(root / "vols"), "--cache", str(root / "cache"), "-o", str(out),
                     "--set", *FAST_PRETRAIN])
    return out, code, stdout.getvalue().splitlines(), stderr.getvalue().splitlines()


def test_a_run_inside_its_warm_up_is_noted_once(short_run):
    _, code, _, err = short_run
    assert code == 0, err
    notes = [line for line in err if "warm" in line]
    assert len(notes) == 1, err
    assert notes[0].startswith("note: train.steps=2 < train.warmup_steps=500"), notes
    assert "4e-08" in notes[0] and "train.warmup_steps=0" in notes[0], notes  # what it reaches, and the fix


def test_warm_up_rule():
    from med3dinsight_plugin.pretrain.config import PretrainConfig
    from med3dinsight_plugin.pretrain.engine import warmup_note

    def note(steps, warmup, start=0, lr=1e-5):
        return warmup_note(PretrainConfig.from_dict({"train": {"steps": steps, "warmup_steps": warmup,
                                                               "lr": lr}}).train, start)
    assert "never leaves its warm-up" in note(4, 500) and "train.warmup_steps=0" in note(4, 500)
    assert "takes 5 of the run's 10 steps" in note(10, 5) and "train.warmup_steps=1" in note(10, 5)
    assert "takes 10 of the run's 10 steps" in note(10, 10)
    assert note(10, 4) is None and note(10000, 500) is None and note(12, 2) is None  # under half: no note
    assert note(0, 500) is None and note(10, 0) is None  # nothing to train, no warm-up
    assert note(1000, 600, start=600) is None  # resumed past the warm-up


def test_metrics_png_of_a_short_run_shows_its_points(short_run):
    """A short run logs one point: the plot marks it (a line through one point draws nothing), shows the learning
    rate it reached, and says why the retrieval panel is empty."""
    import json

    from med3dinsight_plugin.pretrain.diagnostics import metrics_figure

    out, code, _, err = short_run
    assert code == 0 and (out / "metrics.png").is_file(), err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]  # one logged point
    fig = metrics_figure(records)
    ax_loss, ax_lr, ax_ret = fig.axes
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    assert {"loss", "reconstruction"} <= set(lines)
    assert all(line.get_marker() not in (None, "", "None", " ") for line in lines.values())
    (lr,) = ax_lr.get_lines()
    assert lr.get_marker() not in (None, "", "None", " ") and lr.get_ydata()[0] == pytest.approx(4e-08)
    assert any("no held-out evaluation" in t.get_text() for t in ax_ret.texts)
    assert all(tick == int(tick) for tick in ax_loss.get_xticks())  # whole steps


def test_the_run_folder_summary_lists_only_what_exists(short_run):
    out, code, stdout, err = short_run
    assert code == 0, err
    assert not (out / "tensorboard").exists()
    (line,) = [row for row in stdout if row.startswith("run folder:")]
    assert "tensorboard" not in line, line
    assert line == f"run folder: {out} (config.yaml, metrics.jsonl, metrics.png, checkpoints/)", line
