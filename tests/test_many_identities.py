"""Two million identities (WebFace scale) on 8 fake CPU devices.

A 2M-row class-centre matrix split over the 8-device `model` axis steps through the real
stage-1 step (`loop.fit` with `fr_loss`, `parallel.FR_RULES`): each device holds 250,000
centres, the backbone stays data-parallel over all 8 and the losses are finite (that the
class-sharded head computes what one device does is `test_train.py`'s
`test_class_axis_sharded_over_eight_devices_matches_data_parallel`). At 512 dimensions (4 GB of centres, 8 GB with SGD momentum) the same head is
compiled only (`--config.dry_run=True`), and the per-device memory XLA reports must be a
fraction of the whole matrix; with Partial FC (sample rate 0.1) and an identity count that
needs padding, the step's temporaries shrink further.
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

# Compile only at 512 dimensions: 2M x 512 float32 centres are 4 GB. Then Partial FC at 0.1
# on 3 fewer identities (1,999,997 do not split 8 ways: 3 padding columns).
for name, rate, n in (("DRY", 1.0, N), ("SAMPLED", 0.1, N - 3)):
  dry = fr_config.get_config("tiny")
  dry.dry_run = True
  dry.mesh.shape = (1, 1, 8)
  dry.model.embed_dim = 512
  dry.model.num_real = n
  dry.margin.sample_rate = rate
  dry.virtual.num_virtual = 0
  dry.data.global_batch_size = 512
  summary = main.run(dry, tempfile.mkdtemp())
  print(name, json.dumps(summary["dry_run"]))
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
  # Partial FC keeps 25,000 of each device's 250,000 centres: the [512, C] logits and their
  # gradient (512 MB each per device at full width) shrink tenfold; the state does not.
  sampled = json.loads(next(l for l in out.splitlines() if l.startswith("SAMPLED "))[8:])
  assert sampled["num_padding"] == 3 and sampled["sample_rate"] == 0.1
  head = next(a for a in sampled["largest_arrays"] if a["name"] == "params/head/weight")
  assert head["shape"] == [512, 2_000_000] and head["shard_shape"] == [512, 250_000]
  logits = 512 * 250_000 * 4
  saved = mem["temp"] - sampled["memory_per_device"]["temp"]
  assert saved > 1.6 * logits, (sampled["memory_per_device"], mem)
  assert sampled["state_bytes_per_device"] == figures["state_bytes_per_device"]
