"""Med3DInsightModel end to end on every backbone: K slices per pass, every loss term trains the backbone."""
import pytest
import torch

from helpers import TINY_BACKBONES, tiny_psat_kwargs
from med3dinsight_plugin import Med3DInsightLoss, Med3DInsightModel, PlaneSliceAwareTransformer, build_backbone


def _model(name, alignment="ot", **loss_kwargs):
    torch.manual_seed(0)
    kwargs = dict(TINY_BACKBONES[name])
    backbone = build_backbone(name, **kwargs)
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(backbone.token_dim))
    return Med3DInsightModel(backbone, psat, Med3DInsightLoss(alignment, embed_dim=16, **loss_kwargs))


def _batch(model, b=2, k=3):
    g = torch.Generator().manual_seed(1)
    volume = torch.randn(b, 1, *model.backbone.patch_size, generator=g)
    plane = torch.randint(0, 3, (b, k), generator=g)
    position = torch.rand(b, k, generator=g)
    image, text = torch.randn(2, b, k, 16, generator=g).unbind(0)
    return volume, plane, position, image, text


def _encoder_grad(model):
    prefixes = model.backbone.encoder_prefixes
    grads = [p.grad for n, p in model.backbone.network.named_parameters() if n.startswith(prefixes)]
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("term", ["image", "text", "reconstruction"])
def test_each_loss_term_sends_gradient_to_the_backbone_encoder(tiny_backbone_name, term):
    model = _model(tiny_backbone_name)
    out = model(*_batch(model))
    assert set(out) == {"loss", "image", "text", "reconstruction"} and all(torch.isfinite(v) for v in out.values())
    out[term].backward()
    assert _encoder_grad(model) > 0


def test_alignment_runs_over_all_b_times_k_pairs():
    model = _model("plain_conv_unet").eval()
    volume, plane, position, image, text = _batch(model, b=2, k=4)
    out = model(volume, plane, position, image, text)
    z3d, reconstruction = model.encode(volume, plane, position)
    assert z3d.shape == (2, 4, 16)
    expected = model.loss(z3d.reshape(8, 16), image.reshape(8, 16), text.reshape(8, 16), reconstruction, volume)
    for key in out:
        torch.testing.assert_close(out[key], expected[key])
    # one slice per volume: (B,) planes/positions and (B, E) embeddings
    single = model(volume, plane[:, 0], position[:, 0], image[:, 0], text[:, 0])
    assert torch.isfinite(single["loss"])


def test_clip_alignment_variant_and_skipped_text_term():
    model = _model("plain_conv_unet", alignment="clip", text_weight=0.0)
    volume, plane, position, image, text = _batch(model)
    out = model(volume, plane, position, image, text)
    assert set(out) == {"loss", "image", "reconstruction"}
    out["loss"].backward()
    assert model.loss.align.log_logit_scale.grad is not None


def test_param_groups_exempt_only_the_clip_temperature_from_weight_decay():
    clip = _model("plain_conv_unet", alignment="clip")
    next(clip.psat.parameters()).requires_grad_(False)  # frozen parameters are left out
    groups = clip.param_groups()
    assert len(groups) == 2 and set(groups[1]) == {"params", "weight_decay"} and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"] == [clip.loss.align.log_logit_scale]
    assert "weight_decay" not in groups[0]  # the optimizer's own
    assert groups[0]["params"] == [p for p in clip.parameters() if p.requires_grad and p is not
                                   clip.loss.align.log_logit_scale]
    ot = _model("plain_conv_unet", alignment="ot")  # one group, as before the temperature had its own
    assert len(ot.param_groups()) == 1 and ot.param_groups()[0]["params"] == list(ot.parameters())
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]


def test_after_optimizer_step_clamps_the_clip_logit_scale_and_leaves_the_rest():
    model = _model("plain_conv_unet", alignment="clip")
    with torch.no_grad():
        model.loss.align.log_logit_scale.fill_(7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.after_optimizer_step()
    assert model.loss.align.logit_scale.item() == pytest.approx(100.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k != "loss.align.log_logit_scale")
    _model("plain_conv_unet", alignment="ot").after_optimizer_step()  # nothing to clamp


def test_mismatches_raise_value_error():
    backbone = build_backbone("plain_conv_unet", **TINY_BACKBONES["plain_conv_unet"])
    with pytest.raises(ValueError, match=f"build PSAT with in_dim={backbone.token_dim}"):
        Med3DInsightModel(backbone, PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=7)))
    with pytest.raises(ValueError, match="the loss expects 512-wide embeddings but PSAT outputs 16"):
        Med3DInsightModel(backbone, PlaneSliceAwareTransformer(**tiny_psat_kwargs(backbone.token_dim)),
                          Med3DInsightLoss(embed_dim=512))
    model = _model("plain_conv_unet")
    volume, plane, position, image, text = _batch(model)
    with pytest.raises(ValueError, match=r"image_emb must have shape \(2, 3\) \+ \(E,\)"):
        model(volume, plane, position, image[:, :2], text)
    with pytest.raises(ValueError, match="embedding width must equal PSAT's out_dim"):
        model(volume, plane, position, torch.randn(2, 3, 8), None)


def test_unused_in_pretraining_names_exactly_the_parameters_without_gradient(tiny_backbone_name):
    # DDP without find_unused_parameters needs this set to be right: the pretraining engine freezes it.
    model = _model(tiny_backbone_name)
    model(*_batch(model))["loss"].backward()
    no_grad = {n for n, p in model.backbone.network.named_parameters() if p.grad is None}
    unused = set(model.backbone.unused_in_pretraining())
    assert unused == no_grad and unused


def test_masked_slices_are_left_out_of_the_alignment():
    model = _model("plain_conv_unet")
    volume, plane, position, image, text = _batch(model, b=2, k=3)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    z3d, rec = model.encode(volume, plane, position)
    masked = model.compute_losses(z3d, rec, volume, image, text, mask)
    ref = model.loss(z3d[mask], image[mask], text[mask], rec, volume)  # only the 4 real pairs
    assert all(torch.allclose(masked[k], ref[k]) for k in ref)
    assert not torch.allclose(masked["image"], model.compute_losses(z3d, rec, volume, image, text)["image"])
