"""Tests for `vigface_jax.evaluate.verification`: safe `.bin` reading, writing, the metric."""

import io
import json
import os
import pickle
import pickletools

import numpy as np
from PIL import Image
import pytest

from vigface_jax.data import codec
from vigface_jax.evaluate import verification as ver

# ---------------------------------------------------------------------------------------------
# Helpers.


def _smooth_images(n, seed=0):
  """uint8 `[n, 112, 112, 3]` smooth colour gradients (JPEG-friendly, all distinct)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:112, 0:112].astype(np.float32) / 111.0
  out = np.empty((n, 112, 112, 3), np.uint8)
  for i in range(n):
    a, b, c = rng.uniform(20, 235, size=(3, 3))
    out[i] = np.clip(a + (b - a) * xx[..., None] * 0.5 + (c - a) * yy[..., None] * 0.5, 0,
                     255).astype(np.uint8)
  return out


def _pairs_from_distances(dists, scales=(1.0, 1.0)):
  """float64 `[2N, 2]` embeddings whose pair i has squared L2 distance dists[i] once normalised.

  Both rows lie on the unit circle (then are scaled, which normalisation undoes): (1, 0) and
  (cos t, sin t) with cos t = 1 - d / 2, so |e1 - e2|^2 = 2 - 2 cos t = d.
  """
  dists = np.asarray(dists, np.float64)
  cos = 1.0 - dists / 2.0
  emb = np.zeros((2 * len(dists), 2))
  emb[0::2, 0] = scales[0]
  emb[1::2, 0] = scales[1] * cos
  emb[1::2, 1] = scales[1] * np.sqrt(1.0 - cos ** 2)
  return emb


def _reference_evaluate(embeddings, issame, nrof_folds=10, far_target=1e-3):
  """insightface's `verification.evaluate`, written out with plain loops, sharing no code.

  Folds come from `np.array_split` (the same partition as sklearn's KFold without shuffle),
  rates from per-threshold boolean sums, and the slinear interpolation is written out as the
  line through the last point with far <= target and the next one (what scipy <= 1.8 did).
  """
  emb = np.asarray(embeddings, np.float64)
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  actual = np.asarray(issame, bool)
  dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
  n = len(actual)
  tests = np.array_split(np.arange(n), nrof_folds)
  folds = [(np.setdiff1d(np.arange(n), t), t) for t in tests]

  def acc_at(t, d, a):
    p = d < t
    tp, fp = np.sum(p & a), np.sum(p & ~a)
    tn, fn = np.sum(~p & ~a), np.sum(~p & a)
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / d.size

  thresholds = np.arange(0, 4, 0.01)
  accs, bests, tprs, fprs = [], [], [], []
  for train, test in folds:
    train_acc = [acc_at(t, dist[train], actual[train])[2] for t in thresholds]
    best = thresholds[int(np.argmax(train_acc))]
    rates = [acc_at(t, dist[test], actual[test]) for t in thresholds]
    tprs.append([r[0] for r in rates])
    fprs.append([r[1] for r in rates])
    accs.append(acc_at(best, dist[test], actual[test])[2])
    bests.append(best)

  thresholds = np.arange(0, 4, 0.001)
  vals, fars = [], []
  for train, test in folds:
    d, a = dist[train], actual[train]
    far_train = np.array([np.sum((d < t) & ~a) / np.sum(~a) for t in thresholds])
    if far_train.max() >= far_target:
      j = np.nonzero(far_train <= far_target)[0][-1]
      x0, x1, y0, y1 = far_train[j], far_train[j + 1], thresholds[j], thresholds[j + 1]
      threshold = y0 + (y1 - y0) * (far_target - x0) / (x1 - x0)
    else:
      threshold = 0.0
    p, a = dist[test] < threshold, actual[test]
    vals.append(np.sum(p & a) / np.sum(a))
    fars.append(np.sum(p & ~a) / np.sum(~a))
  return dict(accuracies=accs, best_thresholds=bests, tpr=np.mean(tprs, 0),
              fpr=np.mean(fprs, 0), val=np.mean(vals), val_std=np.std(vals), far=np.mean(fars))


# ---------------------------------------------------------------------------------------------
# load_bin on packs written by real insightface/MXNet tooling.


@pytest.mark.parametrize("name", ["py2.bin", "py3.bin", "ndarray.bin"])
def test_load_bin_matches_expected(shared_testdata, name):
  expected = np.load(shared_testdata / "mxnet" / "bin_expected.npz")
  images, issame = ver.load_bin(shared_testdata / "mxnet" / name)  # os.PathLike
  assert images.dtype == np.uint8 and images.shape == expected["images"].shape
  np.testing.assert_array_equal(images, expected["images"])
  assert issame.dtype == bool
  np.testing.assert_array_equal(issame, expected["issame"])
  # str paths too.
  images2, _ = ver.load_bin(str(shared_testdata / "mxnet" / name))
  np.testing.assert_array_equal(images2, images)


def test_load_bin_py2_file_really_is_python2_format(shared_testdata):
  # Guards the test above: this file must exercise the BINSTRING (Python-2 str) path.
  data = (shared_testdata / "mxnet" / "py2.bin").read_bytes()
  assert "BINSTRING" in {op.name for op, _, _ in pickletools.genops(data)}


# ---------------------------------------------------------------------------------------------
# write_bin round trips and other pickle layouts the reader must accept.


def test_write_load_round_trip_png_exact(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(8, 112, 112, 3), dtype=np.uint8)  # noise: lossless only
  issame = np.array([True, False, False, True])
  path = tmp_path / "pack.bin"
  ver.write_bin(path, images, issame, image_format="png")
  got_images, got_issame = ver.load_bin(path)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_issame, issame)
  # insightface's format exactly: a 2-tuple of a list of bytes and a list of Python bools.
  with open(path, "rb") as f:
    bins, issame_list = pickle.load(f)
  assert isinstance(bins, list) and all(isinstance(b, bytes) for b in bins)
  assert bins[0][:8] == b"\x89PNG\r\n\x1a\n"
  assert issame_list == [True, False, False, True]
  assert all(type(x) is bool for x in issame_list)  # pylint: disable=unidiomatic-typecheck


def test_write_load_round_trip_jpeg_close(tmp_path):
  images = _smooth_images(6)
  path = tmp_path / "pack.bin"
  ver.write_bin(str(path), images, [False, True, True], quality=95)
  with open(path, "rb") as f:
    bins, _ = pickle.load(f)
  assert bins[0][:2] == b"\xff\xd8"  # JPEG SOI
  got, issame = ver.load_bin(path)
  np.testing.assert_array_equal(issame, [False, True, True])
  err = np.abs(got.astype(np.int32) - images.astype(np.int32))
  assert err.mean() < 1.5 and err.max() <= 12


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("layout", ["bytes", "ndarray", "numpy_issame"])
def test_load_bin_accepts_other_pickle_layouts(tmp_path, protocol, layout):
  # Python 3 below protocol 3 pickles bytes via `_codecs.encode`, numpy arrays via
  # `_reconstruct` (protocol <= 4) or `_frombuffer` (5): all must load.
  images = _smooth_images(4, seed=3)
  bins = []
  for image in images:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    bins.append(buf.getvalue())
  issame = [True, False]
  if layout == "ndarray":
    bins = [np.frombuffer(b, np.uint8).copy() for b in bins]
  elif layout == "numpy_issame":
    issame = [np.True_, np.False_]
  path = tmp_path / "pack.bin"
  path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
  got_images, got_issame = ver.load_bin(path)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_issame, [True, False])


def test_write_bin_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "pack.bin"
  ver.write_bin(path, _smooth_images(2), [True], image_format="png")
  before = path.read_bytes()

  def failing_replace(src, dst):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(ver.os, "replace", failing_replace)
  with pytest.raises(OSError, match="simulated"):
    ver.write_bin(path, _smooth_images(4, seed=9), [False, False], image_format="png")
  assert path.read_bytes() == before  # never half-overwritten
  assert sorted(os.listdir(tmp_path)) == ["pack.bin"]  # temp file cleaned up


@pytest.mark.parametrize("images,issame,kwargs,match", [
    (np.zeros((4, 112, 112, 3), np.float32), [True, False], {}, "uint8"),
    (np.zeros((4, 100, 112, 3), np.uint8), [True, False], {}, r"\[4, 100, 112, 3\]"),
    (np.zeros((4, 112, 112, 3), np.uint8), [True], {}, "4 images for 1 pairs"),
    (np.zeros((2, 112, 112, 3), np.uint8), [0.5], {}, "issame"),
    (np.zeros((2, 112, 112, 3), np.uint8), [True], {"image_format": "gif"}, "image_format"),
    (np.zeros((2, 112, 112, 3), np.uint8), [True], {"quality": 0}, "quality"),
])
def test_write_bin_validates(tmp_path, images, issame, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ver.write_bin(tmp_path / "x.bin", images, issame, **kwargs)
  assert not (tmp_path / "x.bin").exists()


# ---------------------------------------------------------------------------------------------
# Safety: malicious or broken files.


class _SystemCall:
  """Unpickling this runs a shell command (the classic pickle exploit)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _NumpyRunstring:
  """A gadget inside numpy's own namespace: `runstring` execs arbitrary code."""

  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    from numpy.testing._private import utils  # pylint: disable=g-import-not-at-top
    return (utils.runstring, (self.code, {}))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
  marker = tmp_path / "pwned"
  # The payload sits after a valid image, so refusal must happen mid-stream, before REDUCE.
  valid = codec.encode_image(_smooth_images(1)[0], "png")
  payload = pickle.dumps(([valid, _SystemCall(f"touch '{marker}'")], [True]),
                         protocol=protocol)
  # The payload is live: an unrestricted pickle.loads would create the marker.
  pickle.loads(payload)
  assert marker.exists()
  marker.unlink()

  path = tmp_path / "evil.bin"
  path.write_bytes(payload)
  with pytest.raises(ver.UnsafePickleError) as info:
    ver.load_bin(path)
  message = str(info.value)
  assert str(path) in message
  assert "system" in message and "not a verification pack" in message
  assert not marker.exists()


def test_numpy_namespace_gadget_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  code = f"open({str(marker)!r}, 'w').close()"
  path = tmp_path / "evil.bin"
  path.write_bytes(pickle.dumps(([_NumpyRunstring(code)], []), protocol=2))
  with pytest.raises(ver.UnsafePickleError, match="numpy.testing._private.utils.runstring"):
    ver.load_bin(path)
  assert not marker.exists()


def test_object_dtype_array_is_refused(tmp_path):
  # Only builtins inside: nothing but the object dtype itself can refuse this.
  path = tmp_path / "obj.bin"
  path.write_bytes(pickle.dumps(([np.array([b"a", 1], dtype=object)] * 2, [True])))
  with pytest.raises(ver.UnsafePickleError, match="dtype") as info:
    ver.load_bin(path)
  assert str(path) in str(info.value)


class _MutatedDtype:
  """Pickles as a uint8 dtype that `BUILD` then turns into a structured one."""

  def __reduce__(self):
    state = (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)}, 1, 1, 0)
    return (np.dtype, ("u1", False, True), state)


class _ArrayOfMutatedDtype:
  """Pickles as `_frombuffer(b"\\x00", <that dtype>, (1,), "C")`, as numpy's protocol 5 does."""

  def __reduce__(self):
    from numpy._core import numeric  # pylint: disable=g-import-not-at-top
    frombuffer = numeric._frombuffer  # pylint: disable=protected-access
    return (frombuffer, (b"\x00", _MutatedDtype(), (1,), "C"))


def test_dtype_rewritten_after_construction_is_refused(tmp_path):
  # The dtype passes the check when built, then BUILD rewrites it: the check where the array
  # is made must catch it.
  path = tmp_path / "evil.bin"
  path.write_bytes(pickle.dumps(([_ArrayOfMutatedDtype()] * 2, [True]), protocol=5))
  with pytest.raises(ver.UnsafePickleError, match="dtype"):
    ver.load_bin(path)


def test_persistent_id_is_refused(tmp_path):

  class _Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      return "ext" if obj == b"external" else None

  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(([b"external", b"x"], [True]))
  path = tmp_path / "pid.bin"
  path.write_bytes(buf.getvalue())
  with pytest.raises(ver.UnsafePickleError, match="persistent id"):
    ver.load_bin(path)


@pytest.mark.parametrize("keep", [0, 100, 20000])
def test_truncated_file_gives_clear_error(shared_testdata, tmp_path, keep):
  data = (shared_testdata / "mxnet" / "py3.bin").read_bytes()
  path = tmp_path / "cut.bin"
  path.write_bytes(data[:keep])
  with pytest.raises(ValueError, match="truncated or corrupt") as info:
    ver.load_bin(path)
  assert not isinstance(info.value, ver.UnsafePickleError)
  assert str(path) in str(info.value)


def _png(image):
  return codec.encode_image(image, "png")


@pytest.mark.parametrize("obj,match", [
    (([b"a", b"b"], [True], "extra"), "2-tuple"),
    ({"bins": []}, "2-tuple"),
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
    ((b"ab", [True]), "list of encoded images"),
    (([b"a", b"b"], "yes"), "list of bools"),
    (([b"a", b"b"], [2]), "list of bools"),
    (([b"a", 7], [True]), "item 1"),
])
def test_wrong_structure_gives_clear_error(tmp_path, obj, match):
  path = tmp_path / "bad.bin"
  path.write_bytes(pickle.dumps(obj))
  with pytest.raises(ValueError, match=match) as info:
    ver.load_bin(path)
  assert str(path) in str(info.value)


def test_undecodable_and_wrong_size_images(tmp_path):
  good = _png(_smooth_images(1)[0])
  path = tmp_path / "bad.bin"
  path.write_bytes(pickle.dumps(([good, b"definitely not an image"], [True])))
  with pytest.raises(ValueError, match="image 1 .*could not be decoded") as info:
    ver.load_bin(path)
  assert str(path) in str(info.value)

  small = _png(np.zeros((100, 96, 3), np.uint8))
  path.write_bytes(pickle.dumps(([good, good, small, good], [True, False])))
  with pytest.raises(ValueError, match=r"image 2 is 96x100, expected 112x112") as info:
    ver.load_bin(path)
  assert str(path) in str(info.value)

  # A truncated JPEG inside an otherwise valid pickle.
  jpeg = codec.encode_image(_smooth_images(1)[0], "jpeg")
  path.write_bytes(pickle.dumps(([jpeg[: len(jpeg) // 2], good], [True])))
  with pytest.raises(ValueError, match="image 0 .*could not be decoded"):
    ver.load_bin(path)


def test_grayscale_image_is_converted_to_rgb(tmp_path):
  gray = (np.arange(112 * 112) % 251).astype(np.uint8).reshape(112, 112)
  buf = io.BytesIO()
  Image.fromarray(gray, "L").save(buf, format="PNG")
  path = tmp_path / "gray.bin"
  path.write_bytes(pickle.dumps(([buf.getvalue(), buf.getvalue()], [True])))
  images, _ = ver.load_bin(path)
  np.testing.assert_array_equal(images[0], np.repeat(gray[..., None], 3, axis=-1))


# ---------------------------------------------------------------------------------------------
# The metric.


def test_kfold_splits_match_sklearn_partition():
  # sklearn KFold(10, shuffle=False) on 23 samples: sizes 3,3,3,2,...,2, contiguous, in order.
  splits = ver.kfold_splits(23, 10)
  sizes = [len(test) for _, test in splits]
  assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
  np.testing.assert_array_equal(np.concatenate([t for _, t in splits]), np.arange(23))
  np.testing.assert_array_equal(splits[3][1], [9, 10])
  for train, test in splits:
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(23))
    np.testing.assert_array_equal(train, np.sort(train))
  # insightface's LFold: one fold means train on everything and test on everything.
  ((train, test),) = ver.kfold_splits(5, 1)
  np.testing.assert_array_equal(train, np.arange(5))
  np.testing.assert_array_equal(test, np.arange(5))


# Hand-built cases put every distance 0.0045 past a multiple of 0.01: 0.0045 away from the
# accuracy grid (step 0.01) and 0.0005 away from the VAL grid (step 0.001), so rounding in the
# distances can never move a pair across a threshold and the arithmetic below is exact.


def test_perfectly_separable_gives_accuracy_one():
  # 20 pairs alternating same/different; same pairs at squared distance 0.5045, different at
  # 1.5045. Every threshold in (0.5045, 1.5045] is perfect on every training set; the first on
  # the 0.01 grid is 0.51, which is then perfect on every test fold.
  issame = np.array([True, False] * 10)
  emb = _pairs_from_distances(np.where(issame, 0.5045, 1.5045), scales=(3.0, 0.25))
  out = ver.evaluate(emb, issame, nrof_folds=10)
  assert out["accuracies"] == [1.0] * 10
  assert out["accuracy_mean"] == 1.0 and out["accuracy_std"] == 0.0
  np.testing.assert_allclose(out["best_thresholds"], [0.51] * 10)
  # VAL: training FAR is 0 up to the grid point 1.504 and 1 from 1.505, so the threshold is
  # 1.504 + 0.001 * 1e-3 / 1: every same pair accepted, no different one.
  assert out["val"] == 1.0 and out["val_std"] == 0.0 and out["far"] == 0.0
  assert out["num_pairs"] == 20 and out["nrof_folds"] == 10
  # The mean ROC over folds: TPR jumps to 1 at threshold 0.51, FPR at 1.51.
  tpr, fpr = np.array(out["tpr"]), np.array(out["fpr"])
  assert tpr.shape == fpr.shape == (400,)
  assert tpr[50] == 0.0 and tpr[51] == 1.0 and fpr[150] == 0.0 and fpr[151] == 1.0


def test_one_error_gives_exact_mean_and_std():
  # As above, but same pair 0 (in test fold 0) is at 2.0045, beyond every different pair.
  # Fold 0: its training folds are separable -> threshold 0.51; pair 0 is rejected (wrong),
  #   pair 1 (different) rejected (right): accuracy 1/2.
  # Folds 1..9: training holds pair 0. Of the 18 training pairs, t in (0.5045, 1.5045] gets
  #   17 right, t in (1.5045, 2.0045] 8, t > 2.0045 9 -> threshold 0.51; both test pairs right.
  # Accuracies [0.5, 1 x 9]: mean 0.95, std sqrt((0.45^2 + 9 * 0.05^2) / 10) = 0.15.
  issame = np.array([True, False] * 10)
  d = np.where(issame, 0.5045, 1.5045)
  d[0] = 2.0045
  out = ver.evaluate(_pairs_from_distances(d), issame, nrof_folds=10)
  assert out["accuracies"] == [0.5] + [1.0] * 9
  assert out["accuracy_mean"] == pytest.approx(0.95, abs=1e-12)
  assert out["accuracy_std"] == pytest.approx(0.15, abs=1e-12)
  np.testing.assert_allclose(out["best_thresholds"], [0.51] * 10)


def test_two_folds_with_ties_hand_computed():
  # Fold 0 = pairs 0..9, fold 1 = pairs 10..19 (KFold(2) without shuffling). Distances - 0.0045:
  same0, diff0 = [0.2, 0.3, 0.4, 0.9, 1.3], [0.8, 1.0, 1.6, 1.7, 1.8]
  same1, diff1 = [0.25, 0.35, 0.45, 0.55, 1.45], [0.6, 1.1, 1.2, 1.9, 2.5]
  dists = np.array(same0 + diff0 + same1 + diff1) + 0.0045
  issame = np.array(([True] * 5 + [False] * 5) * 2)
  # Shuffle within each fold: fold membership, not position, is what matters.
  order = np.r_[np.random.default_rng(0).permutation(10),
                10 + np.random.default_rng(1).permutation(10)]
  dists, issame = dists[order], issame[order]
  out = ver.evaluate(_pairs_from_distances(dists, scales=(0.5, 7.0)), issame, nrof_folds=2)
  # (Below, distances are written without the 0.0045.)
  # Test fold 0, train on fold 1 (sorted: .25S .35S .45S .55S .6D 1.1D 1.2D 1.45S 1.9D 2.5D):
  #   t in (0.55, 0.6] gets 9/10, the best -> 0.56. On fold 0 at 0.56: same .2 .3 .4 accepted,
  #   .9 1.3 rejected (2 wrong), all different rejected: 8/10.
  # Test fold 1, train on fold 0 (.2S .3S .4S .8D .9S 1.0D 1.3S 1.6D 1.7D 1.8D): 8/10 for t in
  #   (0.4, 0.8], (0.9, 1.0] and (1.3, 1.6]; np.argmax takes the first -> 0.41. On fold 1 at
  #   0.41: same .25 .35 accepted, .45 .55 1.45 rejected (3 wrong), different all rejected: 7/10.
  np.testing.assert_allclose(out["best_thresholds"], [0.56, 0.41])
  assert out["accuracies"] == [0.8, 0.7]
  assert out["accuracy_mean"] == pytest.approx(0.75, abs=1e-12)
  assert out["accuracy_std"] == pytest.approx(0.05, abs=1e-12)
  # VAL@FAR=1e-3: training FAR is 0 below the smallest training different distance and 0.2
  # just above it, so the threshold lands 0.001 * 1e-3 / 0.2 past the last FAR-0 grid point.
  # Testing fold 0 (train fold 1, smallest different .6): t = 0.604005 accepts same .2 .3 .4
  #   (VAL 0.6) and no different pair (FAR 0).
  # Testing fold 1 (train fold 0, smallest different .8): t = 0.804005 accepts same .25 .35
  #   .45 .55 (VAL 0.8) and different .6 (FAR 0.2).
  assert out["val"] == pytest.approx(0.7, abs=1e-12)
  assert out["val_std"] == pytest.approx(0.1, abs=1e-12)
  assert out["far"] == pytest.approx(0.1, abs=1e-12)


def test_identical_pairs_use_strict_less_than():
  # insightface predicts "same" when dist < threshold (strictly): identical embeddings (dist
  # exactly 0) are rejected at threshold 0, so TPR at 0 is 0 and the best threshold is 0.01.
  issame = np.array([True, False] * 5)
  emb = _pairs_from_distances(np.where(issame, 0.0, 1.0045))
  emb[1::2][issame] = emb[0::2][issame]
  out = ver.evaluate(emb, issame, nrof_folds=5)
  assert out["tpr"][0] == 0.0 and out["tpr"][1] == 1.0
  np.testing.assert_allclose(out["best_thresholds"], [0.01] * 5)
  assert out["accuracy_mean"] == 1.0


def test_slinear_interpolation_over_repeated_far_values():
  # FAR repeats (0 over many thresholds); scipy <= 1.8 interpolated between the *last* point of
  # a repeated x and the next larger x, which is what insightface's numbers come from.
  x = np.array([0, 0, 0, 0.1, 0.1, 0.3, 1, 1, 1.0])
  y = np.arange(9) * 0.5
  f = ver._slinear_scipy18  # pylint: disable=protected-access
  assert f(x, y, 0.0) == pytest.approx(1.0)            # last of the three zeros
  assert f(x, y, 0.05) == pytest.approx(1.25)          # between (0, 1.0) and (0.1, 1.5)
  assert f(x, y, 0.2) == pytest.approx(2.25)           # between (0.1, 2.0) and (0.3, 2.5)
  assert f(x, y, 0.65) == pytest.approx(2.5 + 0.5 * 0.5)


@pytest.mark.parametrize("num_pairs,nrof_folds,dtype", [(300, 10, np.float32),
                                                        (303, 10, np.float64),
                                                        (57, 4, np.float32)])
def test_evaluate_matches_loop_reference(num_pairs, nrof_folds, dtype):
  rng = np.random.default_rng(num_pairs)
  same = rng.random(num_pairs) < 0.5
  a = rng.normal(size=(num_pairs, 16))
  b = np.where(same[:, None], a + 0.9 * rng.normal(size=a.shape), rng.normal(size=a.shape))
  emb = np.empty((2 * num_pairs, 16))
  emb[0::2], emb[1::2] = a, b
  emb = (emb * rng.uniform(0.5, 3.0, size=(2 * num_pairs, 1))).astype(dtype)  # unnormalised
  got = ver.evaluate(emb, same, nrof_folds=nrof_folds)
  ref = _reference_evaluate(emb, same, nrof_folds=nrof_folds)
  assert 0.6 < got["accuracy_mean"] < 1.0  # a case with errors, not a trivial one
  np.testing.assert_allclose(got["accuracies"], ref["accuracies"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(got["best_thresholds"], ref["best_thresholds"], rtol=0, atol=0)
  assert got["accuracy_mean"] == pytest.approx(np.mean(ref["accuracies"]), abs=1e-12)
  assert got["accuracy_std"] == pytest.approx(np.std(ref["accuracies"]), abs=1e-12)
  np.testing.assert_allclose(got["tpr"], ref["tpr"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(got["fpr"], ref["fpr"], rtol=0, atol=1e-12)
  assert got["val"] == pytest.approx(ref["val"], abs=1e-12)
  assert got["val_std"] == pytest.approx(ref["val_std"], abs=1e-12)
  assert got["far"] == pytest.approx(ref["far"], abs=1e-12)
  # Normalising first changes nothing: evaluate normalises (idempotently) itself.
  unit = emb / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
  again = ver.evaluate(unit.astype(dtype), same, nrof_folds=nrof_folds)
  assert again["accuracies"] == got["accuracies"] and again["val"] == got["val"]


def test_evaluate_result_is_json_serialisable():
  issame = np.array([True, False] * 10)
  out = ver.evaluate(_pairs_from_distances(np.where(issame, 0.5045, 1.5045)), issame)
  assert json.loads(json.dumps(out))["accuracy_mean"] == 1.0


@pytest.mark.parametrize("emb,issame,kwargs,match", [
    (np.zeros((5, 4)), [True, False], {}, "2 \\* num_pairs"),
    (np.zeros((4,)), [True, False], {}, "2 \\* num_pairs"),
    (np.ones((4, 4)), [True], {}, "issame has 1"),
    (np.full((4, 4), np.nan), [True, False], {}, "not finite"),
    (np.ones((4, 4)), [True, False], {"nrof_folds": 3}, "nrof_folds"),
    (np.ones((4, 4)), [True, False], {"nrof_folds": 2, "far_target": 0.0}, "far_target"),
])
def test_evaluate_validates(emb, issame, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ver.evaluate(emb, np.asarray(issame), **kwargs)


# ---------------------------------------------------------------------------------------------
# Embedding with flips, and the one-call wrapper.


def test_flip_sum_embeddings_sums_image_and_horizontal_flip():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(10, 112, 112, 3), dtype=np.uint8)
  calls = []

  def embed_fn(x):
    calls.append(x.shape)
    x = x.astype(np.float64)
    return np.stack([
        x[:, :, :56].mean((1, 2, 3)) - x[:, :, 56:].mean((1, 2, 3)),  # flips sign
        x[:, :, 0, 0].mean(1),        # left column, red: becomes the right column
        x[:, 0, :, :].mean((1, 2)),   # top row: a vertical flip would change it
        x[..., 2].mean((1, 2)),       # blue only: a channel flip would change it
    ], axis=1)

  out = ver.flip_sum_embeddings(embed_fn, images, batch_size=4)
  x = images.astype(np.float64)
  expected = np.stack([
      np.zeros(10),
      x[:, :, 0, 0].mean(1) + x[:, :, -1, 0].mean(1),
      2 * x[:, 0].mean((1, 2)),
      2 * x[..., 2].mean((1, 2)),
  ], axis=1)
  assert out.dtype == np.float32 and out.shape == (10, 4)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
  # Fixed batch shape (the last batch is padded) so a jitted embed_fn compiles once.
  assert calls == [(4, 112, 112, 3)] * 6


def test_flip_sum_embeddings_validates():
  with pytest.raises(ValueError, match="uint8"):
    ver.flip_sum_embeddings(lambda x: x, np.zeros((2, 112, 112, 3), np.float32))
  with pytest.raises(ValueError, match="embed_fn returned"):
    ver.flip_sum_embeddings(lambda x: np.zeros((1, 8)), np.zeros((2, 112, 112, 3), np.uint8))


def test_verify_end_to_end(tmp_path):
  # Same pairs are two copies of one image, different pairs two unrelated ones; PNG keeps
  # copies identical, so same distances are 0 and a pixel embedding separates perfectly.
  rng = np.random.default_rng(7)
  num_pairs = 20
  # Alternating, so each 2-pair test fold holds both kinds (VAL needs a same pair per fold).
  issame = np.array([True, False] * (num_pairs // 2))
  images = rng.integers(0, 256, size=(2 * num_pairs, 112, 112, 3), dtype=np.uint8)
  images[1::2][issame] = images[0::2][issame]
  path = tmp_path / "mini.bin"
  ver.write_bin(path, images, issame, image_format="png")

  def embed_fn(x):
    x = x.astype(np.float32).reshape(x.shape[0], 14, 8, 14, 8, 3).mean((2, 4))
    return (x - 127.5).reshape(x.shape[0], -1)

  out = ver.verify(embed_fn, path, batch_size=16)
  assert out["accuracy_mean"] == 1.0 and out["num_pairs"] == num_pairs
  assert out["val"] == 1.0
  # Each test fold holds one different pair. The fold holding the overall closest different
  # pair trains on pairs that are all farther apart, so its VAL threshold accepts that pair
  # (FAR 1 there); every other fold's threshold sits just past that closest pair: FAR 0.
  assert out["far"] == pytest.approx(0.1, abs=1e-12)


def test_a_huge_declared_size_allocates_nothing(tmp_path):
  """BINBYTES8 / BINUNICODE8 claiming 8 GiB, then three bytes: an error naming the file, and
  the loader's peak memory stays far below the claim (it reads what the file holds)."""
  import resource  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  for opcode in (b"\x8e", b"\x8d"):  # BINBYTES8, BINUNICODE8
    path = tmp_path / "huge.bin"
    path.write_bytes(b"\x80\x04" + opcode + struct.pack("<Q", 8 << 30) + b"abc")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"huge\.bin: truncated or corrupt"):
      ver.load_bin(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 << 10, grown_kib  # under 256 MiB of the 8 GiB claimed
