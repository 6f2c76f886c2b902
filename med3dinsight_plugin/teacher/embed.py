"""Embed every selected slice of a dataset (and its caption) with the teacher, into a :mod:`.cache` folder.

Runs in one process or under ``torchrun``: shard ``k`` (a fixed run of sorted cases) belongs to rank
``k % world_size``, so the files are the same for any number of processes; finished shards that match the settings
are kept, so a crashed run resumes. Rank 0 writes the manifest once every shard exists.

With ``feature_maps=S`` each slice's spatial feature map is stored too, cropped to the slice (the letterbox left
out), resampled to S x S and put back on the slice's canonical in-plane axes (the display flips undone), so that the
3D side can align it with its own features at the same place; see :func:`med3dinsight_plugin.slices.feature_map_grid`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..distributed import init_distributed
from ..errors import Med3DInsightError, first_line
from ..fileio import diff_keys, sha256_file
from ..planes import plane_id
from ..results import Result
from ..runlock import RunLock
from ..slices import RenderSettings, SlicePolicy, feature_map_grid, volume_slices
from .cache import (
    MANIFEST,
    CacheError,
    StaleCacheError,
    _read_header,
    format_version_for,
    read_manifest,
    settings_hash,
    shard_name,
    write_manifest,
    write_shard,
)
from .captions import CaptionFile
from .clip import TeacherError

__all__ = ["MAX_FEATURE_MAP_SIZE", "EmbedResult", "embed_dataset", "caption_settings_for"]

MAX_FEATURE_MAP_SIZE = 32  # S x S cells per slice and channel: 32 -> 2.6 MB per slice for a 1280-channel map


@dataclass(frozen=True)
class EmbedResult(Result):
    """What one process of :func:`embed_dataset` did; the manifest that rank 0 writes lists every case and shard.

    Attributes:
        folder: the cache folder.
        cases: the cases of the whole dataset.
        slices_embedded_here: slices this rank embedded now (in the shards it wrote; kept shards count none).
        shards_written: shards this rank wrote now.
        shards_kept: shards of this rank kept from an earlier run (same settings).
        seconds: from this rank's first shard to the written manifest, rounded to 0.01 s.
        rank, world: this process's rank and the number of processes.
    """
    folder: str
    cases: int
    slices_embedded_here: int
    shards_written: int
    shards_kept: int
    seconds: float
    rank: int
    world: int


def caption_settings_for(policy: SlicePolicy, render: RenderSettings) -> Dict[str, Any]:
    """The slice/rendering settings captions must share with the embeddings (the render size may differ)."""
    r = render.to_dict()
    r.pop("size")
    return {"slices": policy.to_dict(), "render": r}


def _load_captions(path: Path, policy: SlicePolicy, render: RenderSettings):
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"caption file {path} does not exist; run med3dinsight caption first (or embed without "
                         f"--captions for image embeddings only)")
    meta_path = Path(f"{path}.meta.json")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # ValueError: not JSON or not UTF-8
            raise CacheError(f"cannot read the caption settings {meta_path} ({first_line(e)}); restore it from the "
                             f"caption run, or rerun med3dinsight caption into a new file") from None
    ours = caption_settings_for(policy, render)
    theirs = {k: meta.get(k) for k in ours}
    if meta and diff_keys(theirs, ours):
        raise StaleCacheError(f"{path} was captioned with other slice settings ({', '.join(diff_keys(theirs, ours))} "
                              f"differ); embed with the same --per-plane/--min-foreground/window as caption")
    records = CaptionFile.read(path)
    digest = sha256_file(path)  # the content, not the path, identifies the captions
    return {k: r["text"] for k, r in records.items()}, {"sha256": digest, "model": meta.get("model")}


def embed_dataset(source, out, teacher, policy: Optional[SlicePolicy] = None,
                  render: Optional[RenderSettings] = None, captions: Optional[str] = None, batch_size: int = 64,
                  cases_per_shard: int = 32, progress: bool = True,
                  feature_maps: Optional[int] = None) -> EmbedResult:
    """Embed the slices of every case of ``source`` into the cache folder ``out``.

    Args:
        source: a :class:`~med3dinsight_plugin.volumes.VolumeSource`.
        out: cache folder (created; an existing cache must have been made with the same settings).
        teacher: a teacher from :func:`~med3dinsight_plugin.teacher.build_teacher` (a
            :class:`~med3dinsight_plugin.teacher.clip.ClipTeacher`,
            :class:`~med3dinsight_plugin.teacher.timm_teacher.TimmTeacher`, or an image and a text teacher paired), or
            any object with ``identity()``, ``image_size``, ``embed_dim``, ``device``, ``encode_images`` and
            ``encode_texts`` (``text_dim``/``shared_space`` when its text side is another width/space; for maps
            ``map_channels`` and ``encode_images_with_maps(images) -> (pooled (N, E), maps (N, C, h, w))``, the maps
            covering the whole rendered canvas).
        policy, render: slice selection and rendering (``render.size`` is set to the teacher's input size).
        captions: a caption JSONL from ``med3dinsight caption`` made with the same slice settings; every selected
            slice needs its caption. ``None`` caches image embeddings only.
        batch_size: slices per teacher forward pass.
        cases_per_shard: consecutive cases per shard file.
        feature_maps: ``S`` to store each slice's S x S spatial feature map too (``image_map``, float16,
            ``C * S * S * 2`` bytes per slice), at most :data:`MAX_FEATURE_MAP_SIZE`; ``None`` (default): none.

    Returns:
        This process's part, an :class:`EmbedResult`: ``folder``, ``cases`` (of the whole dataset),
        ``slices_embedded_here`` (by this rank, in the shards it wrote now), ``shards_written``, ``shards_kept``,
        ``seconds``, ``rank``, ``world``; the manifest that rank 0 writes lists every case and shard.
    """
    for name, value, flag in (("batch_size", batch_size, "--batch-size"),
                              ("cases_per_shard", cases_per_shard, "--cases-per-shard")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CacheError(f"{name} ({flag}) must be a whole number of at least 1, got {value!r}")
    _check_map_size(feature_maps)
    if feature_maps is not None:
        _check_map_teacher(teacher)
    text_dim = getattr(teacher, "text_dim", teacher.embed_dim)
    if captions is not None and text_dim is None:
        raise TeacherError(f"the teacher {teacher.identity().get('model')} has no text model for the captions "
                           f"{captions}; pass one (--text-model PATH) or embed without --captions")
    policy = policy or SlicePolicy()
    render = RenderSettings(**{**(render or RenderSettings()).to_dict(), "size": teacher.image_size})
    if render.channel >= source.num_channels:
        raise CacheError(f"{source.root} has {source.num_channels} channel(s) per case; render channel "
                         f"{render.channel} does not exist (--channel takes 0 to {source.num_channels - 1})")
    texts, caption_info = (None, None) if captions is None else _load_captions(captions, policy, render)
    identity = dict(teacher.identity())
    identity.setdefault("text_dim", text_dim)
    identity.setdefault("shared_space", bool(getattr(teacher, "shared_space", True)))
    settings = {"teacher": identity, "render": render.to_dict(), "slices": policy.to_dict(),
                "captions": caption_info, "source": source.describe()}
    if feature_maps is not None:  # absent otherwise, so caches without maps keep the settings they had
        settings["feature_maps"] = feature_maps
    digest, version = settings_hash(settings), format_version_for(settings)
    out = Path(out)
    with init_distributed(str(teacher.device), option="--device") as ctx:  # joins the caller's group if any
        rank, world = ctx.rank, ctx.world_size
        # one embed run per cache folder (rank 0 holds the lock, which creates the folder); a held lock stops every
        # rank, so that none waits for the others
        lock = _on_rank0(ctx, lambda: RunLock(out, what=f"the teacher cache {out}").acquire())
        try:
            if (out / MANIFEST).is_file():
                old = read_manifest(out)["settings"]
                if old != settings:
                    differ = ", ".join(diff_keys(old, settings)[:4])
                    raise StaleCacheError(f"{out} holds a cache made with other settings ({differ} differ); embed "
                                          f"into a new folder")
            cases = source.cases
            shard_cases = {k: cases[i:i + cases_per_shard] for k, i in enumerate(range(0, len(cases), cases_per_shard))}
            mine = [k for k in shard_cases if k % world == rank]
            start, written, kept, n_slices = time.perf_counter(), 0, 0, 0
            bar = _progress(sum(len(shard_cases[k]) for k in mine), progress and rank == 0)
            try:
                for k in mine:
                    path = out / shard_name(k)
                    if _keep_shard(path, digest):
                        kept += 1
                        bar.update(len(shard_cases[k]))
                        continue
                    rows, shapes, prints = _embed_cases(source, shard_cases[k], teacher, policy, render, texts,
                                                        batch_size, bar, feature_maps)
                    write_shard(out, k, shard_cases[k], shapes, rows, digest, fingerprints=prints,
                                format_version=version)
                    written += 1
                    n_slices += len(rows["plane"])
            finally:
                bar.close()  # before any error message, so that the message is the last line
            ctx.barrier()
            if rank == 0:
                missing = [shard_name(k) for k in shard_cases if not (out / shard_name(k)).is_file()]
                if missing:
                    raise CacheError(f"{out} lacks {len(missing)} shard(s) ({missing[0]}, ...) after embedding; rerun "
                                     f"the same command to finish them")
                write_manifest(out, settings, shard_cases)
            ctx.barrier()
            return EmbedResult(folder=str(out), cases=len(cases), slices_embedded_here=n_slices, shards_written=written,
                               shards_kept=kept, seconds=round(time.perf_counter() - start, 2), rank=rank, world=world)
        finally:
            if lock is not None:
                lock.release()


def _on_rank0(ctx, fn):
    """``fn()`` on rank 0 (``None`` elsewhere); a user error there is raised on every rank."""
    result, error = None, None
    if ctx.rank == 0:
        try:
            result = fn()
        except Med3DInsightError as e:
            error = e
    if ctx.world_size > 1:
        message = ctx.broadcast_object(None if error is None else first_line(error))
        if error is None and message is not None:
            raise CacheError(message)
    if error is not None:
        raise error
    return result


def _keep_shard(path: Path, digest: str) -> bool:
    """Whether a shard left by an earlier run is kept: it must be readable, carry the volume fingerprints and match
    the settings (a damaged or pre-fingerprint shard is rewritten; one made with other settings is refused)."""
    if not path.is_file():
        return False
    try:
        meta, _ = _read_header(path)
    except CacheError:
        return False  # damaged (e.g. a crash while copying it): embedding it again repairs it
    if meta.get("settings") != digest:
        raise StaleCacheError(f"{path} was written with other settings (teacher, rendering, slices, captions or "
                              f"dataset); embed into a new folder")
    return isinstance(meta.get("fingerprints"), dict)


def _check_map_size(size) -> None:
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_FEATURE_MAP_SIZE:
        raise CacheError(f"feature_maps (--feature-maps) must be a whole number from 1 to {MAX_FEATURE_MAP_SIZE} "
                         f"(cells per side of each slice's map; a 1280-channel map of S x S costs 1280*S*S*2 bytes per "
                         f"slice), got {size!r}")


def _check_map_teacher(teacher) -> None:
    """Refuse, before anything runs, a teacher that gives no spatial feature maps."""
    if not hasattr(teacher, "encode_images_with_maps"):
        raise TeacherError(f"feature maps (--feature-maps) need a teacher with spatial features (a timm image model: "
                           f"--image-model timm:NAME); {type(teacher).__name__} gives none")
    channels = teacher.map_channels  # a teacher whose model has no map raises TeacherError here
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise TeacherError(f"feature maps (--feature-maps) need a teacher with spatial features (a timm image model: "
                           f"--image-model timm:NAME); {type(teacher).__name__} gives none")


def canonical_maps(fmap, slices, canvas: int, size: int) -> np.ndarray:
    """Teacher feature maps of rendered slices ``(N, C, h, w)`` over the whole ``canvas`` square -> ``(N, C, size,
    size)`` float32 on each slice's canonical in-plane axes: cropped to the slice's letterbox box, resampled
    bilinearly, display flips undone (:func:`~med3dinsight_plugin.slices.feature_map_grid`)."""
    import torch
    import torch.nn.functional as F

    grid = np.stack([feature_map_grid(plane_id(s.plane), s.box, canvas, size) for s in slices])
    fmap = torch.as_tensor(fmap).float()
    grid = torch.from_numpy(grid).to(fmap.device)
    return F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False).cpu().numpy()


def _embed_cases(source, cases, teacher, policy, render, texts, batch_size, bar, feature_maps=None):
    cols: Dict[str, List] = {"plane": [], "index": [], "position": [], "case": [], "image": [], "text": [],
                             "image_map": []}
    shapes, prints, pending, missing = {}, {}, [], []

    def flush():
        if not pending:
            return
        images = [s.image for s in pending]
        if feature_maps is None:
            cols["image"].append(teacher.encode_images(images).cpu().numpy())
        else:
            pooled, fmap = teacher.encode_images_with_maps(images)
            cols["image"].append(pooled.cpu().numpy())
            maps = canonical_maps(fmap, pending, render.size, feature_maps).astype(np.float16)
            if not np.isfinite(maps).all():
                raise TeacherError(f"the teacher's feature maps of case {pending[0].case} exceed float16's range "
                                   f"(about 65504) or are not finite; embed without --feature-maps")
            cols["image_map"].append(maps)
        if texts is not None:
            cols["text"].append(teacher.encode_texts([texts[s.key] for s in pending]).cpu().numpy())
        pending.clear()

    for ci, case in enumerate(cases):
        volume = source.read(case)
        shapes[case], prints[case] = volume.shape, volume.fingerprint()
        for s in volume_slices(volume, policy, render):
            if texts is not None and s.key not in texts:
                missing.append(s.key)
                continue
            cols["plane"].append(plane_id(s.plane))
            cols["index"].append(s.index)
            cols["position"].append(s.position)
            cols["case"].append(ci)
            pending.append(s)
            if len(pending) == batch_size:
                flush()
        if missing:
            raise CacheError(f"the caption file has no caption for {len(missing)} selected slice(s) of case {case} "
                             f"(e.g. {missing[0]}); rerun med3dinsight caption with the same slice settings to "
                             f"complete it")
        bar.update(1)
    flush()
    width, text_width = teacher.embed_dim, getattr(teacher, "text_dim", teacher.embed_dim)
    rows = {k: np.asarray(cols[k]) for k in ("plane", "index", "position", "case")}
    rows["image"] = np.concatenate(cols["image"]) if cols["image"] else np.zeros((0, width), np.float32)
    rows["text"] = (np.concatenate(cols["text"]) if cols["text"] else np.zeros((0, text_width), np.float32)) \
        if texts is not None else None
    if feature_maps is not None:
        rows["image_map"] = np.concatenate(cols["image_map"]) if cols["image_map"] else \
            np.zeros((0, teacher.map_channels, feature_maps, feature_maps), np.float16)
    return rows, shapes, prints


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="case", desc="embed", disable=not enabled, dynamic_ncols=True)
