"""A grain source over a folder of face images, one sub-folder per identity.

Layout:

  root/
    <identity A>/img001.jpg, img002.png, sub/img003.JPG, ...
    <identity B>/...

* **Class ids** are the ranks of the sub-folder names in plain code-point
  order (`sorted(names)`, as torchvision's `ImageFolder`): `classes[i]` is
  the folder of class `i`. So `10` sorts before `2`; zero-pad numeric names.
  Every (non-hidden) sub-folder is a class, even an empty one (with a
  warning), so ids depend only on the folder names and stay stable when
  images are added or removed.
* **Records** are class by class; within a class, images (searched
  recursively) are sorted by their relative path. Record `i` has `key` =
  that relative path with `/` separators, e.g. `'id_003/img001.jpg'`.
* **Images** are JPEG or PNG (extensions matched case-insensitively), decoded
  as stored (EXIF orientation is not applied, like `pipeline.Decode`), with
  L/LA/P/RGBA/CMYK/... converted to RGB (alpha dropped). They must be
  112x112 ArcFace-aligned crops; any other size is an error naming the file,
  except with `align=True` (below).
* **Landmarks** (optional side file, `landmark_files` format, names =
  relative paths): images listed get `has_landmarks=True` and their points;
  images not listed get zeros and `has_landmarks=False` (counted in
  `num_missing_landmarks`, logged once).
* **align=True**: an image whose size is not 112x112 is aligned while
  reading: its points in the landmarks file are taken as coordinates in that
  original image, `landmarks.align_face` warps it to the 112x112 ArcFace crop
  (insightface `norm_crop`), and the element carries the aligned points.
  112x112 images are taken as already aligned and used as they are (their
  points are in the crop), so folders may mix both. A non-112 image without
  landmarks is an error.
* **Errors** on one file (unreadable, undecodable, wrong size) raise a
  `ValueError` naming the path with `on_error='raise'`. With `on_error='skip'`
  the record is replaced by the next readable record in listing order (the
  same replacement every time, so runs stay deterministic); `num_skipped`
  counts replacements in this process and each one is logged. grain's
  samplers need every index to yield an element, hence replacement rather
  than dropping.

The listing is done once, in `__init__` (`os.scandir` locally, `etils.epath`
for `gs://`); nothing is opened there, so problems with file contents show
up when a record is read. The index is stored compactly (one bytes blob of
keys and numpy arrays), so pickling the source into grain workers is cheap
even for millions of images.
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

from vigface_jax.data import landmark_files
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import skip

IMAGE_SIZE = landmarks_lib.IMAGE_SIZE
NUM_LANDMARKS = landmarks_lib.NUM_LANDMARKS
ON_ERROR = ("raise", "skip")


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                  Image.DecompressionBombError)


def _hidden(name: str) -> bool:
  # .DS_Store, .ipynb_checkpoints, editor swap files: never data.
  return name.startswith(".")


def _list_local(root: str, extensions: tuple[str, ...]):
  """Returns `(class_names, {class: [relative paths]}, root_images, ignored)`."""
  classes, root_images = [], []
  with os.scandir(root) as entries:
    for entry in entries:
      if _hidden(entry.name):
        continue
      if entry.is_dir():
        classes.append(entry.name)
      elif entry.name.lower().endswith(extensions):
        root_images.append(entry.name)
  files: dict[str, list[str]] = {}
  ignored = 0
  for name in classes:
    found = []
    stack = [(os.path.join(root, name), name)]
    while stack:
      directory, relative = stack.pop()
      with os.scandir(directory) as entries:
        for entry in entries:
          if _hidden(entry.name):
            continue
          rel = f"{relative}/{entry.name}"
          if entry.is_dir():
            stack.append((entry.path, rel))
          elif entry.name.lower().endswith(extensions):
            found.append(rel)
          else:
            ignored += 1
    files[name] = found
  return classes, files, root_images, ignored


def _list_epath(root: str, extensions: tuple[str, ...]):
  """Like `_list_local` through `epath` (one listing per directory on GCS)."""
  root_path = epath.Path(root)
  classes, root_images = [], []
  files: dict[str, list[str]] = {}
  ignored = 0
  for directory, dirnames, filenames in root_path.walk():
    relative = os.path.relpath(os.fspath(directory), os.fspath(root_path))
    parts = [] if relative == "." else relative.replace(os.sep, "/").split("/")
    if any(_hidden(p) for p in parts):
      continue
    if not parts:
      classes = [d for d in dirnames if not _hidden(d)]
      root_images = [f for f in filenames
                     if not _hidden(f) and f.lower().endswith(extensions)]
      continue
    found = files.setdefault(parts[0], [])
    for f in filenames:
      if _hidden(f):
        continue
      if f.lower().endswith(extensions):
        found.append("/".join(parts + [f]))
      else:
        ignored += 1
  for name in classes:
    files.setdefault(name, [])
  return classes, {c: files[c] for c in classes}, root_images, ignored


class ImageFolderSource:
  """grain random-access source over `root/<identity>/<image>` (see module doc).

  Elements: `image` uint8 `[112, 112, 3]` RGB (or `image_bytes`, the encoded
  file, with `decode=False`; `pipeline.Decode` decodes it), `label` int32,
  `landmarks` float32 `[5, 2]` (aligned frame; zeros without landmarks),
  `has_landmarks` bool, `key` the image's relative path.

  Attributes:
    root: the folder given.
    classes: folder names; `classes[label]` is the folder of class `label`.
    num_classes: `len(classes)`.
    num_missing_landmarks: images not in the landmarks file (0 without one).
    num_skipped: records this process replaced in skip mode.
  """

  def __init__(
      self,
      root: str | os.PathLike,
      *,
      landmarks_file: str | os.PathLike | None = None,
      extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png"),
      decode: bool = True,
      on_error: str = "raise",
      align: bool = False,
  ):
    """Lists the images (and reads the landmarks file) once.

    Args:
      root: folder with one sub-folder per identity; local or `gs://`.
      landmarks_file: optional landmark side file (`landmark_files` format)
        whose names are paths relative to `root`.
      extensions: image file name endings, matched case-insensitively.
      decode: yield decoded `image`; False yields the file's `image_bytes`
        (after a header check of size and format) for `pipeline.Decode`.
        Aligned images are always decoded.
      on_error: `'raise'` or `'skip'` for unreadable/undecodable/wrong-size
        files (see module docstring).
      align: align images that are not 112x112 using their landmarks, which
        are then in original-image coordinates (see module docstring).

    Raises:
      FileNotFoundError: if `root` or `landmarks_file` does not exist.
      ValueError: if `root` has no identity folders or no images, holds
        images directly, `on_error` is unknown, `align` is set without a
        landmarks file, or no landmark entry matches an image.
    """
    if on_error not in ON_ERROR:
      raise ValueError(f"ImageFolderSource: on_error={on_error!r} must be one of {ON_ERROR}.")
    if align and landmarks_file is None:
      raise ValueError(
          "ImageFolderSource: align=True needs a landmarks_file with each "
          "image's five points in its original coordinates."
      )
    self.root = os.fspath(root).rstrip("/") or "/"
    self.landmarks_file = None if landmarks_file is None else os.fspath(landmarks_file)
    self.extensions = tuple(
        (e if e.startswith(".") else "." + e).lower() for e in extensions)
    self.decode = bool(decode)
    self.on_error = on_error
    self.align = bool(align)
    self._local = landmark_files.is_local(self.root)
    self._num_skipped = 0
    self._lock = threading.Lock()

    root_path = epath.Path(self.root)
    if not root_path.is_dir():
      raise FileNotFoundError(
          f"ImageFolderSource: root {self.root} is not an existing folder.")
    lister = _list_local if self._local else _list_epath
    classes, files, root_images, ignored = lister(self.root, self.extensions)
    if root_images:
      raise ValueError(
          f"ImageFolderSource: {len(root_images)} images lie directly in "
          f"{self.root} (e.g. {sorted(root_images)[0]!r}); put each "
          "identity's images in its own sub-folder (root/<identity>/<image>)."
      )
    if not classes:
      raise ValueError(
          f"ImageFolderSource: {self.root} has no sub-folders; expected one "
          "sub-folder per identity (root/<identity>/<image>).")
    self.classes = sorted(classes)
    empty = [c for c in self.classes if not files[c]]
    num_images = sum(len(v) for v in files.values())
    if not num_images:
      raise ValueError(
          f"ImageFolderSource: no images with extensions {self.extensions} "
          f"in the {len(self.classes)} sub-folders of {self.root}.")
    if empty:
      logging.warning(
          "ImageFolderSource(%s): %d identity folders have no images (e.g. "
          "%r); they keep their class ids but no record has them.",
          self.root, len(empty), empty[:3])
    if ignored:
      logging.info("ImageFolderSource(%s): ignored %d files without an image "
                   "extension %s.", self.root, ignored, self.extensions)
    if all(c.isdigit() for c in self.classes):
      numeric = sorted(self.classes, key=int)
      if numeric != self.classes:
        first = next(i for i, (a, b) in enumerate(zip(self.classes, numeric)) if a != b)
        logging.warning(
            "ImageFolderSource(%s): folder names are numbers but class ids "
            "follow string order (folder %r gets id %d), so a label is not "
            "int(folder name). Zero-pad the names if they must match.",
            self.root, self.classes[first], first)

    keys, labels = [], []
    for label, name in enumerate(self.classes):
      for key in sorted(files[name]):
        keys.append(key)
        labels.append(label)
    encoded = [k.encode("utf-8") for k in keys]
    self._blob = b"".join(encoded)
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
    self._labels = np.asarray(labels, np.int32)

    # Only allocated with a landmarks file: 40 bytes per image adds up to
    # hundreds of MB (pickled into every grain worker) for Glint360K-size sets.
    self._points = None
    self._has_points = None
    self.num_missing_landmarks = 0
    if self.landmarks_file is not None:
      self._attach_landmarks(keys)
    logging.info("%r: %d images.", self, len(keys))

  def _attach_landmarks(self, keys: list[str]) -> None:
    table = landmark_files.read_landmarks(self.landmarks_file)
    self._points = np.zeros((len(keys), NUM_LANDMARKS, 2), np.float32)
    self._has_points = np.zeros(len(keys), np.bool_)
    if not table:
      raise ValueError(
          f"ImageFolderSource: landmarks file {self.landmarks_file} has no "
          "entries.")
    for i, key in enumerate(keys):
      points = table.get(key)
      if points is not None:
        self._points[i] = points
        self._has_points[i] = True
    matched = int(self._has_points.sum())
    if not matched:
      raise ValueError(
          f"ImageFolderSource: none of the {len(table)} names in landmarks "
          f"file {self.landmarks_file} matches an image under {self.root} "
          f"(file has e.g. {next(iter(table))!r}, images are named like "
          f"{keys[0]!r}). Names must be paths relative to the root.")
    self.num_missing_landmarks = len(keys) - matched
    if self.num_missing_landmarks:
      missing = keys[int(np.flatnonzero(~self._has_points)[0])]
      logging.warning(
          "ImageFolderSource(%s): %d of %d images have no landmarks in %s "
          "(e.g. %r); they get has_landmarks=False.", self.root,
          self.num_missing_landmarks, len(keys), self.landmarks_file, missing)
    if len(table) > matched:
      logging.info("ImageFolderSource(%s): %d entries of %s match no image.",
                   self.root, len(table) - matched, self.landmarks_file)
    if not self.align:
      landmark_files.check_frame(
          self._points[self._has_points],
          names=[k for k, h in zip(keys, self._has_points) if h],
          source=f"landmarks file {self.landmarks_file}")

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def labels(self) -> np.ndarray:
    """int32 `[num_records]` class of every record (read-only view)."""
    view = self._labels.view()
    view.flags.writeable = False
    return view

  @property
  def num_skipped(self) -> int:
    return self._num_skipped

  def key(self, index: int) -> str:
    """Relative path of record `index`."""
    start, stop = self._offsets[index], self._offsets[index + 1]
    return self._blob[start:stop].decode("utf-8")

  def path(self, index: int) -> str:
    """Full path (or URL) of record `index`'s file."""
    return f"{self.root}/{self.key(index)}"

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, record_key: int) -> dict[str, Any]:
    index = int(record_key)
    if not 0 <= index < len(self):
      raise IndexError(
          f"ImageFolderSource: record {index} outside [0, {len(self)}).")
    if self.on_error == "raise":
      return self._load(index)
    return skip.load_or_replace(self._load, index, len(self), errors=ValueError,
                                name="ImageFolderSource", on_replace=self._count_skipped)

  def _count_skipped(self) -> int:
    with self._lock:
      self._num_skipped += 1
      return self._num_skipped

  def _read(self, path: str) -> bytes:
    try:
      if self._local:
        with open(path, "rb") as f:
          return f.read()
      return epath.Path(path).read_bytes()
    except OSError as e:
      raise ValueError(f"ImageFolderSource: cannot read {path}: {e}") from e

  def _load(self, index: int) -> dict[str, Any]:
    path = self.path(index)
    data = self._read(path)
    if self._points is None:
      has_points, points = False, np.zeros((NUM_LANDMARKS, 2), np.float32)
    else:
      has_points = bool(self._has_points[index])
      points = self._points[index].copy()
    element: dict[str, Any] = {
        "label": self._labels[index],
        "landmarks": points,
        "has_landmarks": np.bool_(has_points),
        "key": self.key(index),
    }
    aligned_size = (IMAGE_SIZE, IMAGE_SIZE)
    try:
      with Image.open(io.BytesIO(data)) as img:
        size, mode = img.size, img.mode
        if size == aligned_size and not self.decode:
          # Header only: format and size are known without decoding.
          element["image_bytes"] = data
          return element
        image = None
        if size == aligned_size or (self.align and has_points):
          image = np.asarray(img.convert("RGB") if mode != "RGB" else img)
    except _DECODE_ERRORS as e:
      # PIL's own message names an anonymous BytesIO; the path and the first
      # bytes say more (HTML error pages and LFS pointers are common culprits).
      reason = ("unrecognised format" if isinstance(e, UnidentifiedImageError)
                else f"{type(e).__name__}: {e}")
      raise ValueError(
          f"ImageFolderSource: cannot decode {path} ({len(data)} bytes, "
          f"starting {data[:8]!r}) as JPEG/PNG: {reason}.") from e
    if image is None:
      width, height = size
      if self.align:
        fix = (f"align=True needs its five points (original-image "
               f"coordinates) in {self.landmarks_file}, which has none for it")
      else:
        fix = ("align the faces first (vigface_jax.data.landmarks.align_face), "
               "or pass align=True with a landmarks_file of five points per "
               "image in original-image coordinates")
      raise ValueError(
          f"ImageFolderSource: {path} is {width}x{height} ({mode}), expected "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} ArcFace-aligned crops; {fix}.")
    if size != aligned_size:
      image, element["landmarks"] = landmarks_lib.align_face(image, points)
    element["image"] = np.ascontiguousarray(image, dtype=np.uint8)
    return element

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]
    state["_num_skipped"] = 0  # a count of this process's reads
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"ImageFolderSource(root={self.root!r}, num_images={len(self)}, "
            f"num_classes={self.num_classes}, "
            f"landmarks_file={self.landmarks_file!r}, decode={self.decode}, "
            f"on_error={self.on_error!r}, align={self.align})")
