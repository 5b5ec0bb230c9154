"""DDIM / DDPM samplers (diffusers-exact step rules) and classifier-free guidance.

A denoiser is `model_fn(x_t, t) -> prediction` with x_t [b, H, W, C] float32 and t int32 [b];
what it predicts ('eps', 'v' or 'x0') is passed separately as `kind`. Each sampler runs its
steps as one `jax.lax.scan`, so under `jax.jit` (with `model_fn`, `shape` and the keyword
options static, e.g. via `functools.partial`) it compiles once whatever `num_steps`. Timesteps
are host-side numpy (static Python ints). Results are deterministic for a fixed `rng`.

`rng` is one key for the whole batch, or one key per example (`[b, 2]` raw keys or `[b]`
typed keys): then example i's starting noise and every step's noise come from its own key
alone, so what an example draws does not depend on which batch it is in or how large that
batch is (the dataset generator relies on this).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vigface_jax.diffusion.parameterization import pred_to_x0_eps_coef
from vigface_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("leading", "trailing", "linspace")


def timesteps(
    num_train: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
  """Inference timesteps, descending, exactly as diffusers `DDIMScheduler.set_timesteps`.

  Args:
    num_train: number of training timesteps T.
    num_steps: number of sampling steps (≤ T).
    spacing: 'leading' (k·⌊T/n⌋ + offset), 'trailing' (round(T − k·T/n) − 1) or 'linspace'
      (round(linspace(0, T − 1, n))), see Lin et al. 2023, Table 2.
    steps_offset: added to 'leading' timesteps (diffusers' `steps_offset`).

  Returns:
    int64 numpy array [num_steps].
  """
  if not 0 < num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if spacing == "linspace":
    ts = np.linspace(0, num_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
  elif spacing == "leading":
    step_ratio = num_train // num_steps
    ts = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
    ts += steps_offset
  elif spacing == "trailing":
    step_ratio = num_train / num_steps
    ts = np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1
  else:
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
  return ts


def per_example(rng: jax.Array | None) -> bool:
  """Whether `rng` holds one key per example (`[b, 2]` raw or `[b]` typed keys)."""
  if rng is None:
    return False
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim == (1 if typed else 2)


def _normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """N(0, I) of `shape` from one key, or per example from a batch of keys."""
  if per_example(key):
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape)[1:], jnp.float32))(key)
  return jax.random.normal(key, tuple(shape), jnp.float32)


def _initial_noise(
    rng: jax.Array | None,
    shape: Sequence[int],
    x_T: jax.Array | None,  # pylint: disable=invalid-name
) -> tuple[jax.Array, jax.Array | None]:
  """(x_T, rng for the steps): x_T drawn from N(0, I) unless given."""
  if rng is None:
    if x_T is None:
      raise ValueError("rng is required unless x_T is given")
    return jnp.asarray(x_T, jnp.float32), None
  if per_example(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} per-example keys for a batch of {shape[0]}")
    split = jax.vmap(jax.random.split)(rng)
    rng_init, rng_steps = split[:, 0], split[:, 1]
  else:
    rng_init, rng_steps = jax.random.split(rng)
  if x_T is None:
    x_T = _normal(rng_init, shape)
  return jnp.asarray(x_T, jnp.float32), rng_steps


def _step_keys(rng: jax.Array | None, num_steps: int) -> jax.Array:
  if rng is None:
    return jnp.zeros((num_steps,), jnp.uint32)  # placeholder: never used to draw noise
  if per_example(rng):  # [num_steps, b, ...]: the scan hands each step its batch of keys
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num_steps))(rng), 0, 1)
  return jax.random.split(rng, num_steps)


def _finish(x: jax.Array, traj: jax.Array, return_trajectory: bool) -> Any:
  return (x, traj) if return_trajectory else x


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: Sequence[int],
    rng: jax.Array | None,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    kind: str = "v",
    spacing: str = "leading",
    steps_offset: int = 0,
    clip_x0: float | None = None,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
    x_T: jax.Array | None = None,  # pylint: disable=invalid-name
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """DDIM (Song et al. 2021) with diffusers' `DDIMScheduler.step` rule.

  The previous timestep is t − ⌊T/n⌋ (as diffusers, for every spacing); below zero it uses
  ᾱ = 1 (`set_alpha_to_one`) or ᾱ_0.

  Args:
    model_fn: denoiser (x_t [b, ...], t int32 [b]) -> prediction of `kind`.
    schedule: the training noise schedule.
    shape: sample shape [b, H, W, C] (static).
    rng: PRNG key for x_T and the η > 0 noise (or one per example, see the module
      docstring); may be None when x_T is given and eta == 0.
    num_steps: number of denoising steps.
    eta: DDIM η (0: deterministic; 1: DDPM-like variance).
    kind: 'eps', 'v' or 'x0'.
    spacing: timestep spacing, see `timesteps`.
    steps_offset: diffusers' `steps_offset` for 'leading'.
    clip_x0: if set, x̂0 is clipped to [−clip_x0, clip_x0].
    set_alpha_to_one: final ᾱ_prev = 1 (else ᾱ_0).
    use_clipped_model_output: recompute ε̂ from the clipped x̂0 (diffusers' flag).
    x_T: optional starting noise of `shape` (float32).
    return_trajectory: also return the samples after every step [num_steps, *shape].

  Returns:
    x_0 [*shape] (and the trajectory when `return_trajectory`).
  """
  T = schedule.num_timesteps  # pylint: disable=invalid-name
  ts = timesteps(T, num_steps, spacing, steps_offset)
  prev = ts - T // num_steps
  ac = schedule.alphas_cumprod
  final = jnp.float32(1.0) if set_alpha_to_one else ac[0]
  a_t = ac[ts]
  a_prev = jnp.where(prev >= 0, ac[np.maximum(prev, 0)], final)
  if eta > 0 and rng is None:
    raise ValueError("eta > 0 needs an rng")
  x, rng = _initial_noise(rng, shape, x_T)
  keys = _step_keys(rng, num_steps)
  t_arr = jnp.asarray(ts, jnp.int32)

  def body(x, inp):
    t, alpha, alpha_prev, key = inp
    pred = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    sqrt_a, sqrt_1ma = alpha**0.5, (1.0 - alpha) ** 0.5
    x0, eps = pred_to_x0_eps_coef(kind, pred.astype(jnp.float32), x, sqrt_a, sqrt_1ma)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      if use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_1ma
    variance = ((1.0 - alpha_prev) / (1.0 - alpha)) * (1.0 - alpha / alpha_prev)
    std = eta * variance**0.5
    direction = jnp.maximum(1.0 - alpha_prev - std**2, 0.0) ** 0.5 * eps
    x_prev = alpha_prev**0.5 * x0 + direction
    if eta > 0:
      x_prev = x_prev + std * _normal(key, x.shape)
    return x_prev, x_prev

  x, traj = jax.lax.scan(body, x, (t_arr, a_t, a_prev, keys))
  return _finish(x, traj, return_trajectory)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: Sequence[int],
    rng: jax.Array,
    *,
    num_steps: int | None = None,
    kind: str = "v",
    spacing: str = "leading",
    steps_offset: int = 0,
    clip_x0: float | None = None,
    x_T: jax.Array | None = None,  # pylint: disable=invalid-name
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Ancestral DDPM sampling with diffusers' `DDPMScheduler.step` ('fixed_small' variance).

  With timesteps t > t' (t' the next in the list, or −1 → ᾱ = 1) and α = ᾱ_t/ᾱ_t', β = 1 − α:
  x_t' = √ᾱ_t'·β/(1 − ᾱ_t)·x̂0 + √α·(1 − ᾱ_t')/(1 − ᾱ_t)·x_t + σ·z, σ² = (1 − ᾱ_t')/(1 − ᾱ_t)·β
  (clamped at 1e-20), and no noise at t = 0.

  Args:
    model_fn: denoiser (x_t [b, ...], t int32 [b]) -> prediction of `kind`.
    schedule: the training noise schedule.
    shape: sample shape [b, H, W, C] (static).
    rng: PRNG key for x_T and the per-step noise.
    num_steps: number of steps (default: all T training timesteps).
    kind: 'eps', 'v' or 'x0'.
    spacing: timestep spacing, see `timesteps`.
    steps_offset: diffusers' `steps_offset` for 'leading'.
    clip_x0: if set, x̂0 is clipped to [−clip_x0, clip_x0].
    x_T: optional starting noise of `shape` (float32).
    return_trajectory: also return the samples after every step [num_steps, *shape].

  Returns:
    x_0 [*shape] (and the trajectory when `return_trajectory`).
  """
  T = schedule.num_timesteps  # pylint: disable=invalid-name
  num_steps = T if num_steps is None else num_steps
  ts = timesteps(T, num_steps, spacing, steps_offset)
  prev = np.concatenate([ts[1:], [-1]])
  ac = schedule.alphas_cumprod
  a_t = ac[ts]
  a_prev = jnp.where(prev >= 0, ac[np.maximum(prev, 0)], jnp.float32(1.0))
  add_noise = jnp.asarray(ts > 0, jnp.float32)
  x, rng = _initial_noise(rng, shape, x_T)
  keys = _step_keys(rng, num_steps)
  t_arr = jnp.asarray(ts, jnp.int32)

  def body(x, inp):
    t, alpha, alpha_prev, noise_on, key = inp
    pred = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0, _ = pred_to_x0_eps_coef(
        kind, pred.astype(jnp.float32), x, alpha**0.5, (1.0 - alpha) ** 0.5
    )
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    beta_prod, beta_prod_prev = 1.0 - alpha, 1.0 - alpha_prev
    cur_alpha = alpha / alpha_prev
    cur_beta = 1.0 - cur_alpha
    mean = (alpha_prev**0.5 * cur_beta / beta_prod) * x0 + (
        cur_alpha**0.5 * beta_prod_prev / beta_prod
    ) * x
    variance = jnp.maximum(beta_prod_prev / beta_prod * cur_beta, 1e-20)
    noise = _normal(key, x.shape)
    x_prev = mean + noise_on * variance**0.5 * noise
    return x_prev, x_prev

  x, traj = jax.lax.scan(body, x, (t_arr, a_t, a_prev, add_noise, keys))
  return _finish(x, traj, return_trajectory)


def rescale_guided(guided: jax.Array, cond_out: jax.Array, phi: float | jax.Array) -> jax.Array:
  """Guidance rescale (Lin et al. 2023, §3.4; diffusers' `rescale_noise_cfg`).

  Scales each example's guided prediction to the standard deviation of its conditional one,
  then mixes: φ·rescaled + (1 − φ)·guided. It undoes the over-exposure large scales cause.
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
  std_guided = jnp.maximum(jnp.std(guided, axis=axes, keepdims=True), 1e-12)
  rescaled = guided * (std_cond / std_guided)
  return phi * rescaled + (1.0 - phi) * guided


def cfg_model_fn(
    model_fn_with_cond: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    guidance_scale: float | jax.Array,
    null_cond: Any = None,
    *,
    interval: tuple[int, int] | None = None,
    rescale: float | jax.Array = 0.0,
    negative: Any = None,
    negative_scale: float | jax.Array = 0.0,
    skip_outside: bool = False,
) -> ModelFn:
  """A classifier-free-guided denoiser: uncond + s·(cond − uncond) [+ s_n·(cond − negative)].

  Conditional and unconditional halves run in ONE call of `model_fn_with_cond` on a doubled
  batch [x; x], [t; t], [cond; null] (tripled, with [negative], when `negative` is given).
  s = 1 gives the conditional model, s = 0 the unconditional one. Guidance acts linearly on
  the prediction, so it applies to any `kind`.

  Args:
    model_fn_with_cond: (x_t [kb, ...], t [kb], cond pytree with leading dim kb) -> pred.
    cond: condition pytree, each leaf with leading dim b.
    guidance_scale: s (Python float or scalar array).
    null_cond: the unconditional condition (default: zeros like `cond`, the training dropout).
    interval: (t_lo, t_hi): guide only at timesteps t_lo ≤ t ≤ t_hi and use the conditional
      prediction (s = 1, s_n = 0) elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in
      a limited interval": guidance at high noise collapses samples onto a few over-saturated
      modes, at low noise it does little). None: every timestep.
    rescale: φ of `rescale_guided`, applied where guidance is (0 = off).
    negative: a second reference condition (same structure as `cond`), for guidance away from
      it with scale `negative_scale`, on top of the classifier-free guidance: the "negative
      prompt" of text-to-image samplers with its own scale. For VIGFace, the same row with the
      data's typical landmark image, which extrapolates what the requested pose changes.
    negative_scale: s_n (0 with `negative` given still runs the third batch).
    skip_outside: with `interval`, run only the conditional batch at timesteps outside it
      (one `lax.cond` on the step's timestep, which the samplers give every example alike)
      instead of the doubled batch whose guided combination equals it up to rounding: the
      same samples up to float rounding, at (steps outside) / (2 · steps) less compute.

  Returns:
    `model_fn(x_t, t)` for the samplers.
  """
  if null_cond is None:
    null_cond = jax.tree_util.tree_map(jnp.zeros_like, cond)
  parts = [cond, null_cond] + ([] if negative is None else [negative])
  batched = jax.tree_util.tree_map(lambda *c: jnp.concatenate(c, 0), *parts)
  k = len(parts)
  if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
    raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval!r}")

  def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
    b = x_t.shape[0]
    out = model_fn_with_cond(jnp.concatenate([x_t] * k, 0), jnp.concatenate([t] * k, 0),
                             batched)
    cond_out, uncond_out = out[:b], out[b:2 * b]
    scale = jnp.asarray(guidance_scale, jnp.float32)
    neg_scale = jnp.asarray(negative_scale, jnp.float32)
    if interval is not None:
      inside = ((t >= interval[0]) & (t <= interval[1])).reshape((b,) + (1,) * (x_t.ndim - 1))
      scale = jnp.where(inside, scale, 1.0)
      neg_scale = jnp.where(inside, neg_scale, 0.0)
    result = uncond_out + scale * (cond_out - uncond_out)
    if negative is not None:
      result = result + neg_scale * (cond_out - out[2 * b:])
    if isinstance(rescale, (int, float)) and rescale == 0:
      return result
    return rescale_guided(result, cond_out, rescale)

  if interval is None or not skip_outside:
    return guided

  def conditional(x_t: jax.Array, t: jax.Array) -> jax.Array:
    return model_fn_with_cond(x_t, t, cond).astype(jnp.float32)

  def maybe_guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
    inside = (t[0] >= interval[0]) & (t[0] <= interval[1])
    return jax.lax.cond(inside, lambda: guided(x_t, t).astype(jnp.float32),
                        lambda: conditional(x_t, t))

  return maybe_guided
