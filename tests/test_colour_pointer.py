"""The colour-pointer task: layout and sidecar, what the pixels hold, and one test per shortcut guard.

The guards are checked on the generated statistics (scenes and decoded pixels), not by training: a rule
that ignores the query, or that only sees part of the scene, must score chance on them.
"""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from attnbench import models  # noqa: F401  (registers the proxy model with timm)
from attnbench.data import GENERATORS, ImageNetSubset, write_colour_pointer, write_imagenet_like
from attnbench.data.colour_pointer import (
    CLASSES,
    COLOURS,
    GRID,
    MAX_DISTANCE,
    NOTCH_PIXELS,
    NOTCH_SHADE,
    WHITE,
    design,
    load_index,
    ring,
    sample_scene,
)
from attnbench.train.classification import ClassificationTask
from attnbench.train.distributed import World
from attnbench.train.engine import TrainSettings, train_and_evaluate
from attnbench.train.per_distance import accuracy_by_distance

SCENES = 6000  # 100 blocks of the (d, label) design
TOLERANCE = 0.02  # 3.6 binomial standard deviations of a 25% rate over 6000 scenes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_colour_pointer(tmp_path_factory.mktemp("cp") / "colour_pointer", train_images=120, val_images=60)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(7)
    return [sample_scene(rng, distance, label) for distance, label in design(SCENES)]


def chebyshev(a, b) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def decode(path) -> dict:
    """The objects in an image, read from its pixels alone: the checker cell and colour, and each notched
    cell with its colour and notch."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    query, notched = None, []
    for row in range(GRID):
        for column in range(GRID):
            cell = pixels[2 * row:2 * row + 2, 2 * column:2 * column + 2].reshape(4, 3)
            colours = {tuple(v) for v in cell}
            if all(tuple(v) in (tuple(cell[0]), WHITE) for v in cell) and tuple(cell[1]) == WHITE != tuple(cell[0]):
                assert query is None, f"{path}: two checkers"
                query = ((row, column), COLOURS.index(tuple(cell[0])))
            elif len(colours) == 2 and any(tuple(v) in COLOURS for v in cell):
                colour = next(tuple(v) for v in cell if tuple(v) in COLOURS)
                dark = [i for i, v in enumerate(cell) if tuple(v) != colour]
                assert len(dark) == 1 and tuple(cell[dark[0]]) == tuple(int(NOTCH_SHADE * c) for c in colour)
                notched.append(((row, column), COLOURS.index(colour), NOTCH_PIXELS.index(divmod(dark[0], 2))))
    return {"query": query, "notched": notched}


def test_generator_is_registered_and_writes_an_imagefolder_of_pngs(dataset):
    assert GENERATORS["colour_pointer"] is write_colour_pointer
    train = ImageNetSubset(dataset, "train")
    assert train.classes == list(CLASSES) and len(train) == 120
    assert all(path.suffix == ".png" for path, _ in train.samples)  # lossless: the 2×2 patterns survive
    image, _ = train[0]
    assert image.size == (32, 32)
    index = load_index(dataset)
    on_disk = {path.relative_to(dataset).as_posix() for split in ("train", "val") for path in
               (dataset / split).rglob("*.png")}
    assert set(index) == on_disk and len(on_disk) == 180
    assert write_colour_pointer(dataset, train_images=120, val_images=60) == dataset  # complete: reused


def test_design_balances_every_distance_and_label():
    counts = Counter(design(60 * 5))
    assert set(counts) == {(d, label) for d in range(1, MAX_DISTANCE + 1) for label in range(4)}
    assert set(counts.values()) == {5}


def test_pixels_hold_exactly_the_indexed_scene(dataset):
    index = load_index(dataset)
    for relative, scene in index.items():
        objects = decode(dataset / relative)
        assert objects["query"] == (tuple(scene["query"]), scene["colour"])
        expected = {(tuple(scene["partner"]), scene["colour"], scene["notch"])} | {
            (tuple(cell), colour, notch) for cell, colour, notch in
            zip(scene["distractors"], scene["distractor_colours"], scene["distractor_notches"], strict=True)}
        assert set(objects["notched"]) == expected and len(objects["notched"]) == 4
        assert relative.split("/")[1] == CLASSES[scene["notch"]]  # the class folder is the partner's notch


def test_guard_no_majority_vote_the_notches_are_always_a_permutation(dataset):
    # Counting notch values over the image (what mean pooling can do) gives the same answer for every image.
    for relative in load_index(dataset):
        assert sorted(notch for _, _, notch in decode(dataset / relative)["notched"]) == [0, 1, 2, 3]


def test_guard_no_elimination_every_notched_object_is_at_distance_d(dataset):
    # A model that reaches less than d tokens from the query sees no notched object at all, so it cannot
    # rule notches out by seeing distractors either.
    for relative, scene in load_index(dataset).items():
        objects = decode(dataset / relative)
        assert {chebyshev(cell, objects["query"][0]) for cell, _, _ in objects["notched"]} == {scene["d"]}


def test_guard_no_colour_prior_the_partner_is_the_only_object_in_the_query_colour(scenes):
    for scene in scenes:
        colours = [scene["colour"], *scene["distractor_colours"]]
        assert len(set(colours)) == 4  # the colour names one object, and only with the query's help
    c = Counter(scene["colour"] for scene in scenes)
    assert set(c) == set(range(len(COLOURS)))
    assert max(c.values()) / SCENES - 1 / len(COLOURS) < TOLERANCE
    for colour in range(len(COLOURS)):  # the label does not depend on the query colour
        labels = Counter(scene["notch"] for scene in scenes if scene["colour"] == colour)
        assert max(labels.values()) / sum(labels.values()) < 0.25 + 2 * TOLERANCE


def _query_blind_rules():
    """Rules that pick one notched object without looking at the query: by raster order (row first), by
    column first, by colour id, by distance to the image centre, by notch (a constant answer); each rank."""
    keys = {
        "raster": lambda obj: obj[0][0] * GRID + obj[0][1],
        "colour": lambda obj: obj[1],
        "centre": lambda obj: (abs(obj[0][0] - 7.5) + abs(obj[0][1] - 7.5), obj[0]),
        "notch": lambda obj: obj[2],
        "column": lambda obj: (obj[0][1], obj[0][0]),
    }
    return [(name, key, rank) for name, key in keys.items() for rank in range(4)]


@pytest.mark.parametrize("name,key,rank", _query_blind_rules(), ids=lambda v: str(v) if not callable(v) else "")
def test_guard_a_model_blind_to_the_query_scores_chance(scenes, name, key, rank):
    # Without the query every notched object is equally likely to be the partner: "answer the notch of the
    # object of rank r under any query-free order" is right 25% of the time.
    hits = 0
    for scene in scenes:
        objects = [(tuple(scene["partner"]), scene["colour"], scene["notch"])] + [
            (tuple(cell), colour, notch) for cell, colour, notch in
            zip(scene["distractors"], scene["distractor_colours"], scene["distractor_notches"], strict=True)]
        hits += sorted(objects, key=key)[rank][2] == scene["notch"]
    assert abs(hits / SCENES - 0.25) < TOLERANCE, f"{name} rank {rank}: {hits / SCENES:.3f}"


def test_guard_no_position_prior_the_label_is_independent_of_where_things_are(scenes):
    # The query's cell, the partner's direction from it and d say nothing about the label.
    for feature in (lambda s: (s["query"][0] // 8, s["query"][1] // 8),
                    lambda s: (np.sign(s["partner"][0] - s["query"][0]), np.sign(s["partner"][1] - s["query"][1])),
                    lambda s: s["d"]):
        groups: dict = {}
        for scene in scenes:
            groups.setdefault(feature(scene), Counter())[scene["notch"]] += 1
        for labels in groups.values():
            if sum(labels.values()) >= 200:
                assert max(labels.values()) / sum(labels.values()) < 0.25 + 3 * TOLERANCE


def test_every_distance_has_room_for_the_four_objects():
    rng = np.random.default_rng(0)
    for distance in range(1, MAX_DISTANCE + 1):
        scene = sample_scene(rng, distance, 0)
        cells = [scene["partner"], *scene["distractors"]]
        assert len({tuple(cell) for cell in cells}) == 4
        assert all(tuple(cell) in ring(tuple(scene["query"]), distance) for cell in cells)


def test_accuracy_by_distance_counts_per_d_and_per_bin():
    correct = [True, False, True, True, False, False, True]
    distances = [1, 1, 5, 6, 11, 15, 15]
    result = accuracy_by_distance(correct, distances)
    assert result["per_distance"] == {"1": 50.0, "5": 100.0, "6": 100.0, "11": 0.0, "15": 50.0}
    assert result["bins"] == {"near": pytest.approx(200 / 3), "mid": 100.0, "far": pytest.approx(100 / 3)}
    assert result["counts"] == {"per_distance": {"1": 2, "5": 1, "6": 1, "11": 1, "15": 2},
                                "bins": {"near": 3, "mid": 1, "far": 3}}
    assert "mid" not in accuracy_by_distance([True], [2])["bins"]  # an empty bin is left out, not 0
    with pytest.raises(ValueError):
        accuracy_by_distance([True], [16])


def test_evaluation_records_accuracy_against_distance_only_where_there_is_a_sidecar(dataset, tmp_path):
    recipe = {"auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "scale": [1.0, 1.0], "hflip": 0.0,
              "color_jitter": 0.0, "label_smoothing": 0.0, "drop_path_rate": 0.0, "crop_pct": 1.0}
    task = ClassificationTask("cp", "attnbench_isotropic_proxy", {"attention": "swin"}, {"root": str(dataset)}, 32,
                              16, 0, recipe)
    index = load_index(dataset)
    assert task.val_distances == [index[p.relative_to(dataset).as_posix()]["d"] for p, _ in task.val.samples]
    settings = TrainSettings(epochs=1, batch_size=20, eval_batch_size=16, warmup_epochs=0, amp=False)
    history = train_and_evaluate(task, settings, World(0, 1, torch.device("cpu")), None, log=lambda _: None)["history"]
    final = history[-1]
    counts = final["per_distance"]["counts"]
    assert sum(counts["per_distance"].values()) == sum(counts["bins"].values()) == len(task.val) == 60
    bins = final["per_distance"]["bins"]
    assert sum(bins[b] * counts["bins"][b] for b in bins) / 60 == pytest.approx(final["top1"])
    other = write_imagenet_like(tmp_path / "imagenet", num_classes=2, train_per_class=2, val_per_class=2, size=32)
    with pytest.raises(ValueError, match="hflip"):  # a flip would swap the notch classes
        ClassificationTask("cp", "attnbench_isotropic_proxy", {}, {"root": str(dataset)}, 32, 16, 0,
                           {**recipe, "hflip": 0.5})
    plain = ClassificationTask("in", "attnbench_isotropic_proxy", {"attention": "full"}, {"root": str(other)}, 32, 4,
                               0, recipe)
    assert plain.val_distances is None
    assert "per_distance" not in plain.evaluate(plain.build_model(), World(0, 1, torch.device("cpu")))


def test_shifted_windows_reach_43_percent_of_near_partners_directly():
    """The proxy suite's positive control for swin rests on this figure: with window 4 in block 1 and windows
    shifted by 2 in block 2 (Swin's cyclic shift with its mask: the shifted partition of each axis is {0, 1},
    {2..5}, {6..9}, {10..13}, {14, 15}, i.e. cell // 4 and (cell + 2) // 4), the partner shares a window with the
    query in one of the two blocks in 95% of scenes at d = 1, 80% at d = 2, 39% at d = 3 and never beyond: 43% of
    the near bin (d ≤ 5). A swin that learned what its windows see directly scores about 25 + 75 × 0.43 = 57% there
    (more with two hops through a neighbour); the gate asks for 40, about half that gain above chance."""
    import attentions

    def shares_a_window(a, b, shift: int) -> bool:
        return all((x + shift) // 4 == (y + shift) // 4 for x, y in zip(a, b, strict=True))

    # the partitions are the implementation's: a token moves exactly the outputs of its own (shifted) window
    torch.manual_seed(0)
    tokens = torch.randn(1, GRID, GRID, 8, dtype=torch.float64)
    for shift in (0, 2):
        block = attentions.create("swin", dim=8, num_heads=2, window_size=4, shift_size=shift).double().eval()
        for source in [(0, 0), (1, 2), (5, 5), (13, 14), (15, 15)]:
            moved = tokens.clone()
            moved[0, source[0], source[1]] += 1.0
            changed = (block(moved) - block(tokens)).abs().sum(-1)[0] > 1e-12
            assert all(bool(changed[cell]) == shares_a_window(cell, source, shift)
                       for cell in np.ndindex(GRID, GRID)), (shift, source)
    rng = np.random.default_rng(0)

    reached = {}
    for distance in range(1, 6):
        scenes = [sample_scene(rng, distance, label % 4) for label in range(2000)]
        reached[distance] = np.mean([shares_a_window(s["query"], s["partner"], 0)
                                     or shares_a_window(s["query"], s["partner"], 2) for s in scenes])
    assert reached[1] == pytest.approx(0.95, abs=0.02) and reached[2] == pytest.approx(0.80, abs=0.03)
    assert reached[3] == pytest.approx(0.39, abs=0.03) and reached[4] == reached[5] == 0.0
    assert np.mean(list(reached.values())) == pytest.approx(0.43, abs=0.015)
