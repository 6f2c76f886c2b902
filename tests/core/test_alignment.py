"""Alignment and reconstruction losses against their references (open_clip's ClipLoss, POT)."""
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from med3dinsight_plugin import ClipAlignment, Med3DInsightLoss, PartialOTAlignment, clip_loss, reconstruction_loss


def _pairs(n=8, e=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    z2d = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    z3d = F.normalize(z2d + noise * torch.randn(n, e, generator=g), dim=-1)
    return z3d, z2d


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_equals_open_clip(scale):
    from open_clip.loss import ClipLoss

    z3d, z2d = _pairs()
    expected = ClipLoss()(z3d, z2d, torch.tensor(scale))
    torch.testing.assert_close(clip_loss(z3d, z2d, torch.tensor(scale)), expected)


def test_clip_temperature_initialised_and_clamped_like_clip():
    align = ClipAlignment()
    assert align.logit_scale.item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        align.log_logit_scale.fill_(10.0)
    align.clamp_()  # after the optimizer step, as CLIP does
    assert align.logit_scale.item() == pytest.approx(100.0)
    z3d, z2d = _pairs()
    torch.testing.assert_close(align(z3d, z2d), clip_loss(z3d, z2d, 100.0))
    with torch.no_grad():
        align.log_logit_scale.fill_(-1.0)
    align.clamp_()
    assert align.log_logit_scale.item() == 0.0  # CLIP's lower bound: a logit scale of at least 1


def test_clip_temperature_keeps_its_gradient_past_the_bound_and_is_not_decayed():
    """A clamp inside forward would zero the gradient beyond the bound (the temperature could stay there)."""
    align = ClipAlignment()
    with torch.no_grad():
        align.log_logit_scale.fill_(align.max_log + 0.5)
    z3d, z2d = _pairs(noise=3.0)
    loss = align(z3d, z2d)
    torch.testing.assert_close(loss, clip_loss(z3d, z2d, math.exp(align.max_log + 0.5)))  # not clamped in forward
    loss.backward()
    grad = align.log_logit_scale.grad
    assert grad is not None and torch.isfinite(grad) and grad.item() != 0.0
    assert align.no_weight_decay() == {"log_logit_scale"}


def test_ot_alignment_equals_pot_reference():
    torch.manual_seed(0)
    align = PartialOTAlignment(dim=16, num_iter=1000, stop_thr=1e-100).double()
    z3d, z2d = (t.double() for t in _pairs(n=10, e=16, seed=1))
    w = align.log_metric.exp().detach().numpy()
    diff = z3d.numpy()[:, None] - z2d.numpy()[None]
    cost = np.sqrt((diff ** 2 * w).sum(-1) + 1e-12)
    cost /= cost.max()
    plan = ot.partial.entropic_partial_wasserstein(np.full(10, 0.1), np.full(10, 0.1), cost, 0.03, 0.95)
    expected = -np.log(np.diag(plan)).mean()
    assert align(z3d, z2d).item() == pytest.approx(expected, rel=1e-9)


def test_ot_metric_is_explicitly_diagonal_and_positive_with_the_authors_init():
    align = PartialOTAlignment(dim=512)
    w = align.log_metric.detach().exp()
    assert w.shape == (512,) and float(w.min()) >= 1.0 and float(w.max()) < 2.0


def test_ot_alignment_sends_gradient_to_predictions_and_metric_and_rewards_alignment():
    align = PartialOTAlignment(dim=16)
    z3d, z2d = _pairs(n=12, e=16, seed=2)
    z3d.requires_grad_(True)
    loss = align(z3d, z2d)
    loss.backward()
    assert torch.isfinite(loss) and z3d.grad.abs().sum() > 0 and align.log_metric.grad.abs().sum() > 0
    aligned = float(align(*_pairs(n=12, e=16, seed=2, noise=0.05)))
    shuffled = float(align(z3d.detach()[torch.randperm(12)], z2d))
    assert aligned < float(loss) < shuffled + 1.0 and aligned < shuffled
    # P_ii <= 1/n bounds the loss below by log(n); the uniform coupling P_ij = m/n^2 gives log(n^2/m)
    assert math.log(12) <= aligned < 0.5 * (math.log(12) + math.log(144 / 0.95))


def test_stacked_targets_equal_separate_calls():
    align = PartialOTAlignment(dim=16)
    z3d, img = _pairs(seed=3)
    _, txt = _pairs(seed=4)
    both = align(z3d, torch.stack([img, txt]))
    torch.testing.assert_close(both, torch.stack([align(z3d, img), align(z3d, txt)]), rtol=1e-5, atol=1e-6)


def test_no_nan_when_a_prediction_equals_its_target():
    align = PartialOTAlignment(dim=16)
    _, z2d = _pairs()
    z3d = z2d.clone().requires_grad_(True)
    align(z3d, z2d).backward()
    assert torch.isfinite(z3d.grad).all() and torch.isfinite(align.log_metric.grad).all()


@pytest.mark.parametrize("alignment", ["ot", "clip"])
def test_combined_loss_weights_and_terms(alignment):
    z3d, img = _pairs(seed=5)
    _, txt = _pairs(seed=6)
    rec, vol = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    loss = Med3DInsightLoss(alignment, embed_dim=16, image_weight=1.0, text_weight=0.5, reconstruction_weight=2.0)
    out = loss(z3d, img, txt, rec, vol)
    assert set(out) == {"loss", "image", "text", "reconstruction"}
    torch.testing.assert_close(out["loss"], out["image"] + 0.5 * out["text"] + 2.0 * out["reconstruction"])
    torch.testing.assert_close(out["image"], loss.align(z3d, img), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["reconstruction"], F.mse_loss(rec, vol))
    # teacher embeddings are normalised inside: scaling them changes nothing
    torch.testing.assert_close(loss(z3d, 3 * img, None)["image"], out["image"], rtol=1e-5, atol=1e-6)
    assert set(loss(z3d, img, None)) == {"loss", "image"}


def test_bad_input_raises_value_error():
    z3d, z2d = _pairs()
    with pytest.raises(ValueError, match="two \\(B, E\\) tensors"):
        clip_loss(z3d, z2d[:, :8], 1.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        PartialOTAlignment(dim=16)(z3d[:1], z2d[:1])
    with pytest.raises(ValueError, match="embedding width must equal PSAT's out_dim"):
        Med3DInsightLoss(embed_dim=16)(z3d, torch.randn(8, 32), None)
    with pytest.raises(ValueError, match="alignment must be 'ot' or 'clip'"):
        Med3DInsightLoss("mmd")
    with pytest.raises(ValueError, match="reconstruction has shape"):
        reconstruction_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="no loss term"):
        Med3DInsightLoss(embed_dim=16)(z3d, None, None)


def test_ot_loss_is_solved_in_float32_even_under_autocast():
    align = PartialOTAlignment(dim=16)
    z3d, z2d = _pairs(n=12, e=16, seed=7)
    expected = align(z3d, z2d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = align(z3d, z2d)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_embedding_width_mismatch_is_a_value_error():
    z3d, z2d = _pairs(e=16)
    with pytest.raises(ValueError, match="build it with dim=16"):
        PartialOTAlignment(dim=32)(z3d, z2d)
    with pytest.raises(ValueError, match="embed_dim=32"):
        Med3DInsightLoss(embed_dim=32)(z3d, z2d, None)
