"""Runs a suite: every case in a fresh ``spawn`` process with a timeout, one record per case, resumable.

``<results-dir>/<suite>/<run>/`` holds ``run.json`` (the suite, profile, environment and the machine's GEMM
rates measured at the start) and ``records.jsonl``. Running the same suite into the same run directory
skips the cases already recorded and runs the rest, including one whose process was killed half-way.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cases import Case
from .env import environment
from .measure.gemm import gemm_flops_per_s
from .records import Record, RecordStore, Result
from .status import Status
from .suite import Suite, expand
from .worker import run_case_safely, worker_main


@dataclass
class RunSummary:
    run_dir: Path
    total: int
    skipped: int
    statuses: dict[str, int]
    seconds: float


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def execute_case(case: Case, checkpoint_dir: Path | None = None) -> Result:
    """Run one case in its own process; always returns a result with a status. A training case keeps its
    per-epoch checkpoints in ``checkpoint_dir``, so a rerun after a kill resumes it."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="attnbench-case-") as scratch:
        result_path = Path(scratch) / "result.json"
        process = context.Process(target=worker_main, daemon=True, args=(
            case.model_dump(mode="json"), str(checkpoint_dir) if checkpoint_dir else None, str(result_path)))
        process.start()
        process.join(case.timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
            return Result(status=Status.TIMEOUT, message=f"no result within timeout_s={case.timeout_s:g}")
        if result_path.exists():
            return Result.model_validate_json(result_path.read_text())
        code = process.exitcode
        if code == -signal.SIGKILL:
            return Result(status=Status.OOM, message="the case process was killed (SIGKILL): out of memory?")
        reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return Result(status=Status.ERROR, message=f"the case process died with {reason}")


def _roofline(result: Result, gemm: float | None) -> None:
    metrics = result.metrics
    if gemm and "median_s" in metrics.get("latency", {}) and "counted_flops" in metrics.get("flops", {}):
        flops = metrics["flops"]
        achieved = flops["counted_flops"] / flops.get("images", 1) * metrics["latency"]["images_per_s"]
        metrics["roofline"] = {"achieved_flops_per_s": achieved, "gemm_flops_per_s": gemm,
                               "fraction_of_gemm": achieved / gemm}


def _gemm_rates(cases: list[Case], known: dict[str, float]) -> dict[str, float]:
    """FLOP/s of a dense GEMM for every (device, dtype) the cases use that can run here."""
    rates = dict(known)
    for device, dtype in sorted({(case.device, case.dtype) for case in cases if "latency" in case.measures}):
        key = f"{device}/{dtype}"
        if key in rates or (device == "cuda" and not torch.cuda.is_available()):
            continue
        rates[key] = gemm_flops_per_s(torch.device(device), getattr(torch, dtype))
    return rates


def _write_run_json(run_dir: Path, suite: Suite, suite_path: str, profile: str | None, command: str,
                    cases: list[Case]) -> dict[str, Any]:
    path = run_dir / "run.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    device = cases[0].device if cases else "cpu"
    run = {
        "suite": suite.name, "suite_file": suite_path, "profile": profile, "description": suite.description,
        "baseline": suite.baseline, "command": previous.get("command", command),
        "created": previous.get("created", _now()), "resumed": previous.get("resumed", []),
        "environment": previous.get("environment") or environment(device),
        "gemm_flops_per_s": _gemm_rates(cases, previous.get("gemm_flops_per_s", {})),
        "cases": len(cases), **suite.run_info(),
    }
    if previous:
        run["resumed"] = [*run["resumed"], _now()]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(run, indent=2, sort_keys=True))
    temporary.replace(path)
    return run


class _Progress:
    """A rich progress bar on a terminal; plain lines when not a TTY or when CI is set."""

    def __init__(self, total: int) -> None:
        self.plain = not sys.stdout.isatty() or bool(os.environ.get("CI"))
        self.total, self.done = total, 0
        if not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def starting(self, case: Case) -> None:
        if not self.plain:
            self.bar.update(self.task, description=f"{case.label} @ {case.column} {case.dtype} {case.mode}")

    def finished(self, case: Case, result: Result) -> None:
        self.done += 1
        latency = result.metrics.get("latency", {})
        accuracy = result.metrics.get("accuracy")
        detail = f" {latency['median_s'] * 1e3:.2f} ms" if "median_s" in latency else ""
        if accuracy:
            detail = " " + ", ".join(f"{key} {value:.2f}" for key, value in accuracy["final"].items()
                                     if isinstance(value, (int, float)))
        line = (f"[{self.done}/{self.total}] {case.label} @ {case.column} b{case.batch} {case.dtype} {case.mode}: "
                f"{result.status.value}{detail}{' ' + result.message if result.message else ''}")
        if self.plain:
            print(line, flush=True)
        else:
            self.bar.console.print(line)
            self.bar.advance(self.task)

    def close(self) -> None:
        if not self.plain:
            self.bar.stop()


def run_suite(suite: Suite, suite_path: str, results_dir: Path, run_name: str, profile: str | None = None,
              command: str = "", in_process: bool = False, retry_failed: bool = False,
              executor: Any = None) -> RunSummary:
    """Run the suite's pending cases, one record each (``retry_failed``: the failed ones again too; their new
    record supersedes the old). ``in_process`` runs them in this process instead of a spawned one
    (``python -m attnbench train`` under torchrun: every rank trains, rank 0 writes)."""
    started = time.time()
    cases = expand(suite)
    run_dir = results_dir / suite.name / run_name
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        run = _write_run_json(run_dir, suite, suite_path, profile, command, cases)
    else:
        run = {"gemm_flops_per_s": {}}
    store = RecordStore(run_dir / "records.jsonl")
    done = store.done_ids(retry_failed)
    pending = [case for case in cases if case.id not in done]
    progress = _Progress(len(pending) if main_rank else 0)
    statuses: dict[str, int] = {}
    try:
        for case in pending:
            progress.starting(case)
            case_started = _now()
            checkpoints = run_dir / "checkpoints" / case.id if case.kind == "accuracy" else None
            if in_process:
                result = run_case_safely(case, str(checkpoints) if checkpoints else None)
            elif executor is not None:  # a submitit job (attnbench/executors.py)
                result = executor.execute(case, checkpoints)
            else:
                result = execute_case(case, checkpoints)
            if not main_rank:
                continue
            _roofline(result, run["gemm_flops_per_s"].get(f"{case.device}/{case.dtype}"))
            record = Record(id=case.id, suite=suite.name, run=run_name, case=case, started=case_started,
                            finished=_now(), **result.model_dump())
            store.append(record)
            statuses[result.status.value] = statuses.get(result.status.value, 0) + 1
            progress.finished(case, result)
    finally:
        progress.close()
    return RunSummary(run_dir, len(cases), len(cases) - len(pending), statuses, time.time() - started)
