"""What the training loop needs from a task, and what classification and segmentation share."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from .distributed import World


class Task(abc.ABC):
    """A timm model (by name, with options) trained on ``self.train`` and scored on ``self.val``.

    Subclasses set ``train``, ``val`` (data sets with a ``description()``) and ``num_classes``, and define the
    model, the loss of a batch and the evaluation. ``image_size`` is the classifier's input or the crop size.
    """

    train: Any
    val: Any
    num_classes: int

    def __init__(self, name: str, model: str, model_options: dict[str, Any], image_size: int,
                 eval_batch_size: int, workers: int, recipe: dict[str, Any]) -> None:
        self.name, self.model_name, self.model_options = name, model, model_options
        self.image_size, self.eval_batch_size, self.workers, self.recipe = (image_size, eval_batch_size, workers,
                                                                            recipe)

    @abc.abstractmethod
    def build_model(self) -> nn.Module: ...

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor: ...

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, world: World) -> dict[str, float]: ...

    def description(self) -> dict[str, Any]:
        """The data subsets and the recipe, for the results."""
        return {"train": self.train.description(), "val": self.val.description(), "num_classes": self.num_classes,
                "recipe": self.recipe}

    def sample_input(self, batch: int) -> torch.Tensor:
        """A random batch of the model's input, for its size and speed measures."""
        return torch.randn(batch, 3, self.image_size, self.image_size)
