"""Export of a generation store to ImageFolder, RecordIO and ArrayRecord, read back by readers."""

from __future__ import annotations

import io
import json
import numbers
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from vigface_jax.data import arrayrecord
from vigface_jax.data import imagefolder
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import recordio
from vigface_jax.data import recordio_format
from vigface_jax.generate import export as export_lib
from vigface_jax.generate import store as store_lib

NUM_IDS, PER_ID = 5, 3
SPEC = {"num_ids": NUM_IDS, "images_per_id": PER_ID, "ids_per_shard": 2, "seed": 3}


def _image(rng):
  """A random smooth pattern with a little noise (JPEG-compressible, unlike pure noise)."""
  y, x = np.mgrid[0:112, 0:112] / 112
  channels = [127.5 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)
                                   + rng.uniform(0, 6)) for _ in range(3)]
  noisy = np.stack(channels, -1) + rng.normal(0, 4, (112, 112, 3))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _write_store(workdir):
  store = store_lib.ShardStore(workdir, spec=SPEC, process_index=0, num_processes=1)
  rng = np.random.default_rng(0)
  for s in range(store.num_shards):
    labels = np.repeat(np.array(store.shard_labels(s)), PER_ID)
    n = len(labels)
    points = landmarks_lib.ARCFACE_TEMPLATE[None] + rng.normal(0, 2, (n, 5, 2))
    store.write_shard(
        s, np.stack([_image(rng) for _ in range(n)]), labels=labels,
        indices=np.tile(np.arange(PER_ID), n // PER_ID), rows=labels + 100,
        seeds=np.arange(n) + 1000 * labels, landmarks=points.astype(np.float32),
        extra={"kind": np.where(labels < 3, "virtual", "real")})
  return store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("store")
  _write_store(workdir)
  return workdir


@pytest.fixture
def workdir(pristine, tmp_path):
  """A fresh copy of the store (tests export into it)."""
  shutil.copytree(pristine / "shards", tmp_path / "shards")
  return tmp_path


def _tree(root, skip=("shards",)):
  """{relative path: bytes} of every file under `root` except `skip`."""
  out = {}
  for directory, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(directory, d), root) not in skip]
    for name in files:
      path = os.path.join(directory, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


def _readers(workdir):
  return {
      "imagefolder": imagefolder.ImageFolderSource(
          workdir / "imagefolder", landmarks_file=workdir / "imagefolder" / "landmarks.txt"),
      "recordio": recordio.RecordIOSource(workdir / "recordio" / "train.rec"),
      "arrayrecord": arrayrecord.ArrayRecordSource(workdir / "arrayrecord", decode=True),
  }


def test_every_reader_returns_the_store(workdir):
  result = export_lib.export(workdir, progress=False)
  assert result["num_images"] == 15 and result["num_classes"] == 5 and result["dropped"] == []
  ref = store_lib.StoreSource(workdir)
  for name, reader in _readers(workdir).items():
    assert len(reader) == 15 and reader.num_classes == 5, name
    for i in range(15):
      got, want = reader[i], ref[i]
      assert int(got["label"]) == int(want["label"]), (name, i)
      np.testing.assert_array_equal(got["image"], want["image"], err_msg=f"{name} {i}")
      np.testing.assert_array_equal(got["landmarks"], want["landmarks"], err_msg=f"{name} {i}")
      assert got["has_landmarks"], (name, i)
  folder = _readers(workdir)["imagefolder"]
  assert folder.classes == ["0", "1", "2", "3", "4"]
  assert folder[4]["key"] == "1/1.png"
  report = export_lib.verify_export(workdir)
  assert set(report) == set(export_lib.FORMATS)
  assert all(r["checked"] == 15 and r["max_mean_abs_error"] == 0 for r in report.values())
  # The manifest entries describe the files on disk.
  rec = result["formats"]["recordio"]["files"]
  assert [f["path"] for f in rec] == ["recordio/property", "recordio/train.idx",
                                      "recordio/train.rec"]
  assert rec[2]["sha256"] == store_lib.sha256_file(workdir / "recordio" / "train.rec")
  assert result["formats"]["imagefolder"]["count"] == 15
  assert result["identities"]["sha256"] == store_lib.sha256_file(workdir / "identities.json")
  assert not [n for n in os.listdir(workdir) if ".tmp-" in n or ".old-" in n]


def test_recordio_meta_identity_and_image_headers(workdir):
  export_lib.export(workdir, ["recordio"], progress=False)
  rec, idx = workdir / "recordio" / "train.rec", workdir / "recordio" / "train.idx"
  buf = rec.read_bytes()
  keys, offsets = recordio_format.parse_idx(idx.read_text())
  where = dict(zip(keys.tolist(), offsets.tolist()))
  assert sorted(where) == list(range(21))  # meta 0, images 1..15, identities 16..20

  def record(key):
    payload, _ = recordio_format.read_record(buf, where[key])
    return recordio_format.unpack_header(payload)

  meta, image = record(0)
  assert meta.flag == 2 and meta.label.tolist() == [16, 21] and image == b""
  for c in range(NUM_IDS):
    header, image = record(16 + c)
    assert header.flag == 2 and image == b""
    assert header.label.tolist() == [1 + PER_ID * c, 1 + PER_ID * (c + 1)]
  ref = store_lib.StoreSource(workdir, decode=False)
  for key in range(1, 16):
    header, image = record(key)
    assert header.flag == recordio_format.LANDMARK_FLAG and header.id == key
    assert header.label[0] == (key - 1) // PER_ID  # class id in every image header
    np.testing.assert_array_equal(header.label[1:].reshape(5, 2), ref.landmarks[key - 1])
    assert image == ref.encoded(key - 1)  # stored bytes, not re-encoded
  assert (workdir / "recordio" / "property").read_text() == "5,112,112"


def _mxface_dataset(rec_dir):
  """insightface arcface_torch `MXFaceDataset`, with our codec instead of mxnet."""
  buf = open(os.path.join(rec_dir, "train.rec"), "rb").read()
  keys, offsets = recordio_format.parse_idx(open(os.path.join(rec_dir, "train.idx")).read())
  where = dict(zip(keys.tolist(), offsets.tolist()))

  def read_idx(key):
    return recordio_format.read_record(buf, where[key])[0]

  header, _ = recordio_format.unpack_header(read_idx(0))
  if header.flag > 0:
    imgidx = np.array(range(1, int(header.label[0])))
  else:
    imgidx = np.array(list(keys))
  samples = []
  for idx in imgidx:
    header, img = recordio_format.unpack_header(read_idx(int(idx)))
    label = header.label
    if not isinstance(label, numbers.Number):
      label = label[0]
    sample = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    samples.append((sample, int(label)))
  return samples


def test_mxface_dataset_reads_image_label_pairs(workdir):
  export_lib.export(workdir, ["recordio"], exclude_labels=[2], progress=False)
  samples = _mxface_dataset(workdir / "recordio")
  ref = store_lib.StoreSource(workdir, exclude_labels=[2])
  assert len(samples) == len(ref) == 12
  assert [label for _, label in samples] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
  for i, (image, label) in enumerate(samples):
    np.testing.assert_array_equal(image, ref[i]["image"])
    assert label == ref[i]["label"]


def test_excluded_labels_are_dropped_and_renumbered_everywhere(workdir):
  notes = [{"similarity": 0.1 * c} for c in range(NUM_IDS)]
  export_lib.export(workdir, exclude_labels=[3, 1], identities=notes, progress=False)
  store = store_lib.StoreSource(workdir)
  for name, reader in _readers(workdir).items():
    assert len(reader) == 9 and reader.num_classes == 3, name
    got = [int(reader[i]["label"]) for i in range(9)]
    assert got == [0, 0, 0, 1, 1, 1, 2, 2, 2], name
    # New class 1 is generated label 2, class 2 is label 4.
    np.testing.assert_array_equal(reader[4]["image"], store[7]["image"], err_msg=name)
    np.testing.assert_array_equal(reader[8]["landmarks"], store[14]["landmarks"], err_msg=name)
  assert sorted(os.listdir(workdir / "imagefolder")) == ["0", "1", "2", "landmarks.txt"]
  table = json.loads((workdir / "identities.json").read_text())
  assert table["num_classes"] == 3 and table["num_images"] == 9
  assert [d["original_label"] for d in table["dropped"]] == [1, 3] and "audit" in table["note"]
  assert table["dropped"][1]["similarity"] == pytest.approx(0.3)
  entries = table["identities"]
  assert [e["original_label"] for e in entries] == [0, 2, 4]
  assert [e["label"] for e in entries] == [0, 1, 2]
  assert [e["row"] for e in entries] == [100, 102, 104]
  assert [e["kind"] for e in entries] == ["virtual", "virtual", "real"]
  assert entries[1]["seeds"] == [2000, 2001, 2002] and entries[1]["count"] == 3
  assert entries[2]["similarity"] == pytest.approx(0.4)
  report = export_lib.verify_export(workdir)
  assert all(r["images"] == 9 and r["num_classes"] == 3 for r in report.values())
  # identities clashing with the computed fields are refused.
  with pytest.raises(ValueError, match="'row'"):
    export_lib.export(workdir, identities=[{"row": 1}] * NUM_IDS, progress=False)


def test_rerun_is_byte_identical_and_replaces_the_old_export(workdir):
  first_result = export_lib.export(workdir, progress=False)
  first = _tree(workdir)
  (workdir / "imagefolder" / "stale.txt").write_text("from an older export")
  (workdir / "recordio.tmp-deadbeef").mkdir()  # left by a killed export
  second_result = export_lib.export(workdir, progress=False)
  assert _tree(workdir) == first and second_result == first_result
  assert len([p for p in first if p.startswith("imagefolder/")]) == 16


def test_jpeg_export_within_tolerance(workdir):
  result = export_lib.export(workdir, ["imagefolder", "arrayrecord"], image_format="jpeg",
                             progress=False)
  assert (workdir / "imagefolder" / "4" / "2.jpg").exists()
  assert result["image_format"] == "jpeg"
  report = export_lib.verify_export(workdir, ["imagefolder", "arrayrecord"])
  assert 0 < report["imagefolder"]["max_mean_abs_error"] <= export_lib.JPEG_TOLERANCE
  data = arrayrecord.ArrayRecordSource(workdir / "arrayrecord")[0]["image_bytes"]
  assert data[:2] == b"\xff\xd8"


def test_verify_export_names_the_file_on_mismatch(workdir):
  export_lib.export(workdir, ["imagefolder"], progress=False)
  path = workdir / "imagefolder" / "2" / "1.png"
  image = np.asarray(Image.open(path)).copy()
  image[0, 0] ^= 1
  Image.fromarray(image).save(path)
  with pytest.raises(ValueError, match="imagefolder: element 7 .*pixels differ"):
    export_lib.verify_export(workdir, ["imagefolder"])


def test_corrupt_store_shard_fails_the_export_and_keeps_the_old_one(workdir):
  export_lib.export(workdir, ["imagefolder", "recordio"], progress=False)
  before = _tree(workdir)
  path = workdir / "shards" / "shard-00001.npz"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(store_lib.ShardError, match="shard 1 .*shard-00001.npz"):
    export_lib.export(workdir, progress=False)
  assert _tree(workdir) == before
  with pytest.raises(ValueError, match="formats"):
    export_lib.export(workdir, ["tfrecord"], progress=False)
