"""Five-point landmark side files: read, write, and sanity-check their frame.

Format (ours, and the insightface-style one other tools write): UTF-8 text,
one image per line,

  relative/path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5

with the five points in ArcFace order (left eye, right eye, nose tip, left
mouth corner, right mouth corner) as `(x, y)` pixels of the 112x112 aligned
crop, pixel centres at integers (`landmarks` module conventions). Accepted
variations:

* insightface IJB's `name x1 y1 ... x5 y5 score` (e.g.
  `ijbc_name_5pts_score.txt`): a 12th column is parsed as a number, so a
  shifted column is caught, and then ignored. All lines of one file must have
  the same column count.
* Any mix of spaces and tabs between columns; CRLF line ends; a UTF-8 BOM.
* `#` comments: a token starting with `#` ends the line, so a whole-line or
  trailing comment works while names containing `#` (`a#b.jpg`) do not break.
* Record keys for RecordIO packs (`read_landmarks(path, record_keys=True)`):
  the first column is a non-negative integer record key, returned as `int`.

Names are split on whitespace, so they cannot contain spaces. Path names are
normalised with `posixpath.normpath` (`./id/a.jpg` and `id//a.jpg` both read as
`id/a.jpg`) so they match the relative paths `ImageFolderSource` lists.

Caution: IJB's `*_5pts_score.txt` and most detector outputs hold points in the
*original* image, not the aligned crop. `check_frame` spots that (and other
frame mix-ups) and says what to do.

Paths may be local or `gs://...` (`etils.epath`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import os
import posixpath
import re
import tempfile
from typing import Any, Union

from absl import logging
from etils import epath
import numpy as np

from vigface_jax.data import landmarks as landmarks_lib

NUM_LANDMARKS = landmarks_lib.NUM_LANDMARKS
# Name plus ten coordinates; IJB files add a faceness score.
_COLUMNS = (1 + 2 * NUM_LANDMARKS, 2 + 2 * NUM_LANDMARKS)

PathLike = Union[str, os.PathLike]
Key = Union[str, int]

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path: PathLike) -> bool:
  """True unless `path` is a URL such as `gs://bucket/x`."""
  return not _URL_RE.match(os.fspath(path))


def _normalise_name(name: str) -> str:
  return posixpath.normpath(name)


def read_landmarks(
    path: PathLike, *, record_keys: bool = False
) -> dict[Key, np.ndarray]:
  """Reads a landmark side file (format in the module docstring).

  Args:
    path: local path or `gs://` URL of the text file.
    record_keys: the names are integer RecordIO record keys; return them as
      `int` (`"007"` and `"7"` are the same key).

  Returns:
    `{name: float32 [5, 2]}` in file order; names are normalised relative
    paths (`str`), or `int` record keys when `record_keys` is set.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming the file and line, for a wrong column count (or one
      that differs from the first line's), a non-number, a non-finite
      coordinate, a duplicate name, or a non-integer record key.
  """
  path = epath.Path(path)
  try:
    raw = path.read_bytes()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"Landmarks file {path} does not exist.") from e
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"Landmarks file {path} is not UTF-8 text ({e}); expected lines "
        "'name x1 y1 ... x5 y5'."
    ) from e

  result: dict[Key, np.ndarray] = {}
  first_line: dict[Key, int] = {}
  columns = None  # column count of the first data line
  columns_line = 0
  for line_number, line in enumerate(text.splitlines(), start=1):
    tokens = line.split()
    for i, token in enumerate(tokens):
      if token.startswith("#"):
        tokens = tokens[:i]
        break
    if not tokens:
      continue
    where = f"Landmarks file {path}, line {line_number}"
    if len(tokens) not in _COLUMNS:
      raise ValueError(
          f"{where}: {len(tokens)} columns, expected {_COLUMNS[0]} "
          f"('name x1 y1 ... x5 y5') or {_COLUMNS[1]} (the same plus a score, "
          f"as in insightface's IJB files). Names cannot contain spaces. "
          f"Line: {line.strip()[:120]!r}"
      )
    if columns is None:
      columns, columns_line = len(tokens), line_number
    elif len(tokens) != columns:
      raise ValueError(
          f"{where}: {len(tokens)} columns, but line {columns_line} had "
          f"{columns}; every line of a file must have the same layout."
      )
    values = []
    for column, token in enumerate(tokens[1:], start=2):
      try:
        values.append(float(token))
      except ValueError:
        raise ValueError(
            f"{where}: column {column} is {token!r}, not a number."
        ) from None
    points = np.asarray(values[:2 * NUM_LANDMARKS], np.float64)
    if not np.isfinite(points).all():
      bad = int(np.flatnonzero(~np.isfinite(points))[0])
      raise ValueError(
          f"{where}: coordinate in column {bad + 2} is {tokens[bad + 1]!r}; "
          "landmarks must be finite. Drop images without landmarks from the "
          "file instead (they get has_landmarks=False)."
      )
    if np.abs(points).max() > np.finfo(np.float32).max:
      raise ValueError(f"{where}: coordinate out of float32 range.")

    key: Key
    if record_keys:
      try:
        key = int(tokens[0])
      except ValueError:
        raise ValueError(
            f"{where}: record key {tokens[0]!r} is not an integer (reading "
            "with record_keys=True, for RecordIO packs)."
        ) from None
      if key < 0:
        raise ValueError(f"{where}: record key {key} is negative.")
    else:
      key = _normalise_name(tokens[0])
    if key in result:
      raise ValueError(
          f"{where}: duplicate entry for {key!r} (first on line "
          f"{first_line[key]}). Keep one set of landmarks per image."
      )
    first_line[key] = line_number
    result[key] = points.astype(np.float32).reshape(NUM_LANDMARKS, 2)
  logging.info("Read %d landmark sets from %s.", len(result), path)
  return result


def _format_number(value: float) -> str:
  # Shortest text that reads back as the same float32: exact round trips
  # without 17-digit noise.
  return np.format_float_positional(np.float32(value), unique=True, trim="-")


def format_line(key: Key, points: Any, path: PathLike = "<landmarks>") -> str:
  """One line of the canonical format, `name x1 y1 ... x5 y5`, validated.

  Raises:
    ValueError: for a bad name, a shape other than `[5, 2]`, or non-finite
      points (naming `path` and the entry).
  """
  name = str(key)
  if not name or name.startswith("#") or any(c.isspace() for c in name):
    raise ValueError(
        f"write_landmarks({os.fspath(path)!r}): name {name!r} cannot be "
        "written (empty, starts with '#', or contains whitespace)."
    )
  points = np.asarray(points, np.float32)
  if points.shape != (NUM_LANDMARKS, 2):
    raise ValueError(
        f"write_landmarks({os.fspath(path)!r}): entry {name!r} has shape "
        f"{points.shape}, expected [5, 2]."
    )
  if not np.isfinite(points).all():
    raise ValueError(
        f"write_landmarks({os.fspath(path)!r}): entry {name!r} has "
        "non-finite points; leave the image out instead."
    )
  return " ".join([name] + [_format_number(v) for v in points.ravel()])


def write_landmarks(
    path: PathLike,
    mapping: Mapping[Key, np.ndarray],
    *,
    header: str | None = None,
) -> None:
  """Writes landmarks in the canonical format, atomically.

  Local files are written to a temporary file beside `path` and renamed over
  it, so a reader never sees half a file and a crash leaves the old file. A
  `gs://` object is uploaded in one request, which GCS makes visible all at
  once.

  Args:
    path: destination, local or `gs://`. Parent directories are created.
    mapping: `{name or record key: [5, 2] points}`, written in iteration
      order. Names must be non-empty, without whitespace, and must not start
      with `#`.
    header: optional comment written first (each line prefixed with `# `).
      Off by default because some other tools' readers reject comments.

  Raises:
    ValueError: for a bad name, a shape other than `[5, 2]`, or non-finite
      points (naming the entry).
  """
  lines = []
  if header:
    lines.extend(f"# {h}".rstrip() for h in header.splitlines())
  for key, points in mapping.items():
    lines.append(format_line(key, points, path))
  text = "\n".join(lines) + ("\n" if lines else "")

  if not is_local(path):
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(text, encoding="utf-8")
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  logging.info("Wrote %d landmark sets to %s.", len(mapping), path)


def check_frame(
    points: np.ndarray,
    size: int = landmarks_lib.IMAGE_SIZE,
    *,
    names: Sequence[Key] | None = None,
    source: str = "landmarks",
) -> list[str]:
  """Warns when landmarks do not look like points in the aligned crop.

  Per landmark set, flags: all five points outside the `size x size` frame;
  a centroid more than `size / 4` from the (scaled) ArcFace template's; a
  spread (RMS distance to the centroid) under 0.4x or over 2.5x the
  template's; eyes not clearly above the mouth (less than a quarter of the
  template's eye-to-mouth drop); both left/right pairs swapped. Poses of real aligned crops stay well inside
  these bounds (alignment maps the detected centroid onto the template's), so
  a flag usually means original-image coordinates (align the images first:
  `landmarks.align_face`, or `ImageFolderSource(align=True)`), normalised
  `[0, 1]` coordinates, `(y, x)` order, or another point order.

  Args:
    points: `[5, 2]` or `[num_sets, 5, 2]` landmarks `(x, y)`.
    size: side of the frame the points should be in.
    names: optional `[num_sets]` names used as examples in messages.
    source: what the points are, for messages (e.g. the file name).

  Returns:
    One message per kind of problem found (empty when everything looks
    right); the same messages are logged as one warning.
  """
  points = np.asarray(points, np.float64)
  if points.shape[-2:] != (NUM_LANDMARKS, 2) or points.ndim not in (2, 3):
    raise ValueError(
        f"check_frame: points must be [5, 2] or [num_sets, 5, 2], got "
        f"{points.shape}."
    )
  points = points.reshape(-1, NUM_LANDMARKS, 2)
  count = points.shape[0]
  if count == 0:
    return []
  template = landmarks_lib.ARCFACE_TEMPLATE.astype(np.float64) * (
      size / landmarks_lib.IMAGE_SIZE)
  template_centre = template.mean(axis=0)
  template_spread = math.sqrt(((template - template_centre) ** 2).sum(-1).mean())

  finite = np.isfinite(points).all(axis=(1, 2))
  safe = np.where(finite[:, None, None], points, template)
  centre = safe.mean(axis=1)  # [num_sets, 2]
  spread = np.sqrt(((safe - centre[:, None]) ** 2).sum(-1).mean(-1))
  ratio = spread / template_spread
  x, y = safe[..., 0], safe[..., 1]
  inside = (x >= -0.5) & (x <= size - 0.5) & (y >= -0.5) & (y <= size - 0.5)
  eye_y = (y[:, 0] + y[:, 1]) / 2
  mouth_y = (y[:, 3] + y[:, 4]) / 2
  template_drop = template[3:, 1].mean() - template[:2, 1].mean()

  checks = [
      (~finite, "non-finite values"),
      (finite & ~inside.any(axis=1),
       f"all five points outside the {size}x{size} frame"),
      (finite & (np.linalg.norm(centre - template_centre, axis=-1) > size / 4),
       f"centroid more than {size / 4:g} px from the ArcFace template's "
       f"({template_centre[0]:.1f}, {template_centre[1]:.1f})"),
      (finite & ((ratio < 0.4) | (ratio > 2.5)),
       f"spread outside 0.4x-2.5x the template's {template_spread:.1f} px "
       "(normalised [0, 1] coordinates or another image size?)"),
      # The nose moves with pitch, but the eyes stay well above the mouth.
      (finite & (mouth_y - eye_y < 0.25 * template_drop),
       "eyes not clearly above the mouth ((y, x) order, upside down, or not "
       "ArcFace order?)"),
      (finite & (x[:, 0] > x[:, 1]) & (x[:, 3] > x[:, 4]),
       "left and right swapped in both pairs (mirrored, or not ArcFace "
       "order: left eye, right eye, nose, left mouth, right mouth)"),
  ]
  problems = []
  for flagged, what in checks:
    n = int(flagged.sum())
    if not n:
      continue
    first = int(np.flatnonzero(flagged)[0])
    example = names[first] if names is not None else f"#{first}"
    problems.append(
        f"{n} of {count} landmark sets: {what} (e.g. {example!r}: "
        f"{np.round(points[first], 1).tolist()})"
    )
  if problems:
    logging.warning(
        "%s: these landmarks do not look like points in the %dx%d aligned "
        "crop:\n  %s\nIf they are coordinates in the original (unaligned) "
        "images, align the images with vigface_jax.data.landmarks.align_face "
        "(ImageFolderSource(align=True) does it while reading).",
        source, size, size, "\n  ".join(problems),
    )
  return problems
