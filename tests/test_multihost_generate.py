"""Generation (`generate`) over two JAX processes writes what one process writes.

Tiny stage-1 and stage-2 runs (one process each) feed `configs/generate.py:tiny`, run as two
processes × 1 CPU device (coordinator on 127.0.0.1) and as one process: the shards (their
images' SHA-256, labels and counts), the exports and the manifest must be identical, the
manifest complete with nothing missing (the two processes' shards are disjoint and together
complete), the audit that ends the task must give the same figures, and the summary must say
two processes drew it.
"""

import json
import textwrap

from test_multihost import _run_processes  # pylint: disable=g-bad-import-order
from test_multihost_resume import DISTRIBUTED, SINGLE, run_single  # pylint: disable=g-bad-import-order

_TASK = """
    from configs import generate
    from vigface_jax import main
    config = generate.get_config("tiny")
    config.stage1.workdir, config.stage2.workdir = sys.argv[4], sys.argv[5]
    main.run(config, workdir)
    print("OK")
"""

_STAGES = """
    from configs import dit, fr
    from vigface_jax import main
    main.run(fr.get_config("tiny"), workdir + "/fr")
    config = dit.get_config("tiny")
    config.stage1.workdir = workdir + "/fr"
    main.run(config, workdir + "/dit")
    print("OK")
"""


def _shards(workdir):
  manifest = json.loads((workdir / "manifest.json").read_text())
  shards = {p.name: json.loads(p.read_text()) for p in (workdir / "shards").glob("shard-*.json")}
  return manifest, shards


def test_generation_two_processes_equal_one(tmp_path):
  run_single(SINGLE + textwrap.dedent(_STAGES), ["-", "0", str(tmp_path)], devices=1)
  stages = [str(tmp_path / "fr"), str(tmp_path / "dit")]
  logs = tmp_path / "logs"
  logs.mkdir()
  two, one = tmp_path / "two", tmp_path / "one"
  _run_processes(two, logs, child=DISTRIBUTED + textwrap.dedent(_TASK), args=tuple(stages))
  run_single(SINGLE + textwrap.dedent(_TASK), ["-", "0", str(one), *stages], devices=1)
  (m2, s2), (m1, s1) = _shards(two), _shards(one)
  assert m2["complete"] and not m2["missing"], m2
  assert m2["totals"] == m1["totals"] and m2["exports"] == m1["exports"]
  assert s2.keys() == s1.keys() and len(s1) >= 2
  for name, shard in s1.items():
    assert s2[name]["images_sha256"] == shard["images_sha256"], name
    assert s2[name]["labels"] == shard["labels"], name
  # Each shard holds identities [lo, hi): disjoint, and together every identity once.
  ranges = sorted(tuple(s["labels"]) for s in s2.values())
  drawn = [i for lo, hi in ranges for i in range(lo, hi)]
  assert drawn == list(range(ranges[-1][1])) and ranges[0][0] == 0, ranges
  summary2 = json.loads((two / "summary.json").read_text())
  summary1 = json.loads((one / "summary.json").read_text())
  assert summary2["processes"] == 2 and summary1["processes"] == 1
  # The audit that ends the task (its rates, thresholds and verdict) is the same too.
  assert summary2["audit"] == summary1["audit"], (summary2["audit"], summary1["audit"])
