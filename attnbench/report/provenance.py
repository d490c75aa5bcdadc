"""The report's last section: where every paper figure its tables print comes from, and its status.

The tables with paper columns (tables.py: ``model_table``, ``ablation_table``, ``bra_formula_table``,
``quadtree_claim_table``) mark seed-only figures with † and name the figures they print in
``attrs["paper_figures"]``; this section lists them once each, with the source and status that
attnbench/paper_figures.yaml gives them, as the footnote of those columns.
"""

from __future__ import annotations

import pandas as pd

from ..paper import PaperFigure, provenance_lines
from .sections import Run, Section
from .tables import ablation_table, bra_formula_table, groups, model_table, quadtree_claim_table


def figures_shown(frame: pd.DataFrame) -> list[PaperFigure]:
    """The paper figures the report's tables print for ``frame``, in the order the report prints them."""
    if frame.empty:
        return []
    shown: list[PaperFigure] = []
    accuracy, models, attention = (frame[frame["kind"] == kind] for kind in ("accuracy", "model", "attention"))
    if not accuracy.empty:
        shown += ablation_table(accuracy).attrs["paper_figures"]
    for _, group in groups(models) if not models.empty else ():
        shown += model_table(group).attrs["paper_figures"]
    if not attention.empty:
        shown += bra_formula_table(attention).attrs["paper_figures"]
        shown += quadtree_claim_table(attention).attrs["paper_figures"]
    return shown


class PaperSources(Section):
    """Footnote of every paper column: each printed figure with its status and source."""

    def applies(self, frame: pd.DataFrame, run: Run) -> bool:
        return bool(figures_shown(frame))

    def render(self, frame: pd.DataFrame, run: Run) -> list[str]:
        return ["## Paper figures in this report: sources", "",
                "Each figure the *paper* columns above print, with its status (confirmed: read in the primary "
                "source named; seed-only: no primary source we could read confirms it, marked †; not found: the "
                "paper's table has the row, but no source reachable here gives its figure) and where it was read "
                "(attnbench/paper_figures.yaml).", "", *provenance_lines(figures_shown(frame)), ""]
