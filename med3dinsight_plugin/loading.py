"""One loader for every target: ``load_pretrained_encoder(model, checkpoint) -> LoadReport``.

nnU-Net's trainers and the MONAI handlers both call this. It is exact or it refuses:

1. Unwrap DDP / torch.compile on the target; read the checkpoint safely (:mod:`.checkpoint`).
2. Normalise source keys: drop ``module.`` / ``_orig_mod.``; rename MONAI's ``mlp.fc1/fc2 -> mlp.linear1/linear2``
   when that is what makes keys match; then pick the prefix change (strip one, add one, or both) that matches the
   most target keys -- e.g. ``swinViT.`` for MONAI's official SSL weights, or nothing for this package's files.
3. The expected tensors are the target's encoder (known networks) or all of it (a bare encoder), narrowed to what
   the checkpoint declares as its encoder when that includes the target's main encoder (MONAI's SSL file holds
   ``swinViT`` only, so SwinUNETR's convolutional ``encoder1..10`` blocks are not expected from it). Tensors are
   counted by storage, so nnU-Net's aliased ``decoder.encoder.*`` keys and ``all_modules`` duplicates count once.
4. Shapes must match exactly. Two named adapters, both reported: input channels 1 -> N (repeat and divide by N, as
   nnssl does) and a learnable position embedding resized trilinearly (UNETR at another patch size). No broadcasting.
5. With ``strict_encoder=True`` anything short of 100 % coverage raises :class:`IncompatibleCheckpointError` carrying
   the report, before a single tensor of the model has changed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, family_of_checkpoint, list_families, network_spec
from .checkpoint import Checkpoint, CheckpointError, check_finite, load_checkpoint
from .errors import short_repr
from .fileio import storage_id, unwrap

__all__ = ["IncompatibleCheckpointError", "LoadReport", "architecture_arguments", "architecture_line",
           "load_pretrained_encoder"]

_WRAPPER_SEGMENTS = ("module", "_orig_mod")
_RENAMES = (("mlp.fc1.", "mlp.linear1."), ("mlp.fc2.", "mlp.linear2."))  # timm/official Swin SSL -> MONAI


@dataclass
class LoadReport:
    """What ``load_pretrained_encoder`` loaded, adapted and left out.

    Counts are of distinct tensors (by storage); key lists use the target's names.
    """

    source: str
    source_format: str
    target: str
    key_mapping: str
    expected: int = 0
    loaded: int = 0
    loaded_params: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    adapted: Dict[str, str] = field(default_factory=dict)
    outside_encoder: int = 0
    applied: bool = False

    @property
    def coverage(self) -> float:
        """Loaded / expected encoder tensors, in percent."""
        return 100.0 * self.loaded / self.expected if self.expected else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["mismatched"] = {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()}
        d["coverage"] = round(self.coverage, 2)
        return d

    def __str__(self) -> str:
        def some(keys, n=4):
            keys = list(keys)
            return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")

        state = "loaded" if self.applied else "NOT loaded (model unchanged)"
        rows = [
            f"Pretrained encoder {state}: {self.source} -> {self.target}",
            f"  source format      {self.source_format}; key mapping: {self.key_mapping}",
            f"  encoder tensors    {self.loaded}/{self.expected} ({self.coverage:.1f} %), "
            f"{self.loaded_params / 1e6:.2f}M parameters",
            f"  adapted            {len(self.adapted)}" + (f": {some(f'{k} [{v}]' for k, v in self.adapted.items())}"
                                                         if self.adapted else ""),
            f"  shape-mismatched   {len(self.mismatched)}" + (
                f": {some(f'{k} {list(a)} vs model {list(b)}' for k, (a, b) in self.mismatched.items())}"
                if self.mismatched else ""),
            f"  missing            {len(self.missing)}" + (f": {some(self.missing)}" if self.missing else ""),
            f"  unexpected         {len(self.unexpected)}" + (f": {some(self.unexpected)}" if self.unexpected else ""),
            f"  not encoder        {self.outside_encoder} tensors of the model left as they were (decoder, head)",
        ]
        return "\n".join(rows)


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint does not fully cover the model's encoder; ``.report`` says what is wrong. Nothing was loaded."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


def load_pretrained_encoder(model: nn.Module, checkpoint: Union[str, os.PathLike, Checkpoint, Mapping],
                            *, strict_encoder: bool = True, adapt_channels: bool = True,
                            adapt_position_embedding: bool = True, scope: str = "encoder",
                            source_grid: Optional[Sequence[int]] = None) -> LoadReport:
    """Load pretrained encoder weights into ``model`` and say exactly what happened.

    Args:
        model: an nnU-Net PlainConvUNet / ResidualEncoderUNet, a MONAI SwinUNETR / UNETR, a bare encoder (e.g.
            ``swin_unetr.swinViT``), a :class:`Backbone` or :class:`Med3DInsightModel`; DDP / compile wrapped or not.
        checkpoint: a path (this package's ``.safetensors``, MONAI ``model_swinvit.pt``, nnU-Net / nnssl ``.pth``,
            a plain state dict), ``hf-hub:ORG/REPO[@REVISION]`` (a Hub repository's ``med3dinsight.safetensors``,
            through huggingface_hub's cache), a loaded :class:`Checkpoint`, or a state dict.
        strict_encoder: raise :class:`IncompatibleCheckpointError` unless every expected tensor loads.
        adapt_channels: allow a 1-channel input layer to be repeated over N input channels (scaled by 1/N).
        adapt_position_embedding: allow a learnable position embedding to be resized to the model's token grid.
        scope: ``"encoder"`` loads the encoder only; ``"all"`` also loads every other tensor whose key and shape
            match (e.g. a pretrained decoder), except segmentation heads.
        source_grid: token grid of the checkpoint's position embedding, if its metadata does not give it.

    Returns:
        The :class:`LoadReport`; ``str(report)`` is a short table.
    """
    if scope not in ("encoder", "all"):
        raise ValueError(f"scope must be 'encoder' or 'all', got {scope!r}")
    ckpt = _as_checkpoint(checkpoint)
    target = target_network(model)
    spec = network_spec(target)
    target_sd = target.state_dict()
    source = {_strip_wrappers(k): v for k, v in ckpt.state_dict.items()}
    source, renamed = _apply_renames(source, target_sd)
    strip, add = _best_prefix_change(source, target_sd)
    mapped = {add + k[len(strip):]: (k, v) for k, v in source.items() if k.startswith(strip)}
    mapping = " ".join(filter(None, [f"strip '{strip}'" if strip else "", f"add '{add}'" if add else "",
                                     "rename " + ", ".join(f"{a}->{b}" for a, b in renamed) if renamed else ""]))
    report = LoadReport(source=str(ckpt.path or "<state dict>"), source_format=ckpt.source_format,
                        target=type(target).__name__, key_mapping=mapping or "identity")

    encoder = spec.encoder_prefixes if spec else ("",)
    declared = None if ckpt.encoder_prefixes is None else tuple(
        add + p[len(strip):] for p in (_strip_wrappers(q) for q in ckpt.encoder_prefixes) if p.startswith(strip))
    if spec and declared is not None and not (spec.key_to_encoder + ".").startswith(declared):
        declared = None  # the file's encoder is not this network's (another architecture): expect the whole encoder
    in_scope = lambda k: k.startswith(encoder) and (declared is None or k.startswith(declared))
    heads = spec.head_prefixes if spec else _all_head_prefixes()
    is_head = lambda k: k.startswith(heads) or any(f".{h}" in k for h in heads)  # heads are never pretrained

    new_state: Dict[str, torch.Tensor] = {}
    expected_ids, loaded_ids, adapted_ids, written_ids = {}, set(), set(), set()
    for key, tensor in target_sd.items():
        ident = storage_id(tensor)
        wanted = in_scope(key)
        if wanted:
            expected_ids.setdefault(ident, key)
        elif scope != "all" or is_head(key):
            continue
        if key not in mapped:
            continue
        value, how = _fit(key, mapped[key][1], tensor, spec, ckpt, adapt_channels, adapt_position_embedding,
                          source_grid, target)
        if value is None:
            report.mismatched[key] = (tuple(mapped[key][1].shape), tuple(tensor.shape))
            continue
        if how and ident not in adapted_ids:  # aliases of one tensor are reported once
            report.adapted[key] = how
            adapted_ids.add(ident)
        new_state[key] = value
        written_ids.add(ident)
        if wanted:
            loaded_ids.add(ident)
    report.expected = len(expected_ids)
    report.loaded = len(loaded_ids)  # loaded_ids only holds expected tensors
    report.loaded_params = sum(target_sd[expected_ids[i]].numel() for i in loaded_ids)
    report.missing = [k for i, k in expected_ids.items() if i not in loaded_ids and k not in report.mismatched]
    report.unexpected = [src for key, (src, _) in mapped.items() if key not in target_sd] + \
        [k for k in source if not k.startswith(strip)]
    all_ids = {storage_id(t) for t in target_sd.values()}
    report.outside_encoder = len(all_ids - set(expected_ids) - written_ids)

    if report.expected == 0 or (strict_encoder and report.loaded < report.expected):
        raise IncompatibleCheckpointError(f"{report.source} does not fit this {report.target}: "
                                          f"{_diagnose(report, spec, adapt_channels, ckpt.metadata)}\n{report}",
                                          report)
    with torch.no_grad():
        target.load_state_dict(new_state, strict=False)
    report.applied = True
    return report


def _diagnose(report: LoadReport, spec, adapt_channels: bool, metadata: Mapping) -> str:
    """One line: what is wrong and what to do.

    Input channels are blamed only when every difference is the input layer's channel dimension; a tensor whose shape
    differs anywhere else, or encoder tensors on one side only, mean another architecture (width, depth, patch
    embedding), which is named with the checkpoint's architecture arguments."""
    in_proj_keys = spec.keys_to_in_proj if spec else ()
    # (key, checkpoint channels, model channels) of every input layer whose channel dimension differs
    ins = [(k, src[1], dst[1]) for k, (src, dst) in report.mismatched.items()
           if k.rsplit(".", 1)[0] in in_proj_keys and len(src) == len(dst) > 1 and src[1] != dst[1]]
    other = [k for k, (src, dst) in report.mismatched.items()  # differences anywhere but the input channels
             if not (k in {i[0] for i in ins} and src[:1] + src[2:] == dst[:1] + dst[2:])]
    if ins and not other and not report.missing:
        _, src, dst = ins[0]
        if src == 1 and not adapt_channels:
            return (f"the checkpoint reads 1 input channel, the model {dst}, and channel adaptation is off; "
                    f"pass adapt_channels=True to repeat the input layer over the channels")
        return (f"the checkpoint reads {src} input channel(s), the model {dst}; only 1 -> N can be adapted. "
                f"Pretrain with {dst} channels, or build the model for {src}")
    arch = architecture_line(metadata)
    fix = ("build the model with these arguments (med3dinsight inspect CHECKPOINT lists them" +
           ("; in_channels may differ: 1 -> N is adapted)" if adapt_channels else ")") if arch else
           "build the model with the checkpoint's architecture (this file does not record it)")
    fix += ", or pass strict_encoder=False to load only what matches"
    held = str(metadata.get("network_class", "")).rsplit(".", 1)[-1]
    if held and not (report.target.startswith(held) or held.startswith(report.target)):  # X, XForNNUNet: alike
        head = ("no tensor of the checkpoint matches the model's encoder" if report.loaded == 0
                else f"only {report.loaded} of {report.expected} encoder tensors match")
        head += f": the checkpoint holds a {held}, the model is a {report.target}"
    elif other or (report.missing and report.loaded):
        if other:
            key = other[0]
            src, dst = report.mismatched[key]
            beyond = " beyond the input-channel dimension" if key.rsplit(".", 1)[0] in in_proj_keys else ""
            what = (f"{key} is {list(src)} in the checkpoint but {list(dst)} in the model{beyond}"
                    + (f" ({len(other)} tensors differ in shape)" if len(other) > 1 else ""))
        else:
            what = (f"the model's {report.missing[0]} is not in the checkpoint ({len(report.missing)} encoder "
                    f"tensor(s) missing)")
        if ins and (ins[0][1] != 1 or not adapt_channels):  # 1 -> N is adapted once the rest fits
            what += f"; the input channels differ too ({ins[0][1]} in the checkpoint, {ins[0][2]} in the model)"
        head = f"the architecture differs: {what}"
    else:
        head = ("no tensor of the checkpoint matches the model's encoder" if report.loaded == 0
                else f"only {report.loaded} of {report.expected} encoder tensors match")
    return f"{head}. The checkpoint is {arch}: {fix}" if arch else f"{head}. To load it, {fix}"


def architecture_arguments(metadata: Mapping) -> Optional[Dict[str, Any]]:
    """The arguments that decide the shapes of a med3dinsight checkpoint's encoder tensors, as ``build_backbone``
    takes them (``name`` first), or ``None`` for a file that does not record them (foreign formats).

    ``in_channels``, ``patch_size``, the network's constructor arguments (``feature_size``, ``depths``,
    ``num_heads``, ``hidden_size``, ...), the nnU-Net topology options (``base_features``, ``max_features``,
    ``spacing``, the plans and configuration) and, for nnU-Net networks, the stage layout the plans give
    (``features_per_stage``, ``n_conv_per_stage`` / ``n_blocks_per_stage``, ``strides``). ``out_channels`` /
    ``num_classes`` are left out: they size the segmentation head only, which is never loaded.
    """
    cfg = metadata.get("backbone") if isinstance(metadata, Mapping) else None
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("name"), str):
        return None
    args: Dict[str, Any] = {"name": cfg["name"], "in_channels": metadata.get("in_channels", cfg.get("in_channels")),
                            "patch_size": metadata.get("patch_size", cfg.get("patch_size"))}
    kwargs = cfg.get("network_kwargs")
    args.update({k: v for k, v in (kwargs.items() if isinstance(kwargs, Mapping) else ()) if k != "out_channels"})
    args.update({k: cfg[k] for k in ("base_features", "max_features", "spacing", "configuration") if k in cfg})
    plans = cfg.get("plans")
    if isinstance(plans, Mapping):
        args["plans"] = f"{plans.get('plans_name')} of {plans.get('dataset_name')}"
    elif isinstance(plans, str):
        args["plans"] = plans
    arch = (metadata.get("adaptation_plan") or {}).get("architecture_plans")
    arch_kwargs = arch.get("arch_kwargs") if isinstance(arch, Mapping) else None
    if isinstance(arch_kwargs, Mapping) and "features_per_stage" in arch_kwargs:  # nnU-Net's stage layout
        args.update({k: arch_kwargs[k] for k in ("features_per_stage", "n_conv_per_stage", "n_blocks_per_stage",
                                                 "strides") if k in arch_kwargs})
    return {k: v for k, v in args.items() if v is not None}


def architecture_line(metadata: Mapping) -> Optional[str]:
    """:func:`architecture_arguments` in one line, ``swin_unetr(in_channels=1, patch_size=[64, 64, 64],
    feature_size=12, ...)``, or ``None`` when the file does not record them."""
    args = architecture_arguments(metadata)
    if args is None:
        return None
    name = args.pop("name")
    return f"{name}({', '.join(f'{k}={short_repr(v, 120)}' for k, v in args.items())})"


def _as_checkpoint(checkpoint) -> Checkpoint:
    """A path or ``hf-hub:`` reference is read by load_checkpoint, which resolves and checks it; objects built in
    memory are checked here the same way."""
    if isinstance(checkpoint, Checkpoint):
        check_finite(checkpoint.state_dict, checkpoint.path or "the checkpoint")
        return checkpoint
    if isinstance(checkpoint, Mapping):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
            raise CheckpointError("a state dict passed as checkpoint must map names to tensors")
        check_finite(checkpoint, "the state dict")
        return Checkpoint(dict(checkpoint))
    return load_checkpoint(checkpoint)


def target_network(model: nn.Module) -> nn.Module:
    """The plain network weights load into: unwraps DDP / compile, a Backbone, or a model holding a ``.backbone``."""

    model = unwrap(model)
    backbone = getattr(model, "backbone", None)  # Med3DInsightModel, Med3DInsightClassifier
    if isinstance(unwrap(backbone) if isinstance(backbone, nn.Module) else None, Backbone):
        model = unwrap(backbone)
    if isinstance(model, Backbone):
        model = model.network
    return unwrap(model)


def _strip_wrappers(key: str) -> str:
    """Drop wrapper segments from a key or a key prefix (``"module."`` -> ``""``): DDP / DataParallel's ``module``
    where it leads the key, torch.compile's ``_orig_mod`` anywhere (a compiled submodule); a real submodule named
    ``module`` deeper in the key is kept."""
    is_prefix = key.endswith(".")
    parts = [p for p in key.rstrip(".").split(".") if p != "_orig_mod"]
    while parts and parts[0] in _WRAPPER_SEGMENTS:
        parts.pop(0)
    kept = ".".join(parts)
    return kept + "." if is_prefix and kept else kept


def _apply_renames(source, target_sd):
    renamed = []
    for old, new in _RENAMES:
        if any(old in k for k in source) and any(new in k for k in target_sd) and not any(old in k for k in
                                                                                          target_sd):
            source = {k.replace(old, new): v for k, v in source.items()}
            renamed.append((old.rstrip("."), new.rstrip(".")))
    return source, renamed


def _heads(keys, depth=2):
    out = set()
    for k in keys:
        parts = k.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            out.add(".".join(parts[:d]) + ".")
    return out


def _best_prefix_change(source, target_sd):
    """The (strip, add) pair mapping the most source keys onto target keys; identity wins ties."""
    target_keys = set(target_sd)
    candidates = [("", "")] + [(s, a) for s in [""] + sorted(_heads(source)) for a in [""] + sorted(_heads(target_keys))
                               if (s, a) != ("", "")]
    best, best_n = ("", ""), -1
    for strip, add in candidates:
        n = sum(1 for k in source if k.startswith(strip) and add + k[len(strip):] in target_keys)
        if n > best_n:
            best, best_n = (strip, add), n
    return best


def _fit(key, value, tensor, spec, ckpt, adapt_channels, adapt_lpe, source_grid, target):
    """``(tensor to load, adapter description)``, or ``(None, None)`` when the shapes cannot be reconciled."""
    if value.shape == tensor.shape:
        return value, None
    module_path = key.rsplit(".", 1)[0]
    if (adapt_channels and spec and module_path in spec.keys_to_in_proj and value.dim() == tensor.dim() >= 2
            and value.shape[1] == 1 and value.shape[0] == tensor.shape[0] and value.shape[2:] == tensor.shape[2:]):
        n = tensor.shape[1]
        return value.repeat(1, n, *([1] * (value.dim() - 2))) / n, f"input channels 1->{n}: repeated, scaled 1/{n}"
    if adapt_lpe and spec and key == spec.key_to_lpe and value.dim() == 3 and value.shape[-1] == tensor.shape[-1]:
        old_grid = _source_grid(ckpt, value.shape[1], source_grid)
        new_grid = tuple(getattr(target, "feat_size", ())) or _cube_grid(tensor.shape[1])
        if old_grid and new_grid and math.prod(new_grid) == tensor.shape[1]:
            grid = value.transpose(1, 2).reshape(1, -1, *old_grid)
            resized = F.interpolate(grid.float(), size=new_grid, mode="trilinear", align_corners=False)
            return (resized.flatten(2).transpose(1, 2).to(value.dtype),
                    f"position embedding {list(old_grid)}->{list(new_grid)}: trilinear")
    return None, None


def _all_head_prefixes() -> Tuple[str, ...]:
    """Segmentation-head prefixes of every registered family: the heads of a model that is not a known network."""
    return tuple(sorted({h for family in list_families() for h in family.head_prefixes}))


def _source_grid(ckpt, n_tokens, given):
    """The token grid of the checkpoint's position embedding: ``given``, else its family's grid for the patch size in
    its metadata, else a cube."""
    if given is not None:
        grid = tuple(int(g) for g in given)
        return grid if math.prod(grid) == n_tokens else None
    patch = ckpt.metadata.get("patch_size")
    family = family_of_checkpoint(ckpt.metadata) if patch and ckpt.source_format == "med3dinsight" else None
    grid = family.position_grid(patch) if family is not None else None
    if grid and math.prod(grid) == n_tokens:
        return grid
    return _cube_grid(n_tokens)


def _cube_grid(n):
    side = round(n ** (1 / 3))
    return (side,) * 3 if side ** 3 == n else None
