r"""Decoded + flipped images/s from RecordIO, ImageFolder and ArrayRecord holding the same JPEGs.

    python -m benchmarks.data_sources --worker_counts=0,2 --num_images=2048

Measures, in one run on one machine:

1. One set of `--num_images` procedural faces (`faces.ProceduralFaceSource`,
   `--images_per_identity` per identity), encoded once as JPEG (`--quality`) and written, with
   their landmarks, as an insightface RecordIO pack (`RecordIOWriter`, labels sorted), an
   ImageFolder tree (`id_NNNN/img_NNN.jpg` + a landmark side file) and ArrayRecord shards
   (`convert.convert_arrayrecord` of the pack, which keeps the JPEG bytes). Record `i` is the
   same JPEG, byte for byte, in all three (checked). On-disk sizes are reported.
2. Per record, in this process, one thread: reading it from each source (`decode=False`, so
   `image_bytes`), `pipeline.Decode` and `RandomFlip`, so the pipeline rows can be explained.
3. Ours: `make_loader(source, decode in Decode, flip_prob, worker_count=w, read_threads=t)` for
   every format x `--read_threads` x `--worker_counts`, timing the per-process numpy batches
   (no `GlobalBatchIterator` / `device_put`: the question is reading and decoding; the
   `Data pipeline` section measures the rest).
4. The reference: a plain loop that opens each JPEG file of the ImageFolder tree with PIL,
   decodes it to RGB numpy, flips image and landmarks with numpy and stacks batches, over the
   same shuffled record order as the loaders (the sampler `make_loader` builds).

Timing, warm-up, rounds and "cores used" are `benchmarks.data_pipeline`'s (`_time_batches`,
`_cpu_seconds`, `_sampler`, `machine`, `write_section`; private ones imported on purpose), as
are its flags: `--worker_counts --read_threads --batch_size --num_batches --warmup_batches
--rounds --seed --flip_prob --output --json` mean the same here, with other defaults set below
(its renderer and `--num_identities` flags are unused). All files live in a temporary directory
(deleted at the end unless `--workdir` is given), so they are in the page cache: these are
decode and format-overhead numbers, not disk numbers. The markdown is printed and written as the
`## Data sources (RecordIO, ImageFolder, ArrayRecord)` section of `--output`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging

_REPO = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/data_sources.py`: make the repo importable.
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image

from benchmarks import data_pipeline as dp  # defines the shared flags
from vigface_jax import convert
from vigface_jax.data import arrayrecord
from vigface_jax.data import faces
from vigface_jax.data import imagefolder
from vigface_jax.data import landmark_files
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import pipeline
from vigface_jax.data import recordio
# pylint: enable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer("num_images", 2048, "Images in the data set (a multiple of "
                                   "--images_per_identity).")
_QUALITY = flags.DEFINE_integer("quality", 95, "JPEG quality of the stored images.")
_RECORD_SAMPLE = flags.DEFINE_integer("record_sample", 512,
                                      "Records timed one by one in the per-record table.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where to write the three formats (kept); "
                               "empty: a temporary directory, deleted at the end.")
# data_pipeline's flags, with this benchmark's defaults.
flags.FLAGS.set_default("worker_counts", ["0", "2"])
flags.FLAGS.set_default("read_threads", ["0", "8"])
flags.FLAGS.set_default("images_per_identity", 32)
flags.FLAGS.set_default("num_batches", 24)

SECTION = "## Data sources (RecordIO, ImageFolder, ArrayRecord)"
FORMATS = ("RecordIO", "ImageFolder", "ArrayRecord")


# ------------------------------------------------------------------ data set


@dataclasses.dataclass
class DataSet:
  """The same images in three formats, plus what the reference loop needs."""

  rec_path: str
  folder: str
  landmarks_file: str
  arrayrecord_dir: str
  paths: list[str]  # ImageFolder file of record i
  labels: np.ndarray  # int32 [num_images]
  points: np.ndarray  # float32 [num_images, 5, 2]
  sizes: dict[str, dict[str, int]]  # format -> files, bytes, allocated
  write_s: dict[str, float]
  identical: bool = False

  def source(self, fmt: str):
    """A fresh source of `fmt` yielding `image_bytes` (decoding left to `Decode`)."""
    if fmt == "RecordIO":
      return recordio.RecordIOSource(self.rec_path, decode=False)
    if fmt == "ImageFolder":
      return imagefolder.ImageFolderSource(self.folder, landmarks_file=self.landmarks_file,
                                           decode=False)
    return arrayrecord.ArrayRecordSource(self.arrayrecord_dir, decode=False)


def _disk_usage(paths: list[pathlib.Path]) -> dict[str, int]:
  files = [p for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
           if p.is_file()]
  stats = [p.stat() for p in files]
  return {"files": len(files), "bytes": sum(s.st_size for s in stats),
          "allocated": sum(s.st_blocks * 512 for s in stats)}


def build_dataset(workdir: pathlib.Path) -> DataSet:
  """Renders the faces once, encodes each once, writes the three formats."""
  per_identity = flags.FLAGS.images_per_identity
  if _NUM_IMAGES.value % per_identity:
    raise app.UsageError(f"--num_images={_NUM_IMAGES.value} is not a multiple of "
                         f"--images_per_identity={per_identity}.")
  num_classes = _NUM_IMAGES.value // per_identity
  faces_source = faces.ProceduralFaceSource(seed=flags.FLAGS.seed, num_identities=num_classes,
                                            images_per_identity=per_identity)
  start = time.perf_counter()
  jpegs, labels, points, names = [], [], [], []
  for i in range(len(faces_source)):
    element = faces_source[i]
    buf = io.BytesIO()
    Image.fromarray(element["image"]).save(buf, format="JPEG", quality=_QUALITY.value)
    jpegs.append(buf.getvalue())
    labels.append(int(element["label"]))
    points.append(np.asarray(element["landmarks"], np.float32))
    names.append(f"id_{i // per_identity:04d}/img_{i % per_identity:03d}.jpg")
  render_s = time.perf_counter() - start
  logging.info("Rendered and encoded %d faces in %.1f s.", len(jpegs), render_s)

  write_s = {}
  rec_path = workdir / "recordio" / "train.rec"
  rec_path.parent.mkdir(parents=True)
  start = time.perf_counter()
  with recordio.RecordIOWriter(rec_path, num_classes=num_classes) as writer:
    for data, label, pts in zip(jpegs, labels, points):
      writer.write(data, label, landmarks=pts)  # bytes are stored as given
  write_s["RecordIO"] = time.perf_counter() - start

  folder = workdir / "imagefolder"
  start = time.perf_counter()
  for name, data in zip(names, jpegs):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  landmarks_file = workdir / "imagefolder_landmarks.txt"
  landmark_files.write_landmarks(landmarks_file, dict(zip(names, points)))
  write_s["ImageFolder"] = time.perf_counter() - start

  ar_dir = workdir / "arrayrecord"
  start = time.perf_counter()
  convert.convert_arrayrecord(os.fspath(rec_path), os.fspath(ar_dir))
  write_s["ArrayRecord"] = time.perf_counter() - start

  data = DataSet(
      rec_path=os.fspath(rec_path), folder=os.fspath(folder),
      landmarks_file=os.fspath(landmarks_file), arrayrecord_dir=os.fspath(ar_dir),
      paths=[os.fspath(folder / n) for n in names], labels=np.asarray(labels, np.int32),
      points=np.stack(points), write_s=write_s,
      sizes={"RecordIO": _disk_usage([rec_path.parent]),
             "ImageFolder": _disk_usage([folder, landmarks_file]),
             "ArrayRecord": _disk_usage([ar_dir])})
  data.identical = _same_everywhere(data, jpegs)
  return data


def _same_everywhere(data: DataSet, jpegs: list[bytes]) -> bool:
  """Record i of every source holds JPEG i, label i and (float32) landmarks i."""
  ok = True
  for fmt in FORMATS:
    source = data.source(fmt)
    if len(source) != len(jpegs):
      logging.error("%s has %d records, expected %d.", fmt, len(source), len(jpegs))
      ok = False
      continue
    for i, jpeg in enumerate(jpegs):
      element = source[i]
      if (bytes(element["image_bytes"]) != jpeg or int(element["label"]) != data.labels[i]
          or not np.allclose(element["landmarks"], data.points[i], atol=1e-4)):
        logging.error("%s record %d differs from the others.", fmt, i)
        ok = False
        break
  return ok


# ------------------------------------------------------------------ per record


def bench_records(data: DataSet) -> list[dict[str, Any]]:
  """Microseconds per record of each stage, this process, one thread, best of 3."""
  rng = np.random.default_rng(flags.FLAGS.seed)
  keys = rng.permutation(len(data.labels))[:_RECORD_SAMPLE.value].tolist()
  decode, flip = pipeline.Decode(), pipeline.RandomFlip(1.0)
  flip_rng = np.random.default_rng(0)
  results = []

  def best_us(fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(keys)

  for fmt in FORMATS:
    source = data.source(fmt)
    source[0]  # opens lazily held files (mmap, ArrayRecord readers)  # pylint: disable=pointless-statement
    elements = [source[k] for k in keys]
    decoded = [decode.map(e) for e in elements]
    results.append({
        "format": fmt,
        "read_us": best_us(lambda s=source: [s[k] for k in keys]),
        "decode_us": best_us(lambda e=elements: [decode.map(x) for x in e]),
        "flip_us": best_us(lambda d=decoded: [flip.random_map(x, flip_rng) for x in d]),
    })

  def read_files():
    return [open(data.paths[k], "rb").read() for k in keys]  # pylint: disable=consider-using-with

  def pil_decode():
    for k in keys:
      with Image.open(data.paths[k]) as img:
        np.asarray(img.convert("RGB"))

  results.append({"format": "reference: PIL loop (open + decode)", "read_us": best_us(read_files),
                   "decode_us": best_us(pil_decode) - best_us(read_files),
                   "flip_us": best_us(lambda d=decoded: [np.ascontiguousarray(x["image"][:, ::-1])
                                                         for x in d])})
  # Costs of ours that the reference does not pay, to explain the pipeline rows.
  sampler = dp._sampler(len(data.labels))  # pylint: disable=protected-access
  blobs = [open(data.paths[k], "rb").read() for k in keys]  # pylint: disable=consider-using-with

  def header_only():
    for blob in blobs:
      with Image.open(io.BytesIO(blob)) as img:
        img.size  # pylint: disable=pointless-statement

  results.append({"format": "extra: grain `IndexSampler[i]` (shuffled key + per-record "
                            "Philox `Generator`)",
                  "read_us": best_us(lambda: [sampler[i] for i in range(len(keys))]),
                  "decode_us": None, "flip_us": None})
  results.append({"format": "extra: JPEG header only (`Image.open(...).size`, the "
                            "`decode=False` check of RecordIO/ImageFolder)",
                  "read_us": best_us(header_only), "decode_us": None, "flip_us": None})
  for r in results:
    logging.info("per record %s: read %.1f us, decode %s us.", r["format"], r["read_us"],
                 r["decode_us"])
  return results


# ------------------------------------------------------------------ pipelines


def _reference_batches(data: DataSet, keys: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """The plain loop: PIL open + decode per file, numpy flip, `np.stack` (no grain)."""
  rng = np.random.default_rng(flags.FLAGS.seed)
  size, flip_prob = flags.FLAGS.batch_size, flags.FLAGS.flip_prob
  for start in range(0, len(keys) - size + 1, size):
    images, labels, points = [], [], []
    for key in keys[start:start + size]:
      with Image.open(data.paths[key]) as img:
        image = np.asarray(img.convert("RGB"))
      pts = data.points[key]
      if rng.random() < flip_prob:
        image = np.ascontiguousarray(image[:, ::-1])
        pts = landmarks_lib.flip_landmarks(pts, width=pipeline.IMAGE_SIZE)
      images.append(image)
      labels.append(data.labels[key])
      points.append(pts)
    yield {"image": np.stack(images), "label": np.stack(labels),
           "landmarks": np.stack(points).astype(np.float32),
           "has_landmarks": np.ones(len(labels), np.bool_)}


def bench_pipelines(data: DataSet) -> list[dp.Row]:
  """Reference, then every format x read threads x worker count; best of `--rounds` each."""
  size = flags.FLAGS.batch_size
  total = (1 + flags.FLAGS.warmup_batches + flags.FLAGS.num_batches) * size
  sampler = dp._sampler(len(data.labels))  # pylint: disable=protected-access
  keys = np.array([sampler[i].record_key for i in range(total)])  # make_loader's order
  reference_labels = data.labels[keys]

  cases = [("reference: PIL loop over ImageFolder files", None, "-",
            lambda: _reference_batches(data, keys))]
  threads = [None if t == "default" else int(t) for t in flags.FLAGS.read_threads]
  for fmt in FORMATS:
    source = data.source(fmt)
    for t in threads:
      for workers in (int(w) for w in flags.FLAGS.worker_counts):
        loader = functools.partial(
            pipeline.make_loader, source, global_batch_size=size, seed=flags.FLAGS.seed,
            worker_count=workers, flip_prob=flags.FLAGS.flip_prob, read_threads=t)
        cases.append((f"{fmt}: make_loader", workers,
                      dp._threads_label(t),  # pylint: disable=protected-access
                      lambda l=loader: iter(l())))

  measured: list[list[dp.Row]] = [[] for _ in cases]
  for round_index in range(flags.FLAGS.rounds):
    # Alternate the order so a slow spell of the shared machine is not always on the same rows.
    order = range(len(cases)) if round_index % 2 == 0 else reversed(range(len(cases)))
    for i in order:
      name, workers, t, make = cases[i]
      measured[i].append(dp._time_batches(  # pylint: disable=protected-access
          make, name, workers, t, reference_labels))
  rows = []
  for runs in measured:
    best = max(runs, key=lambda r: r.images_per_s)
    best.round_images_per_s = [r.images_per_s for r in runs]
    rows.append(best)
  return rows


# ------------------------------------------------------------------ report


def _fmt(x: float | None, spec: str) -> str:
  return "" if x is None else format(x, spec)


def to_markdown(info: dict[str, Any], data: DataSet, records: list[dict[str, Any]],
                rows: list[dp.Row]) -> str:
  """The BENCHMARKS.md section (heading included)."""
  n, per_id = len(data.labels), flags.FLAGS.images_per_identity
  lines = dp.section_header(SECTION, "benchmarks.data_sources", info) + [
      f"### The data: {n} procedural faces ({n // per_id} identities x {per_id}), JPEG "
      f"q{_QUALITY.value}, with landmarks",
      "",
      "Every format holds the same JPEG bytes per record (checked: "
      f"{'identical' if data.identical else 'NOT identical'}), written once to a temporary "
      "directory (page cache warm).",
      "",
      "| format | files | bytes | allocated on disk | bytes / image | write (s) |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for fmt in FORMATS:
    s = data.sizes[fmt]
    lines.append(f"| {fmt} | {s['files']} | {s['bytes'] / 2**20:.2f} MiB | "
                 f"{s['allocated'] / 2**20:.2f} MiB | {s['bytes'] / n:.0f} | "
                 f"{data.write_s[fmt]:.2f} |")
  lines += [
      "",
      "RecordIO: `train.rec` + `.idx` + `property` (`RecordIOWriter`, landmarks as vector "
      "labels). ImageFolder: one file per image + landmark side file. ArrayRecord: "
      "`convert_arrayrecord` of the pack (shards of `tf.train.Example` + TFDS metadata); write "
      "time includes reading the pack.",
      "",
      f"### Per record (this process, one thread, {_RECORD_SAMPLE.value} shuffled records, "
      "best of 3)",
      "",
      "| source | read `source[i]` (µs) | `Decode` (µs) | `RandomFlip`, every image flipped (µs) | "
      "total (µs) | images / s / core |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    total = None if r["decode_us"] is None else r["read_us"] + r["decode_us"] + r["flip_us"]
    lines.append(f"| {r['format']} | {r['read_us']:.1f} | {_fmt(r['decode_us'], '.1f')} | "
                 f"{_fmt(r['flip_us'], '.1f')} | {_fmt(total, '.1f')} | "
                 f"{_fmt(total and 1e6 / total, '.0f')} |")
  reference = rows[0].images_per_s
  lines += [
      "",
      "\"read\" is `source[i]` with `decode=False` (RecordIO: mmap slice + header check; "
      "ImageFolder: `open().read()` + header check; ArrayRecord: record read + "
      "`tf.train.Example` parse); for the reference, `open().read()` and PIL open + decode "
      "minus that; its flip column is the same numpy flip (`ascontiguousarray(image[:, ::-1])`) "
      "on every image. The flip columns flip every image (the pipelines flip half). The "
      "\"extra\" rows are costs inside the rows above or the pipelines that the reference "
      "does not pay.",
      "",
      f"### Pipelines, batch {flags.FLAGS.batch_size}, {flags.FLAGS.num_batches} timed batches "
      f"after 1 + {flags.FLAGS.warmup_batches} warm-up, best of {flags.FLAGS.rounds} rounds",
      "",
      f"`make_loader(source(decode=False), flip_prob={flags.FLAGS.flip_prob}, "
      "worker_count, read_threads)`, shuffled; per-process numpy batches (no device transfer).",
      "",
      "| pipeline | grain workers | reader threads / process | first batch (s) | images / s | "
      "worst round | cores used | images / s / core | vs reference | records vs reference |",
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    workers = "-" if r.workers is None else str(r.workers)
    records_ok = ("identical batches" if r.same_batches else
                  "same records, regrouped" if r.same_records else
                  "DIFFERENT" if r.same_records is False else "")
    per_core = r.images_per_s / r.cores_used if r.cores_used else None
    lines.append(f"| {r.name} | {workers} | {r.read_threads} | {r.first_batch_s:.2f} | "
                 f"{r.images_per_s:.0f} | {min(r.round_images_per_s):.0f} | "
                 f"{_fmt(r.cores_used, '.2f')} | {_fmt(per_core, '.0f')} | "
                 f"{r.images_per_s / reference:.2f}x | {records_ok} |")
  lines += [
      "",
      "Notes:",
      "",
      "* Shared machine: other jobs may use the same cores. The load averages and \"cores "
      "used\" (CPU seconds of this process and its grain workers per wall second, timed window "
      "only) show how busy it was; compare rows of one run. \"images / s / core\" divides by "
      "cores used, so it is the cost per image whatever the machine gave us; first batch and "
      "cores used are from the best round, \"worst round\" shows the spread.",
      "* \"first batch\" includes spawning grain workers (each imports jax, and for ArrayRecord "
      "`tensorflow_datasets` for the `tf.train.Example` parser) and is excluded from images/s, "
      "as are the warm-up batches.",
      "* The reference reads the same records in the same order (the sampler `make_loader` "
      "builds) and flips with its own rng. \"Records vs reference\" checks the labels of the "
      "first batches: with w > 1 workers grain hands worker k the records k, k + w, ..., so "
      "the same records arrive grouped into different batches.",
      "* Reader threads run only `source[i]`; `Decode` and `RandomFlip` run in the process's "
      "(or worker's) main thread.",
  ]
  per = {r["format"]: r for r in records}
  sampler_us = next(r["read_us"] for r in records if "IndexSampler" in r["format"])
  header_us = next(r["read_us"] for r in records if "header only" in r["format"])
  lines += [
      f"* In-process, every loader row pays per record what the reference does not: grain's "
      f"`IndexSampler[i]` ({sampler_us:.0f} µs, most of it the shuffled-key lookup and a "
      f"Philox `Generator` per record), a JPEG header parse in RecordIO's and ImageFolder's "
      f"`decode=False` read that `Decode` repeats ({header_us:.0f} µs; ArrayRecord parses a "
      "`tf.train.Example` instead), and grain's per-element machinery. The formats differ "
      "far less than that from the reference: decoding dominates and they hold the same bytes.",
      f"* `RandomFlip` costs {per['RecordIO']['flip_us']:.0f} µs per flipped image, "
      f"{per['RecordIO']['flip_us'] / per['RecordIO']['decode_us']:.0%} of a JPEG decode: "
      "numpy copies a reversed axis of 3-byte pixels element by element. The reference uses "
      "the same flip, so the ratios are not affected.",
  ]
  if any(r.read_threads not in ("0", "-") for r in rows):
    lines.append(
        "* Reader-thread rows are slower than 0 threads for every format. Profiled (cProfile, grain 0.2.18): grain's thread prefetch records its ready "
        "depth on every element by calling `Future.done()` along its buffer "
        "(`_measure_prefetch_depth`), and with a page-cached source that buffer stays full at "
        "`ReadOptions.prefetch_buffer_size`, 500 by default, which `make_loader` leaves as it "
        "is: one lock-taking call per buffered element on every element, more than the read "
        "itself costs.")
  for fmt in FORMATS:
    mine = [r for r in rows if r.name.startswith(fmt)]
    best = max(mine, key=lambda r: r.images_per_s)
    lines.append(f"* {fmt}: best {best.images_per_s:.0f} images/s ({best.workers} workers, "
                 f"reader threads {best.read_threads}), {best.images_per_s / reference:.2f}x "
                 "the reference.")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workers = [int(w) for w in flags.FLAGS.worker_counts]
  if flags.FLAGS.warmup_batches < max(workers, default=0) + 1:
    logging.warning("--warmup_batches=%d < max worker count + 1: batches prepared during "
                    "start-up will be counted as throughput.", flags.FLAGS.warmup_batches)
  info = dp.machine()
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="vigface_sources_"))
  try:
    data = build_dataset(workdir)
    records = bench_records(data)
    rows = bench_pipelines(data)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  section = to_markdown(info, data, records, rows)
  print(section)
  if flags.FLAGS.output:
    dp.write_output(flags.FLAGS.output, section, SECTION)
  if flags.FLAGS.json:
    record = {"machine": info, "sizes": data.sizes, "write_s": data.write_s,
              "identical": data.identical, "per_record": records,
              "pipelines": [dict(dataclasses.asdict(r), images_per_s=r.images_per_s)
                            for r in rows],
              "flags": {name: flags.FLAGS[name].value for name in (
                  "worker_counts", "read_threads", "num_batches", "batch_size",
                  "warmup_batches", "rounds", "num_images", "images_per_identity", "quality",
                  "seed", "flip_prob")}}
    with open(flags.FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
