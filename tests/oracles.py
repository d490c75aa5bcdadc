"""Plain float64 references, written from the papers' definitions with explicit masks and loops.

They share no code with ``attentions/``: each builds the attention pattern the slow, obvious way so that
the mechanisms' reshapes, gathers and paddings are checked against something independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, num_heads: int) -> torch.Tensor:
    """Dense multi-head attention. q (B, Nq, Cqk), k (B, Nk, Cqk), v (B, Nk, Cv), mask (B, Nq, Nk) of
    allowed pairs or None -> (B, Nq, Cv), heads split along channels in order."""
    batch, n_q, _ = q.shape
    qh = q.reshape(batch, n_q, num_heads, -1).transpose(1, 2)
    kh = k.reshape(batch, k.shape[1], num_heads, -1).transpose(1, 2)
    vh = v.reshape(batch, v.shape[1], num_heads, -1).transpose(1, 2)
    scores = torch.einsum("bhqd,bhkd->bhqk", qh * scale, kh)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), vh)
    return out.transpose(1, 2).reshape(batch, n_q, -1)


def depthwise(conv: torch.nn.Conv2d, x_nhwc: torch.Tensor) -> torch.Tensor:
    """A depthwise conv applied to (B, H, W, C) with the module's weights, via F.conv2d."""
    out = F.conv2d(x_nhwc.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding,
                   groups=conv.groups)
    return out.permute(0, 2, 3, 1)


def full_attention(module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Global MHSA of ``attentions.full.FullAttention`` from its weights: einsum softmax, no mask."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    q, k, v = F.linear(tokens, module.qkv.weight, module.qkv.bias).split(channels, dim=-1)
    out = masked_attention(q, k, v, None, scale, module.num_heads).reshape(x.shape)
    if module.side_dwconv > 0:
        out = out + depthwise(module.lepe, x)
    return F.linear(out, module.proj.weight, module.proj.bias)


def _pool_region(patch: torch.Tensor, module) -> torch.Tensor:
    """Key/value tokens of one region (B, h, w, D) after BRA's kv down-sampling -> (B, n_kv, D)."""
    mode = module.kv_downsample_mode
    nchw = patch.permute(0, 3, 1, 2)
    if mode in ("avgpool", "maxpool") and module.kv_downsample_ratio > 1:
        pool = F.avg_pool2d if mode == "avgpool" else F.max_pool2d
        nchw = pool(nchw, module.kv_downsample_ratio)
    elif mode in ("ada_avgpool", "ada_maxpool"):
        pool = F.adaptive_avg_pool2d if mode == "ada_avgpool" else F.adaptive_max_pool2d
        nchw = pool(nchw, module.kv_per_win)
    return nchw.flatten(2).transpose(1, 2)


def bra(module, x: torch.Tensor) -> torch.Tensor:
    """BRA from its definition. Without soft routing: dense attention over all (down-sampled) key tokens
    with a boolean mask built by loops (a query in region i may see exactly the tokens of the top-k regions
    of i). With soft routing: a loop over query regions, keys and values of routed region j scaled by its
    routing weight. The softmax scale is qk_dim ** -0.5, as in the official code."""
    batch, height_in, width_in, channels = x.shape
    s, qk = module.n_win, module.qk_dim
    scale = qk**-0.5
    pad_h, pad_w = (-height_in) % s, (-width_in) % s
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    height, width = height_in + pad_h, width_in + pad_w
    rh, rw = height // s, width // s
    qkv = F.linear(x, module.qkv.qkv.weight, module.qkv.qkv.bias)
    q, k, v = qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:]

    def region(t, r):
        j, i = divmod(r, s)
        return t[:, j * rh:(j + 1) * rh, i * rw:(i + 1) * rw]

    regions = range(s * s)
    region_q = torch.stack([region(q, r).mean(dim=(1, 2)) for r in regions], 1)
    region_k = torch.stack([region(k, r).mean(dim=(1, 2)) for r in regions], 1)
    emb = module.router.emb
    if isinstance(emb, torch.nn.Linear):
        region_q, region_k = F.linear(region_q, emb.weight, emb.bias), F.linear(region_k, emb.weight, emb.bias)
    affinity = torch.einsum("brc,bsc->brs", region_q * scale, region_k)
    top_affinity, top_index = affinity.topk(module.topk, dim=-1)
    weight = top_affinity.softmax(-1)

    kv_per_region = [_pool_region(region(qkv[..., qk:], r), module) for r in regions]
    queries = q.reshape(batch, height * width, qk)
    if not module.soft_routing:
        keys_values = torch.cat(kv_per_region, 1)
        n_kv = kv_per_region[0].shape[1]
        key_region = [r for r in regions for _ in range(n_kv)]
        mask = torch.zeros(batch, height * width, len(key_region), dtype=torch.bool)
        for b in range(batch):
            for y in range(height):
                for x_ in range(width):
                    query_region = (y // rh) * s + x_ // rw
                    allowed = set(top_index[b, query_region].tolist())
                    for key, r in enumerate(key_region):
                        mask[b, y * width + x_, key] = r in allowed
        out = masked_attention(queries, keys_values[..., :qk], keys_values[..., qk:], mask, scale,
                               module.num_heads)
        out = out.reshape(batch, height, width, channels)
    else:
        out = torch.zeros(batch, height, width, channels, dtype=x.dtype)
        for b in range(batch):
            for r in regions:
                routed = [weight[b, r, n] * kv_per_region[int(j)][b] for n, j in enumerate(top_index[b, r])]
                routed = torch.cat(routed, 0)[None]
                region_queries = region(q, r)[b:b + 1].reshape(1, rh * rw, qk)
                o = masked_attention(region_queries, routed[..., :qk], routed[..., qk:], None, scale,
                                     module.num_heads)
                j, i = divmod(r, s)
                out[b, j * rh:(j + 1) * rh, i * rw:(i + 1) * rw] = o.reshape(rh, rw, channels)
    if module.side_dwconv > 0:
        out = out + depthwise(module.lepe, v)
    if isinstance(module.wo, torch.nn.Linear):
        out = F.linear(out, module.wo.weight, module.wo.bias)
    return out[:, :height_in, :width_in]
