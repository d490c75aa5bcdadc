"""The accuracy section over seeds: means with t intervals, chance, gates, hypotheses, pairwise verdicts, plots."""

import json
import math

import pandas as pd
import pytest

from attnbench.report import accuracy


def sweep(far: dict[str, list[float]], overall: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for label in far:
        for seed, (far_value, top1) in enumerate(zip(far[label], overall[label], strict=True)):
            rows.append({"label": label, "seed": seed, "status": "ok", "task": "classification", "num_classes": 4,
                         "top1": top1, "bin_near": 60.0, "bin_far": far_value, "val_images": 2400,
                         "per_distance": json.dumps({"1": 60.0, "15": far_value}),
                         "counted_gflops_per_image": {"full": 0.2, "bra": 0.1, "swin": 0.08}.get(label, 0.1),
                         "shape": "colour_pointer"})
    return pd.DataFrame(rows)


FAR = {"full": [95.0, 96.0, 94.0, 95.5, 96.5], "bra": [70.0, 72.0, 69.0, 71.0, 73.0],
       "swin": [25.0, 26.0, 24.5, 25.5, 24.0]}
OVERALL = {"full": [90.0, 91.0, 89.0, 90.0, 92.0], "bra": [75.0, 76.0, 74.0, 75.0, 77.0],
           "swin": [45.0, 46.0, 44.0, 45.0, 46.0]}


def test_seed_table_pairs_gates_and_plots(tmp_path):
    frame = sweep(FAR, OVERALL)
    assert accuracy.chance(frame) == 25.0
    table = accuracy.seed_table(frame).set_index("mechanism")
    assert table.loc["full", "seeds"] == "5 of 5"
    assert table.loc["full", "far bin % [95% CI]"].startswith("95.4 [")
    pairs = accuracy.pairwise_table(frame).set_index("pair")
    assert pairs.loc["full − swin", "far bin difference"].endswith(": separated")
    gates = [{"label": "full", "metric": "far", "at_least": 90.0, "within_chance": None, "why": ""},
             {"label": "swin", "metric": "far", "at_least": None, "within_chance": 5.0, "why": ""},
             {"label": "bra", "metric": "far", "at_least": 90.0, "within_chance": None, "why": ""}]
    held = [ok for _, ok, _ in accuracy.gate_results(frame, gates)]
    assert held == [True, True, False]
    shard = frame[frame["label"] != "swin"]  # a shard without the local mechanism cannot check its gate
    assert [(ok, measured) for _, ok, measured in accuracy.gate_results(shard, gates)][1] == (None, "not in this run")
    assert accuracy.distance_plot(frame, "t", tmp_path / "d.png").exists()
    assert accuracy.cost_plot(frame, "t", tmp_path / "c.png").exists()


def hypothesis(higher: str, lower: str, metric: str = "far") -> dict:
    return {"higher": higher, "lower": lower, "metric": metric, "why": ""}


def test_declared_hypotheses_are_supported_contradicted_or_not_and_a_missing_side_is_not_checked():
    frame = sweep(FAR, OVERALL)
    declared = [hypothesis("bra", "swin"), hypothesis("swin", "full"), hypothesis("full", "bra", "near"),
                hypothesis("bra", "quadtree")]
    verdicts = [(verdict, measured.split(" [")[0]) for _, verdict, measured in
                accuracy.hypothesis_results(frame, declared)]
    assert verdicts == [(accuracy.SUPPORTED, "difference +46.0"), (accuracy.CONTRADICTED, "difference -70.4"),
                        (accuracy.NOT_SUPPORTED, "difference +0.0"),  # every near bin is 60.0: no difference
                        (None, "not in this run")]


def test_a_declared_hypothesis_keeps_the_power_that_all_pairs_spend():
    """The proxy run's far bins (results/ablation/proxy-cpu): bra − swin has a Welch p near 0.006, which
    survives Holm over one declared hypothesis but not over the 28 pairs of eight mechanisms."""
    far = {"bra": [77.375, 68.125, 55.75, 29.375, 54.75], "swin": [25.25, 26.625, 25.25, 26.25, 24.0]}
    for index, offset in enumerate(range(6)):  # six more mechanisms, well apart from each other
        far[f"m{index}"] = [30.0 + 12 * offset + spread for spread in (-0.5, 0.0, 0.5, 0.2, -0.2)]
    frame = sweep(far, far)
    pairs = accuracy.pairwise_table(frame).set_index("pair")
    assert pairs.loc["bra − swin", "far bin difference"].endswith(": not separated")
    [(_, verdict, measured)] = accuracy.hypothesis_results(frame, [hypothesis("bra", "swin")])
    assert verdict == accuracy.SUPPORTED, measured


def test_overlapping_seeds_are_not_separated_and_one_seed_gets_wilson():
    frame = sweep({"full": [50.0, 60.0, 55.0], "bra": [52.0, 58.0, 54.0]},
                  {"full": [50.0, 60.0, 55.0], "bra": [52.0, 58.0, 54.0]})
    pairs = accuracy.pairwise_table(frame)
    assert pairs["overall difference"].iloc[0].endswith(": not separated")
    saturated = sweep({"full": [100.0, 100.0]}, {"full": [100.0, 100.0]})
    assert accuracy.seed_table(saturated)["far bin % [95% CI]"].iloc[0] == \
        "100.0 (all seeds equal)"
    single = sweep({"full": [50.0]}, {"full": [50.0]})
    assert accuracy.seed_table(single)["top1 % mean [95% CI]"].iloc[0] == \
        "50.0 [48.0, 52.0] (1 seed; Wilson over 2400 images)"


def test_bins_read_nearest_first_and_pairs_compare_the_farthest_whatever_the_column_order():
    frame = sweep(FAR, OVERALL)
    frame["bin_mid"] = 50.0
    frame = frame[sorted(frame.columns)]  # records store bins by name: far, mid, near
    assert [c for c in accuracy.seed_table(frame).columns if "bin" in c] == [
        "near bin % [95% CI]", "mid bin % [95% CI]", "far bin % [95% CI]"]
    pairs = accuracy.pairwise_table(frame).set_index("pair")
    assert list(pairs.columns) == ["overall difference", "far bin difference"]
    assert pairs.loc["full − swin", "far bin difference"].startswith("+70.")


def test_the_ablation_table_gives_the_mean_over_seeds_and_counts_failed_seeds():
    from attnbench.report.tables import ablation_table, training_table

    frame = sweep(FAR, OVERALL).assign(dataset="colour_pointer", height=32, params=1e5, images_per_s=None,
                                       paper=None, mechanism="attnbench_isotropic_proxy", options="{}",
                                       train_images=6000, epochs=8, train_minutes=1.0, top5=None)
    frame.loc[(frame["label"] == "bra") & (frame["seed"] == 4), "status"] = "timeout"
    table = ablation_table(frame).set_index("mechanism")
    column = "colour_pointer (proxy task, not ImageNet) top-1 %"
    assert table.loc["full", column] == "90.4 (mean of 5 seeds)"
    assert table.loc["bra", column] == "75.0 (mean of 4 of 5 seeds)"  # the timed-out seed is not averaged in
    assert table.loc["swin", "GMACs @32²"] == "0.040"
    assert "images/s" not in table.columns  # the suite did not time the trained models: no empty column
    timed = ablation_table(frame.assign(images_per_s=123.0)).set_index("mechanism")
    assert timed.loc["bra", "images/s"] == "123.0"
    one_seed = ablation_table(frame[frame["seed"] == 0]).set_index("mechanism")
    assert one_seed.loc["full", column] == "90.0"
    assert list(training_table(frame)["seed"][:5]) == [0, 1, 2, 3, 4]
    frame["resumed_after_epochs"] = None
    frame.loc[0, "resumed_after_epochs"] = "3"
    minutes = training_table(frame)["train min"]
    assert minutes[0] == "1.0 (resumed after epoch 3: the minutes since)" and minutes[1] == "1.0"


def test_the_separation_summary_names_the_higher_mechanism_and_the_unranked_pairs():
    far = {"full": [95.0, 96.0, 94.0], "bra": [70.0, 72.0, 69.0], "swin": [25.0, 26.0, 24.5]}
    overall = {"full": [60.0, 61.0, 59.0], "bra": [60.5, 59.5, 60.0], "swin": [45.0, 46.0, 44.0]}
    lines = accuracy.separation_summary(sweep(far, overall))
    assert lines == ["- overall: separated full > swin, bra > swin; not separated full ~ bra.",
                     "- far bin: separated full > bra, full > swin, bra > swin; not separated none."]


def test_each_mechanism_keeps_one_colour_of_its_own_in_the_figures():
    labels = [f"mechanism{index}" for index in range(12)]  # more than the ten colours of the default cycle
    colours = accuracy._colours(pd.DataFrame({"label": labels * 2}))
    assert list(colours) == labels and len(set(colours.values())) == 12


def test_the_seed_table_counts_the_seeds_that_learned_their_training_set():
    frame = sweep(FAR, OVERALL)
    frame["train_loss"] = 0.2
    frame.loc[(frame["label"] == "swin") & (frame["seed"] < 3), "train_loss"] = 1.37  # ln 4 = 1.386: guessing
    table = accuracy.seed_table(frame).set_index("mechanism")
    assert table.loc["swin", "learned the training set"] == "2 of 5"
    assert table.loc["full", "learned the training set"] == "5 of 5"
    assert accuracy.chance_loss(frame) == pytest.approx(math.log(4))
    assert "learned the training set" not in accuracy.seed_table(sweep(FAR, OVERALL)).columns  # no losses recorded


def test_the_report_judges_hypotheses_only_where_the_gates_hold(tmp_path):
    from attnbench.report.sections import Run, SeedStatistics

    frame = sweep(FAR, OVERALL).assign(kind="accuracy")
    gates = [{"label": "full", "metric": "far", "at_least": 90.0, "within_chance": None, "why": ""}]
    info = {"gates": gates, "hypotheses": [hypothesis("bra", "swin") | {"why": "routing reaches far"}]}
    text = "\n".join(SeedStatistics().render(frame, Run(tmp_path, info)))
    assert "- SUPPORTED: bra > swin (far): difference +46.0 [" in text and text.count("Holm over these 1 alone") == 1
    assert "— routing reaches far" in text and "a family of its own, apart from the hypotheses above" in text
    failing = {**info, "gates": [{**gates[0], "at_least": 99.0}]}
    text = "\n".join(SeedStatistics().render(frame, Run(tmp_path, failing)))
    assert "- NOT JUDGED: bra > swin (far)" in text and "not judged: the gates above do not all hold" in text
