"""The results store: one JSON record per case, appended to ``records.jsonl``, written whole or not at all.

A record is a single line written with one ``write`` on a file opened for appending, then flushed and
fsynced. A line cut short by a crash (no trailing newline, or not valid JSON) is dropped when the file is
read, and cut off before the next append, so a rerun into the same run directory resumes cleanly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "timeout", "nan", "unsupported")


class RecordStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(keepends=True), start=1):
            if not line.endswith("\n"):
                warnings.warn(f"{self.path}:{number}: dropping a record cut short by an interrupted run",
                              stacklevel=2)
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{self.path}:{number}: dropping a line that is not JSON", stacklevel=2)
        return records

    def done_ids(self) -> set[str]:
        return {record["id"] for record in self.load()}

    def _drop_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict[str, Any]) -> None:
        if record.get("status") not in STATUSES:
            raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        line = json.dumps({"schema": SCHEMA_VERSION, **record}, sort_keys=True, default=str) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
