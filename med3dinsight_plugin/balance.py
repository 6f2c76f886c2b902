"""Where each loss term's gradient goes: per-term gradient norms on the encoder, and loss weights set from them.

With the paper's 1:1:1 weights the reconstruction term can dominate what reaches the encoder (its gradient there
was 27x the text term's and 140x the image term's at step 0 in our simulation). Pretraining logs each term's
encoder-gradient norm at every log step (``encoder_grad/<term>`` in metrics.jsonl and TensorBoard), and
``model.loss_balance`` sets a term's weight before the first step so that its encoder-gradient norm is a chosen
multiple of the reconstruction term's ("alignment gets half of reconstruction's gradient": ``0.5``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import nn

from .errors import Med3DInsightError

__all__ = ["balanced_weights", "encoder_parameters", "term_gradient_norms"]


def encoder_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters of a :class:`~med3dinsight_plugin.model.Med3DInsightModel`'s pretrained encoder
    (the backbone network's ``encoder_prefixes``: what fine-tuning loads), in ``named_parameters`` order."""
    backbone = model.backbone
    prefixes = tuple(backbone.encoder_prefixes)
    return [p for name, p in backbone.network.named_parameters() if name.startswith(prefixes) and p.requires_grad]


def term_gradient_norms(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                        params: List[nn.Parameter], weighted: bool = True) -> Dict[str, torch.Tensor]:
    """The L2 norm of each loss term's gradient on ``params``, one backward pass per term on the retained graph.

    Call it before the step's own ``backward()`` (the graph is kept for it). No gradient is accumulated into
    ``.grad`` and nothing is synchronised with the host.

    Args:
        losses: the loss terms of one forward pass (``"loss"``, the total, is skipped).
        weights: the terms' weights.
        params: the parameters to measure on (:func:`encoder_parameters`).
        weighted: norms of ``weight * term`` (what reaches the encoder) or of the term alone.

    Returns:
        ``{term: norm}`` (0-dim tensors on the parameters' device); a term that does not reach ``params`` gets 0.
    """
    out = {}
    for name, value in losses.items():
        if name == "loss" or not value.requires_grad:
            continue
        scale = float(weights.get(name, 1.0)) if weighted else 1.0
        grads = torch.autograd.grad(value * scale, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().square().sum() for g in grads if g is not None]
        out[name] = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=value.device)
    return out


def balanced_weights(norms: Mapping[str, float], weights: Mapping[str, float],
                     ratios: Mapping[str, float]) -> Dict[str, float]:
    """Weights that give each term in ``ratios`` an encoder-gradient norm of ``ratio x`` the weighted
    reconstruction term's.

    Args:
        norms: each term's *unweighted* encoder-gradient norm (:func:`term_gradient_norms` with
            ``weighted=False``), on the same batch.
        weights: the current weights; ``weights["reconstruction"]`` is kept.
        ratios: ``{term: ratio}`` for the terms to set.

    Returns:
        A copy of ``weights`` with the terms of ``ratios`` set to ``ratio * w_rec * |g_rec| / |g_term|``.

    Raises:
        Med3DInsightError: no reconstruction term to measure against, or a term whose gradient does not reach the
            encoder (norm 0).
    """
    reference = float(weights.get("reconstruction", 0.0)) * float(norms.get("reconstruction", 0.0))
    if not reference > 0:
        raise Med3DInsightError("model.loss_balance sets weights relative to the reconstruction term's encoder "
                                "gradient, but there is none (model.loss_weights.reconstruction is 0): set a "
                                "reconstruction weight, or set the weights by hand in model.loss_weights")
    out = dict(weights)
    for term, ratio in ratios.items():
        norm = float(norms.get(term, 0.0))
        if not norm > 0:
            raise Med3DInsightError(f"model.loss_balance.{term}: the {term} term's gradient does not reach the "
                                    f"encoder on the first batch (norm {norm:g}); check that the teacher cache has "
                                    f"{term} targets, or leave model.loss_balance.{term} unset")
        out[term] = float(ratio) * reference / norm
    return out
