"""The `dit` task: stage 2 of VIGFace (DESIGN §1), a pixel DiT drawing a face from a class centre.

Each training example is an aligned face, its five-point landmark image and its class's *real*
row from stage 1. The network (`models/stage2.py`) sees the noisy image ⊕ the landmark image
(plus blurred copies of it, `model.landmark_blur`) and the condition `t_emb + Linear(row)`;
rows are replaced by the zero vector with probability `diffusion.cond_drop` (classifier-free
guidance). Loss: the denoising MSE (v-prediction by default) plus the identity loss
`‖f_FR(x̂0) − w‖²` through the frozen stage-1 network on low-noise timesteps. The frozen
network and the row table ride in the train state's non-optimised part
(`loop.fit(trainable=...)`), loaded from the stage-1 workdir into a fresh state only. With
`diffusion.condition = 'image'` the condition (and the identity loss's target) is instead the
training image's own unit stage-1 feature (Arc2Face's choice), so the DiT also learns what the
spread of features within an identity looks like; its evaluators still condition on rows.

Writes into the workdir (besides checkpoints, metrics and TensorBoard events) what its
evaluators (`config.evals`, `evaluate/evaluators.py`) measure: `samples/step_<N>.png` sample
sheets, the identity-consistency and landmark-following figures, the guidance sweep; and
`summary.json` with the last training metrics and those figures.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import pipeline
from vigface_jax.diffusion import losses
from vigface_jax.diffusion import parameterization
from vigface_jax.diffusion import samplers
from vigface_jax.diffusion import schedules
from vigface_jax.evaluate import common as evaluators_lib
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.evaluate import evaluators
from vigface_jax.evaluate import generation
from vigface_jax.models import dit as dit_lib
from vigface_jax.models import iresnet
from vigface_jax.models import stage2
from vigface_jax.train import compile_only
from vigface_jax.train import loop
from vigface_jax.train import optim
from vigface_jax.train import state as state_lib

STAGE1_COMMAND = "python -m vigface_jax.main --config=configs/fr.py:demo --workdir=<stage-1 dir>"
CONDITIONS = ("row", "image")  # diffusion.condition: the class's row (the paper) | the image's feature
EVALUATORS = ("sample_sheet", "identity", "landmark_following", "guidance_sweep")
REQUIRED_FIELDS = ("data.source", "train.num_steps", "model.variant")


def dit_loss(model: stage2.Stage2, batch: dict[str, jax.Array], rng: jax.Array, *, cfg: Any,
             schedule: schedules.Schedule) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Diffusion loss (+ identity loss) of one batch; see the module docstring."""
  d = cfg.diffusion
  x0 = model.to_model_size(stage2.to_model_range(batch["image"]))
  lmk = stage2.landmark_input(batch["landmarks"], batch["has_landmarks"])
  if d.get("condition", "row") == "image":  # the image's own stage-1 feature (Arc2Face-like)
    rows = jax.lax.stop_gradient(image_condition(model, batch["image"]))
  else:
    rows = jnp.take(model.rows[...], batch["label"], axis=0)
  r_t, r_n, r_c, r_l = jax.random.split(rng, 4)
  b = x0.shape[0]
  t = jax.random.randint(r_t, (b,), 0, schedule.num_timesteps)
  noise = jax.random.normal(r_n, x0.shape, jnp.float32)
  x_t = parameterization.q_sample(schedule, x0, t, noise)
  kept = losses.keep_mask(r_c, b, float(d.cond_drop))
  cond = jnp.where(kept[:, None], rows, 0.0)  # the zero vector is the null condition
  if float(d.landmark_drop) > 0:
    lmk = losses.drop_landmarks(r_l, lmk, float(d.landmark_drop), fill=-1.0)
  pred = model.denoise(x_t, t, cond, model.landmark_channels(lmk))
  _, diff_loss = losses.diffusion_loss(pred, x0, noise, t, schedule, kind=d.prediction,
                                       weighting=d.weighting, min_snr_gamma=float(d.snr_gamma))
  metrics = {"loss_diffusion": diff_loss}
  loss = diff_loss
  weight = float(d.id_loss_weight)
  if weight > 0:
    x0_hat, _ = parameterization.pred_to_x0_eps(d.prediction, pred, x_t, t, schedule)
    # Rows dropped to the null condition have no identity to match: push their t past the
    # identity loss's maximum so they are masked out with the too-noisy ones.
    t_id = jnp.where(kept, t, schedule.num_timesteps)
    id_loss = losses.identity_loss(model.embed, jnp.clip(x0_hat, -1.0, 1.0), rows, t_id,
                                   max_timestep=int(d.id_loss_max_t), weight=1.0)
    metrics["loss_identity"] = id_loss
    loss = loss + weight * id_loss
  return loss, metrics


def image_condition(model: stage2.Stage2, images: jax.Array) -> jax.Array:
  """uint8 aligned faces `[b, 112, 112, 3]` → their unit stage-1 features `[b, d]`: the
  condition of `diffusion.condition = 'image'` (also the identity loss's target there)."""
  emb = model.embed(stage2.to_model_range(images)).astype(jnp.float32)
  return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a stage-2 config once, before anything is built (ConfigError)."""
  config_lib.validate_parallelism(config, dry_run_task=True)
  pipeline.validate(config)
  f = config_lib.Fields(config, "")
  s1 = f.sub("stage1")
  s1.str("workdir", optional=True)
  backbone = s1.sub("dry_run_backbone")
  backbone.choice("arch", sorted(iresnet.VARIANTS))
  backbone.int("embed_dim", 1)
  backbone.int("input_size", 1)
  m = f.sub("model")
  m.choice("variant", sorted(dit_lib.VARIANTS))
  hidden, heads = (m.int(k, 1, optional=True) for k in ("hidden", "heads"))
  m.int("depth", 1, optional=True)
  sizes = stage2.variant(config.model)
  if (hidden is not None or heads is not None) and (sizes.hidden % sizes.heads or
                                                    sizes.hidden % 4):
    m.fail("hidden" if hidden is not None else "heads", f"a multiple of 4 that the "
           f"{sizes.heads} heads divide (the 2-D sin-cos position table)", sizes.hidden)
  size = m.int("image_size", 1, most=stage2.OUTPUT_SIZE)
  if size % m.int("patch_size", 1):
    m.fail("patch_size", f"a divisor of model.image_size = {size}", m.get("patch_size"))
  m.str("dtype")
  m.bool("remat")
  m.bool("scan_blocks")
  m.int("output_overlap", 0)
  m.bool("long_skips")
  m.bool("output_conv")
  m.bool("landmark_pose")
  blur = m.get("landmark_blur")
  try:
    sigmas = tuple(float(v) for v in (() if blur is None else blur))
  except (TypeError, ValueError):
    sigmas = None
  if sigmas is None or not all(math.isfinite(v) and v > 0 for v in sigmas):
    raise config_lib.ConfigError(
        f"model.landmark_blur must be a tuple of positive σ in pixels (() = off), got {blur!r}")
  m.int("num_real", 1, optional=True)
  d = f.sub("diffusion")
  d.choice("schedule", ("cosine", "linear"))
  num_t = d.int("timesteps", 2)
  d.float("schedule_shift", above=0.0)
  d.choice("prediction", parameterization.KINDS)
  d.choice("weighting", ("none", "min_snr", "snr", "v"))
  d.float("snr_gamma", above=0.0)
  d.float("cond_drop", 0.0, most=1.0)
  d.choice("condition", CONDITIONS)
  d.float("landmark_drop", 0.0, most=1.0)
  d.float("id_loss_weight", 0.0)
  d.int("id_loss_max_t", 0)
  optim.validate(f.sub("optim"))
  loop.validate(f.sub("train"))
  s = f.sub("sample")
  s.int("num_steps", 1)
  s.float("eta", 0.0)
  s.choice("spacing", samplers.SPACINGS)
  s.float("guidance", 0.0)
  interval = s.get("guidance_interval")
  if interval is not None:
    try:
      lo, hi = (int(v) for v in interval)
    except (TypeError, ValueError):
      lo = hi = -1
    if not 0 <= lo <= hi < num_t:
      raise config_lib.ConfigError(
          f"sample.guidance_interval must be None or (t_lo, t_hi) with 0 <= t_lo <= t_hi < "
          f"diffusion.timesteps = {num_t}, got {interval!r}")
  s.float("guidance_rescale", 0.0, most=1.0)
  pose = s.get("pose_guidance")
  try:
    pose_ok = math.isfinite(float(pose)) and float(pose) >= 0 and not isinstance(pose, bool)
  except (TypeError, ValueError):
    pose_ok = False
  if not pose_ok:
    raise config_lib.ConfigError(
        f"sample.pose_guidance must be a finite number >= 0 (0 = off), got {pose!r}")
  s.int("seed", 0)
  # The identity and pose evaluations draw their landmark sets from the sheet's.
  s.int("sheet_landmarks", 1)
  s.int("batch_size", 1)
  evaluators_lib.validate(config.evals, EVALUATORS)


def _stage1_info(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """(path of prototypes.npz, the export's backbone description) of stage1.workdir."""
  root = config.stage1.workdir
  try:
    _, info = embed_lib.read_info(root)
  except ValueError as e:
    raise config_lib.ConfigError(f"stage1.workdir={root}: {e}; a finished `{STAGE1_COMMAND}` "
                                 "writes it") from None
  return os.path.join(root, "prototypes.npz"), info


def _stage1(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], np.ndarray]:
  """(backbone info, real rows [n, d]) from the stage-1 workdir; ConfigError if absent."""
  root = config.stage1.workdir
  if not root:
    raise config_lib.ConfigError(
        "stage1.workdir is not set: stage 2 needs the stage-1 workdir (its export/ and "
        f"prototypes.npz); produce one with `{STAGE1_COMMAND}` and pass "
        "--config.stage1.workdir=<stage-1 dir>")
  npz, info = _stage1_info(config)
  if not os.path.exists(npz):
    raise config_lib.ConfigError(f"{npz} is missing: stage 1 writes it when it finishes "
                                 f"(`{STAGE1_COMMAND}`)")
  with np.load(npz) as f:
    rows = np.asarray(f["real"], np.float32)
  return info, rows


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--config.dry_run=True`: the stage-2 step and stage 3's sampler for this model (one call
  of `sample.batch_size` images) compiled for the configured mesh; nothing
  trained, initialised or read beyond the stage-1 run's description and row count (when
  `stage1.workdir` is set; else `stage1.dry_run_backbone` and `model.num_real`)."""
  if config.stage1.workdir:
    info, rows = _stage1(config)
    n = rows.shape[0]
  else:
    info = dict(config.stage1.dry_run_backbone)
    n = config.model.num_real
    if n is None:
      raise config_lib.ConfigError(
          "dry run without stage1.workdir: set model.num_real (the stage-1 run's real "
          "identities; CASIA-WebFace: 10572)")
  mesh = compile_only.dry_run_mesh(config)
  config = compile_only.for_target(config, mesh)
  schedule = schedules.from_config(config.diffusion)
  loss_fn = functools.partial(dit_loss, cfg=config, schedule=schedule)
  figures, setup = compile_only.compile_train_step(
      config, mesh=mesh, create_model=create_model(config, info, int(n)), loss_fn=loss_fn,
      trainable=stage2.TRAINABLE, return_setup=True)
  figures["sampler"] = compile_only.compile_sampler(config, mesh, setup, schedule,
                                                    int(info["embed_dim"]))
  figures.update(num_real=int(n), variant=config.model.variant,
                 image_size=int(config.model.image_size), patch_size=int(config.model.patch_size),
                 compute_dtype=config.model.dtype,
                 frozen_fr={k: info[k] for k in ("arch", "embed_dim", "input_size")})
  return compile_only.report("dit", figures, workdir)


def create_model(config: ml_collections.ConfigDict, fr_info: dict[str, Any], num_real: int):
  """`create(rngs=...)` building the `Stage2` network of `config.model`."""
  return stage2.builder(config.model, fr_info, num_real)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains stage 2 and runs its evaluators (identity consistency of samples from real rows,
  landmark following, sample sheets)."""
  validate(config)
  if config.dry_run:
    return dry_run(config, workdir)
  info, real_rows = _stage1(config)
  rules = config.sharding_rules
  mesh = parallel.mesh_from_config(config)
  data = pipeline.make_pipeline(config, mesh, rules)
  n = pipeline.num_classes(config, data.source)
  if n != real_rows.shape[0]:
    raise config_lib.ConfigError(
        f"the data has {n} identities but stage 1 ({config.stage1.workdir}) has "
        f"{real_rows.shape[0]} real rows: train stage 2 on the data stage 1 was trained on")
  schedule = schedules.from_config(config.diffusion)
  points = generation.fixed_landmarks(data.source, int(config.sample.sheet_landmarks),
                                      int(config.sample.seed))
  fr_model, _ = embed_lib.load_backbone(config.stage1.workdir)
  fr_values = {path: var[...] for path, var in nnx.state(fr_model).flat_state()}

  def initialize(state: state_lib.TrainState, setup) -> state_lib.TrainState:
    del setup
    for path, var in state.rest["fr"].flat_state():
      if path in fr_values:
        # parallel.put: the sharding may span other processes' devices.
        value = fr_values[path]
        if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
          value = np.asarray(value, var[...].dtype)
        var[...] = parallel.put(value, var[...].sharding)
    rows = state.rest["rows"]
    rows[...] = parallel.put(np.asarray(real_rows, np.float32), rows[...].sharding)
    return state

  def make_evaluators(setup: state_lib.Setup) -> list[evaluators_lib.Evaluator]:
    samples = evaluators.SampleContext(setup, config, schedule, real_rows, points,
                                       workdir=workdir, source=data.source, mesh=mesh,
                                       rules=rules)
    return evaluators_lib.from_config(config.evals, {"samples": samples})

  loss_fn = functools.partial(dit_loss, cfg=config, schedule=schedule)
  summary: dict[str, Any] = {"task": "dit", "num_real": n, "variant": config.model.variant,
                             "patch_size": int(config.model.patch_size)}
  sizes = stage2.variant(config.model)
  logging.info("stage 2: DiT-%s/%d (width %d, %d blocks, %d heads) on %d identities",
               config.model.variant, config.model.patch_size, sizes.hidden, sizes.depth,
               sizes.heads, n)
  with data, metrics_lib.MetricWriter(workdir) as writer:
    result = loop.fit(config, workdir, mesh=mesh, create_model=create_model(config, info, n),
                      loss_fn=loss_fn, data=data,
                      images_per_step=int(config.data.global_batch_size),
                      make_evaluators=make_evaluators, writer=writer,
                      trainable=stage2.TRAINABLE, initialize=initialize)
  summary.update(result.metrics)
  metrics_lib.write_summary(workdir, summary)
  return summary
