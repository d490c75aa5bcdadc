"""``report.md`` of a run directory: tables rendered by tabulate (GitHub markdown) and plots linked as PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from ..paper import paper_figures
from ..records import RecordStore
from .frame import records_frame
from .plots import make_plots
from .tables import (
    ablation_table,
    bra_formula_table,
    complexity_table,
    failures_table,
    groups,
    latency_table,
    memory_table,
    model_table,
    quadtree_claim_table,
    roofline_table,
    speedup_table,
    throughput_table,
    training_table,
)


def markdown(table: pd.DataFrame, index: bool = True) -> str:
    if table.empty:
        return "_no data_"
    return tabulate(table, headers="keys", tablefmt="github", showindex=index, disable_numparse=True)


def _environment(run: dict) -> str:
    env = run["environment"]
    rates = ", ".join(f"{key} {rate / 1e9:,.1f} GFLOP/s" for key, rate in run["gemm_flops_per_s"].items())
    rows = [
        ("device", f"{env['device']} ({env['device_name']})"), ("threads", env["threads"]),
        ("torch", f"{env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']})"), ("python", env["python"]),
        ("attnbench", f"{env['attnbench']} @ {(env['git_sha'] or 'unknown')[:12]}"
                      f"{' (uncommitted changes)' if env['git_dirty'] else ''}"),
        ("TF32 matmul / cuDNN", f"{env['tf32_matmul']} / {env['tf32_cudnn']}"),
        ("dense GEMM rate (2048³, same run)", rates or "not measured"),
        ("started", env["time"]),
    ]
    return tabulate(rows, headers=["", ""], tablefmt="github")


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` (and ``run_dir/plots/*.png``) from its records; returns the report path."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    records = RecordStore(run_dir / "records.jsonl").load()
    frame = records_frame(records)
    statuses = frame["status"].value_counts().to_dict() if len(frame) else {}
    lines = [
        f"# {run['suite']}: run `{run_dir.name}`",
        "",
        run.get("description", "").strip(),
        "",
        f"Measured with `{run['command']}`" if run.get("command") else "",
        f"and rendered by `python -m attnbench report {run_dir}`. {len(records)} of {run['cases']} cases recorded"
        f" ({', '.join(f'{count} {status}' for status, count in statuses.items()) or 'none'}).",
        "",
        _environment(run),
        "",
        "Conventions: **GMACs** are multiply-adds, the unit the BiFormer paper calls FLOPs; **GFLOPs** count 2 per"
        " multiply-add (torch's FlopCounterMode). Latency is the median over the timed samples, ± half the"
        " inter-quartile range, after warm-up, on random (never zero) inputs; each case ran in its own process"
        " (speed and model cases: after their output was checked against the float64 plain path; accuracy cases:"
        " after training, on the trained model). Cells say OOM, TIMEOUT, ERROR, NaN or"
        " UNSUPPORTED where a case did not finish. Figures in columns marked *paper* are the paper's, from"
        f" `attnbench/paper_figures.yaml` ({paper_figures()['source']}); every other figure was measured here.",
        "",
    ]
    if frame.empty:
        lines.append("_No records yet._")
    trained = frame[frame["kind"] == "accuracy"] if len(frame) else frame
    if len(trained):
        lines += ["## Attention ablation: accuracy, size and speed", "",
                  "Ours: the score of each trained model on each task; params, GMACs (FlopCounterMode ÷ 2) and "
                  "inference throughput of the first task's trained model at its input size. *Paper* columns: the "
                  "BiFormer paper's ablation on the full STL backbone (ImageNet-1K top-1, ADE20K mIoU), only for the "
                  "rows it reports; a proxy or generated-data column is not comparable with them.", "",
                  markdown(ablation_table(trained), index=False), "",
                  "What each score rests on:", "", markdown(training_table(trained), index=False), ""]
    models = frame[frame["kind"] == "model"] if len(frame) else frame
    for title, group in groups(models) if len(models) else ():
        lines += [f"## Models: {title}", "",
                  "Ours: params, GMACs (FlopCounterMode ÷ 2, the paper's convention) and GFLOPs per image, latency "
                  "per batch and throughput. *Paper* columns: the published figures (ImageNet-1K top-1 is the "
                  "paper's; this table measures no accuracy).", "", markdown(model_table(group), index=False), ""]
    frame = frame[frame["kind"] == "attention"] if len(frame) else frame
    for title, group in groups(frame) if len(frame) else ():
        lines += [f"## Speed: {title}", "", "Latency, ms per batch (± half IQR):", "", markdown(latency_table(group)),
                  "", "Throughput, images/s:", "", markdown(throughput_table(group)), "",
                  *([f"Speed-up over `{run['baseline']}` (its latency ÷ the row's, same run):", "",
                     markdown(speedup_table(group, run["baseline"])), ""] if run.get("baseline") else []),
                  "Achieved FLOP/s as a fraction of the dense GEMM rate measured in the same run (roofline):", "",
                  markdown(roofline_table(group)), "",
                  "Peak memory, MiB (activations and workspace beyond module and inputs):", "",
                  markdown(memory_table(group)), ""]
        for path in make_plots(group, title, run_dir / "plots"):
            lines += [f"![{path.stem}](plots/{path.name})", ""]
    if len(frame):
        lines += ["## Complexity (per image, forward)", "",
                  "analytic GMACs (paper convention) / FlopCounterMode GFLOPs (2 per MAC; blind to grid_sample, "
                  "top-k, gather) / keys attended per query (density = keys ÷ H·W):", "",
                  markdown(complexity_table(frame)), ""]
        bra = bra_formula_table(frame)
        if not bra.empty:
            lines += ["## BRA cost: ours beside the paper's formula", "",
                      f"The paper's formula is {paper_figures()['bra_cost_formula']} (projections q, k, v; routing;"
                      " attention). Ours adds the output projection and the LCE conv and counts routing once, "
                      "as the official code spends it.", "", markdown(bra, index=False), ""]
        claim = quadtree_claim_table(frame)
        if not claim.empty:
            lines += ["## BRA against QuadTree attention", "", markdown(claim, index=False), ""]
        failed = failures_table(frame)
        if not failed.empty:
            lines += ["## Cases that did not finish", "", markdown(failed, index=False), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n")
    return path
