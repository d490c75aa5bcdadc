"""Running a batch of independent images in cache-sized groups, and over worker threads in inference.

BRA's ops (and those of a BiFormer block) act on each image alone, and on CPU the whole-batch versions are many
small memory-bound ops: each is forked over the OpenMP threads and joined again, and each fresh multi-MB buffer
is page-faulted anew. Two ways around it, both computing the same function image by image:

* **groups**: images run a few at a time, so a group's intermediates stay in cache and are reused from the heap;
* **workers**: in inference (an eval-mode module, grad disabled) with N > 1 intra-op threads
  (``torch.get_num_threads()``), the batch is cut into N parts, each run in groups by its own worker thread with
  one intra-op thread. The threads then work on different images with no join per op.

Workers are used only where the caller allows them (eval mode: a train-mode module may draw random numbers,
e.g. DropPath, whose order threads would scramble) and where work on another thread would not escape it: not
with grad enabled (autograd), under autocast, under a dispatch or function mode (FLOP counters, the memory
tracker of attnbench/measure/memory.py: they see their own thread only, so under them the batch runs on the
caller's thread), under the profiler, inside a functorch transform (vmap, grad), while tracing or compiling, off
CPU, inside a worker, while the interpreter shuts down, or where ATen's parallel backend is not OpenMP (there
``torch.set_num_threads`` is process-wide, not per thread). Forward hooks of modules run inside ``fn`` fire once
per group, from the worker threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from . import huge_pages
from ._common import aten_watcher

# Groups on the caller's thread pay off single-threaded but cost 2–5× at 2 threads on a loaded machine (many
# small parallel ops wait on descheduled threads; BiFormer-T batch 4 inference 1.9 s grouped against 0.41 s
# whole, load 4 on 2 cores): without workers, groups are used only up to this many intra-op threads.
GROUP_MAX_THREADS = 1
_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
# one pool per (process, thread count): a fork builds its own; pools of other counts stay, idle
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_in_worker = threading.local()
_workers_off = 0  # how many ``no_workers`` blocks are open


@contextlib.contextmanager
def no_workers() -> Iterator[None]:
    """Within the block, no batch goes to worker threads (in any thread): it runs as if they were not usable, whole
    above ``GROUP_MAX_THREADS`` intra-op threads. For timing the two paths against each other."""
    global _workers_off
    with _pools_lock:
        _workers_off += 1
    try:
        yield
    finally:
        with _pools_lock:
            _workers_off -= 1


def _start_worker() -> None:
    """Give a worker thread one intra-op thread, for good: ATen initialises a thread's count lazily, from the
    process default, at its first parallel op, so that is done first and then overridden."""
    _in_worker.active = True
    torch.get_num_threads()
    torch.set_num_threads(1)


def _worker_pool(count: int) -> ThreadPoolExecutor:
    """``count`` threads that each run ATen with one intra-op thread (per thread under OpenMP)."""
    key = (os.getpid(), count)
    with _pools_lock:
        if key not in _pools:
            pool = ThreadPoolExecutor(count, thread_name_prefix="attentions-image", initializer=_start_worker)
            started = threading.Barrier(count)
            list(pool.map(lambda _: started.wait(), range(count)))  # every worker exists and has one thread
            # set_num_threads(1) also set the default that threads started later inherit: give it back (a thread
            # whose first ATen op fell between the two keeps one thread)
            torch.set_num_threads(count)
            _pools[key] = pool
        return _pools[key]


def workers_usable(x: torch.Tensor) -> bool:
    """Whether a batch ``x`` may be split over worker threads, as far as the context goes (see the module
    docstring; the caller's own condition, eval mode, is ``by_image``'s ``allow_workers``)."""
    return (_OPENMP and not _workers_off and x.device.type == "cpu" and x.shape[0] > 1 and torch.get_num_threads() > 1
            and not getattr(_in_worker, "active", False)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.autograd.profiler._is_profiler_enabled and aten_watcher() is None)


def _group_size(bytes_per_image: float, budget: float) -> int:
    """Images per group: as many as fit in ``budget`` bytes, at least one."""
    return max(1, int(budget // bytes_per_image))


def in_groups(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bytes_per_image: float,
              budget: float) -> torch.Tensor:
    """``fn(x)`` for a batch ``x`` (B, ...) of independent images, computed as ``torch.cat`` of ``fn`` on groups of
    images whose ``bytes_per_image`` fit in ``budget`` bytes (at least one image a group)."""
    step = _group_size(bytes_per_image, budget)
    if step >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(group) for group in x.split(step)])


class _BatchOutput:
    """The whole batch's output, allocated by the first group to finish (its rows show the shape, dtype and memory
    layout: a channels-last block output stays channels-last); every group copies its rows in at its offset, one
    copy per image where concatenating the groups of a worker and then the workers' parts could make two."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.tensor: torch.Tensor | None = None
        self._lock = threading.Lock()

    def put(self, start: int, images: int, rows: torch.Tensor) -> None:
        """Copy ``rows``, the output of images ``start`` … ``start + images - 1``, into the batch output."""
        with self._lock:
            if self.tensor is None:
                self.tensor = _batch_like(rows, self.batch)
        if rows.shape[0] != images or rows.shape[1:] != self.tensor.shape[1:] or rows.dtype != self.tensor.dtype:
            raise RuntimeError(f"by_image: a group of {images} images gave an output of {tuple(rows.shape)} "
                               f"{rows.dtype}, which does not match the batch's {tuple(self.tensor.shape)} "
                               f"{self.tensor.dtype}")
        self.tensor[start:start + images].copy_(rows)


def _batch_like(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """An empty (batch, *rows.shape[1:]) tensor whose dimensions lie in memory in the order of ``rows``' strides
    (a permuted view of a dense tensor, e.g. NCHW over NHWC memory, gives the same permutation), else contiguous;
    from ``huge_pages.empty`` (on huge pages where switched on and large)."""
    order = sorted(range(rows.dim()), key=lambda dim: (-rows.stride(dim), dim))  # outermost in memory first
    dense = rows.permute(order)
    if order[0] != 0 or not dense.is_contiguous():
        return huge_pages.empty((batch, *rows.shape[1:]), rows.dtype)
    batch_dense = huge_pages.empty((batch, *dense.shape[1:]), rows.dtype)
    return batch_dense.permute([order.index(dim) for dim in range(rows.dim())])


def _on_workers(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bytes_per_image: float,
                budget: float) -> torch.Tensor:
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()
    step = _group_size(bytes_per_image, budget)
    output = _BatchOutput(x.shape[0])

    def run_part(start: int, part: torch.Tensor) -> None:
        # inference_mode(False) would enable grad, so it goes first
        with torch.inference_mode(inference), torch.no_grad():
            for offset, group in zip(range(0, part.shape[0], step), part.split(step), strict=True):
                output.put(start + offset, group.shape[0], fn(group))

    parts = x.tensor_split(min(threads, x.shape[0]))
    starts = [sum(part.shape[0] for part in parts[:i]) for i in range(len(parts))]
    pool = _worker_pool(threads)
    futures: list[Future] = []
    try:
        for start, part in zip(starts, parts, strict=True):
            futures.append(pool.submit(run_part, start, part))
    except RuntimeError:  # the interpreter is shutting down and takes no new work: the rest runs here
        pass
    try:
        for start, part in zip(starts[len(futures):], parts[len(futures):], strict=True):
            run_part(start, part)
        for future in futures:
            future.result()
    except BaseException:  # an error, Ctrl-C or a timeout: no part may outlive the call
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    assert output.tensor is not None  # every part has at least one image
    return output.tensor


def by_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bytes_per_image: float,
             budget: float, allow_workers: bool = True) -> torch.Tensor:
    """``fn(x)`` for a batch ``x`` (B, ...) whose images ``fn`` treats independently, run the fastest way the
    context allows: over worker threads in groups (if ``allow_workers`` and ``workers_usable``), in groups on
    this thread (single-threaded), or whole."""
    if allow_workers and workers_usable(x):
        return _on_workers(fn, x, bytes_per_image, budget)
    if torch.get_num_threads() <= GROUP_MAX_THREADS:
        return in_groups(fn, x, bytes_per_image, budget)
    return fn(x)
