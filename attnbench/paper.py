"""Published figures (attnbench/paper_figures.yaml), each with its source and status, and BiFormer's cost formula.

Two views of the same file:

- typed: ``figure(table, row, field)`` returns a ``PaperFigure`` (value, source, status, where, ...);
  ``figures()`` lists every entry by its path, ``seed_only_figures()`` those no primary source confirms;
- plain: ``paper_figures()`` returns the file with every entry replaced by its value (entries without a value
  left out, the ``sources`` table kept), the shape the report code has always read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

PAPER_FIGURES = Path(__file__).resolve().parent / "paper_figures.yaml"

Status = Literal["confirmed", "seed-only", "not-found"]
STATUSES: tuple[str, ...] = get_args(Status)
SEED_ONLY_MARK = "†"
SEED_ONLY_FOOTNOTE = (f"{SEED_ONLY_MARK} seed-only: the figure rests on the seed summary (shared/seeds/) or the team's "
                      "hand-off (shared/PAPER.md) alone; the paper's own text could not be read here, and no README or "
                      "config confirms it.")
_ENTRY_KEYS = {"value", "source", "status", "where", "note", "searched", "also"}


@dataclass(frozen=True)
class Source:
    """Where figures are read: a file of a repository at a commit, or a document named by its citation."""

    key: str
    repo: str | None = None
    path: str | None = None
    commit: str | None = None
    citation: str | None = None
    note: str | None = None

    def describe(self) -> str:
        """``rayleizhu/BiFormer README.md @ 1697bbb``, ``shared/seeds/... (citation)``, or the citation."""
        if self.repo:
            return f"{self.repo} {self.path} @ {(self.commit or '?')[:7]}"
        if self.path:
            return f"{self.path} ({self.citation})" if self.citation else self.path
        return self.citation or self.key


@dataclass(frozen=True)
class PaperFigure:
    """One published figure: its value, where it was read (``source``: source and location), its status."""

    value: float | str | None
    source: str
    status: Status
    source_key: str
    where: str = ""
    note: str | None = None
    searched: str | None = None  # not-found entries: where we looked
    also: tuple[PaperFigure, ...] = ()  # other published values of the same quantity

    @property
    def confirmed(self) -> bool:
        return self.status == "confirmed"

    def cell(self) -> str:
        """The value as a table cell: seed-only values carry ``SEED_ONLY_MARK``; a missing one is empty."""
        if self.value is None:
            return ""
        if isinstance(self.value, float) and len(str(self.value)) > 6:
            return f"{self.value:.4g}{self.mark}"  # a derived figure (4/3): four digits
        return f"{self.value}{self.mark}"  # as published: 82.0, 28

    @property
    def mark(self) -> str:
        return SEED_ONLY_MARK if self.status == "seed-only" else ""


@cache
def _document() -> dict[str, Any]:
    document = yaml.safe_load(PAPER_FIGURES.read_text())
    _check(document)
    return document


@cache
def sources() -> dict[str, Source]:
    return {key: Source(key=key, **fields) for key, fields in _document()["sources"].items()}


def _is_entry(node: Any) -> bool:
    return isinstance(node, dict) and "value" in node


def _entries(node: Any, path: tuple[str, ...]):
    """(path, entry) of every figure below ``node``, in file order."""
    if _is_entry(node):
        yield path, node
    elif isinstance(node, dict):
        for key, child in node.items():
            yield from _entries(child, (*path, key))


def _check(document: dict[str, Any]) -> None:
    """Every entry names a known source and a status; only not-found entries lack a value, and they say
    where we looked."""
    known = set(document.get("sources", {}))
    for key, node in document.items():
        if key == "sources":
            continue
        for path, entry in _entries(node, (key,)):
            for candidate in [entry, *entry.get("also", [])]:
                where = ".".join(path)
                unknown = set(candidate) - _ENTRY_KEYS
                if unknown:
                    raise ValueError(f"{PAPER_FIGURES.name}: {where}: unknown key(s) {sorted(unknown)}")
                if candidate.get("source") not in known:
                    raise ValueError(f"{PAPER_FIGURES.name}: {where}: source {candidate.get('source')!r} "
                                     f"is not one of {sorted(known)}")
                if candidate.get("status") not in STATUSES:
                    raise ValueError(f"{PAPER_FIGURES.name}: {where}: status {candidate.get('status')!r} "
                                     f"is not one of {STATUSES}")
                if (candidate["value"] is None) != (candidate["status"] == "not-found"):
                    raise ValueError(f"{PAPER_FIGURES.name}: {where}: only not-found entries have no value")
                if candidate["status"] == "not-found" and not candidate.get("searched"):
                    raise ValueError(f"{PAPER_FIGURES.name}: {where}: a not-found entry says where we looked")


def _figure(entry: dict[str, Any]) -> PaperFigure:
    source = sources()[entry["source"]]
    where = entry.get("where", "")
    return PaperFigure(
        value=entry["value"], source=f"{source.describe()}: {where}" if where else source.describe(),
        status=entry["status"], source_key=source.key, where=where, note=entry.get("note"),
        searched=entry.get("searched"), also=tuple(_figure(other) for other in entry.get("also", [])))


@cache
def figures() -> dict[tuple[str, ...], PaperFigure]:
    """Every figure by its path in the file, e.g. ``("models", "swin_tiny", "top1")``."""
    return {path: _figure(entry) for key, node in _document().items() if key != "sources"
            for path, entry in _entries(node, (key,))}


def figure(table: str, row: str | None = None, field: str | None = None) -> PaperFigure:
    """The figure at ``table`` / ``row`` / ``field`` (as deep as the table goes): ``figure("models",
    "biformer_small", "top1")``, ``figure("ade20k_sfpn_miou", "biformer_small")``, ``figure("bra_cost_formula")``."""
    path = tuple(part for part in (table, row, field) if part is not None)
    try:
        return figures()[path]
    except KeyError:
        raise KeyError(f"no figure {'.'.join(path)} in {PAPER_FIGURES.name}") from None


def seed_only_figures() -> dict[tuple[str, ...], PaperFigure]:
    """The figures no primary source we read confirms (printed with ``SEED_ONLY_MARK``)."""
    return {path: found for path, found in figures().items() if found.status == "seed-only"}


def provenance_lines(shown: Iterable[PaperFigure]) -> list[str]:
    """Markdown bullets naming where the figures in ``shown`` come from: one per source location and status
    (figures read at the same place share it), with the other published values of the same quantity, then the
    seed-only footnote when one of them carries ``SEED_ONLY_MARK``."""
    by_place: dict[tuple[str, str], list[PaperFigure]] = {}
    for found in shown:
        same = by_place.setdefault((found.source, found.status), [])
        if found not in same:
            same.append(found)
    lines, marked = [], False
    for (source, status), found in by_place.items():
        marked = marked or status == "seed-only"
        if status == "not-found":
            lines.append(f"- not found ({len(found)} figure{'s' * (len(found) > 1)}): the paper's table ({source}) "
                         f"has the row, but no source reachable here gives the figure; where we looked: "
                         f"{found[0].searched}")
            continue
        line = f"- {', '.join(item.cell() for item in found)}: {status}, {source}"
        for other in dict.fromkeys(other for item in found for other in item.also):
            marked = marked or bool(other.mark)
            line += f"; also published: {other.cell()} ({other.status}, {other.source})"
        notes = list(dict.fromkeys(item.note for item in found if item.note))
        lines.append(line + "".join(f" (note: {note})" for note in notes))
    return [*lines, *(["", SEED_ONLY_FOOTNOTE] if marked else [])]


def _values(node: Any) -> Any:
    if _is_entry(node):
        return node["value"]
    if isinstance(node, dict):
        return {key: _values(child) for key, child in node.items()
                if not (_is_entry(child) and child["value"] is None)}
    return node


@cache
def paper_figures() -> dict[str, Any]:
    """The file with every figure replaced by its value (figures without one left out): ``paper_figures()
    ["models"]["biformer_tiny"]["top1"] == 81.4``."""
    document = _document()
    return {key: (node if key == "sources" else _values(node)) for key, node in document.items()}


def bra_paper_macs(height: int, width: int, dim: int, n_win: int, topk: int) -> int:
    """BRA's cost as the paper writes it: 3HWC² + 2(S²)²C + 2·HW·k·(HW/S²)·C (MACs)."""
    tokens, regions = height * width, n_win * n_win
    return 3 * tokens * dim * dim + 2 * regions * regions * dim + 2 * tokens * topk * (tokens // regions) * dim
