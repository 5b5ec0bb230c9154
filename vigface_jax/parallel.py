"""Device mesh, logical-axis sharding rules and multi-host helpers.

Everything that decides *where* an array lives goes through this module:

* `create_mesh` / `mesh_from_config` build a named `jax.sharding.Mesh` such as
  `('data', 'fsdp', 'model')` from the config (`config.mesh.axes`,
  `config.mesh.shape`, one entry may be -1 for "the remaining devices").
* Models name their array dimensions logically (`('embed', 'mlp')`,
  `('embed', 'classes')`, ...); a rules table maps logical names to mesh axes
  with flax linen's `logical_to_mesh_axes` semantics (`logical_to_spec`,
  `logical_sharding`, `tree_shardings`). The class-centre matrix of the FR head
  has its own `classes` axis so it can be sharded independently of the
  backbone.
* `maybe_initialize_distributed` calls `jax.distributed.initialize()` when the
  environment describes a multi-process job; `process_batch_size`,
  `batch_sharding` and `host_to_global` turn per-process numpy batches into
  global `jax.Array`s.

Every function works unchanged with one process or many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import os
from typing import Any, Union

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

# A rule maps one logical dimension name to a mesh axis, a tuple of mesh axes
# (the dimension is split over their product), or None (replicated).
MeshAxes = Union[str, tuple[str, ...], None]
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Rules for a face model on a ('data', 'fsdp', 'model') mesh. Order matters:
# for each array, rules are applied first to last and a rule is skipped when
# one of its mesh axes is already used by another dimension of that array.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Examples are split over every data-parallel axis (DP and FSDP alike).
    ("batch", ("data", "fsdp")),
    # The examples entering a head whose classes are split over 'model' (the [b, C] logits):
    # all-gathered within each model group, as in Partial FC's model parallelism.
    ("head_batch", ("data", "fsdp")),
    # Convolution kernels are small next to activations at 112x112: keep them
    # replicated so convolutions need no weight all-gathers.
    ("channels_in", None),
    ("channels_out", None),
    # Dense/transformer weights: ZeRO-3 style over 'fsdp', tensor parallel
    # over 'model'.
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    # The [embed, classes] class-centre matrix (up to 10.5K + 120K rows) is
    # the largest tensor of stage 1; its rows go over 'model'.
    ("classes", "model"),
)

# Stage 1's rules: its backbone has no weight split over 'model' (convolution kernels are
# replicated), so its examples are split over every device, 'model' included; only the
# class-centre matrix and the logits use 'model' ('head_batch' keeps data × fsdp). With the
# default rules a model axis of m would run the backbone m times on the same images.
FR_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp", "model")),
) + tuple(rule for rule in DEFAULT_RULES if rule[0] != "batch")

# Environment variables that say "this process is one of several". Checked
# without touching JAX, because `jax.distributed.initialize` must run before
# any backend is created.
_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
# Set by `launch/local.sh` and `launch/slurm.sh` beside JAX_COORDINATOR_ADDRESS (which JAX reads
# itself): the process count and this process's id, passed to `jax.distributed.initialize`,
# which has no environment variables of its own for them outside SLURM / Open MPI / TPU VMs.
_NUM_PROCESSES_VAR, _PROCESS_ID_VAR = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"

_distributed_initialized = False


# ------------------------------------------------------------------- meshes


def _resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in `shape` with the remaining device count."""
  shape = tuple(int(s) for s in shape)
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(
        f"mesh.shape={shape}: entries must be positive, or -1 (once) for "
        "'all remaining devices'."
    )
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(
        f"mesh.shape={shape}: at most one entry may be -1, got {len(unknown)}."
    )
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"mesh.shape={shape}: the fixed entries multiply to {known}, which "
          f"does not divide the {num_devices} available devices."
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  elif known != num_devices:
    raise ValueError(
        f"mesh.shape={shape} multiplies to {known} devices but "
        f"{num_devices} are available; make the product equal the device "
        "count or put -1 on one axis."
    )
  return shape


def create_mesh(
    axes: Sequence[str],
    shape: Sequence[int],
    devices: Sequence[Any] | None = None,
) -> Mesh:
  """Builds a named device mesh.

  Axis types are `Auto`: the trainer passes explicit `NamedSharding`s to
  `jax.jit` and lets GSPMD propagate the rest, so model code needs no
  sharding annotations (`jax.make_mesh` would default to `Explicit`).

  Args:
    axes: mesh axis names, e.g. `('data', 'fsdp', 'model')` (`mesh.axes`).
    shape: one size per axis (`mesh.shape`); entries > 0, or exactly one -1
      meaning "all remaining devices".
    devices: devices to use; defaults to `jax.devices()` (all processes).

  Returns:
    A `jax.sharding.Mesh` of `devices` laid out for fast collectives (TPU
    topology aware; multi-slice TPU jobs put the slices on the first axis).

  Raises:
    ValueError: when names and sizes disagree in length, names repeat, or the
      sizes do not multiply to the device count.
  """
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(
        f"mesh.axes={axes} has {len(axes)} names but mesh.shape="
        f"{tuple(shape)} has {len(shape)} sizes; give one size per axis."
    )
  if len(set(axes)) != len(axes):
    raise ValueError(f"mesh.axes={axes}: axis names must be unique.")
  devices = list(jax.devices() if devices is None else devices)
  shape = _resolve_shape(shape, len(devices))

  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    # Data-centre network links between slices are far slower than ICI, so
    # only the outermost (data-parallel) axis may cross them.
    if shape[0] % num_slices:
      raise ValueError(
          f"mesh.shape={shape}: the first axis ({axes[0]}) must be a "
          f"multiple of the {num_slices} TPU slices, which it spans."
      )
    ici = (shape[0] // num_slices,) + shape[1:]
    dcn = (num_slices,) + (1,) * (len(shape) - 1)
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  mesh = Mesh(
      device_array, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes)
  )
  logging.info("Device mesh %s over %d devices.", dict(mesh.shape), mesh.size)
  return mesh


def mesh_from_config(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """`create_mesh(config.mesh.axes, config.mesh.shape)` for a ConfigDict."""
  if "mesh" not in config:
    raise ValueError(
        "config.mesh is missing; add mesh.axes (e.g. ('data', 'fsdp', "
        "'model')) and mesh.shape (e.g. (-1, 1, 1))."
    )
  return create_mesh(config.mesh.axes, config.mesh.shape, devices=devices)


# ------------------------------------------------------------ logical rules


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def _spec_entry(mesh_axes: MeshAxes) -> MeshAxes:
  """Canonical `PartitionSpec` entry (config files may hold lists)."""
  axes = _as_tuple(mesh_axes)
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _restrict_rules(
    rules: LogicalRules, mesh_axis_names: Sequence[str]
) -> list[tuple[str, MeshAxes]]:
  """Drops mesh axes a mesh does not have, so one rules table fits any mesh.

  A rule that named only missing axes is dropped entirely (not turned into an
  explicit `None`), so a later rule for the same logical name still applies.
  """
  present = set(mesh_axis_names)
  restricted = []
  for name, mesh_axes in rules:
    wanted = _as_tuple(mesh_axes)
    kept = tuple(a for a in wanted if a in present)
    if wanted and not kept:
      continue
    restricted.append((name, _spec_entry(kept)))
  return restricted


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: LogicalRules = DEFAULT_RULES,
    mesh_axis_names: Sequence[str] | None = None,
) -> PartitionSpec:
  """Maps logical dimension names to a `PartitionSpec`.

  Same semantics as `flax.linen.logical_to_mesh_axes`: rules are taken in
  order; a rule `(name, mesh_axes)` assigns `mesh_axes` to the dimension called
  `name` if that dimension is still unassigned and none of `mesh_axes` is used
  by another dimension of the same array. A rule with `None` pins the
  dimension to replicated. Dimensions no rule assigns (unknown names, `None`)
  are replicated.

  Args:
    logical_axes: one logical name (or None) per array dimension; None for the
      whole argument means a fully replicated array.
    rules: `(logical_name, mesh_axis | tuple_of_mesh_axes | None)` pairs.
    mesh_axis_names: if given, mesh axes outside this set are dropped from the
      rules first (see `_restrict_rules`).

  Returns:
    The `PartitionSpec`, one entry per dimension.

  Raises:
    ValueError: when a logical name appears twice in `logical_axes`.
  """
  if logical_axes is None:
    return PartitionSpec()
  logical_axes = tuple(logical_axes)
  names = [a for a in logical_axes if a is not None]
  if len(set(names)) != len(names):
    raise ValueError(
        f"Logical axes {logical_axes} name a dimension more than once."
    )
  if mesh_axis_names is not None:
    rules = _restrict_rules(rules, mesh_axis_names)
  unassigned = object()
  result: list[Any] = [unassigned if a is not None else None for a in logical_axes]
  used: set[str] = set()
  for name, mesh_axes in rules:
    if name not in logical_axes:
      continue
    pos = logical_axes.index(name)
    wanted = _as_tuple(mesh_axes)
    if result[pos] is unassigned and not used.intersection(wanted):
      result[pos] = _spec_entry(mesh_axes)
      used.update(wanted)
  return PartitionSpec(*(None if r is unassigned else r for r in result))


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None] | None,
    rules: LogicalRules = DEFAULT_RULES,
) -> NamedSharding:
  """`NamedSharding` on `mesh` for an array with the given logical axes."""
  spec = logical_to_spec(logical_axes, rules, mesh_axis_names=mesh.axis_names)
  return NamedSharding(mesh, spec)


def _is_logical_leaf(x: Any) -> bool:
  return x is None or (
      isinstance(x, (tuple, PartitionSpec))
      and all(a is None or isinstance(a, str) for a in x)
  )


def tree_shardings(
    mesh: Mesh, logical_axes_tree: Any, rules: LogicalRules = DEFAULT_RULES
) -> Any:
  """Maps a pytree of logical-axes tuples to a pytree of `NamedSharding`s.

  Args:
    mesh: the device mesh.
    logical_axes_tree: pytree whose leaves are tuples of logical names (or
      `PartitionSpec`s of logical names, or None for replicated), e.g. what
      `nnx.get_partition_spec` returns for a state with `sharding` metadata.
    rules: logical-to-mesh rules.

  Returns:
    A pytree of the same structure with a `NamedSharding` at every leaf.
  """
  return jax.tree.map(
      lambda axes: logical_sharding(mesh, axes, rules),
      logical_axes_tree,
      is_leaf=_is_logical_leaf,
  )


def batch_sharding(
    mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
  """Sharding of any array whose leading dimension is the global batch.

  The spec names only the first dimension, so the same sharding fits images
  `[batch, height, width, channels]`, labels `[batch]` and landmarks
  `[batch, 5, 2]`.
  """
  return logical_sharding(mesh, ("batch",), rules)


def axis_size(mesh: Mesh, logical_name: str, rules: LogicalRules = DEFAULT_RULES) -> int:
  """Number of ways a dimension called `logical_name` (alone in its array) is split on `mesh`."""
  spec = logical_sharding(mesh, (logical_name,), rules).spec
  axes = spec[0] if len(spec) else None
  return math.prod(mesh.shape[a] for a in _as_tuple(axes))


def batch_axis_size(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
  """Number of ways the batch dimension is split on `mesh`."""
  return axis_size(mesh, "batch", rules)


# --------------------------------------------------------------- multi-host


def _env_says_multiprocess(environ: Mapping[str, str]) -> str | None:
  """Returns the variable that marks a multi-process job, or None."""
  for var in _ADDRESS_VARS:
    if environ.get(var):
      return var
  for var in _COUNT_VARS:
    try:
      if int(environ.get(var, "1")) > 1:
        return var
    except ValueError:
      continue
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU_WORKER_HOSTNAMES"
  return None


def explicit_process_args(environ: Mapping[str, str]) -> dict[str, Any]:
  """`jax.distributed.initialize` keywords from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID when the launcher set them ({} otherwise: JAX's cluster detection decides).

  Raises:
    ValueError: a count or id that is not an integer, an id outside [0, count), or a count
      without an address.
  """
  count, pid = environ.get(_NUM_PROCESSES_VAR), environ.get(_PROCESS_ID_VAR)
  if count is None and pid is None:
    return {}
  if count is None or pid is None:
    raise ValueError(f"set both {_NUM_PROCESSES_VAR} and {_PROCESS_ID_VAR} (or neither); got "
                     f"{_NUM_PROCESSES_VAR}={count!r}, {_PROCESS_ID_VAR}={pid!r}")
  try:
    n, i = int(count), int(pid)
  except ValueError:
    raise ValueError(f"{_NUM_PROCESSES_VAR}={count!r} and {_PROCESS_ID_VAR}={pid!r} must be "
                     "integers") from None
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"{_PROCESS_ID_VAR}={i} must lie in [0, {_NUM_PROCESSES_VAR}={n})")
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    raise ValueError(f"{_NUM_PROCESSES_VAR} is set but JAX_COORDINATOR_ADDRESS (host:port of "
                     "process 0) is not")
  return {"coordinator_address": address, "num_processes": n, "process_id": i}


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Calls `jax.distributed.initialize()` when the job has several processes.

  Must run before anything creates a JAX backend (`jax.devices()`, any array),
  which is why the decision reads only the environment.

  Args:
    mode: 'auto' initialises when the environment describes a multi-process
      job (`JAX_COORDINATOR_ADDRESS`; SLURM with `SLURM_NTASKS` > 1; Open MPI
      with `OMPI_COMM_WORLD_SIZE` > 1; a TPU pod: `TPU_WORKER_HOSTNAMES` with
      several hosts or `MEGASCALE_COORDINATOR_ADDRESS`); 'always' initialises
      unconditionally (coordinator etc. from the environment); 'never' skips.
      With JAX_NUM_PROCESSES and JAX_PROCESS_ID also set (`launch/local.sh`,
      `launch/slurm.sh`), the address, count and id are passed explicitly
      (`explicit_process_args`).

  Returns:
    True if this call initialised the distributed runtime; False if it was
    not needed or had already been done.

  Raises:
    ValueError: for an unknown `mode`.
  """
  global _distributed_initialized
  if mode not in ("auto", "always", "never"):
    raise ValueError(
        f"distributed mode={mode!r}; expected 'auto', 'always' or 'never'."
    )
  if _distributed_initialized or jax.distributed.is_initialized():
    return False
  reason = "mode='always'" if mode == "always" else None
  if mode == "auto":
    var = _env_says_multiprocess(os.environ)
    reason = f"{var} is set" if var else None
  if reason is None:
    return False
  kwargs = explicit_process_args(os.environ)
  logging.info("Initialising jax.distributed (%s%s).", reason,
               f"; {kwargs}" if kwargs else "")
  jax.distributed.initialize(**kwargs)
  _distributed_initialized = True
  logging.info(
      "JAX process %d of %d; %d local / %d global devices.",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True


def sync(name: str) -> None:
  """Barrier across JAX processes (a no-op in a single-process job)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def put(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array every process holds whole, as a global array with `sharding` (each process
  fills its own shards; `jax.device_put` refuses shardings over other processes' devices)."""
  if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
    # A typed PRNG key: place its raw uint32 data (one more trailing axis) and re-wrap it.
    impl = jax.random.key_impl(value)
    data = np.asarray(jax.random.key_data(value))
    spec = tuple(getattr(sharding, "spec", ())) + (None,)
    raw = jax.make_array_from_callback(
        data.shape, NamedSharding(sharding.mesh, PartitionSpec(*spec)),
        lambda index: data[index])
    return jax.random.wrap_key_data(raw, impl=impl)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(x: jax.Array) -> np.ndarray:
  """The whole of a global array on this host (gathered across processes when its shards
  live on several; every process must call it then)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch_in_blocks(x: jax.Array, axis: int, block: int) -> np.ndarray:
  """`fetch(x)` without ever placing more than `block` entries of `axis` on one device.

  A fully addressable array is copied shard by shard to the host (no device gathers). One that
  spans processes is replicated `block` slices at a time (a fixed-size slice, so one compiled
  program; the last one is clamped and trimmed), so devices hold at most one slice beside their
  own shard while the host assembles the whole array. Every process must call it.
  """
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  size = x.shape[axis]
  block = max(1, min(int(block), size))
  replicated = NamedSharding(x.sharding.mesh, PartitionSpec())
  take = jax.jit(lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, block, axis),
                 out_shardings=replicated)
  parts = []
  for start in range(0, size, block):
    first = min(start, size - block)  # dynamic_slice clamps too; say it here
    part = np.asarray(take(x, first))
    parts.append(np.take(part, np.arange(start - first, block), axis=axis))
  return np.concatenate(parts, axis=axis)


def is_main_process() -> bool:
  """True on the process that writes shared files (process 0)."""
  return jax.process_index() == 0


def process_batch_size(
    global_batch_size: int,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> int:
  """Examples each process loads per step.

  Args:
    global_batch_size: examples per step over all processes.
    mesh: if given, also checks that the global batch splits evenly over the
      devices the batch dimension is sharded across.
    rules: rules giving the batch sharding on `mesh`.

  Returns:
    `global_batch_size // jax.process_count()`.

  Raises:
    ValueError: if the global batch does not divide evenly.
  """
  num_processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % num_processes:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple "
        f"of the number of JAX processes ({num_processes})."
    )
  if mesh is not None:
    ways = batch_axis_size(mesh, rules)
    if global_batch_size % ways:
      raise ValueError(
          f"global_batch_size={global_batch_size} must be a multiple of "
          f"{ways}, the number of devices the batch is split over "
          f"(mesh {dict(mesh.shape)}, batch spec "
          f"{batch_sharding(mesh, rules).spec})."
      )
  return global_batch_size // num_processes


def host_to_global(
    tree: Any,
    mesh: Mesh,
    sharding_or_spec: NamedSharding | PartitionSpec | None = None,
) -> Any:
  """Assembles per-process numpy arrays into global `jax.Array`s.

  Each process passes its own slice of the batch (what its grain loader
  produced, `[process_batch, ...]`); the result has the global leading size
  `process_batch * processes_spanned_by_the_batch_axes`.

  Args:
    tree: pytree of numpy arrays with a leading per-process batch dimension.
    mesh: the device mesh.
    sharding_or_spec: a `NamedSharding`, or a `PartitionSpec` on `mesh`;
      defaults to `batch_sharding(mesh)`. Applies to every leaf.

  Returns:
    The same pytree with `jax.Array` leaves sharded as requested.
  """
  if sharding_or_spec is None:
    sharding = batch_sharding(mesh)
  elif isinstance(sharding_or_spec, PartitionSpec):
    sharding = NamedSharding(mesh, sharding_or_spec)
  else:
    sharding = sharding_or_spec
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree,
  )
