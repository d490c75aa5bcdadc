"""Plots of a run: against token count (log–log: throughput, peak memory and FLOPs, one line per mechanism), and
whole models' throughput against their GMACs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .flags import is_flagged  # noqa: E402

PLOTS = [
    ("images_per_s", "throughput (images/s)", "throughput"),
    ("peak_mib", "peak memory (MiB)", "memory"),
    ("counted_gflops_per_image", "GFLOPs per image (FlopCounterMode, 2 per MAC)", "flops"),
]


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in text).strip("_")


def _is_scaling_curve(frame: pd.DataFrame) -> bool:
    """True when the group's shapes differ only in H·W (same channels and heads): a scaling curve whose points
    may be joined and compared with O(N), O(N^4/3), O(N²). Stages of a backbone (other C) are not one curve."""
    return frame[["dim", "heads"]].drop_duplicates().shape[0] == 1


def _error(series: pd.DataFrame, column: str):
    """Half the IQR as the error bar of a latency-derived column; None for the others."""
    if column != "images_per_s" or series["iqr_ms"].isna().all():
        return None
    relative = series["iqr_ms"] / 2 / series["median_ms"]
    return relative * series[column]


def _references(axes, data: pd.DataFrame, column: str) -> None:
    """O(N), O(N^{4/3}), O(N²) guides through the median of the smallest token count."""
    first = data[data["tokens"] == data["tokens"].min()][column].median()
    n0, n1 = data["tokens"].min(), data["tokens"].max()
    sign = -1 if column == "images_per_s" else 1  # throughput falls as cost rises
    for exponent, style in ((1.0, ":"), (4 / 3, "-."), (2.0, "--")):
        label = {1.0: "O(N)", 4 / 3: "O(N^4/3)", 2.0: "O(N²)"}[exponent]
        axes.plot([n0, n1], [first, first * (n1 / n0) ** (sign * exponent)], style, color="grey", linewidth=0.9,
                  label=f"{label} reference")


def make_plots(frame: pd.DataFrame, title: str, directory: Path) -> list[Path]:
    """PNGs for one group of cases (log–log against tokens); none when the group has a single token count.
    Error bars: half the IQR; failed cases: a red cross at the bottom of the axis; a scaling curve (shapes that
    differ only in H·W) is joined and shown beside O(N), O(N^4/3) and O(N²) guides, stages of a backbone are
    points only."""
    if frame["tokens"].nunique() < 2:
        return []
    ok, failed = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    curve = _is_scaling_curve(frame)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for column, ylabel, name in PLOTS:
        data = ok[pd.to_numeric(ok[column], errors="coerce") > 0]  # log axes: no zero (no measurable rise), no gap
        if data.empty:
            continue
        figure, axes = plt.subplots(figsize=(7.6, 4.2))
        for label, series in data.groupby("label", sort=False):
            series = series.sort_values("tokens")
            axes.errorbar(series["tokens"], series[column].astype(float), yerr=_error(series, column), marker="o",
                          linestyle="-" if curve else "none", capsize=2, label=label)
        if curve and data["tokens"].nunique() >= 2:
            _references(axes, data, column)
        if len(failed):
            bottom = data[column].astype(float).min()
            axes.scatter(failed["tokens"], [bottom] * len(failed), marker="x", color="red", zorder=5,
                         label="failed (" + ", ".join(sorted(set(failed["status"]))) + ")")
        xlabel = "tokens (H·W)" + ("" if curve else " — stages differ in C: points, not a curve")
        paths.append(_save_log_log(figure, axes, xlabel, ylabel, title, directory / f"{name}_{_slug(title)}.png"))
    return paths


def _save_log_log(figure, axes, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Log–log axes with their labels, grid and a legend beside them; written to ``path`` and closed."""
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def throughput_against_gmacs(frame: pd.DataFrame, title: str, directory: Path) -> Path | None:
    """One point per model (GMACs per image, images/s; error bar: half the IQR; flagged timings hollow), with the
    lines of equal FLOP rate through the fastest and slowest points: a model below another's line does less with
    each MAC. None when fewer than two models finished."""
    ok = frame[(frame["status"] == "ok") & (pd.to_numeric(frame["images_per_s"], errors="coerce") > 0)]
    if len(ok) < 2:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    gmacs = ok["counted_gflops_per_image"].astype(float) / 2
    figure, axes = plt.subplots(figsize=(8.6, 4.8))
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>pP*Xh"
    for index, ((_, row), x) in enumerate(zip(ok.iterrows(), gmacs, strict=True)):
        flagged = is_flagged(row)
        colour = colours[index % len(colours)]
        axes.errorbar([x], [row["images_per_s"]], yerr=_error(ok.loc[[row.name]], "images_per_s"),
                      marker=markers[index % len(markers)], capsize=2, color=colour,
                      markerfacecolor="white" if flagged else colour, label=row["label"] + (" ⚠" if flagged else ""))
    rates = ok["images_per_s"].astype(float) * gmacs
    span = [gmacs.min() * 0.8, gmacs.max() * 1.25]
    for rate in (rates.max(), rates.min()):
        axes.plot(span, [rate / x for x in span], ":", color="grey", linewidth=0.9)
        axes.annotate(f"{rate:.0f} GMAC/s", (span[0], rate / span[0]), fontsize=7, color="grey", va="bottom")
    step = "" if (ok["mode"] == "forward").all() else ", the forward+backward step's"
    return _save_log_log(figure, axes, f"GMACs per image (FlopCounterMode ÷ 2{step})", "throughput (images/s)",
                         title + " (hollow, ⚠: flagged timing)", directory / f"models_{_slug(title)}.png")
