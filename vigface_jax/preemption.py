"""Stopping cleanly when the job is told to: SIGTERM (a Spot/preemptible VM's 30 s notice, a
SLURM time limit, `kill`) and SIGINT (Ctrl-C).

`watch()` (entered by `main` around the task) turns the first signal into a request: the
running job finishes what it is doing and stops at its next safe point, raising `Preempted`,
which `main` reports and turns into exit code `EXIT_PREEMPTED` (75, `EX_TEMPFAIL`: "try again";
rerunning the same command resumes):

* trainers (`train.loop.fit`) finish the current step, write a checkpoint of it, wait until it
  is committed, then stop;
* generation finishes the shard it is drawing (it is renamed into place and recorded in the
  manifest) and stops before the next;
* the pipeline and evaluation stop between units of work.

A second signal exits at once with `128 + signum`, as a shell reports a killed job. That is
safe because nothing is ever left looking complete when it is not: Orbax commits a checkpoint
by renaming its temporary directory, and shards are written under temporary names (a rerun
removes both kinds of leftovers).

Over several processes (`jax.process_count() > 1`) the trainers agree on the step to stop at:
`requested(sync=True)` is an all-gather of each process's flag, called by every process at the
same point of every step, so all of them save the same step together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from absl import logging
import numpy as np

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []  # the signals received since `watch` was entered


class Preempted(RuntimeError):
  """The job stopped at a safe point because it was asked to; rerun to resume (`main` exits
  with `EXIT_PREEMPTED`)."""


def _handler(signum: int, frame) -> None:  # pylint: disable=unused-argument
  name = signal.Signals(signum).name
  if _received:
    sys.stderr.write(f"vigface_jax: second signal ({name}): exiting now; finished checkpoints "
                     "and shards are intact, a rerun resumes from them\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access
  _received.append(signum)
  logging.warning("%s received: stopping at the next safe point (after this step or shard); "
                  "send it again to exit at once", name)
  sys.stderr.write(f"vigface_jax: {name} received: stopping at the next safe point\n")
  sys.stderr.flush()


@contextlib.contextmanager
def watch(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
  """Installs the stop-request handlers for the duration (main thread only; elsewhere, e.g. a
  test runner's worker thread, nothing is installed) and restores the previous ones."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _handler) for s in signals}
  _received.clear()
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _received.clear()


def signal_name() -> str | None:
  """The first signal received, by name, or None."""
  return signal.Signals(_received[0]).name if _received else None


def requested(sync: bool = False) -> bool:
  """Whether a stop was asked for. With `sync` and several processes, whether any process was
  asked (an all-gather: every process must call it at the same point)."""
  local = bool(_received)
  if not sync:
    return local
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
  return bool(np.max(flags))


def check(where: str, sync: bool = False) -> None:
  """Raises `Preempted` if a stop was asked for; `where` says what finished last. With `sync`
  every process stops if any was asked (see `requested`; all must call it at the same point)."""
  if requested(sync):
    if not _received:
      raise Preempted(f"stopped {where}: another process was asked to stop; rerun the same "
                      "command to resume")
    raise Preempted(f"stopped on {signal_name()} {where}; rerun the same command to resume")
