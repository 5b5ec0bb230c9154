"""The `dit` task: stage 2 of VIGFace (DESIGN §1), a pixel DiT drawing a face from a class centre.

Each training example is an aligned face, its five-point landmark image and its class's *real*
row from stage 1. The DiT sees the noisy image ⊕ the landmark image (6 channels; plus 3 per
Gaussian-blurred copy of the landmark image, `model.landmark_blur`) and the condition
`t_emb + Linear(row)`; rows are replaced by the zero vector with probability
`diffusion.cond_drop` (classifier-free guidance). Loss: v-prediction (default) plus the
identity loss `‖f_FR(x̂0) − w‖²` through the frozen stage-1 network on low-noise timesteps.
The frozen network and the row table ride in the train state's non-optimised part
(`loop.fit(trainable=...)`), loaded from the stage-1 workdir into a fresh state only.

Writes into the workdir (besides checkpoints, metrics and TensorBoard events):
  `samples/step_<N>.png`  sample sheets: fixed identities (rows) × fixed landmark sets
                          (columns), DDIM + guidance from the EMA parameters; the first row
                          shows the landmark images;
  `summary.json`          last training metrics and the identity-consistency figures:
                          images generated from real rows, embedded by the stage-1 network,
                          top-1 identification against all real rows and mean cosine to the
                          conditioning row; and landmark following (`landmarks/*`): how far
                          the faces move when their landmark sets are moved, and whether
                          they turn the way the landmark sets of turned faces say.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import pipeline
from vigface_jax.diffusion import losses
from vigface_jax.diffusion import parameterization
from vigface_jax.diffusion import samplers
from vigface_jax.diffusion import schedules
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.models import dit as dit_lib
from vigface_jax.models import iresnet
from vigface_jax.train import fr as fr_task
from vigface_jax.train import loop
from vigface_jax.train import state as state_lib

# What the stage-2 optimizer updates: the DiT's parameters only (the FR network and the rows
# ride in the train state's non-optimised part and get no gradient).
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("dit"))

STAGE1_COMMAND = "python -m vigface_jax.main --config=configs/fr.py:demo --workdir=<stage-1 dir>"


class Frozen(nnx.Variable):
  """A variable the stage-2 optimizer never sees (the FR network's weights, the row table)."""


class Stage2(nnx.Module):
  """DiT + frozen stage-1 backbone + the real class-centre rows `[n, d]`."""

  def __init__(self, config: Any, fr_info: dict[str, Any], num_real: int, *, rngs: nnx.Rngs):
    m = config.model
    dtype = fr_task.compute_dtype(m.get("dtype", "auto"))
    self.landmark_blur = landmark_blur(config)
    self.dit = dit_lib.DiT(m.variant, patch_size=int(m.patch_size), cond_dim=fr_info["embed_dim"],
                           in_channels=input_channels(self.landmark_blur),
                           cond_scale=math.sqrt(fr_info["embed_dim"]),  # unit rows → unit RMS
                           dtype=dtype, remat=bool(m.get("remat", False)),
                           scan_blocks=bool(m.get("scan_blocks", False)),
                           output_overlap=int(m.get("output_overlap", 0)), rngs=rngs)
    self.fr = iresnet.IResNet(fr_info["arch"], embed_dim=fr_info["embed_dim"],
                              input_size=fr_info["input_size"], rngs=rngs)
    self.fr.eval()
    self.fr_input_size = int(fr_info["input_size"])
    self.rows = Frozen(jnp.zeros((num_real, fr_info["embed_dim"]), jnp.float32),
                       out_sharding=("classes", "embed"), eager_sharding=False)

  def landmark_channels(self, landmark_image: jax.Array) -> jax.Array:
    """`landmark_channels` under this model's `model.landmark_blur`."""
    return landmark_channels(landmark_image, self.landmark_blur)

  def denoise(self, x_t: jax.Array, t: jax.Array, cond: jax.Array | None,
              channels: jax.Array) -> jax.Array:
    """The DiT's prediction for noisy images `x_t` under rows `cond` and landmark channels."""
    return self.dit(jnp.concatenate([x_t, channels], axis=-1), t, cond)

  def embed(self, images: jax.Array) -> jax.Array:
    """Normalised float `[-1, 1]` or uint8 faces → stage-1 embeddings (frozen)."""
    return self.fr(iresnet.prepare(images, self.fr_input_size))


def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 → float32 in [-1, 1] (the FR network's normalisation too)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def landmark_input(points: jax.Array, has: jax.Array) -> jax.Array:
  """Landmark images in [-1, 1]; examples without landmarks get the empty (black) image."""
  image = to_model_range(landmarks_lib.render_landmark_image_jnp(points))
  return jnp.where(has[:, None, None, None], image, -1.0)


def landmark_blur(config: Any) -> tuple[float, ...]:
  """`model.landmark_blur` as a tuple of σ in pixels; ConfigError if invalid."""
  value = config.model.get("landmark_blur", ())
  value = () if value is None else value
  try:
    sigmas = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    sigmas = None
  if sigmas is None or not all(math.isfinite(v) and v > 0 for v in sigmas):
    raise config_lib.ConfigError(
        f"model.landmark_blur must be a tuple of positive σ in pixels (() = off), got {value!r}")
  return sigmas


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


def input_channels(sigmas: tuple[float, ...]) -> int:
  """The DiT's input channels: noisy image (3) ⊕ `landmark_channels`."""
  return 6 + 3 * len(sigmas)


def _model_landmarks(points: np.ndarray) -> np.ndarray:
  """Landmark sets `[n, 5, 2]` -> their landmark images in the DiT's input range, numpy."""
  points = jnp.asarray(points, jnp.float32)
  return np.asarray(landmark_input(points, jnp.ones(points.shape[0], bool)))


def dit_loss(model: Stage2, batch: dict[str, jax.Array], rng: jax.Array, *, cfg: Any,
             schedule: schedules.Schedule) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Diffusion loss (+ identity loss) of one batch; see the module docstring."""
  d = cfg.diffusion
  x0 = to_model_range(batch["image"])
  lmk = landmark_input(batch["landmarks"], batch["has_landmarks"])
  rows = jnp.take(model.rows[...], batch["label"], axis=0)
  r_t, r_n, r_c, r_l = jax.random.split(rng, 4)
  b = x0.shape[0]
  t = jax.random.randint(r_t, (b,), 0, schedule.num_timesteps)
  noise = jax.random.normal(r_n, x0.shape, jnp.float32)
  x_t = parameterization.q_sample(schedule, x0, t, noise)
  kept = losses.keep_mask(r_c, b, float(d.cond_drop))
  cond = jnp.where(kept[:, None], rows, 0.0)  # the zero vector is the null condition
  if float(d.get("landmark_drop", 0.0)) > 0:
    lmk = losses.drop_landmarks(r_l, lmk, float(d.landmark_drop), fill=-1.0)
  pred = model.denoise(x_t, t, cond, model.landmark_channels(lmk))
  _, diff_loss = losses.diffusion_loss(pred, x0, noise, t, schedule, kind=d.prediction,
                                       weighting=d.weighting,
                                       min_snr_gamma=float(d.get("snr_gamma", 5.0)))
  metrics = {"loss_diffusion": diff_loss}
  loss = diff_loss
  weight = float(d.id_loss_weight)
  if weight > 0:
    x0_hat, _ = parameterization.pred_to_x0_eps(d.prediction, pred, x_t, t, schedule)
    # Rows dropped to the null condition have no identity to match: push their t past the
    # identity loss's maximum so they are masked out with the too-noisy ones.
    t_id = jnp.where(kept, t, schedule.num_timesteps)
    id_loss = losses.identity_loss(model.embed, jnp.clip(x0_hat, -1.0, 1.0), rows, t_id,
                                   max_timestep=int(d.id_loss_max_t), weight=1.0)
    metrics["loss_identity"] = id_loss
    loss = loss + weight * id_loss
  return loss, metrics


# ------------------------------------------------------------------ sampling


def make_sampler(setup: state_lib.Setup, cfg: Any, schedule: schedules.Schedule,
                 typical: np.ndarray | None = None):
  """Jitted `sample(params, rest, rows, landmark_images, rng, guidance)` -> uint8 images.

  DDIM (`sample.num_steps`, `sample.eta`, `sample.spacing`) with classifier-free guidance
  `guidance` (conditional and unconditional halves in one batched DiT call). The scale is
  an argument, not a constant, so one compilation serves every scale of a sweep. With
  `sample.pose_guidance` > 0 and `typical` (a landmark image `[H, W, 3]` in [-1, 1] of the
  data's typical pose), a third batch evaluates the row with the typical landmark image and
  the guided prediction moves `pose_guidance` · (conditional − that) further from it.
  """
  s = cfg.sample
  interval = guidance_interval(cfg)
  pose_scale = pose_guidance(cfg) if typical is not None else 0.0

  @jax.jit
  def sample(params, rest, rows, lmk, rng, guidance):
    model = nnx.merge(setup.graphdef, params, rest)

    def with_cond(x_t, t, cond):
      r, l = cond
      return model.denoise(x_t, t, r, l)

    channels = model.landmark_channels(lmk)  # once, outside the sampling loop
    negative = None
    if pose_scale > 0:
      typical_channels = model.landmark_channels(jnp.asarray(typical, lmk.dtype)[None])
      negative = (rows, jnp.broadcast_to(typical_channels, channels.shape))
    model_fn = samplers.cfg_model_fn(with_cond, (rows, channels), guidance,
                                     (jnp.zeros_like(rows), channels), interval=interval,
                                     rescale=float(s.get("guidance_rescale", 0.0)),
                                     negative=negative, negative_scale=pose_scale)
    x0 = samplers.ddim_sample(model_fn, schedule, (rows.shape[0],) + lmk.shape[1:3] + (3,), rng,
                              num_steps=int(s.num_steps), eta=float(s.eta),
                              kind=cfg.diffusion.prediction, spacing=s.spacing, clip_x0=1.0)
    return jnp.clip(jnp.round((x0 + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  return sample


def _with_landmarks(source: Any, limit: int, seed: int, *, scan: int | None = None
                    ) -> list[dict[str, Any]]:
  """Up to `limit` examples that have landmarks, among the first `scan` (default `4 · limit`)
  of a seeded shuffle: a dataset without landmarks is not read to its end."""
  rng = np.random.default_rng(seed)
  found = []
  for i in rng.permutation(len(source))[:4 * limit if scan is None else scan]:
    element = source[int(i)]
    if bool(element.get("has_landmarks", False)):
      found.append(element)
    if len(found) == limit:
      break
  return found


def fixed_landmarks(source: Any, count: int, seed: int, pool: int = 256) -> np.ndarray:
  """`count` landmark sets from the training data that spread over its poses.

  Up to `pool` examples with landmarks (drawn by `seed`) are candidates. The first set is the
  candidate nearest the pool's median (a typical, near-frontal pose); each next one is the
  candidate farthest from those already chosen (farthest-point sampling in the 10 landmark
  coordinates), so the sheet's columns show the extremes of yaw, pitch and roll the data has
  and whether the faces follow them. Sources without landmarks give the ArcFace template.
  """
  cands = [np.asarray(e["landmarks"], np.float32)
           for e in _with_landmarks(source, pool, seed, scan=max(pool, 4 * count))]
  if not cands:
    return np.repeat(np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None], count, 0)
  flat = np.stack(cands).reshape(len(cands), -1)
  chosen = [int(np.argmin(np.linalg.norm(flat - np.median(flat, axis=0), axis=1)))]
  dist = np.linalg.norm(flat - flat[chosen[0]], axis=1)
  while len(chosen) < min(count, len(cands)):
    chosen.append(int(np.argmax(dist)))
    dist = np.minimum(dist, np.linalg.norm(flat - flat[chosen[-1]], axis=1))
  chosen += [chosen[0]] * (count - len(chosen))  # fewer candidates than columns
  return np.stack(cands)[chosen]


POSE_POOL = 1536  # real faces of the pose probe (about 13 s to render procedural ones)


def yaw_proxy(points: np.ndarray) -> np.ndarray:
  """`[n, 5, 2]` landmarks -> `[n]` (nose x − eyes' midpoint x) / eye distance.

  0 for a frontal face; its sign says which way the head is turned, and a horizontal flip
  (which also swaps left and right points) negates it.
  """
  p = np.asarray(points, np.float64)
  mid = 0.5 * (p[:, 0, 0] + p[:, 1, 0])
  return (p[:, 2, 0] - mid) / np.maximum(np.abs(p[:, 1, 0] - p[:, 0, 0]), 1e-6)


class PoseProbe:
  """A linear read-out of `yaw_proxy` from a face image, fitted on real training faces.

  Features: the left-right antisymmetric part `g − flip(g)` of the image averaged over 4×4
  pixel blocks (colour kept; the left half, the right being its negative). Ridge regression
  without intercept, so a face and its mirror image get opposite predictions, and whatever is
  left-right symmetric (most of an identity's look) cannot move the prediction. Fitted first
  on `1 − holdout` of the faces to report `r2` on the rest (how well pose can be read at
  all), then on all of them.
  """

  BLOCK = 4

  def __init__(self, images: np.ndarray, points: np.ndarray, *, ridge: float = 30.0,
               holdout: float = 0.2):
    x, y = self.features(images), yaw_proxy(points)
    n_fit = len(y) - max(1, int(round(holdout * len(y))))
    if n_fit < 2:
      raise ValueError(f"PoseProbe needs at least 3 faces with landmarks, got {len(y)}")
    self.ridge = float(ridge)
    w = self._solve(x[:n_fit], y[:n_fit])
    rest = y[n_fit:]
    resid = np.mean((x[n_fit:] @ w - rest) ** 2)
    self.r2 = float(1.0 - resid / max(np.mean((rest - rest.mean()) ** 2), 1e-12))
    self.weights = self._solve(x, y)

  def _solve(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.solve(x.T @ x + self.ridge * np.eye(x.shape[1]), x.T @ y)

  @classmethod
  def features(cls, images: np.ndarray) -> np.ndarray:
    """uint8 `[n, H, W, 3]` -> float64 `[n, (H/4) · (W/8) · 3]`."""
    g = np.asarray(images, np.float64) / 127.5
    n, h, w, c = g.shape
    k = cls.BLOCK
    g = g.reshape(n, h // k, k, w // k, k, c).mean((2, 4))
    anti = g - g[:, :, ::-1]
    return anti[:, :, :(w // k) // 2].reshape(n, -1)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Predicted `yaw_proxy` of uint8 faces `[n, H, W, 3]`."""
    return self.features(images) @ self.weights


def pose_scores(probe: PoseProbe, left: np.ndarray, right: np.ndarray, real_gap: float
                ) -> dict[str, float]:
  """`landmarks/pose_*` of faces drawn in pairs with left- and right-turned landmark sets.

  `left[i]` and `right[i]` are one row drawn with the same noise under the two landmark sets;
  `real_gap` is the probe's mean read turn of the real right-turned faces minus that of the
  left-turned ones. `pose_agree`: pairs read in the right order (0.5 = chance);
  `pose_follow`: the pairs' mean read difference / `real_gap` (1 = turn like the real faces,
  0 = ignore the pose); `pose_probe_r2`: the probe's held-out R² on real faces.
  """
  diff = probe(right) - probe(left)
  return {"pose_agree": float(np.mean(diff > 0)),
          "pose_follow": float(np.mean(diff) / real_gap) if real_gap > 0 else float("nan"),
          "pose_probe_r2": probe.r2}


def _sheet(images: np.ndarray, lmk: np.ndarray, rows: int, cols: int) -> np.ndarray:
  size = images.shape[1]
  sheet = np.zeros(((rows + 1) * size, cols * size, 3), np.uint8)
  for c in range(cols):
    sheet[:size, c * size:(c + 1) * size] = lmk[c]
  for r in range(rows):
    for c in range(cols):
      sheet[(r + 1) * size:(r + 2) * size, c * size:(c + 1) * size] = images[r * cols + c]
  return sheet


def guidance_sweep(config: Any) -> tuple[float, ...]:
  """`sample.guidance_sweep` as floats; ConfigError naming the field if it is not numbers."""
  value = config.sample.get("guidance_sweep", ()) or ()
  try:
    scales = tuple(float(g) for g in value)
  except (TypeError, ValueError):
    raise config_lib.ConfigError(
        f"sample.guidance_sweep must be a sequence of guidance scales such as (1.0, 2.0), got "
        f"{value!r}") from None
  if not all(np.isfinite(scales)):
    raise config_lib.ConfigError(f"sample.guidance_sweep must be finite, got {value!r}")
  return scales


def check_sample_counts(config: Any) -> None:
  """ConfigError unless `sample.sheet_landmarks` ≥ 1 (the identity and pose evaluations draw
  their landmark sets from the sheet's) and the other `sample.*` counts are ≥ 0 (0 = skip)."""
  s = config.sample
  for field, least in (("sheet_landmarks", 1), ("sheet_identities", 0), ("eval_identities", 0),
                       ("follow_identities", 0), ("batch_size", 1)):
    value = s.get(field, least)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise config_lib.ConfigError(
          f"sample.{field} must be an integer ≥ {least}, got {value!r}")


def guidance_interval(config: Any) -> tuple[int, int] | None:
  """`sample.guidance_interval` as (t_lo, t_hi) timesteps, or None; ConfigError if invalid."""
  value = config.sample.get("guidance_interval")
  if value is None:
    return None
  num_t = int(config.diffusion.timesteps)
  try:
    lo, hi = (int(v) for v in value)
  except (TypeError, ValueError):
    lo = hi = -1
  if not 0 <= lo <= hi < num_t:
    raise config_lib.ConfigError(
        f"sample.guidance_interval must be None or (t_lo, t_hi) with 0 <= t_lo <= t_hi < "
        f"diffusion.timesteps = {num_t}, got {value!r}")
  return lo, hi


def pose_guidance(config: Any) -> float:
  """`sample.pose_guidance` as a float ≥ 0; ConfigError naming the field otherwise."""
  value = config.sample.get("pose_guidance", 0.0)
  try:
    scale = float(value)
  except (TypeError, ValueError):
    scale = -1.0
  if not (np.isfinite(scale) and scale >= 0):
    raise config_lib.ConfigError(
        f"sample.pose_guidance must be a finite number >= 0 (0 = off), got {value!r}")
  return scale


def guidance_key(scale: float) -> str:
  """Metric/file suffix of a guidance scale: 2.0 -> 'g2', 1.5 -> 'g1.5'."""
  return f"g{float(scale):g}"


def make_hooks(config, workdir: str, schedule, real_rows: np.ndarray, points: np.ndarray,
               source: Any = None):
  """Sample-sheet, identity-consistency and landmark-following hooks (EMA parameters).

  `source` (the training data) supplies the real faces of the pose probe (`following`); None
  leaves the `landmarks/pose_*` figures out.

  Every `sample.every` steps (and at the end): a sheet `samples/step_<N>.png`,
  `identity/*` and `landmarks/*` (see `following`) at `sample.guidance`. At the end only,
  for each scale g of `sample.guidance_sweep`: a sheet `samples/step_<N>_g<g>.png` and
  `guidance_sweep/top1_g<g>`, `guidance_sweep/mean_cos_to_row_g<g>` on the same rows,
  landmarks and seeds.
  """
  s = config.sample
  sweep = guidance_sweep(config)
  n_ids, n_lmk = int(s.sheet_identities), int(s.sheet_landmarks)
  lmk_images = np.asarray(landmarks_lib.render_landmark_image(points))  # uint8 [L, 112, 112, 3]
  lmk_model = _model_landmarks(points)
  num_eval = min(int(s.eval_identities), real_rows.shape[0])
  follow_shift = float(s.get("follow_shift", 0))
  num_follow = min(int(s.get("follow_identities", 0)), real_rows.shape[0])
  pair_rows = np.concatenate([real_rows[:num_follow]] * 2)  # each row drawn twice
  batch = int(s.batch_size)

  @functools.cache
  def pose_setup() -> dict[str, Any] | None:
    """The probe and the most turned landmark sets, built at the first evaluation."""
    if source is None:
      return None
    found = _with_landmarks(source, POSE_POOL, int(s.seed) + 1)
    if len(found) < 10:
      return None
    images = np.stack([e["image"] for e in found])
    pts = np.stack([np.asarray(e["landmarks"], np.float32) for e in found])
    probe = PoseProbe(images, pts)
    order = np.argsort(yaw_proxy(pts))
    tail = max(1, len(order) // 10)
    lo, hi = order[:tail], order[-tail:]  # the most turned faces, each way
    gap = float(np.mean(probe(images[hi])) - np.mean(probe(images[lo])))
    return {"probe": probe, "lo": pts[lo], "hi": pts[hi], "real_gap": gap}

  def factory(setup: state_lib.Setup):
    sample = make_sampler(setup, config, schedule, typical=lmk_model[0])
    writer = metrics_lib.MetricWriter(workdir) if parallel.is_main_process() else None

    @jax.jit
    def embed(params, rest, images):
      return nnx.merge(setup.graphdef, params, rest).embed(images)

    def generate(state, rows, lmk, seed, guidance):
      params = state.ema if state.ema is not None else state.params
      guidance = jnp.asarray(guidance, jnp.float32)
      out = []
      for start in range(0, rows.shape[0], batch):
        r, l = rows[start:start + batch], lmk[start:start + batch]
        pad = batch - r.shape[0]
        if pad:
          r = np.concatenate([r, np.zeros((pad,) + r.shape[1:], r.dtype)])
          l = np.concatenate([l, np.repeat(l[:1], pad, 0)])
        imgs = sample(params, state.rest, jnp.asarray(r), jnp.asarray(l),
                      jax.random.PRNGKey(seed + start), guidance)
        out.append(np.asarray(imgs)[:batch - pad])
      return np.concatenate(out)

    def write_sheet(step: int, state, guidance: float, suffix: str = "") -> None:
      rows = np.repeat(real_rows[:n_ids], n_lmk, axis=0)
      lmk = np.tile(lmk_model, (n_ids, 1, 1, 1))
      images = generate(state, rows, lmk, int(s.seed), guidance)
      sheet = _sheet(images, lmk_images, n_ids, n_lmk)
      if parallel.is_main_process():
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        Image.fromarray(sheet).save(
            os.path.join(workdir, "samples", f"step_{step:07d}{suffix}.png"))
        writer.write_image(step, "samples" + suffix, sheet)

    def identity(state, guidance: float) -> dict[str, float]:
      rows = real_rows[:num_eval]
      lmk = lmk_model[np.arange(num_eval) % len(lmk_model)]
      images = generate(state, rows, lmk, int(s.seed) + 1, guidance)
      emb = np.concatenate([np.asarray(embed(state.params, state.rest, jnp.asarray(
          images[i:i + batch]))) for i in range(0, len(images), batch)])
      return identity_consistency(emb, real_rows, np.arange(num_eval))

    def following(state, guidance: float) -> dict[str, float]:
      """How far faces move when their landmark sets move by ±`follow_shift` px in x and y.

      Each real row is drawn twice with the same noise, once with its landmark set moved by
      −shift and once by +shift (x for one half of the batch, y for the other); phase
      correlation measures the faces' displacement. `follow_*` = measured / requested (1: the
      face goes where the dots go, 0: it ignores them); `cross_*` = |displacement across|
      / requested. Aligned training faces barely move as a whole, so this asks the DiT to
      extrapolate; `pose_*` (`pose_following`) asks for poses the data has.
      """
      out = {}
      p = pose_setup()
      if p is not None:
        out.update(pose_following(state, guidance, p))
      if follow_shift <= 0:
        return out
      base = points[np.arange(num_follow) % len(points)]
      pair = []
      for sign in (-1.0, 1.0):
        step = sign * follow_shift
        lmk = _model_landmarks(np.concatenate([base + [step, 0.0], base + [0.0, step]]))
        pair.append(generate(state, pair_rows, lmk, int(s.seed) + 2, guidance))
      shift = estimate_shift(pair[0], pair[1]) / (2 * follow_shift)  # [2n, (x, y)]
      x, y = shift[:num_follow], shift[num_follow:]
      out.update(follow_x=float(np.mean(x[:, 0])), follow_y=float(np.mean(y[:, 1])),
                 cross_x=float(np.mean(np.abs(x[:, 1]))), cross_y=float(np.mean(np.abs(y[:, 0]))))
      out["follow"] = 0.5 * (out["follow_x"] + out["follow_y"])
      return out

    def pose_following(state, guidance: float, p: dict[str, Any]) -> dict[str, float]:
      """Whether faces turn the way their landmark sets do (`following`'s pose half).

      Each real row is drawn twice with the same noise: with the landmark set of a training
      face among the 10% most turned one way (`yaw_proxy`), and with one among the 10% most
      turned the other way; `pose_scores` compares the probe's reading of both samples with
      its reading of the real faces the landmark sets came from.
      """
      i = np.arange(num_follow)
      lo, hi = p["lo"][i % len(p["lo"])], p["hi"][i % len(p["hi"])]
      lmk = _model_landmarks(np.concatenate([lo, hi]))
      images = generate(state, pair_rows, lmk, int(s.seed) + 3, guidance)
      return pose_scores(p["probe"], images[:num_follow], images[num_follow:], p["real_gap"])

    def sheet_fn(step: int, state) -> dict[str, float]:
      write_sheet(step, state, float(s.guidance))
      return {}

    def identity_fn(step: int, state) -> dict[str, float]:
      del step
      return identity(state, float(s.guidance))

    def sweep_fn(step: int, state) -> dict[str, float]:
      out = {}
      for g in sweep:
        key = guidance_key(g)
        if n_ids:
          write_sheet(step, state, g, "_" + key)
        if num_eval:
          r = identity(state, g)
          out[f"top1_{key}"] = r["top1"]
          out[f"mean_cos_to_row_{key}"] = r["mean_cos_to_row"]
      return out

    def landmarks_fn(step: int, state) -> dict[str, float]:
      del step
      return following(state, float(s.guidance))

    every = int(s.every)
    hooks = []  # sample.sheet_identities / eval_identities / follow_identities 0: left out
    if n_ids:
      hooks.append(loop.Hook("samples", every, sheet_fn))
    if num_eval:
      hooks.append(loop.Hook("identity", every, identity_fn))
    if num_follow > 0 and (follow_shift > 0 or source is not None):
      hooks.append(loop.Hook("landmarks", every, landmarks_fn))
    if sweep and (n_ids or num_eval):
      hooks.append(loop.Hook("guidance_sweep", 0, sweep_fn))
    return hooks

  return factory


def identity_consistency(emb: np.ndarray, real_rows: np.ndarray, labels: np.ndarray
                         ) -> dict[str, float]:
  """Top-1 identification of generated faces among all real rows, and cosine to their own."""
  e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  w = real_rows / np.maximum(np.linalg.norm(real_rows, axis=1, keepdims=True), 1e-12)
  cos = e @ w.T
  return {"top1": float(np.mean(np.argmax(cos, axis=1) == labels)),
          "mean_cos_to_row": float(np.mean(cos[np.arange(len(labels)), labels])),
          "chance": 1.0 / w.shape[0], "num_identities": float(len(labels))}


def estimate_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(dx, dy) by which `b`'s content sits right/down of `a`'s (phase correlation), [n, 2].

  Args:
    a, b: images [n, H, W, C] (any numeric dtype), compared on their channel mean after
      removing it and applying a Hann window; sub-pixel by a parabola through the peak.
  """
  a = np.asarray(a, np.float64).mean(-1)
  b = np.asarray(b, np.float64).mean(-1)
  h, w = a.shape[1:]
  window = np.outer(np.hanning(h), np.hanning(w))
  a = (a - a.mean((1, 2), keepdims=True)) * window
  b = (b - b.mean((1, 2), keepdims=True)) * window
  cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
  corr = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real  # [n, H, W]
  out = np.zeros((len(a), 2))
  for i, c in enumerate(corr):
    py, px = np.unravel_index(np.argmax(c), c.shape)
    out[i, 0] = _peak(px, w, c[py, (px - 1) % w], c[py, px], c[py, (px + 1) % w])
    out[i, 1] = _peak(py, h, c[(py - 1) % h, px], c[py, px], c[(py + 1) % h, px])
  return out


def _peak(index: int, size: int, lo: float, mid: float, hi: float) -> float:
  """Signed circular offset of a correlation peak, refined by a parabola through 3 values."""
  denom = lo - 2 * mid + hi
  frac = 0.5 * (lo - hi) / denom if denom < 0 else 0.0
  return (index + size // 2) % size - size // 2 + frac


# ---------------------------------------------------------------------- task


def _stage1(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], np.ndarray]:
  """(backbone info, real rows [n, d]) from the stage-1 workdir; ConfigError if absent."""
  root = config.stage1.get("workdir")
  if not root:
    raise config_lib.ConfigError(
        "stage1.workdir is not set: stage 2 needs the stage-1 workdir (its export/ and "
        f"prototypes.npz); produce one with `{STAGE1_COMMAND}` and pass "
        "--config.stage1.workdir=<stage-1 dir>")
  npz = os.path.join(root, "prototypes.npz")
  try:
    _, info = embed_lib.read_info(root)
  except ValueError as e:
    raise config_lib.ConfigError(f"stage1.workdir={root}: {e}; a finished `{STAGE1_COMMAND}` "
                                 "writes it") from None
  if not os.path.exists(npz):
    raise config_lib.ConfigError(f"{npz} is missing: stage 1 writes it when it finishes "
                                 f"(`{STAGE1_COMMAND}`)")
  with np.load(npz) as f:
    rows = np.asarray(f["real"], np.float32)
  return info, rows


REQUIRED_FIELDS = ("data.source", "train.num_steps", "model.variant")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains stage 2 and reports identity consistency of samples from real rows."""
  fr_task.check_data(config)
  guidance_sweep(config)  # bad fields fail before anything is built
  check_sample_counts(config)
  landmark_blur(config)
  guidance_interval(config)
  pose_guidance(config)
  info, real_rows = _stage1(config)
  rules = config.get("sharding_rules", parallel.DEFAULT_RULES)
  mesh = parallel.mesh_from_config(config)
  data = pipeline.make_pipeline(config, mesh, rules)
  n = fr_task.num_real_classes(config, data.source)
  if n != real_rows.shape[0]:
    raise config_lib.ConfigError(
        f"the data has {n} identities but stage 1 ({config.stage1.workdir}) has "
        f"{real_rows.shape[0]} real rows: train stage 2 on the data stage 1 was trained on")
  schedule = schedules.make_schedule(config.diffusion.schedule, int(config.diffusion.timesteps))
  points = fixed_landmarks(data.source, int(config.sample.sheet_landmarks), int(config.sample.seed))
  fr_model, _ = embed_lib.load_backbone(config.stage1.workdir)
  fr_values = {path: var[...] for path, var in nnx.state(fr_model).flat_state()}

  def initialize(state: state_lib.TrainState, setup) -> state_lib.TrainState:
    del setup
    for path, var in state.rest["fr"].flat_state():
      if path in fr_values:
        var[...] = jax.device_put(jnp.asarray(fr_values[path], var[...].dtype),
                                  var[...].sharding)
    rows = state.rest["rows"]
    rows[...] = jax.device_put(jnp.asarray(real_rows), rows[...].sharding)
    return state

  create = functools.partial(Stage2, config, info, n)
  loss_fn = functools.partial(dit_loss, cfg=config, schedule=schedule)
  summary: dict[str, Any] = {"task": "dit", "num_real": n, "variant": config.model.variant,
                             "patch_size": int(config.model.patch_size)}
  logging.info("stage 2: DiT-%s/%d on %d identities", config.model.variant,
               config.model.patch_size, n)
  with data, metrics_lib.MetricWriter(workdir) as writer:
    result = loop.fit(config, workdir, mesh=mesh, create_model=create, loss_fn=loss_fn,
                      data=data, images_per_step=int(config.data.global_batch_size),
                      make_hooks=make_hooks(config, workdir, schedule, real_rows, points,
                                            data.source),
                      writer=writer, trainable=TRAINABLE,
                      initialize=initialize)
  summary.update(result.metrics)
  metrics_lib.write_summary(workdir, summary)
  return summary
