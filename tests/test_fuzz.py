"""Bounded property-based fuzzing (hypothesis) of every parser that reads what users hand us.

Each parser gets a fixed number of examples per CI run (`derandomize=True`: the same examples
every run, so a failure reproduces), and for every input it must either return a result or
raise one of its documented error types: never another exception, a hang, or an allocation
sized by a field of the input.

* RecordIO: `read_record` and `unpack_header` on arbitrary bytes, `parse_idx` on arbitrary
  text, and `RecordIOSource` over a real pack with bytes flipped, truncated or an `.idx`
  pointing anywhere (both `on_error` modes).
* `.bin` verification packs (`load_bin`): arbitrary bytes, arbitrary pickled structures, and a
  valid pack with bytes flipped or cut (crafted malicious pickles are `test_verification.py`'s).
* Landmark side files (`read_landmarks`): arbitrary text and bytes.
* The `configs/<file>.py:arg` argument parser (`config_lib.parse_arg`).
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile

import numpy as np
from PIL import Image
import pytest

from conftest import require

_EXAMPLES = 150  # per parser and CI run


def _hyp():
  return require("hypothesis", 'the fuzz tests need hypothesis: pip install -e ".[test]"')


def _settings(examples: int = _EXAMPLES):
  h = _hyp()
  return h.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(h.HealthCheck))


def _run(test, *strategies, examples: int = _EXAMPLES):
  """Runs `test` under hypothesis with the given strategies (so the import stays lazy)."""
  h = _hyp()
  h.settings(_settings(examples))(h.given(*strategies)(test))()


def _face(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=80)
  return out.getvalue()


# ------------------------------------------------------------------- RecordIO


def test_read_record_and_header_on_arbitrary_bytes():
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies

  def check(buf, offset):
    try:
      payload, end = recordio.read_record(buf, offset, name="fuzz.rec")
    except recordio.RecordIOError:
      return
    assert isinstance(payload, bytes) and len(payload) <= len(buf) and offset < end
    try:
      recordio.unpack_header(payload)
    except recordio.RecordIOError:
      pass

  magic = (0xCED7230A).to_bytes(4, "little")
  blobs = st.one_of(st.binary(max_size=256),
                    st.binary(max_size=64).map(lambda b: magic + b),  # framing that starts right
                    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(
                        lambda t: magic + t[0].to_bytes(4, "little") + t[1]),
                    _records(st))  # well-formed records, damaged or not
  _run(check, blobs, st.integers(-4, 300))


def _records(st):
  """Valid RecordIO records of random payloads (some holding the magic word, which dmlc
  splits into chunks), then maybe a flipped byte or a cut tail."""
  from vigface_jax.data import recordio_format  # pylint: disable=g-import-not-at-top
  magic = (0xCED7230A).to_bytes(4, "little")
  payload = st.lists(st.one_of(st.binary(max_size=24), st.just(magic)), max_size=4).map(b"".join)

  def damage(t):
    data, flip, cut = bytearray(recordio_format.encode_record(t[0])), t[1], t[2]
    if flip is not None and data:
      data[flip[0] % len(data)] = flip[1]
    return bytes(data[:max(0, len(data) - cut)])

  return st.tuples(payload, st.one_of(st.none(), st.tuples(st.integers(0, 99),
                                                           st.integers(0, 255))),
                   st.sampled_from([0, 0, 0, 1, 3, 8])).map(damage)


def test_parse_idx_on_arbitrary_text():
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies

  def check(text):
    try:
      keys, offsets = recordio.parse_idx(text, name="fuzz.idx")
    except recordio.RecordIOError as e:
      assert "fuzz.idx" in str(e)
      return
    assert keys.dtype == offsets.dtype == np.int64 and len(keys) == len(offsets)
    assert (keys >= 0).all() and (offsets >= 0).all()

  line = st.one_of(st.text(max_size=30),
                   st.tuples(st.integers(-5, 2**70), st.integers(-5, 2**70)).map(
                       lambda t: f"{t[0]}\t{t[1]}"))
  _run(check, st.lists(line, max_size=8).map("\n".join))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("pack") / "train.rec"
  with recordio.RecordIOWriter(str(out), identity_records=True) as writer:
    for i in range(6):
      writer.write(_face(i), i % 3)
  return out.read_bytes(), out.with_suffix(".idx").read_text()


def test_recordio_source_on_damaged_packs(pack):
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies
  rec, idx = pack
  lines = idx.splitlines()

  def check(flips, cut, idx_offset, on_error):
    data = bytearray(rec)
    for position, value in flips:
      data[position % len(data)] = value
    data = bytes(data[:len(data) - cut])
    index = list(lines)
    if idx_offset is not None:  # one record's offset anywhere, past the end included
      key = index[-1].split("\t")[0]
      index[-1] = f"{key}\t{idx_offset}"
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "train.rec")
      with open(path, "wb") as f:
        f.write(data)
      with open(os.path.join(d, "train.idx"), "w") as f:
        f.write("\n".join(index) + "\n")
      try:
        source = recordio.RecordIOSource(path, on_error=on_error)
        for i in range(len(source)):
          item = source[i]
          assert item["image"].shape == (112, 112, 3) and item["image"].dtype == np.uint8
      except recordio.RecordIOError as e:
        assert "train" in str(e)  # names the file

  _run(check,
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.integers(0, 200), st.one_of(st.none(), st.integers(0, 10**7)),
       st.sampled_from(["raise", "skip"]), examples=60)


# ----------------------------------------------------------------- .bin packs


def _bin_file(payload: bytes, d: str) -> str:
  path = os.path.join(d, "fuzz.bin")
  with open(path, "wb") as f:
    f.write(payload)
  return path


def _load_or_documented_error(payload: bytes):
  from vigface_jax.evaluate import verification  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    path = _bin_file(payload, d)
    try:
      images, issame = verification.load_bin(path)
    except ValueError as e:  # UnsafePickleError is one too
      assert "fuzz.bin" in str(e)
      return None
  assert images.dtype == np.uint8 and images.shape[1:] == (112, 112, 3)
  assert len(images) == 2 * len(issame)
  return images


def test_load_bin_on_arbitrary_bytes_and_structures():
  st = _hyp().strategies
  _run(_load_or_documented_error, st.binary(max_size=300))
  leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                     st.binary(max_size=40), st.text(max_size=10))
  structures = st.recursive(leaves, lambda inner: st.one_of(
      st.lists(inner, max_size=4), st.tuples(inner, inner),
      st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=12)
  _run(lambda obj, protocol: _load_or_documented_error(pickle.dumps(obj, protocol=protocol)),
       structures, st.integers(0, pickle.HIGHEST_PROTOCOL))


def test_load_bin_on_damaged_valid_packs():
  from vigface_jax.evaluate import verification  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "good.bin")
    images = np.stack([_face(i) for i in range(4)])
    verification.write_bin(path, images, [True, False])
    good = open(path, "rb").read()

  def check(flips, cut):
    data = bytearray(good)
    for position, value in flips:
      data[position % len(data)] = value
    _load_or_documented_error(bytes(data[:len(data) - cut]))

  _run(check, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.integers(0, 100), examples=80)


# ------------------------------------------------------------ landmark files


def test_read_landmarks_on_arbitrary_text_and_bytes():
  from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies

  def check(raw, record_keys):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "landmarks.txt")
      with open(path, "wb") as f:
        f.write(raw)
      try:
        out = landmark_files.read_landmarks(path, record_keys=record_keys)
      except ValueError as e:
        assert "landmarks.txt" in str(e)
        return
    for points in out.values():
      assert points.shape == (5, 2) and np.isfinite(points).all()

  number = st.one_of(st.floats(-500, 500).map(lambda v: f"{v:.3f}"),
                     st.sampled_from(["nan", "inf", "-", "1e999", "0x10", ""]))
  line = st.tuples(st.one_of(st.text(alphabet="ab/._7", max_size=8), st.integers(0, 99).map(str)),
                   st.lists(number, min_size=0, max_size=12)).map(
                       lambda t: " ".join([t[0]] + t[1]))
  text = st.lists(line, max_size=6).map(lambda ls: "\n".join(ls).encode())
  _run(check, st.one_of(text, st.binary(max_size=200)), st.booleans())


# ------------------------------------------------------- config arguments


def test_parse_arg_on_arbitrary_strings():
  from vigface_jax import config_lib  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies

  def check(arg):
    try:
      out = config_lib.parse_arg(arg, variant="default", steps=10, scale=1.0, fast=False,
                                 name=None)
    except ValueError as e:
      assert str(e)
      return
    assert isinstance(out.steps, int) and isinstance(out.scale, float)
    assert isinstance(out.fast, bool) and isinstance(out.variant, str)

  pieces = st.one_of(st.text(max_size=12),
                     st.sampled_from(["steps=3", "scale=0.5", "fast=yes", "steps=x", "=",
                                      "variant=", "name=7", ",,", "steps=1e3", "scale=nan"]))
  _run(check, st.lists(pieces, max_size=4).map(",".join))


def test_the_fuzzer_finds_a_planted_crash():
  """The control: the same harness and budget on a parser with a planted bug (an undocumented
  IndexError on records whose length field exceeds what follows) fails, naming the input."""
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
  st = _hyp().strategies

  def buggy_read(buf, offset):
    payload, end = recordio.read_record(buf, offset)
    return payload[len(payload)]  # off by one: IndexError, not RecordIOError

  def check(buf):
    try:
      buggy_read(buf, 0)
    except recordio.RecordIOError:
      pass

  with pytest.raises(IndexError):
    _run(check, _records(st))
