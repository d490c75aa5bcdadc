"""Small building blocks shared by several mechanisms (channels-last padding, depthwise convs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def pad_bottom_right(x: torch.Tensor, multiple_h: int, multiple_w: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad (B, H, W, C) at the bottom and right up to multiples of (multiple_h, multiple_w).

    Returns the padded tensor and the padding added to H and to W. This is the padding of the official
    BiFormer ``auto_pad`` (rayleizhu/BiFormer ops/bra_legacy.py) and of timm's Swin blocks.
    """
    pad_h = -x.shape[1] % multiple_h
    pad_w = -x.shape[2] % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, pad_h, pad_w


def depthwise_conv(dim: int, kernel_size: int) -> nn.Conv2d:
    """A same-size depthwise conv (the LCE of BRA, the LePE of CSWin / BiFormer's last stage)."""
    return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)


def conv_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW conv to a (B, H, W, C) tensor, returning (B, H, W, C')."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def depthwise_conv_macs(height: int, width: int, dim: int, kernel_size: int) -> int:
    """MACs of a same-size depthwise conv with ``dim`` channels (bias adds not counted)."""
    return height * width * dim * kernel_size * kernel_size


def window_partition(x: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B · H/window_h · W/window_w, window_h · window_w, C), windows in raster order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window_h, window_h, width // window_w, window_w, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_h * window_w, channels)


def window_merge(windows: torch.Tensor, window_h: int, window_w: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B · nW, window_h · window_w, C) -> (B, height, width, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window_h, width // window_w, window_h, window_w, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., N, C) -> (..., num_heads, N, C / num_heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., num_heads, N, d) -> (..., N, num_heads · d)."""
    return x.transpose(-3, -2).flatten(-2)


def top_k_choice(owner: nn.Module, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=-1)`` as (values, indices): a discrete choice (BRA's routed regions, QuadTree's
    kept keys) that can be recorded and imposed, so a low-precision run can be checked against float64
    arithmetic on the same choices (near-ties flip in bfloat16; ``attnbench/measure/correctness.py``).

    While ``owner.recorded_choices`` is a list, each call appends its (rows, …, k) indices to it. While
    ``owner.imposed_choices`` is a non-empty list of such tensors, each call takes its rows from the front instead
    of choosing (so a run that splits the batch otherwise takes the same rows), gathers the values there, and keeps
    in ``owner.imposed_shortfall`` the largest amount by which an imposed choice scores below this call's own k-th
    score, relative to max |score|: a near-tie is small, a wrong choice is not. Neither attribute exists in normal
    use. ``owner`` sets ``makes_top_k_choices``.
    """
    imposed = getattr(owner, "imposed_choices", None)
    if imposed:
        index = _take_rows(imposed, scores.shape[0]).to(scores.device)
        if index.shape != (*scores.shape[:-1], k):
            raise ValueError(f"imposed choices of shape {tuple(index.shape)} for scores {tuple(scores.shape)}, k={k}")
        values = scores.gather(-1, index)
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scale = scores.abs().amax().clamp(min=torch.finfo(scores.dtype).tiny)
        shortfall = float((kth - values).clamp(min=0).amax() / scale)
        owner.imposed_shortfall = max(getattr(owner, "imposed_shortfall", 0.0), shortfall)
        return values, index
    values, index = torch.topk(scores, k, dim=-1)
    recorded = getattr(owner, "recorded_choices", None)
    if recorded is not None:
        recorded.append(index)
    return values, index


def _take_rows(queue: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The first ``rows`` rows of the tensors queued in ``queue`` (consumed; a tensor split if need be)."""
    taken = []
    while rows > 0:
        if not queue:
            raise ValueError("the run asks for more choices than were imposed")
        head = queue.pop(0)
        if head.shape[0] > rows:
            queue.insert(0, head[rows:])
            head = head[:rows]
        taken.append(head)
        rows -= head.shape[0]
    return torch.cat(taken)


def aten_watcher() -> str | None:
    """What watches the ATen calls made here, or None: a dispatch or function mode (FLOP counters, memory trackers),
    a tracer or torch.compile, a functorch transform. Such a watcher sees only ATen ops on the calling thread, so
    work moved to other threads (``attentions/by_image.py``) or into native code (``attentions/bra_native.py``)
    would escape it."""
    if is_in_torch_dispatch_mode():
        return "a torch dispatch mode (a FLOP counter, the memory tracker or the traffic model)"
    if torch._C._is_torch_function_mode_enabled():
        return "a torch function mode"
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return "a tracer or torch.compile"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a functorch transform"
    return None
