"""Mechanisms that misbehave on purpose, imported by test suites (``imports: [tests.faulty_mechanisms]``)
to check that the runner records each failure and goes on."""

import os
import time

import torch

import attentions
from attentions import AttentionMechanism, MacCount


class _Base(AttentionMechanism):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.proj = torch.nn.Linear(dim, dim)

    def macs(self, height: int, width: int) -> MacCount:
        return MacCount({"out_proj": height * width * self.dim * self.dim})

    def keys_per_query(self, height: int, width: int) -> float:
        return 0.0


@attentions.register("test_linear")
class Linear(_Base):
    """A linear map (a mechanism that works)."""

    def forward(self, x):
        return self.proj(x)


@attentions.register("test_raises")
class Raises(_Base):
    """Raises in forward."""

    def forward(self, x):
        raise RuntimeError("this mechanism always fails")


@attentions.register("test_nan")
class ReturnsNaN(_Base):
    """Returns NaN."""

    def forward(self, x):
        return self.proj(x) * float("nan")


@attentions.register("test_sleeps")
class Sleeps(_Base):
    """Sleeps ATTNBENCH_TEST_SLEEP_S seconds in every forward."""

    def forward(self, x):
        time.sleep(float(os.environ.get("ATTNBENCH_TEST_SLEEP_S", "0")))
        return self.proj(x)


@attentions.register("test_unsupported")
class Unsupported(_Base):
    """Declares that it cannot run anywhere."""

    def not_supported_reasons(self, device, dtype):
        return [f"no kernel for {device.type}/{dtype}"]

    def forward(self, x):
        return self.proj(x)


@attentions.register("test_backend_refuses")
class BackendRefuses(_Base):
    """Finds out only at run time that no backend fits the input (as bra's dispatcher does)."""

    def forward(self, x):
        raise NotImplementedError("impl='fast' cannot run here: fast: no kernel for this input")


@attentions.register("test_wrong_fast_path")
class WrongFastPath(_Base):
    """A fast path that disagrees with its plain one (``plain()``): a correctness mismatch."""

    def __init__(self, dim: int, num_heads: int, fast: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.fast = fast

    def plain(self):
        plain = WrongFastPath(self.dim, self.num_heads, fast=False)
        plain.load_state_dict(self.state_dict())
        return plain

    def forward(self, x):
        return self.proj(x) + (1.0 if self.fast else 0.0)


@attentions.register("test_wrong_shape")
class WrongShape(_Base):
    """Returns (B, 1, W, C) instead of (B, H, W, C)."""

    def forward(self, x):
        return self.proj(x)[:, :1]
