"""Every backend of BRA's token attention against the reference (the official computation), in float64 and
float32, forward and backward; the dispatcher's choices and its reasons when a backend cannot run."""

import pytest
import torch

import attentions
from attentions import bra_kernels

from .test_bra import CASES, make

EAGER_BACKENDS = ("gather", "blocked", "dense")


def paired(impl: str, **options):
    """A module on ``impl`` and its reference twin with the same weights."""
    module = make(impl=impl, **options)
    return module, module.plain()


def assert_same_function_float64(module, reference, x: torch.Tensor) -> None:
    """``module`` and ``reference`` agree to 1e-10 on ``x``: outputs, input gradients and every parameter's."""
    x = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = module(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    for (name, p), p_ref in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-10, msg=name)


def supports(impl: str, module, x) -> bool:
    try:
        module(x[:1])
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("impl", EAGER_BACKENDS)
@pytest.mark.parametrize("options,size", CASES, ids=[str(i) for i in range(len(CASES))])
def test_backend_equals_reference_float64(impl, options, size):
    module, reference = paired(impl, **options)
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    if not supports(impl, module, x):
        assert impl == "dense" and options.get("soft_routing"), "only soft routing may rule out dense"
        return
    assert_same_function_float64(module, reference, x)


@pytest.mark.parametrize("impl", ("auto", *EAGER_BACKENDS))
@pytest.mark.parametrize("topk", (1, 4, 16))
def test_backend_equals_reference_float32_at_biformer_shapes(impl, topk):
    torch.manual_seed(topk)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=topk, qk_dim=64, side_dwconv=5, impl=impl)
    reference = module.plain()
    x = torch.randn(2, 28, 28, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-5)


def test_impl_is_not_in_the_state_dict():
    fast, reference = paired("gather", n_win=7, topk=4)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert reference.impl == "reference" and fast.impl == "gather"


def test_unknown_impl_lists_the_valid_ones():
    with pytest.raises(ValueError, match="impl must be one of auto, reference, gather, blocked, dense"):
        attentions.create("bra", dim=32, num_heads=4, impl="turbo")


def test_dense_refuses_soft_routing_with_its_reason():
    module = make(n_win=4, topk=6, soft_routing=True, impl="dense")
    with pytest.raises(NotImplementedError, match="dense: soft routing scales keys and values"):
        module(torch.randn(1, 8, 8, 32, dtype=torch.float64))


def routed_inputs(topk: int, soft: bool = False, requires_grad: bool = False) -> bra_kernels.RoutedAttention:
    regions = 49
    return bra_kernels.RoutedAttention(
        q=torch.randn(1, regions, 4, 2, 8, requires_grad=requires_grad), kv=torch.randn(1, regions, 4, 32),
        index=torch.randint(regions, (1, regions, topk)), weight=torch.rand(1, regions, topk) if soft else None,
        scale=0.25)


def test_auto_priority_follows_the_routed_fraction():
    assert bra_kernels.auto_priority(routed_inputs(30)) == ("xformers", "dense", "fused", "gather")
    assert bra_kernels.auto_priority(routed_inputs(16)) == ("xformers", "fused", "dense", "gather")
    assert bra_kernels.auto_priority(routed_inputs(4)) == ("xformers", "fused", "gather")


def test_auto_picks_fused_on_cpu_below_half_the_regions_routed_else_dense_and_gather_for_soft_routing():
    with torch.no_grad():
        assert bra_kernels.choose("auto", routed_inputs(30)).name == "dense"
        assert bra_kernels.choose("auto", routed_inputs(16)).name == "fused"
        assert bra_kernels.choose("auto", routed_inputs(4)).name == "fused"
    # the native kernel has a backward on CPU, but no soft routing
    assert bra_kernels.choose("auto", routed_inputs(16, requires_grad=True)).name == "fused"
    assert bra_kernels.choose("auto", routed_inputs(4, requires_grad=True)).name == "fused"
    assert bra_kernels.choose("auto", routed_inputs(30, requires_grad=True)).name == "dense"
    assert bra_kernels.choose("auto", routed_inputs(16, soft=True)).name == "gather"


@pytest.mark.parametrize("topk,grad,expected", [
    (16, False, "fused"), (4, False, "fused"), (30, False, "dense"), (16, True, "fused"), (4, True, "fused"),
    (30, True, "dense")])
def test_last_backend_names_what_auto_chose(topk, grad, expected):
    module = attentions.create("bra", dim=32, num_heads=2, n_win=7, topk=topk)
    assert module.last_backend is None
    with torch.set_grad_enabled(grad):
        module(torch.randn(1, 14, 14, 32))
    assert module.last_backend == expected
    assert module.plain().last_backend is None
    explicit = attentions.create("bra", dim=32, num_heads=2, n_win=7, topk=topk, impl="blocked")
    explicit(torch.randn(1, 14, 14, 32))
    assert explicit.last_backend == "blocked"


def test_reasons_are_read_from_the_declared_capabilities():
    flex, xformers, dense = (bra_kernels.BACKENDS[name] for name in ("flex", "xformers", "dense"))
    assert torch.float64 not in flex.dtypes and "cpu" not in flex.backward_devices
    assert any("no float64 kernels" in r for r in bra_kernels.not_supported_reasons(flex, "cpu", torch.float64))
    assert any("no backward on cpu" in r for r in bra_kernels.not_supported_reasons(
        flex, "cpu", torch.float32, routed_inputs(4, requires_grad=True)))
    assert any("cuda only, not cpu" in r for r in bra_kernels.not_supported_reasons(xformers, "cpu", torch.float32))
    assert any("soft routing" in r for r in bra_kernels.not_supported_reasons(
        dense, "cpu", torch.float32, routed_inputs(16, soft=True)))
    for name in ("reference", "gather", "blocked"):
        for dtype in bra_kernels.ALL_DTYPES:
            assert bra_kernels.not_supported_reasons(bra_kernels.BACKENDS[name], "cpu", dtype,
                                                     routed_inputs(4, soft=True, requires_grad=True)) == []


@pytest.mark.parametrize("soft", (False, True))
def test_blocked_in_many_small_chunks_equals_reference_float64(monkeypatch, soft):
    """Force chunks of a few region blocks (one chunk boundary inside an image) and check outputs and grads."""
    monkeypatch.setattr(bra_kernels, "BLOCK_BYTES", 3 * 4 * 9 * 64 * 8)  # 3 region blocks per chunk
    options = dict(n_win=4, topk=4, soft_routing=soft, diff_routing=soft)
    module, reference = paired("blocked", **options)
    assert_same_function_float64(module, reference, torch.randn(2, 12, 12, 32, dtype=torch.float64))


def test_xformers_off_cuda_is_unsupported_with_reasons():
    reasons = bra_kernels.device_reasons("xformers", torch.device("cpu"), torch.float32)
    assert any("cuda only" in reason for reason in reasons)
    module = make(n_win=4, topk=3, impl="xformers")
    assert module.not_supported_reasons(torch.device("cpu"), torch.float32) == reasons
    with pytest.raises(NotImplementedError, match="xformers: runs on cuda only, not cpu"):
        module(torch.randn(1, 8, 8, 32, dtype=torch.float64))
    assert make(n_win=4, topk=3).not_supported_reasons(torch.device("cpu"), torch.float64) == []


@pytest.mark.parametrize("batch,regions,tokens,n,topk", [
    (2, 49, 64, 64, 1), (2, 49, 16, 16, 4), (3, 49, 4, 4, 16), (2, 49, 1, 1, 49),  # BiFormer-T stages 1-4
    (2, 16, 9, 4, 3), (1, 25, 49, 49, 2), (2, 9, 100, 30, 5)])  # regions that straddle tiles; n ≠ T
def test_flex_block_mask_from_region_indices_equals_create_block_mask(batch, regions, tokens, n, topk):
    """The block mask made from the routing at region granularity is the one ``create_block_mask`` makes by
    calling the mask_mod at every (query, key) pair: the same partial and full tiles, in any listing order."""
    from torch.nn.attention.flex_attention import create_block_mask

    inputs = bra_kernels.RoutedAttention(
        q=torch.randn(batch, regions, tokens, 1, 8), kv=torch.randn(batch, regions, n, 16),
        index=torch.stack([torch.randperm(regions)[:topk] for _ in range(batch * regions)]).view(batch, regions, topk),
        weight=None, scale=0.5)
    allowed = bra_kernels._block_mask(inputs)

    def routed(b, h, q_index, kv_index):
        return allowed[b, q_index // tokens, kv_index // n]

    ours = bra_kernels._routed_block_mask(inputs, allowed, routed)
    theirs = create_block_mask(routed, batch, None, regions * tokens, regions * n, device="cpu")

    def tiles(count, index):  # (B, Q tiles, KV tiles) bool from a block mask's (count, index) listing
        listed = torch.arange(index.shape[-1]) < count[..., None]
        return torch.zeros(index.shape, dtype=torch.bool).scatter_(-1, index.long(), listed)[:, 0]

    assert ours.shape == theirs.shape
    assert torch.equal(tiles(ours.full_kv_num_blocks, ours.full_kv_indices),
                       tiles(theirs.full_kv_num_blocks, theirs.full_kv_indices))
    assert torch.equal(tiles(ours.kv_num_blocks, ours.kv_indices), tiles(theirs.kv_num_blocks, theirs.kv_indices))
    assert torch.equal(ours.to_dense(), theirs.to_dense())


def test_flex_refuses_backward_on_cpu():
    module = make(n_win=4, topk=3, impl="flex")
    x = torch.randn(1, 8, 8, 32, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="flex: no backward on cpu"):
        module(x)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ("compile", "flex"))
def test_compiled_backends_equal_reference(impl):
    if bra_kernels.device_reasons(impl, torch.device("cpu"), torch.float32):
        pytest.skip("; ".join(bra_kernels.device_reasons(impl, torch.device("cpu"), torch.float32)))
    torch.manual_seed(0)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, impl=impl)
    reference = module.plain()
    x = torch.randn(2, 28, 28, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ("gather", "dense", "flex", "xformers"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_cuda_backends_equal_reference(impl, dtype):
    torch.manual_seed(0)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, impl=impl).cuda().to(dtype)
    reasons = module.not_supported_reasons(torch.device("cuda"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    reference = module.plain().cuda().to(dtype)
    x = torch.randn(2, 28, 28, 64, device="cuda", dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=tolerance)


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return ((value.double() - expected).norm() / expected.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ("auto", "gather", "blocked", "dense", "compile", "flex", "xformers"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("topk", (1, 16))
def test_cuda_backends_match_the_float64_reference_with_grads(monkeypatch, impl, dtype, topk):
    """Each CUDA backend in fp32 / bf16 / fp16 against the reference in float64 on the same weights, input and
    routed regions (the backend's choices imposed: near-ties flip in half precision): ‖out − ref‖ / ‖ref‖ for the
    output, the input's gradient and every parameter's (TF32 off: fp32 is fp32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(topk)
    module = attentions.create("bra", dim=128, num_heads=4, n_win=7, topk=topk, side_dwconv=5, impl=impl).cuda()
    reasons = module.not_supported_reasons(torch.device("cuda"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    reference = module.plain().double()
    module = module.to(dtype)
    x = torch.randn(2, 28, 28, 128, device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    x_fast, x_ref = x.to(dtype).requires_grad_(True), x.clone().requires_grad_(True)
    module.router.recorded_choices = []
    out = module(x_fast)
    reference.router.imposed_choices = module.router.recorded_choices
    expected = reference(x_ref)
    assert not reference.router.imposed_choices, "every recorded choice was used"
    assert reference.router.imposed_shortfall <= (1e-5 if dtype == torch.float32 else 2e-2), "not a near-tie"
    out.backward(grad.to(dtype))
    expected.backward(grad)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(out, expected) < bound
    assert relative_error(x_fast.grad, x_ref.grad) < bound
    for (name, p), p_ref in zip(module.named_parameters(), reference.parameters(), strict=True):
        assert relative_error(p.grad, p_ref.grad) < bound, name


@pytest.mark.parametrize("impl", ("auto", "gather"))
def test_batch_in_groups_equals_one_piece_float64(monkeypatch, impl):
    """A batch run in groups of images (BATCH_CHUNK_BYTES) is the same function, outputs and grads."""
    from attentions import bra, by_image

    module, reference = paired(impl, n_win=4, topk=3, auto_pad=True)
    monkeypatch.setattr(bra, "BATCH_CHUNK_BYTES", 2 * 12 * 12 * 96 * 8)  # two images per group, three groups
    monkeypatch.setattr(by_image, "GROUP_MAX_THREADS", 1024)  # groups at any thread count
    assert_same_function_float64(module, reference, torch.randn(5, 10, 11, 32, dtype=torch.float64))


def test_the_native_kernel_builds_wherever_a_compiler_is_on_path():
    """tests/test_bra_native.py skips when the kernel cannot build; where a compiler exists, it must build."""
    from attentions import bra_native

    if bra_native._compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    assert bra_native.build_reasons() == ()
    assert bra_kernels.device_reasons("fused", torch.device("cpu"), torch.float32) == []
