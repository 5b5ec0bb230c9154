"""Forward process and conversions between ε-, v- and x0-predictions.

With a = √ᾱ_t and σ = √(1 − ᾱ_t) (a² + σ² = 1), x_t = a·x0 + σ·ε and v = a·ε − σ·x0, hence
x0 = a·x_t − σ·v and ε = σ·x_t + a·v. Timesteps `t` are integer arrays of shape [b] (one per
example) or scalars; coefficients broadcast over the trailing dims of `[b, H, W, C]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vigface_jax.diffusion.schedules import Schedule

KINDS = ("eps", "v", "x0")


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
  return a * x_t - s * pred, a * pred + s * x_t


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
  return v_target(x0, noise, t, schedule)


def x0_eps_to_pred(
    kind: str, x0: jax.Array, eps: jax.Array, t: jax.Array, schedule: Schedule
) -> jax.Array:
  """Inverse of `pred_to_x0_eps`: the `kind` prediction consistent with (x0, ε) at t."""
  return target(kind, x0, eps, t, schedule)
