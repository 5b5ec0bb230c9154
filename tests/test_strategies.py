"""Every sharding strategy of stage 2 computes what one device does (8 fake CPU devices).

`configs/dit.py:tiny` trains 2 steps on one device and, on 8 devices, with data parallelism
(8, 1, 1), FSDP (1, 8, 1: parameters, AdamW moments and EMA split over `fsdp`) and tensor
parallelism with data parallelism (4, 1, 2: attention heads and MLP over `model`). Each
step's loss and gradient norm, and the final parameters, must equal the one-device run's to
float tolerance, while the train state per device shrinks under FSDP as its sharding says.
(Stage 1's strategies: `test_train.py` class-sharded head, `test_compile_only.py`.)
"""

import json

import numpy as np

from conftest import run_on_fake_devices
from test_train_dit import STUB_STAGE1  # pylint: disable=g-bad-import-order

_SCRIPT = r"""
import json, os, sys, tempfile
from absl import flags
flags.FLAGS.mark_as_parsed()
from flax import nnx
import jax, numpy as np
from configs import dit as dit_config
from vigface_jax import parallel, tasks
from vigface_jax.evaluate import embed
from vigface_jax.models import iresnet, stage2
from vigface_jax.train import compile_only, optim
from vigface_jax.train import dit as dit_train
from vigface_jax.train import state as state_lib

cache = os.environ.get("VIGFACE_TEST_JAX_CACHE")
if cache:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
""" + STUB_STAGE1 + r"""
shapes = [(1, 1, 1)] if jax.device_count() == 1 else [(8, 1, 1), (1, 8, 1), (4, 1, 2)]
out = {}
for shape in shapes:
  config = dit_config.get_config("tiny")
  config.stage1.workdir = stage1
  config.data.global_batch_size = 8
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 2, 1, 2
  config.mesh.shape = shape
  for name in config.evals:
    config.evals[name].every = -1
  workdir = os.path.join(root, "x".join(map(str, shape)))
  tasks.run(config, workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as c:
    path = os.path.join(workdir, "checkpoints", "2", "state")
    tree = c.metadata(path).item_metadata.tree
    state = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  params = {"/".join(map(str, k)): np.asarray(v).tolist()
            for k, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  # The train state's shard per device under this mesh (shapes only, nothing allocated).
  tx, _ = optim.make_optimizer(config.optim, 2)
  _, setup = state_lib.create_state(
      dit_train.create_model(config, {"arch": "tiny", "embed_dim": 32, "input_size": 32}, 16),
      tx, parallel.mesh_from_config(config), seed=0, rules=config.sharding_rules, ema=True,
      trainable=stage2.TRAINABLE, materialize=False)
  out["x".join(map(str, shape))] = {
      "loss": [r["train/loss"] for r in records if "train/loss" in r],
      "grad_norm": [r["train/grad_norm"] for r in records if "train/grad_norm" in r],
      "params": params,
      "state_bytes": compile_only.state_bytes_per_device(setup.abstract)}
print("RESULT " + json.dumps(out))
print("OK")
"""


def _result(num_devices):
  out = run_on_fake_devices(_SCRIPT, num_devices=num_devices, timeout=900)
  return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def test_dit_strategies_equal_one_device():
  ref = _result(1)["1x1x1"]
  runs = _result(8)
  assert len(ref["loss"]) == 2
  for name, run in runs.items():
    np.testing.assert_allclose(run["loss"], ref["loss"], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(run["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=name)
    assert run["params"].keys() == ref["params"].keys()
    for key, value in ref["params"].items():
      np.testing.assert_allclose(np.asarray(run["params"][key]), np.asarray(value), rtol=1e-4,
                                 atol=1e-6, err_msg=f"{name} {key}")
  # FSDP splits the DiT's matrices 8 ways: far less state per device than replication.
  assert runs["1x8x1"]["state_bytes"] < 0.5 * runs["8x1x1"]["state_bytes"]
  assert runs["4x1x2"]["state_bytes"] < runs["8x1x1"]["state_bytes"]
