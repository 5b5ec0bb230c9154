"""The stage-2 network: a pixel DiT, the frozen stage-1 backbone and the real class-centre rows.

The DiT sees the noisy image ⊕ the landmark image (6 channels), plus 3 channels per
Gaussian-blurred copy of the landmark image (`landmark_blur` σ in pixels); its condition is
`t_emb + Linear(row)`, plus `Linear(pose)` with `landmark_pose` (the landmark image's
per-colour moments, `landmark_moments`: pose as one vector every block sees). It draws at
`image_size` (112, the aligned crop, by default): below 112 the training faces and the
112×112 landmark images are resized down to it (the
antialiased linear filter a stage-1 backbone trained at a reduced input size sees its crops
through) and what it draws is resized back up to 112 (`to_output`), so everything outside the
DiT (data, landmark images, samples, exports) stays in the 112×112 aligned frame. The frozen
FR network (identity loss, identity metrics) and the row table are `Frozen` variables: the
stage-2 optimizer never sees them (`TRAINABLE`).

Everything here takes plain arguments (σ, dtypes, sizes), except `builder`, which turns a
stage-2 config's `model` section into the constructor the trainer and the generator share.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.models import dit as dit_lib
from vigface_jax.models import face_recognizer
from vigface_jax.models import iresnet

# The aligned frame every image outside the DiT is in.
OUTPUT_SIZE = landmarks_lib.IMAGE_SIZE

# What the stage-2 optimizer updates: the DiT's parameters only (the FR network and the rows
# ride in the train state's non-optimised part and get no gradient).
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("dit"))


class Frozen(nnx.Variable):
  """A variable the stage-2 optimizer never sees (the FR network's weights, the row table)."""


class Stage2(nnx.Module):
  """DiT + frozen stage-1 backbone + the real class-centre rows `[n, d]`."""

  def __init__(self, variant: str, *, patch_size: int, fr_arch: str, embed_dim: int,
               fr_input_size: int, num_real: int, landmark_blur: tuple[float, ...] = (),
               dtype: Any = jnp.float32, remat: bool = False, scan_blocks: bool = False,
               output_overlap: int = 0, image_size: int = OUTPUT_SIZE, long_skips: bool = False,
               output_conv: bool = False, landmark_pose: bool = False, rngs: nnx.Rngs):
    """Args: the DiT's `dit.VARIANTS` name and patch size; the stage-1 backbone's arch,
    embedding size (= the rows' size) and input side; the number of real rows; σ of the
    blurred landmark copies (in pixels at `image_size`); the DiT's compute dtype, remat,
    scan over blocks and output overlap (`models.dit.DiT`); the side the DiT draws at
    (≤ 112); U-ViT's long skips and output convolution (`models.dit.DiT`); whether the
    landmark image's moments join the condition (`landmark_moments`); initialisation RNGs."""
    if not 0 < int(image_size) <= OUTPUT_SIZE:
      raise ValueError(f"image_size must be in [1, {OUTPUT_SIZE}], got {image_size}")
    self.landmark_blur = tuple(float(s) for s in landmark_blur)
    self.image_size = int(image_size)
    self.landmark_pose = bool(landmark_pose)
    self.dit = dit_lib.DiT(variant, patch_size=int(patch_size), cond_dim=embed_dim,
                           input_size=self.image_size,
                           in_channels=input_channels(self.landmark_blur),
                           cond_scale=math.sqrt(embed_dim),  # unit rows → unit RMS
                           dtype=dtype, remat=bool(remat), scan_blocks=bool(scan_blocks),
                           output_overlap=int(output_overlap), long_skips=bool(long_skips),
                           output_conv=bool(output_conv),
                           extra_cond_dim=POSE_FEATURES if self.landmark_pose else 0, rngs=rngs)
    self.fr = iresnet.IResNet(fr_arch, embed_dim=embed_dim, input_size=fr_input_size, rngs=rngs)
    self.fr.eval()
    self.fr_input_size = int(fr_input_size)
    self.rows = Frozen(jnp.zeros((num_real, embed_dim), jnp.float32),
                       out_sharding=("classes", "embed"), eager_sharding=False)

  def landmark_channels(self, landmark_image: jax.Array) -> jax.Array:
    """112×112 landmark images → `landmark_channels` at `image_size` under this model's
    `landmark_blur`."""
    return landmark_channels(self.to_model_size(landmark_image), self.landmark_blur)

  def to_model_size(self, images: jax.Array) -> jax.Array:
    """Float `[b, H, W, C]` images (the aligned frame) → `[b, image_size, image_size, C]`."""
    return resize(images, self.image_size)

  def to_output(self, images: jax.Array) -> jax.Array:
    """What the DiT drew, `[b, image_size, image_size, 3]` in [-1, 1] → the 112×112 frame
    (bicubic, clipped to [-1, 1])."""
    if images.shape[1] == OUTPUT_SIZE:
      return images
    up = jax.image.resize(images, (images.shape[0], OUTPUT_SIZE, OUTPUT_SIZE, images.shape[3]),
                          "cubic")
    return jnp.clip(up, -1.0, 1.0)

  def denoise(self, x_t: jax.Array, t: jax.Array, cond: jax.Array | None,
              channels: jax.Array) -> jax.Array:
    """The DiT's prediction for noisy images `x_t` under rows `cond` and landmark channels."""
    # The landmark image is the channels' first three (`landmark_channels`).
    pose = landmark_moments(channels[..., :3]) if self.landmark_pose else None
    return self.dit(jnp.concatenate([x_t, channels], axis=-1), t, cond, extra=pose)

  def embed(self, images: jax.Array) -> jax.Array:
    """Normalised float `[-1, 1]` or uint8 faces → stage-1 embeddings (frozen)."""
    return self.fr(iresnet.prepare(images, self.fr_input_size))


def builder(model: Any, fr_info: dict[str, Any], num_real: int):
  """`create(rngs=...)` building the `Stage2` of a stage-2 config's `model` section, with the
  stage-1 backbone described by `fr_info` (`backbone.json`: arch, embed_dim, input_size)."""
  return functools.partial(
      Stage2, variant(model), patch_size=int(model.patch_size), fr_arch=fr_info["arch"],
      embed_dim=int(fr_info["embed_dim"]), fr_input_size=int(fr_info["input_size"]),
      num_real=num_real, landmark_blur=tuple(model.landmark_blur or ()),
      dtype=face_recognizer.compute_dtype(model.dtype), remat=bool(model.remat),
      scan_blocks=bool(model.scan_blocks), output_overlap=int(model.output_overlap),
      # Absent from configs saved before the field existed: those DiTs drew at 112.
      image_size=int(model.get("image_size", None) or OUTPUT_SIZE),
      # Absent from configs saved before the fields existed: those DiTs had neither.
      long_skips=bool(model.get("long_skips", False)),
      output_conv=bool(model.get("output_conv", False)),
      landmark_pose=bool(model.get("landmark_pose", False)))


def variant(model: Any) -> dit_lib.Variant:
  """The `dit.Variant` of a stage-2 config's `model` section: `model.variant`'s, with
  `model.hidden`, `depth` and `heads` in place of its own where set (configs saved before
  those fields existed have none)."""
  v = dit_lib.get_variant(model.variant)
  sizes = {k: model.get(k, None) for k in ("hidden", "depth", "heads")}
  return dit_lib.Variant(**{k: int(getattr(v, k) if n is None else n) for k, n in sizes.items()})


def resize(images: jax.Array, size: int) -> jax.Array:
  """Float `[b, H, W, C]` → `[b, size, size, C]` with `iresnet.prepare`'s antialiased linear
  filter (unchanged when already that size)."""
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear",
                          antialias=True)


def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 → float32 in [-1, 1] (the FR network's normalisation too)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  """Model-range images in [-1, 1] → uint8 (rounded, clipped)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def landmark_input(points: jax.Array, has: jax.Array) -> jax.Array:
  """Landmark images in [-1, 1]; examples without landmarks get the empty (black) image."""
  image = to_model_range(landmarks_lib.render_landmark_image_jnp(points))
  return jnp.where(has[:, None, None, None], image, -1.0)


def model_landmarks(points: np.ndarray) -> np.ndarray:
  """Landmark sets `[n, 5, 2]` -> their landmark images in the DiT's input range, numpy."""
  points = jnp.asarray(points, jnp.float32)
  return np.asarray(landmark_input(points, jnp.ones(points.shape[0], bool)))


@functools.cache
def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
  """`[size, size]` 1-D Gaussian blur with zero padding, scaled so a 13-pixel landmark
  diamond peaks near 1 once blurred along both axes."""
  i = np.arange(size, dtype=np.float64)
  g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
  return (g / math.sqrt(13.0)).astype(np.float32)


def landmark_fields(landmark_image: jax.Array, sigmas: tuple[float, ...]) -> list[jax.Array]:
  """Gaussian-blurred copies `[b, H, W, 3]` of landmark images in [-1, 1], one per σ.

  A landmark image says where a point is only in the few pixels of its diamond, so only the
  tokens that hold a diamond see it. Blurred, every pixel within a few σ carries how far and
  in which direction each point lies, and so does each token's patch embedding. Values: the
  dots' blurred density in [-1, ~1] (background -1).
  """
  if not sigmas:
    return []
  dots = (landmark_image.astype(jnp.float32) + 1.0) * 0.5
  h, w = dots.shape[1:3]
  out = []
  for sigma in sigmas:
    gy, gx = jnp.asarray(_gaussian_matrix(h, sigma)), jnp.asarray(_gaussian_matrix(w, sigma))
    out.append(jnp.einsum("ij,bjkc,lk->bilc", gy, dots, gx) * 2.0 - 1.0)
  return out


def landmark_channels(landmark_image: jax.Array, sigmas: tuple[float, ...]) -> jax.Array:
  """Landmark images `[b, H, W, 3]` -> the DiT's condition channels: the image, then its
  blurred copies (`landmark_fields`), `[b, H, W, 3 + 3 · len(sigmas)]`. A sampler computes
  them once per call, not at every step."""
  fields = landmark_fields(landmark_image, sigmas)
  return jnp.concatenate([landmark_image.astype(jnp.float32)] + fields, axis=-1)


# Per colour (eyes, nose, mouth corners): centroid x, y and second moments xx, yy, xy of the
# dots in [-1, 1] image coordinates, less the ArcFace template's, over these scales (about one
# standard deviation of each over procedural poses at 48 px: nose x 0.10, eyes' xx 0.025).
_MOMENT_SCALES = (0.05, 0.05, 0.01, 0.01, 0.01)
POSE_FEATURES = 3 * len(_MOMENT_SCALES)


def _raw_moments(landmark_image: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[b, 5, 3]` moments of each colour's dots and `[b, 3]` their mass (in pixels)."""
  dots = (landmark_image.astype(jnp.float32) + 1.0) * 0.5
  h, w = dots.shape[1:3]
  ys = jnp.asarray((np.arange(h) + 0.5) / h * 2.0 - 1.0, jnp.float32)
  xs = jnp.asarray((np.arange(w) + 0.5) / w * 2.0 - 1.0, jnp.float32)
  mass = jnp.sum(dots, axis=(1, 2))
  safe = jnp.maximum(mass, 1e-6)
  mx = jnp.einsum("bhwc,w->bc", dots, xs) / safe
  my = jnp.einsum("bhwc,h->bc", dots, ys) / safe
  dx = xs[None, None, :, None] - mx[:, None, None, :]
  dy = ys[None, :, None, None] - my[:, None, None, :]
  second = [jnp.sum(dots * a * b, axis=(1, 2)) / safe for a, b in ((dx, dx), (dy, dy), (dx, dy))]
  return jnp.stack([mx, my] + second, axis=1), mass


@functools.cache
def _template_moments(size: int) -> np.ndarray:
  """`[5, 3]` moments of the ArcFace template's landmark image at `size` (a constant, computed
  eagerly even when first asked for under a trace)."""
  with jax.ensure_compile_time_eval():
    image = resize(jnp.asarray(model_landmarks(landmarks_lib.ARCFACE_TEMPLATE[None])), size)
    return np.asarray(_raw_moments(image)[0][0])


def landmark_moments(landmark_image: jax.Array) -> jax.Array:
  """Landmark images `[b, H, W, 3]` in [-1, 1] → `[b, POSE_FEATURES]`: the pose in one vector.

  The dots of a landmark image tell only the tokens under them where a point is; a head turn
  is global (the nose moves across the face, the eyes' spread narrows). Per colour, the
  centroid and second moments of the dots, less the ArcFace template's and scaled to about
  unit spread (`_MOMENT_SCALES`), give every block the pose through the condition `c`. An
  empty image (no landmarks) gives zeros, the template's own value.
  """
  raw, mass = _raw_moments(landmark_image)
  scales = jnp.asarray(_MOMENT_SCALES, jnp.float32)[:, None]
  feats = (raw - jnp.asarray(_template_moments(landmark_image.shape[1]))) / scales
  feats = jnp.where(mass[:, None, :] > 0.5, feats, 0.0)
  return feats.reshape(feats.shape[0], -1)


def input_channels(sigmas: tuple[float, ...]) -> int:
  """The DiT's input channels: noisy image (3) ⊕ `landmark_channels`."""
  return 6 + 3 * len(sigmas)
