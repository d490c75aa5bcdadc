"""Reports: records -> a flat frame (frame.py) -> tables (tables.py) and plots (plots.py) -> report.md
(render.py). Paper figures come from attnbench/paper_figures.yaml only (paper.py)."""

from .render import build_report, export

__all__ = ["build_report", "export"]
