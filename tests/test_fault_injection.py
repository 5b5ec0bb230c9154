"""Crash consistency by fault injection: SIGKILL at chosen and random moments, then rerun.

Stage 1 (`configs/fr.py:tiny` through the command line, asynchronous checkpoints every 3 steps)
is killed `_KILLS` times in one workdir, each time by SIGKILL (no handler runs), with a fixed
seed: half of the kills land while Orbax is writing a checkpoint (its temporary directory
exists), the others at a random step and a random moment within it. After every kill the test
checks that the next run resumes from exactly the last step Orbax committed (a partial one is
never taken); in the end
the job completes, and every loss it logged across all runs (steps redone after a kill
included) equals the uninterrupted run's loss at that step.

Generation (`configs/generate.py:tiny`, one identity per shard) is killed `_GEN_KILLS` times
the same way, twice while a file is being written under its temporary name; the rerun's
shards have the uninterrupted run's checksums. The outcome counts are printed
(`pytest -s`) and asserted; README's "Reliability" section quotes them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import cli_env, fr_tiny_command

_REPO = pathlib.Path(__file__).resolve().parents[1]
_STEPS = 60
_KILLS = 6
_SEED = 20261201


def _command(workdir: pathlib.Path) -> list[str]:
  return fr_tiny_command(workdir, _STEPS, "--config.train.checkpoint_every=3",
                         "--config.train.keep_checkpoints=2",
                         "--config.train.async_checkpoint=True")


def _loss_lines(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, loss) of every complete line of metrics.jsonl, in order (repeats included)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # the line the kill cut off
      continue
    if "train/loss" in record:
      out.append((int(record["step"]), float(record["train/loss"])))
  return out


def _latest(workdir: pathlib.Path) -> int | None:
  """The last committed checkpoint step: Orbax writes a step under a temporary name and
  renames it to `<step>` when committed, which is what `Checkpointer.latest_step` lists. Read
  from the directory, not through a CheckpointManager: opening one here would start its own
  clean-up of temporary directories beside the job's."""
  root = workdir / "checkpoints"
  steps = [int(d) for d in os.listdir(root) if d.isdigit()] if root.exists() else []
  return max(steps) if steps else None


def _temporary_checkpoints(workdir: pathlib.Path) -> set[str]:
  """Orbax's temporary step directories (a checkpoint being written, or one a kill cut off)."""
  root = workdir / "checkpoints"
  return {name for name in os.listdir(root) if "tmp" in name} if root.exists() else set()


def _kill_once(workdir: pathlib.Path, rng: np.random.Generator, during_save: bool) -> dict:
  """Starts the job, kills it at the chosen moment; returns what happened."""
  committed_before = _latest(workdir)
  log = open(workdir.parent / f"{workdir.name}.log", "w+")
  leftovers = _temporary_checkpoints(workdir)  # cut off by the last kill: not this run's save
  proc = subprocess.Popen(_command(workdir), env=cli_env(), cwd=_REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  before = _loss_lines(workdir)
  done_before = max((s for s, _ in before), default=0)
  # A few steps past what earlier runs logged (never the last ones): the kills spread over the
  # run, and each lands in training the rerun has not done before.
  target = min(done_before + int(rng.integers(1, 8)), _STEPS - 2) if not during_save else None
  extra = float(rng.uniform(0.0, 0.05))
  deadline = time.monotonic() + 300
  killed, in_save = False, False
  while time.monotonic() < deadline and proc.poll() is None:
    if during_save:
      if _temporary_checkpoints(workdir) - leftovers:  # this run is writing a checkpoint
        proc.send_signal(signal.SIGKILL)
        killed, in_save = True, True
        break
    elif any(s >= target for s, _ in _loss_lines(workdir)[len(before):]):  # this run's lines
      time.sleep(extra)
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.002 if during_save else 0.01)
  proc.wait(timeout=60)
  log.seek(0)
  text = log.read()
  log.close()
  resumed = re.search(r"resuming at step (\d+)", text)
  return {"killed": killed and proc.returncode == -signal.SIGKILL, "in_save": in_save,
          "resumed_from": int(resumed.group(1)) if resumed else None,
          "committed_before": committed_before, "returncode": proc.returncode, "log": text}


def test_sigkill_at_random_moments_and_during_checkpoint_saves_then_exact_resume(tmp_path):
  whole = tmp_path / "whole"
  subprocess.run(_command(whole), env=cli_env(), cwd=_REPO, check=True, capture_output=True,
                 timeout=600)
  want = dict(_loss_lines(whole))
  assert sorted(want) == list(range(1, _STEPS + 1))

  work = tmp_path / "killed"
  rng = np.random.default_rng(_SEED)
  outcomes = []
  for i in range(_KILLS):
    if max((s for s, _ in _loss_lines(work)), default=0) >= _STEPS - 3:
      break  # too close to the end to land another kill in training
    outcome = _kill_once(work, rng, during_save=(i % 2 == 0))
    # A partial checkpoint (the kill may have cut one) is never listed as a step.
    latest = _latest(work)
    steps_on_disk = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) \
        if (work / "checkpoints").exists() else []
    outcome.update(latest_after=latest, steps_on_disk=steps_on_disk)
    if outcome["committed_before"] is not None:  # this run resumed from the last committed one
      assert outcome["resumed_from"] == outcome["committed_before"], (
          outcome["returncode"], outcome["log"][-3000:])
    outcomes.append(outcome)

  final = subprocess.run(_command(work), env=cli_env(), cwd=_REPO, capture_output=True, text=True,
                         timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  last = _latest(work)
  if outcomes[-1]["latest_after"] is not None:
    assert f"resuming at step {outcomes[-1]['latest_after']} " in final.stderr
  assert last == _STEPS

  # Every logged loss, across all runs and steps redone after a kill, is the uninterrupted one.
  lines = _loss_lines(work)
  assert {s for s, _ in lines} == set(range(1, _STEPS + 1))
  got = np.array([v for _, v in lines])
  np.testing.assert_allclose(got, [want[s] for s, _ in lines], rtol=1e-6)

  kills = sum(o["killed"] for o in outcomes)
  in_save = sum(o["in_save"] for o in outcomes)
  resumes = sum(o["resumed_from"] is not None for o in outcomes) + 1
  redone = len(lines) - _STEPS
  print(f"fault injection: {kills} of {_KILLS} SIGKILLs landed ({in_save} during a checkpoint "
        f"save), {resumes} resumes from the last committed checkpoint, {redone} steps redone, "
        f"all {len(lines)} logged losses equal the uninterrupted run's")
  assert kills >= _KILLS - 1, [(o["killed"], o["in_save"], o["returncode"]) for o in outcomes]
  assert in_save >= 2, [o["in_save"] for o in outcomes]
  assert redone > 0


_GEN_KILLS = 3


def _gen_command(runs: dict[str, str], workdir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "vigface_jax.main", "--config=configs/generate.py:tiny",
          f"--workdir={workdir}", f"--config.stage1.workdir={runs['stage1']}",
          f"--config.stage2.workdir={runs['stage2']}",
          f"--config.audit.encoders=('{runs['auditor']}',)", "--config.ids_per_shard=1"]


def _temporaries(workdir: pathlib.Path) -> list[str]:
  """Files written under a temporary name (`.<name>.tmp-<id>`) anywhere in the workdir."""
  return [os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files
          if ".tmp-" in f]


def _finished_shards(workdir: pathlib.Path) -> int:
  shards = workdir / "shards"
  return len([f for f in os.listdir(shards) if re.fullmatch(r"shard-\d+\.json", f)]) \
      if shards.exists() else 0


def test_sigkill_during_generation_then_the_same_checksums(tiny_stage_runs,
                                                           tiny_generation_reference, tmp_path):
  """Generation killed while a file (a shard, its record, the spec) is being written under its
  temporary name (twice) and at a random moment, then rerun: the dataset's shards have the
  uninterrupted run's checksums, nothing partial is ever listed or exported, no temporary file
  survives."""
  import test_generate as helpers  # pylint: disable=g-import-not-at-top
  whole, want = tiny_generation_reference

  work = tmp_path / "killed"
  rng = np.random.default_rng(_SEED)
  outcomes = []
  for i in range(_GEN_KILLS):
    leftovers = set(_temporaries(work))  # cut off by the last kill: not this run's writes
    proc = subprocess.Popen(_gen_command(tiny_stage_runs, work), env=cli_env(), cwd=_REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    during_write = i < 2
    # Kill after one more finished shard or two, never after the last: the job must still be
    # drawing, or it could finish before the kill.
    wait_for = min(_finished_shards(work) + int(rng.integers(0, 2)), len(want) - 2)
    in_write, deadline = False, time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
      if during_write and set(_temporaries(work)) - leftovers:
        proc.send_signal(signal.SIGKILL)
        in_write = True
        break
      if not during_write and _finished_shards(work) > wait_for:
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.002)
    proc.wait(timeout=60)
    outcomes.append({"killed": proc.returncode == -signal.SIGKILL, "in_write": in_write,
                     "left_partial": bool(_temporaries(work))})
    assert not (work / "manifest.json").exists()  # never looks complete

  final = subprocess.run(_gen_command(tiny_stage_runs, work), env=cli_env(), cwd=_REPO,
                         capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert helpers._shard_digests(str(work)) == want  # pylint: disable=protected-access
  assert not _temporaries(work)
  manifest = json.loads((work / "manifest.json").read_text())
  assert manifest["shards"] == json.loads((whole / "manifest.json").read_text())["shards"]
  kills = sum(o["killed"] for o in outcomes)
  print(f"generation fault injection: {kills} of {_GEN_KILLS} SIGKILLs landed "
        f"({sum(o['in_write'] for o in outcomes)} while a file was being written under its "
        "temporary name, "
        f"{sum(o['left_partial'] for o in outcomes)} left a temporary file behind), and the "
        "rerun's shards have the uninterrupted run's checksums")
  assert kills == _GEN_KILLS and sum(o["in_write"] for o in outcomes) == 2
