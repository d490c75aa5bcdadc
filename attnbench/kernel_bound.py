"""``python -m attnbench kernel-bound``: how near the GEMM rate BRA can get with the ATen kernels it is made of (CPU).

BRA's useful work is the MACs ``attentions/bra.py`` counts, part by part (qkv, routing, attn_scores + attn_values,
out_proj, local_context). Each part is done by one ATen kernel, which is timed here **alone**, at one intra-op thread,
on the shapes of a BiFormer-T stage (attnbench/presets.py; n_win 7, top-k 1/4/16/49, LCE 5, qk_dim = dim), for a group
of g images (each g of ``GROUPS`` tried, the fastest kept), on random contiguous inputs in the layout the kernel
prefers. Left out on purpose: the region pooling, the gather of the routed keys and values, every layout copy and
padding, which BRA also needs. The stage's **kernel bound** is then

    bound = (Σ_parts FLOPs ÷ Σ_parts time at one thread) ÷ GEMM rate(one thread)

the share of the dense 2048³ GEMM rate (measured in the same process, at one thread) that a BRA doing nothing but
these kernels back to back would reach; on N worker threads it is the share of the N-thread GEMM rate (the
denominator of the suites' roofline and of versus-official's *ours / GEMM rate*) if the kernels scale over threads
as the GEMM does. The attention part takes the fastest of the kernels BRA's backends use: SDPA on gathered blocks,
matmul-softmax-matmul on them, SDPA over every token with the routing's block mask (the ``dense`` backend: more
FLOPs done, only the useful ones counted), or the native kernel of the ``fused`` backend (attentions/bra_native.py,
reading the routed keys in place); the LCE the faster of ATen's depthwise conv and the native one. No BRA built from
these kernels can beat the bound on this machine.
Our default BRA (``impl='auto'``, eval, ``inference_mode``, at ``threads`` threads) is timed beside it in the same
process, at each batch asked for, and again with its worker threads turned off (``attentions.by_image.no_workers``).
The memory side of the roofline is given beside it: the bytes our forward's ops move per image under the traffic model
of attnbench/measure/traffic.py, and the ceiling that traffic sets at the measured copy bandwidth.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

import attentions
from attentions import bra_native, by_image

from .env import environment, load_average
from .measure.gemm import GEMM_SIZE, gemm_flops_per_s
from .measure.latency import measure_latency
from .measure.traffic import COPY_BYTES, attainable_fraction, copy_bandwidth, count_traffic
from .presets import BIFORMER_T_TOPK as STAGE_TOPK
from .presets import PRESETS

GROUPS = (1, 2, 4, 8, 16)
UNSTABLE_SPREAD = 0.10
GEMM_TRIES = 3
# each kernel's timing: short, a kernel alone is steady
_KERNEL_TIMING = {"warmup_iters": 3, "min_samples": 5, "max_samples": 30, "min_run_time_s": 0.2, "max_time_s": 1.5}


@dataclass
class PartRow:
    """One part of one stage: its kernel's best time per image at one thread."""

    stage: str
    part: str
    kernel: str
    macs_per_image: int
    group: int
    us_per_image: float
    spread: float
    fraction_of_thread_gemm: float  # the kernel's useful FLOP/s ÷ the GEMM rate at one thread


@dataclass
class OursRow:
    """Our default BRA at one stage and batch, in the same process."""

    stage: str
    batch: int
    ms: float
    spread: float
    gemm_fraction: float
    whole_ms: float  # the same, with attentions.by_image.no_workers(): the batch whole on the caller's threads
    whole_spread: float
    traffic_per_image: float  # bytes moved per image under attnbench/measure/traffic.py's model
    memory_ceiling: float  # the roofline's ceiling for that traffic, as a share of the GEMM rate
    load_before: list[float]
    load_after: list[float]
    backend: str = ""  # the backend the timed forward ran on (impl='auto' resolved)
    traffic_backend: str = ""  # the one the traffic count saw: a native kernel steps aside under its dispatch mode


def stage_module(stage: str) -> attentions.AttentionMechanism:
    """BiFormer-T's BRA layer at ``stage`` (random weights, eval mode)."""
    shape = PRESETS[stage]
    return attentions.create("bra", dim=shape.dim, num_heads=shape.heads, n_win=7, side_dwconv=5,
                             topk=STAGE_TOPK[stage]).eval()


def part_kernels(stage: str, group: int, generator: torch.Generator) -> dict[str, tuple[str, Callable[[], object]]]:
    """For each MAC part of BRA at ``stage``: (kernel name, a call doing that part's work for ``group`` images)."""
    shape, topk, n_win = PRESETS[stage], STAGE_TOPK[stage], 7
    c, heads = shape.dim, shape.heads
    tokens, regions = shape.height * shape.width, n_win * n_win
    per_region, head_dim = tokens // regions, c // heads

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator)

    x, w_qkv, b_qkv = randn(group * tokens, c), randn(3 * c, c), randn(3 * c)
    w_out, b_out = randn(c, c), randn(c)
    region_q, region_k = randn(group, regions, c), randn(group, c, regions)
    q = randn(group * regions, heads, per_region, head_dim)
    k, v = (randn(group * regions, heads, topk * per_region, head_dim) for _ in range(2))
    image = randn(group, c, shape.height, shape.width).contiguous(memory_format=torch.channels_last)
    w_lce, b_lce = randn(c, 1, 5, 5), randn(c)
    scale = head_dim ** -0.5

    def routing() -> object:
        return torch.bmm(region_q, region_k).topk(topk, dim=-1)

    def attention() -> object:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    # the dense backend's form: every token's query against every token, the routing as a block mask
    q_all = randn(group, heads, tokens, head_dim)
    k_all, v_all = randn(group, heads, tokens, head_dim), randn(group, heads, tokens, head_dim)
    routed = torch.zeros(group, regions, regions, dtype=torch.bool)
    routed.scatter_(2, torch.rand(group, regions, regions, generator=generator).topk(topk, dim=-1).indices, True)
    mask = routed.repeat_interleave(per_region, 1).repeat_interleave(per_region, 2)[:, None]

    def attention_dense() -> object:
        return F.scaled_dot_product_attention(q_all, k_all, v_all, attn_mask=mask, scale=scale)

    def attention_bmm() -> object:
        scores = torch.bmm(q.flatten(0, 1) * scale, k.flatten(0, 1).transpose(1, 2))
        return torch.bmm(scores.softmax(-1), v.flatten(0, 1))

    kernels = {
        "qkv": ("linear", lambda: F.linear(x, w_qkv, b_qkv)),
        "routing": ("bmm + topk", routing),
        "attention": ("scaled_dot_product_attention", attention),
        "attention (bmm)": ("bmm, softmax, bmm", attention_bmm),
        "attention (dense)": ("scaled_dot_product_attention, block mask", attention_dense),
        "out_proj": ("linear", lambda: F.linear(x, w_out, b_out)),
        "local_context": ("depthwise conv2d 5×5, channels_last", lambda: F.conv2d(image, w_lce, b_lce, padding=2,
                                                                                    groups=c)),
    }
    if not bra_native.build_reasons():  # the fused backend's native kernels (attentions/csrc/bra_routed.cpp)
        flat_q = q.transpose(1, 2).reshape(group, regions * per_region, c)
        flat_k, flat_v = (t.unflatten(0, (group, regions))[:, :, :, :per_region].transpose(2, 3).reshape(
            group, regions * per_region, c) for t in (k, v))
        rows = torch.arange(regions * per_region).view(regions, per_region)
        index = torch.rand(group, regions, regions, generator=generator).topk(topk, dim=-1).indices
        out, v_map, lce_out = torch.empty_like(flat_q), image.permute(0, 2, 3, 1), torch.zeros_like(image)

        def attention_native() -> None:
            bra_native.routed_attention(flat_q, flat_k, flat_v, out, rows, rows, index, heads, scale, threads=1)

        def local_context_native() -> None:
            bra_native.local_context_add(v_map, w_lce, b_lce, lce_out.permute(0, 2, 3, 1), threads=1)

        kernels["attention (native)"] = ("native routed attention, no gather", attention_native)
        kernels["local_context (native)"] = ("native depthwise 5×5, added in place", local_context_native)
    return kernels


# the MAC parts of attentions/bra.py each kernel does (the attention kernels do scores and values together)
# (a kernel named "part (variant)" is another way to do that part; the bound takes the fastest of each part)
KERNEL_PARTS = {"qkv": ("qkv",), "routing": ("routing",), "attention": ("attn_scores", "attn_values"),
                "out_proj": ("out_proj",), "local_context": ("local_context",)}


def part_of(kernel: str) -> str:
    """The part a kernel row does: 'attention (dense)' -> 'attention'."""
    return kernel.split(" (")[0]


def measure_parts(stage: str, max_group: int, thread_gemm: float) -> list[PartRow]:
    """Every kernel of ``stage`` at one thread, best group of at most ``max_group`` images; every attention kernel
    is kept in the rows (the bound uses the fastest)."""
    parts = stage_module(stage).macs(PRESETS[stage].height, PRESETS[stage].width).parts
    generator = torch.Generator().manual_seed(0)
    best: dict[str, PartRow] = {}

    def measure() -> None:
        with torch.inference_mode():
            for group in (g for g in GROUPS if g <= max_group):
                for name, (kernel, call) in part_kernels(stage, group, generator).items():
                    latency = measure_latency(call, torch.device("cpu"), **_KERNEL_TIMING)
                    macs = sum(parts[part] for part in KERNEL_PARTS[part_of(name)])
                    per_image = latency.median_s / group
                    if name not in best or per_image < best[name].us_per_image * 1e-6:
                        best[name] = PartRow(stage, name, kernel, macs, group, per_image * 1e6,
                                             latency.iqr_s / latency.median_s,
                                             2 * macs / per_image / thread_gemm)

    _one_thread(measure)
    return list(best.values())


def _one_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` with one intra-op thread, the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def bound(rows: list[PartRow], thread_gemm: float) -> float:
    """The kernel bound of one stage's rows: its FLOPs over the summed best times, as a fraction of the one-thread
    GEMM rate (the fastest kernel of each part counts)."""
    chosen = [min((row for row in rows if part_of(row.part) == part), key=lambda row: row.us_per_image)
              for part in dict.fromkeys(part_of(row.part) for row in rows)]
    flops = sum(2 * row.macs_per_image for row in chosen)
    return flops / (sum(row.us_per_image for row in chosen) * 1e-6) / thread_gemm


def measure_ours(stage: str, batch: int, gemm_rate: float, bandwidth: float) -> OursRow:
    """Our default BRA forward at ``stage`` and ``batch``, eval and inference_mode, at the process's threads; its
    traffic (counted on two images) and the memory ceiling that traffic sets at copy ``bandwidth``."""
    module = stage_module(stage)
    shape = PRESETS[stage]
    x = torch.randn(batch, shape.height, shape.width, shape.dim, generator=torch.Generator().manual_seed(1))
    before = load_average()
    with torch.inference_mode():
        latency = measure_latency(lambda: module(x), torch.device("cpu"), min_samples=7, max_time_s=6.0)
        with by_image.no_workers():
            whole = measure_latency(lambda: module(x), torch.device("cpu"), min_samples=7, max_time_s=6.0)
        backend = module.last_backend
        traffic = count_traffic(lambda: module(x[:2])).total / 2
    flops = 2 * module.macs(shape.height, shape.width).total
    return OursRow(stage, batch, latency.median_s * 1e3, latency.iqr_s / latency.median_s,
                   flops * batch / latency.median_s / gemm_rate, whole.median_s * 1e3, whole.iqr_s / whole.median_s,
                   traffic, attainable_fraction(flops, traffic, bandwidth, gemm_rate), before, load_average(),
                   backend, module.last_backend)


def render(parts: list[PartRow], ours: list[OursRow], run: dict[str, Any]) -> str:
    """The markdown report: the bound and ours per stage, then every kernel."""
    threads, gemm, thread_gemm = run["threads"], run["gemm_flops_per_s"], run["one_thread_gemm_flops_per_s"]
    summary = []
    for stage in dict.fromkeys(row.stage for row in parts):
        stage_bound = bound([row for row in parts if row.stage == stage], thread_gemm)
        for row in (row for row in ours if row.stage == stage):
            flag, whole_flag = (" ⚠" if spread > UNSTABLE_SPREAD else "" for spread in (row.spread, row.whole_spread))
            summary.append([stage, row.batch, f"{stage_bound:.0%}", row.backend, f"{row.ms:.1f}{flag}",
                            f"{row.gemm_fraction:.0%}{flag}", f"{row.gemm_fraction / stage_bound:.0%}",
                            f"{row.whole_ms:.1f}{whole_flag}", f"{row.whole_ms / row.ms:.2f}×",
                            f"{row.traffic_per_image / 1e6:.1f}"
                            + (f" ({row.traffic_backend})" if row.traffic_backend != row.backend else ""),
                            f"{row.memory_ceiling:.0%}",
                            f"{row.load_before} → {row.load_after}"])
    kernels = [[row.stage, row.part, row.kernel, f"{row.macs_per_image / 1e6:.2f}", row.group,
                f"{row.us_per_image:.0f}" + (" ⚠" if row.spread > UNSTABLE_SPREAD else ""),
                f"{row.fraction_of_thread_gemm:.0%}"] for row in parts]
    env = run["environment"]
    return "\n".join([
        "# BRA's kernel bound: how near the GEMM rate its ATen kernels allow (CPU)",
        "",
        f"Measured with `{run['command']}` (method: attnbench/kernel_bound.py). Dense {GEMM_SIZE}³ GEMM rate in this "
        f"process: {gemm / 1e9:.1f} GFLOP/s at {threads} threads, {thread_gemm / 1e9:.1f} at one (the best of "
        f"{_rates(run['gemm_tries'])} and of {_rates(run['one_thread_gemm_tries'])}, measured first). Copy "
        f"bandwidth (read + written, {COPY_BYTES // 2**20} MiB tensors): {run['copy_bytes_per_s'] / 1e9:.1f} GB/s "
        f"at {threads} threads (the best of {_rates(run['copy_tries'])}).",
        "",
        tabulate(summary, headers=["stage", "batch", "kernel bound", "ours' backend", "ours ms", "ours / GEMM rate",
                                   "ours / bound", "ours without workers, ms", "workers' speed-up",
                                   "ours' traffic, MB / image",
                                   "memory ceiling", "load average before → after"],
                 tablefmt="github"),
        "",
        "*kernel bound*: the share of the one-thread GEMM rate that a BRA running only its kernels below, back to "
        "back, would reach (the fastest kernel of each part counts, the native ones of the fused backend "
        "included); on worker threads that scale as the GEMM does, "
        f"the share of the {threads}-thread rate. No BRA made of these kernels can exceed it here. *ours*: the "
        "default BRA (impl='auto', eval, inference_mode) in the same "
        f"process, useful FLOP/s (the MACs attentions/bra.py counts) over the {threads}-thread GEMM rate; *without "
        "workers*: the "
        "same module and input under `attentions.by_image.no_workers()` (the batch whole on the caller's "
        f"{threads} threads), timed right after. *ours' traffic*: the bytes our forward's ATen ops read and write "
        "per image if each streamed its inputs and outputs through memory once (attnbench/measure/traffic.py; "
        "what a fused kernel would not move; the native kernel of the fused backend is invisible to the count, "
        "which then follows the backend auto takes instead, named in brackets); *memory ceiling*: the roofline's "
        "ceiling for that traffic at the "
        "copy bandwidth, min(1, FLOPs ÷ bytes × bandwidth ÷ GEMM rate): below 100%, ours could not reach the "
        "GEMM rate without moving fewer bytes. ⚠: spread (IQR ÷ median) above "
        f"{UNSTABLE_SPREAD:.0%}, printed, not trusted.",
        "",
        "Every kernel alone, one intra-op thread, best group of images (*group*):",
        "",
        tabulate(kernels, headers=["stage", "part", "kernel", "useful MMACs / image", "group", "µs / image",
                                   "useful FLOP/s ÷ one-thread GEMM rate"], tablefmt="github"),
        "",
        f"Device {env['device']} ({env.get('device_name')}), {threads} threads, torch {env['torch']}, "
        f"allocator {env.get('allocator', 'not recorded')}, huge pages: {env.get('huge_pages', 'not recorded')}, "
        f"attnbench {env['git_sha'][:12]}{' (uncommitted changes)' if env.get('git_dirty') is True else ''}, "
        f"started {run['started']}.",
        "",
    ])


def _rates(tries: list[float]) -> str:
    return ", ".join(f"{rate / 1e9:.1f}" for rate in tries)


def run(out: Path, stages: list[str], batches: list[int], command: str) -> tuple[list[PartRow], list[OursRow]]:
    """Measure the kernels of ``stages`` and ours at ``batches``; rows.jsonl, run.json and report.md in ``out``
    (a fresh directory: the measurement takes minutes, so it is not resumed)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    run_info = {"command": command, "threads": threads, "environment": environment("cpu"),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                # the best of GEMM_TRIES: a rate depressed by a passing neighbour would inflate every fraction
                "gemm_tries": [gemm_flops_per_s(torch.device("cpu"), torch.float32) for _ in range(GEMM_TRIES)],
                "one_thread_gemm_tries": _one_thread(lambda: [gemm_flops_per_s(torch.device("cpu"), torch.float32)
                                                              for _ in range(GEMM_TRIES)])}
    run_info["copy_tries"] = copy_bandwidth()
    run_info["copy_bytes_per_s"] = max(run_info["copy_tries"])
    run_info["gemm_flops_per_s"] = max(run_info["gemm_tries"])
    run_info["one_thread_gemm_flops_per_s"] = max(run_info["one_thread_gemm_tries"])
    (out / "run.json").write_text(json.dumps(run_info, indent=2))
    parts: list[PartRow] = []
    ours: list[OursRow] = []
    with (out / "rows.jsonl").open("a") as handle:
        for stage in stages:
            stage_parts = measure_parts(stage, max(1, min(batches) // threads), run_info["one_thread_gemm_flops_per_s"])
            stage_ours = [measure_ours(stage, batch, run_info["gemm_flops_per_s"], run_info["copy_bytes_per_s"])
                          for batch in batches]
            for row in (*stage_parts, *stage_ours):
                handle.write(json.dumps({"kind": type(row).__name__, **asdict(row)}) + "\n")
            handle.flush()
            parts += stage_parts
            ours += stage_ours
            stage_bound = bound(stage_parts, run_info["one_thread_gemm_flops_per_s"])
            print(f"{stage}: kernel bound {stage_bound:.0%}; ours "
                  + ", ".join(f"b{row.batch} {row.gemm_fraction:.0%}" for row in stage_ours), flush=True)
    (out / "report.md").write_text(render(parts, ours, run_info))
    return parts, ours

