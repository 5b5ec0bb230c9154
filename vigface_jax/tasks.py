"""The task registry: `config.task` → the module whose `run(config, workdir)` does the job.

`run` validates the fields every task needs, saves the resolved config as `config.json` in the
workdir and calls the task; `vigface_jax.main` is its command-line entry.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from absl import logging
import ml_collections

from vigface_jax import config_lib
from vigface_jax import metrics
from vigface_jax import parallel

# Task name → module with `run(config, workdir)` and `REQUIRED_FIELDS` (dotted config paths
# that must not be None). Modules are imported on demand: a data job never loads a trainer.
TASKS = {
    "preview": "vigface_jax.preview",
    "fr": "vigface_jax.train.fr",
    "dit": "vigface_jax.train.dit",
    "generate": "vigface_jax.generate.task",
    "audit": "vigface_jax.generate.audit_task",
    "quality": "vigface_jax.evaluate.quality",
}

ConfigError = config_lib.ConfigError


def _get_field(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"config field '{path}' is missing: the config file must define it")
    node = node[part]
  return node


def resolve_task(config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """Validates `config` for its task and returns the task's `run` function."""
  task = config.get("task")
  if task is None:
    raise ConfigError("config.task is not set: the config file must name the job "
                      f"(one of {sorted(TASKS)})")
  if task not in TASKS:
    raise ConfigError(f"unknown task config.task={task!r}; known tasks: {sorted(TASKS)}")
  module = importlib.import_module(TASKS[task])
  for path in getattr(module, "REQUIRED_FIELDS", ()):
    if _get_field(config, path) is None:
      raise ConfigError(f"config field '{path}' is required for task {task!r}: set it in the "
                        f"config file or pass --config.{path}=...")
  return module.run


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Validates, saves `config.json` and runs the task; usable from Python as well."""
  task_fn = resolve_task(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    metrics.remove_temporaries(workdir)  # a write a kill cut off (config.json, summary.json)
    metrics.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  logging.info("task %s, workdir %s\n%s", config.task, workdir, config)
  return task_fn(config, workdir)
