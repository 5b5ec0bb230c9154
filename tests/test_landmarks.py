"""Tests for vigface_jax.data.landmarks: landmark images, flips, similarity alignment.

The landmark-image tests compare against a deliberately naive renderer written
from the spec (DESIGN.md section 1) with explicit loops over pixels, so a bug
shared by the vectorised numpy and jax versions still fails here.
"""

import math

import jax
import numpy as np
import pytest

from vigface_jax.data import landmarks

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
# ArcFace order: left eye, right eye, nose, left mouth, right mouth.
SPEC_COLOURS = (RED, RED, GREEN, BLUE, BLUE)


def _reference_render(points, size=112):
  """Spec renderer: loops over every pixel and every point, later point wins."""
  image = np.zeros((size, size, 3), dtype=np.uint8)
  for row in range(size):
    for col in range(size):
      for k, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
          continue
        centre_col = math.floor(x + 0.5)
        centre_row = math.floor(y + 0.5)
        if abs(col - centre_col) + abs(row - centre_row) <= 2:
          image[row, col] = SPEC_COLOURS[k]
  return image


def _similarity(angle, scale, tx, ty):
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


# Covers: a half-integer x (10.5 -> column 11), x just below a half (30.49 ->
# 30), a half-integer y, a point partly outside the bottom-left corner, and
# the right mouth corner overlapping the nose (blue must win).
HAND_POINTS = np.array(
    [[10.5, 20.0], [30.49, 20.5], [56.0, 71.7], [1.0, 111.2], [57.4, 73.0]]
)
# A NaN point, points wholly outside, a point whose diamond keeps one pixel
# (x = -2.4 rounds to -2: only column 0 of the centre row is inside), and +inf.
EDGE_POINTS = np.array(
    [[np.nan, 50.0], [-3.0, 50.0], [-2.4, 60.0], [200.0, 10.0], [40.0, np.inf]]
)


def test_constants():
  assert landmarks.IMAGE_SIZE == 112
  assert landmarks.ARCFACE_TEMPLATE.dtype == np.float32
  assert landmarks.ARCFACE_TEMPLATE.shape == (5, 2)
  np.testing.assert_allclose(landmarks.ARCFACE_TEMPLATE[2], [56.0252, 71.7366], atol=1e-4)
  assert landmarks.LANDMARK_COLOURS.dtype == np.uint8
  assert [tuple(c) for c in landmarks.LANDMARK_COLOURS.tolist()] == list(SPEC_COLOURS)
  assert landmarks.FLIP_PERMUTATION == (1, 0, 2, 4, 3)


@pytest.mark.parametrize("points", [HAND_POINTS, EDGE_POINTS, landmarks.ARCFACE_TEMPLATE],
                         ids=["hand", "edge", "template"])
def test_render_matches_spec_pixel_exactly(points):
  got = landmarks.render_landmark_image(points)
  assert got.dtype == np.uint8 and got.shape == (112, 112, 3)
  np.testing.assert_array_equal(got, _reference_render(np.asarray(points, np.float64).tolist()))


def test_render_edge_points_draw_only_inside_pixels():
  image = landmarks.render_landmark_image(EDGE_POINTS)
  lit = np.argwhere(image.any(axis=-1))
  # Only the x = -2.4 point (the nose) survives, as the single pixel (row 60, column 0).
  np.testing.assert_array_equal(lit, [[60, 0]])
  np.testing.assert_array_equal(image[60, 0], GREEN)


def test_each_interior_diamond_has_13_pixels_of_pure_colour():
  rng = np.random.default_rng(0)
  for k in range(5):
    points = np.full((5, 2), np.nan)
    points[k] = rng.uniform(3, 108, size=2)
    image = landmarks.render_landmark_image(points)
    lit = image.any(axis=-1)
    assert lit.sum() == 13
    np.testing.assert_array_equal(image[lit], np.tile(SPEC_COLOURS[k], (13, 1)))
  # Template points are far apart: 2 red, 1 green, 2 blue diamonds.
  image = landmarks.render_landmark_image(landmarks.ARCFACE_TEMPLATE)
  assert (image == RED).all(-1).sum() == 26
  assert (image == GREEN).all(-1).sum() == 13
  assert (image == BLUE).all(-1).sum() == 26
  assert image.any(-1).sum() == 65


@pytest.mark.parametrize(
    "x, centre_col", [(10.5, 11), (10.49, 10), (10.51, 11), (-0.5, 0), (-0.51, -1), (111.5, 112)]
)
def test_rounding_is_half_up(x, centre_col):
  points = np.full((5, 2), np.nan)
  points[2] = (x, 40.5)  # y = 40.5 -> row 41.
  image = landmarks.render_landmark_image(points)
  cols = np.flatnonzero(image[41].any(-1))
  expected = [c for c in range(centre_col - 2, centre_col + 3) if 0 <= c < 112]
  np.testing.assert_array_equal(cols, expected)
  rows = np.flatnonzero(image[:, min(max(centre_col, 0), 111)].any(-1))
  assert rows.min() >= 39 and rows.max() <= 43


def test_overlap_later_point_wins():
  points = np.array(landmarks.ARCFACE_TEMPLATE, dtype=np.float64)
  points[0] = points[2]  # left eye on the nose: nose (later) wins.
  image = landmarks.render_landmark_image(points)
  nx, ny = np.floor(points[2] + 0.5).astype(int)
  np.testing.assert_array_equal(image[ny, nx], GREEN)
  assert (image == RED).all(-1).sum() == 13
  points[3] = points[2]  # left mouth on the nose too: mouth (later) wins.
  image = landmarks.render_landmark_image(points)
  np.testing.assert_array_equal(image[ny, nx], BLUE)
  assert (image == GREEN).all(-1).sum() == 0


def test_render_batched_shapes_and_size():
  rng = np.random.default_rng(1)
  points = rng.uniform(-4, 116, size=(2, 3, 5, 2))
  images = landmarks.render_landmark_image(points)
  assert images.shape == (2, 3, 112, 112, 3) and images.dtype == np.uint8
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(images[i, j], landmarks.render_landmark_image(points[i, j]))
  np.testing.assert_array_equal(images[1, 2], _reference_render(points[1, 2].tolist()))
  small = landmarks.render_landmark_image(points[0, 0] / 2, size=56)
  assert small.shape == (56, 56, 3)
  np.testing.assert_array_equal(small, _reference_render((points[0, 0] / 2).tolist(), size=56))


def test_render_rejects_wrong_shape():
  with pytest.raises(ValueError):
    landmarks.render_landmark_image(np.zeros((4, 2)))


def test_jnp_render_matches_numpy():
  rng = np.random.default_rng(2)
  points = rng.uniform(-6, 118, size=(100, 5, 2)).astype(np.float32)
  # Half-integer positions, where rounding mode matters.
  points[:30] = np.round(points[:30] * 2) / 2
  # The largest float32 below 0.5 must round down; float32 `v + 0.5` would not.
  points[30, 0] = (np.nextafter(np.float32(0.5), np.float32(0)), 10.0)
  points[30, 1] = (np.nextafter(np.float32(20.5), np.float32(0)), 30.0)
  points[31, 2] = (np.nan, 3.0)
  points[32, 3] = (np.inf, -np.inf)
  points[33, :] = points[33, 0]  # all five points overlap.
  points[34, 4] = (-np.inf, 50.0)
  render = jax.jit(landmarks.render_landmark_image_jnp)
  got = np.asarray(render(points))
  assert got.dtype == np.uint8 and got.shape == (100, 112, 112, 3)
  np.testing.assert_array_equal(got, landmarks.render_landmark_image(points))
  np.testing.assert_array_equal(got[30], _reference_render(points[30].astype(np.float64).tolist()))
  # Centres at columns 0 and 20, not 1 and 21.
  assert got[30, 10, 2].tolist() == list(RED) and got[30, 10, 3].tolist() == [0, 0, 0]
  assert got[30, 30, 22].tolist() == list(RED) and got[30, 30, 23].tolist() == [0, 0, 0]


def test_flip_twice_is_identity():
  rng = np.random.default_rng(3)
  points = rng.uniform(0, 112, size=(4, 5, 2))
  np.testing.assert_allclose(
      landmarks.flip_landmarks(landmarks.flip_landmarks(points)), points, atol=1e-12)
  np.testing.assert_array_equal(landmarks.flip_landmarks(points)[..., 1],
                                points[..., landmarks.FLIP_PERMUTATION, 1])


def test_flip_template_is_nearly_symmetric():
  template = landmarks.ARCFACE_TEMPLATE
  flipped = landmarks.flip_landmarks(template)
  # New left eye is the mirrored old right eye: 111 - 73.5318.
  np.testing.assert_allclose(flipped[0], [111 - 73.5318, 51.5014], atol=1e-4)
  np.testing.assert_allclose(flipped[2], [111 - 56.0252, 71.7366], atol=1e-4)
  # The template is left-right symmetric to within about a pixel, so the
  # flipped template stays ArcFace-ordered and close to the original.
  np.testing.assert_allclose(flipped, template, atol=1.5)
  assert flipped[0, 0] < flipped[1, 0] and flipped[3, 0] < flipped[4, 0]


def test_flip_image_and_landmarks_matches_rendered_flip():
  rng = np.random.default_rng(4)
  points = rng.uniform(-3, 115, size=(20, 5, 2))
  points[0] = landmarks.ARCFACE_TEMPLATE
  # A fractional part of exactly 0.5 rounds up on both sides of the mirror
  # and so is the one case excluded by the convention.
  assert not np.any(np.abs(points[..., 0] % 1 - 0.5) < 1e-9)
  images = landmarks.render_landmark_image(points)
  flipped_images, flipped_points = landmarks.flip_image_and_landmarks(images, points)
  assert flipped_images.shape == images.shape
  np.testing.assert_array_equal(flipped_images, landmarks.render_landmark_image(flipped_points))
  # Pixel column c goes to 111 - c.
  np.testing.assert_array_equal(flipped_images[3, :, 111 - 7], images[3, :, 7])


def test_flip_image_uses_image_width():
  image = np.zeros((10, 30, 1), np.uint8)
  points = np.tile([[4.0, 2.0]], (5, 1))
  _, flipped = landmarks.flip_image_and_landmarks(image, points)
  np.testing.assert_allclose(flipped[:, 0], 25.0)


def test_estimate_similarity_recovers_exact_transform():
  truth = _similarity(0.3, 1.7, 12.0, -5.0)
  src = landmarks.ARCFACE_TEMPLATE.astype(np.float64)
  dst = landmarks.apply_affine(truth, src)
  matrix = landmarks.estimate_similarity(src, dst)
  assert matrix.shape == (2, 3) and matrix.dtype == np.float64
  np.testing.assert_allclose(matrix, truth, atol=1e-6)
  # Two points determine a similarity exactly.
  np.testing.assert_allclose(landmarks.estimate_similarity(src[:2], dst[:2]), truth, atol=1e-6)
  # Large rotation (beyond 90 degrees) too.
  truth = _similarity(2.5, 0.4, -30.0, 7.0)
  matrix = landmarks.estimate_similarity(src, landmarks.apply_affine(truth, src))
  np.testing.assert_allclose(matrix, truth, atol=1e-6)


def test_estimate_similarity_is_least_squares_with_noise():
  rng = np.random.default_rng(5)
  truth = _similarity(-0.4, 0.8, 3.0, 9.0)
  src = landmarks.ARCFACE_TEMPLATE.astype(np.float64)
  dst = landmarks.apply_affine(truth, src) + rng.normal(scale=1.5, size=src.shape)
  matrix = landmarks.estimate_similarity(src, dst)
  # A similarity is linear in (a, b, tx, ty) with x' = a x - b y + tx and
  # y' = b x + a y + ty, so ordinary least squares gives the optimum directly.
  x, y = src[:, 0], src[:, 1]
  one, zero = np.ones_like(x), np.zeros_like(x)
  design = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
  (a, b, tx, ty), *_ = np.linalg.lstsq(design, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
  np.testing.assert_allclose(matrix, [[a, -b, tx], [b, a, ty]], atol=1e-9)
  residual = np.sum((landmarks.apply_affine(matrix, src) - dst) ** 2)
  assert residual < np.sum((landmarks.apply_affine(truth, src) - dst) ** 2)
  np.testing.assert_allclose(landmarks.apply_affine(matrix, src),
                             landmarks.apply_affine(truth, src), atol=3.0)


def test_estimate_similarity_never_reflects():
  src = landmarks.ARCFACE_TEMPLATE.astype(np.float64)
  dst = landmarks.flip_landmarks(src)[list(landmarks.FLIP_PERMUTATION)]  # mirror image
  matrix = landmarks.estimate_similarity(src, dst)
  assert np.linalg.det(matrix[:, :2]) > 0
  np.testing.assert_allclose(matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0],
                             (matrix[0, 0] ** 2 + matrix[1, 0] ** 2), rtol=1e-9)


def _with_value(points, index, value):
  points = np.array(points, dtype=np.float64)
  points[index] = value
  return points


_TEMPLATE = landmarks.ARCFACE_TEMPLATE


@pytest.mark.parametrize("src, dst", [
    (np.full((5, 2), 3.0), _TEMPLATE),  # coincident src
    (_TEMPLATE, np.zeros((5, 2))),  # coincident dst
    # Spread at the level of float64 rounding of the coordinates.
    (50.0 + 1e-14 * _TEMPLATE, _TEMPLATE),
    (_with_value(_TEMPLATE, (1, 0), np.nan), _TEMPLATE),
    (_TEMPLATE, _with_value(_TEMPLATE, (3, 1), np.inf)),
    (_TEMPLATE[:1], _TEMPLATE[:1]),  # one point
    (_TEMPLATE, _TEMPLATE[:4]),  # mismatched shapes
    (_TEMPLATE[:, :1], _TEMPLATE[:, :1]),  # not 2-D points
], ids=["src-coincident", "dst-coincident", "src-nearly-coincident", "nan", "inf", "one-point",
        "mismatch", "1d"])
def test_estimate_similarity_rejects_degenerate_input(src, dst):
  with pytest.raises(ValueError):
    landmarks.estimate_similarity(src, dst)


def test_apply_affine_batched():
  matrix = _similarity(0.1, 2.0, 1.0, 2.0)
  points = np.arange(30, dtype=np.float64).reshape(3, 5, 2)
  out = landmarks.apply_affine(matrix, points)
  assert out.shape == (3, 5, 2)
  np.testing.assert_allclose(out[1, 2], matrix[:, :2] @ points[1, 2] + matrix[:, 2])


def test_warp_affine_identity_and_integer_shift():
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
  identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  np.testing.assert_array_equal(landmarks.warp_affine(image, identity, out_size=(20, 30)), image)
  # Output (x, y) reads input (x - 3, y + 2); everything else is the border.
  shift = np.array([[1.0, 0, 3], [0, 1.0, -2]])
  out = landmarks.warp_affine(image, shift, out_size=(20, 30), border_value=7)
  expected = np.full_like(image, 7)
  expected[:18, 3:] = image[2:, :27]
  np.testing.assert_array_equal(out, expected)


def test_warp_affine_bilinear_uses_pixel_centres():
  image = np.zeros((8, 8, 1), np.uint8)
  image[3, 2] = 255
  image[3, 3] = 100
  # Scaling by 2 about the origin: input pixel centre (2, 3) lands on output
  # pixel (4, 6), and output (5, 6) is halfway between input (2, 3) and (3, 3).
  out = landmarks.warp_affine(image, [[2.0, 0, 0], [0, 2.0, 0]], out_size=(16, 16))
  assert out[6, 4, 0] == 255
  assert out[6, 6, 0] == 100
  assert out[6, 5, 0] == 178  # (255 + 100) / 2 = 177.5 rounds to nearest (up).
  assert out[7, 4, 0] == 128  # 127.5 between 255 and 0.
  assert out[5, 5, 0] == 89  # (255 + 100) / 4 = 88.75.
  # Points follow the same convention: the warped point sits on the content.
  np.testing.assert_allclose(landmarks.apply_affine([[2.0, 0, 0], [0, 2.0, 0]], [2.0, 3.0]), [4, 6])
  # Half a pixel beyond the last centre blends with the border.
  shift = np.array([[1.0, 0, -0.5], [0, 1.0, 0]])
  edge = np.full((2, 2, 1), 200, np.uint8)
  out = landmarks.warp_affine(edge, shift, out_size=(2, 2), border_value=0)
  np.testing.assert_array_equal(out[..., 0], [[200, 100], [200, 100]])
  assert landmarks.warp_affine(edge[..., 0], shift, out_size=(2, 2)).shape == (2, 2)


def _smooth_image(size):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  channels = [
      128 + 90 * np.sin(xx / 9.0 + 0.5) * np.cos(yy / 13.0),
      128 + 100 * np.cos((xx + yy) / 17.0),
      128 + 80 * np.sin(yy / 7.0 - xx / 23.0),
  ]
  return np.clip(np.stack(channels, -1), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("size", [112, 224])
def test_align_face_undoes_a_known_similarity(size):
  aligned = _smooth_image(size)
  template = landmarks.ARCFACE_TEMPLATE * (size / 112)
  # Place the aligned face rotated and scaled inside a larger photo.
  scale, angle = 1.4, 0.35
  rotation = _similarity(angle, scale, 0.0, 0.0)[:, :2]
  centre = np.array([(size - 1) / 2] * 2)
  photo_size = int(size * 2.2)
  translation = np.array([photo_size / 2 - 3.0, photo_size / 2 + 5.0]) - rotation @ centre
  to_photo = np.concatenate([rotation, translation[:, None]], 1)
  photo = landmarks.warp_affine(aligned, to_photo, out_size=(photo_size, photo_size))
  photo_points = landmarks.apply_affine(to_photo, template)

  crop, crop_points = landmarks.align_face(photo, photo_points, size=size)
  assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
  assert crop_points.dtype == np.float32 and crop_points.shape == (5, 2)
  np.testing.assert_allclose(crop_points, template, atol=1e-3)
  # Two bilinear resamplings of a smooth image: small errors only.
  interior = slice(4, size - 4)
  diff = np.abs(crop[interior, interior].astype(int) - aligned[interior, interior].astype(int))
  assert diff.mean() < 1.0 and diff.max() <= 6
  # A wrong convention (e.g. half-pixel offset) would shift the content.
  shifted = np.abs(
      crop[interior, 5:size - 3].astype(int) - aligned[interior, 4:size - 4].astype(int))
  assert shifted.mean() > 2 * diff.mean()


def test_align_face_landmark_image_round_trip():
  # The aligned points of a face align to the template; rendering them gives
  # the template's landmark image.
  truth = _similarity(-0.2, 0.9, 40.0, 25.0)
  photo = np.zeros((200, 200, 3), np.uint8)
  points = landmarks.apply_affine(truth, landmarks.ARCFACE_TEMPLATE)
  _, crop_points = landmarks.align_face(photo, points)
  np.testing.assert_array_equal(landmarks.render_landmark_image(crop_points),
                                landmarks.render_landmark_image(landmarks.ARCFACE_TEMPLATE))
