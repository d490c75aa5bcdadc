"""The native CPU kernel of BRA (attentions/csrc/bra_routed.cpp via attentions/bra_native.py) and the ``fused``
backend built on it, each against a plain computation on random inputs: float64 to 1e-10, float32 to 1e-5."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attentions
from attentions import bra_kernels, bra_native

pytestmark = pytest.mark.skipif(bool(bra_native.build_reasons()), reason="; ".join(bra_native.build_reasons()))
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def plain_routed_attention(q, k, v, query_rows, key_rows, index, heads, scale):
    """A loop over images, regions and heads with explicit gathers: q (B, rows, heads·dq), k/v (B, rows, heads·d)."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    dq, dv = q.shape[2] // heads, v.shape[2] // heads
    for b in range(q.shape[0]):
        for r in range(query_rows.shape[0]):
            keys = key_rows[index[b, r]].reshape(-1)  # the rows of the routed regions' tokens, in routed order
            for h in range(heads):
                queries = q[b, query_rows[r], h * dq:(h + 1) * dq]
                logits = scale * queries @ k[b, keys, h * dq:(h + 1) * dq].T
                out[b, query_rows[r], h * dv:(h + 1) * dv] = logits.softmax(-1) @ v[b, keys, h * dv:(h + 1) * dv]
    return out


def random_routing(batch: int, regions: int, topk: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)]).view(
        batch, regions, topk)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("regions,tokens,kv_tokens,topk,heads,dq,dv", [
    (49, 64, 64, 1, 2, 32, 32), (49, 16, 16, 4, 4, 32, 32), (49, 4, 4, 16, 8, 32, 32), (49, 1, 1, 49, 16, 32, 32),
    (9, 25, 4, 3, 3, 5, 7),  # head widths below a vector, key regions down-sampled to 4 tokens
    (4, 36, 36, 2, 1, 40, 24),  # 36 query tokens: two and a quarter vectors of lanes
    (16, 17, 17, 5, 2, 16, 48),
    # few queries: (query, head) pairs share the lanes, tiles of two heads or more, ragged head widths
    (12, 3, 3, 4, 6, 8, 20), (25, 1, 1, 5, 2, 16, 16), (16, 4, 2, 7, 12, 32, 32), (9, 1, 1, 3, 4, 8, 20)])
def test_routed_attention_equals_a_plain_loop(dtype, regions, tokens, kv_tokens, topk, heads, dq, dv):
    generator = torch.Generator().manual_seed(regions * tokens + topk)
    batch = 2
    # q, k and v as views into one projection, rows in a shuffled order (what a raster layout looks like)
    projection = torch.randn(batch, regions * tokens, heads * (2 * dq + dv) + 3, dtype=dtype, generator=generator)
    q = projection[..., :heads * dq]
    k, v = projection[..., heads * dq:2 * heads * dq], projection[..., 2 * heads * dq:2 * heads * dq + heads * dv]
    k, v = k[:, :regions * kv_tokens], v[:, :regions * kv_tokens]
    query_rows = torch.randperm(regions * tokens, generator=generator).view(regions, tokens)
    key_rows = torch.randperm(regions * kv_tokens, generator=generator).view(regions, kv_tokens)
    index = random_routing(batch, regions, topk, generator)
    scale = 0.3
    out = torch.full((batch, regions * tokens, heads * dv), float("nan"), dtype=dtype)
    bra_native.routed_attention(q, k, v, out, query_rows, key_rows, index, heads, scale, threads=1)
    expected = plain_routed_attention(q, k, v, query_rows, key_rows, index, heads, scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE[dtype])
    threaded = torch.empty_like(out)
    bra_native.routed_attention(q, k, v, threaded, query_rows, key_rows, index, heads, scale, threads=3)
    assert torch.equal(threaded, out)  # threads split (image, region) pairs: the same arithmetic, bit for bit


def test_routed_attention_softmax_is_stable_for_large_logits():
    """Logits in the hundreds (exp would overflow without the max subtracted) and far below the max."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 16, generator=generator) * 30
    k = torch.randn(1, 32, 16, generator=generator) * 30
    v = torch.randn(1, 32, 16, generator=generator)
    rows = torch.arange(32).view(2, 16)
    index = torch.tensor([[[0, 1], [1, 0]]])
    out = torch.empty(1, 32, 16)
    bra_native.routed_attention(q, k, v, out, rows, rows, index, 1, 1.0, threads=1)
    expected = plain_routed_attention(q.double(), k.double(), v.double(), rows, rows, index, 1, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("height,width,channels,side", [(56, 56, 64, 5), (7, 9, 20, 3), (13, 6, 33, 7), (5, 3, 8, 5)])
def test_local_context_add_equals_a_depthwise_conv(dtype, height, width, channels, side):
    generator = torch.Generator().manual_seed(height * width + side)
    conv = torch.nn.Conv2d(channels, channels, side, padding=side // 2, groups=channels).to(dtype)
    projection = torch.randn(2, height, width, channels + 5, dtype=dtype, generator=generator)
    v_map = projection[..., 5:]  # a channel slice: rows at a stride wider than the channels
    start = torch.randn(2, height, width, channels, dtype=dtype, generator=generator)
    out = start.clone()
    bra_native.local_context_add(v_map, conv.weight.detach(), conv.bias.detach(), out, threads=2)
    with torch.no_grad():
        expected = start + conv(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("height,width,channels,side", [(56, 56, 64, 5), (7, 9, 20, 3), (13, 6, 33, 7), (5, 3, 8, 5)])
def test_local_context_backward_equals_the_depthwise_convs_gradients(dtype, height, width, channels, side):
    generator = torch.Generator().manual_seed(height * width + side + 1)
    conv = torch.nn.Conv2d(channels, channels, side, padding=side // 2, groups=channels).to(dtype)
    projection = torch.randn(3, height, width, channels + 5, dtype=dtype, generator=generator)
    v_map = projection[..., 5:]
    grad_out = torch.randn(3, height, width, channels, dtype=dtype, generator=generator)
    start = torch.randn(3, height, width, channels, dtype=dtype, generator=generator)
    grad_v = start.clone()
    grad_weight, grad_bias = bra_native.local_context_backward(grad_out, v_map, conv.weight, grad_v, threads=2)
    leaf = v_map.clone().requires_grad_()
    expected = torch.autograd.grad(conv(leaf.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), (leaf, conv.weight, conv.bias),
                                   grad_out)
    scale = height * width * 3  # the parameter gradients sum over every pixel of the batch
    torch.testing.assert_close(grad_v, start + expected[0], rtol=0, atol=TOLERANCE[dtype])
    torch.testing.assert_close(grad_weight, expected[1], rtol=0, atol=TOLERANCE[dtype] * scale)
    torch.testing.assert_close(grad_bias, expected[2], rtol=0, atol=TOLERANCE[dtype] * scale)
    one_thread = bra_native.local_context_backward(grad_out, v_map, conv.weight, start.clone(), threads=1)
    torch.testing.assert_close(one_thread[0], grad_weight, rtol=0, atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_region_means_equal_torch_means(dtype):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 36, 21, dtype=dtype, generator=generator)[..., 1:]  # 20 channels at a stride of 21
    rows = torch.randperm(36, generator=generator).view(4, 9)
    expected = torch.stack([x[:, region].mean(dim=1) for region in rows], dim=1)
    torch.testing.assert_close(bra_native.region_means(x, rows, threads=2), expected, rtol=0,
                               atol=TOLERANCE[dtype])


def test_out_of_range_routing_is_refused_before_the_kernel_reads():
    q, out = torch.randn(1, 8, 4), torch.empty(1, 8, 4)
    rows = torch.arange(8).view(2, 4)
    with pytest.raises(ValueError, match="index has entries outside"):
        bra_native.routed_attention(q, q, q, out, rows, rows, torch.tensor([[[0], [2]]]), 1, 1.0, threads=1)
    with pytest.raises(ValueError, match="key_rows has entries outside"):
        bra_native.routed_attention(q, q, q, out, rows, rows + 1, torch.tensor([[[0], [1]]]), 1, 1.0, threads=1)


def test_bad_operands_are_refused_before_the_kernel_reads():
    q, out = torch.randn(2, 8, 4), torch.empty(2, 8, 4)
    rows, index = torch.arange(8).view(2, 4), torch.tensor([[[0], [1]], [[1], [0]]])
    with pytest.raises(ValueError, match="do not fit"):  # k of another batch
        bra_native.routed_attention(q, q[:1], q, out, rows, rows, index, 1, 1.0, threads=1)
    with pytest.raises(ValueError, match="do not fit"):  # out narrower than v
        bra_native.routed_attention(q, q, q, out[..., :2], rows, rows, index, 1, 1.0, threads=1)
    with pytest.raises(ValueError, match="at least one query, one key"):
        bra_native.routed_attention(q, q, q, out, rows, rows, index[..., :0], 1, 1.0, threads=1)
    with pytest.raises(ValueError, match="k: expected a float32 CPU tensor, got float64"):
        bra_native.routed_attention(q, q.double(), q, out, rows, rows, index, 1, 1.0, threads=1)
    # a non-contiguous int32 table is copied to int64 and kept alive through the call
    strided = torch.arange(16, dtype=torch.int32).view(2, 8)[:, ::2] // 2
    expected = torch.stack([q[:, region.long()].mean(dim=1) for region in strided], dim=1)
    torch.testing.assert_close(bra_native.region_means(q, strided, threads=1), expected)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    v_map, out_map = torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 3, 4)
    with pytest.raises(ValueError, match="out_map"):
        bra_native.local_context_add(v_map, conv.weight, conv.bias, out_map[:1], threads=1)
    with pytest.raises(ValueError, match="weight: expected a float64 CPU tensor"):
        bra_native.local_context_add(v_map.double(), conv.weight, None, out_map.double(), threads=1)
    even = torch.nn.Conv2d(4, 4, 4, groups=4)
    with pytest.raises(ValueError, match="K odd"):
        bra_native.local_context_add(v_map, even.weight, even.bias, out_map, threads=1)


def test_operands_with_a_strided_channel_dimension_are_refused():
    x = torch.randn(1, 4, 8)[..., ::2]
    with pytest.raises(ValueError, match="x: expected .* contiguous width"):
        bra_native.region_means(x, torch.arange(4).view(1, 4), threads=1)


# BiFormer-T's stages at 224² (dim, heads, map side, top-k), and odd sizes with auto_pad
LAYERS = [(64, 2, 56, 1), (128, 4, 28, 4), (256, 8, 14, 16), (512, 16, 7, 49), (40, 2, 13, 3), (96, 3, 10, 5)]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("dim,heads,side,topk", LAYERS)
def test_fused_layer_equals_the_reference(dtype, dim, heads, side, topk):
    torch.manual_seed(dim + side)
    module = attentions.create("bra", dim=dim, num_heads=heads, n_win=7 if side % 7 == 0 else 4, topk=topk,
                               side_dwconv=5, auto_pad=True, impl="fused").to(dtype).eval()
    reference = module.plain()
    x = torch.randn(2, side, side, dim, dtype=dtype)
    with torch.no_grad():
        out = module(x)
        expected = reference(x)
    assert module.last_backend == "fused"
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("options", [
    dict(kv_downsample_mode="avgpool", kv_downsample_ratio=2),  # keys of 2 × 2 pooled tokens: the region-major path
    dict(side_dwconv=0, param_attention="qkv"),  # no LCE, no output projection
    dict(qk_dim=48)])  # queries and keys narrower than the values
def test_fused_backend_equals_the_reference_in_other_configurations(options):
    torch.manual_seed(3)
    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3, impl="fused", **options).double().eval()
    reference = module.plain()
    x = torch.randn(2, 16, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-10)


def test_fused_on_worker_threads_equals_the_reference():
    """Inference on 2 intra-op threads splits the batch over attentions/by_image.py's workers, each calling the kernel
    with one native thread."""
    torch.manual_seed(4)
    module = attentions.create("bra", dim=64, num_heads=2, n_win=7, topk=4, side_dwconv=5).double().eval()
    reference = module.plain()
    x = torch.randn(5, 28, 28, 64, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = module(x)
    finally:
        torch.set_num_threads(threads)
    assert module.last_backend == "fused"
    torch.testing.assert_close(out, reference(x).detach(), rtol=0, atol=1e-10)


def test_fused_declares_no_soft_routing():
    soft = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3, soft_routing=True, diff_routing=True,
                             impl="fused").eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="fused: soft routing .* this kernel does not do"):
        soft(torch.randn(1, 8, 8, 32))
    assert bra_kernels.device_reasons("fused", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("regions,tokens,kv_tokens,topk,heads,dq,dv", [
    # BiFormer-T's stages 1-4
    (49, 64, 64, 1, 2, 32, 32), (49, 16, 16, 4, 4, 32, 32), (49, 4, 4, 16, 8, 32, 32), (49, 1, 1, 49, 16, 32, 32),
    (9, 25, 4, 3, 3, 5, 7),  # head widths below a vector, routed keys (12) below a vector, pooled key regions
    (4, 36, 36, 2, 1, 40, 24), (16, 17, 17, 5, 2, 16, 48), (12, 3, 3, 4, 6, 8, 20)])
def test_routed_attention_backward_equals_the_plain_loops_gradient(dtype, regions, tokens, kv_tokens, topk, heads,
                                                                   dq, dv):
    generator = torch.Generator().manual_seed(regions * tokens + topk + 1)
    batch = 2
    # q, k and v as views into one projection (rows at a stride wider than their channels), as attend() passes them
    projection = torch.randn(batch, regions * tokens, heads * (2 * dq + dv) + 3, dtype=dtype, generator=generator)
    q = projection[..., :heads * dq]
    k = projection[:, :regions * kv_tokens, heads * dq:2 * heads * dq]
    v = projection[:, :regions * kv_tokens, 2 * heads * dq:2 * heads * dq + heads * dv]
    grad_out = torch.randn(batch, regions * tokens, heads * dv, dtype=dtype, generator=generator)
    query_rows = torch.randperm(regions * tokens, generator=generator).view(regions, tokens)
    key_rows = torch.randperm(regions * kv_tokens, generator=generator).view(regions, kv_tokens)
    index = random_routing(batch, regions, topk, generator)
    if topk > 1:
        index[0, 0, -1] = index[0, 0, 0]  # a region routed twice: its keys' gradients are summed over both
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(plain_routed_attention(*leaves, query_rows, key_rows, index, heads, 0.3), leaves,
                                   grad_out)
    # the gradients as views into one buffer with padding columns, as attend() hands them over
    buffer = torch.full((batch, max(q.shape[1], k.shape[1]), heads * (2 * dq + dv) + 3), float("nan"), dtype=dtype)
    grads = (buffer[:, :q.shape[1], :heads * dq], buffer[:, :k.shape[1], heads * dq:2 * heads * dq],
             buffer[:, :k.shape[1], 2 * heads * dq:2 * heads * dq + heads * dv])
    bra_native.routed_attention_backward(q, k, v, grad_out, *grads, query_rows, key_rows, index, heads, 0.3, threads=1)
    for grad, plain in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, plain, rtol=0, atol=10 * TOLERANCE[dtype])
    threaded = [torch.empty_like(t) for t in (q, k, v)]
    bra_native.routed_attention_backward(q, k, v, grad_out, *threaded, query_rows, key_rows, index, heads, 0.3,
                                         threads=3)
    for grad, again in zip(grads, threaded, strict=True):  # threads split (image, head) pairs: the same arithmetic, bit for bit
        assert torch.equal(grad, again)


def test_attend_passes_gradcheck():
    """torch.autograd.gradcheck (finite differences, float64) of the differentiable wrapper: one Q|K|V source with the
    LCE, and separate sources with down-sampled key regions."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randperm(16, generator=generator).view(4, 4)
    layout = bra_native.RoutedLayout(rows, rows, random_routing(2, 4, 2, generator), heads=2, qk_dim=4, value_dim=6,
                                     scale=0.7, map_size=(4, 4))
    source = torch.randn(2, 16, 14, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w, b: bra_native.attend(s, s, layout, w, b), (source, weight, bias))
    pooled = bra_native.RoutedLayout(rows, torch.arange(8).view(4, 2), random_routing(2, 4, 3, generator), heads=2,
                                     qk_dim=4, value_dim=6, scale=0.7)
    q = torch.randn(2, 16, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    kv = torch.randn(2, 8, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bra_native.attend(a, b, pooled), (q, kv))


def test_attend_takes_an_output_gradient_of_any_layout():
    """An output gradient whose channels are not contiguous (here: out used transposed) gives the same gradients."""
    generator = torch.Generator().manual_seed(6)
    rows = torch.arange(32).view(4, 8)
    layout = bra_native.RoutedLayout(rows, rows, random_routing(2, 4, 2, generator), heads=2, qk_dim=8, value_dim=8,
                                     scale=0.5)
    source = torch.randn(2, 32, 24, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 8, 32, dtype=torch.float64, generator=generator)
    leaves = [source.clone().requires_grad_(), source.clone().requires_grad_()]
    (bra_native.attend(leaves[0], leaves[0], layout).transpose(1, 2) * weight).sum().backward()
    q, k, v = layout.split(leaves[1], leaves[1])
    plain = plain_routed_attention(q, k, v, rows, rows, layout.index, 2, 0.5)
    (plain.transpose(1, 2) * weight).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=0, atol=1e-10)


def test_backward_refuses_tables_that_miss_rows_and_misshapen_gradients():
    q = k = v = torch.randn(1, 8, 4)
    index = torch.zeros(1, 2, 1, dtype=torch.int64)
    rows = torch.arange(8).view(2, 4)
    grads = [torch.empty(1, 8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="must list every row of q and of k once"):
        bra_native.routed_attention_backward(q, k, v, q, *grads, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), rows,
                                             index, 1, 1.0, threads=1)
    with pytest.raises(ValueError, match="grad_k has shape"):
        bra_native.routed_attention_backward(q, k, v, q, grads[0], torch.empty(1, 8, 2), grads[2], rows, rows, index,
                                             1, 1.0, threads=1)
    with pytest.raises(ValueError, match="attend: q_source .* must end in"):
        bra_native.attend(q, torch.randn(1, 8, 9), bra_native.RoutedLayout(rows, rows, index, 1, 4, 4, 1.0))
    with pytest.raises(ValueError, match="needs both its weight and layout.map_size"):
        bra_native.attend(q, torch.randn(1, 8, 8), bra_native.RoutedLayout(rows, rows, index, 1, 4, 4, 1.0),
                          torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="and a bias only with a weight"):
        bra_native.attend(q, torch.randn(1, 8, 8), bra_native.RoutedLayout(rows, rows, index, 1, 4, 4, 1.0), None,
                          torch.randn(4))


def test_written_operands_must_not_overlap_themselves_or_what_is_read():
    """Rows written by several threads at once (a broadcast gradient) or an output inside an input would race or read
    what was just written: refused before the kernel runs."""
    q = k = v = torch.randn(2, 8, 4)
    index = torch.zeros(2, 2, 1, dtype=torch.int64)
    rows = torch.arange(8).view(2, 4)
    grads = [torch.empty(2, 8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="grad_k: a written operand needs rows and images that do not overlap"):
        bra_native.routed_attention_backward(q, k, v, q, grads[0], torch.empty(1, 1, 4).expand(2, 8, 4), grads[2],
                                             rows, rows, index, 1, 1.0, threads=2)
    with pytest.raises(ValueError, match="grad_q: a written operand must not share memory"):
        bra_native.routed_attention_backward(q, k, v, q.clone(), q, grads[1], grads[2], rows, rows, index, 1, 1.0,
                                             threads=2)
    with pytest.raises(ValueError, match="out: a written operand must not share memory"):
        bra_native.routed_attention(q, k, v, v, rows, rows, index, 1, 1.0, threads=2)
    v_map = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="grad_v_map: a written operand must not share memory"):
        bra_native.local_context_backward(v_map.clone(), v_map, torch.randn(8, 1, 3, 3), v_map, threads=1)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("options,side", [
    (dict(dim=64, num_heads=2, n_win=7, topk=4), 28),  # the raster path: Q|K|V's gradient as one tensor, with LCE
    (dict(dim=40, num_heads=2, n_win=4, topk=3, side_dwconv=5, auto_pad=True), 13),
    (dict(dim=32, num_heads=2, n_win=4, topk=3, kv_downsample_mode="avgpool", kv_downsample_ratio=2), 16),
    (dict(dim=32, num_heads=4, n_win=2, topk=4, side_dwconv=0, param_attention="qkv", qk_dim=16), 8)])
def test_fused_training_gradients_equal_the_reference(dtype, options, side):
    """A training forward and backward of the layer on ``fused``: the output and the gradients of the input and of
    every parameter equal those of the official computation (``reference``)."""
    torch.manual_seed(side)
    module = attentions.create("bra", impl="fused", **options).to(dtype).train()
    reference = module.plain()
    x = torch.randn(2, side, side, options["dim"], dtype=dtype)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [module(inputs[0]), reference(inputs[1])]
    assert module.last_backend == "fused"
    grad_out = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad_out)
    tolerance = 10 * TOLERANCE[dtype]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=tolerance)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=0, atol=tolerance)
    for (name, ours), (_, theirs) in zip(module.named_parameters(), reference.named_parameters(), strict=True):
        assert ours.grad is not None and ours.grad.abs().sum() > 0, name
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=tolerance * max(1.0, theirs.grad.abs().max()),
                                   msg=name)


def test_a_flop_counter_sees_the_work_because_auto_steps_off_the_native_kernel():
    """ATen does not see a native kernel: under a dispatch mode (FLOP counting, memory tracking) ``auto`` takes
    the next backend, and an explicit ``fused`` refuses with the reason."""
    from attnbench.measure.flops import count_flops

    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3).eval()
    x = torch.randn(1, 8, 8, 32)
    with torch.no_grad():
        counted = count_flops(lambda: module(x))
    assert module.last_backend == "gather"
    assert counted.macs == module.macs(8, 8).total
    module.impl = "fused"
    with torch.no_grad(), FlopCounterMode(display=False), pytest.raises(NotImplementedError, match="invisible to"):
        module(x)


def test_auto_steps_off_the_native_kernel_under_autocast_and_forward_ad():
    import torch.autograd.forward_ad as forward_ad

    module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3).eval()
    x = torch.randn(1, 8, 8, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert module(x).dtype == torch.bfloat16 and module.last_backend == "gather"
    module.impl = "fused"
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), pytest.raises(NotImplementedError,
                                                                              match="fused: .* not under autocast"):
        module(x)
    with torch.no_grad(), forward_ad.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD"):
        module(forward_ad.make_dual(x, torch.randn_like(x)))


def test_a_failed_build_is_tried_once_and_a_corrupt_cached_library_is_built_again(monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    failing = tmp_path / "failing-cxx"
    failing.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(failing))
    bra_native._built.cache_clear()
    try:
        module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3).eval()
        with torch.no_grad():
            for _ in range(3):
                module(torch.randn(1, 8, 8, 32))
        assert bra_native.build_reasons() and module.last_backend == "gather"
        assert len(calls.read_text().split()) == 2  # --version and one build, not one per forward
        # a truncated file left in the cache by another process (never one this process has loaded)
        monkeypatch.delenv("CXX")
        library_file = bra_native._target(bra_native._compiler())
        library_file.parent.mkdir(parents=True, exist_ok=True)
        library_file.write_bytes(b"not a shared object")
        bra_native._built.cache_clear()
        assert bra_native.build_reasons() == () and library_file.stat().st_size > 1000
    finally:
        bra_native._built.cache_clear()


@pytest.mark.parametrize("compiler", ("missing", "false"))
def test_a_failed_build_is_a_reason_and_auto_falls_back(monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler") if compiler == "missing" else "false")
    bra_native._built.cache_clear()
    try:
        reasons = bra_native.build_reasons()
        assert len(reasons) == 1 and ("no-such-compiler" in reasons[0] or "false failed on bra_routed.cpp" in reasons[0])
        module = attentions.create("bra", dim=32, num_heads=2, n_win=4, topk=3).eval()
        with torch.no_grad():
            module(torch.randn(1, 8, 8, 32))
        assert module.last_backend == "gather"
        module.impl = "fused"
        with torch.no_grad(), pytest.raises(NotImplementedError, match="fused: the native kernel is not usable here"):
            module(torch.randn(1, 8, 8, 32))
        assert not list(tmp_path.glob("*.so"))
    finally:
        bra_native._built.cache_clear()
