"""Tests for vigface_jax.data.pipeline: decoding, flips, determinism, resume.

`TinyFaceSource` is module-level so grain worker processes (spawned, not
forked) can unpickle it; tests/test_parallel.py reuses it in its 8-device
subprocess.
"""

import io

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from vigface_jax import config_lib
from vigface_jax import parallel
from vigface_jax.data import landmarks
from vigface_jax.data import pipeline

_TEMPLATE = np.asarray(landmarks.ARCFACE_TEMPLATE, np.float32)


class TinyFaceSource:
  """Cheap stand-in with the element spec: noise images, jittered landmarks.

  Element `i` depends only on `i`: image from an rng seeded by `i`, label
  `i % num_classes`, landmarks = template + N(0, 1) offsets.
  """

  def __init__(self, num_records: int = 64, num_classes: int = 8):
    self.num_records = num_records
    self.num_classes = num_classes

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng(int(index))
    return {
        "image": rng.integers(0, 256, (112, 112, 3), dtype=np.uint8),
        "label": int(index) % self.num_classes,
        "landmarks": _TEMPLATE + rng.normal(0, 1, (5, 2)).astype(np.float32),
        "has_landmarks": True,
        "key": int(index),
    }

  def __repr__(self) -> str:
    # grain compares repr(source) when restoring an iterator state.
    return (f"TinyFaceSource(num_records={self.num_records}, "
            f"num_classes={self.num_classes})")


def _single_device_mesh():
  return parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 1))


def _take(iterator, n):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _assert_spec(batch, batch_size):
  assert set(batch) == set(pipeline.ELEMENT_SPEC)
  for key, (shape, dtype) in pipeline.ELEMENT_SPEC.items():
    assert batch[key].shape == (batch_size,) + shape, key
    assert batch[key].dtype == dtype, key


def test_same_seed_same_batches_other_seed_differs():
  def batches(seed):
    loader = pipeline.make_loader(
        TinyFaceSource(), global_batch_size=4, seed=seed)
    return _take(iter(loader), 3)

  first, again, other = batches(7), batches(7), batches(8)
  _assert_batches_equal(first, again)
  _assert_spec(first[0], 4)
  assert not all(
      np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_random_flip_mirrors_image_and_swaps_landmarks():
  element = pipeline.Decode().map(TinyFaceSource()[3])
  flipped = pipeline.RandomFlip(1.0).random_map(
      element, np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["image"], element["image"][:, ::-1, :])
  # Mirror x in the 112-pixel frame, then swap eyes and mouth corners.
  expected = element["landmarks"][[1, 0, 2, 4, 3]].copy()
  expected[:, 0] = 111.0 - expected[:, 0]
  np.testing.assert_allclose(flipped["landmarks"], expected, atol=1e-5)
  assert flipped["landmarks"].dtype == np.float32
  # The input element is not modified in place.
  np.testing.assert_array_equal(
      element["image"], pipeline.Decode().map(TinyFaceSource()[3])["image"])

  unflipped = pipeline.RandomFlip(0.0).random_map(
      element, np.random.default_rng(0))
  np.testing.assert_array_equal(unflipped["image"], element["image"])

  no_points = dict(element, has_landmarks=np.bool_(False),
                   landmarks=np.zeros((5, 2), np.float32))
  flipped = pipeline.RandomFlip(1.0).random_map(
      no_points, np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["landmarks"], 0.0)
  with pytest.raises(ValueError, match="flip_prob"):
    pipeline.RandomFlip(1.5)


def test_decode_png_bytes_and_defaults():
  image = TinyFaceSource()[5]["image"]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  out = pipeline.Decode().map(
      {"image_bytes": buffer.getvalue(), "label": np.int64(12), "key": "a/1"})
  np.testing.assert_array_equal(out["image"], image)
  assert out["label"] == 12 and out["label"].dtype == np.int32
  assert not out["has_landmarks"]
  np.testing.assert_array_equal(out["landmarks"], np.zeros((5, 2)))
  assert set(out) == set(pipeline.ELEMENT_SPEC)


def test_decode_errors_name_the_element():
  with pytest.raises(ValueError, match=r"key='rec/17'.*decode"):
    pipeline.Decode().map(
        {"image_bytes": b"\x00garbage-not-an-image", "label": 0,
         "key": "rec/17"})
  with pytest.raises(ValueError, match=r"index=4.*shape \(64, 64, 3\)"):
    pipeline.Decode().map(
        {"image": np.zeros((64, 64, 3), np.uint8), "label": 0, "index": 4})
  with pytest.raises(ValueError, match="uint8"):
    pipeline.Decode().map(
        {"image": np.full((112, 112, 3), 0.5, np.float32), "label": 0})


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_state_continues_exactly(worker_count):
  mesh = _single_device_mesh()

  def make_iterator():
    loader = pipeline.make_loader(
        TinyFaceSource(48), global_batch_size=4, seed=11,
        worker_count=worker_count, worker_buffer_size=1)
    return pipeline.GlobalBatchIterator(loader, mesh)

  iterator = make_iterator()
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)

  iterator.close()
  iterator.close()  # idempotent

  with make_iterator() as resumed:
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)
  with pytest.raises(ValueError):  # closed: grain refuses further batches
    next(resumed)


def test_make_pipeline_from_config(monkeypatch):
  monkeypatch.setitem(
      pipeline.SOURCES, "tiny", lambda data: TinyFaceSource(data.num_records))
  data = config_lib.data_config(source="tiny", global_batch_size=4, seed=1, num_epochs=1)
  data.num_records = 16  # the test source's own field
  config = ml_collections.ConfigDict({"data": data})
  batches = list(pipeline.make_pipeline(config, _single_device_mesh()))
  assert len(batches) == 4  # one epoch of 16 records
  _assert_spec(batches[0], 4)
  assert isinstance(batches[0]["image"], jax.Array)
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  np.testing.assert_array_equal(np.sort(labels), np.sort(np.arange(16) % 8))


def test_build_source_unknown_source():
  config = ml_collections.ConfigDict({"source": "webface42m"})
  with pytest.raises(ValueError, match=r"data\.source='webface42m'.*procedural"):
    pipeline.build_source(config)


def test_procedural_source_through_the_pipeline():
  data = config_lib.data_config(source="procedural", seed=0, num_identities=3,
                                images_per_identity=2)
  source = pipeline.build_source(data)
  assert len(source) == 6
  loader = pipeline.make_loader(source, global_batch_size=2, seed=0)
  batch = next(pipeline.GlobalBatchIterator(loader, _single_device_mesh()))
  batch = jax.tree.map(np.asarray, batch)
  _assert_spec(batch, 2)
  assert batch["has_landmarks"].all()
  assert ((batch["label"] >= 0) & (batch["label"] < 3)).all()
