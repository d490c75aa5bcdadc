"""The paper's quantitative claims on trial: one row per claim with our measurement, the setting it was measured
in, the verdict rule and the verdict (PASS, FAIL, or NOT TESTABLE HERE with what a test would need).

The rules below were written before anything was measured, and the report prints them beside the verdicts.

Where the evidence comes from (the claims suite, suites/claims.yaml, is a mechanism suite):

- complexity: this run's own cases, BRA and full attention on the exact S ∝ N^{1/3} family (H = W = m³,
  S = m², so S³ = H²); only points of that family are fitted, whatever else the run holds;
- params and GMACs of the released models: attnbench's model definitions, built on the meta device (no
  weights) when the report is rendered; GMACs are FlopCounterMode's count ÷ 2 on the plain path of every
  mechanism, the models suite's convention. They depend on the architecture only, so nothing is timed;
- BRA against QuadTree: the newest run of suites/quadtree.yaml beside this one (``<results>/quadtree/``), if
  any, shown as indicative: attnbench's QuadTree is a PyTorch implementation, not the official kernels;
- accuracy (released checkpoints, the ablation): nothing here can test them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..paper import PaperFigure, figure, provenance_lines
from ..records import RecordStore
from .fit import SlopeFit, fit_loglog_slope
from .frame import records_frame
from .scaling import analytic_parts, with_core_macs
from .sections import Section, markdown
from .tables import quadtree_claim_table

PASS, FAIL, NOT_TESTABLE = "PASS", "FAIL", "NOT TESTABLE HERE"

MODELS = {"biformer_tiny": "BiFormer-T", "biformer_small": "BiFormer-S", "biformer_base": "BiFormer-B",
          "biformer_stl": "BiFormer-STL"}
SIZE_RULE = "PASS when ours and the paper's figure round to the same 0.1; else FAIL"
BRA_SLOPE = (1.30, 1.37)
FULL_SLOPE = (1.95, 2.05)
SLOPE_RULE = ("PASS when the log–log fitted slope of {what} against N on the exact S ∝ N^{{1/3}} family (≥ 3 sizes) "
              "lies in [{low:.2f}, {high:.2f}]; else FAIL. Latency and peak-memory slopes are reported with their "
              "fit's 95% CI, not scored")
SPEED_RULE = ("scored only in the claim's setting (a GPU, the official QuadTree CUDA kernels); anywhere else "
              "NOT TESTABLE HERE and our ratios indicative (a CPU ratio is never scored)")
SPEED_NEEDS = "a GPU and the official QuadTree kernels (Tangshitao/QuadTreeAttention's CUDA extension)"
CHECKPOINT_RULE = "PASS when each released checkpoint's ImageNet-1K val top-1 at 224² is within 0.1 of its README's"
CHECKPOINT_NEEDS = "ImageNet-1K val (50,000 images) and the released checkpoints (no network or data set here)"
ABLATION_NEEDS = ("ImageNet-1K and ADE20K, and the GPU time to train the STL backbone with each attention "
                  "(300 ImageNet epochs; 80k Semantic FPN iterations)")
RANKING_RULE = ("PASS when, trained by the paper's recipe, BRA > deformable > shifted window in both ImageNet top-1 "
                "and ADE20K mIoU; else FAIL")
FAMILY_COLUMNS = ("id", "mechanism", "shape", "tokens", "batch", "device", "dtype", "dim", "heads", "median_ms",
                  "peak_mib")
ABLATION_RULE = "PASS when each trained row is within 0.3 of the paper's top-1 and mIoU; else FAIL"


@dataclass(frozen=True)
class ClaimRow:
    claim: str
    paper: str  # the paper's figure(s), seed-only ones marked
    ours: str
    setting: str
    rule: str
    verdict: str
    figures: tuple[PaperFigure, ...] = ()


def rounds_alike(ours: float, paper: float) -> str:
    """PASS when ``ours`` and ``paper`` round to the same 0.1, else FAIL."""
    return PASS if abs(round(ours, 1) - round(paper, 1)) < 1e-9 else FAIL


def slope_verdict(fit: SlopeFit | None, bounds: tuple[float, float]) -> str:
    """PASS when the fitted slope lies in ``bounds``; NOT TESTABLE HERE without a fit on ≥ 3 sizes."""
    if fit is None or fit.n < 3:
        return f"{NOT_TESTABLE}: needs ≥ 3 sizes of the S ∝ N^{{1/3}} family in this run"
    return PASS if bounds[0] <= fit.slope <= bounds[1] else FAIL


def speed_verdict(device: str | None, official_quadtree_kernels: bool = False) -> str:
    """The speed claim is scored only on a GPU with the official QuadTree kernels, which attnbench never has."""
    if device == "cuda" and official_quadtree_kernels:
        raise NotImplementedError("attnbench has no official QuadTree kernels to score the claim with")
    return f"{NOT_TESTABLE}: needs {SPEED_NEEDS}"


def model_size(name: str, image_size: int = 224) -> tuple[int, int]:
    """(params, MACs per image) of attnbench's ``name`` at ``image_size``², built on the meta device, counted by
    FlopCounterMode on the plain path (the models suite's ``flops`` measure, without weights or timing)."""
    import timm
    import torch

    from .. import models  # noqa: F401  (registers BiFormer's models with timm)
    from ..measure.correctness import plain_copy
    from ..measure.flops import count_flops

    with torch.device("meta"):
        model = plain_copy(timm.create_model(name).eval())
        x = torch.empty(1, 3, image_size, image_size)
    with torch.no_grad():
        macs = count_flops(lambda: model(x)).macs
    return sum(parameter.numel() for parameter in model.parameters()), macs


def model_sizes() -> dict[str, tuple[int, int] | str]:
    """``model_size`` of every released model, or why it could not be computed (a report never crashes)."""
    sizes: dict[str, tuple[int, int] | str] = {}
    for name in MODELS:
        try:
            sizes[name] = model_size(name)
        except Exception as error:  # any failure to build or count is reported in the row, not raised
            sizes[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return sizes


def size_rows(sizes: dict[str, tuple[int, int] | str]) -> list[ClaimRow]:
    """Params and GMACs of each released model against the README's (``sizes``: name -> (params, MACs), or the
    error that kept them from being computed)."""
    rows = []
    setting = "attnbench's definition, 224², meta device (no weights), FlopCounterMode ÷ 2 on the plain path"
    for name, title in MODELS.items():
        size = sizes[name]
        for index, field, what in ((0, "params_m", "params (M)"), (1, "gmacs", "GMACs")):
            published = figure("models", name, field)
            if isinstance(size, str):
                ours, verdict = f"not computed ({size})", f"{NOT_TESTABLE}: needs the model to build ({size})"
            else:
                value = size[index] / 1e6 if index == 0 else size[index] / 1e9
                ours, verdict = f"{value:.2f}", rounds_alike(value, float(published.value))
            rows.append(ClaimRow(f"{title} {what}", published.cell(), ours, setting, SIZE_RULE, verdict,
                                 (published,)))
    return rows


def exact_family(frame: pd.DataFrame) -> pd.DataFrame:
    """The ok forward attention cases at square shapes H = m³ whose BRA row has S = m² (S³ = H²): the exact
    S ∝ N^{1/3} family; every mechanism's rows at those shapes."""
    if frame.empty:
        return pd.DataFrame(columns=[*FAMILY_COLUMNS])
    ok = frame[(frame["kind"] == "attention") & (frame["status"] == "ok") & (frame["mode"] == "forward")
               & (frame["height"] == frame["width"])]
    bra = ok[ok["mechanism"] == "bra"]
    shapes = {row["shape"] for _, row in bra.iterrows()
              if json.loads(row["options"]).get("n_win", 0) ** 3 == row["height"] ** 2}
    return ok[ok["shape"].isin(shapes)]


def _fit(rows: pd.DataFrame, column: str) -> SlopeFit | None:
    values = pd.to_numeric(rows[column], errors="coerce")
    points = rows.assign(value=values)[values > 0].sort_values("tokens").drop_duplicates("tokens")
    if len(points) < 2:
        return None
    return fit_loglog_slope(points["tokens"].astype(float), points["value"].astype(float))


def _describe(fit: SlopeFit | None) -> str:
    return fit.describe() if fit is not None else "—"


def complexity_rows(frame: pd.DataFrame, parts_by_id: dict[str, dict[str, int]]) -> list[ClaimRow]:
    """BRA's routing + attention MACs and full attention's attention MACs against N on the exact family."""
    family = with_core_macs(exact_family(frame), parts_by_id)
    exponent = figure("claims", "bra_complexity", "exponent")
    full_exponent = figure("claims", "bra_complexity", "full_attention_exponent")
    rows = []
    for mechanism, published, bounds, what in (
            ("bra", exponent, BRA_SLOPE, "BRA's routing + attention MACs"),
            ("full", full_exponent, FULL_SLOPE, "full attention's attention MACs (scores + values)")):
        rows_of = family[family["mechanism"] == mechanism]
        macs_fit = _fit(rows_of, "core_gmacs_per_image")
        ours = (f"MACs slope {_describe(macs_fit)}; latency slope {_describe(_fit(rows_of, 'median_ms'))}; "
                f"peak-memory slope {_describe(_fit(rows_of, 'peak_mib'))}")
        if len(rows_of):
            n_min, n_max = int(rows_of["tokens"].min()), int(rows_of["tokens"].max())
            first = rows_of.iloc[0]
            setting = (f"{first['device']}, {first['dtype']}, batch {first['batch']}, forward; H = m³, S = m² "
                       f"(N {n_min:,}–{n_max:,}), C={first['dim']}, heads={first['heads']}")
        else:
            setting = "no case of the exact family in this run"
        claim = ("BRA costs O((HW)^{4/3}) with S ∝ (HW)^{1/3}" if mechanism == "bra"
                 else "full attention costs O((HW)²)")
        rows.append(ClaimRow(claim, published.cell(), ours, setting,
                             SLOPE_RULE.format(what=what, low=bounds[0], high=bounds[1]),
                             slope_verdict(macs_fit, bounds), (published,)))
    return rows


def newest_run(results_dir: Path, suite: str) -> Path | None:
    """The run directory of ``suite`` under ``results_dir`` created last (by its run.json), or None."""
    runs = [path.parent for path in (results_dir / suite).glob("*/run.json")]
    if not runs:
        return None
    return max(runs, key=lambda run: json.loads((run / "run.json").read_text()).get("created", ""))


def speed_row(quadtree_run: Path | None) -> ClaimRow:
    """BRA against QuadTree: the quadtree run's ratios (per BRA row and mode, the range over stages), never scored."""
    low, high = figure("claims", "bra_vs_quadtree_speedup", "low"), figure("claims", "bra_vs_quadtree_speedup", "high")
    paper = f"{low.value:g}–{high.value:g}×{low.mark or high.mark}"
    ours, setting, device = "not measured in this run", "suites/quadtree.yaml measures it", None
    if quadtree_run is not None:
        frame = records_frame(RecordStore(quadtree_run / "records.jsonl").latest())
        table = quadtree_claim_table(frame) if len(frame) else pd.DataFrame()
        if len(table):
            parts = []
            for (group, bra), rows in table.groupby(["group", "bra"], sort=False):
                ratios = [float(text.split("×")[0]) for text in rows["ours: quadtree ms / bra ms"]]
                parts.append(f"{bra}, {group}: {min(ratios):.2f}–{max(ratios):.2f}× over {len(ratios)} shapes")
            device = frame["device"].iloc[0]
            ours = "; ".join(parts)
            setting = f"{quadtree_run} ({table['setting'].iloc[0]})"
    return ClaimRow("BRA is 3–6× faster than QuadTree attention", paper, ours, setting, SPEED_RULE,
                    speed_verdict(device), (low, high))


def accuracy_rows() -> list[ClaimRow]:
    """The accuracy claims: released checkpoints, the attention ablation's ranking and its figures."""
    checkpoints = [figure("models", name, "top1") for name in MODELS]
    rows = ["swin", "deformable", "bra"]
    top1 = [figure("attention_ablation", row, "top1") for row in rows]
    miou = [figure("attention_ablation", row, "miou") for row in rows]
    ablation_paper = (" / ".join(found.cell() for found in top1) + " top-1; "
                      + " / ".join(found.cell() for found in miou) + " mIoU (shifted window / deformable / BRA)")
    not_testable = f"{NOT_TESTABLE}: needs {ABLATION_NEEDS}"
    return [
        ClaimRow("ImageNet-1K top-1 of the released checkpoints (T / S / B / STL)",
                 " / ".join(found.cell() for found in checkpoints), "not measured", "—", CHECKPOINT_RULE,
                 f"{NOT_TESTABLE}: needs {CHECKPOINT_NEEDS}", tuple(checkpoints)),
        ClaimRow("attention ablation ranking: BRA > deformable > shifted window", ablation_paper, "not measured",
                 "— (suites/ablation.yaml's demo trains on generated data and does not rank them)", RANKING_RULE,
                 not_testable, (*top1, *miou)),
        ClaimRow("attention ablation accuracy on the STL backbone", ablation_paper, "not measured", "—",
                 ABLATION_RULE, not_testable, (*top1, *miou)),
    ]


def claim_rows(frame: pd.DataFrame, parts_by_id: dict[str, dict[str, int]], sizes: dict[str, tuple[int, int] | str],
               quadtree_run: Path | None) -> list[ClaimRow]:
    """Every claim's row, in the issue's order: sizes, complexity, speed, accuracy."""
    return [*size_rows(sizes), *complexity_rows(frame, parts_by_id), speed_row(quadtree_run), *accuracy_rows()]


def claims_table(rows: list[ClaimRow]) -> pd.DataFrame:
    return pd.DataFrame([{"claim": row.claim, "paper": row.paper, "ours": row.ours, "setting": row.setting,
                          "verdict rule (written before measuring)": row.rule, "verdict": row.verdict}
                         for row in rows])


class Claims(Section):
    """The claims table of a run of suites/claims.yaml."""

    kind = "attention"

    def applies(self, frame, run):
        return run.info.get("suite") == "claims"

    def render(self, frame, run):
        rows = claim_rows(self.rows(frame), analytic_parts(run.directory), model_sizes(),
                          newest_run(run.directory.parent.parent, "quadtree"))
        verdicts = pd.Series([row.verdict.split(":")[0] for row in rows]).value_counts()
        return ["## The paper's claims: verdicts", "",
                "One row per quantitative claim: the paper's figure (seed-only figures marked †), our measurement, "
                "the setting it was measured in, the rule that decides (written in attnbench/report/claims.py "
                "before anything was measured) and the verdict. Complexity comes from this run's cases on the "
                "exact S ∝ N^{1/3} family (H = m³, S = m²); params and GMACs from attnbench's model definitions "
                "on the meta device, counted when this report is rendered (they depend on the architecture "
                "only); the QuadTree speed ratio from the newest suites/quadtree.yaml run beside this one, "
                "indicative only; accuracy needs data and checkpoints this machine has not.", "",
                markdown(claims_table(rows), index=False), "",
                "Verdicts: " + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.items()) + ".", "",
                "Sources of the paper's figures in this table:", "",
                *provenance_lines(found for row in rows for found in row.figures), ""]
