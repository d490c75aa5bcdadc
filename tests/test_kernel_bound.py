"""The kernel bound (attnbench/kernel_bound.py): its kernels do exactly the work BRA's MAC count names, the bound is
the FLOP-weighted rate of the fastest kernels, and the command writes a report and refuses to mix runs."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attnbench import cli, kernel_bound
from attnbench.presets import PRESETS


@pytest.mark.parametrize("stage", list(kernel_bound.STAGE_TOPK))
def test_each_kernel_does_the_macs_bra_counts_for_its_parts(stage):
    shape = PRESETS[stage]
    parts = kernel_bound.stage_module(stage).macs(shape.height, shape.width).parts
    group = 2
    for name, (_, call) in kernel_bound.part_kernels(stage, group, torch.Generator().manual_seed(0)).items():
        assert kernel_bound.part_of(name) in kernel_bound.KERNEL_PARTS, name
        if name.endswith("(native)"):  # invisible to the counter; tests/test_bra_native.py checks what it computes
            continue
        # the math SDPA is made of matmuls the counter sees (CPU's fused kernel is not counted)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            call()
        expected = sum(parts[part] for part in kernel_bound.KERNEL_PARTS[kernel_bound.part_of(name)])
        if name == "attention (dense)":  # every query against every token: the useful MACs × tokens ÷ keys attended
            tokens = shape.height * shape.width
            expected = expected * tokens // int(kernel_bound.stage_module(stage).keys_per_query(shape.height,
                                                                                                 shape.width))
        assert counter.get_total_flops() == 2 * expected * group, name
    assert set(parts) == {part for names in kernel_bound.KERNEL_PARTS.values() for part in names}


def test_the_bound_is_the_flop_rate_of_the_fastest_kernels():
    def row(part, macs, us):
        return kernel_bound.PartRow("s", part, "k", macs, 1, us, 0.0, 0.0)

    rows = [row("qkv", 3_000_000, 10.0), row("attention", 1_000_000, 30.0), row("attention (bmm)", 1_000_000, 10.0)]
    # 2·(3 + 1) MFLOP in (10 + 10) µs = 400 GFLOP/s, over a thread's 800 GFLOP/s
    assert kernel_bound.bound(rows, thread_gemm=800e9) == pytest.approx(0.5)
    # a faster variant of any part counts, not only of the attention
    rows.append(row("qkv (native)", 3_000_000, 5.0))
    assert kernel_bound.bound(rows, thread_gemm=800e9) == pytest.approx(8e6 / 15e-6 / 800e9)


def test_the_command_writes_a_report_and_refuses_a_used_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernel_bound, "GROUPS", (1,))
    monkeypatch.setattr(kernel_bound, "_KERNEL_TIMING", {"warmup_iters": 1, "min_samples": 3, "max_time_s": 0.2,
                                                         "min_run_time_s": 0.01})
    rates = iter([40e9, 50e9, 45e9, 30e9, 35e9, 20e9])  # three tries at --threads, three at one thread: best kept
    monkeypatch.setattr(kernel_bound, "gemm_flops_per_s", lambda device, dtype: next(rates))
    monkeypatch.setattr(kernel_bound, "copy_bandwidth", lambda: [8e9, 10e9, 9e9])
    out = tmp_path / "bound"
    argv = ["kernel-bound", "--stages", "biformer_t.stage4", "--batch", "2", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {row["kind"] for row in rows} == {"PartRow", "OursRow"}
    parts = {kernel_bound.part_of(row["part"]) for row in rows if row["kind"] == "PartRow"}
    assert parts == set(kernel_bound.KERNEL_PARTS)
    ours = next(row for row in rows if row["kind"] == "OursRow")
    assert ours["batch"] == 2 and ours["ms"] > 0 and ours["gemm_fraction"] > 0 and ours["whole_ms"] > 0
    module = kernel_bound.stage_module("biformer_t.stage4")
    flops = 2 * module.macs(7, 7).total
    # at least the input read and the output written by the ops, each of 7·7·512 floats
    assert ours["traffic_per_image"] >= 2 * 7 * 7 * 512 * 4
    assert ours["memory_ceiling"] == pytest.approx(min(1.0, flops / ours["traffic_per_image"] * 10e9 / 50e9))
    report = (out / "report.md").read_text()
    assert "| biformer_t.stage4 |" in report and "kernel bound" in report
    assert "50.0 GFLOP/s at 1 threads, 35.0 at one (the best of 40.0, 50.0, 45.0 and of 30.0, 35.0, 20.0" in report
    assert "10.0 GB/s at 1 threads (the best of 8.0, 10.0, 9.0)" in report and "memory ceiling" in report
    assert cli.main(argv) == 2
    assert "not empty" in capsys.readouterr().err
