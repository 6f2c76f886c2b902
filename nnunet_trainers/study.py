"""Compare initialisations on an nnU-Net dataset: ``med3dinsight study``.

For every (init, labelled, seed) the study writes a plans copy (same ``data_identifier``, so nnU-Net's preprocessed
data are reused) whose ``"med3dinsight_study"`` entry fixes the training cases, the held-out cases, the schedule and
the seed, and trains it with the real ``nnUNetv2_train`` (a subprocess) and one of the ``*_study`` trainers of
:mod:`nnunet_trainers.trainers`. Evaluation is nnU-Net's own final validation (``fold_F/validation/summary.json``).

* Subsets are nested: per seed, one seeded permutation of the fold's training cases; a run with ``n`` labelled cases
  trains on its first ``n``. The held-out cases are the fold's validation cases (nnU-Net's ``splits_final.json``, or
  nnU-Net's own seeded 5-fold split when the dataset has none yet) and the same for every run.
* Scratch is the same trainer, recipe, architecture and seed without a checkpoint: initial weights are the only
  difference. SwinUNETR / UNETR checkpoints go through the plans ``nnunet-attach --adapt-architecture`` writes;
  checkpoints of different architectures cannot be compared in one study. ``reference=True`` adds nnU-Net's default
  ``nnUNetTrainer`` recipe (on the plans' own architecture) with the same subsets.
* Nothing is written into the user's nnU-Net folders: the plans copies go to ``OUT/nnUNet_preprocessed/DATASET``
  (beside links to the user's preprocessed files) and the runs to ``OUT/nnUNet_results``.
* Resumable: a run whose ``summary.json`` exists is not trained again; an interrupted one continues (``--c``).
* Statistics (:mod:`med3dinsight_plugin.stats`): an init is compared with scratch on nnU-Net's per-case validation
  Dice, paired per case, seed and labelled count; the interval resamples seeds and held-out cases (an expanded
  percentile bootstrap that draws one set of cases for every seed, as every seed is evaluated on the same cases) and
  is given only with at least 5 seeds and 5 cases; p is an exact sign-flip test over seeds, Holm-adjusted over the
  summary's comparisons.
* A run is keyed by its checkpoint's content, not its path: the plans name of a pretrained init ends with the first 12
  hex digits of the checkpoint's sha256 (``PLANS__study_INIT_Ln_sSEED_SHA12``). A file replaced at the same path
  trains new runs (the earlier ones stay on disk, out of the summary); putting the old file back finds its runs again.
  A checkpoint that changes while the study runs stops it, and a run that loaded other weights than its plans name
  is removed, never recorded.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from med3dinsight_plugin.backbones import BackboneFamily
from med3dinsight_plugin.checkpoint import read_checkpoint_info
from med3dinsight_plugin.errors import Med3DInsightError, first_line
from med3dinsight_plugin.fileio import atomic_write, sha256_file
from med3dinsight_plugin.hub import is_hub_spec
from med3dinsight_plugin.stats import MIN_UNITS, Estimate, hierarchical_bootstrap, holm, sign_flip_p, t_interval
from med3dinsight_plugin.stats import paired_differences as paired_by_key

from .attach import _read_json, attached_plans
from .contract import ENV_CHECKPOINT, NNUNET_FAMILY, PLANS_KEY, FamilyTable, checkpoint_family
from .shim import nnunet_device, with_shim

__all__ = ["Comparison", "StudyError", "StudyResult", "StudyRun", "bootstrap_interval", "compare",
           "paired_differences", "run_study", "summary_markdown"]

STUDY_KEY = "med3dinsight_study"  # = nnunet_trainers.trainers.STUDY_KEY (not imported: that pulls in nnU-Net)
# family -> its trainer's _study variant (nnunet_trainers.trainers defines one for every registered family)
STUDY_TRAINER: Mapping[str, str] = FamilyTable(lambda family: f"{family.nnunet_trainer}_study")
REFERENCE_TRAINER = "nnUNetTrainer_med3dinsightStudy"
REFERENCE = "nnunet"  # the init name of the reference row
CASE_PREFIX = "dice["  # results.csv: a column dice[CASE] per held-out case (the case's mean foreground Dice)
N_BOOT = 10000  # bootstrap resamples of the summary's intervals (seed 0)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MAX_SEED = 2 ** 32 - 1  # the trainers seed numpy's global generator with it (np.random.seed: 0 .. 2**32 - 1)
SHA_DIGITS = 12  # hex digits of the checkpoint's sha256 in a run's plans name
# what a Med3DInsight trainer logs when the checkpoint it loads is not the one its plans were written for
_CHANGED = "changed since it was attached to these plans"


class StudyError(Med3DInsightError):
    """A study that cannot run as asked (bad arguments, a checkpoint that does not fit, a failed training)."""


@dataclass
class StudyRun:
    init: str
    labelled: int
    labelled_arg: str  # "5" or "all"
    seed: int
    plans_name: str
    trainer: str
    folder: Path  # nnU-Net's fold folder of this run
    plans: Dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.folder / "validation" / "summary.json").is_file()

    @property
    def sha256(self) -> Optional[str]:
        """The sha256 of the checkpoint this run trains from (``None``: scratch or the reference)."""
        return self.plans[STUDY_KEY].get("sha256")


@dataclass
class StudyResult:
    output: Path
    runs: List[StudyRun]
    rows: List[Dict[str, Any]]
    trained: int
    skipped: int
    results_csv: Path
    summary_md: Path
    plot: Path


# ------------------------------------------------------------------------------------------------- statistics

def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 10000,
                       seed: int = 0) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile bootstrap interval (deterministic per seed).

    Kept for ``benchmarks/simulation.py``; the study's summary no longer uses it. It says nothing about how many
    values there are: at n = 3 its 2.5 % / 97.5 % quantiles are about the min and max. Prefer
    :func:`med3dinsight_plugin.stats.t_interval` or :func:`~med3dinsight_plugin.stats.hierarchical_bootstrap`, whose
    :class:`~med3dinsight_plugin.stats.Estimate` states its n and unit and gives no interval below 5 units.
    One value gives a zero-width interval; NaNs are dropped; no values give NaNs.
    """
    d = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_differences(rows: Sequence[Dict[str, Any]], init: str, baseline: str = "scratch",
                       key: str = "mean_dice") -> Dict[int, List[float]]:
    """Per labelled count, ``row[init] - row[baseline]`` of ``key`` over the seeds both have (one value per seed)."""
    table = {(r["init"], r["labelled"], r["seed"]): r[key] for r in rows}
    out: Dict[int, List[float]] = {}
    for (name, labelled, seed), value in sorted(table.items()):
        if name == init and (baseline, labelled, seed) in table:
            out.setdefault(labelled, []).append(value - table[(baseline, labelled, seed)])
    return out


# ------------------------------------------------------------------------------------------------- the study

def run_study(dataset: str, inits: Sequence[Tuple[str, Optional[os.PathLike]]], output: os.PathLike,
              configuration: str = "3d_fullres", labelled: Sequence[str] = ("all",), seeds: Sequence[int] = (0,),
              fold: int = 0, plans: str = "nnUNetPlans", epochs: Optional[int] = None,
              iterations: Optional[int] = None, device: Optional[str] = None, reference: bool = False,
              log: Callable[[str], None] = print, dry_run: bool = False) -> StudyResult:
    """Train every (init, labelled, seed) with ``nnUNetv2_train`` and summarise nnU-Net's validation Dice.

    Args:
        dataset: nnU-Net dataset id or name, planned and preprocessed (``nnUNet_preprocessed`` set).
        inits: ``(name, checkpoint)`` pairs; checkpoint ``None`` = scratch (random weights, same recipe).
        output: the study folder (results.csv, summary.md, label_efficiency.png, nnU-Net's runs).
        configuration: the nnU-Net configuration.
        labelled: counts of labelled training cases (strings or ints) or ``"all"``.
        seeds: one nested subset sequence (and training seed) per seed.
        fold: the fold whose validation cases are held out.
        plans: the plans to start from.
        epochs: epochs per run (default: the trainer's, 1000).
        iterations: training iterations per epoch (default 250); validation iterations are scaled alike (50/250).
        device: ``cuda``, ``cuda:N``, ``cpu`` (default cuda when available).
        reference: add nnU-Net's default nnUNetTrainer recipe as the init ``nnunet``.
        log: where progress lines go.
        dry_run: check the checkpoints and write the runs' plans, list the runs, train nothing (no outputs).

    Raises:
        StudyError: before any training for bad arguments or a checkpoint that does not fit the plans; during the
            study when a training fails (its log named).
    """
    output = Path(output)
    device = device or _default_device()
    try:  # nnU-Net's -device and the environment that picks GPU N: checked before anything is written
        nnunet_dev, device_env = nnunet_device(device, with_shim(os.environ))
    except ValueError:
        raise StudyError(f"--device {device!r}: use cuda, cuda:N or cpu") from None
    if not inits and not reference:
        raise StudyError("no initialisation to compare: pass --init scratch and/or --init NAME=CHECKPOINT")
    if epochs is not None and epochs < 1 or iterations is not None and iterations < 1:
        raise StudyError("--epochs and --iterations must be at least 1")
    seeds = _seeds(seeds)
    names = [n for n, _ in inits] + ([REFERENCE] if reference else [])
    for name in names:
        if not _NAME.match(name):
            raise StudyError(f"init name {name!r}: use letters, digits, '_' and '-' (e.g. --init ot=run/ckpt)")
    if len(set(names)) != len(names):
        raise StudyError(f"init names must differ (the name {REFERENCE!r} is --reference's): {names}")

    pre_root = os.environ.get("nnUNet_preprocessed")
    if not pre_root:
        raise StudyError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train")
    folder = _dataset_folder(Path(pre_root), str(dataset))
    plans_file = folder / f"{plans}.json"
    base = _read_json(plans_file, f"run nnUNetv2_plan_and_preprocess -d {dataset} (or pass -p)")
    if not isinstance(base, dict) or configuration not in base.get("configurations", {}):
        raise StudyError(f"configuration {configuration!r} is not in {plans_file}")
    dataset_json = _read_json(folder / "dataset.json", f"run nnUNetv2_plan_and_preprocess -d {dataset}")
    held_out, train_pool = _fold_cases(folder, base, configuration, fold)
    counts = _labelled_counts(labelled, len(train_pool))

    # every checkpoint is test-loaded (and the architectures compared) before anything is trained
    variants: Dict[str, Tuple[Dict[str, Any], str]] = {}  # init -> (plans with the attach entry or none, family)
    architecture = None
    for name, checkpoint in inits:
        if checkpoint is None:
            continue
        adapt = not _family(checkpoint).plans_native  # nnU-Net's plans cannot build it: they take its network
        try:
            new, _, _, family = attached_plans(base, plans_file, plans, checkpoint, configuration, adapt,
                                               dataset_json, str(dataset))
        except Med3DInsightError as e:
            raise StudyError(f"--init {name}={checkpoint} does not fit {plans_file.name} ({configuration}): "
                             f"{first_line(e)}") from None
        config = new["configurations"][configuration]
        arch = (family, json.dumps(config["architecture"], sort_keys=True), list(config["patch_size"]))
        if architecture is not None and arch != architecture[1]:
            raise StudyError(f"--init {name} builds {_arch(config)} {config['patch_size']} but --init "
                             f"{architecture[0]} builds {architecture[2]}: compare checkpoints of one architecture "
                             f"per study")
        architecture = architecture or (name, arch, f"{_arch(config)} {config['patch_size']}")
        variants[name] = (new, family)
    scratch_plans, family = next(iter(variants.values())) if variants else (base, NNUNET_FAMILY)
    scratch_plans = {k: v for k, v in scratch_plans.items() if k != PLANS_KEY}
    for name, checkpoint in inits:
        if checkpoint is None:
            variants[name] = (scratch_plans, family)
    if reference:
        variants[REFERENCE] = ({k: v for k, v in base.items() if k != PLANS_KEY}, "reference")

    val_iterations = max(1, round(iterations * 50 / 250)) if iterations else None
    results_root = output / "nnUNet_results"
    study_pre = output / "nnUNet_preprocessed" / folder.name
    runs: List[StudyRun] = []
    for name in names:
        source, fam = variants[name]
        trainer = REFERENCE_TRAINER if fam == "reference" else STUDY_TRAINER[fam]
        checkpoint = source.get(PLANS_KEY, {}).get("checkpoint")
        sha = source.get(PLANS_KEY, {}).get("sha256")  # the run's key: the weights' content, not their path
        for n, arg in counts:
            for seed in seeds:
                perm = [str(c) for c in np.random.default_rng(seed).permutation(train_pool)]
                plans_name = f"{plans}__study_{name}_L{arg}_s{seed}" + (f"_{sha[:SHA_DIGITS]}" if sha else "")
                run_plans = dict(source, plans_name=plans_name)
                run_plans[STUDY_KEY] = {
                    "init": name, "checkpoint": checkpoint, "sha256": sha, "labelled": n, "seed": seed, "fold": fold,
                    "train_cases": sorted(perm[:n]), "val_cases": list(held_out), "num_epochs": epochs,
                    "iterations": iterations, "val_iterations": val_iterations, "source_plans": plans,
                    "configuration": configuration, "recipe": trainer}
                runs.append(StudyRun(name, n, arg, seed, plans_name, trainer,
                                     results_root / folder.name / f"{trainer}__{plans_name}__{configuration}"
                                     / f"fold_{fold}", run_plans))

    _link_preprocessed(folder, study_pre, {f"{r.plans_name}.json" for r in runs})
    for name, checkpoint in inits:
        if checkpoint is not None:
            _note_replaced(study_pre, plans, name, variants[name][0][PLANS_KEY], output, log)
    for run in runs:  # a finished run of other settings is never mixed in
        target = study_pre / f"{run.plans_name}.json"
        if run.done and target.is_file():
            try:
                old = json.loads(target.read_text()).get(STUDY_KEY)
            except (OSError, ValueError):
                old = None
            if _settings(old) != _settings(run.plans[STUDY_KEY]):
                raise StudyError(f"{output} holds a finished run {run.plans_name} with other settings (epochs, "
                                 f"iterations, cases or checkpoint); use another -o for the new settings")
        atomic_write(target, lambda tmp, p=run.plans: Path(tmp).write_text(json.dumps(p, indent=2)))

    env = _environment(device_env, pre=output / "nnUNet_preprocessed", results=results_root)
    todo = [r for r in runs if not r.done]
    if dry_run:
        for run in runs:
            log(f"{'finished' if run.done else 'to train'}: {run.init}, {run.labelled} labelled, seed {run.seed}: "
                f"nnUNetv2_train {folder.name} {configuration} {fold} -p {run.plans_name} -tr {run.trainer}")
        return StudyResult(output, runs, [], 0, len(runs) - len(todo), output / "results.csv",
                           output / "summary.md", output / "label_efficiency.png")
    log(f"study: {len(runs)} runs ({len(names)} inits x {len(counts)} labelled x {len(seeds)} seeds), "
        f"{len(runs) - len(todo)} finished already, {len(todo)} to train; held-out cases: {len(held_out)}")
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(todo, start=1):
        _check_unchanged(run, output)
        log(f"[{i}/{len(todo)}] training {run.init}, {run.labelled} labelled, seed {run.seed} "
            f"({len(todo) - i} left after this)")
        log_file = logs / f"{run.plans_name}.log"
        command = [_nnunet_train(), str(folder.name), configuration, str(fold), "-p", run.plans_name, "-tr",
                   run.trainer, "-device", nnunet_dev, "--c"]
        start = time.perf_counter()
        code = _launch(command, env, log_file)
        wall = time.perf_counter() - start
        if run.sha256 and _CHANGED in log_file.read_text(errors="replace"):
            import shutil

            shutil.rmtree(run.folder)  # trained from other weights than its name says: never recorded
            raise StudyError(f"--init {run.init}: {run.plans[STUDY_KEY]['checkpoint']} changed while "
                             f"{run.plans_name} started (its sha256 is no longer {run.sha256[:SHA_DIGITS]}...); that "
                             f"run was removed; run the command again to train the new checkpoint's runs")
        if code != 0 or not run.done:
            lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
            raise StudyError(f"training {run.plans_name} failed (exit {code}): {why.strip()[:300]}; see {log_file}; "
                             f"run the same command again to resume")
        atomic_write(run.folder / "study_run.json",
                     lambda tmp, w=wall: Path(tmp).write_text(json.dumps({"wall_time_s": w})))
        log(f"[{i}/{len(todo)}] done {run.init}, {run.labelled} labelled, seed {run.seed}: mean Dice "
            f"{_row(run, dataset_json)['mean_dice']:.4f} ({wall:.0f} s)")

    rows = [_row(run, dataset_json) for run in runs]
    output.mkdir(parents=True, exist_ok=True)
    results_csv, summary_md, plot = output / "results.csv", output / "summary.md", output / "label_efficiency.png"
    _write_csv(results_csv, rows)
    atomic_write(summary_md, lambda tmp: Path(tmp).write_text(
        summary_markdown(rows, names, len(held_out), fold, configuration, epochs, iterations)))
    plot_label_efficiency(rows, names, plot)
    log(f"study: wrote {results_csv}, {summary_md}, {plot}")
    return StudyResult(output, runs, rows, len(todo), len(runs) - len(todo), results_csv, summary_md, plot)


# ------------------------------------------------------------------------------------------------- helpers

def _seeds(seeds: Sequence[Any]) -> List[int]:
    """Distinct whole numbers from 0 to :data:`MAX_SEED` (the trainer seeds numpy, torch and random with them)."""
    out = []
    for value in seeds:
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_SEED:
            raise StudyError(f"--seeds {value!r}: give whole numbers from 0 to {MAX_SEED} (nnU-Net's trainer seeds "
                             f"numpy with them), e.g. --seeds 0 1 2")
        out.append(int(text))
    if not out or len(set(out)) != len(out):
        raise StudyError(f"--seeds {' '.join(map(str, out))}: give one or more distinct seeds, e.g. --seeds 0 1 2")
    return out


def _settings(entry: Any) -> Any:
    """A run's study entry without the checkpoint's path: runs are keyed by the checkpoint's content (its sha256 is
    in the entry), so the same file moved elsewhere keeps its runs."""
    return {k: v for k, v in entry.items() if k != "checkpoint"} if isinstance(entry, dict) else entry


def _note_replaced(study_pre: Path, plans: str, name: str, attached: Dict[str, Any], output: Path,
                   log: Callable[[str], None]) -> None:
    """Say so when ``output`` holds runs of the init ``name`` trained from another checkpoint (the file at the path
    was replaced): those runs are kept but not summarised, and the current checkpoint's runs are trained."""
    others = set()
    for file in study_pre.glob(f"{plans}__study_{name}_L*.json"):
        try:
            entry = json.loads(file.read_text()).get(STUDY_KEY) or {}
        except (OSError, ValueError, AttributeError):
            continue
        if entry.get("init") == name and entry.get("sha256") != attached["sha256"]:
            others.add(str(entry.get("sha256") or "unknown")[:SHA_DIGITS])
    if others:
        log(f"note: --init {name}: {attached['checkpoint']} now has sha256 {attached['sha256'][:SHA_DIGITS]}...; "
            f"{output} also holds runs of {name} from other content (sha256 {', '.join(sorted(others))}...): they are "
            f"kept but not summarised, and the runs of the current file are trained (results are keyed by the "
            f"checkpoint's content)")


def _check_unchanged(run: StudyRun, output: Path) -> None:
    """Before a run trains: its local checkpoint still has the content its plans name (Hub files are pinned)."""
    if not run.sha256:
        return
    checkpoint = run.plans[STUDY_KEY]["checkpoint"]
    if is_hub_spec(checkpoint):
        return
    try:
        now = sha256_file(checkpoint)
    except OSError as e:
        raise StudyError(f"--init {run.init}: {checkpoint} cannot be read any more ({e.strerror or e}); put it back "
                         f"and run the command again") from None
    if now != run.sha256:
        raise StudyError(f"--init {run.init}: {checkpoint} changed while the study ran (sha256 "
                         f"{run.sha256[:SHA_DIGITS]}... when it started, {now[:SHA_DIGITS]}... now); the runs trained "
                         f"so far in {output} are kept; run the command again to train the new checkpoint's runs")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dataset_folder(pre: Path, dataset: str) -> Path:
    if (pre / dataset).is_dir():
        return pre / dataset
    if dataset.isdigit():
        found = sorted(pre.glob(f"Dataset{int(dataset):03d}_*"))
        if len(found) == 1:
            return found[0]
    raise StudyError(f"dataset {dataset!r} is not in nnUNet_preprocessed ({pre}): pass the id or full name of a "
                     f"dataset preprocessed with nnUNetv2_plan_and_preprocess")


def _fold_cases(folder: Path, plans: Dict[str, Any], configuration: str, fold: int) -> Tuple[List[str], List[str]]:
    """``(held-out cases, training cases)`` of the fold, as nnU-Net's do_split makes them (nothing is written)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data = folder / PlansManager(plans).get_configuration(configuration).data_identifier
    if not data.is_dir():
        raise StudyError(f"{data} does not exist: run nnUNetv2_preprocess -d {folder.name} -c {configuration} first")
    splits_file = folder / "splits_final.json"
    if splits_file.is_file():
        splits = _read_json(splits_file, "delete it to let nnU-Net create it again")
    else:
        identifiers = sorted(infer_dataset_class(str(data)).get_identifiers(str(data)))
        if len(identifiers) < 5:
            raise StudyError(f"{folder.name} has {len(identifiers)} preprocessed cases; nnU-Net's 5-fold split "
                             f"needs 5 (or write splits_final.json)")
        splits = generate_crossval_split(identifiers, seed=12345, n_splits=5)
    if not 0 <= fold < len(splits):
        raise StudyError(f"--fold {fold}: the split of {folder.name} has folds 0..{len(splits) - 1}")
    return sorted(splits[fold]["val"]), sorted(splits[fold]["train"])


def _labelled_counts(labelled: Sequence[Any], available: int) -> List[Tuple[int, str]]:
    out = []
    for value in labelled:
        text = str(value).strip().lower()
        if text == "all":
            out.append((available, "all"))
        elif not isinstance(value, bool) and re.fullmatch(r"[0-9]+", text) and 1 <= int(text) <= available:
            out.append((int(text), str(int(text))))
        else:
            raise StudyError(f"--labelled {value!r}: give counts from 1 to {available} (the fold's training cases) "
                             f"or 'all'")
    seen, unique = set(), []
    for n, arg in sorted(out):
        if n not in seen:
            seen.add(n)
            unique.append((n, arg))
    return unique


def _family(checkpoint) -> BackboneFamily:
    """The family a checkpoint is fine-tuned as, from its header (no weights read)."""

    info = read_checkpoint_info(checkpoint)
    return checkpoint_family(info.source_format, info.metadata)


def _arch(config: Dict[str, Any]) -> str:
    return str(config["architecture"]["network_class_name"]).rsplit(".", 1)[-1]


def _link_preprocessed(source: Path, target: Path, own: set) -> None:
    """``target`` mirrors the user's preprocessed dataset folder by links; only the study's plans are files."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        link = target / entry.name
        if entry.name in own or link.is_symlink() or link.exists():
            continue
        link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def _environment(base: Mapping[str, str], pre: Path, results: Path) -> Dict[str, str]:
    env = dict(base)
    env.pop(ENV_CHECKPOINT, None)  # the plans say which weights; scratch must stay scratch
    env["nnUNet_preprocessed"] = str(pre.resolve())
    env["nnUNet_results"] = str(results.resolve())
    return env


def _launch(command: List[str], env: Dict[str, str], log_file: Path) -> int:
    """Run one ``nnUNetv2_train`` with its output into ``log_file``; its exit code."""
    with open(log_file, "w") as f:
        return subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def _nnunet_train() -> str:
    import shutil

    here = Path(sys.executable).parent / "nnUNetv2_train"
    found = str(here) if here.is_file() else shutil.which("nnUNetv2_train")
    if not found:
        raise StudyError("nnUNetv2_train is not on PATH: install nnunetv2 in this environment")
    return found


def _labels(dataset_json: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``(label id as in summary.json, column name)`` of the foreground classes."""
    out = []
    for label_name, value in dataset_json.get("labels", {}).items():
        ids = value if isinstance(value, list) else [value]
        if label_name != "background" and 0 not in ids:
            key = str(tuple(ids)) if len(ids) > 1 else str(ids[0])
            out.append((key, re.sub(r"\W+", "_", str(label_name))))
    return out


def _row(run: StudyRun, dataset_json: Dict[str, Any]) -> Dict[str, Any]:
    summary = json.loads((run.folder / "validation" / "summary.json").read_text())
    wall_file = run.folder / "study_run.json"
    wall = json.loads(wall_file.read_text())["wall_time_s"] if wall_file.is_file() else math.nan
    row: Dict[str, Any] = {"init": run.init, "labelled": run.labelled, "seed": run.seed,
                           "fold": run.plans[STUDY_KEY]["fold"]}
    for key, column in _labels(dataset_json):
        value = summary.get("mean", {}).get(key, {}).get("Dice")
        row[f"dice_{column}"] = math.nan if value is None else float(value)
    mean = summary.get("foreground_mean", {}).get("Dice")
    row["mean_dice"] = math.nan if mean is None else float(mean)
    row["wall_time_s"] = round(float(wall), 1)
    row["checkpoint_sha256"] = run.sha256 or ""
    row.update({f"{CASE_PREFIX}{case}]": dice for case, dice in _case_dice(summary, dataset_json).items()})
    return row


def _case_dice(summary: Dict[str, Any], dataset_json: Dict[str, Any]) -> Dict[str, float]:
    """Per held-out case of nnU-Net's ``metric_per_case``: the mean Dice over the foreground classes present in the
    case's reference or prediction (nnU-Net gives NaN for a class in neither), sorted by case."""
    ending = str(dataset_json.get("file_ending") or ".nii.gz")
    keys = [key for key, _ in _labels(dataset_json)]
    out = {}
    for entry in summary.get("metric_per_case") or []:
        name = os.path.basename(str(entry.get("reference_file") or entry.get("prediction_file") or ""))
        case = name[:-len(ending)] if name.endswith(ending) else name
        metrics = entry.get("metrics") or {}
        values = [(metrics.get(key) or {}).get("Dice") for key in keys]
        values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        out[case] = float(np.mean(values)) if values else math.nan
    return dict(sorted(out.items()))


def _cases_of(row: Mapping[str, Any]) -> Dict[str, float]:
    """A results row's per-case Dice (its ``dice[CASE]`` columns; an empty cell is NaN)."""
    out = {}
    for key, value in row.items():
        if key.startswith(CASE_PREFIX) and key.endswith("]"):
            try:
                out[key[len(CASE_PREFIX):-1]] = float(value)
            except (TypeError, ValueError):
                out[key[len(CASE_PREFIX):-1]] = math.nan
    return out


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["init"]  # every row's columns, first seen first
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4f}"


def summary_markdown(rows, names, n_held_out, fold, configuration, epochs, iterations,
                     header: Optional[Sequence[str]] = None) -> str:
    """The study's summary: mean +- sd of the mean Dice per init x labelled; paired differences to scratch.

    With per-case Dice in the rows (``dice[CASE]`` columns, as the study writes them) each comparison pairs the same
    case, seed and labelled count, with a bootstrap interval over seeds and the shared held-out cases; without (e.g.
    ``benchmarks/simulation.py``'s rows) it pairs each seed's mean Dice, with a t interval over seeds. Either way an
    interval needs :data:`~med3dinsight_plugin.stats.MIN_UNITS` units per level, p is an exact sign-flip test over
    seeds, and the p-values are Holm-adjusted over all comparisons of the table (see :func:`compare`).

    ``header`` replaces the title and the paragraph that says how the Dice was measured (for other instruments,
    e.g. ``benchmarks/simulation.py``)."""
    counts = sorted({r["labelled"] for r in rows})
    lines = list(header) if header is not None else [
        f"# Initialisation study ({configuration}, fold {fold})", "",
        f"Mean foreground Dice of nnU-Net's validation on the same {n_held_out} held-out cases; "
        f"epochs {epochs or 'trainer default'}, iterations/epoch {iterations or 'trainer default'}. "
        f"mean +- sd over seeds (n = seeds)."]
    lines += ["", "| init | " + " | ".join(f"{c} labelled" for c in counts) + " |",
              "|---|" + "---|" * len(counts)]
    for name in names:
        cells = []
        for c in counts:
            values = [r["mean_dice"] for r in rows if r["init"] == name and r["labelled"] == c
                      and math.isfinite(r["mean_dice"])]
            if not values:
                cells.append("n/a")
                continue
            sd = f"{np.std(values, ddof=1):.4f}" if len(values) > 1 else "n/a"
            cells.append(f"{np.mean(values):.4f} +- {sd} (n={len(values)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [n for n in names if n != "scratch"]
    lines += [""]
    if "scratch" in names and others:
        lines += _comparison_lines(rows, [(name, "scratch") for name in others])
    else:
        lines.append("No paired differences: the study has no 'scratch' init to compare with.")
    if REFERENCE in names:
        lines += ["", f"'{REFERENCE}' is nnU-Net's default nnUNetTrainer recipe on the plans' own architecture "
                      f"(same cases, schedule and seed)."]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Comparison:
    """``init - baseline`` at one labelled count: the estimate, its sign-flip p over seeds, the Holm-adjusted p."""
    init: str
    baseline: str
    labelled: int
    estimate: Estimate
    p: float
    p_holm: float = math.nan


def compare(rows: Sequence[Mapping[str, Any]], pairs: Sequence[Tuple[str, str]], n_boot: int = N_BOOT,
            seed: int = 0) -> List[Comparison]:
    """Every ``(init, baseline)`` pair at every labelled count where both have a seed, Holm-adjusted over all.

    Rows with per-case Dice (``dice[CASE]`` columns) pair the same case, seed and labelled count, and the interval is
    :func:`~med3dinsight_plugin.stats.hierarchical_bootstrap` over seeds and shared cases; other rows pair each
    seed's ``mean_dice``, with a t interval over seeds. p: exact two-sided sign-flip test of the seeds' mean
    differences (the seed's pair of runs is the randomised unit, so its cases flip together).
    """
    per_case = bool(rows) and all(_cases_of(r) for r in rows)  # a run whose cases are all NaN pairs none
    out = []
    for init, baseline in pairs:
        for labelled in sorted({r["labelled"] for r in rows if r["init"] == init}):
            runs = {(r["init"], r["seed"]): r for r in rows if r["labelled"] == labelled}
            seeds = sorted(s for (name, s) in runs if name == init and (baseline, s) in runs)
            if not seeds:
                continue
            if per_case:
                diffs = {s: paired_by_key(_cases_of(runs[(init, s)]), _cases_of(runs[(baseline, s)])) for s in seeds}
                cases = sorted({c for d in diffs.values() for c in d})
                table = [[diffs[s].get(c, math.nan) for c in cases] for s in seeds]
                estimate = hierarchical_bootstrap(table, n_boot=n_boot, seed=seed, shared_inner=True, unit="seeds",
                                                  inner_unit="cases")
                seed_means = [float(np.mean(list(d.values()))) for d in diffs.values() if d]
            else:
                seed_means = list(paired_by_key({s: runs[(init, s)]["mean_dice"] for s in seeds},
                                                {s: runs[(baseline, s)]["mean_dice"] for s in seeds}).values())
                estimate = t_interval(seed_means, unit="seeds")
            out.append(Comparison(init, baseline, labelled, estimate, sign_flip_p(seed_means)))
    adjusted = holm([c.p for c in out])
    return [Comparison(c.init, c.baseline, c.labelled, c.estimate, c.p, a) for c, a in zip(out, adjusted)]


def _p(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def _comparison_lines(rows: Sequence[Mapping[str, Any]], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """The lines of the summary's paired-difference section (see :func:`compare`)."""
    comparisons = compare(rows, pairs)
    if not comparisons:
        return ["No paired differences: no seed and labelled count has runs of both inits."]
    baselines = sorted({c.baseline for c in comparisons})
    title = f"## Paired difference to {baselines[0]}" if len(baselines) == 1 else "## Paired differences"
    if comparisons[0].estimate.inner_unit is not None:
        lines = [f"{title} (same case, seed and labelled count)", "",
                 "Per held-out case: its Dice (the mean over the foreground classes in its reference or prediction) "
                 "with the init minus with the baseline, same seed and labelled count; the mean difference is the "
                 "mean over seeds of each seed's mean over cases. Interval: 95 % bootstrap that resamples the seeds "
                 "and, once for all of them, the held-out cases (every seed is evaluated on the same cases), "
                 f"{N_BOOT} resamples, seed 0; expanded percentile (Hesterberg), widened for the number of seeds."]
    else:
        lines = [f"{title} (same seed and labelled count)", "",
                 "Per seed: the init's mean Dice minus the baseline's, same labelled count; the mean difference is "
                 "the mean over seeds. Interval: 95 % Student-t interval over seeds."]
    m = sum(math.isfinite(c.p) for c in comparisons)
    lines[-1] += (f" An interval needs at least {MIN_UNITS} units per level; below that the row says too few and "
                  f"gives none. p: exact two-sided sign-flip test over seeds (a seed's differences flip together; "
                  f"with n seeds p cannot fall below 2/2^n: 0.25 at 3 seeds, 0.0625 at 5). This table holds "
                  f"{len(comparisons)} comparison{'s' if len(comparisons) != 1 else ''}; p (Holm) is adjusted over "
                  f"{'all ' if m > 1 else ''}{m} of them, the intervals are not.")
    lines += ["", "| init | labelled | mean difference | 95 % interval | n | p | p (Holm) |",
              "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        name = c.init if len(baselines) == 1 else f"{c.init} - {c.baseline}"
        lines.append(f"| {name} | {c.labelled} | {_fmt(c.estimate.mean)} | {c.estimate.bounds()} | "
                     f"{c.estimate.sample} | {_p(c.p)} | {_p(c.p_holm)} |")
    return lines


def plot_label_efficiency(rows, names, path: Path) -> Path:
    """Mean Dice against the number of labelled cases, one line per init, error bars = sd over seeds (Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name in names:
        xs, ys, es = [], [], []
        for c in sorted({r["labelled"] for r in rows if r["init"] == name}):
            values = [r["mean_dice"] for r in rows if r["init"] == name and r["labelled"] == c
                      and math.isfinite(r["mean_dice"])]
            if values:
                xs.append(c)
                ys.append(float(np.mean(values)))
                es.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set(xlabel="labelled training cases", ylabel="mean Dice (held-out)", title="label efficiency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)
