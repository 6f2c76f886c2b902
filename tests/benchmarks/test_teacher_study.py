"""The [evidence] protocol's decision rule (benchmarks/teacher_study.py) on made-up results with known answers."""
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import teacher_study  # noqa: E402

PROTOCOL = teacher_study.TEACHER_PROTOCOL


def _rows(effects, noise=0.002, seed=0, n_seed=None):
    """Frozen-readout rows: R at 0.5 + a per-seed level, each arm R + its effect + noise, 3 fine-tune seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for arm, seeds in PROTOCOL["pretrain_seeds"].items():
        for s in seeds[:n_seed]:
            level = 0.5 + 0.03 * np.sin(s)  # seeds differ, the same for every arm: pairing removes it
            for f in PROTOCOL["readouts"]["frozen"]["finetune_seeds"]:
                rows.append({"arm": arm, "pretrain_seed": s, "finetune_seed": f, "readout": "frozen", "labelled": 1,
                             "mean_dice": level + effects.get(arm, 0.0) + rng.normal(0, noise)})
    return rows


def _decisions(rows):
    return {c["contrast"]: c for c in teacher_study.decide(rows, PROTOCOL)}


def test_a_clear_gain_that_beats_the_negative_control_helps():
    d = _decisions(_rows({"G": 0.05, "D": 0.04, "GT": 0.06, "N": 0.01}))
    assert {k: c["decision"] for k, c in d.items()} == {"G-R": "helps", "D-R": "helps", "GT-R": "helps"}
    g = d["G-R"]
    assert g["n"] == 8 and g["p"] == pytest.approx(2 / 256) and g["ci95"].low > 0
    assert g["p_holm"] == pytest.approx(3 * 2 / 256)  # all three tie at the smallest p: each x 3, then monotone


def test_no_effect_measured_tightly_does_not_help():
    d = _decisions(_rows({}, noise=0.002))
    assert all(c["decision"] == "does not help" for c in d.values()), {k: c["ci90"] for k, c in d.items()}


def test_noise_larger_than_the_effect_of_interest_is_inconclusive():
    d = _decisions(_rows({"G": 0.01}, noise=0.05))
    assert d["G-R"]["decision"] == "inconclusive"


def test_a_gain_the_random_teacher_gets_too_is_not_called_help():
    d = _decisions(_rows({"G": 0.05, "N": 0.08}))
    assert d["G-R"]["minus_N"] < 0 and d["G-R"]["decision"] == "inconclusive"


def test_holm_step_down_stops_at_the_first_contrast_that_fails():
    """G-R is clear (smallest p), D-R is not: GT-R, even with a mean above the effect of interest, cannot pass once
    the step-down has stopped at a larger p."""
    rows = _rows({"G": 0.05, "D": 0.005, "GT": 0.03}, noise=0.002)
    rng = np.random.default_rng(5)
    for r in rows:  # GT: a noisy gain (a larger p than D-R's noise-free small effect)
        if r["arm"] == "GT":
            r["mean_dice"] += rng.normal(0, 0.04)
    d = _decisions(rows)
    order = sorted(d.values(), key=lambda c: c["p"])
    passed = [c["excludes_after_holm"] for c in order]
    assert passed == sorted(passed, reverse=True)  # once False, False after


def test_an_unfinished_protocol_is_pending():
    d = _decisions(_rows({"G": 0.05}, n_seed=3))
    assert all(c["decision"].startswith("pending (3 of 8") for c in d.values())


def _fake_run(out, name, last_step):
    run = out / "pretrain" / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (20, last_step)))
    (run / "med3dinsight.safetensors").write_bytes(b"not needed once fine-tuned")
    return run


def _keys(arm, seed):
    return teacher_study._finetune_keys(PROTOCOL, arm, seed)


def test_progress_keeps_only_what_another_machine_needs_to_go_on(tmp_path):
    out, dest = tmp_path / "out", tmp_path / "progress"
    steps = PROTOCOL["pretrain"]["steps"]
    _fake_run(out, "R_seed0", steps)   # finished, all its fine-tunings recorded: kept (metrics only)
    _fake_run(out, "G_seed0", steps)   # finished, fine-tunings still to do: redone elsewhere, not kept
    _fake_run(out, "D_seed0", 200)     # unfinished: not kept
    (out / "teacher_runs.jsonl").write_text('{"arm": "R"}\n')
    done = {k: {} for k in _keys("R", 0) + _keys("G", 0)[:1]}
    teacher_study.save_progress(out, dest, PROTOCOL, done)
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == ["pretrain/R_seed0/metrics.jsonl", "teacher_runs.jsonl"]
    assert teacher_study._all_done(out, PROTOCOL, done, "R", 0)
    assert not teacher_study._all_done(out, PROTOCOL, done, "G", 0)

    fresh = tmp_path / "fresh"  # another machine: its -o starts from the progress folder, without the checkpoint
    (fresh / "pretrain" / "G_seed0").mkdir(parents=True)
    (fresh / "teacher_runs.jsonl").write_text('{"arm": "R"}\n{"arm": "G"}\n')  # its own newer rows win
    teacher_study.restore_progress(dest, fresh, log=lambda line: None)
    assert (fresh / "teacher_runs.jsonl").read_text().count("\n") == 2
    assert teacher_study._all_done(fresh, PROTOCOL, done, "R", 0)  # counts as finished by its log alone
    assert teacher_study.pretraining_record(fresh, "R", 0)["arm"] == "R"
