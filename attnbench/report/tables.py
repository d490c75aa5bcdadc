"""The report's tables, each a pandas pivot of the flat frame with failures spelled out in their cells.

Rows keep the order the suite lists mechanisms, columns the order it lists shapes. A cell whose case did not
finish says why (OOM, TIMEOUT, ERROR, NaN, UNSUPPORTED) instead of going blank.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pandas as pd

import attentions

from ..paper import PaperFigure, bra_paper_macs, figure, paper_figures
from ..status import Status
from .flags import MARK, is_flagged

GROUP = ["device", "dtype", "mode", "batch"]


def failed_cell(status: str) -> str:
    """OOM, TIMEOUT, ERROR, NaN, MISMATCH or UNSUPPORTED for a case that did not finish; empty for ok."""
    return Status(status).cell


def _row_labels(frame: pd.DataFrame, columns: str) -> pd.Series:
    """Each case's row: its label, or, where two cases of this table share a label and a column (runs recorded
    before labels had to be distinct), the label with the case's options, so no case hides another."""
    shared = frame.duplicated(["label", columns], keep=False)
    same_options = frame.duplicated(["label", columns, "options"], keep=False)
    suffix = frame["options"].where(~same_options, "seed " + frame["seed"].astype(str))
    return frame["label"].where(~shared, frame["label"] + " " + suffix)


def _pivot(frame: pd.DataFrame, cell: Callable[[pd.Series], str], columns: str = "shape",
           timing: bool = False) -> pd.DataFrame:
    """Rows: labels in suite order; columns: ``columns`` values in suite order; cells from ``cell(row)``;
    ``timing``: a cell whose case is flagged (flags.py) carries the mark."""
    labels = _row_labels(frame, columns)
    rows = list(dict.fromkeys(labels))
    cols = list(dict.fromkeys(frame[columns]))
    table = pd.DataFrame("", index=pd.Index(rows, name="mechanism"), columns=cols)
    for (_, row), label in zip(frame.iterrows(), labels, strict=True):
        table.loc[label, row[columns]] = failed_cell(row["status"]) or (cell(row) + _mark(row, timing))
    return table


def _mark(row: pd.Series, timing: bool) -> str:
    return f" {MARK}" if timing and is_flagged(row) else ""


def _shape_header(frame: pd.DataFrame) -> dict[str, str]:
    first = frame.drop_duplicates("shape").set_index("shape")
    return {shape: f"{shape} ({row.height}×{row.width}, C={row.dim}, heads={row.heads})"
            for shape, row in first.iterrows()}


def groups(frame: pd.DataFrame):
    """(title, sub-frame) per device / dtype / mode / batch, in the order first seen."""
    for key, sub in frame.groupby(GROUP, sort=False):
        device, dtype, mode, batch = key
        yield f"{device}, {dtype}, {mode.replace('_', '+')}, batch {batch}", sub


def latency_table(frame: pd.DataFrame) -> pd.DataFrame:
    def cell(row):
        return _number(row.median_ms, "{:.2f}") + _number(_scaled(row.iqr_ms, 0.5), " (±{:.2f})")
    table = _pivot(frame, cell, timing=True)
    return table.rename(columns=_shape_header(frame))


def throughput_table(frame: pd.DataFrame) -> pd.DataFrame:
    table = _pivot(frame, lambda row: _number(row.images_per_s, "{:,.1f}"), timing=True)
    return table.rename(columns=_shape_header(frame))


def speedup_table(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Latency of the ``baseline`` row ÷ latency of each row, per shape (> 1: faster than the baseline)."""
    base = frame[(frame["label"] == baseline) & (frame["status"] == "ok")].set_index("shape")["median_ms"]

    def cell(row):
        if row["shape"] not in base.index or pd.isna(row.median_ms):
            return "no baseline" if row["shape"] not in base.index else ""
        return f"{base[row['shape']] / row.median_ms:.2f}×"
    return _pivot(frame, cell, timing=True).rename(columns=_shape_header(frame))


def roofline_table(frame: pd.DataFrame) -> pd.DataFrame:
    def cell(row):
        return _number(_scaled(row.fraction_of_gemm, 100), "{:.1f}%")
    return _pivot(frame, cell, timing=True).rename(columns=_shape_header(frame))


def memory_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Each cell: the step's total peak, then in brackets the part above the module and its input."""
    def cell(row):
        return "not measured" if pd.isna(row.peak_mib) else f"{row.peak_mib:,.1f} ({row.activation_mib:,.1f})"
    return _pivot(frame, cell).rename(columns=_shape_header(frame))


def _forward(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (mechanism, shape) for size-only measures: the first forward record with FLOPs."""
    forward = frame[(frame["mode"] == "forward") & frame["analytic_gmacs_per_image"].notna()]
    return forward.drop_duplicates(["label", "shape"])


def complexity_tables(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per image, one table per quantity, each at one precision: analytic GMACs (the paper's convention),
    FlopCounterMode GFLOPs (2 per MAC) and keys attended per query (with the density keys ÷ H·W). One row per
    (mechanism, shape) from its forward cases; a case that failed shows its status."""
    forward = frame[frame["mode"] == "forward"]
    measured = forward[forward["analytic_gmacs_per_image"].notna()].drop_duplicates(["label", "shape"])
    failed = forward[(forward["status"] != "ok")].drop_duplicates(["label", "shape"])
    rows = pd.concat([measured, failed[~failed.set_index(["label", "shape"]).index.isin(
        measured.set_index(["label", "shape"]).index)]]).sort_index()
    if rows.empty:
        return []
    header = _shape_header(rows)

    def keys(row):
        return _number(row.keys_per_query, "{:.1f}") + _number(_scaled(row.density, 100), " ({:.1f}%)")
    return [
        ("Analytic GMACs per image (multiply-adds, the paper's convention):",
         _pivot(rows, lambda row: _number(row.analytic_gmacs_per_image, "{:.4f}")).rename(columns=header)),
        ("FlopCounterMode GFLOPs per image (2 per multiply-add; blind to grid_sample, top-k, gather):",
         _pivot(rows, lambda row: _number(row.counted_gflops_per_image, "{:.4f}")).rename(columns=header)),
        ("Keys attended per query (density: keys ÷ H·W):", _pivot(rows, keys).rename(columns=header)),
    ]


def _published(table: str, row: str | None, field: str | None = None) -> PaperFigure | None:
    """The paper figure at ``table`` / ``row`` / ``field``, or None where the file has none."""
    if not isinstance(row, str):
        return None
    try:
        return figure(table, row, field)
    except KeyError:
        return None


def _shown(table: pd.DataFrame, shown: list[PaperFigure]) -> pd.DataFrame:
    """``table`` with the paper figures its paper columns print in ``attrs["paper_figures"]`` (their sources are
    listed by the report's last section, attnbench/report/provenance.py)."""
    table.attrs["paper_figures"] = shown
    return table


def bra_formula_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Our analytic BRA cost beside the paper's formula evaluated at the same sizes (both in GMACs)."""
    formula = figure("bra_cost_formula")
    rows = []
    for _, row in _forward(frame[frame["mechanism"] == "bra"]).iterrows():
        options = {**attentions.options("bra"), **json.loads(row.options)}
        n_win, topk = options["n_win"], options["topk"]
        paper = bra_paper_macs(row.height, row.width, row.dim, n_win, topk) / 1e9
        rows.append({"mechanism": row["label"], "shape": row["shape"], "S": n_win, "k": topk,
                     f"paper formula{formula.mark} (GMACs)": f"{paper:.4g}",
                     "ours, all parts (GMACs)": f"{row.analytic_gmacs_per_image:.4g}"})
    return _shown(pd.DataFrame(rows), [formula] if rows else [])


def quadtree_setting(device: str) -> str:
    """Why a measured quadtree ÷ bra ratio is never scored against the paper's claim (a GPU, the official
    QuadTree CUDA kernels): on a CPU, and with attnbench's PyTorch QuadTree anywhere, it is indicative."""
    if device == "cpu":
        return "indicative: CPU, PyTorch QuadTree (the claim: a GPU, the official QuadTree kernels)"
    return f"indicative: {device}, PyTorch QuadTree, not the official QuadTree kernels"


def quadtree_claim_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured latency of quadtree ÷ each BRA row (e.g. the official computation ``impl: reference`` and the
    fastest backend ``impl: auto``) per group and shape, beside the paper's claim of a 3–6× speed-up."""
    low, high = figure("claims", "bra_vs_quadtree_speedup", "low"), figure("claims", "bra_vs_quadtree_speedup", "high")
    claim = f"{low.value:g}–{high.value:g}×{low.mark or high.mark}"
    rows = []
    ok = frame[frame["status"] == "ok"]
    for title, sub in groups(ok):
        for shape, at_shape in sub.groupby("shape", sort=False):
            quadtree = at_shape[at_shape["mechanism"] == "quadtree"]
            if quadtree.empty:
                continue
            for _, bra in at_shape[at_shape["mechanism"] == "bra"].iterrows():
                ratio = quadtree.median_ms.iloc[0] / bra.median_ms
                flagged = _mark(quadtree.iloc[0], True) or _mark(bra, True)  # either timing is untrustworthy
                rows.append({"group": title, "shape": shape, "bra": bra["label"],
                             "ours: quadtree ms / bra ms": f"{ratio:.2f}×{flagged}",
                             "setting": quadtree_setting(bra["device"]), "paper (claim)": claim})
    return _shown(pd.DataFrame(rows), [low, high] if rows else [])


NO_SOURCE = "**no source given**"


def configurations_table(frame: pd.DataFrame) -> pd.DataFrame:
    """What each row measured, per mechanism and shape: its options, the backend that ran, analytic GMACs per
    image, keys per query, and the upstream configuration the options come from (a suite's ``source``). A
    missing source is said, never left blank."""
    rows = []
    for _, row in frame.drop_duplicates(["label", "shape"]).iterrows():
        options = json.loads(row["options"])
        impl = options.get("impl", "auto") if row["backend"] else None
        backend = f"{impl}→{row['backend']}" if impl and impl != row["backend"] else (row["backend"] or "")
        measured = frame[(frame["label"] == row["label"]) & (frame["shape"] == row["shape"])]
        gmacs = measured["analytic_gmacs_per_image"].dropna()
        keys = measured["keys_per_query"].dropna()
        failed = "" if (measured["status"] == "ok").any() else failed_cell(measured["status"].iloc[0])
        rows.append({"mechanism": row["label"], "shape": row["shape"],
                     "options": ", ".join(f"{key}={value}" for key, value in sorted(options.items())) or "defaults",
                     "backend": backend,
                     "GMACs / image": failed or _number(gmacs.iloc[0] if len(gmacs) else None, "{:.4f}"),
                     "keys / query": failed or _number(keys.iloc[0] if len(keys) else None, "{:.1f}"),
                     "source": row["source"] if isinstance(row["source"], str) and row["source"] else NO_SOURCE})
    return pd.DataFrame(rows)


def failures_table(frame: pd.DataFrame) -> pd.DataFrame:
    failed = frame[frame["status"] != "ok"]
    return failed[["label", "shape", "dtype", "mode", "batch", "status", "message"]].reset_index(drop=True)


def measure_table(frame: pd.DataFrame, column: str, template: str) -> pd.DataFrame:
    """A measure's own table (attnbench/measure/ ``Measure.table``): one column of the frame pivoted."""
    return _pivot(frame, lambda row: _number(row[column], template)).rename(columns=_shape_header(frame))


def _number(value, template: str) -> str:
    return "" if value is None or pd.isna(value) else template.format(value)


def _scaled(value, factor: float) -> float | None:
    """``value × factor``, or None for a missing value (a case that failed has no figures)."""
    return None if value is None or pd.isna(value) else value * factor


def _gap(ours, theirs) -> str:
    return f"{100 * (ours / theirs - 1):+.1f}%" if ours is not None and not pd.isna(ours) and theirs else ""


def model_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Whole models: ours (params, GMACs and GFLOPs per image by FlopCounterMode, latency, throughput, and the
    FLOP rate that throughput means over the run's dense GEMM rate) beside
    the paper's params, GMACs and ImageNet top-1 (seed-only figures marked), with our gap to its size figures."""
    rows, shown = [], []
    for _, row in frame.iterrows():
        paper = {field: _published("models", row["paper"], field) for field in ("params_m", "gmacs", "top1")}
        shown += [found for found in paper.values() if found is not None]
        failed = failed_cell(row["status"])
        params = _scaled(row["params"], 1e-6)
        gmacs = _scaled(row["counted_gflops_per_image"], 0.5)
        ours = {
            "params (M)": _number(params, "{:.2f}"), "GMACs": _number(gmacs, "{:.3f}"),
            "GFLOPs": _number(row["counted_gflops_per_image"], "{:.3f}"),
            "ms / batch": _number(row["median_ms"], "{:.1f}") + _number(_scaled(row["iqr_ms"], 0.5), " (±{:.1f})")
            + _mark(row, True),
            "images/s": _number(row["images_per_s"], "{:,.1f}") + _mark(row, True),
            "of GEMM rate": _number(_scaled(row.get("fraction_of_gemm"), 100), "{:.1f}%") + _mark(row, True),
        }
        rows.append({
            "model": row["label"], "input": row["shape"], **{key: failed or cell for key, cell in ours.items()},
            "paper params (M)": _cell(paper["params_m"]), "paper GMACs": _cell(paper["gmacs"]),
            "paper top-1": _cell(paper["top1"]),
            "params vs paper": _gap(params, _value(paper["params_m"])),
            # the paper's GMACs are a forward pass's; a forward+backward row counts the whole step
            "GMACs vs paper": _gap(gmacs, _value(paper["gmacs"])) if row["mode"] == "forward" else "",
        })
    table = pd.DataFrame(rows)
    if len(frame) and (frame["mode"] != "forward").all():
        table = table.rename(columns={"GMACs": "GMACs (forward+backward)", "GFLOPs": "GFLOPs (forward+backward)",
                                      "paper GMACs": "paper GMACs (forward)"})
        table = table.drop(columns=["GMACs vs paper"])
    return _shown(table, shown)


def _cell(found: PaperFigure | None) -> str:
    """A paper figure's cell (seed-only ones marked); 'not found' where the paper's row has no sourced figure."""
    if found is None:
        return ""
    return "not found" if found.status == "not-found" else found.cell()


def _value(found: PaperFigure | None) -> float | None:
    return found.value if found is not None and isinstance(found.value, int | float) else None


PROXY_DATASETS = ("relation_proxy", "colour_pointer")  # generated tasks that stand in for ImageNet (attnbench/data/)


def _task_title(row: pd.Series) -> str:
    if row["dataset"] in PROXY_DATASETS:
        return f"{row['shape']} (proxy task, not ImageNet)"
    generated = "generated" in str(row["shape"])
    return f"{row['shape']} ({row['dataset']}{', generated data' if generated else ''})"


def paper_ablation_row(row: pd.Series) -> str | None:
    """The paper's attention-ablation row of a trained model: the one its ``paper`` key names, or, for the STL
    backbone with one mechanism everywhere, the row whose ``mechanism`` (our mapping) is that mechanism."""
    ablation = paper_figures()["attention_ablation"]
    if isinstance(row["paper"], str):
        return row["paper"] if row["paper"] in ablation else None
    if not str(row["mechanism"]).startswith("biformer_stl"):
        return None
    attention = json.loads(row["options"]).get("attention")
    return next((key for key, entry in ablation.items() if entry.get("mechanism") == attention), None)


def _over_seeds(runs: pd.DataFrame, column: str) -> str:
    """A score of one mechanism on one task: a single run's figure, or, over several seeds, the mean of those
    that finished with their count (the seed section gives the intervals); a failure cell if none finished."""
    done = runs.loc[runs["status"] == "ok", column].dropna() if column in runs else pd.Series(dtype=float)
    if done.empty:
        failures = runs.loc[runs["status"] != "ok", "status"]
        return failed_cell(failures.iloc[0]) if len(failures) else ""
    if len(runs) == 1:
        return f"{done.iloc[0]:.1f}"
    return f"{done.mean():.1f} (mean of {len(done)}{'' if len(done) == len(runs) else f' of {len(runs)}'} seeds)"


def ablation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model: each task's score (the mean over seeds where a suite has several), then size and speed
    of the first task's trained model (images/s: the median over seeds), then the paper's row and its ImageNet
    top-1 / ADE20K mIoU (Semantic FPN) where the paper reports the row: the attention ablation on the same
    backbone, or a released model's figures."""
    ablation = paper_figures()["attention_ablation"]
    rows: list[dict[str, str]] = []
    shown: list[PaperFigure] = []
    first_task = frame["shape"].iloc[0]
    for label, model_runs in frame.groupby("label", sort=False):
        cells = {"mechanism": label}
        for shape, runs in model_runs.groupby("shape", sort=False):
            row = runs.iloc[0]
            metric, name = ("top1", "top-1 %") if row["task"] == "classification" else ("miou", "mIoU %")
            cells[f"{_task_title(row)} {name}"] = _over_seeds(runs, metric)
            if shape == first_task:
                done = runs[runs["status"] == "ok"]
                first = done.iloc[0] if len(done) else row
                cells["params (M)"] = _number(_scaled(first["params"], 1e-6), "{:.2f}")
                cells[f"GMACs @{row['height']}²"] = _number(_scaled(first["counted_gflops_per_image"], 0.5), "{:.3f}")
                if frame["images_per_s"].notna().any():  # a suite without the throughput measure has no column
                    cells["images/s"] = _number(done["images_per_s"].median() if len(done) else None, "{:,.1f}")
        row = model_runs.iloc[0]
        paper_row = paper_ablation_row(row)
        if paper_row is not None:
            top1, miou = (_published("attention_ablation", paper_row, field) for field in ("top1", "miou"))
            cells["paper row"] = ablation[paper_row]["row"]
        else:
            top1, miou = _published("models", row["paper"], "top1"), _published("ade20k_sfpn_miou", row["paper"])
            cells["paper row"] = row["paper"] if top1 or miou else ""
        shown += [found for found in (top1, miou) if found is not None]
        cells["paper ImageNet top-1"] = _cell(top1)
        cells["paper ADE20K mIoU"] = _cell(miou)
        rows.append(cells)
    table = pd.DataFrame(rows)
    paper_columns = ["paper row", "paper ImageNet top-1", "paper ADE20K mIoU"]
    return _shown(table[[c for c in table.columns if c not in paper_columns] + paper_columns], shown)


def training_table(frame: pd.DataFrame) -> pd.DataFrame:
    """What each score rests on, per case (per seed where the suite has several): data sizes, epochs, final scores
    and training time."""
    several_seeds = "seed" in frame and frame["seed"].nunique() > 1
    rows = []
    for _, row in frame.iterrows():
        if row["status"] != "ok":
            score = failed_cell(row["status"])
        elif row["task"] == "classification":
            score = f"top-1 {_number(row['top1'], '{:.1f}')}"
            if pd.isna(row.get("num_classes")) or row["num_classes"] > 5:  # top-5 of ≤ 5 classes is always 100%
                score += f" / top-5 {_number(row['top5'], '{:.1f}')}"
        else:
            score = f"mIoU {_number(row['miou'], '{:.1f}')} / pixel acc. {_number(row['pixel_accuracy'], '{:.1f}')}"
        for column, name in (("ema_top1", "EMA top-1"), ("ema_miou", "EMA mIoU")):
            if row["status"] == "ok" and not pd.isna(row.get(column)):
                score += f" / {name} {_number(row[column], '{:.1f}')}"
        rows.append({"mechanism": row["label"], **({"seed": row["seed"]} if several_seeds else {}),
                     "task": _task_title(row),
                     "train / val images": f"{_number(row.get('train_images'), '{:.0f}')} / "
                                           f"{_number(row.get('val_images'), '{:.0f}')}",
                     "epochs": _number(row.get("epochs"), "{:.0f}"), "final scores": score,
                     "final train loss": _number(row.get("train_loss"), "{:.3f}"),
                     "train min": _number(row.get("train_minutes"), "{:.1f}")
                                  + (f" (resumed after epoch {row['resumed_after_epochs']}: the minutes since)"
                                     if isinstance(row.get("resumed_after_epochs"), str) else "")})
    return pd.DataFrame(rows)
