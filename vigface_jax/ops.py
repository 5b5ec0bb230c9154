"""Small array helpers every stage shares: L2-normalisation and batching with a padded tail.

* `l2_normalize` (jnp, inside jitted code) and `l2_normalize_np` (numpy, on the host).
* `pad_batch` / `map_batches`: run a function compiled for one batch shape over any number of
  examples, padding the last batch (so one compilation serves every count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12, *,
                 safe_grad: bool = True) -> jax.Array:
  """`x / max(‖x‖, eps)` along `axis`, in float32.

  `safe_grad=True` computes it as `x · rsqrt(max(‖x‖², eps²))`, whose gradient is finite at
  zero (the identity loss differentiates through it). `safe_grad=False` divides by
  `max(sqrt(‖x‖²), eps)`: the same values, a gradient rounded differently, kept for the
  margin head so that stage-1 runs reproduce bit for bit.
  """
  x = jnp.asarray(x, jnp.float32)
  if safe_grad:  # `square`'s gradient rounds as 2·x·g, `x * x`'s as x·g + x·g: keep each
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), eps)


def l2_normalize_np(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  """Numpy `x / max(‖x‖, eps)` along `axis`, float32 (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def pad_batch(x: np.ndarray, size: int, fill: str = "zeros") -> tuple[np.ndarray, int]:
  """`(x padded along axis 0 to `size`, number of real rows)`.

  `fill='zeros'` pads with zeros, `'first'` with copies of the first row (for inputs where a
  zero would be out of range, e.g. landmark images in [-1, 1]).
  """
  n = x.shape[0]
  if n > size:
    raise ValueError(f"pad_batch: {n} rows do not fit a batch of {size}")
  if n == size:
    return x, n
  if fill == "first":
    tail = np.repeat(x[:1], size - n, axis=0)
  else:
    tail = np.zeros((size - n,) + x.shape[1:], x.dtype)
  return np.concatenate([x, tail]), n


def map_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch: int, *,
                fills: Sequence[str] | None = None,
                seeds: Callable[[int], Any] | None = None) -> np.ndarray:
  """`concatenate([fn(*chunks[, seeds(start)]) for each batch])[:n]`, every call of shape `batch`.

  Args:
    fn: called on `batch` rows of each array (and the batch's `seeds(start)` if given);
      returns an array whose first axis is the batch.
    arrays: inputs with the same first axis `n`.
    batch: the one batch size `fn` sees; the last batch is padded (`pad_batch`).
    fills: per array, `pad_batch`'s fill (default zeros).
    seeds: `start -> extra argument` (e.g. a PRNG key per batch start).
  """
  n = arrays[0].shape[0]
  fills = fills or ["zeros"] * len(arrays)
  out = []
  for start in range(0, n, batch):
    chunks = [pad_batch(np.asarray(a[start:start + batch]), batch, f)[0]
              for a, f in zip(arrays, fills)]
    extra = (seeds(start),) if seeds is not None else ()
    real = min(batch, n - start)
    out.append(np.asarray(fn(*chunks, *extra))[:real])
  if not out:
    raise ValueError("map_batches: no rows")
  return np.concatenate(out)
