"""The claims table's verdicts (PASS / FAIL / NOT TESTABLE HERE) on synthetic frames, the QuadTree ratios in
both BRA settings, and the provenance footnote of seed-only paper figures."""

import json
from pathlib import Path

import pandas as pd
import pytest

from attnbench.paper import SEED_ONLY_FOOTNOTE, SEED_ONLY_MARK, figure, provenance_lines
from attnbench.report import claims
from attnbench.report.fit import fit_loglog_slope
from attnbench.report.provenance import PaperSources, figures_shown
from attnbench.report.sections import SECTIONS, Run
from attnbench.report.tables import ablation_table, model_table, quadtree_claim_table

README_SIZES = {"biformer_tiny": (13_140_000, 2_216_000_000), "biformer_small": (25_540_000, 4_464_000_000),
                "biformer_base": (56_800_000, 9_759_000_000), "biformer_stl": (28_370_000, 4_574_000_000)}


def family_row(mechanism: str, m: int, n_win: int | None = None, **columns) -> dict:
    side = m**3
    options = {"topk": 4, "n_win": m**2 if n_win is None else n_win} if mechanism == "bra" else {}
    row = {"id": f"{mechanism}@{m}", "kind": "attention", "label": mechanism, "mechanism": mechanism,
           "shape": f"h{side}_s{m * m}", "height": side, "width": side, "tokens": side * side, "dim": 64, "heads": 2,
           "batch": 1, "dtype": "float32", "mode": "forward", "device": "cpu", "status": "ok",
           "options": json.dumps(options), "median_ms": 0.01 * side, "peak_mib": 0.001 * side**2}
    row.update(columns)
    return row


def family(core_exponent: float, full_exponent: float = 2.0, n_win: int | None = None):
    """BRA and full attention on H = m³ (m = 2..5) whose attention parts grow as N^exponent."""
    rows, parts = [], {}
    for m in range(2, 6):
        n = m**6
        rows += [family_row("bra", m, n_win), family_row("full", m)]
        parts[f"bra@{m}"] = {"qkv": 3 * n, "routing": n**core_exponent, "attn_scores": n**core_exponent,
                             "attn_values": n**core_exponent}
        parts[f"full@{m}"] = {"qkv": 3 * n, "attn_scores": n**full_exponent, "attn_values": n**full_exponent}
    return pd.DataFrame(rows), parts


def test_sizes_pass_when_they_round_to_the_same_tenth_and_fail_otherwise():
    assert claims.rounds_alike(13.14, 13.1) == claims.rounds_alike(4.464, 4.5) == claims.PASS
    assert claims.rounds_alike(13.16, 13.1) == claims.rounds_alike(4.44, 4.5) == claims.FAIL
    rows = claims.size_rows({**README_SIZES, "biformer_base": (57_000_000, 9_759_000_000)})
    verdicts = {row.claim: row.verdict for row in rows}
    assert verdicts["BiFormer-T params (M)"] == verdicts["BiFormer-B GMACs"] == claims.PASS
    assert verdicts["BiFormer-B params (M)"] == claims.FAIL


def test_a_model_that_cannot_be_counted_is_not_testable_and_says_why():
    rows = claims.size_rows({**README_SIZES, "biformer_stl": "RuntimeError: no meta kernel"})
    stl = [row for row in rows if row.claim.startswith("BiFormer-STL")]
    assert all(row.verdict.startswith(claims.NOT_TESTABLE) and "no meta kernel" in row.verdict for row in stl)


@pytest.mark.slow  # imports timm and builds the model: seconds on a loaded machine
def test_attnbench_s_tiny_model_counts_as_its_readme_on_the_meta_device():
    params, macs = claims.model_size("biformer_tiny")
    assert (round(params / 1e6, 1), round(macs / 1e9, 1)) == (13.1, 2.2)


def test_slope_verdicts():
    x = [64, 729, 4096, 15625]
    assert claims.slope_verdict(fit_loglog_slope(x, [n ** (4 / 3) for n in x]), claims.BRA_SLOPE) == claims.PASS
    assert claims.slope_verdict(fit_loglog_slope(x, [n ** 1.2 for n in x]), claims.BRA_SLOPE) == claims.FAIL
    assert claims.slope_verdict(fit_loglog_slope(x[:2], [1, 2]), claims.BRA_SLOPE).startswith(claims.NOT_TESTABLE)
    assert claims.slope_verdict(None, claims.FULL_SLOPE).startswith(claims.NOT_TESTABLE)


def test_complexity_passes_on_the_exact_family_and_fails_off_the_exponent():
    frame, parts = family(4 / 3)
    bra, full = claims.complexity_rows(frame, parts)
    assert (bra.verdict, full.verdict) == (claims.PASS, claims.PASS)
    assert bra.ours.startswith("MACs slope 1.333 [") and "latency slope 0.500 [" in bra.ours
    assert "H = m³, S = m² (N 64–15,625)" in bra.setting
    assert bra.paper == f"1.333{SEED_ONLY_MARK}"
    frame, parts = family(1.1, full_exponent=1.8)
    assert [row.verdict for row in claims.complexity_rows(frame, parts)] == [claims.FAIL, claims.FAIL]


def test_complexity_is_not_testable_without_the_exact_family():
    frame, parts = family(4 / 3, n_win=7)  # S = 7 at every size: not S³ = H²
    rows = claims.complexity_rows(frame, parts)
    assert all(row.verdict.startswith(claims.NOT_TESTABLE) for row in rows)
    assert rows[0].setting == "no case of the exact family in this run"


def quadtree_frame(device: str = "cpu") -> pd.DataFrame:
    rows = []
    for mode in ("forward", "forward_backward"):
        for shape, times in (("stage1", (10.0, 2.0, 30.0)), ("stage2", (4.0, 1.0, 2.0))):
            for label, mechanism, ms in zip(("bra (reference)", "bra (auto)", "quadtree"),
                                            ("bra", "bra", "quadtree"), times, strict=True):
                rows.append({"kind": "attention", "label": label, "mechanism": mechanism, "shape": shape,
                             "status": "ok", "device": device, "dtype": "float32", "mode": mode, "batch": 2,
                             "median_ms": ms * (3 if mode == "forward_backward" else 1)})
    return pd.DataFrame(rows)


def test_quadtree_ratios_for_both_bra_settings_both_modes_are_indicative_on_cpu():
    table = quadtree_claim_table(quadtree_frame())
    assert len(table) == 8
    stage1 = table[(table["shape"] == "stage1") & table["group"].str.contains("forward, ")]
    assert list(stage1["bra"]) == ["bra (reference)", "bra (auto)"]
    assert list(stage1["ours: quadtree ms / bra ms"]) == ["3.00×", "15.00×"]
    assert table["group"].str.contains("forward\\+backward").sum() == 4
    assert table["setting"].str.startswith("indicative: CPU").all()
    assert (table["paper (claim)"] == f"3–6×{SEED_ONLY_MARK}").all()
    assert claims.speed_verdict("cpu").startswith(claims.NOT_TESTABLE)
    assert claims.speed_verdict("cuda").startswith(claims.NOT_TESTABLE)  # our QuadTree is not the official kernels
    assert quadtree_claim_table(quadtree_frame("cuda"))["setting"].str.contains("not the official").all()


def test_every_claim_row_has_a_verdict_and_a_rule(tmp_path: Path, monkeypatch):
    frame, parts = family(4 / 3)
    monkeypatch.setattr(claims, "model_size", lambda name: README_SIZES[name])
    monkeypatch.setattr(claims, "analytic_parts", lambda run_dir: parts)
    section = next(item for item in SECTIONS if isinstance(item, claims.Claims))
    run = Run(tmp_path / "claims" / "run", {"suite": "claims"})
    assert section.applies(frame, run) and not section.applies(frame, Run(tmp_path, {"suite": "scaling"}))
    text = "\n".join(section.render(frame, run))
    table = [line for line in text.splitlines() if line.startswith("| ") and "claim" not in line[:8]]
    assert len(table) == 14
    for line in table:
        verdict = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert verdict in (claims.PASS, claims.FAIL) or verdict.startswith(f"{claims.NOT_TESTABLE}: needs ")
    assert "Verdicts: 10 PASS, 4 NOT TESTABLE HERE." in text
    assert SEED_ONLY_FOOTNOTE in text


def test_the_speed_row_reads_the_newest_quadtree_run(tmp_path: Path, monkeypatch):
    older, newer = tmp_path / "quadtree" / "a", tmp_path / "quadtree" / "b"
    for run, created in ((older, "2026-01-01"), (newer, "2026-02-01")):
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"created": created}))
    assert claims.newest_run(tmp_path, "quadtree") == newer
    assert claims.newest_run(tmp_path, "nothing") is None
    monkeypatch.setattr(claims, "RecordStore", lambda path: type("Store", (), {"latest": lambda self: [1]})())
    monkeypatch.setattr(claims, "records_frame", lambda records: quadtree_frame())
    row = claims.speed_row(newer)
    assert "bra (reference), cpu, float32, forward, batch 2: 0.50–3.00× over 2 shapes" in row.ours
    assert row.verdict.startswith(claims.NOT_TESTABLE) and "indicative: CPU" in row.setting


def test_seed_only_paper_figures_are_marked_and_footnoted_with_source_and_status():
    accuracy = pd.DataFrame([{"kind": "accuracy", "label": label, "mechanism": "biformer_stl", "shape": "imagenet",
                              "height": 224, "task": "classification", "dataset": "imagenet", "status": "ok",
                              "top1": 80.0, "params": 28e6, "counted_gflops_per_image": 9.0, "images_per_s": 1.0,
                              "paper": paper, "options": json.dumps({"attention": attention})}
                             for label, paper, attention in (("swin", "swin", "swin"), ("axial", None, "axial"),
                                                             ("full", None, "full"))])
    table = ablation_table(accuracy).set_index("mechanism")
    assert table.loc["swin", "paper ImageNet top-1"] == f"81.3{SEED_ONLY_MARK}"
    assert table.loc["swin", "paper row"] == "shifted window"
    assert table.loc["axial", "paper row"] == "axial stripe" and table.loc["axial", "paper ImageNet top-1"] == "not found"
    assert table.loc["full", "paper row"] == table.loc["full", "paper ImageNet top-1"] == ""
    lines = provenance_lines(figures_shown(accuracy))
    swin = figure("attention_ablation", "swin", "top1")
    # the figure's note (Swin-T's own README says 81.2) is printed beside its source and status
    assert f"- 81.3{SEED_ONLY_MARK}: seed-only, {swin.source} (note: {swin.note})" in lines
    assert any(line.startswith("- not found (") and "where we looked" in line for line in lines)
    assert lines[-1] == SEED_ONLY_FOOTNOTE
    assert PaperSources().applies(accuracy, Run(Path("."), {}))


def test_confirmed_figures_carry_no_mark_and_no_seed_footnote():
    models = pd.DataFrame([{"kind": "model", "label": "BiFormer-T", "shape": "224px", "status": "ok",
                            "paper": "biformer_tiny", "params": 13.14e6, "counted_gflops_per_image": 4.43,
                            "median_ms": 1.0, "iqr_ms": 0.1, "images_per_s": 1.0, "device": "cpu",
                            "dtype": "float32", "mode": "forward", "batch": 1}])
    table = model_table(models)
    assert list(table.loc[0, ["paper params (M)", "paper GMACs", "paper top-1"]]) == ["13.1", "2.2", "81.4"]
    lines = provenance_lines(table.attrs["paper_figures"])
    assert SEED_ONLY_FOOTNOTE not in lines and all("confirmed, rayleizhu/BiFormer README.md" in line for line in lines)


@pytest.mark.parametrize("suite", ["suites/claims.yaml", "suites/quadtree.yaml"])
def test_the_suites_load_in_every_profile(suite):
    from attnbench.suite import expand, load_suite

    for profile in (None, "quick"):
        cases = expand(load_suite(suite, profile))
        assert cases and all(case.kind == "attention" for case in cases)
    if suite.endswith("quadtree.yaml"):
        labels = {case.label for case in cases}
        assert labels == {"bra (reference)", "bra (auto)", "quadtree"}
        assert {case.mode for case in cases} == {"forward", "forward_backward"}


def test_a_claims_run_without_records_still_renders_a_verdict_in_every_row(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(claims, "model_size", lambda name: README_SIZES[name])
    from attnbench.report.frame import records_frame

    section = next(item for item in SECTIONS if isinstance(item, claims.Claims))
    text = "\n".join(section.render(records_frame([]), Run(tmp_path / "claims" / "run", {"suite": "claims"})))
    assert "Verdicts: 8 PASS, 6 NOT TESTABLE HERE." in text
