"""Any timm image model as the frozen 2D teacher, with weights from a local file (nothing is downloaded).

``TimmTeacher("tf_efficientnet_lite0", "weights.pth")`` builds the architecture with timm (``pretrained=False``) and
loads the file safely: safetensors, or a torch file through ``torch.load(weights_only=True)`` (a pickle that asks for
anything but tensors is refused, nothing in it runs). The file's tensors are matched to the model by name (a
``state_dict``/``model`` wrapper, a ``module.`` prefix and a missing or differently sized classifier are fine); when
the names differ (a checkpoint from another implementation of the same network) but the list of tensor shapes equals
the model's one to one, in order, they are loaded by order, and one log line says so. Anything else is refused in one
line naming the file and the architecture.

Slices are rendered at the model's input size and normalised with its mean/std (timm's data config). The pooled
embedding is the model's pre-logits feature (``forward_features`` then ``forward_head(pre_logits=True)``),
L2-normalised; :meth:`TimmTeacher.encode_images_with_maps` also returns the last feature map (``forward_features``).
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import first_line
from .clip import TeacherError
from .hub import SAFE_FORMATS, unsafe_pickle_message

__all__ = ["TimmTeacher", "load_timm_weights", "read_state_dict"]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def _weights_file(weights) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():  # a timm hub repo's layout: config.json + model.safetensors
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise TeacherError(f"{path} is a folder without model.safetensors or pytorch_model.bin; pass the weight file "
                           f"itself (--image-weights FILE)")
    if not path.is_file():
        raise TeacherError(f"timm weight file {path} does not exist; pass a local file (--image-weights FILE), as "
                           f"{SAFE_FORMATS}")
    return path


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The tensors of a weight file, read without running any code from it.

    safetensors (recognised by its content, whatever the suffix) or a torch file loaded with
    ``torch.load(weights_only=True)``; a ``{"state_dict": ...}``/``{"model": ...}`` wrapper and a common ``module.``
    prefix are removed. Raises :class:`TeacherError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise TeacherError(f"cannot read {path} ({e.strerror or e})") from None
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise TeacherError(f"cannot read {path} as safetensors ({first_line(e)}); the file is damaged: download "
                               f"it again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "GLOBAL" in str(e):  # torch refused a foreign object (not a damaged or foreign file): nothing ran
                raise TeacherError(unsafe_pickle_message(e, [path], str(path))) from None
            raise TeacherError(f"cannot read {path} as a weight file ({first_line(e)}); pass {SAFE_FORMATS}") from None
        except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/... for files that are not its own
            raise TeacherError(f"cannot read {path} as a weight file ({type(e).__name__}: {first_line(e)}); pass "
                               f"{SAFE_FORMATS}") from None
        for _ in range(2):  # {"state_dict": {...}} or {"model": {"state_dict": ...}} from training scripts
            if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
                if inner is not None:
                    state = inner
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        raise TeacherError(f"{path} does not hold a state_dict (a mapping of names to tensors); pass the model's "
                           f"weights as {SAFE_FORMATS}")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _head_keys(model, own: Sequence[str]) -> List[str]:
    """The model's classifier tensors (timm's ``pretrained_cfg["classifier"]``), which pooled features do not use."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [k for k in own if any(k == h or k.startswith(h + ".") for h in heads)]


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape)


def load_timm_weights(model, arch: str, weights) -> str:
    """Load the file ``weights`` into the timm ``model`` of architecture ``arch``; returns ``"name"`` or ``"order"``.

    By name: the file's keys are the model's (less, or with a different number of classes in, the classifier, which
    is then removed or resized). By order: the keys differ but the shapes of the file's tensors equal the model's
    one to one in order (with or without the classifier). Otherwise :class:`TeacherError`, one line:
    ``FILE does not hold weights of timm:ARCH (...)``.
    """
    path = _weights_file(weights)
    state = read_state_dict(path)
    own = model.state_dict()
    heads = _head_keys(model, list(own))
    body = [k for k in own if k not in heads]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]

    def refuse(detail: str):
        return TeacherError(f"{path} does not hold weights of timm:{arch} ({detail}); pass the weights of that "
                            f"architecture, or the architecture the file was trained as")

    if not unexpected and set(missing) <= set(heads):  # by name
        bad = [k for k in state if _shape(state[k]) != _shape(own[k])]
        if [k for k in bad if k not in heads]:
            k = bad[0] if bad[0] not in heads else next(k for k in bad if k not in heads)
            raise refuse(f"shape mismatch: {k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the "
                         f"model")
        if missing:  # no classifier in the file: pooled features do not need one
            model.reset_classifier(0)
        elif bad:  # another number of classes
            weight = next((state[k] for k in heads if k.endswith("weight") and state[k].ndim >= 2), None)
            if weight is None:
                raise refuse(f"classifier {bad[0]} is {list(state[bad[0]].shape)} in the file")
            model.reset_classifier(int(weight.shape[0]))
        _load(model, {k: v for k, v in state.items() if not missing or k not in heads}, path, arch)
        return "name"
    values = list(state.values())
    for targets, drop_head in ((list(own), False), (body, True)):
        if len(values) == len(targets) and all(_shape(v) == _shape(own[k]) for v, k in zip(values, targets)):
            if drop_head:
                model.reset_classifier(0)
            _load(model, dict(zip(targets, values)), path, arch)
            log.warning("%s: its %d tensor names differ from timm:%s's but their shapes match one to one in order; "
                        "loaded by order", path, len(values), arch)
            return "order"
    first = next((i for i, (v, k) in enumerate(zip(values, own)) if _shape(v) != _shape(own[k])),
                 min(len(values), len(own)))
    order = (f"tensor #{first} is {list(values[first].shape) if first < len(values) else 'absent'} in the file, "
             f"{list(own[list(own)[first]].shape) if first < len(own) else 'absent'} in the model")
    raise refuse(f"{len(missing)} of the model's {len(own)} tensors missing, e.g. {(missing or ['-'])[0]}; "
                 f"{len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}; nor do the shapes match in order: "
                 f"{order}")


def _load(model, state, path, arch) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise TeacherError(f"{path} does not hold weights of timm:{arch} ({first_line(e)})") from None


class TimmTeacher:
    """A frozen timm image model that embeds rendered slices (no text side: pair it with a
    :class:`~med3dinsight_plugin.teacher.text.TextTeacher` for captions, see :func:`~med3dinsight_plugin.teacher.
    build_teacher`).

    Args:
        name: a timm architecture (``timm.list_models()``), with or without a ``timm:`` prefix.
        weights: its weight file (safetensors or a torch file that loads with ``weights_only=True``), or a folder
            holding ``model.safetensors`` / ``pytorch_model.bin`` (a timm hub repo downloaded elsewhere).
        device: where to run; CUDA runs under autocast in ``precision``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the latter two on CUDA only).

    Attributes:
        image_size, mean, std: the model's input size and normalisation (timm's data config).
        embed_dim: width of the pooled pre-logits embedding.
        map_channels, map_grid: channels and ``(h, w)`` of the last feature map at ``image_size``.
        text_dim: ``None`` (no text model); shared_space: ``False``.
    """

    text_dim: Optional[int] = None
    shared_space = False

    def __init__(self, name: str, weights, device: str = "cpu", precision: str = "fp32"):
        import timm
        import timm.data

        arch = name[len("timm:"):] if name.startswith("timm:") else name
        if precision not in ("fp32", "fp16", "bf16"):
            raise TeacherError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0][:12]}*")[:5] if arch else []
            raise TeacherError(f"{arch!r} is not a timm architecture (timm {timm.__version__}); use a name from "
                               f"timm.list_models()" + (f", e.g. {', '.join(close)}" if close else ""))
        if weights is None:
            raise TeacherError(f"timm:{arch} needs its weights (--image-weights FILE): a randomly initialised teacher "
                               f"teaches nothing; pass a local safetensors/torch weight file of that architecture")
        self.device = torch.device(device)
        self.precision = precision if self.device.type == "cuda" else "fp32"
        try:
            model = timm.create_model(arch, pretrained=False)
        except Exception as e:  # timm raises many types for models it cannot build this way
            raise TeacherError(f"cannot build timm:{arch} ({type(e).__name__}: {first_line(e)}); choose another "
                               f"architecture") from None
        self.how_loaded = load_timm_weights(model, arch, weights)
        self.model = model.eval().requires_grad_(False).to(self.device)
        cfg = timm.data.resolve_data_config({}, model=model)
        channels, height, width = cfg["input_size"]
        if height != width or channels != 3:
            raise TeacherError(f"timm:{arch} takes {channels}x{height}x{width} inputs; the teacher renders square "
                               f"RGB slices: choose an architecture with a square 3-channel input")
        self.image_size = int(height)
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device)
        self.name, self.weights = f"timm:{arch}", str(weights)
        self._weights_name = _weights_file(weights).name
        with torch.no_grad():
            features = self.model.forward_features(torch.zeros(1, 3, self.image_size, self.image_size,
                                                                device=self.device))
            pooled = self.model.forward_head(features, pre_logits=True)
        self.embed_dim = int(pooled.shape[-1])
        try:
            fmap = self._spatial(features)
            self.map_channels, self.map_grid = int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3]))
            self._maps_problem = None
        except TeacherError as e:
            self.map_channels, self.map_grid, self._maps_problem = None, None, str(e)

    def _spatial(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> ``(N, C, h, w)`` (NHWC permuted, ViT patch tokens put on their grid)."""
        if features.ndim == 4:
            fmt = str(getattr(self.model, "output_fmt", "NCHW"))
            return features.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else features
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        if features.ndim == 3 and grid is not None and features.shape[1] - prefix == grid[0] * grid[1]:
            tokens = features[:, prefix:]
            return tokens.reshape(features.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
        raise TeacherError(f"{self.name}'s forward_features gives {list(features.shape)}, not a spatial feature map; "
                           f"feature maps (--feature-maps) need a convolutional network or a ViT with a fixed grid")

    def identity(self) -> Dict[str, Any]:
        """What identifies this teacher in a cache manifest: names, sizes and a fingerprint of all its weights."""
        digest = hashlib.sha256()
        for key, p in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return {"kind": "timm", "model": self.name, "weights": self._weights_name, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "mean": [round(float(v), 8) for v in self.mean],
                "std": [round(float(v), 8) for v in self.std], "weights_fingerprint": digest.hexdigest()[:16],
                "text_dim": None, "shared_space": False}

    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        if batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise TeacherError(f"{self.name} takes {self.image_size}x{self.image_size} RGB images, got "
                               f"{tuple(batch.shape[1:])}; render slices with size={self.image_size}")
        return (batch.permute(0, 3, 1, 2).float() / 255.0 - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Rendered slices, uint8 ``(size, size, 3)`` -> (N, E) float32 pooled pre-logits features, L2-normalised."""
        return self.encode_images_with_maps(images, maps=False)[0]

    @torch.no_grad()
    def encode_images_with_maps(self, images: Sequence[np.ndarray], maps: bool = True):
        """Rendered slices -> ``(pooled (N, E) L2-normalised, feature maps (N, C, h, w) float32 of the whole canvas)``
        (the maps are ``None`` with ``maps=False``)."""
        x = self._batch(images)
        with self._autocast():
            features = self.model.forward_features(x)
            pooled = self.model.forward_head(features, pre_logits=True)
        fmap = None
        if maps:
            if self._maps_problem:
                raise TeacherError(self._maps_problem)
            fmap = self._spatial(features).float()
        return torch.nn.functional.normalize(pooled.float(), dim=-1), fmap

    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        raise TeacherError(f"{self.name} is an image model without a text side; pass a text model for the captions "
                           f"(--text-model PATH, or build_teacher(..., text_model=PATH))")
