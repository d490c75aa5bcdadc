"""The environment a result was measured in: stored with every run and every record."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import attnbench
from attentions import huge_pages as thp
from attentions.registry import ENTRY_POINT_GROUP

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_output(*args: str, root: Path | None = None) -> str | None:
    """A git command's output in the checkout ``root`` (default: the one attnbench runs from); None outside a
    checkout (an installed copy) or when git fails."""
    root = root or REPO_ROOT
    if not (root / ".git").exists():
        return None
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def plugin_versions() -> dict[str, str | None]:
    """Every distribution that registers mechanisms through the entry-point group, with its version."""
    found: dict[str, str | None] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution = entry_point.dist
        if distribution is not None:
            found[distribution.metadata["Name"]] = distribution.version
    return found


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# the glibc malloc settings that change how often freed memory goes back to the system (and is page-faulted in again
# by the next large allocation): the environment variables of glibc's mallopt parameters and their tunables form
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                      "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")


def allocator() -> str:
    """The C allocator behind torch's CPU tensors, in one line: a preloaded jemalloc / tcmalloc / mimalloc, or the C
    library's malloc with the settings given in the environment ("default settings" when none is).

    On CPU it changes timings: with glibc's defaults, multi-MB tensors freed at the end of one op are often handed
    back to the system and page-faulted in again by the next (measured: the official BiFormer-T ran inference 1.86×
    faster with MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ raised; README, *The allocator*)."""
    preloaded = thp.preloaded_allocator()
    if preloaded:
        return f"{preloaded} (LD_PRELOAD={os.environ['LD_PRELOAD']})"
    library = " ".join(platform.libc_ver()).strip() or "C library"
    settings = [f"{key}={os.environ[key]}" for key in MALLOC_ENVIRONMENT if os.environ.get(key)]
    return f"{library} malloc, {' '.join(settings) or 'default settings'}"


def huge_pages() -> str:
    """Where large CPU buffers get transparent huge pages, in one line: the kernel's THP mode and defrag policy,
    whether attentions' native BRA path puts its large buffers on them here (``attentions/huge_pages.py``: off by
    default; on with ``ATTENTIONS_HUGE_PAGES=1`` where the allocator does not keep large blocks in its heap), and
    PyTorch's process-wide ``THP_MEM_ALLOC_ENABLE`` when set.

    On CPU it changes timings as the allocator does: a fresh multi-MB buffer costs one page fault per 4 KiB without
    huge pages and one per 2 MiB with them."""
    mode, defrag = thp.thp_setting("enabled"), thp.thp_setting("defrag")
    native = "on" if thp.advised(thp.MIN_BYTES) else "off"
    torch_wide = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return (f"transparent huge pages {mode or 'not available'} (defrag {defrag or '?'}), "
            f"native BRA buffers {native}" + (f", THP_MEM_ALLOC_ENABLE={torch_wide}" if torch_wide else ""))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device, threads and numerics flags; git sha and whether the code had uncommitted changes (changes
    to tracked files outside results/)."""
    cuda = device == "cuda" and torch.cuda.is_available()
    sha = git_output("rev-parse", "HEAD")
    # results/ holds measurements, not code: a resumed run appends to its committed records.jsonl, and that must
    # not mark the code it runs as uncommitted
    status = git_output("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results") \
        if sha else None
    return {
        "attnbench": attnbench.__version__,
        "git_sha": sha or "unknown",  # "unknown": not run from a git checkout (e.g. a pip-installed copy)
        "git_dirty": "unknown" if status is None else bool(status),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"), "timm": _version("timm"), "xformers": _version("xformers"),
        "natten": _version("natten"), "plugins": plugin_versions(),
        "load_average": load_average(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        "huge_pages": huge_pages(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "hostname": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
