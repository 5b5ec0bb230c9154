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
