"""Scaling: log–log slopes of cost against token count N = H·W, per mechanism, with confidence intervals.

For every mechanism measured at three or more token counts of one *schedule*, the section fits cost ≈ a · N^b
(report/fit.py: least squares on log–log axes, Student's t-interval on b) for

- analytic MACs per image (the mechanism's ``macs()``, every part),
- routing + attention MACs per image (the record's ``analytic_parts``: ``routing``, ``attn_scores``,
  ``attn_values``; BRA's O(N^{4/3}) term under S ∝ N^{1/3}, full attention's O(N²)),
- latency (median per batch) and peak memory, over the sizes that ran (a case that failed is left out),

as a table and a plot with the fitted lines and O(N), O(N^{4/3}), O(N²) references.

A schedule is the set of a run's shapes that share the letters their names start with, their channels and their
heads (suites/scaling.yaml: ``n14`` … ``n112``, the fixed-S schedule, and ``h8_s4`` … ``h216_s36``, the exact
S ∝ N^{1/3} family), so two size schedules of one mechanism are never fitted as one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..records import RecordStore  # noqa: E402
from .fit import SlopeFit, fit_loglog_slope, reference_line  # noqa: E402
from .sections import Run, Section, markdown  # noqa: E402
from .tables import groups  # noqa: E402

CORE_PARTS = ("routing", "attn_scores", "attn_values")
QUANTITIES = {  # frame column -> what it is
    "analytic_gmacs_per_image": "analytic MACs",
    "core_gmacs_per_image": "routing + attention MACs",
    "median_ms": "latency",
    "peak_mib": "peak memory",
}
UNITS = {"analytic MACs": "GMACs per image", "routing + attention MACs": "GMACs per image",
         "latency": "ms per batch", "peak memory": "MiB"}
REFERENCES = ((1.0, "$O(N)$", ":"), (4 / 3, "$O(N^{4/3})$", "--"), (2.0, "$O(N^2)$", "-."))
MIN_POINTS = 3


def schedule_of(shape: str) -> str:
    """The letters a shape's name starts with (``h27_s9`` -> ``h``; ``n56`` -> ``n``)."""
    return re.match(r"[^\d]*", shape).group(0)


def core_macs(parts: dict[str, int] | None) -> int | None:
    """Routing + attention MACs (scores and values) of a record's ``analytic_parts``; None without them."""
    if not parts or not any(name in parts for name in CORE_PARTS[1:]):
        return None
    return sum(parts.get(name, 0) for name in CORE_PARTS)


def analytic_parts(run_dir: Path) -> dict[str, dict[str, int]]:
    """Each record's ``analytic_parts`` (MACs per part, the case's batch included) by case id."""
    return {record.id: record.metrics["flops"]["analytic_parts"]
            for record in RecordStore(run_dir / "records.jsonl").latest()
            if "analytic_parts" in (record.metrics.get("flops") or {})}


def with_core_macs(frame: pd.DataFrame, parts_by_id: dict[str, dict[str, int]]) -> pd.DataFrame:
    """The frame with ``core_gmacs_per_image`` (routing + attention GMACs per image) from ``parts_by_id``."""
    frame = frame.copy()
    core = [core_macs(parts_by_id.get(case_id)) for case_id in frame["id"]]
    frame["core_gmacs_per_image"] = [None if macs is None else macs / batch / 1e9
                                     for macs, batch in zip(core, frame["batch"], strict=True)]
    return frame


@dataclass(frozen=True)
class Series:
    """One mechanism's points of one quantity on one schedule, and their fit."""

    group: str
    schedule: str
    label: str
    quantity: str
    tokens: tuple[int, ...]
    values: tuple[float, ...]
    fit: SlopeFit


def _schedules(frame: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(group title, schedule title, rows) of the ok attention cases."""
    ok = frame[(frame["kind"] == "attention") & (frame["status"] == "ok")]
    for title, group in groups(ok):
        keys = group.apply(lambda row: (schedule_of(row["shape"]), row["dim"], row["heads"]), axis=1)
        for (prefix, dim, heads), rows in group.groupby(keys, sort=False):
            names = list(dict.fromkeys(rows.sort_values("tokens")["shape"]))
            yield title, f"{prefix}… ({names[0]} to {names[-1]}; C={dim}, heads={heads})", rows


def fit_series(frame: pd.DataFrame) -> list[Series]:
    """Every (group, schedule, mechanism, quantity) with at least ``MIN_POINTS`` token counts, fitted."""
    series = []
    for title, schedule, rows in _schedules(frame):
        for label, of_label in rows.groupby("label", sort=False):
            for column, quantity in QUANTITIES.items():
                if column not in of_label:
                    continue
                values = pd.to_numeric(of_label[column], errors="coerce")
                points = of_label.assign(value=values)[(values > 0) & np.isfinite(values)]
                points = points.sort_values("tokens").drop_duplicates("tokens")
                if len(points) < MIN_POINTS:
                    continue
                tokens, ys = tuple(int(n) for n in points["tokens"]), tuple(float(y) for y in points["value"])
                series.append(Series(title, schedule, label, quantity, tokens, ys, fit_loglog_slope(tokens, ys)))
    return series


def slope_table(series: list[Series]) -> pd.DataFrame:
    """One row per (schedule, mechanism): each quantity's slope with its interval and the N it covers."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for item in series:
        row = rows.setdefault((item.schedule, item.label), {"schedule": item.schedule, "mechanism": item.label})
        row[f"{item.quantity} slope"] = (f"{item.fit.describe()}, N {item.tokens[0]:,}–{item.tokens[-1]:,}")
    table = pd.DataFrame(list(rows.values()))
    columns = ["schedule", "mechanism", *(f"{q} slope" for q in QUANTITIES.values())]
    return table.reindex(columns=[c for c in columns if c in table.columns]).fillna("")


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", "".join(char if char.isalnum() else "_" for char in text)).strip("_")


def plot_fits(series: list[Series], title: str, path: Path) -> Path:
    """One panel per quantity: each mechanism's points and fitted line, O(N), O(N^{4/3}), O(N²) guides through
    the smallest point of the panel; the legend beside the panels, outside the data."""
    quantities = [q for q in QUANTITIES.values() if any(item.quantity == q for item in series)]
    columns = min(len(quantities), 2)
    rows = math.ceil(len(quantities) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for unused in axes.flat[len(quantities):]:
        unused.set_visible(False)
    colours = {label: f"C{index}" for index, label in enumerate(dict.fromkeys(item.label for item in series))}
    handles: dict[str, object] = {}
    for axis, quantity in zip(axes.flat, quantities, strict=False):
        panel = [item for item in series if item.quantity == quantity]
        for item in panel:
            xs = np.geomspace(item.tokens[0], item.tokens[-1], 50)
            axis.plot(item.tokens, item.values, "o", color=colours[item.label])
            (line,) = axis.plot(xs, item.fit.predict(xs), "-", color=colours[item.label], alpha=0.8)
            handles.setdefault(item.label, line)
        low = min(panel, key=lambda item: (item.tokens[0], item.values[0]))
        xs = np.geomspace(min(item.tokens[0] for item in panel), max(item.tokens[-1] for item in panel), 50)
        for exponent, name, style in REFERENCES:
            (line,) = axis.plot(xs, reference_line(xs, exponent, (low.tokens[0], low.values[0])), style,
                                color="grey", linewidth=1)
            handles.setdefault(name, line)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tokens N = H·W")
        axis.set_ylabel(UNITS[quantity])
        axis.set_title(quantity, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    labels = [f"{label} (fit)" if label in colours else f"{label} reference" for label in handles]
    figure.suptitle(title, fontsize=9)
    figure.legend(list(handles.values()), labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


class Scaling(Section):
    """Fitted log–log slopes of MACs, routing + attention MACs, latency and peak memory against N."""

    kind = "attention"

    def _series(self, frame: pd.DataFrame, run: Run) -> list[Series]:
        rows = self.rows(frame)
        if rows.empty:
            return []
        return fit_series(with_core_macs(rows, analytic_parts(run.directory)))

    def applies(self, frame, run):
        return bool(self._series(frame, run))

    def render(self, frame, run):
        lines = ["## Scaling: fitted log–log slopes against token count", "",
                 "Each cell: the slope b of cost ≈ a·N^b, least squares on log–log axes, with its 95% Student-t "
                 "interval, the number of sizes fitted and the N they span (report/fit.py). Shapes form one "
                 "schedule when their names start with the same letters and they share C and heads. Routing + "
                 "attention MACs are the record's `routing`, `attn_scores` and `attn_values` parts (BRA's "
                 "O(N^{4/3}) term under S ∝ N^{1/3}; full attention's O(N²)); analytic MACs add the projections "
                 "and convs, linear in N. Latency and memory are fitted over the sizes that ran (failed cases, "
                 "e.g. OOM, are left out), so their N range may stop short of the MACs'. Wall-clock slopes over "
                 "small N carry fixed overheads and are reported, not scored.", ""]
        series = self._series(frame, run)
        for title in dict.fromkeys(item.group for item in series):
            in_group = [item for item in series if item.group == title]
            lines += [f"### {title}", "", markdown(slope_table(in_group), index=False), ""]
            for schedule in dict.fromkeys(item.schedule for item in in_group):
                name = f"scaling_{_slug(title)}_{_slug(schedule)}"
                path = plot_fits([item for item in in_group if item.schedule == schedule], f"{title}: {schedule}",
                                 run.directory / "plots" / f"{name}.png")
                lines += [f"![{path.stem}](plots/{path.name})", ""]
        return lines


def slope_of(series: list[Series], label: str, quantity: str, schedule_prefix: str | None = None) -> Series | None:
    """The first fitted series of ``label`` and ``quantity`` (on a schedule starting with ``schedule_prefix``)."""
    return next((item for item in series if item.label == label and item.quantity == quantity
                 and (schedule_prefix is None or item.schedule.startswith(schedule_prefix))), None)

