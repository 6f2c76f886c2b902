"""``med3dinsight pretrain``: from a configuration to a pretrained checkpoint.

Opens the volumes and the teacher cache, checks that they belong together, prepares the normalised volumes once
(rank 0; other ranks wait), builds the model (for an nnU-Net preprocessed dataset and ``backbone: nnunet``, from that
dataset's own plans), test-loads the encoder into a freshly built downstream network before the first step -- so a
checkpoint that could not be fine-tuned fails now, not days later -- and hands over to :func:`.engine.pretrain`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from ..checkpoint import atomic_write
from ..teacher.cache import TeacherCache
from .config import ConfigError, PretrainConfig
from .data import PretrainDataset, compute_normalization, prepare_volumes, split_cases

__all__ = ["run_pretraining", "check_downstream_load"]

ORIENTATION = "canonical LPS: axis 0 toward superior, 1 toward posterior, 2 toward the patient's left"
EVAL_CROPS_PER_CASE = 4


def _distributed(config: PretrainConfig):
    """Join the torchrun process group early: rank 0 prepares the data while the others wait."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = config.train.device.startswith("cuda") or (config.train.device == "auto" and torch.cuda.is_available())
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        return int(os.environ.get("RANK", "0")), world, True
    return (torch.distributed.get_rank(), world, False) if world > 1 else (0, 1, False)


def _backbone_kwargs(config: PretrainConfig, source) -> None:
    """``backbone: nnunet`` on an nnU-Net preprocessed dataset: build from that dataset's plans by default."""
    m = config.model
    if m.backbone == "nnunet" and "plans" not in m.backbone_kwargs:
        if source.kind != "nnunet_preprocessed":
            raise ConfigError("model.backbone 'nnunet' needs nnU-Net plans: pretrain on an nnU-Net preprocessed "
                              "dataset, or set model.backbone_kwargs.plans=PATH (and .configuration)")
        m.backbone_kwargs = {**m.backbone_kwargs, "plans": str(source.root / f"{config.data.plans}.json"),
                             "configuration": config.data.configuration}


def check_downstream_load(model, metadata: Dict[str, Any]):
    """Save the backbone, rebuild the downstream network from the checkpoint alone and load its encoder strictly
    with the loader nnU-Net and MONAI use; raises if fine-tuning would not be able to load it.

    Returns:
        The :class:`~med3dinsight_plugin.loading.LoadReport`.
    """
    from ..backbones import build_backbone_from_config
    from ..checkpoint import load_checkpoint, save_pretrained, unwrap
    from ..loading import load_pretrained_encoder

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(save_pretrained(unwrap(model).backbone, Path(tmp) / "probe.safetensors", **metadata))
    plan = ckpt.metadata["adaptation_plan"]["architecture_plans"]
    if ckpt.metadata["backbone"]["name"] in ("nnunet", "plain_conv_unet", "resenc_unet"):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        network = get_network_from_plans(ckpt.metadata["network_class"], plan["arch_kwargs"],
                                         plan["arch_kwargs_requiring_import"], ckpt.metadata["in_channels"], 3,
                                         deep_supervision=True)  # as nnU-Net builds it, with another class count
    else:
        network = build_backbone_from_config(ckpt.metadata["backbone"]).network
    return load_pretrained_encoder(network, ckpt)


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
            from ..teacher.cache import StaleCacheError, diff_keys
            raise StaleCacheError(f"{out} was started with another teacher cache ({', '.join(diff_keys(started, teacher)[:3])}"
                                  f" differ); resume with the cache it started with, or use a new output folder")
    else:
        atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(teacher, indent=1)))


def run_pretraining(config: PretrainConfig, resume: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Pretrain as ``config`` says (alone or under torchrun) and return the engine's summary.

    Raises:
        ConfigError, VolumeError, CacheError: bad configuration or data, before any training step.
    """
    from .engine import build_model, pretrain
    from ..volumes import open_source

    d = config.data
    for key in ("source", "cache"):
        if not getattr(d, key):
            raise ConfigError(f"data.{key} is not set; pass --data/--cache or set it in the config")
    if not config.output:
        raise ConfigError("output is not set; pass -o/--output or set it in the config")
    source = open_source(d.source, modality=d.modality, configuration=d.configuration, plans=d.plans)
    if source.num_channels != config.model.in_channels:
        raise ConfigError(f"{d.source} has {source.num_channels} channel(s) but model.in_channels is "
                          f"{config.model.in_channels}; set model.in_channels={source.num_channels}")
    cache = TeacherCache(d.cache, expect={"source": {k: source.describe()[k] for k in ("kind", "num_channels")}})
    train_cases, eval_cases = split_cases(source.cases, d.eval_cases, d.seed)
    _backbone_kwargs(config, source)
    rank, world, own_group = _distributed(config)
    try:
        prepared = Path(config.output) / "prepared"
        if rank == 0:
            _check_output(Path(config.output), cache)
            normalization = compute_normalization(source, train_cases, d.seed)
            shapes = prepare_volumes(source, source.cases, prepared, normalization)
            payload = [normalization, shapes]
        else:
            payload = [None, None]
        if world > 1:
            torch.distributed.broadcast_object_list(payload, src=0)  # plain JSON-like objects from rank 0
        normalization, shapes = payload
        model = build_model(config, cache.embed_dim)
        patch = model.backbone.patch_size
        train_set = PretrainDataset(prepared, train_cases, shapes, cache, patch, d.slices_per_sample, d.seed,
                                    d.augment)
        eval_set = None if not eval_cases else PretrainDataset(
            prepared, eval_cases, shapes, cache, patch, d.slices_per_sample, d.seed, augment=False,
            length=EVAL_CROPS_PER_CASE * len(eval_cases))
        metadata = {"intensity_normalization": normalization, "orientation": ORIENTATION,
                    "teacher": cache.settings["teacher"], "teacher_slices": cache.settings["slices"],
                    "teacher_render": cache.settings["render"], "captions": cache.settings.get("captions"),
                    "data": source.describe()}
        return pretrain(config, model, train_set, eval_set, metadata=metadata, resume=resume, progress=progress,
                        on_start=lambda m: check_downstream_load(m, metadata))
    finally:
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
