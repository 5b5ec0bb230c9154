r"""Data-pipeline throughput on procedural faces: renderer, grain loader, bare-loop reference.

    python -m benchmarks.data_pipeline --worker_counts=0,1,2 --num_batches=12 --rounds=2

Measures, in one run on one machine:

1. The renderer alone (`faces.render_face`, this process, one thread): images/s over a fixed
   set of `(identity, index)` pairs, best of `--repeats`, with the identity cache warm and cold,
   and the time split between identity factors, nuisance sampling and pixel rendering.
2. Ours: `ProceduralFaceSource -> pipeline.make_loader(worker_count=w, flip_prob=0.5) ->
   GlobalBatchIterator` on a one-device CPU mesh, `jax.block_until_ready` on every batch. The
   first batch (worker start-up) and `--warmup_batches` more are timed separately; images/s
   counts only the batches after them. `--read_threads` adds rows with other
   `make_loader(read_threads=n)` values (reader threads per process; 'default' is grain's).
   All pipeline rows run `--rounds` times, in alternating order; each keeps its best round.
3. The reference: a plain Python loop over the same source and the same record order doing the
   same decode / flip / batch in numpy, then `jax.device_put` to the same sharding.

"cores used" is CPU seconds of this process and its live descendants (grain workers) divided
by wall seconds over the timed window (Linux `/proc`; blank elsewhere). The markdown table and a
machine description are printed and written as the `## Data pipeline (procedural faces)`
section of `--output` (created with its header if missing); `--json` also dumps the raw numbers.

Grain workers are spawned processes that unpickle the source and operations, so everything they
run lives in importable `vigface_jax` modules; this file only drives and times them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import inspect
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging

_REPO = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/data_pipeline.py`: make the repo importable.
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
import grain
import jax
import numpy as np

from vigface_jax import parallel
from vigface_jax.data import faces
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["0", "1", "2"],
                                   "grain worker counts to time (0: in-process).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 12, "Timed batches per pipeline run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_WARMUP_BATCHES = flags.DEFINE_integer(
    "warmup_batches", 3, "Batches after the first that are not timed; at least worker_count + 1 "
    "so batches the workers prepared during start-up are not counted as throughput.")
_READ_THREADS = flags.DEFINE_list(
    "read_threads", ["default"], "Extra rows per worker count with make_loader(read_threads=n); "
    "'default' passes None (grain's ReadOptions default). Empty: none.")
_RENDER_IMAGES = flags.DEFINE_integer("render_images", 64,
                                      "(identity, index) pairs in the renderer-alone set.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats of each renderer timing (best kept).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "Rounds over all pipeline rows (alternating order); each row keeps its best.")
_NUM_IDENTITIES = flags.DEFINE_integer("num_identities", 1000, "Identities in the source.")
_IMAGES_PER_IDENTITY = flags.DEFINE_integer("images_per_identity", 64, "Images per identity.")
_SEED = flags.DEFINE_integer("seed", 0, "Source, shuffle and flip seed.")
_FLIP_PROB = flags.DEFINE_float("flip_prob", 0.5, "Horizontal-flip probability.")
_OUTPUT = flags.DEFINE_string(
    "output", "BENCHMARKS.md", "Markdown file whose section to write or replace (relative paths "
    "are taken from the repository root); empty: do not write.")
_JSON = flags.DEFINE_string("json", "", "If set, also write the raw results as JSON here.")

SECTION = "## Data pipeline (procedural faces)"
_HEADER = """# Benchmarks

Measured numbers for this repository. Two rules:

* Every number names the machine it came from (CPU, cores, memory, software versions, date).
* Every number is produced by a script in `benchmarks/` that runs our code and a reference side
  by side in the same run, so a slow or busy machine shows up in both; rerun the script rather
  than editing its section by hand.
"""


# ------------------------------------------------------------------ measuring


def _cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live descendants (Linux), else None.

  This process is read with `time.process_time` (exact); descendants from `/proc` (ticks).
  """
  try:
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
      if not entry.isdigit():
        continue
      try:
        with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
          stat = f.read()
      except OSError:
        continue  # exited while we looked
      # Fields after "pid (comm) ": state ppid ... utime(14) stime(15), 1-based in proc(5).
      fields = stat[stat.rindex(")") + 2:].split()
      parent[int(entry)] = int(fields[1])
      cpu[int(entry)] = int(fields[11]) + int(fields[12])
  except (OSError, ValueError, AttributeError):
    return None
  ticks, frontier = 0, [child for child, ppid in parent.items() if ppid == os.getpid()]
  while frontier:
    pid = frontier.pop()
    ticks += cpu.get(pid, 0)
    frontier.extend(child for child, ppid in parent.items() if ppid == pid)
  return time.process_time() + ticks / tick


@dataclasses.dataclass
class Row:
  """One pipeline-level measurement (a row of the main table)."""

  name: str
  workers: int | None
  read_threads: str
  first_batch_s: float
  warmup_s: float
  timed_images: int
  timed_s: float
  cores_used: float | None
  same_records: bool | None = None  # as the reference, over the first max(workers, 1) batches
  same_batches: bool | None = None  # first batch holds the reference's first batch, in order
  round_images_per_s: list[float] = dataclasses.field(default_factory=list)  # every round

  @property
  def images_per_s(self) -> float:
    return self.timed_images / self.timed_s


def _time_batches(make_iterator: Callable[[], Iterator[Any]], name: str, workers: int | None,
                  read_threads: str, reference_labels: np.ndarray | None) -> Row:
  """Times first batch, warm-up and `--num_batches` batches of a fresh iterator."""
  faces.identity.cache_clear()  # in-process runs all start from the same (cold) cache
  gc.collect()
  start = time.perf_counter()
  iterator = make_iterator()
  labels = [np.asarray(jax.block_until_ready(next(iterator))["label"])]
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_WARMUP_BATCHES.value):
    labels.append(np.asarray(jax.block_until_ready(next(iterator))["label"]))
  warmup_s = time.perf_counter() - start
  outer_start = time.perf_counter()  # the /proc scans take CPU and time: bracket them too
  cpu0 = _cpu_seconds()
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    jax.block_until_ready(next(iterator))
  timed_s = time.perf_counter() - start
  cpu1 = _cpu_seconds()
  outer_s = time.perf_counter() - outer_start
  cores = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / outer_s
  del iterator
  gc.collect()  # stops grain worker processes before the next row starts its own
  same_records = same_batches = None
  if reference_labels is not None:
    # grain gives worker k the records k, k + w, ... before batching, so with w > 1 a batch
    # differs from the reference's but w consecutive batches hold the same records.
    k = min(max(workers or 0, 1), len(labels))
    size = _BATCH_SIZE.value
    same_records = bool(np.array_equal(np.sort(np.concatenate(labels[:k])),
                                       np.sort(reference_labels[:k * size])))
    same_batches = bool(np.array_equal(labels[0], reference_labels[:size]))
  row = Row(name, workers, read_threads, first_s, warmup_s,
            _NUM_BATCHES.value * _BATCH_SIZE.value, timed_s, cores, same_records, same_batches)
  logging.info("%s: %.1f images/s, first batch %.2f s, %.2f cores.", name, row.images_per_s,
               first_s, cores or float("nan"))
  return row


# ------------------------------------------------------------------ renderer alone


def bench_renderer() -> list[dict[str, Any]]:
  """Renderer stages over a fixed set of distinct identities, one thread; best of `--repeats`."""
  seed, n = _SEED.value, _RENDER_IMAGES.value
  # Distinct identities, so a cleared cache makes every image a miss.
  pairs = [(k, (7 * k) % 64) for k in range(n)]

  def rngs():  # the per-image streams `render_face` draws from
    return [np.random.default_rng(np.random.SeedSequence([seed, i, j, 104729]))
            for i, j in pairs]

  idents = [faces.identity(seed, i) for i, _ in pairs]
  nuisances = [faces.sample_nuisance(r) for r in rngs()]

  def render_all():
    for i, j in pairs:
      faces.render_face(seed, i, j)

  def warm():
    for i, _ in pairs:
      faces.identity(seed, i)

  stages = [
      ("identity factors, uncached (`identity.__wrapped__`)",
       lambda: [faces.identity.__wrapped__(seed, i) for i, _ in pairs], lambda: None),
      ("nuisance sampling (`sample_nuisance`, incl. rng)",
       lambda: [faces.sample_nuisance(r) for r in rngs()], lambda: None),
      ("pixels (`render`)", lambda: [faces.render(a, q) for a, q in zip(idents, nuisances)],
       lambda: None),
      ("`render_face`, identity cache warm", render_all, warm),
      ("`render_face`, identity cache cold", render_all, faces.identity.cache_clear),
  ]
  # Repeats outermost, so a slow spell of a shared machine hits every stage, not one.
  best = [float("inf")] * len(stages)
  for _ in range(_REPEATS.value):
    for i, (_, fn, before) in enumerate(stages):
      before()
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  faces.identity.cache_clear()
  results = []
  for (name, _, _), seconds in zip(stages, best):
    results.append({"stage": name, "ms_per_image": 1e3 * seconds / n,
                    "images_per_s": n / seconds})
    logging.info("renderer %s: %.2f ms/image.", name, 1e3 * seconds / n)
  return results


# ------------------------------------------------------------------ pipelines


def _source() -> faces.ProceduralFaceSource:
  return faces.ProceduralFaceSource(seed=_SEED.value, num_identities=_NUM_IDENTITIES.value,
                                    images_per_identity=_IMAGES_PER_IDENTITY.value)


def _sampler(num_records: int) -> grain.samplers.IndexSampler:
  """The sampler `make_loader` builds (one process, shuffled, endless)."""
  return grain.samplers.IndexSampler(
      num_records=num_records, shard_options=grain.sharding.ShardByJaxProcess(
          drop_remainder=True), shuffle=True, num_epochs=None, seed=_SEED.value)


def _threads_label(threads: int | None) -> str:
  return f"grain default ({grain.ReadOptions().num_threads})" if threads is None else str(threads)


def _reference_batches(source, keys: np.ndarray, sharding) -> Iterator[dict[str, jax.Array]]:
  """The bare loop: index the source, flip, stack in numpy, `device_put` (no grain)."""
  rng = np.random.default_rng(_SEED.value)
  size, flip_prob = _BATCH_SIZE.value, _FLIP_PROB.value
  for start in range(0, len(keys) - size + 1, size):
    images, labels, points, has = [], [], [], []
    for key in keys[start:start + size]:
      element = source[int(key)]
      image = np.asarray(element["image"], np.uint8)
      pts = np.asarray(element["landmarks"], np.float32)
      if rng.random() < flip_prob:
        image = np.ascontiguousarray(image[:, ::-1])
        pts = landmarks_lib.flip_landmarks(pts, width=pipeline.IMAGE_SIZE)
      images.append(image)
      labels.append(np.int32(element["label"]))
      points.append(pts)
      has.append(np.bool_(element["has_landmarks"]))
    batch = {"image": np.stack(images), "label": np.stack(labels),
             "landmarks": np.stack(points), "has_landmarks": np.stack(has)}
    yield jax.device_put(batch, sharding)


def bench_pipelines() -> list[Row]:
  """The reference loop, then `make_loader` per worker count, then the read-thread rows."""
  mesh = parallel.create_mesh(("data",), (-1,))
  sharding = parallel.batch_sharding(mesh)
  source = _source()
  total = (1 + _WARMUP_BATCHES.value + _NUM_BATCHES.value) * _BATCH_SIZE.value
  sampler = _sampler(len(source))
  # The sampler only fixes the record order (same as the pipeline's); it is not timed.
  keys = np.array([sampler[i].record_key for i in range(total)])
  reference_labels = (keys // _IMAGES_PER_IDENTITY.value).astype(np.int32)

  cases = [("reference: Python loop + numpy", None, "-",
            lambda: _reference_batches(source, keys, sharding))]
  worker_counts = [int(w) for w in _WORKER_COUNTS.value]
  default_threads = inspect.signature(pipeline.make_loader).parameters["read_threads"].default
  settings = [(default_threads, "ours: make_loader + GlobalBatchIterator")]
  for value in _READ_THREADS.value:
    threads = None if value == "default" else int(value)
    if threads != default_threads:
      settings.append((threads, f"make_loader(read_threads={threads}) + GlobalBatchIterator"))
  for threads, name in settings:
    for workers in worker_counts:
      loader = functools.partial(
          pipeline.make_loader, source, global_batch_size=_BATCH_SIZE.value, seed=_SEED.value,
          worker_count=workers, flip_prob=_FLIP_PROB.value, read_threads=threads)
      cases.append((name, workers, _threads_label(threads),
                    lambda l=loader: pipeline.GlobalBatchIterator(l(), mesh)))

  measured: list[list[Row]] = [[] for _ in cases]
  for round_index in range(_ROUNDS.value):
    # Odd rounds run the cases backwards, so a slow spell of the machine is not always
    # charged to the same rows.
    order = range(len(cases)) if round_index % 2 == 0 else reversed(range(len(cases)))
    for i in order:
      name, workers, threads, make = cases[i]
      measured[i].append(_time_batches(make, name, workers, threads, reference_labels))
  rows = []
  for runs in measured:
    best = max(runs, key=lambda r: r.images_per_s)
    best.round_images_per_s = [r.images_per_s for r in runs]
    rows.append(best)
  return rows


# ------------------------------------------------------------------ report


def machine(start_backend: bool = True) -> dict[str, Any]:
  """CPU, cores, memory, software versions, date and load of this machine (the JAX devices
  only with `start_backend`: starting one takes an accelerator's memory from other processes)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    cpu = found.group(1).strip() if found else cpu
  except OSError:
    pass
  ram_gib = None
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      found = re.search(r"^MemTotal:\s*(\d+) kB", f.read(), re.MULTILINE)
    ram_gib = int(found.group(1)) / 2**20 if found else None
  except OSError:
    pass
  return {
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "ram_gib": ram_gib,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "grain": importlib.metadata.version("grain"),
      "numpy": np.__version__,
      "jax_devices": (f"{jax.device_count()} x {jax.devices()[0].platform}" if start_backend
                      else "not started"),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "code": _code_version(),
  }


def _code_version() -> str:
  """Commit of the repository and whether the working tree differs from it."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()

  try:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return f"{commit} + uncommitted changes" if dirty else commit


def _fmt(x: float | None, spec: str) -> str:
  return "" if x is None else format(x, spec)


def section_header(heading: str, module: str, info: dict[str, Any]) -> list[str]:
  """Heading, the command that produced the section and the machine line, as lines."""

  def load(key):
    return ", ".join(f"{x:.2f}" for x in info[key]) if info.get(key) else "n/a"

  ram = f"{info['ram_gib']:.0f} GiB RAM" if info["ram_gib"] else "RAM unknown"
  return [
      heading,
      "",
      "Produced by `" + " ".join([f"python -m {module}"] + [
          arg for arg in sys.argv[1:]
          if arg.split("=")[0] not in ("--output", "--json")]) + "`.",  # not --output_overlap
      "",
      f"Machine: {info['cpu']}, `os.cpu_count()` = {info['cpu_count']} "
      f"({info['usable_cpus']} usable), {ram}; Python {info['python']}, jax {info['jax']} "
      f"({info['jax_devices']}), grain {info['grain']}, numpy {info['numpy']}; code "
      f"{info['code']}; {info['date']}. "
      f"Load average (1, 5, 15 min) at start {load('load_average_start')}, at end "
      f"{load('load_average_end')}.",
      "",
  ]


def to_markdown(info: dict[str, Any], render: list[dict[str, Any]], rows: list[Row]) -> str:
  """The BENCHMARKS.md section (heading included)."""
  lines = section_header(SECTION, "benchmarks.data_pipeline", info) + [
      f"### Renderer alone (`faces.render_face`, one thread, {_RENDER_IMAGES.value} distinct "
      f"identities, best of {_REPEATS.value})",
      "",
      "| stage | ms / image | images / s |",
      "|---|---:|---:|",
  ]
  lines += [f"| {r['stage']} | {r['ms_per_image']:.2f} | {r['images_per_s']:.0f} |"
            for r in render]
  reference = rows[0].images_per_s
  lines += [
      "",
      f"### Pipeline, batch {_BATCH_SIZE.value}, {_NUM_BATCHES.value} timed batches after "
      f"1 + {_WARMUP_BATCHES.value} warm-up, best of {_ROUNDS.value} rounds",
      "",
      f"Source: `ProceduralFaceSource({_NUM_IDENTITIES.value} identities x "
      f"{_IMAGES_PER_IDENTITY.value} images)`, shuffled, flip p={_FLIP_PROB.value}; global "
      "arrays on a 1-device CPU mesh, `jax.block_until_ready` per batch.",
      "",
      "| pipeline | grain workers | reader threads / process | first batch (s) | "
      "images / s | worst round | cores used | vs reference | records vs reference |",
      "|---|---:|---|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    workers = "-" if r.workers is None else str(r.workers)
    records = ("identical batches" if r.same_batches else
               "same records, regrouped" if r.same_records else
               "DIFFERENT" if r.same_records is False else "")
    lines.append(f"| {r.name} | {workers} | {r.read_threads} | {r.first_batch_s:.2f} | "
                 f"{r.images_per_s:.0f} | {min(r.round_images_per_s):.0f} | "
                 f"{_fmt(r.cores_used, '.2f')} | "
                 f"{r.images_per_s / reference:.2f}x | {records} |")
  lines += [
      "",
      "Notes:",
      "",
      "* Shared machine: other jobs may use the same cores, so rows can differ by more than "
      "the pipelines do. The load averages above and the \"cores used\" column (CPU seconds of "
      "this process and its grain workers per wall second, timed window only) show how busy it "
      "was; compare rows of one run, not across runs or machines. First batch and cores used "
      "are from the best round; \"worst round\" shows the spread.",
      "* \"first batch\" includes spawning grain workers (each imports jax) and filling the "
      "first batch; it is excluded from images/s, as are the warm-up batches.",
      "* The reference reads the same records in the same order, flips with its own rng and "
      "ends with `jax.device_put` to the same sharding, so \"vs reference\" is grain + `Decode` "
      "checks + `GlobalBatchIterator` relative to the bare loop (with workers, the parallel "
      "speed-up on top). \"Records vs reference\" checks the labels of the first batches: grain "
      "hands worker k the records k, k + w, ... before batching, so with w > 1 the same "
      "records arrive grouped into different batches.",
      "* Every in-process run starts with an empty identity cache; each grain worker has its "
      "own. Identity factors cost the \"uncached\" row above on the first image of an identity.",
  ]
  ours = {r.workers: r for r in rows if r.name.startswith("ours")}
  for r in rows:
    if r.name.startswith("make_loader(") and r.workers in ours:
      mine = ours[r.workers]
      lines.append(
          f"* {r.workers} worker(s): `make_loader`'s default (reader threads "
          f"{mine.read_threads}) gives {mine.images_per_s / r.images_per_s:.2f}x the images/s "
          f"of reader threads {r.read_threads} ({mine.images_per_s:.0f} vs "
          f"{r.images_per_s:.0f}).")
  return "\n".join(lines) + "\n"


def _section_pattern(heading: str) -> re.Pattern[str]:
  """The `heading` section of a markdown file: from the heading up to the next `## ` one."""
  return re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def section_of(text: str, heading: str) -> str | None:
  """The `heading` section of `text` (see `write_section`), or None."""
  found = _section_pattern(heading).search(text)
  return found.group(0) if found else None


def write_section(path: pathlib.Path, section: str, heading: str = SECTION) -> None:
  """Replaces the `heading` section (up to the next `## ` heading) in `path`, or appends it."""
  text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
  pattern = _section_pattern(heading)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text, encoding="utf-8")


def write_output(output: str, section: str, heading: str = SECTION) -> None:
  """`write_section` into `output` (relative paths are from the repository root)."""
  path = pathlib.Path(output)
  path = path if path.is_absolute() else _REPO / path
  write_section(path, section, heading)
  logging.info("Wrote %s to %s.", heading, path)


def device_stats() -> dict[str, Any]:
  """The first local device's platform and kind, and its peak and total memory in bytes where
  the backend reports them (`Device.memory_stats()`: GPU and TPU; None on CPU)."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # a backend without memory statistics
    stats = {}
  return {"platform": device.platform, "device_kind": device.device_kind,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "bytes_limit": stats.get("bytes_limit")}


def write_json(path: str, record: dict[str, Any]) -> None:
  """`record` and `device_stats()` (as `device`) as JSON at `path`, for a caller such as
  `benchmarks/run.py`; numpy scalars become numbers."""
  default = lambda x: x.item() if hasattr(x, "item") else str(x)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(record, device=device_stats()), f, indent=2, default=default)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workers = [int(w) for w in _WORKER_COUNTS.value]
  if _WARMUP_BATCHES.value < max(workers, default=0) + 1:
    logging.warning("--warmup_batches=%d < max worker count + 1: batches prepared during "
                    "start-up will be counted as throughput.", _WARMUP_BATCHES.value)
  info = machine()
  render = bench_renderer()
  rows = bench_pipelines()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  section = to_markdown(info, render, rows)
  print(section)
  if _OUTPUT.value:
    write_output(_OUTPUT.value, section)
  if _JSON.value:
    record = {"machine": info, "renderer": render,
              "pipelines": [dict(dataclasses.asdict(r), images_per_s=r.images_per_s)
                            for r in rows],
              "flags": {name: flags.FLAGS[name].value for name in (
                  "worker_counts", "num_batches", "batch_size", "warmup_batches",
                  "read_threads", "render_images", "repeats", "num_identities",
                  "images_per_identity", "seed", "flip_prob")}}
    write_json(_JSON.value, record)


if __name__ == "__main__":
  app.run(main)
