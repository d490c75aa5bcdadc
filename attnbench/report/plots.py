"""Plots of a run against token count (log–log): throughput, peak memory and FLOPs, one line per mechanism."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PLOTS = [
    ("images_per_s", "throughput (images/s)", "throughput"),
    ("peak_mib", "peak memory (MiB)", "memory"),
    ("counted_gflops_per_image", "GFLOPs per image (FlopCounterMode, 2 per MAC)", "flops"),
]


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in text).strip("_")


def make_plots(frame: pd.DataFrame, title: str, directory: Path) -> list[Path]:
    """PNGs for one group of cases; none when the group has a single token count."""
    ok = frame[frame["status"] == "ok"]
    if ok["tokens"].nunique() < 2:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for column, ylabel, name in PLOTS:
        data = ok[pd.to_numeric(ok[column], errors="coerce") > 0]  # log axes: no zero (no measurable rise), no gap
        if data.empty:
            continue
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for label, series in data.groupby("label", sort=False):
            series = series.sort_values("tokens")
            axes.plot(series["tokens"], series[column], marker="o", label=label)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("tokens (H·W)")
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = directory / f"{name}_{_slug(title)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
