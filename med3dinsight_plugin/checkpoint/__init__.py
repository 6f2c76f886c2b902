"""Checkpoint files: the package's own pickle-free format, and safe reading of foreign weight files.

Own format: one ``.safetensors`` file. Tensors are named ``network.<key>`` (the downstream network's own keys),
plus ``psat.*``, ``reconstruction_head.*`` and ``loss.*`` when a whole :class:`Med3DInsightModel` is saved. Tensors
that share storage (nnU-Net's decoder aliases its encoder) are stored once and re-linked on load. The safetensors
header carries the JSON metadata under ``"med3dinsight"``: package version, the backbone's ``build_backbone``
arguments, an nnssl-compatible adaptation plan, PSAT/loss settings, and whatever the caller adds (intensity
normalisation, teacher ids, plans, ...).

Foreign files -- MONAI's SwinUNETR SSL ``model_swinvit.pt``, nnU-Net ``checkpoint_*.pth``, nnssl checkpoints, plain
state dicts -- are read with ``torch.load(weights_only=True)`` only; numpy scalars and arrays (in nnU-Net's logs) are
the only globals allowed. A file that needs anything else is refused before any of it runs.

Nothing is trusted on the file's word: the med3dinsight header is validated once, at read (:func:`validate_metadata`),
so every consumer can use its keys; empty, sparse and over-declaring files are refused before their claimed sizes are
allocated; weights holding NaN or Inf are refused (:func:`check_finite`); :func:`read_checkpoint_info` describes a file
from its header without reading tensors; networks described by metadata are built under :func:`allocation_guard`.

Where a checkpoint is read, :func:`resolve_checkpoint` turns the argument into a local file: a path, a folder with one
``.safetensors`` file, or ``hf-hub:ORG/REPO[@REVISION]`` (a Hugging Face Hub repository's ``med3dinsight.safetensors``,
through huggingface_hub's cache; see :mod:`..hub`).

Modules, one concept each: ``format`` (the file format, :class:`Checkpoint` and writing it: :func:`save_pretrained`),
``plans`` (the adaptation plan and nnssl's pretraining plan), ``reading`` (resolving and loading any weight file),
``metadata`` (validating the med3dinsight header), ``foreign`` (torch pickles read with ``weights_only``), ``info``
(header-only descriptions), ``guard`` (the allocation guard for networks a file describes).
"""
from ..errors import CheckpointError
from .format import DEFAULT_FILENAME, FORMAT, FORMAT_VERSION, RESERVED_METADATA, Checkpoint, PathLike, save_pretrained
from .guard import allocation_guard
from .info import CheckpointInfo, read_checkpoint_info
from .metadata import validate_metadata
from .plans import adaptation_plan, nnssl_pretrain_plan
from .reading import check_finite, load_checkpoint, resolve_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "DEFAULT_FILENAME", "FORMAT", "FORMAT_VERSION",
           "PathLike", "RESERVED_METADATA", "adaptation_plan", "allocation_guard", "check_finite",
           "load_checkpoint", "nnssl_pretrain_plan", "read_checkpoint_info", "resolve_checkpoint", "save_pretrained",
           "validate_metadata"]
