"""Regression tests of the harness restructure (issue: typed stages): each bug below was reproduced on the
flat, stringly typed harness and is fixed by its shape."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnbench.cases import AttentionCase, ModelCase
from attnbench.cli import _option_values, main
from attnbench.measure import MEASURES, Measure, Subject, register_measure
from attnbench.records import Record, RecordStore
from attnbench.report import build_report
from attnbench.report.frame import records_frame
from attnbench.suite import SuiteError

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: reg
device: cpu
imports: [tests.faulty_mechanisms]
measures: {measures}
repeats: {{warmup_iters: 1, warmup_time_s: 0, min_samples: 5, max_samples: 5, min_run_time_s: 0, max_time_s: 0.1}}
grid:
  mechanism: {mechanisms}
  shape: [{{name: s, height: 4, width: 4, dim: 8, heads: 2}}]
"""


def write(tmp_path: Path, mechanisms: str, measures: str = "[params, latency]") -> Path:
    path = tmp_path / "reg.yaml"
    path.write_text(textwrap.dedent(SUITE.format(mechanisms=mechanisms, measures=measures)))
    return path


def run_dir_with(tmp_path: Path, records: list[Record]) -> Path:
    run_dir = tmp_path / "results/reg/r"
    run_dir.mkdir(parents=True)
    template = json.loads((REPO / "tests/fixtures/results/fixture/run/run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**template, "suite": "reg", "cases": len(records)}))
    store = RecordStore(run_dir / "records.jsonl")
    for record in records:
        store.append(record)
    return run_dir


def model_case(label: str, model: str = "biformer_tiny") -> ModelCase:
    return ModelCase(model=model, label=label, image_size=224, batch=1, dtype="float32", mode="forward",
                     device="cpu", measures=("params", "flops", "latency"), paper="biformer_tiny").with_id()


# 1. two cases that differ only in an unlabelled option used to share one report cell, the second overwriting
def test_cases_that_would_share_a_report_cell_are_refused_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "[{name: bra, options: {n_win: 2, topk: 1, impl: reference}}, "
                           "{name: bra, options: {n_win: 2, topk: 1, impl: gather}}]")
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "two cases would share the report cell 'bra @ s'" in err and "impl='gather'" in err
    assert not (tmp_path / "results").exists()


def test_shapes_sharing_a_name_are_refused(tmp_path):
    path = write(tmp_path, "[{name: full}]")
    path.write_text(path.read_text().replace("shape: [{name: s, height: 4, width: 4, dim: 8, heads: 2}]",
                                             "shape: [{name: s, height: 4, width: 4, dim: 8, heads: 2}, "
                                             "{name: s, height: 8, width: 8, dim: 8, heads: 2}]"))
    with pytest.raises(SuiteError, match=r"grid\.shape: shapes share the name 's'"):
        from attnbench.suite import load_suite
        load_suite(path)


def test_records_that_share_a_label_keep_their_own_cells(tmp_path):
    """Runs recorded before labels had to be distinct: both cases stay visible, each with its own figure."""
    cases = [AttentionCase(mechanism="bra", label="bra", options={"impl": impl}, shape="s", height=4, width=4, dim=8,
                           heads=2, batch=1, dtype="float32", mode="forward", device="cpu",
                           measures=("latency",)).with_id() for impl in ("gather", "dense")]
    records = [Record(id=case.id, suite="reg", run="r", case=case, status="ok",
                      metrics={"latency": {"median_s": seconds, "iqr_s": 0.0, "n": 3, "images_per_s": 1 / seconds}})
               for case, seconds in zip(cases, (0.001, 0.002), strict=True)]
    text = build_report(run_dir_with(tmp_path, records)).read_text()
    assert '| bra {"impl": "gather"} | 1.00 (±0.00)' in text
    assert '| bra {"impl": "dense"}  | 2.00 (±0.00)' in text


# 2. the failure message of a model or accuracy case never reached report.md
# 3. a models run whose every case failed crashed the report (None / 2)
def test_failed_model_cases_render_with_their_messages(tmp_path):
    records = [Record(id=case.id, suite="reg", run="r", case=case, status=status, message=message)
               for case, status, message in [(model_case("biformer_tiny"), "error", "RuntimeError: boom in the model"),
                                             (model_case("small", "biformer_small"), "oom", "out of memory at 224px")]]
    text = build_report(run_dir_with(tmp_path, records)).read_text()
    assert "## Models: cpu, float32, forward, batch 1" in text
    assert "| biformer_tiny | 224px   | ERROR" in text and "| small         | 224px   | OOM" in text
    assert "## Cases that did not finish" in text
    assert "RuntimeError: boom in the model" in text and "out of memory at 224px" in text


# 4. a directory as the suite file printed a 22-line IsADirectoryError traceback and exited 1
def test_a_directory_as_the_suite_exits_2_with_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: is a directory, not a suite file"


# 5. data generate --option parsed values by their first character
def test_generator_options_are_parsed_as_yaml_and_empty_values_are_refused(tmp_path, capsys):
    assert _option_values(["flag=true", "k=-2", "ratio=0.5", "name=abc", "sizes=[1, 2]"]) == {
        "flag": True, "k": -2, "ratio": 0.5, "name": "abc", "sizes": [1, 2]}
    for bad in ("k=", "size", "=3"):
        assert main(["data", "generate", "imagenet", str(tmp_path / "d"), "--option", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --option {bad}: expected KEY=VALUE")


# 6. `attnbench list | head` ended with a BrokenPipeError traceback
def test_list_into_a_closed_pipe_ends_quietly():
    shell = f"{sys.executable} -m attnbench list --options | head -n 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1


# a correctness failure is its own status, and a wrong output shape is never timed
def test_mismatch_and_wrong_shape_are_recorded_as_such(tmp_path):
    path = write(tmp_path, "[{name: test_wrong_fast_path, label: wrong}, {name: test_wrong_shape, label: shape}]")
    main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run", "r", "--allow-failures"])
    records = {r.case.label: r for r in RecordStore(tmp_path / "results/reg/r/records.jsonl").load()}
    assert records["wrong"].status == "mismatch" and "differs from the float64 plain path" in records["wrong"].message
    assert records["shape"].status == "error" and "the output has shape (1, 1, 4, 8)" in records["shape"].message
    assert "latency" not in records["shape"].metrics
    text = (tmp_path / "results/reg/r/report.md").read_text()
    assert "| wrong       | MISMATCH" in text


# a new measure is one file: a class registered with register_measure reaches the record, frame and report
def test_a_measure_registered_in_one_place_reaches_record_frame_and_report(tmp_path):
    assert "gradient_reach" in MEASURES
    path = write(tmp_path, "[{name: test_linear, label: linear}, {name: full}]", measures="[gradient_reach]")
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results"), "--run", "r"]) == 0
    records = RecordStore(tmp_path / "results/reg/r/records.jsonl").load()
    reach = {r.case.label: r.metrics["gradient_reach"] for r in records}
    assert reach["linear"] == {"requires_grad": 8 * 8 + 8, "reached": 8 * 8 + 8}
    assert reach["full"]["reached"] == reach["full"]["requires_grad"] > 0
    frame = records_frame(records)
    assert list(frame["grad_params"]) == [72, reach["full"]["reached"]]
    text = (tmp_path / "results/reg/r/report.md").read_text()
    assert "## Parameters that receive a gradient in one forward + backward" in text
    assert "| linear      | 72 " in text


def test_measures_declare_columns_that_the_frame_always_has():
    class Probe(Measure):
        name = "probe_for_test"

        def measure(self, subject: Subject):
            return {"value": 1}

        def columns(self, metrics, images):
            return {"probe_value": metrics.get("value")}
    register_measure(Probe)
    try:
        frame = records_frame([])
        assert "probe_value" in frame.columns
        subject = Subject(torch.nn.Identity(), torch.zeros(1), lambda: None, torch.device("cpu"), "attention",
                          "forward", (1, 1))
        assert MEASURES["probe_for_test"].measure(subject) == {"value": 1}
    finally:
        del MEASURES["probe_for_test"]


def test_attention_flops_are_the_useful_ones_whichever_backend_is_timed():
    """The roofline's numerator: BRA's dense backend spends masked multiply-adds, the record counts the plain
    path's (issue: backward FLOPs / roofline above 100%)."""
    from attnbench.worker import measure_module

    counted = {}
    for impl in ("reference", "dense"):
        case = AttentionCase(mechanism="bra", label=impl, options={"n_win": 2, "topk": 1, "impl": impl}, shape="s",
                             height=8, width=8, dim=16, heads=2, batch=2, dtype="float32", mode="forward_backward",
                             device="cpu", measures=("flops",), check_correctness=False).with_id()
        counted[impl] = measure_module(case)["flops"]["counted_flops"]
    assert counted["dense"] == counted["reference"] > 0


def test_the_header_names_each_cases_threads_and_a_merged_runs_parts():
    from types import SimpleNamespace

    from attnbench.report.render import _measured_with, _threads

    one_thread = [SimpleNamespace(worker={"threads": 1}), SimpleNamespace(worker={"threads": 1})]
    assert _threads({"threads": 2}, one_thread) == "1 per case (the runner process had 2)"
    assert _threads({"threads": 1}, one_thread) == "1"
    merged = {"merged_from": ["a", "b"], "merged_commands": ["python -m attnbench run s --shard 0/2 --run a",
                                                             "python -m attnbench run s --shard 1/2 --run b"],
              "merge_command": "python -m attnbench merge a b --into m", "command": None}
    line = _measured_with(merged)
    assert "Measured in 2 parts" in line and "--shard 1/2 --run b" in line and "merge a b --into m" in line
