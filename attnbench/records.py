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

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .cases import Case, case_from_legacy
from .status import Status

SCHEMA_VERSION = 2
MESSAGE_LIMIT = 2_000  # characters of a message or traceback kept in a record (head and tail)


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` if it has at most ``limit`` characters, else its head and tail around a note of how much was cut."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} [... {len(text) - 2 * keep:,} characters cut ...] {text[-keep:]}"


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, flush it to disk, then rename it over ``path``: a reader sees the
    old file or the new one, never a part; on failure (a full disk) the temporary file is removed and the old
    file is left as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Result(BaseModel):
    """How one case ended and what it measured: ``metrics`` maps a measure's name (attnbench/measure/) to
    what that measure stored; ``worker`` says where and how long it ran."""

    model_config = ConfigDict(extra="allow")

    status: Status
    message: str = ""
    metrics: dict[str, Any] = {}
    traceback: str | None = None
    worker: dict[str, Any] = {}

    @field_validator("message", "traceback")
    @classmethod
    def _bounded(cls, text: str | None) -> str | None:
        """A 50 MB exception message must not become a 100 MB record and a 700 MB report."""
        return truncate(text) if text else text


class Record(Result):
    """A result with its case and where it belongs."""

    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    id: str
    suite: str
    run: str
    case: Case
    started: str | None = None
    finished: str | None = None
    environment: dict[str, Any] | None = None  # where this record was measured (a run may be resumed elsewhere)

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
        """Add one record, whole or not at all: on a short or failed write (a full disk) the file is cut back to
        what it held before and an OSError is raised. One writer at a time (the runner locks the run directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        line = (record.to_json() + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(descriptor).st_size
            try:
                written = os.write(descriptor, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes): disk full?",
                                  str(self.path))
                os.fsync(descriptor)
            except BaseException:
                os.ftruncate(descriptor, size)  # take the partial line back out
                raise
        finally:
            os.close(descriptor)
