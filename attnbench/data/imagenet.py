"""ImageNet-style classification subsets in the ImageFolder layout: ``<root>/<split>/<wnid>/*.JPEG``.

A subset is a class list, or a class count drawn with a seed, plus at most ``images_per_class`` images per
class, also drawn with the seed; the same arguments always give the same files, and ``description()`` records
what was chosen (with a digest of the file list) in the results.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` in RGB, fully decoded; a DataError naming the file if it cannot be (truncated,
    not an image)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports a damaged file with any of these
        raise DataError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None


def file_digest(paths: Sequence[Path], root: Path) -> str:
    """A short digest of a file list, relative to ``root``: two runs on the same subset share it."""
    text = "\n".join(str(path.relative_to(root)) for path in paths)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class ImageNetSubset(Dataset):
    """(image, class index) pairs of a class subset of one split.

    Args:
        root: the data set root, holding ``train/`` and ``val/`` (ImageFolder layout, one folder per class).
        split: ``train`` or ``val``.
        classes: class folder names to use, in this order (labels 0..n-1); or None to draw ``num_classes``.
        num_classes: how many classes to draw with ``seed`` (all when None).
        images_per_class: at most this many images per class, drawn with ``seed`` (all when None).
        transform: applied to the RGB PIL image (timm's ``create_transform`` in the training code).
    """

    def __init__(self, root: str | Path, split: str, classes: Sequence[str] | None = None,
                 num_classes: int | None = None, images_per_class: int | None = None, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.seed = seed
        self.transform = transform
        split_dir = self.root / split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root does not exist (expected an ImageNet-style root holding "
                            "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing split folder (expected {split}/<wnid>/*.JPEG under {self.root})")
        available = sorted(path.name for path in split_dir.iterdir() if path.is_dir())
        if not available:
            raise DataError(f"{split_dir}: no class folders (expected {split}/<wnid>/*.JPEG)")
        self.classes = self._choose_classes(split_dir, available, classes, num_classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            images = _images_in(split_dir / name)
            if not images:
                raise DataError(f"{split_dir / name}: class folder has no images (.JPEG, .jpg or .png)")
            if images_per_class is not None and images_per_class < len(images):
                images = sorted(random.Random(f"{seed}/{name}").sample(images, images_per_class))
            self.samples += [(path, label) for path in images]

    def _choose_classes(self, split_dir: Path, available: list[str], classes: Sequence[str] | None,
                        num_classes: int | None) -> list[str]:
        if classes is not None:
            missing = [name for name in classes if name not in available]
            if missing:
                raise DataError(f"{split_dir}: no class folder(s) {', '.join(missing[:5])} "
                                f"({len(available)} classes there, e.g. {', '.join(available[:3])})")
            return list(classes)
        if num_classes is None or num_classes >= len(available):
            if num_classes is not None and num_classes > len(available):
                raise DataError(f"{split_dir}: asked for {num_classes} classes, only {len(available)} there")
            return available
        return sorted(random.Random(self.seed).sample(available, num_classes))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = open_rgb(path)
        return (self.transform(image) if self.transform else image), label

    def description(self) -> dict[str, Any]:
        """What the subset is, for the results: classes, counts, seed and a digest of the files."""
        return {"root": str(self.root), "split": self.split, "classes": self.classes, "seed": self.seed,
                "images": len(self.samples), "files_sha1": file_digest([p for p, _ in self.samples], self.root)}
