"""Swin (shifted) window, axial, cross-shaped, neighbourhood and spatial-reduction attention against
their definitions (tests/oracles.py) in float64, and against timm's implementations where timm has one."""

import importlib.util

import pytest
import torch

import attentions

from . import oracles

DIM = 32


def make(name: str, num_heads: int = 4, **options):
    module = attentions.create(name, dim=DIM, num_heads=num_heads, **options).double()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return module


def check(module, oracle, size, **oracle_kwargs):
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, oracle(module, x, **oracle_kwargs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("window,shift,size", [
    (4, 0, (8, 8)), (4, 2, (8, 12)), (4, 2, (9, 7)), (3, 1, (5, 11)), (7, 3, (5, 6)), (5, 2, (10, 10)),
])
def test_swin_matches_definition(window, shift, size):
    check(make("swin", window_size=window, shift_size=shift), oracles.swin, size)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("window,shift,size", [(7, 0, (14, 14)), (7, 3, (14, 21)), (7, 3, (13, 17)), (4, 2, (9, 10))])
def test_swin_equals_timm_window_attention(window, shift, size, dtype, atol):
    """Same weights, same windows: our module returns what timm's SwinTransformerBlock attention returns
    (its roll, pad, partition, WindowAttention with the shift mask, merge and crop)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    ours = make("swin", window_size=window, shift_size=shift).to(dtype)
    block = SwinTransformerBlock(DIM, input_resolution=size, num_heads=4, window_size=window, shift_size=shift,
                                 always_partition=True, dynamic_mask=True).to(dtype)
    block.attn.load_state_dict(ours.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(block.attn.state_dict())
    x = torch.randn(2, *size, DIM, dtype=dtype)
    torch.testing.assert_close(ours(x), block._attn(x), rtol=0, atol=atol)


@pytest.mark.parametrize("composition", ["parallel", "sequential"])
@pytest.mark.parametrize("size", [(6, 6), (5, 9), (1, 7)])
def test_axial_matches_definition(composition, size):
    check(make("axial", composition=composition), oracles.axial, size, scale=(DIM // 4) ** -0.5)


@pytest.mark.parametrize("size", [(6, 6), (5, 9), (1, 7)])
def test_axial_parallel_is_cswin_split_1_without_lepe_with_the_same_weights(size):
    """CSWin's split-1 branch 0 (the first channel half) attends along columns, branch 1 along rows; axial's
    parallel head split has the same order, so CSWin's qkv / proj load into it strictly as the same function
    once CSWin's LePE convs are zero."""
    cswin = make("cswin", split_size=1)
    for branch in cswin.attns:
        torch.nn.init.zeros_(branch.get_v.weight)
        torch.nn.init.zeros_(branch.get_v.bias)
    axial = make("axial")
    shared = {name: tensor for name, tensor in cswin.state_dict().items() if not name.startswith("attns.")}
    axial.load_state_dict(shared, strict=True)
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    torch.testing.assert_close(axial(x), cswin(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("split_size,last_stage,size", [
    (2, False, (8, 8)), (2, False, (7, 9)), (1, False, (5, 6)), (3, False, (10, 4)), (7, True, (7, 7)),
    (7, True, (5, 9)), (2, False, (9, 9)), (7, False, (23, 37)), (4, False, (6, 5)), (5, False, (3, 2)),
])
def test_cswin_matches_definition(split_size, last_stage, size):
    """Sizes that are not stripe multiples included: padded per branch, centred, after the projection."""
    check(make("cswin", split_size=split_size, last_stage=last_stage), oracles.cswin, size)


def test_cswin_pads_each_branch_with_exact_zeros_along_its_own_axis_only():
    """A 9 × 9 map, split 2: branch 0 sees 9 × 10 (a zero column on the right, none on the left: ⌊1/2⌋ = 0),
    branch 1 10 × 9 (a zero row at the bottom); the padded tokens carry no qkv bias."""
    from attentions.cswin import pad_centred

    module = make("cswin", split_size=2)
    x = torch.randn(1, 9, 9, DIM, dtype=torch.float64)
    q = module.qkv(x)[..., :DIM]
    padded_w, before_w = pad_centred(q, 2, 2)
    padded_h, before_h = pad_centred(q, 1, 2)
    assert padded_w.shape[1:3] == (9, 10) and padded_h.shape[1:3] == (10, 9) and before_w == before_h == 0
    assert padded_w[:, :, 9].abs().max() == 0 and padded_h[:, 9].abs().max() == 0
    wide, before = pad_centred(torch.ones(1, 2, 9, 1), 2, 7)  # 9 -> 14: 2 before, 3 after
    assert before == 2 and wide[0, 0, :, 0].tolist() == [0, 0] + [1] * 9 + [0, 0, 0]


@pytest.mark.parametrize("kernel,dilation,size,rpb", [
    (3, 1, (6, 7), True), (5, 1, (9, 5), True), (3, 2, (9, 8), True), (3, 3, (11, 10), False),
    (5, 1, (3, 4), True),  # smaller than the kernel: padded up to it
])
def test_neighborhood_matches_natten_definition(kernel, dilation, size, rpb):
    check(make("neighborhood", kernel_size=kernel, dilation=dilation, rel_pos_bias=rpb), oracles.neighborhood,
          size)


def test_neighborhood_window_start_equals_nattens_rule():
    from attentions.neighborhood import neighborhood_index

    for kernel in (1, 3, 5, 7):
        for dilation in (1, 2, 3, 5):
            for length in range(kernel * dilation, kernel * dilation + 13):
                keys, _ = neighborhood_index(length, kernel, dilation)
                starts = [oracles._natten_window_start(i, length, kernel, dilation) for i in range(length)]
                assert keys[:, 0].tolist() == starts, (kernel, dilation, length)


def test_neighborhood_sees_k_squared_distinct_keys_including_itself():
    from attentions.neighborhood import neighborhood_index

    for length, kernel, dilation in [(7, 7, 1), (20, 5, 1), (20, 3, 4), (23, 3, 3)]:
        keys, offsets = neighborhood_index(length, kernel, dilation)
        assert keys.min() >= 0 and keys.max() < length
        assert offsets.min() >= 0 and offsets.max() <= 2 * kernel - 2
        for position in range(length):
            row = keys[position].tolist()
            assert len(set(row)) == kernel and position in row
            assert all((key - position) % dilation == 0 for key in row)


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="the optional natten package is not installed")
def test_neighborhood_natten_backend_equals_pure_torch():
    pure = make("neighborhood", kernel_size=5, dilation=2, rel_pos_bias=False).float()
    fast = make("neighborhood", kernel_size=5, dilation=2, rel_pos_bias=False, backend="natten").float()
    fast.load_state_dict(pure.state_dict())
    x = torch.randn(2, 14, 18, DIM)
    torch.testing.assert_close(fast(x), pure(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sr_ratio,size", [(2, (8, 8)), (3, (10, 7)), (4, (4, 9)), (1, (5, 6))])
def test_spatial_reduction_matches_definition(sr_ratio, size):
    check(make("spatial_reduction", sr_ratio=sr_ratio), oracles.spatial_reduction, size)


@pytest.mark.parametrize("sr_ratio,size", [(2, (14, 14)), (4, (15, 13)), (1, (7, 9))])
def test_spatial_reduction_equals_timm_pvt_v2_attention(sr_ratio, size):
    from timm.models.pvt_v2 import Attention

    ours = make("spatial_reduction", sr_ratio=sr_ratio)
    theirs = Attention(DIM, num_heads=4, sr_ratio=sr_ratio, linear_attn=False, qkv_bias=True).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x.flatten(1, 2), size).reshape(x.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["swin", "axial", "cswin", "neighborhood", "spatial_reduction", "full"])
def test_default_scale_is_head_dim_inverse_sqrt(name):
    assert attentions.create(name, dim=64, num_heads=4).scale == 16 ** -0.5


@pytest.mark.parametrize("name,options,message", [
    ("swin", dict(shift_size=7), r"shift_size must be in \[0, window_size=7\)"),
    ("axial", dict(composition="diagonal"), "composition must be one of parallel, sequential"),
    ("axial", dict(num_heads=1), "num_heads=1 must be even"),
    ("cswin", dict(num_heads=1, split_size=2), "num_heads=1 must be even"),
    ("neighborhood", dict(kernel_size=4), "kernel_size must be odd"),
    ("neighborhood", dict(backend="cuda"), "backend must be one of torch, natten"),
    ("spatial_reduction", dict(sr_ratio=0), "sr_ratio must be >= 1"),
])
def test_bad_options(name, options, message):
    options.setdefault("num_heads", 4)
    with pytest.raises(ValueError, match=message):
        attentions.create(name, dim=DIM, **options)


def test_spatial_reduction_names_sr_ratio_when_the_map_is_too_small():
    with pytest.raises(ValueError, match="H=3 and W=9 must be >= sr_ratio=4"):
        make("spatial_reduction", sr_ratio=4)(torch.randn(1, 3, 9, DIM, dtype=torch.float64))
