"""Five-point face landmarks: the ArcFace template, landmark images, flips, alignment.

Conventions used by every function here:

* **Coordinates.** A point is `(x, y)` in pixels of the image it belongs to
  (normally the 112x112 aligned frame), with pixel centres at integer
  coordinates: pixel column `c` has centre `x = c`, pixel row `r` has centre
  `y = r`. The image spans `[-0.5, width - 0.5] x [-0.5, height - 0.5]`.
* **Order.** Landmarks come in ArcFace order: left eye, right eye, nose tip,
  left mouth corner, right mouth corner, where "left" is the point with the
  smaller `x` in a frontal image (as in `ARCFACE_TEMPLATE`), i.e. the
  subject's right. Arrays of landmarks are `[..., 5, 2]`.
* **Landmark image** (DESIGN.md section 1, measured on the paper's figures):
  `[size, size, 3]` uint8, black background; each point is a filled diamond
  `|dx| + |dy| <= 2` (13 pixels) centred on the pixel nearest the point,
  where "nearest" rounds half up: `c = floor(v + 0.5)`, so `x = 10.5` lands on
  column 11 and `x = -0.5` on column 0. Eyes are pure red, the nose pure green,
  mouth corners pure blue; left and right share a colour. Pixels of a diamond
  outside the image are dropped; non-finite points draw nothing; where
  diamonds overlap the later point in ArcFace order wins.
* **Flip.** A horizontal flip maps `x -> (width - 1) - x` (pixel column `c`
  goes to `width - 1 - c`) and swaps left/right (`FLIP_PERMUTATION`) so the
  result is ArcFace-ordered again. Because rounding is half up, the landmark
  image of flipped points equals the flipped landmark image except for points
  whose `x` has a fractional part of exactly 0.5.

Alignment (`estimate_similarity`, `warp_affine`, `align_face`) follows
insightface's `norm_crop`: a least-squares similarity (Umeyama) from the
detected points to the template, then a bilinear warp. Everything except
`render_landmark_image_jnp` is numpy and runs on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Union

import jax.numpy as jnp

import numpy as np

IMAGE_SIZE = 112

# ArcFace's 112x112 alignment template (insightface `arcface_dst`).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)

NUM_LANDMARKS = 5

LANDMARK_COLOURS = np.array(
    [
        [255, 0, 0],  # left eye
        [255, 0, 0],  # right eye
        [0, 255, 0],  # nose tip
        [0, 0, 255],  # left mouth corner
        [0, 0, 255],  # right mouth corner
    ],
    dtype=np.uint8,
)

# After mirroring x, the old left eye is on the right: swap the pairs.
FLIP_PERMUTATION = (1, 0, 2, 4, 3)

DIAMOND_RADIUS = 2

# The 13 offsets (dx, dy) with |dx| + |dy| <= 2.
_DIAMOND_OFFSETS = tuple(
    (dx, dy)
    for dy in range(-DIAMOND_RADIUS, DIAMOND_RADIUS + 1)
    for dx in range(-DIAMOND_RADIUS, DIAMOND_RADIUS + 1)
    if abs(dx) + abs(dy) <= DIAMOND_RADIUS
)

ArrayLike = Union[np.ndarray, Sequence]


def _check_points(points: np.ndarray) -> None:
  if points.ndim < 2 or points.shape[-2:] != (NUM_LANDMARKS, 2):
    raise ValueError(
        f"landmarks must have shape [..., {NUM_LANDMARKS}, 2], got {points.shape}"
    )


def _round_half_up(v):
  """`floor(v + 0.5)` without the rounding error of the addition.

  In float32, `v + 0.5` can round up to the next integer (e.g. for
  `v = 0.49999997`), which would make the numpy (float64) and jax (float32)
  renderers disagree. `v - floor(v)` is exact, so comparing it with 0.5 is too.
  Works for numpy and jax.numpy arrays alike.
  """
  xp = jnp if isinstance(v, jnp.ndarray) else np
  base = xp.floor(v)
  return base + (v - base >= 0.5).astype(v.dtype)


def render_landmark_image(points: ArrayLike, size: int = IMAGE_SIZE) -> np.ndarray:
  """Draws the five-point landmark image (numpy, batched).

  Args:
    points: float `[..., 5, 2]` landmarks `(x, y)` in pixels of the
      `size x size` frame, ArcFace order.
    size: output height and width.

  Returns:
    uint8 `[..., size, size, 3]`: black background, a 13-pixel diamond per
    point (see the module docstring for rounding, clipping and overlap rules).
  """
  points = np.asarray(points, dtype=np.float64)
  _check_points(points)
  batch_shape = points.shape[:-2]
  flat = points.reshape(-1, NUM_LANDMARKS, 2)
  batch = flat.shape[0]

  finite = np.all(np.isfinite(flat), axis=-1)  # [batch, 5]
  centre = _round_half_up(np.where(finite[..., None], flat, -1e6))
  # Clipping keeps far-away points far away but makes the int cast safe.
  centre = np.clip(centre, -4 * size, 4 * size).astype(np.int64)
  cx, cy = centre[..., 0], centre[..., 1]  # [batch, 5]

  image = np.zeros((batch * size * size, 3), dtype=np.uint8)
  image_offset = np.arange(batch, dtype=np.int64) * (size * size)
  # Points are painted in ArcFace order so that later ones overwrite earlier
  # ones; within one point the 13 pixels are distinct, so one fancy-indexed
  # assignment per point has no write conflicts.
  for k in range(NUM_LANDMARKS):
    cols = cx[:, k, None] + np.array([o[0] for o in _DIAMOND_OFFSETS])
    rows = cy[:, k, None] + np.array([o[1] for o in _DIAMOND_OFFSETS])
    valid = (
        finite[:, k, None]
        & (cols >= 0) & (cols < size)
        & (rows >= 0) & (rows < size)
    )  # [batch, 13]
    index = image_offset[:, None] + rows * size + cols
    image[index[valid]] = LANDMARK_COLOURS[k]
  return image.reshape(*batch_shape, size, size, 3)


def render_landmark_image_jnp(points: jnp.ndarray, size: int = IMAGE_SIZE) -> jnp.ndarray:
  """Draws the landmark image in jax.numpy; pixel-identical to the numpy version.

  Jittable (`size` must be static). Each output pixel checks its Manhattan
  distance to every rounded point, which fuses into one elementwise kernel
  and needs no scatter.

  Args:
    points: float `[..., 5, 2]` landmarks `(x, y)`, ArcFace order.
    size: output height and width (static).

  Returns:
    uint8 `[..., size, size, 3]`.
  """
  points = jnp.asarray(points)
  if not jnp.issubdtype(points.dtype, jnp.floating):
    points = points.astype(jnp.float32)
  _check_points(points)
  # NaN centres fail every comparison below and +-inf ones are infinitely
  # far away, so non-finite points draw nothing without a special case.
  centre = _round_half_up(points)
  cx = centre[..., 0][..., None, None]  # [..., 5, 1, 1]
  cy = centre[..., 1][..., None, None]
  coords = jnp.arange(size, dtype=points.dtype)
  dist = jnp.abs(coords[None, :] - cx) + jnp.abs(coords[:, None] - cy)
  inside = dist <= DIAMOND_RADIUS  # [..., 5, size, size]
  # Index of the last point covering each pixel (later points win), -1 if none.
  ranks = jnp.arange(1, NUM_LANDMARKS + 1, dtype=jnp.int32)[:, None, None]
  winner = jnp.max(jnp.where(inside, ranks, 0), axis=-3) - 1  # [..., size, size]
  colours = jnp.asarray(LANDMARK_COLOURS)
  image = colours[jnp.maximum(winner, 0)]
  return jnp.where((winner >= 0)[..., None], image, jnp.uint8(0))


def flip_landmarks(points: ArrayLike, width: int = IMAGE_SIZE) -> np.ndarray:
  """Mirrors landmarks horizontally and swaps left/right to keep ArcFace order.

  Args:
    points: `[..., 5, 2]` landmarks `(x, y)` in an image `width` pixels wide.
    width: image width in pixels.

  Returns:
    `[..., 5, 2]` with `x -> (width - 1) - x` and left/right swapped, same
    dtype as `points`.
  """
  points = np.asarray(points)
  _check_points(points)
  flipped = points.copy()
  flipped[..., 0] = (width - 1) - points[..., 0]
  return flipped[..., FLIP_PERMUTATION, :]


def flip_image_and_landmarks(
    image: ArrayLike, points: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
  """Flips an image along its width together with its landmarks.

  Args:
    image: `[..., height, width, channels]`.
    points: `[..., 5, 2]` landmarks in that image.

  Returns:
    `(flipped_image [..., height, width, channels], flipped_points [..., 5, 2])`.
  """
  image = np.asarray(image)
  if image.ndim < 3:
    raise ValueError(f"image must be [..., height, width, channels], got {image.shape}")
  return image[..., ::-1, :], flip_landmarks(points, width=image.shape[-2])


def estimate_similarity(src: ArrayLike, dst: ArrayLike) -> np.ndarray:
  """Least-squares similarity transform from `src` to `dst` (Umeyama, 1991).

  Minimises `sum_i |s R src_i + t - dst_i|^2` over a rotation `R` (no
  reflection), a scale `s > 0` and a translation `t`.

  Args:
    src: `[num_points, 2]` source points, `num_points >= 2`.
    dst: `[num_points, 2]` target points.

  Returns:
    float64 `[2, 3]` matrix `[s R | t]` mapping `(x, y, 1)` to target points.

  Raises:
    ValueError: on mismatched shapes, fewer than two points, non-finite values,
      or when either point set has (numerically) all points coincident, where
      the transform is undefined or singular.
  """
  src = np.asarray(src, dtype=np.float64)
  dst = np.asarray(dst, dtype=np.float64)
  if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
    raise ValueError(f"src and dst must both be [num_points, 2], got {src.shape} and {dst.shape}")
  num = src.shape[0]
  if num < 2:
    raise ValueError(f"need at least 2 points for a similarity transform, got {num}")
  if not (np.isfinite(src).all() and np.isfinite(dst).all()):
    raise ValueError("src and dst must be finite")

  # Plain sums over the tiny arrays: np.mean's Python wrapper dominated the cost here.
  src_mean = src.sum(axis=0) / num
  dst_mean = dst.sum(axis=0) / num
  src_c = src - src_mean
  dst_c = dst - dst_mean
  src_var = float((src_c * src_c).sum()) / num
  dst_var = float((dst_c * dst_c).sum()) / num
  for name, pts, var in (("src", src, src_var), ("dst", dst, dst_var)):
    # Relative threshold: spread below float64 noise of the coordinates.
    if math.sqrt(var) <= 1e-9 * max(1.0, float(np.abs(pts).max())):
      raise ValueError(f"{name} points are all coincident; similarity is undefined")

  # In 2-D, Umeyama's rotation-without-reflection solution equals the linear least-squares fit
  # of dst ≈ [[a, -b], [b, a]] src + t (the complex-number regression), which needs no SVD.
  sx, sy = src_c[:, 0], src_c[:, 1]
  dx, dy = dst_c[:, 0], dst_c[:, 1]
  a = float((sx * dx + sy * dy).sum()) / (src_var * num)
  b = float((sx * dy - sy * dx).sum()) / (src_var * num)
  rotation_scale = np.array([[a, -b], [b, a]])
  translation = dst_mean - rotation_scale @ src_mean
  return np.concatenate([rotation_scale, translation[:, None]], axis=1)


def apply_affine(matrix: ArrayLike, points: ArrayLike) -> np.ndarray:
  """Applies a `[2, 3]` affine matrix to points.

  Args:
    matrix: `[2, 3]` affine matrix acting on `(x, y, 1)`.
    points: `[..., 2]` points `(x, y)`.

  Returns:
    float64 `[..., 2]` transformed points.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  points = np.asarray(points, dtype=np.float64)
  if matrix.shape != (2, 3):
    raise ValueError(f"matrix must be [2, 3], got {matrix.shape}")
  if points.shape[-1:] != (2,):
    raise ValueError(f"points must be [..., 2], got {points.shape}")
  return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: ArrayLike) -> np.ndarray:
  """Inverse of a `[2, 3]` affine matrix, as a float64 `[2, 3]` matrix."""
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (2, 3):
    raise ValueError(f"matrix must be [2, 3], got {matrix.shape}")
  linear_inv = np.linalg.inv(matrix[:, :2])
  return np.concatenate([linear_inv, -linear_inv @ matrix[:, 2:]], axis=1)


def warp_affine(
    image: ArrayLike,
    matrix: ArrayLike,
    out_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
    border_value: float = 0,
) -> np.ndarray:
  """Warps an image by an affine map with bilinear interpolation (numpy).

  Output pixel `(x, y)` takes the input sampled at `inverse(matrix) (x, y, 1)`
  in the pixel-centre-at-integer convention, so points mapped by
  `apply_affine(matrix, .)` stay on the same image content. Samples outside
  the input read `border_value` (constant border, like OpenCV's
  `BORDER_CONSTANT`).

  Args:
    image: uint8 `[height, width, channels]` (or `[height, width]`).
    matrix: `[2, 3]` affine matrix from input to output coordinates.
    out_size: `(out_height, out_width)`.
    border_value: value of pixels outside the input.

  Returns:
    uint8 `[out_height, out_width, channels]` (`[out_height, out_width]` for a
    2-D input), rounded to nearest and clipped to `[0, 255]`.
  """
  image = np.asarray(image)
  squeeze = image.ndim == 2
  if squeeze:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"image must be [height, width, channels], got {image.shape}")
  height, width, channels = image.shape
  out_h, out_w = out_size
  inverse = invert_affine(matrix)

  ys, xs = np.meshgrid(np.arange(out_h, dtype=np.float64),
                       np.arange(out_w, dtype=np.float64), indexing="ij")
  src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  x0 = np.floor(src_x)
  y0 = np.floor(src_y)
  fx = (src_x - x0)[..., None]
  fy = (src_y - y0)[..., None]
  # Clip before the cast so huge coordinates cannot overflow int64.
  x0 = np.clip(x0, -2, width + 1).astype(np.int64)
  y0 = np.clip(y0, -2, height + 1).astype(np.int64)

  # Pad by one border pixel on every side: every neighbour outside the input
  # then reads border_value, with neighbours clamped into the padded frame.
  padded = np.full((height + 2, width + 2, channels), border_value, dtype=np.float64)
  padded[1:-1, 1:-1] = image

  def tap(yy, xx):
    return padded[np.clip(yy + 1, 0, height + 1), np.clip(xx + 1, 0, width + 1)]

  out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
         + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
  out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
  return out[..., 0] if squeeze else out


def align_face(
    image: ArrayLike,
    points: ArrayLike,
    size: int = IMAGE_SIZE,
    template: ArrayLike = ARCFACE_TEMPLATE,
) -> tuple[np.ndarray, np.ndarray]:
  """Aligns a face to the ArcFace template (insightface `norm_crop`).

  Args:
    image: uint8 `[height, width, channels]` image containing the face.
    points: `[5, 2]` landmarks of the face in `image`, ArcFace order.
    size: side of the square crop; the template is scaled by `size / 112`.
    template: `[5, 2]` target landmark positions for a 112x112 crop.

  Returns:
    `(crop, aligned_points)`: uint8 `[size, size, channels]` crop and float32
    `[5, 2]` landmarks in crop coordinates.
  """
  points = np.asarray(points, dtype=np.float64)
  _check_points(points)
  target = np.asarray(template, dtype=np.float64) * (size / IMAGE_SIZE)
  matrix = estimate_similarity(points, target)
  crop = warp_affine(image, matrix, out_size=(size, size))
  return crop, apply_affine(matrix, points).astype(np.float32)
