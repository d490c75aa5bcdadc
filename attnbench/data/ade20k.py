"""ADE20K-style segmentation subsets in the ADEChallengeData2016 layout, and the usual pipeline.

Layout: ``<root>/images/{training,validation}/<name>.jpg`` with ``<root>/annotations/{...}/<name>.png``
(uint8 labels 0..150, 0 = "other"). Labels are reduced as mmsegmentation's ``reduce_zero_label`` does:
0 becomes 255 (ignored), 1..150 become 0..149.

Training pipeline (mmsegmentation's ADE20K config, read in open-mmlab/mmsegmentation
``configs/_base_/datasets/ade20k.py``): resize keeping the aspect ratio to ``scale × r`` with r drawn from
``ratio_range``, random crop of ``crop_size`` (retried up to 10 times so that no class covers more than 75% of
the crop), horizontal flip with p = 0.5, normalise, pad to the crop size (image with 0, label with 255). The
photometric distortion of that config is left out. Evaluation resizes the whole image to ``crop_size`` (every
backbone here accepts that size, while BRA's regions need sizes that divide by its window) and scores the
prediction resized back to the label's full size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .imagenet import file_digest, open_rgb

IGNORE_INDEX = 255
NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), k -> k - 1 for k in 1..150."""
    label = label.astype(np.int64)
    return np.where(label == 0, IGNORE_INDEX, label - 1)


def read_label(path: Path) -> np.ndarray:
    """The uint8 label map at ``path``: a single-channel PNG (mode L, or P read as its indices) of ids 0..150;
    a DataError naming the file otherwise."""
    try:
        with Image.open(path) as label_image:
            mode = label_image.mode
            label = np.asarray(label_image)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot read the label map ({type(error).__name__}: {error})") from None
    if mode not in ("L", "P"):
        raise DataError(f"{path}: a label map must be a single-channel PNG (mode L or P) of class ids "
                        f"0..{NUM_CLASSES}, "
                        f"this one is mode {mode}")
    if label.size and int(label.max()) > NUM_CLASSES:
        raise DataError(f"{path}: label {int(label.max())} is above {NUM_CLASSES} (ADE20K ids are 0..{NUM_CLASSES}, "
                        "0 = other)")
    return label


class SegmentationTransform:
    """(PIL image, uint8 label array) -> (normalised float tensor 3×h×w, int64 label tensor h×w).

    ``train``: random rescale, crop, flip, pad to ``crop_size`` (h, w). Evaluation: the image resized to
    ``crop_size``, the label at full size (the prediction is resized to it before scoring).
    """

    def __init__(self, crop_size: tuple[int, int], train: bool, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75) -> None:
        self.crop_size = crop_size
        self.train = train
        self.scale = scale or (4 * crop_size[1], crop_size[0])  # mmseg: (2048, 512) for a 512 crop
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio

    @staticmethod
    def _normalise(image: Image.Image) -> torch.Tensor:
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)

    def _random_crop(self, label: np.ndarray) -> tuple[int, int]:
        crop_h, crop_w = self.crop_size
        max_top, max_left = max(label.shape[0] - crop_h, 0), max(label.shape[1] - crop_w, 0)
        top, left = 0, 0
        for _ in range(10):
            top, left = random.randint(0, max_top), random.randint(0, max_left)
            window = label[top:top + crop_h, left:left + crop_w]
            classes, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
            if len(classes) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        crop_h, crop_w = self.crop_size
        if not self.train:
            resized = image.resize((crop_w, crop_h), Image.BILINEAR)
            return self._normalise(resized), torch.from_numpy(label)
        ratio = random.uniform(*self.ratio_range)
        long_side, short_side = max(self.scale) * ratio, min(self.scale) * ratio
        factor = min(long_side / max(image.size), short_side / min(image.size))
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST), dtype=np.int64)
        top, left = self._random_crop(label)
        image = image.crop((left, top, left + min(crop_w, size[0]), top + min(crop_h, size[1])))
        label = label[top:top + crop_h, left:left + crop_w]
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            label = label[:, ::-1]
        tensor = self._normalise(image)
        pad_h, pad_w = crop_h - tensor.shape[1], crop_w - tensor.shape[2]
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        return tensor, torch.from_numpy(np.ascontiguousarray(label))


class ADE20KSubset(Dataset):
    """(image tensor, label tensor) pairs of an ADE20K-layout split.

    Args:
        root: the ADEChallengeData2016 folder. split: ``train`` or ``val``.
        names: image names (file stems) to use; or None to draw ``images`` of them with ``seed`` (all if None).
        transform: a ``SegmentationTransform``; labels are reduced (0 ignored) before it.
    """

    def __init__(self, root: str | Path, split: str, names: Sequence[str] | None = None, images: int | None = None,
                 seed: int = 0, transform: SegmentationTransform | None = None) -> None:
        self.root, self.split, self.seed, self.transform = Path(root), split, seed, transform
        if split not in SPLITS:
            raise DataError(f"{self.root}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        image_dir = self.root / "images" / SPLITS[split]
        label_dir = self.root / "annotations" / SPLITS[split]
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root does not exist (expected ADEChallengeData2016 with "
                            "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png)")
        for folder, pattern in ((image_dir, "*.jpg"), (label_dir, "*.png")):
            if not folder.is_dir():
                raise DataError(f"{folder}: missing folder (expected {pattern} files under {self.root})")
        available = sorted(path.stem for path in image_dir.glob("*.jpg"))
        if not available:
            raise DataError(f"{image_dir}: no .jpg images")
        unlabelled = [name for name in available if not (label_dir / f"{name}.png").exists()]
        if unlabelled:
            raise DataError(f"{label_dir}: no annotation for {len(unlabelled)} image(s), e.g. {unlabelled[0]}.png")
        if names is not None:
            missing = [name for name in names if name not in available]
            if missing:
                raise DataError(f"{image_dir}: no image(s) {', '.join(missing[:5])}")
            self.names = list(names)
        elif images is not None and images < len(available):
            self.names = sorted(random.Random(seed).sample(available, images))
        else:
            self.names = available
        self.image_dir, self.label_dir = image_dir, label_dir

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        name = self.names[index]
        image = open_rgb(self.image_dir / f"{name}.jpg")
        label = reduce_zero_label(read_label(self.label_dir / f"{name}.png"))
        if label.shape != (image.height, image.width):
            raise DataError(f"{self.label_dir / name}.png: label is {label.shape[1]}x{label.shape[0]}, "
                            f"image is {image.width}x{image.height}")
        return self.transform(image, label) if self.transform else (image, label)

    def description(self) -> dict[str, Any]:
        paths = [self.image_dir / f"{name}.jpg" for name in self.names]
        return {"root": str(self.root), "split": self.split, "images": len(self.names), "seed": self.seed,
                "files_sha1": file_digest(paths, self.root)}
