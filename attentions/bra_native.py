"""BRA's routed attention and LCE as one native CPU kernel (``attentions/csrc/bra_routed.cpp``), built on first use.

The source is compiled with the machine's C++ compiler (``-O3 -march=native``, no torch headers: about a second)
into a cache folder (``$ATTNBENCH_CACHE``, else ``$XDG_CACHE_HOME/attnbench``, else ``~/.cache/attnbench``), named
by a hash of the source, the flags, the compiler's version and the CPU's flags, and loaded with ctypes. ctypes
releases the GIL during the call, so ``attentions/by_image.py``'s worker threads run it side by side.

``build_reasons()`` says why it cannot be used here (no compiler, a failed build); the backend that uses it
(``bra_kernels``'s ``fused``) declares those reasons, so nothing needs it to exist.
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
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "bra_routed.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class BuildError(RuntimeError):
    """The native kernel could not be compiled or loaded here."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cache_dir() -> Path:
    if os.environ.get("ATTNBENCH_CACHE"):
        return Path(os.environ["ATTNBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnbench"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel, built if the cache has none for this source, compiler and CPU; BuildError otherwise."""
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C++ compiler on PATH (g++, c++ or clang++; or set CXX)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()
        target = cache_dir() / f"bra_routed-{key[:16]}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                                        text=True)
                if result.returncode != 0:
                    lines = result.stderr.splitlines()
                    first = next((line for line in lines if "error" in line), lines[0] if lines else "no output")
                    raise BuildError(f"{Path(compiler).name} failed on {SOURCE.name} (exit {result.returncode}): "
                                     f"{first[:300]}")
                os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    except OSError as error:
        raise BuildError(f"building {SOURCE.name} with {compiler}: {error}") from error
    lib = ctypes.CDLL(str(target))
    for suffix in DTYPES.values():
        attention = getattr(lib, f"attnbench_bra_routed_attention_{suffix}")
        attention.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64,
                              ctypes.c_double, _PTR, _I64, _I64, ctypes.c_int]
        local_context = getattr(lib, f"attnbench_bra_local_context_add_{suffix}")
        local_context.argtypes = [_I64, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64,
                                  ctypes.c_int]
        means = getattr(lib, f"attnbench_bra_region_means_{suffix}")
        means.argtypes = [_I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int]
    return lib


def build_reasons() -> tuple[str, ...]:
    """Why the kernel cannot run here (empty when it built and loaded)."""
    try:
        library()
    except (BuildError, OSError) as error:  # OSError: the built library did not load
        return (str(error),)
    return ()


def _rows(x: torch.Tensor, name: str) -> tuple[int, int]:
    """(image stride, row stride) of a (B, rows, width) operand whose last dimension is contiguous, or of a (B, H, W,
    width) map whose rows sit at one stride (row y·W + x)."""
    if x.dim() == 4 and x.stride(1) == x.shape[2] * x.stride(2):
        x = x.flatten(1, 2)  # a view, by the check above
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"{name}: expected (batch, rows, width) with contiguous width, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.stride(0), x.stride(1)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, query_rows: torch.Tensor,
                     key_rows: torch.Tensor, index: torch.Tensor, heads: int, scale: float, threads: int) -> None:
    """Writes into ``out`` BRA's token attention (steps 4–5 of attentions/bra.py, without LCE).

    q: (B, q rows, heads · dq), k: (B, kv rows, heads · dq), v: (B, kv rows, heads · dv), out: (B, q rows,
    heads · dv): rows of one image, any row and image strides, contiguous last dimension (views of one qkv
    projection work as they are). query_rows: (R, T) int64, the rows of region r's T query tokens; key_rows:
    (R, n), the rows of its n key/value tokens; index: (B, R, k) int64 routed regions. Same dtype (float32 or
    float64) and CPU for all; ``threads`` native threads split the (image, region) pairs.
    """
    dtype = q.dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in (k, v, out)) or out.device.type != "cpu":
        raise ValueError(f"routed_attention: float32 or float64 CPU tensors of one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {out.dtype} on {out.device}")
    regions, tokens = query_rows.shape
    batch, keys_per_region, topk = q.shape[0], key_rows.shape[1], index.shape[-1]
    if index.shape != (batch, regions, topk) or key_rows.shape[0] != regions:
        raise ValueError(f"routed_attention: index {tuple(index.shape)}, query_rows {tuple(query_rows.shape)} and "
                         f"key_rows {tuple(key_rows.shape)} disagree on batch or regions")
    tables = [t.contiguous().to(torch.int64) for t in (query_rows, key_rows, index)]
    # the kernel reads where these point: out-of-range entries are refused here rather than read out of bounds
    for table, bound, name in ((tables[0], q.shape[1], "query_rows"), (tables[1], k.shape[1], "key_rows"),
                               (tables[2], regions, "index")):
        if table.numel() and (table.min() < 0 or table.max() >= bound):
            raise ValueError(f"routed_attention: {name} has entries outside [0, {bound})")
    if k.shape[1] > v.shape[1] or q.shape[1] > out.shape[1]:
        raise ValueError(f"routed_attention: {k.shape[1]} key rows but {v.shape[1]} value rows, or {q.shape[1]} "
                         f"query rows but {out.shape[1]} output rows")
    dims = torch.tensor([batch, regions, tokens, keys_per_region, topk, heads, q.shape[2] // heads,
                         v.shape[2] // heads], dtype=torch.int64)
    (qi, qr), (ki, kr), (vi, vr), (oi, orow) = (_rows(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"), (out, "out")))
    call = getattr(library(), f"attnbench_bra_routed_attention_{DTYPES[dtype]}")
    call(dims.data_ptr(), *(t.data_ptr() for t in tables), q.data_ptr(), qi, qr, k.data_ptr(), ki, kr, v.data_ptr(),
         vi, vr, float(scale), out.data_ptr(), oi, orow, threads)


def local_context_add(v_map: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_map: torch.Tensor,
                      threads: int) -> None:
    """``out_map += depthwise_conv(v_map)``: BRA's LCE, a same-size depthwise conv (zero padding, odd kernel).

    v_map: (B, H, W, C) with contiguous C and the rows of an image at one stride (a channel slice of the qkv
    projection works as it is); weight: (C, 1, K, K) as nn.Conv2d holds it; bias: (C,) or None; out_map: (B, H, W,
    C), same layout rules.
    """
    batch, height, width, channels = v_map.shape
    side = weight.shape[-1]
    taps = weight.reshape(channels, side * side).t().contiguous()  # (K², C): one vector of channels per tap
    bias = torch.zeros(channels, dtype=v_map.dtype) if bias is None else bias.contiguous()
    (vi, vr), (oi, orow) = _rows(v_map, "v_map"), _rows(out_map, "out_map")
    call = getattr(library(), f"attnbench_bra_local_context_add_{DTYPES[v_map.dtype]}")
    call(batch, height, width, channels, side, v_map.data_ptr(), vi, vr, taps.data_ptr(), bias.data_ptr(),
         out_map.data_ptr(), oi, orow, threads)


def region_means(x: torch.Tensor, rows: torch.Tensor, threads: int) -> torch.Tensor:
    """(B, regions, width): the mean of x's rows listed in each row of ``rows`` (R, T); x: (B, rows, width) or (B, H,
    W, width) with a contiguous last dimension, rows at one stride (step 2 of BRA: region queries and keys)."""
    image, row = _rows(x, "x")
    regions, tokens = rows.shape
    means = x.new_empty(x.shape[0], regions, x.shape[-1])
    call = getattr(library(), f"attnbench_bra_region_means_{DTYPES[x.dtype]}")
    call(x.shape[0], regions, tokens, x.shape[-1], rows.contiguous().data_ptr(), x.data_ptr(), image, row,
         means.data_ptr(), threads)
    return means
