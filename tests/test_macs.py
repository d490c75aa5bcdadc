"""Each mechanism's analytic MAC count against what FlopCounterMode counts for its matmuls and convs."""

import pytest
import torch

import attentions
from attnbench.measure.flops import count_flops

SIZES = [(14, 14), (28, 21), (35, 49)]
QUADTREE_UNCOUNTED = {
    "_softmax", "avg_pool2d", "floor_divide", "gather", "native_group_norm", "topk", "_unsafe_index"
}

# (name, options, ops FlopCounterMode runs but cannot count: their arithmetic is not multiply-adds)
CASES = [
    ("full", dict(), set()),
    ("full", dict(side_dwconv=5, qkv_bias=False), set()),
    ("bra", dict(impl="reference", n_win=7, topk=4, side_dwconv=5), {"mean", "topk", "_softmax", "index"}),
    ("bra", dict(impl="reference", n_win=7, topk=2, qk_dim=16, param_attention="qkv"), {"mean", "topk", "_softmax", "index"}),
    ("bra", dict(impl="reference", n_win=7, topk=3, soft_routing=True, diff_routing=True, param_routing=True),
     {"mean", "topk", "_softmax", "index"}),
    ("bra", dict(impl="reference", n_win=7, topk=4, kv_downsample_mode="ada_avgpool", kv_per_win=2),
     {"mean", "topk", "_softmax", "index", "_adaptive_avg_pool2d"}),
    ("bra", dict(impl="reference", n_win=4, topk=4, auto_pad=True), {"mean", "topk", "_softmax", "index"}),
    ("bra", dict(impl="gather", n_win=7, topk=4, side_dwconv=5), {"mean", "topk", "_softmax", "index_select"}),
    ("swin", dict(window_size=7), {"index"}),  # the bias-table lookup
    ("swin", dict(window_size=7, shift_size=3), {"index"}),
    ("axial", dict(), {"_safe_softmax"}),
    ("axial", dict(composition="sequential"), {"_safe_softmax"}),
    ("cswin", dict(split_size=2), set()),
    ("cswin", dict(split_size=4), set()),  # 14 and 21 and 35 and 49 are not multiples of 4: padded per branch
    ("cswin", dict(split_size=7, last_stage=True), set()),
    ("neighborhood", dict(kernel_size=7), {"_softmax", "index", "floor_divide"}),  # the k² gather
    ("neighborhood", dict(kernel_size=5, dilation=2, rel_pos_bias=False), {"_softmax", "index", "floor_divide"}),
    ("spatial_reduction", dict(sr_ratio=4), {"native_layer_norm"}),
    ("spatial_reduction", dict(sr_ratio=1), set()),
    ("deformable", dict(n_groups=2), {"grid_sampler_2d", "native_layer_norm"}),
    ("deformable", dict(n_groups=4, stride=2, ksize=3, use_pe=False), {"grid_sampler_2d", "native_layer_norm"}),
    ("deformable", dict(n_groups=2, stride=4, ksize=4, offset_range_factor=-1.0, version="dat++"),
     {"grid_sampler_2d", "native_layer_norm"}),  # ksize == stride: no padding in DAT++
    ("deformable", dict(n_groups=2, version="dat"), {"grid_sampler_2d", "native_layer_norm"}),
    ("deformable", dict(n_groups=4, stride=2, ksize=2, version="dat", use_pe=False),
     {"grid_sampler_2d", "native_layer_norm"}),  # DAT v1 pads by ksize // 2 even when ksize == stride
    ("quadtree", dict(levels=3), QUADTREE_UNCOUNTED),
    ("quadtree", dict(levels=4, topks=(2, 4, 8), lepe=False), QUADTREE_UNCOUNTED),
]


@pytest.mark.parametrize("name,options,uncounted", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_analytic_macs_match_flop_counter(name, options, uncounted, size):
    module = attentions.create(name, dim=32, num_heads=4, **options)
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        counted = count_flops(lambda: module(x))
    analytic = module.macs(*size).scaled(2)  # the counter cannot see grid_sample's taps: compare what it can
    assert abs(analytic.counter_visible - counted.macs) <= 0.02 * counted.macs, (analytic.parts, counted.by_op)
    assert set(counted.uncounted_ops) == uncounted


def test_dense_bra_counts_the_masked_products_it_wastes():
    """impl="dense" computes every query-key product and masks the unrouted ones: the counter sees all of them,
    the analytic count (useful work, the same for every impl) only the routed ones."""
    module = attentions.create("bra", dim=32, num_heads=4, n_win=7, topk=4, impl="dense")
    x = torch.randn(1, 14, 14, 32)
    with torch.no_grad():
        counted = count_flops(lambda: module(x))
    parts = module.macs(14, 14).parts
    unrouted = (parts["attn_scores"] + parts["attn_values"]) * (49 / 4 - 1)
    assert counted.macs == module.macs(14, 14).total + unrouted


def test_full_attention_sdpa_is_counted_on_cpu():
    """torch has no formula for the CPU flash kernel of SDPA; attnbench supplies it, forward and backward."""
    module = attentions.create("full", dim=32, num_heads=4)
    x = torch.randn(1, 7, 7, 32, requires_grad=True)
    counted = count_flops(lambda: module(x).sum().backward())
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 49 * 49 * 32
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu_backward"] > 0


def test_bra_cost_parts_follow_the_paper_terms():
    """qkv 3HWC², routing (S²)²C, attention 2·HW·k·(HW/S²)·C for qk_dim = C and identity kv."""
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, side_dwconv=5)
    h = w = 56
    s, k, c = 7, 4, 64
    parts = module.macs(h, w).parts
    assert parts["qkv"] == 3 * h * w * c * c
    assert parts["routing"] == (s * s) ** 2 * c
    assert parts["attn_scores"] + parts["attn_values"] == 2 * h * w * k * (h * w // (s * s)) * c
    assert parts["local_context"] == h * w * c * 25
