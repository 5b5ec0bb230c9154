"""Training losses for the stage-2 DiT: denoising MSE (with SNR weighting), identity loss, and
condition dropout for classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vigface_jax import ops
from vigface_jax.diffusion import parameterization
from vigface_jax.diffusion.schedules import Schedule, snr as schedule_snr

WEIGHTINGS = ("none", "min_snr", "snr", "v")


def snr_weight(
    snr: jax.Array, kind: str = "v", weighting: str = "none", min_snr_gamma: float = 5.0
) -> jax.Array:
  """Per-example weight on the `kind`-space MSE.

  ‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR + 1)·‖x0 − x̂0‖², so an x0-space weight w(SNR)
  becomes w / SNR for ε and w / (SNR + 1) for v. 'min_snr' is Hang et al. (2023):
  w = min(SNR, γ), i.e. min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x0.
  'snr' is w = SNR (the plain ε-MSE, expressed for each kind). 'v' is w = min(SNR + 1, γ), the
  v-MSE truncated at γ: with x0-prediction this is JiT's "x-prediction, v-loss" (Li & He 2025),
  which up-weights low-noise examples so a narrow model still learns sharp reconstructions.
  'none' weighs every example by 1. For 'edm' (‖x0 − x̂0‖² = c_out²·‖F − F̂‖², c_out² =
  σ_d² / (1 + σ_d²·SNR)) an x0-space weight w becomes w·c_out²; its 'none' is EDM's own loss
  weighting (unit weight on the unit-variance F target).

  Args:
    snr: signal-to-noise ratios, any shape.
    kind: the prediction kind ('eps', 'v' or 'x0').
    weighting: 'none', 'min_snr', 'snr' or 'v'.
    min_snr_gamma: γ of min-SNR-γ (the cap of 'v').

  Returns:
    Weights shaped like `snr` (float32).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  parameterization._check_kind(kind)  # pylint: disable=protected-access
  snr = jnp.asarray(snr, jnp.float32)
  if weighting == "none":
    return jnp.ones_like(snr)
  if kind == "edm":
    d2 = parameterization.EDM_SIGMA_DATA ** 2
    return snr_weight(snr, "x0", weighting, min_snr_gamma) * d2 / (1.0 + d2 * snr)
  if weighting == "snr":
    if kind == "eps":
      return jnp.ones_like(snr)
    return snr / (snr + 1.0) if kind == "v" else snr
  gamma = jnp.float32(min_snr_gamma)
  if weighting == "v":
    w = jnp.minimum(snr + 1.0, gamma)  # x0-space weight
    if kind == "x0":
      return w
    return w / (snr + 1.0) if kind == "v" else w / jnp.maximum(snr, 1e-12)
  if kind == "eps":
    return jnp.minimum(1.0, gamma / snr)  # = min(SNR, γ)/SNR, finite at SNR → 0
  clipped = jnp.minimum(snr, gamma)
  return clipped / (snr + 1.0) if kind == "v" else clipped


def diffusion_loss(
    pred: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    schedule: Schedule,
    kind: str = "v",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Weighted denoising MSE of a `kind` prediction for x_t = q_sample(x0, t, noise).

  Args:
    pred: model output [b, ...].
    x0: clean images [b, ...].
    noise: the ε used to noise x0 [b, ...].
    t: integer timesteps [b].
    schedule: the noise schedule.
    kind: 'eps', 'v' or 'x0'.
    weighting: 'none', 'min_snr', 'snr' or 'v' (see `snr_weight`).
    min_snr_gamma: γ of min-SNR-γ (the cap of 'v').
    mask: optional weights broadcastable to `pred` after right-padding with unit dims (e.g. [b]
      to drop examples, or [b, H, W, 1] for a pixel mask). The per-example loss is the masked
      mean over non-batch dims; the mean is over examples whose mask is not all zero.

  Returns:
    (per_example_loss [b], mean_loss scalar), float32.
  """
  tgt = parameterization.target(kind, x0, noise, t, schedule)
  se = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
  axes = tuple(range(1, se.ndim))
  if mask is None:
    per_example = jnp.mean(se, axis=axes)
    valid = jnp.ones(se.shape[:1], jnp.float32)
  else:
    m = parameterization.broadcast_to_ndim(jnp.asarray(mask, jnp.float32), se.ndim)
    m = jnp.broadcast_to(m, se.shape)
    denom = jnp.sum(m, axis=axes)
    per_example = jnp.sum(se * m, axis=axes) / jnp.maximum(denom, 1e-12)
    valid = (denom > 0).astype(jnp.float32)
  weights = snr_weight(schedule_snr(schedule, t), kind, weighting, min_snr_gamma)
  per_example = per_example * jnp.broadcast_to(weights, per_example.shape) * valid
  mean = jnp.sum(per_example) / jnp.maximum(jnp.sum(valid), 1.0)
  return per_example, mean


def identity_loss(
    fr_embed_fn: Callable[[jax.Array], jax.Array],
    x0_pred: jax.Array,
    rows: jax.Array,
    t: jax.Array,
    max_timestep: int,
    weight: float = 1.0,
) -> jax.Array:
  """weight · mean over {i : t_i ≤ max_timestep} of ‖normalise(f_FR(x̂0_i)) − normalise(w_i)‖².

  The FR network is frozen: `fr_embed_fn` should close over its parameters wrapped in
  `jax.lax.stop_gradient`, so gradients reach only `x0_pred` (and, unless stopped too, `rows`).

  Args:
    fr_embed_fn: images [b, H, W, C] -> embeddings [b, D].
    x0_pred: predicted clean images [b, H, W, C] (whatever range `fr_embed_fn` expects).
    rows: the identity prototypes (class-centre rows w_i) [b, D].
    t: integer timesteps [b]; examples with t > max_timestep are masked out (x̂0 too noisy).
    max_timestep: largest timestep that contributes.
    weight: loss weight.

  Returns:
    Scalar float32 loss (0 when no example qualifies).
  """
  emb = ops.l2_normalize(fr_embed_fn(x0_pred).astype(jnp.float32))
  target = ops.l2_normalize(rows.astype(jnp.float32))
  per_example = jnp.sum(jnp.square(emb - target), axis=-1)
  mask = (jnp.asarray(t) <= max_timestep).astype(jnp.float32)
  return weight * jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def keep_mask(rng: jax.Array, batch: int, p: float = 0.1) -> jax.Array:
  """Boolean [batch]: True where a row is kept (each dropped independently with prob. `p`)."""
  return jax.random.uniform(rng, (batch,)) >= p


def drop_condition(rng: jax.Array, cond: jax.Array, p: float = 0.1) -> jax.Array:
  """Replaces each row of `cond` [b, ...] by zeros with probability `p` (the CFG null cond)."""
  keep = parameterization.broadcast_to_ndim(keep_mask(rng, cond.shape[0], p), cond.ndim)
  return jnp.where(keep, cond, jnp.zeros_like(cond))


def drop_landmarks(
    rng: jax.Array, landmark_img: jax.Array, p: float = 0.1, fill: float = 0.0
) -> jax.Array:
  """Replaces each landmark image of [b, H, W, C] by `fill` with probability `p`."""
  keep = parameterization.broadcast_to_ndim(
      keep_mask(rng, landmark_img.shape[0], p), landmark_img.ndim
  )
  return jnp.where(keep, landmark_img, jnp.full_like(landmark_img, fill))
