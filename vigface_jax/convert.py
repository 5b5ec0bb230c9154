r"""Dataset and checkpoint conversion: `python -m vigface_jax.convert <what> --flags`.

  python -m vigface_jax.convert arrayrecord --src=/data/faces_webface_112x112/train.rec \
      --out=/data/webface_ar
  python -m vigface_jax.convert arrayrecord --src=/data/my_faces --landmarks=/data/lmk.txt \
      --out=gs://bucket/my_faces_ar

`--src` is a RecordIO pack (`*.rec`, `.idx` beside it), an ImageFolder root (one folder per
identity) or `procedural:ids=N,images=M[,seed=S]`. `--landmarks` adds five-point landmarks from
a side file keyed like the source's elements (relative paths for folders, record keys for
RecordIO); see `data.landmark_files`.

  python -m vigface_jax.convert insightface --src=backbone.pth --arch=r50 --out=/ckpt/r50_ms1mv3

`insightface` turns an arcface_torch IResNet `state_dict` (a `torch.save` file, read without
torch by `models.torch_checkpoint`) into a backbone checkpoint (`evaluate.embed`) for `--arch`
(`r18`..`r200`, `ir_se50`, ...) with `--embed_dim` features; `--force` overwrites `--out`.
"""

from __future__ import annotations

import os
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


def convert_insightface(src: str, out: str, *, arch: str, embed_dim: int = 512,
                        force: bool = False) -> dict[str, Any]:
  """arcface_torch `state_dict` file `src` → backbone checkpoint in `out`; returns a summary.

  Raises:
    ValueError: for an unknown `arch`, an unreadable checkpoint, or a key that
      is missing, unexpected or of the wrong shape (named in the message).
    FileNotFoundError: if `src` does not exist.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vigface_jax.evaluate import embed  # pylint: disable=g-import-not-at-top
  from vigface_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  from vigface_jax.models import torch_checkpoint  # pylint: disable=g-import-not-at-top
  iresnet.get_variant(arch)
  state_dict = torch_checkpoint.load_state_dict(src)
  # Zeros instead of a random init, which would compile an initialiser per shape: the
  # state_dict fills every Param and BatchStat.
  abstract = nnx.eval_shape(
      lambda: iresnet.IResNet(arch, embed_dim=embed_dim, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  model = nnx.merge(graphdef, jax.tree.map(embed.placeholder, state))
  try:
    iresnet.load_insightface_state_dict(model, state_dict)
  except ValueError as e:
    raise ValueError(f"{src}: {e} (--arch={arch}, --embed_dim={embed_dim})") from None
  model.eval()
  directory = embed.save_backbone(out, model, arch=arch, embed_dim=embed_dim, force=force,
                                  extra={"source": os.path.abspath(src),
                                         "source_format": "arcface_torch"})
  return {"arch": arch, "embed_dim": embed_dim, "tensors": len(state_dict),
          "parameters": iresnet.count_variables(model), "out": directory}


COMMANDS = {"arrayrecord": "convert_arrayrecord", "insightface": "convert_insightface"}


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
  flags.DEFINE_string("arch", None, "insightface: IResNet variant of --src (r18, r50, ...).")
  flags.DEFINE_integer("embed_dim", 512, "insightface: embedding size of --src.")
  flags.DEFINE_boolean("force", False, "insightface: overwrite an existing --out backbone.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m vigface_jax.convert <{'|'.join(COMMANDS)}> --flags")
  if not FLAGS.src or not FLAGS.out:
    raise app.UsageError("--src and --out are required")
  if argv[1] == "insightface" and not FLAGS.arch:
    raise app.UsageError("insightface needs --arch (r18, r34, r50, r100, r200, ir_se50, ...)")
  try:
    if argv[1] == "insightface":
      summary = convert_insightface(FLAGS.src, FLAGS.out, arch=FLAGS.arch,
                                    embed_dim=FLAGS.embed_dim, force=FLAGS.force)
    else:
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
