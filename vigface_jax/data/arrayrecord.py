"""ArrayRecord shards with TFDS metadata: the fast random-access format for training.

`write_arrayrecord` turns any source of the shared element spec (RecordIO, ImageFolder,
procedural faces) into `DIR/<name>-<split>.array_record-0000k-of-0000n` shards of serialised
`tf.train.Example`s plus TFDS's `dataset_info.json` and `features.json`, written without
TensorFlow. Landmarks travel with the images. Both readers work on the result:

  * grain: `ArrayRecordSource(DIR)` (a `grain.sources.ArrayRecordDataSource` plus parsing), the
    source `data.source = 'arrayrecord'` builds;
  * TFDS: `tfds.builder_from_directory(DIR).as_data_source('train')`, or
    `tfds.data_source(name, data_dir=parent_of_DIR_name)` when DIR is `<data_dir>/<name>/<ver>`.

Paths may be local or `gs://` (etils.epath). Encoded images are stored as they come when the
source provides them (`image_bytes`), so converting a JPEG RecordIO pack does not re-encode.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from typing import Any, Iterable

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tqdm

from vigface_jax.data import codec

IMAGE_SIZE = 112
_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[^-.]+)\.array_record-(?P<i>\d{5})-of-(?P<n>\d{5})$")


def features(num_classes: int, encoding_format: str = "jpeg"):
  """The TFDS `FeaturesDict` of the element spec (`image`, `label`, `landmarks`, ...)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                   encoding_format=encoding_format),
      "label": tfds.features.ClassLabel(num_classes=int(num_classes)),
      "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
      "has_landmarks": tfds.features.Tensor(shape=(), dtype=np.bool_),
  })


def serialize(element: dict[str, Any], *, encoding_format: str = "jpeg",
              quality: int = 95) -> bytes:
  """One element (decoded `image` or encoded `image_bytes`) → serialised tf.train.Example."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_feature_pb2 as f  # pylint: disable=g-import-not-at-top
  if element.get("image_bytes") is not None:
    data = bytes(element["image_bytes"])
  else:
    image = np.asarray(element["image"])
    if image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
      raise ValueError(f"element {element.get('key', '?')!r}: image must be uint8 [112, 112, 3], "
                       f"got {image.dtype} {list(image.shape)}")
    data = codec.encode_image(image, encoding_format, quality)
  points = np.asarray(element.get("landmarks", np.zeros((5, 2))), np.float32).reshape(-1)
  has = bool(element.get("has_landmarks", False))
  example = tf_example_pb2.Example(features=f.Features(feature={
      "image": f.Feature(bytes_list=f.BytesList(value=[data])),
      "label": f.Feature(int64_list=f.Int64List(value=[int(element["label"])])),
      "landmarks": f.Feature(float_list=f.FloatList(value=points.tolist())),
      "has_landmarks": f.Feature(int64_list=f.Int64List(value=[int(has)])),
  }))
  # deterministic: the features map in key order. Otherwise its order follows the process's
  # hash seed, and the same dataset exported by two processes gives different shards.
  return example.SerializeToString(deterministic=True)


def parse(record: bytes) -> dict[str, Any]:
  """Serialised tf.train.Example → `{image_bytes, label, landmarks, has_landmarks}`."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  feats = tf_example_pb2.Example.FromString(record).features.feature
  return {
      "image_bytes": feats["image"].bytes_list.value[0],
      "label": np.int32(feats["label"].int64_list.value[0]),
      "landmarks": np.asarray(feats["landmarks"].float_list.value, np.float32).reshape(5, 2),
      "has_landmarks": np.bool_(feats["has_landmarks"].int64_list.value[0]),
  }


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def shard_paths(data_dir: str | os.PathLike, split: str = "train") -> list[str]:
  """The shards of `split` in `data_dir`, in order; an error if none or some are missing."""
  root = epath.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"ArrayRecord directory {root} does not exist")
  found = {}
  for p in root.iterdir():
    m = _SHARD_RE.match(p.name)
    if m and m.group("split") == split:
      found[int(m.group("i"))] = (p, int(m.group("n")))
  if not found:
    raise FileNotFoundError(f"no '{split}' ArrayRecord shards (<name>-{split}.array_record-"
                            f"NNNNN-of-NNNNN) in {root}")
  total = {n for _, n in found.values()}
  if len(total) != 1 or sorted(found) != list(range(total.pop())):
    raise ValueError(f"incomplete '{split}' shards in {root}: have {sorted(found)}; a conversion "
                     "may have been interrupted, run it again")
  return [os.fspath(found[i][0]) for i in sorted(found)]


def write_arrayrecord(elements: Iterable[dict[str, Any]], out_dir: str | os.PathLike, *,
                      num_examples: int, num_classes: int, name: str = "vigface_faces",
                      split: str = "train", num_shards: int | None = None,
                      encoding_format: str = "jpeg", quality: int = 95,
                      progress: bool = True) -> dict[str, Any]:
  """Writes `num_examples` elements as ArrayRecord shards plus TFDS metadata.

  Shards are written under temporary names and renamed once complete, and the metadata is
  written last, so an interrupted conversion never looks like a finished dataset.

  Args:
    elements: iterable of element dicts (the pipeline's spec; `image` or `image_bytes`).
    out_dir: target directory (local or gs://); created if missing.
    num_examples: how many elements `elements` yields.
    num_classes: labels are in [0, num_classes).
    name: TFDS dataset name (lowercase, digits, underscores).
    split: split name.
    num_shards: shard count (default: one per 10,000 examples, at least one).
    encoding_format: 'jpeg' or 'png' for images that arrive decoded.
    quality: JPEG quality.
    progress: tqdm progress bar.

  Returns:
    A summary dict (paths, counts).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"dataset name {name!r} must be lowercase letters, digits and underscores")
  if encoding_format not in ("jpeg", "png"):
    raise ValueError(f"encoding_format must be 'jpeg' or 'png', got {encoding_format!r}")
  if num_examples <= 0:
    raise ValueError(f"nothing to convert: num_examples={num_examples}")
  num_shards = num_shards or max(1, -(-num_examples // 10_000))
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  staging = None if _is_local(out) else epath.Path(tempfile.mkdtemp(prefix="vigface_ar_"))
  bounds = np.linspace(0, num_examples, num_shards + 1).astype(int)
  final = [out / f"{name}-{split}.array_record-{i:05d}-of-{num_shards:05d}"
           for i in range(num_shards)]
  it = iter(tqdm.tqdm(elements, total=num_examples, desc="convert", unit="img",
                      disable=not progress))
  labels_seen = 0
  for i, path in enumerate(final):
    # The ArrayRecord writer needs a local file: a remote shard is staged, then uploaded.
    tmp = (staging / path.name) if staging else path.parent / f".{path.name}.tmp"
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    try:
      for _ in range(bounds[i + 1] - bounds[i]):
        element = next(it)
        label = int(element["label"])
        if not 0 <= label < num_classes:
          raise ValueError(f"element {element.get('key', '?')!r}: label {label} outside "
                           f"[0, {num_classes})")
        labels_seen += bool(element.get("has_landmarks", False))
        writer.write(serialize(element, encoding_format=encoding_format, quality=quality))
      writer.close()
    except BaseException as e:
      writer.close()
      tmp.unlink(missing_ok=True)  # completed shards stay; the broken one leaves no trace
      if isinstance(e, StopIteration):
        raise ValueError(f"the source ended before num_examples={num_examples}") from e
      raise
    if staging:
      path.write_bytes(tmp.read_bytes())
      tmp.unlink()
    else:
      tmp.rename(path)
  template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  split_info = tfds.core.SplitInfo(
      name=split, shard_lengths=np.diff(bounds).tolist(), num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=out, template=template, dataset_name=name, split=split,
          filetype_suffix="array_record"))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features(num_classes, encoding_format), split_infos=[split_info],
      filename_template=template, check_data=False)
  logging.info("wrote %d examples (%d with landmarks) in %d shards to %s", num_examples,
               labels_seen, num_shards, out)
  return {"out_dir": os.fspath(out), "num_examples": num_examples, "num_shards": num_shards,
          "num_classes": num_classes, "with_landmarks": labels_seen}


class ArrayRecordSource:
  """grain random-access source over converted shards, in the shared element spec.

  Elements carry `image_bytes` (decoded by the pipeline's `Decode`), or a decoded `image`
  when `decode=True`.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str = "train", decode: bool = False):
    self.data_dir = os.fspath(data_dir)
    self.split = split
    self.decode = decode
    self._paths = shard_paths(self.data_dir, split)
    self._source = None

  def _open(self):
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top
      self._source = grain.sources.ArrayRecordDataSource(self._paths)
    return self._source

  @property
  def num_classes(self) -> int:
    import json  # pylint: disable=g-import-not-at-top
    info = json.loads((epath.Path(self.data_dir) / "features.json").read_text())
    return int(info["featuresDict"]["features"]["label"]["classLabel"]["numClasses"])

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    element = parse(self._open()[int(index)])
    element["key"] = int(index)
    if self.decode:
      image = np.asarray(Image.open(io.BytesIO(element.pop("image_bytes"))).convert("RGB"))
      element["image"] = image
    return element

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # reopened lazily in each grain worker
    return state

  def __repr__(self) -> str:
    return f"ArrayRecordSource(data_dir={self.data_dir!r}, split={self.split!r})"
