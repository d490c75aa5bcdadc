"""The "colour pointer" task: a long-range proxy on which attention mechanisms differ by how far they reach.

A 32×32 image is a 16×16 grid of 2×2-pixel cells (the proxy backbone's patch-2 tokens) on a grey, slightly
noisy background. Five cells hold objects, each exactly one cell:

* the **query**: a 2×2 checker, colour c on the diagonal, white on the anti-diagonal;
* the **partner**: a solid 2×2 square in colour c with one pixel darkened (its *notch*);
* three **distractors**: solid squares in three other colours, notched at the three notch values the partner
  does not have.

The label is the partner's notch: which of its four pixels is dark (4 classes, chance 25%). Every notched
object lies at the same Chebyshev distance d (1..15, in cells = tokens) from the query, so the task at
distance d needs information to travel d tokens to the query, whichever object a model looks at.

Shortcut guards (each one tested in tests/test_colour_pointer.py):

* no majority vote / pooling shortcut: the four notches are always a permutation of 0..3, so counting notch
  values over the image says nothing;
* no elimination shortcut: the distractors are exactly as far from the query as the partner, so a model
  that reaches the query's colour and three distractors has reached the partner's distance as well;
* no position prior: the partner is one of the four ring objects drawn uniformly, the label is balanced
  (exactly, in blocks of 60 images) over every distance d, independent of where the query is;
* no colour prior: c is uniform over the palette and the four object colours are distinct, so without the
  query every notched object is equally likely to be the partner.

Files: ``root/{train,val}/<class>/cp_<split>_<index>.png`` (PNG: the 2×2 patterns must survive unchanged),
classes ``n0_top_left``, ``n1_top_right``, ``n2_bottom_left``, ``n3_bottom_right`` (the notch pixel), and the
sidecar ``root/index.json`` mapping each file (relative to root) to d, the query's, partner's and
distractors' cells (row, column) and their colours and notches. Deterministic in ``seed``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .generate import _generate, _noise, _positive

SIZE = 32  # pixels
CELL = 2  # pixels per cell side: the proxy backbone's patch size
GRID = SIZE // CELL  # 16 cells (tokens) per side
MAX_DISTANCE = GRID - 1
CLASSES = ("n0_top_left", "n1_top_right", "n2_bottom_left", "n3_bottom_right")
NOTCH_PIXELS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) inside the cell, by notch value
INDEX_FILE = "index.json"
# Saturated colours, each far from the background grey, from white (the checker) and from its own notch.
COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230))
WHITE = (255, 255, 255)
BACKGROUND, NOISE = (128, 128, 128), 12
NOTCH_SHADE = 0.3  # a notch pixel is its object's colour times this


def ring(query: tuple[int, int], distance: int) -> list[tuple[int, int]]:
    """The cells of the grid at Chebyshev distance ``distance`` from ``query`` (row-major order)."""
    row, column = query
    return [(r, c) for r in range(max(0, row - distance), min(GRID, row + distance + 1))
            for c in range(max(0, column - distance), min(GRID, column + distance + 1))
            if max(abs(r - row), abs(c - column)) == distance]


@cache
def _queries_with_room(distance: int, objects: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(GRID) for c in range(GRID) if len(ring((r, c), distance)) >= objects]


def _paint(image: np.ndarray, cell: tuple[int, int], colour: tuple[int, int, int], notch: int | None) -> None:
    top, left = cell[0] * CELL, cell[1] * CELL
    image[top:top + CELL, left:left + CELL] = colour
    if notch is None:  # the query's checker: white anti-diagonal
        image[top, left + 1] = image[top + 1, left] = WHITE
    else:
        dy, dx = NOTCH_PIXELS[notch]
        image[top + dy, left + dx] = [int(NOTCH_SHADE * v) for v in colour]


def sample_scene(rng: np.random.Generator, distance: int, label: int) -> dict[str, Any]:
    """One scene: the query cell and colour, the partner (notch ``label``) and three distractors, all four at
    Chebyshev ``distance`` from the query; query position, ring cells and colours drawn uniformly."""
    candidates = _queries_with_room(distance, 4)
    query = candidates[int(rng.integers(len(candidates)))]
    cells = ring(query, distance)
    chosen = [cells[i] for i in rng.choice(len(cells), size=4, replace=False)]
    colours = [int(i) for i in rng.choice(len(COLOURS), size=4, replace=False)]  # [c, three others]
    others = [notch for notch in range(4) if notch != label]
    others = [others[i] for i in rng.permutation(3)]
    return {"d": distance, "query": list(query), "colour": colours[0], "partner": list(chosen[0]), "notch": label,
            "distractors": [list(cell) for cell in chosen[1:]], "distractor_colours": colours[1:],
            "distractor_notches": others}


def render(scene: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The (32, 32, 3) uint8 image of ``scene``."""
    image = _noise(rng, SIZE, SIZE, BACKGROUND, NOISE)
    _paint(image, tuple(scene["query"]), COLOURS[scene["colour"]], None)
    _paint(image, tuple(scene["partner"]), COLOURS[scene["colour"]], scene["notch"])
    for cell, colour, notch in zip(scene["distractors"], scene["distractor_colours"], scene["distractor_notches"],
                                   strict=True):
        _paint(image, tuple(cell), COLOURS[colour], notch)
    return image


def design(count: int) -> list[tuple[int, int]]:
    """(distance, label) of image 0..count-1: d cycles through 1..15, the label through 0..3 every 15 images,
    so every block of 60 images holds each (d, label) pair once."""
    return [(1 + i % MAX_DISTANCE, (i // MAX_DISTANCE) % len(CLASSES)) for i in range(count)]


def write_colour_pointer(root: str | Path, train_images: int = 6000, val_images: int = 2400, seed: int = 0) -> Path:
    """``root/{train,val}/<notch class>/*.png`` and ``root/index.json``; see the module docstring. Written as
    every generator is (attnbench/data/generate.py ``_generate``: a partial folder renamed when complete)."""
    _positive(train_images=train_images, val_images=val_images)
    spec = {"kind": "colour_pointer", "train": train_images, "val": val_images, "size": SIZE, "seed": seed}
    return _generate(root, spec, lambda folder: _write_colour_pointer(folder, train_images, val_images, seed))


def _write_colour_pointer(root: Path, train_images: int, val_images: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    index: dict[str, dict[str, Any]] = {}
    for split, count in (("train", train_images), ("val", val_images)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for number, (distance, label) in enumerate(design(count)):
            scene = sample_scene(rng, distance, label)
            relative = f"{split}/{CLASSES[label]}/cp_{split}_{number:06d}.png"
            Image.fromarray(render(scene, rng)).save(root / relative)
            index[relative] = scene
    (root / INDEX_FILE).write_text(json.dumps(index, sort_keys=True))


def load_index(root: str | Path) -> dict[str, dict[str, Any]]:
    """The sidecar of a colour-pointer data set: relative file path -> scene (d, query, partner, ...)."""
    return json.loads((Path(root) / INDEX_FILE).read_text())
