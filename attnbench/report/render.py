"""``report.md`` of a run directory: a header (what was run, where, with which conventions), then every
section of sections.py that applies, rendered by tabulate (GitHub markdown), plots linked as PNGs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from ..paper import paper_figures
from ..records import RecordStore, write_text_atomically
from .flags import MARK, add_flags
from .frame import records_frame
from .sections import SECTIONS, Run


def _threads(env: dict, records: list) -> str:
    """The threads the cases ran with (each case's process records its own), beside the runner's when they
    differ (a suite's ``threads:``)."""
    used = sorted({record.worker.get("threads") for record in records if record.worker.get("threads")})
    if not used or used == [env["threads"]]:
        return str(env["threads"])
    return f"{' / '.join(map(str, used))} per case (the runner process had {env['threads']})"


def _commits(env: dict, records: list) -> str:
    """The commit the records were measured at; each commit with its record count when a resume or a merge mixed
    several (every record carries its own stamp; the run's is the stamp at its start)."""
    def commit(stamp: dict) -> str:
        dirty = {True: " (uncommitted changes)", "unknown": " (not a git checkout)"}.get(stamp.get("git_dirty"), "")
        return f"{(stamp.get('git_sha') or 'unknown')[:12]}{dirty}"

    counts = Counter(commit(record.environment or env) for record in records)
    if len(counts) < 2:
        return next(iter(counts), commit(env))
    return ", ".join(f"{name} ({count} records)" for name, count in counts.items())


def _environment(run: dict, records: list) -> str:
    env = run["environment"]
    rates = ", ".join(f"{key} {rate / 1e9:,.1f} GFLOP/s" for key, rate in run["gemm_flops_per_s"].items())
    rows = [
        ("device", f"{env['device']} ({env['device_name']})"), ("threads", _threads(env, records)),
        ("torch", f"{env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']})"), ("python", env["python"]),
        ("attnbench", f"{env['attnbench']} @ {_commits(env, records)}"),
        *([("timm / xformers / natten", f"{env['timm']} / {env.get('xformers') or '–'} / {env.get('natten') or '–'}")]
          if "timm" in env else []),
        *([("plug-ins", ", ".join(f"{name} {version}" for name, version in env["plugins"].items()))]
          if env.get("plugins") else []),
        *([("load average at start (1, 5, 15 min)", ", ".join(map(str, env["load_average"])))]
          if env.get("load_average") else []),
        *([("allocator", env["allocator"])] if env.get("allocator") else []),
        *([("huge pages", env["huge_pages"])] if env.get("huge_pages") else []),
        ("TF32 matmul / cuDNN", f"{env['tf32_matmul']} / {env['tf32_cudnn']}"),
        ("dense GEMM rate (2048³, same run)", rates or "not measured"),
        ("started", env["time"]),
    ]
    return tabulate(rows, headers=["", ""], tablefmt="github")


def _mixed(run: dict) -> list[str]:
    """A warning when a merged run's records come from several machines or environments."""
    environments = run.get("environments") or []
    hosts = sorted({f"{env.get('hostname')} ({env.get('device_name')}, {env.get('threads')} threads)"
                    for env in environments})
    if len(hosts) < 2:
        return []
    return [f"**This run merges records measured on {len(hosts)} machines or settings ({'; '.join(hosts)}): "
            "timings in one table come from different machines.** Each record keeps its own environment.", ""]


def _measured_with(run: dict) -> str:
    """The command(s) that measured the run: a merged run names its parts' commands and the merge."""
    if run.get("merged_from"):
        commands = "; ".join(f"`{command}`" for command in run.get("merged_commands") or [] if command)
        return (f"Measured in {len(run['merged_from'])} parts ({commands or 'commands not recorded'}), merged by "
                f"`{run.get('merge_command') or 'python -m attnbench merge'}`")
    return f"Measured with `{run['command']}`" if run.get("command") else ""


def _processes(records: list) -> str:
    """How the cases' processes were used: one per case, or warm workers running cases one after another."""
    warm = [record for record in records if record.worker.get("warm")]
    if not warm:
        return "each case ran in its own process"
    # a worker is known by its pid; a case that killed its worker left none, and ran in a worker counted already
    # unless it was the first of its process
    workers = len({record.worker["pid"] for record in warm if "pid" in record.worker}) + sum(
        1 for record in warm if "pid" not in record.worker and record.worker["warm"].get("cases_before") == 0)
    return (f"{'each case' if len(warm) == len(records) else f'{len(warm)} of the {len(records)} cases'} ran in "
            f"a warm worker (`--executor warm`: {workers} long-lived process{'es' if workers > 1 else ''} running "
            "cases one after another, imports and CUDA context paid once; a case's record says how many ran "
            "before it in its process)")


def _header(run_dir: Path, run: dict, records: list, statuses: dict[str, int]) -> list[str]:
    return [
        f"# {run['suite']}: run `{run_dir.name}`",
        "",
        run.get("description", "").strip(),
        "",
        *([*(f"- {note}" for note in run["notes"]), ""] if run.get("notes") else []),
        _measured_with(run),
        f"and rendered by `python -m attnbench report {run_dir}`. {len(records)} of {run['cases']} cases recorded"
        f" ({', '.join(f'{count} {status}' for status, count in statuses.items()) or 'none'}).",
        "",
        _environment(run, records),
        "",
        *_mixed(run),
        "Conventions: **GMACs** are multiply-adds, the unit the BiFormer paper calls FLOPs; **GFLOPs** count 2 per"
        " multiply-add (torch's FlopCounterMode). Latency is the median over the timed samples, ± half the"
        f" inter-quartile range, after warm-up, on random (never zero) inputs; {_processes(records)}"
        " (speed and model cases: after their output was checked against the float64 plain path; accuracy cases:"
        " after training, on the trained model). Cells say OOM, KILLED, TIMEOUT, ERROR, NaN,"
        " MISMATCH or UNSUPPORTED where a case did not finish. Figures in columns marked *paper* are the paper's, from"
        f" `attnbench/paper_figures.yaml` ({paper_figures()['source']}); every other figure was measured here.",
        "",
    ]


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` (and ``run_dir/plots/*.png``) from its records; returns the report path."""
    run_dir = Path(run_dir)
    run = Run(run_dir, json.loads((run_dir / "run.json").read_text()))
    records = RecordStore(run_dir / "records.jsonl").latest()
    frame = add_flags(records_frame(records), run.info["environment"].get("cpu_count"))
    statuses = frame["status"].value_counts().to_dict() if len(frame) else {}
    lines = _header(run_dir, run.info, records, statuses)
    flagged = int((frame["flags"] != "").sum()) if len(frame) else 0
    if flagged:
        lines += [f"**{flagged} of {int(frame['median_ms'].notna().sum())} timed cases are flagged {MARK}** (wide "
                  "spread, no convergence, load changing during the case, or a roofline above 100%): see the notes "
                  "under their tables; their figures are printed, not trusted.", ""]
    if frame.empty:
        lines.append("_No records yet._")
    for section in SECTIONS:
        if section.applies(frame, run):
            lines += section.render(frame, run)
    path = run_dir / "report.md"
    write_text_atomically(path, "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n")
    _write_table(frame, run_dir / "records.csv", "csv")
    return path


def _write_table(frame, path: Path, fmt: str) -> Path:
    write_text_atomically(path, frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records",
                                                                                            indent=1))
    return path


def export(run_dir: str | Path, fmt: str) -> Path:
    """Write the run's report frame (one flat row per case, flags included) as ``records.csv`` or
    ``records.json`` beside its records; returns the path."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    frame = add_flags(records_frame(RecordStore(run_dir / "records.jsonl").latest()),
                      run["environment"].get("cpu_count"))
    return _write_table(frame, run_dir / f"records.{'csv' if fmt == 'csv' else 'json'}", fmt)
