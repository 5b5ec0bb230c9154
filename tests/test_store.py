"""The generation shard store: atomic resumable shards, checksums, the source, the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.generate import store as store_lib

SPEC = {"num_ids": 5, "images_per_id": 3, "ids_per_shard": 2, "seed": 7, "guidance": 2.0,
        "image_format": "png"}


def _open(workdir, spec=SPEC, process_index=0, num_processes=1):
  return store_lib.ShardStore(workdir, spec=spec, process_index=process_index,
                              num_processes=num_processes)


def _inputs(store, s):
  """Deterministic inputs of shard `s`, in image-major (not label-major) order."""
  labels = np.array(store.shard_labels(s))
  n = len(labels) * store.images_per_id
  rng = np.random.default_rng(1000 + s)
  # Index-major order: write_shard must put it label-major itself.
  label = np.tile(labels, store.images_per_id)
  index = np.repeat(np.arange(store.images_per_id), len(labels))
  points = landmarks_lib.ARCFACE_TEMPLATE[None] + rng.normal(0, 2, (n, 5, 2))
  return dict(
      images=rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8),
      labels=label, indices=index, rows=label * 10 + 3, seeds=label * 100 + index,
      landmarks=points.astype(np.float32), landmark_owner=label + 50,
      extra={"kind": np.where(label % 2 == 0, "virtual", "real")})


def _write_all(store, shards=None):
  for s in (range(store.num_shards) if shards is None else shards):
    store.write_shard(s, **_inputs(store, s))


def _expected(store):
  """All inputs concatenated and sorted label-major."""
  parts = [_inputs(store, s) for s in range(store.num_shards)]
  cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "extra"}
  order = np.lexsort((cat["indices"], cat["labels"]))
  return {k: v[order] for k, v in cat.items()}


def _digests(workdir):
  directory = os.path.join(workdir, "shards")
  return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(directory))}


def test_write_reopen_complete_and_source_reads_back(tmp_path):
  store = _open(tmp_path)
  assert store.num_shards == 3
  assert [list(store.shard_labels(s)) for s in range(3)] == [[0, 1], [2, 3], [4]]
  assert store.pending() == [0, 1, 2]
  _write_all(store)
  reopened = _open(tmp_path)
  assert reopened.pending() == [] and all(reopened.is_complete(s) for s in range(3))
  names = sorted(os.listdir(tmp_path / "shards"))
  assert names == ["shard-00000.json", "shard-00000.npz", "shard-00001.json", "shard-00001.npz",
                   "shard-00002.json", "shard-00002.npz", "spec.json"]
  # A plain numpy read, no pickles.
  with np.load(tmp_path / "shards" / "shard-00001.npz", allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz["labels"], [2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(npz["indices"], [0, 1, 2, 0, 1, 2])
    assert npz["extra.kind"].tolist() == ["virtual"] * 3 + ["real"] * 3
  record = json.loads((tmp_path / "shards" / "shard-00001.json").read_text())
  assert record["count"] == 6 and record["labels"] == [2, 4]
  assert record["sha256"] == store_lib.sha256_file(tmp_path / "shards" / "shard-00001.npz")

  want = _expected(store)
  source = store_lib.StoreSource(tmp_path)
  assert len(source) == 15 and source.num_classes == 5
  np.testing.assert_array_equal(source.labels, np.repeat(np.arange(5), 3))
  np.testing.assert_array_equal(source.rows, want["rows"])
  np.testing.assert_array_equal(source.seeds, want["seeds"])
  for i in range(15):
    element = source[i]
    np.testing.assert_array_equal(element["image"], want["images"][i])  # PNG: lossless
    np.testing.assert_array_equal(element["landmarks"], want["landmarks"][i])
    assert element["label"] == want["labels"][i] and element["has_landmarks"]
    assert element["label"].dtype == np.int32 and element["landmarks"].dtype == np.float32
    np.testing.assert_array_equal(store_lib.decode_image(element["image_bytes"]),
                                  want["images"][i])
  shard = reopened.read_shard(1)
  np.testing.assert_array_equal(shard["landmark_owner"], np.repeat([52, 53], 3))
  np.testing.assert_array_equal(reopened.images(1), want["images"][6:12])
  assert reopened.encoded(1)[0] == source[6]["image_bytes"]


def test_encoding_is_deterministic():
  image = np.random.default_rng(3).integers(0, 256, (112, 112, 3), dtype=np.uint8)
  for fmt in ("png", "jpeg"):
    first = store_lib.encode_image(image, fmt)
    assert store_lib.encode_image(image.copy(), fmt) == first
  assert store_lib.encode_image(image, "png").startswith(b"\x89PNG")
  np.testing.assert_array_equal(store_lib.decode_image(store_lib.encode_image(image)), image)


def test_spec_mismatch_names_the_keys(tmp_path):
  _open(tmp_path)
  changed = dict(SPEC, guidance=3.5, seed=8)
  with pytest.raises(ValueError, match="guidance: 2.0 \\(stored\\) vs 3.5 \\(now\\)") as e:
    _open(tmp_path, spec=changed)
  assert "seed: 7 (stored) vs 8 (now)" in str(e.value) and "new workdir" in str(e.value)
  assert "num_ids" not in str(e.value)
  with pytest.raises(ValueError, match="extra_key: \\(absent\\) \\(stored\\)"):
    _open(tmp_path, spec=dict(SPEC, extra_key=1))
  # Tuples and lists are the same JSON: not a difference.
  _open(tmp_path / "t", spec=dict(SPEC, sizes=(1, 2)))
  _open(tmp_path / "t", spec=dict(SPEC, sizes=[1, 2]))
  with pytest.raises(ValueError, match="ids_per_shard"):
    _open(tmp_path / "bad", spec=dict(SPEC, ids_per_shard=0))
  with pytest.raises(FileNotFoundError, match="run generation"):
    store_lib.ShardStore(tmp_path / "none")


def test_truncated_or_corrupt_shard_is_pending_and_redone(tmp_path):
  store = _open(tmp_path)
  _write_all(store)
  before = _digests(tmp_path)
  path = store.shard_path(1)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  reason = store.check(1)
  assert path in reason and "truncated" in reason
  assert store.pending() == [1]
  with pytest.raises(store_lib.ShardError, match="shard-00001.npz"):
    store.read_shard(1)
  with pytest.raises(store_lib.ShardError, match="shard-00001.npz"):
    store_lib.StoreSource(tmp_path)
  # Same size, one byte flipped: only the checksum sees it.
  corrupt = bytearray(data)
  corrupt[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(corrupt))
  assert "sha256" in store.check(1) and store.check(1, verify=False) is None
  assert store.pending() == [1] and store.pending(verify=False) == []
  # Redoing the shard gives the same bytes as the first time.
  store.write_shard(1, **_inputs(store, 1))
  assert store.pending() == [] and _digests(tmp_path) == before


def test_leftover_temp_files_are_removed_on_open(tmp_path):
  store = _open(tmp_path)
  _write_all(store, [0])
  directory = tmp_path / "shards"
  leftovers = [directory / ".shard-00001.npz.tmp-0123abcd", directory / ".shard-00002.json.tmp-ff",
               directory / ".spec.json.tmp-beef"]
  for p in leftovers:
    p.write_bytes(b"half")
  # Process 1 of 2 only removes its own shards' (1), never process 0's in-flight files.
  removed = _open(tmp_path, process_index=1, num_processes=2).cleanup(1, 2)
  assert not leftovers[0].exists() and leftovers[1].exists() and leftovers[2].exists()
  assert removed == []  # the constructor already removed it
  _open(tmp_path)
  assert not any(p.exists() for p in leftovers)
  assert store.pending() == [1, 2] and store.pending(0, 2) == [2] and store.pending(1, 2) == [1]


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_store
from vigface_jax.generate import store as store_lib
store = test_store._open({workdir!r})
write_npz = store_lib._write_npz
def stalled(f, arrays):
  write_npz(f, arrays)
  f.flush()
  print("stalled", flush=True)
  time.sleep(120)
for s in store.pending():
  if s == 2:
    store_lib._write_npz = stalled  # killed while shard 2 sits in its temporary file
  store.write_shard(s, **test_store._inputs(store, s))
  print("wrote", s, flush=True)
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  script = _CHILD.format(tests=os.path.dirname(__file__), workdir=str(killed))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
      + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
  lines = []
  try:
    deadline = time.time() + 60
    while time.time() < deadline:
      line = child.stdout.readline()
      if not line:
        break
      lines.append(line.strip())
      if line.strip() == "stalled":
        break
    assert lines == ["wrote 0", "wrote 1", "stalled"], (lines, child.stderr.read()
                                                        if child.poll() is not None else "")
    temps = [n for n in os.listdir(killed / "shards") if ".tmp-" in n]
    assert len(temps) == 1 and temps[0].startswith(".shard-00002.npz.tmp-")
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    child.stderr.close()
  assert child.returncode == -signal.SIGKILL

  resumed = _open(killed)  # removes the dead run's temporary file
  assert not [n for n in os.listdir(killed / "shards") if ".tmp-" in n]
  assert resumed.pending() == [2]
  _write_all(resumed, resumed.pending())
  _write_all(_open(clean))
  assert _digests(killed) == _digests(clean)
  assert resumed.pending() == []


def test_excluded_labels_are_renumbered(tmp_path):
  store = _open(tmp_path)
  _write_all(store)
  want = _expected(store)
  source = store_lib.StoreSource(tmp_path, exclude_labels=[3, 0], decode=False)
  assert source.num_classes == 3 and source.excluded == (0, 3)
  np.testing.assert_array_equal(source.original_label, [1, 2, 4])
  np.testing.assert_array_equal(source.labels, np.repeat([0, 1, 2], 3))
  np.testing.assert_array_equal(source.original_labels, np.repeat([1, 2, 4], 3))
  assert source.extra["kind"].tolist() == ["real"] * 3 + ["virtual"] * 6
  element = source[8]
  assert "image" not in element and element["label"] == 2 and element["original_label"] == 4
  np.testing.assert_array_equal(store_lib.decode_image(element["image_bytes"]),
                                want["images"][14])
  np.testing.assert_array_equal(element["landmarks"], want["landmarks"][14])
  with pytest.raises(ValueError, match="outside"):
    store_lib.StoreSource(tmp_path, exclude_labels=[5])
  with pytest.raises(IndexError):
    source[9]


def test_write_shard_validates_its_inputs(tmp_path):
  store = _open(tmp_path)
  good = _inputs(store, 0)
  cases = [
      (dict(images=good["images"][:5]),
       "images must be uint8 \\[6, 112, 112, 3\\] \\(2 identities x 3"),
      (dict(images=good["images"].astype(np.float32)), "images must be uint8"),
      (dict(labels=good["labels"] + 2), "label 2 is outside the shard's labels \\[0, 2\\)"),
      (dict(indices=np.zeros(6, int)), "index 0\\) occurs 3 times"),
      (dict(indices=good["indices"] + 1), "indices must be in \\[0, the identity.s count <= 3\\)"),
      (dict(seeds=good["seeds"][:3]), "seeds must be integers of shape \\[6\\]"),
      (dict(landmarks=good["landmarks"][:, :4]), "landmarks must be finite"),
      (dict(extra={"bad name": good["labels"]}), "extra name"),
      (dict(extra={"kind": ["x"] * 3}), "extra\\['kind'\\]"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      store.write_shard(0, **dict(good, **change))
    assert "shard 0" in str(e.value)
  with pytest.raises(ValueError, match="shard 3 is not in \\[0, 3\\)"):
    store.write_shard(3, **good)
  assert store.pending() == [0, 1, 2] and os.listdir(tmp_path / "shards") == ["spec.json"]


def test_manifest(tmp_path):
  store = _open(tmp_path)
  _write_all(store, [0, 2])
  partial = store_lib.manifest(tmp_path)
  assert not partial["complete"] and partial["missing"] == [1]
  assert store_lib.write_manifest(tmp_path, is_main=False) == partial
  assert not (tmp_path / "manifest.json").exists()
  _write_all(store, [1])
  exports = {"formats": {"recordio": {"files": [{"path": "recordio/train.rec", "bytes": 1,
                                                 "sha256": "00"}]}}}
  written = store_lib.write_manifest(tmp_path, exports, is_main=True)
  on_disk = json.loads((tmp_path / "manifest.json").read_text())
  assert on_disk == written and on_disk["complete"] and on_disk["exports"] == exports
  assert on_disk["spec"] == SPEC
  assert on_disk["totals"] == {"shards": 3, "complete_shards": 3, "images": 15,
                               "identities": 5, "bytes": sum(
                                   os.path.getsize(store.shard_path(s)) for s in range(3))}
  assert [s["file"] for s in on_disk["shards"]] == [
      "shards/shard-00000.npz", "shards/shard-00001.npz", "shards/shard-00002.npz"]
  assert on_disk["shards"][2]["sha256"] == store_lib.sha256_file(store.shard_path(2))
