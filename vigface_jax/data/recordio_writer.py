"""Writes MXNet RecordIO packs in the insightface layout (`RecordIOWriter`).

The writing half of `recordio` (whose module doc describes the record format and the pack
layouts): `RecordIOWriter` appends image records (keys 1, 2, ...), then identity records, the
meta record and the `property` file on close, writing under temporary names that are renamed
into place only on success. `recordio` re-exports it, so `recordio.RecordIOWriter` keeps working.
"""

from __future__ import annotations

import array
import io
import math
import os
import posixpath
import tempfile
import uuid

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from vigface_jax.data import codec
from vigface_jax.data import landmark_files
from vigface_jax.data.recordio_format import (
    IMAGE_SIZE,
    NUM_LANDMARKS,
    PathLike,
    _DECODE_ERRORS,
    encode_record,
    pack,
)


def _encode_image(image, image_format: str, quality: int) -> bytes:
  if isinstance(image, (bytes, bytearray, memoryview)):
    data = bytes(image)
    try:
      with Image.open(io.BytesIO(data)) as img:
        size = img.size
    except _DECODE_ERRORS as e:
      raise ValueError(f"RecordIOWriter: image bytes ({len(data)} bytes, starting "
                       f"{data[:8]!r}) are not a JPEG/PNG: {e}") from e
    if size != (IMAGE_SIZE, IMAGE_SIZE):
      raise ValueError(f"RecordIOWriter: encoded image is {size[0]}x{size[1]}, "
                       f"expected {IMAGE_SIZE}x{IMAGE_SIZE}.")
    return data
  array = np.asarray(image)
  if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or array.dtype != np.uint8:
    raise ValueError(f"RecordIOWriter: image must be uint8 [{IMAGE_SIZE}, {IMAGE_SIZE}, 3] "
                     f"RGB or encoded bytes, got {array.dtype} {list(array.shape)}.")
  return codec.encode_image(array, image_format, quality)


class RecordIOWriter:
  """Writes an insightface-layout pack: `.rec`, `.idx` and `property`.

  `write()` appends image records with keys 1, 2, ...; `close()` (or leaving
  the `with` block) appends one identity record per class at keys
  `A + c` (`A` = images + 1) holding `[start, end)`, then the meta record
  `[A, B]` with key 0, last in the file as insightface's scripts do, and
  writes `num_classes,112,112` to `property` beside the `.rec`.

  Identity records need each class's images to be consecutive: write the
  images sorted by label. If labels ever decrease, the pack gets no identity
  records (`A = B`, which MXFaceDataset and `RecordIOSource` read fine, and
  MXNet's own vector-label packs do too) and a warning says so.

  Files are written under temporary names and renamed on a successful
  close; an exception inside the `with` block (or `abort()`) deletes them,
  so no half-written pack is ever left under the final names. `gs://`
  destinations are assembled locally and copied on close.
  """

  def __init__(
      self,
      rec_path: PathLike,
      *,
      num_classes: int | None = None,
      idx_path: PathLike | None = None,
      image_format: str = "jpeg",
      quality: int = 95,
      identity_records: bool = True,
      overwrite: bool = False,
  ):
    """Opens the temporary files.

    Args:
      rec_path: destination `.rec` (local or `gs://`).
      num_classes: classes in `property` and identity records; default: max
        label + 1. Labels must lie in `[0, num_classes)`.
      idx_path: destination `.idx`; default beside the `.rec`.
      image_format: `'jpeg'` or `'png'` for images given as arrays.
      quality: JPEG quality.
      identity_records: write identity records (when labels are sorted).
      overwrite: replace an existing pack instead of refusing.

    Raises:
      FileExistsError: the `.rec` exists and `overwrite` is False.
      ValueError: bad arguments.
    """
    if image_format not in ("jpeg", "png"):
      raise ValueError(f"RecordIOWriter: image_format={image_format!r} must be 'jpeg' or 'png'.")
    if num_classes is not None and int(num_classes) <= 0:
      raise ValueError(f"RecordIOWriter: num_classes={num_classes} must be positive.")
    self.rec_path = os.fspath(rec_path)
    self.idx_path = (os.path.splitext(self.rec_path)[0] + ".idx" if idx_path is None
                     else os.fspath(idx_path))
    self.property_path = str(epath.Path(self.rec_path).parent / "property")
    self.num_classes = None if num_classes is None else int(num_classes)
    self.image_format = image_format
    self.quality = int(quality)
    self.identity_records = bool(identity_records)
    if not overwrite and epath.Path(self.rec_path).exists():
      raise FileExistsError(f"RecordIOWriter: {self.rec_path} exists; pass overwrite=True.")
    self._remote = not landmark_files.is_local(self.rec_path)
    tag = uuid.uuid4().hex[:8]
    if self._remote:
      self._tmpdir = tempfile.mkdtemp(prefix="recordio-")
      tmp = lambda p: os.path.join(self._tmpdir, posixpath.basename(p))
    else:
      self._tmpdir = None
      tmp = lambda p: os.path.join(os.path.dirname(p) or ".",
                                   f".{os.path.basename(p)}.tmp-{tag}")
    self._final = [self.rec_path, self.idx_path, self.property_path]
    self._tmp = [tmp(p) for p in self._final]
    self._rec = open(self._tmp[0], "wb")
    self._idx = open(self._tmp[1], "w", encoding="ascii")
    self._pos = 0
    self._next_key = 1
    self._labels = array.array("q")  # compact: packs reach 10**7 images
    self._sorted = True
    self._closed = False

  def write(self, image, label, landmarks=None) -> int:
    """Appends one image record.

    Args:
      image: uint8 `[112, 112, 3]` RGB (encoded with `image_format`), or
        encoded JPEG/PNG bytes stored as given.
      label: the class (an int, stored as MXNet's scalar float label), or a
        vector of floats whose first entry is the class.
      landmarks: optional float `[5, 2]` in the 112x112 frame, stored as the
        vector label `[class, x1, y1, ..., x5, y5]`.

    Returns:
      The record key.

    Raises:
      ValueError: bad image, label or landmarks, or a closed writer.
    """
    if self._closed:
      raise ValueError("RecordIOWriter: write() after close().")
    data = _encode_image(image, self.image_format, self.quality)
    vector = None if np.ndim(label) == 0 else np.asarray(label, np.float32).ravel()
    if landmarks is not None:
      if vector is not None:
        raise ValueError("RecordIOWriter: pass landmarks with a scalar label only.")
      points = np.asarray(landmarks, np.float32)
      if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"RecordIOWriter: landmarks must be [5, 2], got {list(points.shape)}.")
      vector = np.concatenate([[float(label)], points.ravel()]).astype(np.float32)
    if vector is not None and not vector.size:
      raise ValueError("RecordIOWriter: empty vector label.")
    first = float(label) if vector is None else float(vector[0])
    if not (math.isfinite(first) and first >= 0 and first == int(first)) or (
        self.num_classes is not None and first >= self.num_classes):
      raise ValueError(f"RecordIOWriter: label {first} must be an integer in "
                       f"[0, {self.num_classes or 'num_classes'}).")
    class_id = int(first)
    if self._labels and class_id < self._labels[-1]:
      self._sorted = False
    self._labels.append(class_id)
    key = self._next_key
    self._next_key += 1
    self._append(key, pack(first if vector is None else vector, data, id=key))
    return key

  def _append(self, key: int, payload: bytes) -> None:
    record = encode_record(payload)
    self._idx.write(f"{key}\t{self._pos}\n")
    self._rec.write(record)
    self._pos += len(record)

  def close(self) -> None:
    """Writes identity/meta records and `property`, then renames into place."""
    if self._closed:
      return
    try:
      count = len(self._labels)
      if not count:
        raise ValueError(f"RecordIOWriter: no images written to {self.rec_path}.")
      labels = np.frombuffer(self._labels, np.int64)
      num_classes = self.num_classes or int(labels.max()) + 1
      first_identity = count + 1
      end = first_identity
      if self.identity_records and self._sorted:
        stops = 1 + np.cumsum(np.bincount(labels, minlength=num_classes))
        starts = np.concatenate([[1], stops[:-1]])
        for c in range(num_classes):
          self._append(first_identity + c,
                       pack([starts[c], stops[c]], id=first_identity + c))
        end = first_identity + num_classes
      elif self.identity_records:
        logging.warning("RecordIOWriter(%s): labels were not written in sorted order, "
                        "so no identity records (A = B).", self.rec_path)
      if end > 2**24:
        logging.warning("RecordIOWriter(%s): keys beyond 2**24 are not exact in "
                        "MXNet's float32 labels.", self.rec_path)
      self._append(0, pack([first_identity, end], id=0))
      self._rec.close()
      self._idx.close()
      with open(self._tmp[2], "w", encoding="ascii") as f:
        f.write(f"{num_classes},{IMAGE_SIZE},{IMAGE_SIZE}")
      for tmp, final in zip(self._tmp, self._final):
        if self._remote:
          epath.Path(tmp).copy(epath.Path(final), overwrite=True)
        else:
          os.replace(tmp, final)
      self._closed = True
      logging.info("RecordIOWriter: wrote %s (%d images, %d classes, %s identity "
                   "records).", self.rec_path, count, num_classes, end - first_identity)
    except BaseException:
      self.abort()
      raise
    finally:
      self._cleanup()

  def abort(self) -> None:
    """Deletes the temporary files; the destination is left untouched."""
    self._closed = True
    for f in (self._rec, self._idx):
      f.close()
    self._cleanup()

  def _cleanup(self) -> None:
    for tmp in self._tmp:
      if os.path.exists(tmp):
        os.remove(tmp)
    if self._tmpdir is not None and os.path.isdir(self._tmpdir):
      os.rmdir(self._tmpdir)

  def __enter__(self) -> RecordIOWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
