"""`generate/sampling.py`: one compiled sampler for any rows, sharded or not, batched with a
padded tail."""

from __future__ import annotations

import conftest

_SCRIPT = r"""
import functools
import numpy as np
import jax
from flax import nnx
from configs import dit as dit_config
from vigface_jax import parallel
from vigface_jax.diffusion import schedules
from vigface_jax.generate import sampling
from vigface_jax.models import stage2
from vigface_jax.train import dit, optim, state as state_lib

config = dit_config.get_config("tiny")
info = {"arch": "tiny", "embed_dim": 32, "input_size": 32}
mesh = parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 1))
tx, _ = optim.make_optimizer(config.optim, 10)
state, setup = state_lib.create_state(dit.create_model(config, info, 4), tx, mesh, seed=0,
                                      trainable=stage2.TRAINABLE)
# adaLN-Zero makes a fresh DiT predict zero everywhere: perturb so images depend on rows.
params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                      state.params)
schedule = schedules.make_schedule("cosine", 1000)
settings = sampling.SamplerSettings.from_config(config)
rng = np.random.default_rng(0)
rows = rng.normal(size=(11, 32)).astype(np.float32)
lmk = np.repeat(stage2.model_landmarks(np.asarray(
    [[[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]], np.float32)), 11, 0)
sharded = sampling.Generator(setup.graphdef, schedule, settings, batch_size=6, mesh=mesh,
                             state_shardings=setup.shardings)
assert sharded.batch_size == 8  # rounded up to whole examples per device
plain = sampling.Generator(setup.graphdef, schedule, settings, batch_size=8)
a = sharded(params, state.rest, rows, lmk, 5, 2.0)
b = plain(jax.device_get(params), jax.device_get(state.rest), rows, lmk, 5, 2.0)
assert a.shape == (11, 112, 112, 3) and a.dtype == np.uint8
diff = np.abs(a.astype(int) - b.astype(int))
assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
# The padded tail changes nothing: the first 8 rows alone give the same first batch.
np.testing.assert_array_equal(plain(jax.device_get(params), jax.device_get(state.rest),
                                    rows[:8], lmk[:8], 5, 2.0), b[:8])
# Different rows give different faces (the sampler is conditioned).
assert np.abs(b[0].astype(int) - b[1].astype(int)).mean() > 1.0
print("OK")
"""


def test_sharded_sampler_equals_the_single_device_one():
  conftest.run_on_fake_devices(_SCRIPT, num_devices=8, timeout=300)
