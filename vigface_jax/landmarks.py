r"""Five-point landmarks for aligned face data that has none (O-Net, sharded, resumable).

  python -m vigface_jax.landmarks --src=/data/faces_webface_112x112/train.rec \
      --weights=/models/onet.pt --out=/data/webface_landmarks.txt

`--src` takes the forms `vigface_jax.convert` accepts (`*.rec`, an ImageFolder root,
`procedural:...`). Every image is taken as an ArcFace-aligned 112×112 crop; MTCNN's O-Net
(`models.onet`, weights from the file facenet-pytorch ships: `onet.pt`, or our converted
`.npz`) predicts the five points in that frame. Batches are split over all local devices
(a data-parallel mesh); with several processes each takes an equal contiguous slice of the
records. Progress is appended to `<out>.part<k>of<n>` after every batch (for a `gs://` output,
to a local staging file named after it), so a killed run picks up where it stopped; at the end
the parts are joined in source order (`key x1 y1 ... x5 y5` per line, the format
`data.landmark_files` reads) and replace `--out` atomically. With several hosts, `--out` must be
on storage they share (a bucket or a shared file system).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import numpy as np
import tqdm

from vigface_jax import parallel



def _part_path(out: str, index: int, count: int) -> str:
  """Progress file of process `index`: beside `out`, or in a local staging folder when `out` is
  remote (gs://), named after `out` so that a restarted run finds it again."""
  if "://" in out:
    digest = hashlib.sha1(out.encode()).hexdigest()[:16]
    stage = os.path.join(tempfile.gettempdir(), "vigface_landmarks", digest)
    os.makedirs(stage, exist_ok=True)
    return os.path.join(stage, f"landmarks.part{index}of{count}")
  return f"{out}.part{index}of{count}"


def _done_keys(part: str) -> list[str]:
  """Keys already in a partial file; a torn last line (killed mid-write) is dropped."""
  if not os.path.exists(part):
    return []
  with open(part) as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1]:  # no trailing newline: the last line may be incomplete
    lines = lines[:-1]
    with open(part, "w") as f:
      f.write("".join(l + "\n" for l in lines if l))
  return [l.split()[0] for l in lines if l.strip()]


def extract(src: str, out: str, weights: str, *, batch_size: int = 256,
            progress: bool = True) -> dict[str, Any]:
  """Runs O-Net over `src` and writes `out`; resumes from `<out>.part*` files."""
  from vigface_jax.data import landmark_files  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import sources  # pylint: disable=g-import-not-at-top
  from vigface_jax.models import onet  # pylint: disable=g-import-not-at-top

  source = sources.open_source(src)
  model = onet.load_facenet_pytorch_onet(weights)
  mesh = parallel.create_mesh(("data",), (-1,), devices=jax.local_devices())
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  devices = mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  count, index = jax.process_count(), jax.process_index()
  bounds = np.linspace(0, len(source), count + 1).astype(int)
  lo, hi = int(bounds[index]), int(bounds[index + 1])

  decode = pipeline.Decode()
  part = _part_path(out, index, count)
  if "://" not in out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  done = len(_done_keys(part))
  if done:
    logging.info("resuming %s: %d of %d records already done", part, done, hi - lo)
  bar = tqdm.tqdm(total=hi - lo, initial=done, desc="landmarks", unit="img",
                  disable=not progress)
  with open(part, "a") as f:
    for start in range(lo + done, hi, batch_size):
      stop = min(start + batch_size, hi)
      elements = [decode.map(source[i]) for i in range(start, stop)]
      images = np.stack([e["image"] for e in elements])
      if len(images) < batch_size:  # one compiled shape; padding rows are dropped below
        images = np.concatenate([images, np.zeros((batch_size - len(images),) + images.shape[1:],
                                                  np.uint8)])
      points = onet.landmarks_for_aligned_faces(model, images, sharding=sharding)
      keys = [str(e.get("key", i)) for e, i in zip(elements, range(start, stop))]
      f.write("".join(landmark_files.format_line(k, p, out) + "\n" for k, p in zip(keys, points)))
      f.flush()
      bar.update(stop - start)
  bar.close()

  # Every process publishes its part next to `out` (a shared file system or bucket when there
  # are several hosts), then process 0 joins them in source order.
  shared = [epath.Path(f"{out}.part{k}of{count}") for k in range(count)]
  if os.fspath(shared[index]) != part:
    with open(part) as part_file:
      shared[index].write_text(part_file.read())
    os.unlink(part)
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("vigface_jax.landmarks: all parts written")
  if index == 0:
    text = "".join(p.read_text() for p in shared)
    if "://" in out:  # an object store publishes the object whole once the upload completes
      epath.Path(out).write_text(text)
    else:
      tmp = f"{out}.tmp"
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, out)
    for p in shared:
      p.unlink()
    logging.info("wrote landmarks of %d images to %s", len(source), out)
  return {"out": out, "num_images": len(source), "devices": devices, "batch_size": batch_size}


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program: the library functions above
  stay importable next to other tools that define flags of the same names."""
  flags.DEFINE_string("src", None, "Aligned faces: *.rec, an ImageFolder root, procedural:...")
  flags.DEFINE_string("out", None, "Landmark file to write.")
  flags.DEFINE_string("weights", None, "O-Net weights: facenet-pytorch onet.pt or .npz.")
  flags.DEFINE_integer("batch_size", 256, "Images per step (rounded up to the devices).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("src", "out", "weights"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  parallel.maybe_initialize_distributed("auto")
  try:
    extract(FLAGS.src, FLAGS.out, FLAGS.weights, batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.stderr.write(f"vigface_jax.landmarks: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
