"""A text-only teacher (any transformers encoder: a sentence-transformers folder such as all-MiniLM-L6-v2, a BERT,
the encoder of a T5), and :class:`PairedTeacher`, which puts an image teacher and a text teacher behind the one
interface :func:`~med3dinsight_plugin.teacher.embed.embed_dataset` uses.

Text embeddings are the mean of the last hidden states over the attention mask, L2-normalised (the pooling of
sentence-transformers models). The model's own code runs only with ``trust_remote_code=True``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import first_line
from .clip import TeacherError, require_cached

__all__ = ["PairedTeacher", "TextTeacher"]


def _default_max_length(folder: Optional[Path], tokenizer, config) -> int:
    """sentence-transformers' ``max_seq_length`` where the folder has one, else the model's own limit (<= 512)."""
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        try:
            value = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8")).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                return value
        except (OSError, ValueError, AttributeError):
            pass
    limits = [512, getattr(tokenizer, "model_max_length", 512), getattr(config, "max_position_embeddings", 512)]
    return int(min(v for v in limits if isinstance(v, int) and v > 0))


class TextTeacher:
    """A frozen transformers text encoder: captions -> mean-pooled, L2-normalised embeddings.

    Args:
        model: a local folder (``config.json``, tokenizer, weights) or a Hugging Face hub id (from the local cache
            when ``HF_HUB_OFFLINE=1``).
        device: where to run; CUDA runs under autocast in ``precision``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the latter two on CUDA only).
        trust_remote_code: run the model repository's own code (off unless asked).
        max_length: tokens per caption (longer ones are truncated); default: the folder's sentence-transformers
            ``max_seq_length``, else the model's limit, at most 512.

    Attributes:
        embed_dim: the text embedding width (the encoder's hidden size).
    """

    def __init__(self, model: str, device: str = "cpu", precision: str = "fp32", trust_remote_code: bool = False,
                 max_length: Optional[int] = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if precision not in ("fp32", "fp16", "bf16"):
            raise TeacherError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise TeacherError(f"max_length of the text model must be a whole number of at least 1, got "
                               f"{max_length!r}")
        self.device = torch.device(device)
        self.precision = precision if self.device.type == "cuda" else "fp32"
        path = Path(model).expanduser()
        folder = None
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise TeacherError(f"{path} is not a transformers model folder (no config.json); pass a folder saved "
                                   f"with save_pretrained (e.g. a sentence-transformers model) or a hub id")
            folder, source = path, str(path)
        elif path.is_file():
            raise TeacherError(f"text model {model} is a file; pass the model's folder (config.json, tokenizer and "
                               f"weights) or a hub id")
        else:
            require_cached(model, ("config.json",), "text model")
            source = model
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            net = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as e:  # transformers raises many types (OSError, ValueError, ImportError, ...)
            raise TeacherError(f"cannot load text model {model!r} ({type(e).__name__}: {first_line(e)}); pass a "
                               f"transformers encoder folder or a cached hub id"
                               + ("" if trust_remote_code else " (models with their own code need "
                                                               "--trust-remote-code)")) from None
        if getattr(config, "is_encoder_decoder", False) and hasattr(net, "get_encoder"):
            net = net.get_encoder()  # T5-style: the encoder's states are the text embedding
        self.model = net.eval().requires_grad_(False).to(self.device)
        self.name = model
        self.max_length = max_length or _default_max_length(folder, self.tokenizer, config)
        with torch.no_grad():
            self.embed_dim = int(self._encode(["x"]).shape[-1])

    def identity(self) -> Dict[str, Any]:
        """Name, pooling, length and a fingerprint of all the weights, for a cache manifest."""
        digest = hashlib.sha256()
        for key, p in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return {"kind": "text-encoder", "model": self.name, "pooling": "mean", "max_length": self.max_length,
                "embed_dim": self.embed_dim, "weights_fingerprint": digest.hexdigest()[:16]}

    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _encode(self, texts: List[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with self._autocast():
            hidden = self.model(**inputs).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        """Captions -> (N, D) float32, mean-pooled over the attention mask, L2-normalised."""
        return self._encode(texts)


class PairedTeacher:
    """An image teacher and a text teacher as one teacher object (the interface ``embed_dataset`` uses).

    Their embeddings do not share one space (``shared_space`` is ``False``), and may differ in width: ``embed_dim``
    is the image width, ``text_dim`` the text width. Feature maps come from the image teacher.
    """

    shared_space = False

    def __init__(self, image, text):
        self.image, self.text = image, text
        self.device, self.image_size, self.embed_dim = image.device, image.image_size, image.embed_dim
        self.text_dim = int(text.embed_dim)

    @property
    def map_channels(self) -> Optional[int]:
        return getattr(self.image, "map_channels", None)

    def identity(self) -> Dict[str, Any]:
        return {**self.image.identity(), "text_model": self.text.identity(), "text_dim": self.text_dim,
                "shared_space": False}

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.image.encode_images(images)

    def encode_images_with_maps(self, images: Sequence[np.ndarray]):
        if not hasattr(self.image, "encode_images_with_maps"):
            raise TeacherError(f"the image teacher {type(self.image).__name__} gives no feature maps; use a timm "
                               f"image model (--image-model timm:NAME)")
        return self.image.encode_images_with_maps(images)

    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        return self.text.encode_texts(texts)
