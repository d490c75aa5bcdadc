"""Results and records: what a case's process returns (``Result``) and what the run stores (``Record``), one
JSON line per case in ``records.jsonl``, written whole or not at all, read back through one loader.

A record is a single line written with one ``write`` on a file opened for appending, then flushed and
fsynced. A line cut short by a crash (no trailing newline, or not valid JSON) is dropped when the file is
read, and cut off before the next append, so a rerun into the same run directory resumes cleanly. Lines that
are JSON but not records are skipped with a warning, never a reason to stop a resume or a report.

Schema 2 stores the typed case (attnbench/cases.py); schema 1 records (the first committed runs: a flat case,
``params`` as a bare number) are normalised on load, with their ids unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cases import Case, case_from_legacy
from .status import Status

SCHEMA_VERSION = 2


class Result(BaseModel):
    """How one case ended and what it measured: ``metrics`` maps a measure's name (attnbench/measure/) to
    what that measure stored; ``worker`` says where and how long it ran."""

    model_config = ConfigDict(extra="allow")

    status: Status
    message: str = ""
    metrics: dict[str, Any] = {}
    traceback: str | None = None
    worker: dict[str, Any] = {}


class Record(Result):
    """A result with its case and where it belongs."""

    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    id: str
    suite: str
    run: str
    case: Case
    started: str | None = None
    finished: str | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, default=str)


def normalise(data: dict[str, Any]) -> Record:
    """A record of any schema version as a ``Record`` (raises ValidationError/KeyError/TypeError if it is none)."""
    if data.get("schema", 1) < 2:
        data = dict(data)
        case = case_from_legacy({**data["case"], "id": data["id"]})
        # the repeats as they were given: a field added since (min_run_time_s) is not part of the old id
        data["case"] = {**case.model_dump(), "repeats": case.repeats.model_dump(exclude_unset=True)}
        metrics = dict(data.get("metrics") or {})
        if isinstance(metrics.get("params"), int):
            metrics["params"] = {"count": metrics["params"]}
        data["metrics"] = metrics
    return Record.model_validate(data)


class RecordStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> list[Record]:
        """Every complete record, in the order written; lines that are not records are skipped with a warning."""
        if not self.path.is_file():
            if self.path.exists():
                warnings.warn(f"{self.path}: not a file; no records read", stacklevel=2)
            return []
        records = []
        for number, line in enumerate(self.path.read_bytes().splitlines(keepends=True), start=1):
            where = f"{self.path}:{number}"
            if not line.endswith(b"\n"):
                warnings.warn(f"{where}: dropping a record cut short by an interrupted run", stacklevel=2)
                continue
            try:
                records.append(normalise(json.loads(line)))
            except (UnicodeDecodeError, json.JSONDecodeError):
                warnings.warn(f"{where}: dropping a line that is not JSON", stacklevel=2)
            except (ValidationError, KeyError, TypeError, AttributeError) as error:
                warnings.warn(f"{where}: skipping a line that is not a record ({type(error).__name__})", stacklevel=2)
        return records

    def latest(self) -> list[Record]:
        """The last record of every case (a retried case keeps only its newest), in the order first recorded."""
        by_id: dict[str, Record] = {}
        for record in self.load():
            by_id[record.id] = record
        return list(by_id.values())

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Cases already recorded; with ``retry_failed``, less those whose newest record is a failure."""
        return {record.id for record in self.latest() if not (retry_failed and record.status.failed)}

    def _drop_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        line = (record.to_json() + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, line)
            if written != len(line):  # a short write (a full disk): take the partial line back out
                os.ftruncate(descriptor, os.fstat(descriptor).st_size - written)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes): disk full?")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
