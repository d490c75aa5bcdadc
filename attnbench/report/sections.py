"""The report's sections, in order. Each says whether it applies to a run's frame and renders its markdown
lines; ``build_report`` (render.py) writes the header, then every section that applies.

A new table is one more section here (or, for a measure's own table, nothing: ``MeasureTables`` shows the
``table`` each measure declares).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from ..measure import MEASURES
from ..paper import figure
from .flags import footnote
from .plots import make_plots, throughput_against_gmacs
from .tables import (
    ablation_table,
    bra_formula_table,
    complexity_tables,
    configurations_table,
    failures_table,
    groups,
    latency_table,
    measure_table,
    memory_table,
    model_table,
    quadtree_claim_table,
    roofline_table,
    speedup_table,
    throughput_table,
    training_table,
)


def markdown(table: pd.DataFrame, index: bool = True) -> str:
    if table.empty:
        return "_no data_"
    return tabulate(table, headers="keys", tablefmt="github", showindex=index, disable_numparse=True)


@dataclass(frozen=True)
class Run:
    """What sections know of the run besides its frame: its directory and its run.json."""

    directory: Path
    info: dict[str, Any]


class Section:
    kind: str | None = None  # the case kind the section reads (None: every kind)

    def rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame if self.kind is None or frame.empty else frame[frame["kind"] == self.kind]

    def applies(self, frame: pd.DataFrame, run: Run) -> bool:
        return not self.rows(frame).empty

    def render(self, frame: pd.DataFrame, run: Run) -> list[str]:
        raise NotImplementedError


class Ablation(Section):
    kind = "accuracy"

    def render(self, frame, run):
        trained = self.rows(frame)
        timed = trained["images_per_s"].notna().any()
        measured = ("params, GMACs (FlopCounterMode ÷ 2) and inference throughput" if timed else
                    "params and GMACs (FlopCounterMode ÷ 2; the suite does not time the trained models)")
        return [f"## Attention ablation: {'accuracy, size and speed' if timed else 'accuracy and size'}", "",
                f"Ours: the score of each trained model on each task; {measured} of the first task's trained model "
                "at its input size. *Paper* columns: the "
                "BiFormer paper's ablation on the full STL backbone (ImageNet-1K top-1, ADE20K mIoU), only for the "
                "rows it reports; a proxy or generated-data column is not comparable with them.", "",
                markdown(ablation_table(trained), index=False), "",
                "What each score rests on:", "", markdown(training_table(trained), index=False), ""]


class SeedStatistics(Section):
    """Per task: chance, mean over seeds with 95% CIs (overall and per distance bin), the suite's gates, pairwise
    differences with their verdicts, and accuracy against distance and against GMACs (accuracy.py)."""

    kind = "accuracy"

    def render(self, frame, run):
        from . import accuracy

        lines = []
        for task, group in self.rows(frame).groupby("shape", sort=False):
            level = accuracy.chance(group)
            seeds = group[group["status"] == "ok"].groupby("label")["seed"].nunique()
            lines += [f"## Accuracy over seeds: {task}", "",
                      f"Chance level: **{level:.1f}%** ({100 / level:.0f} classes)." if level else "",
                      f"Seeds per mechanism: {seeds.min() if len(seeds) else 0}–{seeds.max() if len(seeds) else 0}."
                      " Intervals: 95% Student-t over seeds (mean ± t·s/√n); differences: 95% Welch intervals. A pair"
                      " is *separated* when its Welch t-test survives Holm's correction over the table's pairs of that"
                      " quantity (at most a 5% chance of any false *separated* among them), otherwise *not separated*:"
                      " the run does not rank it. Seeds vary the initialisation and the data order, not the data set.",
                      *([f"A seed *learned the training set* when its final training loss fell below"
                         f" {accuracy.LEARNED_BELOW_CHANCE_LOSS:g} × ln({100 / level:.0f}) ="
                         f" {accuracy.LEARNED_BELOW_CHANCE_LOSS * accuracy.chance_loss(group):.3f}, the loss of"
                         " guessing; a score of a seed that did not learn says that this recipe did not train it,"
                         " not that the mechanism cannot do the task (a diagnostic, not a gate)."]
                        if level and "train_loss" in group and group["train_loss"].notna().any() else []), ""]
            results = accuracy.gate_results(group, run.info.get("gates", []))
            if results:
                verdicts = {None: "NOT CHECKED", True: "PASS", False: "FAIL"}
                if any(ok is False for _, ok, _ in results):
                    conclusion = ("**A gate failed: this task did not discriminate between mechanisms as designed, "
                                  "so the figures below are not a ranking.**")
                elif any(ok is None for _, ok, _ in results):
                    conclusion = ("**Not every gate could be checked in this run (a part of the suite): the figures "
                                  "below are not a ranking until the merged run checks them all.**")
                else:
                    conclusion = ("All gates hold, so the separated pairs below rank the mechanisms on this task in "
                                  "this protocol.")
                lines += ["Gates (from the suite file, as recorded in run.json when the run started):", "",
                          *[f"- {verdicts[ok]}: {gate['label']} {gate['metric']}: {measured}"
                            + (f" — {gate['why']}" if gate.get("why") else "") for gate, ok, measured in results],
                          "", conclusion, ""]
            gates_hold = all(ok for _, ok, _ in results)
            hypotheses = accuracy.hypothesis_results(group, run.info.get("hypotheses", []))
            if hypotheses:
                lines += [f"Hypotheses (declared in the suite before the run, as recorded in run.json; each a Welch "
                          f"t-test of the seed means, Holm over these {len(hypotheses)} alone"
                          + ("" if gates_hold else "; **not judged: the gates above do not all hold**") + "):", "",
                          *[f"- {'NOT CHECKED' if verdict is None else verdict if gates_hold else 'NOT JUDGED'}: "
                            f"{hypothesis['higher']} > {hypothesis['lower']} ({hypothesis['metric']}): {measured}"
                            + (f" — {hypothesis['why']}" if hypothesis.get("why") else "")
                            for hypothesis, verdict, measured in hypotheses], ""]
            lines += [markdown(accuracy.seed_table(group), index=False), ""]
            pairs = accuracy.pairwise_table(group)
            if not pairs.empty:
                lines += ["Pairwise differences of seed means (first − second), 95% Welch CI, Holm-adjusted p"
                          + (" (every pair: a family of its own, apart from the hypotheses above)" if hypotheses
                             else "") + ":", "",
                          markdown(pairs, index=False), "", "Which pairs the run separates (Holm-adjusted p ≤ 0.05) "
                          "and which it does not rank:", "",
                          *accuracy.separation_summary(group), ""]
            slug = "".join(char if char.isalnum() else "_" for char in str(task))
            for plot in (accuracy.distance_plot(group, f"{task}: accuracy against distance",
                                                run.directory / "plots" / f"distance_{slug}.png"),
                         accuracy.cost_plot(group, f"{task}: accuracy against cost",
                                            run.directory / "plots" / f"cost_{slug}.png")):
                if plot is not None:
                    lines += [f"![{plot.stem}](plots/{plot.name})", ""]
        return lines


class Models(Section):
    kind = "model"

    def render(self, frame, run):
        lines = []
        for title, group in groups(self.rows(frame)):
            lines += [f"## Models: {title}", "",
                      "Ours: params, GMACs (FlopCounterMode ÷ 2, the paper's convention) and GFLOPs per image, latency "
                      "per batch and throughput. *Paper* columns: the published figures (ImageNet-1K top-1 is the "
                      "paper's; this table measures no accuracy). *Of GEMM rate*: the FLOP rate the throughput "
                      "means (GFLOPs × images/s) over the dense GEMM rate measured in the same run.", "",
                      markdown(model_table(group), index=False), "", *footnote(group)]
            plot = throughput_against_gmacs(group, title, run.directory / "plots")
            if plot is not None:
                lines += [f"![{plot.stem}](plots/{plot.name})", ""]
        return lines


class Configurations(Section):
    """Every mechanism's options per shape, the backend that ran, its cost and keys per query, and the upstream
    configuration the options follow: what a reader checks before trusting a row."""

    kind = "attention"

    def render(self, frame, run):
        return ["## Configurations", "",
                "Each mechanism as its own paper configures it at these shapes (options from the upstream file "
                "named in *source*); *backend*: the implementation that ran (`impl=auto` resolved per shape). "
                "Every mechanism here is unfused PyTorch on this device unless its backend says otherwise.", "",
                markdown(configurations_table(self.rows(frame)), index=False), ""]


class ModelConfigurations(Section):
    """Each model's options, the backends its mechanisms ran on, and the upstream configuration it follows."""

    kind = "model"

    def render(self, frame, run):
        table = configurations_table(self.rows(frame))[["mechanism", "shape", "options", "backend", "source"]]
        return ["## Model configurations", "", markdown(table.rename(columns={"mechanism": "model"}), index=False),
                ""]


class Speed(Section):
    """Per device / dtype / mode / batch: latency, throughput, speed-up, roofline (when timed), memory (when
    measured), and the plots."""

    kind = "attention"

    @staticmethod
    def _shows(group: pd.DataFrame, column: str) -> bool:
        """A block is shown where some case has its figures, or where no case finished (its cells say why)."""
        return group[column].notna().any() or (group["status"] != "ok").all()

    def applies(self, frame, run):
        rows = self.rows(frame)
        return not rows.empty and (self._shows(rows, "median_ms") or self._shows(rows, "peak_mib"))

    def render(self, frame, run):
        lines = []
        baseline = run.info.get("baseline")
        for title, group in groups(self.rows(frame)):
            lines += [f"## Speed: {title}", ""]
            if self._shows(group, "median_ms"):
                lines += ["Latency, ms per batch (± half IQR):", "", markdown(latency_table(group)), "",
                          "Throughput, images/s:", "", markdown(throughput_table(group)), "",
                          *([f"Speed-up over `{baseline}` (its latency ÷ the row's, same run):", "",
                             markdown(speedup_table(group, baseline)), ""] if baseline else []),
                          "Achieved FLOP/s as a fraction of the dense GEMM rate measured in the same run (roofline):",
                          "", markdown(roofline_table(group)), ""]
            lines += footnote(group)
            if group["peak_mib"].notna().any():
                lines += ["Memory, MiB: each cell is the step's **peak** (everything alive at its highest point), "
                          "then in brackets the **activations** (the part beyond the module's weights and its "
                          "input: activations, gradients, workspace):", "",
                          markdown(memory_table(group)), ""]
            for path in make_plots(group, title, run.directory / "plots"):
                lines += [f"![{path.stem}](plots/{path.name})", ""]
        return lines


class Complexity(Section):
    kind = "attention"

    def applies(self, frame, run):
        return super().applies(frame, run) and self.rows(frame)["analytic_gmacs_per_image"].notna().any()

    def render(self, frame, run):
        lines = ["## Complexity (per image, forward)", ""]
        for title, table in complexity_tables(self.rows(frame)):
            lines += [title, "", markdown(table), ""]
        return lines


class BraFormula(Section):
    kind = "attention"

    def applies(self, frame, run):
        return super().applies(frame, run) and not bra_formula_table(self.rows(frame)).empty

    def render(self, frame, run):
        return ["## BRA cost: ours beside the paper's formula", "",
                f"The paper's formula is {figure('bra_cost_formula').cell()} (projections q, k, v; routing;"
                " attention). Ours adds the output projection and the LCE conv and counts routing once, "
                "as the official code spends it. (Paper figures marked † rest on the seed summary only; their "
                "sources are listed at the end of the report.)", "",
                markdown(bra_formula_table(self.rows(frame)), index=False), ""]


class QuadtreeClaim(Section):
    kind = "attention"

    def applies(self, frame, run):
        return super().applies(frame, run) and not quadtree_claim_table(self.rows(frame)).empty

    def render(self, frame, run):
        return ["## BRA against QuadTree attention", "",
                "Latency of quadtree ÷ latency of each BRA row, same run, same group and shape. The paper's claim "
                "was measured on a GPU with the official QuadTree kernels: a ratio measured on a CPU, or with "
                "attnbench's PyTorch QuadTree on any device, is indicative and never scored against it. (Paper "
                "figures marked † rest on the seed summary only; their sources are listed at the end of the "
                "report.)", "", markdown(quadtree_claim_table(self.rows(frame)), index=False), ""]


class MeasureTables(Section):
    """The table every measure declares (attnbench/measure/ ``Measure.table``), where the run measured it."""

    def _tables(self, frame: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
        for measure in MEASURES.values():
            if measure.table is None or measure.table.column not in frame or frame[measure.table.column].isna().all():
                continue
            measured = frame[frame[measure.table.column].notna() | (frame["status"] != "ok")]
            for kind, of_kind in measured.groupby("kind", sort=False):
                for title, group in groups(of_kind):
                    table = measure_table(group, measure.table.column, measure.table.template)
                    if kind != "attention":
                        table = table.rename(columns=str)
                    yield f"{measure.table.title}: {kind} cases, {title}", measure.name, table

    def applies(self, frame, run):
        return any(True for _ in self._tables(frame))

    def render(self, frame, run):
        lines = []
        for title, name, table in self._tables(frame):
            lines += [f"## {title}", "", f"(measure `{name}`)", "", markdown(table), ""]
        return lines


class Failures(Section):
    """Every case that did not finish, of every kind, with its status and message."""

    def applies(self, frame, run):
        return not frame.empty and (frame["status"] != "ok").any()

    def render(self, frame, run):
        return ["## Cases that did not finish", "", markdown(failures_table(frame), index=False), ""]


SECTIONS: list[Section] = [Ablation(), SeedStatistics(), Models(), ModelConfigurations(), Configurations(), Speed(),
                           Complexity(), BraFormula(), QuadtreeClaim(),
                           MeasureTables(), Failures()]

from . import claims, provenance, scaling  # noqa: E402  (sections of their own files, which import this one)

SECTIONS += [scaling.Scaling(), claims.Claims(), provenance.PaperSources()]
