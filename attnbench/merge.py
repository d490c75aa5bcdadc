"""``attnbench merge RUN_DIR... --into OUT``: the shards of one suite (``run --shard I/N``), run one after the
other, side by side or on several machines, joined into one run directory that reports as one run.

Always refused: runs of different suites or profiles, runs whose suites expand to different cases, and runs judged
by different gates or hypotheses (written before the measurement, they must be one rule for the merged report).
Refused unless ``--allow-mixed``: runs measured in different environments (device, threads, torch, allocator, attnbench
commit), whether they differ between the runs or between the records of one run (a shard resumed after a commit).
Every record keeps the environment it was measured in
(``environment`` on the record), so a merged report can say when a table mixes machines or commits. A case recorded
by two shards is kept once (its newest record) and reported; cases of the whole suite that no shard recorded
are listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .records import RecordStore
from .suite import SuiteError
from .suite.schema import RULES

# what two environments must share for their timings to sit in one table
ENVIRONMENT_KEYS = ("device", "device_name", "threads", "torch", "git_sha", "hostname", "allocator", "huge_pages")


@dataclass(frozen=True)
class MergeSummary:
    records: int
    notes: list[str]


def merge_runs(run_dirs: list[Path], into: Path, allow_mixed: bool = False) -> MergeSummary:
    """Write ``into``/run.json and records.jsonl from the runs; a ``SuiteError`` (exit 2) when they do not
    belong together."""
    if into.exists() and any(into.iterdir()):
        raise SuiteError(f"{into}: exists and is not empty; merge into a new directory")
    runs = [json.loads((run_dir / "run.json").read_text()) for run_dir in run_dirs]
    first = runs[0]
    for run_dir, run in zip(run_dirs, runs, strict=True):
        for key in ("suite", "profile"):
            if run.get(key) != first.get(key):
                raise SuiteError(f"{run_dir}: {key} {run.get(key)!r} differs from {run_dirs[0]}'s "
                                 f"{first.get(key)!r}: not shards of one suite")
        for key in RULES:  # the gates and hypotheses each shard was judged by, written before its measurements
            if run.get(key) != first.get(key):
                raise SuiteError(f"{run_dir}: its {key} differ from {run_dirs[0]}'s (the suite file changed between "
                                 "them): one report cannot judge both by one rule")
        if run.get("suite_cases") and first.get("suite_cases") and run["suite_cases"] != first["suite_cases"]:
            raise SuiteError(f"{run_dir}: its suite expands to other cases than {run_dirs[0]}'s (the suite file or "
                             "the code that expands it changed between them): not shards of one suite")
    notes, newest, seen_in = [], {}, {}
    for run_dir, run in zip(run_dirs, runs, strict=True):
        for record in RecordStore(run_dir / "records.jsonl").latest():
            if record.id in seen_in:
                notes.append(f"duplicate: {record.case.describe()} recorded by {seen_in[record.id]} and {run_dir}; "
                             "keeping the newer record")
                if (record.finished or "") < (newest[record.id].finished or ""):
                    continue
            # every record keeps the stamp of the process that measured it (a shard resumed after a commit has
            # records of two commits); a record written before records carried a stamp takes its run's
            record.environment = record.environment or run["environment"]
            newest[record.id], seen_in[record.id] = record, run_dir
    stamps = [run["environment"] for run in runs] + [record.environment for record in newest.values()]
    # a key that older stamps lack (the allocator and the huge pages, recorded since 2026-12) is compared among the
    # stamps that have it
    differing = [key for key in ENVIRONMENT_KEYS if len({stamp[key] for stamp in stamps if key in stamp}) > 1]
    if differing and not allow_mixed:
        raise SuiteError(f"{run_dirs[0]} and the others were measured in different environments "
                         f"({', '.join(differing)} differ); pass --allow-mixed to merge them anyway")
    expected = list(dict.fromkeys(case for run in runs for case in run.get("suite_cases", [])))
    missing = [case for case in expected if case not in newest]
    if missing:
        notes.append(f"missing: {len(missing)} of the suite's {len(expected)} cases were recorded by no shard "
                     f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
    into.mkdir(parents=True, exist_ok=True)
    store = RecordStore(into / "records.jsonl")
    order = {case: position for position, case in enumerate(expected)}
    for record in sorted(newest.values(), key=lambda record: order.get(record.id, len(order))):
        store.append(record)  # in the suite's order, as a single-process run records them
    merged = {**first, "cases": len(expected) or len(newest), "merged_from": [str(path) for path in run_dirs],
              "command": None, "merged_commands": [run.get("command") for run in runs],
              "merge_command": f"python -m attnbench merge {' '.join(map(str, run_dirs))} --into {into}"
                                 + (" --allow-mixed" if allow_mixed else ""),
              "environments": [run["environment"] for run in runs], "shard": None, "shard_plan": None,
              "resumed": sorted(time for run in runs for time in run.get("resumed", [])),
              "mixed": [*(entry for run in runs for entry in run.get("mixed", [])),
                        *([{"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "differences": [f"{key}: {', '.join(sorted({str(stamp.get(key)) for stamp in stamps}))}"
                                            for key in differing], "by": "merge --allow-mixed"}] if differing else [])],
              "gemm_flops_per_s": {key: rate for run in runs for key, rate in run.get("gemm_flops_per_s", {}).items()}}
    (into / "run.json").write_text(json.dumps(merged, indent=2, sort_keys=True))
    return MergeSummary(len(newest), notes)
