"""Trivial verification baselines: what a face-recognition model has to beat.

The procedural faces are only a useful stand-in for real data if recognising them takes a
trained model. These embedders need no training: raw pixels (cosine similarity of the
normalised images) and a randomly initialised convolutional network. On the held-out pairs of
`data.pairs` both should stay near chance (README reports the measured figures), while a
trained FR model goes far above.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


def normalise(images: np.ndarray | jax.Array) -> jax.Array:
  """uint8 `[..., 112, 112, 3]` → float32 in [-1, 1]: arcface_torch's `(x/255 − 0.5)/0.5`."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5


def raw_pixel_embedder() -> Callable[[np.ndarray], np.ndarray]:
  """Embedding = the flattened normalised image (verification then compares cosines)."""

  def embed(images: np.ndarray) -> np.ndarray:
    x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5
    return x.reshape(x.shape[0], -1)

  return embed


class RandomConvNet(nnx.Module):
  """A small randomly initialised CNN: four stride-2 3×3 conv + ReLU stages, mean pool, dense.

  Never trained: it measures how much of the verification task random features already solve.
  """

  def __init__(self, widths=(32, 64, 128, 256), embed_dim: int = 512, *, rngs: nnx.Rngs):
    chans = (3,) + tuple(widths)
    self.convs = nnx.List([
        nnx.Conv(chans[i], chans[i + 1], (3, 3), strides=(2, 2), rngs=rngs)
        for i in range(len(widths))
    ])
    self.head = nnx.Linear(chans[-1], embed_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float32 [batch, 112, 112, 3] → [batch, embed_dim]."""
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(x.mean(axis=(1, 2)))


def random_network_embedder(seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted embedder around a `RandomConvNet` initialised from `seed`."""
  model = RandomConvNet(rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, images):
    return nnx.merge(graphdef, state)(normalise(images))

  return lambda images: np.asarray(apply(state, images))
