"""Stage 2 (`dit`) over two JAX processes equals one process over the same two devices.

A tiny stage-1 run (one process) feeds `configs/dit.py:tiny` on a (2, 1, 1) mesh, run as two
processes × 1 CPU device (coordinator on 127.0.0.1) and as one process × 2 fake devices:
every step's loss and every end-of-run evaluator figure (identity consistency and landmark
following, drawn by the sampler across both processes) must be equal, the frozen FR network
and the rows having been placed on devices the other process owns.
"""

import json
import textwrap

import numpy as np

from test_multihost import _run_processes  # pylint: disable=g-bad-import-order
from test_multihost_resume import DISTRIBUTED, SINGLE, run_single  # pylint: disable=g-bad-import-order

_TASK = """
    from configs import dit
    from vigface_jax import main
    config = dit.get_config("tiny")
    config.stage1.workdir = sys.argv[4]
    config.mesh.shape = (2, 1, 1)
    config.train.log_every = 1
    main.run(config, workdir)
    print("OK")
"""

_CHILD = DISTRIBUTED + textwrap.dedent(_TASK)


def _figures(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  evals = {k: v for r in records for k, v in r.items()
           if k.startswith(("identity/", "landmarks/", "guidance_sweep/"))}
  return losses, evals


def test_dit_two_processes_equal_one(tmp_path):
  stage1 = tmp_path / "fr"
  fr_script = SINGLE + textwrap.dedent("""
      from configs import fr
      from vigface_jax import main
      main.run(fr.get_config("tiny"), workdir)
      print("OK")
      """)
  run_single(fr_script, ["-", "0", str(stage1)], devices=1)
  logs = tmp_path / "logs"
  logs.mkdir()
  two, one = tmp_path / "two", tmp_path / "one"
  _run_processes(two, logs, child=_CHILD, args=(str(stage1),))
  run_single(SINGLE + textwrap.dedent(_TASK), ["-", "0", str(one), str(stage1)], devices=2)
  (loss2, eval2), (loss1, eval1) = _figures(two), _figures(one)
  assert sorted(loss2) == sorted(loss1) and len(loss1) >= 2
  np.testing.assert_allclose([loss2[s] for s in sorted(loss2)],
                             [loss1[s] for s in sorted(loss1)], rtol=1e-5)
  assert eval2.keys() == eval1.keys() and "identity/top1" in eval1, eval1
  for key, value in eval1.items():
    np.testing.assert_allclose(eval2[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  assert sorted(p.name for p in (two / "samples").iterdir()) == sorted(
      p.name for p in (one / "samples").iterdir())
