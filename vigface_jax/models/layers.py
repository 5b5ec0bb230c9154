"""Layers and constructor helpers shared by the project's networks (IResNet, DiT, O-Net).

* `PReLU`: PyTorch's per-channel `nn.PReLU(channels)` (flax's has one scalar slope).
* `meta(*names)`: logical-axis metadata of a variable (`out_sharding`), placed later by the
  trainer (eval_shape → shardings → jitted init), never at construction.
* `Common`: the dtype / param dtype / precision one network passes to all its layers, with
  constructors for the layers that take them (dense, conv, batch norm, PReLU).
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

XAVIER = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()


def meta(*names: str) -> dict[str, Any]:
  """Variable metadata naming its logical axes (see `parallel.DEFAULT_RULES`).

  eager_sharding=False: the names are only metadata here; state is placed by the trainer
  (eval_shape → shardings → jitted init), not at construction.
  """
  return {"out_sharding": names, "eager_sharding": False}


class PReLU(nnx.Module):
  """Parametric ReLU with one slope per channel (PyTorch `nn.PReLU(channels)`).

  `flax.nnx.PReLU` has a single scalar slope, which cannot hold MTCNN's or arcface_torch's
  per-channel weights.
  """

  def __init__(self, channels: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, axes: tuple[str, ...] | None = None):
    """Creates the slopes, initialised to PyTorch's 0.25.

    Args:
      channels: size of the last input axis.
      dtype: compute dtype.
      param_dtype: dtype of the slopes.
      axes: logical axis name of the slopes (e.g. `('channels_out',)`), or None.
    """
    self.dtype = dtype
    self.weight = nnx.Param(jnp.full((channels,), 0.25, dtype=param_dtype),
                            **(meta(*axes) if axes else {}))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies `max(x, 0) + weight * min(x, 0)` along the last axis `[..., channels]`."""
    x = x.astype(self.dtype)
    slope = self.weight[...].astype(self.dtype)
    return jnp.where(x >= 0, x, slope * x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over every axis but the last: `(y, mean, var)` (float32).

  The same function as `nnx.BatchNorm` in training mode (fast variance `E[x²] − E[x]²`
  clipped at 0, biased batch variance, `y = (x − mean)·rsqrt(var + ε)·scale + bias`), with
  a hand-written backward pass that reads `x` and `dy` twice (one pass for `Σdy` and
  `Σdy·x̂`, one for `dx`) instead of differentiating every elementwise step: XLA:CPU
  otherwise materialises `x − mean` and the normalised copy in several fusions per layer
  (`benchmarks/profile_step.py`). `mean` and `var` are for the running statistics only:
  their cotangents are ignored, so callers must `stop_gradient` them (as `nnx.BatchNorm`
  does).
  """
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale * inv
  y = x * a + (bias - mean * a)
  return (y, mean, var), (x, mean, inv, scale)


def _bn_backward(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy = cotangents[0]
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x - mean) * inv
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * xhat, axes)
  dx = (scale * inv) * (dy - (dbias + xhat * dscale) / n)
  return dx, dscale, dbias


batch_norm_train.defvjp(_bn_forward, _bn_backward)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` over the last axis whose training-mode call is `batch_norm_train`: the
  same variables, statistics and results (to float32 rounding), fewer passes over the
  activations. Evaluation mode (running statistics) is `nnx.BatchNorm`'s."""

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    running = self.use_running_average if use_running_average is None else use_running_average
    if running or mask is not None or self.axis_name is not None or self.axis not in (
        -1, x.ndim - 1) or self.scale is None or self.bias is None:
      return super().__call__(x, use_running_average, mask=mask)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    y, mean, var = batch_norm_train(f32(x), f32(self.scale[...]), f32(self.bias[...]),
                                    float(self.epsilon))
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
    return y.astype(self.dtype or y.dtype)


class Common:
  """Constructor arguments shared by every layer of one network."""

  def __init__(self, dtype: Any, param_dtype: Any, precision: Any,
               rngs: nnx.Rngs | None = None):
    """`rngs`: the default initialisation RNGs of the constructors below (or pass each)."""
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.rngs = rngs

  def dense(self, n_in: int, n_out: int, axes: tuple[str, str], rngs: nnx.Rngs | None = None,
            *, kernel_init: Any = XAVIER) -> nnx.Linear:
    """A Linear with logical axes `axes` on the kernel and `axes[1]` on the bias (zero)."""
    return nnx.Linear(
        n_in, n_out, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, kernel_init=kernel_init, bias_init=ZEROS,
        kernel_metadata=meta(*axes), bias_metadata=meta(axes[1]), rngs=rngs or self.rngs,
    )

  def conv(self, n_in: int, n_out: int, kernel: tuple[int, int],
           rngs: nnx.Rngs | None = None, *,
           axes: tuple[str, ...] = ("conv_h", "conv_w", "channels_in", "channels_out"),
           **kwargs: Any) -> nnx.Conv:
    """A bias-free convolution (`kwargs`: strides, padding) with logical kernel axes."""
    return nnx.Conv(n_in, n_out, kernel, use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision,
                    kernel_metadata=meta(*axes), rngs=rngs or self.rngs, **kwargs)

  def batch_norm(self, channels: int, rngs: nnx.Rngs | None = None, *, epsilon: float = 1e-5,
                 momentum: float = 0.9, axis: str = "channels_out") -> nnx.BatchNorm:
    """BatchNorm computed in float32, parameters in `param_dtype` (defaults: PyTorch's
    eps 1e-5 and momentum 0.1, i.e. flax decay 0.9)."""
    return BatchNorm(channels, epsilon=epsilon, momentum=momentum, dtype=jnp.float32,
                     param_dtype=self.param_dtype, scale_metadata=meta(axis),
                     bias_metadata=meta(axis), rngs=rngs or self.rngs)

  def prelu(self, channels: int, axis: str = "channels_out") -> PReLU:
    """A per-channel PReLU in the compute dtype."""
    return PReLU(channels, dtype=self.dtype, param_dtype=self.param_dtype, axes=(axis,))
