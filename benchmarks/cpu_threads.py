"""Shared by the JAX-vs-PyTorch benchmarks: CPU pinning, call timing, the run's environment.

Importing this module pins the process to `--threads=N` CPUs (read from `sys.argv`, before
absl parses flags): XLA:CPU sizes its thread pool from the CPUs the process may use, so this
must happen before jax starts. Import it before jax.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable


def _early_threads(default: int = 2) -> int:
  """`--threads` read before absl parses flags: the CPU set must be fixed before jax starts."""
  for arg in sys.argv[1:]:
    if arg.startswith("--threads="):
      return int(arg.split("=", 1)[1])
  return default


THREADS_EARLY = _early_threads()
if hasattr(os, "sched_setaffinity"):
  _cpus = sorted(os.sched_getaffinity(0))
  if THREADS_EARLY < len(_cpus):
    os.sched_setaffinity(0, _cpus[:THREADS_EARLY])


def time_calls(fn: Callable[[], Any], n: int) -> tuple[list[float], float]:
  """Wall seconds of `n` calls, and this process's CPU seconds per wall second over them."""
  times = []
  cpu0 = time.process_time()
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times, (time.process_time() - cpu0) / sum(times)


def environment(torch_threads: int) -> dict[str, Any]:
  """`xla_flags`, `torch_threads` and `affinity` (CPUs this process may use) of the run."""
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch_threads,
          "affinity": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else None)}
