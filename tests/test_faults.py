"""The harness under faults (issue 18): full disks (a real tmpfs), concurrent runs, kills and signals (real
processes), damaged run directories, hostile names and arguments. Every test here failed before the fix it
names; nothing of the operating system is mocked. Tests that mount a tmpfs need root and skip without it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attentions
from attnbench.cli import main
from attnbench.data import ADE20KSubset, DataError, ImageNetSubset, write_ade20k_like, write_imagenet_like
from attnbench.records import MESSAGE_LIMIT, Record, RecordStore, truncate, write_text_atomically
from attnbench.train.engine import CheckpointError, _load, _save
from tests.test_accuracy import NO_AUGMENT, TINY_BACKBONE

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: {name}
device: cpu
imports: [tests.faulty_mechanisms, tests.faulty_processes]
timeout_s: {timeout}
measures: [params, latency]
repeats: {{warmup_iters: 1, warmup_time_s: 0, min_samples: 5, max_samples: 5, min_run_time_s: 0, max_time_s: 0.1}}
grid:
  mechanism: [{mechanisms}]
  shape: [{{name: s, height: 4, width: 4, dim: 8, heads: 1}}]
  batch: {batch}
"""


def write_suite(tmp_path: Path, mechanisms: list[str], timeout: float | str = 60, batch: str = "[1]",
                name: str = "faults") -> Path:
    path = tmp_path / "suite.yaml"
    specs = ", ".join(f"{{name: {mechanism}, label: {mechanism.removeprefix('test_')}}}" for mechanism in mechanisms)
    path.write_text(textwrap.dedent(SUITE.format(name=name, timeout=timeout, mechanisms=specs, batch=batch)))
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnbench", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CI": "1", **(env or {})}, timeout=timeout)


# ``python -m attnbench`` as a terminal starts it, and that prints every thread's stack on SIGUSR1 so a test that
# gives up on a runner can say where it was (see finish()). A terminal's foreground process takes Ctrl-C; one
# started from a background job of a non-interactive shell (``nohup bash .ci/run &``) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler: the Ctrl-C test would send a signal nobody hears.
_DUMPABLE_RUNNER = ("import faulthandler, runpy, signal; faulthandler.register(signal.SIGUSR1); "
                    "signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "runpy.run_module('attnbench', run_name='__main__', alter_sys=True)")


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A runner in a session of its own, as a terminal would start it (its own foreground process group)."""
    return subprocess.Popen([sys.executable, "-c", _DUMPABLE_RUNNER, *args], cwd=REPO, start_new_session=True,
                            env={**os.environ, "CI": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, seconds: float = 300) -> tuple[str, str]:
    """``process.communicate()``; if it has not ended within ``seconds``, fail with its stacks (SIGUSR1), what
    it said and its processes, instead of a bare TimeoutExpired."""
    try:
        return process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(2)
        table = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
        rows = [line.split(None, 2) for line in table.splitlines()[1:]]
        ours = {process.pid}
        for _ in range(5):  # the runner, its case processes and theirs
            ours |= {int(pid) for pid, ppid, _ in rows if int(ppid) in ours}
        session = "\n".join(line for line in table.splitlines() if line.split()[0] == "PID"
                             or int(line.split()[0]) in ours)
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the runner had not ended after {seconds:g} s\nits processes:\n{session}\n"
                             f"stdout:\n{stdout}\nstderr (stacks at the end):\n{stderr}") from None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, seconds: float = 120, what: str = "") -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def gone_within(pids: list[int], seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, read_only=False)`` -> a fresh tmpfs of that size (skips where mounting is not allowed)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(descriptor)


def record(case_id: str, message: str = "") -> Record:
    from attnbench.cases import AttentionCase

    case = AttentionCase(label="x", mechanism="full", shape="s", height=4, width=4, dim=8, heads=1, batch=1,
                         dtype="float32", mode="forward", device="cpu", measures=("params",), id=case_id)
    return Record(id=case_id, suite="s", run="r", case=case, status="error", message=message)


# 1. a full disk: a record is written whole or not at all, report.md and checkpoints are replaced atomically
def test_writes_on_a_full_disk_leave_records_report_and_checkpoint_as_they_were(tmpfs):
    disk = tmpfs("64k")
    store = RecordStore(disk / "records.jsonl")
    store.append(record("a", "m" * 1500))
    write_text_atomically(disk / "report.md", "the report of record a\n")
    _save(disk / "checkpoint.pt", {"epoch": 0})
    before = store.path.read_bytes()
    fill(disk)
    with pytest.raises(OSError):
        store.append(record("b", "m" * 1900))  # longer than the free tail of the file's last page: a short write
    assert store.path.read_bytes() == before and [r.id for r in store.load()] == ["a"]
    with pytest.raises(OSError):
        write_text_atomically(disk / "report.md", "x" * 100_000)
    assert (disk / "report.md").read_text() == "the report of record a\n"
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: could not write the checkpoint"):
        _save(disk / "checkpoint.pt", {"epoch": 1, "weights": torch.zeros(100_000)})
    assert torch.load(disk / "checkpoint.pt")["epoch"] == 0
    assert sorted(path.name for path in disk.iterdir()) == ["checkpoint.pt", "filler", "records.jsonl", "report.md"]


@pytest.mark.slow
def test_a_run_onto_a_full_disk_stops_with_one_line_and_keeps_every_record_it_reported(tmp_path, tmpfs):
    disk = tmpfs("24k")  # six pages: the lock, run.json (two), then a case's two scratch files or a record or two
    suite = write_suite(tmp_path, ["test_linear"], batch="[1, 2, 3, 4, 5, 6]")
    done = cli("run", str(suite), "--results-dir", str(disk), "--run", "r")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write" in errors[0] and "records written before are intact" in errors[0]
    reported = [line for line in done.stdout.splitlines() if line.startswith("[")]
    records = RecordStore(disk / "faults/r/records.jsonl").load()
    assert 0 < len(records) == len(reported) < 6  # every case reported was stored; the run stopped
    assert all(line.endswith("}") for line in (disk / "faults/r/records.jsonl").read_text().splitlines())
    report = disk / "faults/r/report.md"
    assert not report.exists() or report.stat().st_size > 0


# 2. two runs into one run directory: the second is refused with one line while the first holds the lock;
# 4b. Ctrl-C (SIGINT to the runner's process group, as a terminal sends it) stops the run cleanly
@pytest.mark.slow
def test_a_second_run_is_refused_and_ctrl_c_stops_the_first_with_the_resume_command(tmp_path):
    pid_file = tmp_path / "pids"
    suite = write_suite(tmp_path, ["test_linear", "test_spawns_sleeper"], timeout=120)
    results = tmp_path / "results"
    args = ("run", str(suite), "--results-dir", str(results), "--run", "r")
    first = start(*args, env={"ATTNBENCH_TEST_PID_FILE": str(pid_file)})
    wait_for(lambda: pid_file.exists() and pid_file.read_text().count(" ") == 1, what="the sleeper case")
    worker, sleeper = map(int, pid_file.read_text().split())

    second = cli(*args)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {results / 'faults/r'}: another run (pid {first.pid}) is writing to this run directory; wait for "
        "it to end or choose another --run"]

    os.killpg(first.pid, signal.SIGINT)
    stdout, stderr = finish(first)
    assert first.returncode == 130, stderr
    assert stdout.splitlines()[0] == (f"run directory: {results / 'faults/r'} (to resume: python -m attnbench run "
                                      f"{suite} --results-dir {results} --run r)")
    (line,) = stderr.strip().splitlines()
    assert line.startswith("interrupted by SIGINT: the case in progress was stopped and not recorded; ")
    assert f"resume with: python -m attnbench run {suite} --results-dir {results} --run r" in line
    assert f"report: {results / 'faults/r/report.md'}" in line
    assert gone_within([worker, sleeper])
    assert [r.case.label for r in RecordStore(results / "faults/r/records.jsonl").load()] == ["linear"]
    assert not (results / "faults/r/.scratch").exists()


# 4. kill -9 of the runner takes its case process and the case's subprocesses with it; a timeout kills the group
@pytest.mark.slow
def test_kill_9_of_the_runner_leaves_no_case_process_and_a_timeout_kills_the_case_subprocesses(tmp_path):
    pid_file = tmp_path / "pids"
    suite = write_suite(tmp_path, ["test_spawns_sleeper"], timeout=15)
    results = tmp_path / "results"
    args = ("run", str(suite), "--results-dir", str(results), "--run", "r", "--allow-failures")
    runner = start(*args, env={"ATTNBENCH_TEST_PID_FILE": str(pid_file)})
    wait_for(lambda: pid_file.exists() and pid_file.read_text().count(" ") == 1, what="the sleeper case")
    worker, sleeper = map(int, pid_file.read_text().split())
    os.kill(runner.pid, signal.SIGKILL)  # the runner alone, as `kill -9 PID` does
    finish(runner)
    assert gone_within([worker, sleeper]), "the case process or its subprocess outlived the runner"
    assert list((results / "faults/r/.scratch").iterdir())  # the interrupted case's scratch, inside the run

    pid_file.unlink()
    resumed = cli(*args, env={"ATTNBENCH_TEST_PID_FILE": str(pid_file)})
    assert resumed.returncode == 0, resumed.stderr
    (timed_out,) = RecordStore(results / "faults/r/records.jsonl").load()
    assert timed_out.status == "timeout"
    assert not any(alive(int(pid)) for pid in pid_file.read_text().split())  # the timeout killed the group
    assert not (results / "faults/r/.scratch").exists()


# 3, 4b, 13. a process that exits, is killed or crashes is recorded as what happened, with what it said
@pytest.mark.slow
def test_exits_kills_and_crashes_are_recorded_truthfully(tmp_path):
    suite = write_suite(tmp_path, ["test_sys_exit", "test_vanishes", "test_self_kill", "test_segfault",
                                   "test_huge_message"])
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r",
                 "--allow-failures"]) == 0
    records = {r.case.label: r for r in RecordStore(tmp_path / "results/faults/r/records.jsonl").load()}
    assert records["sys_exit"].status == "error" and records["sys_exit"].message == "the case called sys.exit(0)"
    assert records["vanishes"].status == "error"
    assert records["vanishes"].message == ("the case process exited with code 0 without writing a result; its last "
                                           "stderr lines: about to vanish without a result")
    assert records["self_kill"].status == "killed"
    assert records["self_kill"].message.startswith("the case process was killed by SIGKILL, not by this runner")
    assert records["segfault"].status == "error"
    assert records["segfault"].message.startswith("the case process died with signal SIGSEGV")
    huge = records["huge_message"]
    assert huge.status == "error" and "characters cut" in huge.message
    assert len(huge.message) < MESSAGE_LIMIT + 100 and len(huge.traceback) < MESSAGE_LIMIT + 100
    assert "| KILLED " in (tmp_path / "results/faults/r/report.md").read_text()


def test_truncate_keeps_head_and_tail_and_says_how_much_was_cut():
    text = "head" + "x" * 10_000 + "tail"
    short = truncate(text, 100)
    assert short.startswith("headxx") and short.endswith("xxtail") and "[... 9,908 characters cut ...]" in short
    assert truncate("short", 100) == "short"
    assert record("a", "m" * 1_000_000).message == truncate("m" * 1_000_000)


# 5. run directories stay inside --results-dir
@pytest.mark.parametrize("name", ["../../x", "/tmp/absolute", ".", "..", "a/b", ""])
def test_run_names_must_be_single_folder_names(tmp_path, capsys, name):
    suite = write_suite(tmp_path, ["test_linear"])
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", name]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --run {name!r}: must be a single folder name (no '/', not '.' or '..')"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["suite.yaml"]


@pytest.mark.parametrize("name", [".", ".."])
def test_a_suite_named_dot_dot_is_refused(tmp_path, capsys, name):
    suite = write_suite(tmp_path, ["test_linear"], name=f"'{name}'")
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["suite.yaml"]


# 17. a results dir that is a file or read-only, a records.jsonl that is a directory: one line, exit 2
def test_unusable_results_directories_exit_2_with_one_line(tmp_path, capsys, tmpfs):
    suite = write_suite(tmp_path, ["test_linear"])
    (tmp_path / "file").write_text("")
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "file"), "--run", "r"]) == 2
    assert capsys.readouterr().err == f"error: --results-dir {tmp_path / 'file'}: not a directory\n"
    (tmp_path / "results/faults/r/records.jsonl").mkdir(parents=True)
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'results/faults/r/records.jsonl'}: not a file; move it "
                                       "away to resume this run\n")
    read_only = tmpfs("64k", read_only=True)
    assert main(["run", str(suite), "--results-dir", str(read_only), "--run", "r"]) == 2
    assert capsys.readouterr().err == (f"error: {read_only / 'faults/r'}: cannot write the run directory "
                                       "(Read-only file system)\n")


def test_records_with_invalid_utf8_are_skipped(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    store.append(record("a"))
    with open(store.path, "ab") as handle:
        handle.write(b'{"id": "\xff\xfe"}\n')
    store.append(record("b"))
    with pytest.warns(UserWarning, match="records.jsonl:2"):
        assert [r.id for r in store.load()] == ["a", "b"]


# 8. resuming with an edited suite or in another environment is refused unless --allow-mixed; 17. a damaged
# run.json is moved aside
@pytest.mark.slow
def test_resume_refuses_an_edited_suite_or_another_environment(tmp_path):
    suite = write_suite(tmp_path, ["test_linear"], timeout=600)
    results = tmp_path / "results"
    args = ("run", str(suite), "--results-dir", str(results), "--run", "r")
    assert cli(*args, env={"OMP_NUM_THREADS": "2"}).returncode == 0
    run_dir = results / "faults/r"

    write_suite(tmp_path, ["test_linear", "test_nan"], timeout=600)
    edited = cli(*args, env={"OMP_NUM_THREADS": "2"})
    assert edited.returncode == 2
    assert edited.stderr == (f"error: {run_dir}: resuming would mix records (the suite's cases changed (1 cases "
                             "then)): start a new run (another --run) or pass --allow-mixed\n")
    write_suite(tmp_path, ["test_linear"], timeout=600)
    other_threads = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert other_threads.returncode == 2 and "threads 2 then, 1 now" in other_threads.stderr

    write_suite(tmp_path, ["test_linear", "test_raises"], timeout=600)
    mixed = cli(*args, "--allow-mixed", "--allow-failures", env={"OMP_NUM_THREADS": "1"})
    assert mixed.returncode == 0, mixed.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["environment"]["threads"] == 2 and "threads 2 then, 1 now" in run["mixed"][0]["differences"]
    assert [r.environment["threads"] for r in RecordStore(run_dir / "records.jsonl").load()] == [2, 1]

    (run_dir / "run.json").write_text("garbage")
    damaged = cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert damaged.returncode == 1 and "not a run description (damaged); moved to run.json.damaged-" in damaged.stderr
    assert json.loads((run_dir / "run.json").read_text())["suite"] == "faults"


# 11. python -m attnbench train: a case that sleeps is stopped at timeout_s; a segfault ends the process, and the
# next resume records that case instead of crashing on it again
@pytest.mark.slow
def test_in_process_cases_time_out_and_a_crash_is_recorded_by_the_next_resume(tmp_path):
    suite = write_suite(tmp_path, ["test_sleeps"], timeout=3)
    started = time.time()
    done = cli("train", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--allow-failures",
               env={"ATTNBENCH_TEST_SLEEP_S": "120"})
    assert done.returncode == 0, done.stderr
    assert time.time() - started < 60
    (timed_out,) = RecordStore(tmp_path / "results/faults/r/records.jsonl").load()
    assert timed_out.status == "timeout" and "in-process" in timed_out.message

    suite = write_suite(tmp_path, ["test_segfault", "test_linear"], name="crash")
    args = ("train", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--allow-failures")
    crashed = cli(*args)
    assert crashed.returncode == -signal.SIGSEGV
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    records = {r.case.label: r for r in RecordStore(tmp_path / "results/crash/r/records.jsonl").load()}
    assert records["segfault"].status == "error"
    assert records["segfault"].message.startswith("the run's process died during this case in an earlier attempt")
    assert records["linear"].status == "ok"


ACCURACY_SUITE = """
name: tiny_training
device: cpu
measures: [accuracy, params]
timeout_s: {timeout}
grid:
  model: [{{name: biformer_stl, label: bra, options: {{attention: bra}}}}]
  task:
    - name: relation_proxy
      task: classification
      image_size: 112
      data: {data}
      train: {{epochs: {epochs}, batch_size: 4, eval_batch_size: 4}}
      recipe: {recipe}
      model_options: {backbone}
"""


def accuracy_suite(tmp_path: Path, timeout: float, epochs: int, data: str) -> Path:
    path = tmp_path / "training.yaml"
    path.write_text(textwrap.dedent(ACCURACY_SUITE.format(
        timeout=timeout, epochs=epochs, data=data, recipe=json.dumps(NO_AUGMENT), backbone=json.dumps(TINY_BACKBONE))))
    return path


# 3. a training case that timed out after a checkpoint resumes from it under --retry-failed
@pytest.mark.slow
def test_a_timed_out_training_case_resumes_from_its_checkpoint_under_retry_failed(tmp_path):
    data = f"{{dataset: relation_proxy, root: {tmp_path / 'relation'}, generate: {{train_per_class: 4, val_per_class: 2}}}}"
    suite = accuracy_suite(tmp_path, timeout=25, epochs=1000, data=data)
    args = ("run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--allow-failures")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    (timed_out,) = RecordStore(tmp_path / "results/tiny_training/r/records.jsonl").load()
    assert timed_out.status == "timeout"
    checkpoint = tmp_path / "results/tiny_training/r/checkpoints" / timed_out.id / "checkpoint.pt"
    epochs_then = torch.load(checkpoint, weights_only=False)["epoch"] + 1
    retried = cli(*args, "--retry-failed")
    assert f"resumed after epoch {epochs_then} from {checkpoint}" in retried.stdout
    assert torch.load(checkpoint, weights_only=False)["epoch"] + 1 > epochs_then


# 3. a malformed data root met at run time stops the run with one line and exit 2, recording nothing
@pytest.mark.slow
def test_a_malformed_data_root_at_run_time_exits_2(tmp_path):
    (tmp_path / "empty_root").mkdir()
    suite = accuracy_suite(tmp_path, timeout=120, epochs=1,
                           data=f"{{dataset: relation_proxy, root: {tmp_path / 'empty_root'}}}")
    done = cli("run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r")
    assert done.returncode == 2
    assert done.stderr == (f"error: {tmp_path / 'empty_root/train'}: missing split folder (expected "
                           f"train/<wnid>/*.JPEG under {tmp_path / 'empty_root'})\n")
    assert RecordStore(tmp_path / "results/tiny_training/r/records.jsonl").load() == []


# 3. a corrupt checkpoint names its file
def test_a_corrupt_checkpoint_is_reported_with_its_file_name(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{path}: unreadable checkpoint .*delete it to train this case"):
        _load(path, torch.device("cpu"))


# 6. data generate: an interrupted generation leaves the root untouched, and the next one completes
@pytest.mark.slow
def test_data_generate_killed_mid_way_can_be_run_again(tmp_path):
    root = tmp_path / "imagenet"
    process = subprocess.Popen([sys.executable, "-m", "attnbench", "data", "generate", "imagenet", str(root),
                                "--option", "train_per_class=100000"], cwd=REPO)
    partial = tmp_path / ".imagenet.partial/train"
    try:
        wait_for(lambda: partial.exists() and any(partial.iterdir()), what="the partial data set")
    finally:
        process.kill()
        process.wait()
    assert not root.exists()
    assert main(["data", "generate", "imagenet", str(root), "--option", "train_per_class=2"]) == 0
    assert len(ImageNetSubset(root, "train")) == 4 * 2
    assert not (tmp_path / ".imagenet.partial").exists()


@pytest.mark.parametrize(("dataset", "option", "message"), [
    ("ade20k", "classes=500", "classes must be in [2, 150], got 500"),
    ("relation_proxy", "colours=50", "colours must be in [2, 12], got 50"),
    ("imagenet", "train_per_class=0", "train_per_class must be a positive integer, got 0"),
    ("imagenet", "num_classes=two", "num_classes must be a positive integer, got 'two'"),
])
def test_data_generate_refuses_bad_arguments_with_one_line(tmp_path, capsys, dataset, option, message):
    assert main(["data", "generate", dataset, str(tmp_path / "root"), "--option", option]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "root").exists()


def test_data_generate_onto_a_file_or_a_read_only_path_exits_2(tmp_path, capsys, tmpfs):
    (tmp_path / "file").write_text("")
    assert main(["data", "generate", "imagenet", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'}: exists and is not a directory\n"
    read_only = tmpfs("64k", read_only=True)
    assert main(["data", "generate", "imagenet", str(read_only / "root")]) == 2
    assert capsys.readouterr().err == (f"error: {read_only / 'root'}: cannot write the data set there "
                                       "(Read-only file system)\n")


# 18. data that cannot be read says which file and why
def test_damaged_images_and_label_maps_are_named(tmp_path):
    imagenet = write_imagenet_like(tmp_path / "imagenet", num_classes=1, train_per_class=1, val_per_class=1)
    (jpeg,) = (imagenet / "train").glob("*/*.JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(DataError, match=f"{jpeg}: cannot read the image"):
        ImageNetSubset(imagenet, "train")[0]

    ade = write_ade20k_like(tmp_path / "ade", train_images=1, val_images=1, classes=2)
    (label,) = (ade / "annotations/training").glob("*.png")
    Image.fromarray(np.full((96, 128), 200, dtype=np.uint8)).save(label)
    with pytest.raises(DataError, match=f"{label}: label 200 is above 150"):
        ADE20KSubset(ade, "train")[0]
    Image.fromarray(np.zeros((96, 128, 3), dtype=np.uint8)).save(label)
    with pytest.raises(DataError, match=f"{label}: a label map must be a single-channel PNG .* this one is mode RGB"):
        ADE20KSubset(ade, "train")[0]


# 17. sizes: one check for every mechanism
@pytest.mark.parametrize(("dim", "heads"), [(0, 1), (-8, 1), (8, 0), (8, -2)])
def test_create_refuses_sizes_below_one(dim, heads):
    with pytest.raises(ValueError, match="must be a positive integer"):
        attentions.create("full", dim=dim, num_heads=heads)


@pytest.mark.parametrize("name", ["full", "bra", "swin", "neighborhood", "axial"])
def test_every_mechanism_refuses_empty_inputs_and_negative_sizes(name):
    module = attentions.create(name, dim=16, num_heads=2)
    for shape in [(0, 8, 8, 16), (1, 0, 8, 16), (1, 8, 0, 16)]:
        with pytest.raises(ValueError, match="with B, H, W >= 1"):
            module(torch.randn(*shape))
    with pytest.raises(ValueError, match="height and width must be at least 1, got -4 x 4"):
        module.macs(-4, 4)
    with pytest.raises(ValueError, match="height and width must be at least 1"):
        module.macs(-4, -4)


def test_a_plugin_that_calls_sys_exit_on_import_is_a_warning(tmp_path):
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    info = tmp_path / "exiting_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[attnbench.attentions]\nexiting = exiting_plugin:Nothing\n")
    done = cli("list", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0
    assert "attention plug-in 'exiting' (exiting_plugin:Nothing) failed to load: sys.exit(3)" in done.stderr
    assert any(line.startswith("full ") for line in done.stdout.splitlines())


# --executor warm: one long-lived worker runs the cases one after another; a case that kills it costs that process
def test_a_warm_worker_runs_the_cases_in_one_process(tmp_path):
    suite = write_suite(tmp_path, ["test_linear", "test_raises", "test_unsupported", "test_nan"])
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--executor", "warm",
                 "--allow-failures"]) == 0
    records = RecordStore(tmp_path / "results/faults/r/records.jsonl").load()
    assert [r.status for r in records] == ["ok", "error", "unsupported", "nan"]
    assert [r.worker["warm"] for r in records] == [{"cases_before": n, "process": 1} for n in range(4)]
    assert len({r.worker["pid"] for r in records}) == 1
    assert "each case ran in a warm worker (`--executor warm`: 1 long-lived process" in (
        tmp_path / "results/faults/r/report.md").read_text()
    assert not (tmp_path / "results/faults/r/.scratch").exists()


@pytest.mark.slow
def test_a_warm_worker_that_crashes_or_times_out_is_replaced_and_the_case_recorded_truthfully(tmp_path):
    suite = write_suite(tmp_path, ["test_linear", "test_vanishes", "test_segfault", "test_self_kill", "test_sleeps",
                                   "test_raises"], timeout=10)
    results = tmp_path / "results"
    run = cli("run", str(suite), "--results-dir", str(results), "--run", "r", "--executor", "warm",
              "--allow-failures", env={"ATTNBENCH_TEST_SLEEP_S": "60"})
    assert run.returncode == 0, run.stderr
    records = {r.case.label: r for r in RecordStore(results / "faults/r/records.jsonl").load()}
    assert records["linear"].status == "ok" and records["linear"].worker["warm"] == {"cases_before": 0, "process": 1}
    # the dead case's own stderr, not what the worker said for earlier cases
    assert records["vanishes"].message == ("the case process exited with code 0 without writing a result; its last "
                                           "stderr lines: about to vanish without a result")
    assert records["vanishes"].worker["warm"] == {"cases_before": 1, "process": 1}
    assert records["segfault"].message.startswith("the case process died with signal SIGSEGV")
    assert records["segfault"].worker["warm"] == {"cases_before": 0, "process": 2}
    assert records["self_kill"].status == "killed" and records["self_kill"].worker["warm"]["process"] == 3
    assert records["sleeps"].status == "timeout" and records["sleeps"].worker["warm"]["process"] == 4
    assert records["raises"].status == "error"
    assert records["raises"].worker["warm"] == {"cases_before": 0, "process": 5}


def test_kill_9_of_a_runner_with_a_warm_worker_leaves_no_process(tmp_path):
    pid_file = tmp_path / "pids"
    suite = write_suite(tmp_path, ["test_spawns_sleeper"], timeout=60)
    runner = start("run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--executor", "warm",
                   env={"ATTNBENCH_TEST_PID_FILE": str(pid_file)})
    wait_for(lambda: pid_file.exists() and pid_file.read_text().count(" ") == 1, what="the sleeper case")
    worker, sleeper = map(int, pid_file.read_text().split())
    os.kill(runner.pid, signal.SIGKILL)
    finish(runner)
    assert gone_within([worker, sleeper]), "the warm worker or its subprocess outlived the runner"


def test_a_warm_worker_whose_case_leaves_processes_running_is_replaced(tmp_path):
    """Processes a case leaves behind would share the machine with the next case's timing: the worker records
    them with the case's result and ends, taking them with it; the next case runs in a new worker."""
    pid_file = tmp_path / "pids"
    suite = write_suite(tmp_path, ["test_leaves_child", "test_linear"])
    run = cli("run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r", "--executor", "warm",
              env={"ATTNBENCH_TEST_PID_FILE": str(pid_file)})
    assert run.returncode == 0, run.stderr
    leaves, linear = RecordStore(tmp_path / "results/faults/r/records.jsonl").load()
    assert leaves.status == "ok" and leaves.worker["left_running"]
    assert set(leaves.worker["left_running"]) <= {int(pid) for pid in pid_file.read_text().split()}
    assert linear.status == "ok" and linear.worker["warm"] == {"cases_before": 0, "process": 2}
    assert gone_within([int(pid) for pid in pid_file.read_text().split()])
