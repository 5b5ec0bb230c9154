"""Tests of the test-dependency policy of `conftest.require` / `conftest.missing`.

A test that needs a missing test-only dependency (torch, diffusers, ...) is skipped with a
reason, or fails when the environment variable CI is set (CI installs them all, so there it
is a broken setup). Only the tests that need the module are affected: the rest of their file
still runs. Each check runs a small pytest session in a subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import require

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TESTS = _REPO / "tests"

# A test file outside the repo: one test needs a module that does not exist, one needs nothing.
_POLICY_TEST = """
from conftest import require


def test_needs_a_missing_module():
  require("vigface_no_such_module", "only this test needs it")


def test_needs_nothing():
  pass
"""

# A pytest plugin (`-p`) loaded before any conftest or test module: torch is unimportable.
_BLOCK_TORCH = """
import sys

sys.modules["torch"] = None  # `import torch` raises ModuleNotFoundError
"""


def _pytest(args, cwd, ci: bool, pythonpath=(), timeout=300):
  """Runs `python -m pytest -q -p no:cacheprovider *args` in a fresh process."""
  env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
  if ci:
    env["CI"] = "true"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(p) for p in pythonpath] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_require_returns_the_module():
  assert require("json", "always there") is json


@pytest.mark.parametrize("ci", [True, False])
def test_missing_module_fails_under_ci_and_skips_otherwise(tmp_path, ci):
  (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keeps the session out of this repo
  (tmp_path / "test_policy.py").write_text(_POLICY_TEST)
  result = _pytest(["-rfs", "test_policy.py"], tmp_path, ci, pythonpath=[_TESTS], timeout=120)
  out = result.stdout + result.stderr
  assert "vigface_no_such_module is not importable" in out, out
  if ci:
    assert result.returncode == 1, out
    assert "1 failed, 1 passed" in out and "CI is set" in out, out
  else:
    assert result.returncode == 0, out
    assert "1 passed, 1 skipped" in out, out


def test_tests_without_torch_run_when_torch_is_missing(tmp_path):
  """With torch unimportable, the files that use it still collect and run their other tests."""
  (tmp_path / "block_torch.py").write_text(_BLOCK_TORCH)
  # Two fast tests that need neither torch nor diffusers, and tests that need them.
  selected = [
      "tests/test_diffusion.py::test_schedule_is_a_pytree_with_static_T",
      "tests/test_diffusion.py::test_min_snr_weights_match_numpy_reference",
      "tests/test_diffusion.py::test_schedules_match_diffusers",  # 3 cases
      "tests/test_diffusion.py::test_guidance_rescale_matches_diffusers",  # 3 cases
      "tests/test_iresnet.py::test_logical_axes",
      "tests/test_iresnet.py::test_state_dict_errors_name_the_key",
      "tests/test_convert_insightface.py::test_malicious_pickle_is_refused",
      "tests/test_convert_insightface.py::test_reads_like_torch_load",
  ]
  result = _pytest(["-p", "block_torch", "-rs", *selected], _REPO, ci=False,
                   pythonpath=[tmp_path])
  out = result.stdout + result.stderr
  assert result.returncode == 0, out
  assert "4 passed, 8 skipped" in out, out
  assert "torch is not importable (import of torch halted" in out, out
