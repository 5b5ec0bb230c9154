"""Discrete-time noise schedules, numerically matching diffusers' schedulers.

Betas are computed in float64 numpy and cast to float32; `alphas_cumprod` is a float64 cumulative
product cast to float32 (diffusers' float32 torch cumprod agrees to ~1e-6).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete diffusion schedule; every array field is float32 of shape [num_timesteps].

  Attributes:
    betas: β_t.
    alphas: 1 − β_t.
    alphas_cumprod: ᾱ_t = Π_{s≤t} α_s.
    sqrt_alphas_cumprod: √ᾱ_t.
    sqrt_one_minus_alphas_cumprod: √(1 − ᾱ_t).
    num_timesteps: T (static: a pytree meta field, so jit treats it as a Python int).
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  num_timesteps: int


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=[
        "betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
    ],
    meta_fields=["num_timesteps"],
)


def from_betas(betas: np.ndarray) -> Schedule:
  """Builds a `Schedule` from float64 betas (all derived quantities in float64, then float32)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array with values in (0, 1)")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  return Schedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(alphas_cumprod),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      num_timesteps=int(betas.shape[0]),
  )


def linear_schedule(
    T: int = 1000,  # pylint: disable=invalid-name
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    scaled: bool = False,
) -> Schedule:
  """DDPM's linear betas (diffusers "linear"), or diffusers' "scaled_linear" when `scaled`.

  Args:
    T: number of training timesteps.
    beta_start: β_0.
    beta_end: β_{T−1}.
    scaled: if True, betas are linear in √β (Stable Diffusion's "scaled_linear").

  Returns:
    The schedule.
  """
  if scaled:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
  else:
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
  return from_betas(betas)


def cosine_schedule(
    T: int = 1000,  # pylint: disable=invalid-name
    s: float = 0.008,
    max_beta: float = 0.999,
) -> Schedule:
  """Nichol & Dhariwal's cosine schedule (diffusers "squaredcos_cap_v2").

  β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) with ᾱ(τ) = cos²((τ + s)/(1 + s) · π/2).

  Args:
    T: number of training timesteps.
    s: small offset keeping β_0 away from zero.
    max_beta: cap on β (avoids a singularity at τ = 1).

  Returns:
    The schedule.
  """

  def alpha_bar(tau: float) -> float:
    return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

  betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
  return from_betas(np.asarray(betas, np.float64))


def shift_snr(schedule: Schedule, shift: float) -> Schedule:
  """`schedule` with every step's SNR divided by shift² (shift > 1: noisier at every t).

  The resolution shift of Hoogeboom et al. 2023 ("simple diffusion": shift = resolution / 64
  keeps a schedule made for 64-pixel images as destructive at a larger one, where neighbouring
  pixels average the noise away) and of SD3's timestep shift: ᾱ'_t = ᾱ_t / (ᾱ_t + shift²(1 −
  ᾱ_t)), computed in float64 from the schedule's ᾱ, back to betas and then as `from_betas`.
  Anything keyed to t (the identity loss's t range, a guidance interval) keeps its t and so
  meets another noise level; SNR weightings follow the shifted SNR.
  """
  shift = float(shift)
  if not (math.isfinite(shift) and shift > 0):
    raise ValueError(f"schedule shift must be a finite number > 0, got {shift!r}")
  if shift == 1.0:
    return schedule
  a = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
  a = a / (a + shift**2 * (1.0 - a))
  return from_betas(1.0 - a / np.concatenate([[1.0], a[:-1]]))


def make_schedule(name: str, T: int = 1000, shift: float = 1.0,  # pylint: disable=invalid-name
                  **kwargs) -> Schedule:
  """A schedule by diffusers' `beta_schedule` name.

  Args:
    name: "linear", "scaled_linear", or "cosine" / "squaredcos_cap_v2".
    T: number of training timesteps.
    shift: SNR shift (`shift_snr`); 1 = the named schedule itself.
    **kwargs: forwarded to the builder (beta_start/beta_end, or s/max_beta).

  Returns:
    The schedule.
  """
  if name == "linear":
    schedule = linear_schedule(T, **kwargs)
  elif name == "scaled_linear":
    schedule = linear_schedule(T, scaled=True, **kwargs)
  elif name in ("cosine", "squaredcos_cap_v2"):
    schedule = cosine_schedule(T, **kwargs)
  else:
    raise ValueError(f"unknown schedule {name!r}")
  return shift_snr(schedule, shift)


def from_config(diffusion: Any) -> Schedule:
  """The schedule a stage-2 config's `diffusion` section names (a run's config.json from before
  `schedule_shift` existed trained unshifted)."""
  return make_schedule(diffusion.schedule, int(diffusion.timesteps),
                       shift=float(diffusion.get("schedule_shift", 1.0)))


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at integer timesteps `t` (any shape)."""
  a = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
  return a / (1.0 - a)
