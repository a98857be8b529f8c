"""Timing and memory helpers shared by the benchmarks: compile time apart from steady state.

- ``time_compile(fn, *args)``: seconds of the FIRST call (trace + compile + one run), result blocked on.
- ``time_steady(fn, *args, repeats)``: per-call seconds of later calls, after one warm-up call
  (``Steady.last`` keeps the last call's result).
- ``block(x)``: wait for asynchronous work: ``jax.block_until_ready`` on JAX leaves, and
  ``torch.cuda.synchronize()`` when a torch CUDA tensor is among the leaves (torch on CPU is synchronous).
- ``PeakRSS``: a context manager sampling the process resident set size in a thread; ``peak_bytes``
  is the high-water mark above the RSS at entry. On CPU this is the only measure that sees both
  XLA's and torch's allocators (``tracemalloc`` sees neither; ``ru_maxrss`` never goes down).
- ``device_peak_bytes()``: accelerator high-water marks (JAX ``memory_stats()['peak_bytes_in_use']``,
  ``torch.cuda.max_memory_allocated``) where an accelerator exists.

Nothing here imports torch unless torch is already imported by the caller.
"""

import dataclasses
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax


def block(x: Any) -> Any:
    """Wait until every array in ``x`` is computed; return ``x``."""
    leaves = jax.tree.leaves(x)
    if any(isinstance(leaf, jax.Array) for leaf in leaves):
        jax.block_until_ready(x)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and any(
        isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in leaves
    ):
        torch.cuda.synchronize()
    return x


@dataclasses.dataclass(frozen=True)
class Steady:
    """Per-call seconds of ``repeats`` steady-state calls (``last``: the last call's result)."""

    times: tuple[float, ...]
    last: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "mean_s": self.mean, "times_s": list(self.times)}


def time_compile(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds of the first call of ``fn(*args)`` (compile + one run) and its result.

    Subtract a steady-state time to get the compile part alone (``bench_recovery`` reports both).
    """
    t0 = time.perf_counter()
    out = block(fn(*args))
    return time.perf_counter() - t0, out


def time_steady(fn: Callable[..., Any], *args: Any, repeats: int = 3, warmup: int = 1) -> Steady:
    """Per-call seconds of ``repeats`` calls of ``fn(*args)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        block(fn(*args))
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(fn(*args))
        times.append(time.perf_counter() - t0)
    return Steady(tuple(times), out)


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; falls back to the ``ru_maxrss`` high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Process-lifetime peak RSS (``resource.getrusage``; kB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.peak_bytes`` = max RSS during the block minus RSS at entry."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._base = _rss_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_bytes = self._peak - self._base


def device_peak_bytes() -> dict[str, int]:
    """Accelerator memory high-water marks by framework (empty on CPU-only machines)."""
    out: dict[str, int] = {}
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["jax_peak_bytes"] = int(stats["peak_bytes_in_use"])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def reset_device_peaks() -> None:
    """Reset torch's CUDA peak counter (JAX has no reset; its peak is process-lifetime)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
