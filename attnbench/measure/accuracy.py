"""Accuracy of a trained model: produced by the training (attnbench/train), declared here for the suites and
the report like every other measure."""

from __future__ import annotations

import json
from typing import Any

from . import Measure, Subject, register_measure


@register_measure
class Accuracy(Measure):
    name = "accuracy"
    kinds = frozenset({"accuracy"})
    on_subject = False

    def measure(self, subject: Subject) -> dict[str, Any]:
        raise TypeError("accuracy is measured by training the case (attnbench.train.run_accuracy_case)")

    def columns(self, metrics: dict[str, Any], images: int) -> dict[str, Any]:
        final, data = metrics.get("final", {}), metrics.get("data", {})
        by_distance = final.get("per_distance") or {}
        return {**{f"bin_{name}": value for name, value in (by_distance.get("bins") or {}).items()},
                "per_distance": json.dumps(by_distance.get("per_distance")) if by_distance else None,
                "top1": final.get("top1"), "top5": final.get("top5"), "miou": final.get("miou"),
                "train_loss": final.get("train_loss"),  # the last epoch's mean training loss
                "pixel_accuracy": final.get("pixel_accuracy"),
                # the weights' moving average (train.model_ema_decay), scored after the last epoch
                "ema_top1": (final.get("ema") or {}).get("top1"), "ema_miou": (final.get("ema") or {}).get("miou"),
                "epochs": len(metrics["history"]) if "history" in metrics else None,
                "train_images": data.get("train", {}).get("images"), "val_images": data.get("val", {}).get("images"),
                "num_classes": data.get("num_classes"),
                "train_minutes": metrics["train_seconds"] / 60 if "train_seconds" in metrics else None,
                "resumed_after_epochs": ", ".join(map(str, metrics.get("resumed_after_epochs") or [])) or None}
