"""The runner: every failure is recorded and the suite goes on; a killed run resumes without loss or
duplicates; records are written whole."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnbench.cases import AttentionCase, ModelCase
from attnbench.cli import main
from attnbench.records import Record, RecordStore

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: faulty
device: cpu
imports: [tests.faulty_mechanisms]
timeout_s: {timeout}
measures: [params, flops, latency]
repeats: {{warmup_iters: 1, warmup_time_s: 0, min_samples: 5, max_samples: 5, min_run_time_s: 0, max_time_s: 0.1}}
grid:
  mechanism: [{mechanisms}]
  shape: [{{name: s, height: 4, width: 4, dim: 8, heads: 1}}]
"""


def write_suite(tmp_path: Path, mechanisms: list[str], timeout: float) -> Path:
    path = tmp_path / "faulty.yaml"
    specs = ", ".join(f"{{name: {name}, label: {label}}}" for name, label in mechanisms)
    path.write_text(textwrap.dedent(SUITE.format(timeout=timeout, mechanisms=specs)))
    return path


@pytest.mark.slow
def test_failures_are_recorded_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    # a timeout long enough for a case process to start on a loaded machine (importing torch can take 10 s there),
    # and a sleep well past it
    monkeypatch.setenv("ATTNBENCH_TEST_SLEEP_S", "120")
    names = [("test_raises", "raises"), ("test_nan", "nan"), ("test_sleeps", "sleeps"),
             ("test_unsupported", "unsupported"), ("test_backend_refuses", "refuses"), ("test_linear", "linear")]
    suite = write_suite(tmp_path, names, timeout=30)
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]) == 1  # cases failed
    assert "3 case(s) failed (error, nan, timeout): exit 1" in capsys.readouterr().err
    records = RecordStore(tmp_path / "results/faulty/r/records.jsonl").load()
    status = {record.case.label: record for record in records}
    assert {label: record.status for label, record in status.items()} == {
        "raises": "error", "nan": "nan", "sleeps": "timeout", "unsupported": "unsupported", "refuses": "unsupported",
        "linear": "ok"}
    assert status["raises"].message == "RuntimeError: this mechanism always fails"
    assert "no kernel for cpu/torch.float32" in status["unsupported"].message
    assert status["refuses"].message == "impl='fast' cannot run here: fast: no kernel for this input"
    assert status["linear"].metrics["params"]["count"] == 8 * 8 + 8
    latency = status["linear"].metrics["latency"]
    assert len(latency["samples_s"]) == latency["n"] >= 2 and latency["median_s"] > 0
    report = (tmp_path / "results/faulty/r/report.md").read_text()
    for cell in ("ERROR", "NaN", "TIMEOUT", "UNSUPPORTED"):
        assert f"| {cell} " in report

    # a resumed run skips every recorded case, failed or not; --retry-failed runs the failed ones again
    monkeypatch.setenv("ATTNBENCH_TEST_SLEEP_S", "0")
    args = ["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]
    assert main([*args, "--allow-failures"]) == 0
    assert len(RecordStore(tmp_path / "results/faulty/r/records.jsonl").load()) == 6
    assert main([*args, "--retry-failed"]) == 1  # raises and nan fail again
    store = RecordStore(tmp_path / "results/faulty/r/records.jsonl")
    assert len(store.load()) == 6 + 3
    latest = {record.case.label: record.status for record in store.latest()}
    assert latest == {"raises": "error", "nan": "nan", "sleeps": "ok", "unsupported": "unsupported",
                      "refuses": "unsupported", "linear": "ok"}
    assert "| TIMEOUT " not in (tmp_path / "results/faulty/r/report.md").read_text()


@pytest.mark.slow
def test_a_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    suite = write_suite(tmp_path, [("test_linear", "first"), ("test_sleeps", "sleeper")], timeout=120)
    suite.write_text(suite.read_text() + "  batch: [1, 2]\n")  # first@1, first@2, sleeper@1, sleeper@2
    results = tmp_path / "results"
    command = [sys.executable, "-m", "attnbench", "run", str(suite), "--results-dir", str(results), "--run", "r"]
    env = {**os.environ, "ATTNBENCH_TEST_SLEEP_S": "60", "CI": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    records_path = results / "faulty/r/records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # both 'first' cases done; the sleeper now runs
        if records_path.exists() and len(records_path.read_text().splitlines()) >= 2:
            time.sleep(5)
            break
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = RecordStore(records_path).load()
    assert [r.case.label for r in before] == ["first", "first"]
    with open(records_path, "a") as handle:  # a record cut short mid-write
        handle.write('{"id": "half')

    env["ATTNBENCH_TEST_SLEEP_S"] = "0"
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "2 already recorded" in finished.stdout
    after = RecordStore(records_path).load()
    assert after[:2] == before  # nothing measured is lost or rewritten
    ids = [r.id for r in after]
    assert len(ids) == len(set(ids)) == 4  # 2 mechanisms × 2 batches, each once
    assert all(r.status == "ok" for r in after)
    assert all(line.endswith("}") for line in records_path.read_text().splitlines())


@pytest.mark.slow
def test_a_model_suite_measures_whole_models_and_renders_the_model_table(tmp_path):
    suite = tmp_path / "models.yaml"
    suite.write_text(textwrap.dedent("""
        name: models
        device: cpu
        measures: [params, flops, latency]
        repeats: {warmup_iters: 1, warmup_time_s: 0, min_samples: 5, max_samples: 5, min_run_time_s: 0, max_time_s: 0.1}
        grid:
          model: [{name: biformer_tiny, label: BiFormer-T, paper: biformer_tiny}]
          image_size: [112]
    """))
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]) == 0
    (record,) = RecordStore(tmp_path / "results/models/r/records.jsonl").load()
    assert record.status == "ok", record.message
    assert record.metrics["params"]["count"] == sum(
        p.numel() for p in __import__("timm").create_model("biformer_tiny").parameters())
    assert record.metrics["flops"]["counted_flops"] > 0
    report = (tmp_path / "results/models/r/report.md").read_text()
    assert "## Models: cpu, float32, forward, batch 1" in report
    row = next(line for line in report.splitlines() if line.startswith("| BiFormer-T"))
    assert "| 13.14 " in row and "| 13.1 " in row and "| 81.4 " in row and "+0.3%" in row


def _record(case_id: str, status: str) -> Record:
    case = AttentionCase(label="x", mechanism="full", shape="s", height=4, width=4, dim=8, heads=1, batch=1,
                         dtype="float32", mode="forward", device="cpu", measures=("params",), id=case_id)
    return Record(id=case_id, suite="s", run="r", case=case, status=status)


def test_store_drops_a_partial_line_skips_lines_that_are_not_records_and_rejects_unknown_statuses(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    store.append(_record("a", "ok"))
    with open(store.path, "a") as handle:
        handle.write('{"id": "b", "sta')
    with pytest.warns(UserWarning, match="cut short"):
        assert [r.id for r in store.load()] == ["a"]
    store.append(_record("c", "oom"))
    assert [r.id for r in store.load()] == ["a", "c"]
    assert all(json.loads(line)["schema"] == 2 for line in store.path.read_text().splitlines())
    with open(store.path, "a") as handle:
        handle.write('{}\n[1, 2]\n{"id": "e", "status": "ok"}\n')
    with pytest.warns(UserWarning, match="not a record"):
        assert [r.id for r in store.load()] == ["a", "c"]
    with pytest.raises(ValueError, match="status"):
        _record("d", "crashed")


def test_schema_1_records_load_with_their_ids_and_typed_cases():
    """The first committed runs (flat cases, params as a number) read back through the same loader."""
    records = RecordStore(REPO / "tests/fixtures/schema1_model_records.jsonl").load()  # from results/models/quick-cpu
    assert records and all(isinstance(r.case, ModelCase) for r in records)
    for record in records:
        assert record.case.with_id().id == record.id  # the typed case hashes to the id it was stored under
        assert isinstance(record.metrics["params"]["count"], int)
    speed = RecordStore(REPO / "tests/fixtures/schema1_attention_records.jsonl").load()  # from results/speed/quick-cpu
    assert speed and all(r.case.with_id().id == r.id for r in speed)


def test_report_of_a_missing_run_directory_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


RULED = """
name: ruled
device: cpu
measures: [accuracy]
grid:
  model:
    - {name: attnbench_isotropic_proxy, label: full, options: {attention: full}}
    - {name: attnbench_isotropic_proxy, label: axial, options: {attention: axial}}
  task:
    - {name: pointer, task: classification, image_size: 32, data: {dataset: colour_pointer, root: absent}}
"""


def test_a_run_keeps_the_rules_it_started_with_and_a_resume_that_would_change_them_is_refused(tmp_path):
    """Gates and hypotheses are written before the measurement: run.json records them when the run starts, and
    a resume under other rules would judge earlier records by a rule written after them."""
    from attnbench.runner import _write_run_json
    from attnbench.suite import SuiteError, expand, load_suite

    def start(extra: str, allow_mixed: bool = False) -> dict:
        path = tmp_path / "ruled.yaml"
        path.write_text(RULED + extra)
        suite = load_suite(path, require_data=False)
        return _write_run_json(tmp_path, suite, "ruled.yaml", None, "cmd", expand(suite), {}, allow_mixed)

    declared = "hypotheses: [{higher: full, lower: axial, metric: top1, why: global reach}]\n"
    first = start(declared)
    assert first["hypotheses"] == [{"higher": "full", "lower": "axial", "metric": "top1", "why": "global reach"}]
    assert "gates" not in first
    assert start(declared)["resumed"]  # the same rules resume
    with pytest.raises(SuiteError, match="the suite's hypotheses changed"):
        start(declared.replace("top1", "far"))
    kept = start(declared.replace("top1", "far"), allow_mixed=True)
    assert kept["hypotheses"][0]["metric"] == "top1" and kept["mixed"]  # the rules the run started with
    with pytest.raises(SuiteError, match="the suite's gates changed"):
        start(declared + "gates: [{label: full, metric: far, at_least: 90.0}]\n")


def test_retry_flagged_measures_again_the_cases_whose_timing_the_report_flags(tmp_path):
    """A case measured while the load changed carries ⚠ in the report; --retry-flagged measures it again (its new
    record supersedes the old) and leaves the trusted ones alone."""
    suite = write_suite(tmp_path, [("test_linear", "a"), ("test_unsupported", "b")], timeout=120)
    args = ["run", str(suite), "--results-dir", str(tmp_path / "results"), "--run", "r"]
    assert main(args) == 0
    store = RecordStore(tmp_path / "results/faulty/r/records.jsonl")
    first, second = store.load()
    busy = first.model_copy(deep=True)  # as if another job had started during the first case
    busy.metrics["latency"].update(load_before=0.1, load_after=3.5)
    store.append(busy)
    assert main(args) == 0 and len(store.load()) == 3  # a plain resume keeps the flagged record
    assert main([*args, "--retry-flagged"]) == 0
    records = store.load()
    assert len(records) == 4 and records[-1].id == first.id and records[-1].started != busy.started
    assert "load changed" not in (tmp_path / "results/faulty/r/report.md").read_text() or \
        records[-1].metrics["latency"]["load_after"] - records[-1].metrics["latency"]["load_before"] >= 1
