"""What every backbone provides: the real downstream network, bottleneck tokens and a reconstruction."""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import Med3DInsightError
from ..fileio import unwrap


class NetworkSpec(NamedTuple):
    """Where the pretrained parts sit in a plain downstream network's ``state_dict``."""
    encoder_prefixes: Tuple[str, ...]
    key_to_encoder: str  # the main encoder (Swin / ViT / conv stages), without the skip-connection blocks
    keys_to_in_proj: Tuple[str, ...]  # modules reading the input channels
    key_to_lpe: Optional[str]  # learnable position embedding, if any
    dead_parameters: Tuple[str, ...] = ()  # parameters no forward pass uses (DDP would wait for their gradients)
    head_prefixes: Tuple[str, ...] = ()  # the segmentation head: never pretrained, never exported for fine-tuning


class BackboneOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, C): the bottleneck as a token sequence, read by PSAT
    reconstruction: torch.Tensor  # (B, in_channels, D, H, W): the input rebuilt through the network's own decoder


class Backbone(nn.Module):
    """A 3D encoder-decoder wrapped for Med3DInsight pretraining.

    ``self.network`` is the unmodified downstream network (MONAI SwinUNETR/UNETR, nnU-Net PlainConvUNet/
    ResidualEncoderUNet); its ``state_dict`` keys are exactly the plain network's, so its weights transfer without
    key surgery. The only extra module is ``reconstruction_head``, a 1x1x1 convolution from the last decoder
    features to the input channels (the segmentation head is not used).

    Subclasses implement :meth:`features` by running the network's own modules in the network's own order
    (tests check that the segmentation head applied to those decoder features equals ``network(x)``).

    Attributes:
        token_dim: width of the tokens.
        encoder_prefixes: ``state_dict`` key prefixes of ``network`` that form the pretrained encoder.
        bottleneck_prefixes: the subset of the encoder on the path to the bottleneck (what a classifier uses).
        key_to_encoder, key_to_stem, keys_to_in_proj, key_to_lpe: where the encoder, its stem, the weights that read
            the input channels and the learnable position embedding sit in ``network`` (nnssl's adaptation-plan
            fields; ``keys_to_in_proj`` are module paths, ``key_to_lpe`` a parameter name or ``None``).
        config: the ``build_backbone`` arguments that rebuild this backbone (checkpoint metadata).
    """

    network_classes: Tuple[str, ...] = ()  # class names of the networks this backbone wraps (its family's)
    encoder_prefixes: Tuple[str, ...] = ()
    bottleneck_prefixes: Tuple[str, ...] = ()  # the part of the encoder that encoder_features() runs
    key_to_encoder: str = ""
    key_to_stem: str = ""
    keys_to_in_proj: Tuple[str, ...] = ()
    key_to_lpe: Optional[str] = None
    head_prefixes: Tuple[str, ...] = ()  # the segmentation head: features() does not run it

    def __init__(self, network: nn.Module, in_channels: int, patch_size: Sequence[int], token_dim: int,
                 decoder_dim: int, config: Dict[str, Any]):
        super().__init__()
        self.network = network
        self.reconstruction_head = nn.Conv3d(decoder_dim, in_channels, kernel_size=1)
        self.in_channels = in_channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.token_dim = token_dim
        self.config = config

    @classmethod
    def network_spec(cls, network: nn.Module) -> NetworkSpec:
        """The :class:`NetworkSpec` of a plain network of one of ``network_classes``."""
        return NetworkSpec(cls.encoder_prefixes, cls.key_to_encoder, cls.keys_to_in_proj, cls.key_to_lpe,
                           head_prefixes=cls.head_prefixes)

    def nnssl_architecture(self) -> Dict[str, Any]:
        """The ``architecture_plans`` of nnssl's adaptation plan (``arch_class_name``, ``arch_kwargs``,
        ``arch_kwargs_requiring_import``): here the plain network's class and the constructor arguments of
        ``config``; a family whose network nnU-Net plans describe returns the plans' architecture instead."""
        return {"arch_class_name": type(unwrap(self.network)).__name__,
                "arch_kwargs": self.config.get("network_kwargs", {}), "arch_kwargs_requiring_import": []}

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(bottleneck, decoder_features)``: the bottleneck as (B, C, d, h, w) or as tokens (B, N, C), and
        the last decoder stage's features at input resolution (B, F, D, H, W)."""
        raise NotImplementedError

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck alone (no decoder), as (B, C, d, h, w) or tokens (B, N, C): for classification."""
        return self.features(x)[0]

    def dead_parameters(self) -> Tuple[str, ...]:
        """Names (in ``network``) of parameters no forward pass uses; freeze them so that DDP needs no
        ``find_unused_parameters``."""
        return self.network_spec(self.network).dead_parameters

    def unused_in_pretraining(self) -> Tuple[str, ...]:
        """Names (in ``network``) of parameters pretraining gives no gradient: the segmentation head and the dead
        parameters. Freeze them before wrapping in DDP."""
        dead = set(self.dead_parameters())
        return tuple(n for n, _ in self.network.named_parameters() if n.startswith(self.head_prefixes) or n in dead)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Validated input -> bottleneck tokens (B, N, C), without running the decoder."""
        self.check_input(x)
        return _as_tokens(self.encoder_features(x))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, D, H, W) with a spatial shape the network accepts."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise Med3DInsightError(f"{self.config['name']} expects a volume batch of shape (B, {self.in_channels}, "
                                    f"D, H, W), got {got}")
        if x.shape[1] != self.in_channels:
            raise Med3DInsightError(f"{self.config['name']} was built for {self.in_channels} input channel(s) but "
                                    f"the volume has {x.shape[1]}")
        self.check_spatial_shape(tuple(x.shape[2:]))

    def check_spatial_shape(self, shape: Tuple[int, ...]) -> None:
        divisor = self.spatial_divisor()
        if any(s % d for s, d in zip(shape, divisor)):
            raise Med3DInsightError(f"{self.config['name']} needs spatial sizes divisible by {divisor}, got "
                                    f"{shape}; crop or pad the volume, e.g. to {self.patch_size}")

    def spatial_divisor(self) -> Tuple[int, int, int]:
        return (1, 1, 1)

    def token_grid(self, spatial: Sequence[int]) -> Tuple[int, int, int]:
        """The (d, h, w) grid of the bottleneck tokens for an input of spatial size ``spatial``: the tokens
        (B, N, C) are that grid flattened in (d, h, w) order (dense distillation samples them on it)."""
        return tuple(int(s) // int(d) for s, d in zip(spatial, self.spatial_divisor()))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        self.check_input(x)
        bottleneck, decoded = self.features(x)
        return BackboneOutput(_as_tokens(bottleneck), self.reconstruction_head(decoded))


def _as_tokens(bottleneck: torch.Tensor) -> torch.Tensor:
    return bottleneck.flatten(2).transpose(1, 2) if bottleneck.dim() == 5 else bottleneck


def positive_triple(name: str, value: Sequence[int] | int | None) -> Tuple[int, int, int]:
    """Validate a 3D size argument (an int means isotropic)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        triple = tuple(int(v) for v in value)  # type: ignore[union-attr]
        ok = len(triple) == 3 and all(v > 0 and v == float(w) for v, w in zip(triple, value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise Med3DInsightError(f"{name} must be three positive integers (D, H, W), got {value!r}")
    return triple  # type: ignore[return-value]
