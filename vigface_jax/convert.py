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

from vigface_jax.data import sources



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
  source = sources.open_source(src, bgr_to_rgb=bgr_to_rgb, on_error=on_error)
  if landmarks:
    from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
    elements = _with_landmarks(source, landmark_files.read_landmarks(landmarks))
  else:
    elements = (source[i] for i in range(len(source)))
  return arrayrecord.write_arrayrecord(
      elements, out, num_examples=len(source), num_classes=source.num_classes, name=name,
      split=split, num_shards=shards, encoding_format=encoding_format)


COMMANDS = {"arrayrecord": "convert_arrayrecord"}


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program: the library functions above
  stay importable next to other tools that define flags of the same names."""
  flags.DEFINE_string("src", None, "Source: *.rec, an ImageFolder root or procedural:...")
  flags.DEFINE_string("out", None, "Output directory (local or gs://).")
  flags.DEFINE_string("name", "vigface_faces", "TFDS dataset name of the output.")
  flags.DEFINE_string("split", "train", "Split name of the output.")
  flags.DEFINE_string("landmarks", None, "Optional five-point landmark side file.")
  flags.DEFINE_integer("shards", None, "Number of output shards (default: 1 per 10k).")
  flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"],
                    "Encoding for images that must be (re-)encoded.")
  flags.DEFINE_boolean("bgr_to_rgb", False, "RecordIO packs stored as BGR: swap channels.")
  flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                    "Bad records: stop with an error, or skip and count them.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m vigface_jax.convert <{'|'.join(COMMANDS)}> --flags")
  if not FLAGS.src or not FLAGS.out:
    raise app.UsageError("--src and --out are required")
  try:
    summary = convert_arrayrecord(
        FLAGS.src, FLAGS.out, name=FLAGS.name, split=FLAGS.split,
        landmarks=FLAGS.landmarks, shards=FLAGS.shards, encoding_format=FLAGS.format,
        bgr_to_rgb=FLAGS.bgr_to_rgb, on_error=FLAGS.on_error)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f"vigface_jax.convert: {e}\n")
    sys.exit(2)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
