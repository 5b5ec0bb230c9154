"""The evaluators of stages 1 and 2 (`evaluate/common.py` has the interface and registry).

Stage 1: `Verification` (the insightface 10-fold protocol on `.bin` packs).
Stage 2, all drawing from one compiled sampler (`SampleContext`), EMA parameters:
  `SampleSheet`          identities × landmark sets, `samples/step_<N>.png` and TensorBoard;
  `IdentityConsistency`  faces from real rows identified among all real rows by the stage-1
                         network (`identity/top1`, `mean_cos_to_row`);
  `LandmarkFollowing`    whether faces turn with turned landmark sets (`pose_*`) and move with
                         moved ones (`follow_*`, `cross_*`);
  `GuidanceSweep`        a sheet and the identity figures at each of several guidance scales.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import numpy as np
from PIL import Image

from vigface_jax import config_lib
from vigface_jax import ops
from vigface_jax import parallel
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.evaluate import common
from vigface_jax.evaluate import generation
from vigface_jax.evaluate import verification
from vigface_jax.generate import sampling
from vigface_jax.models import stage2
from vigface_jax.train import state as state_lib


class Verification(common.Evaluator):
  """Verification accuracy of the (EMA) backbone on every pack of `context['packs']`.

  Options: `batch_size` (images per embedding call). Context: `setup`, `mesh`, `rules`,
  `packs` (name → `.bin` path). Figures per pack: `<pack>/accuracy`, `accuracy_std`,
  `val_at_far1e-3`.
  """

  def __init__(self, name: str, cfg: Any, context: dict[str, Any]):
    super().__init__(name, cfg.every)
    self.loaded = {n: verification.load_bin(p) for n, p in context["packs"].items()}
    self.active = bool(self.loaded)
    self.batch = int(cfg.batch_size)
    self.sharding = parallel.batch_sharding(context["mesh"], context["rules"])
    self.embed = state_lib.jit_method(context["setup"].graphdef, "embed", eval_mode=True)

  @classmethod
  def check(cls, options) -> None:
    options.int("batch_size", 1)
    for bin_path in options.get("bins") or ():
      if not os.path.exists(bin_path):
        raise config_lib.ConfigError(f"{options.prefix}.bins: {bin_path} does not exist")
    options.bool("baselines")
    if options.get("procedural_pairs") is not None:
      pairs = options.sub("procedural_pairs")
      for key in ("num_pairs", "num_folds", "identities_per_fold", "hard_negative_k"):
        pairs.int(key, 1)

  def run(self, step, state, writer) -> dict[str, float]:
    del step, writer
    params = state_lib.eval_params(state)

    def embed_fn(x: np.ndarray) -> np.ndarray:
      x = jax.make_array_from_callback(x.shape, self.sharding, lambda idx: x[idx])
      # The batch may span processes (stage 1 splits it over every device): gather.
      return parallel.fetch(self.embed(params, state.rest, x))

    out = {}
    for pack, (images, issame) in self.loaded.items():
      result = verification.evaluate(
          verification.flip_sum_embeddings(embed_fn, images, self.batch), issame)
      out[f"{pack}/accuracy"] = result["accuracy_mean"]
      out[f"{pack}/accuracy_std"] = result["accuracy_std"]
      out[f"{pack}/val_at_far1e-3"] = result["val"]
    return out


class SampleContext:
  """What the stage-2 evaluators share: the sampler, the rows, the sheet's landmark sets.

  Built once per run by the task and handed to the evaluators as `context['samples']`.
  """

  def __init__(self, setup: state_lib.Setup, config: Any, schedule: Any, real_rows: np.ndarray,
               points: np.ndarray, *, workdir: str, source: Any = None, mesh: Any = None,
               rules: Any = parallel.DEFAULT_RULES):
    """`points`: the sheet's landmark sets `[L, 5, 2]` (the first: the typical pose);
    `source`: the training data, for the pose probe's real faces (None: no pose figures)."""
    s = config.sample
    self.workdir, self.source, self.real_rows, self.points = workdir, source, real_rows, points
    self.seed, self.guidance = int(s.seed), float(s.guidance)
    self.lmk_images = np.asarray(landmarks_lib.render_landmark_image(points))  # uint8
    self.lmk_model = stage2.model_landmarks(points)
    self.generator = sampling.Generator(
        setup.graphdef, schedule, sampling.SamplerSettings.from_config(config),
        batch_size=int(s.batch_size), typical=self.lmk_model[0], mesh=mesh,
        state_shardings=setup.shardings, rules=rules)
    self.batch = self.generator.batch_size
    self._embed = state_lib.jit_method(setup.graphdef, "embed")

  def generate(self, state, rows: np.ndarray, lmk: np.ndarray, seed: int,
               guidance: float) -> np.ndarray:
    """uint8 faces of `rows` under model-range landmark images `lmk`, EMA parameters."""
    return self.generator(state_lib.eval_params(state), state.rest, rows, lmk, seed, guidance)

  def embed(self, state, images: np.ndarray) -> np.ndarray:
    """Stage-1 embeddings of uint8 faces (the frozen network in the state's `rest`)."""
    return ops.map_batches(lambda x: self._embed(state.params, state.rest, x), [images],
                           self.batch)

  def sheet(self, step: int, state, writer, guidance: float, rows: int,
            suffix: str = "") -> None:
    """`rows` real rows × the sheet's landmark sets → `samples/step_<N><suffix>.png`."""
    cols = len(self.points)
    images = self.generate(state, np.repeat(self.real_rows[:rows], cols, axis=0),
                           np.tile(self.lmk_model, (rows, 1, 1, 1)), self.seed, guidance)
    sheet = generation.make_sheet(images, self.lmk_images, rows, cols)
    if parallel.is_main_process():
      os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
      Image.fromarray(sheet).save(
          os.path.join(self.workdir, "samples", f"step_{step:07d}{suffix}.png"))
    writer.write_image(step, "samples" + suffix, sheet)

  def identity(self, state, guidance: float, count: int) -> dict[str, float]:
    """`identity_consistency` of faces from the first `count` real rows."""
    lmk = self.lmk_model[np.arange(count) % len(self.lmk_model)]
    images = self.generate(state, self.real_rows[:count], lmk, self.seed + 1, guidance)
    return generation.identity_consistency(self.embed(state, images), self.real_rows,
                                           np.arange(count))


class _Drawing(common.Evaluator):
  """A stage-2 evaluator: draws with `context['samples']` (a `SampleContext`); the option
  `count_field` (`identities` unless said otherwise; 0 = off) is how many real rows it draws,
  at most all of them."""

  def __init__(self, name: str, cfg: Any, context: dict[str, Any],
               count_field: str = "identities"):
    super().__init__(name, cfg.every)
    self.ctx = context["samples"]
    self.count = self.rows_at_most(cfg[count_field])
    self.active = self.count > 0

  def rows_at_most(self, count: int) -> int:
    return min(int(count), self.ctx.real_rows.shape[0])

  @classmethod
  def check(cls, options) -> None:
    options.int("identities", 0)


class SampleSheet(_Drawing):
  """A sample sheet at `sample.guidance`. Options: `identities` (sheet rows; 0 = off)."""

  def run(self, step, state, writer) -> dict[str, float]:
    self.ctx.sheet(step, state, writer, self.ctx.guidance, self.count)
    return {}


class IdentityConsistency(_Drawing):
  """Identity consistency at `sample.guidance`. Options: `identities` (real rows; 0 = off)."""

  def run(self, step, state, writer) -> dict[str, float]:
    del step, writer
    return self.ctx.identity(state, self.ctx.guidance, self.count)


class GuidanceSweep(_Drawing):
  """At each of `scales`: a sheet `samples/step_<N>_g<g>.png` of `sheet_identities` rows and
  `top1_g<g>`, `mean_cos_to_row_g<g>` of `eval_identities` rows (same rows, landmarks and
  seeds as `SampleSheet` and `IdentityConsistency`), from the same compiled sampler."""

  def __init__(self, name: str, cfg: Any, context: dict[str, Any]):
    super().__init__(name, cfg, context, count_field="eval_identities")
    self.scales = tuple(float(g) for g in cfg.scales)
    self.rows = self.rows_at_most(cfg.sheet_identities)
    self.active = bool(self.scales) and (self.rows > 0 or self.count > 0)

  @classmethod
  def check(cls, options) -> None:
    scales = options.get("scales")
    try:
      ok = all(math.isfinite(float(g)) for g in scales or ())
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise config_lib.ConfigError(
          f"{options.prefix}.scales must be a sequence of finite guidance scales such as "
          f"(1.0, 2.0), got {scales!r}")
    options.int("sheet_identities", 0)
    options.int("eval_identities", 0)

  def run(self, step, state, writer) -> dict[str, float]:
    out = {}
    for g in self.scales:
      key = guidance_key(g)
      if self.rows:
        self.ctx.sheet(step, state, writer, g, self.rows, "_" + key)
      if self.count:
        r = self.ctx.identity(state, g, self.count)
        out[f"top1_{key}"] = r["top1"]
        out[f"mean_cos_to_row_{key}"] = r["mean_cos_to_row"]
    return out


def guidance_key(scale: float) -> str:
  """Metric/file suffix of a guidance scale: 2.0 -> 'g2', 1.5 -> 'g1.5'."""
  return f"g{float(scale):g}"


class LandmarkFollowing(_Drawing):
  """Whether faces follow their landmark sets, at `sample.guidance` (`landmarks/*`).

  Options: `identities` (real rows, each drawn in pairs with the same noise; 0 = off) and
  `shift` (px; 0 = no translation figures).

  * Pose (`pose_agree`, `pose_follow`, `pose_probe_r2`; needs the training data): each row
    is drawn with the landmark set of a training face among the 10% most turned one way
    (`generation.yaw_proxy`) and with one among the 10% most turned the other way;
    `generation.pose_scores` compares the probe's reading of both with the real faces'.
  * Translation (`follow_x`, `follow_y`, `cross_*`, `follow`): each row drawn with its
    landmark set moved by −shift and +shift (x for one half of the batch, y for the other);
    phase correlation measures the faces' displacement / the dots' (1: the face goes where
    the dots go, 0: it ignores them; `cross_*` = |displacement across| / requested).
    Aligned training faces barely move as a whole, so this asks the DiT to extrapolate.
  """

  def __init__(self, name: str, cfg: Any, context: dict[str, Any]):
    super().__init__(name, cfg, context)
    self.shift = float(cfg.shift)
    self.pair_rows = np.concatenate([self.ctx.real_rows[:self.count]] * 2)  # each row twice
    self.active = self.count > 0 and (self.shift > 0 or self.ctx.source is not None)

  @classmethod
  def check(cls, options) -> None:
    super().check(options)
    options.float("shift", 0.0)

  @functools.cache
  def pose_setup(self) -> dict[str, Any] | None:
    """The probe and the most turned landmark sets, built at the first evaluation."""
    if self.ctx.source is None:
      return None
    found = generation.with_landmarks(self.ctx.source, generation.POSE_POOL, self.ctx.seed + 1)
    if len(found) < 10:
      return None
    images = np.stack([e["image"] for e in found])
    pts = np.stack([np.asarray(e["landmarks"], np.float32) for e in found])
    probe = generation.PoseProbe(images, pts)
    order = np.argsort(generation.yaw_proxy(pts))
    tail = max(1, len(order) // 10)
    lo, hi = order[:tail], order[-tail:]  # the most turned faces, each way
    gap = float(np.mean(probe(images[hi])) - np.mean(probe(images[lo])))
    return {"probe": probe, "lo": pts[lo], "hi": pts[hi], "real_gap": gap}

  def run(self, step, state, writer) -> dict[str, float]:
    del step, writer
    ctx, n, g = self.ctx, self.count, self.ctx.guidance
    out = {}
    p = self.pose_setup()
    if p is not None:
      i = np.arange(n)
      lmk = stage2.model_landmarks(np.concatenate([p["lo"][i % len(p["lo"])],
                                                   p["hi"][i % len(p["hi"])]]))
      images = ctx.generate(state, self.pair_rows, lmk, ctx.seed + 3, g)
      out.update(generation.pose_scores(p["probe"], images[:n], images[n:], p["real_gap"]))
    if self.shift <= 0:
      return out
    base = ctx.points[np.arange(n) % len(ctx.points)]
    pair = []
    for sign in (-1.0, 1.0):
      d = sign * self.shift
      lmk = stage2.model_landmarks(np.concatenate([base + [d, 0.0], base + [0.0, d]]))
      pair.append(ctx.generate(state, self.pair_rows, lmk, ctx.seed + 2, g))
    shift = generation.estimate_shift(pair[0], pair[1]) / (2 * self.shift)  # [2n, (x, y)]
    x, y = shift[:n], shift[n:]
    out.update(follow_x=float(np.mean(x[:, 0])), follow_y=float(np.mean(y[:, 1])),
               cross_x=float(np.mean(np.abs(x[:, 1]))), cross_y=float(np.mean(np.abs(y[:, 0]))))
    out["follow"] = 0.5 * (out["follow_x"] + out["follow_y"])
    return out
