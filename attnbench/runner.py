"""Runs a suite: every case in a process of its own with a timeout, one record per case, resumable.

``<results-dir>/<suite>/<run>/`` holds ``run.json`` (the suite, profile, environment and the machine's GEMM
rates measured at the start) and ``records.jsonl``. Running the same suite into the same run directory
skips the cases already recorded and runs the rest, including one whose process was killed half-way.

Guarantees (tested in tests/test_faults.py):

* One runner per run directory: ``.lock`` is held with ``flock`` for the whole run; a second run into the same
  directory is refused with one line (the kernel drops the lock when the holder dies, even by kill -9).
* A record is written whole or not at all (records.py); a write that fails (a full disk) stops the run with one
  line, and the records written before are left as they were.
* A case process runs in a session of its own (Ctrl-C in the terminal reaches only the runner), dies with the
  runner (worker.py: parent-death signal and a guardian on a pipe), and its whole process group is killed at its
  timeout and when it ends. Its scratch files live in ``<run>/.scratch/<case id>``, removed after the case and
  at the start of every run, so a kill -9 leaks nothing outside the run directory.
* Resuming refuses an edited suite (different cases) or a different environment (threads, torch, device, host)
  unless ``allow_mixed``; every record carries its own environment stamp.
* In-process cases (``python -m attnbench train``) run under an alarm of ``timeout_s``; a case whose process
  died (a segfault) is marked in ``<run>/.running/<case id>`` and recorded as an error by the next resume
  instead of crashing it again (``retry_failed`` runs it again).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cases import Case
from .data.errors import DataError
from .env import environment
from .measure.gemm import gemm_flops_per_s
from .records import Record, RecordStore, Result, write_text_atomically
from .status import Status
from .suite import Suite, SuiteError, expand
from .suite.schema import RULES
from .worker import RESULT_NOT_WRITTEN, run_case_in_process

# environment keys that must agree for records to be comparable; a resume elsewhere is refused unless allowed
COMPARED_ENVIRONMENT = ("threads", "torch", "cuda", "device", "device_name", "hostname", "python", "attnbench",
                        "allocator", "huge_pages")
# signals that end a process from outside (a kill, a hang-up, the OOM killer's SIGKILL) rather than a crash
KILL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
STDERR_TAIL_LINES = 5
_WORKER_BOOT = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop('ATTNBENCH_SYS_PATH')); "
                "from attnbench.worker import main; main(sys.argv[1:])")
_WARM_WORKER_BOOT = _WORKER_BOOT.replace("import main; main(", "import serve; serve(")


class RunStopped(Exception):
    """The run cannot go on (a record could not be written); the message is one line for the user."""


@dataclass
class RunSummary:
    run_dir: Path
    total: int
    skipped: int
    statuses: dict[str, int]
    seconds: float


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def path_component(name: str, what: str) -> str:
    """``name`` if it is one plain path component (not empty, ``.``, ``..``, nor holding a separator); else a
    SuiteError: run directories stay inside the results directory."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise SuiteError(f"{what} {name!r}: must be a single folder name (no '/', not '.' or '..')")
    return name


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_bytes()[-4000:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``process`` to exit without reaping it (its pid, and so its process group id, stays ours until
    ``process.wait()``); False if it is still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _died(code: int, stderr: Path) -> Result:
    """The result of a case process that left no result file: how it ended and the last lines of its stderr."""
    tail = _tail(stderr)
    said = f"; its last stderr lines: {tail}" if tail else "; it wrote nothing to stderr"
    if code < 0:
        name = signal.Signals(-code).name
        if -code in KILL_SIGNALS:
            sender = " (the kernel's OOM killer sends SIGKILL too: see dmesg)" if -code == signal.SIGKILL else ""
            return Result(status=Status.KILLED, message=f"the case process was killed by {name}, not by this "
                          f"runner{sender}{said}")
        return Result(status=Status.ERROR, message=f"the case process died with signal {name}{said}")
    return Result(status=Status.ERROR, message=f"the case process exited with code {code} without writing a "
                  f"result{said}")


def _write_case(folder: Path, case: Case, checkpoint_dir: Path | None) -> None:
    """The request a case process reads: FOLDER/case.json."""
    (folder / "case.json").write_text(json.dumps({
        "case": case.model_dump(mode="json"), "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None}))


def _timed_out(case: Case) -> Result:
    return Result(status=Status.TIMEOUT, message=f"no result within timeout_s={case.timeout_s:g}")


def _collected(folder: Path, ended: Callable[[], int]) -> Result:
    """The result a case process wrote to FOLDER/result.json; where it wrote none, how it ended: ``ended()`` gives
    its exit code (ending it first if need be), and its stderr's last lines say what it said."""
    result_path = folder / "result.json"
    if result_path.exists():
        return Result.model_validate_json(result_path.read_text())
    code = ended()
    if code == RESULT_NOT_WRITTEN:
        raise OSError(errno.ENOSPC, "the case process could not write its result (a full disk?)", str(result_path))
    return _died(code, folder / "stderr.log")


def execute_case(case: Case, scratch: Path, checkpoint_dir: Path | None = None) -> Result:
    """Run one case in a process of its own (its own session and process group) with ``scratch`` as its
    working folder (removed afterwards); always returns a result with a status. A training case keeps its
    per-epoch checkpoints in ``checkpoint_dir``, so a rerun after a kill or a timeout resumes it."""
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        _write_case(scratch, case, checkpoint_dir)
        guard_read, guard_write = os.pipe()
        try:
            try:
                with open(scratch / "stderr.log", "wb") as stderr:
                    process = subprocess.Popen(
                        [sys.executable, "-c", _WORKER_BOOT, str(scratch), str(os.getpid()), str(guard_read)],
                        pass_fds=(guard_read,), stdin=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                        env={**os.environ, "ATTNBENCH_SYS_PATH": json.dumps(sys.path)})
            finally:
                os.close(guard_read)
            try:
                finished = _wait(process, case.timeout_s if math.isfinite(case.timeout_s) else math.inf)
            finally:  # the case, its guardian and any subprocess it left, also on Ctrl-C
                _kill_group(process)
                process.wait()
        finally:
            os.close(guard_write)
        return _collected(scratch, lambda: process.returncode) if finished else _timed_out(case)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class WarmWorkerExecutor:
    """``--executor warm``: one long-lived worker process runs the cases one after another, so the imports and the
    CUDA context are paid once per run instead of once per case (10-30 s a case on a lent H200, against about 1 s
    of timing). Each case still has its own scratch folder, timeout and record; between cases the worker frees
    what the case left (garbage, Dynamo's compiled code, the CUDA cache). A case that crashes the worker, or
    outlives its ``timeout_s``, ends that process (recorded as for a process per case) and the next case starts
    a new one. Records carry ``worker["warm"]``: how many cases the process had run before this one."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch  # created at the first case: the runner clears RUN_DIR/.scratch when it starts
        self.process: subprocess.Popen | None = None
        self.descriptors: tuple[int, ...] = ()
        self.started = 0  # worker processes started
        self.cases_run = 0  # cases the current process has run

    def _start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        request_read, self.requests = os.pipe()
        self.answers, answer_write = os.pipe()
        guard_read, guard = os.pipe()
        self.descriptors = (self.requests, self.answers, guard)  # the runner's ends, closed by _stop
        self.started += 1
        self.log = self.scratch / f"worker-{self.started}.log"
        try:
            with open(self.log, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", _WARM_WORKER_BOOT, str(os.getpid()), str(guard_read), str(request_read),
                     str(answer_write)], pass_fds=(guard_read, request_read, answer_write), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True,
                    env={**os.environ, "ATTNBENCH_SYS_PATH": json.dumps(sys.path)})
        finally:
            for descriptor in (guard_read, request_read, answer_write):
                os.close(descriptor)
        self.cases_run = 0

    def _stop(self) -> int | None:
        """End the worker and its process group; its exit code (None if none was running). Safe to call again,
        also when an interruption cut an earlier call short."""
        process, self.process = self.process, None
        if process is None:
            return None
        _kill_group(process)
        code = process.wait()
        descriptors, self.descriptors = self.descriptors, ()
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                os.close(descriptor)
        return code

    def _answer(self, timeout: float) -> bytes | None:
        """The worker's answer line; b"" if it died first, None if ``timeout`` seconds pass without one. Its exit
        is watched too, not only the pipe: a process it forked may hold the pipe's write end open."""
        deadline, line = time.monotonic() + timeout, b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.answers], [], [], max(0.0, min(deadline - time.monotonic(), 0.5)))
            if not ready:
                if self._exited():
                    return b""
                if time.monotonic() >= deadline:
                    return None
                continue
            chunk = os.read(self.answers, 4096)
            if not chunk:
                return b""
            line += chunk
        return line

    def _exited(self) -> bool:
        """Whether the worker has ended (not reaped: its pid, and so its process group id, stays ours)."""
        return _wait(self.process, 0)

    def execute(self, case: Case, checkpoint_dir: Path | None = None) -> Result:
        if self.process is not None and self._exited():  # it died after its last answer
            self._stop()
        if self.process is None:
            self._start()
        folder = self.scratch / case.id
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _write_case(folder, case, checkpoint_dir)
            try:
                os.write(self.requests, f"{folder}\n".encode())
                answer = self._answer(case.timeout_s if math.isfinite(case.timeout_s) else math.inf)
            except BrokenPipeError:  # it died between the check above and the request
                answer = b""
            if answer is None:
                self._stop()
                result = _timed_out(case)
            else:
                result = _collected(folder, self._stop)
                if answer == b"":  # it ended, after writing its result or without one: end its process group
                    self._stop()
            result.worker = {**result.worker, "warm": {"cases_before": self.cases_run, "process": self.started}}
            self.cases_run += 1
            return result
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self._stop()


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


def cases_fingerprint(cases: list[Case]) -> str:
    """A digest of what a suite expands to (each case's id and label): an edited suite changes it."""
    lines = sorted(f"{case.id} {case.label}" for case in cases)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def environment_stamp(env: dict[str, Any]) -> dict[str, Any]:
    """The part of an environment that decides whether two records are comparable, plus the code's version."""
    return {key: env.get(key) for key in (*COMPARED_ENVIRONMENT, "git_sha", "git_dirty")}


def _read_previous_run(path: Path) -> dict[str, Any]:
    """The run.json of an earlier run into this directory; a damaged one is moved aside with a warning."""
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_bytes())
        if isinstance(previous, dict):
            return previous
    except (OSError, ValueError):
        pass
    aside = path.with_name(f"run.json.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(path, aside)
    warnings.warn(f"{path}: not a run description (damaged); moved to {aside.name} and started afresh: this resume "
                  "is not checked against the suite and environment of the earlier run", stacklevel=3)
    return {}


def _mixing(previous: dict[str, Any], fingerprint: str, env: dict[str, Any], rules: dict[str, list]) -> list[str]:
    """How resuming a run described by ``previous`` with these cases in this environment would mix records (or
    change the rules its verdicts are judged by, gates and hypotheses, which are written before the measurement)."""
    differences = []
    if previous.get("cases_fingerprint") not in (None, fingerprint):
        differences.append(f"the suite's cases changed ({previous.get('cases', '?')} cases then)")
    for key in RULES:
        if previous.get(key) != rules.get(key):
            differences.append(f"the suite's {key} changed (the run keeps those it started with)")
    before = previous.get("environment") or {}
    for key in COMPARED_ENVIRONMENT:
        if key in before and before[key] != env.get(key):
            differences.append(f"{key} {before[key]} then, {env.get(key)} now")
    return differences


def _write_run_json(run_dir: Path, suite: Suite, suite_path: str, profile: str | None, command: str,
                    cases: list[Case], env: dict[str, Any], allow_mixed: bool) -> dict[str, Any]:
    path = run_dir / "run.json"
    previous = _read_previous_run(path)
    fingerprint = cases_fingerprint(cases)
    info = suite.run_info()
    rules = {key: info.pop(key) for key in RULES if key in info}
    differences = _mixing(previous, fingerprint, env, rules) if previous else []
    if differences and not allow_mixed:
        raise SuiteError(f"{run_dir}: resuming would mix records ({'; '.join(differences)}): start a new run "
                         "(another --run) or pass --allow-mixed")
    run = {
        "suite": suite.name, "suite_file": suite_path, "profile": profile, "description": suite.description,
        "baseline": suite.baseline, "command": previous.get("command", command),
        "created": previous.get("created", _now()), "resumed": previous.get("resumed", []),
        "environment": previous.get("environment") or env,
        "gemm_flops_per_s": _gemm_rates(cases, previous.get("gemm_flops_per_s", {})),
        "cases": len(cases), "cases_fingerprint": fingerprint, **info,
    }
    if previous:  # a resume keeps the rules the run started with: they were written before its measurements
        rules = {key: previous[key] for key in RULES if key in previous}
        run["resumed"] = [*run["resumed"], _now()]
    run.update(rules)
    mixed = previous.get("mixed", [])
    if differences:
        mixed = [*mixed, {"time": _now(), "differences": differences}]
    if mixed:
        run["mixed"] = mixed
    write_text_atomically(path, json.dumps(run, indent=2, sort_keys=True))
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


def lock_run_directory(run_dir: Path) -> int:
    """Hold ``run_dir/.lock`` (flock, released by the kernel when this process ends, however it ends); a
    SuiteError naming the directory and the holder if another run holds it. Returns the lock's descriptor."""
    descriptor = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise SuiteError(f"{run_dir}: another run (pid {holder}) is writing to this run directory; wait for it to "
                         "end or choose another --run") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _prepare_run_directory(run_dir: Path) -> int:
    """Create ``run_dir`` (a SuiteError if that is impossible), lock it, and remove the scratch files an earlier
    run killed mid-case left behind."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = lock_run_directory(run_dir)
    except OSError as error:
        raise SuiteError(f"{run_dir}: cannot write the run directory ({error.strerror or error})") from None
    records = run_dir / "records.jsonl"
    if records.exists() and not records.is_file():
        os.close(descriptor)
        raise SuiteError(f"{records}: not a file; move it away to resume this run")
    shutil.rmtree(run_dir / ".scratch", ignore_errors=True)
    return descriptor


def _crashed_in_process(run_dir: Path) -> set[str]:
    """Ids of in-process cases during which an earlier run's process died (their ``.running`` marker is left)."""
    folder = run_dir / ".running"
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def flagged_ids(store: RecordStore, cores: int | None) -> set[str]:
    """Cases whose newest record has a flagged timing (attnbench/report/flags.py: wide spread, no convergence,
    the load changing or the machine busy, a roofline above 100%): the cells the report tells a reader not to
    trust."""
    from .report.flags import add_flags
    from .report.frame import records_frame

    latest = store.latest()
    if not latest:
        return set()
    frame = add_flags(records_frame(latest), cores)
    return set(frame.loc[frame["flags"] != "", "id"])


def run_suite(suite: Suite, suite_path: str, results_dir: Path, run_name: str, profile: str | None = None,
              command: str = "", in_process: bool = False, retry_failed: bool = False,
              allow_mixed: bool = False, executor: Any = None, retry_flagged: bool = False) -> RunSummary:
    """Run the suite's pending cases, one record each (``retry_failed``: the failed ones again too;
    ``retry_flagged``: those whose timing is flagged again too; their new record supersedes the old).
    ``in_process`` runs them in this process instead of a spawned one (``python -m attnbench train`` under
    torchrun: every rank trains, rank 0 writes).

    Raises SuiteError (bad names, a locked or unwritable run directory, a resume that would mix records), DataError
    (a malformed data root met by a case: nothing is recorded for it), RunStopped (a record could not be written),
    KeyboardInterrupt (the case in progress is stopped and not recorded)."""
    started = time.time()
    run_dir = results_dir / path_component(suite.name, "suite name") / path_component(run_name, "run name")
    cases = expand(suite)
    for case in cases:
        if not case.timeout_s > 0:
            raise SuiteError(f"{case.describe()}: timeout_s must be a positive number of seconds, got {case.timeout_s}")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    lock = None
    env = environment(cases[0].device if cases else "cpu")
    if suite.threads:  # every case sets this many threads in its own process (attnbench/worker.py)
        env["threads"] = suite.threads
    stamp = environment_stamp(env)
    if main_rank:
        lock = _prepare_run_directory(run_dir)
        try:
            run = _write_run_json(run_dir, suite, suite_path, profile, command, cases, env, allow_mixed)
        except BaseException as error:
            os.close(lock)
            if isinstance(error, OSError):
                raise RunStopped(f"{run_dir / 'run.json'}: could not write the run description "
                                 f"({error.strerror or error}); nothing was run") from None
            raise
    else:
        run = {"gemm_flops_per_s": {}}
    store = RecordStore(run_dir / "records.jsonl")
    done = store.done_ids(retry_failed)
    if retry_flagged:
        done -= flagged_ids(store, (run.get("environment") or env).get("cpu_count"))
    pending = [case for case in cases if case.id not in done]
    crashed = _crashed_in_process(run_dir) if in_process and not retry_failed else set()
    progress = _Progress(len(pending) if main_rank else 0)
    statuses: dict[str, int] = {}
    try:
        for case in pending:
            progress.starting(case)
            case_started = _now()
            checkpoints = run_dir / "checkpoints" / case.id if case.kind == "accuracy" else None
            marker = run_dir / ".running" / case.id
            if in_process and case.id in crashed:
                result = Result(status=Status.ERROR, message="the run's process died during this case in an earlier "
                                "attempt (a crash such as a segfault, or a kill -9); --retry-failed runs it again")
            elif in_process:
                if main_rank:
                    marker.parent.mkdir(exist_ok=True)
                    marker.write_text(f"{os.getpid()}\n")
                try:
                    result = run_case_in_process(case, str(checkpoints) if checkpoints else None)
                except KeyboardInterrupt:
                    marker.unlink(missing_ok=True)  # an interruption, not a crash: the case runs again on resume
                    raise
            elif executor is not None:  # a warm worker (above) or a submitit job (attnbench/executors.py)
                try:
                    result = executor.execute(case, checkpoints)
                except OSError as error:
                    raise RunStopped(f"{error.filename or run_dir}: could not run {case.describe()} "
                                     f"({error.strerror or error}); the run stopped, the records written before are "
                                     "intact; free some space and resume with the same command") from None
            else:
                try:
                    result = execute_case(case, run_dir / ".scratch" / case.id, checkpoints)
                except OSError as error:
                    raise RunStopped(f"{run_dir / '.scratch'}: could not write the scratch files of "
                                     f"{case.describe()} ({error.strerror or error}); the run stopped, the records "
                                     "written before are intact; free some space and resume with the same "
                                     "command") from None
            if result.worker.get("exception") == "DataError":
                marker.unlink(missing_ok=True)
                raise DataError(result.message)
            if not main_rank:
                continue
            _roofline(result, run["gemm_flops_per_s"].get(f"{case.device}/{case.dtype}"))
            record = Record(id=case.id, suite=suite.name, run=run_name, case=case, started=case_started,
                            finished=_now(), environment=stamp, **result.model_dump())
            try:
                store.append(record)
            except OSError as error:
                raise RunStopped(f"{store.path}: could not write the record of {case.describe()} "
                                 f"({error.strerror or error}); the run stopped, the records written before are "
                                 "intact; free some space and resume with the same command") from None
            marker.unlink(missing_ok=True)
            statuses[result.status.value] = statuses.get(result.status.value, 0) + 1
            progress.finished(case, result)
    finally:
        progress.close()
        if executor is not None and hasattr(executor, "close"):
            executor.close()
        if lock is not None:
            shutil.rmtree(run_dir / ".scratch", ignore_errors=True)
            os.close(lock)
    return RunSummary(run_dir, len(cases), len(cases) - len(pending), statuses, time.time() - started)
