"""How a case ended: the one definition the worker, the runner, the records and the reports share."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """The end of one case. ``ok`` is the only one with figures; ``unsupported`` is a refusal, not a failure."""

    OK = "ok"
    OOM = "oom"  # out of memory (the allocator said so)
    ERROR = "error"  # an exception, or a process that died
    TIMEOUT = "timeout"  # no result within the case's timeout_s
    NAN = "nan"  # NaN or Inf in the output or a gradient, on random input
    MISMATCH = "mismatch"  # the output differs from the float64 plain path beyond the dtype's tolerance
    UNSUPPORTED = "unsupported"  # the mechanism or backend declares it cannot run this input (with its reasons)
    KILLED = "killed"  # the case process ended by a signal from outside (SIGKILL, SIGTERM, ...): the message names it

    @property
    def failed(self) -> bool:
        """True for an outcome that makes a run exit non-zero (every status but ok and unsupported)."""
        return self not in (Status.OK, Status.UNSUPPORTED)

    @property
    def cell(self) -> str:
        """What a report cell says instead of a figure."""
        return _CELLS[self]


_CELLS = {Status.OK: "", Status.OOM: "OOM", Status.ERROR: "ERROR", Status.TIMEOUT: "TIMEOUT", Status.NAN: "NaN",
          Status.MISMATCH: "MISMATCH", Status.UNSUPPORTED: "UNSUPPORTED",
          Status.KILLED: "KILLED"}
