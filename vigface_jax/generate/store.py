"""The resumable shard store of a generation run, its random-access source, and the manifest.

Stage 3 draws `num_ids` identities (labels `0..num_ids-1`) x `images_per_id` images (or the spec's
`counts`, per identity, in augment mode). The labels are cut into shards of `ids_per_shard`
identities (shard `s` = labels `[s*P, min((s+1)*P, num_ids))`), a size that depends on nothing but
the spec, so a run can be resumed with another device count, batch size or number of processes. Each
process writes the shards with `s % num_processes == process_index`; a shard once written is never
written again unless it fails its checksum. Everything lives under `WORKDIR/shards/`:

  spec.json          the run's settings (`ShardStore(spec=...)`); a later run with other settings
                     is refused, so two runs' shards are never mixed.
  shard-00007.npz    a zip of `.npy` arrays, uncompressed, no pickles (`np.load(path,
                     allow_pickle=False)` reads it), label-major (label, then index) whatever
                     order `write_shard` got: `data` uint8 (the encoded images concatenated),
                     `offsets` int64 [n+1] (image i = data[offsets[i]:offsets[i+1]]), and int64
                     [n] `labels`, `indices` (within the identity), `rows` (stage-1 class-centre
                     row), `seeds`; `landmarks` float32 [n, 5, 2]; optional `landmark_owner`
                     int64 [n] and `extra.<name>` [n, ...] (e.g. extra.kind = 'virtual'/'real').
  shard-00007.json   `{shard, file, count, labels: [start, stop], image_format, bytes, sha256 (of
                     the .npz), images_sha256 (of data)}`.

A shard is *complete* iff both files exist and the `.npz` has the size and sha256 its `.json`
records. Both are written under a temporary name in the same directory (`.<name>.tmp-<id>`),
fsynced and renamed into place, the `.npz` first, so a run killed at any moment leaves either a
complete shard or one that is redone; leftover temporary files of this process's shards are
removed when a writing store is opened. Encoding is deterministic (`codec`'s fixed PIL settings,
zip entries with fixed timestamps), so a resumed run yields byte-identical shards.

`StoreSource` serves all shards label-major (renumbered `0..K-1` when identities are excluded);
`write_manifest` writes `WORKDIR/manifest.json` (spec, shards, totals, exports) on process 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import zipfile
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image

from vigface_jax.metrics import TEMP_RE as _TMP_RE, atomic_write
from vigface_jax.data import codec

IMAGE_SIZE = 112
NUM_LANDMARKS = 5
SHARDS_DIR = "shards"
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
IMAGE_FORMATS = ("png", "jpeg")
_REQUIRED_SPEC = ("num_ids", "images_per_id", "ids_per_shard")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SHARD_RE = re.compile(r"^shard-(?P<s>\d{5,})\.(npz|json)$")
_EXTRA_RE = re.compile(r"^[A-Za-z0-9_]+$")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ShardError(ValueError):
  """A shard file is missing, truncated or fails its checksum."""


# -- encoding and files -------------------------------------------------------


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
  """uint8 RGB `[112, 112, 3]` → PNG or JPEG bytes with the project's one encoder (`codec`).

  PIL with fixed settings (PNG: zlib level 6, no metadata; JPEG: `quality`, 4:2:0, baseline),
  so equal pixels always give equal bytes.
  """
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format={image_format!r} must be one of {IMAGE_FORMATS}.")
  return codec.encode_image(np.ascontiguousarray(image, np.uint8), image_format, quality)


def decode_image(data: bytes, *, where: str = "<image>") -> np.ndarray:
  """PNG/JPEG bytes → uint8 RGB `[112, 112, 3]`; a ValueError naming `where` otherwise."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
  except _DECODE_ERRORS as e:
    raise ShardError(f"{where}: cannot decode the stored image ({len(data)} bytes): {e}; "
                     "the shard is corrupt, delete it and rerun generation.") from e
  if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ShardError(f"{where}: stored image is {list(image.shape)}, expected "
                     f"[{IMAGE_SIZE}, {IMAGE_SIZE}, 3].")
  return np.ascontiguousarray(image, np.uint8)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def dumps(value: Any) -> str:
  """Canonical JSON (sorted keys, 2-space indent, trailing newline): equal values, equal bytes."""
  return json.dumps(value, sort_keys=True, indent=2, allow_nan=False) + "\n"


def _write_npz(f, arrays: Mapping[str, np.ndarray]) -> None:
  """An uncompressed `.npz` with fixed zip timestamps (np.savez stamps the current time)."""
  with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
      info.compress_type = zipfile.ZIP_STORED
      info.external_attr = 0o644 << 16
      with zf.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _data_start(path: str) -> int:
  """Byte offset in the shard file where the `data` array's bytes begin."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("data.npy")
  if info.compress_type != zipfile.ZIP_STORED:
    raise ShardError(f"{path}: data.npy is compressed; shards are written uncompressed, this "
                     "file was not written by ShardStore.")
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
      raise ShardError(f"{path}: bad zip local header for data.npy; the file is corrupt.")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    if dtype != np.uint8 or len(shape) != 1:
      raise ShardError(f"{path}: data.npy is {dtype} {list(shape)}, expected uint8 [bytes].")
    return f.tell()


def _as_int(name: str, value: Any, n: int, where: str) -> np.ndarray:
  array = np.asarray(value)
  if array.shape != (n,) or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
    raise ValueError(f"{where}: {name} must be integers of shape [{n}], got {array.dtype} "
                     f"{list(array.shape)}.")
  return array.astype(np.int64)


def _normalise_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(spec, Mapping):
    raise ValueError(f"ShardStore: spec must be a dict, got {type(spec).__name__}.")
  try:
    spec = json.loads(json.dumps(dict(spec), sort_keys=True, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise ValueError(f"ShardStore: spec must be JSON-serialisable (numbers, strings, lists, "
                     f"dicts): {e}") from e
  for key in _REQUIRED_SPEC:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"ShardStore: spec[{key!r}] = {value!r} must be a positive integer "
                       f"(required: {', '.join(_REQUIRED_SPEC)}).")
  if spec.get("image_format", "png") not in IMAGE_FORMATS:
    raise ValueError(f"ShardStore: spec['image_format'] = {spec['image_format']!r} must be "
                     f"one of {IMAGE_FORMATS}.")
  quality = spec.get("quality", 95)
  if not isinstance(quality, int) or not 1 <= quality <= 100:
    raise ValueError(f"ShardStore: spec['quality'] = {quality!r} must be an integer in 1..100.")
  return spec


def _spec_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  return [f"{k}: {show(old, k)} (stored) vs {show(new, k)} (now)"
          for k in sorted(set(old) | set(new)) if old.get(k, old) != new.get(k, old)]


class ShardStore:
  """The shards of one generation run under `WORKDIR/shards/` (module doc).

  Attributes:
    workdir: the generation workdir.
    directory: `WORKDIR/shards`.
    spec: the run's settings (as stored in `spec.json`).
    num_ids, images_per_id, ids_per_shard, image_format, quality: from the spec.
  """

  def __init__(self, workdir: str | os.PathLike, *, spec: Mapping[str, Any] | None = None,
               process_index: int | None = None, num_processes: int | None = None):
    """Opens (and with `spec`, creates) the store.

    Args:
      workdir: the generation workdir.
      spec: the run's JSON-able settings: positive ints `num_ids`, `images_per_id`,
        `ids_per_shard`, optional `image_format` ('png' default, 'jpeg') and `quality` (JPEG,
        95), and anything else that must match on resume (seed, guidance, checkpoint...).
        Saved as `spec.json` on first use. None opens an existing store read-only.
      process_index: this process (default `jax.process_index()`); with `spec`, leftover
        temporary files of this process's shards are removed, never another process's, and
        process 0 writes `spec.json`.
      num_processes: processes writing shards (default `jax.process_count()`).

    Raises:
      FileNotFoundError: `spec` is None and there is no store in `workdir`.
      ValueError: a bad spec, or one that differs from the stored one (naming the keys).
    """
    self.workdir = os.fspath(workdir)
    self.directory = os.path.join(self.workdir, SHARDS_DIR)
    self.spec_path = os.path.join(self.directory, SPEC_FILE)
    stored = None
    if os.path.exists(self.spec_path):
      try:
        with open(self.spec_path, encoding="utf-8") as f:
          stored = _normalise_spec(json.load(f))
      except ValueError as e:
        raise ValueError(f"{self.spec_path}: unreadable spec ({e}); the workdir is damaged: "
                         "use a new workdir.") from e
    if spec is None:
      if stored is None:
        raise FileNotFoundError(f"ShardStore: no shard store in {self.workdir} ({self.spec_path} "
                                "is missing); run generation into this workdir first.")
      self.spec = stored
    else:
      new = _normalise_spec(spec)
      if stored is not None and stored != new:
        raise ValueError(
            f"{self.spec_path}: this workdir holds shards generated with other settings:\n  "
            + "\n  ".join(_spec_diff(stored, new))
            + "\nUse a new workdir, or rerun with the stored settings; shards of two runs "
            "are never mixed.")
      self.spec = new
    self.num_ids, self.images_per_id, self.ids_per_shard = (
        int(self.spec[k]) for k in _REQUIRED_SPEC)
    self.counts = np.asarray(self.spec.get("counts", [self.images_per_id] * self.num_ids))
    if self.counts.shape != (self.num_ids,) or not 1 <= self.counts.min() <= self.counts.max(
    ) <= self.images_per_id:  # per-identity image counts (augment mode)
      raise ValueError("ShardStore: spec counts must be num_ids ints in [1, images_per_id].")
    self.image_format = self.spec.get("image_format", "png")
    self.quality = int(self.spec.get("quality", 95))
    if spec is not None:
      if process_index is None or num_processes is None:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index() if process_index is None else process_index
        num_processes = jax.process_count() if num_processes is None else num_processes
      self._check_process(process_index, num_processes)
      os.makedirs(self.directory, exist_ok=True)
      if stored is None and process_index == 0:  # only process 0 writes (or cleans) spec.json
        atomic_write(self.spec_path, dumps(self.spec))
      self.cleanup(process_index, num_processes)

  # -- layout ---------------------------------------------------------------

  @property
  def num_shards(self) -> int:
    return math.ceil(self.num_ids / self.ids_per_shard)

  def _check_shard(self, s: int) -> int:
    if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not 0 <= s < self.num_shards:
      raise ValueError(f"ShardStore({self.directory}): shard {s!r} is not in "
                       f"[0, {self.num_shards}).")
    return int(s)

  @staticmethod
  def _check_process(process_index: int, num_processes: int) -> None:
    if not (int(num_processes) >= 1 and 0 <= int(process_index) < int(num_processes)):
      raise ValueError(f"ShardStore: process_index={process_index} must be in "
                       f"[0, num_processes={num_processes}).")

  def shard_labels(self, s: int) -> range:
    """The labels of shard `s`: `range(s*P, min((s+1)*P, num_ids))`."""
    s = self._check_shard(s)
    return range(s * self.ids_per_shard, min((s + 1) * self.ids_per_shard, self.num_ids))

  def shard_count(self, s: int) -> int:
    """Images in shard `s`: the `counts` of its identities (`images_per_id` each by default)."""
    span = self.shard_labels(s)
    return int(self.counts[span.start:span.stop].sum())

  def shard_path(self, s: int) -> str:
    return os.path.join(self.directory, f"shard-{self._check_shard(s):05d}.npz")

  def record_path(self, s: int) -> str:
    return os.path.join(self.directory, f"shard-{self._check_shard(s):05d}.json")

  def cleanup(self, process_index: int = 0, num_processes: int = 1) -> list[str]:
    """Removes leftover temporary files of this process's shards (and spec on process 0).

    Returns:
      The paths removed.
    """
    self._check_process(process_index, num_processes)
    removed = []
    if not os.path.isdir(self.directory):
      return removed
    for name in sorted(os.listdir(self.directory)):
      match = _TMP_RE.match(name)
      shard = match and _SHARD_RE.match(match.group("final"))
      if match and (int(shard.group("s")) % num_processes == process_index if shard
                    else process_index == 0):
        path = os.path.join(self.directory, name)
        os.remove(path)
        removed.append(path)
        logging.warning("ShardStore: removed %s, left by an interrupted run.", path)
    return removed

  # -- completeness ---------------------------------------------------------

  def _read_record(self, s: int) -> dict[str, Any]:
    with open(self.record_path(s), encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    return record

  def check(self, s: int, *, verify: bool = True) -> str | None:
    """Why shard `s` is not complete (missing, bad record, size or checksum), or None.

    Args:
      s: the shard.
      verify: also compare the file's sha256 (reads it); False checks existence and size.
    """
    path, record_path = self.shard_path(s), self.record_path(s)
    if not os.path.exists(record_path):
      return "missing" if not os.path.exists(path) else f"{record_path} is missing"
    try:
      record = self._read_record(s)
    except (OSError, ValueError) as e:
      return f"{record_path} is unreadable ({e})"
    labels = self.shard_labels(s)
    want = {"shard": s, "count": self.shard_count(s), "labels": [labels.start, labels.stop],
            "image_format": self.image_format}
    for key, value in want.items():
      if record.get(key) != value:
        return f"{record_path} says {key}={record.get(key)!r}, the spec implies {value!r}"
    if not os.path.exists(path):
      return f"{path} is missing"
    size = os.path.getsize(path)
    if size != record.get("bytes"):
      return (f"{path} has {size} bytes, {record_path} says {record.get('bytes')} "
              "(truncated or overwritten)")
    if verify and sha256_file(path) != record.get("sha256"):
      return f"{path} fails its sha256 check against {record_path} (corrupt)"
    return None

  def is_complete(self, s: int, *, verify: bool = True) -> bool:
    return self.check(s, verify=verify) is None

  def pending(self, process_index: int = 0, num_processes: int = 1, *,
              verify: bool = True) -> list[int]:
    """Shards of this process (`s % num_processes == process_index`) not yet complete.

    Incomplete shards other than missing ones (truncated, corrupt) are logged with their path;
    `write_shard` redoes them.
    """
    self._check_process(process_index, num_processes)
    todo = []
    for s in range(process_index, self.num_shards, num_processes):
      reason = self.check(s, verify=verify)
      if reason is not None and reason != "missing":
        logging.warning("ShardStore: shard %d will be redone: %s.", s, reason)
      if reason is not None:
        todo.append(s)
    return todo

  # -- writing --------------------------------------------------------------

  def write_shard(self, s: int, images: np.ndarray, *, labels: Sequence[int] | np.ndarray,
                  indices: Sequence[int] | np.ndarray, rows: Sequence[int] | np.ndarray,
                  seeds: Sequence[int] | np.ndarray, landmarks: np.ndarray,
                  landmark_owner: Sequence[int] | np.ndarray | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Encodes and writes shard `s` atomically (module doc); safe on a background thread.

    Args:
      s: the shard.
      images: uint8 `[n, 112, 112, 3]` RGB, `n` = the shard's identities x `images_per_id`.
      labels: int `[n]`; with `indices` (int `[n]`, `0..images_per_id-1`, the image's index
        within its identity) each (label, index) of the shard exactly once, in any order.
      rows: int `[n]`, the stage-1 class-centre row each image was conditioned on.
      seeds: int `[n]`, each image's sampling seed.
      landmarks: float `[n, 5, 2]`, the points each image was drawn with (112x112 frame).
      landmark_owner: optional int `[n]`: whose landmarks they are (e.g. a source image id).
      extra: optional `{name: [n, ...] array}` of numbers, bools or strings (names: letters,
        digits, `_`); export reads `extra["kind"]` ('virtual'/'real') into identities.json.

    Returns:
      The shard's record (what `shard-<s>.json` holds).

    Raises:
      ValueError: bad shapes, dtypes, labels or indices (naming the field and shard).
    """
    s = self._check_shard(s)
    where = f"ShardStore.write_shard(shard {s} of {self.directory})"
    span, n, per_id = self.shard_labels(s), self.shard_count(s), self.images_per_id
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape != (n, IMAGE_SIZE, IMAGE_SIZE, 3):
      raise ValueError(f"{where}: images must be uint8 [{n}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] "
                       f"({len(span)} identities x {per_id} images), got {images.dtype} "
                       f"{list(images.shape)}.")
    labels, indices = _as_int("labels", labels, n, where), _as_int("indices", indices, n, where)
    outside = (labels < span.start) | (labels >= span.stop)
    if outside.any():
      raise ValueError(f"{where}: label {labels[outside][0]} is outside the shard's labels "
                       f"[{span.start}, {span.stop}).")
    own = self.counts[span.start:span.stop]
    if ((indices < 0) | (indices >= own[labels - span.start])).any():
      raise ValueError(f"{where}: indices must be in [0, the identity's count <= {per_id}), "
                       f"got [{indices.min()}, {indices.max()}].")
    start_of = np.concatenate([[0], np.cumsum(own)[:-1]])
    slot = start_of[labels - span.start] + indices
    counts = np.bincount(slot, minlength=n)
    if (counts != 1).any():
      first = int(np.argmax(counts != 1))
      label = int(np.searchsorted(start_of, first, side="right") - 1)
      raise ValueError(f"{where}: (label {label + span.start}, index {first - start_of[label]}) "
                       f"occurs {counts[first]} times; every (label, index) of the shard must "
                       "occur exactly once.")
    order = np.argsort(slot, kind="stable")
    points = np.asarray(landmarks, np.float32)
    if points.shape != (n, NUM_LANDMARKS, 2) or not np.isfinite(points).all():
      raise ValueError(f"{where}: landmarks must be finite float [{n}, {NUM_LANDMARKS}, 2], "
                       f"got {list(np.shape(landmarks))}.")
    arrays: dict[str, np.ndarray] = {
        "labels": labels, "indices": indices,
        "rows": _as_int("rows", rows, n, where), "seeds": _as_int("seeds", seeds, n, where),
        "landmarks": points,
    }
    if landmark_owner is not None:
      arrays["landmark_owner"] = _as_int("landmark_owner", landmark_owner, n, where)
    for name, value in sorted((extra or {}).items()):
      array = np.asarray(value)
      if not _EXTRA_RE.match(str(name)):
        raise ValueError(f"{where}: extra name {name!r} must be letters, digits and '_'.")
      if array.ndim < 1 or array.shape[0] != n or array.dtype.kind not in "biufUS":
        raise ValueError(f"{where}: extra[{name!r}] must be an [{n}, ...] array of numbers, "
                         f"bools or strings, got {array.dtype} {list(array.shape)}.")
      arrays[f"extra.{name}"] = array
    arrays = {k: v[order] for k, v in arrays.items()}

    encoded = [encode_image(images[i], self.image_format, self.quality) for i in order]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), np.uint8)
    final, record_path = self.shard_path(s), self.record_path(s)
    os.makedirs(self.directory, exist_ok=True)
    if os.path.exists(record_path):
      os.remove(record_path)  # never pair an old record with a new file
    atomic_write(final, lambda f: _write_npz(f, {"data": data, "offsets": offsets, **arrays}))
    record = {"shard": s, "file": os.path.basename(final), "count": n,
              "labels": [span.start, span.stop], "image_format": self.image_format,
              "bytes": os.path.getsize(final), "sha256": sha256_file(final),
              "images_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(record_path, dumps(record))
    logging.info("ShardStore: wrote %s (%d images, labels %d..%d, %d bytes).", final, n,
                 span.start, span.stop - 1, record["bytes"])
    return record

  # -- reading --------------------------------------------------------------

  def _require(self, s: int, verify: bool) -> None:
    reason = self.check(s, verify=verify)
    if reason is not None:
      reason = f"{self.shard_path(s)} does not exist" if reason == "missing" else reason
      raise ShardError(f"ShardStore: shard {s} is not complete: {reason}. Rerun generation "
                       f"in {self.workdir}: it redoes incomplete and corrupt shards.")

  def read_shard(self, s: int, *, verify: bool = True, data: bool = True) -> dict[str, Any]:
    """Shard `s`'s arrays (module doc: `data`, `offsets`, `labels`, ..., `extra`: a dict).

    Args:
      s: the shard.
      verify: check the sha256 first (else only that the shard is complete by size).
      data: include `data` (the encoded images); False reads only the metadata.

    Raises:
      ShardError: the shard is missing, truncated, fails its checksum or lacks an array
        (naming the file).
    """
    self._require(s, verify)
    path, n = self.shard_path(s), self.shard_count(s)
    try:
      with np.load(path, allow_pickle=False) as npz:
        names = [k for k in npz.files if data or k != "data"]
        out = {k: npz[k] for k in names if not k.startswith("extra.")}
        out["extra"] = {k[len("extra."):]: npz[k] for k in names if k.startswith("extra.")}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ShardError(f"{path}: unreadable shard ({e}); delete it and its .json and rerun "
                       "generation.") from e
    for key in ("data",) * data + ("offsets", "labels", "indices", "rows", "seeds", "landmarks"):
      size = n + 1 if key == "offsets" else n
      if key not in out or (key != "data" and len(out[key]) != size):
        raise ShardError(f"{path}: array {key} is missing or not of length {size}; delete the "
                         "shard and rerun generation.")
    if data and out["offsets"][-1] != out["data"].size:
      raise ShardError(f"{path}: offsets do not match data; delete the shard and rerun.")
    return out

  def encoded(self, s: int, *, verify: bool = True) -> list[bytes]:
    """Shard `s`'s encoded images, label-major."""
    shard = self.read_shard(s, verify=verify)
    data, offsets = shard["data"].tobytes(), shard["offsets"]
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

  def images(self, s: int, *, verify: bool = True) -> np.ndarray:
    """Shard `s`'s images decoded: uint8 `[n, 112, 112, 3]`, label-major."""
    path = self.shard_path(s)
    return np.stack([decode_image(b, where=f"{path} image {i}")
                     for i, b in enumerate(self.encoded(s, verify=verify))])


# -- the random-access source -------------------------------------------------


class StoreSource:
  """grain random-access source over a complete store, label-major (module doc).

  Elements: `image` uint8 `[112, 112, 3]` (unless `decode=False`), `image_bytes` (as stored),
  `label` int32 (renumbered `0..K-1` when labels are excluded), `landmarks` float32 `[5, 2]`,
  `has_landmarks` True, `original_label` (the generated label), `key` (the element index).

  Attributes:
    store: the `ShardStore`.
    num_classes: K, identities kept.
    original_label: int64 `[K]`: the generated label of each class.
    excluded: sorted generated labels left out.
    labels: int32 `[len]` class of every element.
    original_labels, indices, rows, seeds: int64 `[len]` per-element metadata.
    landmarks: float32 `[len, 5, 2]`.
    extra: `{name: [len, ...]}` the shards' extra arrays (names all shards share).
  """

  def __init__(self, workdir: str | os.PathLike, exclude_labels: Iterable[int] = (), *,
               verify: bool = True, decode: bool = True):
    """Checks every shard and reads the metadata (not the images).

    Args:
      workdir: the generation workdir.
      exclude_labels: generated labels to leave out (e.g. flagged by the privacy audit).
      verify: check every shard's sha256 (reads all the data once).
      decode: yield decoded `image` besides `image_bytes`.

    Raises:
      ShardError: a shard is missing or corrupt (naming it).
      ValueError: an excluded label outside `[0, num_ids)`, or nothing left.
    """
    self.store = store = ShardStore(workdir)
    self.decode = bool(decode)
    excluded = sorted({int(x) for x in exclude_labels})
    bad = [x for x in excluded if not 0 <= x < store.num_ids]
    if bad:
      raise ValueError(f"StoreSource({store.workdir}): exclude_labels {bad[:5]} are outside "
                       f"[0, num_ids={store.num_ids}).")
    if len(excluded) == store.num_ids:
      raise ValueError(f"StoreSource({store.workdir}): every identity is excluded.")
    self.excluded = tuple(excluded)
    self._paths = [store.shard_path(s) for s in range(store.num_shards)]
    # read_shard raises naming the shard when one is missing, truncated or corrupt.
    shards = [store.read_shard(s, verify=verify, data=False) for s in range(store.num_shards)]
    self._starts = [_data_start(path) for path in self._paths]
    cat = lambda key: np.concatenate([shard[key] for shard in shards])
    original = cat("labels")
    keep = ~np.isin(original, excluded)
    self._shard = np.repeat(np.arange(store.num_shards), [len(x["labels"]) for x in shards])[keep]
    self._begin = np.concatenate([x["offsets"][:-1] for x in shards])[keep]
    self._end = np.concatenate([x["offsets"][1:] for x in shards])[keep]
    self.original_labels = original[keep]
    self.original_label = np.setdiff1d(np.arange(store.num_ids), excluded).astype(np.int64)
    table = np.full(store.num_ids, -1, np.int64)
    table[self.original_label] = np.arange(len(self.original_label))
    self.labels = table[self.original_labels].astype(np.int32)
    self.num_classes = len(self.original_label)
    self.indices, self.rows, self.seeds = (cat(k)[keep] for k in ("indices", "rows", "seeds"))
    self.landmarks = cat("landmarks").astype(np.float32)[keep]
    shared = set.intersection(*(set(x["extra"]) for x in shards))
    self.extra = {k: np.concatenate([x["extra"][k] for x in shards])[keep] for k in sorted(shared)}
    logging.info("%r", self)

  def __len__(self) -> int:
    return len(self.labels)

  def encoded(self, index: int) -> bytes:
    """Element `index`'s encoded image."""
    s = int(self._shard[index])
    begin, end = int(self._begin[index]), int(self._end[index])
    with open(self._paths[s], "rb") as f:
      f.seek(self._starts[s] + begin)
      data = f.read(end - begin)
    if len(data) != end - begin:
      raise ShardError(f"{self._paths[s]}: truncated while reading element {index}; rerun "
                       "generation in this workdir.")
    return data

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"StoreSource: index {i} outside [0, {len(self)}).")
    data = self.encoded(i)
    element = {"image_bytes": data, "label": np.int32(self.labels[i]),
               "landmarks": self.landmarks[i].copy(), "has_landmarks": np.bool_(True),
               "original_label": int(self.original_labels[i]), "key": i}
    if self.decode:
      element["image"] = decode_image(
          data, where=f"{self._paths[int(self._shard[i])]} (element {i})")
    return element

  def __repr__(self) -> str:
    return (f"StoreSource(workdir={self.store.workdir!r}, images={len(self.labels)}, "
            f"num_classes={self.num_classes}, excluded={len(self.excluded)})")


# -- the manifest -------------------------------------------------------------


def manifest(workdir: str | os.PathLike, exports: Mapping[str, Any] | None = None) -> dict:
  """The manifest of `workdir` (built from `spec.json` and the shard records, not written).

  Returns:
    `{"spec", "shards": [{shard, file, count, labels, bytes, sha256, images_sha256}],
    "missing": [shard ids without a record], "complete", "totals": {shards, complete_shards,
    images, identities, bytes}, "exports"}` (files relative to `workdir`).
  """
  store = ShardStore(workdir)
  shards, missing = [], []
  for s in range(store.num_shards):
    try:
      record = store._read_record(s)  # pylint: disable=protected-access
    except FileNotFoundError:
      missing.append(s)
      continue
    except (OSError, ValueError) as e:
      raise ValueError(f"{store.record_path(s)}: unreadable ({e}); rerun generation to redo "
                       f"shard {s}.") from e
    shards.append(dict(record, file=f"{SHARDS_DIR}/{record['file']}"))
  totals = {"shards": store.num_shards, "complete_shards": len(shards),
            "images": sum(r["count"] for r in shards),
            "identities": sum(r["labels"][1] - r["labels"][0] for r in shards),
            "bytes": sum(r["bytes"] for r in shards)}
  return {"spec": store.spec, "shards": shards, "missing": missing, "complete": not missing,
          "totals": totals, "exports": dict(exports or {})}


def write_manifest(workdir: str | os.PathLike, exports: Mapping[str, Any] | None = None, *,
                   is_main: bool | None = None) -> dict:
  """Writes `WORKDIR/manifest.json` atomically on the main process; returns the manifest.

  Args:
    workdir: the generation workdir.
    exports: what `export.export` returned (files with sizes and sha256), if anything.
    is_main: whether this process writes shared files (default `jax.process_index() == 0`).
  """
  if is_main is None:
    import jax  # pylint: disable=g-import-not-at-top
    is_main = jax.process_index() == 0
  value = manifest(workdir, exports)
  if is_main:
    atomic_write(os.path.join(os.fspath(workdir), MANIFEST_FILE), dumps(value))
  return value
