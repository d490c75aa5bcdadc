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
    problems = _misfits(state, model.state_dict())
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state, strict=True)
    return model


def _misfits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The missing, unexpected and mis-shaped keys of ``state`` against ``expected`` (the first few of each),
    or "" when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
              for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    return "; ".join(f"{label} ({len(items)}): {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
                     for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                          ("shape mismatches", shapes)) if items)


def load_backbone_checkpoint(model: nn.Module, path: str | Path,
                             classifier_only: tuple[str, ...] = ("head.", "norm.")) -> nn.Module:
    """Load an ImageNet classification checkpoint into ``model`` used as a dense-prediction backbone: the
    checkpoint's classifier-only entries (``classifier_only`` prefixes: the head and the final norm, which
    BiFormer_mm deletes before loading) are dropped, and every other key must fit exactly (a ``CheckpointError``
    lists what does not: the official loader's ``strict=False`` would silently train from random weights)."""
    path = Path(path)
    state = {key: value for key, value in _state_dict(path).items() if not key.startswith(classifier_only)}
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(classifier_only)}
    problems = _misfits(state, expected)
    if problems:
        raise CheckpointError(f"{path} does not fit the backbone {type(model).__name__}: {problems}")
    model.load_state_dict(state, strict=False)
    return model
