"""Masked reconstruction (model.reconstruction: masked): the block mask's ratio and structure, masking only in
training mode, the MSE on masked voxels only, plain reconstruction bit-identical to before, config validation, and a
tiny pretraining run that resumes to the same weights as an uninterrupted one."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (
    EMBED,
    assert_same_weights,
    final_weights,
    run_in_process,
    tiny_backbone,
    tiny_pretrain_batch,
    tiny_psat_kwargs,
    toy_overrides,
)
from med3dinsight_plugin import Med3DInsightLoss, Med3DInsightModel, PlaneSliceAwareTransformer
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.model import MaskedReconstruction, block_mask, masked_block_count
from med3dinsight_plugin.pretrain import ConfigError, build_model, load_config


def _blocks(mask, block):
    """(B, n_blocks) min and max of the mask over each block of the grid (partial blocks included)."""
    b, _, d, h, w = mask.shape
    grid = [-(-s // block) for s in (d, h, w)]
    pad = [g * block - s for g, s in zip(grid, (d, h, w))]
    m = mask.float()
    lo = F.pad(m, (0, pad[2], 0, pad[1], 0, pad[0]), value=2.0)  # padding never decides a block's min/max
    hi = F.pad(m, (0, pad[2], 0, pad[1], 0, pad[0]), value=-1.0)
    lo = -F.max_pool3d(-lo, block).flatten(1)
    hi = F.max_pool3d(hi, block).flatten(1)
    return lo, hi


# ------------------------------------------------------------------------------------------------------ the mask

@pytest.mark.parametrize("spatial, block", [((32, 32, 32), 8), ((20, 33, 17), 8), ((9, 9, 9), 8), ((5, 6, 7), 1)])
def test_every_block_is_all_masked_or_not_and_each_sample_masks_the_same_count(spatial, block):
    torch.manual_seed(0)
    mask = block_mask(6, spatial, 0.6, block)
    assert mask.shape == (6, 1, *spatial) and mask.dtype == torch.bool
    lo, hi = _blocks(mask, block)
    assert torch.equal(lo, hi)  # each block (a partial one too) is uniform
    n = lo.shape[1]
    count = masked_block_count(n, 0.6)
    assert count == min(max(round(0.6 * n), 1), n - 1)
    assert lo.sum(1).tolist() == [count] * 6  # exactly that many blocks per sample
    assert len({tuple(m.flatten().tolist()) for m in lo}) > 1  # samples differ


def test_blocks_are_masked_uniformly_at_the_ratio():
    torch.manual_seed(1)
    spatial, block = (20, 20, 20), 8  # a 3x3x3 grid with partial last blocks: 27 blocks, 16 masked
    mask = block_mask(3000, spatial, 0.6, block)
    frequency = _blocks(mask, block)[0].mean(0)
    assert frequency.shape == (27,) and (frequency - 16 / 27).abs().max() < 0.04  # every block alike (sd ~0.009)
    # partial blocks count as blocks: voxels are masked at the block rate on average, not at 0.6
    assert abs(mask.float().mean().item() - 16 / 27) < 0.01
    assert masked_block_count(27, 0.6) == 16 and masked_block_count(4, 0.1) == 1 and masked_block_count(4, 0.95) == 3


def test_the_mask_comes_from_the_global_rng_or_a_given_generator():
    torch.manual_seed(3)
    a = block_mask(2, (16, 16, 16), 0.5, 4)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(a, block_mask(2, (16, 16, 16), 0.5, 4)) and torch.equal(after, torch.get_rng_state())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(block_mask(2, (16, 16, 16), 0.5, 4, generator=g1),
                       block_mask(2, (16, 16, 16), 0.5, 4, generator=g2))
    with pytest.raises(Med3DInsightError, match="at least 2 mask blocks"):
        block_mask(1, (8, 8, 8), 0.5, 16)
    with pytest.raises(Med3DInsightError, match="mask_ratio"):
        block_mask(1, (8, 8, 8), 1.0, 2)


# ------------------------------------------------------------------------------------------------------ the model

class EchoBackbone(nn.Module):
    """A stand-in backbone: remembers its input and reconstructs exactly what it sees (so the reconstruction equals
    the original volume on unmasked voxels and is 0 -- wrong -- on the masked ones)."""
    token_dim = 8
    config = {"name": "echo"}

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, self.token_dim)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        tokens = self.proj(x.mean(dim=(1, 2, 3, 4))[:, None, None]).expand(-1, 4, -1)
        return tokens, x * self.scale


def _echo_model(reconstruction="masked", **loss_kwargs):
    torch.manual_seed(0)
    return Med3DInsightModel(EchoBackbone(), PlaneSliceAwareTransformer(**tiny_psat_kwargs(8)),
                             Med3DInsightLoss("clip", embed_dim=16, **loss_kwargs), reconstruction=reconstruction,
                             mask_ratio=0.5, mask_block=4)


def _echo_inputs(channels=2):
    g = torch.Generator().manual_seed(2)
    volume = torch.randn(2, channels, 10, 12, 9, generator=g) + 5  # no voxel is 0 by chance
    return volume, torch.randint(0, 3, (2, 3), generator=g), torch.rand(2, 3, generator=g)


def test_masked_voxels_are_zero_on_every_channel_and_the_loss_counts_only_them():
    model = _echo_model().train()
    volume, plane, position = _echo_inputs(channels=2)
    torch.manual_seed(7)
    z3d, rec = model.encode(volume, plane, position)
    assert isinstance(rec, MaskedReconstruction) and rec.mask.shape == (2, 1, 10, 12, 9)
    seen, mask = model.backbone.seen, rec.mask
    assert torch.equal(seen, volume.masked_fill(mask, 0)) and 0.3 < mask.float().mean() < 0.7
    assert torch.equal(seen == 0, mask.expand_as(volume))  # the same voxels on both channels, and only those
    loss = model.compute_losses(z3d, rec, volume)["reconstruction"]
    selected = mask.expand_as(volume)
    torch.testing.assert_close(loss, volume[selected].square().mean())  # the echo's error: the hidden values
    # garbage on unmasked voxels changes nothing; the gradient reaches masked voxels only
    garbage = MaskedReconstruction(rec.output + 100.0 * (~mask), mask)
    assert torch.equal(model.compute_losses(z3d, garbage, volume)["reconstruction"], loss)
    grad, = torch.autograd.grad(loss, rec.output)
    assert (grad[~selected] == 0).all() and (grad[selected] != 0).all()


def test_eval_mode_and_a_zero_reconstruction_weight_never_mask():
    volume, plane, position = _echo_inputs()
    model = _echo_model().eval()
    rng = torch.get_rng_state()
    z3d, rec = model.encode(volume, plane, position)
    assert isinstance(rec, torch.Tensor) and torch.equal(model.backbone.seen, volume)
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn
    unweighted = _echo_model(reconstruction_weight=0.0).train()
    _, rec = unweighted.encode(volume, plane, position)
    assert isinstance(rec, torch.Tensor) and torch.equal(unweighted.backbone.seen, volume)


def test_a_real_backbone_matches_a_hand_computation_under_autocast():
    backbone = tiny_backbone("plain_conv_unet")
    model = Med3DInsightModel(backbone, PlaneSliceAwareTransformer(**tiny_psat_kwargs(backbone.token_dim)),
                              reconstruction="masked", mask_ratio=0.6, mask_block=8).train()
    batch = tiny_pretrain_batch(backbone.patch_size, 16)
    torch.manual_seed(11)
    z3d, rec = model.encode(batch["volume"], batch["plane"], batch["position"])
    out = model.compute_losses(z3d, rec, batch["volume"], batch["image_emb"], batch["text_emb"], batch["mask"])
    expected = (rec.output - batch["volume"]).square()[rec.mask.expand_as(batch["volume"])].mean()
    torch.testing.assert_close(out["reconstruction"], expected)
    assert rec.mask.float().mean().item() == pytest.approx(masked_block_count(64, 0.6) / 64)  # 32^3 / 8^3 blocks
    # model(...) draws the same mask from the same seed; under bf16 autocast the loss is float32 and trains
    torch.manual_seed(11)
    torch.testing.assert_close(model(**batch)["reconstruction"], out["reconstruction"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model(**batch)
    assert amp["reconstruction"].dtype == torch.float32 and torch.isfinite(amp["loss"])
    amp["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_plain_reconstruction_is_bit_identical_to_the_unmasked_computation():
    """"plain" (the default) runs the code path of before: backbone -> PSAT -> alignment + F.mse_loss over every
    voxel, drawing nothing from the RNG; the default model and an explicit "plain" one give the same bits."""
    def build(**kwargs):
        backbone = tiny_backbone("plain_conv_unet")
        psat = PlaneSliceAwareTransformer(**{**tiny_psat_kwargs(backbone.token_dim), "dropout": 0.1})
        return Med3DInsightModel(backbone, psat, Med3DInsightLoss("ot", embed_dim=16), **kwargs).train()

    batch = tiny_pretrain_batch((32, 32, 32), 16)
    results = []
    for kwargs in ({}, {"reconstruction": "plain", "mask_ratio": 0.3, "mask_block": 4}):
        model = build(**kwargs)
        torch.manual_seed(5)
        results.append((model(**batch), torch.get_rng_state()))
    # the reference: the pre-masking forward, spelled out
    model = build()
    torch.manual_seed(5)
    tokens, reconstruction = model.backbone(batch["volume"])
    z3d = model.psat(tokens, batch["plane"], batch["position"])
    keep = batch["mask"].reshape(-1)
    z = z3d.reshape(-1, 16)[keep]
    targets = torch.stack([F.normalize(batch[k].reshape(-1, 16)[keep], dim=-1) for k in ("image_emb", "text_emb")])
    image, text = model.loss.align(z, targets).unbind(0)
    mse = F.mse_loss(reconstruction.float(), batch["volume"].float())
    reference = {"image": image, "text": text, "reconstruction": mse, "loss": image + text + mse}
    for out, rng in results:
        assert torch.equal(rng, torch.get_rng_state())
        for key, value in reference.items():
            assert torch.equal(out[key], value), key


# ------------------------------------------------------------------------------------------------------ config

def test_config_defaults_and_overrides():
    m = load_config(None).model
    assert (m.reconstruction, m.mask_ratio, m.mask_block) == ("plain", 0.6, 16)
    m = load_config(None, ["model.reconstruction=masked", "model.mask_ratio=0.75", "model.mask_block=8"]).model
    assert (m.reconstruction, m.mask_ratio, m.mask_block) == ("masked", 0.75, 8)


@pytest.mark.parametrize("override, message", [
    ("model.reconstruction=mae", "'model.reconstruction' in --set must be one of 'plain', 'masked', got 'mae'"),
    ("model.mask_ratio=0", "'model.mask_ratio' in --set must be a number strictly between 0 and 1, got 0"),
    ("model.mask_ratio=1", "'model.mask_ratio' in --set must be a number strictly between 0 and 1, got 1"),
    ("model.mask_ratio=-0.2", "must be a number strictly between 0 and 1, got -0.2"),
    ("model.mask_ratio=lots", "must be a number strictly between 0 and 1, got 'lots'"),
    ("model.mask_block=0", "'model.mask_block' in --set must be an integer >= 1, got 0"),
    ("model.mask_block=2.5", "'model.mask_block' in --set must be an integer >= 1, got 2.5"),
    ("model.mask_blocks=8", "unknown key 'model.mask_blocks' in --set; did you mean 'model.mask_block'?"),
])
def test_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_build_model_passes_the_setting_and_refuses_a_block_as_large_as_the_patch(tmp_path):
    config = load_config(None, toy_overrides(tmp_path, **{"model.reconstruction": "masked", "model.mask_ratio": 0.4,
                                                      "model.mask_block": 8}))
    model = build_model(config, EMBED)
    assert (model.reconstruction, model.mask_ratio, model.mask_block) == ("masked", 0.4, 8)
    assert build_model(load_config(None, toy_overrides(tmp_path)), EMBED).reconstruction == "plain"
    config.model.mask_block = 32  # the tiny patch is 32^3: one block
    with pytest.raises(ConfigError, match="model.mask_block=32 leaves a single mask block in the 32x32x32 patch"):
        build_model(config, EMBED)


# ------------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_masked_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    # constant schedule: the first leg's shorter train.steps leaves the learning rates unchanged; PSAT dropout on,
    # so the masks and the dropout draws must both continue where the checkpoint left the RNG
    run = {"model.reconstruction": "masked", "model.mask_block": 8, "model.psat_kwargs.dropout": 0.1,
           "schedule": "constant", "checkpoint_every": 2, "log_every": 1}
    _, _, whole = run_in_process(toy_overrides(tmp_path / "whole", steps=4, **run), eval_cases=0)
    _, _, first = run_in_process(toy_overrides(tmp_path / "split", steps=2, **run), eval_cases=0)
    _, _, second = run_in_process(toy_overrides(tmp_path / "split", steps=4, **run), eval_cases=0)
    assert (whole.steps, first.steps, second.start_step, second.steps) == (4, 2, 2, 4)
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"), exact=True)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reconstruction"] > 0 for r in records if "reconstruction" in r)
    loaded = final_weights(tmp_path / "whole")
    assert loaded.metadata["pretraining"]["config"]["model"]["reconstruction"] == "masked"
    # the same run with plain reconstruction ends elsewhere: the masks were really drawn
    _, _, plain = run_in_process(toy_overrides(tmp_path / "plain", steps=2, **{**run, "model.reconstruction":
                                                                                 "plain"}), eval_cases=0)
    assert plain.losses["reconstruction"] != first.losses["reconstruction"]
