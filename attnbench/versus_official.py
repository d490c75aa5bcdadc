"""``python -m attnbench versus-official ROOT``: our BRA and BiFormer models against the official code, in one process.

The official code (a checkout of rayleizhu/BiFormer at ROOT: ``ops/bra_legacy.py``, ``models/biformer.py``; it needs
einops, and fairscale for the models) is imported from ROOT, never copied here. Each comparison builds the official
module and ours with the same weights (the official state_dict loaded into ours with ``strict=True``), checks that
they compute the same function (float64: outputs and every gradient within ``FLOAT64_TOLERANCE``; float32 outputs
within ``FLOAT32_TOLERANCE`` for a layer; relative to the output's largest magnitude), and only then times them
**interleaved**: every round calls each side once, alternating which goes first, so load that comes and goes on the
machine falls on both sides alike. The speed-up is the median over rounds of the per-round ratio official ÷ ours,
with its inter-quartile range; a side whose own spread (IQR ÷ median) exceeds ``UNSTABLE_SPREAD`` is flagged.

Layers are BiFormer-T's BRA stages 1–3 at 224² (attnbench/presets.py) with the options the official model gives
them (models/biformer.py: n_win 7, top-k 1/4/16, LCE 5, qk_dim = dim; its stage 4 is dense attention with LePE, not
BRA, and is compared within the models); for them the report also gives our forward's useful FLOP/s
(attentions/bra.py's MAC count) as a fraction of the dense GEMM rate measured in the same process. Models are
BiFormer-T/S: inference, and one training step (forward, cross-entropy, backward, AdamW) with an optimizer per side.
The float64 check runs forward and backward in train mode, the float32 check forward in eval mode, the modes the
rows are timed in. On CUDA our ``impl='auto'`` may time xFormers, whose backward has no float64 kernels to check.

Rows are appended to ``rows.jsonl`` as they are measured, so a killed run keeps them and a rerun into the same
directory skips them; ``run.json`` keeps the conditions of the first run (device, threads, rounds, the official
checkout) and a rerun under others is refused. ``report.md`` is written at the end. Importing the official models
re-registers ``biformer_*`` in timm's registry (theirs replaces ours) for the rest of the process: the command is a
process of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from .env import environment, git_output, load_average
from .measure import backends_used
from .measure.gemm import gemm_flops_per_s
from .measure.traffic import count_traffic
from .presets import BIFORMER_T_TOPK, PRESETS

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5
UNSTABLE_SPREAD = 0.10
MIN_ROUNDS = 4  # below this the quartiles of the rounds are no spread at all
# the BRA stages of BiFormer-T (the official stage 4, top-k -2, is dense attention with LePE: timed in the models)
STAGE_TOPK = {stage: topk for stage, topk in BIFORMER_T_TOPK.items() if stage != "biformer_t.stage4"}
MODELS = ("biformer_tiny", "biformer_small")


class OfficialCodeError(RuntimeError):
    """The official code could not be imported from the given root."""


class NotTheSameFunction(AssertionError):
    """Ours does not compute what the official code computes: nothing is timed."""


@dataclass
class Row:
    """One comparison: what (layer or model), its size, the two medians, the paired ratio, our roofline."""

    what: str
    name: str
    batch: int
    mode: str
    dtype: str
    official_ms: float
    ours_ms: float
    official_spread: float  # IQR / median of the side's own rounds
    ours_spread: float
    speedup: float  # median over rounds of official ÷ ours
    speedup_iqr: tuple[float, float]
    rounds: int
    max_difference: float  # float32 forward, relative to the output's largest magnitude
    ours_gemm_fraction: float | None  # forward: our useful FLOP/s ÷ the same process's GEMM rate
    load_before: list[float] | None
    load_after: list[float] | None
    # forward: MB each side's ATen ops move per image under attnbench/measure/traffic.py's model (official, ours)
    traffic_mb_per_image: tuple[float, float] | None = None
    # BRA backends our timed forward ran on, and those our traffic count saw (a native kernel steps aside under it)
    ours_backends: tuple[str, ...] = ()
    traffic_backends: tuple[str, ...] = ()
    useful_flops_per_image: float | None = None  # forward: 2 × the MACs of the function both sides compute

    def gemm_share(self, side_ms: float, gemm_rate: float | None) -> float | None:
        """A side's useful FLOP/s ÷ the GEMM rate (forward rows), from its median time."""
        if self.useful_flops_per_image is None or not gemm_rate:
            return None
        return self.useful_flops_per_image * self.batch / (side_ms * 1e-3) / gemm_rate

    @property
    def key(self) -> str:
        return f"{self.what}/{self.name}/b{self.batch}/{self.mode}/{self.dtype}"



@contextlib.contextmanager
def _on_path(root: Path) -> Iterator[None]:
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def official_module(root: Path, module: str) -> Any:
    """Import ``module`` (``ops.bra_legacy`` or ``models.biformer``) from the official checkout at ``root``."""
    if not (root / "ops" / "bra_legacy.py").is_file():
        raise OfficialCodeError(f"{root}: not a checkout of rayleizhu/BiFormer (no ops/bra_legacy.py)")
    top = module.split(".")[0]
    for name in [name for name in sys.modules if name == top or name.startswith(top + ".")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not Path(origin).resolve().is_relative_to(root.resolve()):
            del sys.modules[name]  # a package of that name from elsewhere (another checkout, another project)
    with _on_path(root), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation and registry-overwrite warnings
        try:
            return importlib.import_module(module)
        except ImportError as error:
            raise OfficialCodeError(f"{root}: importing the official {module} failed: {error} "
                                    "(it needs einops, and fairscale for the models: pip install einops fairscale)"
                                    ) from error


def official_commit(root: Path) -> str:
    return git_output("rev-parse", "HEAD", root=root) or "unknown (not a git checkout)"


def _layer_options(preset: str) -> dict[str, int]:
    """The official BiFormer-T options of a stage's BRA layer (models/biformer.py, biformer_tiny)."""
    return {"n_win": 7, "topk": STAGE_TOPK[preset], "side_dwconv": 5}


def _layer_pair(root: Path, preset: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    shape = PRESETS[preset]
    official = official_module(root, "ops.bra_legacy").BiLevelRoutingAttention(shape.dim, shape.heads,
                                                                               **_layer_options(preset))
    ours = _our_layer(preset)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official.to(dtype), ours.to(dtype)


def _model_pair(root: Path, name: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    from .models import biformer

    official = getattr(official_module(root, "models.biformer"), name)()
    ours = getattr(biformer, name)()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official.to(dtype), ours.to(dtype)


@functools.cache
def useful_flops_per_image(what: str, name: str) -> float:
    """2 × the MACs of one image's forward: a layer's from attentions/bra.py's count, a model's counted by
    attnbench/measure/flops.py on our model (its useful multiply-adds, the same for the official one)."""
    if what == "layer":
        shape = PRESETS[name]
        return float(_our_layer(name).macs(shape.height, shape.width).flops)
    from .measure.flops import count_flops
    from .models import biformer

    model = getattr(biformer, name)().eval()
    with torch.no_grad():
        return float(count_flops(lambda: model(torch.randn(1, 3, 224, 224))).flops)


def _our_layer(preset: str) -> nn.Module:
    from attentions.registry import create

    shape = PRESETS[preset]
    return create("bra", shape.dim, shape.heads, **_layer_options(preset))


def _input(what: str, name: str, batch: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if what == "layer":
        shape = PRESETS[name]
        return torch.randn(batch, shape.height, shape.width, shape.dim, generator=generator, dtype=dtype)
    return torch.randn(batch, 3, 224, 224, generator=generator, dtype=dtype)


def _largest_difference(official: nn.Module, ours: nn.Module, x: torch.Tensor, backward: bool) -> float:
    """The largest normwise relative difference (∞-norm) of the outputs and, with ``backward``, of the input's
    gradient and of the parameters' gradients taken as one vector (so a gradient that is zero by construction, a
    bias before a norm, is judged on the scale of the others, not on its own rounding noise); train mode with
    ``backward``, else eval mode."""
    sides = []
    for module in (official, ours):
        module.train(backward)
        module.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_(backward)
        out = module(leaf)
        groups = {"output": out.detach()}
        if backward:
            # a random seed, the same for both: the sum of the logits has no gradient through train-mode BatchNorm
            seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
            out.backward(seed.to(out.device))
            params = dict(module.named_parameters())  # matched by name: the two register them in other orders
            missing = [name for name in sorted(params) if params[name].grad is None]
            groups["input gradient"] = leaf.grad
            groups["parameter gradients"] = torch.cat([params[name].grad.flatten() for name in sorted(params)
                                                       if name not in missing])
            groups["parameters without a gradient"] = missing
        sides.append(groups)
    if backward and sides[0].pop("parameters without a gradient") != sides[1].pop("parameters without a gradient"):
        return float("inf")
    return max(((sides[0][key] - sides[1][key]).abs().max()
                / sides[0][key].abs().max().clamp(min=torch.finfo(x.dtype).tiny)).item() for key in sides[0])


def check_same_function(official: nn.Module, ours: nn.Module, x: torch.Tensor, tolerance: float,
                        backward: bool) -> float:
    """The largest relative difference on ``x``; ``NotTheSameFunction`` if it exceeds ``tolerance``."""
    with torch.set_grad_enabled(backward):
        difference = _largest_difference(official, ours, x, backward)
    if not difference <= tolerance:
        raise NotTheSameFunction(f"outputs differ: largest relative difference {difference:.3g} > {tolerance:g} "
                                f"({x.dtype}, {'forward and backward' if backward else 'forward'})")
    return difference


def _step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One call of ``mode`` on ``module``: forward (no grad, eval mode), forward+backward, or (models) an AdamW
    training step (train mode)."""
    module.train(mode != "forward")
    if mode == "forward":
        def forward() -> None:
            with torch.no_grad():
                module(x)
        return forward
    if mode == "forward_backward":
        seed = None

        def forward_backward() -> None:
            nonlocal seed
            module.zero_grad(set_to_none=True)
            out = module(x)
            seed = torch.randn_like(out) if seed is None else seed
            out.backward(seed)
        return forward_backward
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    labels = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(x), labels).backward()
        optimizer.step()
    return train_step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(first: Callable[[], None], second: Callable[[], None], rounds: int, warmup: int,
                      device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds of each call of ``first`` and ``second``, ``rounds`` rounds after ``warmup``; the order alternates."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_index in range(warmup + rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for side in order:
            _synchronize(device)
            start = time.perf_counter()
            (first, second)[side]()
            _synchronize(device)
            if round_index >= warmup:
                times[side].append(time.perf_counter() - start)
    return times


def _quartiles(samples: list[float]) -> tuple[float, float]:
    """First and third quartile, interpolated within the samples (never beyond them)."""
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def _spread(samples: list[float]) -> float:
    low, high = _quartiles(samples)
    return (high - low) / statistics.median(samples)


def compare(root: Path, what: str, name: str, batch: int, mode: str, dtype: torch.dtype, device: torch.device,
            rounds: int, warmup: int, gemm_rate: float | None) -> Row:
    """Check, then time, one comparison (``what``: 'layer' with a BiFormer-T stage preset, or 'model')."""
    pair = _layer_pair if what == "layer" else _model_pair
    generator = torch.Generator().manual_seed(0)
    check_batch = min(batch, 2)
    official, ours = (module.to(device) for module in pair(root, name, torch.float64))
    check_same_function(official, ours, _input(what, name, check_batch, torch.float64, generator).to(device),
                        FLOAT64_TOLERANCE, backward=True)
    official, ours = (module.to(device).to(dtype) for module in (official, ours))
    x = _input(what, name, batch, dtype, generator).to(device)
    if what == "layer":
        difference = check_same_function(official, ours, x[:check_batch], FLOAT32_TOLERANCE, backward=False)
    else:  # a deep model's float32 rounding is reported, not bounded: float64 above is the check
        with torch.no_grad():
            difference = _largest_difference(official, ours, x[:check_batch], backward=False)
    load_before = load_average()
    official_times, our_times = interleaved_times(_step(official, x, mode), _step(ours, x, mode), rounds, warmup,
                                                  device)
    ratios = [a / b for a, b in zip(official_times, our_times, strict=True)]
    ours_backends = traffic_backends = tuple(backends_used(ours))
    traffic = None
    if mode == "forward":
        traffic = tuple(count_traffic(_step(module, x[:check_batch], mode)).total / check_batch / 1e6
                        for module in (official, ours))
        traffic_backends = tuple(backends_used(ours))
    flops = useful_flops_per_image(what, name) if mode == "forward" else None
    fraction = flops * batch / statistics.median(our_times) / gemm_rate if flops is not None and gemm_rate else None
    return Row(what, name, batch, mode, str(dtype).removeprefix("torch."), 1e3 * statistics.median(official_times),
               1e3 * statistics.median(our_times), _spread(official_times), _spread(our_times),
               statistics.median(ratios), _quartiles(ratios), rounds, difference, fraction, load_before,
               load_average(), traffic, ours_backends, traffic_backends, flops)


def render(rows: list[Row], run: dict[str, Any]) -> str:
    """The markdown report: one table, then the conditions it was measured in."""
    table = []
    for row in rows:
        official_flag, our_flag = (" ⚠" if spread > UNSTABLE_SPREAD else "" for spread in (row.official_spread,
                                                                                          row.ours_spread))
        official_share, ours_share = (row.gemm_share(ms, run["gemm_flops_per_s"]) for ms in (row.official_ms,
                                                                                             row.ours_ms))
        table.append([row.what, row.name, row.batch, row.mode, row.dtype, f"{row.official_ms:.1f}{official_flag}",
                      f"{row.ours_ms:.1f}{our_flag}",
                      f"{row.speedup:.2f}× [{row.speedup_iqr[0]:.2f}, {row.speedup_iqr[1]:.2f}]"
                      + (" ⚠" if official_flag or our_flag else ""),
                      _fraction_text(official_share), _fraction_text(ours_share),
                      "–" if official_share is None else f"{1 / official_share:.2f}×",
                      _traffic_text(row.traffic_mb_per_image)
                      + (f" ({'+'.join(row.traffic_backends)})" if row.traffic_backends != row.ours_backends else ""),
                      f"{row.max_difference:.1e}", f"{row.load_before} → {row.load_after}"])
    env = run["environment"]
    return "\n".join([
        "# attnbench against the official BiFormer code, one process, interleaved",
        "",
        f"Measured with `{run['command']}`. Official code: {run['official_root']} at {run['official_commit']} "
        "(rayleizhu/BiFormer; imported, not copied). Every row was first checked to compute the same function "
        f"(float64 outputs and gradients within {FLOAT64_TOLERANCE:g}; float32 layer outputs within "
        f"{FLOAT32_TOLERANCE:g}; each relative to the official tensor's largest magnitude), then timed in "
        f"{run['rounds']} interleaved rounds after {run['warmup']} warm-up rounds.",
        "",
        tabulate(table, headers=["what", "name", "batch", "mode", "dtype", "official ms", "ours ms",
                                 "speed-up (median of per-round ratios [IQR])", "official / GEMM rate",
                                 "ours / GEMM rate", "speed-up at the GEMM rate",
                                 "traffic official / ours, MB per image", "float32 difference",
                                 "load average before → after"], tablefmt="github"),
        "",
        f"⚠: the side's own spread (IQR ÷ median of its rounds) exceeded {UNSTABLE_SPREAD:.0%} (on the speed-up: "
        "either side's): the figure is printed, not trusted. *official / GEMM rate*, *ours / GEMM rate*: a side's "
        "forward useful FLOP/s (2 × the MACs attentions/bra.py counts for a layer, attnbench/measure/flops.py counts "
        f"for a model, at its median time) over the dense {run['gemm_size']}³ GEMM rate measured in the same process "
        + ("(not measured: no forward row in this run)" if run["gemm_flops_per_s"] is None
           else f"({run['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s)")
        + "; *speed-up at the GEMM rate*: the speed-up ours would have if it ran at the GEMM rate (GEMM rate ÷ "
        "official's useful FLOP/s), the most any implementation built on this machine's GEMM could show"
        + ". *traffic*: the bytes each side's ATen ops read and write per image in forward, if each op streamed its "
        "inputs and outputs through memory once (attnbench/measure/traffic.py); BRA's native kernel (the fused "
        "backend) is invisible to the count, so ours is then counted on the backends auto takes instead, named in "
        "brackets. A model's float32 difference is "
        "reported, not bounded (float64 is the check).",
        "",
        f"Device {env['device']} ({env.get('device_name')}), {run['threads']} threads, torch {env['torch']}, "
        f"allocator {env.get('allocator', 'not recorded')}, huge pages: {env.get('huge_pages', 'not recorded')}, "
        f"attnbench {env['git_sha'][:12]}{' (uncommitted changes)' if env.get('git_dirty') is True else ''}, "
        f"started {run['started']}.",
        "",
    ])


def _traffic_text(traffic: tuple[float, float] | None) -> str:
    return "–" if traffic is None else f"{traffic[0]:.1f} / {traffic[1]:.1f}"


def _fraction_text(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    return f"{fraction:.0%}" + (" ⚠ above the GEMM rate: cannot be right" if fraction > 1 else "")


def run(root: Path, out: Path, layers: list[str], models: list[str], batches: list[int], modes: list[str],
        model_modes: list[str], device: torch.device, rounds: int, warmup: int, command: str) -> list[Row]:
    """Every comparison asked for, float32, appended to ``out``/rows.jsonl as measured (rows already there are kept,
    not measured again); ``out``/report.md at the end. ``OfficialCodeError`` if ``out`` holds rows measured under
    other conditions."""
    if rounds < MIN_ROUNDS or warmup < 1:
        raise OfficialCodeError(f"--rounds {rounds} --warmup {warmup}: needs at least {MIN_ROUNDS} rounds (a spread) "
                                "and 1 warm-up round (first-call costs)")
    dtype = torch.float32
    out.mkdir(parents=True, exist_ok=True)
    conditions = {"official_root": str(root.resolve()), "official_commit": official_commit(root),
                  "device": str(device), "threads": torch.get_num_threads(), "rounds": rounds, "warmup": warmup}
    run_path, rows_path = out / "run.json", out / "rows.jsonl"
    run_info = json.loads(run_path.read_text()) if run_path.exists() else {}
    differing = [f"{key} {run_info[key]} then, {value} now" for key, value in conditions.items()
                 if run_info and run_info.get(key) != value]
    if differing:
        raise OfficialCodeError(f"{out}: its rows were measured under other conditions ({'; '.join(differing)}); "
                                "choose another --out")
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            values = json.loads(line)
            values["speedup_iqr"] = tuple(values["speedup_iqr"])
            if values.get("traffic_mb_per_image") is not None:
                values["traffic_mb_per_image"] = tuple(values["traffic_mb_per_image"])
            for key in ("ours_backends", "traffic_backends"):
                values[key] = tuple(values.get(key, ()))
            if values["mode"] == "forward" and values.get("useful_flops_per_image") is None:  # rows of older runs
                values["useful_flops_per_image"] = useful_flops_per_image(values["what"], values["name"])
            row = Row(**values)
            done[row.key] = row
    plan = [("layer", name, batch, mode) for name in layers for batch in batches for mode in modes]
    plan += [("model", name, batch, mode) for name in models for batch in batches for mode in model_modes]
    keys = [f"{what}/{name}/b{batch}/{mode}/float32" for what, name, batch, mode in plan]
    if not run_info:
        run_info = {**conditions, "command": command, "gemm_size": 2048, "gemm_flops_per_s": None,
                    "environment": environment(device.type),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    pending_forward = any(key not in done for key in keys if key.endswith("/forward/float32"))
    if run_info["gemm_flops_per_s"] is None and pending_forward:
        run_info["gemm_flops_per_s"] = gemm_flops_per_s(device, dtype)
    run_path.write_text(json.dumps(run_info, indent=2))
    rows = []
    for (what, name, batch, mode), key in zip(plan, keys, strict=True):
        if key not in done:
            done[key] = compare(root, what, name, batch, mode, dtype, device, rounds, warmup,
                                run_info["gemm_flops_per_s"])
            with rows_path.open("a") as handle:
                handle.write(json.dumps(asdict(done[key])) + "\n")
            print(f"{key}: official {done[key].official_ms:.1f} ms, ours {done[key].ours_ms:.1f} ms, "
                  f"{done[key].speedup:.2f}×", flush=True)
        rows.append(done[key])
    (out / "report.md").write_text(render(rows, run_info))
    return rows
