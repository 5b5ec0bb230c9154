"""Procedural faces: the rasterising primitives and the fixed noise fields.

The low-level half of the `faces` renderer (DESIGN §4), independent of what a face looks like:

* `_Surface`: per-pixel orthographic ray casts onto ellipsoids given in head space (coverage,
  depth, head-space hit point and normal);
* anti-aliased 2-D coverage (`_quad`, `_ellipse`), in-place alpha blending of channel-first
  images (`_blend`), clipping (`_unit`), tileable table look-ups (`_sample`) and the pixel box
  of a disc (`_pixel_box`);
* the constant fields every image draws windows from: the pixel grid `_GRID`, the skin/hair
  texture field, the camera-noise field and the background field (fixed seeds, built once at
  import).

Everything here follows the determinism rule of `faces`: per-pixel work uses only IEEE-exact
float32 operations, transcendental functions run on Python scalars.
"""

from __future__ import annotations

import math

import numpy as np

from vigface_jax.data import landmarks as lm

IMAGE_SIZE = lm.IMAGE_SIZE
_TEX = 64  # texture tables are _TEX × _TEX
_F32 = np.float32


def _smooth_noise(rng: np.random.Generator, size: int, passes: int) -> np.ndarray:
  """Zero-mean, unit-std tileable noise smoothed by `passes` [1, 2, 1] filters per axis."""
  t = rng.standard_normal((size, size), dtype=_F32)
  for _ in range(passes):
    t = (np.roll(t, 1, 0) + 2 * t + np.roll(t, -1, 0)) * _F32(0.25)
    t = (np.roll(t, 1, 1) + 2 * t + np.roll(t, -1, 1)) * _F32(0.25)
  t = t - t.mean(dtype=np.float64).astype(_F32)
  return t / max(float(t.std(dtype=np.float64)), 1e-6)


class _Surface:
  """Per-pixel ray casts onto axis-aligned (in head space) ellipsoids.

  Pixels map to camera coordinates (u, v); the orthographic ray (u, v, z) meets the ellipsoid
  `sum(((R^T p - c) / a)^2) = 1` where a quadratic in z has a non-negative discriminant.
  """

  def __init__(self, u: np.ndarray, v: np.ndarray, rot: np.ndarray, px_per_unit: float):
    self.u, self.v, self.px = u, v, px_per_unit
    self.rot = rot
    self.rt = rot.T.tolist()  # Python floats: the scalar set-up below is per-call overhead

  def cast(self, centre, axes, box=(slice(None), slice(None))):
    """Ray-casts the pixels of `box` onto the ellipsoid (centre, semi-axes) in head space.

    Returns:
      (coverage, camera z, head-space point [3 arrays], normal [3 arrays] unnormalised), each
      array of the box's shape.
    """
    rt = self.rt
    inv = [1.0 / float(a) ** 2 for a in axes]
    cc = (self.rot @ np.asarray(centre, np.float64)).tolist()  # centre in camera space
    du = self.u[box] - _F32(cc[0])
    dv = self.v[box] - _F32(cc[1])
    qa = sum(rt[i][2] ** 2 * inv[i] for i in range(3))
    bu = 2 * sum(rt[i][0] * rt[i][2] * inv[i] for i in range(3))
    bv = 2 * sum(rt[i][1] * rt[i][2] * inv[i] for i in range(3))
    cuu = sum(rt[i][0] ** 2 * inv[i] for i in range(3))
    cuv = 2 * sum(rt[i][0] * rt[i][1] * inv[i] for i in range(3))
    cvv = sum(rt[i][1] ** 2 * inv[i] for i in range(3))
    # In-place arithmetic: this runs on every pixel of a frame several times per image.
    qb = du * bu
    qb += dv * bv
    qc = du * cuu
    qc += dv * cuv
    qc *= du
    qc += (dv * dv) * cvv
    qc -= 1.0
    # s = 1 - Q(u, v) of the silhouette ellipse; |grad Q| ≈ 2 / radius at the rim.
    s = qb * qb
    qc *= 4 * qa
    s -= qc
    s *= 1.0 / (4 * qa)
    radius = math.prod(float(a) for a in axes) ** (1 / 3)
    cover = _unit(s * (0.5 * radius * self.px) + 0.5)
    z = np.maximum(s, 0.0)
    np.sqrt(z, out=z)
    z *= 2 * math.sqrt(qa)
    z -= qb
    z *= 1.0 / (2 * qa)
    local = []
    for i in range(3):
      li = du * rt[i][0]
      li += dv * rt[i][1]
      li += z * rt[i][2]
      local.append(li)
    head = [local[i] + float(centre[i]) for i in range(3)]
    normal = [local[i] * inv[i] for i in range(3)]
    z += cc[2]
    return cover, z, head, normal


def _unit(x):
  """Clips to [0, 1]: two ufunc calls are cheaper than np.clip's Python wrapper."""
  return np.minimum(np.maximum(x, 0.0), 1.0)


def _quad(dx2, dy2, rx, ry, sharp):
  """Anti-aliased ellipse coverage from squared offsets in the ellipse's own frame.

  `sharp` is the edge steepness in 1/units (pixels per unit gives one-pixel edges).
  """
  # Python floats only: a numpy float64 scalar would promote the float32 arrays (NEP 50).
  rx, ry, sharp = float(rx), float(ry), float(sharp)
  d = dx2 * (1 / rx**2) + dy2 * (1 / ry**2)
  # (1 − d) / |∇d| is the distance to the rim to first order, so the edge is one pixel wide
  # along both axes even for long thin shapes (lips, brows).
  grad = np.sqrt(dx2 * (4 / rx**4) + dy2 * (4 / ry**4)) + 1e-6
  return _unit((1 - d) * sharp / grad + 0.5)


def _ellipse(x, y, cx, cy, rx, ry, sharp, rot=0.0):
  """Anti-aliased coverage of an ellipse centred (cx, cy), rotated by `rot` radians."""
  dx, dy = x - float(cx), y - float(cy)
  if rot:
    c, s = math.cos(rot), math.sin(rot)
    dx, dy = dx * c + dy * s, dy * c - dx * s
  return _quad(dx * dx, dy * dy, rx, ry, sharp)


def _blend(canvas, alpha, colour):
  """canvas ← canvas + alpha·(colour − canvas), in place.

  Images are channel-first `[3, height, width]` while rendering: numpy broadcasts a
  `[height, width]` alpha over a leading axis ~9× faster than over a trailing axis of size 3.

  Args:
    canvas: float32 [3, h, w], updated in place.
    alpha: float32 [h, w].
    colour: float32 [3] or [3, h, w].
  """
  if colour.ndim == 1:
    colour = colour.reshape(3, 1, 1)
  canvas += alpha * (colour - canvas)


def _sample(table, x, y, scale):
  """Nearest look-up of a tileable `[_TEX, _TEX]` table at (x·scale, y·scale)."""
  # The offset keeps the truncating int cast a floor for the coordinates we meet (> −4096).
  ix = (x * _F32(scale) + _F32(4096 * _TEX)).astype(np.int32) & (_TEX - 1)
  iy = (y * _F32(scale) + _F32(4096 * _TEX)).astype(np.int32) & (_TEX - 1)
  return np.take(table, iy * _TEX + ix)


def _pixel_box(x: float, y: float, rad: float, size: int = IMAGE_SIZE):
  """Slices of the pixels within `rad` of (x, y), or None when that misses the image."""
  y0, y1 = max(int(y - rad), 0), min(int(y + rad) + 2, size)
  x0, x1 = max(int(x - rad), 0), min(int(x + rad) + 2, size)
  return (slice(y0, y1), slice(x0, x1)) if y0 < y1 and x0 < x1 else None


_GRID = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(_F32)  # (y, x) pixel centres
_GRID.flags.writeable = False
# Camera noise windows are cut from one fixed field: drawing 37,632 fresh normals per image
# would cost a third of the rendering time.
_NOISE = 256
_TEXTURE_FIELD = _smooth_noise(np.random.default_rng(np.random.SeedSequence([2024, 11, 30])),
                               1024, 1)
_NOISE_FIELD = np.random.default_rng(np.random.SeedSequence([2024, 11, 29])).standard_normal(
    (3, _NOISE + IMAGE_SIZE, _NOISE + IMAGE_SIZE), dtype=_F32)
# Background texture: windows of one fixed field of blocky noise (4-pixel cells).
_BG_FIELD = np.tile(np.kron(
    _smooth_noise(np.random.default_rng(np.random.SeedSequence([2024, 11, 28])), _TEX, 2),
    np.ones((4, 4), _F32)), (2, 2))[:_NOISE + IMAGE_SIZE, :_NOISE + IMAGE_SIZE]
