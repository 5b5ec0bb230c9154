"""What a generated face-recognition dataset is measured by, on encoder features.

A generated FR training set is good when its identities are *consistent* (an identity's images
look like one person), *separable* (different identities look like different people), *diverse*
(an identity's images vary in the way real photos do: FR-feature spread and pose) and *realistic*
(a linear probe on the features cannot tell generated from real faces). Each function takes
features from one encoder (float `[n, d]`, L2-normalised here) and returns a dict of plain
floats, so a caller can report generated and real data side by side under the same encoder:

* `consistency`: leave-one-out nearest-centre top-1 and image-to-own-centre cosine.
* `separability`: each identity's nearest other centre cosine.
* `diversity`: intra-class pairwise cosine spread, and with landmarks the pose spread.
* `realism`: cross-validated real-vs-generated linear classifier accuracy and the Fréchet
  distance between the feature Gaussians (`frechet_distance`).
* `own_row`: cosine of each generated identity's centre to the stage-1 row it was drawn from.
* `summarize`: consistency, separability and diversity in one flat dict.

Labels may be any integers; identities are the distinct labels. All numpy, on the host, chunked
so that features of a full generated dataset (1M × 512) fit in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import linalg

from vigface_jax import ops
from vigface_jax.evaluate import generation

_CHUNK_ELEMENTS = 1 << 24  # float32 elements of one block of a chunked similarity matrix


def _features(emb: Any, name: str) -> np.ndarray:
  e = np.asarray(emb, np.float32)
  if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
    raise ValueError(f"{name} must be float [n, d] features with n, d >= 1, got shape {e.shape}")
  if not np.all(np.isfinite(e)):
    raise ValueError(f"{name} contains NaN or inf; check the encoder's outputs")
  return ops.l2_normalize_np(e, axis=1)


def _grouped(emb: Any, labels: Any, where: str, min_ids: int = 1
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Normalised features, identity index `[n]`, counts `[K]`, float64 feature sums `[K, d]`."""
  e = _features(emb, f"{where}: emb")
  lab = np.asarray(labels).reshape(-1)
  if len(lab) != len(e):
    raise ValueError(f"{where}: emb has {len(e)} rows but labels has {len(lab)}")
  _, inv = np.unique(lab, return_inverse=True)
  k = int(inv.max()) + 1
  if k < min_ids:
    raise ValueError(f"{where}: needs at least {min_ids} identities, got {k}")
  counts = np.bincount(inv, minlength=k)
  sums = np.zeros((k, e.shape[1]))
  np.add.at(sums, inv, e.astype(np.float64))
  return e, inv, counts, sums


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _percentiles(prefix: str, values: np.ndarray, qs: tuple[int, ...]) -> dict[str, float]:
  return {f"{prefix}_p{q}": float(np.percentile(values, q)) for q in qs}


def consistency(emb: Any, labels: Any) -> dict[str, float]:
  """Do an identity's images look like one person, under this encoder?

  Each image (of an identity with at least 2 images) is compared by cosine with every identity
  centre (normalised mean of the normalised features), its own identity's centre computed
  without it (leave-one-out). It is identified when its own centre is strictly the nearest.

  Returns:
    `top1`, `chance` (1 / #identities), `intra_cos_mean` (cosine of each image to its own
    leave-one-out centre) with `intra_cos_p5` / `_p50`, `num_identities`, `num_images` (those
    queried).
  """
  e, inv, counts, sums = _grouped(emb, labels, "consistency", min_ids=2)
  centres = _unit(sums).astype(np.float32)
  query = np.flatnonzero(counts[inv] >= 2)
  if len(query) == 0:
    raise ValueError("consistency: no identity has 2 or more images to leave one out")
  hits, own_cos = 0, np.empty(len(query))
  step = max(1, _CHUNK_ELEMENTS // len(centres))
  for s in range(0, len(query), step):
    q = query[s:s + step]
    cos = e[q] @ centres.T
    own = inv[q]
    loo = _unit(sums[own] - e[q])
    c_own = np.sum(e[q].astype(np.float64) * loo, 1)
    cos[np.arange(len(q)), own] = -np.inf
    hits += int(np.sum(c_own > cos.max(1)))
    own_cos[s:s + step] = c_own
  return {"top1": hits / len(query), "chance": 1.0 / len(counts),
          "intra_cos_mean": float(own_cos.mean()), **_percentiles("intra_cos", own_cos, (5, 50)),
          "num_identities": float(len(counts)), "num_images": float(len(query))}


def _nearest_other(centres: np.ndarray) -> np.ndarray:
  """Cosine of each (unit) row to its nearest other row, float64 `[K]`, chunked."""
  k = len(centres)
  out = np.empty(k)
  step = max(1, _CHUNK_ELEMENTS // k)
  for s in range(0, k, step):
    cos = centres[s:s + step] @ centres.T
    cos[np.arange(len(cos)), np.arange(s, s + len(cos))] = -np.inf
    out[s:s + step] = cos.max(1)
  return out


def separability(emb: Any, labels: Any) -> dict[str, float]:
  """Do different identities look like different people?

  Returns:
    Statistics over identities of the cosine between each identity's centre and its nearest
    *other* centre: `nearest_other_cos_mean`, `_p50`, `_p95`, `_max`; `num_identities`.
  """
  _, _, counts, sums = _grouped(emb, labels, "separability", min_ids=2)
  near = _nearest_other(_unit(sums).astype(np.float32))
  return {"nearest_other_cos_mean": float(near.mean()),
          **_percentiles("nearest_other_cos", near, (50, 95)),
          "nearest_other_cos_max": float(near.max()), "num_identities": float(len(counts))}


def diversity(emb: Any, labels: Any, points: Any = None) -> dict[str, float]:
  """How much does an identity's look (and pose) vary across its images?

  Per identity with at least 2 images: the mean and std of the cosines of all its image pairs;
  and with landmark `points` `[n, 5, 2]`, the std of `generation.yaw_proxy` over its images and
  the mean RMS point distance (px) over its image pairs. Reported as averages over identities
  (each identity counts once).

  Returns:
    `intra_pair_cos_mean`, `intra_pair_cos_std`, `spread` (1 − intra_pair_cos_mean),
    `intra_pair_cos_p5` / `_p50` (of the per-identity means), `num_identities`; with points
    also `yaw_std` and `landmark_rms`.
  """
  e, inv, counts, _ = _grouped(emb, labels, "diversity")
  pts = None
  if points is not None:
    pts = np.asarray(points, np.float64)
    if pts.shape != (len(e), 5, 2):
      raise ValueError(f"diversity: points must be [n, 5, 2] with n = {len(e)} (one landmark "
                       f"set per image), got {pts.shape}")
    yaw = generation.yaw_proxy(pts)
  order = np.argsort(inv, kind="stable")
  groups = np.split(order, np.cumsum(counts)[:-1])
  means, stds, yaw_std, rms = [], [], [], []
  for g in groups:
    if len(g) < 2:
      continue
    iu = np.triu_indices(len(g), 1)
    pair = (e[g] @ e[g].T)[iu].astype(np.float64)
    means.append(pair.mean())
    stds.append(pair.std())
    if pts is not None:
      yaw_std.append(yaw[g].std())
      diff = pts[g][:, None] - pts[g][None]  # [m, m, 5, 2]
      rms.append(np.sqrt(np.mean(np.sum(diff * diff, -1), -1))[iu].mean())
  if not means:
    raise ValueError("diversity: no identity has 2 or more images")
  means = np.asarray(means)
  out = {"intra_pair_cos_mean": float(means.mean()), "intra_pair_cos_std": float(np.mean(stds)),
         "spread": float(1.0 - means.mean()), **_percentiles("intra_pair_cos", means, (5, 50)),
         "num_identities": float(len(means))}
  if pts is not None:
    out["yaw_std"] = float(np.mean(yaw_std))
    out["landmark_rms"] = float(np.mean(rms))
  return out


def frechet_distance(a: Any, b: Any) -> dict[str, float]:
  """Fréchet distance between Gaussians fitted to two feature sets (used as given).

  `FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)`, the matrix root by `scipy.linalg.sqrtm`.
  Rounding can give the root a tiny imaginary part, which is dropped (its largest magnitude is
  reported as `fd_imag`); a non-finite root is retried with `1e-6 · I` added to both
  covariances, as pytorch-fid does.

  The sample covariance is a biased basis for FD: with d near n its eigenvalues spread out and
  the FD of two samples of one distribution is far from 0 and depends on n. Compare FDs only at
  equal n and d (`realism` subsamples both sets to equal n).

  Returns:
    `fd`, `fd_mean_term` (‖Δμ‖²), `fd_imag`.
  """
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise ValueError(f"frechet_distance: a and b must be [n, d] with the same d and n >= 2, got "
                     f"{x.shape} and {y.shape}")
  mu = x.mean(0) - y.mean(0)
  ca, cb = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
  root = linalg.sqrtm(ca @ cb)
  if not np.all(np.isfinite(root)):
    eps = 1e-6 * np.eye(len(ca))
    root = linalg.sqrtm((ca + eps) @ (cb + eps))
  imag = float(np.max(np.abs(np.imag(root)))) if np.iscomplexobj(root) else 0.0
  mean_term = float(mu @ mu)
  fd = mean_term + float(np.trace(ca) + np.trace(cb) - 2.0 * np.trace(np.real(root)))
  return {"fd": fd, "fd_mean_term": mean_term, "fd_imag": imag}


def _ridge_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
  """Ridge regression of ±1 targets with an unpenalised intercept."""
  mx, my = x.mean(0), y.mean()
  xc = x - mx
  w = np.linalg.solve(xc.T @ xc + l2 * len(x) * np.eye(x.shape[1]), xc.T @ (y - my))
  return w, float(my - mx @ w)


def realism(real_emb: Any, gen_emb: Any, *, folds: int = 5, seed: int = 0, l2: float = 1e-3
            ) -> dict[str, float]:
  """Can a linear probe on the features tell generated faces from real ones?

  Both sets are normalised and the larger one is subsampled (by `seed`) to the size n of the
  smaller, so classes are balanced and the Fréchet distance is taken at equal n. The probe is
  ridge regression on ±1 targets (real +1, generated −1; L2 weight `l2 · N` on the centred
  features, intercept free), cross-validated over `folds` stratified folds. 0.5 accuracy = the
  encoder cannot tell them apart; 1.0 = perfectly separable.

  Returns:
    `accuracy` (mean test accuracy over folds), `accuracy_std`, `n_per_class`, and
    `frechet_distance`'s `fd`, `fd_mean_term`, `fd_imag` on the subsampled, normalised sets.
  """
  real = _features(real_emb, "realism: real_emb")
  gen = _features(gen_emb, "realism: gen_emb")
  if real.shape[1] != gen.shape[1]:
    raise ValueError(f"realism: real_emb and gen_emb have different widths ({real.shape[1]} vs "
                     f"{gen.shape[1]}); use the same encoder for both")
  folds = int(folds)
  n = min(len(real), len(gen))
  if folds < 2 or n < folds:
    raise ValueError(f"realism: needs folds >= 2 and at least `folds` images per set, got "
                     f"folds={folds} and {n} images in the smaller set")
  rng = np.random.default_rng(seed)
  real = real[np.sort(rng.permutation(len(real))[:n])].astype(np.float64)
  gen = gen[np.sort(rng.permutation(len(gen))[:n])].astype(np.float64)
  x = np.concatenate([real, gen])
  y = np.concatenate([np.ones(n), -np.ones(n)])
  fold_of = np.empty(2 * n, np.int64)  # stratified: each fold holds n / folds of each class
  fold_of[:n] = rng.permutation(np.arange(n) % folds)
  fold_of[n:] = rng.permutation(np.arange(n) % folds)
  acc = []
  for f in range(folds):
    test = fold_of == f
    w, b = _ridge_fit(x[~test], y[~test], float(l2))
    acc.append(float(np.mean(np.sign(x[test] @ w + b) == y[test])))
  return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
          "n_per_class": float(n), **frechet_distance(real, gen)}


def own_row(emb_stage1: Any, labels: Any, rows: Any) -> dict[str, float]:
  """Cosine of each identity's centre (stage-1 features) to the row it was generated from.

  A diagnostic of the paper's Figure 1 claim that generated faces land near their prototype.

  Args:
    emb_stage1: `[n, d]` features of the generated images under the stage-1 network.
    labels: int `[n]` row index of each image's identity.
    rows: `[K, d]` the class-centre rows, in label order.

  Returns:
    `own_row_cos_mean`, `own_row_cos_p50`, `own_row_cos_p5`, `num_identities`.
  """
  e = _features(emb_stage1, "own_row: emb_stage1")
  w = _features(rows, "own_row: rows")
  lab = np.asarray(labels).reshape(-1)
  if len(lab) != len(e) or w.shape[1] != e.shape[1]:
    raise ValueError(f"own_row: need one label per image and rows of width {e.shape[1]}, got "
                     f"{len(lab)} labels for {len(e)} images and rows {w.shape}")
  if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= len(w):
    raise ValueError(f"own_row: labels must be integer row indices in [0, {len(w)}) (rows in "
                     "label order)")
  ids, inv = np.unique(lab, return_inverse=True)
  sums = np.zeros((len(ids), e.shape[1]))
  np.add.at(sums, inv, e.astype(np.float64))
  cos = np.sum(_unit(sums) * w[ids].astype(np.float64), 1)
  return {"own_row_cos_mean": float(cos.mean()), **_percentiles("own_row_cos", cos, (50, 5)),
          "num_identities": float(len(ids))}


def summarize(emb: Any, labels: Any, points: Any = None) -> dict[str, float]:
  """`consistency`, `separability` and `diversity` in one dict, keys prefixed by the measure
  (`consistency/top1`, `separability/nearest_other_cos_mean`, `diversity/spread`, ...)."""
  out = {}
  for name, values in (("consistency", consistency(emb, labels)),
                       ("separability", separability(emb, labels)),
                       ("diversity", diversity(emb, labels, points))):
    out.update({f"{name}/{k}": v for k, v in values.items()})
  return out
