"""The host-side measures of generated faces (`vigface_jax/evaluate/generation.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from vigface_jax.evaluate import generation


def test_estimate_shift_recovers_translations():
  rng = np.random.default_rng(0)
  # Smooth random images (a face-like spectrum), moved by known offsets with edge padding.
  noise = rng.normal(size=(3, 128, 128, 3)).astype(np.float32)
  kernel = np.exp(-0.5 * (np.arange(-8, 9) / 3.0) ** 2)
  smooth = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), 1, noise)
  smooth = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), 2, smooth)[:, 8:120, 8:120]
  offsets = np.array([[5, -3], [-8, 0], [0, 7]])
  padded = np.pad(smooth, ((0, 0), (8, 8), (8, 8), (0, 0)), mode="edge")
  moved = np.stack([p[8 - dy:120 - dy, 8 - dx:120 - dx] for p, (dx, dy) in zip(padded, offsets)])
  np.testing.assert_allclose(generation.estimate_shift(smooth, moved), offsets, atol=0.35)
  np.testing.assert_allclose(generation.estimate_shift(moved, smooth), -offsets, atol=0.35)
  np.testing.assert_allclose(generation.estimate_shift(smooth, smooth), 0.0, atol=1e-6)


def test_fixed_landmarks_spread_over_poses():
  from vigface_jax.data import landmarks as landmarks_lib  # pylint: disable=import-outside-toplevel
  template = np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)
  # 40 near-frontal faces, two far poses (nose left / right) and one image without landmarks.
  rng = np.random.default_rng(0)
  source = [{"landmarks": template + rng.normal(0, 0.5, template.shape).astype(np.float32),
             "has_landmarks": True} for _ in range(40)]
  left, right = template.copy(), template.copy()
  left[2, 0] -= 15
  right[2, 0] += 15
  source += [{"landmarks": left, "has_landmarks": True},
             {"landmarks": right, "has_landmarks": True},
             {"landmarks": template + 40, "has_landmarks": False}]
  points = generation.fixed_landmarks(source, 3, seed=0)
  assert points.shape == (3, 5, 2)
  assert np.abs(points[0] - template).max() < 2.5  # the typical pose first
  extremes = sorted(float(p[2, 0] - template[2, 0]) for p in points[1:])
  np.testing.assert_allclose(extremes, [-15.0, 15.0])  # then the farthest poses
  assert not np.any(points > 100)  # the image without landmarks is never used
  np.testing.assert_array_equal(points, generation.fixed_landmarks(source, 3, seed=0))
  # More columns than candidates repeat the typical pose; no landmarks at all: the template.
  np.testing.assert_array_equal(generation.fixed_landmarks(source[40:42], 4, seed=1)[2:], [
      generation.fixed_landmarks(source[40:42], 4, seed=1)[0]] * 2)
  np.testing.assert_array_equal(generation.fixed_landmarks(source[42:], 2, seed=0),
                                np.stack([template] * 2))


def test_pose_probe_reads_the_turn_of_procedural_faces():
  from vigface_jax.data import faces  # pylint: disable=import-outside-toplevel
  source = faces.ProceduralFaceSource(seed=0, num_identities=100, images_per_identity=4)
  found = generation.with_landmarks(source, 400, seed=1)
  images = np.stack([e["image"] for e in found])
  points = np.stack([e["landmarks"] for e in found])
  probe = generation.PoseProbe(images, points)
  assert probe.r2 > 0.5  # 0.68 measured
  # Mirror images read as the opposite turn, exactly, whatever the weights.
  np.testing.assert_allclose(probe(images[:, :, ::-1]), -probe(images), atol=1e-9)
  # Unseen identities rendered turned 35° each way: read in the landmarks' order.
  pairs = [[faces.render_face(7, 1000 + i, 0, yaw=y) for y in (-35.0, 35.0)] for i in range(12)]
  img = np.array([[a for a, _ in p] for p in pairs])
  pts = np.array([[b for _, b in p] for p in pairs])
  landmark_turn = generation.yaw_proxy(pts[:, 1]) - generation.yaw_proxy(pts[:, 0])
  read_turn = probe(img[:, 1]) - probe(img[:, 0])
  assert np.all(np.abs(landmark_turn) > 0.3)
  assert np.mean(np.sign(read_turn) == np.sign(landmark_turn)) >= 0.9  # 1.0 measured
  # The evaluator's figures: faces that turn like the real ones score 1, faces that ignore the
  # landmark sets 0 (and no pair in order).
  gap = float(np.mean(probe(img[:, 1])) - np.mean(probe(img[:, 0])))
  real = generation.pose_scores(probe, img[:, 0], img[:, 1], gap)
  assert real["pose_follow"] == pytest.approx(1.0) and real["pose_agree"] >= 0.9
  assert real["pose_probe_r2"] == probe.r2
  still = generation.pose_scores(probe, img[:, 0], img[:, 0], gap)
  assert still["pose_follow"] == 0.0 and still["pose_agree"] == 0.0
  swapped = generation.pose_scores(probe, img[:, 1], img[:, 0], gap)
  assert swapped["pose_follow"] == pytest.approx(-1.0)
  assert np.isnan(generation.pose_scores(probe, img[:, 0], img[:, 1], 0.0)["pose_follow"])


def test_yaw_proxy_is_zero_for_the_template_and_flips_sign():
  from vigface_jax.data import landmarks as landmarks_lib  # pylint: disable=import-outside-toplevel
  template = np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float64)
  turned = template.copy()
  turned[2, 0] += 7.0
  got = generation.yaw_proxy(np.stack([template, turned]))
  assert abs(got[0]) < 0.01 and got[1] == pytest.approx(got[0] + 7.0 / (73.5318 - 38.2946))
  mirrored = turned[[1, 0, 2, 4, 3]] * [-1, 1] + [111, 0]  # flip x, swap left and right
  assert generation.yaw_proxy(mirrored[None])[0] == pytest.approx(-got[1])


def test_identity_consistency():
  rows = np.eye(4, 8, dtype=np.float32)
  emb = rows[[0, 1, 3, 3]] * 5.0
  out = generation.identity_consistency(emb, rows, np.arange(4))
  assert out["top1"] == 0.75 and out["chance"] == 0.25
  assert out["mean_cos_to_row"] == pytest.approx(0.75)
