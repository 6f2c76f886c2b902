"""The frozen 2D side of Med3DInsight, computed once: captions from a Hugging Face VLM (``captioner``), image and
text embeddings from a teacher stored in a memory-mapped cache (``cache``) by ``embed``.

Teachers: an open_clip model (``clip``, the default: image and text in one space), any timm image model with local
weights (``timm_teacher``), and a transformers text encoder (``text``) for the captions beside a non-CLIP image
model; :func:`build_teacher` builds any of them from the options of ``med3dinsight embed``.

open_clip, timm and transformers are imported only when a teacher or captioner is built.
"""
from __future__ import annotations

from typing import Optional

from .clip import DEFAULT_TEACHER, ClipTeacher, TeacherError
from .text import PairedTeacher, TextTeacher
from .timm_teacher import TimmTeacher

__all__ = ["build_teacher"]


def build_teacher(image_model: Optional[str] = None, image_weights=None, text_model: Optional[str] = None, *,
                  clip_model: Optional[str] = None, clip_pretrained: Optional[str] = None, device: str = "cpu",
                  precision: str = "fp32", trust_remote_code: bool = False, text_max_length: Optional[int] = None):
    """The teacher ``med3dinsight embed`` builds from its options (the same from Python).

    Args:
        image_model: ``None`` for an open_clip teacher (``clip_model``, default BiomedCLIP), or ``"timm:NAME"`` for
            the timm architecture NAME with the weights ``image_weights``
            (:class:`~med3dinsight_plugin.teacher.timm_teacher.TimmTeacher`).
        image_weights: the timm model's local weight file (safetensors, or a torch file that loads with
            ``weights_only=True``) or a folder holding ``model.safetensors``.
        text_model: a transformers encoder folder or hub id for the captions
            (:class:`~med3dinsight_plugin.teacher.text.TextTeacher`); the image and text embeddings then come from
            different models (``shared_space`` false). Without it a timm teacher has no text side (image embeddings
            only) and an open_clip teacher uses its own text tower.
        clip_model, clip_pretrained: the open_clip model and its pretrained tag or file (only without
            ``image_model``).
        device, precision: where and in which precision the models run (``"fp32"``, ``"fp16"``, ``"bf16"``).
        trust_remote_code: let the text model's repository run its own code.
        text_max_length: tokens per caption for the text model (default: its own limit).

    Returns:
        A teacher with ``identity()``, ``image_size``, ``embed_dim``, ``text_dim``, ``shared_space``, ``device``,
        ``encode_images``, ``encode_texts`` (and ``encode_images_with_maps`` / ``map_channels`` for feature maps).
    """

    if image_model is None:
        if image_weights is not None:
            raise TeacherError(f"image weights {image_weights} go with a timm image model (--image-model timm:NAME "
                               f"--image-weights FILE); for an open_clip architecture pass the file as "
                               f"--clip-pretrained")
        image = ClipTeacher(clip_model or DEFAULT_TEACHER, clip_pretrained, device=device, precision=precision)
    elif isinstance(image_model, str) and image_model.startswith("timm:") and len(image_model) > len("timm:"):
        if clip_model is not None or clip_pretrained is not None:
            raise TeacherError(f"--clip-model/--clip-pretrained choose an open_clip teacher, --image-model "
                               f"{image_model} a timm one; pass one of them (the timm weights as --image-weights)")

        image = TimmTeacher(image_model, image_weights, device=device, precision=precision)
    else:
        raise TeacherError(f"--image-model takes timm:NAME (a timm architecture, e.g. timm:tf_efficientnet_lite0, "
                           f"with --image-weights FILE), got {image_model!r}; open_clip models are chosen with "
                           f"--clip-model")
    if text_model is None:
        return image

    text = TextTeacher(text_model, device=device, precision=precision, trust_remote_code=trust_remote_code,
                       max_length=text_max_length)
    return PairedTeacher(image, text)
