"""Two million identities (WebFace scale) on 8 fake CPU devices.

A 2M-row class-centre matrix split over the 8-device `model` axis steps through the real
stage-1 step (`loop.fit` with `fr_loss`, `parallel.FR_RULES`): each device holds 250,000
centres, the backbone stays data-parallel over all 8 and the losses are finite (that the
class-sharded head computes what one device does is `test_train.py`'s
`test_class_axis_sharded_over_eight_devices_matches_data_parallel`). At 512 dimensions (4 GB of centres, 8 GB with SGD momentum) the same head is
compiled only (`--config.dry_run=True`), and the per-device memory XLA reports must be a
fraction of the whole matrix.
"""

import json

from conftest import run_on_fake_devices

_SCRIPT = r"""
import functools, json, tempfile
import jax, numpy as np
from configs import fr as fr_config
from vigface_jax import main, parallel
from vigface_jax.data import pipeline
from vigface_jax.train import fr, loop

N = 2_000_000
config = fr_config.get_config("tiny")
config.mesh.shape = (1, 1, 8)
config.data.num_identities, config.data.images_per_identity = N, 1
config.data.cache = False
config.data.global_batch_size = 8
config.virtual.num_virtual = 0
config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 2, 0, 1
mesh = parallel.mesh_from_config(config)
rules = config.sharding_rules
data = pipeline.make_pipeline(config, mesh, rules)
loss_fn = functools.partial(fr.fr_loss, cfg=config, logits_sharding=parallel.logical_sharding(
    mesh, ("head_batch", "classes"), rules))
with data:
  result = loop.fit(config, tempfile.mkdtemp(), mesh=mesh, create_model=fr.create_model(
      config, N, 0), loss_fn=loss_fn, data=data, images_per_step=8)
w = result.state.params["head"]["weight"][...]
assert w.shape == (32, N), w.shape
assert {s.data.shape for s in w.addressable_shards} == {(32, N // 8)}, w.sharding
m = result.metrics
assert np.isfinite(m["train/loss"]), m
print("loss", m["train/loss"])

# Compile only at 512 dimensions: 2M x 512 float32 centres are 4 GB.
dry = fr_config.get_config("tiny")
dry.dry_run = True
dry.mesh.shape = (1, 1, 8)
dry.model.embed_dim = 512
dry.model.num_real = N
dry.virtual.num_virtual = 0
dry.data.global_batch_size = 8
summary = main.run(dry, tempfile.mkdtemp())
print("DRY", json.dumps(summary["dry_run"]))
print("OK")
"""


def test_two_million_identities_step_on_eight_devices():
  out = run_on_fake_devices(_SCRIPT, num_devices=8, timeout=900)
  figures = json.loads(next(l for l in out.splitlines() if l.startswith("DRY "))[4:])
  head = next(a for a in figures["largest_arrays"] if a["name"] == "params/head/weight")
  assert head["shape"] == [512, 2_000_000] and head["shard_shape"] == [512, 250_000]
  whole = 512 * 2_000_000 * 4
  mem = figures["memory_per_device"]
  # Centres + momentum shards (2 × 1/8 of the matrix) plus the backbone: far below one matrix.
  assert 2 * whole / 8 <= mem["argument"] < 0.4 * whole, mem
  assert mem["total"] < whole, mem
