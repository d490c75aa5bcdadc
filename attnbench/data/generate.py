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
"""

from __future__ import annotations

import json
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


def _finish(root: Path, spec: dict) -> Path:
    (root / MARKER).write_text(json.dumps(spec, sort_keys=True))
    return root


def _noise(rng: np.random.Generator, height: int, width: int, base: tuple[int, int, int], amount: int) -> np.ndarray:
    image = np.asarray(base, dtype=np.int16) + rng.integers(-amount, amount + 1, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_imagenet_like(root: str | Path, num_classes: int = 4, train_per_class: int = 8, val_per_class: int = 4,
                        size: int = 64, seed: int = 0) -> Path:
    """``root/{train,val}/n0000000k/*.JPEG``: class k is a shape (k mod 3) in a colour (k mod 12)."""
    root = Path(root)
    spec = {"kind": "imagenet_like", "classes": num_classes, "train": train_per_class, "val": val_per_class,
            "size": size, "seed": seed}
    if _complete(root, spec):
        return root
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
    return _finish(root, spec)


def write_relation_proxy(root: str | Path, train_per_class: int = 64, val_per_class: int = 32, size: int = 112,
                         colours: int = 6, square: int | None = None, seed: int = 0) -> Path:
    """``root/{train,val}/{different,same}/*.JPEG``: two squares in the outer thirds, same colour or not."""
    root = Path(root)
    spec = {"kind": "relation_proxy", "train": train_per_class, "val": val_per_class, "size": size,
            "colours": colours, "square": square, "seed": seed}
    if _complete(root, spec):
        return root
    if not 2 <= colours <= len(PALETTE):
        raise ValueError(f"colours must be in [2, {len(PALETTE)}], got {colours}")
    rng = np.random.default_rng(seed)
    side = square or max(4, size // 10)
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
    return _finish(root, spec)


def write_ade20k_like(root: str | Path, train_images: int = 8, val_images: int = 4, size: tuple[int, int] = (96, 128),
                      classes: int = 8, seed: int = 0) -> Path:
    """``root/images/{training,validation}/*.jpg`` and ``root/annotations/.../*.png`` (labels 0..150).

    ``classes`` distinct ADE class ids (drawn from 1..150) appear; each has its own colour, so a model can learn
    the map. A 2-pixel border is label 0 ("other"), ignored after reduction.
    """
    root = Path(root)
    spec = {"kind": "ade20k_like", "train": train_images, "val": val_images, "size": list(size), "classes": classes,
            "seed": seed}
    if _complete(root, spec):
        return root
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
    return _finish(root, spec)
