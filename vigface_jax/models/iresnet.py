"""IResNet / IR-SE face-recognition backbones in Flax NNX (arcface_torch layout).

A port of insightface's `recognition/arcface_torch/backbones/iresnet.py`
(`iresnet18/34/50/100/200`) plus the squeeze-excitation variants (IR-SE) used
as VIGFace's evaluation backbone. Parameter names and counts follow the
PyTorch original, so `load_insightface_state_dict` maps an arcface_torch
`state_dict` one-to-one and the converted network gives the same embeddings.

Structure (`IResNet`, input `[batch, 112, 112, 3]`):

* stem: conv3x3 (3 -> w0, stride 1, no bias) -> BN -> per-channel PReLU;
* four stages of `IBasicBlock`s with widths `w0..w3` (64/128/256/512 for the
  real variants), stride 2 in the first block of every stage. A block is
  `BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN [-> SE]`, plus the
  shortcut (1x1 conv(stride) + BN when the shape changes, which with stride 2
  everywhere is the first block of each stage) and a residual add;
* head: BN2d -> flatten -> dropout (p = 0 by default) -> Linear(w3 * 7 * 7 ->
  embed_dim) -> BatchNorm1d(embed_dim). The final BN's scale is frozen at 1 in
  arcface_torch (`requires_grad=False`); here it is an ordinary parameter
  (counted like PyTorch counts it; keep it fixed in the optimizer if wanted).

IR-SE (our choice, after face.evoLVe's `SEModule`, documented because
arcface_torch has no SE variant): in every block after the last BN,
`avgpool -> 1x1 conv C -> C // 16 (no bias) -> ReLU -> 1x1 conv C // 16 -> C
(no bias) -> sigmoid -> scale the block output`, applied before the residual
add. State-dict keys `layerX.Y.se.fc1.weight` / `layerX.Y.se.fc2.weight`
(PyTorch `[out, in, 1, 1]`). The bottleneck width is `max(1, C // 16)` so the
tiny test variant still works.

Conventions:

* **Layout.** NHWC. PyTorch flattens the `[batch, C, 7, 7]` features in
  (C, H, W) order before `fc`; `IResNet.__call__` transposes NHWC -> NCHW
  before flattening, so `fc.kernel` is exactly PyTorch's `fc.weight.T` and the
  converter needs no permutation.
* **Input.** uint8 images are normalised by `preprocess`
  (`(x / 255 - 0.5) / 0.5`, arcface_torch's convention); float images are
  taken as already normalised.
* **dtype contract.** `dtype` is the compute dtype of convolutions, PReLUs and
  the SE gate's convolutions; `param_dtype` the dtype of every parameter.
  BatchNorm always normalises in float32 (input upcast, statistics and
  running averages float32) and returns the compute dtype; the SE pooling and
  sigmoid are float32; the final `fc` and BatchNorm1d run in float32 (as
  arcface_torch does under fp16), so the embedding is **always float32**.
* **Train/eval.** `model.train()` / `model.eval()` switch BatchNorm between
  batch statistics and running averages (and dropout on/off). BN momentum is
  0.9 (PyTorch's 0.1); flax updates `var` with the biased batch variance,
  PyTorch with the unbiased one (irrelevant for converted weights).
* **Logical axes.** Conv kernels `('conv_h', 'conv_w', 'channels_in',
  'channels_out')`, per-channel vectors (BN, PReLU) `('channels_out',)`, the
  head `fc` kernel `('embed_in', 'embed')` and its vectors `('embed',)`.
  With `parallel.DEFAULT_RULES` convolutions are replicated, `embed` goes
  over 'fsdp' and `embed_in` (no rule) is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from vigface_jax.models import layers
from vigface_jax.models import onet

BN_EPS = 1e-5
# PyTorch BatchNorm momentum 0.1 == flax decay 0.9.
BN_MOMENTUM = 0.9
SE_REDUCTION = 16
# Spatial reduction of the four stride-2 stages: 112 -> 7.
_DOWNSAMPLE = 16


@dataclasses.dataclass(frozen=True)
class Variant:
  """One backbone size: blocks per stage, stage widths, squeeze-excitation."""

  layers: tuple[int, int, int, int]
  widths: tuple[int, int, int, int] = (64, 128, 256, 512)
  se: bool = False


VARIANTS: dict[str, Variant] = {
    "r18": Variant((2, 2, 2, 2)),
    "r34": Variant((3, 4, 6, 3)),
    "r50": Variant((3, 4, 14, 3)),
    "r100": Variant((3, 13, 30, 3)),
    "r200": Variant((6, 26, 60, 6)),
    "ir_se50": Variant((3, 4, 14, 3), se=True),
    "ir_se100": Variant((3, 13, 30, 3), se=True),
    # The CPU demo (configs/fr.py:demo): a few minutes of training on 2 cores.
    "small": Variant((1, 2, 2, 1), (16, 32, 64, 128)),
    # The demo's independent auditor (configs/fr.py:auditor): the same size with SE blocks.
    "small_se": Variant((1, 2, 2, 1), (16, 32, 64, 128), se=True),
    # For tests only: same code paths at a fraction of the cost.
    "tiny": Variant((1, 1, 1, 1), (8, 16, 32, 64)),
    "tiny_se": Variant((1, 1, 1, 1), (8, 16, 32, 64), se=True),
}


def get_variant(name: str) -> Variant:
  """The `Variant` called `name`; ValueError listing the known names otherwise."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown IResNet variant {name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[name]


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 `[batch, height, width, 3]` RGB -> float32 `(x / 255 - 0.5) / 0.5` in [-1, 1]."""
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - 0.5) / 0.5


def prepare(images: jax.Array, input_size: int = 112) -> jax.Array:
  """Aligned 112×112 faces (uint8, or float in [-1, 1]) → normalised `[b, input_size, input_size, 3]`.

  A backbone trained at a reduced `input_size` (the CPU demo) sees the 112×112 crop resized
  with an antialiasing linear filter, at training and at evaluation alike.
  """
  x = preprocess(images) if images.dtype == jnp.uint8 else jnp.asarray(images, jnp.float32)
  if x.shape[1:3] != (input_size, input_size):
    x = jax.image.resize(x, (x.shape[0], input_size, input_size, x.shape[3]), "linear",
                         antialias=True)
  return x


def _bn(bn: nnx.BatchNorm, x: jax.Array, dtype: Any) -> jax.Array:
  """BatchNorm in float32, result in the compute dtype."""
  return bn(x.astype(jnp.float32)).astype(dtype)


class SEModule(nnx.Module):
  """Squeeze-excitation gate (face.evoLVe `SEModule`), `[b, h, w, C]` -> same shape."""

  def __init__(self, channels: int, c: layers.Common, reduction: int = SE_REDUCTION):
    hidden = max(1, channels // reduction)
    self.dtype = c.dtype
    self.fc1 = c.conv(channels, hidden, (1, 1), padding="VALID")
    self.fc2 = c.conv(hidden, channels, (1, 1), padding="VALID")

  def __call__(self, x: jax.Array) -> jax.Array:
    # Pool in float32: a 7x7..56x56 mean in bf16 loses digits for nothing.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    s = self.fc2(jax.nn.relu(self.fc1(s.astype(self.dtype))))
    return x * jax.nn.sigmoid(s.astype(jnp.float32)).astype(x.dtype)


class IBasicBlock(nnx.Module):
  """arcface_torch `IBasicBlock` (optionally with SE): `[b, h, w, in]` -> `[b, h/s, w/s, out]`."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, se: bool, c: layers.Common):
    self.dtype = c.dtype
    self.bn1 = c.batch_norm(in_ch, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    self.conv1 = c.conv(in_ch, out_ch, (3, 3), padding=1)
    self.bn2 = c.batch_norm(out_ch, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    self.prelu = c.prelu(out_ch)
    self.conv2 = c.conv(out_ch, out_ch, (3, 3), strides=stride, padding=1)
    self.bn3 = c.batch_norm(out_ch, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    self.se = SEModule(out_ch, c) if se else None
    if stride != 1 or in_ch != out_ch:
      self.downsample_conv = c.conv(in_ch, out_ch, (1, 1), strides=stride, padding="VALID")
      self.downsample_bn = c.batch_norm(out_ch, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    else:
      self.downsample_conv = None
      self.downsample_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = _bn(self.bn1, x, self.dtype)
    out = self.conv1(out)
    out = self.prelu(_bn(self.bn2, out, self.dtype))
    out = _bn(self.bn3, self.conv2(out), self.dtype)
    if self.se is not None:
      out = self.se(out)
    identity = x
    if self.downsample_conv is not None:
      identity = _bn(self.downsample_bn, self.downsample_conv(x), self.dtype)
    return out + identity.astype(self.dtype)


class IResNet(nnx.Module):
  """IResNet / IR-SE backbone: images `[batch, H, W, 3]` -> float32 embeddings `[batch, embed_dim]`.

  The embeddings are not L2-normalised (as in arcface_torch); normalise them
  for cosine similarity.
  """

  def __init__(
      self,
      variant: str | Variant,
      *,
      embed_dim: int = 512,
      dropout: float = 0.0,
      input_size: int = 112,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      precision: jax.lax.Precision | None = None,
      rngs: nnx.Rngs,
  ):
    """Creates a randomly initialised backbone.

    Args:
      variant: a `VARIANTS` name ('r50', 'ir_se50', 'tiny', ...) or a `Variant`.
      embed_dim: embedding size (arcface_torch `num_features`).
      dropout: dropout rate before `fc` (arcface_torch default 0).
      input_size: square input side; must be a multiple of 16 (112 -> 7x7
        features, arcface_torch's `fc_scale`).
      dtype: compute dtype (see the module docstring for what stays float32).
      param_dtype: parameter dtype.
      precision: convolution/matmul precision (None: backend default; pass
        `Precision.HIGHEST` for float32-exact results on TPU/GPU).
      rngs: initialisation (and dropout) RNGs.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    if input_size % _DOWNSAMPLE:
      raise ValueError(f"input_size must be a multiple of {_DOWNSAMPLE}, got {input_size}")
    c = layers.Common(dtype, param_dtype, precision, rngs)
    self.variant = v
    self.dtype = dtype
    self.input_size = input_size
    w0 = v.widths[0]
    self.conv1 = c.conv(3, w0, (3, 3), padding=1)
    self.bn1 = c.batch_norm(w0, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    self.prelu = c.prelu(w0)
    in_ch = w0
    stages = []
    for n, width in zip(v.layers, v.widths):
      blocks = []
      for i in range(n):
        blocks.append(IBasicBlock(in_ch, width, 2 if i == 0 else 1, v.se, c))
        in_ch = width
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.bn2 = c.batch_norm(in_ch, epsilon=BN_EPS, momentum=BN_MOMENTUM)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    side = input_size // _DOWNSAMPLE
    self.fc = nnx.Linear(
        in_ch * side * side, embed_dim, dtype=jnp.float32, param_dtype=param_dtype,
        precision=precision, kernel_metadata=layers.meta("embed_in", "embed"),
        bias_metadata=layers.meta("embed"), rngs=rngs,
    )
    self.features = c.batch_norm(embed_dim, epsilon=BN_EPS, momentum=BN_MOMENTUM, axis="embed")

  def __call__(self, x: jax.Array) -> jax.Array:
    """Embeds a batch of faces.

    Args:
      x: `[batch, input_size, input_size, 3]` RGB; uint8 (normalised here by
        `preprocess`) or float already normalised to [-1, 1].

    Returns:
      float32 `[batch, embed_dim]`.
    """
    expected = (self.input_size, self.input_size, 3)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"IResNet input must be [batch, {', '.join(map(str, expected))}], "
                       f"got {x.shape}")
    if x.dtype == jnp.uint8:
      x = preprocess(x)
    x = self.conv1(x.astype(self.dtype))
    x = self.prelu(_bn(self.bn1, x, self.dtype))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    x = self.bn2(x.astype(jnp.float32))
    # PyTorch flattens NCHW features: keep its (C, H, W) order so `fc` is
    # exactly the transposed PyTorch weight.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = self.dropout(x)
    return self.features(self.fc(x))


# --- Parameter counting ---------------------------------------------------


def parameter_count(variant: str, *, embed_dim: int = 512, batch_stats: bool = False) -> int:
  """Number of trainable-style parameters of a variant, from an abstract init (no memory).

  Counts `nnx.Param`s: conv, BN scale/bias, PReLU, SE and `fc` weights, the
  final BN's (frozen in arcface_torch) scale included: the same total as
  PyTorch's `sum(p.numel() for p in model.parameters())`. With
  `batch_stats=True` it counts the BatchNorm running means/variances instead
  (PyTorch's buffers without `num_batches_tracked`).
  """
  model = nnx.eval_shape(lambda: IResNet(variant, embed_dim=embed_dim, rngs=nnx.Rngs(0)))
  return count_variables(model, nnx.BatchStat if batch_stats else nnx.Param)


def count_variables(model: nnx.Module, kind: type[nnx.Variable] = nnx.Param) -> int:
  """Total size of `model`'s variables of type `kind` (works on an abstract model)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))


# --- insightface (arcface_torch) weights ----------------------------------


def _bn_targets(prefix: str, bn: nnx.BatchNorm) -> dict[str, nnx.Variable]:
  return {
      f"{prefix}.weight": bn.scale,
      f"{prefix}.bias": bn.bias,
      f"{prefix}.running_mean": bn.mean,
      f"{prefix}.running_var": bn.var,
  }


def state_dict_targets(model: IResNet) -> dict[str, nnx.Variable]:
  """arcface_torch state_dict key -> the variable of `model` it fills.

  Every key of the PyTorch state_dict except `num_batches_tracked`.
  """
  t: dict[str, nnx.Variable] = {"conv1.weight": model.conv1.kernel}
  t.update(_bn_targets("bn1", model.bn1))
  t["prelu.weight"] = model.prelu.weight
  for s, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1):
    for i, block in enumerate(stage):
      p = f"layer{s}.{i}"
      t.update(_bn_targets(f"{p}.bn1", block.bn1))
      t[f"{p}.conv1.weight"] = block.conv1.kernel
      t.update(_bn_targets(f"{p}.bn2", block.bn2))
      t[f"{p}.prelu.weight"] = block.prelu.weight
      t[f"{p}.conv2.weight"] = block.conv2.kernel
      t.update(_bn_targets(f"{p}.bn3", block.bn3))
      if block.se is not None:
        t[f"{p}.se.fc1.weight"] = block.se.fc1.kernel
        t[f"{p}.se.fc2.weight"] = block.se.fc2.kernel
      if block.downsample_conv is not None:
        t[f"{p}.downsample.0.weight"] = block.downsample_conv.kernel
        t.update(_bn_targets(f"{p}.downsample.1", block.downsample_bn))
  t.update(_bn_targets("bn2", model.bn2))
  t["fc.weight"] = model.fc.kernel
  t["fc.bias"] = model.fc.bias
  t.update(_bn_targets("features", model.features))
  return t


def _torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  if len(flax_shape) == 4:  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:  # [in, out] -> [out, in]
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
    value = value.detach().cpu().float().numpy()
  return np.asarray(value)


def load_insightface_state_dict(model: IResNet, state_dict: Mapping[str, Any]) -> IResNet:
  """Copies an arcface_torch IResNet `state_dict` into `model` in place.

  Conv weights OIHW -> HWIO, linear `[out, in]` -> `[in, out]` (the flatten
  order already matches, see the module docstring), BN weight/bias/running
  stats, PReLU slopes; `num_batches_tracked` entries are ignored and a
  `module.` prefix on every key (DDP checkpoints) is stripped.

  Args:
    model: the `IResNet` of the same variant/embedding size to fill.
    state_dict: key -> numpy array or torch tensor, PyTorch layout.

  Returns:
    `model`.

  Raises:
    ValueError: naming missing or unexpected keys, or the key whose shape
      differs (with the checkpoint's and the expected PyTorch shape).
  """
  sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  targets = state_dict_targets(model)
  missing = [k for k in targets if k not in sd]
  if missing:
    raise ValueError(f"IResNet state_dict is missing key(s) {missing[:10]}"
                     f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all); "
                     "is it the same variant?")
  unexpected = sorted(k for k in sd if k not in targets)
  if unexpected:
    raise ValueError(f"IResNet state_dict has unexpected key(s) {unexpected[:10]}"
                     f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all); "
                     "is it the same variant?")
  arrays = {}
  for key, var in targets.items():
    value = _as_numpy(sd[key])
    expected = _torch_shape(var[...].shape)
    if value.shape != expected:
      raise ValueError(f"IResNet state_dict key {key!r} has shape {tuple(value.shape)}, "
                       f"expected {expected}")
    arrays[key] = onet.to_flax_layout(value)
  for key, var in targets.items():
    var[...] = jnp.asarray(arrays[key], dtype=var[...].dtype)
  return model
