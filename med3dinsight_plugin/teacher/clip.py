"""The frozen 2D image/text teacher: any open_clip model (BiomedCLIP by default).

A model is named the way open_clip names it: ``hf-hub:org/repo``, ``local-dir:/folder`` (or just the folder path,
holding ``open_clip_config.json`` and the weights), or an architecture name with ``pretrained=`` a tag or a local
weight file. open_clip reads ``.pt`` files with ``weights_only=True``. Offline (``HF_HUB_OFFLINE=1``), an id that is
not in the local Hugging Face cache fails at once instead of retrying for ~46 s.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import Med3DInsightError, first_line
from .hub import SAFE_FORMATS, hub_offline, pickle_files, unsafe_pickle_message

__all__ = ["DEFAULT_TEACHER", "ClipTeacher", "TeacherError"]

DEFAULT_TEACHER = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class TeacherError(Med3DInsightError):
    """A teacher model that cannot be loaded or used; the message names it and the fix."""


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_config.json")


def require_cached(repo_id: str, filenames: Sequence[str], what: str) -> None:
    """Offline, fail at once unless one of ``filenames`` of ``repo_id`` is in the local Hugging Face cache."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(repo_id.strip("/"), f), str) for f in filenames):
        raise TeacherError(f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                           f"download it where there is network (hf download {repo_id.strip('/')}) or pass a local "
                           f"folder/file instead")


def _resolve(model: str, pretrained: Optional[str]):
    """Map the user's model/pretrained strings to open_clip's ``(model_name, pretrained)``, checking them first."""
    import open_clip

    path = Path(model).expanduser()
    if model.startswith("local-dir:") or path.is_dir():
        folder = Path(model[len("local-dir:"):]).expanduser() if model.startswith("local-dir:") else path
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise TeacherError(f"{folder} is not an open_clip model folder (no open_clip_config.json); pass an "
                               f"open_clip model (name, hf-hub: id or a folder saved in open_clip's format)")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON or not UTF-8
            raise TeacherError(f"cannot read {config} ({str(e).splitlines()[0]}); restore it from the model's "
                               f"repository") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
            raise TeacherError(f"{config} has no model_cfg object; restore it from the model's repository (open_clip "
                               f"folders hold {{\"model_cfg\": {{...}}, \"preprocess_cfg\": {{...}}}})")
        if not any(p.suffix in (".safetensors", ".bin", ".pt", ".pth") for p in folder.iterdir()):
            raise TeacherError(f"{folder} holds no weights (open_clip_model.safetensors); a teacher without them would "
                               f"be random: add the weights file, as {SAFE_FORMATS}")
        return f"local-dir:{folder.resolve()}", None
    if path.is_file():
        raise TeacherError(f"{model} is a file: pass the architecture name as the model and the file as pretrained "
                           f"(--clip-model ViT-B-16 --clip-pretrained {model})")
    if model.startswith("hf-hub:"):
        require_cached(model[len("hf-hub:"):], ("open_clip_config.json",), "open_clip model")
        return model, None
    if model not in open_clip.list_models():
        raise TeacherError(f"{model!r} is not an open_clip model: use an architecture from open_clip.list_models(), "
                           f"an hf-hub: id or a local open_clip folder")
    if not pretrained:
        raise TeacherError(f"{model!r} is an architecture without weights, so the teacher would be random; pass its "
                           f"weights with --clip-pretrained (a tag such as "
                           f"{(open_clip.list_pretrained_tags_by_model(model) or ['openai'])[0]!r} or a local file)")
    if pretrained and not Path(pretrained).expanduser().is_file():
        from open_clip.pretrained import get_pretrained_cfg

        cfg = get_pretrained_cfg(model, pretrained)
        if not cfg:
            raise TeacherError(f"{pretrained!r} is neither a local weight file nor a pretrained tag of {model} "
                               f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})")
        if cfg.get("hf_hub"):
            require_cached(cfg["hf_hub"].rstrip("/"), _WEIGHT_FILES, f"{model} weights {pretrained!r} from")
    return model, pretrained


def _weight_candidates(name: str, tag: Optional[str]) -> List[Path]:
    """The pickle weight file(s) open_clip may have read, for an error message."""
    if tag and Path(tag).expanduser().is_file():
        return [Path(tag).expanduser()]
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if any(folder.glob("*.safetensors")):
            return []
        return pickle_files(folder)
    return []


class ClipTeacher:
    """A frozen open_clip model that embeds rendered slices and captions.

    Args:
        model: open_clip model (see the module docstring); defaults to BiomedCLIP.
        pretrained: a pretrained tag or a local weight file, for architecture names.
        device: where to run; CUDA runs under autocast in ``precision``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the latter two on CUDA only).

    Attributes:
        embed_dim, text_dim: the widths of the image and text embeddings (equal: one shared space).
        shared_space: ``True``: open_clip's image and text towers were trained into one space.
    """

    shared_space = True

    def __init__(self, model: str = DEFAULT_TEACHER, pretrained: Optional[str] = None, device: str = "cpu",
                 precision: str = "fp32"):
        import open_clip

        if precision not in ("fp32", "fp16", "bf16"):
            raise TeacherError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            precision = "fp32"  # half-precision matmuls on CPU are slow and not what the teacher was trained in
        self.precision = precision
        name, tag = _resolve(model, pretrained)
        try:
            # require_pretrained: a teacher whose weights did not load is random; refuse it rather than log a warning
            net = open_clip.create_model(name, pretrained=tag, device=self.device, weights_only=True,
                                         require_pretrained=True)
            self._tokenizer = open_clip.get_tokenizer(name)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a foreign object: nothing ran
            raise TeacherError(unsafe_pickle_message(e, _weight_candidates(name, tag), model)) from None
        except Exception as e:  # open_clip, safetensors and torch raise many types for bad model files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TeacherError(f"cannot load open_clip model {model!r} ({type(e).__name__}: {reason}); check the "
                               f"model folder or weights file, or download it again") from e
        self.model = net.eval().requires_grad_(False)
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=self.device)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=self.device)
        self.name, self.pretrained = model, pretrained
        with torch.no_grad():
            probe = self.model.encode_text(self._tokenizer(["x"]).to(self.device))
        self.embed_dim = self.text_dim = int(probe.shape[-1])
        self._map_channels: Optional[int] = None

    def identity(self) -> Dict[str, Any]:
        """What identifies this teacher in a cache manifest: names, sizes and a fingerprint of the weights."""
        digest = hashlib.sha256()
        for _, p in sorted(self.model.state_dict().items())[:4] + sorted(self.model.state_dict().items())[-4:]:
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return {"model": self.name, "pretrained": self.pretrained, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "mean": [round(float(v), 8) for v in self.mean],
                "std": [round(float(v), 8) for v in self.std], "weights_fingerprint": digest.hexdigest()[:16],
                "text_dim": self.text_dim, "shared_space": True}

    @property
    def map_channels(self) -> int:
        """Channels of the feature map :meth:`encode_images_with_maps` returns (a probe on first use); raises
        :class:`TeacherError` for an image tower without patch tokens."""
        if self._map_channels is None:
            blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
            self._map_channels = int(self.encode_images_with_maps([blank])[1].shape[1])
        return self._map_channels

    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Rendered slices, uint8 ``(size, size, 3)`` at the teacher's input size -> (N, E) float32, L2-normalised.

        Rendering already resized and letterboxed them, so open_clip's resize/crop are identities and only its
        normalisation remains, done here on the device for the whole batch.
        """
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        if batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise TeacherError(f"the teacher takes {self.image_size}x{self.image_size} RGB images, got "
                               f"{tuple(batch.shape[1:])}; render slices with size={self.image_size}")
        x = (batch.permute(0, 3, 1, 2).float() / 255.0 - self.mean[:, None, None]) / self.std[:, None, None]
        with self._autocast():
            z = self.model.encode_image(x)
        return torch.nn.functional.normalize(z.float(), dim=-1)

    @torch.no_grad()
    def encode_images_with_maps(self, images: Sequence[np.ndarray]):
        """Rendered slices -> ``(pooled (N, E) as encode_images, feature map (N, C, h, w) float32)``: the image
        tower's last-layer patch tokens (after its final norm) on their grid over the whole canvas.

        open_clip ViT towers only (their ``forward_intermediates``); other towers raise :class:`TeacherError`.
        """
        visual = self.model.visual
        if not hasattr(visual, "forward_intermediates"):
            raise TeacherError(f"the image tower of {self.name} ({type(visual).__name__}) gives no patch-token map; "
                               f"feature maps (--feature-maps) need an open_clip ViT or a timm teacher "
                               f"(--image-model timm:NAME)")
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        x = (batch.permute(0, 3, 1, 2).float() / 255.0 - self.mean[:, None, None]) / self.std[:, None, None]
        try:
            with self._autocast():
                out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NCHW")
            fmap, pooled = out["image_intermediates"][-1], out["image_features"]
        except (AssertionError, KeyError, NotImplementedError, RuntimeError, TypeError, ValueError) as e:
            raise TeacherError(f"the image tower of {self.name} gives no patch-token map ({first_line(e)}); feature "
                               f"maps (--feature-maps) need an open_clip ViT or a timm teacher "
                               f"(--image-model timm:NAME)") from None
        if fmap.ndim != 4 or pooled.ndim != 2:
            raise TeacherError(f"the image tower of {self.name} gives no patch-token map; feature maps "
                               f"(--feature-maps) need an open_clip ViT or a timm teacher (--image-model timm:NAME)")
        return torch.nn.functional.normalize(pooled.float(), dim=-1), fmap.float()

    @torch.no_grad()
    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        """Captions -> (N, E) float32, L2-normalised (the model's own tokenizer and context length)."""
        tokens = self._tokenizer(list(texts)).to(self.device, non_blocking=True)
        with self._autocast():
            z = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(z.float(), dim=-1)
