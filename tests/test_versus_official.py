"""``python -m attnbench versus-official``: checks before it times, times interleaved, keeps what it measured.

The official BiFormer code is not shipped; stand-ins under tests/fixtures play it (one computing the same function,
one computing another). The comparison against the real code is run by hand (README: fast BRA)."""

import json
from pathlib import Path

import pytest
import torch

from attnbench.cli import main
from attnbench.kernel_bound import stage_module
from attnbench.versus_official import STAGE_TOPK, Row, interleaved_times, useful_flops_per_image

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--layers", "biformer_t.stage3", "--models", "--batch", "2", "--rounds", "4", "--warmup", "1",
         "--threads", "1"]


def test_a_matching_official_code_is_timed_row_by_row_and_a_rerun_keeps_the_rows(tmp_path, capsys):
    out = tmp_path / "versus"
    assert main(["versus-official", str(FIXTURES / "official_standin"), "--out", str(out), *SMALL]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(row["name"], row["mode"]) for row in rows] == [("biformer_t.stage3", "forward"),
                                                           ("biformer_t.stage3", "forward_backward")]
    for row in rows:
        assert row["rounds"] == 4 and row["official_ms"] > 0 and row["ours_ms"] > 0 and row["speedup"] > 0
        assert row["max_difference"] <= 1e-5 and len(row["load_before"]) == 3
    assert 0 < rows[0]["ours_gemm_fraction"] and rows[1]["ours_gemm_fraction"] is None  # forward only
    # the useful FLOPs of the stage, and from them each side's share of the GEMM rate and the speed-up a
    # GEMM-rate implementation would show over the official one
    stage_macs = stage_module("biformer_t.stage3").macs(14, 14).total
    assert rows[0]["useful_flops_per_image"] == useful_flops_per_image("layer", "biformer_t.stage3") == 2 * stage_macs
    assert rows[1]["useful_flops_per_image"] is None
    gemm_rate = json.loads((out / "run.json").read_text())["gemm_flops_per_s"]
    first = Row(**{**rows[0], "speedup_iqr": tuple(rows[0]["speedup_iqr"])})
    assert first.gemm_share(first.ours_ms, gemm_rate) == pytest.approx(rows[0]["ours_gemm_fraction"])
    ceiling = 1 / first.gemm_share(first.official_ms, gemm_rate)
    assert ceiling == pytest.approx(gemm_rate * first.official_ms * 1e-3 / (first.useful_flops_per_image * 2))
    # the stand-in is our layer on its reference backend, which expands the routed keys and values per query region:
    # it moves more than ours, which moves at least the input read and the output written
    official_traffic, our_traffic = rows[0]["traffic_mb_per_image"]
    assert official_traffic > our_traffic >= 2 * 14 * 14 * 256 * 4 / 1e6 and rows[1]["traffic_mb_per_image"] is None
    report = (out / "report.md").read_text()
    assert "float64 outputs and gradients within 1e-10" in report and "| layer" in report
    assert f"| {official_traffic:.1f} / {our_traffic:.1f} " in report and f"| {ceiling:.2f}× " in report
    assert json.loads((out / "run.json").read_text())["official_commit"] == "unknown (not a git checkout)"
    capsys.readouterr()
    assert main(["versus-official", str(FIXTURES / "official_standin"), "--out", str(out), *SMALL]) == 0
    assert "official" not in capsys.readouterr().out.split("report:")[0]  # nothing measured again
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2
    other_threads = [*SMALL[:-1], "2"]  # --threads 2
    assert main(["versus-official", str(FIXTURES / "official_standin"), "--out", str(out), *other_threads]) == 2
    assert "its rows were measured under other conditions (threads 1 then, 2 now); choose another --out" in \
        capsys.readouterr().err


@pytest.mark.parametrize("stand_in", ["official_wrong", "official_wrong_backward"])
def test_official_code_that_computes_another_function_or_gradient_is_not_timed(tmp_path, capsys, stand_in):
    out = tmp_path / "versus"
    assert main(["versus-official", str(FIXTURES / stand_in), "--out", str(out), *SMALL]) == 1
    assert "not the same function, nothing timed: outputs differ" in capsys.readouterr().err
    assert not (out / "rows.jsonl").exists()


def test_the_layers_are_the_bra_stages_of_biformer_t_with_its_top_k():
    from attnbench.models.biformer import RELEASED

    stages = [f"biformer_t.stage{index}" for index, topk in enumerate(RELEASED["topks"], 1) if topk > 0]
    assert STAGE_TOPK == {stage: topk for stage, topk in zip(stages, RELEASED["topks"], strict=False)}


def test_too_few_rounds_for_a_spread_exit_2_before_anything_runs(tmp_path, capsys):
    few = [arg if arg != "4" else "3" for arg in SMALL]  # --rounds 3
    assert main(["versus-official", str(FIXTURES / "official_standin"), "--out", str(tmp_path / "o"), *few]) == 2
    assert "needs at least 4 rounds" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_directory_that_is_not_the_official_checkout_exits_2(tmp_path, capsys):
    assert main(["versus-official", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL]) == 2
    assert f"error: {tmp_path}: not a checkout of rayleizhu/BiFormer (no ops/bra_legacy.py)" in capsys.readouterr().err


def test_interleaved_rounds_alternate_the_order_and_time_each_side_once_per_round():
    calls = []
    first, second = interleaved_times(lambda: calls.append("a"), lambda: calls.append("b"), rounds=4, warmup=1,
                                      device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"] and len(first) == len(second) == 4
