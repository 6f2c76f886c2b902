"""The bad-input catalogue of ``med3dinsight pretrain``: each mistake gives one line on stderr naming the file or key
and what to do, exit code 2, no traceback, and no checkpoint or half-written file left behind."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import PAPER_RECIPE, ct_like, ct_world, write_nifti
from med3dinsight_plugin.cli import main
from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip

COMMON = ["model.patch_size=[32,32,32]", "model.psat=small", "train.steps=1", "data.num_workers=0",
          "data.eval_cases=0"]
TINY = ["--set", *PAPER_RECIPE,
        "model.backbone=plain_conv_unet", "model.backbone_kwargs={base_features: 4, max_features: 16}",
        *COMMON]


_nifti, _good = write_nifti, ct_like


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return ct_world(tmp_path_factory.mktemp("bad"))


def _pretrain(capsys, *args):
    code = main(["pretrain", *[str(a) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_clean_failure(code, err, *needles, out=None):
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]
    if out is not None and Path(out).exists():
        written = {p.name for p in Path(out).rglob("*")}
        assert not written & {"med3dinsight.safetensors", "last.pt", "config.yaml"}, written
        assert not [n for n in written if n.endswith(".tmp")]


def _vols_with(base, tmp_path, name, array=None, raw=None):
    vols = tmp_path / "vols"
    shutil.copytree(base / "vols", vols)
    if array is not None:
        _nifti(vols / name, array)
    if raw is not None:
        (vols / name).write_bytes(raw)
    return vols


def _truncated(base):
    data = (base / "vols" / "case0.nii.gz").read_bytes()
    return data[: len(data) // 3]


VOLUME_CASES = {
    "unreadable": dict(raw=b"not a nifti file at all"),
    "truncated": dict(raw=None),  # filled in from a real file
    "2d": dict(array=np.ones((32, 32), np.float32)),
    "4d": dict(array=np.ones((32, 32, 32, 2), np.float32)),
    "nan": dict(array=np.where(np.arange(32 ** 3).reshape(32, 32, 32) == 5, np.nan, 1.0).astype(np.float32)),
    "inf": dict(array=np.where(np.arange(32 ** 3).reshape(32, 32, 32) == 5, np.inf, 1.0).astype(np.float32)),
    "all_zero": dict(array=np.zeros((32, 32, 32), np.float32)),
}


@pytest.mark.parametrize("kind", sorted(VOLUME_CASES))
def test_bad_volume(base, tmp_path, capsys, kind):
    spec = dict(VOLUME_CASES[kind])
    if kind == "truncated":
        spec["raw"] = _truncated(base)
    vols = _vols_with(base, tmp_path, "zbad.nii.gz", **spec)
    out = tmp_path / "run"
    code, err = _pretrain(capsys, "--data", vols, "--cache", base / "cache", "-o", out, *TINY)
    _assert_clean_failure(code, err, "zbad.nii.gz", out=out)


def test_empty_folder(tmp_path, base, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _pretrain(capsys, "--data", tmp_path / "empty", "--cache", base / "cache", "-o", tmp_path / "r", *TINY)
    _assert_clean_failure(code, err, "empty", "no .nii/.nii.gz files", out=tmp_path / "r")


def test_missing_data_folder(tmp_path, base, capsys):
    code, err = _pretrain(capsys, "--data", tmp_path / "nope", "--cache", base / "cache", "-o", tmp_path / "r", *TINY)
    _assert_clean_failure(code, err, "nope", "does not exist")


def test_volume_much_smaller_than_the_patch(base, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY,
                          "model.patch_size=[96,96,96]")
    _assert_clean_failure(code, err, "case0", "less than half the patch", "model.patch_size", out=out)


def test_wrong_channel_count(base, tmp_path, capsys):
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", tmp_path / "r", *TINY,
                          "model.in_channels=2")
    _assert_clean_failure(code, err, "1 channel(s)", "model.in_channels=1")


def test_cache_missing_a_case(base, tmp_path, capsys):
    vols = _vols_with(base, tmp_path, "case9.nii.gz", array=_good(seed=9))
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--data", vols, "--cache", base / "cache", "-o", out, *TINY)
    _assert_clean_failure(code, err, "no slices of case 'case9'", "med3dinsight embed", out=out)


def test_cache_from_another_teacher_on_resume(base, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["pretrain", "--data", str(base / "vols"), "--cache", str(base / "cache"), "-o", str(out), *TINY]) == 0
    capsys.readouterr()
    other = save_tiny_open_clip(tmp_path / "clip2", seed=3)
    assert main(["embed", str(base / "vols"), "-o", str(tmp_path / "cache2"), "--clip-model", str(other),
                 "--per-plane", "4", "--modality", "ct"]) == 0
    capsys.readouterr()
    before = (out / "med3dinsight.safetensors").read_bytes()
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", tmp_path / "cache2", "-o", out, *TINY)
    assert code == 2 and len(err) == 1 and "another teacher cache" in err[0] and str(out) in err[0]
    assert (out / "med3dinsight.safetensors").read_bytes() == before


def test_not_a_cache(base, tmp_path, capsys):
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "vols", "-o", tmp_path / "r", *TINY)
    _assert_clean_failure(code, err, "not a finished teacher cache", "med3dinsight embed")


def test_config_typo(base, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  lr_rate: 0.001\n")
    code, err = _pretrain(capsys, "--config", cfg, "--data", base / "vols", "--cache", base / "cache", "-o",
                          tmp_path / "r")
    _assert_clean_failure(code, err, "lr_rate", "run.yaml", "did you mean 'train.lr'")


def test_config_not_yaml(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: [unclosed\n")
    code, err = _pretrain(capsys, "--config", cfg)
    _assert_clean_failure(code, err, "run.yaml", "not valid YAML")


def test_unknown_backbone(base, tmp_path, capsys):
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", tmp_path / "r", *TINY,
                          "model.backbone=resnet50")
    _assert_clean_failure(code, err, "resnet50", "swin_unetr")


def test_patch_the_network_cannot_take(base, tmp_path, capsys):
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", tmp_path / "r", "--set",
                          *COMMON, "model.backbone=swin_unetr", "model.patch_size=[48,48,48]")
    _assert_clean_failure(code, err, "divisible by", "(32, 32, 32)")


def test_nnunet_backbone_without_plans(base, tmp_path, capsys):
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", tmp_path / "r", "--set",
                          *COMMON, "model.backbone=nnunet")
    _assert_clean_failure(code, err, "model.backbone 'nnunet' needs nnU-Net plans")


def test_unwritable_output(base, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", tmp_path / "file" / "run",
                          *TINY)
    _assert_clean_failure(code, err, "cannot write to the output folder", "-o/--output")


def test_resume_with_a_changed_config(base, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["pretrain", "--data", str(base / "vols"), "--cache", str(base / "cache"), "-o", str(out), *TINY]) == 0
    capsys.readouterr()
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY,
                          "train.lr=0.5")
    assert code == 2 and len(err) == 1 and "train.lr" in err[0]


@pytest.mark.slow
def test_errors_from_the_installed_command_are_one_line(base, tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "med3dinsight"), "pretrain", "--data",
                           str(tmp_path / "nope"), "--cache", str(base / "cache"), "-o", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("setting, needle", [
    ("train.seed=1180591620717411303424", "train.seed"),  # 2**70
    ("data.seed=-1", "data.seed"),
    ("data.crop_seed=-3", "data.crop_seed"),
    ("train.device=meta", "train.device"),
])
def test_out_of_range_settings_are_refused_where_they_enter(base, tmp_path, capsys, setting, needle):
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY, setting)
    _assert_clean_failure(code, err, needle, out=out)


@pytest.mark.parametrize("content, needle", [
    (b"train:\n  lr: \xff\xfe\n", "not UTF-8"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "too deeply"),
    (b"train:\n" + b"".join(b"  " * (i + 1) + b"k: \n" for i in range(3000)), "too deeply"),
])
def test_configs_that_are_not_text_or_nest_too_deeply(base, tmp_path, capsys, content, needle):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--config", config, "--data", base / "vols", "--cache", base / "cache", "-o", out,
                          *TINY)
    _assert_clean_failure(code, err, needle, out=out)


# ------------------------------------- a run that fails before its first step leaves the output as it found it

def _nan_cache(base, tmp_path):
    """A copy of the teacher cache whose first image embedding is NaN (found when pretraining reads it)."""
    import json
    import struct

    cache = Path(shutil.copytree(base / "cache", tmp_path / "nan_cache"))
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + json.loads(data[8:8 + n])["image"]["data_offsets"][0] + 1] = 0x7E  # float16 NaN
    shard.write_bytes(bytes(data))
    return cache


# each discovered after the run folder exists: by the cache check, while preparing the volumes, or when the
# first batch's loss weights are set (after config.yaml and checkpoints/ are written)
LATE_FAILURES = {
    "not a cache": (lambda base, tmp: ["--cache", base / "vols"], [], "not a finished teacher cache"),
    "damaged cache": (lambda base, tmp: ["--cache", _nan_cache(base, tmp)], [], "not finite"),
    "device": (lambda base, tmp: ["--cache", base / "cache"], ["train.device=meta"], "train.device"),
    "refused loss balance": (lambda base, tmp: ["--cache", base / "cache"],
                             ["model.loss_balance.image=1", "model.loss_weights.reconstruction=0"],
                             "model.loss_balance"),
}


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("kind", sorted(LATE_FAILURES))
def test_a_failed_run_leaves_no_folder_it_created(base, tmp_path, capsys, kind):
    from helpers import one_line_failure

    cache, settings, needle = LATE_FAILURES[kind]
    out = tmp_path / "runs" / "abdomen"  # neither folder exists yet
    code, err = _pretrain(capsys, "--data", base / "vols", *cache(base, tmp_path), "-o", out, *TINY, *settings)
    one_line_failure(code, err, needle)
    assert not (tmp_path / "runs").exists(), _tree(tmp_path / "runs")


def test_a_failed_run_leaves_a_folder_the_user_made_as_it_was(base, tmp_path, capsys):
    from helpers import one_line_failure

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY,
                          *LATE_FAILURES["refused loss balance"][1])
    one_line_failure(code, err, "model.loss_balance")
    assert _tree(out) == {"notes.txt": b"my notes"}


@pytest.mark.slow
def test_a_resumed_run_failing_before_its_first_step_leaves_its_files_untouched(base, tmp_path, capsys,
                                                                               monkeypatch):
    """A run resumed with more steps (config.yaml rewritten, metrics.jsonl rewound, a new TensorBoard file) that
    fails before its first step: every file as it was, nothing added. One that fails after a step keeps its files."""
    from helpers import one_line_failure
    from med3dinsight_plugin.errors import Med3DInsightError
    from med3dinsight_plugin.pretrain import engine

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(base / "vols"), "--cache", str(base / "cache"), "-o", str(out),
                 *TINY]) == 0
    capsys.readouterr()
    before = _tree(out)
    step = engine._train_step
    calls = []

    def failing_step(run, batch):
        calls.append(run.step)
        if len(calls) > allowed:
            raise Med3DInsightError("refused at the first batch")
        return step(run, batch)

    monkeypatch.setattr(engine, "_train_step", failing_step)
    allowed = 0
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY,
                          "train.steps=3")
    one_line_failure(code, [line for line in err if line.strip()], "refused at the first batch")  # bar: blank
    assert calls == [1]  # resumed at step 1, failed in its first step
    assert _tree(out) == before
    allowed = 1  # now one step runs, then the run fails: what it wrote stays
    calls.clear()
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY,
                          "train.steps=3")
    one_line_failure(code, [line for line in err if line.strip()], "refused at the first batch")  # bar: blank
    assert calls == [1, 2]
    assert "\n  steps: 3\n" in (out / "config.yaml").read_text() and _tree(out) != before


@pytest.mark.parametrize("view, needle", [("volume", "body box"), ("crop", "less than half the patch")])
def test_a_two_slice_volume_is_refused_by_both_views(tmp_path, capsys, view, needle):
    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(2):
        _nifti(vols / f"case{i}.nii.gz", _good(seed=i))
    thin = _good(seed=5, shape=(32, 32, 2))
    thin[:4] = -1000
    _nifti(vols / "thin.nii.gz", thin)
    clip = save_tiny_open_clip(tmp_path / "clip")
    assert main(["embed", str(vols), "-o", str(tmp_path / "cache"), "--clip-model", str(clip), "--per-plane", "2",
                 "--modality", "ct", "--min-foreground", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--data", vols, "--cache", tmp_path / "cache", "-o", out, *TINY,
                          f"data.view={view}")
    _assert_clean_failure(code, err, "thin", needle, out=out)


@pytest.mark.parametrize("setting, needle", [("data.crop_mm=[40,40,40]", "data.crop_mm"),
                                             ("data.crop_seed=3", "data.crop_seed")])
def test_crop_settings_without_crops_are_refused(base, tmp_path, capsys, setting, needle):
    out = tmp_path / "r"
    code, err = _pretrain(capsys, "--data", base / "vols", "--cache", base / "cache", "-o", out, *TINY, setting)
    _assert_clean_failure(code, err, needle, "data.crops is 0", out=out)
