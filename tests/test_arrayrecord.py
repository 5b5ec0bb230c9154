"""ArrayRecord conversion: shards + TFDS metadata read back by grain and by tfds.data_source."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from vigface_jax import convert
from vigface_jax.data import arrayrecord
from vigface_jax.data import faces
from vigface_jax.data import pipeline


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = tmp_path_factory.mktemp("ar") / "vigface_faces" / "1.0.0"
  summary = convert.convert_arrayrecord("procedural:ids=4,images=3,seed=5", str(out), shards=2,
                                        encoding_format="png")
  return out, summary


def test_conversion_writes_complete_shards_and_metadata(converted):
  out, summary = converted
  assert summary["num_examples"] == 12 and summary["num_shards"] == 2
  assert summary["with_landmarks"] == 12
  names = sorted(os.listdir(out))
  assert names == ["dataset_info.json", "features.json",
                   "vigface_faces-train.array_record-00000-of-00002",
                   "vigface_faces-train.array_record-00001-of-00002"]
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["splits"][0]["shardLengths"] == ["6", "6"]


def test_grain_source_equals_the_original(converted):
  out, _ = converted
  source = arrayrecord.ArrayRecordSource(out, decode=True)
  original = faces.ProceduralFaceSource(seed=5, num_identities=4, images_per_identity=3)
  assert len(source) == 12 and source.num_classes == 4
  for i in (0, 7, 11):
    got, want = source[i], original[i]
    np.testing.assert_array_equal(got["image"], want["image"])  # PNG: lossless
    np.testing.assert_array_equal(got["landmarks"], want["landmarks"])
    assert got["label"] == want["label"] and got["has_landmarks"]


def test_tfds_data_source_reads_the_same(converted):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out, _ = converted
  ds = tfds.data_source("vigface_faces", data_dir=str(out.parents[1]), split="train")
  original = faces.ProceduralFaceSource(seed=5, num_identities=4, images_per_identity=3)
  assert len(ds) == 12
  element = ds[4]
  np.testing.assert_array_equal(element["image"], original[4]["image"])
  assert element["label"] == original[4]["label"]
  np.testing.assert_allclose(element["landmarks"], original[4]["landmarks"])


def test_pipeline_reads_converted_data(converted):
  out, _ = converted
  from vigface_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"data": config_lib.data_config(
      source="arrayrecord", path=str(out), global_batch_size=4, seed=0, num_epochs=1)})
  import jax  # pylint: disable=g-import-not-at-top
  from vigface_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh(("data",), (-1,), devices=jax.devices()[:1])
  batches = list(pipeline.make_pipeline(config, mesh))
  assert len(batches) == 3
  labels = np.sort(np.concatenate([np.asarray(b["label"]) for b in batches]))
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  assert batches[0]["image"].shape == (4, 112, 112, 3)


def test_interrupted_conversion_is_detected(converted, tmp_path):
  out, _ = converted
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "vigface_faces-train.array_record-00001-of-00002").write_bytes(
      (out / "vigface_faces-train.array_record-00001-of-00002").read_bytes())
  with pytest.raises(ValueError, match="incomplete 'train' shards"):
    arrayrecord.ArrayRecordSource(broken)
  with pytest.raises(FileNotFoundError, match="no 'train' ArrayRecord shards"):
    arrayrecord.ArrayRecordSource(tmp_path)


def test_bad_labels_and_names_are_refused(tmp_path):
  element = {"image": np.zeros((112, 112, 3), np.uint8), "label": 9, "key": "x/1.jpg"}
  with pytest.raises(ValueError, match=r"'x/1.jpg'.*label 9 outside \[0, 3\)"):
    arrayrecord.write_arrayrecord([element], tmp_path / "a", num_examples=1, num_classes=3)
  assert not list((tmp_path / "a").glob("*array_record*"))  # nothing half-written
  with pytest.raises(ValueError, match="dataset name"):
    arrayrecord.write_arrayrecord([element], tmp_path / "b", num_examples=1, num_classes=10,
                                  name="Bad-Name")


def test_command_line(tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "vigface_jax.convert", "arrayrecord",
       "--src=procedural:ids=2,images=2", f"--out={out}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert len(arrayrecord.ArrayRecordSource(out)) == 4
  proc = subprocess.run(
      [sys.executable, "-m", "vigface_jax.convert", "arrayrecord", "--src=/nonexistent.txt",
       f"--out={out}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "neither a .rec file" in proc.stderr


def test_image_folder_with_landmark_file_converts_with_its_landmarks(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
  src = tmp_path / "folder"
  rendered = {}
  for ident in ("bob", "alice"):
    (src / ident).mkdir(parents=True)
    for j in range(2):
      image, points = faces.render_face(1, len(rendered), j)
      Image.fromarray(image).save(src / ident / f"{j}.png")
      rendered[f"{ident}/{j}.png"] = (image, points)
  marked = {k: v[1] for k, v in rendered.items() if k != "bob/1.png"}
  landmark_files.write_landmarks(tmp_path / "lmk.txt", marked)
  out = tmp_path / "ar"
  convert.convert_arrayrecord(str(src), str(out), landmarks=str(tmp_path / "lmk.txt"))
  source = arrayrecord.ArrayRecordSource(out)
  assert len(source) == 4 and source.num_classes == 2
  # Sorted folders: alice = 0, bob = 1; files sorted inside.
  keys = ["alice/0.png", "alice/1.png", "bob/0.png", "bob/1.png"]
  for i, key in enumerate(keys):
    element = pipeline.Decode().map(source[i])
    assert element["label"] == (0 if key.startswith("alice") else 1)
    np.testing.assert_array_equal(element["image"], rendered[key][0])  # PNG bytes kept as is
    if key in marked:
      assert element["has_landmarks"]
      np.testing.assert_array_equal(element["landmarks"], marked[key])
    else:
      assert not element["has_landmarks"]


def test_mxnet_recordio_pack_converts_without_reencoding(shared_testdata, tmp_path):
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  rec = shared_testdata / "mxnet" / "insightface.rec"
  expected = np.load(shared_testdata / "mxnet" / "expected.npz")
  out = tmp_path / "ar"
  summary = convert.convert_arrayrecord(str(rec), str(out))
  source = arrayrecord.ArrayRecordSource(out)
  original = recordio.RecordIOSource(rec, decode=False)
  assert summary["num_examples"] == len(source) == len(expected["labels"])
  assert source.num_classes == original.num_classes
  for i in range(len(source)):
    element = source[i]
    assert element["image_bytes"] == original[i]["image_bytes"]  # stored bytes, not re-encoded
    np.testing.assert_array_equal(pipeline.Decode().map(element)["image"], expected["images"][i])
    assert element["label"] == expected["labels"][i]


def test_remote_output_is_staged_locally_then_uploaded(monkeypatch, tmp_path):
  # gs:// cannot be reached here; treating a local directory as remote runs the same code path
  # (ArrayRecord shards written to a local staging file, then copied through etils.epath).
  monkeypatch.setattr(arrayrecord, "_is_local", lambda path: False)
  out = tmp_path / "remote"
  convert.convert_arrayrecord("procedural:ids=2,images=2", str(out), shards=2)
  assert not list(out.glob(".*.tmp"))
  source = arrayrecord.ArrayRecordSource(out, decode=True)
  original = faces.ProceduralFaceSource(seed=0, num_identities=2, images_per_identity=2)
  assert len(source) == 4
  assert np.abs(source[3]["image"].astype(int) - original[3]["image"]).mean() < 3  # JPEG


def test_serialised_examples_do_not_depend_on_the_process_hash_seed():
  # The features map's order would follow each process's hash seed: an export rerun in a new
  # process would then write other bytes for the same dataset (and other manifest checksums).
  script = ("import hashlib, numpy as np; from vigface_jax.data import arrayrecord; "
            "print(hashlib.sha256(arrayrecord.serialize({'image_bytes': b'face', 'label': 7, "
            "'landmarks': np.arange(10, dtype=np.float32), 'has_landmarks': True})).hexdigest())")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digests = set()
  for seed in ("1", "2", "3", "4"):
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
    digests.add(subprocess.run([sys.executable, "-c", script], env=env, cwd=root, check=True,
                               capture_output=True, text=True).stdout.strip())
  assert len(digests) == 1, digests
