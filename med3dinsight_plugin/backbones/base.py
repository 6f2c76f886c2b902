"""What every backbone provides: the real downstream network, bottleneck tokens and a reconstruction."""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Sequence, Tuple

import torch
from torch import nn


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
        config: the ``build_backbone`` arguments that rebuild this backbone (checkpoint metadata).
    """

    encoder_prefixes: Tuple[str, ...] = ()

    def __init__(self, network: nn.Module, in_channels: int, patch_size: Sequence[int], token_dim: int,
                 decoder_dim: int, config: Dict[str, Any]):
        super().__init__()
        self.network = network
        self.reconstruction_head = nn.Conv3d(decoder_dim, in_channels, kernel_size=1)
        self.in_channels = in_channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.token_dim = token_dim
        self.config = config

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(bottleneck, decoder_features)``: the bottleneck as (B, C, d, h, w) or as tokens (B, N, C), and
        the last decoder stage's features at input resolution (B, F, D, H, W)."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, D, H, W) with a spatial shape the network accepts."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.config['name']} expects a volume batch of shape (B, {self.in_channels}, D, H, W), "
                             f"got {got}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{self.config['name']} was built for {self.in_channels} input channel(s) but the volume "
                             f"has {x.shape[1]}")
        self.check_spatial_shape(tuple(x.shape[2:]))

    def check_spatial_shape(self, shape: Tuple[int, ...]) -> None:
        divisor = self.spatial_divisor()
        if any(s % d for s, d in zip(shape, divisor)):
            raise ValueError(f"{self.config['name']} needs spatial sizes divisible by {divisor}, got {shape}; crop or "
                             f"pad the volume, e.g. to {self.patch_size}")

    def spatial_divisor(self) -> Tuple[int, int, int]:
        return (1, 1, 1)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        self.check_input(x)
        bottleneck, decoded = self.features(x)
        tokens = bottleneck.flatten(2).transpose(1, 2) if bottleneck.dim() == 5 else bottleneck
        return BackboneOutput(tokens, self.reconstruction_head(decoded))


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
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {value!r}")
    return triple  # type: ignore[return-value]
