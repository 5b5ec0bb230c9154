"""Shared pytest setup: absl flags parsed, persistent JAX compilation cache, tiny defaults."""

import os

from absl import flags
import jax

# Library code reads absl flags (grain does too); pytest never runs absl.app.run.
flags.FLAGS.mark_as_parsed()

# JAX compiles are the slowest part of the suite on CPU: reuse them across runs.
_CACHE = os.environ.get(
    "VIGFACE_TEST_JAX_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "vigface_jax_test_xla"),
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import importlib
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def missing(msg: str):
  """Skips the test for a missing test dependency; fails it instead when CI is set.

  CI installs every test dependency (.ci/run), so there a missing one is a broken setup that
  must not pass as a run with fewer tests. Call it from the test or fixture that needs it.
  """
  if os.environ.get("CI"):
    pytest.fail(f"{msg} [CI is set: a missing test dependency fails instead of skipping]")
  pytest.skip(msg)


def require(module_name: str, reason: str):
  """Imports and returns `module_name`, or reports it `missing` (skip, or fail under CI).

  `reason` says what needs the module and how to install it. Use it inside the tests or
  fixtures that need the module, not at module level, so the rest of the file still runs.
  """
  try:
    return importlib.import_module(module_name)
  except ImportError as e:
    missing(f"{module_name} is not importable ({e}): {reason}")


@pytest.fixture(scope="session")
def shared_testdata() -> pathlib.Path:
  """`../shared/testdata` (files written by real MXNet); VIGFACE_SHARED overrides `../shared`."""
  shared = pathlib.Path(os.environ.get("VIGFACE_SHARED", _REPO.parent / "shared"))
  path = shared / "testdata"
  if not path.is_dir():
    msg = f"shared test data not found at {path}; set VIGFACE_SHARED=<dir holding testdata/>"
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def run_on_fake_devices(script: str, num_devices: int = 8, timeout: int = 180) -> str:
  """Runs `script` in a fresh Python with `num_devices` fake CPU devices; returns its stdout.

  XLA's device count is fixed when JAX starts, so multi-device tests need their own process.
  Fails the test unless the script exits 0 and its last output line is "OK".
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join(
          [str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
  })
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=_REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  assert result.stdout.strip().endswith("OK"), result.stdout
  return result.stdout


@pytest.fixture(scope="session")
def tiny_stage_runs(tmp_path_factory):
  """A tiny stage 1, a stage 2 trained on it and an independent tiny auditor (what stage 3's
  tests generate from), built once per session."""
  from configs import dit as dit_config  # pylint: disable=g-import-not-at-top
  from configs import fr as fr_config  # pylint: disable=g-import-not-at-top
  from vigface_jax import tasks  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_stage_runs")

  def fr(name, variant):
    config = fr_config.get_config(variant)
    config.evals.verify.procedural_pairs = None
    config.evals.verify.baselines = False
    tasks.run(config, str(root / name))
    return str(root / name)

  s1, auditor = fr("fr", "tiny"), fr("auditor", "tiny_auditor")
  config = dit_config.get_config("tiny")
  config.stage1.workdir = s1
  tasks.run(config, str(root / "dit"))
  return {"stage1": s1, "stage2": str(root / "dit"), "auditor": auditor}


def cli_env() -> dict[str, str]:
  """The environment for running `python -m vigface_jax.main` in a child process: CPU, this
  checkout, the tests' persistent compilation cache, no inherited XLA flags."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO))
  cache = os.environ.get("VIGFACE_TEST_JAX_CACHE", os.path.join(
      os.path.expanduser("~"), ".cache", "vigface_jax_test_xla"))
  env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def fr_tiny_command(workdir, num_steps: int, *overrides: str) -> list[str]:
  """`configs/fr.py:tiny` for `num_steps` steps logging every step, no verification, as a
  command line; `overrides` are more `--config.a.b=v` flags."""
  import sys  # pylint: disable=g-import-not-at-top
  return [sys.executable, "-m", "vigface_jax.main", "--config=configs/fr.py:tiny",
          f"--workdir={workdir}", f"--config.train.num_steps={num_steps}",
          "--config.train.log_every=1", "--config.evals.verify.every=-1",
          "--config.evals.verify.baselines=False", *overrides]


def stop_and_read(procs, logs) -> list[str]:
  """Kills whichever of `procs` still run, then returns and closes each one's log file."""
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return outputs


@pytest.fixture(scope="session")
def tiny_generation_reference(tiny_stage_runs, tmp_path_factory):
  """An uninterrupted `configs/generate.py:tiny` run with one identity per shard (what the
  interrupted runs of the preemption, fault-injection and storage tests must equal): its
  workdir and its dataset shards' sha256s. Read only."""
  import test_generate as helpers  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import task  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("generation_reference")
  task.run(helpers._config(tiny_stage_runs, ids_per_shard=1), str(workdir))  # pylint: disable=protected-access
  return workdir, helpers._shard_digests(str(workdir))  # pylint: disable=protected-access
