"""The scaling section: log–log slopes recovered from synthetic frames with their intervals, schedules kept
apart, routing + attention MACs from the records' parts, and the plot written."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnbench.report import scaling
from attnbench.report.sections import SECTIONS, Run


def attention_row(label: str, shape: str, side: int, **columns) -> dict:
    row = {"id": f"{label}@{shape}", "kind": "attention", "label": label, "mechanism": label.split()[0],
           "shape": shape, "height": side, "width": side, "tokens": side * side, "dim": 64, "heads": 2, "batch": 1,
           "dtype": "float32", "mode": "forward", "device": "cpu", "status": "ok", "options": json.dumps({}),
           "analytic_gmacs_per_image": None, "median_ms": None, "peak_mib": None}
    row.update(columns)
    return row


def power_law_frame(exponent: float, noise: float = 0.0, sides=(8, 16, 27, 40, 64), seed: int = 0) -> pd.DataFrame:
    """A mechanism ``m`` whose latency is 2e-3 · N^exponent times log-normal noise, at shapes ``h<side>``."""
    rng = np.random.default_rng(seed)
    rows = [attention_row("m", f"h{side}", side, median_ms=2e-3 * (side * side) ** exponent
                          * float(np.exp(noise * rng.standard_normal()))) for side in sides]
    return pd.DataFrame(rows)


def test_an_exact_power_law_gives_its_exponent():
    (series,) = scaling.fit_series(power_law_frame(4 / 3))
    assert series.quantity == "latency" and series.fit.n == 5
    assert series.fit.slope == pytest.approx(4 / 3, abs=1e-9)


def test_a_noisy_power_law_is_recovered_within_its_interval_and_the_table_shows_the_interval():
    (series,) = scaling.fit_series(power_law_frame(1.5, noise=0.05, seed=3))
    low, high = series.fit.ci
    assert low < 1.5 < high and high - low < 0.3
    assert series.fit.slope == pytest.approx(1.5, abs=0.1)
    cell = scaling.slope_table([series]).loc[0, "latency slope"]
    assert cell.startswith(f"{series.fit.slope:.3f} [{low:.3f}, {high:.3f}] (n=5, 95% CI)")
    assert "N 64–4,096" in cell


def test_fewer_than_three_token_counts_give_no_fit():
    assert scaling.fit_series(power_law_frame(2.0, sides=(8, 16))) == []


def test_two_schedules_of_one_mechanism_are_fitted_apart():
    fixed = [attention_row("bra", f"n{side}", side, median_ms=float(side * side)) for side in (14, 28, 56)]
    exact = [attention_row("bra", f"h{side}_s{int(round(side ** (2 / 3)))}", side,
                           median_ms=float((side * side) ** (4 / 3))) for side in (8, 27, 64)]
    series = scaling.fit_series(pd.DataFrame(fixed + exact))
    slopes = {item.schedule.split("…")[0]: item.fit.slope for item in series}
    assert slopes == {"n": pytest.approx(1.0), "h": pytest.approx(4 / 3)}


def test_core_macs_are_routing_plus_attention_parts():
    assert scaling.core_macs({"qkv": 100, "routing": 3, "attn_scores": 5, "attn_values": 7, "out_proj": 9}) == 15
    assert scaling.core_macs({"qkv": 1, "attn_scores": 2, "attn_values": 3}) == 5
    assert scaling.core_macs({"qkv": 1}) is None and scaling.core_macs(None) is None


def test_the_section_fits_routing_plus_attention_from_the_records_and_plots(tmp_path: Path, monkeypatch):
    sides = (8, 27, 64, 125)
    frame = pd.DataFrame([attention_row("bra", f"h{side}", side, analytic_gmacs_per_image=1e-6 * side ** 2,
                                        median_ms=0.1 * side, peak_mib=0.01 * side ** 2) for side in sides])
    parts = {f"bra@h{side}": {"qkv": 10 * side ** 2, "routing": side ** (8 / 3), "attn_scores": side ** (8 / 3),
                              "attn_values": 2 * side ** (8 / 3)} for side in sides}
    monkeypatch.setattr(scaling, "analytic_parts", lambda run_dir: parts)
    section = next(item for item in SECTIONS if isinstance(item, scaling.Scaling))
    run = Run(tmp_path, {"suite": "scaling"})
    assert section.applies(frame, run)
    text = "\n".join(section.render(frame, run))
    row = next(line for line in text.splitlines() if line.startswith("| h…"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2].startswith("1.000 [1.000, 1.000] (n=4")  # analytic MACs ∝ N
    assert cells[3].startswith("1.333 [1.333, 1.333] (n=4")  # routing + attention ∝ N^{4/3}
    assert cells[4].startswith("0.500 ") and cells[5].startswith("1.000 ")  # latency ∝ N^{1/2}, memory ∝ N
    (plot,) = (tmp_path / "plots").iterdir()
    assert plot.suffix == ".png" and plot.stat().st_size > 10_000 and f"](plots/{plot.name})" in text


def test_the_section_stays_out_of_runs_without_three_sizes(tmp_path: Path):
    frame = power_law_frame(1.0, sides=(8, 16))
    section = next(item for item in SECTIONS if isinstance(item, scaling.Scaling))
    assert not section.applies(frame, Run(tmp_path, {}))
