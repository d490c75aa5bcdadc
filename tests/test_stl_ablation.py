"""The deformable rows of the STL attention ablation: DAT-T v1's block layout and DAT++-T's, with their
upstream options, and DAT-T v1's cost at 224²."""

import pytest
import torch

import attentions
from attnbench.measure.correctness import plain_copy
from attnbench.measure.flops import count_flops
from attnbench.models.biformer_stl import BiFormerSTL


def layout(model: BiFormerSTL) -> list[list[str]]:
    names = {attentions.get(name): name for name in attentions.available()}
    return [[names[type(block.attn)] for block in stage.blocks] for stage in model.stages]


def test_deformable_row_is_dat_t_v1_local_windows_then_alternating_deformable_blocks():
    """configs/dat_tiny.yaml @ 566a593: stage_spec [[L, S], [L, S], [L, D, L, D, L, D], [L, D]]."""
    model = BiFormerSTL(attention="deformable")
    assert layout(model) == [["swin", "swin"], ["swin", "swin"], ["swin", "deformable"] * 3, ["swin", "deformable"]]
    shifts = [[getattr(block.attn, "shift_size", None) for block in stage.blocks] for stage in model.stages[:2]]
    assert shifts == [[0, 4], [0, 4]]  # DAT's S blocks shift by ceil(7 / 2)
    assert all(block.attn.shift_size == 0 for stage in model.stages[2:] for block in stage.blocks[::2])
    deformable = [model.stages[2].blocks[1].attn, model.stages[3].blocks[1].attn]
    assert [(m.version, m.num_heads, m.n_groups, m.stride, m.ksize, m.offset_range_factor) for m in deformable] == [
        ("dat", 12, 3, 1, 5, 2.0), ("dat", 24, 6, 1, 3, 2.0)]
    assert [tuple(m.rpe_table.shape) for m in deformable] == [(12, 27, 27), (24, 13, 13)]  # the 14² and 7² maps


def test_deformable_datpp_row_is_dat_pp_t_layout():
    """configs/dat_tiny.yaml @ main: N, D alternating in stages 1-3, D, D in stage 4; strides [8, 4, 2, 1]."""
    model = BiFormerSTL(depths=(2, 2, 2, 2), attention="deformable_datpp")
    assert layout(model) == [["neighborhood", "deformable"]] * 3 + [["deformable", "deformable"]]
    deformable = [stage.blocks[1].attn for stage in model.stages]
    assert [(m.version, m.n_groups, m.stride, m.ksize, m.offset_range_factor) for m in deformable] == [
        ("dat++", 1, 8, 9, -1.0), ("dat++", 2, 4, 7, -1.0), ("dat++", 4, 2, 5, -1.0), ("dat++", 8, 1, 3, -1.0)]
    assert [m.keys_per_query(56 // 2**i, 56 // 2**i) for i, m in enumerate(deformable)] == [49.0] * 4


def test_stl_with_dat_t_v1_layout_costs_about_dat_ts_4_5_gmacs():
    """Counted as the models suite counts (FlopCounterMode on the plain path, ÷ 2): within 5% of 4.5 GMACs."""
    model = plain_copy(BiFormerSTL(attention="deformable")).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        macs = count_flops(lambda: model(x)).macs
    assert macs / 1e9 == pytest.approx(4.5, rel=0.05)


def test_unknown_named_layout_lists_the_variants():
    with pytest.raises(ValueError, match="deformable_datpp"):
        BiFormerSTL(attention="deformable_v3")


def test_a_one_block_stage_runs_the_rows_own_mechanism():
    """Scaled-down demos (depths 1-1-1-1) cannot alternate: stages 3-4 of the DAT-T row keep the deformable block."""
    assert layout(BiFormerSTL(depths=(1, 1, 1, 1), attention="deformable")) == [
        ["swin"], ["swin"], ["deformable"], ["deformable"]]
    assert layout(BiFormerSTL(depths=(1, 1, 1, 1), attention="deformable_datpp")) == [["deformable"]] * 4
    assert layout(BiFormerSTL(depths=(1, 1, 1, 1), attention="swin")) == [["swin"]] * 4
