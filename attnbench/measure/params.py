"""Parameter counts."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Learnable parameters (what papers report as "Params")."""
    return sum(parameter.numel() for parameter in module.parameters())


def state_bytes(module: nn.Module, *tensors) -> int:
    """Bytes held by the module's parameters and buffers and by ``tensors`` (the case's fixed state)."""
    held = [*module.parameters(), *module.buffers(), *tensors]
    return sum(tensor.numel() * tensor.element_size() for tensor in held)
