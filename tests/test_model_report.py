"""The model table's FLOP-rate column and the throughput-against-GMACs plot (attnbench/report)."""

import pandas as pd

from attnbench.report.plots import throughput_against_gmacs
from attnbench.report.tables import model_table


def _models(rows):
    base = {"kind": "model", "shape": "224px", "status": "ok", "paper": None, "params": 1e6, "median_ms": 100.0,
            "iqr_ms": 10.0, "device": "cpu", "dtype": "float32", "mode": "forward", "batch": 4, "flags": ""}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_the_model_table_gives_the_flop_rate_over_the_gemm_rate_and_marks_flagged_timings():
    frame = _models([
        {"label": "a", "counted_gflops_per_image": 4.0, "images_per_s": 10.0, "fraction_of_gemm": 0.4},
        {"label": "b", "counted_gflops_per_image": 8.0, "images_per_s": 2.0, "fraction_of_gemm": 0.16,
         "flags": "spread"},
        {"label": "c", "counted_gflops_per_image": 8.0, "images_per_s": None, "fraction_of_gemm": None,
         "status": "oom", "median_ms": None},
    ])
    table = model_table(frame).set_index("model")
    assert table.loc["a", "of GEMM rate"] == "40.0%"
    assert table.loc["b", "of GEMM rate"] == "16.0% ⚠"
    assert table.loc["c", "of GEMM rate"] == "OOM"


def test_the_plot_draws_the_finished_models_and_needs_two(tmp_path):
    frame = _models([
        {"label": "a", "counted_gflops_per_image": 4.0, "images_per_s": 10.0},
        {"label": "b", "counted_gflops_per_image": 8.0, "images_per_s": 2.0, "flags": "spread"},
        {"label": "c", "counted_gflops_per_image": 8.0, "images_per_s": None, "status": "error"},
    ])
    path = throughput_against_gmacs(frame, "cpu, float32, forward, batch 4", tmp_path)
    assert path is not None and path.name == "models_cpu__float32__forward__batch_4.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert throughput_against_gmacs(frame[frame["label"] != "a"], "one", tmp_path / "one") is None


def test_a_forward_backward_table_counts_the_step_and_does_not_set_it_against_the_papers_forward_gmacs():
    frame = _models([{"label": "a", "counted_gflops_per_image": 13.2, "images_per_s": 9.0, "fraction_of_gemm": 0.5,
                      "mode": "forward_backward", "paper": "biformer_tiny"}])
    table = model_table(frame)
    assert "GMACs (forward+backward)" in table.columns and "paper GMACs (forward)" in table.columns
    assert "GMACs vs paper" not in table.columns and table.loc[0, "params vs paper"] != ""
    forward = model_table(_models([{"label": "a", "counted_gflops_per_image": 4.4, "images_per_s": 9.0,
                                    "fraction_of_gemm": 0.5, "paper": "biformer_tiny"}]))
    assert forward.loc[0, "GMACs vs paper"] == "+0.0%"
