"""Train state born sharded, and the pure jitted training step every trainer uses.

The model is an NNX module, but the training state is a plain pytree (`TrainState`):
`nnx.split(model, nnx.Param, ...)` gives a static `graphdef`, the parameters and the rest
(batch-norm statistics, the σ buffer, dropout RNG counters: every non-`Param` variable).
Optax updates `params`; the forward pass writes the new `rest`. This keeps the step a pure
function `(state, batch) -> (state, metrics)` that `jax.jit` compiles once, with explicit
in/out shardings and the old state donated.

Sharding: every variable carries logical axis names (`out_sharding` metadata, e.g.
`('embed', 'classes')`); `state_shardings` maps them through the config's rules onto the mesh
(`parallel.tree_shardings`), optimizer moments inherit their parameter's names, and
everything unnamed (step, RNG, counters) is replicated. `create_state` runs the initialiser
under `jax.jit(out_shardings=...)`, so no device ever holds a full copy of a sharded array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from vigface_jax import parallel

# loss_fn(model, batch, rng) -> (loss, metrics). The model is merged in training mode; any
# non-Param variable it writes (BN statistics, σ) becomes the next state's `rest`.
LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; checkpointed as one pytree.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `nnx.State` of the model's `nnx.Param`s (float32 master weights).
    rest: `nnx.State` of every other model variable (BN statistics, σ buffer, RNG counters).
    opt_state: optax state of `params`.
    ema: exponential moving average of `params`, or None when disabled.
    rng: raw uint32 `[2]` key; step `t` uses `fold_in(rng, t)`, so resumed runs draw the
      same randomness as uninterrupted ones.
  """

  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  ema: Any
  rng: jax.Array


def _state_specs(abstract: TrainState) -> TrainState:
  """Logical axis names of every leaf (None: replicated)."""
  names = nnx.get_partition_spec(abstract)

  def clean(x):
    return x if isinstance(x, PartitionSpec) else PartitionSpec()

  return jax.tree.map(clean, names, is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(abstract: TrainState, mesh: Mesh,
                    rules: parallel.LogicalRules = parallel.DEFAULT_RULES) -> TrainState:
  """`NamedSharding` of every leaf of a (possibly abstract) `TrainState`."""
  # Not parallel.tree_shardings: its leaf test would take optax's empty NamedTuple states
  # for (empty) axis tuples.
  return jax.tree.map(lambda spec: parallel.logical_sharding(mesh, tuple(spec), rules),
                      _state_specs(abstract), is_leaf=lambda x: isinstance(x, PartitionSpec))


def leaf_name(path: tuple[Any, ...]) -> str:
  """A state leaf's path as `params/head/weight` (NNX's trailing `/value` dropped)."""
  name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)
  return name.removesuffix("/value")


def check_divisible(abstract: Any, shardings: Any, mesh: Mesh) -> None:
  """ValueError naming the first array whose shape its sharding cannot split evenly.

  Without it the user meets JAX's IndivisibleError from deep inside the initialiser, with no
  array name (e.g. 10,572 + 120,000 class centres over an 8-way `model` axis).
  """
  def check(path, leaf, sharding):
    spec = getattr(sharding, "spec", None)
    if spec is None or not hasattr(leaf, "shape"):
      return
    for dim, axes in enumerate(spec):
      if axes is None or dim >= len(leaf.shape):
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      ways = math.prod(int(mesh.shape[a]) for a in names)
      if leaf.shape[dim] % ways:
        raise ValueError(
            f"{leaf_name(path)}: dimension {dim} of shape {tuple(leaf.shape)} ({leaf.shape[dim]}) cannot "
            f"be split {ways} ways over mesh axes {names} (mesh {dict(mesh.shape)}, spec "
            f"{spec}); change mesh.shape or sharding_rules, or a size so that it divides "
            f"(for the class-centre matrix: model.num_real + virtual.num_virtual)")

  jax.tree_util.tree_map_with_path(check, abstract, shardings)


@dataclasses.dataclass
class Setup:
  """What `create_state` returns besides the state itself."""

  graphdef: nnx.GraphDef
  shardings: TrainState
  abstract: TrainState  # ShapeDtypeStructs carrying the shardings (Orbax restore target)


def create_state(
    create_model: Callable[[nnx.Rngs], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    ema: bool = False,
    trainable: Any = nnx.Param,
    materialize: bool = True,
) -> tuple[TrainState | None, Setup]:
  """Initialises the train state directly in its sharded layout.

  `jax.eval_shape` traces the initialiser for shapes and logical names (no memory), those
  become `NamedSharding`s, and the jitted initialiser writes each shard where it lives.

  Args:
    create_model: `create_model(rngs=nnx.Rngs)` builds the model in training mode.
    tx: the optimizer.
    mesh: device mesh.
    seed: initialisation seed; also the root of the per-step RNG.
    rules: logical-axis rules.
    ema: keep an exponential moving average of the parameters.
    trainable: NNX filter of the variables the optimizer updates (default every `nnx.Param`);
      the others (e.g. a frozen network inside the model) travel in `rest`.
    materialize: False: shapes and shardings only, no memory (compile-only dry runs); the
      returned state is None.

  Returns:
    `(state, Setup(graphdef, shardings, abstract))`.
  """

  def init() -> TrainState:
    model = create_model(rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    _, params, rest = nnx.split(model, trainable, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.PRNGKey(seed + 2))

  graphdef = nnx.split(nnx.eval_shape(lambda: create_model(rngs=nnx.Rngs(0))), trainable, ...)[0]
  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, mesh, rules)
  check_divisible(abstract, shardings, mesh)
  state = jax.jit(init, out_shardings=shardings)() if materialize else None
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return state, Setup(graphdef=graphdef, shardings=shardings, abstract=abstract)


def eval_params(state: TrainState) -> Any:
  """The parameters evaluations and exports use: the EMA when the run keeps one, else the raw
  parameters."""
  return state.ema if state.ema is not None else state.params


def merge(graphdef: nnx.GraphDef, state: TrainState, *, use_ema: bool = False) -> nnx.Module:
  """The NNX model holding `state`'s parameters (or their EMA) and other variables."""
  return nnx.merge(graphdef, eval_params(state) if use_ema else state.params, state.rest)


def jit_method(graphdef: nnx.GraphDef, method: str, *, eval_mode: bool = False,
               **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit` of `(params, rest, *args) -> merge(graphdef, params, rest).<method>(*args)`.

  One jitted merge-and-call for evaluations (e.g. `method='embed'`); `eval_mode` switches
  the merged model to inference behaviour (batch-norm statistics, no dropout) first.
  """

  def call(params, rest, *args):
    model = nnx.merge(graphdef, params, rest)
    if eval_mode:
      model.eval()
    return getattr(model, method)(*args)

  return jax.jit(call, **jit_kwargs)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    batch_sharding: NamedSharding,
    *,
    ema_decay: float = 0.0,
    ema_warmup: bool = False,
    trainable: Any = nnx.Param,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step `(state, batch) -> (state, metrics)`; `state` is donated.

  Metrics always include `loss`, `grad_norm` (before clipping) and `finite` (1.0 when the
  loss and the gradient norm are finite; a gradient large enough to overflow an update
  overflows its norm first). A non-finite step changes nothing: the returned state equals the
  input (step not incremented), so the caller can stop and keep the last good checkpoint;
  with `skip_nonfinite` only the step counter moves on (the batch is skipped: parameters,
  optimizer state and EMA stay). The update is a `lax.cond` on `finite`, so a good step
  updates the donated state in place, once: a select of new against old state after the
  update (and the update's own norm to gate it) cost 2.7× the time of the update itself for
  DiT-B's 127M parameters on XLA:CPU (`BENCHMARKS.md`, "Targets and what was tried").
  """
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      loss, metrics = loss_fn(model, batch, rng)
      return loss, (metrics, nnx.state(model, nnx.Not(trainable)))

    (loss, (metrics, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state: TrainState) -> TrainState:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = state.ema
      if ema is not None:
        decay = jnp.float32(ema_decay)
        if ema_warmup:  # short runs are not dominated by the initialisation
          step = state.step.astype(jnp.float32)
          decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
      return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state,
                           ema=ema)

    def keep(state: TrainState) -> TrainState:
      return state.replace(step=state.step + 1) if skip_nonfinite else state

    new = jax.lax.cond(finite, update, keep, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   finite=finite.astype(jnp.float32))
    return new, metrics

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)
