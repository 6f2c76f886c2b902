"""``med3dinsight pretrain``: from a configuration to a pretrained checkpoint.

Checks the backbone's arguments, takes the run folder's lock (``OUTPUT/.lock``: one run per folder), opens the
volumes and the teacher cache, checks that they belong together, prepares the normalised volumes once (rank 0;
other ranks wait), builds the model (for an nnU-Net preprocessed dataset and ``backbone: nnunet``, from that
dataset's own plans), test-loads the encoder into a freshly built downstream network before the first step -- so a
checkpoint that could not be fine-tuned fails now, not days later -- and hands over to :func:`.engine.pretrain`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..backbones import backbone_family
from ..checkpoint import load_checkpoint, save_pretrained
from ..crops import CropSource
from ..distributed import init_distributed
from ..downstream import build_downstream_network
from ..errors import Med3DInsightError, first_line
from ..fileio import atomic_write, diff_keys, unwrap
from ..loading import load_pretrained_encoder
from ..runlock import RunLock, RunLockedError  # re-exported: the lock moved to the shared module
from ..teacher.cache import StaleCacheError, TeacherCache
from ..volumes import open_source
from .config import ConfigError, PretrainConfig, check_backbone_kwargs
from .data import PretrainDataset, compute_normalization, median_spacing, prepare_volumes, prepared_boxes, split_cases
from .engine import PretrainResult, pretrain
from .factory import build_model

__all__ = ["PretrainResult", "RunLock", "RunLockedError", "run_pretraining", "check_downstream_load"]

ORIENTATION = "canonical LPS: axis 0 toward superior, 1 toward posterior, 2 toward the patient's left"
EVAL_CROPS_PER_CASE = 4


def _backbone_kwargs(config: PretrainConfig, source) -> None:
    """A backbone built from nnU-Net plans (``backbone: nnunet``) on an nnU-Net preprocessed dataset: build from that
    dataset's plans by default."""

    m = config.model
    if m.backbone in backbone_family(m.backbone).plans_builders and "plans" not in m.backbone_kwargs:
        if source.kind != "nnunet_preprocessed":
            raise ConfigError(f"model.backbone {m.backbone!r} needs nnU-Net plans: pretrain on an nnU-Net "
                              f"preprocessed dataset, or set model.backbone_kwargs.plans=PATH (and .configuration)")
        m.backbone_kwargs = {**m.backbone_kwargs, "plans": str(source.root / f"{config.data.plans}.json"),
                             "configuration": config.data.configuration}


def check_downstream_load(model, metadata: Dict[str, Any]):
    """Save the backbone, rebuild the downstream network from the checkpoint alone and load its encoder strictly
    with the loader nnU-Net and MONAI use; raises if fine-tuning would not be able to load it.

    Args:
        model: the :class:`~med3dinsight_plugin.model.Med3DInsightModel` about to be pretrained (wrapped or not).
        metadata: the metadata the run's checkpoints will carry.

    Returns:
        The :class:`~med3dinsight_plugin.loading.LoadReport`.
    """

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(save_pretrained(unwrap(model).backbone, Path(tmp) / "probe.safetensors", **metadata))
    return load_pretrained_encoder(build_downstream_network(ckpt), ckpt)


def _check_scanner_units(cache: TeacherCache, described: Dict[str, Any], d) -> None:
    """The volume view cuts each preprocessed volume's body box from its scanner units (raw Hounsfield units, or the
    undone z-score when the raw dataset is not found; ``described`` is the source's ``describe()``): they must be the
    units the cache's slices were chosen in. The crop view reads only the preprocessed arrays, so it takes either."""
    made = (cache.settings.get("source") or {}).get("scanner_units")
    now = described.get("scanner_units")
    if d.view != "volume" or made is None or now is None or made == now:
        return

    if made == "raw":
        fix = f"set data.raw (or nnUNet_raw) to the raw dataset {d.source} was preprocessed from, as for embed"
    else:
        fix = "rerun med3dinsight embed into a new folder with the raw dataset found (--raw or nnUNet_raw)"
    raise StaleCacheError(f"the teacher cache {cache.folder} chose its slices in {made} scanner units but "
                          f"data.view=volume would cut body boxes from {now} ones; {fix}")


def _check_output(out: Path, cache: TeacherCache) -> None:
    """A writable run folder, and on resumption the same teacher as when the run started."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {out} ({e.strerror or e}); choose another -o/--output") \
            from None
    record = out / "teacher.json"
    teacher = {k: cache.settings[k] for k in ("teacher", "slices", "render", "captions")}
    if record.is_file():
        started = json.loads(record.read_text())
        if started != json.loads(json.dumps(teacher)):
            differ = ", ".join(diff_keys(started, teacher)[:3])
            raise StaleCacheError(f"{out} was started with another teacher cache ({differ} differ); resume with the "
                                  f"cache it started with, or use a new output folder")
    else:
        atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(teacher, indent=1)))


def run_pretraining(config: PretrainConfig, resume: bool = True, progress: bool = True) -> PretrainResult:
    """Pretrain as ``config`` says (alone or under torchrun) and return the engine's summary.

    Returns:
        The :class:`~.engine.PretrainResult` of :func:`.engine.pretrain`: ``checkpoint`` (the final
        ``med3dinsight.safetensors``, rank 0), ``state``, ``output``, ``steps``, ``start_step``, ``global_batch``,
        ``losses``, ``eval``.

    Raises:
        ConfigError, VolumeError, CacheError: bad configuration or data, before any training step.
        RunLockedError: another process is pretraining into the same output folder.

    A run that fails before its first optimizer step leaves the output folder as it found it: folders it created are
    removed, a folder that existed keeps only what was there (a resumable run's files unchanged).
    """
    d = config.data
    for key in ("source", "cache"):
        if not getattr(d, key):
            raise ConfigError(f"data.{key} is not set; pass --data/--cache or set it in the config")
    if not config.output:
        raise ConfigError("output is not set; pass -o/--output or set it in the config")
    check_backbone_kwargs(config.model)  # before any data is read: a typo must not cost a preparation pass
    rank = int(os.environ.get("RANK", "0"))
    folder = _RunFolder(Path(config.output)) if rank == 0 else None  # before the lock creates anything
    # tidy: on release, the folders the lock created go again if they are empty then (a run that failed early)
    lock = RunLock(config.output, tidy=True).acquire() if rank == 0 else None
    try:
        return _run_locked(config, resume, progress, folder)
    except Exception:
        if folder is not None:
            folder.remove_ours()  # before its first step only; the lock and the folders it created go at release
        raise
    finally:
        if lock is not None:
            lock.release()


class _RunFolder:
    """What a run adds to its output folder before its first optimizer step, so that a run failing before then
    leaves the folder as it found it: no folder it created (the lock's ``tidy`` removes those once empty), nothing of
    its own in a folder the user made, and a resumable run's files as they were (new files in its ``checkpoints/``,
    ``tensorboard/`` and ``prepared/`` removed; ``config.yaml`` and ``metrics.jsonl``, which the start rewrites, put
    back). Once a step has run, the run's files stay (its metrics and checkpoints tell what happened).
    """

    REWRITTEN = ("config.yaml", "metrics.jsonl")  # existing files the start of a run rewrites
    SUBFOLDERS = ("checkpoints", "tensorboard", "prepared")  # the run's own folders, one level deep

    def __init__(self, out: Path):
        self.out = out
        self.before = self._entries()
        self.kept = {name: (out / name).read_bytes() for name in self.REWRITTEN if (out / name).is_file()}
        self.stepped = False

    def _entries(self) -> set:
        """The paths (relative, ``/``-joined) of the folder's entries and of those in the run's own subfolders."""
        if not self.out.is_dir():
            return set()
        names = set(os.listdir(self.out))
        for sub in self.SUBFOLDERS:
            if sub in names and (self.out / sub).is_dir() and not (self.out / sub).is_symlink():
                names |= {f"{sub}/{name}" for name in os.listdir(self.out / sub)}
        return names

    def watch(self, model) -> None:
        """Note the first optimizer step of ``model`` (the loop calls ``after_optimizer_step`` after each)."""
        after = model.after_optimizer_step

        def after_optimizer_step():
            self.stepped = True
            return after()
        model.after_optimizer_step = after_optimizer_step

    def remove_ours(self) -> None:
        """Remove what this run added (unless it has taken a step) and put back the files it rewrote."""
        import shutil

        if self.stepped:
            return
        for name in sorted(self._entries() - self.before - {".lock"}):  # .lock: the lock's own, at release
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # a new subfolder: its entries with it
            elif path.exists() or path.is_symlink():
                path.unlink(missing_ok=True)
        for name, data in self.kept.items():
            path = self.out / name
            if not path.is_file() or path.read_bytes() != data:
                atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))


def target_spacing(data, source) -> Optional[List[float]]:
    """The voxel size the crop view resamples to (``data.target_spacing``, else the dataset's median for
    ``data.spacing: median``), or None: the volume view, ``native``, or nnU-Net preprocessed data (already at the
    plans' spacing)."""
    if data.view != "crop" or source.kind == "nnunet_preprocessed":
        return None
    if data.target_spacing is not None:
        return [float(x) for x in data.target_spacing]
    return median_spacing(source, source.cases) if data.spacing == "median" else None


def teacher_spaces(cache) -> Dict[str, Any]:
    """``build_model``'s arguments that the teacher cache decides besides the image width: ``text_dim`` (``None``
    when the text targets share the image space, as open_clip's do) and ``map_shape`` (its feature maps, if any)."""
    shared = getattr(cache, "shared_space", True)
    return {"text_dim": None if shared or not cache.has_text else int(cache.text_dim),
            "map_shape": tuple(cache.map_shape) if getattr(cache, "has_maps", False) else None}


def _run_locked(config: PretrainConfig, resume: bool, progress: bool, folder: Optional[_RunFolder]
                ) -> PretrainResult:
    d = config.data
    source = open_source(d.source, modality=d.modality, configuration=d.configuration, plans=d.plans, raw=d.raw)
    if d.crops:

        if d.crop_mm is None:
            raise ConfigError("data.crops needs data.crop_mm (the crops' size in mm, as given to embed --crop-mm)")
        source = CropSource(source, d.crops, d.crop_mm, d.crop_seed)
    elif d.crop_mm is not None or d.crop_seed:
        raise ConfigError(f"data.{'crop_mm' if d.crop_mm is not None else 'crop_seed'} is set but data.crops is 0 "
                          f"(whole volumes): set data.crops to the crops per volume the cache was embedded with "
                          f"(embed --crops N), or remove data.crop_mm / data.crop_seed")
    if source.num_channels != config.model.in_channels:
        raise ConfigError(f"{d.source} has {source.num_channels} channel(s) but model.in_channels is "
                          f"{config.model.in_channels}; set model.in_channels={source.num_channels}")
    described = source.describe()
    # one modality decision per dataset: a cache rendered as MRI does not teach a CT pretraining
    cache = TeacherCache(d.cache, expect={"source": {k: described.get(k)
                                                     for k in ("kind", "num_channels", "modality", "crops")}})
    _check_scanner_units(cache, described, d)
    # with crops, hold out whole volumes: crops of one volume on both sides would flatter the retrieval
    train_cases, eval_cases = split_cases(source.cases, d.eval_cases, d.seed,
                                          subject=source.volume_of if d.crops else None)
    _backbone_kwargs(config, source)
    # One process group for the whole run, its CUDA device selected before the first collective (the broadcast
    # below); the engine trains in the same context.
    with init_distributed(config.train.device, option="train.device") as ctx:
        model = build_model(config, cache.embed_dim, **teacher_spaces(cache))  # first: the volume view resamples
        if folder is not None:
            folder.watch(model)
        patch = model.backbone.patch_size
        prepared = Path(config.output) / "prepared"
        payload, failure = [None, None, None, None], None
        if ctx.is_main:
            try:
                _check_output(Path(config.output), cache)
                normalization = compute_normalization(source, train_cases, d.seed)
                spacing = target_spacing(d, source)
                shapes = prepare_volumes(source, source.cases, prepared, normalization, cache, view=d.view,
                                         patch_size=patch, spacing=spacing)
                payload = [normalization, shapes, spacing, None]
            except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                failure = e
                payload = [None, None, None, first_line(e)]
        # plain JSON-like objects from rank 0, or why it failed (so no rank waits for data that never comes)
        normalization, shapes, spacing, error = ctx.broadcast_object(payload)
        if failure is not None:
            raise failure
        if error is not None:
            raise Med3DInsightError(f"rank 0 failed to prepare the data: {error}")
        boxes = prepared_boxes(prepared) if d.view == "volume" else None  # written by rank 0 before the broadcast
        maps = model.dense_head is not None
        train_set = PretrainDataset(prepared, train_cases, shapes, cache, patch, d.slices_per_sample, d.seed,
                                    d.augment, boxes=boxes, maps=maps)
        eval_set = None if not eval_cases else PretrainDataset(
            prepared, eval_cases, shapes, cache, patch, d.slices_per_sample, d.seed, augment=False,
            length=EVAL_CROPS_PER_CASE * len(eval_cases), boxes=boxes, maps=maps)
        metadata = {"intensity_normalization": normalization, "orientation": ORIENTATION,
                    "teacher": cache.settings["teacher"], "teacher_slices": cache.settings["slices"],
                    "teacher_render": cache.settings["render"], "captions": cache.settings.get("captions"),
                    "data": {**described, **({"target_spacing": spacing} if spacing else {})}}
        return pretrain(config, model, train_set, eval_set, metadata=metadata, resume=resume, progress=progress,
                        on_start=lambda m: check_downstream_load(m, metadata), context=ctx)
