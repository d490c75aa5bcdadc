"""pytest-benchmark micro-benchmarks: each registered mechanism's forward at one small shape, fp32, CPU.

Skipped by the test session; run with ``nox -s microbench`` (results under .benchmarks/, compare runs with
``pytest-benchmark compare``). The suites in suites/ are the measurements that reports use.
"""

import pytest
import torch

import attentions

SHAPE = dict(height=28, width=28, dim=64, heads=2)
OPTIONS = {"bra": {"n_win": 7, "topk": 4}, "deformable": {"n_groups": 2, "rpe_table_size": 28}}


@pytest.mark.parametrize("name", sorted(attentions.available()))
def test_forward(benchmark, name):
    torch.manual_seed(0)
    module = attentions.create(name, dim=SHAPE["dim"], num_heads=SHAPE["heads"], **OPTIONS.get(name, {})).eval()
    x = torch.randn(4, SHAPE["height"], SHAPE["width"], SHAPE["dim"])
    benchmark.extra_info.update(SHAPE, threads=torch.get_num_threads(), dtype="float32", batch=4)

    def forward():
        with torch.inference_mode():
            return module(x)

    out = benchmark(forward)
    assert torch.isfinite(out).all()
