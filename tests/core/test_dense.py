"""Dense distillation: slice geometry on both sides, the loss, every backbone family, the engine and its resume."""
import json

import numpy as np
import pytest
import torch

from helpers import (
    EMBED,
    TINY_BACKBONES,
    assert_same_weights,
    final_weights,
    run_in_process,
    tiny_pretrain_batch,
    tiny_pretrain_config,
    toy_overrides,
)
from med3dinsight_plugin.dense import (
    DenseHead,
    crop_map_target,
    dense_loss,
    real_slice_points,
    sample_slice_features,
    slice_grid,
)
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.model import SliceOutputs
from med3dinsight_plugin.pretrain import PretrainConfig, build_model
from med3dinsight_plugin.pretrain.config import ConfigError


def _coordinate_volume(shape):
    """(1, 3, D, H, W): channel c holds each voxel centre's fraction along canonical axis c."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids)[None]


@pytest.mark.parametrize("plane", [0, 1, 2])
def test_3d_side_samples_the_slice_plane_in_canonical_in_plane_order(plane):
    shape, size = (6, 8, 10), 4
    position = torch.tensor([[0.25, 0.75]])
    out = sample_slice_features(_coordinate_volume(shape), torch.full((1, 2), plane), position, size)
    assert out.shape == (1, 2, size, size, 3)
    a, b = [x for x in range(3) if x != plane]
    u = (torch.arange(size) + 0.5) / size
    for k in range(2):
        torch.testing.assert_close(out[0, k, ..., plane], torch.full((size, size), float(position[0, k])))
        torch.testing.assert_close(out[0, k, ..., a], u[:, None].expand(size, size))  # rows: the lower axis
        torch.testing.assert_close(out[0, k, ..., b], u[None, :].expand(size, size))


def test_slice_grid_matches_a_loop_over_points():
    plane, position = torch.tensor([[2, 0, 1]]), torch.tensor([[0.1, 0.5, 0.9]])
    grid = slice_grid(plane, position, 3)
    for k, (p, t) in enumerate(zip(plane[0].tolist(), position[0].tolist())):
        a, b = [x for x in range(3) if x != p]
        for i in range(3):
            for j in range(3):
                expected = [0.0, 0.0, 0.0]
                expected[p], expected[a], expected[b] = t, (i + 0.5) / 3, (j + 0.5) / 3
                torch.testing.assert_close(grid[0, k, i, j], torch.tensor(expected))


def test_teacher_side_maps_the_crop_into_the_whole_slice_map():
    s, size = 8, 4
    u = (np.arange(s) + 0.5) / s
    maps = np.stack([np.repeat(u[:, None], s, 1), np.repeat(u[None, :], s, 0)])[None].repeat(3, 0)  # (3, 2, S, S)
    low, high = np.array([0.25, 0.5, 0.0]), np.array([0.75, 1.0, 0.5])
    target, valid = crop_map_target(maps.astype(np.float16), [0, 1, 2], low, high, size)
    assert target.shape == (3, 2, size, size) and valid.all()
    v = (np.arange(size) + 0.5) / size
    for k, p in enumerate([0, 1, 2]):
        a, b = [x for x in range(3) if x != p]
        np.testing.assert_allclose(target[k, 0], np.repeat((low[a] + v * (high[a] - low[a]))[:, None], size, 1),
                                   atol=2e-3)
        np.testing.assert_allclose(target[k, 1], np.repeat((low[b] + v * (high[b] - low[b]))[None, :], size, 0),
                                   atol=2e-3)


def test_teacher_side_marks_points_outside_the_volume_invalid():
    maps = np.ones((1, 2, 4, 4), np.float16)
    _, valid = crop_map_target(maps, [0], [0.0, -0.5, 0.0], [1.0, 0.5, 2.0], 4)  # axis 1 below 0, axis 2 above 1
    np.testing.assert_array_equal(valid[0], np.outer([False, False, True, True], [True, True, False, False]))


def test_both_sides_agree_on_a_crop_of_a_coordinate_coded_volume():
    """The 3D features of a crop and the teacher map of the whole slice, both coordinate coded in the volume's
    fractions, give the same values at every point: the two geometries are one."""
    shape, crop_start, crop = np.array([16, 24, 32]), np.array([4, 8, 0]), np.array([8, 8, 16])
    volume = _coordinate_volume(tuple(shape))[:, :, 4:12, 8:16, 0:16]  # the crop of a coordinate-coded volume
    s, size = 64, 4
    u = (np.arange(s) + 0.5) / s
    for p in range(3):
        a, b = [x for x in range(3) if x != p]
        maps = np.stack([np.repeat(u[:, None], s, 1), np.repeat(u[None, :], s, 0)])[None]  # fractions (a, b)
        target, valid = crop_map_target(maps, [p], crop_start / shape, (crop_start + crop) / shape, size)
        pred = sample_slice_features(volume, torch.tensor([[p]]), torch.tensor([[0.5]]), size)[0, 0]
        np.testing.assert_allclose(pred[..., a].numpy(), target[0, 0], atol=0.02)
        np.testing.assert_allclose(pred[..., b].numpy(), target[0, 1], atol=0.02)
        assert valid.all()


def test_dense_loss_known_values():
    pred = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): 2 rows x 1 column, C = 2
    target = pred.movedim(-1, -3).clone()  # (1, 2, 2, 1)
    assert float(dense_loss(pred, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(dense_loss(pred, -target)) == pytest.approx(2.0)
    valid = torch.tensor([[[True], [False]]])
    flipped = target.clone()
    flipped[:, :, 1] *= -1  # only the invalid location disagrees
    assert float(dense_loss(pred, flipped, valid)) == pytest.approx(0.0, abs=1e-6)
    assert float(dense_loss(pred, 2 * target, kind="mse")) == pytest.approx(0.5)
    with pytest.raises(Med3DInsightError, match="dense loss"):
        dense_loss(pred, target, kind="l1")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_dense_distillation_reaches_the_encoder_of_every_family(backbone):
    config = tiny_pretrain_config(backbone)
    config.model.loss_weights.dense = 1.0
    model = build_model(config, EMBED, map_shape=(5, 3, 3))
    assert isinstance(model.dense_head, DenseHead) and model.dense_head.size == 3
    batch = tiny_pretrain_batch(model.backbone.patch_size, EMBED)
    k = batch["plane"].shape[1]
    batch["map_target"] = torch.randn(2, k, 5, 3, 3)
    batch["map_valid"] = torch.ones(2, k, 3, 3, dtype=torch.bool)
    z3d, _ = model.encode(batch["volume"], batch["plane"], batch["position"])
    assert isinstance(z3d, SliceOutputs) and z3d.dense.shape == (2, k, 3, 3, 5)
    losses = model(**batch)
    assert set(losses) == {"loss", "image", "text", "reconstruction", "dense"}
    from med3dinsight_plugin.balance import encoder_parameters, term_gradient_norms

    norms = term_gradient_norms(losses, model.loss.weights, encoder_parameters(model))
    assert float(norms["dense"]) > 0


def test_dense_needs_teacher_maps_and_is_off_in_the_papers_recipe():
    config = tiny_pretrain_config("plain_conv_unet")  # the paper's recipe
    model = build_model(config, EMBED, map_shape=(5, 3, 3))
    assert model.dense_head is None and model.loss.weights["dense"] == 0.0
    config.model.loss_weights.dense = 0.5
    with pytest.raises(ConfigError, match="--feature-maps"):
        build_model(config, EMBED)


def test_the_default_recipe_is_reconstruction_plus_dense_distillation():
    """What the teacher protocol found to help (docs/simulation.md) is the default: dense distillation balanced to
    half of reconstruction's encoder gradient, the paper's global image/text alignment off."""
    defaults = PretrainConfig().model
    assert (defaults.loss_weights.image, defaults.loss_weights.text, defaults.loss_weights.reconstruction) == (0, 0, 1)
    assert defaults.loss_balance.dense == 0.5 and defaults.loss_balance.image is None
    config = tiny_pretrain_config("plain_conv_unet")
    config.model.loss_weights = type(defaults.loss_weights)()
    config.model.loss_balance = type(defaults.loss_balance)()
    model = build_model(config, EMBED, map_shape=(5, 3, 3))
    assert model.dense_head is not None
    assert model.loss.weights["image"] == 0.0 and model.loss.weights["text"] == 0.0
    with pytest.raises(ConfigError, match="--feature-maps 7.*model.loss_balance.dense=null"):
        build_model(config, EMBED)  # a cache without maps: one line with both ways out


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_dense_pretraining_logs_the_term_and_resumes_exactly(tmp_path, backbone):
    """Every family trains with dense distillation through the engine, logs the term and its encoder gradient, and
    a run stopped after one step and resumed ends with the weights of one never stopped, bit for bit."""
    common = dict(schedule="constant", warmup_steps=0, checkpoint_every=1, log_every=1, eval_every=0)
    extra = ["model.loss_weights.dense=0.5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_in_process(toy_overrides(whole, backbone, steps=2, **common) + extra, eval_cases=0, maps=(6, 4))
    run_in_process(toy_overrides(split, backbone, steps=1, **common) + extra, eval_cases=0, maps=(6, 4))
    _, _, summary = run_in_process(toy_overrides(split, backbone, steps=2, **common) + extra, eval_cases=0,
                                   maps=(6, 4))
    assert summary.start_step == 1
    # nnU-Net's conv nets resume bit for bit on the CPU; MONAI's transformers differ by float rounding (~1e-5), with
    # or without dense distillation (some of their CPU kernels do not add in a fixed order)
    exact = backbone in ("plain_conv_unet", "resenc_unet")
    assert_same_weights(final_weights(whole), final_weights(split), exact=exact, atol=1e-4)
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "dense" in r]
    assert len(logged) == 2 and all(r["dense"] > 0 and r["encoder_grad/dense"] > 0 for r in logged)
    assert final_weights(whole).metadata["alignment"]["dense"] == {"loss": "cosine", "channels": 6, "size": 4}


def test_padding_slices_lose_their_points_whatever_the_mask_shape():
    valid = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    valid[0, 0, 0, 0] = False
    mask = torch.tensor([[True, False, True], [False, True, True]])
    for m in (mask, mask.reshape(-1), mask.float()):  # the model's (B, K) and a flattened or float mask alike
        out = real_slice_points(valid, m)
        assert out.shape == valid.shape and out.dtype == torch.bool
        assert not out[0, 1].any() and not out[1, 0].any()
        assert out[0, 2].all() and out[1, 1].all() and out[1, 2].all()
        assert not out[0, 0, 0, 0] and out[0, 0].sum() == 15
    assert real_slice_points(valid, None) is valid and real_slice_points(None, mask) is None
