"""Tests for the FR head: margins vs numpy references, virtual prototypes, sharded loss.

The multi-device test runs in one subprocess with 8 fake CPU devices, because
the device count is fixed when JAX's backend starts.
"""

import functools
import math
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vigface_jax.models import margin

from conftest import run_on_fake_devices


def _cosines(rng, b, c):
  return rng.uniform(-1.0, 1.0, size=(b, c)).astype(np.float32)


# ------------------------------------------------------------ numpy references


def _ref_combined(cos, labels, s, m1, m2, m3):
  """arcface_torch CombinedMarginLoss, written from the formulas with arccos."""
  out = cos.astype(np.float64).copy()
  for i, y in enumerate(labels):
    if y < 0:
      continue
    c = float(cos[i, y])
    theta = math.acos(c)
    if m1 == 1.0 and m3 == 0.0:
      if theta + m2 < math.pi:  # c > cos(pi - m2)
        out[i, y] = math.cos(theta + m2)
      else:
        out[i, y] = c - math.sin(math.pi - m2) * m2
    else:
      out[i, y] = math.cos(m1 * theta + m2) - m3
  return out * s


def _ref_adaface(cos, labels, norms, batch_mean, batch_std, m, h, s, t_alpha, eps=1e-3):
  """numpy port of the official AdaFace head (mk-minchul/AdaFace head.py)."""
  cos = np.clip(cos.astype(np.float64), -1 + eps, 1 - eps)
  safe = np.clip(norms.astype(np.float64).reshape(-1, 1), 0.001, 100)
  mean, std = safe.mean(), safe.std(ddof=1)  # torch.std is unbiased
  batch_mean = mean * t_alpha + (1 - t_alpha) * batch_mean
  batch_std = std * t_alpha + (1 - t_alpha) * batch_std
  scaler = np.clip((safe - batch_mean) / (batch_std + eps) * h, -1, 1)
  one_hot = np.zeros_like(cos)
  one_hot[np.arange(len(labels)), labels] = 1.0
  m_arc = one_hot * (m * scaler * -1)
  theta_m = np.clip(np.arccos(cos) + m_arc, eps, math.pi - eps)
  cos = np.cos(theta_m) - one_hot * (m + m * scaler)
  return cos * s, batch_mean, batch_std


# -------------------------------------------------------------------- margins


@pytest.mark.parametrize(
    "m1,m2,m3",
    [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (0.9, 0.4, 0.15)],
    ids=["arcface", "cosface", "arc+cos", "combined"],
)
def test_combined_margin_matches_reference(m1, m2, m3):
  rng = np.random.default_rng(0)
  cos = _cosines(rng, 12, 9)
  labels = rng.integers(0, 9, size=12).astype(np.int32)
  labels[3] = -1
  # The theta + m > pi fall-back region and the edges.
  cos[0, labels[0]] = -0.95
  cos[1, labels[1]] = -0.999
  cos[2, labels[2]] = 1.0
  cos[4, labels[4]] = -1.0
  got = margin.combined_margin(cos, labels, s=64.0, m1=m1, m2=m2, m3=m3)
  want = _ref_combined(cos, labels, 64.0, m1, m2, m3)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-5)
  # The ignored row is only scaled.
  np.testing.assert_allclose(np.asarray(got)[3], cos[3] * 64.0, rtol=1e-6)


def test_arcface_cosface_aliases_and_finite_gradient():
  rng = np.random.default_rng(1)
  cos = _cosines(rng, 6, 5)
  labels = np.array([0, 1, 2, 3, 4, -1], np.int32)
  np.testing.assert_array_equal(
      margin.arcface(cos, labels, s=30.0, m=0.4),
      margin.combined_margin(cos, labels, s=30.0, m1=1.0, m2=0.4, m3=0.0))
  np.testing.assert_array_equal(
      margin.cosface(cos, labels, s=30.0, m=0.35),
      margin.combined_margin(cos, labels, s=30.0, m1=1.0, m2=0.0, m3=0.35))
  cos[0, 0], cos[1, 1] = 1.0, -1.0
  g = jax.grad(lambda c: margin.arcface(c, labels).sum())(jnp.asarray(cos))
  assert np.all(np.isfinite(np.asarray(g)))


def test_adaface_matches_official_head():
  rng = np.random.default_rng(2)
  b, c = 10, 7
  cos = _cosines(rng, b, c)
  labels = rng.integers(0, c, size=b).astype(np.int32)
  norms = rng.uniform(5.0, 40.0, size=(b, 1)).astype(np.float32)
  stats = margin.AdaFaceStats(jnp.float32(18.0), jnp.float32(6.0))
  for t_alpha in (0.01, 1.0):
    got, new = margin.adaface(cos, labels, norms, stats, m=0.4, h=0.333,
                              s=64.0, t_alpha=t_alpha)
    want, mean, std = _ref_adaface(cos, labels, norms, 18.0, 6.0, 0.4, 0.333,
                                   64.0, t_alpha)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(float(new.batch_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(float(new.batch_std), std, rtol=1e-5)
  # Ignored rows leave the statistics of the valid ones.
  labels2 = labels.copy()
  labels2[:3] = -1
  _, new2 = margin.adaface(cos, labels2, norms, stats, t_alpha=1.0)
  np.testing.assert_allclose(float(new2.batch_mean), norms[3:].mean(), rtol=1e-5)
  init = margin.AdaFaceStats.init()
  assert float(init.batch_mean) == 20.0 and float(init.batch_std) == 100.0


# ---------------------------------------------------------------- the module


def test_class_centres_module():
  head = margin.ClassCentres(16, num_real=10, num_virtual=6, rngs=nnx.Rngs(0))
  assert head.weight[...].shape == (16, 16) and head.weight[...].dtype == jnp.float32
  assert head.num_real == 10 and head.num_virtual == 6 and head.num_classes == 16
  w = np.asarray(head.normalized())
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)
  assert isinstance(head.sigma, margin.SigmaBuffer)
  assert not isinstance(head.sigma, nnx.Param)
  assert head.sigma[...].shape == (16,)
  params = nnx.state(head, nnx.Param)
  assert len(jax.tree.leaves(params)) == 1  # sigma is not a parameter
  specs = nnx.get_partition_spec(nnx.state(head, nnx.Param))
  spec = specs["weight"]
  spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
  assert tuple(spec) == ("embed", "classes")
  cos = head(jnp.ones((3, 16)))
  assert cos.shape == (3, 16)
  assert np.all(np.abs(np.asarray(cos)) <= 1.0 + 1e-5)


# ------------------------------------------------------- virtual prototypes


def test_num_virtual_per_step_rounding():
  assert margin.num_virtual_per_step(120_000, 512, 10_572) == round(120_000 * 512 / 10_572)
  assert margin.num_virtual_per_step(10, 4, 8) == 5
  assert margin.num_virtual_per_step(3, 1, 2) == 2  # 1.5 -> 2 (half to even)
  assert margin.num_virtual_per_step(5, 1, 2) == 2  # 2.5 -> 2
  assert margin.num_virtual_per_step(0, 64, 10) == 0


def _scattered_setup(n=20, k=30, d=64, b_r=200, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(d, n + k))
  centres /= np.linalg.norm(centres, axis=0, keepdims=True)
  sigma_true = rng.uniform(0.01, 0.04, size=d)
  labels = rng.integers(0, n, size=b_r)
  real = centres[:, labels].T + rng.normal(size=(b_r, d)) * sigma_true
  real /= np.linalg.norm(real, axis=1, keepdims=True)
  return (centres.astype(np.float32), real.astype(np.float32),
          labels.astype(np.int32), sigma_true)


def test_virtual_embeddings_statistics_and_ema():
  n, k, d, b_r = 20, 30, 64, 200
  centres, real, labels, sigma_true = _scattered_setup(n, k, d, b_r)
  old = np.full(d, 0.5, np.float32)
  fn = jax.jit(margin.virtual_embeddings, static_argnums=(5, 6),
               static_argnames=("alpha", "num_per_step"))
  emb_v, lab_v, new_sigma = fn(jax.random.key(0), real, labels, centres, old,
                               n, k, alpha=0.9)
  b_v = margin.num_virtual_per_step(k, b_r, n)
  assert emb_v.shape == (b_v, d) and lab_v.shape == (b_v,)
  assert lab_v.dtype == jnp.int32
  assert np.all((np.asarray(lab_v) >= n) & (np.asarray(lab_v) < n + k))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb_v), axis=1), 1.0, rtol=1e-5)
  # EMA over sigma (not sigma^2).
  sigma_batch = np.sqrt(np.mean((real - centres[:, labels].T) ** 2, axis=0))
  np.testing.assert_allclose(np.asarray(new_sigma), 0.9 * old + 0.1 * sigma_batch,
                             rtol=1e-5, atol=1e-7)
  # The batch estimate recovers the generating spread.
  np.testing.assert_allclose(sigma_batch, sigma_true, rtol=0.25)

  # With alpha = 0 the virtual embeddings scatter around their rows as the
  # real ones do around theirs.
  emb_v, lab_v, sigma0 = fn(jax.random.key(1), real, labels, centres, old,
                            n, k, alpha=0.0, num_per_step=2000)
  np.testing.assert_allclose(np.asarray(sigma0), sigma_batch, rtol=1e-5)
  cos_real = np.sum(real * centres[:, labels].T, axis=1)
  cos_virt = np.sum(np.asarray(emb_v) * centres[:, np.asarray(lab_v)].T, axis=1)
  assert abs(cos_real.mean() - cos_virt.mean()) < 3e-3, (cos_real.mean(), cos_virt.mean())
  assert abs(cos_real.std() - cos_virt.std()) < 3e-3
  # j covers [0, k) roughly uniformly.
  counts = np.bincount(np.asarray(lab_v) - n, minlength=k)
  assert counts.min() > 0.5 * 2000 / k

  # No valid real row: sigma unchanged.
  _, _, same = fn(jax.random.key(2), real, np.full_like(labels, -1), centres,
                  old, n, k, alpha=0.9)
  np.testing.assert_array_equal(np.asarray(same), old)


def test_virtual_part_gives_backbone_no_gradient():
  n, k, d, b_r = 20, 30, 64, 16
  centres, real, labels, _ = _scattered_setup(n, k, d, b_r)
  raw = jnp.asarray(centres * 3.0)  # raw (unnormalised) centres
  sigma = jnp.full((d,), 0.02)

  def losses(real_emb, w):
    emb_v, lab_v, _ = margin.virtual_embeddings(
        jax.random.key(0), margin.l2_normalize(real_emb), labels,
        margin.l2_normalize(w, axis=0), sigma, n, k)
    loss_v, _ = margin.margin_softmax_loss(emb_v, w, lab_v)
    emb = jnp.concatenate([real_emb, emb_v])
    lab = jnp.concatenate([jnp.asarray(labels), lab_v])
    loss_all, _ = margin.margin_softmax_loss(emb, w, lab)
    return loss_v, loss_all, lab_v

  g_emb_v, g_w_v = jax.jit(jax.grad(lambda e, w: losses(e, w)[0], argnums=(0, 1)))(
      jnp.asarray(real), raw)
  assert np.all(np.asarray(g_emb_v) == 0.0)  # exactly zero
  lab_v = np.asarray(jax.jit(losses)(jnp.asarray(real), raw)[2])
  assert lab_v.size == margin.num_virtual_per_step(k, b_r, n)
  g_w_v = np.asarray(g_w_v)
  assert np.all(np.linalg.norm(g_w_v[:, np.unique(lab_v)], axis=0) > 0)

  # The full loss's backbone gradient equals the real-only loss's.
  g_all = jax.jit(jax.grad(lambda e: losses(e, raw)[1]))(jnp.asarray(real))

  def real_only(e):
    loss, _ = margin.margin_softmax_loss(e, raw, labels)
    return loss * b_r / (b_r + lab_v.size)  # same denominator as the mean

  np.testing.assert_allclose(np.asarray(g_all), np.asarray(jax.jit(jax.grad(real_only))(
      jnp.asarray(real))), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------- loss


def test_margin_softmax_loss_matches_numpy():
  rng = np.random.default_rng(3)
  b, d, c = 8, 12, 10
  emb = rng.normal(size=(b, d)).astype(np.float32)
  w = rng.normal(size=(d, c)).astype(np.float32)
  labels = rng.integers(0, c, size=b).astype(np.int32)
  labels[5] = -1
  loss, aux = margin.margin_softmax_loss(
      emb, w, labels, functools.partial(margin.arcface, s=16.0, m=0.3),
      return_logits=True)
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  wn = w / np.linalg.norm(w, axis=0, keepdims=True)
  logits = _ref_combined((e @ wn).astype(np.float32), labels, 16.0, 1.0, 0.3, 0.0)
  np.testing.assert_allclose(np.asarray(aux["logits"]), logits, atol=1e-3)
  valid = labels >= 0
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  per = lse - logits[np.arange(b), np.maximum(labels, 0)]
  np.testing.assert_allclose(float(loss), per[valid].mean(), rtol=1e-5)
  acc = (logits.argmax(1) == labels)[valid].mean()
  np.testing.assert_allclose(float(aux["accuracy"]), acc)
  assert float(aux["num_valid"]) == valid.sum()

  # AdaFace through the same loss returns its state.
  stats = margin.AdaFaceStats.init()
  norms = np.linalg.norm(emb, axis=1)
  _, aux = margin.margin_softmax_loss(
      emb, w, labels, lambda cos, y: margin.adaface(cos, y, norms, stats))
  assert isinstance(aux["margin_state"], margin.AdaFaceStats)

  # All labels ignored: loss 0, no NaN.
  loss, aux = margin.margin_softmax_loss(emb, w, np.full(b, -1, np.int32))
  assert float(loss) == 0.0 and float(aux["accuracy"]) == 0.0


_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vigface_jax import parallel
    from vigface_jax.models import margin
    assert jax.device_count() == 8, jax.devices()

    n, k, d, b_r = 48, 24, 16, 16   # C = 72 classes: 9 or 18 per shard
    C = n + k
    rng = np.random.default_rng(0)
    w = rng.normal(size=(d, C)).astype(np.float32)
    emb = rng.normal(size=(b_r, d)).astype(np.float32)
    labels = rng.integers(0, n, size=b_r).astype(np.int32)
    labels[2] = -1
    sigma = np.full((d,), 0.05, np.float32)

    def step(emb, w, labels, sigma, logits_sharding=None):
      def loss_fn(emb, w):
        e = margin.l2_normalize(emb)
        emb_v, lab_v, new_sigma = margin.virtual_embeddings(
            jax.random.key(0), e, labels, margin.l2_normalize(w, axis=0),
            sigma, n, k)
        loss, aux = margin.margin_softmax_loss(
            jnp.concatenate([e, emb_v]), w,
            jnp.concatenate([labels, lab_v]), margin.arcface,
            logits_sharding=logits_sharding, return_logits=True)
        return loss, (aux, new_sigma)
      (loss, (aux, new_sigma)), grads = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(emb, w)
      return loss, aux["accuracy"], new_sigma, grads, aux["logits"]

    def gathers_classes(hlo):
      # HLO lines whose all-gather result has a dimension of size C.
      found = []
      for line in hlo.splitlines():
        head, sep, _ = line.partition("all-gather(")
        if not sep or "=" not in head:
          continue
        for dims_text in re.findall(r"\\[([0-9,]*)\\]", head.split("=", 1)[1]):
          if C in [int(x) for x in dims_text.split(",") if x]:
            found.append(line)
      return found

    ref = jax.jit(step)(emb, w, labels, sigma)
    for shape in ((1, 8), (2, 4)):
      mesh = parallel.create_mesh(("data", "model"), shape)
      w_sh = parallel.logical_sharding(mesh, ("embed", "classes"))
      assert w_sh.spec == P(None, "model"), w_sh.spec
      b_sh = parallel.batch_sharding(mesh)
      rep = NamedSharding(mesh, P())
      lg_sh = parallel.logical_sharding(mesh, ("batch", "classes"))
      fn = jax.jit(lambda e, w, y, s: step(e, w, y, s, lg_sh),
                   in_shardings=(b_sh, w_sh, b_sh, rep))
      args = (jax.device_put(emb, b_sh), jax.device_put(w, w_sh),
              jax.device_put(labels, b_sh), jax.device_put(sigma, rep))
      out = fn(*args)
      for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r),
                                   rtol=1e-5, atol=1e-5)
      logits = out[-1]
      assert logits.sharding.spec[1] == "model", logits.sharding
      assert out[3][1].sharding.spec[1] == "model", out[3][1].sharding
      hlo = fn.lower(*args).compile().as_text()
      assert not gathers_classes(hlo), gathers_classes(hlo)
      # Negative control: the detector sees a deliberate gather of the logits.
      bad = jax.jit(
          lambda e, w: jax.lax.with_sharding_constraint(
              margin.cosines(e, w), NamedSharding(mesh, P())),
          in_shardings=(b_sh, w_sh))
      assert gathers_classes(bad.lower(args[0], args[1]).compile().as_text())
      print("mesh", shape, "ok; all-gathers:", hlo.count("all-gather("))
    print("OK")
""")


def test_sharded_loss_and_gradients_eight_devices():
  run_on_fake_devices(_EIGHT_DEVICE_SCRIPT, timeout=180)
