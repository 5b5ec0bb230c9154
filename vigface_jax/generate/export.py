"""Exports a finished shard store to the formats face-recognition trainers read, and checks them.

`export` reads `WORKDIR/shards/` (`store.StoreSource`, which verifies every shard's checksum
first) once, label-major, and writes in `WORKDIR`:

  imagefolder/<label>/<index>.png|jpg   zero-padded names (code-point order = label order, so
                                        `ImageFolderSource` gives the same class ids), plus
  imagefolder/landmarks.txt             the `landmark_files` format, names = relative paths.
  recordio/train.rec, train.idx, property
                                        insightface's layout (`RecordIOWriter`): meta record 0
                                        `[A, B]`, images at keys 1..A-1 in label order, identity
                                        records A..B-1 `[start, end)`. Each image's label is the
                                        vector `[class, x1, y1, ..., x5, y5]`: the class first,
                                        as MXFaceDataset reads it, and the landmarks after it,
                                        as `RecordIOSource` reads them.
  arrayrecord/                          ArrayRecord shards + TFDS metadata (`write_arrayrecord`,
                                        dataset name `DATASET_NAME`).
  identities.json                       per exported label: the generated label, stage-1 row,
                                        kind ('virtual' / 'real', from the shards' `extra.kind`),
                                        per-image seeds and the count; the dropped labels.

Labels are renumbered `0..K-1` in generated order when identities are excluded (e.g. those the
privacy audit flagged). Images are passed through as stored when `image_format` is the store's,
else decoded and re-encoded with the store's deterministic encoder. Each format is written into
`<dir>.tmp-<id>/` and all of them replace their old directories (and identities.json) only once
every one is complete; a killed export leaves the previous export intact and its temporary
directories are removed by the next one. Output is byte-identical on rerun (no timestamps).

Returned per format (for `store.write_manifest`): files relative to the workdir with `bytes` and
`sha256`. The image folder is summarised instead: `count`, `bytes` and a combined `sha256` =
sha256 of the lines `f"{path} {sha256(file)} {size}\\n"` over its image files in sorted path
order (paths relative to the workdir), with `landmarks.txt` listed as a file.

`verify_export` reads every format back with the project's readers (`ImageFolderSource`,
`RecordIOSource`, `ArrayRecordSource`) and compares counts, labels, landmarks and pixels (exact,
unless PNG shards were exported as JPEG: then within `JPEG_TOLERANCE`) against the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tqdm

from vigface_jax import metrics
from vigface_jax.data import arrayrecord
from vigface_jax.data import imagefolder
from vigface_jax.data import landmark_files
from vigface_jax.data import recordio
from vigface_jax.generate import store as store_lib

FORMATS = ("imagefolder", "recordio", "arrayrecord")
DATASET_NAME = "vigface_synthetic"
IDENTITIES_FILE = "identities.json"
LANDMARKS_FILE = "landmarks.txt"
# Mean absolute pixel error allowed for PNG shards re-encoded as JPEG.
JPEG_TOLERANCE = 8.0
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg"}
_RESERVED = ("label", "original_label", "row", "rows", "kind", "seeds", "count")
DROPPED_NOTE = ("These generated identities were left out of every exported format (e.g. the "
                "privacy audit flagged them as too close to a real identity); the others were "
                "renumbered 0..K-1 in generated order: see each identity's original_label.")


def _file_entry(workdir: str, path: str) -> dict[str, Any]:
  return {"path": os.path.relpath(path, workdir).replace(os.sep, "/"),
          "bytes": os.path.getsize(path), "sha256": store_lib.sha256_file(path)}


def _remove_stale(workdir: str) -> None:
  """Deletes the temporary/old directories an interrupted export left."""
  for name in sorted(os.listdir(workdir)):
    base = name.split(".tmp-")[0] if ".tmp-" in name else name.split(".old-")[0]
    if base in FORMATS and name != base:
      path = os.path.join(workdir, name)
      logging.warning("export: removing %s, left by an interrupted export.", path)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _replace_dir(tmp: str, final: str) -> None:
  """Puts the complete directory `tmp` at `final`, replacing an older one."""
  old = None
  if os.path.exists(final):
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
  os.rename(tmp, final)
  if old is not None:
    shutil.rmtree(old)


class _ImageFolderSink:
  """Writes `<tmp>/<label>/<index>.<ext>` and the landmarks file."""

  def __init__(self, tmp: str, final: str, num_classes: int, images_per_id: int, ext: str):
    self.tmp, self.final, self.ext = tmp, final, ext
    self.label_width = len(str(max(num_classes - 1, 0)))
    self.index_width = len(str(max(images_per_id - 1, 0)))
    self.points: dict[str, np.ndarray] = {}
    self.lines: list[str] = []
    self.bytes = 0
    os.makedirs(tmp)

  def name(self, label: int, index: int) -> str:
    return f"{label:0{self.label_width}d}/{index:0{self.index_width}d}{self.ext}"

  def write(self, element: Mapping[str, Any]) -> None:
    name = self.name(int(element["label"]), int(element["index"]))
    path = os.path.join(self.tmp, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = element["image_bytes"]
    with open(path, "wb") as f:
      f.write(data)
    self.points[name] = element["landmarks"]
    rel = f"{os.path.basename(self.final)}/{name}"
    self.lines.append(f"{rel} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
    self.bytes += len(data)

  def close(self, workdir: str) -> dict[str, Any]:
    landmark_files.write_landmarks(os.path.join(self.tmp, LANDMARKS_FILE), self.points)
    self.lines.sort()
    entry = _file_entry(workdir, os.path.join(self.tmp, LANDMARKS_FILE))
    entry["path"] = f"{os.path.basename(self.final)}/{LANDMARKS_FILE}"
    return {"dir": os.path.basename(self.final), "count": len(self.lines), "bytes": self.bytes,
            "sha256": hashlib.sha256("".join(self.lines).encode()).hexdigest(),
            "files": [entry]}


def _elements(source: store_lib.StoreSource, image_format: str,
              quality: int) -> Iterator[dict[str, Any]]:
  """The source's elements with `image_bytes` in `image_format` (passed through if stored so)."""
  same = image_format == source.store.image_format
  for i in range(len(source)):
    data = source.encoded(i)
    if not same:
      image = store_lib.decode_image(data, where=f"{source.store.workdir} element {i}")
      data = store_lib.encode_image(image, image_format, quality)
    yield {"image_bytes": data, "label": int(source.labels[i]),
           "landmarks": source.landmarks[i], "has_landmarks": True,
           "index": int(source.indices[i]), "key": i}


def identities_table(source: store_lib.StoreSource, *, image_format: str,
                     identities: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """What `identities.json` holds for `source` (module doc), `identities` merged per label."""
  num_ids = source.store.num_ids
  if identities is not None and len(identities) != num_ids:
    raise ValueError(f"export: identities has {len(identities)} entries; pass one dict per "
                     f"generated identity (num_ids={num_ids}) or None.")
  kinds = source.extra.get("kind")
  entries = []
  bounds = np.flatnonzero(np.diff(source.labels, prepend=-1, append=-1))
  for start, stop in zip(bounds[:-1], bounds[1:]):
    original = int(source.original_labels[start])
    rows = sorted({int(r) for r in source.rows[start:stop]})
    entry: dict[str, Any] = {
        "label": int(source.labels[start]), "original_label": original,
        "seeds": [int(x) for x in source.seeds[start:stop]], "count": int(stop - start),
    }
    entry.update({"row": rows[0]} if len(rows) == 1 else {"rows": rows})
    if kinds is not None:
      values = sorted({k.decode() if isinstance(k, bytes) else str(k)
                       for k in kinds[start:stop].tolist()})
      entry["kind"] = values[0] if len(values) == 1 else values
    if identities is not None:
      clash = sorted(set(identities[original]) & set(_RESERVED))
      if clash:
        raise ValueError(f"export: identities[{original}] has keys {clash} that identities.json "
                         "computes itself; rename them.")
      entry.update(identities[original])
    entries.append(entry)
  dropped = []
  for original in source.excluded:
    item: dict[str, Any] = {"original_label": int(original)}
    if identities is not None:
      item.update({k: v for k, v in identities[original].items() if k not in _RESERVED})
    dropped.append(item)
  table = {"num_classes": source.num_classes, "num_images": len(source),
           "num_generated": num_ids, "images_per_id": source.store.images_per_id,
           "image_format": image_format, "identities": entries, "dropped": dropped}
  if dropped:
    table["note"] = DROPPED_NOTE
  return table


def export(workdir: str | os.PathLike, formats: Iterable[str] = FORMATS, *,
           exclude_labels: Iterable[int] = (), image_format: str = "png", quality: int = 95,
           identities: Sequence[Mapping[str, Any]] | None = None,
           arrayrecord_shards: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Writes the store of `workdir` in `formats` plus `identities.json` (module doc).

  Call it on one process (process 0) once every shard is written.

  Args:
    workdir: the generation workdir.
    formats: any of `FORMATS`.
    exclude_labels: generated labels to drop; the rest are renumbered `0..K-1`.
    image_format: `'png'` or `'jpeg'` for the exported images.
    quality: JPEG quality when images are re-encoded as JPEG.
    identities: optional, one JSON-able dict per generated identity (`num_ids` of them, e.g.
      audit figures), merged into its entry of identities.json.
    arrayrecord_shards: ArrayRecord shard count (default: one per 10,000 images).
    progress: show a progress bar.

  Returns:
    `{"num_images", "num_classes", "image_format", "dropped", "formats": {format: {...}},
    "identities": {path, bytes, sha256}}`, paths relative to `workdir`, for the manifest.

  Raises:
    store.ShardError: a shard is missing or corrupt (naming it).
    ValueError: bad arguments.
  """
  workdir = os.fspath(workdir)
  formats = tuple(formats)
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or len(set(formats)) != len(formats):
    raise ValueError(f"export: formats={formats} must be distinct names from {FORMATS}.")
  if image_format not in _EXTENSIONS:
    raise ValueError(f"export: image_format={image_format!r} must be 'png' or 'jpeg'.")
  source = store_lib.StoreSource(workdir, exclude_labels, verify=True, decode=False)
  table = identities_table(source, image_format=image_format, identities=identities)
  _remove_stale(workdir)
  tag = uuid.uuid4().hex[:8]
  tmp = {f: os.path.join(workdir, f"{f}.tmp-{tag}") for f in formats}
  final = {f: os.path.join(workdir, f) for f in formats}
  total, classes = len(source), source.num_classes
  folder = writer = None
  try:
    if "imagefolder" in formats:
      folder = _ImageFolderSink(tmp["imagefolder"], final["imagefolder"], classes,
                                source.store.images_per_id, _EXTENSIONS[image_format])
    if "recordio" in formats:
      os.makedirs(tmp["recordio"])
      writer = recordio.RecordIOWriter(os.path.join(tmp["recordio"], "train.rec"),
                                       num_classes=classes, image_format=image_format)

    def elements():
      for element in _elements(source, image_format, quality):
        if folder is not None:
          folder.write(element)
        if writer is not None:
          writer.write(element["image_bytes"], element["label"], element["landmarks"])
        yield element

    if "arrayrecord" in formats:
      arrayrecord.write_arrayrecord(
          elements(), tmp["arrayrecord"], num_examples=total, num_classes=classes,
          name=DATASET_NAME, num_shards=arrayrecord_shards, encoding_format=image_format,
          quality=quality, progress=progress)
    else:
      for _ in tqdm.tqdm(elements(), total=total, desc="export", unit="img",
                         disable=not progress):
        pass
    results: dict[str, Any] = {}
    if folder is not None:
      results["imagefolder"] = folder.close(workdir)
    if writer is not None:
      writer.close()
      writer = None
    for f in ("recordio", "arrayrecord"):
      if f in formats:
        files = sorted(os.listdir(tmp[f]))
        results[f] = {"dir": f, "files": [
            dict(_file_entry(workdir, os.path.join(tmp[f], name)), path=f"{f}/{name}")
            for name in files]}
  except BaseException:
    if writer is not None:
      writer.abort()
    for path in tmp.values():
      shutil.rmtree(path, ignore_errors=True)
    raise
  for f in formats:
    _replace_dir(tmp[f], final[f])
  identities_path = os.path.join(workdir, IDENTITIES_FILE)
  metrics.atomic_write(identities_path, store_lib.dumps(table))
  logging.info("export: %d images of %d identities (%d dropped) to %s as %s.", total, classes,
               len(source.excluded), workdir, ", ".join(formats))
  return {"num_images": total, "num_classes": classes, "image_format": image_format,
          "dropped": list(source.excluded),
          "formats": {f: results[f] for f in formats},
          "identities": _file_entry(workdir, identities_path)}


# ---------------------------------------------------------------------------
# Verification.


def _check_images(name: str, got: np.ndarray, want: np.ndarray, exact: bool, where: str) -> float:
  if got.shape != want.shape:
    raise ValueError(f"{where}: {name} image is {list(got.shape)}, store has "
                     f"{list(want.shape)}.")
  error = float(np.abs(got.astype(np.int16) - want.astype(np.int16)).mean())
  if (exact and error) or error > JPEG_TOLERANCE:
    raise ValueError(f"{where}: pixels differ from the store (mean abs error {error:.2f}"
                     f"{'' if exact else f' > {JPEG_TOLERANCE}'}); export again.")
  return error


def verify_export(workdir: str | os.PathLike, formats: Iterable[str] = FORMATS, *,
                  max_images: int | None = None) -> dict[str, Any]:
  """Reads each exported format back with the project's readers and compares with the store.

  The exclusions and image format are read from `identities.json`. Counts, class counts and
  every label are always checked; images and landmarks for all elements, or `max_images`
  evenly spaced ones.

  Returns:
    `{format: {"images", "num_classes", "checked", "max_mean_abs_error"}}`.

  Raises:
    FileNotFoundError: an export is missing.
    ValueError: a mismatch, naming the file and element.
  """
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, IDENTITIES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"verify_export: {path} is missing; run export first.")
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  ref = store_lib.StoreSource(workdir, [d["original_label"] for d in table["dropped"]])
  exact = not (table["image_format"] == "jpeg" and ref.store.image_format == "png")
  n = len(ref)
  picks = (np.arange(n) if max_images is None or max_images >= n
           else np.unique(np.linspace(0, n - 1, max(int(max_images), 1)).astype(int)))
  report = {}
  for fmt in formats:
    root = os.path.join(workdir, fmt)
    if fmt == "imagefolder":
      reader = imagefolder.ImageFolderSource(
          root, landmarks_file=os.path.join(root, LANDMARKS_FILE))
      where = root
    elif fmt == "recordio":
      where = os.path.join(root, "train.rec")
      reader = recordio.RecordIOSource(where)
      if reader.layout != "insightface" or reader.num_identity_records != ref.num_classes:
        raise ValueError(f"{where}: layout {reader.layout} with {reader.num_identity_records} "
                         f"identity records; expected insightface with {ref.num_classes}.")
    elif fmt == "arrayrecord":
      reader = arrayrecord.ArrayRecordSource(root, decode=True)
      where = root
    else:
      raise ValueError(f"verify_export: unknown format {fmt!r}; use one of {FORMATS}.")
    if len(reader) != n or reader.num_classes != ref.num_classes:
      raise ValueError(f"{where}: {len(reader)} images of {reader.num_classes} classes; the "
                       f"store (minus dropped labels) has {n} of {ref.num_classes}.")
    if fmt in ("imagefolder", "recordio"):
      labels = np.asarray(reader.labels)
      if not np.array_equal(labels, ref.labels):
        first = int(np.flatnonzero(labels != ref.labels)[0])
        raise ValueError(f"{where}: element {first} has label {labels[first]}, the store "
                         f"{ref.labels[first]}.")
    worst = 0.0
    for i in picks:
      got, want = reader[int(i)], ref[int(i)]
      at = f"{where}: element {int(i)} (key {got.get('key')!r})"
      if int(got["label"]) != int(want["label"]):
        raise ValueError(f"{at}: label {int(got['label'])}, the store {int(want['label'])}.")
      if not got["has_landmarks"] or not np.array_equal(got["landmarks"], want["landmarks"]):
        raise ValueError(f"{at}: landmarks {np.round(got['landmarks'], 2).tolist()} differ "
                         f"from the store's {np.round(want['landmarks'], 2).tolist()}.")
      worst = max(worst, _check_images(fmt, got["image"], want["image"], exact, at))
    report[fmt] = {"images": n, "num_classes": ref.num_classes, "checked": len(picks),
                   "max_mean_abs_error": worst}
    logging.info("verify_export: %s matches the store (%d of %d images compared).", where,
                 len(picks), n)
  return report
