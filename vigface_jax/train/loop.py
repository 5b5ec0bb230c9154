"""The training loop every trainer shares: resume, step, log, profile, evaluate, checkpoint.

Its `config.train` fields are declared by `config_lib.train_config` (what each does is
written there) and checked by `validate`.

A non-finite loss or gradient leaves the state unchanged, stops the run with
`TrainingDiverged` and keeps the last good checkpoint. The host reads the steps' `finite` flags
only where it must (a log step, before a checkpoint, on a stop request, at the end; big_vision
reads at log steps too), so it never waits on a step it has just dispatched; a non-finite step
therefore stops the run at the next of those points, naming the step
(`train.finite_check_every` reads more often). A stop request (`preemption`: SIGTERM,
SIGINT) ends the run after the current step with a committed checkpoint of it and
`preemption.Preempted`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
from flax import nnx
import jax
from jax.sharding import Mesh
import numpy as np

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax import preemption
from vigface_jax.evaluate import common as evaluators_lib
from vigface_jax.train import checkpoint as checkpoint_lib
from vigface_jax.train import optim
from vigface_jax.train import state as state_lib


class TrainingDiverged(RuntimeError):
  """The loss or the gradient became non-finite; the run stopped."""


@dataclasses.dataclass
class Result:
  state: state_lib.TrainState
  setup: state_lib.Setup
  start_step: int
  metrics: dict[str, Any]  # the last logged training metrics and evaluator results


def validate(train: config_lib.Fields) -> None:
  """ConfigError naming the field unless every `train.*` field is valid."""
  train.int("num_steps", 1)
  train.int("seed", 0)
  train.int("log_every", 1)
  train.int("checkpoint_every", 0)
  train.int("keep_checkpoints", 1)
  train.bool("async_checkpoint")
  train.float("ema_decay", 0.0, most=1.0)
  train.bool("ema_warmup")
  profile = train.numbers("profile_steps", int)
  if profile and (len(profile) != 2 or not 0 < profile[0] <= profile[1]):
    train.fail("profile_steps", "() or (start, stop) with 0 < start <= stop", profile)
  train.float("peak_tflops_per_device", 0.0)
  train.int("skip_nonfinite", 0)
  train.int("finite_check_every", 0)


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the window's steps; a skipped (non-finite) step counts only in `finite`."""
  fetched = jax.device_get(window)
  good = [m for m in fetched if float(m["finite"]) > 0]
  out = {k: float(np.mean([m[k] for m in good])) for k in fetched[0]} if good else {}
  out["finite"] = float(np.mean([m["finite"] for m in fetched]))
  return out


@dataclasses.dataclass
class Trainer:
  """What `make_trainer` builds: the optimizer and its schedule, the state, the step."""

  tx: Any
  schedule: Any
  state: state_lib.TrainState | None  # None when built with materialize=False
  setup: state_lib.Setup
  step: Callable[..., Any]  # jitted (state, batch) -> (state, metrics); state donated
  batch_sharding: Any


def make_trainer(config: Any, mesh: Mesh, create_model: Callable[[nnx.Rngs], nnx.Module],
                 loss_fn: state_lib.LossFn, *, trainable: Any = nnx.Param,
                 materialize: bool = True) -> Trainer:
  """The optimizer, sharded train state and jitted step `fit` trains with, from `config`'s
  `optim`, `train` and `sharding_rules` (also what dry runs compile and benchmarks time).

  `materialize=False`: shapes and shardings only (`state.create_state`), no state.
  """
  train = config.train
  rules = config.sharding_rules
  tx, schedule = optim.make_optimizer(config.optim, int(train.num_steps))
  ema_decay = float(train.ema_decay)
  state, setup = state_lib.create_state(create_model, tx, mesh, seed=int(train.seed),
                                        rules=rules, ema=ema_decay > 0, trainable=trainable,
                                        materialize=materialize)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(setup.graphdef, loss_fn, tx, setup.shardings,
                                   batch_sharding, ema_decay=ema_decay,
                                   ema_warmup=bool(train.ema_warmup), trainable=trainable,
                                   skip_nonfinite=int(train.get("skip_nonfinite", 0)) > 0)
  return Trainer(tx=tx, schedule=schedule, state=state, setup=setup, step=step,
                 batch_sharding=batch_sharding)


def fit(
    config: Any,
    workdir: str,
    *,
    mesh: Mesh,
    create_model: Callable[[nnx.Rngs], nnx.Module],
    loss_fn: state_lib.LossFn,
    data: Iterator[dict[str, jax.Array]],
    images_per_step: int,
    evaluators: Sequence[evaluators_lib.Evaluator] = (),
    make_evaluators: Callable[[state_lib.Setup], Sequence[evaluators_lib.Evaluator]]
    | None = None,
    writer: metrics_lib.MetricWriter | None = None,
    trainable: Any = nnx.Param,
    initialize: Callable[[state_lib.TrainState, state_lib.Setup], state_lib.TrainState]
    | None = None,
) -> Result:
  """Trains `config.train.num_steps` steps, resuming from `workdir/checkpoints` if present.

  Args:
    config: experiment config (`train`, `optim`, `sharding_rules` blocks).
    workdir: run directory (checkpoints, metrics, profile).
    mesh: device mesh.
    create_model: `create_model(rngs=nnx.Rngs)` builds the model in training mode.
    loss_fn: `(model, batch, rng) -> (loss, metrics)`.
    data: iterator of global batches sharded over the batch axes; if it has
      `get_state`/`set_state` (grain), its position is checkpointed and restored.
    images_per_step: global examples per step (for images/s).
    evaluators: `evaluate.common.Evaluator`s, run when due with `writer`.
    make_evaluators: builds more evaluators once the graphdef is known.
    writer: metric writer (default: one on `workdir`).
    trainable: NNX filter of the optimised variables (see `state.create_state`).
    initialize: `(state, setup) -> state` applied to a fresh state only (not on resume),
      e.g. to load pretrained or frozen weights; it must keep shapes and shardings.

  Returns:
    The final state and setup, the first step run in this process and the last metrics.
  """
  train = config.train
  num_steps = int(train.num_steps)
  trainer = make_trainer(config, mesh, create_model, loss_fn, trainable=trainable)
  state, setup, step_fn, schedule = trainer.state, trainer.setup, trainer.step, trainer.schedule
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=int(train.keep_checkpoints),
                                     async_save=bool(train.async_checkpoint))
  checkpoint_data = data if hasattr(data, "get_state") else None
  restored = ckpt.restore_latest(setup.abstract, checkpoint_data)
  if restored is not None:
    state = restored
  elif initialize is not None:
    state = initialize(state, setup)
  start = int(jax.device_get(state.step))
  evaluators = list(evaluators) + list(make_evaluators(setup) if make_evaluators else [])
  own_writer = writer is None
  writer = writer or metrics_lib.MetricWriter(workdir)
  log_every = max(1, int(train.log_every))
  ckpt_every = int(train.checkpoint_every)
  profile = tuple(train.profile_steps or ())
  train_last: dict[str, Any] = {}
  eval_last: dict[str, Any] = {}
  window: list[dict[str, jax.Array]] = []
  tick, tick_step, profiling = time.perf_counter(), start, False
  flops = None  # per step, from XLA's cost analysis of the step (0 when unavailable)
  peak = peak_flops_per_second(train.peak_tflops_per_device)
  multi = jax.process_count() > 1  # every process asks at every step: they stop together
  check_finite = _FiniteGuard(int(train.get("skip_nonfinite", 0)), ckpt)
  check_every = int(train.get("finite_check_every", 0))
  if start:
    logging.info("resuming at step %d of %d", start, num_steps)
  try:
    for step in range(start + 1, num_steps + 1):
      if profile and step == int(profile[0]) and not profiling:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      # One step in a profile (TensorBoard / XProf step-time views group work by it).
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(data)
        if flops is None:
          flops = _step_flops(step_fn, state, batch)
        state, m = step_fn(state, batch)
      window.append(m)
      if step == start + 1:  # the first step compiles: keep it out of step time and images/s
        jax.block_until_ready(m)
        tick, tick_step = time.perf_counter(), step
      check_finite.add(step, m)
      if check_every and step % check_every == 0:
        check_finite(late=True)  # the steps before this one: never wait on the newest
      if profiling and step >= int(profile[1]):
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      if step % log_every == 0 or step == num_steps:
        check_finite()
        last = _mean_metrics(window)
        last["lr"] = float(schedule(step - 1))
        if check_finite.limit:
          last["skipped_steps"] = float(check_finite.skipped)
        if step > tick_step:  # not on a window holding only the compiling first step
          seconds = (time.perf_counter() - tick) / (step - tick_step)
          last.update(step_time_s=seconds, images_per_s=images_per_step / seconds)
          if flops:
            last["tflops_per_s"] = flops / seconds / 1e12
            if peak:
              last["mfu"] = flops / seconds / peak
        train_last = {f"train/{k}": v for k, v in last.items()}
        writer.write_scalars(step, train_last)
        window, tick, tick_step = [], time.perf_counter(), step
      if ckpt_every and step % ckpt_every == 0 and step != num_steps:
        check_finite()  # never save a step that did not update
        ckpt.save(step, state, checkpoint_data)
      if step == num_steps:  # before the end-of-training evaluations: a failing one loses none
        check_finite()
        ckpt.save(num_steps, state, checkpoint_data, force=True)
      t0 = time.perf_counter()
      eval_last.update(evaluators_lib.run_due(evaluators, step, num_steps, state, writer))
      tick += time.perf_counter() - t0  # evaluation time is not training time
      if step != num_steps and preemption.requested(sync=multi):
        check_finite()  # a non-finite step is not saved: the last good one stays
        ckpt.wait()  # a periodic save of this step may still be in flight
        if ckpt.latest_step() != step:
          ckpt.save(step, state, checkpoint_data, force=True)
          ckpt.wait()  # committed before the process may go
        raise preemption.Preempted(
            f"stopped on {preemption.signal_name() or 'a signal to another process'} after "
            f"step {step} of {num_steps}; checkpoint {step} is committed in {ckpt.directory}: "
            "rerun the same command to resume from it")
    if start == num_steps > 0:
      # Already trained (e.g. an end-of-training evaluation failed after the last checkpoint):
      # evaluate the final checkpoint again rather than return without figures.
      logging.info("step %d is the last: running the end-of-training evaluations only", start)
      eval_last.update(evaluators_lib.run_due(evaluators, num_steps, num_steps, state, writer))
  finally:
    if profiling:
      jax.profiler.stop_trace()
    ckpt.close()
    if own_writer:
      writer.close()
  return Result(state=state, setup=setup, start_step=start, metrics={**train_last, **eval_last})


# Dense bf16 peak FLOP/s per chip (vendor figures) by `device_kind` prefix, for MFU.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0,
}


def peak_flops_per_second(per_device_tflops: float = 0.0) -> float:
  """Peak FLOP/s of all devices: the config's figure per device, else the table; 0 if unknown."""
  tflops = float(per_device_tflops or 0.0)
  if not tflops:
    kind = jax.devices()[0].device_kind
    tflops = next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                   if kind.startswith(k)), 0.0)
  return tflops * 1e12 * jax.device_count()


def flops_of(stage: Any) -> float:
  """FLOPs from XLA's cost analysis of a lowered or compiled step (0.0 if unavailable)."""
  try:
    cost = stage.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  # diagnostics only
    logging.info("no cost analysis for the step: %s", e)
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def _step_flops(step_fn, state, batch) -> float:
  """FLOPs of one step from XLA's cost analysis of the lowered step (0.0 if unavailable)."""
  try:
    lowered = step_fn.lower(state, batch)
  except Exception as e:  # pylint: disable=broad-except  # diagnostics only
    logging.info("no cost analysis for the step: %s", e)
    return 0.0
  return flops_of(lowered)


class _FiniteGuard:
  """Reads each step's `finite` once, the steps not yet read in one host transfer: skips up
  to `limit` non-finite steps in a row (the step already left the parameters alone), then
  stops with `TrainingDiverged`. `reads` counts the host transfers."""

  def __init__(self, limit: int, ckpt: checkpoint_lib.Checkpointer):
    self.limit, self.ckpt = int(limit), ckpt
    self.in_a_row, self.skipped, self.reads = 0, 0, 0
    self.unread: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, m: dict[str, jax.Array]) -> None:
    self.unread.append((step, m))

  def __call__(self, late: bool = False) -> None:
    """Reads every unread step (`late`: all but the newest) in step order."""
    todo = self.unread[:-1] if late else self.unread
    if not todo:
      return
    self.unread = self.unread[len(todo):]
    self.reads += 1
    for (step, m), finite in zip(todo, jax.device_get([m["finite"] for _, m in todo])):
      self._one(step, m, float(finite) > 0)

  def _one(self, step: int, m: dict[str, jax.Array], finite: bool) -> None:
    if finite:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    if self.in_a_row <= self.limit:
      self.skipped += 1
      logging.warning("non-finite loss or gradient at step %d (loss=%s): update skipped, %d in "
                      "a row of at most %d (train.skip_nonfinite)", step, float(m["loss"]),
                      self.in_a_row, self.limit)
      return
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    row = f" ({self.in_a_row} in a row; train.skip_nonfinite={self.limit})" if self.limit else ""
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {step}{row} (loss={float(m['loss'])}, "
        f"grad_norm={float(m['grad_norm'])}); training stopped. The last good checkpoint is "
        f"{'step ' + str(good) if good is not None else 'none'} in {self.ckpt.directory}; lower "
        "optim.lr, set optim.grad_clip_norm or lengthen optim.warmup_steps, then rerun with the "
        "same --workdir to resume from it.")
