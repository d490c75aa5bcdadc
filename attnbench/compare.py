"""``python -m attnbench compare RUN_A RUN_B``: the figures of two runs side by side, as ratios B ÷ A.

Cases are matched on their key (attnbench/cases.py ``Case.key``: what is measured, not how often), so runs
of the same suite under other repeats still match. A difference within the two runs' own noise (the larger
relative half-IQR of the two latencies, at least ``MIN_NOISE``) is printed as "same". ``--fail-above 10%``
makes the command exit 1 when a matched case got slower by more than that and beyond its noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from .records import RecordStore
from .report.frame import records_frame

MIN_NOISE = 0.02
# metric column -> (header, whether higher is better)
METRICS = {
    "median_ms": ("latency", False),
    "images_per_s": ("throughput", True),
    "peak_mib": ("peak memory", False),
    "counted_gflops_per_image": ("GFLOPs", False),
    "top1": ("top-1", True),
    "miou": ("mIoU", True),
}


@dataclass(frozen=True)
class Comparison:
    table: pd.DataFrame  # one row per matched case
    summary: pd.DataFrame  # geometric mean of the latency ratio per mechanism
    only_a: list[str]
    only_b: list[str]
    regressions: list[str]  # cases slower beyond noise and beyond the threshold
    environments: tuple[dict, dict]


def _run(run_dir: Path) -> tuple[pd.DataFrame, dict]:
    info = json.loads((run_dir / "run.json").read_text())
    frame = records_frame(RecordStore(run_dir / "records.jsonl").latest())
    return frame, info


def _noise(a: pd.Series, b: pd.Series) -> float:
    halves = [row.iqr_ms / 2 / row.median_ms for row in (a, b)
              if not pd.isna(row.get("iqr_ms")) and not pd.isna(row.get("median_ms")) and row.median_ms > 0]
    return max([MIN_NOISE, *halves])


def _cell(a, b, higher_better: bool, noise: float) -> str:
    if any(value is None or pd.isna(value) for value in (a, b)) or a == 0:
        return ""
    ratio = b / a
    verdict = "same" if abs(ratio - 1) <= noise else (
        "better" if (ratio > 1) == higher_better else "worse")
    return f"{ratio:.2f}× ({verdict})"


def compare(run_a: Path, run_b: Path, fail_above: float | None = None) -> Comparison:
    frame_a, info_a = _run(run_a)
    frame_b, info_b = _run(run_b)
    ok_a = frame_a[frame_a["status"] == "ok"].set_index("key") if len(frame_a) else frame_a
    ok_b = frame_b[frame_b["status"] == "ok"].set_index("key") if len(frame_b) else frame_b
    keys_a = list(dict.fromkeys(frame_a["key"])) if len(frame_a) else []
    keys_b = list(dict.fromkeys(frame_b["key"])) if len(frame_b) else []
    describe = {row.key: f"{row.label} @ {row.shape} ({row.dtype}, {row.mode}, b{row.batch})"
                for frame in (frame_a, frame_b) for row in frame.itertuples()}
    rows, regressions, ratios = [], [], []
    for key in keys_a:
        if key not in ok_b.index or key not in ok_a.index:
            continue
        a, b = ok_a.loc[key], ok_b.loc[key]
        noise = _noise(a, b)
        row = {"case": describe[key], "noise ±": f"{100 * noise:.0f}%"}
        for column, (header, higher_better) in METRICS.items():
            row[f"{header} B÷A"] = _cell(a.get(column), b.get(column), higher_better, noise if column in (
                "median_ms", "images_per_s") else 0.005)
        rows.append(row)
        if not pd.isna(a.get("median_ms")) and not pd.isna(b.get("median_ms")):
            ratio = b.median_ms / a.median_ms
            ratios.append((a.label, ratio))
            if fail_above is not None and ratio > 1 + max(fail_above, noise):
                regressions.append(f"{describe[key]}: {ratio:.2f}× slower (noise ±{100 * noise:.0f}%)")
    table = pd.DataFrame(rows)
    if len(table):
        table = table[[c for c in table.columns if c in ("case", "noise ±") or (table[c] != "").any()]]
    summary = pd.DataFrame([
        {"mechanism": label, "cases": len(values),
         "latency B÷A, geometric mean": f"{math.exp(sum(math.log(v) for v in values) / len(values)):.2f}×"}
        for label, values in _grouped(ratios).items()])
    return Comparison(table, summary, [describe[k] for k in keys_a if k not in keys_b],
                      [describe[k] for k in keys_b if k not in keys_a], regressions,
                      (info_a["environment"], info_b["environment"]))


def _grouped(pairs: list[tuple[str, float]]) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = {}
    for label, value in pairs:
        grouped.setdefault(label, []).append(value)
    return grouped


def _environment_line(env: dict) -> str:
    sha = str(env.get("git_sha") or "unknown")[:12]
    return (f"{env.get('device_name')} ({env.get('device')}), {env.get('threads')} threads, torch {env.get('torch')}, "
            f"attnbench @ {sha}{' (uncommitted changes)' if env.get('git_dirty') is True else ''}, "
            f"host {env.get('hostname')}, started {env.get('time')}")


def render(comparison: Comparison, run_a: Path, run_b: Path, fail_above: float | None) -> str:
    def markdown(frame: pd.DataFrame) -> str:
        if frame.empty:
            return "_none_"
        return tabulate(frame, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    env_a, env_b = comparison.environments
    lines = [f"# Comparison: B `{run_b}` against A `{run_a}`", "",
             f"- A: {_environment_line(env_a)}", f"- B: {_environment_line(env_b)}", "",
             "Ratios are B ÷ A on cases matched by what they measure; \"same\" where the difference lies within "
             f"the two runs' own noise (the larger relative half-IQR of the two latencies, at least {MIN_NOISE:.0%}).",
             ""]
    if any(env_a.get(key) != env_b.get(key) for key in ("hostname", "device_name", "threads", "torch")):
        lines += ["**The two runs come from different machines or thread counts: the timing ratios compare the "
                  "machines as much as the code.**", ""]
    lines += ["## Per mechanism (latency, geometric mean over its matched cases)", "", markdown(comparison.summary),
              "", "## Per case", "", markdown(comparison.table), ""]
    for title, cases in (("Only in A", comparison.only_a), ("Only in B", comparison.only_b)):
        if cases:
            lines += [f"## {title}", "", *[f"- {case}" for case in cases], ""]
    if fail_above is not None:
        lines += [f"## Regressions beyond {fail_above:.0%} and beyond noise", "",
                  *([f"- {line}" for line in comparison.regressions] or ["_none_"]), ""]
    return "\n".join(lines).rstrip() + "\n"
