"""The benchmark scripts keep working: ``benchmarks/gpu_check.py --device cpu --quick`` runs every speed section and
its correctness run end to end on the CPU, so that the check a GPU session runs once cannot rot unnoticed."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

ROOT = REPO_ROOT


def _tail(proc, n=3000):
    return (proc.stdout or "")[-n:] + "\n" + (proc.stderr or "")[-n:]


@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu_writes_every_number(tmp_path):
    """``gpu_check.py --device cpu --quick`` end to end: every section ran and every expected number is finite
    (their values are the check's business, not this test's); exit 0, or 1 exactly when a correctness test
    failed. Its pytest run is narrowed to the OT tests (-k): the other CPU variants run in this file anyway."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "MED3DINSIGHT_TEST_DEVICE"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out),
           "-k", "test_ot_on_the_device"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert proc.returncode in (0, 1) and out.is_file(), _tail(proc)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True

    correctness = report["correctness"]
    assert correctness["ran"] and not correctness["timed_out"], correctness
    assert (proc.returncode == 0) == correctness["ok"]
    assert correctness["counts"]["passed"] > 0 and correctness["counts"]["passed"] + correctness["counts"][
        "skipped"] + correctness["counts"]["failed"] + correctness["counts"]["error"] == len(correctness["tests"])
    assert all(t["outcome"] in ("passed", "failed", "skipped", "error") for t in correctness["tests"])
    assert any("test_ot_on_the_device_matches_float64_on_the_cpu" in t["name"] for t in correctness["tests"])

    def number(value, where, nullable=False):
        if value is None and nullable:
            return
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), \
            f"{where}: {value!r}"

    speed = report["speed"]
    assert set(speed) == {"step_overhead", "pretrain_throughput", "loader", "ot_vs_pot", "nnunet_trainer"}
    for name, section in speed.items():
        assert section["ok"], (name, section.get("error"))
        number(section["seconds"], f"{name}.seconds")
    assert {(r["psat"]) for r in speed["step_overhead"]["results"]} == {"paper", "small"}
    for r in speed["step_overhead"]["results"]:
        for key in ("backbone_step_s", "full_step_s", "ratio"):
            number(r[key], f"step_overhead.{key}")
        number(r["peak_memory_gib"], "step_overhead.peak_memory_gib", nullable=True)
    throughput = speed["pretrain_throughput"]["results"]
    for key in ("cached_step_s", "teacher_step_s", "cached_slices_per_s", "teacher_slices_per_s", "ratio"):
        number(throughput[key], f"pretrain_throughput.{key}")
    number(throughput["peak_memory_gib"], "pretrain_throughput.peak_memory_gib", nullable=True)
    loader = speed["loader"]["results"]
    for key in ("batches_per_s", "step_s", "ratio"):
        number(loader[key], f"loader.{key}")
    comparisons = {r["comparison"] for r in speed["ot_vs_pot"]["results"]}
    assert comparisons == {"same-iterations", "loss-settings", "pair"}
    for r in speed["ot_vs_pot"]["results"]:
        for key in ("pot_s", "torch_s", "speedup", "max_abs_diff"):
            number(r[key], f"ot_vs_pot.{key}")
    for key in ("nnunet_step_s", "med3dinsight_step_s", "ratio", "load_ms"):
        number(speed["nnunet_trainer"]["results"][key], f"nnunet_trainer.{key}")
    for row in report["summary"]:
        number(row["value"], row["metric"], nullable=row["metric"].startswith("peak"))
    assert "summary" in proc.stdout.lower()


@pytest.mark.slow
def test_simulation_quick_produces_every_output(tmp_path):
    """``benchmarks/simulation.py --quick`` end to end as a user runs it (subjects from the real CT, label captions,
    teacher cache with the real MiniLM text encoder, three pretraining variants, fine-tuning): every output is there
    and sound, pretrained inits really loaded their encoder, and a rerun resumes instead of training again. The
    Dice values are the simulation's business, not this test's."""
    import csv

    out = tmp_path / "sim"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "simulation.py"), "-o", str(out), "--quick"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, _tail(proc)
    protocol = json.loads((out / "protocol.json").read_text())
    inits = ["scratch", *protocol["variants"]]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    runs = {(r["init"], int(r["labelled"]), int(r["seed"])) for r in rows}
    assert runs == {(i, n, s) for i in inits for n in protocol["labelled"] for s in protocol["seeds"]}
    for r in rows:
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
        assert (int(r["loaded_tensors"]) > 0) == (r["init"] != "scratch"), r
        assert len(r["subjects"].split(",")) == int(r["labelled"])
    summary = (out / "summary.md").read_text()
    assert all(f"| {i} |" in summary for i in inits) and "Paired difference to scratch" in summary
    assert "| m3di_ot - reconstruction | 1 |" in summary and "| m3di_ot_masked - m3di_ot | 2 |" in summary
    retrieval = (out / "retrieval.md").read_text()
    assert all(f"| {v} |" in retrieval for v in protocol["variants"])
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Held-out slice retrieval" in proc.stdout and "| scratch |" in proc.stdout
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert captions and all(c["text"].split()[0] in ("Axial", "Coronal", "Sagittal") for c in captions)

    before = (out / "runs.jsonl").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert again.returncode == 0, _tail(again)
    assert (out / "runs.jsonl").read_text() == before  # nothing fine-tuned twice
    assert "pretrained" in again.stdout  # the finished pretraining runs were found, not redone
