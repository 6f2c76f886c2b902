"""Captions of 2D CT/MRI slices written by any Hugging Face vision-language model (VLM), stored resumably.

``Captioner`` prompts a loaded VLM (:mod:`.vlm`) with one image per chat message (prompts: :mod:`.prompts`) and
decodes greedily, ``caption_slices`` captions an iterable of slices into a :class:`~.captions.CaptionFile`, skipping
what an earlier (interrupted) run already wrote, and ``caption_dataset`` captions every selected slice of a dataset in
one process or sharded over ``torchrun`` processes. ``load_vlm``, ``VLMError``, ``DEFAULT_PROMPTS``,
``load_prompts`` and ``prompt_for`` are importable from here too.

Sharding (``caption_dataset``): the sorted cases are cut into units of ``ceil(batch_size / slices per case)``
consecutive cases; unit ``u`` belongs to rank ``u % world_size``, and a batch never spans two units, so every
caption is generated in the same batch whatever the number of processes. Each rank appends to its own shard file;
rank 0 merges the shards into the caption file in canonical order once every rank is done
(:func:`.captions.merge_shards`), so the file's bytes are the same for any number of processes. Slices already
captioned (in the caption file or in any shard, by a run with any number of processes) are skipped before they are
rendered.

PIL and tqdm are imported inside the functions: the core package imports only torch and numpy.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..distributed import init_distributed
from ..errors import Med3DInsightError
from ..planes import PLANES, plane_id
from ..results import Result
from ..slices import RenderSettings, SlicePolicy, extract_slice, intensity_window, render_slice, volume_slices
from .captions import (
    CaptionError,
    CaptionFile,
    caption_key,
    caption_lock,
    merge_shards,
    read_all,
    shard_files,
    shard_folder,
    shard_path,
)
from .embed import caption_settings_for
from .prompts import (  # noqa: F401
    DEFAULT_PROMPTS,
    MODALITY_NAMES,  # with PROMPT_FIELDS: public, not in __all__, importable from here as before
    PROMPT_FIELDS,
    _check_templates,
    load_prompts,
    prompt_for,
)
from .vlm import VLM, VLMError, _first_line, load_vlm

__all__ = ["VLM", "VLMError", "CaptionError", "CaptionFile", "CaptionResult", "Captioner", "DEFAULT_PROMPTS",
           "SliceRenderer", "caption_dataset", "caption_key", "caption_slices", "check_generation_args",
           "hold_caption_lock", "load_prompts", "load_vlm", "prompt_for"]


# ----------------------------------------------------------------------------------------------------- captioner

def _to_pil(image):
    from PIL import Image
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise VLMError(f"slice images must be uint8 arrays of shape HxWx3 (or HxW), got {arr.dtype} "
                       f"{tuple(arr.shape)}; render the slice to RGB first")
    return Image.fromarray(arr).convert("RGB")


def check_generation_args(batch_size, max_new_tokens) -> None:
    """Refuse a batch size or caption length that is not a whole number of at least 1 (one line naming the option)."""
    for name, value, flag in (("batch_size", batch_size, "--batch-size"),
                              ("max_new_tokens", max_new_tokens, "--max-new-tokens")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise VLMError(f"{name} ({flag}) must be a whole number of at least 1, got {value!r}")


class Captioner:
    """Greedy (by default, so deterministic) batched captioning of images with a :class:`VLM`.

    Args:
        vlm: from :func:`load_vlm`.
        prompts: templates for :func:`caption_slices` (None: :data:`DEFAULT_PROMPTS`).
        batch_size: images per ``generate`` call.
        max_new_tokens: caption length limit.
        do_sample: sample instead of greedy decoding (not reproducible).
    """

    def __init__(self, vlm: VLM, prompts: Optional[dict] = None, batch_size: int = 8, max_new_tokens: int = 96,
                 do_sample: bool = False):
        check_generation_args(batch_size, max_new_tokens)
        self.vlm, self.batch_size, self.max_new_tokens, self.do_sample = vlm, batch_size, max_new_tokens, do_sample
        self.prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
        _check_templates(self.prompts, "prompts")
        self.tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
        # Decoder-only generation continues from the last position: pad on the left so every row ends at its prompt.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def settings(self) -> dict:
        """What determines the captions besides the images (recorded next to the caption file)."""
        return {"model": self.vlm.name, "prompts": self.prompts,
                "generation": {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}}

    def caption(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list:
        """Caption each image with its prompt.

        Args:
            images: uint8 arrays HxWx3.
            prompts: one prompt per image.

        Returns:
            list of caption strings (only the generated text, stripped).
        """
        if len(images) != len(prompts):
            raise VLMError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        out = []
        for start in range(0, len(images), self.batch_size):
            out += self._generate(images[start:start + self.batch_size], prompts[start:start + self.batch_size])
        return out

    def _generate(self, images, prompts) -> list:
        processor, model = self.vlm.processor, self.vlm.model
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
        texts = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=texts, images=[_to_pil(im) for im in images], padding=True, return_tensors="pt")
        inputs = {k: (v.to(model.device, model.dtype) if torch.is_floating_point(v) else v.to(model.device))
                  if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                 pad_token_id=self.tokenizer.pad_token_id)
        prompt_ids = inputs["input_ids"]
        n = prompt_ids.shape[1]
        if ids.shape[1] >= n and torch.equal(ids[:, :n].cpu(), prompt_ids.cpu()):
            ids = ids[:, n:]  # decoder-only models return prompt + answer; encoder-decoders the answer only
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


# -------------------------------------------------------------------------------------------------- slice loop

def _get(item, name: str):
    """Field ``name`` of a slice given as an object or a dict."""
    if isinstance(item, dict):
        if name not in item:
            raise VLMError(f"slice {dict((k, v) for k, v in item.items() if k != 'image')} lacks {name!r}")
        return item[name]
    try:
        return getattr(item, name)
    except AttributeError:
        raise VLMError(f"slice {type(item).__name__} has no attribute {name!r}") from None


def caption_slices(slices: Iterable, captioner: Captioner, out_path: Union[str, os.PathLike], settings: dict,
                   progress: bool = True) -> dict:
    """Caption ``slices`` into the JSONL file ``out_path``, resuming where an earlier run stopped.

    Args:
        slices: objects or dicts with ``case``, ``plane`` (name), ``index``, ``position``, ``image`` (uint8 HxWx3)
            and ``modality`` (``"ct"``/``"mri"``).
        captioner: the :class:`Captioner`; its batch size sets how many slices are appended at once.
        out_path: caption file; created if missing, resumed (keys already present skipped) if not.
        settings: JSON-serialisable rendering / slice settings, recorded with the captioner's own settings in
            ``<out_path>.meta.json``; a resume with other settings is refused.
        progress: show a tqdm bar with rate and ETA.

    Returns:
        ``{"written": n, "skipped": m, "path": str}``.
    """
    with caption_lock(out_path):  # one run per caption file
        return _caption_slices(slices, captioner, out_path, settings, progress)


def _caption_slices(slices: Iterable, captioner: Captioner, out_path, settings: dict, progress: bool) -> dict:
    from tqdm.auto import tqdm
    store = CaptionFile(out_path)
    store.check_settings({**captioner.settings(), **settings})
    done = set(CaptionFile.read(store.path))
    written = skipped = 0
    # dataset_slices gives a length hint (exact unless a volume has fewer slices with enough body); a plain
    # generator gives none: the bar then shows counts and rate, no ETA
    total = operator.length_hint(slices) or None
    with store, tqdm(total=total, disable=not progress, unit="slice", desc=f"captioning {store.path.name}") as bar:
        batch = []

        def flush():
            nonlocal written
            texts = captioner.caption([_get(s, "image") for s in batch], _prompts(captioner, batch))
            written += store.write([_record(s, t) for s, t in zip(batch, texts)])
            bar.update(len(batch))
            batch.clear()

        for s in slices:
            key = caption_key(str(_get(s, "case")), _get(s, "plane"), _get(s, "position"))
            if key in done:  # already captioned (or repeated in the input): never write a key twice
                skipped += 1
                bar.update(1)
                bar.set_postfix(skipped=skipped, refresh=False)
                continue
            done.add(key)
            batch.append(s)
            if len(batch) >= captioner.batch_size:
                flush()
        if batch:
            flush()
    return {"written": written, "skipped": skipped, "path": str(store.path)}


# ------------------------------------------------------------------------------------------------ whole datasets

class SliceRenderer:
    """Selects the slices of a volume exactly as :func:`~med3dinsight_plugin.slices.volume_slices` does, and renders
    only those asked for: the step that lets :func:`caption_dataset` skip captioned slices before rendering them.

    A subclass may override :meth:`render_one` (e.g. to count or cache renders).

    Args:
        policy: which slices.
        settings: how they are rendered.
    """

    def __init__(self, policy, settings):
        self.policy, self.settings = policy, settings

    def select(self, volume) -> list:
        """The selected slices of ``volume`` (:class:`~med3dinsight_plugin.slices.Slice`, without images)."""
        return list(volume_slices(volume, self.policy, self.settings, render=False))

    def render(self, volume, slices: Sequence) -> None:
        """Set the ``image`` of each of ``slices`` (selected from ``volume``), as ``volume_slices`` renders it."""
        if not slices:
            return  # no window either: for an MRI it takes percentiles over the whole volume
        data = volume.native(self.settings.channel)
        window = intensity_window(data, volume.modality, self.settings)
        for s in slices:
            s.image = self.render_one(data, volume.spacing, window, s)

    def render_one(self, data: np.ndarray, spacing, window, s) -> np.ndarray:
        """The ``(size, size, 3)`` uint8 image of slice ``s`` of the native-unit array ``data``."""
        return render_slice(*extract_slice(data, spacing, plane_id(s.plane), s.index), window, self.settings.size)


def _record(s, text: str) -> dict:
    return {"case": str(_get(s, "case")), "plane": PLANES[plane_id(_get(s, "plane"))], "index": int(_get(s, "index")),
            "position": float(_get(s, "position")), "modality": str(_get(s, "modality")).lower(), "text": text}


def _prompts(captioner: Captioner, batch) -> list:
    return [prompt_for(captioner.prompts, _get(s, "modality"), _get(s, "plane"), position=_get(s, "position"),
                       case=_get(s, "case")) for s in batch]


def _on_main(ctx, fn):
    """``fn()`` run on rank 0, its result on every rank; a user error there is raised on every rank (rank 0: the
    error itself; the others: a :class:`CaptionError` with its message), so that no rank waits for the others."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except (Med3DInsightError, OSError) as e:
            if not ctx.distributed:
                raise
            error = e
    if not ctx.distributed:
        return result
    ok, payload = ctx.broadcast_object((False, _first_line(error)) if error is not None else (True, result))
    if error is not None:
        raise error
    if not ok:
        raise CaptionError(payload)
    return payload


@contextlib.contextmanager
def hold_caption_lock(out_path: Union[str, os.PathLike], ctx=None):
    """Hold the caption file's lock (:func:`.captions.caption_lock`, ``<out_path>.lock``) for a ``with`` block: in
    rank 0 only under ``torchrun`` (``ctx``: the :class:`~med3dinsight_plugin.distributed.DistributedContext`), and
    when another run holds it, :class:`~med3dinsight_plugin.runlock.RunLockedError` (rank 0) or a
    :class:`CaptionError` with its message (the other ranks) on every rank, so that no rank waits. Re-entrant:
    ``caption`` takes it before loading the model, and :func:`caption_dataset` again inside."""
    held = []

    def take():
        held.append(caption_lock(out_path).acquire())

    try:
        if ctx is None:
            take()
        else:
            _on_main(ctx, take)
        yield
    finally:
        for lock in held:
            lock.release()


@dataclass(frozen=True)
class CaptionResult(Result):
    """What :func:`caption_dataset` did, on every rank.

    Attributes:
        written: captions written now, summed over all processes.
        skipped: selected slices already captioned (in the file or a shard), summed over all processes.
        written_here: captions this process wrote now.
        captions: the captions in the merged file.
        path: the caption file.
        seconds: from the first slice to the merged file, rounded to 1 ms.
        rank, world: this process's rank and the number of processes.
    """
    written: int
    skipped: int
    written_here: int
    captions: int
    path: str
    seconds: float
    rank: int
    world: int


def caption_dataset(source, captioner: Captioner, out_path: Union[str, os.PathLike], policy=None, render=None,
                    settings: Optional[dict] = None, progress: bool = True,
                    renderer: Optional[SliceRenderer] = None) -> CaptionResult:
    """Caption every selected slice of ``source`` into the JSONL file ``out_path``, in one process or sharded over
    the processes of ``torchrun``, resuming where an earlier run (with any number of processes) stopped.

    Each process captions the units of cases of its rank (see the module docstring) with ``captioner`` (its model
    on this process's device) and appends them to its shard ``<out_path>.shards/rank-R-of-W.jsonl``; rank 0 then
    merges every shard into ``out_path`` in canonical order (case, plane, position), so the file is byte for byte
    the same for any number of processes. A slice already captioned in ``out_path`` or in any shard is skipped
    before it is rendered.

    Args:
        source: a :class:`~med3dinsight_plugin.volumes.VolumeSource`.
        captioner: the :class:`Captioner`; its batch size is the number of slices per ``generate`` call.
        out_path: caption file; created if missing, resumed if not.
        policy, render: slice selection and rendering
            (:class:`~med3dinsight_plugin.slices.SlicePolicy`, :class:`~med3dinsight_plugin.slices.RenderSettings`).
        settings: further JSON-serialisable settings to record in ``<out_path>.meta.json``, with the captioner's
            own, the slice and rendering settings (what ``embed --captions`` checks) and the image size; a resume
            with other settings is refused.
        progress: show a tqdm bar (rank 0).
        renderer: a :class:`SliceRenderer` for ``policy`` and ``render`` (default: a new one).

    Returns:
        A :class:`CaptionResult`: ``written`` and ``skipped`` summed over all processes, ``written_here`` (this
        process), ``captions`` (in the merged file), ``path``, ``seconds`` (from the first slice to the merged file),
        ``rank``, ``world``.

    Raises:
        CaptionError: an output path that is a folder, settings that differ from the file's, a malformed line.
        VLMError: a render channel the dataset does not have.
        RunLockedError: another run holds the caption file's lock (``<out_path>.lock``, taken by rank 0 from the
            settings check to the merged file; :func:`hold_caption_lock`).
    """
    from tqdm.auto import tqdm

    policy = policy or SlicePolicy()
    render = render or RenderSettings()
    renderer = renderer or SliceRenderer(policy, render)
    if renderer.policy != policy or renderer.settings != render:
        raise VLMError("the renderer's slice policy or render settings differ from the ones given; build it from "
                       "the same SlicePolicy and RenderSettings")
    out = Path(out_path)
    if out.is_dir():
        raise CaptionError(f"the caption output {out} is a folder; pass a file path such as {out / 'captions.jsonl'} "
                           f"(-o/--output)")
    channels = getattr(source, "num_channels", None)
    if channels is not None and render.channel >= channels:
        raise VLMError(f"{source.root} has {channels} channel(s) per case; render channel {render.channel} does not "
                       f"exist (--channel takes 0 to {channels - 1})")
    recorded = {**captioner.settings(), **caption_settings_for(policy, render), "image_size": render.size,
                **(settings or {})}
    with init_distributed(str(captioner.vlm.device), option="--device") as ctx:  # joins the caller's group if any
        rank, world = ctx.rank, ctx.world_size

        with hold_caption_lock(out, ctx):  # rank 0, from the settings check to the merged file
            def prepare():  # rank 0 is the one writer of the settings sidecar and of the shard folder
                CaptionFile(out).check_settings(recorded, also=shard_files(out))
                read_all(out, cases=source.cases)  # shards left by earlier runs: consistent and of this dataset
                shard_folder(out).mkdir(exist_ok=True)

            _on_main(ctx, prepare)
            done = set(read_all(out))
            ctx.barrier()  # every rank knows what is done before any rank appends

            cases = list(source.cases)
            nominal = len(policy.planes) * policy.per_plane
            per_unit = max(1, math.ceil(captioner.batch_size / nominal))
            units = [cases[i:i + per_unit] for i in range(0, len(cases), per_unit)]
            mine = units[rank::world]
            shard = CaptionFile(shard_path(out, rank, world))
            written = skipped = 0
            start = time.perf_counter()
            bar = tqdm(total=sum(map(len, mine)) * nominal, disable=not (progress and ctx.is_main), unit="slice",
                       desc=f"captioning {out.name}" + (f" ({world} processes)" if world > 1 else ""),
                       dynamic_ncols=True)

            def flush(batch):
                nonlocal written
                if not batch:
                    return
                texts = captioner.caption([s.image for s in batch], _prompts(captioner, batch))
                shard.open()  # only a process that captions something leaves a shard file
                written += shard.write([_record(s, t) for s, t in zip(batch, texts)])
                bar.update(len(batch))

            try:
                for unit in mine:
                    pending = []
                    for case in unit:
                        volume = source.read(case)
                        chosen = renderer.select(volume)
                        todo = []
                        for s in chosen:  # captioned before (or repeated within the volume): skipped, never rendered
                            if s.key not in done:
                                done.add(s.key)
                                todo.append(s)
                        skipped += len(chosen) - len(todo)
                        bar.total -= nominal - len(chosen)
                        bar.update(len(chosen) - len(todo))
                        renderer.render(volume, todo)
                        del volume
                        pending += todo
                        while len(pending) >= captioner.batch_size:
                            flush(pending[:captioner.batch_size])
                            del pending[:captioner.batch_size]
                    flush(pending)  # a batch never spans two units: the same batches for any number of processes
            finally:
                shard.close()
                bar.close()  # before any error message, so that the message is the last line
            ctx.barrier()
            merged = _on_main(ctx, lambda: merge_shards(out, cases=source.cases)["records"])
        seconds = time.perf_counter() - start
        counts = [(written, skipped)]
        if world > 1:
            counts = [None] * world
            torch.distributed.all_gather_object(counts, (written, skipped))
    return CaptionResult(written=sum(c[0] for c in counts), skipped=sum(c[1] for c in counts), written_here=written,
                         captions=merged, path=str(out), seconds=round(seconds, 3), rank=rank, world=world)
