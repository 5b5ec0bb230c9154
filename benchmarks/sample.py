r"""Stage-2 sampling, JAX vs PyTorch + diffusers: 50-step DDIM with classifier-free guidance.

    python -m benchmarks.sample --variant=small --patch_size=16 --output_overlap=4 \
        --landmark_blur=6,16 --batch=16 --sample_steps=50 [--write]

Draws `--batch` 112x112 faces with DDIM (eta 0, `trailing` spacing, cosine schedule T = 1000,
v-prediction, x0 clipped to [-1, 1], guidance 4.0 at every step: the sampling settings of
`configs/dit.py`'s default variant) from the same DiT weights on both sides. (The demo variant
samples with eta 1, a guidance interval and guidance rescale; with eta > 0 the two sides would
draw different noise, so their images could not be compared.)

* **JAX (ours)**: the sampler every stage-2 evaluator uses,
  `vigface_jax.generate.sampling.make_sampler(graphdef, schedule, SamplerSettings(...))`
  over a `models.stage2.Stage2` (DiT + frozen IResNet + rows, built by
  `train.dit.create_model` from `configs/dit.py:demo` with the flags' model fields, float32,
  blocks unrolled, the frozen network of `--fr_config`): one `jax.jit` of
  `sample(params, rest, rows, landmark_images, rng, guidance) -> uint8` that computes the
  landmark channels (the image and its `--landmark_blur` copies) once, draws x_T from `rng`,
  runs the whole 50-step loop as one `lax.scan` with the conditional and unconditional halves
  in one batched DiT call, and converts to uint8 (compile reported separately).
* **Reference**: the same architecture in PyTorch (`benchmarks/dit_step.py`'s `TorchDiT`, the
  facebookresearch/DiT `models.py` recipe) driven the way DiT's `sample.py` and diffusers
  pipelines do it: the landmark channels computed once per call (`dit_step`'s torch port of
  `stage2.landmark_channels`), then a Python loop over `diffusers.DDIMScheduler`
  (`squaredcos_cap_v2`, `v_prediction`, `clip_sample=True`, the same spacing) with the
  doubled `[x; x]` batch and `[rows; 0]` conditions per step, `uncond + s * (cond - uncond)`,
  under `torch.inference_mode`, and the same uint8 conversion.

Both start from the same x_T (the one `make_sampler` draws from its key, recomputed here as
`samplers.ddim_sample` draws it) and landmark images, so with eta = 0 the final images must
agree (max |diff| asserted <= 2 uint8 levels, i.e. about 1e-2 on the [-1, 1] scale plus
rounding; float32 differences grow over 50 steps), which checks that the two samplers are the
same computation before anything is compared. Each side runs once as warm-up, then
`--repeats` timed runs; images/s from the median.

Threads: as `benchmarks/dit_step.py` (torch threads = `--threads`, the process pinned to
`--threads` CPUs before jax starts).

`--json=PATH` also writes the figures (and the device's peak memory where the backend
reports it) as JSON: what `benchmarks/run.py` reads.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/sample.py`: make the repo importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import cpu_threads  # pins --threads CPUs; before jax  # pylint: disable=g-bad-import-order
from benchmarks import dit_step  # pylint: disable=g-bad-import-order

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import diffusers
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import data_pipeline as dp
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.diffusion import schedules
from vigface_jax.generate import sampling
from vigface_jax.models import dit
from vigface_jax.models import stage2
from vigface_jax.train import dit as dit_train
# pylint: enable=g-import-not-at-top,wrong-import-position

_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale.")
_SPACING = flags.DEFINE_string("spacing", "trailing", "DDIM timestep spacing.")
_REPEATS = dp._REPEATS  # pylint: disable=protected-access  (data_pipeline's --repeats)
flags.FLAGS.set_default("patch_size", 16)
flags.FLAGS.set_default("batch", 16)
flags.FLAGS.set_default("repeats", 3)  # timed sampling runs per side, after 1 warm-up

SECTION = "## DiT sampling (DDIM + guidance)"
T = 1000
AGREE_LEVELS = 2  # uint8 levels: ~1e-2 on the [-1, 1] scale, plus the rounding to uint8


def torch_sample(model: dit_step.TorchDiT, x_t: torch.Tensor, lmk: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
  """DiT `sample.py`-style CFG loop over diffusers' DDIMScheduler; NCHW in, uint8 NHWC out.

  `lmk`: landmark images in [-1, 1]; their channels (with the blurred copies) are computed
  once per call, as `make_sampler` does.
  """
  sched = diffusers.DDIMScheduler(
      num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
      clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
      timestep_spacing=_SPACING.value)
  sched.set_timesteps(_SAMPLE_STEPS.value)
  s = _GUIDANCE.value
  cond = torch.cat([rows, torch.zeros_like(rows)], 0)
  with torch.inference_mode():
    channels = dit_step.torch_landmark_channels(lmk, dit_step.landmark_blur())
    lmk2 = torch.cat([channels, channels], 0)
    x = x_t
    for t in sched.timesteps:
      inp = torch.cat([torch.cat([x, x], 0), lmk2], 1)
      out = model(inp, t.expand(inp.shape[0]), cond)
      c, u = out.chunk(2, 0)
      x = sched.step(u + s * (c - u), t, x, eta=0.0).prev_sample
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def run() -> dict[str, Any]:
  torch.manual_seed(dit_step._SEED.value)  # pylint: disable=protected-access
  torch.set_num_threads(dit_step._THREADS.value)  # pylint: disable=protected-access
  v = dit.get_variant(dit_step._VARIANT.value)  # pylint: disable=protected-access
  p, b, seed = dit_step._PATCH.value, dit_step._BATCH.value, dit_step._SEED.value  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  size = dit_step.INPUT_SIZE
  rows = rng.normal(size=(b, dit_step.cond_dim())).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=-1, keepdims=True)  # stage-1 rows are unit vectors
  points = np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None] + rng.normal(
      0.0, 2.0, (b, 5, 2)).astype(np.float32)
  lmk = stage2.model_landmarks(points)  # landmark images in [-1, 1], as the evaluators pass

  config = dit_step.stage2_config(scan_blocks=False)
  model = dit_train.create_model(config, dit_step.fr_info(), dit_step.NUM_REAL)(
      rngs=nnx.Rngs(seed))
  dit_step.randomise_zero_init(model.dit, seed)
  tmodel = dit_step.TorchDiT(v, p, overlap=dit_step._OVERLAP.value,  # pylint: disable=protected-access
                             cond_scale=dit_step.cond_scale()).eval()
  dit_step.copy_into_torch(tmodel, model.dit)
  schedule = schedules.make_schedule(config.diffusion.schedule, T)
  settings = sampling.SamplerSettings(num_steps=_SAMPLE_STEPS.value, eta=0.0,
                                      spacing=_SPACING.value, prediction="v")
  graphdef, params, rest = nnx.split(model, stage2.TRAINABLE, ...)  # as the train state
  sample = sampling.make_sampler(graphdef, schedule, settings)
  key = jax.random.PRNGKey(seed)
  # The x_T `samplers.ddim_sample` draws from `key` (its `_initial_noise`), for torch.
  x_T = np.asarray(jax.random.normal(jax.random.split(key)[0], (b, size, size, 3),  # pylint: disable=invalid-name
                                     jnp.float32))
  jargs = (params, rest, jnp.asarray(rows), jnp.asarray(lmk), key, jnp.float32(_GUIDANCE.value))
  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()
  targs = (nchw(x_T), nchw(lmk), torch.from_numpy(rows))

  out: dict[str, Any] = {"params": sum(q.numel() for q in tmodel.parameters()),
                         "tokens": (size // p) ** 2, "hidden": v.hidden, "depth": v.depth,
                         "heads": v.heads}
  t0 = time.perf_counter()
  compiled = sample.lower(*jargs).compile()
  out["jax_compile_s"] = time.perf_counter() - t0
  jimg = np.asarray(jax.block_until_ready(compiled(*jargs))).astype(np.int32)
  timg = torch_sample(tmodel, *targs).numpy().astype(np.int32)
  out["max_level_diff"] = int(np.max(np.abs(jimg - timg)))
  out["frac_differing"] = float(np.mean(jimg != timg))
  out["image_std"] = float(np.std(jimg / 127.5 - 1.0))
  print(f"final images: std {out['image_std']:.3f} ([-1, 1] scale), max |jax - torch| "
        f"{out['max_level_diff']} uint8 levels, {100 * out['frac_differing']:.3f}% of values "
        "differ")
  assert out["max_level_diff"] <= AGREE_LEVELS, (
      f"samplers disagree: {out['max_level_diff']} uint8 levels")

  out["jax_times"], out["jax_cores"] = cpu_threads.time_calls(
      lambda: jax.block_until_ready(compiled(*jargs)), _REPEATS.value)
  out["torch_times"], out["torch_cores"] = cpu_threads.time_calls(
      lambda: torch_sample(tmodel, *targs), _REPEATS.value)
  for side in ("jax", "torch"):
    out[f"{side}_s"] = float(np.median(out[f"{side}_times"]))
    out[f"{side}_ips"] = b / out[f"{side}_s"]
  out["ratio"] = out["torch_s"] / out["jax_s"]
  out.update(cpu_threads.environment(torch.get_num_threads()))
  return out


def to_markdown(info: dict[str, Any], r: dict[str, Any]) -> str:
  secs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  b, n = dit_step._BATCH.value, _SAMPLE_STEPS.value  # pylint: disable=protected-access
  dev = jax.devices()[0]
  lines = dp.section_header(SECTION, "benchmarks.sample", info) + [
      f"JAX device: {dev.platform} ({dev.device_kind}); float32, torch {torch.__version__}, "
      f"diffusers {diffusers.__version__}, {r['torch_threads']} torch threads, process pinned "
      f"to {r['affinity']} CPU(s) (`XLA_FLAGS`={r['xla_flags']!r}).",
      "",
      f"{b} images of 112x112 from DiT-{dit_step._VARIANT.value} (hidden {r['hidden']}, "  # pylint: disable=protected-access
      f"depth {r['depth']}, {r['heads']} heads, {r['params'] / 1e6:.2f} M parameters), patch "
      f"{dit_step._PATCH.value} ({r['tokens']} tokens), output_overlap "
      f"{dit_step._OVERLAP.value}, {dit_step.in_channels()} input channels, "  # pylint: disable=protected-access
      f"{dit_step.cond_dim()}-d unit condition rows; {n}-step DDIM (eta 0, "
      f"`{_SPACING.value}` spacing, v-prediction, cosine T = {T}, x0 clipped) with "
      f"guidance {_GUIDANCE.value:g}: {n} DiT calls on a batch of {2 * b} "
      "(conditional + unconditional halves). Median of the timed runs after compile + 1 "
      "warm-up run.",
      "",
      "| | JAX (`generate.sampling.make_sampler`: one `jax.jit`, loop as `lax.scan`) | "
      "PyTorch + diffusers "
      "`DDIMScheduler` (Python loop, eager) |",
      "|---|---:|---:|",
      f"| compile s | {r['jax_compile_s']:.1f} | - |",
      f"| {n}-step sampling s, median of {_REPEATS.value} | **{r['jax_s']:.2f}** | "
      f"**{r['torch_s']:.2f}** |",
      f"| timed runs s | {secs(r['jax_times'])} | {secs(r['torch_times'])} |",
      f"| cores used (process CPU s / wall s) | {r['jax_cores']:.2f} | {r['torch_cores']:.2f} |",
      f"| images / s | **{r['jax_ips']:.2f}** | **{r['torch_ips']:.2f}** |",
      "",
      f"torch time / JAX time = **{r['ratio']:.2f}** (> 1: JAX faster).",
      "",
      "Notes:",
      "",
      "* Same weights (copied as in the training-step section), same x_T and landmark images: "
      f"the final uint8 images agree to max |JAX - torch| = {r['max_level_diff']} level(s) "
      f"({100 * r['frac_differing']:.3f}% of the values differ; asserted <= {AGREE_LEVELS}; "
      f"image std {r['image_std']:.2f} on the [-1, 1] scale), so both sides run the same "
      "sampler.",
      "* Both sides compute the landmark channels (the image and its blurred copies) once per "
      "call inside the timed run, and end with the uint8 conversion.",
      "* The weights are random (zero-init parameters randomised), not trained: sampling cost "
      "does not depend on them. Shared 2-core machine: see the load averages above.",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  info = dp.machine()
  r = run()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"jax compile {r['jax_compile_s']:.1f} s; sampling: jax {r['jax_s']:.2f} s "
        f"({r['jax_ips']:.2f} img/s), torch {r['torch_s']:.2f} s ({r['torch_ips']:.2f} img/s); "
        f"torch/jax = {r['ratio']:.2f}")
  section = to_markdown(info, r)
  print(section)
  if dit_step._WRITE.value and flags.FLAGS.output:  # pylint: disable=protected-access
    dp.write_output(flags.FLAGS.output, section, SECTION)
  if flags.FLAGS.json:  # the figures, for a caller (benchmarks/run.py)
    dp.write_json(flags.FLAGS.json, {"machine": info, "figures": r})


if __name__ == "__main__":
  app.run(main)
