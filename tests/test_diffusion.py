"""Tests for vigface_jax.diffusion: schedules, parameterization, losses, samplers (vs diffusers).

diffusers and torch are test-only dependencies of the comparisons with diffusers; those tests
ask for the `diffusers` / `torch` fixtures (skipped when missing, failed under CI), the rest
runs on numpy and JAX alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vigface_jax.diffusion import losses
from vigface_jax.diffusion import parameterization as P
from vigface_jax.diffusion import samplers
from vigface_jax.diffusion import schedules as S

from conftest import require

_SCHEDULE_KW = {
    "linear": {},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
}


@pytest.fixture(scope="module")
def torch():
  return require("torch", "diffusers' schedulers run on torch (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def diffusers(torch):
  del torch  # diffusers' schedulers are dummies without it
  return require("diffusers", "the reference schedulers (pip install diffusers==0.35.1)")


def _ddim(diffusers, name: str, T: int = 1000, **kw):  # pylint: disable=invalid-name
  return diffusers.DDIMScheduler(
      num_train_timesteps=T, beta_schedule=name, clip_sample=False, **_SCHEDULE_KW[name], **kw
  )


# ----------------------------------------------------------------------------- schedules


def test_linear_and_cosine_closed_forms():
  s = S.linear_schedule(1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, 1,
                             atol=1e-6)
  assert s.num_timesteps == 1000
  c = S.cosine_schedule(1000)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  ab = np.array([f((i + 1) / 1000) / f(0) for i in range(1000)])
  # Away from the max_beta cap, ᾱ_t telescopes to f((t+1)/T)/f(0).
  np.testing.assert_allclose(c.alphas_cumprod[:990], ab[:990], rtol=1e-5)
  assert float(c.betas.max()) <= 0.999 + 1e-7
  sn = S.snr(s, jnp.array([0, 500, 999]))
  ac = np.asarray(s.alphas_cumprod)[[0, 500, 999]]
  np.testing.assert_allclose(sn, ac / (1 - ac), rtol=1e-5)


@pytest.mark.parametrize("name", list(_SCHEDULE_KW))
def test_schedules_match_diffusers(name, diffusers):
  d = _ddim(diffusers, name)
  s = S.make_schedule(name, 1000, **_SCHEDULE_KW[name])
  np.testing.assert_allclose(s.betas, d.betas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(s.alphas_cumprod, d.alphas_cumprod.numpy(), atol=1e-6, rtol=0)
  assert s.betas.dtype == jnp.float32


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("shift", [0.75, 1.75, 3.0])
def test_schedule_shift_divides_every_snr_by_shift_squared(name, shift):
  base = S.make_schedule(name, 1000)
  shifted = S.make_schedule(name, 1000, shift=shift)
  t = np.arange(1000)
  a0 = np.asarray(base.alphas_cumprod, np.float64)
  a1 = np.asarray(shifted.alphas_cumprod, np.float64)
  # The closed form in float64 from the base's own betas, to float32 precision everywhere.
  a64 = np.cumprod(1 - np.asarray(base.betas, np.float64))
  np.testing.assert_allclose(a1, a64 / (a64 + shift**2 * (1 - a64)), atol=1e-6, rtol=0)
  # SNR in float32 has relative precision only where neither ᾱ nor 1 − ᾱ is near 0.
  keep = (a0 > 1e-4) & (a0 < 0.99)
  np.testing.assert_allclose(S.snr(shifted, t)[keep], (S.snr(base, t) / shift**2)[keep],
                             rtol=2e-4)
  # A valid schedule: derived quantities agree with its own betas, noisier (or cleaner) at
  # every step as the shift says, and the same end points' order.
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(shifted.betas, np.float64)), a1,
                             rtol=1e-5, atol=1e-9)
  assert np.all(np.diff(a1) < 0)
  assert np.all(a1 < a0) if shift > 1 else np.all(a1 > a0)
  np.testing.assert_allclose(shifted.sqrt_alphas_cumprod**2
                             + shifted.sqrt_one_minus_alphas_cumprod**2, 1, atol=1e-6)


def test_schedule_shift_of_one_is_the_schedule_and_old_configs_read_unshifted():
  import ml_collections  # pylint: disable=g-import-not-at-top
  base = S.make_schedule("squaredcos_cap_v2", 1000)
  assert S.shift_snr(base, 1.0) is base
  old = ml_collections.ConfigDict({"schedule": "cosine", "timesteps": 1000})  # no shift field
  np.testing.assert_array_equal(S.from_config(old).alphas_cumprod, base.alphas_cumprod)
  new = ml_collections.ConfigDict({"schedule": "cosine", "timesteps": 1000,
                                   "schedule_shift": 2.0})
  np.testing.assert_allclose(S.snr(S.from_config(new), 500), S.snr(base, 500) / 4, rtol=1e-4)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="shift"):
      S.shift_snr(base, bad)


def test_schedule_is_a_pytree_with_static_T():
  s = S.linear_schedule(10)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 5
  assert jax.tree_util.tree_unflatten(treedef, leaves).num_timesteps == 10
  assert jax.jit(lambda sch: sch.alphas_cumprod[sch.num_timesteps - 1])(s).shape == ()


# ----------------------------------------------------------------------------- parameterization


def test_parameterization_round_trips():
  sched = S.cosine_schedule(1000)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (6, 4, 4, 3))
  eps = jax.random.normal(k2, (6, 4, 4, 3))
  t = jax.random.randint(k3, (6,), 0, 1000)
  x_t = P.q_sample(sched, x0, t, eps)
  a = np.asarray(sched.sqrt_alphas_cumprod)[t]
  s = np.asarray(sched.sqrt_one_minus_alphas_cumprod)[t]
  np.testing.assert_allclose(x_t, a[:, None, None, None] * x0 + s[:, None, None, None] * eps,
                             atol=1e-6)
  v = P.v_target(x0, eps, t, sched)
  np.testing.assert_allclose(P.target("v", x0, eps, t, sched), v)
  for kind in P.KINDS:
    pred = P.target(kind, x0, eps, t, sched)
    x0_hat, eps_hat = P.pred_to_x0_eps(kind, pred, x_t, t, sched)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5 if kind != "eps" else 2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5 if kind != "x0" else 2e-3)
  # v is well conditioned everywhere: (x0, eps) -> v -> (x0, eps) at 1e-5.
  x0_hat, eps_hat = P.pred_to_x0_eps("v", v, x_t, t, sched)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
  with pytest.raises(ValueError):
    P.target("score", x0, eps, t, sched)


def test_edm_target_has_unit_variance_and_is_v_at_unit_sigma_data(monkeypatch):
  sched = S.cosine_schedule(1000)
  k1, k2 = jax.random.split(jax.random.key(3))
  t = jnp.array([0, 20, 150, 400, 700, 999])
  # Data with EDM's σ_data: the F target has unit variance at every noise level.
  x0 = P.EDM_SIGMA_DATA * jax.random.normal(k1, (t.shape[0], 64, 64, 3))
  eps = jax.random.normal(k2, x0.shape)
  f = np.asarray(P.target("edm", x0, eps, t, sched))
  np.testing.assert_allclose(f.reshape(len(t), -1).std(axis=1), 1.0, atol=0.02)
  # Low noise: x0_hat ≈ x_t whatever F is (the skip); high noise: x0_hat ≈ σ_data·F.
  a, s = P.alpha_sigma(sched, t, 4)
  c_skip, c_out = P.edm_coefficients(a, s)
  assert float(c_skip[1, 0, 0, 0] * a[1, 0, 0, 0]) > 0.99 and float(c_out[1, 0, 0, 0]) < 0.05
  assert float(c_skip[-1, 0, 0, 0]) < 1e-3
  np.testing.assert_allclose(float(c_out[-1, 0, 0, 0]), P.EDM_SIGMA_DATA, rtol=1e-3)
  monkeypatch.setattr(P, "EDM_SIGMA_DATA", 1.0)
  np.testing.assert_allclose(P.target("edm", x0, eps, t, sched),
                             -np.asarray(P.v_target(x0, eps, t, sched)), atol=1e-5)


# ----------------------------------------------------------------------------- losses


def test_min_snr_weights_match_numpy_reference():
  sched = S.linear_schedule(1000)
  t = np.array([0, 10, 100, 400, 999])
  ac = np.asarray(sched.alphas_cumprod, np.float64)[t]
  snr = ac / (1 - ac)
  ms = np.minimum(snr, 5.0)
  ref = {"eps": ms / snr, "v": ms / (snr + 1), "x0": ms}
  for kind, want in ref.items():
    got = losses.snr_weight(S.snr(sched, t), kind, "min_snr", 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(losses.snr_weight(S.snr(sched, t), kind, "none"), 1.0)


def test_diffusion_loss_weighting_is_parameterization_invariant():
  sched = S.cosine_schedule(1000)
  ks = jax.random.split(jax.random.key(1), 4)
  x0 = jax.random.normal(ks[0], (5, 4, 4, 3))
  eps = jax.random.normal(ks[1], (5, 4, 4, 3))
  x0_hat = x0 + 0.1 * jax.random.normal(ks[2], x0.shape)
  t = jnp.array([3, 50, 300, 700, 950])
  x_t = P.q_sample(sched, x0, t, eps)
  eps_hat = P.pred_to_x0_eps("x0", x0_hat, x_t, t, sched)[1]
  results = {}
  for weighting in ("min_snr", "snr", "v"):
    for kind in P.KINDS:
      pred = P.target(kind, x0_hat, eps_hat, t, sched)
      per, mean = losses.diffusion_loss(pred, x0, eps, t, sched, kind, weighting)
      results[(weighting, kind)] = per
      np.testing.assert_allclose(mean, np.mean(per), rtol=1e-6)
    for kind in ("eps", "v", "edm"):
      np.testing.assert_allclose(results[(weighting, kind)], results[(weighting, "x0")],
                                 rtol=2e-3)
  mse_x0 = np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
  ac = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
  np.testing.assert_allclose(results[("min_snr", "x0")],
                             mse_x0 * np.minimum(ac / (1 - ac), 5.0), rtol=1e-4)
  np.testing.assert_allclose(results[("v", "x0")],
                             mse_x0 * np.minimum(ac / (1 - ac) + 1.0, 5.0), rtol=1e-4)
  # Uncapped, 'v' on an x0 prediction IS the plain v loss of the same prediction (JiT's
  # x-prediction + v-loss).
  x0_as_v = losses.diffusion_loss(x0_hat, x0, eps, t, sched, "x0", "v", min_snr_gamma=1e12)[0]
  plain_v = losses.diffusion_loss(P.target("v", x0_hat, eps_hat, t, sched), x0, eps, t, sched,
                                  "v")[0]
  np.testing.assert_allclose(x0_as_v, plain_v, rtol=2e-3)
  # Unweighted v loss and the mask.
  v = P.v_target(x0, eps, t, sched)
  per, mean = losses.diffusion_loss(v + 1.0, x0, eps, t, sched, "v")
  np.testing.assert_allclose(per, 1.0, rtol=1e-5)
  mask = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
  per, mean = losses.diffusion_loss(v + jnp.arange(5.0)[:, None, None, None], x0, eps, t, sched,
                                    "v", mask=mask)
  np.testing.assert_allclose(per, [0, 1, 0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(mean, 0.5, atol=1e-5)


def test_identity_loss_masks_and_gradients_only_reach_x0():
  b, hw, d = 4, 4, 8
  ks = jax.random.split(jax.random.key(2), 3)
  w_fr = jax.random.normal(ks[0], (hw * hw * 3, d))
  x0 = jax.random.normal(ks[1], (b, hw, hw, 3))
  rows = jax.random.normal(ks[2], (b, d))
  t = jnp.array([10, 500, 200, 900])

  def loss(w, x):
    fr = lambda img: img.reshape(img.shape[0], -1) @ jax.lax.stop_gradient(w)
    return losses.identity_loss(fr, x, rows, t, max_timestep=300, weight=2.0)

  emb = np.asarray(x0).reshape(b, -1) @ np.asarray(w_fr)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  r = np.asarray(rows) / np.linalg.norm(rows, axis=-1, keepdims=True)
  per = np.sum((emb - r) ** 2, -1)
  np.testing.assert_allclose(loss(w_fr, x0), 2.0 * (per[0] + per[2]) / 2, rtol=1e-5)
  g_w, g_x = jax.grad(loss, argnums=(0, 1))(w_fr, x0)
  assert float(jnp.abs(g_w).max()) == 0.0
  g_x = np.abs(np.asarray(g_x)).reshape(b, -1).max(-1)
  assert g_x[0] > 0 and g_x[2] > 0 and g_x[1] == 0 and g_x[3] == 0
  # No qualifying example: zero loss, not NaN.
  assert float(losses.identity_loss(lambda x: x.reshape(b, -1)[:, :d], x0, rows, t + 1000, 300,
                                    1.0)) == 0.0


def test_drop_condition_and_landmarks():
  cond = jnp.ones((1000, 5))
  rng = jax.random.key(3)
  assert bool(jnp.all(losses.drop_condition(rng, cond, 0.0) == 1))
  assert bool(jnp.all(losses.drop_condition(rng, cond, 1.0) == 0))
  dropped = losses.drop_condition(rng, cond, 0.1)
  row_zero = np.asarray(jnp.all(dropped == 0, axis=1))
  assert np.all(np.asarray(dropped)[~row_zero] == 1)
  assert 0.05 < row_zero.mean() < 0.15
  lm = jnp.ones((100, 4, 4, 1))
  out = np.asarray(losses.drop_landmarks(rng, lm, 0.5, fill=-1.0))
  per = out.reshape(100, -1)
  assert set(np.unique(per.min(1))) <= {-1.0, 1.0} and np.all(per.min(1) == per.max(1))


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 10, 50, 37, 1000])
def test_timesteps_match_diffusers(spacing, n, diffusers):
  d = _ddim(diffusers, "linear", timestep_spacing=spacing,
            steps_offset=1 if spacing == "leading" else 0)
  d.set_timesteps(n)
  got = samplers.timesteps(1000, n, spacing, 1 if spacing == "leading" else 0)
  np.testing.assert_array_equal(got, d.timesteps.numpy())


def _toy_np(x, t):
  """A fixed linear denoiser, written once for numpy/torch arrays (float32)."""
  f = np.float32(float(t) / 1000.0)
  return x * (np.float32(0.8) - np.float32(0.3) * f) + np.float32(0.05) * f


def _toy_jnp(x, t):
  f = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  return x * (jnp.float32(0.8) - jnp.float32(0.3) * f) + jnp.float32(0.05) * f


@pytest.mark.parametrize(
    "kind,spacing,name,alpha_one",
    [
        ("v", "leading", "linear", True),
        ("v", "trailing", "squaredcos_cap_v2", False),
        ("eps", "leading", "scaled_linear", False),
        ("eps", "trailing", "linear", True),
    ],
)
def test_ddim_eta0_matches_diffusers_step_by_step(kind, spacing, name, alpha_one, diffusers,
                                                  torch):
  n = 20
  pt = {"v": "v_prediction", "eps": "epsilon"}[kind]
  d = _ddim(diffusers, name, prediction_type=pt, set_alpha_to_one=alpha_one,
            timestep_spacing=spacing)
  d.set_timesteps(n)
  x_T = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  x = torch.from_numpy(x_T)
  want = []
  for t in d.timesteps:
    x = d.step(_toy_np(x, t), t, x, eta=0.0).prev_sample
    want.append(x.numpy().copy())
  sched = S.make_schedule(name, 1000, **_SCHEDULE_KW[name])
  final, traj = samplers.ddim_sample(
      _toy_jnp, sched, x_T.shape, None, num_steps=n, kind=kind, spacing=spacing,
      set_alpha_to_one=alpha_one, x_T=jnp.asarray(x_T), return_trajectory=True)
  want = np.stack(want)
  scale = np.abs(want).max(axis=(1, 2, 3, 4), keepdims=True)
  np.testing.assert_allclose(np.asarray(traj) / scale, want / scale, atol=2e-5)
  np.testing.assert_allclose(final, want[-1], atol=2e-5 * scale[-1].item())


def _run(sampler, rng, **kw):
  fn = jax.jit(lambda r: sampler(_toy_jnp, S.linear_schedule(100), (2, 4, 4, 3), r, **kw))
  return np.asarray(fn(rng))


@pytest.mark.parametrize("sampler,kw", [(samplers.ddim_sample, {"num_steps": 10, "eta": 1.0}),
                                        (samplers.ddpm_sample, {"num_steps": 25})])
def test_stochastic_samplers_deterministic_per_rng(sampler, kw):
  a = _run(sampler, jax.random.key(0), **kw)
  b = _run(sampler, jax.random.key(0), **kw)
  c = _run(sampler, jax.random.key(1), **kw)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.all(np.isfinite(a))


def test_ddim_eta_noise_matters_with_fixed_x_T():
  x_T = jnp.ones((2, 4, 4, 3))
  sched = S.linear_schedule(100)
  kw = {"num_steps": 10, "eta": 1.0, "x_T": x_T}
  a = samplers.ddim_sample(_toy_jnp, sched, x_T.shape, jax.random.key(0), **kw)
  b = samplers.ddim_sample(_toy_jnp, sched, x_T.shape, jax.random.key(1), **kw)
  assert float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("kind", ["v", "eps", "x0", "edm"])
def test_ddpm_oracle_recovers_point_mass(kind):
  sched = S.cosine_schedule(100)
  x0_star = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)

  def oracle(x_t, t):
    a, s = P.alpha_sigma(sched, t, x_t.ndim)
    return P.target(kind, x0_star, (x_t - a * x0_star) / s, t, sched)

  out = jax.jit(lambda r: samplers.ddpm_sample(oracle, sched, x0_star.shape, r, kind=kind))(
      jax.random.key(4))
  np.testing.assert_allclose(out, x0_star, atol=1e-4)
  out = samplers.ddim_sample(oracle, sched, x0_star.shape, jax.random.key(4), num_steps=10,
                             kind=kind)
  np.testing.assert_allclose(out, x0_star, atol=1e-4)


def test_cfg_scales_and_single_doubled_call():
  calls = []

  def model(x, t, cond):
    calls.append(x.shape[0])
    return _toy_jnp(x, t) + cond[:, None, None, :]

  b = 2
  cond = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
  x = jax.random.normal(jax.random.key(5), (b, 4, 4, 3))
  t = jnp.array([10, 900])
  cond_out = model(x, t, cond)
  uncond_out = model(x, t, jnp.zeros_like(cond))
  calls.clear()
  np.testing.assert_allclose(samplers.cfg_model_fn(model, cond, 1.0)(x, t), cond_out, atol=1e-6)
  np.testing.assert_allclose(samplers.cfg_model_fn(model, cond, 0.0)(x, t), uncond_out,
                             atol=1e-6)
  np.testing.assert_allclose(samplers.cfg_model_fn(model, cond, 3.0)(x, t),
                             uncond_out + 3.0 * (cond_out - uncond_out), atol=1e-5)
  assert calls == [2 * b] * 3
  calls.clear()
  sample = jax.jit(lambda r: samplers.ddim_sample(
      samplers.cfg_model_fn(model, cond, 2.0), S.linear_schedule(100), x.shape, r, num_steps=8))
  out = sample(jax.random.key(0))
  assert calls == [2 * b]  # traced once inside the scan body: one batched call per step
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi, diffusers, torch):
  rescale_noise_cfg = diffusers.guiders.guider_utils.rescale_noise_cfg
  rng = np.random.default_rng(0)
  cond_out = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  guided = (4.0 * rng.normal(size=(3, 8, 8, 3)) + 0.5).astype(np.float32)
  ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond_out), phi).numpy()
  ours = np.asarray(samplers.rescale_guided(jnp.asarray(guided), jnp.asarray(cond_out), phi))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  if phi == 1.0:  # each example takes its conditional prediction's spread
    np.testing.assert_allclose(ours.std(axis=(1, 2, 3)), cond_out.std(axis=(1, 2, 3)), rtol=1e-5)


def test_cfg_interval_guides_only_inside_and_rescale_applies_there():
  def model(x, t, cond):
    return _toy_jnp(x, t) + cond[:, None, None, :]

  cond = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
  x = jax.random.normal(jax.random.key(6), (2, 4, 4, 3))
  t = jnp.array([500, 900])  # inside and above the interval
  cond_out, uncond_out = model(x, t, cond), model(x, t, jnp.zeros_like(cond))
  guided = uncond_out + 3.0 * (cond_out - uncond_out)
  out = samplers.cfg_model_fn(model, cond, 3.0, interval=(100, 800))(x, t)
  np.testing.assert_allclose(out[0], guided[0], atol=1e-5)
  np.testing.assert_allclose(out[1], cond_out[1], atol=1e-6)  # s = 1 outside
  edges = samplers.cfg_model_fn(model, cond, 3.0, interval=(500, 900))(x, t)
  np.testing.assert_allclose(edges, guided, atol=1e-5)  # both ends are inclusive
  rescaled = samplers.cfg_model_fn(model, cond, 3.0, interval=(100, 800), rescale=0.7)(x, t)
  np.testing.assert_allclose(rescaled[0], samplers.rescale_guided(guided, cond_out, 0.7)[0],
                             atol=1e-5)
  np.testing.assert_allclose(rescaled[1], cond_out[1], atol=1e-5)  # unguided: untouched
  assert not np.allclose(rescaled[0], guided[0], atol=1e-3)
  with pytest.raises(ValueError, match="interval"):
    samplers.cfg_model_fn(model, cond, 3.0, interval=(800, 100))


def test_cfg_negative_condition_in_the_same_call():
  calls = []

  def model(x, t, cond):  # a pytree condition: (row, landmark-like vector)
    calls.append(x.shape[0])
    row, lmk = cond
    return _toy_jnp(x, t) + row[:, None, None, :] + jnp.sin(lmk)[:, None, None, :]

  b = 2
  row = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
  lmk = jnp.array([[0.3, -0.2, 1.0], [0.0, 0.7, -0.4]])
  typical = jnp.zeros_like(lmk)
  x = jax.random.normal(jax.random.key(7), (b, 4, 4, 3))
  t = jnp.array([500, 900])
  cond, null, neg = (row, lmk), (jnp.zeros_like(row), lmk), (row, typical)
  c, u, n = model(x, t, cond), model(x, t, null), model(x, t, neg)
  calls.clear()
  fn = samplers.cfg_model_fn(model, cond, 3.0, null, negative=neg, negative_scale=2.0)
  np.testing.assert_allclose(fn(x, t), u + 3.0 * (c - u) + 2.0 * (c - n), atol=1e-5)
  assert calls == [3 * b]  # one batched call for all three
  # Outside the interval: the conditional prediction alone; rescale sees the whole sum.
  out = samplers.cfg_model_fn(model, cond, 3.0, null, interval=(100, 800), rescale=0.7,
                              negative=neg, negative_scale=2.0)(x, t)
  want = samplers.rescale_guided(u + 3.0 * (c - u) + 2.0 * (c - n), c, 0.7)
  np.testing.assert_allclose(out[0], want[0], atol=1e-5)
  np.testing.assert_allclose(out[1], c[1], atol=1e-5)
  # Scale 0 is plain guidance.
  np.testing.assert_allclose(
      samplers.cfg_model_fn(model, cond, 3.0, null, negative=neg, negative_scale=0.0)(x, t),
      u + 3.0 * (c - u), atol=1e-5)
