"""Stage 1 (`fr`) end to end over two JAX processes on this machine (CPU, one device each).

With `mesh.shape = (1, 1, 2)` the `classes` axis of the centre matrix (`parallel.DEFAULT_RULES`)
is split across the two processes, so each holds half of the `[d, n + k]` centres and nothing
that needs the whole matrix may `jax.device_get` it: `prototypes.write_report` has to run on
every process and gather the centres with a collective. The test runs the real task through
`vigface_jax.main.run` in two child processes (coordinator on 127.0.0.1, gloo collectives) and
checks the report that process 0 writes against the centres saved in the final checkpoint.

`VIGFACE_MULTIHOST_PYTHONPATH` points the children at another checkout (default: this one),
e.g. to confirm that the test fails on code from before the report was gathered.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import stop_and_read
from vigface_jax.evaluate import prototypes

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NUM_PROCESSES = 2
_TIMEOUT_S = 240  # both children together; they are killed past it, the test never hangs
_NUM_STEPS = 2
# Process 1 starts the task this much later than process 0, which by then has written the
# procedural verification pack: a process that finds the pack written must still meet the
# others at the pack's barrier (it once skipped it and met them at Orbax's next one instead).
_LATE_S = 6

# Each child: one CPU device, jax.distributed on the given coordinator, then the `fr` task
# exactly as `python -m vigface_jax.main --config=configs/fr.py:tiny` would run it.
_CHILD = textwrap.dedent("""
    import os, sys
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()  # library code reads absl flags; no absl.app.run here
    logging.set_verbosity(logging.INFO)  # the log says how far a failing process got
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default; explicit
    cache = os.environ.get("VIGFACE_TEST_JAX_CACHE")
    if cache:
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    address, process_id = sys.argv[1], int(sys.argv[2])
    workdir, num_steps = sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(coordinator_address=address, num_processes={num_processes},
                               process_id=process_id, coordinator_bind_address=address,
                               initialization_timeout=60)
    assert jax.process_count() == {num_processes} and jax.local_device_count() == 1, jax.devices()
    from configs import fr
    from vigface_jax import main
    config = fr.get_config("tiny")
    config.mesh.shape = (1, 1, {num_processes})  # classes over 'model': across the processes
    config.train.num_steps = num_steps
    config.train.checkpoint_every = num_steps
    if process_id:  # start late: the pack is written by then, its barrier must still hold
      import time; time.sleep({late_s})
    summary = main.run(config, workdir)
    print("summary", sorted(summary))
    # The blockwise gather the report uses, with several blocks and a clamped last one.
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from vigface_jax import parallel
    mesh = parallel.create_mesh(("data", "fsdp", "model"), (1, 1, {num_processes}))
    want = np.arange(3 * 34, dtype=np.float32).reshape(3, 34)
    x = parallel.put(want, NamedSharding(mesh, PartitionSpec(None, "model")))
    assert not x.is_fully_addressable
    got = parallel.fetch_in_blocks(x, 1, 5)
    assert np.array_equal(got, want), got
    print("OK")
""").format(num_processes=_NUM_PROCESSES, late_s=_LATE_S)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if "_proxy" not in k.lower() and not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"  # one CPU device per process (no XLA_FLAGS device count)
  env["PYTHONPATH"] = os.environ.get("VIGFACE_MULTIHOST_PYTHONPATH", str(_REPO))
  env.setdefault("VIGFACE_TEST_JAX_CACHE", os.path.join(
      os.path.expanduser("~"), ".cache", "vigface_jax_test_xla"))
  return env


def _run_processes(workdir: pathlib.Path, logdir: pathlib.Path, child: str = _CHILD,
                   args: tuple[str, ...] = (str(_NUM_STEPS),)) -> list[str]:
  """Runs `child` (default: the `fr` task) in `_NUM_PROCESSES` children, each with argv
  `address, process id, workdir, *args`; fails unless all exit 0 and print OK.

  Returns each child's stdout + stderr. When one child fails the others are killed (they would
  otherwise wait in a collective until the coordinator's heartbeat timeout), and so are all of
  them after `_TIMEOUT_S`.
  """
  address = f"127.0.0.1:{_free_port()}"
  env = _child_env()
  procs, logs = [], []
  for i in range(_NUM_PROCESSES):
    log = open(logdir / f"process_{i}.log", "w+")  # a file, not a pipe: never blocks the child
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, "-c", child, address, str(i), str(workdir), *args],
        env=env, cwd=logdir, stdout=log, stderr=subprocess.STDOUT, text=True))
  deadline = time.monotonic() + _TIMEOUT_S
  failed_at = None
  try:
    while True:
      codes = [p.poll() for p in procs]  # every child, each time (no short-circuit)
      if None not in codes:
        break
      now = time.monotonic()
      if failed_at is None and any(c not in (None, 0) for c in codes):
        failed_at = now  # the others get a moment to print their own error, then go
      if now > deadline or (failed_at is not None and now > failed_at + 10):
        break
      time.sleep(0.2)
  finally:
    outputs = stop_and_read(procs, logs)
  timed_out = time.monotonic() > deadline
  failed = [i for i, (p, out) in enumerate(zip(procs, outputs))
            if p.returncode != 0 or not out.rstrip().endswith("OK")]
  # A child that failed by itself first; the ones killed here (-9) after it.
  failed.sort(key=lambda i: procs[i].returncode < 0)
  assert not failed, (
      f"return codes {[p.returncode for p in procs]}"
      f"{f' (killed after {_TIMEOUT_S} s)' if timed_out else ''}; logs in {logdir}\n" +
      "\n".join(f"--- process {i} of {_NUM_PROCESSES} exited {procs[i].returncode}, its output "
                f"ends:\n{outputs[i][-4000:]}" for i in failed))
  return outputs


def _checkpointed_centres(path: pathlib.Path) -> np.ndarray:
  """`params.head.weight` of the Orbax `TrainState` at `path`, restored as one numpy array."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return np.asarray(state["params"]["head"]["weight"]["value"])


def test_fr_two_processes_classes_sharded_across_hosts(tmp_path):
  """Two processes train, checkpoint, export and write one prototype report of all centres."""
  workdir, logdir = tmp_path / "run", tmp_path / "logs"
  logdir.mkdir()
  _run_processes(workdir, logdir)

  n, k, d = 16, 16, 32  # configs/fr.py:tiny: identities, virtual rows, embedding size
  with np.load(workdir / "prototypes.npz") as npz:
    real, virtual = npz["real"], npz["virtual"]
    per_row = {key: npz[key] for key in npz.files if key not in ("real", "virtual")}
  assert real.shape == (n, d) and virtual.shape == (k, d)
  rows = np.concatenate([real, virtual])
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
  # Both halves of the class axis made it into the report, in order: the rows are the trained
  # centres (columns of params.head.weight) of the final checkpoint, read back here in one
  # process as numpy from the shards the two processes wrote.
  centres = _checkpointed_centres(workdir / "checkpoints" / str(_NUM_STEPS) / "state")
  assert centres.shape == (d, n + k)
  np.testing.assert_allclose(
      rows, (centres / np.linalg.norm(centres, axis=0, keepdims=True)).T, rtol=1e-5, atol=1e-6)

  # The report is what one process computes on the whole (gathered) centre matrix.
  report = json.loads((workdir / "separability.json").read_text())
  expected = prototypes.separability(rows, n, class_axis=0)
  assert report["num_real"] == n and report["num_virtual"] == k and report["embed_dim"] == d
  for key in ("virtual_real", "virtual_virtual", "real_real", "nearest_real_to_virtual",
              "nearest_real_to_real", "verdict"):
    assert report[key].keys() == expected[key].keys()
    for name, value in expected[key].items():
      if isinstance(value, float):
        np.testing.assert_allclose(report[key][name], value, rtol=1e-5, atol=1e-6)
      else:
        assert report[key][name] == value, (key, name)
  for key, value in expected["per_row"].items():
    np.testing.assert_allclose(per_row[key], value, rtol=1e-5, atol=1e-6)

  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["num_real"] == n and summary["num_virtual"] == k
  assert summary["separability"] == report["verdict"]
  assert isinstance(summary["separability"]["passed"], bool)
  assert (workdir / "prototype_similarity.png").stat().st_size > 0
  assert (workdir / "export").is_dir()
  assert "verify/procedural/accuracy" in summary  # the verification hook, across processes
