"""One case, measured in a process of its own (started with ``spawn`` by the runner), or one case after another
in a warm worker (``serve``, ``--executor warm``).

The case arrives as JSON and is rebuilt as its typed form (attnbench/cases.py). A case of kind ``accuracy`` is
handed to ``attnbench.train`` (train, score, then the measures on the trained model); for the other kinds the
worker builds the module (a mechanism through the registry, or a timm model) and a random input, runs the
measures that must see the fresh module (memory), checks the step (output shape, finite values, agreement with
the float64 plain path), then runs the other measures of the suite in the registry's order (attnbench/measure/).
Whatever happens is written as one JSON ``Result`` (an exception of any kind, ``SystemExit`` included); a worker
that dies writes nothing and the runner records why, with the last lines the worker wrote to stderr.

The case process (``main(SCRATCH, PARENT_PID, GUARD_FD)``, started by attnbench/runner.py in a session of its
own) dies with its runner: the kernel sends it SIGKILL when the runner exits (PR_SET_PDEATHSIG),
and a guardian it forks kills its whole process group (subprocesses of the case included) when the runner's end
of the guard pipe closes.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attentions

from .cases import AccuracyCase, AttentionCase, Case, ModelCase, parse_case
from .data.errors import DataError
from .measure import Subject, backends_used, is_out_of_memory, measures_for
from .measure.correctness import check_against_reference, plain_copy
from .records import Result
from .status import Status


class CaseFailure(Exception):
    """A case that ends with a status other than ok or error."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def _finite(*tensors: torch.Tensor | None) -> bool:
    return all(tensor is None or bool(torch.isfinite(tensor).all()) for tensor in tensors)


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


def _autocast(step, device: torch.device):
    """``step`` under automatic mixed precision: bfloat16 on CPU, float16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    def mixed():
        with torch.autocast(device.type, dtype=dtype):
            return step()
    return mixed


def build_subject(case: AttentionCase | ModelCase) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module a case measures and its random input: a mechanism on (B, H, W, C), or a model on
    (B, 3, H, W)."""
    generator = torch.Generator().manual_seed(case.seed)
    if isinstance(case, ModelCase):
        import timm

        from . import models  # noqa: F401  (registers BiFormer's models with timm)

        return timm.create_model(case.model, **case.options), torch.randn(
            case.batch, case.in_chans, case.image_size, case.image_size, generator=generator)
    module = attentions.create(case.mechanism, dim=case.dim, num_heads=case.heads, **case.options)
    return module, torch.randn(case.batch, case.height, case.width, case.dim, generator=generator)


def measure_module(case: AttentionCase | ModelCase) -> dict[str, Any]:
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    module, x = build_subject(case)
    reasons = module.not_supported_reasons(device, dtype) if hasattr(module, "not_supported_reasons") else []
    if reasons:
        raise CaseFailure(Status.UNSUPPORTED, "; ".join(reasons))
    module = module.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    if isinstance(case, ModelCase) and case.channels_last:
        module, x = module.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    timed = torch.compile(module) if isinstance(case, ModelCase) and case.compile else module
    step = build_step(timed, x, case.mode)
    if isinstance(case, ModelCase) and case.amp:
        step = _autocast(step, device)
    spatial = (case.height, case.width) if isinstance(case, AttentionCase) else (case.image_size, case.image_size)
    subject = Subject(module, x, step, device, case.kind, case.mode, spatial, case.repeats.model_dump())
    # FLOPs are counted on the plain path: the useful multiply-adds (the paper's convention, and the numerator of
    # the roofline), whichever backend is timed (BRA's dense backend also spends masked ones)
    subject.plain = lambda: (build_step(plain_copy(module), x.detach().clone(), case.mode), case.batch)
    measures = measures_for(case.measures, case.kind)
    metrics = {measure.name: measure.measure(subject) for measure in measures if measure.before_check}
    out = step()
    if isinstance(case, AttentionCase) and out.shape != x.shape:
        raise CaseFailure(Status.ERROR, f"the output has shape {tuple(out.shape)}, the input {tuple(x.shape)}: "
                          "a mechanism must return (B, H, W, C) as it was given")
    if not _finite(out, x.grad, *(p.grad for p in module.parameters())):
        raise CaseFailure(Status.NAN, "the output or a gradient has NaN or Inf on random input")
    backends = backends_used(module)
    if case.check_correctness:
        # two images: the smallest batch that modules splitting a batch over threads (attentions/by_image.py) split
        agreement = check_against_reference(module, x[:2].detach())
        metrics["correctness"] = agreement.summary()
        if not agreement.ok:
            raise CaseFailure(Status.MISMATCH, agreement.failure())
    for measure in measures:
        if not measure.before_check:
            metrics[measure.name] = measure.measure(subject)
    if backends:
        metrics["backend"] = {"used": backends}
    return metrics


def run_case(case: Case, checkpoint_dir: str | None = None) -> dict[str, Any]:
    """The metrics of one case (raises on failure)."""
    torch.manual_seed(case.seed)
    if case.threads:
        torch.set_num_threads(case.threads)
    for module_name in case.imports:
        importlib.import_module(module_name)
    if torch.device(case.device).type == "cuda" and not torch.cuda.is_available():
        raise CaseFailure(Status.UNSUPPORTED, "device cuda: CUDA is not available on this machine")
    if isinstance(case, AccuracyCase):
        from .train import run_accuracy_case

        return run_accuracy_case(case, checkpoint_dir)
    return measure_module(case)


class CaseTimeout(BaseException):
    """Raised by the alarm of ``run_case_in_process`` (a BaseException, so no ``except Exception`` swallows it)."""


def _first_line(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__])[0]


def run_case_safely(case: Case, checkpoint_dir: str | None = None,
                    let_through: Callable[[BaseException], bool] | None = None) -> Result:
    """``run_case`` with every failure turned into a result with a status (never raises, except for
    KeyboardInterrupt, CaseTimeout and what ``let_through(error)`` accepts: a submitit job's requeue, which leaves
    by ``sys.exit``). A DataError (the data root is malformed: an input error, not an outcome of the case) is
    marked ``worker["exception"] = "DataError"``; the runner stops on it instead of recording it."""
    started = time.time()
    exception = None
    try:
        result = Result(status=Status.OK, metrics=run_case(case, checkpoint_dir))
    except CaseFailure as failure:
        result = Result(status=failure.status, message=str(failure))
    except NotImplementedError as error:  # a backend that cannot run this input says why (xFormers' convention)
        result = Result(status=Status.UNSUPPORTED, message=(str(error).splitlines() or [""])[0])
    except (KeyboardInterrupt, CaseTimeout):
        raise
    except BaseException as error:  # recorded, never raised: the suite goes on (SystemExit from a plug-in too)
        if let_through is not None and let_through(error):
            raise
        exception = type(error).__name__
        status = Status.OOM if isinstance(error, Exception) and is_out_of_memory(error) else Status.ERROR
        message = str(error) if isinstance(error, DataError) else _first_line(error)
        if isinstance(error, SystemExit):
            message = f"the case called sys.exit({error.code!r})"
        result = Result(status=status, message=message, traceback=traceback.format_exc())
    result.worker = {"threads": torch.get_num_threads(), "pid": os.getpid(), "duration_s": time.time() - started}
    if exception == "DataError":
        result.worker["exception"] = exception
    return result


def run_case_in_process(case: Case, checkpoint_dir: str | None = None) -> Result:
    """``run_case_safely`` in this process under an alarm of ``case.timeout_s`` (``python -m attnbench train``):
    a case still running then is stopped and recorded as ``timeout``. The alarm interrupts Python code only; a
    call stuck in C (a collective waiting for a rank that died) returns first."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        if case.timeout_s != float("inf"):
            signal.setitimer(signal.ITIMER_REAL, case.timeout_s)
        return run_case_safely(case, checkpoint_dir)
    except CaseTimeout:
        return Result(status=Status.TIMEOUT, message=f"no result within timeout_s={case.timeout_s:g} (in-process)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


RESULT_NOT_WRITTEN = 75  # the exit code of a case process that could not write its result (sysexits' EX_TEMPFAIL)


def write_result(result: Result, result_path: str | Path) -> None:
    temporary = Path(result_path).with_suffix(".tmp")
    temporary.write_text(result.model_dump_json())
    temporary.replace(result_path)


def worker_main(case_json: dict[str, Any], checkpoint_dir: str | None, result_path: str) -> None:
    """Run one case and write its result file, whatever the case raises (SystemExit included); only a death of
    the process itself (a signal, ``os._exit``, a full disk under the result) leaves no file."""
    try:
        result = run_case_safely(parse_case(case_json), checkpoint_dir)
    except BaseException as error:  # KeyboardInterrupt, or a case that cannot even be parsed
        result = Result(status=Status.ERROR, message=_first_line(error), traceback=traceback.format_exc())
    try:
        write_result(result, result_path)
    except OSError:  # a full disk: the runner stops the run instead of recording a case it cannot explain
        os._exit(RESULT_NOT_WRITTEN)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent (the runner) exits (Linux prctl; elsewhere only the check);
    then exit at once if the parent is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def guard_process_group(guard_fd: int, close: tuple[int, ...] = ()) -> int:
    """Fork a guardian that blocks on the runner's guard pipe and kills this process group (the case and any
    subprocess it started) once the pipe closes: the runner died, or finished with this case. The guardian
    closes the descriptors ``close`` (a warm worker's pipes, whose ends must close when the worker dies)."""
    guardian = os.fork()
    if guardian == 0:
        for descriptor in close:
            os.close(descriptor)
        try:
            while os.read(guard_fd, 4096):
                pass
        finally:
            os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(0)
    os.close(guard_fd)
    return guardian


def main(argv: list[str]) -> None:
    """The case process: ``argv`` is SCRATCH PARENT_PID GUARD_FD; SCRATCH/case.json in, SCRATCH/result.json out."""
    scratch, parent_pid, guard_fd = argv
    die_with_parent(int(parent_pid))
    guard_process_group(int(guard_fd))
    request = json.loads((Path(scratch) / "case.json").read_text())
    worker_main(request["case"], request["checkpoint_dir"], str(Path(scratch) / "result.json"))


def _between_cases(threads: int) -> None:
    """Free what a case left in a warm worker: garbage, Dynamo's compiled code and guards (so the next case
    compiles afresh instead of meeting a recompile limit), the CUDA caching allocator's blocks; and restore the
    global defaults a case may have changed (a case without ``threads`` gets the process's default, as a process
    of its own would)."""
    torch.set_num_threads(threads)
    gc.collect()
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # else the next case's peak would start above them
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)


def serve(argv: list[str]) -> None:
    """A warm worker (``--executor warm``): ``argv`` is PARENT_PID GUARD_FD REQUEST_FD ANSWER_FD. Each line read
    from REQUEST_FD names a scratch folder; its case.json runs as ``main`` runs it, its result.json is written,
    and the line is echoed on ANSWER_FD; until the runner closes REQUEST_FD."""
    parent_pid, guard_fd, request_fd, answer_fd = argv
    die_with_parent(int(parent_pid))
    guardian = guard_process_group(int(guard_fd), close=(int(request_fd), int(answer_fd)))
    threads = torch.get_num_threads()
    worker_log = os.dup(2)
    with os.fdopen(int(request_fd), "rb") as requests, os.fdopen(int(answer_fd), "wb", buffering=0) as answers:
        for line in requests:
            scratch = Path(line.decode().strip())
            request = json.loads((scratch / "case.json").read_text())
            with open(scratch / "stderr.log", "wb") as case_log:  # the case's own output, as in a process of its own
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(case_log.fileno(), 1), os.dup2(case_log.fileno(), 2)
                try:
                    worker_main(request["case"], request["checkpoint_dir"], str(scratch / "result.json"))
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os.dup2(worker_log, 1), os.dup2(worker_log, 2)
            _between_cases(threads)
            left = _children() - {guardian}
            if left:  # the case left processes running: they must not share the machine with the next timing
                result = Result.model_validate_json((scratch / "result.json").read_text())
                result.worker["left_running"] = sorted(left)
                write_result(result, scratch / "result.json")
                os._exit(0)  # the runner reads the result, ends this process group and starts a new worker
            answers.write(line)


def _children() -> set[int]:
    """This process's child processes (Linux /proc; empty elsewhere)."""
    children: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            pass
    return children
