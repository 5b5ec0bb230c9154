r"""Where do virtual rows live, and where can a face's features go? Stage 1's row space measured.

    python -m benchmarks.row_span --stage1=workdir/fr_demo [--generated=workdir/gen_demo]

Prints, as one JSON line: the real rows' span (`evaluate.prototypes.real_span`: how many
principal directions hold 90% / 99% of the real rows' energy, and the mean share of a virtual
row's energy inside the 99% ones), then the same share for the stage-1 network's features of
faces: `--num_ids` × `--per_id` procedural training people (identities 0..), as many unseen
people (identities from `--unseen_offset`, which neither stage trained on) and, with
`--generated`, the first images of a generation run's ImageFolder export. A virtual row can be
no nearer (in cosine) to a face's features than the square root of the share of its energy
that the features can reach, so when features stay inside the real span and virtual rows lie
mostly outside it, no generator can draw an image near its virtual row under stage 1.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from absl import app
from absl import flags
import numpy as np
from PIL import Image


def _define_flags() -> None:
  """Only when run as a script (tests import `measure`)."""
  flags.DEFINE_string("stage1", None, "A finished configs/fr.py run (prototypes.npz, export/).")
  flags.DEFINE_string("generated", None, "A finished generation run (its imagefolder/).")
  flags.DEFINE_integer("num_ids", 50, "People of each kind.")
  flags.DEFINE_integer("per_id", 4, "Images per person.")
  flags.DEFINE_integer("unseen_offset", 5_000_000, "First procedural identity of the unseen.")


def _share(features: np.ndarray, basis: np.ndarray) -> float:
  """Mean share of each row's energy inside the orthonormal columns of `basis`."""
  x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.sum(np.square(x @ basis), axis=1)))


def measure(stage1: str, generated: str | None = None, *, num_ids: int = 50, per_id: int = 4,
            unseen_offset: int = 5_000_000) -> dict[str, Any]:
  """The report above as a dict (`real_span`, then `features_inside` per kind of face)."""
  from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top
  from vigface_jax.evaluate import embed  # pylint: disable=g-import-not-at-top
  from vigface_jax.evaluate import prototypes  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(stage1, "prototypes.npz")) as z:
    real, virtual = z["real"], z["virtual"]
  span = prototypes.real_span(np.concatenate([real, virtual]), len(real))
  basis = prototypes.real_directions(real, len(real))[1][:, :span["real_dims"][-1]]
  with open(os.path.join(stage1, "config.json")) as fh:
    seed = int(json.load(fh)["data"].get("seed", 0))
  embed_fn, _ = embed.load_embedder(stage1, batch_size=50)
  kinds = {
      "training people": [faces.render_face(seed, i, j)[0]
                          for i in range(num_ids) for j in range(per_id)],
      "unseen people": [faces.render_face(seed, unseen_offset + i, j)[0]
                        for i in range(num_ids) for j in range(per_id)],
  }
  if generated:
    paths = sorted(glob.glob(os.path.join(generated, "imagefolder", "*", "*")))
    if not paths:
      raise FileNotFoundError(f"--generated={generated}: no imagefolder/<id>/<image> there; "
                              "point it to a generation run that exported 'imagefolder'")
    kinds["generated"] = [np.asarray(Image.open(p).convert("RGB"))
                          for p in paths[:num_ids * per_id]]
  inside = {name: _share(np.asarray(embed_fn(np.stack(images))), basis)
            for name, images in kinds.items()}
  return {"stage1": stage1, "real_span": span, "features_inside": inside,
          "images_per_kind": {name: len(images) for name, images in kinds.items()}}


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  print(json.dumps(measure(f.stage1, f.generated, num_ids=f.num_ids, per_id=f.per_id,
                           unseen_offset=f.unseen_offset)))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("stage1")
  app.run(main)
