"""Published figures: every one carries its source and status, the seed-only ones are known, the corrected
figures are the READMEs', and the plain view still gives what the report code reads."""

import pytest
import yaml

from attnbench import paper
from attnbench.paper import SEED_ONLY_MARK, figure, figures, paper_figures, seed_only_figures, sources


def test_every_figure_has_a_known_source_a_status_and_a_location():
    assert len(figures()) > 40
    for path, found in figures().items():
        for entry in (found, *found.also):
            assert entry.source_key in sources(), path
            assert entry.status in ("confirmed", "seed-only", "not-found"), path
            assert entry.source, path
            if entry.status == "not-found":
                assert entry.value is None and entry.searched, path
            else:
                assert entry.value is not None and entry.where, path


def test_confirmed_figures_cite_a_file_at_a_commit():
    for path, found in figures().items():
        if found.confirmed:
            source = sources()[found.source_key]
            assert source.repo and source.path and len(source.commit) == 40, path
            assert source.commit[:7] in found.source, path


def test_the_seed_only_figures_are_exactly_these():
    assert sorted(".".join(path) for path in seed_only_figures()) == sorted([
        "attention_ablation.swin.top1", "attention_ablation.swin.miou", "attention_ablation.deformable.miou",
        "attention_ablation.bra.miou",
        "architecture_ablation.deeper_layout", "architecture_ablation.conv_position_encoding",
        "claims.bra_vs_quadtree_speedup.low", "claims.bra_vs_quadtree_speedup.high",
        "claims.bra_complexity.exponent", "claims.bra_complexity.full_attention_exponent",
        "claims.pretrained_vit_miou_gain.gain", "bra_cost_formula",
    ])
    assert all(found.cell().endswith(SEED_ONLY_MARK) for found in seed_only_figures().values())


def test_readme_figures_correct_the_seed_and_keep_its_figure_beside_them():
    cswin_gmacs, cswin_top1 = figure("models", "cswin_tiny", "gmacs"), figure("models", "cswin_tiny", "top1")
    assert (cswin_gmacs.value, cswin_gmacs.status, cswin_gmacs.source_key) == (4.3, "confirmed", "cswin_readme")
    assert (cswin_top1.value, cswin_top1.also[0].value, cswin_top1.also[0].status) == (82.8, 82.7, "seed-only")
    assert cswin_gmacs.also[0].value == 4.5
    swin_top1 = figure("models", "swin_tiny", "top1")
    assert (swin_top1.value, swin_top1.source_key, swin_top1.also[0].value) == (81.2, "swin_readme", 81.3)
    assert swin_top1.cell() == "81.2" and swin_top1.also[0].cell() == f"81.3{SEED_ONLY_MARK}"


def test_semantic_fpn_figures_are_the_segmentation_readme_s():
    small, base = figure("ade20k_sfpn_miou", "biformer_small"), figure("ade20k_sfpn_miou", "biformer_base")
    assert (small.value, base.value) == (48.9, 49.9)
    assert small.confirmed and "semantic_segmentation/README.md" in small.source


def test_ablation_rows_without_a_sourced_figure_say_where_we_looked():
    for row, mechanism in [("sliding_window", "neighborhood"), ("spatial_reduction", "spatial_reduction"),
                           ("axial_stripe", "axial"), ("cross_shaped_window", "cswin")]:
        top1 = figure("attention_ablation", row, "top1")
        assert top1.value is None and top1.status == "not-found" and "corpora" in top1.searched
        assert top1.cell() == ""
        assert paper_figures()["attention_ablation"][row] == {"row": row.replace("_", " ").replace(
            "cross shaped", "cross-shaped"), "mechanism": mechanism}


def test_plain_view_keeps_the_values_the_reports_read():
    plain = paper_figures()
    assert plain["models"]["biformer_tiny"] == {"params_m": 13.1, "gmacs": 2.2, "top1": 81.4}
    assert plain["models"]["biformer_stl"]["gmacs"] == 4.6
    assert plain["attention_ablation"]["swin"]["top1"] == 81.3 and plain["attention_ablation"]["swin"]["miou"] == 41.5
    assert plain["attention_ablation"]["bra"]["row"] == "BRA"
    assert plain["ade20k_upernet_miou"] == {"cswin_tiny": 49.3, "biformer_small": 49.8, "biformer_base": 51.0}
    assert plain["architecture_ablation"] == {"stl_bra": 82.7, "deeper_layout": 83.5, "conv_position_encoding": 83.8}
    claim = plain["claims"]["bra_vs_quadtree_speedup"]
    assert (claim["low"], claim["high"]) == (3.0, 6.0) and "quadtree" in claim["text"]
    assert plain["bra_cost_formula"] == "3HWC² + 2(S²)²C + 2·HW·k·(HW/S²)·C"
    assert isinstance(plain["source"], str)


def test_unknown_figures_are_a_key_error():
    with pytest.raises(KeyError, match="models.biformer_huge.top1"):
        figure("models", "biformer_huge", "top1")


@pytest.mark.parametrize("broken,message", [
    ({"value": 1.0, "source": "nowhere", "status": "confirmed"}, "source 'nowhere'"),
    ({"value": 1.0, "source": "seed", "status": "rumoured"}, "status 'rumoured'"),
    ({"value": None, "source": "seed", "status": "seed-only"}, "only not-found"),
    ({"value": None, "source": "seed", "status": "not-found"}, "where we looked"),
    ({"value": 1.0, "source": "seed", "status": "seed-only", "sauce": 1}, "unknown key"),
])
def test_a_figure_without_provenance_is_refused(broken, message):
    document = yaml.safe_load(paper.PAPER_FIGURES.read_text())
    document["models"]["biformer_tiny"]["top1"] = broken
    with pytest.raises(ValueError, match=message):
        paper._check(document)
