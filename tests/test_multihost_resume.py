"""Stage 1 over two JAX processes equals one process over the same two devices, and its
checkpoints restore under another process and device count, both ways.

Runs `configs/fr.py:tiny` (classes over the 2-way `model` axis) through `vigface_jax.main.run`:
  two      2 processes × 1 CPU device, 5 steps (checkpoints at 3 and 5);
  one      1 process × 2 fake devices, the same 5 steps: its losses must equal `two`'s (the
           global batches do not depend on the process count: `pipeline.GlobalBatchSampler`);
  two→one  `two`'s step-3 checkpoint resumed in 1 process × 1 device to step 5;
  one→two  `one`'s step-3 checkpoint resumed in 2 processes to step 5;
both resumed runs' steps 4-5 must equal `one`'s. Loopback only, bounded in time.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np

from test_multihost import _child_env, _run_processes  # pylint: disable=g-bad-import-order

_REPO = pathlib.Path(__file__).resolve().parents[1]

_TASK = """
    from configs import fr
    from vigface_jax import main
    config = fr.get_config("tiny")
    config.mesh.shape = (1, 1, {model})
    config.train.num_steps = int(sys.argv[4])
    config.train.checkpoint_every = 3
    config.train.log_every = 1
    config.evals.verify.every = -1
    main.run(config, workdir)
    print("OK")
"""

# Every child: absl marked parsed, INFO logs, the persistent compilation cache.
_PREAMBLE = textwrap.dedent("""
    import os, sys
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    import jax
    cache = os.environ.get("VIGFACE_TEST_JAX_CACHE")
    if cache:
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    """)
# One of two processes (argv: address, process id, workdir, ...), as test_multihost starts them.
DISTRIBUTED = _PREAMBLE + textwrap.dedent("""
    address, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=process_id, coordinator_bind_address=address,
                               initialization_timeout=60)
    """)
# One process (argv: -, 0, workdir, ...); its device count comes from XLA_FLAGS.
SINGLE = _PREAMBLE + "workdir = sys.argv[3]\n"
_CHILD = DISTRIBUTED + textwrap.dedent(_TASK).format(model=2)


def run_single(script, args, devices):
  """`script` in one process with `devices` fake CPU devices (argv `-c`, *args); its stderr.
  Fails unless it exits 0 and prints OK last."""
  env = _child_env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=_REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stderr[-4000:]
  return proc.stderr


def _single(workdir, num_steps, devices):
  script = SINGLE + textwrap.dedent(_TASK).format(model=devices)
  return run_single(script, ["-", "0", str(workdir), str(num_steps)], devices)


def _losses(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _without_step_5(src, dst):
  """A copy of a run as it was at its step-3 checkpoint."""
  shutil.copytree(src, dst)
  shutil.rmtree(dst / "checkpoints" / "5")
  lines = (dst / "metrics.jsonl").read_text().splitlines()
  (dst / "metrics.jsonl").write_text(
      "".join(l + "\n" for l in lines if json.loads(l)["step"] <= 3))
  for name in ("summary.json", "export", "prototypes.npz"):
    path = dst / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


def test_two_processes_equal_one_and_checkpoints_change_layout(tmp_path):
  logs = tmp_path / "logs"
  logs.mkdir()
  two, one = tmp_path / "two", tmp_path / "one"
  _run_processes(two, logs, child=_CHILD, args=("5",))
  _single(one, 5, devices=2)
  ref = _losses(one)
  got = _losses(two)
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in range(1, 6)], [ref[s] for s in range(1, 6)],
                             rtol=1e-5)

  # two processes' checkpoint -> one process with one device
  two_one = tmp_path / "two_one"
  _without_step_5(two, two_one)
  log = _single(two_one, 5, devices=1)
  assert "written by another number of processes" in log
  resumed = _losses(two_one)
  np.testing.assert_allclose([resumed[4], resumed[5]], [ref[4], ref[5]], rtol=1e-4)

  # one process's checkpoint -> two processes
  one_two = tmp_path / "one_two"
  _without_step_5(one, one_two)
  (logs / "again").mkdir()
  outputs = _run_processes(one_two, logs / "again", child=_CHILD, args=("5",))
  assert any("written by another number of processes" in o for o in outputs)
  resumed = _losses(one_two)
  np.testing.assert_allclose([resumed[4], resumed[5]], [ref[4], ref[5]], rtol=1e-4)
  assert os.path.exists(one_two / "checkpoints" / "5")
