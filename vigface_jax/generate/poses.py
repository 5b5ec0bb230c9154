"""Where each generated image's five-point landmark set comes from, and what landmarks reveal.

Stage 3 renders every image of a (virtual) identity under its own landmark set. The paper copies
sets from the training data, but a landmark set carries face geometry (eye spacing, nose length,
mouth width relative to the eyes), so a copied set carries a little of a real person into the
generated data. DESIGN.md §1 therefore draws sets by default from a statistical model of the
training landmarks, and this module provides the pieces and the measurements that justify it:

* `PoseModel`: a Gaussian mixture (full covariances, numpy EM, k-means++ initialisation) over
  the 10 coordinates of aligned five-point sets; `fit`, `sample`, `log_likelihood`, `save` /
  `load` (`.npz`).
* `draw`: the landmark set of each image `(label, index)` from its own random stream, so what an
  image gets never depends on batch size, shard or device count; `'model'` samples the mixture,
  `'pool'` copies a training set (the paper's way) and names its owner.
* `landmark_identifiability`: how well landmark sets alone identify people (leave-one-out
  nearest centre on scale/translation-normalised sets) against chance.
* `nearest_pool_distance`, `same_identity_distance`: RMS pixel distance of a set to the nearest
  training set, against the distance between two images of one person (are draws copies?).
* `owner_identification`: whether generated images are recognised as the owner of the landmark
  set they were drawn under.

Points follow `vigface_jax/data/landmarks.py`: float `[..., 5, 2]` `(x, y)` pixels of the 112×112
aligned frame, ArcFace order. Everything here is numpy on the host.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from vigface_jax import ops
from vigface_jax.data import landmarks as landmarks_lib

DIM = 2 * landmarks_lib.NUM_LANDMARKS  # a set as one vector: x0, y0, x1, y1, ...
# Fixed last word of every per-image seed: no other stream of the project uses it.
DRAW_TAG = 0x706F7365  # "pose"
MIN_SETS = 50  # fewer training sets than this cannot support a 10-d full-covariance model
SETS_PER_COMPONENT = 10  # each mixture component needs at least this many sets on average
# Aligned sets lie near the template; coordinates outside this range are not aligned-frame points.
FRAME_LOW, FRAME_HIGH = -0.5 * landmarks_lib.IMAGE_SIZE, 1.5 * landmarks_lib.IMAGE_SIZE
FORMAT_VERSION = 1
_CHUNK = 1 << 14  # rows per block of the chunked distance / density computations


def _as_sets(points: Any, name: str) -> np.ndarray:
  """float64 `[n, 10]` from `[n, 5, 2]` points, with shape and finiteness checked."""
  p = np.asarray(points, np.float64)
  if p.ndim != 3 or p.shape[1:] != (landmarks_lib.NUM_LANDMARKS, 2):
    raise ValueError(f"{name} must have shape [n, 5, 2] (ArcFace-order (x, y) points), "
                     f"got {p.shape}")
  if not np.all(np.isfinite(p)):
    bad = int(np.sum(~np.all(np.isfinite(p), axis=(1, 2))))
    raise ValueError(f"{name}: {bad} landmark set(s) contain NaN or inf; drop images without "
                     "landmarks (has_landmarks False) before using their points")
  return p.reshape(len(p), DIM)


class PoseModel:
  """A Gaussian mixture over aligned five-point landmark sets (10-d, full covariances).

  Attributes:
    weights: float64 `[K]` mixture weights (sum 1).
    means: float64 `[K, 10]` component means (x0, y0, ..., x4, y4) in aligned-frame pixels.
    covariances: float64 `[K, 10, 10]` component covariances (ridge included).
    num_train: number of sets the model was fitted on (0 if unknown).
    train_log_likelihood: mean log density (nats, of the 10 pixel coordinates) of the training
      sets under the fitted model; NaN if unknown.
  """

  def __init__(self, weights: Any, means: Any, covariances: Any, *, num_train: int = 0,
               train_log_likelihood: float = float("nan"), where: str = "PoseModel"):
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    cov = np.asarray(covariances, np.float64)
    k = len(w) if w.ndim == 1 else -1
    if k < 1 or mu.shape != (k, DIM) or cov.shape != (k, DIM, DIM):
      raise ValueError(f"{where}: expected weights [K], means [K, {DIM}], covariances "
                       f"[K, {DIM}, {DIM}], got {w.shape}, {mu.shape}, {cov.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
      raise ValueError(f"{where}: weights, means and covariances must be finite")
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
      raise ValueError(f"{where}: weights must be non-negative and sum to 1, got sum {w.sum()}")
    try:
      chol = np.linalg.cholesky(0.5 * (cov + cov.transpose(0, 2, 1)))
    except np.linalg.LinAlgError as err:
      raise ValueError(f"{where}: a covariance is not positive definite; refit the model") from err
    self.weights, self.means, self.covariances = w / w.sum(), mu, cov
    self.num_train = int(num_train)
    self.train_log_likelihood = float(train_log_likelihood)
    self._chol = chol
    self._chol_inv = np.linalg.inv(chol)
    self._log_norm = (-0.5 * DIM * math.log(2 * math.pi)
                      - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1))  # [K]

  @property
  def num_components(self) -> int:
    return len(self.weights)

  @classmethod
  def fit(cls, points: Any, num_components: int = 8, seed: int = 0, *, ridge: float = 1e-3,
          max_iter: int = 300, tol: float = 1e-6) -> PoseModel:
    """Fits the mixture by EM from a k-means++ start; deterministic given `seed`.

    Args:
      points: `[N, 5, 2]` aligned landmark sets of the training data.
      num_components: mixture components K (at least `SETS_PER_COMPONENT` sets each on average).
      seed: seeds the k-means++ initialisation.
      ridge: added to every covariance's diagonal, as a fraction of the data's mean per-coordinate
        variance (keeps components with few sets non-singular).
      max_iter: EM iterations at most.
      tol: stop when the mean training log-likelihood improves by less than this (nats).

    Returns:
      The fitted `PoseModel`.
    """
    x = _as_sets(points, "PoseModel.fit: points")
    n = len(x)
    if n < MIN_SETS:
      raise ValueError(f"PoseModel.fit: points has {n} landmark sets; at least {MIN_SETS} are "
                       "needed to fit a pose model (use more training images with landmarks)")
    if x.min() < FRAME_LOW or x.max() > FRAME_HIGH:
      raise ValueError(f"PoseModel.fit: points range over [{x.min():.1f}, {x.max():.1f}] px, far "
                       f"outside the {landmarks_lib.IMAGE_SIZE}x{landmarks_lib.IMAGE_SIZE} "
                       "aligned frame; pass landmarks of the aligned crops, not of the original "
                       "photos (or normalised [0, 1] coordinates)")
    if int(max_iter) < 1:
      raise ValueError(f"PoseModel.fit: max_iter must be >= 1, got {max_iter}")
    k = int(num_components)
    if k < 1 or k * SETS_PER_COMPONENT > n:
      raise ValueError(f"PoseModel.fit: num_components={num_components} needs 1 <= K <= "
                       f"N / {SETS_PER_COMPONENT} = {n // SETS_PER_COMPONENT} for N={n} sets; "
                       "lower num_components or give more sets")
    scale = float(np.mean(np.var(x, axis=0)))
    if scale < 1e-6:
      raise ValueError("PoseModel.fit: all landmark sets in points are (nearly) identical; a pose "
                       "model needs the data's real landmarks, not one repeated set")
    reg = float(ridge) * scale * np.eye(DIM)
    resp = np.eye(k)[_kmeans(x, k, np.random.default_rng(seed))]  # hard start [N, K]
    model, prev = None, -np.inf
    for _ in range(int(max_iter)):
      nk = resp.sum(0) + 1e-10
      mu = (resp.T @ x) / nk[:, None]
      cov = np.empty((k, DIM, DIM))
      for j in range(k):
        d = x - mu[j]
        cov[j] = (resp[:, j, None] * d).T @ d / nk[j] + reg
      model = cls(nk / nk.sum(), mu, cov, num_train=n)
      logp = model._joint_log_prob(x)  # [N, K]
      lse = _logsumexp(logp)
      ll = float(lse.mean())
      resp = np.exp(logp - lse[:, None])
      if ll - prev < tol:
        break
      prev = ll
    model.train_log_likelihood = ll
    return model

  def _joint_log_prob(self, x: np.ndarray) -> np.ndarray:
    """`log w_k + log N(x | mu_k, cov_k)`, float64 `[n, K]`, chunked over rows."""
    out = np.empty((len(x), self.num_components))
    for s in range(0, len(x), _CHUNK):
      diff = x[s:s + _CHUNK, None, :] - self.means[None]  # [c, K, D]
      z = np.einsum("kij,ckj->cki", self._chol_inv, diff)
      out[s:s + _CHUNK] = -0.5 * np.sum(z * z, -1) + self._log_norm + np.log(self.weights + 1e-300)
    return out

  def log_likelihood(self, points: Any) -> np.ndarray:
    """float64 `[n]` log density (nats) of each `[n, 5, 2]` set under the mixture."""
    return _logsumexp(self._joint_log_prob(_as_sets(points, "PoseModel.log_likelihood: points")))

  def _noise(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers behind `n` samples: a uniform (component) and 10 normals each."""
    return rng.random(n), rng.standard_normal((n, DIM))

  def _transform(self, u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Sets from their noise: the component whose cumulative weight passes `u`, then
    `mu + L z` (L the covariance's Cholesky factor); float32 `[n, 5, 2]`."""
    comp = np.minimum(np.searchsorted(np.cumsum(self.weights), u, side="right"),
                      self.num_components - 1)
    x = self.means[comp] + np.einsum("nij,nj->ni", self._chol[comp], z)
    return x.reshape(len(x), landmarks_lib.NUM_LANDMARKS, 2).astype(np.float32)

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` landmark sets drawn from the mixture, float32 `[n, 5, 2]`."""
    if int(n) < 0:
      raise ValueError(f"PoseModel.sample: n must be >= 0, got {n}")
    return self._transform(*self._noise(rng, int(n)))

  def mean(self) -> np.ndarray:
    """The mixture's mean set, float64 `[5, 2]`."""
    return (self.weights @ self.means).reshape(landmarks_lib.NUM_LANDMARKS, 2)

  def covariance(self) -> np.ndarray:
    """The mixture's covariance of the 10 coordinates, float64 `[10, 10]`."""
    m = self.weights @ self.means
    second = np.einsum("k,kij->ij", self.weights,
                       self.covariances + self.means[:, :, None] * self.means[:, None, :])
    return second - np.outer(m, m)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to an `.npz` file (weights, means, covariances, fit statistics)."""
    with open(path, "wb") as f:
      np.savez(f, format_version=np.int64(FORMAT_VERSION), weights=self.weights,
               means=self.means, covariances=self.covariances,
               num_train=np.int64(self.num_train),
               train_log_likelihood=np.float64(self.train_log_likelihood))

  @classmethod
  def load(cls, path: str | os.PathLike) -> PoseModel:
    """Reads a model written by `save`; errors name the file and what is wrong with it."""
    where = f"PoseModel.load({os.fspath(path)!r})"
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
      raise ValueError(f"{where}: not a readable .npz pose model ({err}); write one with "
                       "PoseModel.fit(...).save(path)") from err
    missing = [key for key in ("format_version", "weights", "means", "covariances")
               if key not in arrays]
    if missing:
      raise ValueError(f"{where}: missing {missing}; not a pose model written by PoseModel.save")
    if int(arrays["format_version"]) != FORMAT_VERSION:
      raise ValueError(f"{where}: format_version {int(arrays['format_version'])}, this code reads "
                       f"{FORMAT_VERSION}; refit the model")
    return cls(arrays["weights"], arrays["means"], arrays["covariances"],
               num_train=int(arrays.get("num_train", 0)),
               train_log_likelihood=float(arrays.get("train_log_likelihood", np.nan)),
               where=where)

  def __repr__(self) -> str:
    return (f"PoseModel(num_components={self.num_components}, num_train={self.num_train}, "
            f"train_log_likelihood={self.train_log_likelihood:.3f})")


def _logsumexp(a: np.ndarray) -> np.ndarray:
  top = a.max(1)
  return top + np.log(np.exp(a - top[:, None]).sum(1))


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances `[len(a), len(b)]` (float64, clipped at 0)."""
  d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None]
  return np.maximum(d, 0.0)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
  """k-means++ seeding then Lloyd iterations; returns the `[N]` cluster of each row."""
  centres = [x[rng.integers(len(x))]]
  d2 = _sq_dist(x, centres[0][None])[:, 0]
  for _ in range(1, k):
    total = d2.sum()
    i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
    centres.append(x[i])
    d2 = np.minimum(d2, _sq_dist(x, x[i][None])[:, 0])
  c = np.stack(centres)
  assign = np.argmin(_sq_dist(x, c), 1)
  for _ in range(iters):
    for j in range(k):
      if np.any(assign == j):  # an emptied cluster keeps its centre
        c[j] = x[assign == j].mean(0)
    new = np.argmin(_sq_dist(x, c), 1)
    if np.array_equal(new, assign):
      break
    assign = new
  return assign


def image_rng(seed: int, label: int, index: int) -> np.random.Generator:
  """The random stream of image `index` of identity `label`: `SeedSequence([seed, label,
  index, DRAW_TAG])`, independent of how images are batched or sharded."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(label), int(index),
                                                       DRAW_TAG]))


def draw(source: str, seed: int, labels: Any, indices: Any, *, model: PoseModel | None = None,
         pool: tuple[Any, Any] | None = None, clip_to_frame: bool = False,
         spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """The landmark set of each image `(labels[i], indices[i])`.

  Each image draws from its own `image_rng(seed, label, index)`, so drawing images 0..9 at once
  gives what drawing them one at a time (or on ten devices) gives.

  Args:
    source: `'model'` (one sample of `model`; owner -1) or `'pool'` (a uniformly drawn training
      set of `pool`, copied exactly, as the paper does; owner = that set's identity).
    seed: the generation seed (non-negative).
    labels: int `[n]` identity (row) of each image, non-negative.
    indices: int `[n]` index of each image within its identity, non-negative.
    model: the `PoseModel` for `source='model'`.
    pool: `(points [P, 5, 2], owner_labels [P])` training sets and their identities, for
      `source='pool'`.
    clip_to_frame: clip every coordinate into the image `[0, IMAGE_SIZE - 1]` (only model draws
      can leave it; a clipped pool set is no longer an exact copy).
    spread: `source='model'` only: each set's offset from the mixture's mean set scaled by this
      (1 = the fitted distribution; > 1 wider poses, for a generator that turns its faces less
      far than their landmark sets ask).

  Returns:
    `(points float32 [n, 5, 2], owner int64 [n])`.
  """
  lab = np.asarray(labels, np.int64).reshape(-1)
  idx = np.asarray(indices, np.int64).reshape(-1)
  if lab.shape != idx.shape:
    raise ValueError(f"draw: labels and indices must have the same length, got {lab.shape} and "
                     f"{idx.shape}")
  if int(seed) < 0 or (len(lab) and (lab.min() < 0 or idx.min() < 0)):
    raise ValueError("draw: seed, labels and indices must be non-negative (they seed a "
                     "SeedSequence)")
  rngs = [image_rng(seed, a, b) for a, b in zip(lab.tolist(), idx.tolist())]
  if source == "model":
    if not isinstance(model, PoseModel):
      raise ValueError("draw: source='model' needs model=PoseModel (PoseModel.fit or .load)")
    noise = [model._noise(r, 1) for r in rngs]  # pylint: disable=protected-access
    u = np.concatenate([a for a, _ in noise]) if noise else np.zeros(0)
    z = np.concatenate([b for _, b in noise]) if noise else np.zeros((0, DIM))
    points = model._transform(u, z)  # pylint: disable=protected-access
    if spread != 1.0:
      centre = model.mean().astype(np.float32)
      points = (centre + np.float32(spread) * (points - centre)).astype(np.float32)
    owner = np.full(len(lab), -1, np.int64)
  elif source == "pool":
    if pool is None:
      raise ValueError("draw: source='pool' needs pool=(points [P, 5, 2], owner_labels [P])")
    pool_points = np.asarray(pool[0], np.float32)
    pool_owner = np.asarray(pool[1], np.int64).reshape(-1)
    _as_sets(pool_points, "draw: pool points")
    if len(pool_points) == 0 or len(pool_owner) != len(pool_points):
      raise ValueError(f"draw: pool needs P >= 1 sets and P owner labels, got "
                       f"{len(pool_points)} sets and {len(pool_owner)} labels")
    pick = np.array([r.integers(len(pool_points)) for r in rngs], np.int64)
    points, owner = pool_points[pick].copy(), pool_owner[pick]
  else:
    raise ValueError(f"draw: source must be 'model' or 'pool', got {source!r}")
  if clip_to_frame:
    points = np.clip(points, 0.0, landmarks_lib.IMAGE_SIZE - 1).astype(np.float32)
  return points, owner


def normalised_sets(points: Any) -> np.ndarray:
  """float64 `[n, 10]` sets with the mean point subtracted, divided by the eye distance.

  Removes where the face sits and how large it is, keeping shape (and pose) only.
  """
  p = _as_sets(points, "normalised_sets: points").reshape(-1, landmarks_lib.NUM_LANDMARKS, 2)
  iod = np.linalg.norm(p[:, 1] - p[:, 0], axis=1)
  centred = (p - p.mean(1, keepdims=True)) / np.maximum(iod, 1e-6)[:, None, None]
  return centred.reshape(len(p), DIM)


def landmark_identifiability(points: Any, labels: Any, *, max_identities: int | None = None
                             ) -> dict[str, float]:
  """How well landmark sets alone identify people.

  Each set (normalised by `normalised_sets`) is assigned to the nearest identity centre
  (Euclidean), where its own identity's centre is the mean of that identity's *other* sets
  (leave-one-out; exact: every distance is computed, no approximation). Identities with a single
  set are candidates but are not queried.

  Args:
    points: `[n, 5, 2]` landmark sets.
    labels: `[n]` identity of each set.
    max_identities: keep only the identities with the `max_identities` smallest labels.

  Returns:
    `top1` (rate at which the nearest centre is the own one), `chance` (1 / #identities),
    `num_identities`, `num_queries`.
  """
  x = normalised_sets(points)
  lab = np.asarray(labels).reshape(-1)
  if len(lab) != len(x):
    raise ValueError(f"landmark_identifiability: {len(x)} sets but {len(lab)} labels")
  ids, inv = np.unique(lab, return_inverse=True)
  if max_identities is not None:
    keep = inv < int(max_identities)
    x, inv, ids = x[keep], inv[keep], ids[:int(max_identities)]
  k = len(ids)
  if k < 2:
    raise ValueError(f"landmark_identifiability: needs at least 2 identities, got {k}")
  counts = np.bincount(inv, minlength=k).astype(np.float64)
  sums = np.zeros((k, DIM))
  np.add.at(sums, inv, x)
  centres = sums / counts[:, None]
  query = np.flatnonzero(counts[inv] >= 2)
  if len(query) == 0:
    raise ValueError("landmark_identifiability: no identity has 2 or more sets to leave one out")
  hits = 0
  for s in range(0, len(query), _CHUNK):
    q = query[s:s + _CHUNK]
    d = _sq_dist(x[q], centres)
    own = inv[q]
    loo = (sums[own] - x[q]) / (counts[own] - 1)[:, None]
    d[np.arange(len(q)), own] = np.sum((x[q] - loo) ** 2, 1)
    hits += int(np.sum(np.argmin(d, 1) == own))
  return {"top1": hits / len(query), "chance": 1.0 / k, "num_identities": float(k),
          "num_queries": float(len(query))}


def _rms(d2: np.ndarray) -> np.ndarray:
  """RMS point distance (px) from the squared 10-d distance."""
  return np.sqrt(d2 / landmarks_lib.NUM_LANDMARKS).astype(np.float32)


def nearest_pool_distance(points: Any, pool_points: Any, *, exclude_self: bool = False,
                          return_index: bool = False
                          ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """RMS point distance (px) from each set to its nearest pool set (exact, chunked).

  `RMS = sqrt(mean over the 5 points of the squared point distance)`. A model draw far from
  every pool set is not a copy; compare with `same_identity_distance` (two images of one person)
  and with the pool's own `exclude_self=True` distances (how near real sets lie to each other).

  Args:
    points: `[n, 5, 2]` query sets.
    pool_points: `[P, 5, 2]` training sets.
    exclude_self: `points` is the pool itself: skip each set's own entry.
    return_index: also return the index of the nearest pool set.

  Returns:
    float32 `[n]` distances, and int64 `[n]` indices if `return_index`.
  """
  x = _as_sets(points, "nearest_pool_distance: points")
  pool = _as_sets(pool_points, "nearest_pool_distance: pool_points")
  if len(pool) < 1 + int(exclude_self):
    raise ValueError(f"nearest_pool_distance: pool_points has {len(pool)} sets, too few")
  if exclude_self and len(pool) != len(x):
    raise ValueError("nearest_pool_distance: exclude_self=True needs points to be the pool")
  best = np.empty(len(x))
  where = np.empty(len(x), np.int64)
  for s in range(0, len(x), _CHUNK):
    d = _sq_dist(x[s:s + _CHUNK], pool)
    if exclude_self:
      d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf
    where[s:s + _CHUNK] = np.argmin(d, 1)
    best[s:s + _CHUNK] = np.sum((x[s:s + _CHUNK] - pool[where[s:s + _CHUNK]]) ** 2, 1)
  return (_rms(best), where) if return_index else _rms(best)


def same_identity_distance(points: Any, labels: Any) -> np.ndarray:
  """RMS point distance (px) from each set to the nearest *other* set of the same identity.

  float32 `[n]`; NaN for sets whose identity has a single set. The scale at which two images of
  one real person differ, against which `nearest_pool_distance` of model draws is read.
  """
  x = _as_sets(points, "same_identity_distance: points")
  lab = np.asarray(labels).reshape(-1)
  if len(lab) != len(x):
    raise ValueError(f"same_identity_distance: {len(x)} sets but {len(lab)} labels")
  out = np.full(len(x), np.nan, np.float32)
  order = np.argsort(lab, kind="stable")
  bounds = np.flatnonzero(np.diff(lab[order])) + 1
  for group in np.split(order, bounds):
    if len(group) >= 2:
      d = _sq_dist(x[group], x[group])
      np.fill_diagonal(d, np.inf)
      out[group] = _rms(d.min(1))
  return out


def owner_identification(embeddings: Any, owners: Any, gallery_centres: Any,
                         gallery_labels: Any) -> dict[str, float]:
  """Are generated images recognised as the owner of their landmark set?

  For images drawn under a pool set owned by a training person (or, for model draws, the owner
  of the nearest pool set: `nearest_pool_distance(..., return_index=True)`), the rate at which
  the nearest gallery centre (cosine) is the owner's.

  Args:
    embeddings: `[n, d]` FR features of the generated images (normalised here).
    owners: int `[n]` owner label of each image's landmark set; each must be in gallery_labels.
    gallery_centres: `[G, d]` class centres of the training identities (normalised here).
    gallery_labels: `[G]` label of each centre.

  Returns:
    `top1` (nearest centre is the owner's), `chance` (1 / G), `mean_cos_owner` (cosine to the
    owner's centre), `num_images`, `num_identities`.
  """
  e = ops.l2_normalize_np(np.asarray(embeddings, np.float32), axis=1)
  g = ops.l2_normalize_np(np.asarray(gallery_centres, np.float32), axis=1)
  own = np.asarray(owners, np.int64).reshape(-1)
  glab = np.asarray(gallery_labels, np.int64).reshape(-1)
  if e.ndim != 2 or g.ndim != 2 or e.shape[1] != g.shape[1]:
    raise ValueError(f"owner_identification: embeddings [n, d] and gallery_centres [G, d] must "
                     f"share d, got {e.shape} and {g.shape}")
  if len(own) != len(e) or len(glab) != len(g) or len(e) == 0:
    raise ValueError(f"owner_identification: need n >= 1 owners for n embeddings and G labels "
                     f"for G centres, got {len(own)}/{len(e)} and {len(glab)}/{len(g)}")
  if len(np.unique(glab)) != len(glab):
    raise ValueError("owner_identification: gallery_labels must be unique (one centre each)")
  order = np.argsort(glab)
  pos = np.searchsorted(glab[order], own)
  pos = np.minimum(pos, len(glab) - 1)
  row = order[pos]
  if np.any(glab[row] != own):
    raise ValueError(f"owner_identification: {int(np.sum(glab[row] != own))} owner(s) not in "
                     "gallery_labels (model draws have owner -1: assign the nearest pool set's "
                     "owner first)")
  hits, cos_own = 0, 0.0
  for s in range(0, len(e), _CHUNK):
    cos = e[s:s + _CHUNK] @ g.T
    hits += int(np.sum(np.argmax(cos, 1) == row[s:s + _CHUNK]))
    cos_own += float(np.sum(cos[np.arange(len(cos)), row[s:s + _CHUNK]], dtype=np.float64))
  return {"top1": hits / len(e), "chance": 1.0 / len(g), "mean_cos_owner": cos_own / len(e),
          "num_images": float(len(e)), "num_identities": float(len(g))}
