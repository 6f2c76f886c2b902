"""``med3dinsight study`` end to end with PyPI's unmodified nnunetv2 (``nnUNetv2_train`` subprocesses, CPU), and the
study's statistics."""
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_tool as run
from helpers import tiny_backbone
from med3dinsight_plugin import build_backbone, save_pretrained
from med3dinsight_plugin.synthetic import write_nnunet_raw_dataset
from nnunet_trainers.study import STUDY_KEY, bootstrap_interval, paired_differences, summary_markdown

BIN = Path(sys.executable).parent
DATASET = "992"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_nnunet_raw_dataset(root / "raw", dataset_id=992, cases=5)  # nnU-Net's 5-fold split needs 5 cases
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1"}
    for key in ("nnUNet_n_proc_DA", "MED3DINSIGHT_CHECKPOINT", "nnUNet_extTrainer"):
        env.pop(key, None)  # the study sets what training needs itself
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    return {"env": env, "root": root, "pre": root / "pre" / "Dataset992_Tiny"}


def _plans_of(out):
    folder = out / "nnUNet_preprocessed" / "Dataset992_Tiny"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("nnUNetPlans__study_*.json")}


@pytest.mark.slow
def test_study_end_to_end(dataset, tmp_path):
    env, pre = dataset["env"], dataset["pre"]
    user_files = sorted(p.name for p in pre.iterdir())
    torch.manual_seed(1234)  # not the study's seed 0: the "pretrained" encoder must differ from scratch's init
    ckpt = save_pretrained(build_backbone("nnunet", plans=pre / "nnUNetPlans.json"), tmp_path / "pre.safetensors")
    out = tmp_path / "study"
    args = ["med3dinsight", "study", "-d", DATASET, "-c", "3d_fullres", "--init", "scratch", "--init",
            f"pre={ckpt}", "--labelled", "1", "2", "--seeds", "0", "--epochs", "1", "--iterations", "2",
            "--device", "cpu", "-o", out]
    r = run(args, env)
    assert "[4/4] done pre, 2 labelled, seed 0: mean Dice" in r.stdout and "4 to train" in r.stdout
    for name in ("results.csv", "summary.md", "label_efficiency.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {(r["init"], r["labelled"]) for r in rows} == {
        (i, n) for i in ("scratch", "pre") for n in ("1", "2")}
    assert all(math.isfinite(float(r["mean_dice"])) and math.isfinite(float(r["dice_box"])) for r in rows)
    summary = (out / "summary.md").read_text()
    assert "Paired difference to scratch" in summary and "| pre | 2 |" in summary and "(n=1)" in summary
    # one seed and one held-out case: no interval, and the table says why and how many units it has
    assert "| too few seeds for a 95 % interval (needs 5) | 1 seed x 1 case |" in summary
    assert "This table holds 2 comparisons" in summary

    plans = _plans_of(out)
    assert len(plans) == 4
    entries = {(p[STUDY_KEY]["init"], p[STUDY_KEY]["labelled"]): p[STUDY_KEY] for p in plans.values()}
    # nested subsets of the fold's training cases, the same held-out cases everywhere, disjoint from training
    splits = json.loads((pre / "splits_final.json").read_text()) if (pre / "splits_final.json").exists() else None
    for init in ("scratch", "pre"):
        assert set(entries[(init, 1)]["train_cases"]) < set(entries[(init, 2)]["train_cases"])
    assert entries[("scratch", 2)]["train_cases"] == entries[("pre", 2)]["train_cases"]
    held_out = {tuple(e["val_cases"]) for e in entries.values()}
    assert len(held_out) == 1 and not set(next(iter(held_out))) & set(entries[("pre", 2)]["train_cases"])
    # nnU-Net's per-case Dice of the held-out cases, a column each
    assert {k for k in rows[0] if k.startswith("dice[")} == {f"dice[{c}]" for c in next(iter(held_out))}
    assert splits is None  # the user's preprocessed folder got no split file (nor anything else)
    assert sorted(p.name for p in pre.iterdir()) == user_files
    # scratch and pretrained plans differ only in the checkpoint (and the names saying so)
    by_name = {(p[STUDY_KEY]["init"], p[STUDY_KEY]["labelled"]): p for p in plans.values()}
    strip = lambda p: {**{k: v for k, v in p.items() if k not in ("plans_name", "med3dinsight")},  # noqa: E731
                       STUDY_KEY: {k: v for k, v in p[STUDY_KEY].items() if k not in ("init", "checkpoint", "sha256")}}
    assert strip(by_name[("scratch", 2)]) == strip(by_name[("pre", 2)])
    assert by_name[("scratch", 2)][STUDY_KEY]["checkpoint"] is None
    assert by_name[("pre", 2)][STUDY_KEY]["checkpoint"] == str(ckpt.resolve())
    assert by_name[("pre", 2)][STUDY_KEY]["sha256"] == by_name[("pre", 2)]["med3dinsight"]["sha256"]
    assert by_name[("scratch", 2)][STUDY_KEY]["sha256"] is None
    # the pretrained run loaded its weights, the scratch run did not
    folders = {f.parent.name.split("__")[2]: f for f in (out / "nnUNet_results").glob("*/*/fold_0")}
    pre_fold = next(f for n, f in folders.items() if n.startswith("study_pre_L2"))
    scratch_fold = next(f for n, f in folders.items() if n.startswith("study_scratch_L2"))
    assert json.loads((pre_fold / "pretrained_load_report.json").read_text())["coverage"] == 100.0
    assert not (scratch_fold / "pretrained_load_report.json").exists()

    # resumable: nothing is trained again
    again = run(args, env)
    assert "4 finished already, 0 to train" in again.stdout and "training" not in again.stdout.replace(
        "0 to train", "")
    assert list(csv.DictReader((out / "results.csv").open())) == rows


@pytest.mark.slow
def test_study_refuses_before_training(dataset, tmp_path):
    env, pre = dataset["env"], dataset["pre"]
    plain = save_pretrained(build_backbone("nnunet", plans=pre / "nnUNetPlans.json"), tmp_path / "plain.safetensors")
    other = save_pretrained(tiny_backbone("resenc_unet"), tmp_path / "resenc.safetensors")
    swin = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "swin.safetensors")
    cases = [
        (["--init", "scratch", "--init", f"bad={other}"], "--init bad=", "does not fit"),
        (["--init", f"plain={plain}", "--init", f"swin={swin}"], "--init swin builds SwinUNETRForNNUNet",
         "one architecture"),
        (["--init", "scratch", "--labelled", "9"], "--labelled '9'", "from 1 to 4"),
        (["--init", "scratch", "--labelled", "\u00b2"], "--labelled '\u00b2'", "from 1 to 4"),  # '²'.isdigit()
        (["--init", "scratch", "--seeds", "-1"], "--seeds -1", "from 0 to 4294967295"),
        (["--init", "scratch", "--seeds", str(2 ** 70), "--dry-run"], f"--seeds {2 ** 70}", "from 0 to"),
        (["--init", "scratch", "--seeds", "2**70", "--dry-run"], "--seeds", "invalid int value: '2**70'"),
        (["--init", "scratch", "--seeds", "1", "1"], "--seeds 1 1", "distinct"),
    ]
    for i, (extra, *messages) in enumerate(cases):
        out = tmp_path / f"out_{i}"
        r = run(["med3dinsight", "study", "-d", DATASET, "--device", "cpu", "--epochs", "1", "--iterations", "1",
                 "-o", out, *extra], env, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(m in r.stderr for m in messages), r.stderr
        assert not (out / "nnUNet_results").exists() and "training" not in r.stdout


def _results(out):
    return {r["init"]: r for r in csv.DictReader((out / "results.csv").open())}


@pytest.mark.slow
def test_a_replaced_checkpoint_trains_new_runs_and_keeps_the_old_ones(dataset, tmp_path):
    # issue #22: runs were keyed by the checkpoint's path; a file replaced there reported the old weights' Dice and
    # the plans copy was rewritten to claim the new file's sha256
    from med3dinsight_plugin.fileio import sha256_file

    env, pre = dataset["env"], dataset["pre"]
    ckpt, out = tmp_path / "run" / "med3dinsight.safetensors", tmp_path / "study"
    versions = {}
    for seed in (1, 2):  # two pretrainings written to the same path, one after the other
        torch.manual_seed(seed)
        versions[seed] = save_pretrained(build_backbone("nnunet", plans=pre / "nnUNetPlans.json"),
                                         tmp_path / f"v{seed}.safetensors").read_bytes()
    args = ["med3dinsight", "study", "-d", DATASET, "--init", f"pre={ckpt}", "--labelled", "1", "--seeds", "0",
            "--epochs", "1", "--iterations", "1", "--device", "cpu", "-o", out]
    ckpt.parent.mkdir()
    ckpt.write_bytes(versions[1])
    sha1 = sha256_file(ckpt)
    assert "1 runs trained, 0 already finished" in run(args, env).stdout
    first = _results(out)["pre"]
    assert first["checkpoint_sha256"] == sha1

    ckpt.write_bytes(versions[2])  # replaced in place
    sha2 = sha256_file(ckpt)
    r = run(args, env)
    assert "1 runs trained, 0 already finished" in r.stdout, r.stdout
    assert f"--init pre: {ckpt.resolve()} now has sha256 {sha2[:12]}" in r.stdout and sha1[:12] in r.stdout
    second = _results(out)["pre"]
    assert second["checkpoint_sha256"] == sha2 and len(_results(out)) == 1  # the old run is not summarised
    # every plans copy claims the hash it was trained with; the first one was not rewritten
    plans = _plans_of(out)
    assert {p[STUDY_KEY]["sha256"] for p in plans.values()} == {sha1, sha2}
    for name, p in plans.items():
        assert name.endswith(p[STUDY_KEY]["sha256"][:12]) and p["med3dinsight"]["sha256"] == p[STUDY_KEY]["sha256"]
    folders = {f.parent.name.split("__")[2][-12:]: f for f in (out / "nnUNet_results").glob("*/*/fold_0")}
    assert set(folders) == {sha1[:12], sha2[:12]}
    reported = json.loads((folders[sha2[:12]] / "validation" / "summary.json").read_text())
    assert float(second["mean_dice"]) == pytest.approx(reported["foreground_mean"]["Dice"])
    log = (out / "logs" / f"{'__'.join(folders[sha2[:12]].parent.name.split('__')[1:3])}.log").read_text()
    assert "changed since" not in log  # the new run loaded the new file

    ckpt.write_bytes(versions[1])  # the first file back: its runs are found again, nothing is trained
    r = run(args, env)
    assert "0 runs trained, 1 already finished" in r.stdout and _results(out)["pre"] == first


class FakeTrain:
    """Stands in for ``study._launch`` (the ``nnUNetv2_train`` subprocess): writes the run's validation/summary.json
    as nnU-Net does (per-case Dice from ``dice(entry, case)``), and calls ``hook(call number, entry, log)`` first."""

    def __init__(self, dice=lambda entry, case: 0.5, hook=None):
        self.dice, self.hook, self.calls = dice, hook, 0

    def __call__(self, command, env, log_file):
        dataset, configuration, fold = command[1:4]
        plans_name, trainer = command[command.index("-p") + 1], command[command.index("-tr") + 1]
        entry = json.loads((Path(env["nnUNet_preprocessed"]) / dataset / f"{plans_name}.json").read_text())[STUDY_KEY]
        self.calls += 1
        with open(log_file, "w") as log:
            if self.hook:
                self.hook(self.calls, entry, log)
        folder = Path(env["nnUNet_results"]) / dataset / f"{trainer}__{plans_name}__{configuration}" / f"fold_{fold}"
        (folder / "validation").mkdir(parents=True)
        cases = [{"reference_file": f"/gt/{case}.nii.gz", "prediction_file": f"{folder}/validation/{case}.nii.gz",
                  "metrics": {"1": {"Dice": self.dice(entry, case), "IoU": 0.0}}} for case in entry["val_cases"]]
        dice = float(np.nanmean([c["metrics"]["1"]["Dice"] for c in cases]))
        (folder / "validation" / "summary.json").write_text(json.dumps(
            {"foreground_mean": {"Dice": dice}, "mean": {"1": {"Dice": dice}}, "metric_per_case": cases}))
        return 0


def test_a_checkpoint_changed_during_the_study_is_never_recorded(dataset, tmp_path, monkeypatch):
    from nnunet_trainers import study

    monkeypatch.setenv("nnUNet_preprocessed", str(dataset["root"] / "pre"))
    pre = dataset["pre"]
    torch.manual_seed(1)
    ckpt = save_pretrained(build_backbone("nnunet", plans=pre / "nnUNetPlans.json"), tmp_path / "a.safetensors")
    other = save_pretrained(build_backbone("nnunet", plans=pre / "nnUNetPlans.json"), tmp_path / "b.safetensors")
    settings = dict(labelled=["1", "2"], seeds=[0], epochs=1, iterations=1, device="cpu", log=lambda line: None)

    def replace_after_first(call, entry, stdout):  # the file is replaced while the first run trains
        if call == 1:
            ckpt.write_bytes(other.read_bytes())
    monkeypatch.setattr(study, "_launch", FakeTrain(hook=replace_after_first))
    with pytest.raises(study.StudyError, match=r"--init pre: .*a\.safetensors changed while the study ran"):
        study.run_study(DATASET, [("pre", ckpt)], tmp_path / "out1", **settings)
    assert len(list((tmp_path / "out1" / "nnUNet_results").glob("*/*/fold_0"))) == 1  # the first run is kept

    def trainer_saw_another_file(call, entry, stdout):  # replaced between the check and the trainer's load
        stdout.write(f"WARNING: {entry['checkpoint']} changed since it was attached to these plans\n")
    monkeypatch.setattr(study, "_launch", FakeTrain(hook=trainer_saw_another_file))
    with pytest.raises(study.StudyError, match="changed while .* started .* that run was removed"):
        study.run_study(DATASET, [("pre", ckpt)], tmp_path / "out2", **settings)
    assert not list((tmp_path / "out2" / "nnUNet_results").glob("*/*/fold_0"))
    assert not (tmp_path / "out2" / "results.csv").exists()


def test_swin_unetr_study_compares_inits_on_the_checkpoints_architecture(dataset, tmp_path, monkeypatch):
    from nnunet_trainers.study import run_study

    monkeypatch.setenv("nnUNet_preprocessed", str(dataset["root"] / "pre"))
    swin = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "swin.safetensors")
    lines = []
    result = run_study(DATASET, [("scratch", None), ("swin", swin)], tmp_path / "out", labelled=["2", "all"],
                       seeds=[0, 1], epochs=1, iterations=1, device="cpu", reference=True, log=lines.append,
                       dry_run=True)
    assert len(result.runs) == 12 and result.trained == 0 and not (tmp_path / "out" / "nnUNet_results").exists()
    assert sum("to train:" in line for line in lines) == 12
    arch = {r.init: (r.trainer, r.plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"],
                     r.plans["configurations"]["3d_fullres"]["patch_size"]) for r in result.runs}
    swin_arch = ("nnunet_trainers.networks.SwinUNETRForNNUNet", [64, 64, 64])
    assert arch["scratch"] == ("Med3DInsightTrainer_SwinUNETR_study", *swin_arch) == arch["swin"]
    assert arch["nnunet"][0] == "nnUNetTrainer_med3dinsightStudy" and "PlainConvUNet" in arch["nnunet"][1]
    # per seed one permutation: the 2-case subset lies inside 'all'; seeds draw different subsets
    cases = {(r.init, r.labelled_arg, r.seed): r.plans[STUDY_KEY]["train_cases"] for r in result.runs}
    assert all(set(cases[(i, "2", s)]) < set(cases[(i, "all", s)]) for i in ("scratch", "swin") for s in (0, 1))
    assert cases[("scratch", "2", 0)] == cases[("nnunet", "2", 0)] != cases[("scratch", "2", 1)]


def _held_out_copy(dataset, tmp_path, held_out):
    """A copy of the preprocessed dataset whose folds hold out ``held_out`` (for FakeTrain, which reads no data)."""
    import shutil

    root = tmp_path / "pre"
    shutil.copytree(dataset["pre"], root / "Dataset992_Tiny", symlinks=True)
    split = {"train": ["t0", "t1", "t2"], "val": list(held_out)}
    (root / "Dataset992_Tiny" / "splits_final.json").write_text(json.dumps([split] * 5))
    return root


def test_study_compares_inits_per_case_with_intervals_that_state_their_n(dataset, tmp_path, monkeypatch):
    from med3dinsight_plugin.stats import hierarchical_bootstrap
    from nnunet_trainers import study

    cases = [f"v{i}" for i in range(6)]
    monkeypatch.setenv("nnUNet_preprocessed", str(_held_out_copy(dataset, tmp_path, cases)))
    ckpt = save_pretrained(build_backbone("nnunet", plans=dataset["pre"] / "nnUNetPlans.json"),
                           tmp_path / "pre.safetensors")

    def effect(seed, case):  # pre - scratch: 0.04 on average, every case and seed positive
        return 0.04 + 0.005 * (seed - 2.5) + 0.01 * (cases.index(case) - 2.5)

    def dice(entry, case):
        base = 0.5 + 0.03 * cases.index(case) + 0.02 * np.sin(entry["seed"] + entry["labelled"])
        return base + (effect(entry["seed"], case) if entry["init"] == "pre" else 0.0)

    monkeypatch.setattr(study, "_launch", FakeTrain(dice))
    result = study.run_study(DATASET, [("scratch", None), ("pre", ckpt)], tmp_path / "out", labelled=["1", "3"],
                             seeds=range(6), epochs=1, iterations=1, device="cpu", log=lambda line: None)
    assert result.trained == 24
    rows = list(csv.DictReader(result.results_csv.open()))
    assert len(rows) == 24 and [k for k in rows[0] if k.startswith("dice[")] == [f"dice[{c}]" for c in cases]
    row = next(r for r in rows if (r["init"], r["labelled"], r["seed"]) == ("pre", "3", "4"))
    assert float(row["dice[v2]"]) == pytest.approx(dice({"init": "pre", "seed": 4, "labelled": 3}, "v2"))
    assert row["checkpoint_sha256"] and not next(r for r in rows if r["init"] == "scratch")["checkpoint_sha256"]

    comparisons = study.compare(result.rows, [("pre", "scratch")])
    assert [(c.init, c.labelled) for c in comparisons] == [("pre", 1), ("pre", 3)]
    table = [[effect(s, c) for c in cases] for s in range(6)]
    for c in comparisons:
        expected = hierarchical_bootstrap(table, shared_inner=True, seed=0)  # paired by case, seed and labelled
        got = c.estimate
        assert (got.mean, got.low, got.high) == pytest.approx((expected.mean, expected.low, expected.high), abs=1e-9)
        assert (got.n, got.inner_n, got.method, got.valid) == (expected.n, expected.inner_n, expected.method, True)
        assert c.estimate.mean == pytest.approx(0.04) and c.estimate.valid and c.estimate.excludes(0.0)
        assert c.estimate.sample == "6 seeds x 6 cases"
        assert c.p == 2 / 64 and c.p_holm == pytest.approx(2 * 2 / 64)  # exact over seeds; Holm over 2
    summary = result.summary_md.read_text()
    assert "This table holds 2 comparisons; p (Holm) is adjusted over all 2 of them" in summary
    low, high = comparisons[0].estimate.low, comparisons[0].estimate.high
    assert f"| pre | 1 | 0.0400 | [{low:.4f}, {high:.4f}] | 6 seeds x 6 cases | 0.0312 | 0.0625 |" in summary

    # the same study with 3 seeds: no interval, the label says so
    few = study.summary_markdown([r for r in result.rows if r["seed"] < 3], ["scratch", "pre"], 6, 0, "3d_fullres",
                                 1, 1)
    assert "| pre | 3 | " in few and "| too few seeds for a 95 % interval (needs 5) | 3 seeds x 6 cases | 0.25 |" in few


def test_case_dice_from_nnunets_summary():
    from nnunet_trainers.study import _case_dice

    dataset_json = {"labels": {"background": 0, "liver": 1, "tumour": 2, "both": [1, 2]}, "file_ending": ".nii.gz"}
    summary = {"metric_per_case": [
        {"reference_file": "/gt/liver_001.nii.gz", "metrics": {"1": {"Dice": 0.9}, "2": {"Dice": 0.5},
                                                               "(1, 2)": {"Dice": 0.7}}},
        {"reference_file": "/gt/liver_000.nii.gz", "metrics": {"1": {"Dice": 0.8}, "2": {"Dice": float("nan")},
                                                               "(1, 2)": {"Dice": 0.8}}},  # no tumour in either
        {"reference_file": "/gt/liver_002.nii.gz", "metrics": {"1": {"Dice": float("nan")}, "2": {"Dice": None}}}]}
    out = _case_dice(summary, dataset_json)
    assert list(out) == ["liver_000", "liver_001", "liver_002"]
    assert out["liver_001"] == pytest.approx(0.7) and out["liver_000"] == pytest.approx(0.8)
    assert math.isnan(out["liver_002"])


def test_summary_of_rows_without_cases_uses_a_t_interval_over_seeds():
    # rows as benchmarks/simulation.py writes them: one mean Dice per run
    rows = [{"init": i, "labelled": 2, "seed": s, "mean_dice": 0.5 + (0.02 + 0.01 * (s % 3) if i == "ot" else 0.0)}
            for i in ("scratch", "ot") for s in range(6)]
    text = summary_markdown(rows, ["scratch", "ot"], 8, 0, "simulation", None, None, header=["# sim"])
    diffs = [0.02 + 0.01 * (s % 3) for s in range(6)]
    from med3dinsight_plugin.stats import t_interval

    est = t_interval(diffs, unit="seeds")
    assert "Paired difference to scratch (same seed and labelled count)" in text and "Student-t interval" in text
    assert f"| ot | 2 | 0.0300 | [{est.low:.4f}, {est.high:.4f}] | 6 seeds | 0.0312 | 0.0312 |" in text
    three = summary_markdown([r for r in rows if r["seed"] < 3], ["scratch", "ot"], 8, 0, "simulation", None, None)
    assert "| ot | 2 | 0.0300 | too few for a 95 % interval (needs 5) | 3 seeds | 0.25 | 0.25 |" in three


def test_bootstrap_interval_of_a_paired_difference():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.05, 0.1, size=5), rng.normal(0.05, 0.1, size=200)
    first = bootstrap_interval(small, seed=3)
    assert first == bootstrap_interval(small, seed=3)  # deterministic with a seed
    assert first != bootstrap_interval(small, seed=4)
    mean, low, high = first
    assert mean == pytest.approx(small.mean()) and low <= mean <= high
    m2, low2, high2 = bootstrap_interval(large, seed=3)
    assert low2 <= m2 <= high2 and high2 - low2 < (high - low) / 2  # width shrinks with n (~ 1/sqrt(n))
    assert bootstrap_interval([0.2]) == (0.2, 0.2, 0.2)
    assert all(math.isnan(v) for v in bootstrap_interval([float("nan")]))


def test_paired_differences_match_seed_and_labelled():
    rows = [{"init": i, "labelled": n, "seed": s, "mean_dice": d} for i, n, s, d in [
        ("scratch", 2, 0, 0.5), ("scratch", 2, 1, 0.4), ("ot", 2, 0, 0.7), ("ot", 2, 1, 0.3), ("ot", 5, 0, 0.9)]]
    diffs = paired_differences(rows, "ot")
    assert list(diffs) == [2] and diffs[2] == pytest.approx([0.2, -0.1])  # labelled 5 has no scratch partner


def test_identical_captions_warn_once_and_the_plot_shows_text_chance(tmp_path, capsys):
    # (pretraining diagnostics, issue "[study]" part 3)
    from med3dinsight_plugin.pretrain.diagnostics import MetricsLog, plot_metrics, retrieval_metrics

    torch.manual_seed(0)
    z, image = torch.randn(20, 8), torch.randn(20, 8)
    same = retrieval_metrics(z, image, torch.ones(20, 8))  # every held-out slice has the same caption
    assert same["text_top1"] == 1.0 and same["text_chance_top1"] == 1.0 and same["text_distinct"] == pytest.approx(0.05)
    varied = retrieval_metrics(z, image, torch.randn(20, 8))
    assert varied["text_distinct"] == pytest.approx(1.0) and varied["image_distinct"] == pytest.approx(1.0)

    log = MetricsLog(tmp_path, total=2, start=0, progress=False)
    log.write({"step": 0, **{f"eval/{k}": v for k, v in varied.items()}})
    assert "warning" not in capsys.readouterr().err
    log.write({"step": 1, **{f"eval/{k}": v for k, v in same.items()}})
    log.write({"step": 2, **{f"eval/{k}": v for k, v in same.items()}})
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning: only 5% of the held-out captions are distinct") == 1 and "1.00 by chance" in err

    # the plot draws the text chance level: the image differs from the same log without it
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    without = tmp_path / "without.jsonl"
    without.write_text("".join(json.dumps({k: v for k, v in r.items() if "text_chance" not in k}) + "\n"
                               for r in records))
    with_png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "with.png").read_bytes()
    assert with_png != plot_metrics(without, tmp_path / "without.png").read_bytes()


def test_a_device_nnunet_cannot_take_is_refused_before_anything_is_written(tmp_path):
    from nnunet_trainers.study import StudyError, run_study

    for bad in ("mps", "cuda:", "cpu:0"):
        with pytest.raises(StudyError, match=f"--device '{bad}': use cuda, cuda:N or cpu"):
            run_study("990", [("scratch", None)], tmp_path / "study", device=bad)
    assert not (tmp_path / "study").exists()
