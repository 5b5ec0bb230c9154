r"""Stage-1 training step, JAX vs PyTorch: IResNet + ArcFace margin softmax + SGD.

    python -m benchmarks.fr_step --variant=r50 --batch=8 --num_classes=2000 --steps=3
    python -m benchmarks.fr_step --variant=r50 --batch=64 --dtype=bfloat16  # on a GPU

Precision (`--dtype`): float32 (default), or bfloat16 as the trainer runs on an accelerator
(`model.dtype='auto'`): bfloat16 activations and matmuls, float32 parameters and SGD state;
the torch side then runs forward + loss under `torch.autocast(device, torch.bfloat16)`.
PyTorch device (`--torch_device`): 'auto' (default) is cuda when torch sees a GPU, else cpu;
the torch model and batch live there, and each timed torch step ends with
`torch.cuda.synchronize()` on cuda. The JAX side runs on JAX's default device.

What is timed on the JAX side is the step stage-1 training runs: `train/fr.py` through
`train/loop.py` `fit`. `configs/fr.py` (default variant) with the measured fields set from the
flags (arch, `--embed_dim` (512) at `--input_size` (112), `--num_classes` real rows, ArcFace
s/m, SGD lr / momentum / weight decay, constant schedule, no clipping, no EMA, `--dtype`), then
exactly what `fit` builds from it (`benchmarks/train_step.py`): `optim.make_optimizer`,
`state.create_state(fr.create_model(config, n, 0), ...)` and
`state.make_train_step(graphdef, fr.fr_loss, ...)`: one `jax.jit` over the whole train state,
donated, with explicit shardings, which besides forward + backward + SGD computes the gradient
and update norms and keeps the old state if the step is not finite. `fr_loss` embeds the uint8
batch with `FaceRecognizer.embed` (normalised inside the step by `(x / 255 - 0.5) / 0.5`) and
takes `margin.margin_softmax_loss` with ArcFace over the class centres.

Fairness: `config.virtual.num_virtual = 0`. The real stage 1 adds `k` virtual rows to the
centre matrix and `round(k * b / n)` virtual embeddings to each step; arcface_torch has no
such thing, so both sides run a plain margin softmax over `--num_classes` centres. The
reference is arcface_torch's recipe in PyTorch: the IResNet of `tests/test_iresnet.py` (a
copy of insigh\tface `backbones/iresnet.py`), `F.linear` of the normalised embeddings and
centres clamped to [-1, 1] (PartialFC at sample rate 1), `CombinedMarginLoss`'s ArcFace path,
`F.cross_entropy` and `torch.optim.SGD`. arcface_torch freezes the final BatchNorm1d scale;
the trainer trains it (an ordinary parameter, `models/iresnet.py`), so the torch side here
trains it too (512 numbers: no measurable cost, but the same update on both sides).

Both sides start from the same weights (the torch backbone is converted into the fresh train
state with `load_insightface_state_dict`, the centres copied into the head), see the same
uint8 batch, and train BatchNorm in train mode. The step-1 losses must agree (relative
difference asserted < 1e-4 in float32, < 2e-2 in bfloat16). Compile time
(`lower().compile()`) is reported separately and excluded from the step time, which is the
median of `--steps` steps after two warm-up steps, each ended by `jax.block_until_ready`
(torch: synchronous on CPU, synchronised on cuda).

Threads: `torch.set_num_threads(--threads)`; XLA:CPU has no `XLA_FLAGS` option for its
intra-op pool size in this jaxlib (unknown flags abort), so both processes' threads are bounded
by pinning this process to `--threads` CPUs (`os.sched_setaffinity`) before jax starts; XLA
sizes its pool from the CPUs it may use.

Known difference, reproduced on purpose: arcface_torch applies the ArcFace margin under
`torch.no_grad()`, so its target-logit gradient is the straight-through `s * dL/dlogit`; ours
differentiates `s * cos(theta + m)`. Forward losses agree (checked on the first step); updates,
and so later losses, differ slightly.

`--output` (default BENCHMARKS.md) receives the section; pass `--output=` to only print it.
`--json=PATH` also writes the figures (and the device's peak memory where the backend reports
it) as JSON: what `benchmarks/run.py` reads.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import time
from typing import Any


_REPO = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/fr_step.py`: make the repo importable.
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import cpu_threads  # pins --threads CPUs; before jax
from absl import app
from absl import flags
from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import data_pipeline as dp  # machine(), section_header(), write_section()
from benchmarks import train_step  # the trainer's step, built and timed as loop.fit runs it
from configs import fr as fr_config
from tests import test_iresnet as torch_ref  # the PyTorch arcface_torch IResNet copy
import vigface_jax
from vigface_jax import parallel
from vigface_jax.models import iresnet
from vigface_jax.models import layers
from vigface_jax.train import fr as fr_train
# pylint: enable=g-import-not-at-top,wrong-import-position

_VARIANT = flags.DEFINE_string("variant", "r50", "IResNet variant (iresnet.VARIANTS).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 2000, "Class centres.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per framework (median reported).")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for both frameworks.")
_SCALE = flags.DEFINE_float("s", 64.0, "ArcFace scale.")
_MARGIN = flags.DEFINE_float("m", 0.5, "ArcFace additive angular margin.")
_LR = flags.DEFINE_float("lr", 0.1, "SGD learning rate.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WD = flags.DEFINE_float("weight_decay", 5e-4, "SGD weight decay (coupled, as torch.optim.SGD).")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 512, "Embedding width (configs/fr.py:demo: 128).")
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 112, "Image side fed to both networks, a multiple of 16 (configs/fr.py:demo's "
    "net takes 48: its 112 crops are resized inside its step, which is not timed here).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(train_step.DTYPES),
                           "Compute dtype of both sides (parameters stay float32).")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "auto", ["auto", "cpu", "cuda"],
                                  "PyTorch's device ('auto': cuda if available, else cpu).")
_BATCH_NORM = flags.DEFINE_enum(
    "batch_norm", "fused", ["fused", "flax"], "The JAX side's training-mode BatchNorm: 'fused' "
    "(models/layers.py BatchNorm, the trainer's) or 'flax' (nnx.BatchNorm, autodiff through "
    "every elementwise step: the trainer before 2026-12-02), for before/after figures.")
# data_pipeline's flags: --output (BENCHMARKS.md) and --seed (weights, images, labels).
flags.FLAGS.set_default("output", "BENCHMARKS.md")
_SEED = dp._SEED  # pylint: disable=protected-access

SECTION = "## Stage-1 training step (IResNet + ArcFace)"
LOSS_REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # step-1 losses, by --dtype


# ------------------------------------------------------------------ PyTorch


class TorchCombinedMarginLoss(torch.nn.Module):
  """arcface_torch `losses.CombinedMarginLoss`, ArcFace path (m1=1, m3=0), no filtering."""

  def __init__(self, s: float, m2: float):
    super().__init__()
    self.s, self.m2 = s, m2

  def forward(self, logits, labels):
    index_positive = torch.where(labels != -1)[0]
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    with torch.no_grad():
      target_logit.arccos_()
      logits.arccos_()
      final_target_logit = target_logit + self.m2
      logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
      logits.cos_()
    return logits * self.s


def torch_setup(centres: np.ndarray, device: str):
  """Random torch backbone (torch default init) on `device`, centres `[C, d]`, loss, SGD."""
  v = iresnet.VARIANTS[_VARIANT.value]
  side = _INPUT_SIZE.value // 16  # arcface_torch's fc_scale: 7 x 7 features at 112
  cls = type("TorchIResNetAt", (torch_ref.TorchIResNet,), {"fc_scale": side * side})
  model = cls(v.layers, v.widths, v.se, num_features=_EMBED_DIM.value).train()
  model.features.weight.requires_grad = True  # the trainer trains it (see the docstring)
  model.to(device)
  weight = torch.nn.Parameter(torch.from_numpy(centres.T.copy()).to(device))
  params = [p for p in model.parameters() if p.requires_grad] + [weight]
  opt = torch.optim.SGD(params, lr=_LR.value, momentum=_MOMENTUM.value,
                        weight_decay=_WD.value)
  loss_fn = TorchCombinedMarginLoss(_SCALE.value, _MARGIN.value)

  def step(images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    x = (images_u8.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with train_step.torch_autocast(device, _DTYPE.value):  # float32: a no-op
      emb = model(x)
      logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
      loss = F.cross_entropy(loss_fn(logits, labels), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return model, step


# ---------------------------------------------------------------------- JAX


def jax_config() -> ml_collections.ConfigDict:
  """`configs/fr.py` with the fields this benchmark measures set from its flags."""
  config = fr_config.get_config("default")
  # The benchmark feeds its own batch to the step; no data source is read ('procedural' only
  # so that the task's validation, which insists on a data path for RecordIO, passes).
  config.data.source = "procedural"
  config.data.global_batch_size = _BATCH.value
  config.model.arch = _VARIANT.value
  config.model.embed_dim = _EMBED_DIM.value
  config.model.input_size = _INPUT_SIZE.value
  config.model.dropout = 0.0
  config.model.dtype = _DTYPE.value  # bfloat16: bf16 compute, float32 parameters
  config.model.num_real = _NUM_CLASSES.value
  config.margin.name = "arcface"
  config.margin.s = _SCALE.value
  config.margin.m = _MARGIN.value
  # No virtual rows: the PyTorch reference (arcface_torch) has none, so both do the same work.
  config.virtual.num_virtual = 0
  config.optim.name = "sgd"
  config.optim.lr = _LR.value
  config.optim.momentum = _MOMENTUM.value
  config.optim.nesterov = False
  config.optim.weight_decay = _WD.value
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0
  config.train.num_steps = _STEPS.value + 2
  config.train.seed = _SEED.value
  config.train.ema_decay = 0.0
  fr_train.validate(config)
  return config


def jax_setup(state_dict: dict[str, Any], centres: np.ndarray) -> train_step.TrainerStep:
  """The stage-1 trainer's step (`make_train_step` over `fr_loss`), state = the torch weights."""
  config = jax_config()
  mesh = parallel.mesh_from_config(config)
  rules = config.sharding_rules
  loss_fn = functools.partial(
      fr_train.fr_loss, cfg=config,
      logits_sharding=parallel.logical_sharding(mesh, ("batch", "classes"), rules))

  def fill(model) -> None:
    iresnet.load_insightface_state_dict(model.backbone, state_dict)
    model.head.weight[...] = jnp.asarray(centres)

  fused = layers.BatchNorm
  if _BATCH_NORM.value == "flax":  # the layer every IResNet BatchNorm is built from
    layers.BatchNorm = nnx.BatchNorm
  try:
    return train_step.build(config, mesh, fr_train.create_model(config, _NUM_CLASSES.value, 0),
                            loss_fn, fill=fill)
  finally:
    layers.BatchNorm = fused


# -------------------------------------------------------------------- timing


def build() -> tuple[Any, train_step.TrainerStep, dict[str, Any], Any, Any, str]:
  """Both sides from identical weights and one batch: (torch step, trainer, device batch,
  torch images, torch labels, torch device)."""
  torch.manual_seed(_SEED.value)
  torch.set_num_threads(_THREADS.value)
  rng = np.random.default_rng(_SEED.value)
  centres = rng.normal(0.0, 0.01, (_EMBED_DIM.value, _NUM_CLASSES.value)).astype(np.float32)
  size = _INPUT_SIZE.value
  images = rng.integers(0, 256, (_BATCH.value, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, _NUM_CLASSES.value, (_BATCH.value,), dtype=np.int64)

  device = train_step.torch_device(_TORCH_DEVICE.value)
  tmodel, tstep = torch_setup(centres, device)
  # Converted before torch trains: both start from identical weights and BN statistics.
  state_dict = {k: v.detach().cpu().clone() for k, v in tmodel.state_dict().items()}
  trainer = jax_setup(state_dict, centres)
  batch = trainer.put_batch({"image": images, "label": labels.astype(np.int32)})
  timages = torch.from_numpy(images).to(device)
  tlabels = torch.from_numpy(labels).to(device)
  return tstep, trainer, batch, timages, tlabels, device


def run() -> dict[str, Any]:
  tstep, trainer, batch, timages, tlabels, device = build()
  tol = LOSS_REL_TOL[_DTYPE.value]

  out: dict[str, Any] = train_step.sides(device, _DTYPE.value)
  out["loss_1_tol"] = tol
  j = train_step.time_steps(trainer, batch, _STEPS.value)
  out.update({f"jax_{k}": v for k, v in j.items() if not k.startswith("metrics")})
  out["jax_loss_1"], out["jax_loss_2"] = j["metrics_1"]["loss"], j["metrics_2"]["loss"]
  t0 = time.perf_counter()
  out["torch_loss_1"] = float(tstep(timages, tlabels))  # float(): waits for the device
  out["torch_first_step_s"] = time.perf_counter() - t0
  # Second step (warm-up; its loss shows how far one update apart the runs are).
  out["torch_loss_2"] = float(tstep(timages, tlabels))
  out["loss_1_rel"] = abs(out["jax_loss_1"] - out["torch_loss_1"]) / abs(out["torch_loss_1"])
  assert out["loss_1_rel"] < tol, (
      f"step-1 losses disagree ({_DTYPE.value}, relative tolerance {tol:g}): "
      f"jax {out['jax_loss_1']} torch {out['torch_loss_1']}")
  out["torch_times"], out["torch_cores"] = cpu_threads.time_calls(
      train_step.torch_synced(lambda: tstep(timages, tlabels), device), _STEPS.value)
  out["jax_s"] = float(np.median(out["jax_times"]))
  out["torch_s"] = float(np.median(out["torch_times"]))
  out["ratio"] = out["torch_s"] / out["jax_s"]
  out.update(cpu_threads.environment(torch.get_num_threads()))
  out["batch_norm"] = _BATCH_NORM.value
  return out


def to_markdown(info: dict[str, Any], r: dict[str, Any]) -> str:
  ms = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  lines = dp.section_header(SECTION, "benchmarks.fr_step", info) + [
      f"{train_step.describe(r)}; torch {torch.__version__}, "
      f"{r['torch_threads']} torch threads, process pinned to {r['affinity']} CPU(s) "
      f"(XLA:CPU's pool; `XLA_FLAGS`={r['xla_flags']!r}); JAX BatchNorm: "
      f"{'the fused training-mode layer (`layers.BatchNorm`)' if r['batch_norm'] == 'fused' else '`nnx.BatchNorm` (before 2026-12-02)'}.",
      "",
      f"One step = IResNet-{_VARIANT.value} forward + backward on {_BATCH.value} uint8 "
      f"{_INPUT_SIZE.value}x{_INPUT_SIZE.value} "
      f"images (normalised inside the step), {_NUM_CLASSES.value} class centres x "
      f"{_EMBED_DIM.value}, ArcFace s={_SCALE.value:g} m={_MARGIN.value:g}, cross-entropy, SGD "
      f"lr={_LR.value:g} momentum={_MOMENTUM.value:g} wd={_WD.value:g}; BatchNorm in train "
      "mode. Median of the timed steps after compile + 2 warm-up steps.",
      "",
      "JAX column: the stage-1 trainer's own step, as `train/loop.py` `fit` builds it for "
      "`configs/fr.py` with the fields above (`state.make_train_step` over `fr.fr_loss`, the "
      "train state from `state.create_state`, donated, explicit shardings; it also computes "
      "the gradient and update norms and the non-finite guard). No virtual rows "
      "(`virtual.num_virtual = 0`): arcface_torch has none.",
      "",
      "| | JAX (the trainer's step: `make_train_step` + `fr_loss`) | PyTorch (arcface_torch "
      "recipe) |",
      "|---|---:|---:|",
      f"| compile (lower + compile) s | {r['jax_compile_s']:.1f} | - |",
      f"| first step s (JAX: after compile) | {r['jax_first_step_s']:.2f} | "
      f"{r['torch_first_step_s']:.2f} |",
      f"| step s, median of {_STEPS.value} | **{r['jax_s']:.2f}** | **{r['torch_s']:.2f}** |",
      f"| timed steps s | {ms(r['jax_times'])} | {ms(r['torch_times'])} |",
      f"| cores used (process CPU s / wall s, timed steps) | {r['jax_cores']:.2f} | "
      f"{r['torch_cores']:.2f} |",
      f"| images / s | {_BATCH.value / r['jax_s']:.2f} | {_BATCH.value / r['torch_s']:.2f} |",
      f"| loss, step 1 (same weights, same batch) | {r['jax_loss_1']:.5f} | "
      f"{r['torch_loss_1']:.5f} |",
      f"| loss, step 2 | {r['jax_loss_2']:.5f} | {r['torch_loss_2']:.5f} |",
      "",
      f"torch time / JAX time = **{r['ratio']:.2f}** (> 1: JAX faster).",
      "",
      "Notes:",
      "",
      "* Shared 2-core machine: other jobs (e.g. a test run) may have used the same cores; "
      "see the load averages above. All JAX steps run before all torch steps, so a load "
      "change during the run hits one side only; treat the ratio as approximate.",
      "* Step-1 losses are computed from identical weights (torch IResNet converted with "
      "`load_insightface_state_dict` into the fresh train state, same centres) and must agree "
      f"to {r['dtype']} rounding (relative {r['loss_1_rel']:.1e}, asserted < "
      f"{r['loss_1_tol']:g}). "
      "Step-2 losses may differ slightly: arcface_torch applies the ArcFace margin under "
      "`torch.no_grad()` (straight-through gradient at the target logit), ours "
      "differentiates `s * cos(theta + m)`.",
      "* The final BatchNorm1d scale is trained on both sides: the trainer treats it as an "
      "ordinary parameter, so the torch side lifts arcface_torch's `requires_grad=False` "
      f"({_EMBED_DIM.value} numbers). Weight decay applies to every parameter, centres "
      "included, as in arcface_torch.",
      "* Threads: torch via `torch.set_num_threads`; XLA:CPU has no `XLA_FLAGS` option for "
      "its intra-op pool in this jaxlib (`--intra_op_parallelism_threads` aborts with "
      "\"Unknown flag in XLA_FLAGS\"), and sizes it from the CPUs the process may use, so "
      "the process is pinned to `--threads` CPUs (a no-op when that is every usable CPU). "
      "\"cores used\" shows what each side actually kept busy.",
      "* JAX compile time is `lower().compile()`; the JAX first step after it is still "
      "slower than later ones (not investigated; it is excluded from the median like the "
      "second, warm-up step).",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _THREADS.value != cpu_threads.THREADS_EARLY:
    raise app.UsageError("--threads must be given as --threads=N.")
  # The trainers' XLA:CPU flags, as `python -m vigface_jax.main` adds them for training tasks
  # (before dp.machine() starts the backend; VIGFACE_CPU_XLA_FLAGS=0: none).
  vigface_jax.add_cpu_xla_flags()
  info = dp.machine()
  r = run()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"first-step loss: jax {r['jax_loss_1']:.6f}  torch {r['torch_loss_1']:.6f}  "
        f"(|diff| {abs(r['jax_loss_1'] - r['torch_loss_1']):.2e})")
  print(f"second-step loss: jax {r['jax_loss_2']:.6f}  torch {r['torch_loss_2']:.6f}")
  print(f"jax compile {r['jax_compile_s']:.1f} s; step median: jax {r['jax_s']:.3f} s, "
        f"torch {r['torch_s']:.3f} s; torch/jax = {r['ratio']:.2f}")
  section = to_markdown(info, r)
  print(section)
  if flags.FLAGS.output:
    dp.write_output(flags.FLAGS.output, section, SECTION)
  if flags.FLAGS.json:  # the figures, for a caller (benchmarks/run.py)
    dp.write_json(flags.FLAGS.json, {"machine": info, "figures": r, "batch": _BATCH.value})


if __name__ == "__main__":
  app.run(main)
