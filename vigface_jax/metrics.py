"""What every job leaves in its workdir (DESIGN §5): metrics.jsonl, TensorBoard events, summary.

Only process 0 writes; on other processes every method is a no-op, so callers never branch.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np


def _scalar(value: Any) -> float | int | None:
  """A JSON/TensorBoard scalar from a Python, numpy or 0-d jax value (None if not scalar)."""
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    return _scalar(np.asarray(value).item())
  return None


def _json_ready(value: Any) -> Any:
  """Converts numpy/jax values inside nested containers to plain Python for json.dump."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)  # JSON has booleans; only TensorBoard needs them as numbers
  scalar = _scalar(value)
  if scalar is not None:
    return None if isinstance(scalar, float) and not math.isfinite(scalar) else scalar
  if isinstance(value, Mapping):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return _json_ready(np.asarray(value).tolist())
  return value


class StorageError(OSError):
  """An output could not be written (disk full, read-only or unwritable workdir, a bucket
  refusing the write). Nothing was left half-written; earlier outputs are intact."""

  def __str__(self) -> str:  # the message alone: no "[Errno N]" prefix, no repeated path
    return str(self.strerror)


def storage_error(path: Any, e: BaseException, what: str = "") -> StorageError:
  """The `StorageError` for a failed write of `path` (`what` says what it was)."""
  reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
  return StorageError(getattr(e, "errno", None) or 0,
                      f"cannot write {what or os.fspath(path)} ({reason}); nothing was left "
                      "half-written and earlier checkpoints, shards and reports are intact: "
                      "free space or make the workdir writable, then rerun the same command",
                      os.fspath(path))


def _fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable (best effort: not every filesystem allows it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


TEMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp-[0-9a-f]+$")  # what `temp_path` names


def temp_path(path: str) -> str:
  """A fresh temporary name beside `path`: `.<name>.tmp-<hex>` (what `cleanup` removes)."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
  """Removes the temporary files a killed `atomic_write` left directly in `directory`
  (`.<name>.tmp-<hex>`); returns their paths. Call it before this process writes there."""
  directory = os.fspath(directory)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  removed = [os.path.join(directory, n) for n in names if TEMP_RE.match(n)]
  for path in removed:
    if os.path.isfile(path):
      os.remove(path)
  return removed


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Any], None]) -> None:
  """Writes `data` (or calls `data(file)`) into a temporary file beside `path`, fsyncs it and
  renames it into place; a failed write removes it and raises `StorageError`."""
  path = os.fspath(path)
  tmp = temp_path(path)
  try:
    with open(tmp, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise storage_error(path, e) from e
    raise
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str | os.PathLike, content: Any) -> None:
  """Writes JSON atomically (`atomic_write`): a reader never sees half a file, and a failed
  write (StorageError) leaves the previous file as it was."""
  atomic_write(path, json.dumps(_json_ready(content), indent=2, sort_keys=True) + "\n")


class MetricWriter:
  """Scalars to `metrics.jsonl`, TensorBoard event files and the log, from process 0 only."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.fspath(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(self.workdir, exist_ok=True)
      # Imported here: tensorboardX pulls in protobuf, which pure data jobs need not load.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=self.workdir)
      self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (name → number) at `step`; non-scalar values are skipped."""
    if not self.enabled:
      return
    clean = {k: s for k, v in scalars.items() if (s := _scalar(v)) is not None}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._jsonl.write(json.dumps(_json_ready({"step": int(step), **clean})) + "\n")
    self._jsonl.flush()
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in clean.items()))

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Logs a uint8 `[height, width, 3]` image to TensorBoard."""
    if self.enabled:
      self._tb.add_image(name, np.asarray(image), global_step=step, dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled and self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_summary(workdir: str | os.PathLike, summary: Mapping[str, Any]) -> None:
  """Writes the job's final figures to `summary.json` (process 0 only)."""
  if jax.process_index() == 0:
    write_json(os.path.join(os.fspath(workdir), "summary.json"), summary)
