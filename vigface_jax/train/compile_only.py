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
GPU's, so treat them as an estimate and the argument bytes as exact. Or compile for a Cloud
TPU slice from this host (`dry_run_topology='v5e:2x4'`, libtpu installed, no TPU needed):
the TPU compiler's own figures, ahead of time, as maxtext's `train_compile.py` does. 'auto'
compute dtypes resolve for the target (bfloat16 on TPU), not for the host.

Stage 2's dry run also compiles stage 3's sampler for the same model and mesh
(`compile_sampler`), the program generation runs.

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


def topology_devices(name: str) -> list[Any]:
  """The chips of a Cloud TPU slice (`'v5e:2x4'`), from libtpu's topology description, for an
  ahead-of-time compile on a host that has none (as maxtext's `train_compile.py` does)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu locks /tmp/libtpu_lockfile for the process that opens the chips; describing a slice
  # opens none, so a second dry run (or one beside a TPU job) need not wait for the lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # pylint: disable=broad-except  # libtpu raises plain RuntimeErrors
    if "libtpu" in str(e).lower() or "tpu" not in str(e).lower():
      hint = ('libtpu is needed for dry_run_topology: pip install -e ".[tpu]"')
    else:
      hint = "name a slice libtpu knows, e.g. 'v5e:2x4', 'v5p:2x2x2', 'v4:2x2x2', 'v6e:4x4'"
    raise config_lib.ConfigError(
        f"dry_run_topology={name!r}: no TPU topology description ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
  return list(topology.devices)


def for_target(config: Any, mesh: Mesh) -> Any:
  """`config` with `model.dtype='auto'` resolved for the mesh's platform (a TPU slice compiled
  from this CPU host computes in bfloat16, as it would on the slice); otherwise `config`."""
  if config.model.get("dtype") != "auto":
    return config
  from vigface_jax.models import face_recognizer  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  dtype = face_recognizer.compute_dtype("auto", mesh.devices.flat[0].platform)
  config.model.dtype = jax.numpy.dtype(dtype).name
  return config


def dry_run_mesh(config: Any) -> Mesh:
  """The mesh a dry run compiles for: `config.mesh` over the local devices, or over the chips
  of `config.dry_run_topology`."""
  name = config.get("dry_run_topology")
  devices = topology_devices(name) if name else None
  try:
    return parallel.mesh_from_config(config, devices=devices)
  except ValueError as e:
    raise config_lib.ConfigError(f"dry run: mesh.shape={tuple(config.mesh.shape)} does not fit "
                                 f"{len(devices) if devices else 'the local'} devices: {e}"
                                 ) from None


def compile_train_step(config: Any, *, mesh: Mesh, create_model: Callable[..., nnx.Module],
                       loss_fn: state_lib.LossFn, trainable: Any = nnx.Param,
                       batch: dict[str, jax.ShapeDtypeStruct] | None = None,
                       return_setup: bool = False) -> Any:
  """Lowers and compiles `loop.fit`'s step for `config` on `mesh`; returns the figures (and the
  trainer's abstract `state.Setup` with `return_setup`).

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
  figures = {
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
  return (figures, setup) if return_setup else figures


def compile_sampler(config: Any, mesh: Mesh, setup: state_lib.Setup, schedule: Any,
                    embed_dim: int) -> dict[str, Any]:
  """Lowers and compiles the generator's sampler (`generate.sampling.Generator`, as stage 3
  runs it: per-image keys, the unguided half skipped outside the guidance interval) for the
  stage-2 model of `setup` on `mesh`, one call of `sample.batch_size` images (rounded up to the
  batch shards); returns its figures. Nothing is initialised: the state is `setup.abstract`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import sampling  # pylint: disable=g-import-not-at-top
  from vigface_jax.models import stage2  # pylint: disable=g-import-not-at-top
  settings = dataclasses.replace(sampling.SamplerSettings.from_config(config),
                                 skip_unguided=True)
  generator = sampling.Generator(setup.graphdef, schedule, settings,
                                 batch_size=int(config.sample.batch_size), mesh=mesh,
                                 state_shardings=setup.shardings, rules=config.sharding_rules,
                                 per_example_keys=True)
  b, batch = generator.batch_size, parallel.batch_sharding(mesh, config.sharding_rules)
  size = stage2.OUTPUT_SIZE
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = (setup.abstract.params, setup.abstract.rest,
          sds((b, int(embed_dim)), jax.numpy.float32, batch),
          sds((b, size, size, 3), jax.numpy.float32, batch),
          sds((b, 2), jax.numpy.uint32, batch),
          sds((), jax.numpy.float32, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  t0 = time.perf_counter()
  lowered = generator.sample.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"images_per_call": b, "num_steps": settings.num_steps,
          "guidance_interval": settings.guidance_interval,
          "memory_per_device": memory_per_device(compiled),
          # XLA's cost analysis counts the DDIM scan's body once: about one denoising step's
          # FLOPs (both guidance branches) plus the work outside the loop, not the whole call.
          "flops_one_step": loop.flops_of(compiled), "lower_s": t1 - t0, "compile_s": t2 - t1}


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
      f"  trainable parameters: {figures['trainable_parameters']:,}"
      + (f", compute dtype {figures['compute_dtype']}" if figures.get("compute_dtype") else ""),
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
  sampler = figures.get("sampler")
  if sampler:
    smem = sampler["memory_per_device"]
    lines.append(
        f"  generation sampler ({sampler['images_per_call']} images per call, "
        f"{sampler['num_steps']} DDIM steps, compiled in {sampler['compile_s']:.1f} s): "
        f"memory per device {_gib(smem.get('total', 0))} (temporaries "
        f"{_gib(smem.get('temp', 0))}), FLOPs of one denoising step per device "
        f"{sampler['flops_one_step'] / 1e9:,.1f} GFLOP")
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
