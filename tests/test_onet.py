"""Tests for vigface_jax.models.onet: the O-Net port, its weight converter and landmark helpers.

Parity and accuracy use the real O-Net weights that the `facenet-pytorch` package ships
(`facenet_pytorch/data/onet.pt`) and a PyTorch O-Net written here after facenet-pytorch's
`models/mtcnn.py::ONet` (importing `facenet_pytorch` itself would pull torchvision). Those
tests need `pip install torch==2.13.0` and `pip install --no-deps facenet-pytorch==2.6.0` and
are skipped with a reason when either is missing; the rest runs on numpy and JAX alone.
"""

import importlib.util
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata

from vigface_jax.data import landmarks as lm
from vigface_jax.models import onet

from conftest import missing
from conftest import require

# Hand-placed five points of the face in `skimage.data.astronaut()` (512x512), (x, y) with
# pixel centres at integers, ArcFace order: iris centres, nose tip (the lowest point of the
# bulb's highlight), outer corners where the lips meet. Read off 8-10x enlargements with a
# pixel grid; their uncertainty is about 1 px.
ASTRONAUT_POINTS = np.array(
    [[203.5, 100.5], [246.0, 102.5], [222.5, 127.0], [203.5, 139.5], [242.0, 141.0]]
)
# Measured: 2.04 px mean error (1.9-2.3 px with 1.5 px jitter of the alignment points).
ASTRONAUT_MAX_MEAN_ERROR = 3.0


def _onet_pt_path():
  spec = importlib.util.find_spec("facenet_pytorch")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "data", "onet.pt")
  return path if os.path.isfile(path) else None


# CI installs both (.ci/run); there `missing`/`require` fail instead of skipping.
@pytest.fixture(scope="module")
def torch():
  return require("torch", "needed to read facenet-pytorch's onet.pt (pip install torch==2.13.0)")


@pytest.fixture(scope="module")
def onet_pt(torch):
  del torch
  path = _onet_pt_path()
  if path is None:
    missing("facenet_pytorch/data/onet.pt not found "
            "(pip install --no-deps facenet-pytorch==2.6.0)")
  return path


@pytest.fixture(scope="module")
def model(onet_pt):
  return onet.load_facenet_pytorch_onet(onet_pt)


@pytest.fixture(scope="module")
def torch_model(torch, onet_pt):
  """facenet-pytorch's O-Net, rebuilt layer by layer, with onet.pt loaded."""
  nn = torch.nn

  class TorchONet(nn.Module):
    """Copy of `facenet_pytorch.models.mtcnn.ONet` (facenet-pytorch 2.6.0)."""

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
      self.prelu1 = nn.PReLU(32)
      self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
      self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
      self.prelu2 = nn.PReLU(64)
      self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
      self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
      self.prelu3 = nn.PReLU(64)
      self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
      self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
      self.prelu4 = nn.PReLU(128)
      self.dense5 = nn.Linear(1152, 256)
      self.prelu5 = nn.PReLU(256)
      self.dense6_1 = nn.Linear(256, 2)
      self.softmax6_1 = nn.Softmax(dim=1)
      self.dense6_2 = nn.Linear(256, 4)
      self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
      x = self.pool1(self.prelu1(self.conv1(x)))
      x = self.pool2(self.prelu2(self.conv2(x)))
      x = self.pool3(self.prelu3(self.conv3(x)))
      x = self.prelu4(self.conv4(x))
      x = x.permute(0, 3, 2, 1).contiguous()
      x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
      return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

  net = TorchONet()
  net.load_state_dict(torch.load(onet_pt, map_location="cpu", weights_only=True))
  return net.eval()


def _resize_uint8(image):
  """`[h, w, 3]` uint8 -> `[48, 48, 3]` uint8, so both networks see the same pixels."""
  out = np.asarray(onet.resize_to_input(jnp.asarray(image[None])))[0]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _parity_crops():
  """Random noise plus the astronaut's face and jittered crops around it, uint8 [n, 48, 48, 3]."""
  rng = np.random.default_rng(0)
  image = skdata.astronaut()
  crops = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
  crops.append(_resize_uint8(image[60:170, 170:280]))
  for _ in range(5):
    top, left = rng.integers(45, 76), rng.integers(155, 186)
    side = int(rng.integers(90, 131))
    crops.append(_resize_uint8(image[top:top + side, left:left + side]))
  return np.stack(crops)


def _random_state_dict(seed=0):
  return onet.state_dict(onet.ONet(rngs=nnx.Rngs(seed)))


# --- No torch needed ----------------------------------------------------------------------


def test_shapes_and_dtypes():
  for dtype in (jnp.float32, jnp.bfloat16):
    net = onet.ONet(dtype=dtype, rngs=nnx.Rngs(0))
    box, points, prob = net(jnp.zeros((2, 48, 48, 3)))
    assert box.shape == (2, 4) and points.shape == (2, 10) and prob.shape == (2, 2)
    assert box.dtype == points.dtype == prob.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(prob).sum(-1), 1.0, rtol=1e-6)
    for param in jax.tree.leaves(nnx.state(net, nnx.Param)):
      assert param.dtype == jnp.float32
  with pytest.raises(ValueError, match="48, 48, 3"):
    net(jnp.zeros((1, 47, 48, 3)))


def test_max_pool_ceil_sizes():
  # The O-Net pools: 46 -> 23 (3/2), 21 -> 10 (3/2), 8 -> 4 (2/2); ragged windows see -inf.
  x = -jnp.arange(46.0)[None, :, None, None] * jnp.ones((1, 1, 46, 1))
  out = onet.max_pool_ceil(x, 3, 2)
  assert out.shape == (1, 23, 23, 1)
  assert float(out[0, -1, 0, 0]) == -44.0  # last window covers rows 44, 45 only
  assert onet.max_pool_ceil(jnp.zeros((1, 21, 21, 1)), 3, 2).shape == (1, 10, 10, 1)
  assert onet.max_pool_ceil(jnp.zeros((1, 8, 8, 1)), 2, 2).shape == (1, 4, 4, 1)


def test_npz_round_trip_is_exact(tmp_path, monkeypatch):
  source = onet.ONet(rngs=nnx.Rngs(3))
  path = tmp_path / "onet.npz"
  onet.save_npz(source, path)

  def no_torch(path):
    raise AssertionError(f"torch code path used for {path}")

  monkeypatch.setattr(onet, "_read_torch_state_dict", no_torch)
  monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
  loaded = onet.load_facenet_pytorch_onet(path)
  crops = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
  for a, b in zip(source(onet.normalize(crops)), loaded(onet.normalize(crops))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(onet.predict_landmarks(source, crops),
                                onet.predict_landmarks(loaded, crops))


def test_pt_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="convert_onet"):
    onet.load_facenet_pytorch_onet(tmp_path / "onet.pt")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("prelu3.weight"), r"missing key.*prelu3\.weight"),
        (lambda sd: sd.update({"dense5.weight": np.zeros((256, 1024), np.float32)}),
         r"'dense5\.weight' has shape \(256, 1024\), expected \(256, 1152\)"),
        (lambda sd: sd.update({"dense7.bias": np.zeros((3,), np.float32)}),
         r"unexpected key.*dense7\.bias"),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_npz_mismatch_names_the_key(tmp_path, edit, message):
  state = _random_state_dict()
  edit(state)
  path = tmp_path / "bad.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match=message):
    onet.load_facenet_pytorch_onet(path)


def test_aligned_box_padding_matches_manual_crop():
  net = onet.ONet(rngs=nnx.Rngs(0))
  images = np.random.default_rng(2).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
  x0, y0, side = onet.ALIGNED_FACE_BOX
  np.testing.assert_allclose(
      onet.landmarks_for_aligned_faces(net, images),
      onet.predict_landmarks(net, images[:, y0:y0 + side, x0:x0 + side]) + [x0, y0],
      atol=1e-4,
  )
  # A box reaching past the image reads black there.
  padded = np.pad(images, ((0, 0), (10, 0), (0, 10), (0, 0)))
  np.testing.assert_allclose(
      onet.landmarks_for_aligned_faces(net, images, box=(4, -10, 112)),
      onet.predict_landmarks(net, padded[:, :112, 4:116]) + [4, -10],
      atol=1e-4,
  )


# --- Real weights (torch and facenet-pytorch) ---------------------------------------------


def test_parity_with_pytorch(torch, torch_model, model):
  crops = _parity_crops()
  with torch.no_grad():
    x = torch.from_numpy(np.array(onet.normalize(crops))).permute(0, 3, 1, 2)
    box_t, points_t, prob_t = (t.numpy() for t in torch_model(x))
  box_j, points_j, prob_j = (np.asarray(t) for t in model(onet.normalize(crops)))
  np.testing.assert_allclose(box_j, box_t, atol=1e-4)
  np.testing.assert_allclose(prob_j, prob_t, atol=1e-4)
  # Landmarks in 48-px crop pixels, through the public helper.
  expected = np.stack([points_t[:, :5], points_t[:, 5:]], axis=-1) * 48
  points, prob = onet.predict_landmarks(model, crops, return_prob=True)
  assert np.abs(points - expected).max() < 0.05
  np.testing.assert_allclose(prob, prob_t[:, 1], atol=1e-4)
  # The sanity of the weights themselves: noise is no face, the real crops are.
  assert (prob[:3] < 0.05).all() and (prob[3:] > 0.9).all()


def test_pt_mismatch_names_the_key(torch, onet_pt, tmp_path):
  state = torch.load(onet_pt, map_location="cpu", weights_only=True)
  missing = dict(state)
  del missing["dense6_3.bias"]
  torch.save(missing, tmp_path / "missing.pt")
  with pytest.raises(ValueError, match=r"dense6_3\.bias"):
    onet.load_facenet_pytorch_onet(tmp_path / "missing.pt")
  wrong = dict(state)
  wrong["conv2.weight"] = state["conv2.weight"][:, :16]
  torch.save(wrong, tmp_path / "wrong.pt")
  with pytest.raises(ValueError, match=r"'conv2\.weight' has shape \(64, 16, 3, 3\), expected"):
    onet.load_facenet_pytorch_onet(tmp_path / "wrong.pt")


def test_convert_then_npz_matches_pt(onet_pt, model, tmp_path):
  onet.convert_onet(onet_pt, tmp_path / "onet.npz")
  converted = onet.load_facenet_pytorch_onet(tmp_path / "onet.npz")
  crops = _parity_crops()
  np.testing.assert_array_equal(onet.predict_landmarks(converted, crops),
                                onet.predict_landmarks(model, crops))


def test_astronaut_accuracy(model):
  aligned, reference = lm.align_face(skdata.astronaut(), ASTRONAUT_POINTS)
  points, prob = onet.landmarks_for_aligned_faces(model, aligned[None], return_prob=True)
  error = np.linalg.norm(points[0] - reference, axis=-1)
  assert prob[0] > 0.99
  assert error.mean() < ASTRONAUT_MAX_MEAN_ERROR, error
  assert error.max() < 2 * ASTRONAUT_MAX_MEAN_ERROR, error


# --------------------------------------------------------------------------------------------
# `python -m vigface_jax.landmarks`: extraction over a source, sharded and resumable.


def test_extraction_writes_points_in_source_order_and_resumes(onet_pt, tmp_path):
  from vigface_jax import landmarks as extraction  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top

  src = "procedural:ids=3,images=2,seed=4"
  out = tmp_path / "full.txt"
  extraction.extract(src, str(out), onet_pt, batch_size=4, progress=False)
  got = landmark_files.read_landmarks(out)
  assert list(got) == [str(i) for i in range(6)]
  truth = faces.ProceduralFaceSource(seed=4, num_identities=3, images_per_identity=2)
  errors = [np.linalg.norm(got[str(i)] - truth[i]["landmarks"], axis=-1).mean()
            for i in range(6)]
  # O-Net on procedural faces (yaw up to 60°): ~5.6 px mean error measured; chance is ~30 px.
  assert np.mean(errors) < 9.0, errors
  assert not list(tmp_path.glob("*.part*"))

  # A run killed after one batch, mid-way through writing a line, resumes to the same file.
  resumed = tmp_path / "resumed.txt"
  lines = out.read_text().splitlines()
  (tmp_path / "resumed.txt.part0of1").write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])
  extraction.extract(src, str(resumed), onet_pt, batch_size=4, progress=False)
  assert resumed.read_text() == out.read_text()


def test_extraction_splits_batches_over_devices(onet_pt, tmp_path):
  script = (
      "import sys; from vigface_jax import landmarks as e;"
      "r = e.extract('procedural:ids=2,images=3', sys.argv[1], sys.argv[2], batch_size=3,"
      " progress=False); print('DEVICES', r['devices'], r['batch_size'])")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "two.txt"
  proc = subprocess.run([sys.executable, "-c", script, str(out), onet_pt], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "DEVICES 2 4" in proc.stdout  # batch rounded up to a multiple of the devices
  single = tmp_path / "one.txt"
  from vigface_jax import landmarks as extraction  # pylint: disable=g-import-not-at-top
  extraction.extract("procedural:ids=2,images=3", str(single), onet_pt, batch_size=4,
                     progress=False)
  from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
  a, b = landmark_files.read_landmarks(out), landmark_files.read_landmarks(single)
  assert list(a) == list(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-3)
