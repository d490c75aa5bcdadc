"""Image classification on an ImageNet-style subset (or the generated relation proxy, same layout).

timm's training recipe pieces: ``create_transform`` (RandAugment, random erasing, random-resized crop, flip,
colour jitter), ``Mixup`` (mixup / cutmix with label smoothing) and ``SoftTargetCrossEntropy`` when mixing,
``LabelSmoothingCrossEntropy`` otherwise; top-1 / top-5 on the validation split, and accuracy against distance
when the data set has a distance sidecar (the colour pointer, attnbench/train/per_distance.py).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from ..data import ImageNetSubset
from .distributed import ShardSampler, World
from .per_distance import accuracy_by_distance, sample_distances
from .task import Task

# BiFormer's ImageNet recipe (rayleizhu/BiFormer main.py defaults, as in DeiT / Swin): RandAugment
# rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1.
RECIPE = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0,
          "label_smoothing": 0.1, "scale": (0.08, 1.0), "color_jitter": 0.4, "hflip": 0.5, "drop_path_rate": 0.1,
          "crop_pct": 0.875, "interpolation": "bicubic"}


# Augmentations that change what a colour-pointer image means: flips swap notch classes, crops and RandAugment
# move the 2×2 cells off the token grid, erasing removes objects, mixing pastes a second query in.
POSITION_EXACT_RECIPE = {"hflip": 0.0, "auto_augment": None, "scale": (1.0, 1.0), "re_prob": 0.0, "mixup": 0.0,
                         "cutmix": 0.0}


def build_classifier(model_name: str, num_classes: int, recipe: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    """The timm model ``model_name`` with ``num_classes`` outputs and the recipe's drop path."""
    return timm.create_model(model_name, num_classes=num_classes, drop_path_rate=recipe["drop_path_rate"], **options)


class ClassificationTask(Task):
    """A timm model (any registered name; BiFormer's and the STL ablation backbone included) on a subset."""

    def __init__(self, name: str, model: str, model_options: dict[str, Any], data: dict[str, Any],
                 image_size: int, eval_batch_size: int, workers: int, recipe: dict[str, Any] | None = None) -> None:
        super().__init__(name, model, model_options, image_size, eval_batch_size, workers, {**RECIPE, **(recipe or {})})
        seed = data.get("seed", 0)
        train_transform = create_transform(
            image_size, is_training=True, auto_augment=self.recipe["auto_augment"], re_prob=self.recipe["re_prob"],
            scale=tuple(self.recipe["scale"]), color_jitter=self.recipe["color_jitter"], hflip=self.recipe["hflip"],
            interpolation=self.recipe["interpolation"])
        self.train = ImageNetSubset(data["root"], "train", data.get("classes"), data.get("num_classes"),
                                    data.get("images_per_class"), seed, train_transform)
        eval_transform = create_transform(image_size, is_training=False, crop_pct=self.recipe["crop_pct"],
                                          interpolation=self.recipe["interpolation"])
        self.val = ImageNetSubset(data["root"], "val", self.train.classes, None, data.get("val_images_per_class"),
                                  seed, eval_transform)
        self.val_distances = sample_distances(data["root"], [path for path, _ in self.val.samples])
        if self.val_distances is not None:
            wrong = {key: self.recipe[key] for key, value in POSITION_EXACT_RECIPE.items()
                     if (tuple(self.recipe[key]) if key == "scale" else self.recipe[key]) != value}
            if wrong:
                raise ValueError(f"{name}: a data set with a distance sidecar (colour pointer) needs the recipe "
                                 f"{POSITION_EXACT_RECIPE}; got {wrong}")
        self.num_classes = len(self.train.classes)
        mixing = self.recipe["mixup"] > 0 or self.recipe["cutmix"] > 0
        self.mixup = Mixup(mixup_alpha=self.recipe["mixup"], cutmix_alpha=self.recipe["cutmix"],
                           label_smoothing=self.recipe["label_smoothing"], num_classes=self.num_classes) \
            if mixing else None
        smoothing = self.recipe["label_smoothing"]
        self.criterion = SoftTargetCrossEntropy() if mixing else (
            LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss())

    def build_model(self) -> nn.Module:
        return build_classifier(self.model_name, self.num_classes, self.recipe, self.model_options)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images, targets = batch[0].to(device), batch[1].to(device)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World) -> dict[str, Any]:
        model.eval()
        sampler = ShardSampler(len(self.val), world)
        loader = DataLoader(self.val, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.workers)
        top5_k = min(5, self.num_classes)
        totals = torch.zeros(4, dtype=torch.float64, device=world.device)  # loss sum, top-1, top-k hits, count
        correct = torch.zeros(len(self.val), dtype=torch.float64, device=world.device)  # per image, all ranks
        batch_hits = []
        for images, targets in loader:
            images, targets = images.to(world.device), targets.to(world.device)
            logits = model(images).float()
            ranked = logits.topk(top5_k, dim=1).indices
            hits = ranked == targets[:, None]
            batch_hits.append(hits[:, 0].double())
            totals += torch.stack([nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                                   hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                   torch.tensor(float(len(targets)), dtype=torch.float64, device=world.device)])
        if batch_hits:  # the loader visits the shard's indices in the sampler's order
            correct[torch.tensor(sampler.indices, device=world.device)] = torch.cat(batch_hits)
        world.all_reduce_sum(totals)
        world.all_reduce_sum(correct)
        count = totals[3].item()
        metrics: dict[str, Any] = {"val_loss": totals[0].item() / count, "top1": 100 * totals[1].item() / count}
        if self.num_classes > 5:  # top-5 of five classes or fewer is 100% by construction: not a score
            metrics["top5"] = 100 * totals[2].item() / count
        if self.val_distances is not None:
            metrics["per_distance"] = accuracy_by_distance((correct > 0.5).tolist(), self.val_distances)
        return metrics
