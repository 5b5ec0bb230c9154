"""Orbax checkpoints of a `TrainState` plus the grain iterator position.

One checkpoint step directory holds two items:
  `state`  the whole `TrainState` (params, optimizer, BN statistics, σ buffer, EMA, RNG,
           step), saved asynchronously, restored directly into its sharded layout;
  `data`   grain's iterator state, one JSON file per process (`grain.checkpoint`), so a
           resumed run sees exactly the batches the uninterrupted run would have seen.
           Restored under another process count (no file for this layout), the position
           is the step itself: the global batches do not depend on the layout
           (`pipeline.GlobalBatchSampler`), so the iterator moves to batch `step`.

`Checkpointer.restore_latest` is what makes every trainer resume automatically from its
workdir. Only steps that finished saving are listed (Orbax writes into a temporary directory
and renames on commit), so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from vigface_jax import config_lib
from vigface_jax import metrics
from vigface_jax.train import state as state_lib


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._reported = False  # a failed save was raised already (close() does not repeat it)
    self._pending: int | None = None  # the asynchronous save not yet known to be committed
    try:
      self._manager = self._open(max_to_keep, async_save)
    except (OSError, ValueError) as e:
      raise metrics.storage_error(self.directory, e, f"checkpoints into {self.directory}") from e

  def _open(self, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: state_lib.TrainState, data_iterator: Any = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (and the iterator position) as checkpoint `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    # Orbax's save first waits for the previous asynchronous one; waiting here instead names
    # that checkpoint, not this one, when its background write is what failed.
    self.wait()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many kinds
      raise self._failed(step, e) from e
    if saved:
      self._pending = step
      logging.info("checkpoint %d -> %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract: state_lib.TrainState,
              data_iterator: Any = None) -> state_lib.TrainState:
    """Restores checkpoint `step` into `abstract`'s shapes and shardings.

    `data_iterator`, if given, is moved to the saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract)}
    relayout = data_iterator is not None and self._written_by_another_layout(step)
    if data_iterator is not None and not relayout:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      # A ConfigError (a ValueError): the command line reports it in one line, exit code 2.
      raise config_lib.ConfigError(
          f"checkpoint {step} in {self.directory} does not match this run's model/optimizer "
          f"({e}); use a new --workdir or the config the checkpoint was written with") from e
    if relayout:
      data_iterator.set_position(step)  # one global batch per step
      logging.info("checkpoint %d was written by another number of processes: the data "
                   "position is set from its step", step)
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return restored["state"]

  def _written_by_another_layout(self, step: int) -> bool:
    """True when step's data item holds other processes' files but none for this layout."""
    data = epath.Path(self.directory) / str(step) / "data"
    if not data.exists():
      return False
    mine = data / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return not mine.exists() and any(p.name.startswith("process_") for p in data.iterdir())

  def restore_latest(self, abstract: state_lib.TrainState, data_iterator: Any = None
                     ) -> state_lib.TrainState | None:
    """The latest checkpoint restored (see `restore`), or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract, data_iterator)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # a background save failed
      raise self._failed(self._pending, e) from e
    self._pending = None

  def _failed(self, step: int | None, e: BaseException) -> metrics.StorageError:
    """The error for a save that failed: which step, and which checkpoint is the last good."""
    try:
      last = self._manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      last = None
    kept = f"step {last}" if last is not None else "none"
    self._reported = True
    return metrics.storage_error(
        self.directory, e, f"checkpoint {step if step is not None else '(in flight)'} into "
        f"{self.directory}; the last committed checkpoint is {kept}")

  def close(self) -> None:
    """Waits for pending saves (a failure raises, unless one was already reported) and closes."""
    try:
      self.wait()
    except metrics.StorageError:
      if not self._reported:
        raise
      logging.warning("checkpointing had already failed; closing without the pending saves")
    finally:
      self._manager.close()
