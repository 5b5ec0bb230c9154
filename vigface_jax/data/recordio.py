"""MXNet RecordIO packs (insightface `train.rec` + `.idx` + `property`) without mxnet.

How CASIA-WebFace, MS1M, Glint360K and WebFace are distributed. This module
reads them (`RecordIOSource`, a grain random-access source, with its
bad-record handling) and re-exports the writer (`RecordIOWriter`, files that
MXNet and insightface's `MXFaceDataset` read; it lives in `recordio_writer`)
and the record codec (`read_record`, `encode_record`, `pack`,
`unpack_header`, `parse_idx`; in `recordio_format`), so all of them are
reachable as `recordio.X`.

**Records** (dmlc-core `recordio`, little-endian): `uint32 magic 0xCED7230A`,
`uint32 lrec` (`cflag = lrec >> 29`, `length = lrec & (2**29 - 1)`), payload,
zero padding to a multiple of 4. dmlc's writer splits a payload wherever the
magic occurs at a 4-aligned offset inside it (so that a reader resyncing on
the magic never lands mid-record) and drops those 4 bytes: cflag 1/2/3 are
the first/middle/last chunk, 0 a whole record. Readers join the chunks,
re-inserting the magic between them. The `.idx` is text, `key<TAB>offset` per
line, in any order; the offset is that of the record's first chunk.

**Payload** (`mx.recordio.pack`): the 24-byte header `<IfQQ` (flag, label, id,
id2); if flag > 0, `flag` float32 labels follow and the scalar label is
unused; then the encoded image (JPEG or PNG, decoding to RGB).

**Layouts.**
* insightface: record 0 is a meta record (flag >= 2, labels `[A, B]`, no
  image); keys `1..A-1` are images; keys `A..B-1` are identity records, the
  one at `A + c` holding class `c`'s key range `[start, end)`. insightface's
  scripts write the meta record last in the file while giving it key 0.
* plain (`im2rec`, DCFace): record 0 is an image (flag 0, or a vector label
  followed by image bytes); every key in the `.idx` is an image, keys may
  start at 0 and appear in any order.
Records are served in ascending key order.

**Labels.** The class of an image is its scalar label (flag 0) or its first
label (flag > 0); it must be a non-negative integer. `num_classes` comes, in
this order, from the `num_classes` argument, the side label file, the
`property` file beside the `.rec` (`num_classes,112,112`), the number of
identity records, or max label + 1. A vector label of exactly 11 floats is
read as `[class, x1, y1, ..., x5, y5]`: five landmarks in the 112x112 frame,
the form `RecordIOWriter.write(..., landmarks=...)` stores (MXFaceDataset
still reads `label[0]` as the class). `vector_landmarks=False` turns that off
for packs whose 11 labels mean something else.

**Side label file** (`label_file`, DCFace's `list.txt`): lines
`key<TAB>identity/file` replace the labels stored in the records (DCFace
stores 0 everywhere). The class of an image is the rank of its identity
folder name among all names in the file in plain code-point order
(`sorted(names)`, as `ImageFolderSource`), so `classes[label]` is the folder
and the ids match an ImageFolder export of the same images.

**Errors** on user data raise `RecordIOError` (a `ValueError`) naming the
file, the record key and the byte offset: wrong magic, records or `.idx`
offsets past the end of the file, malformed headers, labels that are not
integers in `[0, num_classes)`, undecodable images and images that are not
112x112. The constructor checks every image record's framing and label
(vectorised: ~1 s per million records once the file is in the page cache)
but decodes nothing; `validate()` also decodes every image. With
`on_error='skip'` bad records found by either are dropped (listed in
`.skipped` and logged), and a record that still fails when read (an image
that does not decode) is replaced by the next readable record, the same one
every time, as `ImageFolderSource` does: grain's samplers need every index to
yield an element.

**Paths** may be local (memory-mapped, so pickling the source into grain
workers is cheap and the page cache is shared) or `gs://...` via
`etils.epath`, where the whole `.rec` is read into memory in each process
that reads records: copy large packs to local disk instead.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image, UnidentifiedImageError

# landmark_files: reached as `recordio.landmark_files` (tests patch its is_local).
from vigface_jax.data import landmark_files  # pylint: disable=unused-import
from vigface_jax.data import skip
from vigface_jax.data.recordio_format import (  # pylint: disable=unused-import
    IMAGE_SIZE,
    NUM_LANDMARKS,
    ON_ERROR,
    LANDMARK_FLAG,
    PathLike,
    _DECODE_ERRORS,
    RecordIOError,
    _where,
    read_record,
    encode_record,
    pack,
    unpack_header,
    parse_idx,
    read_label_file,
    _open_buffer,
    _read_property,
    _Scan,
    _scan,
)
from vigface_jax.data.recordio_writer import RecordIOWriter  # pylint: disable=unused-import

# ---------------------------------------------------------------------------
# The grain source.


class RecordIOSource:
  """grain random-access source over an MXNet RecordIO pack (module doc).

  Elements, in ascending image-key order: `image` uint8 `[112, 112, 3]` RGB
  (or `image_bytes`, the stored JPEG/PNG, with `decode=False`, for
  `pipeline.Decode`), `label` int32, `landmarks` float32 `[5, 2]` (zeros
  unless the record carries them, see module doc), `has_landmarks` bool,
  `key` the record key (int).

  Attributes:
    rec_path: the `.rec` given.
    idx_path: the `.idx` read.
    num_classes: number of classes (module doc says where it comes from).
    classes: identity folder names with a `label_file` (`classes[label]`),
      else None.
    layout: `'insightface'` (meta record 0) or `'plain'`.
    skipped: `(key, reason)` of the records dropped in skip mode (by the
      constructor and `validate()`).
    num_replaced: records this process replaced at read time in skip mode.
  """

  def __init__(
      self,
      rec_path: PathLike,
      *,
      idx_path: PathLike | None = None,
      label_file: PathLike | None = None,
      bgr_to_rgb: bool = False,
      on_error: str = "raise",
      decode: bool = True,
      num_classes: int | None = None,
      vector_landmarks: bool = True,
  ):
    """Reads the `.idx` and checks every image record's framing and label.

    Args:
      rec_path: the `.rec` file, local or `gs://`.
      idx_path: its index; default: the `.rec` path with suffix `.idx`.
      label_file: optional DCFace-style `key<TAB>identity/file` list whose
        identities replace the stored labels (module doc).
      bgr_to_rgb: the pack stores BGR pixels (some third-party packs do):
        swap channels. Implies decoding.
      on_error: `'raise'` or `'skip'` for bad records (module doc).
      decode: yield decoded `image`; False yields `image_bytes` (after a
        header check of format and size) for `pipeline.Decode`.
      num_classes: overrides the class count from the files.
      vector_landmarks: read 11-float vector labels as class + landmarks.

    Raises:
      FileNotFoundError: the `.rec`, `.idx` or `label_file` does not exist.
      RecordIOError: bad data (with `on_error='raise'`), or no readable image
        records at all.
      ValueError: bad arguments.
    """
    if on_error not in ON_ERROR:
      raise ValueError(f"RecordIOSource: on_error={on_error!r} must be one of {ON_ERROR}.")
    if num_classes is not None and int(num_classes) <= 0:
      raise ValueError(f"RecordIOSource: num_classes={num_classes} must be positive.")
    self.rec_path = os.fspath(rec_path)
    self.idx_path = (os.path.splitext(self.rec_path)[0] + ".idx" if idx_path is None
                     else os.fspath(idx_path))
    self.label_file = None if label_file is None else os.fspath(label_file)
    self.bgr_to_rgb = bool(bgr_to_rgb)
    self.on_error = on_error
    # Decode's op cannot swap channels, so BGR packs are always decoded here.
    self.decode = bool(decode) or self.bgr_to_rgb
    self.vector_landmarks = bool(vector_landmarks)
    self.skipped: list[tuple[int, str]] = []
    self.num_replaced = 0
    self.classes: list[str] | None = None
    self._lock = threading.Lock()
    self._buf = None

    for path, what in ((self.rec_path, ".rec"), (self.idx_path, ".idx")):
      if not epath.Path(path).exists():
        hint = (" MXNet packs come as train.rec + train.idx; pass idx_path= if "
                "it is named differently." if what == ".idx" else "")
        raise FileNotFoundError(f"RecordIOSource: {what} file {path} does not exist.{hint}")
    if self.label_file is not None and not epath.Path(self.label_file).exists():
      raise FileNotFoundError(f"RecordIOSource: label file {self.label_file} does not exist.")

    keys, offsets = parse_idx(epath.Path(self.idx_path).read_text(), name=self.idx_path)
    if not len(keys):
      raise RecordIOError(f"{self.idx_path} lists no records.")
    # MXIndexedRecordIO keeps the last line of a repeated key; so do we.
    num_lines = len(keys)
    keys, first_rev = np.unique(keys[::-1], return_index=True)
    offsets = offsets[::-1][first_rev]
    if len(keys) < num_lines:
      logging.warning("%s: %d repeated keys; the last line of each is used, as "
                      "MXNet does.", self.idx_path, num_lines - len(keys))
    buf = self._buffer()

    bad: list[tuple[int, int, str]] = []  # (key, offset, reason) in key order
    image_keys, image_offsets = self._image_records(buf, keys, offsets, bad)
    scan = _scan(buf, image_keys, image_offsets, self.rec_path)
    labels = self._labels_from(scan, image_keys, image_offsets, bad)
    self.num_classes = self._resolve_num_classes(labels, num_classes)
    good = np.array([e is None for e in scan.error], bool) & (labels >= 0)
    out_of_range = good & (labels >= self.num_classes)
    for i in np.flatnonzero(out_of_range):
      bad.append((int(image_keys[i]), int(image_offsets[i]),
                  f"{_where(self.rec_path, int(image_keys[i]), int(image_offsets[i]))}: "
                  f"label {labels[i]} is outside [0, {self.num_classes}) "
                  f"(num_classes from {self._num_classes_from})."))
    good &= ~out_of_range
    bad.sort()
    if bad:
      self._handle_bad(bad, total=len(image_keys))
    self._keys = image_keys[good]
    self._offsets = image_offsets[good]
    self._labels = labels[good].astype(np.int32)
    if not len(self._keys):
      raise RecordIOError(f"{self.rec_path}: no readable image records.")
    logging.info("%r: layout %s, %d images, classes from %s.", self, self.layout,
                 len(self), self._num_classes_from)

  # -- construction helpers -------------------------------------------------

  def _image_records(self, buf, keys, offsets, bad):
    """Picks the image keys: 1..A-1 under a meta record, else all keys."""
    self.layout = "plain"
    self.num_identity_records = 0
    if keys[0] != 0:
      return keys, offsets
    offset0 = int(offsets[0])
    try:
      payload, _ = read_record(buf, offset0, name=self.rec_path, key=0)
      header, image = unpack_header(payload, name=self.rec_path, key=0, offset=offset0)
    except RecordIOError as e:
      # Cannot tell meta from image: read the rest as plain records; meta and
      # identity records then fail the image checks and are reported too.
      bad.append((0, offset0, str(e)))
      return keys[1:], offsets[1:]
    if header.flag < 2 or len(image):
      return keys, offsets
    a, b = float(header.label[0]), float(header.label[1])
    if not (a == int(a) and b == int(b) and 1 <= a <= b):
      raise RecordIOError(
          f"{_where(self.rec_path, 0, offset0)}: meta record labels [{a}, {b}] "
          "are not integers 1 <= A <= B (images 1..A-1, identities A..B-1).")
    a, b = int(a), int(b)
    if a > 2**24:
      logging.warning("%s: meta record A=%d exceeds float32's exact integers; "
                      "the image/identity boundary may be off by one.", self.rec_path, a)
    self.layout = "insightface"
    self.num_identity_records = b - a
    expected = np.arange(1, a, dtype=np.int64)
    missing = np.setdiff1d(expected, keys, assume_unique=True)
    for k in missing[:1000].tolist():
      bad.append((k, -1, f"{self.idx_path}: record key {k} is missing although "
                  f"the meta record says images are keys 1..{a - 1}."))
    if len(missing) > 1000:
      logging.warning("%s: %d image keys missing from the .idx (first 1000 listed).",
                      self.idx_path, len(missing))
    extra = int(np.sum(keys >= b))
    if extra:
      logging.info("%s: ignoring %d keys >= B=%d (outside the meta record's ranges).",
                   self.idx_path, extra, b)
    inside = (keys >= 1) & (keys < a)
    return keys[inside], offsets[inside]

  def _labels_from(self, scan: _Scan, keys, offsets, bad) -> np.ndarray:
    """int64 labels (-1 where bad), reporting non-integer or missing labels."""
    labels = np.full(len(keys), -1, np.int64)
    for i, err in enumerate(scan.error):
      if err is not None:
        bad.append((int(keys[i]), int(offsets[i]), err))
    ok = np.array([e is None for e in scan.error], bool)
    no_image = ok & (scan.image_size <= 0)
    for i in np.flatnonzero(no_image):
      bad.append((int(keys[i]), int(offsets[i]),
                  f"{_where(self.rec_path, int(keys[i]), int(offsets[i]))}: the record "
                  "holds no image bytes after its header (a meta/identity record "
                  "listed as an image?)."))
    ok &= ~no_image
    if self.label_file is not None:
      identities, self.classes = read_label_file(self.label_file)
      rank = {name: c for c, name in enumerate(self.classes)}
      for i in np.flatnonzero(ok):
        name = identities.get(int(keys[i]))
        if name is None:
          bad.append((int(keys[i]), int(offsets[i]),
                      f"{_where(self.rec_path, int(keys[i]), int(offsets[i]))}: no "
                      f"entry in label file {self.label_file}."))
        else:
          labels[i] = rank[name]
      unused = len(set(identities) - set(keys.tolist()))
      if unused:
        logging.warning("%s: %d entries name keys that are not image records of %s.",
                        self.label_file, unused, self.rec_path)
      return labels
    stored = scan.label
    integral = ok & np.isfinite(stored) & (stored >= 0) & (stored == np.floor(stored))
    for i in np.flatnonzero(ok & ~integral):
      bad.append((int(keys[i]), int(offsets[i]),
                  f"{_where(self.rec_path, int(keys[i]), int(offsets[i]))}: label "
                  f"{float(stored[i])} is not a non-negative integer class id."))
    labels[integral] = stored[integral].astype(np.int64)
    return labels

  def _resolve_num_classes(self, labels: np.ndarray, requested: int | None) -> int:
    prop_path = str(epath.Path(self.rec_path).parent / "property")
    prop = _read_property(prop_path)
    valid = labels[labels >= 0]
    if requested is not None:
      self._num_classes_from = "the num_classes argument"
      return int(requested)
    if self.classes is not None:
      if prop is not None and prop != len(self.classes):
        logging.warning("%s says %d classes; label file %s has %d identities, used.",
                        prop_path, prop, self.label_file, len(self.classes))
      self._num_classes_from = f"label file {self.label_file}"
      return len(self.classes)
    if prop is not None:
      if self.num_identity_records and self.num_identity_records != prop:
        logging.warning("%s says %d classes but the meta record lists %d identity "
                        "records; using the property file.", prop_path, prop,
                        self.num_identity_records)
      self._num_classes_from = f"property file {prop_path}"
      return prop
    if self.num_identity_records:
      self._num_classes_from = "the identity records"
      return self.num_identity_records
    self._num_classes_from = "max label + 1"
    return int(valid.max()) + 1 if len(valid) else 1

  def _handle_bad(self, bad: list[tuple[int, int, str]], total: int) -> None:
    if self.on_error == "raise":
      more = (f" ({len(bad) - 1} more bad records; on_error='skip' drops them)"
              if len(bad) > 1 else " (on_error='skip' drops bad records)")
      raise RecordIOError(bad[0][2] + more)
    self.skipped.extend((k, reason) for k, _, reason in bad)
    for k, _, reason in bad[:10]:
      logging.warning("RecordIOSource: skipping record %d: %s", k, reason)
    logging.warning("RecordIOSource(%s): skipped %d of %d records (on_error='skip'); "
                    "see .skipped.", self.rec_path, len(bad), total)

  # -- reading --------------------------------------------------------------

  def _buffer(self):
    buf = self._buf
    if buf is None:
      with self._lock:
        if self._buf is None:
          self._buf = _open_buffer(self.rec_path)
        buf = self._buf
    return buf

  @property
  def keys(self) -> np.ndarray:
    """int64 `[num_records]` record key of every element (read-only view)."""
    view = self._keys.view()
    view.flags.writeable = False
    return view

  @property
  def labels(self) -> np.ndarray:
    """int32 `[num_records]` class of every element (read-only view)."""
    view = self._labels.view()
    view.flags.writeable = False
    return view

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, record_key: int) -> dict[str, Any]:
    index = int(record_key)
    if not 0 <= index < len(self):
      raise IndexError(f"RecordIOSource: record {index} outside [0, {len(self)}).")
    if self.on_error == "raise":
      return self._load(index, self.decode)
    return skip.load_or_replace(lambda i: self._load(i, self.decode), index, len(self),
                                errors=RecordIOError, name="RecordIOSource",
                                on_replace=self._count_replaced)

  def _count_replaced(self) -> int:
    with self._lock:
      self.num_replaced += 1
      return self.num_replaced

  def _load(self, index: int, decode: bool) -> dict[str, Any]:
    key, offset = int(self._keys[index]), int(self._offsets[index])
    payload, _ = read_record(self._buffer(), offset, name=self.rec_path, key=key)
    header, data = unpack_header(payload, name=self.rec_path, key=key, offset=offset)
    points = np.zeros((NUM_LANDMARKS, 2), np.float32)
    has_points = self.vector_landmarks and header.flag == LANDMARK_FLAG
    if has_points:
      points = header.label[1:].reshape(NUM_LANDMARKS, 2).astype(np.float32)
    element: dict[str, Any] = {
        "label": np.int32(self._labels[index]),
        "landmarks": points,
        "has_landmarks": np.bool_(has_points),
        "key": key,
    }
    where = _where(self.rec_path, key, offset)
    try:
      with Image.open(io.BytesIO(data)) as img:
        size, mode = img.size, img.mode
        if size == (IMAGE_SIZE, IMAGE_SIZE):
          if not decode:
            # Header only: format and size are known without decoding.
            element["image_bytes"] = bytes(data)
            return element
          image = np.asarray(img.convert("RGB") if mode != "RGB" else img)
    except _DECODE_ERRORS as e:
      reason = ("unrecognised format" if isinstance(e, UnidentifiedImageError)
                else f"{type(e).__name__}: {e}")
      raise RecordIOError(
          f"{where}: cannot decode its image ({len(data)} bytes, starting "
          f"{bytes(data[:8])!r}) as JPEG/PNG: {reason}. validate() lists all such "
          "records; on_error='skip' then drops them.") from e
    if size != (IMAGE_SIZE, IMAGE_SIZE):
      raise RecordIOError(
          f"{where}: the image is {size[0]}x{size[1]} ({mode}), expected "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} ArcFace-aligned crops; align/resize the "
          "pack (e.g. insightface's faces_*_112x112 releases) first.")
    if self.bgr_to_rgb:
      image = image[..., ::-1]
    element["image"] = np.ascontiguousarray(image, dtype=np.uint8)
    return element

  def validate(self, decode: bool = True, progress: bool = True) -> list[tuple[int, str]]:
    """Reads every record (decoding its image unless `decode=False`).

    With `on_error='skip'` the bad records are dropped from this source (so
    call it before building a loader, whose sampler fixes `len`) and added
    to `.skipped`; with `'raise'` nothing changes.

    Args:
      decode: decode each image (slow, thorough); False checks only the
        image header (format and size).
      progress: show a progress bar.

    Returns:
      `(key, reason)` of every bad record, in key order.
    """
    import tqdm  # pylint: disable=g-import-not-at-top

    bad, keep = [], np.ones(len(self), bool)
    for i in tqdm.trange(len(self), desc=f"validating {self.rec_path}",
                         disable=not progress, unit="rec"):
      try:
        self._load(i, decode)
      except RecordIOError as e:
        bad.append((int(self._keys[i]), str(e)))
        keep[i] = False
    if bad:
      logging.warning("RecordIOSource(%s): %d of %d records are bad (first: %s)",
                      self.rec_path, len(bad), len(self), bad[0][1])
      if self.on_error == "skip":
        if keep.any():
          self._keys, self._offsets, self._labels = (
              self._keys[keep], self._offsets[keep], self._labels[keep])
          self.skipped.extend(bad)
        else:
          raise RecordIOError(f"{self.rec_path}: no readable image records.")
    else:
      logging.info("RecordIOSource(%s): all %d records are readable.", self.rec_path,
                   len(self))
    return bad

  # -- grain plumbing -------------------------------------------------------

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]
    state["_buf"] = None  # reopened lazily: workers share the page cache
    state["num_replaced"] = 0  # a count of this process's reads
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    # getattr: also called on a half-built source (error reports, debuggers).
    num_records = len(getattr(self, "_keys", ()))
    return (f"RecordIOSource(rec_path={self.rec_path!r}, num_records={num_records}, "
            f"num_classes={self.num_classes}, label_file={self.label_file!r}, "
            f"bgr_to_rgb={self.bgr_to_rgb}, decode={self.decode}, "
            f"on_error={self.on_error!r})")
