r"""Dataset and checkpoint conversion: `python -m vigface_jax.convert <what> --flags`.

  python -m vigface_jax.convert arrayrecord --src=/data/faces_webface_112x112/train.rec \
      --out=/data/webface_ar
  python -m vigface_jax.convert arrayrecord --src=/data/my_faces --landmarks=/data/lmk.txt \
      --out=gs://bucket/my_faces_ar

`--src` is a RecordIO pack (`*.rec`, `.idx` beside it), an ImageFolder root (one folder per
identity) or `procedural:ids=N,images=M[,seed=S]`. `--landmarks` adds five-point landmarks from
a side file keyed like the source's elements (relative paths for folders, record keys for
RecordIO); see `data.landmark_files`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

_SRC = flags.DEFINE_string("src", None, "Source: *.rec, an ImageFolder root or procedural:...")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_NAME = flags.DEFINE_string("name", "vigface_faces", "TFDS dataset name of the output.")
_SPLIT = flags.DEFINE_string("split", "train", "Split name of the output.")
_LANDMARKS = flags.DEFINE_string("landmarks", None, "Optional five-point landmark side file.")
_SHARDS = flags.DEFINE_integer("shards", None, "Number of output shards (default: 1 per 10k).")
_FORMAT = flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"],
                            "Encoding for images that must be (re-)encoded.")
_BGR = flags.DEFINE_boolean("bgr_to_rgb", False, "RecordIO packs stored as BGR: swap channels.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "Bad records: stop with an error, or skip and count them.")


def open_source(src: str, *, bgr_to_rgb: bool = False, on_error: str = "raise"):
  """A grain source for `src` (see the module docstring for the accepted forms)."""
  if src.startswith("procedural:"):
    from vigface_jax import config_lib  # pylint: disable=g-import-not-at-top
    from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top
    args = config_lib.parse_arg(src.partition(":")[2], ids=100, images=10, seed=0)
    return faces.ProceduralFaceSource(seed=args.seed, num_identities=args.ids,
                                      images_per_identity=args.images)
  if src.endswith(".rec"):
    from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
    # Keep the stored JPEG bytes unless the channels must be swapped.
    return recordio.RecordIOSource(src, bgr_to_rgb=bgr_to_rgb, on_error=on_error,
                                   decode=bgr_to_rgb)
  from etils import epath  # pylint: disable=g-import-not-at-top
  if epath.Path(src).is_dir():
    from vigface_jax.data import imagefolder  # pylint: disable=g-import-not-at-top
    return imagefolder.ImageFolderSource(src, decode=False, on_error=on_error)
  raise ValueError(f"--src={src!r} is neither a .rec file, an ImageFolder directory nor "
                   "procedural:ids=N,images=M")


def _with_landmarks(source, mapping: dict[str, Any]):
  """Yields the source's elements with landmarks from `mapping` (keyed by str(element key))."""
  missing = 0
  for i in range(len(source)):
    element = dict(source[i])
    points = mapping.get(str(element.get("key", i)))
    if points is not None:
      element["landmarks"], element["has_landmarks"] = points, True
    else:
      missing += 1
    yield element
  if missing:
    logging.warning("%d of %d elements have no entry in the landmark file", missing, len(source))


def convert_arrayrecord(src: str, out: str, *, name: str = "vigface_faces", split: str = "train",
                        landmarks: str | None = None, shards: int | None = None,
                        encoding_format: str = "jpeg", bgr_to_rgb: bool = False,
                        on_error: str = "raise") -> dict[str, Any]:
  """`--src` → ArrayRecord shards + TFDS metadata in `--out`; returns a summary."""
  from vigface_jax.data import arrayrecord  # pylint: disable=g-import-not-at-top
  source = open_source(src, bgr_to_rgb=bgr_to_rgb, on_error=on_error)
  if landmarks:
    from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
    elements = _with_landmarks(source, landmark_files.read_landmarks(landmarks))
  else:
    elements = (source[i] for i in range(len(source)))
  return arrayrecord.write_arrayrecord(
      elements, out, num_examples=len(source), num_classes=source.num_classes, name=name,
      split=split, num_shards=shards, encoding_format=encoding_format)


COMMANDS = {"arrayrecord": "convert_arrayrecord"}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m vigface_jax.convert <{'|'.join(COMMANDS)}> --flags")
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("--src and --out are required")
  try:
    summary = convert_arrayrecord(
        _SRC.value, _OUT.value, name=_NAME.value, split=_SPLIT.value,
        landmarks=_LANDMARKS.value, shards=_SHARDS.value, encoding_format=_FORMAT.value,
        bgr_to_rgb=_BGR.value, on_error=_ON_ERROR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f"vigface_jax.convert: {e}\n")
    sys.exit(2)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
