"""DAT v1 (LeapLabTHU/DAT @ 566a593) and DAT++ (main) deformable attention against their definitions
(tests/oracles.py) in float64, and what tells the two versions apart."""

import pytest
import torch

import attentions

from . import oracles

DIM = 24


def make(version: str, num_heads: int = 6, **options):
    module = attentions.create("deformable", dim=DIM, num_heads=num_heads, version=version, **options).double()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return module


CASES = [
    (dict(n_groups=3, stride=1, ksize=5, offset_range_factor=2.0, rpe_table_size=7), (7, 7)),
    (dict(n_groups=3, stride=1, ksize=3, offset_range_factor=2.0, rpe_table_size=(6, 9)), (6, 9)),  # H != W
    (dict(n_groups=2, stride=2, ksize=3, offset_range_factor=3.0, rpe_table_size=(9, 6)), (9, 6)),
    (dict(n_groups=1, stride=1, ksize=3, offset_range_factor=-1.0, rpe_table_size=(6, 8)), (6, 8)),
    (dict(n_groups=2, stride=1, ksize=3, offset_range_factor=0.0, rpe_table_size=5), (5, 5)),
    (dict(n_groups=3, stride=4, ksize=4, offset_range_factor=-1.0, rpe_table_size=8), (8, 8)),  # ksize == stride
    (dict(n_groups=3, stride=2, ksize=2, offset_range_factor=2.0, use_pe=False), (8, 5)),
    (dict(n_groups=3, stride=1, ksize=3, offset_range_factor=2.0, rpe_table_size=4), (1, 5)),  # DAT++ pads to 2
    (dict(n_groups=3, stride=1, ksize=3, offset_range_factor=2.0, rpe_table_size=7), (5, 6)),  # table != map
]


@pytest.mark.parametrize("version", ["dat", "dat++"])
@pytest.mark.parametrize("options,size", CASES, ids=[str(i) for i in range(len(CASES))])
def test_deformable_version_matches_its_definition(version, options, size):
    module = make(version, **options)
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, oracles.deformable(module, x), rtol=0, atol=1e-10)


def test_saturated_offsets_match_the_definition_in_both_versions():
    """Offsets pushed to tanh's bound (f > 0) and positions squashed (v1: tanh) or clamped (DAT++) for f < 0."""
    for version in ("dat", "dat++"):
        for factor in (2.0, -1.0):
            module = make(version, n_groups=3, stride=1, ksize=3, offset_range_factor=factor, rpe_table_size=6)
            torch.nn.init.normal_(module.conv_offset[3].weight, std=30.0)
            x = torch.randn(2, 6, 6, DIM, dtype=torch.float64)
            torch.testing.assert_close(module(x), oracles.deformable(module, x), rtol=0, atol=1e-10)


def test_reference_points_are_cell_centres_over_n_in_v1_and_over_n_minus_1_in_datpp():
    from attentions.deformable import query_grid, reference_grid

    def grid(fn, n, version):
        return fn(n, version, torch.device("cpu"), torch.float64).tolist()

    assert grid(reference_grid, 4, "dat") == pytest.approx([-0.75, -0.25, 0.25, 0.75], abs=1e-15)
    assert grid(reference_grid, 4, "dat++") == pytest.approx([-2 / 3, 0.0, 2 / 3, 4 / 3], abs=1e-15)
    assert grid(query_grid, 4, "dat") == pytest.approx([-0.75, -0.25, 0.25, 0.75], abs=1e-15)
    assert grid(query_grid, 4, "dat++") == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0], abs=1e-15)


@pytest.mark.parametrize("version,cells", [("dat", (9, 7)), ("dat++", (8, 6))])
def test_offsets_stay_within_factor_over_cells(version, cells):
    factor = 2.0
    module = make(version, n_groups=3, stride=1, ksize=3, offset_range_factor=factor)
    torch.nn.init.normal_(module.conv_offset[3].weight, std=100.0)  # saturate tanh
    q = torch.randn(2, 9, 7, DIM, dtype=torch.float64)
    offset = module.sampling_positions(q) - oracles.deformable_reference_points(9, 7, version)
    bound_h, bound_w = factor / cells[0], factor / cells[1]
    assert (offset[..., 0].abs() <= bound_h * (1 + 1e-6)).all() and (offset[..., 1].abs() <= bound_w * (1 + 1e-6)).all()
    assert offset[..., 0].abs().max() > 0.9 * bound_h  # and they do reach it


def test_negative_factor_squashes_positions_by_tanh_in_v1():
    module = make("dat", n_groups=3, offset_range_factor=-1.0)
    torch.nn.init.zeros_(module.conv_offset[3].weight)
    positions = module.sampling_positions(torch.randn(2, 4, 4, DIM, dtype=torch.float64))
    reference = oracles.deformable_reference_points(4, 4, "dat")
    torch.testing.assert_close(positions, reference.tanh().expand_as(positions), rtol=0, atol=1e-15)


def test_the_versions_are_different_functions_of_the_same_weights():
    v1, plus = make("dat", n_groups=3, rpe_table_size=7), make("dat++", n_groups=3, rpe_table_size=7)
    plus.load_state_dict(v1.state_dict(), strict=True)
    x = torch.randn(2, 7, 7, DIM, dtype=torch.float64)
    assert (v1(x) - plus(x)).abs().max() > 1e-3


@pytest.mark.parametrize("version,grid", [("dat", 5), ("dat++", 4)])
def test_keys_per_query_and_macs_follow_the_versions_offset_padding(version, grid):
    """ksize == stride: DAT v1 pads the offset conv by ksize // 2 (a 5 × 5 grid at 16²), DAT++ does not (4 × 4)."""
    module = make(version, n_groups=3, stride=4, ksize=4, offset_range_factor=-1.0, rpe_table_size=16)
    positions = module.sampling_positions(torch.randn(1, 16, 16, DIM, dtype=torch.float64))
    assert positions.shape[1:3] == (grid, grid)
    assert module.keys_per_query(16, 16) == grid * grid
    assert module.macs(16, 16).parts["attn_scores"] == 16 * 16 * grid * grid * DIM


def test_unknown_version_is_refused():
    with pytest.raises(ValueError, match="version must be one of dat, dat\\+\\+"):
        attentions.create("deformable", dim=DIM, num_heads=6, version="dat3")
