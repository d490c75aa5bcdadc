"""The interface every attention mechanism implements, and the unit its analytic cost is stated in."""

from __future__ import annotations

import abc
import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates (MACs) of one forward pass over one image, split into named parts.

    Part names used across mechanisms: ``qkv`` and ``out_proj`` (linear projections), ``routing``
    (region-to-region affinity of BRA and other content-based selection), ``attn_scores`` (Q·Kᵀ),
    ``attn_values`` (softmax(·)·V), ``local_context`` (depthwise convs such as BRA's LCE / LePE).

    Convention: one MAC is one multiply and one add. ``flops`` is 2 × MACs, the convention of
    ``torch.utils.flop_counter.FlopCounterMode``; the BiFormer and Swin papers print MACs and call them
    "FLOPs" (Swin-T "4.5G" is 4.5 GMACs).
    """

    parts: dict[str, int] = field(default_factory=dict)
    # Parts spent by ops that FlopCounterMode does not count (grid_sample's bilinear taps, for example).
    counter_blind: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        negative = {name: macs for name, macs in self.parts.items() if macs < 0}
        if negative:
            raise ValueError(f"negative MACs {negative}: the sizes they were computed from must be positive")

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def flops(self) -> int:
        return 2 * self.total

    @property
    def counter_visible(self) -> int:
        """MACs of the parts FlopCounterMode can see (convs, linears, matmuls, einsums)."""
        return sum(macs for name, macs in self.parts.items() if name not in self.counter_blind)

    def scaled(self, batch: int) -> MacCount:
        """The count for a batch of ``batch`` images."""
        return MacCount({name: batch * macs for name, macs in self.parts.items()}, self.counter_blind)


class AttentionMechanism(nn.Module, abc.ABC):
    """A token mixer over a 2-D feature map, channels last.

    Built as ``Mechanism(dim, num_heads, **options)``; ``forward`` maps ``x`` of shape (B, H, W, C=dim) to
    the same shape. A mechanism that needs H, W to be multiples of a window or region size either pads
    (and crops its output) or raises a ValueError naming the option and the sizes.
    """

    dim: int
    num_heads: int

    def __init_subclass__(cls, **kwargs) -> None:
        """Every mechanism's ``macs`` and ``keys_per_query`` refuse sizes below 1, in this one place."""
        super().__init_subclass__(**kwargs)
        for name in ("macs", "keys_per_query"):
            if name in cls.__dict__:
                setattr(cls, name, _positive_sizes(cls.__dict__[name]))

    @abc.abstractmethod
    def macs(self, height: int, width: int) -> MacCount:
        """Analytic MACs of one forward pass over one (height × width × dim) image."""

    def keys_per_query(self, height: int, width: int) -> float:
        """Mean number of keys a query attends to (over heads and the H·W real queries): the sparsity the
        mechanism actually has at this size, padding and masks included."""
        raise NotImplementedError(f"{type(self).__name__} does not state keys_per_query")

    def plain(self) -> AttentionMechanism:
        """A copy of this module that runs its plain (reference) path, same parameters and buffers: what its
        fast paths are checked against. Mechanisms with a choice of backends override it (BRA: impl='reference');
        the default is a deep copy, for a mechanism that has only one path."""
        return copy.deepcopy(self)

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this module cannot run on ``device`` in ``dtype`` (empty when it can), as xFormers' ops do."""
        return []

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless ``x`` is (B, H, W, dim) with B, H, W at least 1."""
        if x.dim() != 4 or x.shape[-1] != self.dim or min(x.shape[:3]) < 1:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (B, H, W, {self.dim}) channels-last with B, H, W >= 1, "
                f"got {tuple(x.shape)}"
            )


def _positive_sizes(method):
    """Wrap a ``method(self, height, width)`` so that it raises a ValueError for a size below 1."""

    @functools.wraps(method)
    def checked(self, height: int, width: int):
        if height < 1 or width < 1:
            raise ValueError(f"{type(self).__name__}.{method.__name__}: height and width must be at least 1, "
                             f"got {height} x {width}")
        return method(self, height, width)
    return checked


def check_heads(dim: int, num_heads: int, what: str = "dim") -> int:
    """Return the per-head width ``dim // num_heads``, or raise a ValueError naming both sizes."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{what}={dim} must be divisible by num_heads={num_heads}")
    return dim // num_heads
