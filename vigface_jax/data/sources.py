"""Opening a data source from one string: the form the command-line tools take.

`open_source(src)` accepts a RecordIO pack (`*.rec`, `.idx` beside it), an ImageFolder root
(one folder per identity) or `procedural:ids=N,images=M[,seed=S]`, and returns the grain source
(`len`, `[i]`, `.num_classes`) in the pipeline's element spec.
"""

from __future__ import annotations

from etils import epath

from vigface_jax import config_lib


def open_source(src: str, *, bgr_to_rgb: bool = False, on_error: str = "raise"):
  """A grain source for `src` (see the module docstring for the accepted forms)."""
  if src.startswith("procedural:"):
    from vigface_jax.data import faces  # pylint: disable=g-import-not-at-top
    args = config_lib.parse_arg(src.partition(":")[2], ids=100, images=10, seed=0)
    return faces.ProceduralFaceSource(seed=args.seed, num_identities=args.ids,
                                      images_per_identity=args.images)
  if src.endswith(".rec"):
    from vigface_jax.data import recordio  # pylint: disable=g-import-not-at-top
    # Keep the stored JPEG bytes unless the channels must be swapped.
    return recordio.RecordIOSource(src, bgr_to_rgb=bgr_to_rgb, on_error=on_error,
                                   decode=bgr_to_rgb)
  if epath.Path(src).is_dir():
    from vigface_jax.data import imagefolder  # pylint: disable=g-import-not-at-top
    return imagefolder.ImageFolderSource(src, decode=False, on_error=on_error)
  raise ValueError(f"--src={src!r} is neither a .rec file, an ImageFolder directory nor "
                   "procedural:ids=N,images=M")
