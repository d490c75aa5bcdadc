"""Records flattened into one pandas row per case: the case's own columns, then each measure's (its
``columns``), so a new measure reaches the report and the CSV without touching this file."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ..cases import AccuracyCase, AttentionCase, ModelCase
from ..measure import MEASURES
from ..records import Record


def _case_columns(record: Record) -> dict[str, Any]:
    case = record.case
    row = {"id": record.id, "key": case.key, "kind": case.kind, "label": case.label, "shape": case.column,
           "seed": case.seed, "batch": case.batch, "dtype": case.dtype, "mode": case.mode, "device": case.device,
           "status": record.status.value,
           "message": record.message, "options": json.dumps(case.options, sort_keys=True), "source": case.source,
           "paper": None, "task": None, "dataset": None, "backend": ", ".join(
               record.metrics.get("backend", {}).get("used", []))}
    if isinstance(case, AttentionCase):
        row.update(mechanism=case.mechanism, height=case.height, width=case.width, dim=case.dim, heads=case.heads)
    elif isinstance(case, ModelCase):
        row.update(mechanism=case.model, height=case.image_size, width=case.image_size, dim=case.in_chans, heads=0,
                   paper=case.paper)
    elif isinstance(case, AccuracyCase):
        row.update(mechanism=case.model, height=case.image_size, width=case.image_size, dim=3, heads=0,
                   paper=case.paper, task=case.task["task"], dataset=case.task["data"]["dataset"])
    row["tokens"] = row["height"] * row["width"]
    return row


def _row(record: Record) -> dict[str, Any]:
    row = _case_columns(record)
    for name, measure in MEASURES.items():
        row.update(measure.columns(record.metrics.get(name) or {}, record.case.batch))
    row["fraction_of_gemm"] = record.metrics.get("roofline", {}).get("fraction_of_gemm")
    return row


def records_frame(records: list[Record]) -> pd.DataFrame:
    """One row per case, in the order the records were written; every column present even when no case has it."""
    frame = pd.DataFrame([_row(record) for record in records])
    for column in _all_columns():
        if column not in frame.columns:
            frame[column] = None
    return frame


def _all_columns() -> list[str]:
    columns = ["fraction_of_gemm"]
    for measure in MEASURES.values():
        columns += list(measure.columns({}, 1))
    return columns
