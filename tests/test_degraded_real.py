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
