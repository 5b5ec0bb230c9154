"""MXNet RecordIO byte format: records, chunks, the image-record header, `.idx` files.

The codec under `data.recordio` (DESIGN §2), kept apart from the source and writer so each file
reads in one sitting. Little-endian; each record is `uint32 magic 0xCED7230A`, `uint32 lrec`
(`cflag = lrec >> 29`, `length = lrec & (2^29 − 1)`), payload, zero padding to 4 bytes. cflag 0
is a whole record; 1/2/3 are first/middle/last chunks of a payload that MXNet's writer split
wherever the magic occurred at a 4-aligned offset (dropping those 4 bytes, which a reader puts
back). Payloads start with the 24-byte `<IfQQ` header (flag, label, id, id2), then `flag`
float32 labels when flag > 0, then the encoded image.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import struct
from typing import Any, NamedTuple, Union

from etils import epath
import numpy as np
from PIL import Image

from vigface_jax.data import landmark_files
from vigface_jax.data import landmarks as landmarks_lib

IMAGE_SIZE = landmarks_lib.IMAGE_SIZE
NUM_LANDMARKS = landmarks_lib.NUM_LANDMARKS
ON_ERROR = ("raise", "skip")

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
# Native `IfQQ` in MXNet; identical to little-endian since Q is 8-aligned.
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
# `[class, x1, y1, ..., x5, y5]`: how landmarks travel in a vector label.
LANDMARK_FLAG = 1 + 2 * NUM_LANDMARKS

PathLike = Union[str, os.PathLike]

# Records scanned per vectorised block: bounds the gather index memory
# (block x 36 x 8 bytes) whatever the pack size.
_SCAN_BLOCK = 1 << 16
# Bytes the scan reads per record: framing (8), IR header (24), first label.
_SCAN_BYTES = 8 + IR_SIZE + 4
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                  Image.DecompressionBombError)


class RecordIOError(ValueError):
  """A RecordIO file (or its `.idx`/label file) holds something unreadable."""


class IRHeader(NamedTuple):
  """MXNet's image-record header; `label` is a float, or float32 `[flag]`."""
  flag: int
  label: Any
  id: int
  id2: int


def _where(name: str, key: int | None, offset: int | None) -> str:
  where = str(name)
  if key is not None:
    where += f": record key {key}"
  if offset is not None:
    where += f" at byte {offset}" if key is not None else f": byte {offset}"
  return where


def _pad4(n: int) -> int:
  return (n + 3) & ~3


# ---------------------------------------------------------------------------
# Record codec.


def read_record(buf, offset: int, *, name: str = "<buffer>",
                key: int | None = None) -> tuple[bytes, int]:
  """Reads the record starting at `offset`, joining chunks as dmlc does.

  Args:
    buf: the file's bytes (`bytes`, `mmap`, or anything `struct` and slicing
      accept).
    offset: byte offset of the record's first chunk (the `.idx` value).
    name: file name for error messages.
    key: record key for error messages.

  Returns:
    `(payload, next_offset)`: the joined payload and the offset just past the
    record's padding.

  Raises:
    RecordIOError: offset past the end, wrong magic, truncated record or a
      broken chunk sequence; the message names file, key and byte offset.
  """
  size = len(buf)
  where = _where(name, key, offset)
  if offset < 0 or offset >= size:
    raise RecordIOError(
        f"{where}: offset is beyond the end of the file ({size} bytes); the "
        ".idx does not belong to this .rec or the .rec is truncated.")
  parts = []
  pos = offset
  while True:
    if pos + 8 > size:
      raise RecordIOError(
          f"{where}: truncated: the record header at byte {pos} runs past the "
          f"end of the file ({size} bytes).")
    magic, lrec = struct.unpack_from("<II", buf, pos)
    if magic != MAGIC:
      raise RecordIOError(
          f"{where}: wrong magic 0x{magic:08X} at byte {pos} (expected "
          f"0x{MAGIC:08X}); the .idx does not match the .rec or the file is "
          "corrupt.")
    cflag, length = lrec >> 29, lrec & _LENGTH_MASK
    if not parts and cflag in (2, 3):
      raise RecordIOError(
          f"{where}: the offset points into the middle of a chunked record "
          f"(chunk flag {cflag}); the .idx does not match the .rec.")
    if parts and cflag in (0, 1):
      raise RecordIOError(
          f"{where}: chunked record broken at byte {pos} (chunk flag {cflag} "
          "where a continuation was expected); the file is corrupt.")
    end = pos + 8 + length
    if end > size:
      raise RecordIOError(
          f"{where}: truncated: the record at byte {pos} says {length} bytes "
          f"but the file ends {size - pos - 8} bytes later ({size} bytes); "
          "re-download or re-copy the .rec.")
    parts.append(bytes(buf[pos + 8:end]))
    pos += 8 + _pad4(length)
    if cflag in (0, 3):
      break
    parts.append(_MAGIC_BYTES)
  return b"".join(parts), pos


def encode_record(payload: bytes) -> bytes:
  """Frames `payload` exactly as dmlc's `RecordIOWriter::WriteRecord`.

  Wherever the magic occurs at a 4-aligned offset inside the payload the
  record is split there and those 4 bytes dropped (chunks cflag 1, 2..., 3);
  only the total is padded, the chunks before it are multiples of 4 already.

  Args:
    payload: record payload (header + image), under 2**29 bytes.

  Returns:
    The bytes to append to the `.rec`.
  """
  payload = bytes(payload)
  size = len(payload)
  if size > _LENGTH_MASK:
    raise ValueError(f"RecordIO records must be under 2**29 bytes, got {size}.")
  words = np.frombuffer(payload, "<u4", size // 4)
  cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
  out = []
  start = 0
  for cut in cuts:
    out += [_MAGIC_BYTES, struct.pack("<I", ((1 if start == 0 else 2) << 29)
                                      | (cut - start)), payload[start:cut]]
    start = cut + 4
  out += [_MAGIC_BYTES,
          struct.pack("<I", ((3 if cuts else 0) << 29) | (size - start)),
          payload[start:], b"\0" * (_pad4(size) - size)]
  return b"".join(out)


def pack(label, image: bytes = b"", *, id: int = 0,  # pylint: disable=redefined-builtin
         id2: int = 0) -> bytes:
  """A record payload as `mx.recordio.pack(IRHeader(0, label, id, id2), image)`.

  Args:
    label: a number (flag 0, stored in the header) or a sequence of floats
      (flag = its length, stored as float32 after the header).
    image: encoded image bytes (empty for meta/identity records).
    id: header id (insightface's scripts store the record key).
    id2: second header id.

  Returns:
    The payload bytes.
  """
  if np.ndim(label) == 0:
    return struct.pack(IR_FORMAT, 0, float(label), id, id2) + bytes(image)
  labels = np.asarray(label, np.float32).ravel()
  return (struct.pack(IR_FORMAT, labels.size, 0.0, id, id2)
          + labels.astype("<f4").tobytes() + bytes(image))


def unpack_header(payload: bytes, *, name: str = "<record>", key: int | None = None,
                  offset: int | None = None) -> tuple[IRHeader, bytes]:
  """Splits a payload into its `IRHeader` and the encoded image.

  Args:
    payload: a record payload (`read_record`).
    name: file name for error messages.
    key: record key for error messages.
    offset: record offset for error messages.

  Returns:
    `(header, image_bytes)`; `header.label` is a float when `flag == 0`, else
    float32 `[flag]`.

  Raises:
    RecordIOError: the payload is shorter than the header says.
  """
  if len(payload) < IR_SIZE:
    raise RecordIOError(
        f"{_where(name, key, offset)}: the payload has {len(payload)} bytes, "
        f"fewer than the {IR_SIZE}-byte image-record header.")
  flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, payload)
  if flag == 0:
    return IRHeader(0, float(label), id_, id2), payload[IR_SIZE:]
  need = IR_SIZE + 4 * flag
  if len(payload) < need:
    raise RecordIOError(
        f"{_where(name, key, offset)}: the header announces {flag} float32 "
        f"labels but the payload has only {len(payload)} bytes.")
  labels = np.frombuffer(payload, "<f4", flag, IR_SIZE).astype(np.float32)
  return IRHeader(flag, labels, id_, id2), payload[need:]


def parse_idx(text: str, *, name: str = "<idx>") -> tuple[np.ndarray, np.ndarray]:
  """Parses `.idx` text (`key<TAB>offset` lines, any order, blank lines ok).

  Args:
    text: the file's contents.
    name: file name for error messages.

  Returns:
    `(keys, offsets)`, int64 `[lines]` in file order.

  Raises:
    RecordIOError: a line is not two non-negative integers (names the line).
  """
  tokens = text.split()
  lines = [line for line in text.splitlines() if line.strip()]
  if len(tokens) == 2 * len(lines):
    try:
      pairs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
      pairs = None
    if pairs is not None and (pairs >= 0).all():
      return pairs[:, 0].copy(), pairs[:, 1].copy()
  # Slow path only to name the offending line.
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    if (len(fields) != 2 or not all(f.isdigit() for f in fields)):
      raise RecordIOError(
          f"{name}: line {number} is {line!r}; expected 'key<TAB>offset' "
          "(two non-negative integers).")
  raise RecordIOError(f"{name}: unparseable .idx.")  # not reached


def read_label_file(path: PathLike) -> tuple[dict[int, str], list[str]]:
  """Reads a DCFace-style `list.txt`: `key<TAB>identity/file` per line.

  Args:
    path: the file (local or `gs://`).

  Returns:
    `({key: identity folder name}, sorted identity names)`; the class of a
    key is the index of its name in the sorted list.

  Raises:
    RecordIOError: a malformed line (named) or a name with no folder part.
  """
  path = os.fspath(path)
  identities: dict[int, str] = {}
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 2:
      fields = line.split(None, 1)
    name = posixpath.normpath(fields[1].strip()) if len(fields) == 2 else ""
    if (len(fields) != 2 or not fields[0].strip().isdigit() or "/" not in name
        or name.startswith("../")):
      raise RecordIOError(
          f"label file {path}: line {number} is {line!r}; expected "
          "'key<TAB>identity/file' (the identity is the folder part).")
    identities[int(fields[0])] = name.split("/", 1)[0]
  if not identities:
    raise RecordIOError(f"label file {path} has no entries.")
  return identities, sorted(set(identities.values()))


def _open_buffer(path: str):
  """The `.rec` bytes: an mmap locally (shared page cache), else in memory."""
  if not landmark_files.is_local(path):
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      return b""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _read_property(path: str) -> int | None:
  p = epath.Path(path)
  if not p.exists():
    return None
  text = p.read_text().strip()
  first = text.split(",")[0].strip()
  if not first.isdigit() or int(first) <= 0:
    raise RecordIOError(
        f"property file {path} is {text!r}; expected 'num_classes,112,112'.")
  return int(first)


# ---------------------------------------------------------------------------
# Vectorised scan of record framing and labels.


class _Scan(NamedTuple):
  error: list          # per record: None or a message
  flag: np.ndarray     # uint32
  label: np.ndarray    # float64, the class label as stored
  image_size: np.ndarray  # int64 bytes of encoded image


def _scan(buf, keys: np.ndarray, offsets: np.ndarray, name: str) -> _Scan:
  """Checks framing/headers of the records at `offsets` without decoding.

  Whole records (cflag 0, all but about one in a million) are checked with
  numpy gathers; chunked ones go through `read_record`.
  """
  n = len(offsets)
  size = len(buf)
  data = np.frombuffer(buf, np.uint8) if size else np.zeros(1, np.uint8)
  flag = np.zeros(n, np.uint32)
  label = np.zeros(n, np.float64)
  image_size = np.zeros(n, np.int64)
  error: list = [None] * n
  span = np.arange(_SCAN_BYTES, dtype=np.int64)
  for lo in range(0, n, _SCAN_BLOCK):
    off = offsets[lo:lo + _SCAN_BLOCK]
    pos = np.minimum(off[:, None] + span, max(size - 1, 0))
    raw = data[pos]  # [block, 36] (bytes past EOF read as the last byte)
    words = np.ascontiguousarray(raw[:, :16]).view("<u4")  # magic lrec flag -
    floats = np.ascontiguousarray(raw).view("<f4")
    magic, lrec, rflag = words[:, 0], words[:, 1], words[:, 2]
    cflag, length = lrec >> 29, (lrec & _LENGTH_MASK).astype(np.int64)
    rlabel = np.where(rflag == 0, floats[:, 3], floats[:, 8]).astype(np.float64)
    labels_end = IR_SIZE + 4 * rflag.astype(np.int64)
    ok = ((off + 8 <= size) & (magic == MAGIC) & (cflag == 0)
          & (off + 8 + length <= size) & (length >= labels_end))
    flag[lo:lo + len(off)] = rflag
    label[lo:lo + len(off)] = rlabel
    image_size[lo:lo + len(off)] = length - labels_end
    for j in np.flatnonzero(~ok):
      i = lo + int(j)
      # Rare: chunked records, or bad ones, whose message read_record writes.
      try:
        payload, _ = read_record(buf, int(offsets[i]), name=name, key=int(keys[i]))
        header, image = unpack_header(payload, name=name, key=int(keys[i]),
                                      offset=int(offsets[i]))
      except RecordIOError as e:
        error[i] = str(e)
        continue
      flag[i] = header.flag
      label[i] = header.label if header.flag == 0 else header.label[0]
      image_size[i] = len(image)
  return _Scan(error, flag, label, image_size)


