"""The accuracy section over seeds: what an accuracy sweep can and cannot claim.

Per task: the chance level (100 / classes); per mechanism, the mean over its seeds of the task's score (top-1
or mIoU) and of each distance bin (the colour pointer), with a 95% Student-t interval over seeds (stats.py), and
how many seeds learned their training set at all; the suite's gates, checked before anything is called a
ranking; the suite's hypotheses (comparisons declared before the run, judged as their own family); every pair
of mechanisms' difference (overall and in the farthest bin) with its 95% Welch interval, "separated" only where
the Welch test survives Holm's correction over the table's pairs; and the figures: accuracy against distance
(one line per mechanism, interval bands, chance line) and accuracy against GMACs. One seed gives no interval:
the table says so and ranks nothing.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..train.per_distance import BINS  # noqa: E402
from .stats import SEPARATED, Comparison, Interval, compare_means, holm, mean_interval, wilson  # noqa: E402


def _metric(group: pd.DataFrame) -> str:
    return "top1" if group["task"].iloc[0] == "classification" else "miou"


def _bins(group: pd.DataFrame) -> list[str]:
    """The distance-bin columns with figures, nearest first (records store the bins by name, so the order comes
    from the bins' definition; the last is the farthest)."""
    order = list(BINS)
    columns = [column for column in group.columns if column.startswith("bin_") and group[column].notna().any()]
    return sorted(columns, key=lambda column: order.index(column[4:]) if column[4:] in order else len(order))


def chance(group: pd.DataFrame) -> float | None:
    classes = group["num_classes"].dropna()
    return 100.0 / classes.iloc[0] if len(classes) and group["task"].iloc[0] == "classification" else None


def _percent_bounds(interval: Interval) -> tuple[float, float]:
    """A percentage's interval as shown: inside [0, 100] (a t interval may cross the bounds); the estimate
    itself for one value."""
    if interval.n < 2:
        return interval.estimate, interval.estimate
    return max(interval.low, 0.0), min(interval.high, 100.0)


def _interval_text(values: list[float], images: float | None = None) -> str:
    """Mean [95% Student-t CI over seeds]; no interval where every seed scored the same (it would have zero width);
    for one seed, the Wilson interval of its ``images`` evaluations (the uncertainty of the evaluation alone, not
    of the training), said as such."""
    if not values:
        return ""
    interval = mean_interval(values)
    if interval.n >= 2:
        if len(set(values)) == 1:  # a zero-width interval would look certain; the seeds only did not vary
            return f"{interval.estimate:.1f} (all seeds equal)"
        low, high = _percent_bounds(interval)
        return f"{interval.estimate:.1f} [{low:.1f}, {high:.1f}]"
    if images:
        one = wilson(round(values[0] / 100 * images), int(images))
        return f"{values[0]:.1f} [{100 * one.low:.1f}, {100 * one.high:.1f}] (1 seed; Wilson over {images:.0f} images)"
    return f"{interval.estimate:.1f} (1 seed: no CI)"


# a classifier whose final training loss is above this fraction of the chance loss ln(classes) (what predicting
# the uniform distribution costs, with or without label smoothing) has not learned its training set
LEARNED_BELOW_CHANCE_LOSS = 0.95


def chance_loss(group: pd.DataFrame) -> float | None:
    """ln(classes): the cross-entropy of the uniform prediction, for a classification task."""
    level = chance(group)
    return math.log(100.0 / level) if level else None


def seed_table(group: pd.DataFrame) -> pd.DataFrame:
    """One row per mechanism: seeds, how many of them learned their training set (classification: final
    training loss below ``LEARNED_BELOW_CHANCE_LOSS`` × ln(classes)), the score's mean [95% CI], each bin's mean
    [95% CI]."""
    ok = group[group["status"] == "ok"]
    metric, bins, loss = _metric(group), _bins(group), chance_loss(group)
    rows = []
    for label, runs in group.groupby("label", sort=False):
        done = ok[ok["label"] == label]
        images = done["val_images"].iloc[0] if metric == "top1" and len(done) else None
        row = {"mechanism": label, "seeds": f"{len(done)} of {len(runs)}"}
        if loss and "train_loss" in done and done["train_loss"].notna().any():
            learned = int((done["train_loss"] < LEARNED_BELOW_CHANCE_LOSS * loss).sum())
            row["learned the training set"] = f"{learned} of {int(done['train_loss'].notna().sum())}"
        row[f"{metric} % mean [95% CI]"] = _interval_text(done[metric].dropna().tolist(), images)
        for column in bins:
            row[f"{column[4:]} bin % [95% CI]"] = _interval_text(done[column].dropna().tolist())
        rows.append(row)
    return pd.DataFrame(rows)


def _comparisons(group: pd.DataFrame) -> list[tuple[str, str, str, Comparison | None]]:
    """(first, second, column, Comparison or None) for every pair of mechanisms, in the suite's order, for the
    task's score and the farthest distance bin (None: a side has no figure); the pairs of one column are one
    family, judged together by Holm's procedure."""
    ok = group[group["status"] == "ok"]
    metric, bins = _metric(group), _bins(group)
    labels = list(dict.fromkeys(ok["label"]))
    result = []
    for column in (metric, *bins[-1:]):
        pairs, compared = [], []
        for first, second in itertools.combinations(labels, 2):
            a = ok[ok["label"] == first][column].dropna().tolist()
            b = ok[ok["label"] == second][column].dropna().tolist()
            pairs.append((first, second))
            compared.append(compare_means(a, b) if a and b else None)
        judged = iter(holm([comparison for comparison in compared if comparison is not None]))
        result += [(first, second, column, None if comparison is None else next(judged))
                   for (first, second), comparison in zip(pairs, compared, strict=True)]
    order = {pair: position for position, pair in enumerate(itertools.combinations(labels, 2))}
    return sorted(result, key=lambda row: order[(row[0], row[1])])  # pair by pair, as the table reads


def _difference_name(column: str, metric: str) -> str:
    return "overall" if column == metric else f"{column[4:]} bin"


def pairwise_table(group: pd.DataFrame) -> pd.DataFrame:
    """Every pair's difference of seed means (overall, and in the farthest bin) with its interval and verdict."""
    metric, rows = _metric(group), {}
    for first, second, column, comparison in _comparisons(group):
        row = rows.setdefault((first, second), {"pair": f"{first} − {second}"})
        if comparison is None:
            continue
        row[f"{_difference_name(column, metric)} difference"] = f"{_difference_text(comparison)}: {comparison.verdict}"
    return pd.DataFrame(list(rows.values()))


def _p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _difference_text(comparison: Comparison) -> str:
    """"+31.6 [+9.2, +54.0], Holm p 0.021": a judged difference of seed means with its Welch interval."""
    interval = comparison.difference
    if np.isnan(interval.low):
        return f"{interval.estimate:+.1f} no CI (1 seed)"
    bounds = f"[{interval.low:+.1f}, {interval.high:+.1f}]"
    return f"{interval.estimate:+.1f} {bounds}, Holm p {_p_text(comparison.adjusted_p)}"


def separation_summary(group: pd.DataFrame) -> list[str]:
    """One line per compared quantity (overall, farthest bin): the separated pairs, higher first ("full > swin"),
    and the pairs the run does not rank ("bra ~ axial")."""
    metric, verdicts = _metric(group), {}
    for first, second, column, comparison in _comparisons(group):
        if comparison is None:
            continue
        separated, not_separated = verdicts.setdefault(column, ([], []))
        if comparison.verdict == SEPARATED:
            higher, lower = (first, second) if comparison.difference.estimate > 0 else (second, first)
            separated.append(f"{higher} > {lower}")
        else:
            not_separated.append(f"{first} ~ {second}")
    return [f"- {_difference_name(column, metric)}: separated {', '.join(separated) or 'none'}; "
            f"not separated {', '.join(not_separated) or 'none'}." for column, (separated, not_separated)
            in verdicts.items()]


def _metric_column(metric: str) -> str:
    """A rule's metric (``top1``, ``miou`` or a distance bin such as ``far``) -> its column in the frame."""
    return metric if metric in ("top1", "miou") else f"bin_{metric}"


def _seed_values(group: pd.DataFrame, label: str, metric: str) -> list[float] | None:
    """The finished seeds' values of ``label``'s metric; None where the run has no case of ``label`` at all (a
    shard or --only left the mechanism out)."""
    if not (group["label"] == label).any():
        return None
    ok, column = group[group["status"] == "ok"], _metric_column(metric)
    return ok[ok["label"] == label][column].dropna().tolist() if column in ok else []


def gate_results(group: pd.DataFrame, gates: list[dict]) -> list[tuple[dict, bool, str]]:
    """(gate, held, what was measured) for each gate of the suite; held is None where the run has no case of the
    gate's mechanism (a shard or ``--only`` left it out): the gate could not be checked."""
    level = chance(group)
    results = []
    for gate in gates:
        values = _seed_values(group, gate["label"], gate["metric"])
        if values is None:
            results.append((gate, None, "not in this run"))
            continue
        if not values:
            results.append((gate, False, "not measured"))
            continue
        mean = float(np.mean(values))
        if gate.get("at_least") is not None:
            held = mean >= gate["at_least"]
            results.append((gate, held, f"{mean:.1f} (needs ≥ {gate['at_least']:g})"))
        else:
            held = level is not None and abs(mean - level) <= gate["within_chance"]
            results.append((gate, held, f"{mean:.1f} (needs chance {level:.1f} ± {gate['within_chance']:g})"))
    return results


SUPPORTED, CONTRADICTED, NOT_SUPPORTED = "SUPPORTED", "CONTRADICTED", "NOT SUPPORTED"


def hypothesis_results(group: pd.DataFrame, hypotheses: list[dict]) -> list[tuple[dict, str | None, str]]:
    """(hypothesis, verdict, what was measured) for each hypothesis the suite declared before the run: the Welch
    test of ``higher`` − ``lower`` on the metric's seed values, Holm over the declared hypotheses alone (their own
    family; the table of every pair is another). SUPPORTED: separated, higher above lower; CONTRADICTED:
    separated the other way; NOT SUPPORTED: the run does not separate them; None: a side is not in this run."""
    sides = [[_seed_values(group, hypothesis[side], hypothesis["metric"]) for side in ("higher", "lower")]
             for hypothesis in hypotheses]
    tested = {index: compare_means(*pair) for index, pair in enumerate(sides) if all(pair)}
    judged = dict(zip(tested, holm(list(tested.values())), strict=True))
    results = []
    for index, hypothesis in enumerate(hypotheses):
        if None in sides[index]:
            results.append((hypothesis, None, "not in this run"))
        elif index not in judged:
            results.append((hypothesis, NOT_SUPPORTED, "not measured"))
        else:
            comparison = judged[index]
            verdict = (NOT_SUPPORTED if comparison.verdict != SEPARATED else
                       SUPPORTED if comparison.difference.estimate > 0 else CONTRADICTED)
            results.append((hypothesis, verdict, f"difference {_difference_text(comparison)}"))
    return results


def distance_plot(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Accuracy against distance d: one line per mechanism (mean over seeds), a band of its 95% CI, chance."""
    ok = group[(group["status"] == "ok") & group["per_distance"].notna()]
    if ok.empty:
        return None
    figure, axes = plt.subplots(figsize=(7.6, 4.2))
    colours = _colours(group)
    for label, runs in ok.groupby("label", sort=False):
        per_seed = [json.loads(text) for text in runs["per_distance"]]
        distances = sorted({int(d) for table in per_seed for d in table}, key=int)
        means, lows, highs = [], [], []
        for d in distances:
            values = [table[str(d)] for table in per_seed if str(d) in table]
            interval = mean_interval(values)
            means.append(interval.estimate)
            low, high = _percent_bounds(interval)
            lows.append(low)
            highs.append(high)
        axes.plot(distances, means, marker="o", color=colours[label], label=f"{label} ({len(per_seed)} seeds)")
        axes.fill_between(distances, lows, highs, color=colours[label], alpha=0.2)
    level = chance(group)
    if level is not None:
        axes.axhline(level, color="grey", linestyle="--", label=f"chance ({level:.0f}%)")
    axes.set_xlabel("distance d of the partner from the query (tokens, Chebyshev)")
    axes.set_ylabel("top-1 %")
    return _save(figure, axes, title, path)


def cost_plot(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Accuracy (overall and farthest bin, mean over seeds) against GMACs per image: the cost–reach trade-off."""
    ok = group[(group["status"] == "ok") & group["counted_gflops_per_image"].notna()]
    if ok.empty:
        return None
    metric, bins = _metric(group), _bins(group)
    # the score is a filled circle, the farthest bin a hollow triangle, both in the mechanism's colour
    shown = [(metric, "o", "overall"), *((column, "^", f"{column[4:]} bin") for column in bins[-1:])]
    figure, axes = plt.subplots(figsize=(7.6, 4.2))
    colours = _colours(group)
    for label, runs in ok.groupby("label", sort=False):
        gmacs = runs["counted_gflops_per_image"].mean() / 2
        for column, marker, _ in shown:
            values = runs[column].dropna().tolist()
            if values:
                interval = mean_interval(values)
                low, high = _percent_bounds(interval)
                error = None if interval.n < 2 else [[interval.estimate - low], [high - interval.estimate]]
                axes.errorbar([gmacs], [interval.estimate], yerr=error, marker=marker, capsize=2,
                              color=colours[label], markerfacecolor=colours[label] if marker == "o" else "white")
    handles = [Line2D([], [], color=colours[label], marker="s", linestyle="none", label=label)
               for label in dict.fromkeys(ok["label"])]
    handles += [Line2D([], [], color="black", marker=marker, markerfacecolor="black" if marker == "o" else "white",
                       linestyle="none", label=name) for _, marker, name in shown]
    axes.set_xscale("log")
    axes.set_xlabel("GMACs per image (FlopCounterMode ÷ 2)")
    axes.set_ylabel(f"{metric} % (mean over seeds, 95% CI)")
    return _save(figure, axes, title, path, handles)


def _colours(group: pd.DataFrame) -> dict[str, tuple]:
    """One colour per mechanism, the same in every figure of a task and never shared (tab10, tab20 beyond ten)."""
    labels = list(dict.fromkeys(group["label"]))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: palette(index % palette.N) for index, label in enumerate(labels)}


def _save(figure, axes, title: str, path: Path, handles: list | None = None) -> Path:
    """Title, grid, the legend (the labelled artists, or ``handles``) outside the data, written to ``path``."""
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
