"""Disk and storage faults: a full disk or an unwritable workdir during a checkpoint, a shard or
a report gives `metrics.StorageError` naming what could not be written, and leaves the previous
checkpoint, the finished shards and the previous report intact; the rerun completes.

Faults are injected where the bytes are written: `ENOSPC` from inside a shard's write (after
some bytes went out) and from a report's fsync, a checkpoint directory that cannot be created
(a file in its way: this suite runs as root, which permission bits do not stop), and a
checkpoint save that fails after earlier ones committed.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vigface_jax import metrics
from vigface_jax.train import checkpoint as checkpoint_lib
from vigface_jax.train import loop

import test_train  # the toy model, config and batches


def _enospc(*_args, **_kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_report_write_fails_cleanly_and_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  metrics.write_json(path, {"a": 1})
  monkeypatch.setattr(os, "fsync", _enospc)  # the new bytes are in the temporary file, then
  with pytest.raises(metrics.StorageError, match=r"^cannot write .*summary.json \(No space left"
                     ) as err:
    metrics.write_json(path, {"a": 2})
  assert err.value.errno == errno.ENOSPC and str(err.value).endswith("the same command")
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


def test_checkpoint_save_failure_names_the_step_and_keeps_the_last_committed(tmp_path,
                                                                              monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      _enospc()
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(metrics.StorageError,
                     match=r"checkpoint 4 into .*the last committed checkpoint is step 3"):
    loop.fit(test_train._toy_config(6), str(tmp_path), mesh=test_train._mesh(),  # pylint: disable=protected-access
             create_model=test_train._Toy, loss_fn=test_train._toy_loss,  # pylint: disable=protected-access
             data=test_train._toy_batches([1] * 6), images_per_step=4)  # pylint: disable=protected-access
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  try:
    assert ckpt.latest_step() == 3
  finally:
    ckpt.close()
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
  # The rerun (space freed) resumes from step 3 and finishes.
  result = loop.fit(test_train._toy_config(6), str(tmp_path), mesh=test_train._mesh(),  # pylint: disable=protected-access
                    create_model=test_train._Toy, loss_fn=test_train._toy_loss,  # pylint: disable=protected-access
                    data=test_train._toy_batches([1] * 3), images_per_step=4)  # pylint: disable=protected-access
  assert result.start_step == 3 and int(result.state.step) == 6


def test_an_unwritable_checkpoint_directory_is_named(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(metrics.StorageError, match=r"cannot write .*checkpoints"):
    loop.fit(test_train._toy_config(3), str(tmp_path), mesh=test_train._mesh(),  # pylint: disable=protected-access
             create_model=test_train._Toy, loss_fn=test_train._toy_loss,  # pylint: disable=protected-access
             data=test_train._toy_batches([1] * 3), images_per_step=4)  # pylint: disable=protected-access
  assert (tmp_path / "checkpoints").read_text() == "not a directory"


def test_a_shard_write_that_runs_out_of_space_keeps_the_finished_ones(
    tiny_stage_runs, tiny_generation_reference, tmp_path, monkeypatch):
  import test_generate as helpers  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import store as store_lib  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import task  # pylint: disable=g-import-not-at-top
  config = lambda: helpers._config(tiny_stage_runs, ids_per_shard=1)  # pylint: disable=protected-access
  want = tiny_generation_reference[1]

  real = store_lib._write_npz  # pylint: disable=protected-access
  calls = []

  def write_npz(f, arrays):
    calls.append(1)
    if len(calls) == 3:  # the third shard: half of it goes out, then the disk is full
      f.write(b"PK\x03\x04 half a shard")
      _enospc()
    return real(f, arrays)

  cut = tmp_path / "cut"
  monkeypatch.setattr(store_lib, "_write_npz", write_npz)
  with pytest.raises(metrics.StorageError, match=r"cannot write .*shard-00002\.npz \(No space"):
    task.run(config(), str(cut))
  monkeypatch.setattr(store_lib, "_write_npz", real)
  store = store_lib.ShardStore(str(cut))
  finished = [s for s in range(store.num_shards) if os.path.exists(store.record_path(s))]
  assert finished == [0, 1]
  assert not [f for _, _, files in os.walk(cut) for f in files if ".tmp-" in f]
  assert not (cut / "manifest.json").exists()
  summary = task.run(config(), str(cut))  # space freed: the rerun draws the rest
  assert summary["drawn_this_run"]["dataset"] == 2 * (len(want) - 2)
  assert helpers._shard_digests(str(cut)) == want  # pylint: disable=protected-access


def test_the_command_line_exits_74_naming_the_checkpoint(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  from conftest import _REPO, cli_env, fr_tiny_command  # pylint: disable=g-import-not-at-top
  tmp_path.joinpath("checkpoints").write_text("not a directory")
  proc = subprocess.run(fr_tiny_command(tmp_path, 2), env=cli_env(), cwd=_REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 74, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]  # the job's own one-line message, not a traceback
  assert last.startswith("vigface_jax: ") and "cannot write checkpoint 2 into" in last, last


# The child: a `python -m vigface_jax.main` whose writes the kernel refuses from the k-th
# checkpoint on (RLIMIT_FSIZE: a write that would grow a file past the limit fails with EFBIG
# and SIGXFSZ is ignored), so the failure comes from inside tensorstore's own C++ writes, as
# a full disk's would, not from a patched Python call.
_FSIZE_CHILD = r"""
import resource, runpy, signal, sys
import orbax.checkpoint as ocp
limit, at = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
real = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == at:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return real(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.argv = ["vigface_jax.main"] + sys.argv[3:]
runpy.run_module("vigface_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_filesystem_refusing_tensorstores_writes_keeps_the_last_checkpoint(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import _REPO, cli_env, fr_tiny_command  # pylint: disable=g-import-not-at-top
  command = fr_tiny_command(tmp_path, 4, "--config.train.checkpoint_every=1")
  # Every file of a tiny stage-1 checkpoint's array data is above 32 KiB (its _METADATA,
  # _sharding and OCDBT data files), so checkpoint 3 cannot be written.
  child = [sys.executable, "-c", _FSIZE_CHILD, str(32 << 10), "3", *command[3:]]
  proc = subprocess.run(child, env=cli_env(), cwd=_REPO, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 74, proc.stderr[-3000:]
  # One line of ours. (tensorstore's abandoned writes may print "Event loop is closed"
  # tracebacks around it while the process exits: third-party noise, timing-dependent.)
  ours = [l for l in proc.stderr.splitlines() if l.startswith("vigface_jax: ")]
  assert len(ours) == 1 and ours[0].startswith("vigface_jax: cannot write checkpoint 3 into"), ours
  assert "the last committed checkpoint is step 2" in ours[0] and "File too large" in ours[0]
  committed = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert committed == [1, 2]
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
  floats = [x for x in jax.tree.leaves(restored) if jax.numpy.issubdtype(x.dtype, np.floating)]
  assert floats and all(np.isfinite(np.asarray(x)).all() for x in floats)
  # Space back: the same command resumes from step 2 and finishes.
  proc = subprocess.run(command, env=cli_env(), cwd=_REPO, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]
  # The first run trained on through steps 3 and 4 (checkpoint 3 failed in the background and
  # surfaced at the next save); the rerun, from checkpoint 2, computes the same two losses.
  assert [r["step"] for r in logged] == [1, 2, 3, 4, 3, 4]
  assert [r["train/loss"] for r in logged[2:4]] == [r["train/loss"] for r in logged[4:]]
  assert json.loads((tmp_path / "summary.json").read_text())["task"] == "fr"  # it finished
  assert 4 in [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
