"""Small data sets written in the real layouts (JPEG/PNG files on disk), for tests and the demo profiles.

* ``write_imagenet_like``: ImageFolder classes, each a shape and colour on a textured background.
* ``write_relation_proxy``: the CPU-scale proxy of the ablation. Two small squares far apart (one in the left
  third of the image, one in the right third) on a noisy background; the class says whether they have the same
  colour (palette of ``colours``). Each square alone says nothing about the label, and a sum of per-location
  features over the image cannot separate "same" from "different" linearly (2·g(a) vs g(a) + g(b) for every
  colour pair), so a network must carry information across the image before its pooled head: what an
  attention mechanism is for. Written as an ImageFolder data set (classes ``different``, ``same``), it is
  loaded by the same code as ImageNet, and every table labels it a proxy.
* ``write_ade20k_like``: ADEChallengeData2016 layout, rectangles and ellipses of random classes (1..150) over a
  background class, some pixels 0 ("other", ignored after reduction).

All are deterministic in ``seed``; a data set already complete at ``root`` (its ``.complete`` marker) is reused.
A data set is written into ``.<name>.partial`` beside ``root`` and renamed to ``root`` when complete, under a lock
(``.<name>.lock``, flock) that a second generator of the same root waits for: an interrupted generation (kill -9)
leaves ``root`` untouched, and the next one starts the partial folder afresh. Bad arguments and unwritable roots
raise a DataError with one line.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import DataError

MARKER = ".complete"
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _complete(root: Path, spec: dict) -> bool:
    """True if ``root`` holds this data set already; a DataError if it holds anything else."""
    marker = root / MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == spec:
            return True
        raise DataError(f"{root}: holds a different generated data set ({marker.read_text()}); remove it or "
                        "generate elsewhere")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: not empty and not a generated data set; refusing to write into it")
    return False


def _positive(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _in_range(name: str, value: int, low: int, high: int | None = None) -> None:
    _positive(**{name: value})
    if value < low or (high is not None and value > high):
        raise DataError(f"{name} must be in [{low}, {high if high is not None else '...'}], got {value}")


def _generate(root: str | Path, spec: dict, write: Callable[[Path], None]) -> Path:
    """``root`` holding the data set ``spec`` describes: reused if complete, else written by ``write(folder)``
    into a partial sibling folder that is renamed to ``root`` once complete (see the module docstring)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a directory")
    if _complete(root, spec):
        return root
    partial = root.parent / f".{root.name}.partial"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process generating the same root: wait for it
            if _complete(root, spec):
                return root
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted generation
            partial.mkdir()
            write(partial)
            (partial / MARKER).write_text(json.dumps(spec, sort_keys=True))
            if root.exists():
                root.rmdir()  # empty: _complete refuses anything else
            partial.rename(root)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{root}: cannot write the data set there ({error.strerror or error})") from None
    return root


def _noise(rng: np.random.Generator, height: int, width: int, base: tuple[int, int, int], amount: int) -> np.ndarray:
    image = np.asarray(base, dtype=np.int16) + rng.integers(-amount, amount + 1, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_imagenet_like(root: str | Path, num_classes: int = 4, train_per_class: int = 8, val_per_class: int = 4,
                        size: int = 64, seed: int = 0) -> Path:
    """``root/{train,val}/n0000000k/*.JPEG``: class k is a shape (k mod 3) in a colour (k mod 12)."""
    _positive(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class)
    _in_range("size", size, 16)
    spec = {"kind": "imagenet_like", "classes": num_classes, "train": train_per_class, "val": val_per_class,
            "size": size, "seed": seed}
    return _generate(root, spec, lambda folder: _write_imagenet_like(folder, num_classes, train_per_class,
                                                                     val_per_class, size, seed))


def _write_imagenet_like(root: Path, num_classes: int, train_per_class: int, val_per_class: int, size: int,
                         seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = Image.fromarray(_noise(rng, size, size, (120, 120, 120), 40))
                draw = ImageDraw.Draw(image)
                extent = int(rng.integers(size // 4, size // 2))
                left, top = (int(v) for v in rng.integers(0, size - extent, 2))
                box = (left, top, left + extent, top + extent)
                colour = PALETTE[label % len(PALETTE)]
                shape = label % 3
                if shape == 0:
                    draw.ellipse(box, fill=colour)
                elif shape == 1:
                    draw.rectangle(box, fill=colour)
                else:
                    draw.polygon([(left, top + extent), (left + extent // 2, top), (left + extent, top + extent)],
                                 fill=colour)
                image.save(folder / f"n{label:08d}_{split}_{index:05d}.JPEG", quality=90)


def write_relation_proxy(root: str | Path, train_per_class: int = 64, val_per_class: int = 32, size: int = 112,
                         colours: int = 6, square: int | None = None, seed: int = 0) -> Path:
    """``root/{train,val}/{different,same}/*.JPEG``: two squares in the outer thirds, same colour or not."""
    _positive(train_per_class=train_per_class, val_per_class=val_per_class)
    _in_range("colours", colours, 2, len(PALETTE))
    _in_range("size", size, 24)
    side = square or max(4, size // 10)
    _in_range("square", side, 1, size // 3)
    spec = {"kind": "relation_proxy", "train": train_per_class, "val": val_per_class, "size": size,
            "colours": colours, "square": square, "seed": seed}
    return _generate(root, spec, lambda folder: _write_relation_proxy(folder, train_per_class, val_per_class, size,
                                                                      colours, side, seed))


def _write_relation_proxy(root: Path, train_per_class: int, val_per_class: int, size: int, colours: int, side: int,
                          seed: int) -> None:
    rng = np.random.default_rng(seed)
    third = size // 3
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(("different", "same")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                first = int(rng.integers(colours))
                second = first if label == 1 else int((first + rng.integers(1, colours)) % colours)
                image = Image.fromarray(_noise(rng, size, size, (128, 128, 128), 50))
                draw = ImageDraw.Draw(image)
                for colour, (low, high) in ((first, (0, third - side)), (second, (size - third, size - side))):
                    x = int(rng.integers(low, high + 1))
                    y = int(rng.integers(0, size - side + 1))
                    draw.rectangle((x, y, x + side - 1, y + side - 1), fill=PALETTE[colour])
                if rng.random() < 0.5:  # the "different"/"same" pair may sit either way round
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
                image.save(folder / f"{name}_{split}_{index:05d}.JPEG", quality=95)


def write_ade20k_like(root: str | Path, train_images: int = 8, val_images: int = 4, size: tuple[int, int] = (96, 128),
                      classes: int = 8, seed: int = 0) -> Path:
    """``root/images/{training,validation}/*.jpg`` and ``root/annotations/.../*.png`` (labels 0..150).

    ``classes`` distinct ADE class ids (drawn from 1..150) appear; each has its own colour, so a model can learn
    the map. A 2-pixel border is label 0 ("other"), ignored after reduction.
    """
    _positive(train_images=train_images, val_images=val_images)
    _in_range("classes", classes, 2, 150)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise DataError(f"size must be [height, width], got {size!r}")
    _in_range("size[0] (height)", size[0], 16)
    _in_range("size[1] (width)", size[1], 16)
    spec = {"kind": "ade20k_like", "train": train_images, "val": val_images, "size": list(size), "classes": classes,
            "seed": seed}
    return _generate(root, spec, lambda folder: _write_ade20k_like(folder, train_images, val_images, tuple(size),
                                                                   classes, seed))


def _write_ade20k_like(root: Path, train_images: int, val_images: int, size: tuple[int, int], classes: int,
                       seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = sorted(int(i) for i in rng.choice(np.arange(1, 151), size=classes, replace=False))
    colours = {class_id: PALETTE[i % len(PALETTE)] for i, class_id in enumerate(ids)}
    height, width = size
    for split, folder, count in (("train", "training", train_images), ("val", "validation", val_images)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            background = ids[0]
            label = Image.new("L", (width, height), background)
            image = Image.fromarray(_noise(rng, height, width, colours[background], 20))
            draw_label, draw_image = ImageDraw.Draw(label), ImageDraw.Draw(image)
            for _ in range(int(rng.integers(2, 5))):
                class_id = int(rng.choice(ids[1:]))
                w, h = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                shape = ImageDraw.ImageDraw.ellipse if rng.random() < 0.5 else ImageDraw.ImageDraw.rectangle
                shape(draw_label, (x, y, x + w, y + h), fill=class_id)
                shape(draw_image, (x, y, x + w, y + h), fill=colours[class_id])
            label_array = np.asarray(label).copy()
            label_array[:2], label_array[-2:], label_array[:, :2], label_array[:, -2:] = 0, 0, 0, 0
            name = f"ADE_{split}_{index:08d}"
            image.save(root / "images" / folder / f"{name}.jpg", quality=90)
            Image.fromarray(label_array).save(root / "annotations" / folder / f"{name}.png")
