"""Preemption (`vigface_jax.preemption`): SIGTERM / SIGINT stop a job at its next safe point.

* Training through the command line: SIGTERM sent to a running `configs/fr.py:tiny` job ends it
  with exit code 75 after the current step, with a committed checkpoint of that step; the same
  command then resumes there, and its losses equal an uninterrupted run's, step for step.
* Generation: a SIGTERM that arrives while a shard is being drawn lets that shard finish and
  stops before the next (`Preempted`); the rerun draws only the rest and its shards have the
  checksums of an uninterrupted run.
* A second signal exits at once with 128 + signum.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from conftest import cli_env, fr_tiny_command, stop_and_read
import pytest

from vigface_jax import preemption

_REPO = pathlib.Path(__file__).resolve().parents[1]
_STEPS = 30


def _command(workdir: pathlib.Path) -> list[str]:
  return fr_tiny_command(workdir, _STEPS, "--config.train.checkpoint_every=0")


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out[int(record["step"])] = float(record["train/loss"])
  return out


def _wait_for_step(workdir: pathlib.Path, proc: subprocess.Popen, step: int, timeout: float):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, "the job ended before it could be signalled"
    path = workdir / "metrics.jsonl"
    if path.exists() and any(s >= step for s in _safe_losses(workdir)):
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no step {step} within {timeout} s")


def _safe_losses(workdir):
  try:
    return _losses(workdir)
  except (json.JSONDecodeError, OSError):  # a line being written
    return {}


def test_sigterm_stops_training_after_a_committed_checkpoint_and_the_rerun_resumes(tmp_path):
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  subprocess.run(_command(whole), env=cli_env(), cwd=_REPO, check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_command(cut), env=cli_env(), cwd=_REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(cut, proc, 3, timeout=300)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM received: stopping at the next safe point" in err
  stopped = next(line for line in err.splitlines() if "is committed in" in line)
  step = int(stopped.split("checkpoint ")[1].split()[0])
  assert 3 <= step < _STEPS, stopped
  assert (cut / "checkpoints" / str(step)).is_dir()
  assert not (cut / "export").exists()  # stopped before the end of training
  done = _losses(cut)
  assert max(done) == step  # the step it stopped after is the last one run

  rerun = subprocess.run(_command(cut), env=cli_env(), cwd=_REPO, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming at step {step} of {_STEPS}" in rerun.stderr
  resumed, want = _losses(cut), _losses(whole)
  assert sorted(resumed) == list(range(1, _STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in range(1, _STEPS + 1)],
                             [want[s] for s in range(1, _STEPS + 1)], rtol=1e-6)


def test_a_second_signal_exits_at_once():
  script = textwrap.dedent("""
      import os, signal, sys, time
      from vigface_jax import preemption
      with preemption.watch():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert preemption.requested() and preemption.signal_name() == "SIGTERM"
        print("first handled", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
      print("not reached", flush=True)
      """)
  proc = subprocess.run([sys.executable, "-c", script], env=cli_env(), cwd=_REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr
  assert "first handled" in proc.stdout and "not reached" not in proc.stdout
  assert "second signal (SIGINT): exiting now" in proc.stderr


def test_watch_restores_the_previous_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.watch():
    assert signal.getsignal(signal.SIGTERM) is not before
    assert not preemption.requested()
  assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_generation_finishes_the_shard_and_the_rerun_completes(
    tiny_stage_runs, tiny_generation_reference, tmp_path, monkeypatch):
  import test_generate as helpers  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import store as store_lib  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import task  # pylint: disable=g-import-not-at-top
  config = lambda: helpers._config(tiny_stage_runs, ids_per_shard=1)  # pylint: disable=protected-access
  want = tiny_generation_reference[1]

  cut = str(tmp_path / "cut")
  real_write = store_lib.ShardStore.write_shard
  written = []

  def write_then_signal(self, s, *args, **kwargs):
    out = real_write(self, s, *args, **kwargs)
    written.append(s)
    if len(written) == 1:  # the signal arrives while the next shard is being drawn
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(store_lib.ShardStore, "write_shard", write_then_signal)
  with preemption.watch():
    with pytest.raises(preemption.Preempted, match="stopped on SIGTERM after"):
      task.run(config(), cut)
  monkeypatch.setattr(store_lib.ShardStore, "write_shard", real_write)
  store = store_lib.ShardStore(cut)
  assert len(want) > 2 and 1 <= len(written) < len(want)
  finished = [s for s in range(store.num_shards) if os.path.exists(store.record_path(s))]
  assert finished == sorted(written)  # every shard started was finished, none half-written
  assert not os.path.exists(os.path.join(cut, "manifest.json"))

  summary = task.run(config(), cut)
  assert summary["drawn_this_run"]["dataset"] == 2 * (len(want) - len(written))
  assert helpers._shard_digests(cut) == want  # pylint: disable=protected-access


def test_two_processes_stop_at_the_same_step_when_one_is_signalled(tmp_path):
  """SIGTERM to process 1 of a 2-process stage-1 job: both processes stop after the same step
  (they agree through an all-gather of the stop flag every step), both exit 75, and the
  checkpoint of that step is committed."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  procs, logs = [], []
  for i in range(2):
    env = dict(cli_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    env = {k: v for k, v in env.items() if "_proxy" not in k.lower()}
    log = open(tmp_path / f"process_{i}.log", "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        fr_tiny_command(workdir, 200, "--config.train.checkpoint_every=0"), env=env,
        cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, text=True))
  try:
    _wait_for_step(workdir, procs[0], 3, timeout=300)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=120)
  finally:
    outputs = stop_and_read(procs, logs)
  assert [p.returncode for p in procs] == [preemption.EXIT_PREEMPTED] * 2, outputs[0][-3000:]
  steps = [int(re.search(r"after step (\d+) of 200", out).group(1)) for out in outputs]
  assert steps[0] == steps[1] >= 3, steps
  assert "SIGTERM received" in outputs[1] and "SIGTERM received" not in outputs[0]
  assert "a signal to another process" in outputs[0]
  assert (workdir / "checkpoints" / str(steps[0])).is_dir()
