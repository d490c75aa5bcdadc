"""Sharding without a scheduler: ``run --shard I/N`` splits a suite deterministically, shards run as
concurrent processes, ``merge`` joins them into one run equal to a single-process run apart from timings."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnbench.cli import main
from attnbench.records import RecordStore
from attnbench.suite import SuiteError, expand, load_suite, shard

REPO = Path(__file__).resolve().parent.parent


def test_shards_partition_the_cases_deterministically_and_balance_known_costs():
    ids = [case.id for case in expand(load_suite("suites/smoke.yaml"))]
    parts = []
    for index in range(3):
        suite = load_suite("suites/smoke.yaml")
        shard(suite, index, 3)
        parts.append([case.id for case in expand(suite)])
        assert suite.run_info()["shard"] == f"{index}/3" and suite.run_info()["suite_cases"] == ids
    assert sorted(sum(parts, [])) == sorted(ids) and all(len(part) == 4 for part in parts)
    suite = load_suite("suites/smoke.yaml")
    keys = [case.key for case in expand(suite)]
    cost = {key: (100.0 if position == 0 else 1.0) for position, key in enumerate(keys)}
    shard(suite, 0, 2, cost)
    assert [case.key for case in expand(suite)] == [keys[0]]  # the long case alone balances the rest
    with pytest.raises(SuiteError, match="--shard 2/2: expected I/N with 0 <= I < N"):
        shard(load_suite("suites/smoke.yaml"), 2, 2)


def run_two_concurrent_shards(suite: str, results: Path) -> None:
    """``run SUITE --shard 0/2`` and ``--shard 1/2`` as two processes at once, into runs shard0 and shard1."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shards = [subprocess.Popen([sys.executable, "-m", "attnbench", "run", suite, "--results-dir", str(results),
                                "--run", f"shard{index}", "--shard", f"{index}/2"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    for process in shards:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output


def shards_merged_and_single(suite: str, results: Path, name: str) -> tuple[dict, dict]:
    """The suite run as two concurrent shards merged into ``name``/merged, and as one process into
    ``name``/single: each run's records by id."""
    run_two_concurrent_shards(suite, results)
    assert main(["run", suite, "--results-dir", str(results), "--run", "single"]) == 0
    assert main(["merge", str(results / name / "shard0"), str(results / name / "shard1"), "--into",
                 str(results / name / "merged")]) == 0
    return tuple({record.id: record for record in RecordStore(results / name / run / "records.jsonl").load()}
                 for run in ("merged", "single"))


def _metrics_without_timing(record):
    flops = {key: value for key, value in record.metrics.get("flops", {}).items() if key != "images"}
    return record.status, record.metrics.get("params"), flops.get("counted_flops"), flops.get("analytic_macs")


@pytest.mark.slow
def test_two_concurrent_shards_merge_into_the_single_process_run(tmp_path):
    results = tmp_path / "results"
    merged, single = shards_merged_and_single("suites/smoke.yaml", results, "smoke")
    assert merged.keys() == single.keys() and len(merged) == 12
    for case_id, record in single.items():
        assert _metrics_without_timing(merged[case_id]) == _metrics_without_timing(record)
        assert merged[case_id].environment["hostname"]
    run = json.loads((results / "smoke/merged/run.json").read_text())
    assert run["cases"] == 12 and len(run["merged_from"]) == 2 and run["shard_plan"] is None
    plans = [json.loads((results / f"smoke/shard{index}/run.json").read_text())["shard_plan"] for index in range(2)]
    assert plans[0] == plans[1] and sorted(plans[0]) == sorted(single)  # both shards recorded the one split
    report = (results / "smoke/merged/report.md").read_text()
    assert "12 of 12 cases recorded" in report


def test_merge_refuses_other_suites_and_environments_and_reports_duplicates_and_missing(tmp_path, capsys):
    fixture = REPO / "tests/fixtures/results/fixture/run"
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        run_dir.mkdir()
        (run_dir / "records.jsonl").write_bytes((fixture / "records.jsonl").read_bytes())
    run = json.loads((fixture / "run.json").read_text())
    (a / "run.json").write_text(json.dumps({**run, "suite_cases": ["x1", "x2"]}))
    (b / "run.json").write_text(json.dumps({**run, "suite": "other"}))
    assert main(["merge", str(a), str(b), "--into", str(tmp_path / "m")]) == 2
    assert "suite 'other' differs from" in capsys.readouterr().err
    gates = [{"label": "full", "metric": "far", "at_least": 90.0, "within_chance": None, "why": ""}]
    (b / "run.json").write_text(json.dumps({**run, "gates": gates}))  # judged by a rule the other shard lacks
    assert main(["merge", str(a), str(b), "--into", str(tmp_path / "m"), "--allow-mixed"]) == 2
    assert "its gates differ from" in capsys.readouterr().err
    (b / "run.json").write_text(json.dumps({**run, "environment": {**run["environment"], "allocator": "jemalloc"}}))
    (a / "run.json").write_text(json.dumps({**run, "suite_cases": ["x1", "x2"],
                                            "environment": {**run["environment"], "allocator": "glibc malloc"}}))
    assert main(["merge", str(a), str(b), "--into", str(tmp_path / "m")]) == 2
    assert "different environments (allocator differ)" in capsys.readouterr().err
    (a / "run.json").write_text(json.dumps({**run, "suite_cases": ["x1", "x2"]}))
    (b / "run.json").write_text(json.dumps({**run, "environment": {**run["environment"], "threads": 1}}))
    assert main(["merge", str(a), str(b), "--into", str(tmp_path / "m")]) == 2
    assert "different environments (threads differ); pass --allow-mixed" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--into", str(tmp_path / "m"), "--allow-mixed"]) == 0
    out = capsys.readouterr().out
    assert out.count("duplicate: ") == 8 and "missing: " in out
    assert "merges records measured on 2 machines or settings" in (tmp_path / "m/report.md").read_text()


def test_a_shard_resumed_at_another_commit_merges_only_when_allowed_and_its_records_keep_their_commits(tmp_path,
                                                                                                       capsys):
    fixture = REPO / "tests/fixtures/results/fixture/run"
    run = json.loads((fixture / "run.json").read_text())
    lines = (fixture / "records.jsonl").read_text().splitlines()
    stamp = {key: run["environment"][key] for key in ("device", "device_name", "threads", "torch", "hostname")}
    started, resumed = {**stamp, "git_sha": "a" * 40, "git_dirty": False}, {**stamp, "git_sha": "b" * 40,
                                                                            "git_dirty": False}
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for index, run_dir in enumerate(shards):
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps({**run, "environment": {**run["environment"], **started},
                                                      "suite_cases": ["x1", "x2"], "notes": ["Why x is left out."]}))
        # shard 1 was stopped after its first record and resumed after a commit: its later records are commit b
        mine = [json.loads(line) for line in lines[index::2]]
        stamps = [started] * 4 if index == 0 else [started] + [resumed] * 3
        (run_dir / "records.jsonl").write_text("".join(json.dumps({**record, "environment": environment}) + "\n"
                                                       for record, environment in zip(mine, stamps, strict=True)))
    into = tmp_path / "merged"
    other_suite = json.loads((shards[1] / "run.json").read_text())
    (shards[1] / "run.json").write_text(json.dumps({**other_suite, "suite_cases": ["x1", "x3"]}))
    assert main(["merge", *map(str, shards), "--into", str(into), "--allow-mixed"]) == 2
    assert "its suite expands to other cases than" in capsys.readouterr().err
    (shards[1] / "run.json").write_text(json.dumps(other_suite))
    assert main(["merge", *map(str, shards), "--into", str(into)]) == 2
    assert "different environments (git_sha differ); pass --allow-mixed" in capsys.readouterr().err
    assert not into.exists()
    assert main(["merge", *map(str, shards), "--into", str(into), "--allow-mixed"]) == 0
    commits = sorted(record.environment["git_sha"][0] for record in RecordStore(into / "records.jsonl").load())
    assert commits == ["a"] * 5 + ["b"] * 3
    merged = json.loads((into / "run.json").read_text())
    assert merged["merge_command"].endswith(" --allow-mixed")
    assert merged["mixed"][-1]["differences"] == [f"git_sha: {'a' * 40}, {'b' * 40}"]
    report = (into / "report.md").read_text()
    assert re.search(r"\| attnbench +\| 0\.1\.0 @ a{12} \(5 records\), b{12} \(3 records\) +\|", report)
    assert "\n- Why x is left out.\n" in report  # the suite's notes, carried through the merge


def _accuracy_sections(report: str) -> str:
    """The report from its ablation table on, the training minutes (a timing) taken out of the table of what
    each score rests on."""
    lines, in_training_table = [], False
    for line in report[report.index("## Attention ablation"):].splitlines():
        if line.startswith("| mechanism") and "train min" in line:
            in_training_table = True
        elif not line.startswith("|"):
            in_training_table = False
        lines.append(line.rsplit("|", 2)[0] if in_training_table else line)
    return "\n".join(lines)


@pytest.mark.slow
def test_an_accuracy_sweep_in_two_concurrent_shards_merges_into_the_single_process_run(tmp_path):
    from tests.accuracy_demo import write_demo_suite

    suite = write_demo_suite(tmp_path, mechanisms=("full", "swin"), seeds=(0, 1))
    results = tmp_path / "results"
    # both shards generate the same data root: one writes, the other waits
    merged, single = shards_merged_and_single(suite, results, "accuracy_demo")
    assert merged.keys() == single.keys() and len(merged) == 4
    for case_id, record in single.items():
        ours, theirs = merged[case_id].metrics, record.metrics
        assert merged[case_id].status == record.status == "ok"
        assert ours["accuracy"]["final"] == theirs["accuracy"]["final"]
        assert ours["accuracy"]["history"] == theirs["accuracy"]["history"]
        assert ours["params"] == theirs["params"]
    single_report = (results / "accuracy_demo/single/report.md").read_text()
    merged_report = (results / "accuracy_demo/merged/report.md").read_text()
    assert "## Accuracy over seeds: colour_pointer" in single_report
    assert _accuracy_sections(merged_report) == _accuracy_sections(single_report)


def test_a_shard_balances_only_by_durations_recorded_before_its_first_sibling_started(tmp_path):
    """Siblings from before splits were recorded (no ``shard_plan``): a shard, resumed or new, balances by the
    durations finished before the first of them started, not by those its siblings recorded since."""
    from attnbench.cli import _shard_split

    fixture = REPO / "tests/fixtures/results/fixture/run"
    records = RecordStore(fixture / "records.jsonl").latest()
    finished = sorted(record.finished for record in records)
    suite = load_suite("suites/smoke.yaml")
    suite.name = "suite"
    recorder = tmp_path / "suite/other"
    recorder.mkdir(parents=True)
    (recorder / "records.jsonl").write_bytes((fixture / "records.jsonl").read_bytes())
    every_duration = len({record.case.key for record in records})
    plan, durations = _shard_split(tmp_path, suite, "part1", 2)
    assert plan is None and len(durations) == every_duration  # a first shard: all of them
    sibling = tmp_path / "suite/part0"
    sibling.mkdir()
    legacy = {"shard": "0/2", "suite_cases": [case.id for case in expand(suite)], "created": finished[0]}
    (sibling / "run.json").write_text(json.dumps(legacy))  # started before those records finished
    assert _shard_split(tmp_path, suite, "part1", 2) == (None, {})
    assert len(_shard_split(tmp_path, suite, "part1", 3)[1]) == every_duration  # a split into 3 is another family
    (sibling / "run.json").write_text(json.dumps({**legacy, "created": "9999-01-01T00:00:00+00:00"}))
    assert len(_shard_split(tmp_path, suite, "part1", 2)[1]) == every_duration


def test_a_resumed_shard_keeps_its_own_split_and_a_damaged_sibling_split_is_ignored(tmp_path):
    from attnbench.cli import _shard_split

    suite = load_suite("suites/smoke.yaml")
    ids = [case.id for case in expand(suite)]
    own, sibling = ({case_id: position % 2 for position, case_id in enumerate(ids)},
                    {case_id: 1 - position % 2 for position, case_id in enumerate(ids)})
    for name, created, plan in (("part0", "2026-02-01", own), ("early", "2026-01-01", sibling)):
        (tmp_path / "smoke" / name).mkdir(parents=True)
        (tmp_path / "smoke" / name / "run.json").write_text(
            json.dumps({"shard": "0/2", "shard_plan": plan, "created": created}))
    assert _shard_split(tmp_path, suite, "part0", 2)[0] == own  # its own, though a sibling's is older
    assert _shard_split(tmp_path, suite, "part1", 2)[0] == sibling  # a new shard: the earliest sibling's
    for damaged in ([], None, {**sibling, ids[0]: "0"}, {**sibling, ids[0]: [0]}, {**sibling, ids[0]: 2}):
        (tmp_path / "smoke" / "early" / "run.json").write_text(json.dumps(
            damaged if not isinstance(damaged, dict) else {"shard": "0/2", "shard_plan": damaged, "created": "2026"}))
        assert _shard_split(tmp_path, suite, "part1", 2)[0] == own


def test_a_shard_started_after_its_sibling_takes_the_siblings_recorded_split(tmp_path, capsys):
    """Shards started at different times once overlapped: the later one balanced by durations its sibling had
    recorded since, so both ran some cases and none ran others. The first shard's run.json records its split
    (``shard_plan``) and a later shard, dry run included, takes it."""
    ids = [case.id for case in expand(load_suite("suites/smoke.yaml"))]
    plan = {case_id: (1 if position == 3 else 0) for position, case_id in enumerate(ids)}  # no balancer's choice
    sibling = tmp_path / "smoke" / "part0"
    sibling.mkdir(parents=True)
    (sibling / "run.json").write_text(json.dumps({"shard": "0/2", "shard_plan": plan, "created": "2026-01-01"}))

    def listed(shard_arg: str) -> list[str]:
        assert main(["run", "suites/smoke.yaml", "--results-dir", str(tmp_path), "--shard", shard_arg,
                     "--run", "part1", "--dry-run"]) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()[0] in ids]

    assert listed("1/2") == [ids[3]]
    assert listed("1/3") != [ids[3]]  # a split into 3 is not this one: balanced anew
    suite = load_suite("suites/smoke.yaml")
    shard(suite, 0, 2, plan=plan)
    assert [case.id for case in expand(suite)] == [i for i in ids if i != ids[3]]
    assert suite.run_info()["shard_plan"] == plan
    with pytest.raises(SuiteError, match="the recorded split does not cover these cases"):
        shard(load_suite("suites/smoke.yaml"), 0, 2, plan={ids[0]: 0})
