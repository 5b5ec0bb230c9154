"""The face-recognition head: class centres, margins, virtual prototypes.

Stage 1 of VIGFace (DESIGN.md §1) trains a backbone with a margin softmax over
`W = [W_R; W_V]`, `n` real and `k` virtual class centres. This module holds
the parts of that head that are not the backbone and not the training loop:

* `ClassCentres` (NNX): the centre matrix `weight [embed_dim, n + k]`
  (float32, logical axes `('embed', 'classes')`, so the class axis shards over
  the mesh's 'model' axis through `parallel.DEFAULT_RULES`) and the running
  per-dimension spread `sigma` (`SigmaBuffer`, not a `Param`: the optimizer
  never sees it).
* Margins on cosines, pure float32 functions `(cos [b, C], labels [b]) ->
  scaled logits [b, C]`: `arcface`, `cosface`, `combined_margin`
  (insightface arcface_torch `CombinedMarginLoss` semantics) and `adaface`
  (official AdaFace head; its running norm statistics are an explicit state
  passed in and returned). Label -1 means "no margin, ignore in the loss".
* `virtual_embeddings`: the per-step fabricated embeddings of virtual
  classes, `f'_j = w_v[j] + eps * sigma`, with the sigma EMA.
* `margin_softmax_loss`: cross-entropy over all `n + k` classes written so
  that, under `jax.jit` with the centres sharded over their class axis, the
  `[batch, classes]` logits stay sharded (max, log-sum-exp and the target
  logit are reductions over the class axis; no gather of a full logit row).
  Padding columns (`ClassCentres.num_padding`, so any class count splits
  over the devices) are masked out through `valid_columns`.
* Partial FC (`sample_columns`, `column_labels`): for heads of millions of
  classes, each step's softmax runs over every positive class plus uniformly
  sampled negatives, a fixed fraction of each shard of the class axis, chosen
  per shard (`jax.shard_map`) without gathering scores or centres; only the
  kept columns get gradient (arcface_torch `PartialFC_V2` semantics, at a
  static per-shard count).

Gradient contract of the virtual part: the virtual embeddings are built from
`stop_gradient(sigma)` and `stop_gradient(w_v)`, so they carry no gradient to
the backbone or to the centres through `f'`; the centres (virtual rows
included) still receive gradient through the logits `f' . w` of the softmax.

dtype: everything here computes in float32 (margins and softmax need it);
inputs of other dtypes are cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vigface_jax import ops

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, in float32 (`ops.l2_normalize`, the margin head's
  rounding of the gradient)."""
  return ops.l2_normalize(x, axis, eps, safe_grad=False)


# ------------------------------------------------------------------ module


class SigmaBuffer(nnx.Variable):
  """Running per-dimension spread of real embeddings around their centres.

  A plain `nnx.Variable` subclass (not `nnx.Param`), so filters on `Param`
  (optimizer, weight decay) leave it alone; checkpoints still hold it.
  """


class ClassCentres(nnx.Module):
  """Class-centre matrix `[embed_dim, num_real + num_virtual]` and sigma EMA.

  Columns `[0, num_real)` are real identities, `[num_real, num_real +
  num_virtual)` virtual ones; `num_padding` more columns (zero by default) only round the
  class axis up to a multiple of the devices it is split over: they are never a label,
  `margin_softmax_loss` masks them out (`valid_columns`) and reports drop them. `weight` carries
  logical axes
  `('embed', 'classes')`; `sigma` (`[embed_dim]`, starts at zero, replicated)
  is the EMA buffer `virtual_embeddings` reads and the caller writes back.

  Attributes:
    weight: `nnx.Param` float32 `[embed_dim, num_real + num_virtual + num_padding]`.
    sigma: `SigmaBuffer` float32 `[embed_dim]`.
    num_real, num_virtual, num_padding, embed_dim: ints.
  """

  def __init__(
      self,
      embed_dim: int,
      num_real: int,
      num_virtual: int = 0,
      *,
      num_padding: int = 0,
      init_std: float = 0.01,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if num_real <= 0 or num_virtual < 0 or num_padding < 0:
      raise ValueError(
          f"num_real={num_real} must be > 0, num_virtual={num_virtual} and "
          f"num_padding={num_padding} >= 0."
      )
    self.embed_dim = embed_dim
    self.num_real = num_real
    self.num_virtual = num_virtual
    self.num_padding = num_padding
    # normal(0, 0.01) as arcface_torch's PartialFC; the scale is irrelevant
    # to the cosines but sets the effective learning rate of the centres.
    init = jax.nn.initializers.normal(stddev=init_std)
    self.weight = nnx.Param(
        init(rngs.params(), (embed_dim, num_real + num_virtual + num_padding),
             param_dtype),
        out_sharding=("embed", "classes"),
        eager_sharding=False,
    )
    self.sigma = SigmaBuffer(jnp.zeros((embed_dim,), jnp.float32))

  @property
  def num_classes(self) -> int:
    """Real + virtual classes (padding columns excluded)."""
    return self.num_real + self.num_virtual

  def normalized(self) -> jax.Array:
    """Column-L2-normalised centres, float32 `[embed_dim, n + k + padding]`."""
    return l2_normalize(self.weight[...], axis=0)

  def __call__(self, emb: jax.Array) -> jax.Array:
    """Cosines `[batch, n + k + padding]` of (normalised) `emb [batch, embed_dim]`."""
    return cosines(emb, self.normalized())


def cosines(emb: jax.Array, centres_normalised: jax.Array) -> jax.Array:
  """`normalise(emb) @ centres_normalised`: `[b, d] x [d, C] -> [b, C]`."""
  return jnp.matmul(l2_normalize(emb), centres_normalised.astype(jnp.float32),
                    precision=_HIGHEST)


# ----------------------------------------------------------------- margins


def _one_hot_mask(labels: jax.Array, num_classes: int) -> jax.Array:
  """Boolean `[b, C]`; all False for label -1. Elementwise, so shard-friendly."""
  return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]


def _replace_target(cos, labels, fn):
  """Applies `fn` to the label cosine of each row, other cosines unchanged.

  The target is read by a masked sum over the class axis (an all-reduce of
  `[b]` when classes are sharded) rather than a gather.
  """
  cos = jnp.asarray(cos, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  mask = _one_hot_mask(labels, cos.shape[-1])
  target = jnp.sum(jnp.where(mask, cos, 0.0), axis=-1)
  return jnp.where(mask, fn(target)[:, None], cos)


def _safe_sqrt_one_minus_sq(c: jax.Array) -> jax.Array:
  """`sqrt(1 - c^2)`, 0 with a zero (not NaN) gradient at |c| >= 1."""
  x = 1.0 - c * c
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def combined_margin(
    cos: jax.Array,
    labels: jax.Array,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
) -> jax.Array:
  """insightface `CombinedMarginLoss`: target `cos(m1*theta + m2) - m3`, times s.

  * `m1 == 1, m3 == 0` (ArcFace): `easy_margin=False` form of arcface_torch,
    `where(cos > cos(pi - m2), cos*cos(m2) - sin*sin(m2), cos - sin(pi - m2)*m2)`,
    which keeps the target logit monotonic in theta past `theta + m2 > pi`.
  * `m1 == 1, m2 == 0` (CosFace): `cos - m3`.
  * otherwise: `cos(m1 * arccos(cos) + m2) - m3` (no fall-back), as the
    original insightface combined margin.

  Args:
    cos: float `[b, C]` cosines in [-1, 1].
    labels: int `[b]`; -1 leaves the row unchanged.
    s, m1, m2, m3: scale and margins.

  Returns:
    float32 `[b, C]` scaled logits.
  """
  if m1 == 1.0 and m3 == 0.0:
    cos_m, sin_m = math.cos(m2), math.sin(m2)
    th = math.cos(math.pi - m2)
    mm = math.sin(math.pi - m2) * m2

    def fn(t):
      cos_theta_m = t * cos_m - _safe_sqrt_one_minus_sq(t) * sin_m
      return jnp.where(t > th, cos_theta_m, t - mm)
  elif m1 == 1.0 and m2 == 0.0:
    fn = lambda t: t - m3
  else:
    fn = lambda t: jnp.cos(m1 * jnp.arccos(jnp.clip(t, -1.0, 1.0)) + m2) - m3
  return _replace_target(cos, labels, fn) * s


def arcface(cos, labels, s: float = 64.0, m: float = 0.5) -> jax.Array:
  """ArcFace: `combined_margin(cos, labels, s, 1, m, 0)`."""
  return combined_margin(cos, labels, s=s, m1=1.0, m2=m, m3=0.0)


def cosface(cos, labels, s: float = 64.0, m: float = 0.4) -> jax.Array:
  """CosFace: `combined_margin(cos, labels, s, 1, 0, m)`."""
  return combined_margin(cos, labels, s=s, m1=1.0, m2=0.0, m3=m)


class AdaFaceStats(NamedTuple):
  """AdaFace running statistics of feature norms (scalars, float32)."""

  batch_mean: jax.Array
  batch_std: jax.Array

  @classmethod
  def init(cls) -> "AdaFaceStats":
    # The official head's buffer initial values.
    return cls(jnp.float32(20.0), jnp.float32(100.0))


def adaface(
    cos: jax.Array,
    labels: jax.Array,
    norms: jax.Array,
    stats: AdaFaceStats,
    m: float = 0.4,
    h: float = 0.333,
    s: float = 64.0,
    t_alpha: float = 0.01,
    eps: float = 1e-3,
) -> tuple[jax.Array, AdaFaceStats]:
  """AdaFace (Kim et al., CVPR 2022), as the official `head.py::AdaFace`.

  `margin_scaler = clip(h * (norm - mean) / (std + eps), -1, 1)`; the target
  angle becomes `clip(theta - m * scaler, eps, pi - eps)` and the target
  cosine then loses `m + m * scaler`; all cosines are first clamped to
  `[-1 + eps, 1 - eps]` and all logits scaled by `s`. The running mean/std
  (unbiased std, like `torch.std`) are updated with `t_alpha` on the new
  batch *before* use, over rows with label != -1 (the official code has no
  ignore label); with no valid row the stats are unchanged.

  Args:
    cos: float `[b, C]` cosines.
    labels: int `[b]`, -1 = ignore.
    norms: float `[b]` or `[b, 1]` feature norms (no gradient flows to them).
    stats: running `AdaFaceStats`.
    m, h, s, t_alpha, eps: the official hyper-parameters.

  Returns:
    `(scaled logits float32 [b, C], new AdaFaceStats)`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  cos = jnp.clip(jnp.asarray(cos, jnp.float32), -1.0 + eps, 1.0 - eps)
  safe = jax.lax.stop_gradient(
      jnp.clip(jnp.asarray(norms, jnp.float32).reshape(-1), 0.001, 100.0))
  valid = (labels >= 0).astype(jnp.float32)
  count = jnp.sum(valid)
  mean = jnp.sum(safe * valid) / jnp.maximum(count, 1.0)
  var = jnp.sum(valid * (safe - mean) ** 2) / jnp.maximum(count - 1.0, 1.0)
  std = jnp.sqrt(var)
  has = count > 0
  new_mean = jnp.where(has, mean * t_alpha + (1 - t_alpha) * stats.batch_mean,
                       stats.batch_mean)
  new_std = jnp.where(has, std * t_alpha + (1 - t_alpha) * stats.batch_std,
                      stats.batch_std)
  scaler = jnp.clip((safe - new_mean) / (new_std + eps) * h, -1.0, 1.0)

  mask = _one_hot_mask(labels, cos.shape[-1])
  g_angular = (-m * scaler)[:, None]
  theta = jnp.arccos(cos)
  theta_m = jnp.clip(theta + jnp.where(mask, g_angular, 0.0), eps,
                     math.pi - eps)
  g_add = (m + m * scaler)[:, None]
  logits = (jnp.cos(theta_m) - jnp.where(mask, g_add, 0.0)) * s
  return logits, AdaFaceStats(new_mean.astype(jnp.float32),
                              new_std.astype(jnp.float32))


# ------------------------------------------------------- virtual prototypes


def num_virtual_per_step(num_virtual: int, real_batch: int, num_real: int) -> int:
  """`b_v = round(k * b_r / n)`: same expected updates per row, real or virtual.

  Python's `round` (half to even); a static int, so shapes stay fixed.
  """
  if num_real <= 0:
    raise ValueError(f"num_real={num_real} must be positive.")
  return int(round(num_virtual * real_batch / num_real))


def _rows(centres: jax.Array, labels: jax.Array) -> jax.Array:
  """`centres[:, labels].T` as a one-hot matmul `[b, C] x [C, d] -> [b, d]`.

  Contracting the (possibly sharded) class axis needs only an all-reduce of
  `[b, d]`, where a gather could make XLA all-gather the centre matrix.
  Label -1 gives a zero row.
  """
  onehot = _one_hot_mask(labels, centres.shape[-1]).astype(jnp.float32)
  return jnp.matmul(onehot, centres.astype(jnp.float32).T, precision=_HIGHEST)


def virtual_embeddings(
    rng: jax.Array,
    real_emb: jax.Array,
    real_labels: jax.Array,
    centres_normalised: jax.Array,
    sigma: jax.Array,
    num_real: int,
    num_virtual: int,
    alpha: float = 0.9,
    num_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fabricates one step's virtual-class embeddings (DESIGN.md §1).

  `sigma_batch[d] = sqrt(mean_i (f(x_i)[d] - w[y_i][d])^2)` over rows with
  label != -1; the EMA is over **sigma** (not sigma^2):
  `sigma_new = alpha * sigma + (1 - alpha) * sigma_batch` (unchanged if no
  row is valid). Then `j ~ Uniform[0, k)`, `eps ~ N(0, I)`,
  `f'_j = normalise(sg(w_v[j]) + eps * sg(sigma_new))`, label `n + j`.
  Both `f(x)` and `w` enter sigma under `stop_gradient`, so the returned
  embeddings carry no gradient at all: in the loss they only move centres,
  through the logits.

  Args:
    rng: PRNG key.
    real_emb: float `[b_r, d]` L2-normalised real embeddings.
    real_labels: int `[b_r]` in [0, n), or -1.
    centres_normalised: float32 `[d, n + k (+ padding)]` column-normalised centres.
    sigma: float32 `[d]` the current EMA (`ClassCentres.sigma`).
    num_real, num_virtual: n and k (static).
    alpha: EMA weight of the old sigma.
    num_per_step: b_v; defaults to `num_virtual_per_step(k, b_r, n)`.

  Returns:
    `(virtual_emb float32 [b_v, d] normalised, virtual_labels int32 [b_v] in
    [n, n + k), new_sigma float32 [d])`.
  """
  b_r, d = real_emb.shape
  if (centres_normalised.ndim != 2 or centres_normalised.shape[0] != d
      or centres_normalised.shape[1] < num_real + num_virtual):
    raise ValueError(
        f"centres_normalised has shape {centres_normalised.shape}; expected "
        f"({d}, {num_real} + {num_virtual} [+ padding columns])."
    )
  if num_per_step is None:
    num_per_step = num_virtual_per_step(num_virtual, b_r, num_real)
  centres = jax.lax.stop_gradient(centres_normalised.astype(jnp.float32))
  real_emb = jax.lax.stop_gradient(jnp.asarray(real_emb, jnp.float32))
  real_labels = jnp.asarray(real_labels, jnp.int32)
  sigma = jax.lax.stop_gradient(jnp.asarray(sigma, jnp.float32))

  valid = (real_labels >= 0).astype(jnp.float32)[:, None]
  count = jnp.sum(valid)
  diff = real_emb - _rows(centres, real_labels)
  sigma_batch = jnp.sqrt(jnp.sum(valid * diff * diff, axis=0)
                         / jnp.maximum(count, 1.0))
  new_sigma = jnp.where(count > 0, alpha * sigma + (1.0 - alpha) * sigma_batch,
                        sigma)

  if num_per_step == 0 or num_virtual == 0:
    return (jnp.zeros((0, d), jnp.float32), jnp.zeros((0,), jnp.int32),
            new_sigma)
  rng_j, rng_eps = jax.random.split(rng)
  j = jax.random.randint(rng_j, (num_per_step,), 0, num_virtual, jnp.int32)
  labels_v = num_real + j
  eps = jax.random.normal(rng_eps, (num_per_step, d), jnp.float32)
  emb_v = l2_normalize(_rows(centres, labels_v) + eps * new_sigma[None, :])
  return jax.lax.stop_gradient(emb_v), labels_v, new_sigma


# ------------------------------------------------------------------- loss

MarginFn = Callable[[jax.Array, jax.Array], Any]


def margin_softmax_loss(
    emb: jax.Array,
    centres: jax.Array,
    labels: jax.Array,
    margin_fn: MarginFn = arcface,
    logits_sharding: Any = None,
    return_logits: bool = False,
    valid_columns: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """Margin softmax cross-entropy without gathering the logits.

  `logits = margin_fn(normalise(emb) @ normalise_columns(centres), labels)`;
  `loss_i = logsumexp(logits_i) - logits_i[y_i]`, where the max, the sum of
  exponentials and the target logit are all reductions over the class axis.
  With `centres` sharded on that axis (and optionally `logits_sharding`,
  e.g. `parallel.logical_sharding(mesh, ('batch', 'classes'))`, as a
  `with_sharding_constraint`), XLA keeps `[b, C]` sharded and only
  all-reduces `[b]` vectors.

  Args:
    emb: float `[b, d]` embeddings (normalised here).
    centres: float `[d, C]` raw class centres (normalised here per column).
    labels: int `[b]` in [0, C), -1 = ignore.
    margin_fn: `(cos [b, C], labels [b]) -> logits [b, C]` or
      `-> (logits, margin_state)` (e.g. a `functools.partial` of `adaface`).
    logits_sharding: optional sharding constraint for cosines and logits.
    return_logits: also return the logits in the aux dict (tests).
    valid_columns: optional bool `[C]`; False columns (padding) get logit -inf after the
      margin, so they take no probability and no gradient.

  Returns:
    `(loss, aux)`: mean loss over rows with label != -1 (0 if none); aux
    holds `accuracy` (top-1 over valid rows: the label logit is the row max),
    `num_valid`, and `margin_state` / `logits` when applicable.
  """
  labels = jnp.asarray(labels, jnp.int32)
  cos = cosines(emb, l2_normalize(centres, axis=0))
  if logits_sharding is not None:
    cos = jax.lax.with_sharding_constraint(cos, logits_sharding)
  out = margin_fn(cos, labels)
  aux: dict[str, Any] = {}
  if isinstance(out, tuple):
    logits, aux["margin_state"] = out
  else:
    logits = out
  logits = jnp.asarray(logits, jnp.float32)
  if valid_columns is not None:
    logits = jnp.where(valid_columns[None, :], logits, -jnp.inf)
  if logits_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)

  mask = _one_hot_mask(labels, logits.shape[-1])
  row_max = jnp.max(logits, axis=-1)
  shift = jax.lax.stop_gradient(row_max)
  lse = jnp.log(jnp.sum(jnp.exp(logits - shift[:, None]), axis=-1)) + shift
  target = jnp.sum(jnp.where(mask, logits, 0.0), axis=-1)
  valid = (labels >= 0).astype(jnp.float32)
  num_valid = jnp.sum(valid)
  denom = jnp.maximum(num_valid, 1.0)
  loss = jnp.sum((lse - target) * valid) / denom
  # argmax over a sharded axis is a variadic reduce; "the target is the row
  # max" is a plain max and says the same up to exact ties.
  correct = (target >= row_max).astype(jnp.float32) * valid
  aux["accuracy"] = jax.lax.stop_gradient(jnp.sum(correct) / denom)
  aux["num_valid"] = num_valid
  if return_logits:
    aux["logits"] = logits
  return loss, aux


# ------------------------------------------------------------- Partial FC


class Columns(NamedTuple):
  """The class-centre columns one step's softmax runs over.

  Attributes:
    centres: float `[d, C']` raw centres of the kept columns.
    ids: int32 `[C']` their column indices in the full matrix (ascending).
    valid: bool `[C']`, False for padding columns.
  """

  centres: jax.Array
  ids: jax.Array
  valid: jax.Array


def num_sampled_per_shard(num_columns: int, num_shards: int, sample_rate: float,
                          num_rows: int) -> int:
  """Columns Partial FC keeps per shard: `int(rate · C/M)`, at least the step's rows.

  arcface_torch's `PartialFC_V2` keeps `int(sample_rate · C_local)` columns per rank and, when a
  rank holds more positive classes than that, all of its positives instead. Shapes here are
  static, so the count is raised to the largest number of positives a shard can hold: every
  row of the step (`num_rows`), capped at the shard's size.
  """
  if num_columns % num_shards:
    raise ValueError(f"{num_columns} class columns do not split over {num_shards} shards")
  local = num_columns // num_shards
  return min(local, max(int(sample_rate * local), num_rows, 1))


def class_axes_of(logits_sharding: Any) -> tuple[Any, tuple[str, ...]]:
  """(mesh, mesh axes of the class dimension) of a `[b, C]` logits `NamedSharding` (or None)."""
  if logits_sharding is None:
    return None, ()
  spec = tuple(logits_sharding.spec) + (None, None)
  axes = spec[1]
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return logits_sharding.mesh, axes


def sample_columns(rng: jax.Array, centres: jax.Array, labels: jax.Array, *,
                   num_classes: int, sample_rate: float, num_shards: int | None = None,
                   logits_sharding: Any = None) -> Columns:
  """Partial FC (An et al., CVPR 2022): every positive class plus uniformly sampled negatives.

  The class axis is taken as `num_shards` equal contiguous blocks (the blocks it is sharded
  into over the mesh's model axis); each block keeps `num_sampled_per_shard(...)` of its
  columns: all of its positive classes (labels of the step in the block) and negatives drawn
  uniformly without replacement among the block's other valid columns, padding columns last.
  Everything is a per-block operation on a `[num_shards, C/M]` view (random scores, a `top_k`
  inside `jax.shard_map` over the class axes, a gather along the block's own axis), so with
  the class axis sharded no device sees another block's scores or centres; the kept `[d, M·S]`
  centres stay sharded over the class axis.

  Args:
    rng: PRNG key (the same on every device).
    centres: float `[d, C]` raw centres (C may include padding columns).
    labels: int `[b]` labels of every row the step's softmax will see (-1 = none).
    num_classes: valid columns `[0, num_classes)`; later columns are padding.
    sample_rate: fraction of each block kept (1.0 keeps every column).
    num_shards: M, blocks of the class axis; default: the class axis's devices in
      `logits_sharding` (1 without it).
    logits_sharding: the `[b, C]` logits' `NamedSharding`; its class mesh axes are the blocks.

  Returns:
    `Columns` of `M·S` columns, ascending ids.
  """
  d, num_columns = centres.shape
  mesh, axes = class_axes_of(logits_sharding)
  sharded = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if num_shards is None:
    num_shards = sharded
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  local = num_columns // num_shards
  keep = num_sampled_per_shard(num_columns, num_shards, sample_rate, labels.shape[0])
  column = jnp.arange(num_columns, dtype=jnp.int32)
  # Scores: negatives uniform in [0, 1), positives 2 (always kept), padding -1 (kept last).
  score = jax.random.uniform(rng, (num_columns,), jnp.float32)
  score = jnp.where(column < num_classes, score, -1.0)
  score = score.at[jnp.where(labels >= 0, labels, num_columns)].set(2.0, mode="drop")
  def top(block_scores):  # [blocks, local] -> sorted indices of the kept columns
    return jnp.sort(jax.lax.top_k(block_scores, keep)[1], axis=-1)

  score = score.reshape(num_shards, local)
  if axes and sharded == num_shards:  # XLA's TopK would all-gather the scores of every block
    spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0], None)
    idx = jax.shard_map(top, mesh=mesh, in_specs=spec, out_specs=spec)(score)
  else:
    idx = top(score)
  ids = (idx + (jnp.arange(num_shards, dtype=jnp.int32) * local)[:, None]).reshape(-1)
  blocks = centres.reshape(d, num_shards, local)
  kept = jnp.take_along_axis(blocks, idx[None, :, :], axis=2, mode="clip")
  return Columns(kept.reshape(d, num_shards * keep), ids, ids < num_classes)


def all_columns(centres: jax.Array, num_classes: int) -> Columns:
  """`Columns` of the whole matrix (no sampling); padding columns beyond `num_classes` masked."""
  ids = jnp.arange(centres.shape[1], dtype=jnp.int32)
  return Columns(centres, ids, ids < num_classes)


def column_labels(labels: jax.Array, ids: jax.Array) -> jax.Array:
  """Each label's position among `ids` (-1 for -1 or a label not kept).

  A compare-and-sum over the column axis (elementwise on its shards, then an all-reduce of
  `[b]`), not a gather or a search over a sharded vector.
  """
  labels = jnp.asarray(labels, jnp.int32)
  hit = labels[:, None] == ids[None, :]
  pos = jnp.sum(jnp.where(hit, jnp.arange(ids.shape[0], dtype=jnp.int32)[None, :], 0), axis=-1)
  return jnp.where(jnp.any(hit, axis=-1) & (labels >= 0), pos, -1).astype(jnp.int32)
