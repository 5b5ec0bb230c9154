"""Measures of a generated FR dataset on encoder features (`evaluate/dataset_metrics.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from vigface_jax.evaluate import dataset_metrics as dm
from vigface_jax.evaluate import generation


def _clusters(rng, k, m, d, noise):
  """`k` identities × `m` images: random unit centres plus isotropic noise of std `noise`."""
  centres = rng.normal(size=(k, d))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = np.repeat(np.arange(k), m)
  emb = centres[labels] + noise * rng.normal(size=(k * m, d))
  return emb.astype(np.float32), labels, centres


def test_tight_clusters_are_consistent_and_noise_is_at_chance():
  rng = np.random.default_rng(0)
  emb, labels, _ = _clusters(rng, 30, 6, 64, noise=0.05)
  tight = dm.consistency(emb * 3.0, labels + 7)  # scale and label values do not matter
  assert tight["top1"] == 1.0 and tight["intra_cos_mean"] > 0.85
  assert tight["chance"] == pytest.approx(1 / 30) and tight["num_images"] == 180
  assert tight["intra_cos_p5"] <= tight["intra_cos_p50"]
  noise = dm.consistency(rng.normal(size=(600, 64)), np.repeat(np.arange(60), 10))
  assert noise["top1"] < 3 * noise["chance"] and abs(noise["intra_cos_mean"]) < 0.1
  # A wider cluster is less consistent: the measure moves the right way.
  wide = dm.consistency(*_clusters(np.random.default_rng(0), 30, 6, 64, noise=0.2)[:2])
  assert wide["intra_cos_mean"] < tight["intra_cos_mean"]


def test_leave_one_out_excludes_the_image_itself():
  rng = np.random.default_rng(1)
  emb, labels, centres = _clusters(rng, 10, 5, 32, noise=0.05)
  # Identity 10 has two images, each a unique direction (orthogonal to every centre and to each
  # other) leaning toward another identity: a = u + 0.5 c0, b = w + 0.5 c1. Counting itself in
  # its own centre, each image would find it at cosine ~0.71 and be "identified"; left out, its
  # own centre is its partner (cosine ~0) and the identity it leans toward (~0.45) wins.
  basis, _ = np.linalg.qr(np.concatenate([centres, rng.normal(size=(2, 32))]).T)
  u, w = basis[:, 10], basis[:, 11]
  extra = np.stack([u + 0.5 * centres[0], w + 0.5 * centres[1]])
  emb = np.concatenate([emb, extra]).astype(np.float32)
  labels = np.concatenate([labels, [10, 10]])
  result = dm.consistency(emb, labels)
  assert result["num_images"] == 52 and result["num_identities"] == 11
  assert result["top1"] == pytest.approx(50 / 52)  # both images of identity 10 miss
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  own = []
  for i in range(len(e)):
    rest = e[labels == labels[i]].sum(0) - e[i]
    own.append(e[i] @ rest / np.linalg.norm(rest))
  assert result["intra_cos_mean"] == pytest.approx(np.mean(own), abs=1e-6)
  assert np.mean(own[-2:]) < 0.1  # the outliers' leave-one-out cosines
  # A single-image identity is a candidate but is not queried.
  solo = dm.consistency(np.concatenate([emb, centres[:1]]), np.concatenate([labels, [11]]))
  assert solo["num_images"] == 52 and solo["num_identities"] == 12
  assert solo["top1"] < result["top1"]  # identity 0's images now meet a rival at their centre


def test_separability_is_the_nearest_other_centre():
  rng = np.random.default_rng(2)
  emb, labels, _ = _clusters(rng, 40, 5, 128, noise=0.02)
  far = dm.separability(emb, labels)
  assert far["nearest_other_cos_max"] < 0.5 and far["num_identities"] == 40
  assert (far["nearest_other_cos_p50"] <= far["nearest_other_cos_p95"]
          <= far["nearest_other_cos_max"])
  # Two identities that are near copies of each other: their nearest-other cosine is ~1.
  twin = emb.copy()
  twin[labels == 1] = emb[labels == 0] + 0.01 * rng.normal(size=(5, 128))
  near = dm.separability(twin, labels)
  assert near["nearest_other_cos_max"] > 0.99
  assert near["nearest_other_cos_mean"] > far["nearest_other_cos_mean"]
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  c = np.stack([e[labels == k].mean(0) for k in range(40)])
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  cos = c @ c.T
  np.fill_diagonal(cos, -np.inf)
  assert far["nearest_other_cos_mean"] == pytest.approx(cos.max(1).mean(), abs=1e-6)


def test_diversity_grows_with_cluster_width_and_pose_spread():
  rng = np.random.default_rng(3)
  tight_emb, labels, _ = _clusters(rng, 20, 6, 64, noise=0.05)
  wide_emb, _, _ = _clusters(rng, 20, 6, 64, noise=0.15)
  template = np.asarray([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
  frontal = template + rng.normal(0, 0.3, size=(120, 5, 2))
  turned = frontal.copy()
  turned[:, 2, 0] += rng.uniform(-10, 10, size=120)  # the nose moves sideways: yaw varies
  tight = dm.diversity(tight_emb, labels, frontal)
  wide = dm.diversity(wide_emb, labels, turned)
  assert wide["spread"] > tight["spread"] + 0.05
  assert wide["intra_pair_cos_std"] > tight["intra_pair_cos_std"]
  assert wide["yaw_std"] > 5 * tight["yaw_std"] and wide["landmark_rms"] > 2 * tight["landmark_rms"]
  # Against the definitions, identity by identity.
  e = tight_emb / np.linalg.norm(tight_emb, axis=1, keepdims=True)
  pair = [(e[labels == k] @ e[labels == k].T)[np.triu_indices(6, 1)] for k in range(20)]
  assert tight["intra_pair_cos_mean"] == pytest.approx(np.mean([p.mean() for p in pair]), abs=1e-6)
  yaw = generation.yaw_proxy(frontal)
  assert tight["yaw_std"] == pytest.approx(np.mean([yaw[labels == k].std() for k in range(20)]))
  assert "yaw_std" not in dm.diversity(tight_emb, labels)
  with pytest.raises(ValueError, match="one landmark set per image"):
    dm.diversity(tight_emb, labels, frontal[:5])


def test_realism_is_half_for_one_distribution_and_one_for_shifted():
  rng = np.random.default_rng(4)
  d = 32
  real = rng.normal(size=(900, d))
  same = dm.realism(real, rng.normal(size=(600, d)), seed=0)
  assert same["n_per_class"] == 600  # the larger set is subsampled
  assert abs(same["accuracy"] - 0.5) < 0.06
  shifted = dm.realism(real, rng.normal(size=(600, d)) + 1.5, seed=0)
  assert shifted["accuracy"] > 0.97
  assert shifted["fd"] > 10 * same["fd"]
  gen = rng.normal(size=(600, d)) + 0.2
  assert dm.realism(real, gen, seed=3) == dm.realism(real, gen, seed=3)  # seeded
  with pytest.raises(ValueError, match="same encoder"):
    dm.realism(real, real[:, :5])
  with pytest.raises(ValueError, match="folds"):
    dm.realism(real[:3], real[:3], folds=5)


def test_frechet_distance_is_zero_for_equal_sets_and_the_mean_shift_for_moved_ones():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))  # a full covariance
  assert abs(dm.frechet_distance(a, a)["fd"]) < 1e-6
  delta = rng.normal(size=16)
  moved = dm.frechet_distance(a, a + delta)  # equal covariances: FD = ‖Δμ‖²
  assert moved["fd"] == pytest.approx(delta @ delta, rel=1e-6)
  assert moved["fd_mean_term"] == pytest.approx(delta @ delta, rel=1e-9)
  assert dm.frechet_distance(a, a + 2 * delta)["fd"] == pytest.approx(4 * delta @ delta, rel=1e-6)
  # Different covariances, same mean: the trace term, here with a known closed form.
  b = rng.normal(size=(4000, 4))
  c = b * 2.0
  fd = dm.frechet_distance(b - b.mean(0), c - c.mean(0))["fd"]
  cov = np.cov(b.T)
  assert fd == pytest.approx(np.trace(cov), rel=1e-6)  # tr(Σ + 4Σ − 2·2Σ) = tr Σ


def test_own_row_is_high_near_the_rows_and_zero_for_random_rows():
  rng = np.random.default_rng(6)
  emb, labels, centres = _clusters(rng, 50, 4, 256, noise=0.04)
  near = dm.own_row(emb, labels, centres * 5.0)
  assert near["own_row_cos_p5"] > 0.9 and near["num_identities"] == 50
  assert near["own_row_cos_p5"] <= near["own_row_cos_p50"]
  random_rows = dm.own_row(emb, labels, rng.normal(size=(50, 256)))
  assert abs(random_rows["own_row_cos_mean"]) < 0.05
  # Only the identities present are measured; rows are looked up by label.
  part = dm.own_row(emb[labels >= 25], labels[labels >= 25], centres)
  assert part["num_identities"] == 25 and part["own_row_cos_mean"] > 0.9
  with pytest.raises(ValueError, match="row indices"):
    dm.own_row(emb, labels + 1, centres)


def test_summarize_and_input_errors():
  rng = np.random.default_rng(7)
  emb, labels, _ = _clusters(rng, 10, 4, 16, noise=0.05)
  out = dm.summarize(emb, labels)
  assert out["consistency/top1"] == dm.consistency(emb, labels)["top1"]
  assert out["separability/nearest_other_cos_mean"] == (
      dm.separability(emb, labels)["nearest_other_cos_mean"])
  assert "diversity/spread" in out and all(isinstance(v, float) for v in out.values())
  with pytest.raises(ValueError, match="labels has 3"):
    dm.consistency(emb, labels[:3])
  with pytest.raises(ValueError, match="NaN"):
    dm.separability(np.full((4, 3), np.nan), [0, 0, 1, 1])
  with pytest.raises(ValueError, match="at least 2 identities"):
    dm.consistency(emb, np.zeros(len(emb)))
