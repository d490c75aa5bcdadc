import os

import pytest
import torch

# pytest-benchmark micro-benchmarks run only in `nox -s microbench`
collect_ignore = [] if os.environ.get("ATTNBENCH_MICROBENCH") else ["bench"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
