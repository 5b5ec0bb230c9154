r"""How much of the generator's usefulness gap is blur, pose, occluders, background? The
usefulness recipe on real people, degraded like generated faces.

    python -m benchmarks.degraded_real --blur=1.5 --workdir=workdir/degraded_real
    python -m benchmarks.degraded_real --blur=0 --workdir=workdir/degraded_real_clean
    python -m benchmarks.degraded_real --blur=0 --pose_scale=0.2 --workdir=workdir/dr_pose
    python -m benchmarks.degraded_real --blur=0 --no_occluders --workdir=workdir/dr_occ
    python -m benchmarks.degraded_real --blur=0 --plain_background --workdir=workdir/dr_bg

Writes the quality task's real people (the first 200 procedural identities × 20 images of
`configs/fr.py:usefulness`, `data.seed` 0) as an ImageFolder, each image brought to the DiT's
48×48, Gaussian-blurred with σ = `--blur` pixels at 48 and brought back to 112 (bicubic both
ways; `--blur=0` writes the clean 112-pixel faces, the diagnostic's own control: it must give
the quality task's real figure), then trains `configs/fr.py:usefulness` on that folder and
prints its accuracy on the held-out procedural pairs beside the real recipe's. No identity,
pose or accessory changes: only the sharpness of the training images. `--pose_scale=s`
renders each image with its own yaw, pitch and roll times s (the generated faces turn 0.2-0.4
as much as their landmark sets ask: README "Generator quality"), `--no_occluders` without its
glasses, sunglasses, mask, hand and hair across the face (which come and go between a real
person's images), `--plain_background` with its background a smooth two-colour gradient (no
texture field, no clutter shapes: the generated faces sit on smooth murky colour); everything
else about each image is unchanged.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageFilter

_SIZE = 48  # configs/dit.py:demo model.image_size


def _define_flags() -> None:
  """Only when run as a script: importing `write_folder` (tests) must not add absl flags
  (`vigface_jax.main` defines `--workdir` too)."""
  flags.DEFINE_float("blur", 1.5, "Gaussian σ in pixels at 48×48 (0: clean, the control).")
  flags.DEFINE_string("workdir", None, "Output folder (images and the FR run).")
  flags.DEFINE_integer("num_ids", 200, "Identities (the quality task's 200).")
  flags.DEFINE_integer("images_per_id", 20, "Images per identity (20).")
  flags.DEFINE_float("pose_scale", 1.0, "Each image's yaw, pitch and roll times this.")
  flags.DEFINE_bool("no_occluders", False, "Render without glasses, masks, hands, hair across.")
  flags.DEFINE_bool("plain_background", False, "Background a smooth gradient: no texture, clutter.")


_OCCLUDERS = ("glasses", "sunglasses", "mask", "hand", "hair_across")


def write_folder(root: str, blur: float, num_ids: int, per_id: int, *, pose_scale: float = 1.0,
                 occluders: bool = True, background: bool = True) -> None:
  """The degraded ImageFolder: `root/<id>/<index>.png`."""
  from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top
  for i in range(num_ids):
    folder = os.path.join(root, f"{i:04d}")
    os.makedirs(folder, exist_ok=True)
    person = faces.identity(0, i)
    for j in range(per_id):
      q = faces.nuisance(0, i, j)
      for angle in ("yaw", "pitch", "roll"):
        q[angle] = float(pose_scale) * q[angle]
      if not occluders:
        q.update({name: False for name in _OCCLUDERS})
      if not background:
        q.update(bg_tex=0.0, clutter=0, clutter_shapes=q["clutter_shapes"][:0])
      image, _ = faces.render(person, q)
      im = Image.fromarray(np.asarray(image))
      if blur > 0:
        size = im.size
        im = (im.resize((_SIZE, _SIZE), Image.BICUBIC).filter(ImageFilter.GaussianBlur(blur))
              .resize(size, Image.BICUBIC))
      im.save(os.path.join(folder, f"{j:03d}.png"))


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  workdir, blur = f.workdir, float(f.blur)
  from configs import fr as fr_config  # pylint: disable=g-import-not-at-top
  from vigface_jax import tasks  # pylint: disable=g-import-not-at-top
  data = os.path.join(workdir, "data")
  write_folder(data, blur, int(f.num_ids), int(f.images_per_id),
               pose_scale=float(f.pose_scale), occluders=not f.no_occluders,
               background=not f.plain_background)
  config = fr_config.get_config("usefulness")
  config.data.source, config.data.path, config.data.cache = "imagefolder", data, False
  summary = tasks.run(config, os.path.join(workdir, "fr"))
  result = {"blur_sigma_at_48": blur, "pose_scale": float(f.pose_scale),
            "occluders": not f.no_occluders, "background": not f.plain_background,
            "accuracy": summary.get("verify/procedural/accuracy"),
            "accuracy_std": summary.get("verify/procedural/accuracy_std")}
  with open(os.path.join(workdir, "degraded_real.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
