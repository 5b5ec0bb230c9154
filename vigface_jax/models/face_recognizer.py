"""The stage-1 network (IResNet backbone + class centres with virtual rows) and the dtype policy.

`FaceRecognizer` is what stage 1 trains (`train/fr.py`); its backbone is what every later
stage embeds faces with. It takes plain arguments, not a config section, so tests, benchmarks
and other tasks build it without a task module.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from vigface_jax.models import iresnet
from vigface_jax.models import margin as margin_lib


def compute_dtype(name: str, platform: str | None = None) -> Any:
  """'auto' → bfloat16 on GPU/TPU, float32 on CPU (`platform`, default the backend's);
  otherwise the named dtype."""
  if name == "auto":
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


class AdaFaceBuffer(nnx.Variable):
  """AdaFace running (mean, std) of feature norms; not a parameter."""


class FaceRecognizer(nnx.Module):
  """Backbone + class centres `[embed_dim, n + k]` (+ the AdaFace norm statistics)."""

  def __init__(self, arch: str, *, embed_dim: int, num_real: int, num_virtual: int,
               num_padding: int = 0, input_size: int = 112, dropout: float = 0.0, dtype: Any = jnp.float32,
               adaface: bool = False, rngs: nnx.Rngs):
    """Args: the backbone's `iresnet.VARIANTS` name, embedding size, real and virtual class
    counts, padding columns of the head (`margin.ClassCentres`), square input side (the 112 crop is resized to it), dropout before the embedding,
    compute dtype, whether to keep AdaFace's norm statistics, and initialisation RNGs."""
    self.input_size = int(input_size)
    self.backbone = iresnet.IResNet(arch, embed_dim=int(embed_dim), dropout=float(dropout),
                                    input_size=self.input_size, dtype=dtype, rngs=rngs)
    self.head = margin_lib.ClassCentres(int(embed_dim), num_real, num_virtual,
                                        num_padding=int(num_padding), rngs=rngs)
    self.adaface = AdaFaceBuffer(jnp.stack(margin_lib.AdaFaceStats.init())) if adaface else None

  def embed(self, images: jax.Array) -> jax.Array:
    """uint8 `[b, 112, 112, 3]` aligned faces → float32 `[b, embed_dim]` (not normalised)."""
    return self.backbone(iresnet.prepare(images, self.input_size))
