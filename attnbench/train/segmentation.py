"""Semantic segmentation on an ADE20K-style subset with a Semantic FPN head on a timm backbone.

Scores: mIoU (mean over classes with a non-empty union of the per-class IoU) and pixel accuracy, from one
confusion matrix summed over the validation images (and over processes under torchrun).

The official recipe this task is modelled on, BiFormer's ADE20K Semantic FPN configs (rayleizhu/BiFormer
``semantic_segmentation/configs/ade20k/sfpn.biformer_{small,base}.py`` and ``_base_/datasets/ade20k_sfpn.py``
at commit 1697bbb, which follow UniFormer's): AdamW (lr 2e-4, weight decay 1e-4), cosine annealing to
lr × 1e-8 after a 1000-iteration linear warm-up from lr / 10, 80k iterations of 8 GPUs × 4 = 32 images,
512² crops of images rescaled to (2048, 512) × [0.5, 2.0] with flips and photometric distortion, fp16 AMP,
drop path 0.15 (S) / 0.3 (B), BRA with n_win 8 and auto_pad; evaluation on whole images resized to a short
side of 512 (sides rounded to multiples of 32), single scale. Here the optimiser, schedule, batch and length
come from the suite's ``train`` section (attnbench/train/engine.py, which counts warm-up in epochs), the FPN
sizes and rescale range from ``RECIPE``; training has no photometric distortion, and evaluation runs on each
validation image resized to the square crop size (aspect not kept), its logits resized back to the label's
size. Backbones start from random weights; the official ones start from the ImageNet checkpoints.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import ADE20KSubset, SegmentationTransform
from ..data.ade20k import IGNORE_INDEX, NUM_CLASSES
from .distributed import ShardSampler, World
from .semantic_fpn import SemanticFPN
from .task import Task


def confusion_matrix(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes × num_classes) counts of (true, predicted) over the pixels whose label is not ignored."""
    valid = label != IGNORE_INDEX
    pairs = label[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU (%) over classes present in label or prediction, and pixel accuracy (%)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = true_positive[present] / union[present]
    return {"miou": 100 * iou.mean().item() if present.any() else float("nan"),
            "pixel_accuracy": 100 * (true_positive.sum() / confusion.sum()).item()}


# The official ADE20K Semantic FPN sizes (FPN 256, head 128, dropout 0.1) and mmseg's rescale range; the
# official drop path is 0.15 (BiFormer-S) / 0.3 (BiFormer-B), set per task in the suite's recipe.
RECIPE = {"fpn_channels": 256, "head_channels": 128, "dropout": 0.1, "drop_path_rate": 0.1, "ratio_range": (0.5, 2.0)}


class SegmentationTask(Task):
    """Semantic FPN on ``model`` (a timm name, built with features_only) on an ADE20K-layout subset."""

    def __init__(self, name: str, model: str, model_options: dict[str, Any], data: dict[str, Any],
                 crop_size: int, eval_batch_size: int, workers: int, recipe: dict[str, Any] | None = None) -> None:
        super().__init__(name, model, model_options, crop_size, eval_batch_size, workers, {**RECIPE, **(recipe or {})})
        seed = data.get("seed", 0)
        crop = (crop_size, crop_size)
        train_transform = SegmentationTransform(crop, train=True, ratio_range=tuple(self.recipe["ratio_range"]))
        self.train = ADE20KSubset(data["root"], "train", images=data.get("images"), seed=seed,
                                  transform=train_transform)
        self.val = ADE20KSubset(data["root"], "val", images=data.get("val_images"), seed=seed,
                                transform=SegmentationTransform(crop, train=False))
        self.num_classes = NUM_CLASSES
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def build_model(self) -> nn.Module:
        backbone = timm.create_model(self.model_name, features_only=True, out_indices=(0, 1, 2, 3),
                                     drop_path_rate=self.recipe["drop_path_rate"], **self.model_options)
        return SemanticFPN(backbone, self.num_classes, self.recipe["fpn_channels"], self.recipe["head_channels"],
                           self.recipe["dropout"])

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images, labels = batch[0].to(device), batch[1].to(device)
        return self.criterion(model(images).float(), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World) -> dict[str, float]:
        """Whole-image inference at the crop size, logits resized to each label's full size."""
        model.eval()
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=world.device)
        loader = DataLoader(self.val, batch_size=1, sampler=ShardSampler(len(self.val), world),
                            num_workers=self.workers)
        for image, label in loader:
            logits = model(image.to(world.device)).float()
            logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1), label.to(world.device), self.num_classes)
        world.all_reduce_sum(confusion)
        return scores(confusion)

