"""benchmarks/degraded_real.py writes the quality task's real people, blurred or clean."""

import numpy as np
from PIL import Image

from benchmarks import degraded_real
from vigface_jax.data import faces


def test_blur_degrades_and_zero_keeps_the_real_faces(tmp_path):
  degraded_real.write_folder(str(tmp_path / "clean"), 0.0, 2, 2)
  degraded_real.write_folder(str(tmp_path / "blur"), 1.5, 2, 2)
  real, _ = faces.render_face(0, 1, 1)
  clean = np.asarray(Image.open(tmp_path / "clean" / "0001" / "001.png"))
  blur = np.asarray(Image.open(tmp_path / "blur" / "0001" / "001.png"))
  np.testing.assert_array_equal(clean, real)  # the control: exactly the training faces
  assert blur.shape == real.shape and blur.dtype == np.uint8
  # Blur removes fine detail: far less high-frequency energy than the real face.
  hf = lambda x: np.abs(np.diff(x.astype(np.float32), axis=1)).mean()
  assert hf(blur) < 0.6 * hf(real)  # 0.53 measured; the clean copy is 1.0
  assert sorted(p.name for p in (tmp_path / "blur").iterdir()) == ["0000", "0001"]


def test_pose_scale_and_occluders_change_only_what_they_say(tmp_path):
  degraded_real.write_folder(str(tmp_path / "same"), 0.0, 3, 4, pose_scale=1.0, occluders=True)
  degraded_real.write_folder(str(tmp_path / "flat"), 0.0, 3, 4, pose_scale=0.0)
  degraded_real.write_folder(str(tmp_path / "bare"), 0.0, 3, 4, occluders=False)
  load = lambda d, i, j: np.asarray(Image.open(tmp_path / d / f"{i:04d}" / f"{j:03d}.png"))
  pose = lambda i, j: max(abs(faces.nuisance(0, i, j)[a]) for a in ("yaw", "pitch", "roll"))
  occluded = lambda i, j: any(faces.nuisance(0, i, j)[k] for k in degraded_real._OCCLUDERS)
  for i in range(3):
    for j in range(4):
      np.testing.assert_array_equal(load("same", i, j), faces.render_face(0, i, j)[0])
      assert (pose(i, j) > 1) == bool(np.any(load("flat", i, j) != load("same", i, j)))
      assert occluded(i, j) == bool(np.any(load("bare", i, j) != load("same", i, j)))
  assert any(occluded(i, j) for i in range(3) for j in range(4))  # the case is exercised


def test_plain_background_changes_the_background_only(tmp_path):
  degraded_real.write_folder(str(tmp_path / "plain"), 0.0, 3, 4, background=False)
  load = lambda i, j: np.asarray(Image.open(tmp_path / "plain" / f"{i:04d}" / f"{j:03d}.png"))
  for i in range(3):
    for j in range(4):
      real, plain = faces.render_face(0, i, j)[0], load(i, j)
      np.testing.assert_array_equal(plain[46:66, 46:66], real[46:66, 46:66])  # the face itself
      assert np.any(plain != real)  # every image has texture (bg_tex > 0) or clutter to lose
      if faces.nuisance(0, i, j)["clutter"]:  # a clutter shape gone is a large patch changed
        assert np.mean(np.any(plain != real, axis=-1)) > 0.05
