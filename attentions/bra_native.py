"""BRA's routed attention and LCE as one native CPU kernel (``attentions/csrc/bra_routed.cpp``), built on first use.

The source is compiled with the machine's C++ compiler (``-O3 -march=native``, no torch headers: about 10 s of CPU)
into a cache folder (``$ATTNBENCH_CACHE``, else ``$XDG_CACHE_HOME/attnbench``, else ``~/.cache/attnbench``), named
by a hash of the source, the flags, the compiler's version and the CPU's flags, and loaded with ctypes. ctypes
releases the GIL during the call, so ``attentions/by_image.py``'s worker threads run it side by side.

``routed_attention`` and ``local_context_add`` write the forward; ``routed_attention_backward`` and
``local_context_backward`` their gradients; ``attend`` joins them in an autograd Function (what the ``fused`` backend
and ``bra``'s raster path call). ``build_reasons()`` says why it cannot be used here (no compiler, a failed build);
the backend that uses it (``bra_kernels``'s ``fused``) declares those reasons, so nothing needs it to exist.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from . import huge_pages

SOURCE = Path(__file__).parent / "csrc" / "bra_routed.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
BUILD_TIMEOUT_S = 300
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class BuildError(RuntimeError):
    """The native kernel could not be compiled or loaded here."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cache_dir() -> Path:
    if os.environ.get("ATTNBENCH_CACHE"):
        return Path(os.environ["ATTNBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnbench"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the machine and the CPU's model and feature lines (x86 ``flags``, Arm
    ``Features`` / ``CPU part``), so a cache shared by different CPUs never loads a build made for another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = [platform.processor()]
    keep = ("flags", "features", "model name", "cpu part", "cpu implementer")
    return "\n".join([platform.machine(), *sorted({line for line in lines if line.lower().startswith(keep)})])


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            lines = result.stderr.splitlines()
            first = next((line for line in lines if "error" in line), lines[0] if lines else "no output")
            raise BuildError(f"{Path(compiler).name} failed on {SOURCE.name} (exit {result.returncode}): "
                             f"{first[:300]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file


def _load(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    for suffix in DTYPES.values():
        attention = getattr(lib, f"attnbench_bra_routed_attention_{suffix}")
        attention.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64,
                              ctypes.c_double, _PTR, _I64, _I64, ctypes.c_int]
        backward = getattr(lib, f"attnbench_bra_routed_attention_backward_{suffix}")
        backward.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64,
                             _I64, ctypes.c_double, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, ctypes.c_int]
        local_context = getattr(lib, f"attnbench_bra_local_context_add_{suffix}")
        local_context.argtypes = [_I64, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64,
                                  ctypes.c_int]
        param_grads = getattr(lib, f"attnbench_bra_local_context_param_grads_{suffix}")
        param_grads.argtypes = [_I64, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR,
                                ctypes.c_int]
        means = getattr(lib, f"attnbench_bra_region_means_{suffix}")
        means.argtypes = [_I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int]
    return lib


def _target(compiler: str) -> Path:
    """Where the build for this source, flags, compiler version and CPU lives in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_identity()]).encode()).hexdigest()
    return cache_dir() / f"bra_routed-{key[:16]}.so"


@functools.cache
def _built() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why not), decided once per process: a failed build is not retried."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler on PATH (g++, c++ or clang++; or set CXX)"
    try:
        target = _target(compiler)
        if not target.exists():
            _build(compiler, target)
        try:
            return _load(target), ""
        except (OSError, AttributeError):  # a truncated or foreign file in the cache: built again, once
            target.unlink(missing_ok=True)
            _build(compiler, target)
            return _load(target), ""
    except BuildError as error:
        return None, str(error)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        return None, f"building or loading {SOURCE.name} with {compiler}: {error}"


def library() -> ctypes.CDLL:
    """The loaded kernel, built if the cache has none for this source, compiler and CPU; BuildError otherwise."""
    lib, why = _built()
    if lib is None:
        raise BuildError(why)
    return lib


def build_reasons() -> tuple[str, ...]:
    """Why the kernel cannot run here (empty when it built and loaded)."""
    return () if _built()[0] is not None else (_built()[1],)


def _call(function: str, dtype: torch.dtype, *args: object) -> None:
    """Call an exported kernel; a C++ failure inside it (out of memory, no thread) comes back as a return code."""
    if getattr(library(), f"{function}_{DTYPES[dtype]}")(*args) != 0:
        raise RuntimeError(f"{function}: the native kernel failed (out of memory, or a thread could not start)")


def _check_cpu(dtype: torch.dtype, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or tensor.dtype != dtype:
            raise ValueError(f"{name}: expected a {str(dtype).removeprefix('torch.')} CPU tensor, got "
                             f"{str(tensor.dtype).removeprefix('torch.')} on {tensor.device}")


def _table(table: torch.Tensor, bound: int, name: str) -> torch.Tensor:
    """An int64 CPU copy (or the tensor itself) of an index table, every entry in [0, bound): the kernel reads where
    its entries point. The caller keeps the result alive through the call."""
    table = table.to(device="cpu", dtype=torch.int64).contiguous()
    if table.numel() and (table.min() < 0 or table.max() >= bound):
        raise ValueError(f"{name} has entries outside [0, {bound})")
    return table


def _rows(x: torch.Tensor, name: str) -> tuple[int, int]:
    """(image stride, row stride) of a (B, rows, width) operand whose last dimension is contiguous, or of a (B, H, W,
    width) map whose rows sit at one stride (row y·W + x)."""
    if x.dim() == 4 and x.stride(1) == x.shape[2] * x.stride(2):
        x = x.flatten(1, 2)  # a view, by the check above
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"{name}: expected (batch, rows, width) with contiguous width, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.stride(0), x.stride(1)


def _span(x: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address of x's elements."""
    last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True)) if x.numel() else 0
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size() - 1


def _written_rows(x: torch.Tensor, name: str, *read: torch.Tensor) -> tuple[int, int]:
    """``_rows`` of an operand the kernel writes: each of its elements at its own address (no broadcast or overlapping
    rows, which threads would write at once), and none inside an operand it reads in the same call."""
    image, row = _rows(x, name)
    rows, width = x.shape[-2] * (x.shape[-3] if x.dim() == 4 else 1), x.shape[-1]
    if (rows > 1 and row < width) or (x.shape[0] > 1 and image < rows * row):
        raise ValueError(f"{name}: a written operand needs rows and images that do not overlap, got strides "
                         f"{x.stride()} for shape {tuple(x.shape)}")
    first, last = _span(x)
    for other in read:
        other_first, other_last = _span(other)
        if first <= other_last and other_first <= last:
            raise ValueError(f"{name}: a written operand must not share memory with the operands read in the call")
    return image, row


def _routed_problem(function: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    query_rows: torch.Tensor, key_rows: torch.Tensor, index: torch.Tensor,
                    heads: int) -> tuple[torch.Tensor, ...]:
    """The checked dims (int64: B, R, T, n, k, heads, dq, dv) and int64 tables (query rows, key rows, index) of a
    routed attention whose output (or output gradient) is ``out``; ValueError naming ``function`` otherwise."""
    if q.dtype not in DTYPES:
        raise ValueError(f"{function}: float32 or float64 only, got {q.dtype}")
    if heads < 1:
        raise ValueError(f"{function}: heads must be at least 1, got {heads}")
    _check_cpu(q.dtype, q=q, k=k, v=v, out=out)
    if query_rows.dim() != 2 or key_rows.dim() != 2 or index.dim() != 3:
        raise ValueError(f"{function}: query_rows and key_rows are (R, T) and (R, n) tables, index is (B, R, k)")
    regions, tokens = query_rows.shape
    batch, keys_per_region, topk = q.shape[0], key_rows.shape[1], index.shape[-1]
    shapes = {"q": q.shape, "k": k.shape, "v": v.shape, "out": out.shape}
    if (any(len(shape) != 3 or shape[0] != batch for shape in shapes.values()) or k.shape[2] != q.shape[2]
            or out.shape[2] != v.shape[2] or k.shape[1] != v.shape[1] or out.shape[1] != q.shape[1]
            or q.shape[2] % heads or v.shape[2] % heads):
        raise ValueError(f"{function}: operands of shapes {shapes} do not fit (B, rows, heads · width) with "
                         f"{heads} heads, q as wide as k, out as wide as v")
    if index.shape != (batch, regions, topk) or key_rows.shape[0] != regions:
        raise ValueError(f"{function}: index {tuple(index.shape)}, query_rows {tuple(query_rows.shape)} and "
                         f"key_rows {tuple(key_rows.shape)} disagree on batch or regions")
    if min(tokens, keys_per_region, topk, q.shape[2], v.shape[2]) < 1:
        raise ValueError(f"{function}: every region needs at least one query, one key and one channel")
    dims = torch.tensor([batch, regions, tokens, keys_per_region, topk, heads, q.shape[2] // heads,
                         v.shape[2] // heads], dtype=torch.int64)
    return (dims, _table(query_rows, q.shape[1], "query_rows"), _table(key_rows, k.shape[1], "key_rows"),
            _table(index, regions, "index"))


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, query_rows: torch.Tensor,
                     key_rows: torch.Tensor, index: torch.Tensor, heads: int, scale: float, threads: int) -> None:
    """Writes into ``out`` BRA's token attention (steps 4–5 of attentions/bra.py, without LCE).

    q: (B, q rows, heads · dq), k: (B, kv rows, heads · dq), v: (B, kv rows, heads · dv), out: (B, q rows,
    heads · dv): rows of one image, any row and image strides, contiguous last dimension (views of one qkv
    projection work as they are). query_rows: (R, T) int64, the rows of region r's T query tokens; key_rows:
    (R, n), the rows of its n key/value tokens; index: (B, R, k) int64 routed regions. Same dtype (float32 or
    float64) and CPU for all; ``threads`` native threads split the (image, region) pairs.
    """
    # kept in locals: the kernel reads them through their pointers during the call
    dims, query_table, key_table, index_table = _routed_problem("routed_attention", q, k, v, out, query_rows,
                                                                key_rows, index, heads)
    (qi, qr), (ki, kr), (vi, vr) = (_rows(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    oi, orow = _written_rows(out, "out", q, k, v)
    _call("attnbench_bra_routed_attention", q.dtype, dims.data_ptr(), query_table.data_ptr(), key_table.data_ptr(),
          index_table.data_ptr(), q.data_ptr(), qi, qr, k.data_ptr(), ki, kr, v.data_ptr(), vi, vr, float(scale),
          out.data_ptr(), oi, orow, threads)


def _covers_every_row(table: torch.Tensor, rows: int) -> bool:
    return table.numel() == rows and bool((table.flatten().sort().values == torch.arange(rows)).all())


def routed_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                              grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                              query_rows: torch.Tensor, key_rows: torch.Tensor, index: torch.Tensor, heads: int,
                              scale: float, threads: int) -> None:
    """Writes the gradients of ``routed_attention`` with respect to q, k and v into grad_q, grad_k, grad_v (shaped
    and laid out like q, k, v, under the same rules) for the output gradient grad_out (shaped like its out).

    The probabilities are recomputed from q and k (nothing is saved by the forward). The tables must list every
    row once: query_rows every row of q, key_rows every row of k and v (the layouts ``bra`` uses); the gradient of
    a row no table lists would be undefined. ``threads`` native threads split the (image, head) pairs.
    """
    dims, query_table, key_table, index_table = _routed_problem("routed_attention_backward", q, k, v, grad_out,
                                                                query_rows, key_rows, index, heads)
    for name, grad, like in (("grad_q", grad_q, q), ("grad_k", grad_k, k), ("grad_v", grad_v, v)):
        _check_cpu(q.dtype, **{name: grad})
        if grad.shape != like.shape:
            raise ValueError(f"routed_attention_backward: {name} has shape {tuple(grad.shape)}, expected "
                             f"{tuple(like.shape)}")
    if not _covers_every_row(query_table, q.shape[1]) or not _covers_every_row(key_table, k.shape[1]):
        raise ValueError("routed_attention_backward: query_rows and key_rows must list every row of q and of k once")
    (qi, qr), (ki, kr), (vi, vr), (oi, orow) = (_rows(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"),
                                                                         (grad_out, "grad_out")))
    (gqi, gqr), (gki, gkr), (gvi, gvr) = (_written_rows(t, n, q, k, v, grad_out) for t, n in
                                          ((grad_q, "grad_q"), (grad_k, "grad_k"), (grad_v, "grad_v")))
    _call("attnbench_bra_routed_attention_backward", q.dtype, dims.data_ptr(), query_table.data_ptr(),
          key_table.data_ptr(), index_table.data_ptr(), q.data_ptr(), qi, qr, k.data_ptr(), ki, kr, v.data_ptr(), vi,
          vr, grad_out.data_ptr(), oi, orow, float(scale), grad_q.data_ptr(), gqi, gqr, grad_k.data_ptr(), gki, gkr,
          grad_v.data_ptr(), gvi, gvr, threads)


def local_context_add(v_map: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_map: torch.Tensor,
                      threads: int) -> None:
    """``out_map += depthwise_conv(v_map)``: BRA's LCE, a same-size depthwise conv (zero padding, odd kernel).

    v_map: (B, H, W, C) with contiguous C and the rows of an image at one stride (a channel slice of the qkv
    projection works as it is); weight: (C, 1, K, K) as nn.Conv2d holds it, K odd; bias: (C,) or None; out_map:
    (B, H, W, C), same layout rules; one dtype (float32 or float64), CPU.
    """
    if v_map.dtype not in DTYPES or v_map.dim() != 4:
        raise ValueError(f"local_context_add: a float32 or float64 (B, H, W, C) map, got {v_map.dtype} "
                         f"{tuple(v_map.shape)}")
    batch, height, width, channels = v_map.shape
    side = weight.shape[-1]
    if weight.shape != (channels, 1, side, side) or side % 2 == 0 or out_map.shape != v_map.shape or (
            bias is not None and bias.shape != (channels,)):
        raise ValueError(f"local_context_add: weight {tuple(weight.shape)} must be ({channels}, 1, K, K) with K odd, "
                         f"bias ({channels},), out_map {tuple(out_map.shape)} as v_map {tuple(v_map.shape)}")
    bias = torch.zeros(channels, dtype=v_map.dtype) if bias is None else bias.detach().contiguous()
    _check_cpu(v_map.dtype, v_map=v_map, weight=weight, bias=bias, out_map=out_map)
    taps = weight.detach().reshape(channels, side * side).t().contiguous()  # (K², C): a vector of channels per tap
    (vi, vr), (oi, orow) = _rows(v_map, "v_map"), _written_rows(out_map, "out_map", v_map)
    _call("attnbench_bra_local_context_add", v_map.dtype, batch, height, width, channels, side, v_map.data_ptr(), vi,
          vr, taps.data_ptr(), bias.data_ptr(), out_map.data_ptr(), oi, orow, threads)


def local_context_backward(grad_out_map: torch.Tensor, v_map: torch.Tensor, weight: torch.Tensor,
                           grad_v_map: torch.Tensor, threads: int,
                           parameters: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``local_context_add`` for the output gradient grad_out_map (B, H, W, C): adds the input's into
    grad_v_map (the conv of grad_out_map with the kernel flipped, on ``local_context_add``) and returns the weight's
    (C, 1, K, K) and the bias's (C,), or (None, None) without ``parameters``. Maps under ``local_context_add``'s layout
    rules; one dtype, CPU."""
    channels, side = v_map.shape[-1], weight.shape[-1]
    _check_cpu(v_map.dtype, grad_out_map=grad_out_map, v_map=v_map)
    if grad_out_map.shape != v_map.shape or v_map.dim() != 4:
        raise ValueError(f"local_context_backward: grad_out_map {tuple(grad_out_map.shape)} and v_map "
                         f"{tuple(v_map.shape)} must be (B, H, W, C) maps of one shape")
    (gi, gr), (vi, vr) = _rows(grad_out_map, "grad_out_map"), _rows(v_map, "v_map")
    _written_rows(grad_v_map, "grad_v_map", grad_out_map, v_map)
    local_context_add(grad_out_map, weight.detach().flip(-2, -1), None, grad_v_map, threads)  # checks the rest
    if not parameters:
        return None, None
    grad_taps, grad_bias = v_map.new_empty(side * side, channels), v_map.new_empty(channels)
    _call("attnbench_bra_local_context_param_grads", v_map.dtype, v_map.shape[0], v_map.shape[1], v_map.shape[2],
          channels, side, grad_out_map.data_ptr(), gi, gr, v_map.data_ptr(), vi, vr, grad_taps.data_ptr(),
          grad_bias.data_ptr(), threads)
    return grad_taps.t().reshape(channels, 1, side, side), grad_bias


def region_means(x: torch.Tensor, rows: torch.Tensor, threads: int) -> torch.Tensor:
    """(B, regions, width): the mean of x's rows listed in each row of ``rows`` (R, T); x: (B, rows, width) or (B, H,
    W, width) with a contiguous last dimension, rows at one stride (step 2 of BRA: region queries and keys)."""
    if x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError(f"region_means: a float32 or float64 CPU tensor, got {x.dtype} on {x.device}")
    image, row = _rows(x, "x")
    if rows.dim() != 2 or rows.shape[1] < 1:
        raise ValueError(f"region_means: rows must be an (R, T ≥ 1) table, got {tuple(rows.shape)}")
    table = _table(rows, x.shape[1] if x.dim() == 3 else x.shape[1] * x.shape[2], "rows")
    regions, tokens = table.shape
    means = x.new_empty(x.shape[0], regions, x.shape[-1])
    _call("attnbench_bra_region_means", x.dtype, x.shape[0], regions, tokens, x.shape[-1], table.data_ptr(),
          x.data_ptr(), image, row, means.data_ptr(), threads)
    return means


@dataclass(frozen=True)
class RoutedLayout:
    """How ``attend`` finds the routed attention in its tensors: the row tables and routing of
    ``routed_attention`` (query_rows (R, T), key_rows (R, n), index (B, R, k)), the head count, the width of Q and K
    (qk_dim) and of V (value_dim), the softmax scale, and, to add the LCE, the (H, W) map the rows are the raster
    order of (None: no LCE)."""

    query_rows: torch.Tensor
    key_rows: torch.Tensor
    index: torch.Tensor
    heads: int
    qk_dim: int
    value_dim: int
    scale: float
    map_size: tuple[int, int] | None = None

    def split(self, q_source: torch.Tensor, kv_source: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q: the first qk_dim columns of q_source; k, v: the last qk_dim + value_dim columns of kv_source (views)."""
        qk, c = self.qk_dim, self.value_dim
        expected_q = 2 * qk + c if q_source is kv_source else qk
        if q_source.shape[-1] != expected_q or kv_source.shape[-1] != (expected_q if q_source is kv_source
                                                                       else qk + c):
            raise ValueError(f"attend: q_source {tuple(q_source.shape)} and kv_source {tuple(kv_source.shape)} must "
                             f"end in qk_dim={qk} and qk_dim + value_dim={qk + c} columns (2·qk_dim + value_dim for "
                             "one Q|K|V tensor)")
        return q_source[..., :qk], kv_source[..., -(qk + c):-c], kv_source[..., -c:]


class _RoutedAttention(torch.autograd.Function):
    """``routed_attention`` (+ the LCE) with the native backward. The probabilities are recomputed in backward from
    the saved inputs; the LCE's gradients come from ``local_context_backward``."""

    @staticmethod
    def forward(ctx, q_source, kv_source, lce_weight, lce_bias, layout: RoutedLayout):
        q, k, v = layout.split(q_source, kv_source)
        threads = torch.get_num_threads()
        out = huge_pages.empty((q.shape[0], q.shape[1], layout.value_dim), q.dtype)
        routed_attention(q, k, v, out, layout.query_rows, layout.key_rows, layout.index, layout.heads, layout.scale,
                         threads)
        if lce_weight is not None:
            height, width = layout.map_size
            local_context_add(v.unflatten(1, (height, width)), lce_weight, lce_bias,
                              out.view(out.shape[0], height, width, -1), threads)
        ctx.layout, ctx.same_source, ctx.has_bias = layout, q_source is kv_source, lce_bias is not None
        ctx.save_for_backward(q_source, kv_source, lce_weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_source, kv_source, lce_weight = ctx.saved_tensors
        layout = ctx.layout
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        grad_q_source = huge_pages.empty(q_source.shape, q_source.dtype)
        grad_kv_source = grad_q_source if ctx.same_source else huge_pages.empty(kv_source.shape, kv_source.dtype)
        q, k, v = layout.split(q_source, kv_source)
        grad_q, grad_k, grad_v = layout.split(grad_q_source, grad_kv_source)
        routed_attention_backward(q, k, v, grad_out, grad_q, grad_k, grad_v, layout.query_rows, layout.key_rows,
                                  layout.index, layout.heads, layout.scale, torch.get_num_threads())
        grad_weight = grad_bias = None
        if lce_weight is not None:
            height, width = layout.map_size
            grad_weight, grad_bias = local_context_backward(
                grad_out.unflatten(1, (height, width)), v.unflatten(1, (height, width)), lce_weight,
                grad_v.unflatten(1, (height, width)), torch.get_num_threads(),
                parameters=ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
            grad_bias = grad_bias if ctx.has_bias else None
        if ctx.same_source:  # one tensor held Q|K|V: its whole gradient comes back once
            return grad_q_source, None, grad_weight, grad_bias, None
        return grad_q_source, grad_kv_source, grad_weight, grad_bias, None


def attend(q_source: torch.Tensor, kv_source: torch.Tensor, layout: RoutedLayout,
           lce_weight: torch.Tensor | None = None, lce_bias: torch.Tensor | None = None) -> torch.Tensor:
    """BRA's routed attention (+ LCE when ``layout.map_size`` is set) on the native kernels, differentiable with
    respect to the sources and the LCE's weight and bias: (B, q rows, value_dim).

    q_source: (B, q rows, qk_dim) and kv_source: (B, kv rows, qk_dim + value_dim), or one (B, rows, 2·qk_dim +
    value_dim) tensor passed as both (Q|K|V of one projection; its gradient is then one tensor, with no split or
    concatenation). lce_weight: (value_dim, 1, K, K) and lce_bias: (value_dim,) or None, as nn.Conv2d holds them."""
    if (lce_weight is None) != (layout.map_size is None) or (lce_bias is not None and lce_weight is None):
        raise ValueError("attend: the LCE needs both its weight and layout.map_size, or neither (and a bias only "
                         "with a weight)")
    return _RoutedAttention.apply(q_source, kv_source, lce_weight, lce_bias, layout)
