"""Plane-Slice-Aware Transformer (PSAT): predicts a 2D slice's teacher embedding from a volume's 3D tokens.

A DETR/Q-Former-style decoder: learnable queries, and per layer self-attention over the queries, cross-attention
from the queries to the 3D tokens, and an FFN (post-norm, as in the authors' code). A learnable plane-slice
position embedding, indexed by plane and slice-position bin, is added to every 3D token and every query, so one
set of 3D tokens answers for any slice. The output of query 0 is projected and L2-normalised.

Several slices per volume are decoded from one backbone pass: ``plane``/``position`` of shape ``(B, K)`` give
``(B, K, out_dim)``. The token-side key/value projections are computed once per volume (the position embedding
enters them as a per-slice bias, by linearity) and only query 0 is carried through the last layer, whose other
outputs are never read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Med3DInsightError
from .planes import check_plane_position, position_bins

__all__ = ["PSAT_PRESETS", "PlaneSliceAwareTransformer"]

# "paper": the authors' configuration (the constructor's defaults). "small": about 10x fewer FLOPs per slice, for
# aligning many slices per volume on modest hardware (see benchmarks/step_overhead.py).
PSAT_PRESETS = {
    "paper": dict(width=768, depth=6, heads=8, num_queries=300),
    "small": dict(width=384, depth=4, heads=8, num_queries=32),
}


class _Attention(nn.Module):
    """Multi-head attention whose key/value inputs may be pre-projected and shared across slices."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``q`` (..., Lq, W) attends to projected keys/values ``kv`` (..., Lk, 2W).

        The leading dimensions are flattened into one batch dimension: SDPA's fused CUDA kernels (flash, memory
        efficient) take 4-D inputs only, and inductor's attention pattern rewrite fails on 5-D ones.
        """
        k, v = kv.chunk(2, dim=-1)
        q = self.q(q)
        lead = torch.broadcast_shapes(q.shape[:-2], kv.shape[:-2])

        def split(t: torch.Tensor) -> torch.Tensor:  # (..., L, W) -> (prod(lead), heads, L, W / heads)
            t = t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).flatten(-2).reshape(*lead, q.shape[-2], q.shape[-1]))


class _DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = _Attention(width, heads, dropout)
        self.cross_attn = _Attention(width, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, width))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory_kv: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """``x`` (..., Q, W) queries; ``memory_kv`` (..., N, 2W) projected 3D tokens. ``keep`` trims the queries
        whose outputs are wanted (all of them still serve as keys/values of the self-attention)."""
        kv = self.self_attn.kv(x)
        if keep is not None:
            x = x[..., :keep, :]
        x = self.norm1(x + self.drop(self.self_attn(x, kv)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory_kv)))
        return self.norm3(x + self.drop(self.ffn(x)))


class PlaneSliceAwareTransformer(nn.Module):
    """Plane-Slice-Aware Transformer.

    Args:
        in_dim: width of the incoming 3D tokens; projected to ``width`` when different.
        width: model width (authors: 768).
        depth: number of decoder layers (authors: 6).
        heads: attention heads (authors: 8).
        num_queries: learnable queries (authors: 300); only query 0 is read out.
        ffn_dim: FFN hidden width; default ``4 * width`` (the authors' code passes 8 by mistake).
        out_dim: output embedding width, the teacher's (BiomedCLIP: 512).
        num_slice_bins: bins of the relative slice position in [0, 1] (authors: 128).
        dropout: dropout in attention and FFN (authors: 0.1).
        text_dim: ``None`` (the paper: image and text targets share one space, one head predicts both); else the
            width of a text space of its own (e.g. a timm image teacher with a sentence-encoder text teacher): a
            second head, ``text_head``, predicts the text target (:meth:`forward_spaces`).

    ``forward(tokens, plane, position)``: ``tokens`` (B, N, in_dim), ``plane`` long and ``position`` float of shape
    (B,) or (B, K) -> L2-normalised embeddings (B, out_dim) or (B, K, out_dim). Planes and positions follow
    :mod:`med3dinsight_plugin.planes`.
    """

    def __init__(self, in_dim: int = 768, width: int = 768, depth: int = 6, heads: int = 8, num_queries: int = 300,
                 ffn_dim: int | None = None, out_dim: int = 512, num_slice_bins: int = 128, dropout: float = 0.1,
                 text_dim: int | None = None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("width", width), ("depth", depth), ("heads", heads),
                            ("num_queries", num_queries), ("out_dim", out_dim), ("num_slice_bins", num_slice_bins),
                            ("text_dim", 1 if text_dim is None else text_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Med3DInsightError(f"{name} must be a positive integer, got {value!r}")
        if width % heads:
            raise Med3DInsightError(f"width ({width}) must be divisible by heads ({heads})")
        self.config = dict(in_dim=in_dim, width=width, depth=depth, heads=heads, num_queries=num_queries,
                           ffn_dim=ffn_dim or 4 * width, out_dim=out_dim, num_slice_bins=num_slice_bins,
                           dropout=dropout)
        if text_dim is not None:  # only then: the paper's configuration (and its checkpoints) stay as they were
            self.config["text_dim"] = text_dim
        self.text_dim = text_dim
        self.in_dim, self.width, self.out_dim, self.num_slice_bins = in_dim, width, out_dim, num_slice_bins
        self.input_proj = nn.Linear(in_dim, width) if in_dim != width else nn.Identity()
        self.queries = nn.Parameter(torch.empty(num_queries, width))
        self.plane_slice_embed = nn.Parameter(torch.empty(3, num_slice_bins, width))
        self.layers = nn.ModuleList(_DecoderLayer(width, heads, self.config["ffn_dim"], dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.text_head = nn.Linear(width, text_dim) if text_dim is not None else None
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.plane_slice_embed, std=0.02)

    @classmethod
    def from_preset(cls, preset: str, in_dim: int = 768, **overrides) -> "PlaneSliceAwareTransformer":
        """Build a named configuration of :data:`PSAT_PRESETS`; ``overrides`` change single arguments."""
        if preset not in PSAT_PRESETS:
            raise Med3DInsightError(f"unknown PSAT preset {preset!r}: expected one of {sorted(PSAT_PRESETS)}")
        return cls(in_dim=in_dim, **{**PSAT_PRESETS[preset], **overrides})

    def slice_embedding(self, plane: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Plane-slice position embedding, shape ``plane.shape + (width,)``."""
        return self.plane_slice_embed[plane, position_bins(position, self.num_slice_bins)]

    def forward(self, tokens: torch.Tensor, plane: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Image-space predictions (the only ones when the spaces are shared): see the class docstring."""
        return self.forward_spaces(tokens, plane, position)[0]

    def forward_spaces(self, tokens: torch.Tensor, plane: torch.Tensor, position: torch.Tensor):
        """Predictions in every target space from one decoding.

        Returns:
            ``(image, text)``: L2-normalised (B[, K], out_dim) image-space predictions, and the (B[, K], text_dim)
            text-space ones of ``text_head`` -- or ``None`` when the spaces are shared (the image-space prediction
            then stands for both targets).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"tokens must have shape (B, N, {self.in_dim}), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.shape[-1] != self.in_dim:
            raise ValueError(f"tokens have width {tokens.shape[-1]} but this PSAT expects in_dim={self.in_dim}; "
                             f"build it with in_dim={tokens.shape[-1]}")
        check_plane_position(plane, position, tokens.shape[0])
        single = plane.dim() == 1
        if single:
            plane, position = plane[:, None], position[:, None]
        pos = self.slice_embedding(plane, position).to(tokens.dtype)  # (B, K, W)

        memory = self.input_proj(tokens)  # (B, N, W), shared by all K slices
        x = (self.queries.to(tokens.dtype) + pos[:, :, None, :])  # (B, K, Q, W)
        for i, layer in enumerate(self.layers):
            # kv(memory + pos) = kv(memory) + W_kv pos: project the tokens once, add a per-slice bias.
            kv_proj = layer.cross_attn.kv
            memory_kv = kv_proj(memory)[:, None] + F.linear(pos, kv_proj.weight)[:, :, None]  # (B, K, N, 2W)
            x = layer(x, memory_kv, keep=1 if i == len(self.layers) - 1 else None)
        x = self.norm(x[:, :, 0])
        outs = [F.normalize(self.head(x), dim=-1),
                None if self.text_head is None else F.normalize(self.text_head(x), dim=-1)]
        return tuple(o[:, 0] if single and o is not None else o for o in outs)
