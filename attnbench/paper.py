"""The paper's figures (attnbench/paper_figures.yaml) and its cost formula, always labelled as the paper's."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

PAPER_FIGURES = Path(__file__).resolve().parent / "paper_figures.yaml"


@cache
def paper_figures() -> dict[str, Any]:
    return yaml.safe_load(PAPER_FIGURES.read_text())


def bra_paper_macs(height: int, width: int, dim: int, n_win: int, topk: int) -> int:
    """BRA's cost as the paper writes it: 3HWC² + 2(S²)²C + 2·HW·k·(HW/S²)·C (MACs)."""
    tokens, regions = height * width, n_win * n_win
    return 3 * tokens * dim * dim + 2 * regions * regions * dim + 2 * tokens * topk * (tokens // regions) * dim
