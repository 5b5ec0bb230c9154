"""Shared by the training-step benchmarks: the trainer's own jitted step, loaded and timed.

`build` makes exactly what `vigface_jax.train.loop.fit` makes for a config, through the same
`loop.make_trainer`: the optimizer (`optim.make_optimizer(config.optim, train.num_steps)`), the
sharded train state (`state.create_state`, EMA when `train.ema_decay > 0`) and the jitted,
state-donating step (`state.make_train_step` with the task's real loss function and batch
sharding). It then writes
the benchmark's shared weights (the ones the PyTorch side gets) into the fresh state, as a
task's `fit(initialize=...)` does, so both frameworks start from the same numbers.

`time_steps` times that step as the benchmarks report it: `lower().compile()` separately,
the first and second (warm-up) steps with their metrics, then `n` timed steps, each ended by
`jax.block_until_ready`.

`DTYPES`, `torch_device`, `torch_autocast`, `torch_synced` and `sides` are the benchmarks'
precision and PyTorch-device plumbing (`--dtype`, `--torch_device`): 'bfloat16' is the
trainer's accelerator policy (`model.dtype='auto'` there): bfloat16 activations and matmuls,
float32 parameters and optimizer state; the torch side runs the same under `torch.autocast`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from benchmarks import cpu_threads
from vigface_jax.train import loop
from vigface_jax.train import state as state_lib

DTYPES = ("float32", "bfloat16")  # --dtype: the JAX config's model.dtype; torch autocast


def torch_device(name: str) -> str:
  """`--torch_device`: 'auto' is 'cuda' when torch sees a GPU, else 'cpu'."""
  import torch  # pylint: disable=g-import-not-at-top  # only the torch benchmarks need it
  if name == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  if name == "cuda" and not torch.cuda.is_available():
    raise ValueError("--torch_device=cuda, but torch.cuda.is_available() is False "
                     f"(torch {torch.__version__})")
  return name


def torch_autocast(device: str, dtype: str):
  """`torch.autocast(device, bfloat16)` for 'bfloat16' (float32 parameters), else a no-op."""
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=torch.bfloat16)


def torch_synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
  """`fn` ended by `torch.cuda.synchronize()` on cuda (CPU torch is synchronous)."""
  if device != "cuda":
    return fn
  import torch  # pylint: disable=g-import-not-at-top

  def call():
    out = fn()
    torch.cuda.synchronize()
    return out

  return call


def sides(device: str, dtype: str) -> dict[str, str]:
  """What each side ran on, for the figures' JSON and the sections' text."""
  import torch  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  torch_name = torch.cuda.get_device_name() if device == "cuda" else "host CPU"
  return {"dtype": dtype, "jax_device": f"{dev.platform} ({dev.device_kind})",
          "torch_device": f"{device} ({torch_name})"}


def describe(r: dict[str, Any]) -> str:
  """The section's first line about devices and precision, from `sides`' entries of `r`."""
  precision = ("float32" if r["dtype"] == "float32" else "bfloat16 compute (activations and "
               "matmuls; float32 parameters and optimizer state; torch: `torch.autocast`)")
  return f"JAX on {r['jax_device']}, PyTorch on {r['torch_device']}; {precision}"


@dataclasses.dataclass
class TrainerStep:
  """The trainer's step for one config, and the state it starts from."""

  state: state_lib.TrainState
  setup: state_lib.Setup
  step: Callable[..., Any]  # jitted (state, batch) -> (state, metrics); state donated
  mesh: Mesh
  batch_sharding: Any

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch as the data pipeline delivers it: global arrays split over the batch axes."""
    return jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, self.batch_sharding)


def build(config: Any, mesh: Mesh, create_model: Callable[..., nnx.Module],
          loss_fn: state_lib.LossFn, *, trainable: Any = nnx.Param,
          fill: Callable[[nnx.Module], None] | None = None) -> TrainerStep:
  """`loop.fit`'s optimizer, state and step for `config`; `fill(model)` then writes weights.

  Args:
    config: the task's config (`optim`, `train`, `sharding_rules`).
    mesh: device mesh (`parallel.mesh_from_config(config)`).
    create_model: the task's `create_model(...)` partial (`create(rngs=...)`).
    loss_fn: the task's loss, `(model, batch, rng) -> (loss, metrics)`.
    trainable: the task's optimised-variable filter.
    fill: writes the benchmark's weights into the merged model in place (e.g.
      `load_insightface_state_dict`); the state is re-split from it, the optimizer state and
      the EMA re-initialised from the new parameters, and everything put back in the state's
      shardings.
  """
  trainer = loop.make_trainer(config, mesh, create_model, loss_fn, trainable=trainable)
  tx, state, setup = trainer.tx, trainer.state, trainer.setup
  if fill is not None:
    model = nnx.merge(setup.graphdef, state.params, state.rest, copy=True)
    fill(model)
    _, params, rest = nnx.split(model, trainable, ...)
    state = state.replace(params=params, rest=rest, opt_state=tx.init(params),
                          ema=jax.tree.map(jnp.copy, params) if state.ema is not None else None)
    state = jax.device_put(state, setup.shardings)
  return TrainerStep(state=state, setup=setup, step=trainer.step, mesh=mesh,
                     batch_sharding=trainer.batch_sharding)


def model_of(trainer: TrainerStep) -> nnx.Module:
  """The NNX model holding the trainer's current state (a copy: the state may be donated)."""
  return nnx.merge(trainer.setup.graphdef, trainer.state.params, trainer.state.rest, copy=True)


def _floats(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def time_steps(trainer: TrainerStep, batch: dict[str, jax.Array], n: int) -> dict[str, Any]:
  """Compile, step 1, step 2 (warm-up), then `n` timed steps of the trainer's step.

  Returns `compile_s`, `first_step_s`, `metrics_1` and `metrics_2` (every metric of steps 1
  and 2 as floats: `loss`, `grad_norm`, `finite` and the task's), `times` (seconds of each
  timed step), `cores` (process CPU seconds per wall second over them) and `flops` (one step's,
  from XLA's cost analysis of the compiled step: 0.0 where unavailable). The trainer's
  state is advanced (and its old buffers donated) as it goes.
  """
  out: dict[str, Any] = {}
  t0 = time.perf_counter()
  compiled = trainer.step.lower(trainer.state, batch).compile()
  out["compile_s"] = time.perf_counter() - t0
  out["flops"] = loop.flops_of(compiled)
  t0 = time.perf_counter()
  trainer.state, metrics = jax.block_until_ready(compiled(trainer.state, batch))
  out["first_step_s"] = time.perf_counter() - t0
  out["metrics_1"] = _floats(metrics)
  trainer.state, metrics = jax.block_until_ready(compiled(trainer.state, batch))
  out["metrics_2"] = _floats(metrics)
  for k in (1, 2):
    if out[f"metrics_{k}"]["finite"] <= 0:
      raise AssertionError(f"the trainer's step {k} was not finite: {out[f'metrics_{k}']}")

  def once():
    trainer.state, metrics = compiled(trainer.state, batch)
    jax.block_until_ready((trainer.state, metrics))

  out["times"], out["cores"] = cpu_threads.time_calls(once, n)
  return out
