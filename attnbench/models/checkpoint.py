"""Loading official BiFormer checkpoints (a local ``.pth`` whose ``model`` entry is the state dict)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that does not fit the model: the message says what is wrong."""


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as error:  # unpickling errors of every kind
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint["state_dict"]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    keys = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' entry, found {keys}")


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` with strict key and shape checks; a ``CheckpointError`` lists the missing,
    unexpected and mis-shaped keys (the first few of each) when it does not fit."""
    path = Path(path)
    state = _state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
              for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    problems = [f"{label} ({len(items)}): {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", shapes)) if items]
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
