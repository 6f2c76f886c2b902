"""The GPU check: CUDA correctness tests, then speed ratios, in one run (about 8 minutes on one H100/H200).

Run: python benchmarks/gpu_check.py [--device cuda] [--out gpu_check.json] [--timeout 480]
     python benchmarks/gpu_check.py --device cpu --quick     # the same script on the CPU, tiny sizes (~3 minutes)

1. Correctness: ``pytest -m cuda tests`` in a subprocess with MED3DINSIGHT_TEST_DEVICE=DEVICE
   (tests/package/test_cuda.py: bf16 autocast and fp16 + GradScaler pretraining steps against fp32, torch.compile
   against eager, partial OT on the device against float64 on the CPU, ClipTeacher bf16/fp16 against fp32,
   nnUNetv2_train/predict -device cuda for PlainConvUNet, SwinUNETR and UNETR, ``med3dinsight demo --device cuda``,
   torchrun pretraining on every GPU then resumed). On CUDA, with pytest-xdist installed, 4 test processes share
   the GPU.
2. Speed, each section in its own process with its own time limit (a failure or a timeout is recorded in the JSON
   and the next section runs), reusing the benchmark scripts' functions:
     step_overhead        pretraining step / backbone-only step, paper and small PSAT (step_overhead.py), and the
                          peak allocated GPU memory of the step
     pretrain_throughput  aligned slices/s with cached teacher embeddings (K slices per volume) / with an open_clip
                          teacher run inside every step (pretrain_throughput.py), peak GPU memory with AdamW
     loader               the real loader's batches/s x the cached step's seconds (goal >= 2: the loader keeps up)
     ot_vs_pot            med3dinsight_plugin.ot against POT's entropic_partial_wasserstein with POT's torch
                          backend on the same device (same iterations in float64; the loss's settings; image + text)
     nnunet_trainer       Med3DInsightTrainer / nnUNetTrainer train_step on the same batches
                          (nnunet_trainer_overhead.py; nnU-Net's torch.compile off unless --nnunet-compile)
Prints one summary table and writes everything to --out (rewritten after every section). Exit code 1 when a
correctness test failed or the tests did not finish in their time; speed failures are reported, not fatal.
``--timeout`` scales every section's time limit so that the whole run stays within about that many seconds.
"""
import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Seconds each part may take, as shares of the default --timeout (GPU: 480 s; --quick on a 2-core CPU: 900 s, of
# which about 200 are used). The tests get what the speed sections leave (GPU: 255 s, enough with pytest-xdist's 4
# processes; without xdist pass --timeout 900).
LIMITS = {
    False: {"total": 480, "step_overhead": 35, "pretrain_throughput": 35, "loader": 40, "ot_vs_pot": 45,
            "nnunet_trainer": 70},
    True: {"total": 900, "step_overhead": 120, "pretrain_throughput": 120, "loader": 90, "ot_vs_pot": 120,
           "nnunet_trainer": 240},
}
SECTIONS = ("step_overhead", "pretrain_throughput", "loader", "ot_vs_pot", "nnunet_trainer")


# ------------------------------------------------------------------------------------------ speed sections

def section_settings(device: str, quick: bool, nnunet_compile: bool) -> dict:
    """The arguments of each speed section: realistic sizes on a GPU, tiny ones with --quick."""
    cuda = device.startswith("cuda")
    amp = "bf16" if cuda else "off"  # what the pretraining engine runs on CUDA
    if quick:
        return {
            "step_overhead": dict(backbones=["plain_conv_unet"], presets=["paper", "small"], patch=32, batch=1,
                                  slices=2, repeats=1, device=device, amp=amp),
            "pretrain_throughput": dict(backbone="plain_conv_unet", patch=32, batch=2, slices=2, teacher="tiny",
                                        psat="small", repeats=1, device=device, amp=amp),
            "loader": dict(patch=32, batch=1, slices=2, workers=1, cases=2, shape=[40, 48, 48], batches=5),
            "ot_vs_pot": dict(sizes=[32], repeats=1, device=device),
            "nnunet_trainer": dict(shape=32, steps=2, device=device, compile=nnunet_compile or None, loads=1),
        }
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    return {
        "step_overhead": dict(backbones=["swin_unetr", "plain_conv_unet"], presets=["paper", "small"], patch=96,
                              batch=2, slices=8, repeats=5, device=device, amp=amp),
        "pretrain_throughput": dict(backbone="swin_unetr", patch=96, batch=2, slices=8, teacher="ViT-B-16",
                                    psat="small", repeats=5, device=device, amp=amp),
        "loader": dict(patch=96, batch=2, slices=8, workers=workers, cases=8, shape=[96, 128, 128], batches=40),
        "ot_vs_pot": dict(sizes=[64, 256], repeats=3, device=device),  # the first calls compile (CUDA)
        "nnunet_trainer": dict(shape=48, steps=10, device=device, compile=nnunet_compile, loads=5),
    }


def run_step_overhead(backbones, presets, **kwargs):
    from step_overhead import measure

    return [measure(name, preset, **kwargs) for name in backbones for preset in presets]


def run_pretrain_throughput(teacher, **kwargs):
    from pretrain_throughput import measure

    if teacher == "tiny":  # --quick: the tiny open_clip model of the tests, from its folder
        from med3dinsight_plugin.teacher.tiny import save_tiny_open_clip

        teacher = f"local-dir:{save_tiny_open_clip(Path(tempfile.mkdtemp()) / 'clip')}"
    return measure(teacher=teacher, **kwargs)


def run_loader(step_s=None, width=512, **kwargs):
    from pretrain_throughput import measure_loader

    rate = measure_loader(width=width, **kwargs)
    return {"batches_per_s": rate, "step_s": step_s, "ratio": rate * step_s if step_s else None,
            "workers": kwargs.get("workers")}


def run_ot_vs_pot(sizes, repeats, device):
    """POT's entropic_partial_wasserstein on torch tensors (its torch backend) against ours, on ``device``; the
    comparisons of ot_vs_pot.py (reg 0.03, mass 0.95, random costs in [0, 1], uniform marginals)."""
    import numpy as np
    import ot as pot
    import torch

    from med3dinsight_plugin.ot import entropic_partial_wasserstein as ours
    from timing import alternate

    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        M64 = torch.tensor(rng.random((2, n, n)), device=device)
        a64 = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
        a32, M32 = a64.float(), M64.float()
        pot_one = lambda: pot.partial.entropic_partial_wasserstein(a64, a64, M64[0], 0.03, 0.95)  # noqa: E731
        comparisons = [
            ("same-iterations", pot_one, lambda: ours(a64, a64, M64[0], 0.03, 0.95)),
            ("loss-settings", pot_one, lambda: ours(a32, a32, M32[0], 0.03, 0.95, stopThr=1e-7)),
            ("pair", lambda: torch.stack([pot.partial.entropic_partial_wasserstein(a64, a64, m, 0.03, 0.95)
                                          for m in M64]),
             lambda: ours(a32, a32, M32, 0.03, 0.95, stopThr=1e-7)),
        ]
        for name, pot_fn, torch_fn in comparisons:
            plans = {}
            keep = lambda key, fn: lambda: plans.__setitem__(key, fn())  # noqa: E731 -- the last plan of each
            t_pot, t_ours = alternate([keep("pot", pot_fn), keep("ours", torch_fn)], device, repeats)
            diff = float((plans["pot"].double() - plans["ours"].double()).abs().max())
            rows.append({"n": n, "comparison": name, "pot_s": t_pot, "torch_s": t_ours, "speedup": t_pot / t_ours,
                         "max_abs_diff": diff, "pot_version": pot.__version__})
    return rows


def run_nnunet_trainer(**kwargs):
    from nnunet_trainer_overhead import measure

    return measure(**kwargs)


RUNNERS = {"step_overhead": run_step_overhead, "pretrain_throughput": run_pretrain_throughput,
           "loader": run_loader, "ot_vs_pot": run_ot_vs_pot, "nnunet_trainer": run_nnunet_trainer}


def child(name: str, params: str, result: str) -> int:
    """Run one speed section in this (fresh) process and write its JSON result."""
    sys.path.insert(0, str(HERE))
    try:
        out = RUNNERS[name](**json.loads(params))
        payload = {"ok": True, "results": out}
    except BaseException as e:  # noqa: BLE001 -- recorded for the parent, which goes on with the next section
        payload = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                   "traceback": traceback.format_exc()[-4000:]}
    Path(result).write_text(json.dumps(payload, default=str))
    return 0 if payload["ok"] else 1


# ------------------------------------------------------------------------------------------ process control

def run_limited(cmd, limit, env=None, log=None):
    """Run ``cmd`` in its own process group for at most ``limit`` seconds (the whole group is killed after);
    returns ``(exit code or None if killed, seconds, output)``."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                                text=True)
        try:
            code = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            code = None
        try:  # what the command left behind (loader workers, nnU-Net processes) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        out.seek(0)
        text = out.read()
    if log:
        Path(log).write_text(text)
    return code, time.perf_counter() - start, text


# ------------------------------------------------------------------------------------------ correctness

_LINE = re.compile(r"(?:^|\s)(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+::\S+)|^(\S+::\S+)\s+"
                   r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)
_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error", "XFAIL": "skipped",
            "XPASS": "passed"}


def _from_junit(path: Path):
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for tag, what in (("skipped", "skipped"), ("error", "error"), ("failure", "failed")):  # the worst wins
            element = case.find(tag)
            if element is not None:
                outcome, message = what, ((element.get("message") or "").strip().splitlines() or [""])[0][:300]
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0.0),
                      "message": message})
    return tests


def _from_log(text: str):
    seen = {}
    for m in _LINE.finditer(text):
        outcome, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[name] = {"name": name, "outcome": _OUTCOME[outcome], "seconds": None, "message": ""}
    return list(seen.values())


def correctness(device: str, limit: float, quick: bool, folder: Path, select=None) -> dict:
    xml = folder / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-v", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={xml}"] + (["-k", select] if select else [])
    parallel = device.startswith("cuda") and not quick and importlib.util.find_spec("xdist") is not None
    if parallel:
        cmd += ["-n", "4", "--dist", "load"]
    env = {**os.environ, "MED3DINSIGHT_TEST_DEVICE": device, "PYTHONUNBUFFERED": "1"}
    code, seconds, text = run_limited(cmd, limit, env, folder / "pytest.log")
    tests = _from_junit(xml) if xml.is_file() else _from_log(text)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
    timed_out = code is None
    return {"ok": code == 0 and not timed_out and counts["failed"] + counts["error"] == 0,
            "ran": bool(tests), "returncode": code, "timed_out": timed_out, "limit_s": limit, "seconds": seconds,
            "parallel": parallel, "command": " ".join(cmd[1:]), "counts": counts, "tests": tests,
            "output_tail": text[-3000:] if code != 0 else ""}


# ------------------------------------------------------------------------------------------ report

def summary_rows(speed: dict) -> list:
    """One row per headline number: metric, value, goal, met (None where there is no goal)."""
    rows = []

    def add(metric, value, goal=None, met=None):
        rows.append({"metric": metric, "value": value, "goal": goal, "met": met})

    s = speed.get("step_overhead", {})
    if s.get("ok"):
        for r in s["results"]:
            small = r["psat"] == "small"
            add(f"step / backbone step, {r['backbone']}, {r['psat']} PSAT", r["ratio"], "<= 1.20" if small else None,
                (r["ratio"] <= 1.20) if small else None)
        for r in s["results"]:
            add(f"peak GPU memory (GiB), step of {r['backbone']} + {r['psat']} PSAT", r["peak_memory_gib"])
    s = speed.get("pretrain_throughput", {})
    if s.get("ok"):
        r = s["results"]
        add("aligned slices/s, cached teacher / teacher in the step", r["ratio"], ">= 10", r["ratio"] >= 10)
        add("peak GPU memory (GiB), pretraining step with AdamW", r["peak_memory_gib"])
    s = speed.get("loader", {})
    if s.get("ok") and s["results"]["ratio"] is not None:
        r = s["results"]["ratio"]
        add("loader batches/s x cached step seconds", r, ">= 2", r >= 2)
    s = speed.get("ot_vs_pot", {})
    if s.get("ok"):
        for r in s["results"]:
            goal = r["comparison"] != "same-iterations" and r["n"] >= 256
            add(f"partial OT speed-up over POT (torch backend), B={r['n']}, {r['comparison']}", r["speedup"],
                ">= 10" if goal else None, (r["speedup"] >= 10) if goal else None)
    s = speed.get("nnunet_trainer", {})
    if s.get("ok"):
        r = s["results"]["ratio"]
        add("train_step Med3DInsightTrainer / nnUNetTrainer", r, "<= 1.03", r <= 1.03)
    return rows


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_summary(report: dict) -> None:
    c = report["correctness"]
    print("\n" + "=" * 100)
    print(f"GPU check summary: device {report['device']} ({report['device_name']}), torch {report['torch']}, "
          f"{report['seconds']:.0f} s")
    print("-" * 100)
    n = c["counts"]
    state = "NOT RUN" if c.get("skipped_by_request") else "OK" if c["ok"] else \
        "TIMED OUT" if c["timed_out"] else "FAILED"
    print(f"{'correctness (pytest -m cuda)':<72} {state:>10}   {n['passed']} passed, {n['failed']} failed, "
          f"{n['error']} errors, {n['skipped']} skipped, {c['seconds']:.0f} s")
    for t in c["tests"]:
        if t["outcome"] in ("failed", "error"):
            print(f"  {t['outcome'].upper():<6} {t['name']}  {t['message'][:120]}")
    print("-" * 100)
    print(f"{'speed':<72} {'value':>10}   goal")
    for row in report["summary"]:
        met = "" if row["met"] is None else ("  met" if row["met"] else "  NOT MET")
        print(f"{row['metric']:<72} {_fmt(row['value']):>10}   {row['goal'] or ''}{met}")
    for name, s in report["speed"].items():
        if not s.get("ok"):
            print(f"{'section ' + name:<72} {'FAILED':>10}   {s.get('error', '')[:200]}")
    print("=" * 100)


def _device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device_name": "CPU", "gpus": 0}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["gpus"] = torch.cuda.device_count()
    elif device.startswith("cuda"):
        info["device_name"] = "CUDA NOT AVAILABLE"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (for the CPU)")
    parser.add_argument("--timeout", type=float, help="seconds for the whole run; every section's limit scales with "
                                                      "it (default 480, with --quick 900)")
    parser.add_argument("--skip-tests", action="store_true", help="speed sections only")
    parser.add_argument("-k", dest="select", help="only the correctness tests pytest -k EXPR selects")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="speed sections")
    parser.add_argument("--nnunet-compile", action="store_true",
                        help="let nnU-Net torch.compile the networks in the trainer comparison (slow to start)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        return child(args.section, args.params, args.result)

    start = time.perf_counter()
    limits = dict(LIMITS[args.quick])
    scale = (args.timeout or limits["total"]) / limits["total"]
    limits = {k: v * scale for k, v in limits.items()}
    test_limit = limits["total"] - sum(limits[s] for s in args.sections)
    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"device": args.device, "quick": args.quick, **_device_info(args.device),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "logs": str(work),
              "limits_s": {"tests": test_limit, **{s: limits[s] for s in args.sections}},
              "correctness": None, "speed": {}, "summary": []}

    def save():
        report["seconds"] = time.perf_counter() - start
        report["summary"] = summary_rows(report["speed"])
        out.write_text(json.dumps(report, indent=1, default=str))

    print(f"GPU check on {args.device} ({report['device_name']}); logs in {work}", flush=True)
    if args.skip_tests:
        report["correctness"] = {"ok": True, "ran": False, "returncode": None, "timed_out": False, "seconds": 0.0,
                                 "counts": {"passed": 0, "failed": 0, "skipped": 0, "error": 0}, "tests": [],
                                 "skipped_by_request": True}
    else:
        print(f"correctness: pytest -m cuda (at most {test_limit:.0f} s) ...", flush=True)
        if args.device.startswith("cuda") and not args.quick and importlib.util.find_spec("xdist") is None:
            print("  pytest-xdist is not installed: the tests run one at a time and may need --timeout 900",
                  flush=True)
        report["correctness"] = correctness(args.device, test_limit, args.quick, work, args.select)
        c = report["correctness"]
        print(f"  {c['counts']} in {c['seconds']:.0f} s" + (" (TIMED OUT)" if c["timed_out"] else ""), flush=True)
    save()

    settings = section_settings(args.device, args.quick, args.nnunet_compile)
    for name in args.sections:
        params = dict(settings[name])
        if name == "loader":  # the loader is compared with the cached step the throughput section timed
            t = report["speed"].get("pretrain_throughput", {})
            params["step_s"] = t["results"]["cached_step_s"] if t.get("ok") else None
            params["width"] = t["results"]["embed_dim"] if t.get("ok") else 512
        print(f"speed: {name} (at most {limits[name]:.0f} s) ...", flush=True)
        result_file = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--params", json.dumps(params),
               "--result", str(result_file)]
        code, seconds, text = run_limited(cmd, limits[name], {**os.environ, "PYTHONUNBUFFERED": "1"},
                                          work / f"{name}.log")
        if result_file.is_file():
            section = json.loads(result_file.read_text())
        elif code is None:
            section = {"ok": False, "error": f"timed out after {limits[name]:.0f} s"}
        else:
            section = {"ok": False, "error": f"exit code {code} without a result: {text.strip()[-300:]}"}
        section.update(seconds=seconds, settings=params)
        report["speed"][name] = section
        print(f"  {'ok' if section['ok'] else 'FAILED: ' + section['error']} ({seconds:.0f} s)", flush=True)
        save()
    save()
    print_summary(report)
    print(f"report: {out}")
    return 0 if report["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
