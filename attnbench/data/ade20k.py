"""ADE20K-style segmentation subsets in the ADEChallengeData2016 layout, and the usual pipeline.

Layout: ``<root>/images/{training,validation}/<name>.jpg`` with ``<root>/annotations/{...}/<name>.png``
(uint8 labels 0..150, 0 = "other"). Labels are reduced as mmsegmentation's ``reduce_zero_label`` does:
0 becomes 255 (ignored), 1..150 become 0..149.

Training pipeline (mmsegmentation's ADE20K config, read in open-mmlab/mmsegmentation
``configs/_base_/datasets/ade20k.py``): resize keeping the aspect ratio to ``scale × r`` with r drawn from
``ratio_range``, random crop of ``crop_size`` (retried up to 10 times so that no class covers more than 75% of
the crop), horizontal flip with p = 0.5, optionally the photometric distortion (``photometric_distortion``,
below), normalise, pad to the crop size (image with 0, label with 255).

Evaluation, ``eval_resize``: ``square`` resizes the whole image to ``crop_size`` (every backbone accepts that size
without padding: the demo profiles); ``keep_ratio`` is the official BiFormer/UniFormer test pipeline (rayleizhu/
BiFormer ``semantic_segmentation/configs/_base_/datasets/ade20k_sfpn.py`` and ``mmseg_custom/align_resize.py`` at
1697bbb): rescale keeping the aspect ratio so that the image fits ``scale`` (long side ≤ 2048, short side ≤ 512;
mmcv ``imrescale``: factor min(2048 / long, 512 / short), sides rounded to the nearest pixel), then stretch each
side up to a multiple of ``size_divisor`` (32). Either way the prediction is resized back to the label's size.
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


def photometric_distortion(image: Image.Image, rng: Any) -> Image.Image:
    """mmsegmentation's ``PhotoMetricDistortion`` with its default strengths (read in open-mmlab/mmsegmentation
    ``mmseg/datasets/pipelines/transforms.py``, v0.x, the version BiFormer's configs use): each step with
    probability 1/2: brightness + U(-32, 32); contrast × U(0.5, 1.5), applied first or last (a coin decides);
    saturation × U(0.5, 1.5), then hue + an integer in [-18, 18] of 180 degrees, each through HSV; values
    clipped to 0..255 after each step. ``rng``: ``random`` or a ``random.Random``; no step drawn, no change."""
    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = np.clip(pixels + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        pixels = np.clip(pixels * rng.uniform(0.5, 1.5), 0, 255)
    if rng.random() < 0.5:
        hsv = _to_hsv(pixels)
        hsv[..., 1] *= rng.uniform(0.5, 1.5)
        pixels = _to_rgb(hsv)
    if rng.random() < 0.5:
        hsv = _to_hsv(pixels)  # PIL's hue runs 0..255 for 360 degrees; mmseg's (OpenCV's) 0..180
        hsv[..., 0] = (hsv[..., 0] + rng.randint(-18, 18) * 256 / 180) % 256
        pixels = _to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        pixels = np.clip(pixels * rng.uniform(0.5, 1.5), 0, 255)
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def _to_hsv(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.round(pixels).astype(np.uint8)).convert("HSV"), dtype=np.float32).copy()


def _to_rgb(hsv: np.ndarray) -> np.ndarray:
    hsv = np.round(np.clip(hsv, 0, 255)).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32)


def keep_ratio_size(width: int, height: int, scale: tuple[int, int], size_divisor: int) -> tuple[int, int]:
    """(width, height) of the official keep-ratio evaluation input (see the module docstring)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    width, height = int(width * factor + 0.5), int(height * factor + 0.5)
    return (-(-width // size_divisor) * size_divisor, -(-height // size_divisor) * size_divisor)


class SegmentationTransform:
    """(PIL image, uint8 label array) -> (normalised float tensor 3×h×w, int64 label tensor h×w).

    ``train``: random rescale, crop, flip, (photometric distortion), pad to ``crop_size`` (h, w). Evaluation:
    the image resized (``eval_resize``: ``square`` or ``keep_ratio``, see the module docstring), the label at
    full size (the prediction is resized to it before scoring).
    """

    def __init__(self, crop_size: tuple[int, int], train: bool, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 photometric: bool = False, eval_resize: str = "square", size_divisor: int = 32) -> None:
        if eval_resize not in ("square", "keep_ratio"):
            raise ValueError(f"eval_resize: {eval_resize!r} is neither 'square' nor 'keep_ratio'")
        self.crop_size = crop_size
        self.train = train
        self.scale = tuple(scale) if scale else (4 * crop_size[1], crop_size[0])  # mmseg: (2048, 512) for 512
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric
        self.eval_resize = eval_resize
        self.size_divisor = size_divisor

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
            size = (crop_w, crop_h) if self.eval_resize == "square" else keep_ratio_size(
                image.width, image.height, self.scale, self.size_divisor)
            return self._normalise(image.resize(size, Image.BILINEAR)), torch.from_numpy(label)
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
        if self.photometric:
            image = photometric_distortion(image, random)
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
