"""Deformable (DAT++) and QuadTree-B attention against their definitions (tests/oracles.py) in float64; both DAT
versions are checked against theirs in tests/test_deformable_versions.py."""

import pytest
import torch

import attentions

from . import oracles

DIM = 24


def make(name: str, num_heads: int, **options):
    module = attentions.create(name, dim=DIM, num_heads=num_heads, **options).double()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return module


@pytest.mark.parametrize("version", ["dat", "dat++"])
def test_deformable_without_offsets_samples_the_reference_grid(version):
    """With the offset network's last layer zeroed the keys come from the reference points themselves."""
    module = make("deformable", num_heads=6, n_groups=3, stride=2, ksize=3, rpe_table_size=5, version=version)
    torch.nn.init.zeros_(module.conv_offset[3].weight)
    x = torch.randn(2, 10, 8, DIM, dtype=torch.float64)
    q = torch.nn.functional.linear(x, module.proj_q.weight.flatten(1), module.proj_q.bias)
    positions = module.sampling_positions(q)
    reference = oracles.deformable_reference_points(5, 4, version)
    torch.testing.assert_close(positions, reference.expand_as(positions), rtol=0, atol=1e-15)
    torch.testing.assert_close(module(x), oracles.deformable(module, x), rtol=0, atol=1e-10)


def test_deformable_gradients_reach_the_offset_network():
    module = make("deformable", num_heads=6, n_groups=3, rpe_table_size=6)
    x = torch.randn(2, 6, 6, DIM, dtype=torch.float64, requires_grad=True)
    module(x).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_deformable_negative_factor_clamps_positions_to_the_map():
    module = make("deformable", num_heads=6, n_groups=3, offset_range_factor=-1.0, version="dat++")
    torch.nn.init.normal_(module.conv_offset[3].weight, std=100.0)
    positions = module.sampling_positions(torch.randn(2, 9, 7, DIM, dtype=torch.float64))
    assert positions.abs().max() <= 1.0 and (positions.abs() == 1.0).any()


QUADTREE_CASES = [
    (dict(levels=3, topks=(2, 3)), (8, 8)),
    (dict(levels=2, topks=(3,)), (6, 10)),  # H != W
    (dict(levels=3, topks=(4, 2), lepe=False), (7, 5)),  # padded to 8 x 8
    (dict(levels=1, topks=()), (5, 3)),
    (dict(levels=3, topks=(40, 8)), (4, 8)),  # top-k clamped to the 2 coarse tokens
]


@pytest.mark.parametrize("options,size", QUADTREE_CASES, ids=[str(i) for i in range(len(QUADTREE_CASES))])
def test_quadtree_matches_definition(options, size):
    module = make("quadtree", num_heads=2, **options)
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, oracles.quadtree(module, x), rtol=0, atol=1e-10)


def test_quadtree_keeping_every_child_is_full_attention_at_the_finest_level():
    """With top-k = all candidates at every level, the finest level's candidates are all its keys."""
    module = make("quadtree", num_heads=2, levels=3, topks=(4, 16))
    x = torch.randn(2, 8, 8, DIM, dtype=torch.float64)
    queries, keys, values = module.pyramids(x)
    finest = module.level_messages(queries, keys, values, module.kept_topks(8, 8))[-1]  # (B, heads, 8, 8, d)
    q, k, v = (t[0].flatten(2).transpose(1, 2) for t in (queries, keys, values))
    full = oracles.masked_attention(q, k, v, None, module.head_dim ** -0.5, 2)
    torch.testing.assert_close(finest.permute(0, 2, 3, 1, 4).reshape(2, 64, DIM), full, rtol=0, atol=1e-12)


def test_quadtree_state_dict_names_are_the_references():
    names = set(attentions.create("quadtree", dim=DIM, num_heads=2, levels=2).state_dict())
    assert {"q_proj.weight", "k_proj.bias", "v_proj.weight", "value_branchs.0.2.weight", "value_branchs.0.5.bias",
            "py_att.get_vs.1.weight", "py_att.weight", "proj.weight"} <= names


@pytest.mark.parametrize("name,options,message", [
    ("deformable", dict(num_heads=6, n_groups=4), "n_groups=4 must divide num_heads=6"),
    ("deformable", dict(num_heads=6, stride=0), "stride and ksize must be >= 1"),
    ("quadtree", dict(num_heads=2, levels=0), "levels must be >= 1"),
    ("quadtree", dict(num_heads=2, levels=4, topks=(8, 8)), r"topks needs at least levels-1 = 3 positive entries"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        attentions.create(name, dim=DIM, **options)
