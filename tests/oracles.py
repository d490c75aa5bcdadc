"""Plain float64 references, written from the papers' definitions with explicit masks and loops.

They share no code with ``attentions/``: each builds the attention pattern the slow, obvious way so that
the mechanisms' reshapes, gathers and paddings are checked against something independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, num_heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense multi-head attention. q (B, Nq, Cqk), k (B, Nk, Cqk), v (B, Nk, Cv), mask (B or 1, Nq, Nk) of
    allowed pairs or None, bias (heads, Nq, Nk) added to the scores or None -> (B, Nq, Cv), heads split
    along channels in order."""
    batch, n_q, _ = q.shape
    qh = q.reshape(batch, n_q, num_heads, -1).transpose(1, 2)
    kh = k.reshape(batch, k.shape[1], num_heads, -1).transpose(1, 2)
    vh = v.reshape(batch, v.shape[1], num_heads, -1).transpose(1, 2)
    scores = torch.einsum("bhqd,bhkd->bhqk", qh * scale, kh)
    if bias is not None:
        scores = scores + bias
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


def _pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, width - x.shape[2], 0, height - x.shape[1]))


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swin_allowed(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(H·W, H·W) boolean mask of a rolled, padded map: token p may see token q iff they share a window and,
    when shifted, one of the 3 × 3 sub-regions the Swin paper cuts at size - M and size - s."""

    def sub_region(i: int, size: int) -> int:
        return 0 if i < size - window else (1 if i < size - shift else 2)

    positions = [(i, j) for i in range(height) for j in range(width)]
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for query, (qi, qj) in enumerate(positions):
        for key, (ki, kj) in enumerate(positions):
            same_window = (qi // window, qj // window) == (ki // window, kj // window)
            same_region = not shift or (
                (sub_region(qi, height), sub_region(qj, width)) == (sub_region(ki, height), sub_region(kj, width))
            )
            mask[query, key] = same_window and same_region
    return mask


def swin(module, x: torch.Tensor) -> torch.Tensor:
    """Swin W-MSA / SW-MSA: roll by -s, zero-pad, dense attention under ``swin_allowed`` with the relative
    position bias looked up pair by pair."""
    batch, height, width, channels = x.shape
    m, s = module.window_size, module.shift_size
    x = torch.roll(x, (-s, -s), (1, 2))
    hp, wp = _ceil_to(height, m), _ceil_to(width, m)
    x = _pad(x, hp, wp)
    mask = swin_allowed(hp, wp, m, s)
    bias = torch.zeros(module.num_heads, hp * wp, hp * wp, dtype=x.dtype)
    table = module.relative_position_bias_table
    positions = [(i, j) for i in range(hp) for j in range(wp)]
    for query, (qi, qj) in enumerate(positions):
        for key, (ki, kj) in enumerate(positions):
            if (qi // m, qj // m) == (ki // m, kj // m):
                bias[:, query, key] = table[(qi - ki + m - 1) * (2 * m - 1) + (qj - kj + m - 1)]
    tokens = x.reshape(batch, hp * wp, channels)
    q, k, v = F.linear(tokens, module.qkv.weight, module.qkv.bias).split(channels, dim=-1)
    out = masked_attention(q, k, v, mask[None], module.scale, module.num_heads, bias)
    out = F.linear(out, module.proj.weight, module.proj.bias).reshape(batch, hp, wp, channels)
    return torch.roll(out[:, :height, :width], (s, s), (1, 2))


def axial(module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Axial attention with boolean masks; parallel: the first half of the heads within their column (as CSWin's
    split-1 branch 0), the second within their row; sequential: column, then row."""
    batch, height, width, channels = x.shape
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    same_row = (rows[:, None] == rows[None, :])[None]
    same_col = (cols[:, None] == cols[None, :])[None]

    def qkv(linear, tokens):
        return F.linear(tokens, linear.weight, linear.bias).split(channels, dim=-1)

    tokens = x.reshape(batch, height * width, channels)
    if module.composition == "parallel":
        q, k, v = qkv(module.qkv, tokens)
        half, heads = channels // 2, module.num_heads // 2
        out = torch.cat([
            masked_attention(q[..., :half], k[..., :half], v[..., :half], same_col, scale, heads),
            masked_attention(q[..., half:], k[..., half:], v[..., half:], same_row, scale, heads),
        ], dim=-1)
    else:
        out = masked_attention(*qkv(module.qkv_column, tokens), same_col, scale, module.num_heads)
        out = masked_attention(*qkv(module.qkv_row, out), same_row, scale, module.num_heads)
    return F.linear(out, module.proj.weight, module.proj.bias).reshape(x.shape)


def _place(x: torch.Tensor, height: int, width: int, top: int, left: int) -> torch.Tensor:
    """(B, h, w, C) written into a zero (B, height, width, C) grid with its top-left corner at (top, left)."""
    grid = torch.zeros(x.shape[0], height, width, x.shape[3], dtype=x.dtype)
    grid[:, top:top + x.shape[1], left:left + x.shape[2]] = x
    return grid


def cswin(module, x: torch.Tensor) -> torch.Tensor:
    """CSWin with boolean masks over each branch's padded grid (same vertical stripe for branch 0, same
    horizontal stripe for branch 1) and LePE computed stripe by stripe with F.conv2d on each stripe alone.
    Padding is the official segmentation backbone's: q, k, v of the unpadded map placed into a zero grid
    padded along the branch's striped axis only, ⌊pad/2⌋ before; padded keys are not masked."""
    batch, height, width, channels = x.shape
    sw = module.split_size
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).split(channels, dim=-1)
    if module.last_stage:
        branches = [(slice(0, channels), None)]
    else:
        half = channels // 2
        branches = [(slice(0, half), "vertical"), (slice(half, channels), "horizontal")]
    outputs = []
    for index, (channel_slice, stripes) in enumerate(branches):
        pad_h = _ceil_to(height, sw) - height if stripes == "horizontal" else 0
        pad_w = _ceil_to(width, sw) - width if stripes == "vertical" else 0
        top, left = pad_h // 2, pad_w // 2
        hp, wp = height + pad_h, width + pad_w
        qb, kb, vb = (_place(t[..., channel_slice], hp, wp, top, left) for t in (q, k, v))
        rows = torch.arange(hp).repeat_interleave(wp)
        cols = torch.arange(wp).repeat(hp)
        if stripes is None:
            mask, stripe_h, stripe_w = torch.ones(1, hp * wp, hp * wp, dtype=torch.bool), hp, wp
        elif stripes == "vertical":
            mask, stripe_h, stripe_w = (cols[:, None] // sw == cols[None, :] // sw)[None], hp, sw
        else:
            mask, stripe_h, stripe_w = (rows[:, None] // sw == rows[None, :] // sw)[None], sw, wp
        heads = module.num_heads // len(branches)
        out = masked_attention(qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2), mask, module.scale, heads)
        out = out.reshape(batch, hp, wp, -1)
        conv = module.attns[index].get_v
        for stripe_top in range(0, hp, stripe_h):
            for stripe_left in range(0, wp, stripe_w):
                stripe = vb[:, stripe_top:stripe_top + stripe_h, stripe_left:stripe_left + stripe_w]
                out[:, stripe_top:stripe_top + stripe_h, stripe_left:stripe_left + stripe_w] += depthwise(conv, stripe)
        outputs.append(out[:, top:top + height, left:left + width])
    return F.linear(torch.cat(outputs, -1), module.proj.weight, module.proj.bias)


def _natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's window-start rule (its reference kernels' get_window_start), written out per case."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (length - index - half - 1 if index + half >= length else 0)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue = index % dilation
        full = (length // dilation) * dilation
        remainder = length - full
        if residue < remainder:
            return length - remainder + residue - 2 * half * dilation
        return full + residue - kernel * dilation
    return index - half * dilation


def neighborhood(module, x: torch.Tensor) -> torch.Tensor:
    """Neighborhood attention with a dense mask and bias built query by query from NATTEN's window rule."""
    batch, height, width, channels = x.shape
    k_, d_ = module.kernel_size, module.dilation
    hp, wp = max(height, k_ * d_), max(width, k_ * d_)
    x = _pad(x, hp, wp)
    mask = torch.zeros(1, hp * wp, hp * wp, dtype=torch.bool)
    bias = torch.zeros(module.num_heads, hp * wp, hp * wp, dtype=x.dtype)
    for i in range(hp):
        start_i = _natten_window_start(i, hp, k_, d_)
        for j in range(wp):
            start_j = _natten_window_start(j, wp, k_, d_)
            for a in range(k_):
                for b in range(k_):
                    key_i, key_j = start_i + a * d_, start_j + b * d_
                    mask[0, i * wp + j, key_i * wp + key_j] = True
                    if module.rpb is not None:
                        offset_i = (key_i - i) // d_ + k_ - 1
                        offset_j = (key_j - j) // d_ + k_ - 1
                        bias[:, i * wp + j, key_i * wp + key_j] = module.rpb[:, offset_i, offset_j]
    tokens = x.reshape(batch, hp * wp, channels)
    q, k, v = F.linear(tokens, module.qkv.weight, module.qkv.bias).split(channels, dim=-1)
    out = masked_attention(q, k, v, mask, module.scale, module.num_heads, bias)
    out = F.linear(out, module.proj.weight, module.proj.bias).reshape(batch, hp, wp, channels)
    return out[:, :height, :width]


def spatial_reduction(module, x: torch.Tensor) -> torch.Tensor:
    """PVT SRA: keys/values from F.conv2d(stride R) + F.layer_norm, global einsum attention."""
    batch, height, width, channels = x.shape
    reduced = x
    if module.sr_ratio > 1:
        reduced = F.conv2d(x.permute(0, 3, 1, 2), module.sr.weight, module.sr.bias, stride=module.sr_ratio)
        reduced = F.layer_norm(reduced.permute(0, 2, 3, 1), (channels,), module.norm.weight, module.norm.bias)
    q = F.linear(x.reshape(batch, -1, channels), module.q.weight, module.q.bias)
    k, v = F.linear(reduced.reshape(batch, -1, channels), module.kv.weight, module.kv.bias).split(channels, -1)
    out = masked_attention(q, k, v, None, module.scale, module.num_heads)
    return F.linear(out, module.proj.weight, module.proj.bias).reshape(x.shape)


def bilinear(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation written out: image (C, H, W), points (..., 2) as (y, x) in [-1, 1] with -1 and
    +1 at the centres of the first and last pixels (align_corners=True); taps outside the image count as 0.
    Returns (C, ...)."""
    channels, height, width = image.shape
    y = (points[..., 0] + 1) / 2 * (height - 1)
    x = (points[..., 1] + 1) / 2 * (width - 1)
    y0, x0 = torch.floor(y), torch.floor(x)
    out = torch.zeros(channels, *points.shape[:-1], dtype=image.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - (y - yy).abs()) * (1 - (x - xx).abs())
            inside = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
            taps = image[:, yy.clamp(0, height - 1).long(), xx.clamp(0, width - 1).long()]
            out = out + taps * (weight * inside)
    return out


def deformable_reference_points(grid_h: int, grid_w: int, version: str = "dat++") -> torch.Tensor:
    """DAT's reference points, cell centres i + 0.5 mapped by p / n · 2 - 1 (DAT v1) or p / (n - 1) · 2 - 1
    (DAT++), as (grid_h, grid_w, 2)."""
    def axis(n: int) -> list[float]:
        cells = n if version == "dat" else n - 1
        return [(i + 0.5) / cells * 2 - 1 for i in range(n)]

    return torch.tensor([[[y, x] for x in axis(grid_w)] for y in axis(grid_h)], dtype=torch.float64)


def deformable_query_points(height: int, width: int, version: str) -> torch.Tensor:
    """(H·W, 2) query positions of DAT's bias displacements: the H × W reference points (DAT v1), or
    i / (n - 1) · 2 - 1 (DAT++)."""
    if version == "dat":
        return deformable_reference_points(height, width, "dat").reshape(-1, 2)
    return torch.tensor([[i / (height - 1) * 2 - 1, j / (width - 1) * 2 - 1]
                         for i in range(height) for j in range(width)], dtype=torch.float64)


def deformable_offset_bound(grid_h: int, grid_w: int, factor: float, version: str) -> torch.Tensor | None:
    """f / Hk, f / Wk (DAT v1, f > 0) or f / (Hk - 1), f / (Wk - 1) (DAT++, f >= 0); None: unbounded. DAT
    computes 1 / cells in float32 (torch's default dtype) whatever the input's dtype, and so does this."""
    if (version == "dat" and factor <= 0) or (version != "dat" and factor < 0):
        return None
    cells = (grid_h, grid_w) if version == "dat" else (grid_h - 1, grid_w - 1)
    inverse = [float(torch.tensor(1.0 / n, dtype=torch.float32)) for n in cells]
    return torch.tensor([inverse[0] * factor, inverse[1] * factor], dtype=torch.float64)


def deformable_offsets(module, q: torch.Tensor) -> torch.Tensor:
    """DAT's offset network on the queries of each group, plain functional ops: (B·G, Hk, Wk, 2) raw."""
    batch, height, width, channels = q.shape
    groups = module.n_groups
    grouped = q.permute(0, 3, 1, 2).reshape(batch * groups, channels // groups, height, width)
    dw, norm, _, point = module.conv_offset
    ksize, stride = module.ksize, module.stride
    padding = ksize // 2 if module.version == "dat" or ksize != stride else 0  # DAT++: none when ksize == stride
    out = F.conv2d(grouped, dw.weight, dw.bias, stride=stride, padding=padding, groups=dw.groups)
    out = F.layer_norm(out.permute(0, 2, 3, 1), (out.shape[1],), norm.norm.weight, norm.norm.bias)
    out = F.conv2d(F.gelu(out).permute(0, 3, 1, 2), point.weight)
    return out.permute(0, 2, 3, 1)


def deformable(module, x: torch.Tensor) -> torch.Tensor:
    """DAT (v1) / DAT++ deformable attention: offsets bounded by tanh (or positions squashed / clamped), keys
    and values sampled with the written-out bilinear interpolation, the bias table sampled the same way at
    (query - key) / 2; reference and query points as ``module.version`` defines them."""
    batch, height_in, width_in, channels = x.shape
    version = module.version
    least = 1 if version == "dat" else 2 * module.stride  # DAT++ divides by n - 1: padded up to 2 · stride
    height, width = max(height_in, least), max(width_in, least)
    x = _pad(x, height, width)
    groups, heads = module.n_groups, module.num_heads
    group_channels, group_heads = channels // groups, heads // groups
    q = F.linear(x, module.proj_q.weight.flatten(1), module.proj_q.bias)
    offset = deformable_offsets(module, q)
    grid_h, grid_w = offset.shape[1:3]
    factor = module.offset_range_factor
    bound = deformable_offset_bound(grid_h, grid_w, factor, version)
    if bound is not None:
        offset = offset.tanh() * bound
    positions = offset + deformable_reference_points(grid_h, grid_w, version)
    if factor < 0:
        positions = positions.tanh() if version == "dat" else positions.clamp(-1, 1)
    positions = positions.reshape(batch, groups, grid_h * grid_w, 2)
    sampled = torch.cat([
        torch.stack([bilinear(x[b, :, :, g * group_channels:(g + 1) * group_channels].permute(2, 0, 1),
                              positions[b, g]).T for b in range(batch)])
        for g in range(groups)
    ], dim=-1)  # (B, Ns, C)
    k = F.linear(sampled, module.proj_k.weight.flatten(1), module.proj_k.bias)
    v = F.linear(sampled, module.proj_v.weight.flatten(1), module.proj_v.bias)
    query_points = deformable_query_points(height, width, version)
    outputs = []
    for b in range(batch):
        bias = None
        if module.rpe_table is not None:
            displacement = [(query_points[:, None] - positions[b, g][None]) / 2 for g in range(groups)]
            bias = torch.stack([bilinear(module.rpe_table[h][None], displacement[h // group_heads])[0]
                                for h in range(heads)])
        outputs.append(masked_attention(q[b:b + 1].reshape(1, -1, channels), k[b:b + 1], v[b:b + 1], None,
                                        module.head_dim ** -0.5, heads, bias))
    out = torch.cat(outputs).reshape(batch, height, width, channels)
    out = F.linear(out, module.proj_out.weight.flatten(1), module.proj_out.bias)
    return out[:, :height_in, :width_in]


def quadtree(module, x: torch.Tensor) -> torch.Tensor:
    """QuadTree-B from its definition, query by query: full attention at the coarsest level, then each query
    attends to the children of the keys its parent kept (top-k by attention weight), messages of all levels
    weighted, LePE added, nearest-upsampled and summed."""
    batch, height_in, width_in, channels = x.shape
    levels, heads, d = module.levels, module.num_heads, module.head_dim
    multiple = 2 ** (levels - 1)
    height, width = _ceil_to(height_in, multiple), _ceil_to(width_in, multiple)
    x = _pad(x, height, width).permute(0, 3, 1, 2)

    def conv1x1(conv, t):
        return F.conv2d(t, conv.weight, conv.bias)

    queries, keys, values = [conv1x1(module.q_proj, x)], [conv1x1(module.k_proj, x)], [conv1x1(module.v_proj, x)]
    for branch in module.value_branchs:
        norm1, _, down, norm2, _, point = branch
        queries.append(F.avg_pool2d(queries[-1], 2))
        keys.append(F.avg_pool2d(keys[-1], 2))
        v = F.gelu(F.group_norm(values[-1], 1, norm1.weight, norm1.bias))
        v = F.conv2d(v, down.weight, down.bias, stride=2)
        v = F.gelu(F.group_norm(v, 1, norm2.weight, norm2.bias))
        values.append(F.conv2d(v, point.weight, point.bias))

    topks = list(module.topks)
    level_weight = module.py_att.weight.softmax(0)
    out = torch.zeros(batch, channels, height, width, dtype=x.dtype)
    for b in range(batch):
        for head in range(heads):
            channel = slice(head * d, (head + 1) * d)
            kept_by_query = {}  # (row, col) at the previous level -> kept key positions there
            for step, level in enumerate(range(levels - 1, -1, -1)):
                q, k, v = (t[level][b, channel] for t in (queries, keys, values))
                h, w = q.shape[1:]
                kept_now = {}
                for i in range(h):
                    for j in range(w):
                        if step == 0:
                            candidates = [(r, c) for r in range(h) for c in range(w)]
                        else:
                            candidates = [(2 * r + a, 2 * c + b_) for (r, c) in kept_by_query[(i // 2, j // 2)]
                                          for a in (0, 1) for b_ in (0, 1)]
                        scores = torch.stack([q[:, i, j] @ k[:, r, c] * d ** -0.5 for (r, c) in candidates])
                        weights = scores.softmax(0)
                        message = sum(weights[n] * v[:, r, c] for n, (r, c) in enumerate(candidates))
                        scale = 2 ** level
                        out[b, channel, i * scale:(i + 1) * scale, j * scale:(j + 1) * scale] += (
                            level_weight[step] * message[:, None, None])
                        if level > 0:
                            keep = min(topks[step], len(candidates))
                            order = sorted(range(len(candidates)), key=lambda n: -weights[n].item())[:keep]
                            kept_now[(i, j)] = [candidates[n] for n in order]
                kept_by_query = kept_now
    if module.lepe:
        for step, level in enumerate(range(levels - 1, -1, -1)):
            conv = module.py_att.get_vs[step]
            lepe = F.conv2d(values[level], conv.weight, conv.bias, padding=1, groups=channels)
            out = out + level_weight[step] * lepe.repeat_interleave(2 ** level, 2).repeat_interleave(2 ** level, 3)
    out = F.linear(out.permute(0, 2, 3, 1), module.proj.weight, module.proj.bias)
    return out[:, :height_in, :width_in]
