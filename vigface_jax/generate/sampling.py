"""One compiled sampler for the stage-2 model, and batched generation with it.

`make_sampler` jits `sample(params, rest, rows, landmark_images, rng, guidance) -> uint8`:
DDIM with classifier-free guidance (both halves in one batched DiT call), optionally only on
an interval of timesteps, with guidance rescale and with a negative "typical pose" condition
(`pose_guidance`). The guidance scale is an argument, so one compilation serves every scale.
With a mesh, inputs and outputs carry explicit shardings: rows, landmark images and images
split over the batch axes, the parameters as the train state holds them.

`Generator` runs it over any number of rows (real or virtual) and landmark images in batches
of one shape, the last batch padded; batch `i` starting at row `start` draws its noise from
`PRNGKey(seed + start)`, or (`Generator.draw`) each image from its own key, so an image does
not depend on the batch it falls in (the dataset generator, `generate/task.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

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
  # Outside guidance_interval, run the conditional batch alone (samplers.cfg_model_fn's
  # skip_outside): the generator's setting; the stage-2 evaluators keep the doubled batch.
  skip_unguided: bool = False

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
                 rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
                 per_example_keys: bool = False):
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
    per_example_keys: `rng` is one raw key per image (`[b, 2]`, split over the batch axes
      like the rows) instead of one replicated key.
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
                                     negative=negative, negative_scale=pose_scale,
                                     skip_outside=settings.skip_unguided)
    x0 = samplers.ddim_sample(model_fn, schedule, (rows.shape[0],) + channels.shape[1:3] + (3,),
                              rng, num_steps=settings.num_steps, eta=settings.eta,
                              kind=settings.prediction, spacing=settings.spacing, clip_x0=1.0)
    return stage2.to_uint8(model.to_output(x0))

  if mesh is None or state_shardings is None:
    return jax.jit(sample)
  batch = parallel.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  keys = batch if per_example_keys else replicated
  return jax.jit(sample, in_shardings=(state_shardings.params, state_shardings.rest, batch,
                                       batch, keys, replicated),
                 out_shardings=batch)


class Generator:
  """Faces from any rows and landmark images, `batch_size` at a time through one sampler."""

  def __init__(self, graphdef: nnx.GraphDef, schedule: schedules.Schedule,
               settings: SamplerSettings, *, batch_size: int,
               typical: np.ndarray | None = None, mesh: Mesh | None = None,
               state_shardings: Any = None,
               rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
               per_example_keys: bool = False):
    """`batch_size` is rounded up to a multiple of the mesh's batch shards (so each device
    holds whole examples); other arguments as `make_sampler`. With `per_example_keys` the
    generator is called through `draw`, otherwise as `generator(...)`."""
    shards = parallel.batch_axis_size(mesh, rules) if mesh is not None else 1
    self.batch_size = int(math.ceil(int(batch_size) / shards) * shards)
    self.per_example_keys = bool(per_example_keys)
    self.sample = make_sampler(graphdef, schedule, settings, typical=typical, mesh=mesh,
                               state_shardings=state_shardings, rules=rules,
                               per_example_keys=per_example_keys)
    # Over several processes the sampler's inputs must be global arrays (each process holds
    # the whole host batch and fills its own shards) and its output is gathered back.
    self._global = None
    if mesh is not None and jax.process_count() > 1:
      self._global = (parallel.batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec()))

  def _inputs(self, rows, lmk, key, guidance):
    if self._global is None:
      return rows, lmk, key, guidance
    batch, replicated = self._global
    return (parallel.put(rows, batch), parallel.put(lmk, batch),
            parallel.put(key, batch if self.per_example_keys else replicated),
            parallel.put(guidance, replicated))

  def __call__(self, params: Any, rest: Any, rows: np.ndarray, landmark_images: np.ndarray,
               seed: int, guidance: float) -> np.ndarray:
    """uint8 `[n, H, W, 3]` faces for rows `[n, d]` (zero rows: unconditional) under landmark
    images `[n, H, W, 3]` in [-1, 1]; the batch starting at row `start` uses
    `PRNGKey(seed + start)`."""
    if self.per_example_keys:
      raise ValueError("this Generator was built with per_example_keys=True: call draw()")
    guidance = jnp.asarray(guidance, jnp.float32)

    def one(r, l, key):
      return parallel.fetch(self.sample(params, rest, *self._inputs(r, l, key, guidance)))

    return ops.map_batches(one, [np.asarray(rows), np.asarray(landmark_images)],
                           self.batch_size, fills=["zeros", "first"],
                           seeds=lambda start: jax.random.PRNGKey(seed + start))

  def draw(self, params: Any, rest: Any, rows: np.ndarray, landmark_images: np.ndarray,
           keys: np.ndarray, guidance: float,
           progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """uint8 `[n, H, W, 3]` faces as `__call__`, image i drawn from its own raw key
    `keys[i]` (uint32 `[n, 2]`): independent of batch size and batch boundaries. Each batch is
    dispatched before the previous one is copied to the host; `progress(count)` is called as
    each batch arrives."""
    if not self.per_example_keys:
      raise ValueError("draw() needs a Generator built with per_example_keys=True")
    keys = np.asarray(keys, np.uint32)
    if keys.shape != (len(rows), 2):
      raise ValueError(f"draw: keys must be uint32 [{len(rows)}, 2], got {keys.shape}")
    b, n = self.batch_size, len(rows)
    out = np.empty((n,) + landmark_images.shape[1:3] + (3,), np.uint8)
    guidance = np.float32(guidance)
    inflight = None

    def collect(start, count, result):
      out[start:start + count] = parallel.fetch(result)[:count]
      if progress is not None:
        progress(count)

    for start in range(0, n, b):
      parts = [ops.pad_batch(a[start:start + b], b, fill)[0] for a, fill in
               ((rows, "zeros"), (landmark_images, "first"), (keys, "first"))]
      result = self.sample(params, rest, *self._inputs(*parts, guidance))
      if inflight is not None:
        collect(*inflight)
      inflight = (start, min(b, n - start), result)
    if inflight is not None:
      collect(*inflight)
    return out


def image_keys(seed: int, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Raw uint32 `[n, 2]` keys of images `(seed, label, index)`: `fold_in(fold_in(PRNGKey(seed),
  label), index)`, the same on any device count, batch size or shard layout."""
  labels = np.asarray(labels, np.int64)
  indices = np.asarray(indices, np.int64)
  if labels.shape != indices.shape or labels.ndim != 1:
    raise ValueError(f"image_keys: labels {labels.shape} and indices {indices.shape} must be "
                     "equal 1-d shapes")
  if labels.size and (labels.min() < 0 or indices.min() < 0 or labels.max() >= 2**31
                      or indices.max() >= 2**31):
    raise ValueError("image_keys: labels and indices must lie in [0, 2**31)")
  return np.asarray(_fold_keys(jax.random.PRNGKey(int(seed)), jnp.asarray(labels, jnp.uint32),
                               jnp.asarray(indices, jnp.uint32)), np.uint32)


@jax.jit
def _fold_keys(root, labels, indices):
  return jax.vmap(lambda l, i: jax.random.fold_in(jax.random.fold_in(root, l), i))(labels,
                                                                                   indices)
