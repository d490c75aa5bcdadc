"""BRA against its definition (tests/oracles.py), in float64, on random inputs."""

import pytest
import torch

import attentions
from attentions.bra import BiLevelRoutingAttention

from . import oracles

CASES = [
    # (options, (H, W))
    (dict(n_win=7, topk=4, side_dwconv=5), (14, 14)),
    (dict(n_win=7, topk=1, side_dwconv=3, qk_dim=16), (21, 14)),  # H != W, qk_dim != dim
    (dict(n_win=4, topk=3, side_dwconv=5, auto_pad=True), (13, 10)),  # padded to 16 x 12
    (dict(n_win=3, topk=2, side_dwconv=0, param_attention="qkv", auto_pad=True), (7, 11)),
    (dict(n_win=7, topk=5, kv_downsample_mode="avgpool", kv_downsample_ratio=2), (28, 14)),
    (dict(n_win=7, topk=5, kv_downsample_mode="maxpool", kv_downsample_ratio=2), (14, 28)),
    (dict(n_win=4, topk=3, kv_downsample_mode="ada_avgpool", kv_per_win=2), (12, 20)),
    (dict(n_win=4, topk=3, kv_downsample_mode="ada_maxpool", kv_per_win=3), (12, 12)),
    (dict(n_win=4, topk=6, soft_routing=True), (8, 12)),
    (dict(n_win=4, topk=6, soft_routing=True, diff_routing=True, param_routing=True), (12, 8)),
]


def make(**options) -> BiLevelRoutingAttention:
    module = attentions.create("bra", dim=32, num_heads=4, **options).double()
    for parameter in module.parameters():  # non-trivial biases too
        torch.nn.init.normal_(parameter, std=0.2)
    return module


@pytest.mark.parametrize("options,size", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_definition_float64(options, size):
    module = make(**options)
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, oracles.bra(module, x), rtol=0, atol=1e-10)


def test_all_regions_routed_is_full_attention_plus_lce():
    """topk = n_win² with identity kv: every query sees every token, so BRA = full attention + W_o·LCE(V)."""
    bra = make(n_win=4, topk=16, side_dwconv=5)
    full = attentions.create("full", dim=32, num_heads=4, qk_scale=bra.scale).double()
    full.qkv.load_state_dict(bra.qkv.qkv.state_dict())
    full.proj.load_state_dict(bra.wo.state_dict())
    x = torch.randn(2, 12, 16, 32, dtype=torch.float64)
    v = torch.nn.functional.linear(x, bra.qkv.qkv.weight, bra.qkv.qkv.bias)[..., 64:]
    lce = oracles.depthwise(bra.lepe, v) @ bra.wo.weight.T
    torch.testing.assert_close(bra(x), full(x) + lce, rtol=0, atol=1e-10)


def test_gradients_reach_every_parameter():
    module = make(n_win=4, topk=3, side_dwconv=3, soft_routing=True, diff_routing=True, param_routing=True)
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64, requires_grad=True)
    module(x).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def _grads(module, x):
    out = module(x).square().sum()
    return torch.autograd.grad(out, [x, *module.parameters()])


def _grads_with_frozen_routing(module, x):
    """Gradients of the oracle in which the routing indices and weights are constants."""
    router_forward = module.router.forward

    def frozen(region_q, region_k):
        weight, index = router_forward(region_q.detach(), region_k.detach())
        return weight.detach(), index

    module.router.forward = frozen
    try:
        return _grads(module, x)
    finally:
        module.router.forward = router_forward


def test_no_gradient_through_routing_by_default():
    module = make(n_win=4, topk=3, soft_routing=True)  # soft weights used, but routing not differentiable
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64, requires_grad=True)
    for got, frozen in zip(_grads(module, x), _grads_with_frozen_routing(module, x), strict=True):
        torch.testing.assert_close(got, frozen, rtol=0, atol=1e-12)


def test_gradient_through_routing_with_diff_routing():
    module = make(n_win=4, topk=3, soft_routing=True, diff_routing=True)
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64, requires_grad=True)
    difference = max((g - f).abs().max().item()
                     for g, f in zip(_grads(module, x), _grads_with_frozen_routing(module, x), strict=True))
    assert difference > 1e-6


def test_state_dict_names_are_the_official_ones():
    assert set(make(side_dwconv=5).state_dict()) == {
        "qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias", "lepe.weight", "lepe.bias"
    }
    routed = make(soft_routing=True, diff_routing=True, param_routing=True, param_attention="qkv", side_dwconv=0)
    assert set(routed.state_dict()) == {"qkv.qkv.weight", "qkv.qkv.bias", "router.emb.weight", "router.emb.bias"}
    assert make(qk_dim=16).qkv.qkv.weight.shape == (16 + 16 + 32, 32)


def test_sizes_not_divisible_without_auto_pad_name_the_option():
    module = make(n_win=7, topk=4)
    with pytest.raises(ValueError, match=r"H=15 and W=14 .*n_win=7.*auto_pad"):
        module(torch.randn(1, 15, 14, 32, dtype=torch.float64))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(topk=50), r"topk must be in \[1, n_win\*\*2 = 49\]"),
        (dict(topk=0), r"topk must be in"),
        (dict(kv_downsample_mode="fracpool"), r"kv_downsample_mode must be one of identity, avgpool"),
        (dict(param_attention="none"), r"param_attention must be one of qkvo, qkv"),
        (dict(param_routing=True), r"param_routing=True needs diff_routing=True"),
        (dict(diff_routing=True), r"diff_routing=True needs soft_routing=True"),
        (dict(qk_dim=30), r"qk_dim=30 must be divisible by num_heads=4"),
    ],
)
def test_bad_options_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        attentions.create("bra", dim=32, num_heads=4, **options)


def test_downsample_window_larger_than_region():
    module = make(n_win=7, topk=4, kv_downsample_mode="avgpool", kv_downsample_ratio=4)
    with pytest.raises(ValueError, match="regions of 2x2 tokens are smaller than kv_downsample_ratio=4"):
        module(torch.randn(1, 14, 14, 32, dtype=torch.float64))
