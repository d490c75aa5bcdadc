"""The benchmark user's tools: trustworthy timing with flags, compare with a regression gate, CSV/JSON,
overrides, shipped suites, the environment stamp, plots and nox settings."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnbench.cli import main
from attnbench.compare import compare
from attnbench.measure.latency import measure_latency
from attnbench.records import Record, RecordStore
from attnbench.report import build_report
from attnbench.report.flags import MARK, reasons
from attnbench.report.plots import make_plots
from attnbench.suite import SuiteError, expand, load_suite, resolve_suite, shipped_suites

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests/fixtures/results/fixture/run"


def copy_run(tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(FIXTURE, run_dir)
    (run_dir / "plots").exists() and shutil.rmtree(run_dir / "plots")
    return run_dir


def rewrite(run_dir: Path, change) -> None:
    """Apply ``change(record) -> record | None`` to every record of a run (None drops it)."""
    path = run_dir / "records.jsonl"
    records = RecordStore(path).load()
    path.unlink()
    store = RecordStore(path)
    for record in records:
        changed = change(record)
        if changed is not None:
            store.append(changed)


# 1. timing: at least min_samples samples and min_run_time_s, torch.utils.benchmark's statistics
def test_latency_takes_the_minimum_samples_and_run_time():
    a = torch.randn(64, 64)
    latency = measure_latency(lambda: a @ a, torch.device("cpu"), warmup_iters=1, warmup_time_s=0, min_samples=7,
                              max_samples=10_000, min_run_time_s=0.3, max_time_s=60.0, target_iqr=10.0)
    assert len(latency.samples_s) >= 7
    assert sum(latency.samples_s) * latency.number >= 0.3 * 0.9
    assert latency.converged and latency.threads == torch.get_num_threads()
    summary = latency.summary()
    assert summary["median_s"] == pytest.approx(sorted(latency.samples_s)[len(latency.samples_s) // 2], rel=0.5)


def test_suites_may_not_time_fewer_than_five_samples(tmp_path):
    suite = (REPO / "suites/smoke.yaml").read_text().replace("min_samples: 5", "min_samples: 3")
    path = tmp_path / "smoke.yaml"
    path.write_text(suite)
    with pytest.raises(SuiteError, match=r"repeats\.min_samples: Input should be greater than or equal to 5"):
        load_suite(path)
    path.write_text(suite.replace("min_samples: 3, max_samples: 5", "min_samples: 9, max_samples: 5"))
    with pytest.raises(SuiteError, match="min_samples=9 is above max_samples=5"):
        load_suite(path)


def row(**values) -> pd.Series:
    base = {"status": "ok", "median_ms": 10.0, "iqr_ms": 0.5, "converged": True, "load_before": 0.5,
            "load_after": 0.6, "fraction_of_gemm": 0.4}
    return pd.Series({**base, **values})


@pytest.mark.parametrize(("values", "expected"), [
    ({}, []),
    ({"iqr_ms": 3.0}, ["spread: IQR 30% of the median"]),
    ({"converged": False}, ["samples did not converge within the time budget"]),
    ({"load_after": 2.1}, ["load changed during the case (0.5 → 2.1)"]),
    ({"load_before": 3.5, "load_after": 3.6}, ["machine busy (load 3.6 on 2 cores)"]),
    ({"fraction_of_gemm": 1.53}, ["roofline 153% of the GEMM rate: impossible, a measurement error"]),
    ({"status": "error", "iqr_ms": 9.0}, []),
])
def test_flag_rules(values, expected):
    assert reasons(row(**values), cores=2) == expected


def test_flagged_cells_are_marked_in_every_timing_table_and_counted(tmp_path):
    run_dir = copy_run(tmp_path, "run")

    def unstable(record: Record) -> Record:
        if record.case.label == "bra" and record.case.column == "large":
            record.metrics["latency"].update(load_before=0.2, load_after=3.9)
            record.metrics["roofline"]["fraction_of_gemm"] = 1.4
        return record
    rewrite(run_dir, unstable)
    text = build_report(run_dir).read_text()
    assert f"timed cases are flagged {MARK}**" in text
    bra_lines = [line for line in text.splitlines() if line.startswith("| bra ")]
    assert sum(MARK in line for line in bra_lines) >= 3  # latency, throughput, roofline
    assert "load changed during the case (0.2 → 3.9)" in text and "roofline 140% of the GEMM rate" in text


# 2. compare: regression, improvement, noise and missing cases
def test_compare_marks_regressions_improvements_noise_and_missing_cases(tmp_path, capsys):
    a, b = copy_run(tmp_path, "a"), copy_run(tmp_path, "b")

    def changed(record: Record) -> Record | None:
        latency = record.metrics.get("latency")
        key = (record.case.label, record.case.column)
        if key == ("quadtree", "large"):
            return None  # missing in B
        if latency and key == ("full", "small"):
            factor = 2.0  # regression
        elif latency and key == ("full", "large"):
            factor = 0.5  # improvement
        elif latency and key == ("bra", "small"):
            factor = 1.01  # noise
        else:
            return record
        latency["median_s"] *= factor
        latency["images_per_s"] /= factor
        return record
    rewrite(b, changed)
    result = compare(a, b, fail_above=0.10)
    verdicts = {line["case"].split(" (")[0]: line["latency B÷A"] for line in result.table.to_dict("records")}
    assert verdicts["full @ small"] == "2.00× (worse)"
    assert verdicts["full @ large"] == "0.50× (better)"
    assert verdicts["bra @ small"] == "1.01× (same)"
    assert result.only_a == ["quadtree @ large (float32, forward, b2)"] and result.only_b == []
    assert len(result.regressions) == 1 and result.regressions[0].startswith("full @ small")
    full = result.summary.set_index("mechanism").loc["full", "latency B÷A, geometric mean"]
    assert full == "1.00×"  # sqrt(2 × 0.5)
    assert main(["compare", str(a), str(b), "--fail-above", "10%"]) == 1
    out = capsys.readouterr().out
    assert "## Only in A" in out and "2.00× (worse)" in out
    assert main(["compare", str(a), str(b), "--fail-above", "150%"]) == 0
    assert main(["compare", str(a), str(a)]) == 0


# 3. CSV and JSON beside the report
def test_every_report_writes_records_csv_and_report_formats(tmp_path, capsys):
    run_dir = copy_run(tmp_path, "run")
    build_report(run_dir)
    frame = pd.read_csv(run_dir / "records.csv")
    assert len(frame) == 8 and {"label", "shape", "median_ms", "status", "flags", "key"} <= set(frame.columns)
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    rows = json.loads((run_dir / "records.json").read_text())
    assert len(rows) == 8 and capsys.readouterr().out.strip().endswith("records.json")


# 5. overrides from the command line
def test_only_set_and_axis_overrides(tmp_path, capsys):
    suite = load_suite("suites/smoke.yaml", overrides={"repeats.max_time_s": 1, "grid.batch": [4, 8]},
                       only={"mechanism": ["bra", "swin"], "shape": ["small"]})
    cases = expand(suite)
    assert {case.mechanism for case in cases} == {"bra", "swin"} and {case.shape for case in cases} == {"small"}
    assert {case.batch for case in cases} == {4, 8} and all(case.repeats.max_time_s == 1 for case in cases)
    assert main(["run", "suites/smoke.yaml", "--dry-run", "--only", "mechanism=full", "--batch", "3",
                 "--mode", "forward", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "2 cases of suite 'smoke'" in out and " b3 float64 forward " in out
    for args, message in [(["--only", "mechanism=nope"], "--only mechanism=nope: no case matches; mechanisms: "),
                          (["--only", "colour=red"], "--only colour=...: unknown field"),
                          (["--set", "repeats.max_time_s=-1"], "(--set repeats.max_time_s): repeats.max_time_s"),
                          (["--set", "nonsense=1"], "unknown key 'nonsense'"),
                          (["--amp"], "amp: applies to suites of whole models")]:
        assert main(["run", "suites/smoke.yaml", "--dry-run", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_model_runtime_options_reach_the_cases():
    suite = load_suite("suites/models.yaml", "quick", overrides={"amp": True, "channels_last": True})
    (case, *_) = expand(suite)
    assert case.amp and case.channels_last and not case.compile


# 6. shipped suites by name
def test_shipped_suites_resolve_by_name(capsys):
    assert set(shipped_suites()) >= {"smoke", "speed", "models", "scaling", "bra_impl", "ablation"}
    assert resolve_suite("smoke") == shipped_suites()["smoke"]
    with pytest.raises(SuiteError, match="no shipped suite of that name; shipped: "):
        resolve_suite("nope")
    assert main(["suites"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("ablation ")


@pytest.mark.slow
def test_a_built_wheel_carries_the_suites_and_runs_them_by_name_from_any_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-m", "attnbench", "run", "smoke", "--dry-run"], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"12 cases of suite 'smoke' ({tmp_path / 'site/attnbench/suites/smoke.yaml'})" in done.stdout
    env = subprocess.run([sys.executable, "-m", "attnbench", "env"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, timeout=300)
    stamp = json.loads(env.stdout)
    assert stamp["git_sha"] == "unknown" and stamp["git_dirty"] == "unknown"


# 7. the environment stamp
def test_environment_names_the_libraries_plugins_and_load(monkeypatch, tmp_path):
    import attnbench.env as env

    stamp = env.environment("cpu")
    assert stamp["timm"] and "xformers" in stamp and "natten" in stamp and isinstance(stamp["plugins"], dict)
    assert len(stamp["load_average"]) == 3
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)  # not a checkout
    stamp = env.environment("cpu")
    assert stamp["git_sha"] == "unknown" and stamp["git_dirty"] == "unknown"


def test_the_stamp_names_the_allocator_and_its_settings(monkeypatch):
    """Page faults of freed-and-reallocated buffers move CPU timings (2× for the official BRA at stage 1), so the
    allocator and its glibc settings are part of the environment, and a resumed run refuses another."""
    import attnbench.env as env
    from attnbench.runner import COMPARED_ENVIRONMENT

    for key in ("LD_PRELOAD", *env.MALLOC_ENVIRONMENT):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(env.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert env.environment("cpu")["allocator"] == "glibc 2.36 malloc, default settings"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000000")
    assert env.allocator() == ("glibc 2.36 malloc, MALLOC_MMAP_THRESHOLD_=1000000000 "
                               "MALLOC_TRIM_THRESHOLD_=1000000000")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert env.allocator() == "jemalloc (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"
    assert "allocator" in COMPARED_ENVIRONMENT


def test_a_change_under_results_does_not_mark_the_code_uncommitted(monkeypatch, tmp_path):
    """A resumed run appends to its committed records.jsonl: the tree differs from the commit, the code does not."""
    import attnbench.env as env

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "records.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    assert env.environment("cpu")["git_dirty"] is False
    (tmp_path / "results" / "records.jsonl").write_text("{}\n{}\n")
    assert env.environment("cpu")["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert env.environment("cpu")["git_dirty"] is True


# 8. reports and plots
def test_complexity_tables_are_separate_and_failures_show_everywhere(tmp_path):
    text = build_report(copy_run(tmp_path, "run")).read_text()
    complexity = text.split("## Complexity (per image, forward)")[1].split("\n## ")[0]
    for title in ("Analytic GMACs per image", "FlopCounterMode GFLOPs per image", "Keys attended per query"):
        assert title in complexity
    assert complexity.count("| broken ") == 3 and all("ERROR" in line for line in complexity.splitlines()
                                                      if line.startswith("| broken "))
    assert "each cell is the step's **peak**" in text


def test_plots_join_only_scaling_curves_mark_failures_and_draw_references(tmp_path):
    def frame(dims):
        rows = []
        for (tokens, dim), status in zip([(64, dims[0]), (256, dims[1]), (1024, dims[2])], ["ok", "ok", "oom"],
                                         strict=True):
            rows.append({"label": "m", "tokens": tokens, "dim": dim, "heads": 2, "status": status,
                         "images_per_s": 100.0 / tokens, "iqr_ms": 0.1, "median_ms": 1.0, "peak_mib": 1.0 * tokens,
                         "counted_gflops_per_image": 0.001 * tokens})
        return pd.DataFrame(rows)
    import matplotlib.pyplot as plt

    drawn = {}
    original = plt.Figure.savefig

    def capture(figure, path, **kwargs):
        axes = figure.axes[0]
        drawn[Path(path).name] = ([text.get_text() for text in axes.get_legend().get_texts()],
                                  axes.get_xlabel())
        return original(figure, path, **kwargs)
    plt.Figure.savefig = capture
    try:
        make_plots(frame([64, 64, 64]), "curve", tmp_path / "a")
        make_plots(frame([64, 128, 256]), "stages", tmp_path / "b")
    finally:
        plt.Figure.savefig = original
    legend, xlabel = drawn["throughput_curve.png"]
    assert {"O(N) reference", "O(N^4/3) reference", "O(N²) reference", "failed (oom)"} <= set(legend)
    legend, xlabel = drawn["throughput_stages.png"]
    assert "O(N) reference" not in legend and "points, not a curve" in xlabel


def test_no_top5_for_tasks_of_five_classes_or_fewer():
    from attnbench.report.tables import training_table

    frame = pd.DataFrame([{"label": "bra", "status": "ok", "task": "classification", "top1": 60.0, "top5": 100.0,
                           "num_classes": 2, "shape": "proxy", "dataset": "relation_proxy", "train_images": 8,
                           "val_images": 4, "epochs": 1, "train_minutes": 0.1}])
    assert training_table(frame)["final scores"].iloc[0] == "top-1 60.0"
    frame.loc[0, "num_classes"] = 100
    assert training_table(frame)["final scores"].iloc[0] == "top-1 60.0 / top-5 100.0"


# 9. nox reuses environments
def test_nox_reuses_session_environments():
    import nox

    text = (REPO / "noxfile.py").read_text()
    namespace: dict = {}
    exec(compile(text, "noxfile.py", "exec"), namespace)
    assert nox.options.reuse_venv == "yes"


def test_shipped_speed_and_model_suites_name_a_source_for_every_row():
    from attnbench.report.tables import NO_SOURCE

    for suite in ("speed", "models", "scaling"):
        cases = expand(load_suite(resolve_suite(suite)))
        assert all(case.source for case in cases), [case.label for case in cases if not case.source]
    assert NO_SOURCE == "**no source given**"


def test_configurations_table_shows_options_backend_cost_and_source(tmp_path):
    run_dir = copy_run(tmp_path, "run")

    def with_backend(record: Record) -> Record:
        if record.case.label == "bra" and record.status == "ok":
            record.metrics["backend"] = {"used": ["dense" if record.case.column == "large" else "gather"]}
        return record
    rewrite(run_dir, with_backend)
    text = build_report(run_dir).read_text()
    section = text.split("## Configurations")[1].split("\n## ")[0]
    bra = [line for line in section.splitlines() if line.startswith("| bra ")]
    assert any("auto→gather" in line and "| small " in line for line in bra)
    assert any("auto→dense" in line and "| large " in line for line in bra)
    assert all("**no source given**" in line for line in bra)  # the fixture suite names none: said, not blank
