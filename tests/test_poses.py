"""The pose model, per-image landmark draws and landmark identity measures (`generate/poses.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from vigface_jax.data import faces
from vigface_jax.generate import poses

NUM_IDS, PER_ID, TRAIN_IDS = 60, 8, 50  # 480 procedural renders (~2 s), 50 ids to fit on


@pytest.fixture(scope="module")
def procedural():
  """(points float32 [480, 5, 2], labels [480]) of procedural faces with exact landmarks."""
  source = faces.ProceduralFaceSource(seed=0, num_identities=NUM_IDS, images_per_identity=PER_ID)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r["landmarks"] for r in records]).astype(np.float32),
          np.array([int(r["label"]) for r in records]))


@pytest.fixture(scope="module")
def model(procedural):
  points, labels = procedural
  return poses.PoseModel.fit(points[labels < TRAIN_IDS], num_components=8, seed=0)


def test_fit_matches_the_data_mean_and_covariance(procedural, model):
  points, labels = procedural
  x = points[labels < TRAIN_IDS].reshape(-1, 10).astype(np.float64)
  assert model.num_train == len(x) and np.isfinite(model.train_log_likelihood)
  # EM keeps the mixture's first two moments at the data's (plus the covariance ridge).
  np.testing.assert_allclose(model.mean().reshape(-1), x.mean(0), atol=1e-6)
  ridge = 1e-3 * np.mean(np.var(x, 0))
  np.testing.assert_allclose(model.covariance(), np.cov(x.T, bias=True) + ridge * np.eye(10),
                             atol=1e-6)
  s = model.sample(np.random.default_rng(1), 20000).reshape(-1, 10).astype(np.float64)
  assert model.sample(np.random.default_rng(1), 3).dtype == np.float32
  np.testing.assert_allclose(s.mean(0), x.mean(0), atol=0.15)  # coordinate stds are 1.5-6 px
  cov = np.cov(x.T)
  np.testing.assert_allclose(np.cov(s.T), cov, atol=0.04 * np.abs(cov).max())
  # Deterministic given the seed; another seed starts EM elsewhere.
  again = poses.PoseModel.fit(points[labels < TRAIN_IDS], num_components=8, seed=0)
  np.testing.assert_array_equal(again.means, model.means)
  other = poses.PoseModel.fit(points[labels < TRAIN_IDS], num_components=8, seed=5)
  assert not np.array_equal(other.means, model.means)


def test_held_out_real_sets_are_likely_and_garbled_ones_are_not(procedural, model):
  points, labels = procedural
  held = points[labels >= TRAIN_IDS]  # identities the model never saw
  rng = np.random.default_rng(0)
  shuffled = np.stack([rng.permutation(p.reshape(-1)) for p in held]).reshape(held.shape)
  swapped = held[:, [1, 0, 2, 4, 3]]  # left and right points exchanged: a mirror-ordered set
  ll_held = model.log_likelihood(held)
  assert ll_held.shape == (len(held),) and ll_held.dtype == np.float64
  assert ll_held.mean() > model.train_log_likelihood - 10  # -18.3 vs -15.1 measured
  assert ll_held.mean() > model.log_likelihood(shuffled).mean() + 1000  # ~ -12000 measured
  assert ll_held.mean() > model.log_likelihood(swapped).mean() + 100  # ~ -1100 measured
  assert ll_held.mean() > model.log_likelihood(held + 8.0).mean() + 20  # moved 8 px


def test_draw_is_per_image_and_independent_of_batching(procedural, model):
  points, labels = procedural
  labs, idx = np.full(10, 3), np.arange(10)
  at_once, owner = poses.draw("model", 7, labs, idx, model=model)
  assert at_once.shape == (10, 5, 2) and at_once.dtype == np.float32
  assert owner.dtype == np.int64 and np.all(owner == -1)
  one_by_one = np.concatenate([poses.draw("model", 7, [3], [i], model=model)[0] for i in idx])
  np.testing.assert_array_equal(at_once, one_by_one)
  shuffled = np.random.default_rng(0).permutation(10)
  np.testing.assert_array_equal(poses.draw("model", 7, labs, shuffled, model=model)[0],
                                at_once[shuffled])
  np.testing.assert_array_equal(poses.draw("model", 7, labs, idx, model=model)[0], at_once)
  assert len({p.tobytes() for p in at_once}) == 10  # each image its own set
  other_seed = poses.draw("model", 8, labs, idx, model=model)[0]
  other_label = poses.draw("model", 7, np.full(10, 4), idx, model=model)[0]
  assert np.all(np.abs(other_seed - at_once).max((1, 2)) > 0.1)
  assert np.all(np.abs(other_label - at_once).max((1, 2)) > 0.1)
  # Same for pool draws.
  pool = (points, labels)
  pooled, owners = poses.draw("pool", 7, labs, idx, pool=pool)
  single = [poses.draw("pool", 7, [3], [i], pool=pool) for i in idx]
  np.testing.assert_array_equal(pooled, np.concatenate([p for p, _ in single]))
  np.testing.assert_array_equal(owners, np.concatenate([o for _, o in single]))
  assert poses.draw("model", 0, [], [], model=model)[0].shape == (0, 5, 2)


def test_spread_widens_model_draws_about_the_mean_set(model):
  labs, idx = np.full(400, 3), np.arange(400)
  base = poses.draw("model", 7, labs, idx, model=model)[0]
  wide = poses.draw("model", 7, labs, idx, model=model, spread=1.5)[0]
  centre = model.mean().astype(np.float32)
  np.testing.assert_allclose(wide - centre, 1.5 * (base - centre), atol=1e-4)
  ratio = np.std(wide - centre) / np.std(base - centre)
  assert abs(ratio - 1.5) < 1e-3
  np.testing.assert_array_equal(poses.draw("model", 7, labs, idx, model=model, spread=1.0)[0],
                                base)


def test_pool_draws_copy_training_sets_and_name_their_owners(procedural):
  points, labels = procedural
  n = 2000
  drawn, owner = poses.draw("pool", 1, np.arange(n) % 40, np.arange(n) // 40,
                            pool=(points, labels + 1000))
  flat = points.reshape(len(points), -1)
  for p, o in zip(drawn, owner):
    where = np.flatnonzero(np.all(flat == p.reshape(-1), 1))  # exact copies only
    assert len(where) >= 1 and o in labels[where] + 1000
  picked = np.array([np.flatnonzero(np.all(flat == p.reshape(-1), 1))[0] for p in drawn])
  assert len(np.unique(picked)) > 0.9 * len(points)  # uniform over 480 sets: ~98.5% hit
  assert abs(picked.mean() - (len(points) - 1) / 2) < 20
  dist = poses.nearest_pool_distance(drawn, points)
  np.testing.assert_array_equal(dist, 0.0)
  clipped, _ = poses.draw("pool", 1, [0], [0], pool=(points + 200, labels), clip_to_frame=True)
  assert clipped.max() == 111.0


def test_save_load_round_trip_and_bad_files(tmp_path, model, procedural):
  points, _ = procedural
  path = tmp_path / "pose.npz"
  model.save(path)
  loaded = poses.PoseModel.load(path)
  assert loaded.num_train == model.num_train
  assert loaded.train_log_likelihood == model.train_log_likelihood
  np.testing.assert_array_equal(loaded.log_likelihood(points), model.log_likelihood(points))
  np.testing.assert_array_equal(loaded.sample(np.random.default_rng(3), 50),
                                model.sample(np.random.default_rng(3), 50))
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="junk.npz"):
    poses.PoseModel.load(tmp_path / "junk.npz")
  np.savez(tmp_path / "partial.npz", weights=model.weights)
  with pytest.raises(ValueError, match=r"partial\.npz.*missing"):
    poses.PoseModel.load(tmp_path / "partial.npz")
  np.savez(tmp_path / "bad.npz", format_version=np.int64(1), weights=model.weights,
           means=model.means[:, :4], covariances=model.covariances)
  with pytest.raises(ValueError, match=r"bad\.npz.*means"):
    poses.PoseModel.load(tmp_path / "bad.npz")
  neg = model.covariances.copy()
  neg[0] = -np.eye(10)
  np.savez(tmp_path / "neg.npz", format_version=np.int64(1), weights=model.weights,
           means=model.means, covariances=neg)
  with pytest.raises(ValueError, match=r"neg\.npz.*positive definite"):
    poses.PoseModel.load(tmp_path / "neg.npz")


def test_bad_input_is_rejected(procedural, model):
  points, labels = procedural
  with pytest.raises(ValueError, match="at least 50"):
    poses.PoseModel.fit(points[:49], num_components=2)
  nan = points.copy()
  nan[5, 2, 0] = np.nan
  with pytest.raises(ValueError, match="1 landmark set.*NaN"):
    poses.PoseModel.fit(nan)
  with pytest.raises(ValueError, match="outside the 112x112"):
    poses.PoseModel.fit(points * 4.0)  # e.g. landmarks of the original photos
  with pytest.raises(ValueError, match=r"shape \[n, 5, 2\]"):
    poses.PoseModel.fit(points.reshape(-1, 10))
  with pytest.raises(ValueError, match="num_components"):
    poses.PoseModel.fit(points[:100], num_components=11)
  with pytest.raises(ValueError, match="identical"):
    poses.PoseModel.fit(np.repeat(points[:1], 100, 0))
  with pytest.raises(ValueError, match="source must be"):
    poses.draw("copy", 0, [0], [0], model=model)
  with pytest.raises(ValueError, match="needs model"):
    poses.draw("model", 0, [0], [0])
  with pytest.raises(ValueError, match="needs pool"):
    poses.draw("pool", 0, [0], [0])
  with pytest.raises(ValueError, match="non-negative"):
    poses.draw("model", 0, [-1], [0], model=model)
  with pytest.raises(ValueError, match="same length"):
    poses.draw("model", 0, [0, 1], [0], model=model)
  with pytest.raises(ValueError, match="owner labels"):
    poses.draw("pool", 0, [0], [0], pool=(points, labels[:5]))


def _brute_identifiability(x: np.ndarray, labels: np.ndarray) -> float:
  """Leave-one-out nearest-centre top-1, one image at a time."""
  hits = []
  for i in range(len(x)):
    if np.sum(labels == labels[i]) < 2:
      continue
    best, best_d = None, np.inf
    for k in np.unique(labels):
      members = (labels == k) & (np.arange(len(x)) != i)
      d = np.sum((x[i] - x[members].mean(0)) ** 2)
      if d < best_d:
        best, best_d = k, d
    hits.append(best == labels[i])
  return float(np.mean(hits))


def test_landmark_identifiability_far_above_chance_and_the_shuffled_control(procedural):
  points, labels = procedural
  result = poses.landmark_identifiability(points, labels)
  assert result["chance"] == pytest.approx(1 / NUM_IDS) and result["num_queries"] == len(points)
  assert result["top1"] > 4 * result["chance"]  # 0.106 vs 0.017 measured: geometry is identity
  control = poses.landmark_identifiability(points, np.random.default_rng(0).permutation(labels))
  assert control["top1"] < 2 * control["chance"]  # 0.017 measured
  # Exact: equals the one-image-at-a-time definition (with a singleton identity as candidate).
  sub = labels < 12
  sub_labels = np.where(np.arange(len(labels))[sub] == 0, 99, labels[sub])  # image 0 alone
  fast = poses.landmark_identifiability(points[sub], sub_labels)
  slow = _brute_identifiability(poses.normalised_sets(points[sub]), sub_labels)
  assert fast["top1"] == pytest.approx(slow) and fast["num_queries"] == sub.sum() - 1
  assert fast["num_identities"] == 13
  limited = poses.landmark_identifiability(points, labels, max_identities=12)
  assert limited["num_identities"] == 12 and limited["num_queries"] == 12 * PER_ID
  # Invariant to where the face sits and how large it is.
  moved = (points - 56.0) * 0.8 + 60.0
  assert poses.landmark_identifiability(moved, labels)["top1"] == pytest.approx(result["top1"])


def test_model_draws_are_not_copies(procedural, model):
  points, labels = procedural
  train = points[labels < TRAIN_IDS]
  drawn, _ = poses.draw("model", 0, np.arange(300) % 30, np.arange(300) // 30, model=model)
  dist, where = poses.nearest_pool_distance(drawn, train, return_index=True)
  flat = train.reshape(len(train), -1).astype(np.float64)
  brute = np.sqrt(((drawn.reshape(-1, 1, 10) - flat[None]) ** 2).sum(-1) / 5)
  np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4)
  np.testing.assert_array_equal(where, brute.argmin(1))
  assert dist.min() > 0.1  # no draw is a training set
  same = poses.same_identity_distance(points, labels)
  assert np.all(np.isfinite(same)) and np.median(dist) < np.median(same)
  self_dist = poses.nearest_pool_distance(train, train, exclude_self=True)
  assert self_dist.min() > 0 and np.median(dist) < 2 * np.median(self_dist)
  lone = poses.same_identity_distance(points[:9], labels[:9])  # image 8 is its identity's only one
  assert np.isnan(lone[8]) and np.all(np.isfinite(lone[:8]))
  manual = np.sqrt(np.mean(np.sum((points[:8, None] - points[None, :8]) ** 2, -1), -1))
  np.fill_diagonal(manual, np.inf)
  np.testing.assert_allclose(lone[:8], manual.min(1), rtol=1e-4)


def test_owner_identification_on_constructed_embeddings():
  rng = np.random.default_rng(0)
  g, d, n = 20, 32, 400
  centres = rng.normal(size=(g, d))
  gallery_labels = np.arange(g) * 3 + 100  # labels need not be 0..G-1
  owner_row = rng.integers(g, size=n)
  near = centres[owner_row] + 0.3 * rng.normal(size=(n, d))
  result = poses.owner_identification(near, gallery_labels[owner_row], centres, gallery_labels)
  assert result["top1"] > 0.95 and result["chance"] == pytest.approx(1 / g)
  assert result["mean_cos_owner"] > 0.8 and result["num_images"] == n
  unrelated = poses.owner_identification(rng.normal(size=(n, d)), gallery_labels[owner_row],
                                         centres, gallery_labels)
  assert unrelated["top1"] < 3 / g and abs(unrelated["mean_cos_owner"]) < 0.05
  # Half the images look like their owner: the rate says so.
  half = np.where(np.arange(n)[:, None] < n // 2, near, rng.normal(size=(n, d)))
  mixed = poses.owner_identification(half, gallery_labels[owner_row], centres, gallery_labels)
  assert 0.45 < mixed["top1"] < 0.6
  with pytest.raises(ValueError, match="not in gallery_labels"):
    poses.owner_identification(near, np.full(n, -1), centres, gallery_labels)
  with pytest.raises(ValueError, match="share d"):
    poses.owner_identification(near[:, :5], gallery_labels[owner_row], centres, gallery_labels)
