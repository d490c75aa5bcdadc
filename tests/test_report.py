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
