"""Tests for the MXNet RecordIO reader/writer against files real MXNet wrote."""

import hashlib
import io
import logging
import os
import pickle
import shutil
import struct

import numpy as np
from PIL import Image
import pytest

from vigface_jax.data import pipeline
from vigface_jax.data import recordio

MAGIC = struct.pack("<I", 0xCED7230A)
PACKS = ("insightface", "vector", "plain")


def _face(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:112, 0:112] / 112
  channels = [127.5 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y))
              for _ in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt)
  return out.getvalue()


def _copy_pack(testdata, name, dst, with_property=True):
  """Copies `<name>.rec/.idx` (+ property) into `dst` as train.*; returns the .rec path."""
  src = testdata / "mxnet"
  dst.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(src / f"{name}.rec", dst / "train.rec")
  shutil.copyfile(src / f"{name}.idx", dst / "train.idx")
  if with_property:
    shutil.copyfile(src / "property", dst / "property")
  return dst / "train.rec"


def _idx(path) -> dict[int, int]:
  keys, offsets = recordio.parse_idx(open(path).read())
  return dict(zip(keys.tolist(), offsets.tolist()))


def _payloads(rec, idx) -> dict[int, bytes]:
  buf = open(rec, "rb").read()
  return {k: recordio.read_record(buf, off)[0] for k, off in _idx(idx).items()}


def _write_raw(rec_path, records):
  """Low-level pack: `records` is [(key, payload)] written in that order."""
  pos, lines = 0, []
  with open(rec_path, "wb") as f:
    for key, payload in records:
      data = recordio.encode_record(payload)
      lines.append(f"{key}\t{pos}\n")
      f.write(data)
      pos += len(data)
  with open(os.path.splitext(rec_path)[0] + ".idx", "w") as f:
    f.writelines(lines)


def _digest(directory) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.fixture(scope="module")
def expected(shared_testdata):
  with np.load(shared_testdata / "mxnet" / "expected.npz") as data:
    return {k: data[k] for k in data.files}


# -- the MXNet-written files --------------------------------------------------


@pytest.mark.parametrize("name", PACKS)
def test_mxnet_files_read_as_expected(shared_testdata, expected, name):
  source = recordio.RecordIOSource(shared_testdata / "mxnet" / f"{name}.rec")
  assert len(source) == len(expected["labels"]) == 15
  assert source.num_classes == 4
  first_key = 0 if name == "plain" else 1
  assert source.layout == ("plain" if name == "plain" else "insightface")
  np.testing.assert_array_equal(source.keys, np.arange(first_key, first_key + 15))
  np.testing.assert_array_equal(source.labels, expected["labels"])
  for i in range(len(source)):
    element = source[i]
    np.testing.assert_array_equal(element["image"], expected["images"][i], err_msg=f"record {i}")
    assert element["image"].dtype == np.uint8 and element["label"].dtype == np.int32
    assert element["label"] == expected["labels"][i] and element["key"] == first_key + i
    assert element["landmarks"].shape == (5, 2) and not element["landmarks"].any()
    assert not element["has_landmarks"]
  # decode=False hands the stored bytes to pipeline.Decode, which agrees.
  raw = recordio.RecordIOSource(shared_testdata / "mxnet" / f"{name}.rec", decode=False)
  decode = pipeline.Decode()
  for i in range(len(raw)):
    element = raw[i]
    assert "image" not in element
    assert element["image_bytes"].startswith(b"\x89PNG") == expected["is_png"][i]
    np.testing.assert_array_equal(decode.map(element)["image"], expected["images"][i])


def test_vector_labels_come_from_the_vector(shared_testdata, expected):
  mx = shared_testdata / "mxnet"
  payloads = _payloads(mx / "vector.rec", mx / "vector.idx")
  header, _ = recordio.unpack_header(payloads[5])
  # The scalar slot is 0 in vector packs: the class is label[0].
  assert header.flag == 2 and header.label.tolist() == [1.0, 7.0]
  source = recordio.RecordIOSource(mx / "vector.rec")
  np.testing.assert_array_equal(source.labels, expected["labels"])
  meta, _ = recordio.unpack_header(payloads[0])
  assert meta.label.tolist() == [16.0, 16.0] and source.num_identity_records == 0


def test_plain_pack_has_shuffled_idx_and_no_meta(shared_testdata, expected):
  mx = shared_testdata / "mxnet"
  keys, _ = recordio.parse_idx((mx / "plain.idx").read_text())
  assert keys.tolist() != sorted(keys.tolist()) and 0 in keys
  header, image = recordio.unpack_header(_payloads(mx / "plain.rec", mx / "plain.idx")[0])
  assert header.flag == 0 and image.startswith(b"\xff\xd8")
  source = recordio.RecordIOSource(mx / "plain.rec")
  assert source.layout == "plain" and source[0]["key"] == 0
  np.testing.assert_array_equal(source[0]["image"], expected["images"][0])


def test_insightface_identity_and_meta_records(shared_testdata):
  mx = shared_testdata / "mxnet"
  payloads = _payloads(mx / "insightface.rec", mx / "insightface.idx")
  meta, image = recordio.unpack_header(payloads[0])
  assert meta.flag == 2 and meta.label.tolist() == [16.0, 20.0] and image == b""
  ranges = [recordio.unpack_header(payloads[k])[0].label.tolist() for k in range(16, 20)]
  assert ranges == [[1, 5], [5, 8], [8, 12], [12, 16]]
  # Meta record last in the file and in the .idx, but key 0.
  lines = (mx / "insightface.idx").read_text().splitlines()
  assert lines[-1].split("\t")[0] == "0"
  assert int(lines[-1].split("\t")[1]) == os.path.getsize(mx / "insightface.rec") - 40


# -- byte-level agreement with MXNet's writer --------------------------------


@pytest.mark.parametrize("name", ["insightface", "vector"])
def test_writer_reproduces_mxnet_bytes(shared_testdata, tmp_path, name):
  mx = shared_testdata / "mxnet"
  payloads = _payloads(mx / f"{name}.rec", mx / f"{name}.idx")
  out = tmp_path / "train.rec"
  with recordio.RecordIOWriter(out, identity_records=(name == "insightface")) as writer:
    for key in range(1, 16):
      header, image = recordio.unpack_header(payloads[key])
      label = header.label if header.flag else int(header.label)
      assert writer.write(image, label) == key  # stored bytes, not re-encoded
  assert out.read_bytes() == (mx / f"{name}.rec").read_bytes()
  assert (tmp_path / "train.idx").read_text() == (mx / f"{name}.idx").read_text()
  assert _idx(tmp_path / "train.idx") == _idx(mx / f"{name}.idx")
  assert (tmp_path / "property").read_text() == (mx / "property").read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]


def test_key2_magic_at_unaligned_offsets_is_not_split(shared_testdata):
  # Key 2's JPEG comment holds the magic, but at payload offsets = 2 (mod 4):
  # dmlc only splits at 4-aligned offsets, and MXNet stored the record whole.
  mx = shared_testdata / "mxnet"
  buf = (mx / "insightface.rec").read_bytes()
  offset = _idx(mx / "insightface.idx")[2]
  payload, end = recordio.read_record(buf, offset)
  hits = [i for i in range(len(payload)) if payload.startswith(MAGIC, i)]
  assert len(hits) == 8 and {i % 4 for i in hits} == {2}
  assert recordio.encode_record(payload) == buf[offset:end]


def test_encode_record_reproduces_plain_rec(shared_testdata):
  mx = shared_testdata / "mxnet"
  buf = (mx / "plain.rec").read_bytes()
  lines = [l.split("\t") for l in (mx / "plain.idx").read_text().splitlines()]
  rebuilt, pos = b"", 0
  for key, offset in lines:
    assert int(offset) == pos
    payload, _ = recordio.read_record(buf, int(offset), key=int(key))
    header, image = recordio.unpack_header(payload)
    repacked = recordio.pack(header.label, image, id=header.id, id2=header.id2)
    assert repacked == payload
    rebuilt += recordio.encode_record(repacked)
    pos = len(rebuilt)
  assert rebuilt == buf


# -- chunking (dmlc RecordIOWriter::WriteRecord) ------------------------------


def _lrec(cflag, length):
  return struct.pack("<I", (cflag << 29) | length)


def test_encode_record_chunks_like_dmlc():
  # Aligned magics at 0, 8 and 12 (consecutive), one unaligned at 19.
  payload = MAGIC + b"abcd" + MAGIC + MAGIC + b"xyz" + MAGIC + b"q"
  assert len(payload) == 24 and payload[19:23] == MAGIC
  expected = (MAGIC + _lrec(1, 0)
              + MAGIC + _lrec(2, 4) + b"abcd"
              + MAGIC + _lrec(2, 0)
              + MAGIC + _lrec(3, 8) + payload[16:])
  assert recordio.encode_record(payload) == expected
  assert recordio.read_record(expected, 0) == (payload, len(expected))
  # Magic at the last aligned word: empty last chunk, padding of the total.
  tail = b"ab" + b"\0\0" + MAGIC + b"c"
  framed = recordio.encode_record(tail)
  assert framed == MAGIC + _lrec(1, 4) + tail[:4] + MAGIC + _lrec(3, 1) + b"c\0\0\0"
  assert recordio.read_record(framed, 0)[0] == tail
  # No aligned magic: one whole record, padded.
  assert recordio.encode_record(b"hello") == MAGIC + _lrec(0, 5) + b"hello\0\0\0"


def _jpeg_with_aligned_magic(image: np.ndarray) -> bytes:
  """A JPEG whose comment puts the magic at 4-aligned payload offsets."""
  jpeg = _encode(image, "JPEG")
  # Payload = 24-byte header + SOI(2) + COM marker(2) + length(2) + data: two
  # filler bytes bring the comment's magics to payload offsets 32, 36, 40.
  comment = b"ab" + MAGIC * 3
  return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def test_chunked_record_written_and_read(tmp_path):
  faces = [_face(i) for i in range(3)]
  special = _jpeg_with_aligned_magic(faces[1])
  with recordio.RecordIOWriter(tmp_path / "train.rec") as writer:
    writer.write(faces[0], 0)
    writer.write(special, 1)
    writer.write(faces[2], 1)
  buf = (tmp_path / "train.rec").read_bytes()
  offset = _idx(tmp_path / "train.idx")[2]
  flags = []
  pos = offset
  while True:
    lrec = struct.unpack_from("<I", buf, pos + 4)[0]
    flags.append(lrec >> 29)
    pos += 8 + ((lrec & (2**29 - 1)) + 3) // 4 * 4
    if flags[-1] in (0, 3):
      break
  assert flags == [1, 2, 2, 3]
  source = recordio.RecordIOSource(tmp_path / "train.rec", decode=False)
  assert source[1]["image_bytes"] == special
  decoded = recordio.RecordIOSource(tmp_path / "train.rec")[1]["image"]
  np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(special))))


# -- writer round trips -------------------------------------------------------


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_round_trip_scalar_labels(tmp_path, image_format):
  faces = [_face(i) for i in range(6)]
  labels = [0, 0, 2, 2, 2, 4]  # classes 1 and 3 have no images
  with recordio.RecordIOWriter(tmp_path / "train.rec", num_classes=5,
                               image_format=image_format) as writer:
    for face, label in zip(faces, labels):
      writer.write(face, label)
  assert (tmp_path / "property").read_text() == "5,112,112"
  source = recordio.RecordIOSource(tmp_path / "train.rec")
  assert len(source) == 6 and source.num_classes == 5 and source.layout == "insightface"
  np.testing.assert_array_equal(source.labels, labels)
  for i, face in enumerate(faces):
    image = source[i]["image"]
    if image_format == "png":
      np.testing.assert_array_equal(image, face)
    else:
      assert np.abs(image.astype(int) - face).mean() < 3
  raw = recordio.RecordIOSource(tmp_path / "train.rec", decode=False)
  assert raw[0]["image_bytes"][:4] == (b"\x89PNG" if image_format == "png" else b"\xff\xd8\xff\xe0")
  payloads = _payloads(tmp_path / "train.rec", tmp_path / "train.idx")
  meta = recordio.unpack_header(payloads[0])[0].label.tolist()
  assert meta == [7, 12]
  ranges = [recordio.unpack_header(payloads[k])[0].label.tolist() for k in range(7, 12)]
  assert ranges == [[1, 3], [3, 3], [3, 6], [6, 6], [6, 7]]
  assert recordio.unpack_header(payloads[3])[0] == (0, 2.0, 3, 0)


def test_round_trip_vector_labels_and_landmarks(tmp_path):
  points = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]],
                    np.float32)
  with recordio.RecordIOWriter(tmp_path / "train.rec", image_format="png") as writer:
    writer.write(_face(0), [0, 7.0])
    writer.write(_face(1), 1, landmarks=points)
    writer.write(_encode(_face(2)), np.array([1.0, 0.5, 0.25]))
    with pytest.raises(ValueError, match="scalar label"):
      writer.write(_face(3), [1, 2], landmarks=points)
  source = recordio.RecordIOSource(tmp_path / "train.rec")
  np.testing.assert_array_equal(source.labels, [0, 1, 1])
  assert not source[0]["has_landmarks"] and not source[2]["has_landmarks"]
  assert source[1]["has_landmarks"]
  np.testing.assert_array_equal(source[1]["landmarks"], points)
  np.testing.assert_array_equal(source[2]["image"], _face(2))
  plain = recordio.RecordIOSource(tmp_path / "train.rec", vector_landmarks=False)
  assert not plain[1]["has_landmarks"]
  batch = pipeline.Decode().map(source[1])
  assert batch["has_landmarks"] and batch["landmarks"].dtype == np.float32


def test_unsorted_labels_give_no_identity_records(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    with recordio.RecordIOWriter(tmp_path / "train.rec", image_format="png") as writer:
      for i, label in enumerate([1, 0, 1]):
        writer.write(_face(i), label)
  assert "not written in sorted order" in caplog.text
  payloads = _payloads(tmp_path / "train.rec", tmp_path / "train.idx")
  assert sorted(payloads) == [0, 1, 2, 3]
  assert recordio.unpack_header(payloads[0])[0].label.tolist() == [4, 4]
  source = recordio.RecordIOSource(tmp_path / "train.rec")
  np.testing.assert_array_equal(source.labels, [1, 0, 1])
  assert source.num_classes == 2


def test_writer_is_atomic(tmp_path):
  with pytest.raises(RuntimeError):
    with recordio.RecordIOWriter(tmp_path / "train.rec") as writer:
      writer.write(_face(0), 0)
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match="no images"):
    with recordio.RecordIOWriter(tmp_path / "train.rec"):
      pass
  assert list(tmp_path.iterdir()) == []
  with recordio.RecordIOWriter(tmp_path / "train.rec", num_classes=2) as writer:
    with pytest.raises(ValueError, match=r"112, 112, 3"):
      writer.write(np.zeros((100, 100, 3), np.uint8), 0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
      writer.write(_face(0), 2)
    with pytest.raises(ValueError, match="not a JPEG/PNG"):
      writer.write(b"not an image", 0)
    writer.write(_face(0), 0)
  before = _digest(tmp_path)
  with pytest.raises(FileExistsError):
    recordio.RecordIOWriter(tmp_path / "train.rec")
  assert _digest(tmp_path) == before


# -- hand-built packs ---------------------------------------------------------


def test_no_meta_pack_with_shuffled_idx(tmp_path):
  faces = [_face(i) for i in range(5)]
  order = [3, 0, 4, 1, 2]
  _write_raw(tmp_path / "data.rec",
             [(k, recordio.pack(float(k % 2), _encode(faces[k]), id=k)) for k in order])
  source = recordio.RecordIOSource(tmp_path / "data.rec")
  assert source.layout == "plain" and source.num_classes == 2  # max label + 1
  np.testing.assert_array_equal(source.keys, range(5))
  np.testing.assert_array_equal(source.labels, [0, 1, 0, 1, 0])
  for k in range(5):
    np.testing.assert_array_equal(source[k]["image"], faces[k])


def test_shuffled_idx_of_insightface_pack(shared_testdata, expected, tmp_path):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  lines = (tmp_path / "train.idx").read_text().splitlines()
  np.random.default_rng(0).shuffle(lines)
  (tmp_path / "train.idx").write_text("\n".join(lines) + "\n\n")
  source = recordio.RecordIOSource(rec)
  np.testing.assert_array_equal(source.labels, expected["labels"])
  np.testing.assert_array_equal(source[1]["image"], expected["images"][1])


def test_side_label_file(shared_testdata, tmp_path):
  # DCFace stores label 0 everywhere; identities live in list.txt.
  faces = [_face(i) for i in range(4)]
  _write_raw(tmp_path / "file.rec",
             [(k, recordio.pack(0.0, _encode(faces[k]), id=k)) for k in range(4)])
  (tmp_path / "list.txt").write_text(
      "0\tzed/0.jpg\n1\talpha/1.jpg\n2\tzed/2.jpg\n3\tmid/x/3.jpg\n")
  source = recordio.RecordIOSource(tmp_path / "file.rec", label_file=tmp_path / "list.txt")
  assert source.classes == ["alpha", "mid", "zed"] and source.num_classes == 3
  np.testing.assert_array_equal(source.labels, [2, 0, 2, 1])
  assert source[3]["label"] == 1
  (tmp_path / "short.txt").write_text("0\tzed/0.jpg\n1\talpha/1.jpg\n2\tzed/2.jpg\n")
  with pytest.raises(recordio.RecordIOError, match="record key 3 .*no entry in label file"):
    recordio.RecordIOSource(tmp_path / "file.rec", label_file=tmp_path / "short.txt")
  skipping = recordio.RecordIOSource(tmp_path / "file.rec", label_file=tmp_path / "short.txt",
                                     on_error="skip")
  assert len(skipping) == 3 and [k for k, _ in skipping.skipped] == [3]
  (tmp_path / "bad.txt").write_text("0\tzed/0.jpg\nthree\talpha/1.jpg\n")
  with pytest.raises(recordio.RecordIOError, match="line 2"):
    recordio.RecordIOSource(tmp_path / "file.rec", label_file=tmp_path / "bad.txt")


def test_bgr_to_rgb_swaps_and_forces_decoding(shared_testdata, expected):
  source = recordio.RecordIOSource(shared_testdata / "mxnet" / "insightface.rec",
                                   bgr_to_rgb=True, decode=False)
  assert source.decode
  np.testing.assert_array_equal(source[3]["image"], expected["images"][3][..., ::-1])


# -- bad data -----------------------------------------------------------------


def _patch(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def test_wrong_magic(shared_testdata, expected, tmp_path, caplog):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  _patch(rec, 9752, b"JUNK")  # record key 5
  before = _digest(tmp_path)
  with pytest.raises(recordio.RecordIOError,
                     match=r"train\.rec: record key 5 at byte 9752: wrong magic 0x4B4E554A"):
    recordio.RecordIOSource(rec)
  with caplog.at_level(logging.WARNING):
    source = recordio.RecordIOSource(rec, on_error="skip")
  assert len(source) == 14 and 5 not in source.keys.tolist()
  assert source.num_skipped == 1 and source.skipped[0][0] == 5
  assert "skipped 1 of" in caplog.text and "record key 5" in caplog.text
  keep = [i for i in range(15) if i != 4]
  for j, i in enumerate(keep):
    np.testing.assert_array_equal(source[j]["image"], expected["images"][i])
  assert _digest(tmp_path) == before


def test_truncated_file(shared_testdata, tmp_path):
  rec = _copy_pack(shared_testdata, "plain", tmp_path)
  with open(rec, "r+b") as f:
    f.truncate(35000)  # inside key 13, the last record in the file
  with pytest.raises(recordio.RecordIOError,
                     match=r"record key 13 at byte 34572: truncated.*35000 bytes"):
    recordio.RecordIOSource(rec)
  source = recordio.RecordIOSource(rec, on_error="skip")
  assert len(source) == 14 and source.skipped[0][0] == 13


def test_idx_offset_beyond_end_of_file(shared_testdata, tmp_path):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  idx = tmp_path / "train.idx"
  idx.write_text(idx.read_text().replace("3\t5836\n", "3\t999999\n"))
  with pytest.raises(recordio.RecordIOError,
                     match=r"record key 3 at byte 999999: offset is beyond the end"):
    recordio.RecordIOSource(rec)
  assert len(recordio.RecordIOSource(rec, on_error="skip")) == 14
  # An offset inside a record lands on a non-magic word.
  idx.write_text(idx.read_text().replace("3\t999999\n", "3\t5840\n"))
  with pytest.raises(recordio.RecordIOError, match=r"record key 3 at byte 5840: wrong magic"):
    recordio.RecordIOSource(rec)


def test_malformed_or_missing_idx(shared_testdata, tmp_path):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  (tmp_path / "train.idx").write_text("1\t0\n2 oops\n")
  with pytest.raises(recordio.RecordIOError, match=r"train\.idx: line 2 is '2 oops'"):
    recordio.RecordIOSource(rec)
  os.remove(tmp_path / "train.idx")
  with pytest.raises(FileNotFoundError, match=r"train\.idx does not exist"):
    recordio.RecordIOSource(rec)


def test_undecodable_image(shared_testdata, expected, tmp_path, caplog):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  _patch(rec, 8644 + 8 + 24, b"\0\0\0\0")  # key 4's JPEG SOI: framing intact
  source = recordio.RecordIOSource(rec)  # nothing decoded at construction
  assert len(source) == 15
  with pytest.raises(recordio.RecordIOError,
                     match=r"record key 4 at byte 8644: cannot decode its image"):
    source[3]
  with pytest.raises(recordio.RecordIOError, match="record key 4"):
    recordio.RecordIOSource(rec, decode=False)[3]
  assert [k for k, _ in source.validate(progress=False)] == [4]
  assert len(source) == 15  # 'raise' mode: validate only reports
  skipping = recordio.RecordIOSource(rec, on_error="skip")
  with caplog.at_level(logging.WARNING):
    replaced = skipping[3]  # replaced by the next readable record
  assert replaced["key"] == 5 and skipping.num_replaced == 1 and "record key 4" in caplog.text
  np.testing.assert_array_equal(replaced["image"], expected["images"][4])
  assert [k for k, _ in skipping.validate(decode=False, progress=False)] == [4]
  assert len(skipping) == 14 and skipping.skipped[0][0] == 4
  np.testing.assert_array_equal(skipping[3]["image"], expected["images"][4])


def test_label_out_of_range(shared_testdata, tmp_path):
  rec = _copy_pack(shared_testdata, "insightface", tmp_path)
  (tmp_path / "property").write_text("3,112,112")
  with pytest.raises(recordio.RecordIOError,
                     match=r"record key 12 at byte 26760: label 3 is outside \[0, 3\)"):
    recordio.RecordIOSource(rec)
  source = recordio.RecordIOSource(rec, on_error="skip")
  assert len(source) == 11 and [k for k, _ in source.skipped] == [12, 13, 14, 15]
  assert recordio.RecordIOSource(rec, num_classes=4).num_classes == 4
  with pytest.raises(recordio.RecordIOError,
                     match=r"label 2 is outside \[0, 2\) \(num_classes from the num_classes arg"):
    recordio.RecordIOSource(rec, num_classes=2, on_error="raise")


def test_non_integer_label(tmp_path):
  _write_raw(tmp_path / "x.rec", [(0, recordio.pack(0.0, _encode(_face(0)))),
                                  (1, recordio.pack(1.5, _encode(_face(1))))])
  with pytest.raises(recordio.RecordIOError, match=r"record key 1 .*label 1\.5 is not"):
    recordio.RecordIOSource(tmp_path / "x.rec")


def test_wrong_image_size(tmp_path):
  small = np.zeros((100, 90, 3), np.uint8)
  _write_raw(tmp_path / "x.rec", [(0, recordio.pack(0.0, _encode(_face(0)))),
                                  (1, recordio.pack(0.0, _encode(small)))])
  source = recordio.RecordIOSource(tmp_path / "x.rec")
  for decode in (True, False):
    with pytest.raises(recordio.RecordIOError, match=r"record key 1 .*image is 90x100"):
      recordio.RecordIOSource(tmp_path / "x.rec", decode=decode)[1]
  bad = source.validate(progress=False)
  assert len(bad) == 1 and "90x100" in bad[0][1]


# -- grain plumbing -----------------------------------------------------------


def test_pickle_and_repr(shared_testdata, expected):
  source = recordio.RecordIOSource(shared_testdata / "mxnet" / "insightface.rec")
  source[0]  # maps the file
  clone = pickle.loads(pickle.dumps(source))
  assert clone._buf is None  # the mapping is reopened lazily, not pickled
  assert repr(clone) == repr(source) == repr(
      recordio.RecordIOSource(shared_testdata / "mxnet" / "insightface.rec"))
  assert "0x" not in repr(source) and "num_records=15" in repr(source)
  np.testing.assert_array_equal(clone[7]["image"], expected["images"][7])


def test_remote_code_path(shared_testdata, expected, tmp_path, monkeypatch):
  # gs:// paths go through epath (whole-file reads, local temp for writing).
  monkeypatch.setattr(recordio.landmark_files, "is_local", lambda path: False)
  source = recordio.RecordIOSource(shared_testdata / "mxnet" / "insightface.rec")
  assert isinstance(source._buf, bytes)
  np.testing.assert_array_equal(source[2]["image"], expected["images"][2])
  with recordio.RecordIOWriter(tmp_path / "train.rec", image_format="png") as writer:
    writer.write(_face(0), 0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]


@pytest.mark.parametrize("decode", [True, False])
def test_through_make_loader(shared_testdata, expected, decode):
  source = recordio.RecordIOSource(shared_testdata / "mxnet" / "insightface.rec", decode=decode)
  loader = pipeline.make_loader(source, global_batch_size=4, seed=0, worker_count=0,
                                shuffle=False, num_epochs=1, flip_prob=0.0)
  batches = list(loader)
  assert len(batches) == 3
  batch = batches[1]
  for key, (shape, dtype) in pipeline.ELEMENT_SPEC.items():
    assert batch[key].shape == (4,) + shape and batch[key].dtype == dtype
  np.testing.assert_array_equal(batch["image"], expected["images"][4:8])
  np.testing.assert_array_equal(batch["label"], expected["labels"][4:8])
  shuffled = pipeline.make_loader(source, global_batch_size=5, seed=3, worker_count=0)
  first = next(iter(shuffled))
  assert first["image"].shape == (5, 112, 112, 3) and set(first["label"]) <= {0, 1, 2, 3}


def test_config_fields_reach_the_source(shared_testdata, expected):
  # `--config.data.bgr_to_rgb=true` (a declared field) reaches the RecordIO source through the
  # pipeline's source factory, and so does `data.on_error`.
  from vigface_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = str(shared_testdata / "mxnet" / "insightface.rec")
  plain = pipeline.build_source(config_lib.data_config(source="recordio", path=path))
  swapped = pipeline.build_source(config_lib.data_config(source="recordio", path=path,
                                                         bgr_to_rgb=True, on_error="skip"))
  np.testing.assert_array_equal(plain[3]["image"], expected["images"][3])
  np.testing.assert_array_equal(swapped[3]["image"], expected["images"][3][..., ::-1])
