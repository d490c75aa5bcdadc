"""Suite files: expansion into cases and one-line errors for every malformed file."""

import json
import re
import textwrap

import pytest

from attnbench.cli import main
from attnbench.suite import SuiteError, expand, load_suite, shard


def write(tmp_path, text, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BASE = """
name: t
device: cpu
grid:
  mechanism:
    - {name: full}
    - {name: bra, options: {n_win: 2, topk: 1}, options_by_shape: {b: {topk: 3}}}
  shape:
    - {name: a, height: 8, width: 8, dim: 32, heads: 2}
    - {name: b, height: 4, width: 6, dim: 32, heads: 4}
  mode: [forward, forward_backward]
profiles:
  quick: {grid: {mode: [forward]}, repeats: {max_time_s: 0.5}}
"""


def test_grid_is_a_cartesian_product_with_defaults(tmp_path):
    cases = expand(load_suite(write(tmp_path, BASE)))
    assert len(cases) == 2 * 2 * 2
    assert {(c.batch, c.dtype, c.device) for c in cases} == {(1, "float32", "cpu")}
    bra = [c for c in cases if c.mechanism == "bra"]
    assert {c.shape: c.options["topk"] for c in bra} == {"a": 1, "b": 3}
    assert len({c.id for c in cases}) == len(cases)


def test_zip_ties_axes(tmp_path):
    text = BASE.replace("  mode: [forward, forward_backward]", "") + textwrap.dedent("""
    zip:
      - {batch: [1, 4], mode: [forward, forward_backward]}
    """)
    cases = expand(load_suite(write(tmp_path, text)))
    assert len(cases) == 2 * 2 * 2
    assert {(c.batch, c.mode) for c in cases} == {(1, "forward"), (4, "forward_backward")}


def test_profile_merges_over_the_base(tmp_path):
    suite = load_suite(write(tmp_path, BASE), profile="quick")
    assert suite.grid.mode == ["forward"] and suite.repeats.max_time_s == 0.5
    assert suite.repeats.min_samples == 10  # untouched fields keep the base's values
    assert len(expand(suite)) == 4


def test_case_ids_are_stable_and_follow_the_measurement(tmp_path):
    first = [c.id for c in expand(load_suite(write(tmp_path, BASE)))]
    assert first == [c.id for c in expand(load_suite(write(tmp_path, BASE)))]
    relabelled = BASE.replace("- {name: full}", "- {name: full, label: global}")
    assert first == [c.id for c in expand(load_suite(write(tmp_path, relabelled)))]
    changed = BASE.replace("topk: 1}", "topk: 2}")
    assert first != [c.id for c in expand(load_suite(write(tmp_path, changed)))]


def test_presets_fill_in_sizes(tmp_path):
    text = BASE.replace("    - {name: a, height: 8, width: 8, dim: 32, heads: 2}\n", "    - biformer_t.stage3\n")
    text = text.replace("options_by_shape: {b: {topk: 3}}", "options_by_shape: {}")
    shapes = {(c.shape, c.height, c.dim, c.heads) for c in expand(load_suite(write(tmp_path, text)))}
    assert ("biformer_t.stage3", 14, 256, 8) in shapes


def test_dry_run_lists_the_cases(tmp_path, capsys):
    assert main(["run", "--dry-run", str(write(tmp_path, BASE))]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("8 cases of suite 't' (") and "profile (none)" in last and out.count(" bra @ ") == 4
    assert last.endswith("no earlier run of these cases to estimate the time from")


MALFORMED = {
    "yaml_syntax": ("name: t\ngrid: [unclosed\n", r"invalid YAML at line \d+"),
    "not_a_mapping": ("- a\n- b\n", r"\(top level\): a suite is a mapping"),
    "missing_name": (BASE.replace("name: t\n", ""), r"name: required field is missing"),
    "missing_grid": ("name: t\n", r"grid: required field is missing"),
    "unknown_top_key": (BASE + "grd: {}\n", r"grd: unknown key 'grd'; allowed: description, notes, imports, device"),
    "unknown_spec_key": (BASE.replace("{name: full}", "{name: full, option: {}}"),
                         r"grid\.mechanism\[0\]\.option: unknown key 'option'; allowed: name, label, options"),
    "batch_type": (BASE.replace("  mode: [forward, forward_backward]", "  batch: [two]"),
                   r"grid\.batch\[0\]: Input should be a valid integer"),
    "batch_zero": (BASE.replace("  mode: [forward, forward_backward]", "  batch: [0]"), r"grid\.batch: .*>= 1"),
    "dtype": (BASE.replace("  mode: [forward, forward_backward]", "  dtype: [float8]"), r"grid\.dtype\[0\]: .*float32"),
    "mode": (BASE.replace("forward_backward]", "backward]"), r"grid\.mode\[1\]: .*forward"),
    "device": (BASE.replace("device: cpu", "device: tpu"), r"device: .*'auto', 'cpu' or 'cuda'"),
    "measure": (BASE + "measures: [speed]\n", r"measures: unknown measure\(s\) speed; measures: accuracy, flops, latency, params"),
    "timeout": (BASE + "timeout_s: -1\n", r"timeout_s: .*greater than 0"),
    "repeats_key": (BASE + "repeats: {samples: 3}\n", r"repeats\.samples: unknown key 'samples'; allowed: warmup_iters"),
    "unknown_mechanism": (BASE.replace("{name: full}", "{name: fulll}"),
                          r"grid\.mechanism\[0\]\.name: unknown attention 'fulll'; registered: axial, bra"),
    "unknown_option": (BASE.replace("{n_win: 2, topk: 1}", "{n_wins: 2, topk: 1}"),
                       r"grid\.mechanism\[1\]\.options: unknown option\(s\) n_wins for attention 'bra'; valid options"),
    "unknown_preset": (BASE.replace("    - {name: a, height: 8, width: 8, dim: 32, heads: 2}", "    - stage9"),
                       r"grid\.shape\[0\]: unknown preset 'stage9'; presets: biformer_t\.stage1"),
    "dim_heads": (BASE.replace("dim: 32, heads: 2}", "dim: 32, heads: 3}"), r"grid\.shape\[0\]: dim=32 must be divisible"),
    "shape_incomplete": (BASE.replace("height: 8, width: 8,", "height: 8,"), r"grid\.shape\[0\]: needs a preset or all"),
    "zip_lengths": (BASE + "zip:\n  - {batch: [1, 2], dtype: [float32]}\n", r"zip\[0\]: tied axes need equal lengths"),
    "axis_twice": (BASE + "zip:\n  - {mode: [forward]}\n", r"zip\[0\]\.mode: axis 'mode' is already given at grid\.mode"),
    "unknown_shape_name": (BASE.replace("{b: {topk: 3}}", "{c: {topk: 3}}"),
                           r"grid\.mechanism\[1\]\.options_by_shape: no shape named 'c'; shapes: a, b"),
    "impossible_shape": (BASE.replace("{n_win: 2, topk: 1}", "{n_win: 3, topk: 1}"),
                         r"grid\.mechanism\[1\]: at shape a \(8x8, dim 32, heads 2\): bra: H=8 and W=8 must be multiples"),
    "bad_option_value": (BASE.replace("{n_win: 2, topk: 1}", "{n_win: 2, topk: 9}"),
                         r"grid\.mechanism\[1\]: at shape a .*topk must be in \[1, n_win\*\*2 = 4\]"),
    "duplicate_cases": (BASE.replace("- {name: full}", "- {name: full}\n    - {name: full, label: again}"),
                        r"grid: cases 'full @ a' and 'again @ a' measure the same thing"),
    "missing_import": (BASE + "imports: [no_such_module_xyz]\n", r"imports\[0\]: cannot import 'no_such_module_xyz'"),
    "unknown_baseline": (BASE + "baseline: ful\n", r"baseline: no row labelled 'ful'; labels: full, bra"),
    "unknown_hypothesis_row": (BASE + "hypotheses: [{higher: bra, lower: swin, metric: far}]\n",
                               r"hypotheses\[0\]\.lower: no row labelled 'swin'; labels: full, bra"),
    "hypothesis_one_row": (BASE + "hypotheses: [{higher: bra, lower: bra}]\n",
                           r"hypotheses\[0\]: .*a hypothesis compares two rows, got 'bra' twice"),
    "unknown_impl": (BASE.replace("{n_win: 2, topk: 1}", "{n_win: 2, topk: 1, impl: turbo}"),
                     r"grid\.mechanism\[1\]: at shape a .*impl must be one of auto, reference"),
}


MODELS = """
name: m
grid:
  model: [{name: biformer_tiny, paper: biformer_tiny}]
  image_size: [224]
"""
MALFORMED.update({
    "unknown_model": (MODELS.replace("name: biformer_tiny,", "name: biformer_tinyy,"),
                      r"grid\.model\[0\]\.name: unknown model 'biformer_tinyy'"),
    "unknown_paper_row": (MODELS.replace("paper: biformer_tiny", "paper: biformer_huge"),
                          r"grid\.model\[0\]\.paper: no paper row 'biformer_huge'; rows: biformer_tiny"),
    "bad_model_option": (MODELS.replace("name: biformer_tiny, paper: biformer_tiny",
                                        "name: biformer_stl, options: {attention: nope}"),
                         r"grid\.model\[0\]\.options: attention='nope': named configurations are bra, full"),
    "models_and_mechanisms": (MODELS + "  mechanism: [{name: full}]\n",
                              r"grid\.mechanism: a suite measures mechanisms at shapes, models at image sizes, or models trained"),
    "models_without_size": (MODELS.replace("  image_size: [224]\n", ""), r"grid\.image_size: required axis is missing"),
})


def test_model_suites_expand_to_model_cases(tmp_path):
    (case,) = expand(load_suite(write(tmp_path, MODELS)))
    assert (case.kind, case.model, case.image_size, case.in_chans, case.paper) == ("model", "biformer_tiny", 224, 3,
                                                                                  "biformer_tiny")


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_suite_exits_2_with_one_line_naming_the_field(name, tmp_path, capsys):
    text, pattern = MALFORMED[name]
    path = write(tmp_path, text, name=f"{name}.yaml")
    results = tmp_path / "results"
    assert main(["run", str(path), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: ")
    assert re.search(pattern, err), err
    assert not results.exists()  # nothing written


def test_unknown_profile_and_missing_file(tmp_path, capsys):
    path = write(tmp_path, BASE)
    assert main(["run", str(path), "--profile", "nope"]) == 2
    assert "profiles: no profile 'nope'; profiles: quick" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such suite file" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["suites/smoke.yaml", "suites/speed.yaml", "suites/scaling.yaml", "suites/models.yaml",
                                   "suites/bra_impl.yaml", "suites/ablation_proxy.yaml", "suites/claims.yaml",
                                   "suites/quadtree.yaml"])
def test_shipped_suites_are_valid(suite):
    for profile in [None, *load_suite(suite).profiles]:
        assert expand(load_suite(suite, profile))


def test_a_suites_notes_go_to_run_json_for_every_report(tmp_path):
    path = tmp_path / "noted.yaml"
    path.write_text("name: noted\nnotes: [The architecture ablation does not apply here.]\n"
                    "grid: {mechanism: [{name: full}], shape: [{name: s, height: 8, width: 8, dim: 16, heads: 2}]}\n")
    assert load_suite(path).run_info()["notes"] == ["The architecture ablation does not apply here."]
    assert "notes" not in load_suite("suites/smoke.yaml").run_info()


def test_run_json_names_the_suite_file_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A suite given by name resolves to the checkout's absolute path; the record must not carry this machine's
    directories, only the path as seen from where the run started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suites").mkdir()
    write(tmp_path / "suites", "name: rel\ndevice: cpu\nmeasures: [params]\n"
          "grid: {mechanism: [{name: full}], shape: [{name: s, height: 4, width: 4, dim: 16, heads: 2}]}\n")
    assert main(["run", str(tmp_path / "suites" / "suite.yaml"), "--results-dir", "results", "--run", "r"]) == 0
    run = json.loads((tmp_path / "results" / "rel" / "r" / "run.json").read_text())
    assert run["suite_file"] == "suites/suite.yaml"


def test_a_part_of_the_suite_may_leave_out_the_rows_its_gates_and_hypotheses_name(tmp_path):
    """--only (or a shard) runs a part of the suite; the gates and hypotheses of the whole suite still apply to the
    merged run, and a part's report says which it could not check."""
    rules = ("gates: [{label: full, metric: far, at_least: 1.0}]\n"
             "hypotheses: [{higher: full, lower: bra, metric: top1}]\n")
    path = write(tmp_path, ACCURACY + rules)
    part = load_suite(path, only={"label": ["bra"]}, require_data=False)
    assert {case.label for case in expand(part)} == {"bra"}
    assert part.run_info()["gates"][0]["label"] == "full" and part.run_info()["hypotheses"][0]["higher"] == "full"
    with pytest.raises(Exception, match=r"gates\[0\]\.label: no row labelled 'ful'"):
        load_suite(write(tmp_path, ACCURACY + rules.replace("label: full", "label: ful")), only={"label": ["bra"]},
                   require_data=False)


ACCURACY = """
name: acc
device: cpu
measures: [accuracy]
grid:
  model:
    - {name: attnbench_isotropic_proxy, label: full, options: {attention: full}}
    - {name: attnbench_isotropic_proxy, label: bra, options: {attention: bra}}
  task:
    - {name: pointer, task: classification, image_size: 32, data: {dataset: colour_pointer, root: absent}}
"""


@pytest.mark.parametrize(("rules", "message"), [
    ("gates: [{label: full, metric: farr, at_least: 90.0}]\n",
     r"gates\[0\]\.metric: 'farr' is not scored by every task of this suite .*; metrics: top1, near, mid, far"),
    ("hypotheses: [{higher: bra, lower: full, metric: miou}]\n",
     r"hypotheses\[0\]\.metric: 'miou' is not scored by every task of this suite .*; metrics: top1, near, mid, far"),
])
def test_a_rule_on_a_metric_no_task_scores_is_refused_before_any_training(tmp_path, rules, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(write(tmp_path, ACCURACY + rules), require_data=False)
    far_gate = "gates: [{label: full, metric: far, at_least: 90.0}]\n"
    imagenet = ACCURACY.replace("dataset: colour_pointer", "dataset: imagenet")
    with pytest.raises(SuiteError, match=r"gates\[0\]\.metric: 'far' is not scored .*; metrics: top1$"):
        load_suite(write(tmp_path, imagenet + far_gate), require_data=False)
    both = ACCURACY + "    - {name: in, task: classification, image_size: 32, data: {dataset: imagenet, root: absent}}\n"
    assert load_suite(write(tmp_path, both + far_gate.replace("far", "top1")), require_data=False).gates
    with pytest.raises(SuiteError, match=r"'far' is not scored by every task of this suite .*; metrics: top1$"):
        load_suite(write(tmp_path, both + far_gate), require_data=False)  # the ImageNet table would fail it
    with pytest.raises(SuiteError, match=r"gates: gates and hypotheses judge accuracy, and this suite trains nothing"):
        load_suite(write(tmp_path, BASE + "gates: [{label: full, metric: top1, at_least: 1.0}]\n"))


def test_a_within_chance_gate_needs_a_task_with_a_chance_level(tmp_path):
    segmentation = """
name: seg
device: cpu
measures: [accuracy]
grid:
  model: [{name: biformer_stl, label: bra}]
  task:
    - {name: ade, task: segmentation, image_size: 64, data: {dataset: ade20k, root: absent}}
"""
    assert load_suite(write(tmp_path, segmentation + "gates: [{label: bra, metric: miou, at_least: 1.0}]\n"),
                      require_data=False).gates
    with pytest.raises(SuiteError, match=r"gates\[0\]\.within_chance: a segmentation task has no chance level"):
        load_suite(write(tmp_path, segmentation + "gates: [{label: bra, metric: miou, within_chance: 5.0}]\n"),
                   require_data=False)


def test_parts_run_with_different_only_values_record_the_same_whole_suite(tmp_path):
    """``merge`` joins parts whose ``suite_cases`` agree and lists the cases no part ran: a part chosen by --only
    (and sharded further) records every case of the suite, not only its own."""
    path = write(tmp_path, BASE)
    whole = [case.id for case in expand(load_suite(path))]
    full, bra = load_suite(path, only={"mechanism": ["full"]}), load_suite(path, only={"mechanism": ["bra"]})
    shard(bra, 1, 2)
    assert full.run_info()["suite_cases"] == bra.run_info()["suite_cases"] == whole
    assert {case.id for case in expand(full)} | {case.id for case in expand(load_suite(path, only={
        "mechanism": ["bra"]}))} == set(whole)
    plain = load_suite(path)
    shard(plain, 0, 2)
    assert plain.run_info()["suite_cases"] == whole
