"""One compiled sampler for the stage-2 model, and batched generation with it.

`make_sampler` jits `sample(params, rest, rows, landmark_images, rng, guidance) -> uint8`:
DDIM with classifier-free guidance (both halves in one batched DiT call), optionally only on
an interval of timesteps, with guidance rescale and with a negative "typical pose" condition
(`pose_guidance`). The guidance scale is an argument, so one compilation serves every scale.
With a mesh, inputs and outputs carry explicit shardings: rows, landmark images and images
split over the batch axes, the parameters as the train state holds them.

`Generator` runs it over any number of rows (real or virtual) and landmark images in batches
of one shape, the last batch padded; batch `i` starting at row `start` draws its noise from
`PRNGKey(seed + start)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from vigface_jax import ops
from vigface_jax import parallel
from vigface_jax.diffusion import samplers
from vigface_jax.diffusion import schedules
from vigface_jax.models import stage2


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How `make_sampler` samples (see `configs/dit.py` `sample.*` for each field)."""

  num_steps: int
  eta: float
  spacing: str
  prediction: str  # what the DiT predicts: 'v', 'eps' or 'x0'
  guidance_interval: tuple[int, int] | None = None
  guidance_rescale: float = 0.0
  pose_guidance: float = 0.0

  @classmethod
  def from_config(cls, config: Any) -> "SamplerSettings":
    """From a validated stage-2 config's `sample` and `diffusion` sections."""
    s = config.sample
    interval = s.guidance_interval
    return cls(num_steps=int(s.num_steps), eta=float(s.eta), spacing=str(s.spacing),
               prediction=str(config.diffusion.prediction),
               guidance_interval=None if interval is None else tuple(int(v) for v in interval),
               guidance_rescale=float(s.guidance_rescale),
               pose_guidance=float(s.pose_guidance))


def make_sampler(graphdef: nnx.GraphDef, schedule: schedules.Schedule,
                 settings: SamplerSettings, *, typical: np.ndarray | None = None,
                 mesh: Mesh | None = None, state_shardings: Any = None,
                 rules: parallel.LogicalRules = parallel.DEFAULT_RULES):
  """Jitted `sample(params, rest, rows, landmark_images, rng, guidance)` -> uint8 images.

  Args:
    graphdef: the `models.stage2.Stage2` graph (`Setup.graphdef`).
    schedule: the diffusion schedule the model was trained with.
    settings: sampler settings.
    typical: a landmark image `[H, W, 3]` in [-1, 1] of the data's typical pose; with
      `settings.pose_guidance` > 0 a third batch evaluates each row with it and the guided
      prediction moves `pose_guidance` · (conditional − that) further from it.
    mesh: with `state_shardings` (a `TrainState` of shardings), the explicit shardings of
      the inputs and outputs: parameters as trained, batch inputs over the batch axes.
    state_shardings: see `mesh`.
    rules: logical-axis rules for the batch axes.
  """
  pose_scale = settings.pose_guidance if typical is not None else 0.0

  def sample(params, rest, rows, lmk, rng, guidance):
    model = nnx.merge(graphdef, params, rest)

    def with_cond(x_t, t, cond):
      r, l = cond
      return model.denoise(x_t, t, r, l)

    channels = model.landmark_channels(lmk)  # once, outside the sampling loop
    negative = None
    if pose_scale > 0:
      typical_channels = model.landmark_channels(jnp.asarray(typical, lmk.dtype)[None])
      negative = (rows, jnp.broadcast_to(typical_channels, channels.shape))
    model_fn = samplers.cfg_model_fn(with_cond, (rows, channels), guidance,
                                     (jnp.zeros_like(rows), channels),
                                     interval=settings.guidance_interval,
                                     rescale=settings.guidance_rescale,
                                     negative=negative, negative_scale=pose_scale)
    x0 = samplers.ddim_sample(model_fn, schedule, (rows.shape[0],) + lmk.shape[1:3] + (3,), rng,
                              num_steps=settings.num_steps, eta=settings.eta,
                              kind=settings.prediction, spacing=settings.spacing, clip_x0=1.0)
    return stage2.to_uint8(x0)

  if mesh is None or state_shardings is None:
    return jax.jit(sample)
  batch = parallel.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(sample, in_shardings=(state_shardings.params, state_shardings.rest, batch,
                                       batch, replicated, replicated),
                 out_shardings=batch)


class Generator:
  """Faces from any rows and landmark images, `batch_size` at a time through one sampler."""

  def __init__(self, graphdef: nnx.GraphDef, schedule: schedules.Schedule,
               settings: SamplerSettings, *, batch_size: int,
               typical: np.ndarray | None = None, mesh: Mesh | None = None,
               state_shardings: Any = None,
               rules: parallel.LogicalRules = parallel.DEFAULT_RULES):
    """`batch_size` is rounded up to a multiple of the mesh's batch shards (so each device
    holds whole examples); other arguments as `make_sampler`."""
    shards = parallel.batch_axis_size(mesh, rules) if mesh is not None else 1
    self.batch_size = int(math.ceil(int(batch_size) / shards) * shards)
    self.sample = make_sampler(graphdef, schedule, settings, typical=typical, mesh=mesh,
                               state_shardings=state_shardings, rules=rules)

  def __call__(self, params: Any, rest: Any, rows: np.ndarray, landmark_images: np.ndarray,
               seed: int, guidance: float) -> np.ndarray:
    """uint8 `[n, H, W, 3]` faces for rows `[n, d]` (zero rows: unconditional) under landmark
    images `[n, H, W, 3]` in [-1, 1]; the batch starting at row `start` uses
    `PRNGKey(seed + start)`."""
    guidance = jnp.asarray(guidance, jnp.float32)

    def one(r, l, key):
      return self.sample(params, rest, jnp.asarray(r), jnp.asarray(l), key, guidance)

    return ops.map_batches(one, [np.asarray(rows), np.asarray(landmark_images)],
                           self.batch_size, fills=["zeros", "first"],
                           seeds=lambda start: jax.random.PRNGKey(seed + start))
