"""What stage 2's samples are measured by: identity, pose, landmark following, sample sheets.

Host-side (numpy) pieces that judge generated faces, shared by the stage-2 evaluators
(`evaluate/evaluators.py`) and stage 3:

* `identity_consistency`: top-1 identification of generated faces among class-centre rows and
  the cosine to their own row.
* `yaw_proxy`, `PoseProbe`, `pose_scores`: how far a face is turned, read from landmarks or
  (by a ridge probe fitted on real faces) from the image, and whether generated pairs turn the
  way their landmark sets do.
* `estimate_shift`: sub-pixel phase correlation, for how far faces move with their landmarks.
* `fixed_landmarks`, `with_landmarks`: landmark sets from the training data that span its poses.
* `make_sheet`: identities × landmark sets, under a row of the landmark images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vigface_jax import ops
from vigface_jax.data import landmarks as landmarks_lib


def with_landmarks(source: Any, limit: int, seed: int, *, scan: int | None = None
                    ) -> list[dict[str, Any]]:
  """Up to `limit` examples that have landmarks, among the first `scan` (default `4 · limit`)
  of a seeded shuffle: a dataset without landmarks is not read to its end."""
  rng = np.random.default_rng(seed)
  found = []
  for i in rng.permutation(len(source))[:4 * limit if scan is None else scan]:
    element = source[int(i)]
    if bool(element.get("has_landmarks", False)):
      found.append(element)
    if len(found) == limit:
      break
  return found


def fixed_landmarks(source: Any, count: int, seed: int, pool: int = 256) -> np.ndarray:
  """`count` landmark sets from the training data that spread over its poses.

  Up to `pool` examples with landmarks (drawn by `seed`) are candidates. The first set is the
  candidate nearest the pool's median (a typical, near-frontal pose); each next one is the
  candidate farthest from those already chosen (farthest-point sampling in the 10 landmark
  coordinates), so the sheet's columns show the extremes of yaw, pitch and roll the data has
  and whether the faces follow them. Sources without landmarks give the ArcFace template.
  """
  cands = [np.asarray(e["landmarks"], np.float32)
           for e in with_landmarks(source, pool, seed, scan=max(pool, 4 * count))]
  if not cands:
    return np.repeat(np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None], count, 0)
  flat = np.stack(cands).reshape(len(cands), -1)
  chosen = [int(np.argmin(np.linalg.norm(flat - np.median(flat, axis=0), axis=1)))]
  dist = np.linalg.norm(flat - flat[chosen[0]], axis=1)
  while len(chosen) < min(count, len(cands)):
    chosen.append(int(np.argmax(dist)))
    dist = np.minimum(dist, np.linalg.norm(flat - flat[chosen[-1]], axis=1))
  chosen += [chosen[0]] * (count - len(chosen))  # fewer candidates than columns
  return np.stack(cands)[chosen]


POSE_POOL = 1536  # real faces of the pose probe (about 13 s to render procedural ones)


def yaw_proxy(points: np.ndarray) -> np.ndarray:
  """`[n, 5, 2]` landmarks -> `[n]` (nose x − eyes' midpoint x) / eye distance.

  0 for a frontal face; its sign says which way the head is turned, and a horizontal flip
  (which also swaps left and right points) negates it.
  """
  p = np.asarray(points, np.float64)
  mid = 0.5 * (p[:, 0, 0] + p[:, 1, 0])
  return (p[:, 2, 0] - mid) / np.maximum(np.abs(p[:, 1, 0] - p[:, 0, 0]), 1e-6)


class PoseProbe:
  """A linear read-out of `yaw_proxy` from a face image, fitted on real training faces.

  Features: the left-right antisymmetric part `g − flip(g)` of the image averaged over 4×4
  pixel blocks (colour kept; the left half, the right being its negative). Ridge regression
  without intercept, so a face and its mirror image get opposite predictions, and whatever is
  left-right symmetric (most of an identity's look) cannot move the prediction. Fitted first
  on `1 − holdout` of the faces to report `r2` on the rest (how well pose can be read at
  all), then on all of them.
  """

  BLOCK = 4

  def __init__(self, images: np.ndarray, points: np.ndarray, *, ridge: float = 30.0,
               holdout: float = 0.2):
    x, y = self.features(images), yaw_proxy(points)
    n_fit = len(y) - max(1, int(round(holdout * len(y))))
    if n_fit < 2:
      raise ValueError(f"PoseProbe needs at least 3 faces with landmarks, got {len(y)}")
    self.ridge = float(ridge)
    w = self._solve(x[:n_fit], y[:n_fit])
    rest = y[n_fit:]
    resid = np.mean((x[n_fit:] @ w - rest) ** 2)
    self.r2 = float(1.0 - resid / max(np.mean((rest - rest.mean()) ** 2), 1e-12))
    self.weights = self._solve(x, y)

  def _solve(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.solve(x.T @ x + self.ridge * np.eye(x.shape[1]), x.T @ y)

  @classmethod
  def features(cls, images: np.ndarray) -> np.ndarray:
    """uint8 `[n, H, W, 3]` -> float64 `[n, (H/4) · (W/8) · 3]`."""
    g = np.asarray(images, np.float64) / 127.5
    n, h, w, c = g.shape
    k = cls.BLOCK
    g = g.reshape(n, h // k, k, w // k, k, c).mean((2, 4))
    anti = g - g[:, :, ::-1]
    return anti[:, :, :(w // k) // 2].reshape(n, -1)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Predicted `yaw_proxy` of uint8 faces `[n, H, W, 3]`."""
    return self.features(images) @ self.weights


def pose_scores(probe: PoseProbe, left: np.ndarray, right: np.ndarray, real_gap: float
                ) -> dict[str, float]:
  """`landmarks/pose_*` of faces drawn in pairs with left- and right-turned landmark sets.

  `left[i]` and `right[i]` are one row drawn with the same noise under the two landmark sets;
  `real_gap` is the probe's mean read turn of the real right-turned faces minus that of the
  left-turned ones. `pose_agree`: pairs read in the right order (0.5 = chance);
  `pose_follow`: the pairs' mean read difference / `real_gap` (1 = turn like the real faces,
  0 = ignore the pose); `pose_probe_r2`: the probe's held-out R² on real faces.
  """
  diff = probe(right) - probe(left)
  return {"pose_agree": float(np.mean(diff > 0)),
          "pose_follow": float(np.mean(diff) / real_gap) if real_gap > 0 else float("nan"),
          "pose_probe_r2": probe.r2}


def make_sheet(images: np.ndarray, lmk: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """`rows` × `cols` faces (row-major in `images`) under a top row of the `cols` landmark
  images `lmk` (uint8), one uint8 sheet."""
  size = images.shape[1]
  sheet = np.zeros(((rows + 1) * size, cols * size, 3), np.uint8)
  for c in range(cols):
    sheet[:size, c * size:(c + 1) * size] = lmk[c]
  for r in range(rows):
    for c in range(cols):
      sheet[(r + 1) * size:(r + 2) * size, c * size:(c + 1) * size] = images[r * cols + c]
  return sheet


def identity_consistency(emb: np.ndarray, real_rows: np.ndarray, labels: np.ndarray
                         ) -> dict[str, float]:
  """Top-1 identification of generated faces among all real rows, and cosine to their own."""
  e, w = ops.l2_normalize_np(emb, axis=1), ops.l2_normalize_np(real_rows, axis=1)
  cos = e @ w.T
  return {"top1": float(np.mean(np.argmax(cos, axis=1) == labels)),
          "mean_cos_to_row": float(np.mean(cos[np.arange(len(labels)), labels])),
          "chance": 1.0 / w.shape[0], "num_identities": float(len(labels))}


def estimate_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(dx, dy) by which `b`'s content sits right/down of `a`'s (phase correlation), [n, 2].

  Args:
    a, b: images [n, H, W, C] (any numeric dtype), compared on their channel mean after
      removing it and applying a Hann window; sub-pixel by a parabola through the peak.
  """
  a = np.asarray(a, np.float64).mean(-1)
  b = np.asarray(b, np.float64).mean(-1)
  h, w = a.shape[1:]
  window = np.outer(np.hanning(h), np.hanning(w))
  a = (a - a.mean((1, 2), keepdims=True)) * window
  b = (b - b.mean((1, 2), keepdims=True)) * window
  cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
  corr = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real  # [n, H, W]
  out = np.zeros((len(a), 2))
  for i, c in enumerate(corr):
    py, px = np.unravel_index(np.argmax(c), c.shape)
    out[i, 0] = _peak(px, w, c[py, (px - 1) % w], c[py, px], c[py, (px + 1) % w])
    out[i, 1] = _peak(py, h, c[(py - 1) % h, px], c[py, px], c[(py + 1) % h, px])
  return out


def _peak(index: int, size: int, lo: float, mid: float, hi: float) -> float:
  """Signed circular offset of a correlation peak, refined by a parabola through 3 values."""
  denom = lo - 2 * mid + hi
  frac = 0.5 * (lo - hi) / denom if denom < 0 else 0.0
  return (index + size // 2) % size - size // 2 + frac
