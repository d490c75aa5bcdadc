"""Useful FLOPs of forward + backward: every multiply-add of a differentiable op has one partner in the input
gradient and one in the weight gradient, so forward + backward counts 3 × the forward, whichever kernel runs."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attentions
from attnbench.measure.flops import count_flops, useful_sdpa_backward_flop_count


def _forward_and_training_flops(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        forward = count_flops(lambda: module(x)).flops
    x = x.detach().clone().requires_grad_(True)
    training = count_flops(lambda: module(x).sum().backward()).flops
    return forward, training


def test_linear_backward_is_twice_its_forward():
    linear = torch.nn.Linear(24, 40)
    forward, training = _forward_and_training_flops(linear, torch.randn(5, 24))
    assert forward == 2 * 5 * 24 * 40
    assert training == 3 * forward


@pytest.mark.parametrize("groups", [1, 4, 16], ids=["dense", "grouped", "depthwise"])
def test_conv_backward_is_twice_its_forward_whatever_the_groups(groups):
    """torch's own formula counts a grouped conv's weight gradient ``groups`` times over."""
    conv = torch.nn.Conv2d(16, 16, kernel_size=5, padding=2, groups=groups)
    forward, training = _forward_and_training_flops(conv, torch.randn(2, 16, 9, 9))
    assert forward == 2 * 2 * 9 * 9 * 16 * (16 // groups) * 25
    assert training == 3 * forward


class _Attention(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.unbind(0)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], ids=["flash", "math"])
def test_sdpa_backward_is_twice_its_forward_on_every_cpu_kernel(backend):
    """The fused CPU kernel and the unfused matmuls compute the same function: the same useful count."""
    x = torch.randn(3, 2, 4, 50, 16)  # q, k, v of (batch 2, 4 heads, 50 tokens, head_dim 16)
    with sdpa_kernel(backend):
        forward, training = _forward_and_training_flops(_Attention(), x)
    assert forward == 2 * 2 * (2 * 4 * 50 * 50 * 16)
    assert training == 3 * forward


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                     SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
                         ids=["flash", "efficient", "cudnn", "math"])
def test_sdpa_backward_is_twice_its_forward_on_every_cuda_kernel(backend):
    """torch's own formulas for the CUDA kernels count the flash recomputation (5 matmuls): corrected to 4."""
    x = torch.randn(3, 2, 4, 64, 32, device="cuda", dtype=torch.float16)
    try:
        with sdpa_kernel(backend):
            forward, training = _forward_and_training_flops(_Attention(), x)
    except RuntimeError as error:  # a kernel this GPU or build cannot run
        pytest.skip(f"{backend.name}: {str(error).splitlines()[0]}")
    assert forward == 2 * 2 * (2 * 4 * 64 * 64 * 32)
    assert training == 3 * forward


def test_useful_sdpa_backward_counts_four_matmuls():
    q, k, v = (2, 4, 50, 16), (2, 4, 70, 16), (2, 4, 70, 8)
    forward_macs = 2 * 4 * 50 * 70 * 16 + 2 * 4 * 50 * 70 * 8  # QKᵀ and PV
    assert useful_sdpa_backward_flop_count((2, 4, 50, 8), q, k, v) == 2 * (2 * forward_macs)
    with pytest.raises(AssertionError):
        useful_sdpa_backward_flop_count((2, 4, 51, 8), q, k, v)


@pytest.mark.parametrize("impl", ["reference", "gather", "dense"])
def test_bra_training_flops_are_three_times_the_forward_less_the_detached_routing(impl):
    """BRA's routing is detached (no gradient flows through the region affinities), so its matmul is spent
    once; every other multiply-add (qkv, attention, LCE) three times. ``dense`` spends its masked products
    three times as well: its count is larger, but the ratio is the same."""
    module = attentions.create("bra", dim=32, num_heads=2, n_win=7, topk=4, side_dwconv=5, impl=impl)
    forward, training = _forward_and_training_flops(module, torch.randn(2, 14, 14, 32))
    routing = 2 * module.macs(14, 14).scaled(2).parts["routing"]
    assert training == 3 * forward - 2 * routing
