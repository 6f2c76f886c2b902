"""PSAT: configuration, shapes, the plane/position conditioning and the K-slice fast path."""
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_psat_kwargs
from med3dinsight_plugin import PlaneSliceAwareTransformer
from med3dinsight_plugin.planes import position_bins


def _naive(psat, tokens, plane, position):
    """Straightforward per-slice decoder: embedding added to tokens and queries, every query through every layer."""
    outs = []
    for b in range(tokens.shape[0]):
        pos = psat.slice_embedding(plane[b:b + 1], position[b:b + 1])  # (1, W)
        memory = psat.input_proj(tokens[b]) + pos
        x = psat.queries + pos
        for layer in psat.layers:
            x = layer(x, layer.cross_attn.kv(memory))
        outs.append(F.normalize(psat.head(psat.norm(x[0])), dim=-1))
    return torch.stack(outs)


def test_default_is_the_paper_configuration():
    psat = PlaneSliceAwareTransformer()
    assert psat.config == dict(in_dim=768, width=768, depth=6, heads=8, num_queries=300, ffn_dim=3072, out_dim=512,
                               num_slice_bins=128, dropout=0.1)
    assert isinstance(psat.input_proj, torch.nn.Identity)
    assert psat.layers[0].ffn[0].out_features == 3072  # a real FFN, not the authors' 768 -> 8 -> 768
    assert psat.plane_slice_embed.shape == (3, 128, 768)


def test_presets():
    small = PlaneSliceAwareTransformer.from_preset("small", in_dim=320, num_queries=16)
    assert small.config["width"] == 384 and small.config["depth"] == 4 and small.config["num_queries"] == 16
    assert PlaneSliceAwareTransformer.from_preset("paper").config == PlaneSliceAwareTransformer().config
    with pytest.raises(ValueError, match="unknown PSAT preset 'tiny'"):
        PlaneSliceAwareTransformer.from_preset("tiny")


def test_shapes_single_and_k_slices_and_unit_norm():
    torch.manual_seed(0)
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=20)).eval()
    tokens = torch.randn(3, 8, 20)
    one = psat(tokens, torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.5, 1.0]))
    assert one.shape == (3, 16)
    many = psat(tokens, torch.randint(0, 3, (3, 5)), torch.rand(3, 5))
    assert many.shape == (3, 5, 16)
    torch.testing.assert_close(many.norm(dim=-1), torch.ones(3, 5))
    assert psat.input_proj.in_features == 20  # 20-wide tokens projected to the 32-wide model


def test_k_slice_fast_path_equals_naive_per_slice_decoder():
    torch.manual_seed(1)
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=24)).eval()
    tokens = torch.randn(2, 7, 24)
    plane = torch.tensor([[0, 1, 2, 2], [1, 0, 0, 2]])
    position = torch.rand(2, 4)
    fast = psat(tokens, plane, position)
    for k in range(4):
        naive = _naive(psat, tokens, plane[:, k], position[:, k])
        torch.testing.assert_close(fast[:, k], naive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(psat(tokens, plane[:, k], position[:, k]), naive, rtol=1e-5, atol=1e-6)


def test_plane_and_position_change_the_output():
    torch.manual_seed(2)
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=32)).eval()
    tokens = torch.randn(1, 8, 32).expand(3, 8, 32)
    by_plane = psat(tokens, torch.tensor([0, 1, 2]), torch.full((3,), 0.4))
    by_position = psat(tokens, torch.zeros(3, dtype=torch.long), torch.tensor([0.05, 0.5, 0.95]))
    for out in (by_plane, by_position):
        assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
    same_bin = psat(tokens[:2], torch.zeros(2, dtype=torch.long), torch.tensor([0.501, 0.55]))  # bin 8 of 16
    torch.testing.assert_close(same_bin[0], same_bin[1])


def test_position_bins_cover_the_closed_unit_interval():
    bins = position_bins(torch.tensor([0.0, 0.0624, 0.0625, 0.5, 0.9999, 1.0]), 16)
    assert bins.tolist() == [0, 0, 1, 8, 15, 15]


def test_gradient_reaches_tokens_queries_and_embedding_table():
    torch.manual_seed(3)
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=32))
    tokens = torch.randn(2, 6, 32, requires_grad=True)
    psat(tokens, torch.tensor([[0, 2], [1, 1]]), torch.rand(2, 2)).sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert psat.queries.grad.abs().sum() > 0
    assert psat.plane_slice_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("tokens,plane,position,match", [
    (torch.randn(2, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2), r"tokens must have shape \(B, N, 32\)"),
    (torch.randn(2, 4, 30), torch.zeros(2, dtype=torch.long), torch.zeros(2), "in_dim=30"),
    (torch.randn(2, 4, 32), torch.tensor([0, 3]), torch.zeros(2), "plane values must be 0"),
    (torch.randn(2, 4, 32), torch.tensor([0, -1]), torch.zeros(2), "plane values must be 0"),
    (torch.randn(2, 4, 32), torch.zeros(2), torch.zeros(2), "plane must be an integer tensor"),
    (torch.randn(2, 4, 32), torch.zeros(2, dtype=torch.long), torch.tensor([0.5, 1.2]), r"position values .* \[0, 1\]"),
    (torch.randn(2, 4, 32), torch.zeros(2, dtype=torch.long), torch.tensor([0.5, float("nan")]), "position values"),
    (torch.randn(2, 4, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), "float tensor"),
    (torch.randn(2, 4, 32), torch.zeros(3, dtype=torch.long), torch.zeros(3), r"shape \(2,\) or \(2, K\)"),
    (torch.randn(2, 4, 32), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2), "same shape"),
])
def test_bad_input_raises_value_error_at_the_boundary(tokens, plane, position, match):
    psat = PlaneSliceAwareTransformer(**tiny_psat_kwargs(in_dim=32))
    with pytest.raises(ValueError, match=match):
        psat(tokens, plane, position)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="divisible by heads"):
        PlaneSliceAwareTransformer(width=30, heads=4)
    with pytest.raises(ValueError, match="num_queries must be a positive integer"):
        PlaneSliceAwareTransformer(num_queries=0)
