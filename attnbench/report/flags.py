"""Which timed cells a reader should not trust, and why: every rule in one place, applied to every report.

A timed case is flagged when
* its spread is wide: IQR above ``MAX_IQR_RATIO`` of the median (torch.utils.benchmark warns from 10%);
* its samples did not converge to the suite's ``target_iqr`` within the time budget;
* the machine's load changed during it by ``LOAD_CHANGE`` or more (1-minute load average, before and after),
  or stood above the number of cores (other work shared the CPUs);
* its achieved FLOP/s exceed the dense GEMM rate measured in the same run (a roofline fraction above 100% is
  a measurement error: a wrong FLOP count or a GEMM rate measured under different load), never a result.

Flagged cells carry ``MARK`` in every table that shows a timing, with a footnote per case giving the reasons,
and the report's header counts them.
"""

from __future__ import annotations

import math

import pandas as pd

MARK = "⚠"
MAX_IQR_RATIO = 0.10
LOAD_CHANGE = 1.0


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def is_flagged(row: pd.Series) -> bool:
    """Whether ``row``'s timing carries a flag (``add_flags`` wrote a reason)."""
    return isinstance(row.get("flags"), str) and bool(row.get("flags"))


def reasons(row: pd.Series, cores: int | None) -> list[str]:
    """Why the timing of this case (a frame row) is not to be trusted; empty when it is."""
    if row.get("status") != "ok" or not _present(row.get("median_ms")):
        return []
    found = []
    if row["median_ms"] > 0 and _present(row.get("iqr_ms")) and row["iqr_ms"] / row["median_ms"] > MAX_IQR_RATIO:
        found.append(f"spread: IQR {100 * row['iqr_ms'] / row['median_ms']:.0f}% of the median")
    if row.get("converged") is False:
        found.append("samples did not converge within the time budget")
    before, after = row.get("load_before"), row.get("load_after")
    if _present(before) and _present(after):
        if abs(after - before) >= LOAD_CHANGE:
            found.append(f"load changed during the case ({before:.1f} → {after:.1f})")
        elif cores and max(before, after) > cores:
            found.append(f"machine busy (load {max(before, after):.1f} on {cores} cores)")
    fraction = row.get("fraction_of_gemm")
    if _present(fraction) and fraction > 1.0:
        found.append(f"roofline {100 * fraction:.0f}% of the GEMM rate: impossible, a measurement error")
    return found


def add_flags(frame: pd.DataFrame, cores: int | None) -> pd.DataFrame:
    """The frame with a ``flags`` column: the reasons of each case, joined by '; ' (empty when trusted)."""
    frame = frame.copy()
    frame["flags"] = ["; ".join(reasons(row, cores)) for _, row in frame.iterrows()] if len(frame) else []
    return frame


def footnote(frame: pd.DataFrame) -> list[str]:
    """Markdown lines listing every flagged case with its reasons (nothing when none is flagged)."""
    flagged = frame[frame["flags"] != ""] if len(frame) else frame
    if flagged.empty:
        return []
    lines = [f"{MARK} marks a timing that is not to be trusted as it stands:", ""]
    for _, row in flagged.iterrows():
        lines.append(f"- {row['label']} @ {row['shape']} ({row['dtype']}, {row['mode']}, batch {row['batch']}): "
                     f"{row['flags']}")
    return [*lines, ""]
