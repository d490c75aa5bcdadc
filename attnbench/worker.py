"""One case, measured in a process of its own (started with ``spawn`` by the runner).

A case of kind ``accuracy`` is handed to ``attnbench.train`` (train, score, then size and speed of the trained
model); the rest of this module measures mechanisms and models.

The worker builds the mechanism through the registry, checks it (finite output, agreement with its float64
plain path), then runs the suite's measures: memory, parameters, FLOPs and latency. Whatever happens is
written as one JSON result file; a worker that dies writes nothing and the runner records why.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attentions

from .measure.correctness import check_against_reference, plain_copy
from .measure.flops import count_flops
from .measure.latency import measure_latency
from .measure.memory import measure_peak_memory
from .measure.params import count_parameters, state_bytes


class CaseFailure(Exception):
    """A case that ends with a status other than ok or error."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _finite(*tensors: torch.Tensor | None) -> bool:
    return all(tensor is None or bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _under_dispatch_mode(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a measure that watches the step through a torch dispatch mode (CPU memory, FLOP counting). A
    compiled kernel refuses to run under one (torch.compile: "non-infra torch dispatch mode present"); the
    measure is then recorded as unmeasured, with the reason, and the case goes on to be timed."""
    try:
        return measure()
    except Exception as error:
        if _is_out_of_memory(error):
            raise
        return {"unmeasured": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def build_step(module: torch.nn.Module, x: torch.Tensor, mode: str):
    """The callable that is measured: an inference forward, or forward + backward with a fixed gradient."""
    if mode == "forward":
        module.eval()

        def forward():
            with torch.inference_mode():
                return module(x)
        return forward
    module.train()
    x.requires_grad_(True)
    with torch.no_grad():
        grad_output = torch.randn_like(module(x))

    def forward_backward():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        out.backward(grad_output)
        return out
    return forward_backward


def build_subject(config: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module a case measures and its random input: a mechanism on (B, H, W, C), or a model on
    (B, 3, H, W)."""
    generator = torch.Generator().manual_seed(config["seed"])
    batch, height, width, dim = config["batch"], config["height"], config["width"], config["dim"]
    if config["kind"] == "model":
        import timm

        from . import models  # noqa: F401  (registers BiFormer's models with timm)

        return timm.create_model(config["mechanism"], **config["options"]), torch.randn(
            batch, dim, height, width, generator=generator)
    module = attentions.create(config["mechanism"], dim=dim, num_heads=config["heads"], **config["options"])
    return module, torch.randn(batch, height, width, dim, generator=generator)


def analytic_cost(module: attentions.AttentionMechanism, config: dict[str, Any]) -> dict[str, Any]:
    """The mechanism's own MAC count (batch included) and the keys each query attends to."""
    analytic = module.macs(config["height"], config["width"]).scaled(config["batch"])
    try:
        keys = module.keys_per_query(config["height"], config["width"])
    except NotImplementedError:
        keys = None
    return {"analytic_macs": analytic.total, "analytic_flops": analytic.flops, "analytic_parts": analytic.parts,
            "analytic_counter_blind": sorted(analytic.counter_blind), "keys_per_query": keys,
            "density": keys / (config["height"] * config["width"]) if keys is not None else None}


def run_case(config: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    for module_name in config["imports"]:
        importlib.import_module(module_name)
    device = torch.device(config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaseFailure("unsupported", "device cuda: CUDA is not available on this machine")
    if config["kind"] == "accuracy":
        from .train import run_accuracy_case

        return {"status": "ok", "message": "", "metrics": run_accuracy_case(config, config.get("checkpoint_dir"))}
    dtype = getattr(torch, config["dtype"])
    module, x = build_subject(config)
    reasons = module.not_supported_reasons(device, dtype) if hasattr(module, "not_supported_reasons") else []
    if reasons:
        raise CaseFailure("unsupported", "; ".join(reasons))
    module = module.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    step = build_step(module, x, config["mode"])
    measures, metrics = config["measures"], {}

    if "memory" in measures:
        metrics["memory"] = _under_dispatch_mode(
            lambda: measure_peak_memory(step, device, state_bytes(module, x)).summary())
    out = step()
    if not _finite(out, x.grad, *(p.grad for p in module.parameters())):
        raise CaseFailure("nan", "the output or a gradient has NaN or Inf on random input")
    if config["check_correctness"]:
        agreement = check_against_reference(module, x[:1].detach())
        metrics["correctness"] = agreement.summary()
        if not agreement.ok:
            raise RuntimeError(f"output differs from the float64 plain path by {agreement.max_abs_error:.3g} "
                               f"(tolerance {agreement.tolerance:g} × {agreement.reference_scale:.3g})")
    if "params" in measures:
        metrics["params"] = count_parameters(module)
    if "flops" in measures:
        def counted_flops() -> dict[str, Any]:
            # a model's FLOPs are counted on the plain path of its mechanisms: the useful multiply-adds, the
            # paper's convention, whichever backend is timed (BRA's dense backend also spends masked ones)
            counted = count_flops(step if config["kind"] == "attention" else
                                  build_step(plain_copy(module), x.detach().clone(), config["mode"]))
            return {"counted_flops": counted.flops, "counted_by_op": counted.by_op,
                    "uncounted_ops": counted.uncounted_ops}
        metrics["flops"] = _under_dispatch_mode(counted_flops)
        if config["kind"] == "attention":
            metrics["flops"].update(analytic_cost(module, config))
    if "latency" in measures:
        latency = measure_latency(step, device, **config["repeats"])
        summary = latency.summary()
        summary["images_per_s"] = config["batch"] / latency.median_s
        summary["tokens_per_s"] = config["batch"] * config["height"] * config["width"] / latency.median_s
        metrics["latency"] = summary
    return {"status": "ok", "message": "", "metrics": metrics}


def run_case_safely(config: dict[str, Any]) -> dict[str, Any]:
    """``run_case`` with every failure turned into a result with a status (never raises)."""
    started = time.time()
    try:
        result = run_case(config)
    except CaseFailure as failure:
        result = {"status": failure.status, "message": str(failure), "metrics": {}}
    except NotImplementedError as error:  # a backend that cannot run this input says why (xFormers' convention)
        result = {"status": "unsupported", "message": str(error).splitlines()[0], "metrics": {}}
    except Exception as error:  # recorded, never raised: the suite goes on
        status = "oom" if _is_out_of_memory(error) else "error"
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        result = {"status": status, "message": message, "metrics": {}, "traceback": traceback.format_exc()}
    result["worker"] = {"threads": torch.get_num_threads(), "pid": os.getpid(), "duration_s": time.time() - started}
    return result


def worker_main(config: dict[str, Any], result_path: str) -> None:
    """Entry point of the case process: always leaves a result file unless the process itself dies."""
    result = run_case_safely(config)
    temporary = Path(result_path).with_suffix(".tmp")
    temporary.write_text(json.dumps(result, default=str))
    temporary.replace(result_path)
