"""Compile-only dry runs (`--config.dry_run=True`): the training step lowered and compiled for
the configured mesh, without training, without initialising a weight and without reading data.

What a user learns before paying for accelerators: whether the step compiles with this mesh
and these sharding rules (a sharding error stops here, naming the array), and from XLA's own
analysis of the compiled step, per device: the bytes of its arguments (the train state's
shard and the batch's), outputs, temporaries and their sum, which is what must fit in one
device's memory (donated state buffers are counted once, through `alias`); the FLOPs of one
step; and how the largest arrays are split. Run it on fake CPU devices of the target count
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`): XLA:CPU partitions the program as an
accelerator would, though its temporaries (fusion and layout choices) differ from a TPU's or a
GPU's, so treat them as an estimate and the argument bytes as exact.

`report` writes `dry_run.json` into the workdir (process 0) and logs the same figures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from flax import nnx
import jax
from jax.sharding import Mesh

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import pipeline
from vigface_jax.train import loop
from vigface_jax.train import state as state_lib

_LARGEST = 8  # arrays listed in the report


def _arrays(abstract: Any) -> list[dict[str, Any]]:
  """Every sharded leaf of an abstract tree: name, global and per-device shape and bytes."""
  rows = []
  for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if not hasattr(leaf, "shape") or getattr(leaf, "sharding", None) is None:
      continue
    shard = leaf.sharding.shard_shape(leaf.shape)
    itemsize = leaf.dtype.itemsize
    rows.append({"name": state_lib.leaf_name(keys), "shape": list(leaf.shape),
                 "dtype": str(leaf.dtype),
                 "spec": str(getattr(leaf.sharding, "spec", leaf.sharding)),
                 "shard_shape": list(shard),
                 "bytes": int(math.prod(leaf.shape)) * itemsize,
                 "bytes_per_device": int(math.prod(shard)) * itemsize})
  return rows


def largest_arrays(abstract: Any, count: int = _LARGEST) -> list[dict[str, Any]]:
  """The `count` largest leaves of a sharded abstract tree: global and per-device shapes."""
  return sorted(_arrays(abstract), key=lambda r: -r["bytes"])[:count]


def state_bytes_per_device(abstract: Any) -> int:
  """Bytes of one device's shard of every array in the tree (the largest shard per leaf)."""
  return sum(r["bytes_per_device"] for r in _arrays(abstract))


def memory_per_device(compiled: Any) -> dict[str, int]:
  """XLA's memory analysis of a compiled SPMD program (one device's share), in bytes."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compile_train_step(config: Any, *, mesh: Mesh, create_model: Callable[..., nnx.Module],
                       loss_fn: state_lib.LossFn, trainable: Any = nnx.Param,
                       batch: dict[str, jax.ShapeDtypeStruct] | None = None
                       ) -> dict[str, Any]:
  """Lowers and compiles `loop.fit`'s step for `config` on `mesh`; returns the figures.

  The optimizer, state layout and step are exactly the trainer's (`loop.make_trainer` with
  `materialize=False`); the batch is `pipeline.batch_spec` of `data.global_batch_size` unless
  `batch` is given.
  """
  rules = config.sharding_rules
  try:  # the check the input pipeline makes: the batch must split over the batch axes
    parallel.process_batch_size(int(config.data.global_batch_size), mesh, rules)
  except ValueError as e:
    raise config_lib.ConfigError(f"dry run: {e}") from None
  t0 = time.perf_counter()
  try:
    trainer = loop.make_trainer(config, mesh, create_model, loss_fn, trainable=trainable,
                                materialize=False)
  except ValueError as e:
    raise config_lib.ConfigError(f"dry run: {e}") from None
  setup = trainer.setup
  if batch is None:
    batch = pipeline.batch_spec(int(config.data.global_batch_size), mesh, rules)
  lowered = trainer.step.lower(setup.abstract, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(setup.abstract.params))
  return {
      "devices": int(mesh.devices.size),
      "device_kind": mesh.devices.flat[0].device_kind,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch_size": int(config.data.global_batch_size),
      "trainable_parameters": params,
      "state_bytes_per_device": state_bytes_per_device(setup.abstract),
      "memory_per_device": memory_per_device(compiled),
      "flops_per_step": loop.flops_of(compiled),
      "lower_s": t1 - t0,
      "compile_s": t2 - t1,
      "largest_arrays": largest_arrays(setup.abstract),
  }


def _gib(n: float) -> str:
  """Bytes in the unit that reads best (KiB ... GiB)."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_report(task: str, figures: dict[str, Any]) -> str:
  """The dry run's figures as the lines it logs and prints."""
  mem = figures.get("memory_per_device", {})
  lines = [
      f"dry run ({task}): the training step compiled for {figures['devices']} x "
      f"{figures['device_kind']}, mesh {figures['mesh']}, global batch "
      f"{figures['global_batch_size']} (lowered in {figures['lower_s']:.1f} s, compiled in "
      f"{figures['compile_s']:.1f} s)",
      f"  trainable parameters: {figures['trainable_parameters']:,}",
      f"  train state per device: {_gib(figures['state_bytes_per_device'])}",
  ]
  if mem:
    lines.append(
        f"  memory per device (XLA): {_gib(mem['total'])} = arguments "
        f"{_gib(mem['argument'])} + outputs {_gib(mem['output'])} - donated/aliased "
        f"{_gib(mem['alias'])} + temporaries {_gib(mem['temp'])}")
  if figures.get("flops_per_step"):
    lines.append(f"  FLOPs per step (XLA cost analysis, per device): "
                 f"{figures['flops_per_step'] / 1e9:,.1f} GFLOP")
  lines.append("  largest arrays (global shape -> per-device shard, partition spec):")
  for a in figures["largest_arrays"]:
    lines.append(f"    {a['name']}: {a['shape']} {a['dtype']} -> {a['shard_shape']} "
                 f"({_gib(a['bytes_per_device'])} per device) {a['spec']}")
  return "\n".join(lines)


def report(task: str, figures: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Logs and prints the figures; process 0 writes `workdir/dry_run.json`. Returns the
  task's summary."""
  summary = {"task": task, "dry_run": figures}
  if parallel.is_main_process():
    print(format_report(task, figures), flush=True)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "dry_run.json")
    metrics_lib.write_json(path, summary)
    logging.info("dry run: figures written to %s", path)
  return summary
