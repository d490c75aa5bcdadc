"""The report rendered from a fixture run equals the committed expected markdown."""

import shutil
from pathlib import Path

from attnbench.report import build_report

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_report_of_the_fixture_run_matches_the_expected_markdown(tmp_path, monkeypatch):
    run_dir = tmp_path / "tests/fixtures/results/fixture/run"
    shutil.copytree(FIXTURES / "results/fixture/run", run_dir)
    monkeypatch.chdir(tmp_path)  # the report names the run directory as it was given
    report = build_report(Path("tests/fixtures/results/fixture/run"))
    assert report.read_text() == (FIXTURES / "expected_report.md").read_text()
    plots = sorted(path.name for path in (run_dir / "plots").iterdir())
    assert plots == ["flops_cpu__float32__forward__batch_2.png", "memory_cpu__float32__forward__batch_2.png",
                     "throughput_cpu__float32__forward__batch_2.png"]
    for name in plots:
        assert f"](plots/{name})" in report.read_text()


def test_a_baseline_adds_a_speedup_table_computed_from_the_records(tmp_path):
    import json

    from attnbench.records import RecordStore

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "results/fixture/run", run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "baseline": "full"}))
    text = build_report(run_dir).read_text()
    assert "Speed-up over `full` (its latency ÷ the row's, same run):" in text
    median = {(r.case.label, r.case.column): r.metrics["latency"]["median_s"]
              for r in RecordStore(run_dir / "records.jsonl").load() if r.status == "ok"}
    table = text.split("Speed-up over `full`")[1].split("\n\n")[1]
    bra_row = next(line for line in table.splitlines() if line.startswith("| bra"))
    expected = median[("full", "small")] / median[("bra", "small")]
    assert f"| {expected:.2f}× " in bra_row
    assert "| 1.00× " in next(line for line in table.splitlines() if line.startswith("| full"))
