"""Accuracy against distance for the colour-pointer task (attnbench/data/colour_pointer.py).

Each validation image's distance d (Chebyshev, in tokens, between the query and the objects) comes from the
data set's sidecar index. The bins follow the proxy backbone's reach (attnbench/models/proxy.py, measured in
tests/test_proxy_model.py): in two blocks shifted windows of 4 reach 5 tokens, 5×5 neighbourhoods 4 (6 at
the border of the map, where NAT shifts the window inwards), so

* near (d 1-5): a purely local mechanism can reach the partner (for some alignments);
* mid (d 6-10): at or beyond the local mechanisms' reach, within ~half the map;
* far (d 11-15): at least 5 tokens beyond every local mechanism's reach; only what reaches across the map
  (global, routed, strided or deformed attention) can be above chance here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.colour_pointer import INDEX_FILE, MAX_DISTANCE, load_index

BINS: dict[str, tuple[int, int]] = {"near": (1, 5), "mid": (6, 10), "far": (11, 15)}  # inclusive d ranges


def sample_distances(root: str | Path, files: Sequence[Path]) -> list[int] | None:
    """The distance d of each file (absolute paths under ``root``), from ``root``'s sidecar index; None when
    the data set has no sidecar (every task but the colour pointer)."""
    root = Path(root)
    if not (root / INDEX_FILE).exists():
        return None
    index = load_index(root)
    return [int(index[path.relative_to(root).as_posix()]["d"]) for path in files]


def accuracy_by_distance(correct: Sequence[bool], distances: Sequence[int],
                         bins: dict[str, tuple[int, int]] = BINS) -> dict[str, Any]:
    """Top-1 in percent per distance d and per bin, with the image counts behind each figure.

    Returns ``{"per_distance": {"1": acc, ...}, "bins": {"near": acc, "mid": acc, "far": acc},
    "counts": {"per_distance": {"1": n, ...}, "bins": {"near": n, ...}}}``; a d or bin without images is
    left out (not reported as 0).
    """
    if len(correct) != len(distances):
        raise ValueError(f"{len(correct)} correctness flags for {len(distances)} distances")
    hits: dict[int, int] = {}
    totals: dict[int, int] = {}
    for hit, distance in zip(correct, distances, strict=True):
        if not 1 <= distance <= MAX_DISTANCE:
            raise ValueError(f"distance {distance} outside 1..{MAX_DISTANCE}")
        hits[distance] = hits.get(distance, 0) + int(bool(hit))
        totals[distance] = totals.get(distance, 0) + 1
    result: dict[str, Any] = {"per_distance": {}, "bins": {}, "counts": {"per_distance": {}, "bins": {}}}
    for distance in sorted(totals):
        result["per_distance"][str(distance)] = 100 * hits[distance] / totals[distance]
        result["counts"]["per_distance"][str(distance)] = totals[distance]
    for name, (low, high) in bins.items():
        count = sum(totals.get(d, 0) for d in range(low, high + 1))
        if count:
            result["bins"][name] = 100 * sum(hits.get(d, 0) for d in range(low, high + 1)) / count
            result["counts"]["bins"][name] = count
    return result
