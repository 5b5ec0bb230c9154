"""grain input pipeline: any face source -> sharded global `jax.Array` batches.

Every source (procedural faces, RecordIO, image folders, ...) yields elements
that `Decode` brings to one element spec, `ELEMENT_SPEC`:

  `image`          uint8 `[112, 112, 3]`, RGB, ArcFace-aligned crop.
  `label`          int32 scalar, the class (identity) index.
  `landmarks`      float32 `[5, 2]`, (x, y) in the 112x112 aligned frame, in
                   ArcFace order (left eye, right eye, nose, left mouth, right
                   mouth). All zeros when the source has none.
  `has_landmarks`  bool scalar; False when `landmarks` is only a placeholder.

Zeros rather than NaN for missing landmarks: a NaN that reaches a jitted
function through a masked-out branch still poisons gradients
(`where(mask, f(nan), 0)` differentiates `f` at NaN), zeros never do; use
`has_landmarks` to mask.

The pipeline per process is
`GlobalBatchSampler (one seeded global stream; this process's slice of each
global batch) -> Decode -> RandomFlip -> Batch(global_batch / processes)`,
optionally prefetched by worker processes (the batches do not depend on the
process or worker count);
`GlobalBatchIterator` turns each per-process batch into global arrays sharded
over the mesh's batch axes and exposes the grain iterator state, which the
trainer checkpoints so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import grain
import jax
from jax.sharding import Mesh
import numpy as np
from PIL import Image, UnidentifiedImageError

from vigface_jax import config_lib
from vigface_jax import parallel
from vigface_jax.data import landmarks as landmarks_lib

IMAGE_SIZE = landmarks_lib.IMAGE_SIZE
NUM_LANDMARKS = landmarks_lib.NUM_LANDMARKS

# Shape and dtype of every field of one decoded element (batches add a leading
# `[batch]` dimension).
ELEMENT_SPEC: dict[str, tuple[tuple[int, ...], np.dtype]] = {
    "image": ((IMAGE_SIZE, IMAGE_SIZE, 3), np.dtype(np.uint8)),
    "label": ((), np.dtype(np.int32)),
    "landmarks": ((NUM_LANDMARKS, 2), np.dtype(np.float32)),
    "has_landmarks": ((), np.dtype(np.bool_)),
}


def batch_spec(
    global_batch_size: int,
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> dict[str, jax.ShapeDtypeStruct]:
  """`jax.ShapeDtypeStruct`s of one global batch, for `jax.eval_shape`/AOT.

  Args:
    global_batch_size: examples per step over all processes.
    mesh: if given, the structs carry the batch sharding on `mesh`.
    rules: logical-axis rules giving that sharding.

  Returns:
    A dict with the keys of `ELEMENT_SPEC`, shapes `[batch, ...]`.
  """
  sharding = None if mesh is None else parallel.batch_sharding(mesh, rules)
  return {
      key: jax.ShapeDtypeStruct((global_batch_size,) + shape, dtype,
                                sharding=sharding)
      for key, (shape, dtype) in ELEMENT_SPEC.items()
  }


def _element_name(element: Mapping[str, Any]) -> str:
  for field in ("key", "index", "path"):
    if field in element:
      return f"{field}={element[field]!r}"
  return "<element without key/index>"


class Decode(grain.transforms.Map):
  """Brings a source element to `ELEMENT_SPEC` (decoding encoded images).

  Accepts either `image` (an array) or `image_bytes` (encoded JPEG/PNG, as
  RecordIO and `.bin` files store them). Missing landmarks become zeros with
  `has_landmarks=False`. Fields outside the spec (`key`, `path`, ...) are
  dropped so that elements of any source batch to the same structure. Errors
  name the element's `key`/`index`/`path` field when it has one.
  """

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    name = _element_name(element)
    if element.get("image_bytes") is not None:
      image = self._decode(element["image_bytes"], name)
    elif "image" in element:
      image = np.asarray(element["image"])
    else:
      raise ValueError(
          f"Element {name} has neither 'image' nor 'image_bytes'; sources "
          f"must yield one of them (keys: {sorted(element)})."
      )
    image = self._check_image(image, name)

    if "label" not in element:
      raise ValueError(f"Element {name} has no 'label'.")
    label = np.asarray(element["label"])
    if label.size != 1 or not np.issubdtype(label.dtype, np.integer):
      raise ValueError(
          f"Element {name}: 'label' must be one integer, got {label!r}."
      )

    points = element.get("landmarks")
    if points is None:
      points = np.zeros((NUM_LANDMARKS, 2), np.float32)
      has_landmarks = False
    else:
      points = np.asarray(points, np.float32)
      if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(
            f"Element {name}: 'landmarks' must have shape [5, 2], got "
            f"{points.shape}."
        )
      has_landmarks = bool(element.get("has_landmarks", True))
    return {
        "image": image,
        "label": label.reshape(()).astype(np.int32),
        "landmarks": points,
        "has_landmarks": np.bool_(has_landmarks),
    }

  @staticmethod
  def _decode(data: bytes, name: str) -> np.ndarray:
    try:
      with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise ValueError(
          f"Element {name}: could not decode 'image_bytes' "
          f"({len(data)} bytes, starting {bytes(data[:8])!r}) as JPEG/PNG: "
          f"{e}. Check that the source stores encoded images."
      ) from e

  @staticmethod
  def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    expected = ELEMENT_SPEC["image"][0]
    if image.shape != expected:
      raise ValueError(
          f"Element {name}: image has shape {image.shape}, expected "
          f"{list(expected)} (RGB, ArcFace-aligned 112x112). Align/resize the "
          "faces first."
      )
    if image.dtype != np.uint8:
      # Float images in [0, 1] would silently become black; refuse them.
      if not np.issubdtype(image.dtype, np.integer) or (
          image.min() < 0 or image.max() > 255
      ):
        raise ValueError(
            f"Element {name}: image dtype {image.dtype} with range "
            f"[{image.min()}, {image.max()}]; expected uint8 in [0, 255]."
        )
      image = image.astype(np.uint8)
    return image


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability `p`, landmarks flipped with the image.

  A mirrored face's left eye is the original right eye, so landmarks are
  mirrored and their left/right entries swapped
  (`vigface_jax.data.landmarks.flip_landmarks`). Placeholder landmarks
  (`has_landmarks=False`) are left as zeros.
  """

  def __init__(self, p: float = 0.5):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"flip_prob={p} must be in [0, 1].")
    self.p = p

  def random_map(
      self, element: dict[str, np.ndarray], rng: np.random.Generator
  ) -> dict[str, np.ndarray]:
    # Draw even when p is 0 or 1 so the stream of draws does not depend on p.
    if rng.random() >= self.p:
      return element
    element = dict(element)
    element["image"] = np.ascontiguousarray(element["image"][:, ::-1])
    if element["has_landmarks"]:
      element["landmarks"] = np.asarray(
          landmarks_lib.flip_landmarks(element["landmarks"], width=IMAGE_SIZE),
          np.float32,
      )
    return element


class GlobalBatchSampler:
  """One global stream of records on every process; process p takes slice p of each batch.

  grain's `DataLoader` asks process p of P for sampler indices `i·P + p` and, with w worker
  processes, gives local index `t = i` to worker `t mod w`, which batches its records
  `b = B / P` at a time (the process's batch n comes from worker `n mod w`). This sampler maps
  each such index to position `n·B + p·b + r` (r: the place in the batch) of one seeded global
  sequence (grain's `IndexSampler`, unsharded), whose record and augmentation draw
  (`Philox(seed + position)`) it returns. So global batch n holds the same records in the
  same order with the same flips for any number of processes and workers: a run over P
  processes computes what one process does over the same devices, and its data position is
  its step count, whatever the layout it resumes on (`position_state`).

  With `num_epochs` set, the global batches of a whole number of worker rounds are kept
  (the rest, fewer than w batches, dropped), so every process ends at the same batch.
  """

  def __init__(self, num_records: int, *, global_batch_size: int,
               shard_options: grain.sharding.ShardOptions, worker_count: int = 0,
               shuffle: bool = True, seed: int = 0, num_epochs: int | None = None):
    self._base = grain.samplers.IndexSampler(num_records=num_records, shuffle=shuffle,
                                             num_epochs=num_epochs, seed=int(seed))
    self._shard_options = shard_options
    self._num_records, self._shuffle, self._seed = num_records, shuffle, int(seed)
    self._num_epochs = num_epochs
    self._global = int(global_batch_size)
    self._local = self._global // shard_options.shard_count
    self._workers = max(1, int(worker_count))
    self._worker_count = int(worker_count)
    self._local_len = None
    if num_epochs is not None:
      batches = num_records * num_epochs // self._global
      self._local_len = (batches - batches % self._workers) * self._local

  def global_position(self, index: int) -> int:
    """The global-stream position the loader's sampler index `index` stands for."""
    count = self._shard_options.shard_count
    t, p = divmod(int(index), count)
    k, j = t % self._workers, t // self._workers
    m, r = divmod(j, self._local)
    return (m * self._workers + k) * self._global + p * self._local + r

  def __getitem__(self, index: int):
    if index < 0 or (self._local_len is not None
                     and index // self._shard_options.shard_count >= self._local_len):
      raise IndexError(f"GlobalBatchSampler: index {index} is past the last batch")
    return self._base[self.global_position(index)]

  def __repr__(self) -> str:
    so = self._shard_options
    return (f"GlobalBatchSampler(num_records={self._num_records}, "
            f"global_batch_size={self._global}, shard_index={so.shard_index}, "
            f"shard_count={so.shard_count}, worker_count={self._worker_count}, "
            f"shuffle={self._shuffle}, num_epochs={self._num_epochs}, seed={self._seed})")


def make_loader(
    source: grain.sources.RandomAccessDataSource,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    flip_prob: float = 0.5,
    drop_remainder: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_threads: int | None = 0,
    read_buffer_size: int | None = None,
) -> grain.DataLoader:
  """A deterministic grain `DataLoader` yielding this process's batches.

  Args:
    source: random-access source (`len`, `[i]`) of elements `Decode` accepts.
    global_batch_size: examples per step over all processes; each process
      batches `global_batch_size / shard_count` of them.
    seed: shuffle and augmentation seed (non-negative, 32 bits). Augmentation
      randomness is keyed by position in the sampled stream, so it does not
      depend on `worker_count`.
    shuffle: globally shuffle the records (per epoch).
    num_epochs: passes over the data; None repeats forever.
    worker_count: worker processes for decoding/augmentation (0: in-process).
      The iterator state records it, so resume with the same value. Worker k
      batches records k, k + w, ... of the sampled stream, so changing it
      regroups the same records into different batches.
    worker_buffer_size: batches each worker prepares ahead.
    flip_prob: probability of a horizontal flip.
    drop_remainder: drop the last incomplete batch of a finite run.
    shard_options: how records are split between processes; defaults to
      `grain.sharding.ShardByJaxProcess(drop_remainder=True)`.
    read_threads: threads reading records in each process (`grain.ReadOptions`),
      None for grain's default (16). 0 suits CPU-bound sources such as the
      procedural faces, whose GIL-bound rendering runs 3-4x slower with 16
      threads (BENCHMARKS.md); sources waiting on disk or a bucket want more.
    read_buffer_size: elements those threads read ahead (default: max(64, the
      per-process batch)). grain's own default of 500 costs ~40% throughput:
      its prefetch bookkeeping walks the whole buffer on every element.

  Returns:
    A `grain.DataLoader`; `iter()` gives a `DataLoaderIterator` of dicts of
    numpy arrays `[process_batch, ...]` following `ELEMENT_SPEC`.
  """
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(
        f"seed={seed!r} must be an integer in [0, 2**32) (data.seed)."
    )
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if global_batch_size <= 0 or global_batch_size % shard_options.shard_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple "
        f"of the number of data shards ({shard_options.shard_count}, one per "
        "JAX process)."
    )
  local_batch_size = global_batch_size // shard_options.shard_count
  sampler = GlobalBatchSampler(len(source), global_batch_size=global_batch_size,
                               shard_options=shard_options, worker_count=worker_count,
                               shuffle=shuffle, seed=int(seed), num_epochs=num_epochs)
  operations = [
      Decode(),
      RandomFlip(flip_prob),
      grain.transforms.Batch(local_batch_size, drop_remainder=drop_remainder),
  ]
  logging.info(
      "grain loader: %d records, shard %d/%d, batch %d per process "
      "(%d global), %d workers.",
      len(source), shard_options.shard_index, shard_options.shard_count,
      local_batch_size, global_batch_size, worker_count,
  )
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=operations,
      worker_count=worker_count,
      worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      read_options=(None if read_threads is None else grain.ReadOptions(
          num_threads=int(read_threads),
          prefetch_buffer_size=int(read_buffer_size or max(64, local_batch_size)))),
  )


def position_state(loader: grain.DataLoader, template: bytes, num_batches: int) -> bytes:
  """grain's iterator state (JSON bytes) of `loader` after `num_batches` global batches.

  `template` is a state of the same loader (its reprs and version); the positions are what
  grain's `DataLoader` records (per worker: the records it has taken from its share) for a
  `GlobalBatchSampler` stream: batch n is worker `n mod w`'s, b records from each process.
  """
  import json  # pylint: disable=g-import-not-at-top
  state = json.loads(template.decode())
  sampler = loader._sampler  # pylint: disable=protected-access
  so = sampler._shard_options  # pylint: disable=protected-access
  count, index = so.shard_count, so.shard_index
  workers = int(state["worker_count"])
  b = sampler._local  # pylint: disable=protected-access
  if num_batches < 0:
    raise ValueError(f"num_batches={num_batches} must be >= 0")
  if workers == 0:
    state["last_seen_indices"] = {"0": (num_batches * b - 1) * count + index}
    state["last_worker_index"] = -1
  else:
    total = workers * count
    seen = {}
    for k in range(workers):
      taken = (num_batches - k + workers - 1) // workers if num_batches > k else 0
      seen[str(k)] = index - total + k * count + taken * b * total
    state["last_seen_indices"] = seen
    state["last_worker_index"] = num_batches % workers - 1
  return json.dumps(state, indent=4).encode()


class GlobalBatchIterator(Iterator[dict[str, jax.Array]]):
  """Yields global batches, sharded over the batch axes of a mesh.

  Each `next()` takes one per-process batch from the grain loader and
  assembles the global `jax.Array`s with `parallel.host_to_global` (leading
  dimension `global_batch_size`, split as `parallel.batch_sharding(mesh)`).
  `get_state()` is the grain iterator state after the last batch returned;
  `set_state()` on a fresh iterator over the same loader continues exactly
  from there.
  """

  def __init__(
      self,
      loader: grain.DataLoader,
      mesh: Mesh,
      rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
  ):
    self._loader = loader
    self._mesh = mesh
    self._sharding = parallel.batch_sharding(mesh, rules)
    self._iterator = iter(loader)
    # The random-access source (its `num_classes` sizes the classifier).
    self.source = getattr(loader, "_data_source", None)

  @property
  def sharding(self) -> jax.sharding.NamedSharding:
    return self._sharding

  def __iter__(self) -> GlobalBatchIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self._iterator)
    return parallel.host_to_global(local, self._mesh, self._sharding)

  def get_state(self) -> bytes:
    """grain's serialized iterator state (JSON bytes) for checkpoints."""
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    """Restores a state from `get_state()` (same loader settings required)."""
    self._iterator.set_state(state)

  def set_position(self, num_batches: int) -> None:
    """Moves a fresh iterator to just after global batch `num_batches` (e.g. a checkpoint's
    step written under another process or worker count: `GlobalBatchSampler` makes the
    position a function of the batch count alone)."""
    self._iterator.set_state(position_state(self._loader, self._iterator.get_state(),
                                            int(num_batches)))

  def start_prefetch(self) -> None:
    """Called by `grain.checkpoint.CheckpointHandler` after a restore (prefetch is lazy here)."""

  def close(self) -> None:
    """Stops grain's worker processes and frees their shared memory (idempotent).

    Garbage collection would do it eventually; at interpreter exit it may not, and grain
    then warns about leaked shared-memory blocks.
    """
    # DataLoaderIterator has no close() of its own; its dataset iterator does.
    inner = getattr(self._iterator, "_iterator", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()

  def __enter__(self) -> GlobalBatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _procedural_source(data_config: Any) -> grain.sources.RandomAccessDataSource:
  from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top

  return faces.ProceduralFaceSource(
      seed=data_config.seed,
      num_identities=data_config.num_identities,
      images_per_identity=data_config.images_per_identity,
      identity_offset=data_config.identity_offset,
      cache=data_config.cache,
  )


# `data.source` name -> factory taking the data ConfigDict. Factories import
# their module lazily so an unused source costs nothing (and its optional
# dependencies need not be installed).
def _arrayrecord_source(data_config: Any) -> grain.sources.RandomAccessDataSource:
  from vigface_jax.data import arrayrecord  # pylint: disable=g-import-not-at-top

  return arrayrecord.ArrayRecordSource(_required(data_config, "path"),
                                       split=data_config.split)


def _imagefolder_source(data_config: Any) -> grain.sources.RandomAccessDataSource:
  from vigface_jax.data import imagefolder  # pylint: disable=g-import-not-at-top

  return imagefolder.ImageFolderSource(
      _required(data_config, "path"), landmarks_file=data_config.landmarks_file,
      on_error=data_config.on_error, align=data_config.align)


def _recordio_source(data_config: Any) -> grain.sources.RandomAccessDataSource:
  from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top

  return recordio.RecordIOSource(
      _required(data_config, "path"), label_file=data_config.label_file,
      bgr_to_rgb=data_config.bgr_to_rgb, on_error=data_config.on_error,
      decode=data_config.decode)


SOURCES: dict[str, Callable[[Any], grain.sources.RandomAccessDataSource]] = {
    "procedural": _procedural_source,
    "arrayrecord": _arrayrecord_source,
    "imagefolder": _imagefolder_source,
    "recordio": _recordio_source,
}


def build_source(data_config: Any) -> grain.sources.RandomAccessDataSource:
  """Builds the source named by `data_config.source` (see `SOURCES`).

  Args:
    data_config: the `config.data` ConfigDict. For `'procedural'`: `seed`,
      `num_identities`, `images_per_identity`, optional `identity_offset`.

  Returns:
    A random-access source of elements `Decode` accepts.

  Raises:
    ValueError: if `data.source` is missing or unknown.
  """
  name = data_config.get("source") if hasattr(data_config, "get") else None
  if name not in SOURCES:
    raise ValueError(
        f"data.source={name!r} is not a known source; choose one of "
        f"{sorted(SOURCES)}."
    )
  return SOURCES[name](data_config)


def _required(data_config: Any, field: str) -> Any:
  if data_config.get(field) is None:
    raise ValueError(f"data.{field} must be set in the config.")
  return data_config[field]


def validate(config: Any) -> None:
  """ConfigError naming the field unless every `config.data` field is valid; a file source
  without `data.path` gets a message saying what to pass."""
  data = config_lib.Fields(config.data, "data")
  source = data.choice("source", sorted(SOURCES))
  path = data.str("path", optional=True)
  # A compile-only dry run reads no data: with the class count given it needs no path.
  model = config.get("model")
  dry = bool(config.get("dry_run", False)) and model is not None and (
      model.get("num_real") is not None)
  if source != "procedural" and not path and not dry:
    raise config_lib.ConfigError(
        f"data.path is not set: task {config.task!r} trains on a face dataset you keep "
        f"(data.source={source!r}, e.g. CASIA-WebFace's train.rec from insightface); pass "
        "--config.data.path=/path/to/faces_webface_112x112/train.rec, or use "
        f"--config=configs/{config.task}.py:demo for procedural faces")
  data.int("seed", 0)
  data.int("global_batch_size", 1)
  data.bool("shuffle")
  data.int("num_epochs", 1, optional=True)
  data.float("flip_prob", 0.0, most=1.0)
  data.int("worker_count", 0)
  data.int("worker_buffer_size", 1)
  data.int("read_threads", 0, optional=True)
  data.int("num_identities", 1)
  data.int("images_per_identity", 1)
  data.int("identity_offset", 0)
  data.bool("cache")
  data.str("label_file", optional=True)
  data.bool("bgr_to_rgb")
  data.bool("decode")
  data.str("landmarks_file", optional=True)
  data.bool("align")
  data.str("split")
  data.choice("on_error", ("raise", "skip"))


def num_classes(config: Any, source: Any) -> int:
  """`model.num_real` if set, else the source's `num_classes` (ConfigError if neither)."""
  n = config.model.num_real
  if n is None:
    n = getattr(source, "num_classes", None)
  if not n:
    raise config_lib.ConfigError(
        f"cannot tell the number of real identities of data.source={config.data.source!r}; "
        "set model.num_real")
  return int(n)


def make_pipeline(
    config: Any,
    mesh: Mesh,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> GlobalBatchIterator:
  """Source + loader + global batches, all from `config.data`.

  The fields of `config.data` (declared with their defaults by `config_lib.data_config`,
  checked by `validate`): `source` and the source's own (see `build_source`),
  `global_batch_size` (a multiple of the process count and of the devices the batch axis
  spans), `seed`, `shuffle`, `num_epochs`, `worker_count`, `worker_buffer_size`,
  `flip_prob`, `read_threads` (see `make_loader`).

  Args:
    config: the experiment ConfigDict (must have `config.data`).
    mesh: the device mesh the batches are sharded over.
    rules: logical-axis rules; `batch` gives the batch sharding.

  Returns:
    A `GlobalBatchIterator` whose state the trainer checkpoints.
  """
  data = config.data
  global_batch_size = _required(data, "global_batch_size")
  # Fails early, with the mesh in the message, rather than inside
  # make_array_from_process_local_data on the first batch.
  parallel.process_batch_size(global_batch_size, mesh, rules)
  loader = make_loader(
      build_source(data),
      global_batch_size=global_batch_size,
      seed=_required(data, "seed"),
      shuffle=data.shuffle,
      num_epochs=data.num_epochs,
      worker_count=data.worker_count,
      worker_buffer_size=data.worker_buffer_size,
      flip_prob=data.flip_prob,
      read_threads=data.read_threads,
  )
  return GlobalBatchIterator(loader, mesh, rules)
