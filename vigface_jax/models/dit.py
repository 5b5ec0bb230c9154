"""Pixel-space Diffusion Transformer (DiT) in Flax NNX, VIGFace stage 2's denoiser.

A port of facebookresearch/DiT `models.py` (Peebles & Xie, "Scalable Diffusion Models with
Transformers") working directly on 112×112 face images instead of VAE latents, conditioned
on a class-centre row of the stage-1 recognition head instead of a class label.

Structure (`DiT.__call__(x, t, cond)`):

* **Input.** `x` `[b, H, W, in_channels]` NHWC, for VIGFace the noisy image concatenated
  with the landmark image (6 channels); `t` `[b]` timesteps (int or float); `cond`
  `[b, cond_dim]` class-centre rows.
* **Patch embedding.** Non-overlapping `p × p` patches flattened in `(p_h, p_w, channel)`
  order and projected by a dense layer (the same function as DiT's conv with
  kernel = stride = p), plus fixed 2-D sin-cos position embeddings (DiT's
  `get_2d_sincos_pos_embed`, computed with numpy; a constant, not a parameter).
* **Conditioning.** `c = TimestepEmbedder(t) + Linear(cond_scale · cond)`: DiT's 256-frequency
  sinusoidal embedding followed by `Linear -> SiLU -> Linear`, and a learned projection
  of the condition row (replacing DiT's `LabelEmbedder`). With `extra_cond_dim` > 0 a second
  vector (stage 2's landmark moments) adds `Linear(extra)` to `c`.
* **Null condition.** Classifier-free guidance uses the **zero vector** as the
  unconditional input. Since `Linear(0) = bias`, a zero row gives exactly the learned
  "unconditional" embedding `cond_proj.bias`; `cond=None` computes that path directly
  (bit-identical to passing zeros).
* **Blocks.** adaLN-Zero transformer blocks: `SiLU(c) -> Linear(6 * hidden)` gives
  shift/scale/gate for attention and MLP; LayerNorm without affine (eps 1e-6);
  multi-head self-attention via `jax.nn.dot_product_attention`; MLP with tanh-GELU.
* **Long skips** (`long_skips=True`, not in DiT; U-ViT's, Bao et al. 2023, "All are Worth
  Words"): the outputs of the first `depth // 2` blocks are kept, and before each of the last
  `depth // 2` blocks the stream becomes `Linear([h, kept])` with the mirror block's output
  (block `depth − 1 − i` takes block `i`'s), so fine detail of the input reaches the output
  without passing every block. Each skip is initialised to `[I; 0]` (the stream unchanged),
  so the network still starts as DiT does.
* **Final layer.** adaLN (shift/scale) + LayerNorm + `Linear(p * p * out_channels)`,
  then unpatchify to `[b, H, W, out_channels]` (always float32). With `output_overlap=m`
  (not in DiT) each token predicts a `(p + 2m)²` window instead, and `fold_patches`
  overlap-adds the windows with linear cross-fades `2m` pixels wide across every patch
  border, so neighbouring tokens blend instead of meeting at a step. With `output_conv=True`
  (U-ViT's output convolution) a zero-initialised 3×3 convolution over the whole image is
  added to it, `y + Conv3x3(y)`: one filter that sees across every patch border.

Initialisation follows DiT's `initialize_weights`: xavier-uniform dense kernels (the
patch embedding on its flattened `[p * p * C, hidden]` kernel) and zero biases, normal(0.02)
timestep-MLP kernels, zero adaLN modulation and zero final linear layer, so the network
output is **exactly zero at init** and every block starts as the identity. The condition
projection is a dense layer and gets xavier-uniform like the others.

Conventions:

* **dtype contract.** Dense layers and attention run in `dtype` (bf16 on accelerators);
  parameters are `param_dtype`. LayerNorm statistics, the modulation
  `x * (1 + scale) + shift`, the gated residual stream between blocks and the output are
  float32; `jax.nn.dot_product_attention` keeps its logits/softmax in float32.
* **Logical axes** (see `parallel.DEFAULT_RULES`): kernels reading the residual stream
  are `('embed', 'mlp')` / `('embed', 'heads')`, those writing it `('mlp', 'embed')` /
  `('heads', 'embed')`, biases follow their output dimension. Input-side dimensions
  without a rule (`'patch'`, `'freq'`, `'cond'`) are replicated. The qkv projection's
  output is laid out heads-major (`[heads, 3, head_dim]` flattened), so sharding it
  over 'model' in contiguous blocks splits whole heads. With `scan_blocks=True` the
  stacked block parameters get a leading `'layers'` axis (replicated).
* **remat / scan.** `remat=True` rematerialises each block in the backward pass
  (`jax.checkpoint`); `scan_blocks=True` creates the blocks with `nnx.vmap` (parameters
  stacked over depth) and runs them with `jax.lax.scan` (one compiled block instead of
  `depth`). Both give the plain loop's result for the same weights, and both work when the
  model is called inside another JAX loop (a sampler's `lax.scan`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from vigface_jax.models import layers

LN_EPS = 1e-6
FREQ_DIM = 256
MAX_PERIOD = 10000


@dataclasses.dataclass(frozen=True)
class Variant:
  """One DiT size: hidden width, number of blocks, attention heads."""

  hidden: int
  depth: int
  heads: int


VARIANTS: dict[str, Variant] = {
    "S": Variant(384, 12, 6),
    "B": Variant(768, 12, 12),
    "L": Variant(1024, 24, 16),
    "XL": Variant(1152, 28, 16),
    # The CPU demo: a few minutes of training on 2 cores.
    "small": Variant(192, 6, 3),
    # For tests only: same code paths at a fraction of the cost.
    "tiny": Variant(32, 2, 2),
}


def get_variant(name: str) -> Variant:
  """The `Variant` called `name`; ValueError listing the known names otherwise."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown DiT variant {name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[name]


# --- Fixed embeddings (numpy / jnp functions of static shapes) -------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """DiT's 1-D sin-cos embedding: `pos` (any shape, M values) -> `[M, embed_dim]`."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """DiT's `get_2d_sincos_pos_embed`: float32 `[grid_size ** 2, embed_dim]`, row-major grid.

  The first half of the channels encodes the column (w) coordinate and the second half
  the row (h) coordinate, exactly as in DiT (which builds `np.meshgrid(grid_w, grid_h)`).
  """
  if embed_dim % 4:
    raise ValueError(f"hidden size must be a multiple of 4 for 2-D sin-cos, got {embed_dim}")
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in DiT
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  out = np.concatenate([emb_h, emb_w], axis=1).astype(np.float32)
  out.setflags(write=False)
  return out


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM,
                       max_period: int = MAX_PERIOD) -> jax.Array:
  """DiT's sinusoidal timestep embedding: `[b]` -> float32 `[b, dim]` (`[cos, sin]`)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm over the last axis without affine parameters, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LN_EPS)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """DiT's `modulate` in float32; `shift`/`scale` are `[b, hidden]`."""
  return x * (1.0 + scale[:, None].astype(jnp.float32)) + shift[:, None].astype(jnp.float32)


# --- Layers ----------------------------------------------------------------

class TimestepEmbedder(nnx.Module):
  """DiT's `TimestepEmbedder`: `[b]` timesteps -> `[b, hidden]` (compute dtype)."""

  def __init__(self, hidden: int, c: layers.Common, rngs: nnx.Rngs):
    normal = nnx.initializers.normal(0.02)
    self.dtype = c.dtype
    self.fc1 = c.dense(FREQ_DIM, hidden, ("freq", "mlp"), rngs, kernel_init=normal)
    self.fc2 = c.dense(hidden, hidden, ("mlp", "embed"), rngs, kernel_init=normal)

  def __call__(self, t: jax.Array) -> jax.Array:
    h = self.fc1(timestep_embedding(t).astype(self.dtype))
    return self.fc2(jax.nn.silu(h))


class Attention(nnx.Module):
  """Multi-head self-attention: `[b, n, hidden]` -> `[b, n, hidden]` (compute dtype)."""

  def __init__(self, hidden: int, heads: int, c: layers.Common, rngs: nnx.Rngs):
    if hidden % heads:
      raise ValueError(f"hidden size {hidden} is not divisible by heads {heads}")
    self.heads = heads
    self.dtype = c.dtype
    self.qkv = c.dense(hidden, 3 * hidden, ("embed", "heads"), rngs)
    self.proj = c.dense(hidden, hidden, ("heads", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x.astype(self.dtype)).reshape(b, n, self.heads, 3, d // self.heads)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """`Linear -> GELU(tanh) -> Linear`, `[..., hidden]` -> `[..., hidden]`."""

  def __init__(self, hidden: int, mlp_hidden: int, c: layers.Common, rngs: nnx.Rngs):
    self.dtype = c.dtype
    self.fc1 = c.dense(hidden, mlp_hidden, ("embed", "mlp"), rngs)
    self.fc2 = c.dense(mlp_hidden, hidden, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x.astype(self.dtype)), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero block: `x` float32 `[b, n, hidden]`, `c` `[b, hidden]` -> float32 `x`."""

  def __init__(self, hidden: int, heads: int, mlp_ratio: float, c: layers.Common, rngs: nnx.Rngs):
    self.dtype = c.dtype
    self.attn = Attention(hidden, heads, c, rngs)
    self.mlp = Mlp(hidden, int(hidden * mlp_ratio), c, rngs)
    self.adaLN_modulation = c.dense(  # pylint: disable=invalid-name
        hidden, 6 * hidden, ("embed", "mlp"), rngs, kernel_init=layers.ZEROS)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = self.adaLN_modulation(jax.nn.silu(c.astype(self.dtype))).astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = self.attn(_modulate(_layer_norm(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None] * h.astype(jnp.float32)
    h = self.mlp(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
    return x + gate_mlp[:, None] * h.astype(jnp.float32)


class FinalLayer(nnx.Module):
  """DiT's `FinalLayer`: adaLN + LayerNorm + zero linear -> float32 `[b, n, p * p * out]`."""

  def __init__(self, hidden: int, patch_dim: int, c: layers.Common, rngs: nnx.Rngs):
    self.dtype = c.dtype
    self.adaLN_modulation = c.dense(  # pylint: disable=invalid-name
        hidden, 2 * hidden, ("embed", "mlp"), rngs, kernel_init=layers.ZEROS)
    self.linear = c.dense(hidden, patch_dim, ("embed", "patch"), rngs, kernel_init=layers.ZEROS)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = self.adaLN_modulation(jax.nn.silu(c.astype(self.dtype))).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, -1)
    x = _modulate(_layer_norm(x), shift, scale)
    return self.linear(x.astype(self.dtype)).astype(jnp.float32)


class LongSkips(nnx.Module):
  """U-ViT's long skip connections: `k` linear maps `[h, kept] (2·hidden) -> hidden`.

  Stacked over the `k` skips (`kernel` `[k, 2·hidden, hidden]`), so the scanned and the
  unrolled block loops read the same parameters. Initialised to `[I; 0]` and zero bias: each
  skip passes the stream through unchanged until training gives the kept output a weight.
  """

  def __init__(self, count: int, hidden: int, c: layers.Common):
    eye = jnp.concatenate([jnp.eye(hidden), jnp.zeros((hidden, hidden))], axis=0)
    self.dtype = c.dtype
    self.kernel = nnx.Param(jnp.tile(eye[None], (count, 1, 1)).astype(c.param_dtype),
                            **layers.meta("layers", "skip", "embed"))
    self.bias = nnx.Param(jnp.zeros((count, hidden), c.param_dtype),
                          **layers.meta("layers", "embed"))

  def apply(self, kernel: jax.Array, bias: jax.Array, h: jax.Array, kept: jax.Array
            ) -> jax.Array:
    """One skip (`kernel` `[2·hidden, hidden]`): float32 `[b, n, hidden]`."""
    x = jnp.concatenate([h, kept], axis=-1).astype(self.dtype)
    y = jnp.einsum("bnd,de->bne", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return y.astype(jnp.float32)


@jax.custom_vjp
def gradient_boundary(x: jax.Array) -> jax.Array:
  """Identity whose cotangent passes through a data-dependent `lax.cond` (both branches the
  identity), so XLA materialises the residual stream's gradient at each unrolled block's
  output instead of fusing the whole backward chain into every block's weight-gradient
  transposes (`benchmarks/profile_step.py --bench=dit`; `optimization_barrier` is expanded
  away before fusion on XLA:CPU). Values and gradients are unchanged."""
  return x


def _boundary_fwd(x):
  return x, None


def _boundary_bwd(_, g):
  keep = jnp.isfinite(g.reshape(-1)[0])  # runtime: XLA cannot fold the conditional away
  return (jax.lax.cond(keep, lambda v: v * 1.0, lambda v: v, g),)


gradient_boundary.defvjp(_boundary_fwd, _boundary_bwd)


def _run_blocks(blocks: Any, h: jax.Array, c: jax.Array, *, remat: bool, scan: bool,
                skips: LongSkips | None = None) -> jax.Array:
  """Runs the blocks (a list, or one stacked block when `scan`), optionally rematerialised,
  with U-ViT's long skips when `skips` is given (see the module docstring).

  Scan and remat are plain `jax.lax.scan` / `jax.checkpoint` over the blocks' split state,
  re-merged inside, not `nnx.scan` / `nnx.remat`: those refuse modules created at another trace
  level, which is exactly how samplers use the DiT (merged under `jax.jit`, called inside the
  sampler's `lax.scan`). The blocks hold no mutable state, so nothing flows back out.
  """

  def apply(graphdef: nnx.GraphDef, state: Any, h: jax.Array, c: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(h, c)

  def step(block_graphdef: nnx.GraphDef, state: Any, h: jax.Array) -> jax.Array:
    fn = functools.partial(apply, block_graphdef)
    return (jax.checkpoint(fn) if remat else fn)(state, h, c)

  if scan:
    graphdef, state = nnx.split(blocks)
    depth = jax.tree.leaves(state)[0].shape[0]
  else:
    listed = list(blocks)
    depth = len(listed)

  def call(i: int, h: jax.Array) -> jax.Array:  # unrolled block i
    if remat:
      return gradient_boundary(step(*nnx.split(listed[i]), h))
    return gradient_boundary(listed[i](h, c))

  k = depth // 2 if skips is not None else 0

  def run(h: jax.Array, lo: int, hi: int, keep: bool = False, kept: Any = None):
    """Blocks lo..hi−1; `keep`: also return their outputs; `kept`: skip inputs (in order)."""
    if hi <= lo:
      return h, None
    if scan:
      part = jax.tree.map(lambda x: x[lo:hi], state)

      def body(h, xs):
        s, skip = xs
        if skip is not None:
          kernel, bias, kept_i = skip
          h = skips.apply(kernel, bias, h, kept_i)
        h = step(graphdef, s, h)
        return h, (h if keep else None)

      extra = None if kept is None else (skips.kernel[...], skips.bias[...], kept)
      return jax.lax.scan(body, h, (part, extra))
    outs = []
    for j, i in enumerate(range(lo, hi)):
      if kept is not None:
        h = skips.apply(skips.kernel[...][j], skips.bias[...][j], h, kept[j])
      h = call(i, h)
      outs.append(h)
    return h, (jnp.stack(outs) if keep else None)

  h, saved = run(h, 0, k, keep=k > 0)
  h, _ = run(h, k, depth - k)
  if k:
    h, _ = run(h, depth - k, depth, kept=saved[::-1])
  return h


# --- The network -------------------------------------------------------------


class DiT(nnx.Module):
  """Diffusion Transformer: `(x, t, cond)` -> float32 `[b, H, W, out_channels]`."""

  def __init__(
      self,
      variant: str | Variant,
      *,
      patch_size: int = 8,
      input_size: int = 112,
      in_channels: int = 6,
      out_channels: int = 3,
      cond_dim: int = 512,
      cond_scale: float = 1.0,
      mlp_ratio: float = 4.0,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      precision: jax.lax.Precision | None = None,
      remat: bool = False,
      scan_blocks: bool = False,
      output_overlap: int = 0,
      long_skips: bool = False,
      output_conv: bool = False,
      extra_cond_dim: int = 0,
      rngs: nnx.Rngs,
  ):
    """Creates a DiT initialised as DiT's `initialize_weights` (output exactly zero).

    Args:
      variant: a `VARIANTS` name ('S', 'B', 'L', 'XL', 'small', 'tiny') or a `Variant`.
      patch_size: side of the square patches; must divide `input_size` (for 112:
        1, 2, 4, 7, 8, 14, 16, ...).
      input_size: square image side.
      in_channels: input channels (noisy image ⊕ landmark image: 6).
      out_channels: predicted channels (3: the noise or the clean image).
      cond_dim: size of a condition row (the stage-1 class centre, 512).
      cond_scale: constant multiplying the condition before its projection. Class-centre
        rows are unit vectors (components ~1/√d); VIGFace's stage 2 passes √cond_dim so the
        projection sees unit-RMS inputs like every other layer, which makes the condition
        learnable at the same rate as the rest (with 1.0 the DiT long ignores it at high
        noise). The zero row stays the null condition.
      mlp_ratio: MLP hidden size / hidden size.
      dtype: compute dtype (see the module docstring for what stays float32).
      param_dtype: parameter dtype.
      precision: matmul precision (None: backend default).
      remat: rematerialise each block in the backward pass (`jax.checkpoint`).
      scan_blocks: stack the blocks' parameters over depth and run them with `jax.lax.scan`.
      output_overlap: m ≥ 0 pixels; each token predicts a `(p + 2m)²` window centred on its
        patch and the windows are overlap-added with linear cross-fades `2m` pixels wide
        across every patch border (`fold_patches`). 0 is DiT's plain unpatchify. Tokens
        predict their patches independently, so an undertrained DiT with large patches draws
        a mosaic with a step at every border; the cross-fade makes the image continuous
        wherever the tokens' own windows are, at the cost of a wider final layer.
      long_skips: U-ViT's long skip connections between the first and last `depth // 2`
        blocks (module docstring), each initialised to pass the stream through.
      output_conv: a zero-initialised 3×3 convolution added to the output image.
      extra_cond_dim: size of a second condition vector (`extra` in `__call__`; stage 2's
        landmark moments), projected by its own dense layer and added to `c`; 0 = none.
      rngs: initialisation RNGs.

    Raises:
      ValueError: unknown variant, a patch size that does not divide `input_size`, a
        hidden size that heads / 2-D sin-cos cannot split, or an `output_overlap` outside
        [0, patch_size / 2].
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    if patch_size < 1 or input_size % patch_size:
      divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
      raise ValueError(f"patch_size must divide input_size={input_size} (one of {divisors}), "
                       f"got {patch_size}")
    if v.hidden % 4:
      raise ValueError(f"hidden size must be a multiple of 4, got {v.hidden}")
    if not 0 <= 2 * output_overlap <= patch_size:
      raise ValueError(f"output_overlap must be in [0, patch_size / 2 = {patch_size // 2}] "
                       f"(the cross-fades of a patch's two borders must not meet), got "
                       f"{output_overlap}")
    c = layers.Common(dtype, param_dtype, precision)
    self.variant = v
    self.patch_size = patch_size
    self.input_size = input_size
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.cond_dim = cond_dim
    self.cond_scale = float(cond_scale)
    self.dtype = dtype
    self.remat = remat
    self.scan_blocks = scan_blocks
    self.output_overlap = int(output_overlap)
    hidden = v.hidden
    self.x_embedder = c.dense(patch_size * patch_size * in_channels, hidden,
                              ("patch", "embed"), rngs)
    self.t_embedder = TimestepEmbedder(hidden, c, rngs)
    self.cond_proj = c.dense(cond_dim, hidden, ("cond", "embed"), rngs)
    self.extra_cond_dim = int(extra_cond_dim)
    self.extra_proj = (c.dense(self.extra_cond_dim, hidden, ("cond", "embed"), rngs)
                       if self.extra_cond_dim else None)
    if scan_blocks:
      @nnx.split_rngs(splits=v.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create_blocks(rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(hidden, v.heads, mlp_ratio, c, rngs)

      self.blocks = create_blocks(rngs)
    else:
      self.blocks = nnx.List([DiTBlock(hidden, v.heads, mlp_ratio, c, rngs)
                              for _ in range(v.depth)])
    self.long_skips = LongSkips(v.depth // 2, hidden, c) if long_skips else None
    window = patch_size + 2 * self.output_overlap
    self.final_layer = FinalLayer(hidden, window * window * out_channels, c, rngs)
    self.output_conv = (c.conv(out_channels, out_channels, (3, 3), rngs, padding="SAME",
                               kernel_init=layers.ZEROS) if output_conv else None)

  @property
  def grid_size(self) -> int:
    """Patches per side."""
    return self.input_size // self.patch_size

  def patchify(self, x: jax.Array) -> jax.Array:
    """`[b, H, W, C]` -> `[b, (H/p) * (W/p), p * p * C]`, patches row-major, (p_h, p_w, C)."""
    b, _, _, ch = x.shape
    p, g = self.patch_size, self.grid_size
    x = x.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, p * p * ch)

  def unpatchify(self, x: jax.Array) -> jax.Array:
    """Inverse of `patchify`: `[b, n, p * p * C]` -> `[b, H, W, C]`."""
    b = x.shape[0]
    p, g = self.patch_size, self.grid_size
    ch = x.shape[-1] // (p * p)
    x = x.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, ch)

  def embed_condition(self, t: jax.Array, cond: jax.Array | None) -> jax.Array:
    """`c = t_emb + Linear(cond_scale · cond)`; `cond=None` is the null (all-zero) condition."""
    t_emb = self.t_embedder(t)
    if cond is None:
      # Linear(0) == bias exactly: the unconditional embedding.
      y_emb = self.cond_proj.bias[...].astype(self.dtype)[None]
    else:
      y_emb = self.cond_proj((jnp.asarray(cond) * self.cond_scale).astype(self.dtype))
    return t_emb + y_emb

  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array | None = None,
               extra: jax.Array | None = None) -> jax.Array:
    """Predicts the denoiser target.

    Args:
      x: `[b, input_size, input_size, in_channels]` NHWC (noisy image ⊕ landmarks).
      t: `[b]` timesteps, int or float (a scalar is broadcast over the batch).
      cond: `[b, cond_dim]` condition rows, or None for the null condition (equal to a
        zero row: see the module docstring).
      extra: `[b, extra_cond_dim]` second condition (required when `extra_cond_dim` > 0;
        classifier-free guidance leaves it in both halves: only `cond` is dropped).

    Returns:
      float32 `[b, input_size, input_size, out_channels]`.
    """
    expected = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"DiT input must be [batch, {', '.join(map(str, expected))}], "
                       f"got {x.shape}")
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    if cond is not None and tuple(cond.shape) != (b, self.cond_dim):
      raise ValueError(f"cond must be [{b}, {self.cond_dim}], got {cond.shape}")
    pos = get_2d_sincos_pos_embed(self.variant.hidden, self.grid_size)
    h = self.x_embedder(self.patchify(x.astype(self.dtype))).astype(jnp.float32)
    h = h + jnp.asarray(pos)[None]
    c = self.embed_condition(t, cond)
    if self.extra_proj is not None:
      if extra is None or tuple(extra.shape) != (b, self.extra_cond_dim):
        raise ValueError(f"extra must be [{b}, {self.extra_cond_dim}], got "
                         f"{None if extra is None else extra.shape}")
      c = c + self.extra_proj(extra.astype(self.dtype))
    h = _run_blocks(self.blocks, h, c, remat=self.remat, scan=self.scan_blocks,
                    skips=self.long_skips)
    out = self.final_layer(h, c)
    if self.output_overlap:
      y = fold_patches(out, self.patch_size, self.output_overlap)
    else:
      y = self.unpatchify(out)
    if self.output_conv is not None:
      y = y + self.output_conv(y.astype(self.dtype)).astype(jnp.float32)
    return y


# --- Overlapping output windows --------------------------------------------


def _crossfade_window(patch: int, overlap: int) -> np.ndarray:
  """1-D weights over a `patch + 2 * overlap` window: linear ramps across both borders.

  Position k is pixel k − overlap of the patch. Over the 2·overlap pixels around a border
  the outgoing token's weight falls as the incoming one's rises, summing to exactly 1.
  """
  ramp = (np.arange(2 * overlap) + 0.5) / (2 * overlap)
  return np.concatenate([ramp, np.ones(patch - 2 * overlap), ramp[::-1]]).astype(np.float32)


def _fold_axis(y: jax.Array, token_axis: int, pixel_axis: int, patch: int, overlap: int
               ) -> jax.Array:
  """Overlap-adds windows of `patch + 2·overlap` along one axis into patches of `patch`."""
  def take(a, start, stop):
    return jax.lax.slice_in_dim(a, start, stop, axis=pixel_axis)

  def shift(a, by):  # token n receives token n − by; zeros enter at the edge
    pad = [(0, 0)] * a.ndim
    pad[token_axis] = (by, 0) if by > 0 else (0, -by)
    a = jnp.pad(a, pad)
    n = a.shape[token_axis]
    return jax.lax.slice_in_dim(a, 0, n - by, axis=token_axis) if by > 0 else \
        jax.lax.slice_in_dim(a, -by, n, axis=token_axis)

  def place(a, before, after):
    pad = [(0, 0)] * a.ndim
    pad[pixel_axis] = (before, after)
    return jnp.pad(a, pad)

  m, p = overlap, patch
  out = take(y, m, m + p)
  out = out + place(shift(take(y, p + m, p + 2 * m), 1), 0, p - m)  # previous token's tail
  out = out + place(shift(take(y, 0, m), -1), p - m, 0)  # next token's head
  return out


def fold_patches(tokens: jax.Array, patch: int, overlap: int) -> jax.Array:
  """`[b, g², (p + 2m)² · C]` overlapping token windows -> `[b, g·p, g·p, C]` image.

  Each window is weighted by the separable cross-fade of `_crossfade_window` and added
  into place; at the image border, where a window has no neighbour, the weights are
  renormalised, so tokens that all predict one colour give exactly that colour everywhere.
  `overlap=0` is `DiT.unpatchify`.
  """
  b, n, d = tokens.shape
  g = math.isqrt(n)
  k = patch + 2 * overlap
  ch = d // (k * k)
  if g * g != n or ch * k * k != d or not 0 <= 2 * overlap <= patch:
    raise ValueError(f"fold_patches: {tokens.shape} is not [b, g², ({patch} + 2·{overlap})² "
                     "· C] with 2·overlap ≤ patch")
  w = _crossfade_window(patch, overlap)
  y = tokens.reshape(b, g, g, k, k, ch) * jnp.asarray(w[:, None, None] * w[None, :, None])
  y = _fold_axis(y, 2, 4, patch, overlap)  # columns
  y = _fold_axis(y, 1, 3, patch, overlap)  # rows
  # Weight each pixel received (1 except in the outer half-ramps of the image border).
  norm = np.zeros(g * patch + 2 * overlap, np.float32)
  for i in range(g):
    norm[i * patch:i * patch + k] += w
  norm = norm[overlap:overlap + g * patch]
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * patch, g * patch, ch)
  return y / jnp.asarray(norm[:, None, None] * norm[None, :, None])


# --- Parameter counting ---------------------------------------------------


def parameter_count(variant: str | Variant, patch_size: int = 8, **kwargs: Any) -> int:
  """Number of `nnx.Param` entries of a DiT, from an abstract init (no memory).

  `kwargs` go to `DiT` (input_size, in_channels, out_channels, cond_dim, mlp_ratio, ...).
  The fixed position embedding is not a parameter and is not counted.
  """
  model = nnx.eval_shape(
      lambda: DiT(variant, patch_size=patch_size, rngs=nnx.Rngs(0), **kwargs))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def copy_into_scanned(plain: DiT, scanned: DiT) -> None:
  """Loads an unrolled DiT's parameters into a `scan_blocks=True` DiT of the same shape.

  Block parameters are stacked over depth (block i at index i of the leading axis). Every
  array is a copy, so `plain` may be changed or donated afterwards.
  """
  pure = jax.tree.map(jnp.array, nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
  blocks = pure.pop("blocks")
  pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(scanned, state)
