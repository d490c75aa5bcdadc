"""Semantic segmentation on an ADE20K-style subset with a Semantic FPN head on a timm backbone.

Scores: mIoU (mean over classes with a non-empty union of the per-class IoU) and pixel accuracy, from one
confusion matrix summed over the validation images (and over processes under torchrun).

The official recipe (BiFormer's ADE20K Semantic FPN configs, every setting with its source in
attnbench/train/official.py ``biformer_ade20k_sfpn``) is what ``suites/accuracy_ade20k.yaml``'s ``ade20k_sfpn``
profile asks for: the recipe keys below switch its pieces on (photometric distortion, keep-ratio evaluation,
per-stage output norms, an ImageNet checkpoint in the backbone); the demo profile keeps them off.
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
from ..models.checkpoint import load_backbone_checkpoint
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
# official drop path is 0.15 (BiFormer-S) / 0.3 (BiFormer-B), set per model in the suite's recipe.
# scale: the training rescale target (None: (4 × crop, crop), mmseg's (2048, 512) for a 512 crop) and the
# keep-ratio evaluation bound; output_norms: a LayerNorm2d on each stage's output (BiFormer_mm's extra_norms);
# backbone_checkpoint: an ImageNet classification checkpoint loaded into the backbone before training.
RECIPE = {"fpn_channels": 256, "head_channels": 128, "dropout": 0.1, "drop_path_rate": 0.1, "ratio_range": (0.5, 2.0),
          "scale": None, "cat_max_ratio": 0.75, "photometric_distortion": False, "eval_resize": "square",
          "size_divisor": 32, "output_norms": False, "backbone_checkpoint": None}


def build_segmenter(model_name: str, num_classes: int, recipe: dict[str, Any], options: dict[str, Any],
                    load_checkpoint: bool = True) -> SemanticFPN:
    """Semantic FPN on the backbone ``model_name``; the backbone's classification-only final norm is removed
    (BiFormer_mm deletes ``head`` and ``norm``), so no parameter goes unused under DDP, and the recipe's ImageNet
    checkpoint is loaded into it (unless ``load_checkpoint`` is false: a cost estimate)."""
    backbone = timm.create_model(model_name, features_only=True, out_indices=(0, 1, 2, 3),
                                 drop_path_rate=recipe["drop_path_rate"], **options)
    classifier = getattr(backbone, "model", None)  # timm's FeatureGetterNet keeps the model whole
    if classifier is not None and isinstance(getattr(classifier, "norm", None), nn.Module):
        classifier.norm = nn.Identity()
    if recipe["backbone_checkpoint"] and load_checkpoint:
        load_backbone_checkpoint(classifier if classifier is not None else backbone, recipe["backbone_checkpoint"])
    return SemanticFPN(backbone, num_classes, recipe["fpn_channels"], recipe["head_channels"], recipe["dropout"],
                       output_norms=recipe["output_norms"])


class SegmentationTask(Task):
    """Semantic FPN on ``model`` (a timm name, built with features_only) on an ADE20K-layout subset."""

    def __init__(self, name: str, model: str, model_options: dict[str, Any], data: dict[str, Any],
                 crop_size: int, eval_batch_size: int, workers: int, recipe: dict[str, Any] | None = None) -> None:
        super().__init__(name, model, model_options, crop_size, eval_batch_size, workers, {**RECIPE, **(recipe or {})})
        seed = data.get("seed", 0)
        crop, recipe = (crop_size, crop_size), self.recipe
        common = dict(scale=recipe["scale"], eval_resize=recipe["eval_resize"], size_divisor=recipe["size_divisor"])
        train_transform = SegmentationTransform(crop, train=True, ratio_range=tuple(recipe["ratio_range"]),
                                                cat_max_ratio=recipe["cat_max_ratio"],
                                                photometric=recipe["photometric_distortion"], **common)
        self.train = ADE20KSubset(data["root"], "train", images=data.get("images"), seed=seed,
                                  transform=train_transform)
        self.val = ADE20KSubset(data["root"], "val", images=data.get("val_images"), seed=seed,
                                transform=SegmentationTransform(crop, train=False, **common))
        self.num_classes = NUM_CLASSES
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def build_model(self) -> nn.Module:
        return build_segmenter(self.model_name, self.num_classes, self.recipe, self.model_options)

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

