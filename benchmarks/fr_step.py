r"""Stage-1 training step, JAX vs PyTorch: IResNet + ArcFace margin softmax + SGD, CPU float32.

    python -m benchmarks.fr_step --variant=r50 --batch=8 --num_classes=2000 --steps=3

One training step of `vigface_jax.models.iresnet.IResNet` + `margin.ClassCentres` +
`margin.margin_softmax_loss(margin_fn=arcface)` (s=64, m=0.5) + SGD (momentum 0.9, weight
decay 5e-4, lr 0.1), against arcface_torch's recipe in PyTorch: the IResNet of
`tests/test_iresnet.py` (a copy of insightface `backbones/iresnet.py`), `F.linear` of the
normalised embeddings and centres clamped to [-1, 1] (PartialFC at sample rate 1),
`CombinedMarginLoss`'s ArcFace path, `F.cross_entropy` and `torch.optim.SGD`.

Both sides start from the same weights (the torch backbone is converted into ours with
`load_insightface_state_dict`, the centres copied), see the same uint8 batch (normalised inside
the step by the same `(x / 255 - 0.5) / 0.5`), train BatchNorm in train mode, and keep the final
BatchNorm1d scale frozen, as arcface_torch does. The JAX step is `jax.jit` over the split NNX
state with the state donated; compile time (first call) is reported separately and excluded
from the step time, which is the median of `--steps` steps after one more warm-up step, each
ended by `jax.block_until_ready` (torch is synchronous on CPU).

Threads: `torch.set_num_threads(--threads)`; XLA:CPU has no `XLA_FLAGS` option for its
intra-op pool size in this jaxlib (unknown flags abort), so both processes' threads are bounded
by pinning this process to `--threads` CPUs (`os.sched_setaffinity`) before jax starts; XLA
sizes its pool from the CPUs it may use.

Known difference, reproduced on purpose: arcface_torch applies the ArcFace margin under
`torch.no_grad()`, so its target-logit gradient is the straight-through `s * dL/dlogit`; ours
differentiates `s * cos(theta + m)`. Forward losses agree (checked on the first step); updates,
and so later losses, differ slightly.
"""

from __future__ import annotations

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
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from benchmarks import data_pipeline as dp  # machine(), section_header(), write_section()
from tests import test_iresnet as torch_ref  # the PyTorch arcface_torch IResNet copy
from vigface_jax.models import iresnet
from vigface_jax.models import margin
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
# data_pipeline's flags: --output (BENCHMARKS.md) and --seed (weights, images, labels).
flags.FLAGS.set_default("output", "BENCHMARKS.md")
_SEED = dp._SEED  # pylint: disable=protected-access

SECTION = "## Stage-1 training step (IResNet + ArcFace)"
EMBED_DIM = 512


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


def torch_setup(centres: np.ndarray):
  """Random torch backbone (torch default init), centres `[C, d]`, loss, optimizer."""
  v = iresnet.VARIANTS[_VARIANT.value]
  model = torch_ref.TorchIResNet(v.layers, v.widths, v.se, num_features=EMBED_DIM).train()
  weight = torch.nn.Parameter(torch.from_numpy(centres.T.copy()))
  params = [p for p in model.parameters() if p.requires_grad] + [weight]
  opt = torch.optim.SGD(params, lr=_LR.value, momentum=_MOMENTUM.value,
                        weight_decay=_WD.value)
  loss_fn = TorchCombinedMarginLoss(_SCALE.value, _MARGIN.value)

  def step(images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    x = (images_u8.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    emb = model(x)
    logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    loss = F.cross_entropy(loss_fn(logits, labels), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return model, step


# ---------------------------------------------------------------------- JAX


class Stage1(nnx.Module):
  """Backbone + class centres (the trainable part of a stage-1 step)."""

  def __init__(self, rngs: nnx.Rngs):
    self.backbone = iresnet.IResNet(_VARIANT.value, embed_dim=EMBED_DIM, rngs=rngs)
    self.centres = margin.ClassCentres(EMBED_DIM, _NUM_CLASSES.value, rngs=rngs)


def _trainable(path, value) -> bool:
  # arcface_torch freezes the final BatchNorm1d scale (requires_grad=False).
  return isinstance(value, nnx.Param) and tuple(path[-2:]) != ("features", "scale")


def jax_setup(state_dict: dict[str, Any], centres: np.ndarray):
  """Our model with the torch weights, an optimizer, and a jitted step over donated state."""
  model = Stage1(nnx.Rngs(_SEED.value))
  iresnet.load_insightface_state_dict(model.backbone, state_dict)
  model.centres.weight[...] = jnp.asarray(centres)
  model.train()
  tx = optax.chain(optax.add_decayed_weights(_WD.value),
                   optax.sgd(_LR.value, momentum=_MOMENTUM.value))
  optimizer = nnx.Optimizer(model, tx, wrt=_trainable)
  arcface = lambda cos, labels: margin.arcface(cos, labels, s=_SCALE.value, m=_MARGIN.value)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, images, labels):
    emb = model.backbone(images)
    loss, _ = margin.margin_softmax_loss(emb, model.centres.weight[...], labels, arcface)
    return loss

  def step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    diff = nnx.DiffState(0, _trainable)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, images, labels)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return state, jax.jit(step, donate_argnums=0)


# -------------------------------------------------------------------- timing


def run() -> dict[str, Any]:
  torch.manual_seed(_SEED.value)
  torch.set_num_threads(_THREADS.value)
  rng = np.random.default_rng(_SEED.value)
  centres = rng.normal(0.0, 0.01, (EMBED_DIM, _NUM_CLASSES.value)).astype(np.float32)
  images = rng.integers(0, 256, (_BATCH.value, 112, 112, 3), dtype=np.uint8)
  labels = rng.integers(0, _NUM_CLASSES.value, (_BATCH.value,), dtype=np.int64)

  tmodel, tstep = torch_setup(centres)
  # Converted before torch trains: both start from identical weights and BN statistics.
  state_dict = {k: v.detach().clone() for k, v in tmodel.state_dict().items()}
  state, jstep = jax_setup(state_dict, centres)

  jimages, jlabels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  timages, tlabels = torch.from_numpy(images), torch.from_numpy(labels)

  out: dict[str, Any] = {}
  t0 = time.perf_counter()
  compiled = jstep.lower(state, jimages, jlabels).compile()
  out["jax_compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, loss = jax.block_until_ready(compiled(state, jimages, jlabels))
  out["jax_first_step_s"] = time.perf_counter() - t0
  out["jax_loss_1"] = float(loss)
  t0 = time.perf_counter()
  out["torch_loss_1"] = float(tstep(timages, tlabels))
  out["torch_first_step_s"] = time.perf_counter() - t0

  # Second step (warm-up for both; its loss shows how far one update apart the runs are).
  state, loss = jax.block_until_ready(compiled(state, jimages, jlabels))
  out["jax_loss_2"] = float(loss)
  out["torch_loss_2"] = float(tstep(timages, tlabels))

  def jax_once():
    nonlocal state
    state, loss = compiled(state, jimages, jlabels)
    jax.block_until_ready((state, loss))

  out["jax_times"], out["jax_cores"] = cpu_threads.time_calls(jax_once, _STEPS.value)
  out["torch_times"], out["torch_cores"] = cpu_threads.time_calls(lambda: tstep(timages, tlabels), _STEPS.value)
  out["jax_s"] = float(np.median(out["jax_times"]))
  out["torch_s"] = float(np.median(out["torch_times"]))
  out["ratio"] = out["torch_s"] / out["jax_s"]
  out.update(cpu_threads.environment(torch.get_num_threads()))
  return out


def to_markdown(info: dict[str, Any], r: dict[str, Any]) -> str:
  ms = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  lines = dp.section_header(SECTION, "benchmarks.fr_step", info) + [
      f"**CPU only** (no accelerator), float32, torch {torch.__version__}, "
      f"{r['torch_threads']} torch threads, process pinned to {r['affinity']} CPU(s) "
      f"(XLA:CPU's pool; `XLA_FLAGS`={r['xla_flags']!r}).",
      "",
      f"One step = IResNet-{_VARIANT.value} forward + backward on {_BATCH.value} uint8 112x112 "
      f"images (normalised inside the step), {_NUM_CLASSES.value} class centres x "
      f"{EMBED_DIM}, ArcFace s={_SCALE.value:g} m={_MARGIN.value:g}, cross-entropy, SGD "
      f"lr={_LR.value:g} momentum={_MOMENTUM.value:g} wd={_WD.value:g}; BatchNorm in train "
      "mode. Median of the timed steps after compile + 2 warm-up steps.",
      "",
      "| | JAX (ours, `jax.jit`, donated state) | PyTorch (arcface_torch recipe) |",
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
      "`load_insightface_state_dict`, same centres) and must agree to float32 rounding. "
      "Step-2 losses may differ slightly: arcface_torch applies the ArcFace margin under "
      "`torch.no_grad()` (straight-through gradient at the target logit), ours "
      "differentiates `s * cos(theta + m)`.",
      "* The final BatchNorm1d scale is frozen on both sides (arcface_torch's "
      "`requires_grad=False`); weight decay applies to every other parameter, centres "
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


if __name__ == "__main__":
  app.run(main)
