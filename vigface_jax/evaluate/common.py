"""Evaluators: one interface for every figure a run measures while and after it trains.

An evaluator is an object with a `name` (the prefix of its metrics), an `every` and
`run(step, state, writer) -> {metric: value}`; the trainer calls it when `due` and writes what
it returns under `<name>/...` with the run's one `MetricWriter` (which it also passes, for
images). Evaluators are built by name from a config's `evals` section (big_vision's
`evaluators/common.py` is the model):

  config.evals.<name>.type   which evaluator (a key of `REGISTRY`)
  config.evals.<name>.every  steps between runs; 0 = only at the end of training; -1 = off
  config.evals.<name>.*      the evaluator's own options, checked by its `check` when the
                             task validates its config

so `--config.evals.<name>.every=-1` switches one off from the command line, and a config file
adds one by adding a section. The task supplies what evaluators need to run (the model's
graphdef, the mesh, its data) as a `context` dict; each evaluator takes what it uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib

# `type` → "module:Class"; modules are imported when a config names them.
REGISTRY = {
    "verification": "vigface_jax.evaluate.evaluators:Verification",
    "sample_sheet": "vigface_jax.evaluate.evaluators:SampleSheet",
    "identity": "vigface_jax.evaluate.evaluators:IdentityConsistency",
    "landmark_following": "vigface_jax.evaluate.evaluators:LandmarkFollowing",
    "guidance_sweep": "vigface_jax.evaluate.evaluators:GuidanceSweep",
}


class Evaluator:
  """Base class: `run` measures; `due` says when the trainer calls it."""

  def __init__(self, name: str, every: int):
    self.name = name
    self.every = int(every)

  def due(self, step: int, num_steps: int) -> bool:
    """Every `every` steps and at the last step; only at the last for 0; never for < 0."""
    if self.every < 0:
      return False
    return (self.every > 0 and step % self.every == 0) or step == num_steps

  def run(self, step: int, state: Any, writer: metrics_lib.MetricWriter) -> dict[str, Any]:
    raise NotImplementedError

  @classmethod
  def check(cls, options: config_lib.Fields) -> None:
    """ConfigError naming the field unless this evaluator's own options are valid (called
    by `validate`, before anything is built; `type` and `every` are checked there)."""


class FunctionEvaluator(Evaluator):
  """An evaluator from a function `fn(step, state) -> {metric: value}` (tests, one-offs)."""

  def __init__(self, name: str, every: int, fn: Any):
    super().__init__(name, every)
    self.fn = fn

  def run(self, step, state, writer) -> dict[str, Any]:
    del writer
    return self.fn(step, state)


def _resolve(name: str, kind: str) -> type[Evaluator]:
  if kind not in REGISTRY:
    raise config_lib.ConfigError(
        f"evals.{name}.type={kind!r} is not a known evaluator; known: {sorted(REGISTRY)}")
  module, cls = REGISTRY[kind].split(":")
  return getattr(importlib.import_module(module), cls)


def validate(evals: Any, known: Sequence[str]) -> None:
  """ConfigError naming the field unless every `evals.<name>` has a known `type` (one of
  `known`, the task's), an integer `every` ≥ -1 and valid options (the evaluator's `check`)."""
  for name, cfg in evals.items():
    kind = cfg.type
    if kind not in known:
      raise config_lib.ConfigError(
          f"evals.{name}.type={kind!r} is not an evaluator of this task; use one of "
          f"{sorted(known)}")
    every = cfg.every
    if isinstance(every, bool) or not isinstance(every, int) or every < -1:
      raise config_lib.ConfigError(
          f"evals.{name}.every must be an integer ≥ -1 (steps between runs; 0 = only at the "
          f"end, -1 = off), got {every!r}")
    _resolve(name, kind).check(config_lib.Fields(cfg, f"evals.{name}"))


def from_config(evals: Any, context: Mapping[str, Any]) -> list[Evaluator]:
  """The evaluators of `evals` that are on (`every` ≥ 0 and something to measure)."""
  out = []
  for name, cfg in evals.items():
    if cfg.every < 0:
      continue
    evaluator = _resolve(name, cfg.type)(name, cfg, context)
    if getattr(evaluator, "active", True):
      out.append(evaluator)
  return out


def run_due(evaluators: Sequence[Evaluator], step: int, num_steps: int, state: Any,
            writer: metrics_lib.MetricWriter) -> dict[str, Any]:
  """Runs the evaluators due at `step`; writes and returns their figures, prefixed by name."""
  figures: dict[str, Any] = {}
  for evaluator in evaluators:
    if evaluator.due(step, num_steps):
      out = {f"{evaluator.name}/{k}": v
             for k, v in evaluator.run(step, state, writer).items()}
      writer.write_scalars(step, out)
      figures.update(out)
  return figures
