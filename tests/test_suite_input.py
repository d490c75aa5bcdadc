"""Hostile and careless suite files: each is refused with one line naming the file and the field, fast, before
anything is written (issue: nothing lost, nothing mixed)."""

import re
import time

import pytest

from attnbench.cli import main

BASE = """name: t
grid:
  mechanism: [{name: full}, {name: bra, options: {n_win: 2, topk: 1}}]
  shape: [{name: a, height: 8, width: 8, dim: 32, heads: 2}]
  batch: [1]
"""

CASES = {
    "duplicate_key": (BASE + "grid:\n  batch: [2]\n", r"invalid YAML at line 6, column 1: key 'grid' is given twice"),
    "bool_batch": (BASE.replace("batch: [1]", "batch: [true]"), r"grid\.batch\[0\]: Input should be a valid integer"),
    "string_batch": (BASE.replace("batch: [1]", "batch: ['8']"), r"grid\.batch\[0\]: Input should be a valid integer"),
    "empty_mechanisms": (BASE.replace("mechanism: [{name: full}, {name: bra, options: {n_win: 2, topk: 1}}]",
                                      "mechanism: []"), r"grid\.mechanism: an axis needs at least one value"),
    "empty_batch": (BASE.replace("batch: [1]", "batch: []"), r"grid\.batch: an axis needs at least one value"),
    "min_above_max": (BASE + "repeats: {min_samples: 20, max_samples: 10}\n",
                      r"repeats: min_samples=20 is above max_samples=10"),
    "infinite_timeout": (BASE + "timeout_s: .inf\n", r"timeout_s: Input should be a finite number"),
    "option_type": (BASE.replace("n_win: 2,", "n_win: two,"),
                    r"grid\.mechanism\[1\]\.options\.n_win: bra's n_win is an integer, got 'two'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_careless_suites_are_refused_with_one_line(name, tmp_path, capsys):
    text, pattern = CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: ") and re.search(pattern, err), err
    assert not (tmp_path / "results").exists()


def test_an_alias_bomb_is_refused_quickly_with_a_short_line(tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nname: t\ngrid:\n  mechanism: [{name: full, label: *a8}]\n"
                    "  shape: [{name: a, height: 8, width: 8, dim: 32, heads: 2}]\n")
    started = time.time()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - started < 10 and len(err) < 400
    assert "expands to more than 100,000 values (nested YAML aliases?)" in err


def test_a_long_value_is_quoted_short(tmp_path, capsys):
    path = tmp_path / "long.yaml"
    path.write_text(BASE.replace("name: t", "name: t\ndescription: [" + ", ".join(["word"] * 5000) + "]"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err) < 800 and "more characters)" in err


def test_a_huge_grid_needs_allow_large_and_is_counted_before_it_is_built(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(BASE.replace("batch: [1]", "batch: [" + ", ".join(str(b) for b in range(1, 6001)) + "]"))
    started = time.time()
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "expands to 12,000 cases, more than 10,000" in capsys.readouterr().err
    assert time.time() - started < 10


def test_a_suite_path_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: t\ndescription: caf\xe9\n".encode("latin-1"))
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: not UTF-8 text (byte 24)"


def test_seeds_are_an_axis_and_each_seed_is_its_own_case(tmp_path):
    from attnbench.suite import expand, load_suite

    path = tmp_path / "seeds.yaml"
    path.write_text(BASE.replace("batch: [1]", "batch: [1]\n  seed: [0, 1, 2]"))
    cases = expand(load_suite(path))
    assert len(cases) == 6 and len({case.id for case in cases}) == 6
    assert sorted({case.seed for case in cases}) == [0, 1, 2]
