"""Forward process and conversions between ε-, v-, x0- and EDM-preconditioned predictions.

With a = √ᾱ_t and σ = √(1 − ᾱ_t) (a² + σ² = 1), x_t = a·x0 + σ·ε and v = a·ε − σ·x0, hence
x0 = a·x_t − σ·v and ε = σ·x_t + a·v.

'edm' is Karras et al. (2022)'s preconditioning written for this VP process: the network
output F gives x0 = c_skip·x_t + c_out·F with, for r = √(σ² + σ_d²·a²),
c_skip = σ_d²·a / r² and c_out = σ·σ_d / r (σ_d = `EDM_SIGMA_DATA`, the data's standard
deviation). At low noise x0 ≈ x_t (a skip: the network only corrects it), at high noise
x0 ≈ σ_d·F (an x0-prediction), and the target F = (σ·x0/σ_d − σ_d·a·ε) / r has unit variance
at every noise level. σ_d = 1 is exactly v-prediction (F = −v); the smaller σ_d of images
hands over from skip to x0-prediction at lower noise, where a v-model must still predict most
of the noise. Timesteps `t` are integer arrays of shape [b] (one per
example) or scalars; coefficients broadcast over the trailing dims of `[b, H, W, C]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vigface_jax.diffusion.schedules import Schedule

KINDS = ("eps", "v", "x0", "edm")
EDM_SIGMA_DATA = 0.5  # EDM's σ_data for images in [-1, 1]


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"prediction kind must be one of {KINDS}, got {kind!r}")


def broadcast_to_ndim(coef: jax.Array, ndim: int) -> jax.Array:
  """Reshapes per-example `coef` ([b] or scalar) to [b, 1, ..., 1] with `ndim` dims."""
  coef = jnp.asarray(coef)
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def alpha_sigma(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(√ᾱ_t, √(1 − ᾱ_t)) at timesteps `t`, broadcastable against arrays with `ndim` dims."""
  t = jnp.asarray(t, jnp.int32)
  a = broadcast_to_ndim(schedule.sqrt_alphas_cumprod[t], ndim)
  s = broadcast_to_ndim(schedule.sqrt_one_minus_alphas_cumprod[t], ndim)
  return a, s


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x0) = √ᾱ_t·x0 + √(1 − ᾱ_t)·noise."""
  a, s = alpha_sigma(schedule, t, x0.ndim)
  return (a * x0 + s * noise).astype(x0.dtype)


def pred_to_x0_eps_coef(
    kind: str, pred: jax.Array, x_t: jax.Array, a: jax.Array, s: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(x0, ε) from a `kind` prediction given coefficients a = √ᾱ, s = √(1 − ᾱ) (broadcastable).

  The formulas are those of diffusers' DDIMScheduler.step (same operation order).
  """
  _check_kind(kind)
  if kind == "eps":
    return (x_t - s * pred) / a, pred
  if kind == "x0":
    return pred, (x_t - a * pred) / s
  if kind == "edm":
    c_skip, c_out = edm_coefficients(a, s)
    x0 = c_skip * x_t + c_out * pred
    return x0, (x_t - a * x0) / s
  return a * x_t - s * pred, a * pred + s * x_t


def edm_coefficients(a: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(c_skip, c_out) of the 'edm' kind at a = √ᾱ, s = √(1 − ᾱ) (see the module docstring)."""
  d2 = EDM_SIGMA_DATA ** 2
  r2 = s * s + d2 * a * a
  return d2 * a / r2, s * EDM_SIGMA_DATA / jnp.sqrt(r2)


def pred_to_x0_eps(
    kind: str, pred: jax.Array, x_t: jax.Array, t: jax.Array, schedule: Schedule
) -> tuple[jax.Array, jax.Array]:
  """Converts a model prediction of `kind` ('eps', 'v' or 'x0') at x_t, t to (x0, ε).

  Args:
    kind: what the model predicts.
    pred: the prediction, shaped like `x_t`.
    x_t: the noisy input [b, ...].
    t: integer timesteps, [b] or scalar.
    schedule: the noise schedule.

  Returns:
    (x0_hat, eps_hat), each shaped like `x_t`.
  """
  a, s = alpha_sigma(schedule, t, x_t.ndim)
  return pred_to_x0_eps_coef(kind, pred, x_t, a, s)


def v_target(x0: jax.Array, noise: jax.Array, t: jax.Array, schedule: Schedule) -> jax.Array:
  """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022)."""
  a, s = alpha_sigma(schedule, t, x0.ndim)
  return a * noise - s * x0


def target(
    kind: str, x0: jax.Array, noise: jax.Array, t: jax.Array, schedule: Schedule
) -> jax.Array:
  """The regression target of a `kind` model for x_t = q_sample(x0, t, noise)."""
  _check_kind(kind)
  if kind == "eps":
    return noise
  if kind == "x0":
    return x0
  if kind == "edm":
    a, s = alpha_sigma(schedule, t, x0.ndim)
    d = EDM_SIGMA_DATA
    return (s * x0 / d - d * a * noise) / jnp.sqrt(s * s + d * d * a * a)
  return v_target(x0, noise, t, schedule)


def x0_eps_to_pred(
    kind: str, x0: jax.Array, eps: jax.Array, t: jax.Array, schedule: Schedule
) -> jax.Array:
  """Inverse of `pred_to_x0_eps`: the `kind` prediction consistent with (x0, ε) at t."""
  return target(kind, x0, eps, t, schedule)
