r"""A stage-2 checkpoint's faces above the real faces they should look like (README figures).

    python -m benchmarks.stage2_sheet --stage1=workdir/fr_demo --stage2=workdir/dit_demo \
        --out=benchmarks/figures/stage2_demo.jpg [--guidance=4.0]

Draws, with the run's own sampler settings (`sample.*` of its config.json), two images for
each of 8 procedural training identities (ids 0, 7, ..., 49), each from that identity's real
stage-1 row and under the landmark set of one of its real training images (images 0 and 1),
and puts the two real images below them: the top row is what the DiT draws, the bottom row
what it was trained to draw for the same row and landmarks. It draws the run's latest
checkpoint, so a run stopped early gets its sheet too.

`--predictions` writes instead, for 6 real training faces (rows), the face and then the
model's x0 prediction (its clean-image estimate) from the face noised at t = 20, 100, 300,
600, 900 and 999 under its own row and landmark set: how much detail the DiT keeps at each
noise level, the first thing a sampler's last steps rely on.
"""

from __future__ import annotations

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vigface_jax import parallel
from vigface_jax.data import faces
from vigface_jax.diffusion import parameterization
from vigface_jax.generate import loading
from vigface_jax.generate import sampling
from vigface_jax.models import stage2

_STAGE1 = flags.DEFINE_string("stage1", None, "A finished configs/fr.py run.", required=True)
_STAGE2 = flags.DEFINE_string("stage2", None, "A configs/dit.py run trained on it.",
                              required=True)
_OUT = flags.DEFINE_string("out", None, "Output image (.png or .jpg).", required=True)
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale; default the run's own.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_PREDICTIONS = flags.DEFINE_bool("predictions", False, "x0 predictions across noise levels.")
TIMESTEPS = (20, 100, 300, 600, 900, 999)
IDENTITIES = tuple(range(0, 56, 7))


def _load(stage1: str, stage2_dir: str) -> tuple[loading.Stage1, loading.Stage2Run]:
  """The stage-1 run and the stage-2 run's latest checkpoint, on all local devices."""
  s1 = loading.load_stage1(stage1)
  mesh = parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 1))
  return s1, loading.load_stage2(stage2_dir, s1, mesh)


def sheet(stage1: str, stage2_dir: str, guidance: float | None, seed: int) -> np.ndarray:
  """uint8 `[224, 16 · 112, 3]`: generated faces above the real ones (module docstring)."""
  s1, run = _load(stage1, stage2_dir)
  data_seed = int(run.config.data.seed)
  real, points = [], []
  for ident in IDENTITIES:
    for index in range(2):
      image, pts = faces.render_face(data_seed, ident, index)
      real.append(image)
      points.append(pts)
  rows = s1.real[np.repeat(np.asarray(IDENTITIES), 2)]
  gen = sampling.Generator(run.graphdef, run.schedule,
                           sampling.SamplerSettings.from_config(run.config),
                           batch_size=len(real))
  scale = float(run.config.sample.guidance) if guidance is None else float(guidance)
  drawn = gen(run.params, run.rest, rows, stage2.model_landmarks(np.stack(points)), seed, scale)
  return np.concatenate([np.concatenate(list(drawn), 1), np.concatenate(real, 1)], 0)


def predictions(stage1: str, stage2_dir: str, seed: int) -> np.ndarray:
  """uint8 `[6 · 112, 7 · 112, 3]`: each real face, then x0_hat at each of `TIMESTEPS`."""
  s1, run = _load(stage1, stage2_dir)
  model = nnx.merge(run.graphdef, run.params, run.rest)
  idents = IDENTITIES[:6]
  pairs = [faces.render_face(int(run.config.data.seed), i, 3) for i in idents]
  x0 = model.to_model_size(stage2.to_model_range(jnp.asarray(np.stack([p[0] for p in pairs]))))
  points = jnp.asarray(np.stack([p[1] for p in pairs]), jnp.float32)
  channels = model.landmark_channels(stage2.landmark_input(points, jnp.ones(len(idents), bool)))
  rows = jnp.asarray(s1.real[np.asarray(idents)])
  cols = [model.to_output(x0)]
  for t in TIMESTEPS:
    tt = jnp.full((len(idents),), t)
    x_t = parameterization.q_sample(run.schedule, x0, tt,
                                    jax.random.normal(jax.random.PRNGKey(seed + t), x0.shape))
    pred = model.denoise(x_t, tt, rows, channels)
    x0_hat, _ = parameterization.pred_to_x0_eps(run.config.diffusion.prediction, pred, x_t, tt,
                                                run.schedule)
    cols.append(model.to_output(jnp.clip(x0_hat, -1.0, 1.0)))
  cols = [np.asarray(stage2.to_uint8(c)) for c in cols]
  return np.concatenate([np.concatenate([c[r] for c in cols], 1) for r in range(len(idents))])


def main(argv):
  del argv
  make = (lambda: predictions(_STAGE1.value, _STAGE2.value, _SEED.value)) if _PREDICTIONS.value \
      else (lambda: sheet(_STAGE1.value, _STAGE2.value, _GUIDANCE.value, _SEED.value))
  Image.fromarray(make()).save(
      _OUT.value, **({"quality": 88} if _OUT.value.endswith(".jpg") else {}))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
