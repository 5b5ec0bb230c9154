"""Tests of the IResNet / IR-SE port against a PyTorch copy of insightface's arcface_torch code.

The torch classes below reproduce `recognition/arcface_torch/backbones/iresnet.py`
(with configurable widths so a tiny network runs fast, and an optional
face.evoLVe-style SE gate for the IR-SE variants). Parameter counts compare
`sum(p.numel() for p in model.parameters())` (buffers excluded) with
`parameter_count`, and the BN running statistics (buffers minus
`num_batches_tracked`) with `parameter_count(..., batch_stats=True)`.
"""

import functools
import time
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vigface_jax import parallel
from vigface_jax.models import iresnet

# --- PyTorch reference (after insightface arcface_torch/backbones/iresnet.py) ---

# Built on first use, so that the tests that need no torch run without it: the tests that use
# it ask for the `torch` fixture first. `benchmarks/fr_step.py` reads `TorchIResNet` (and may
# read the other classes) off this module, which `__getattr__` below keeps working.
_TORCH_NAMES = ("conv3x3", "conv1x1", "SEModule", "IBasicBlock", "TorchIResNet")


@functools.cache
def _torch_reference() -> types.SimpleNamespace:
  """The PyTorch classes of insightface's IResNet; imports torch."""
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  tnn = torch.nn

  def conv3x3(in_planes, out_planes, stride=1):
    return tnn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)

  def conv1x1(in_planes, out_planes, stride=1):
    return tnn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

  class SEModule(tnn.Module):
    """face.evoLVe `SEModule` (bottleneck max(1, C // reduction), as in the port)."""

    def __init__(self, channels, reduction=16):
      super().__init__()
      hidden = max(1, channels // reduction)
      self.avg_pool = tnn.AdaptiveAvgPool2d(1)
      self.fc1 = tnn.Conv2d(channels, hidden, kernel_size=1, padding=0, bias=False)
      self.relu = tnn.ReLU(inplace=True)
      self.fc2 = tnn.Conv2d(hidden, channels, kernel_size=1, padding=0, bias=False)
      self.sigmoid = tnn.Sigmoid()

    def forward(self, x):
      s = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
      return x * s

  class IBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, se=False):
      super().__init__()
      self.bn1 = tnn.BatchNorm2d(inplanes, eps=1e-05)
      self.conv1 = conv3x3(inplanes, planes)
      self.bn2 = tnn.BatchNorm2d(planes, eps=1e-05)
      self.prelu = tnn.PReLU(planes)
      self.conv2 = conv3x3(planes, planes, stride)
      self.bn3 = tnn.BatchNorm2d(planes, eps=1e-05)
      if se:
        self.se = SEModule(planes)
      self.downsample = downsample
      self.stride = stride

    def forward(self, x):
      identity = x
      out = self.bn1(x)
      out = self.conv1(out)
      out = self.bn2(out)
      out = self.prelu(out)
      out = self.conv2(out)
      out = self.bn3(out)
      if hasattr(self, "se"):
        out = self.se(out)
      if self.downsample is not None:
        identity = self.downsample(x)
      out += identity
      return out

  class TorchIResNet(tnn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, widths=(64, 128, 256, 512), se=False, dropout=0,
                 num_features=512):
      super().__init__()
      self.inplanes = widths[0]
      self.se = se
      self.conv1 = tnn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
      self.bn1 = tnn.BatchNorm2d(self.inplanes, eps=1e-05)
      self.prelu = tnn.PReLU(self.inplanes)
      self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
      self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
      self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
      self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
      self.bn2 = tnn.BatchNorm2d(widths[3], eps=1e-05)
      self.dropout = tnn.Dropout(p=dropout, inplace=True)
      self.fc = tnn.Linear(widths[3] * self.fc_scale, num_features)
      self.features = tnn.BatchNorm1d(num_features, eps=1e-05)
      tnn.init.constant_(self.features.weight, 1.0)
      self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks, stride=1):
      downsample = None
      if stride != 1 or self.inplanes != planes:
        downsample = tnn.Sequential(
            conv1x1(self.inplanes, planes, stride), tnn.BatchNorm2d(planes, eps=1e-05))
      layers = [IBasicBlock(self.inplanes, planes, stride, downsample, self.se)]
      self.inplanes = planes
      for _ in range(1, blocks):
        layers.append(IBasicBlock(self.inplanes, planes, se=self.se))
      return tnn.Sequential(*layers)

    def forward(self, x):
      x = self.prelu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      x = self.bn2(x)
      x = torch.flatten(x, 1)
      x = self.dropout(x)
      return self.features(self.fc(x))

  return types.SimpleNamespace(conv3x3=conv3x3, conv1x1=conv1x1, SEModule=SEModule,
                               IBasicBlock=IBasicBlock, TorchIResNet=TorchIResNet)


def __getattr__(name: str):
  """`TorchIResNet` & co., built (and torch imported) on first access."""
  if name in _TORCH_NAMES:
    return getattr(_torch_reference(), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pytest.fixture(scope="module")
def torch():
  # Imported here: benchmarks/fr_step.py imports this module outside pytest, without conftest.
  from conftest import require  # pylint: disable=g-import-not-at-top
  return require("torch", "the PyTorch IResNet reference (pip install torch==2.13.0)")


def _torch_model(variant: str) -> "TorchIResNet":
  v = iresnet.VARIANTS[variant]
  return _torch_reference().TorchIResNet(v.layers, v.widths, v.se)


def _randomise(model, seed: int):
  """Random weights with non-trivial BN statistics and PReLU slopes."""
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
      elif name.endswith("prelu.weight"):
        p.copy_(torch.rand(p.shape, generator=g) * 0.5)
      elif name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=g) * 0.2)
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def _l2(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@nnx.jit
def _embed(model, x):
  return model(x)


def _parity(variant: str, batch: int, seed: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  tmodel = _randomise(_torch_model(variant), seed)
  images = np.random.default_rng(seed).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  model = iresnet.IResNet(variant, rngs=nnx.Rngs(1))
  iresnet.load_insightface_state_dict(model, tmodel.state_dict())
  model.eval()
  got = np.asarray(_embed(model, jnp.asarray(images)))
  return float(np.max(np.abs(_l2(got) - _l2(want))))


# --- Tests ------------------------------------------------------------------


def test_tiny_forward_shapes_and_dtypes():
  model = iresnet.IResNet("tiny", rngs=nnx.Rngs(0))
  model.eval()
  x = jnp.zeros((2, 112, 112, 3), jnp.uint8)
  y = _embed(model, x)
  assert y.shape == (2, 512) and y.dtype == jnp.float32
  bf16 = iresnet.IResNet("tiny", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  bf16.eval()
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  stats = jax.tree.leaves(nnx.state(bf16, nnx.BatchStat))
  assert all(s.dtype == jnp.float32 for s in stats)
  y16 = _embed(bf16, x)
  # Documented contract: the embedding (fc + BatchNorm1d) is always float32.
  assert y16.shape == (2, 512) and y16.dtype == jnp.float32
  np.testing.assert_allclose(_l2(y16), _l2(y), atol=5e-2)
  with pytest.raises(ValueError, match="input must be"):
    model(jnp.zeros((2, 64, 64, 3)))


def test_train_mode_updates_batch_stats():
  model = iresnet.IResNet("tiny", rngs=nnx.Rngs(0))
  model.train()
  before = np.asarray(model.bn1.mean[...])
  x = jax.random.normal(jax.random.key(0), (2, 112, 112, 3))
  _embed(model, x)
  assert not np.allclose(np.asarray(model.bn1.mean[...]), before)


def test_logical_axes():
  model = nnx.eval_shape(lambda: iresnet.IResNet("tiny", rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["conv1"]["kernel"]) == ("conv_h", "conv_w", "channels_in", "channels_out")
  assert tuple(specs["fc"]["kernel"]) == ("embed_in", "embed")
  assert tuple(specs["layer1"][0]["prelu"]["weight"]) == ("channels_out",)
  assert tuple(specs["features"]["scale"]) == ("embed",)
  spec = parallel.logical_to_spec(specs["fc"]["kernel"], parallel.DEFAULT_RULES)
  assert tuple(spec) == (None, "fsdp")
  spec = parallel.logical_to_spec(specs["conv1"]["kernel"], parallel.DEFAULT_RULES)
  assert tuple(spec) == (None, None, None, None)


@pytest.mark.parametrize("variant", ["r18", "r50", "r100", "ir_se50"])
def test_parameter_count_matches_pytorch(variant, torch):
  with torch.device("meta"):  # shapes only: no memory, no initialisation cost
    tmodel = _torch_model(variant)
  n_params = sum(p.numel() for p in tmodel.parameters())
  n_stats = sum(b.numel() for name, b in tmodel.named_buffers()
                if not name.endswith("num_batches_tracked"))
  assert iresnet.parameter_count(variant) == n_params
  model = nnx.eval_shape(lambda: iresnet.IResNet(variant, rngs=nnx.Rngs(0)))
  assert iresnet.count_variables(model, nnx.BatchStat) == n_stats
  assert set(iresnet.state_dict_targets(model)) == {
      k for k in tmodel.state_dict() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("variant", ["tiny", "tiny_se"])
def test_converter_parity_tiny(variant, torch):
  del torch  # _parity uses it
  err = _parity(variant, batch=3, seed=0)
  print(f"{variant}: max |l2(jax) - l2(torch)| = {err:.2e}")
  assert err < 1e-4


def test_converter_parity_r18(torch):
  del torch  # _parity uses it
  start = time.time()
  err = _parity("r18", batch=1, seed=1)
  print(f"r18: max |l2(jax) - l2(torch)| = {err:.2e} ({time.time() - start:.1f} s)")
  assert err < 1e-4


def test_state_dict_errors_name_the_key(torch):
  del torch  # _torch_model uses it
  tmodel = _torch_model("tiny")
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  model = iresnet.IResNet("tiny", rngs=nnx.Rngs(0))

  bad = dict(sd)
  bad["layer2.0.conv1.weight"] = np.zeros((16, 8, 3, 1), np.float32)
  shapes = r"layer2\.0\.conv1\.weight.*\(16, 8, 3, 1\).*\(16, 8, 3, 3\)"
  with pytest.raises(ValueError, match=shapes):
    iresnet.load_insightface_state_dict(model, bad)

  bad = dict(sd)
  del bad["features.running_var"]
  with pytest.raises(ValueError, match=r"missing.*features\.running_var"):
    iresnet.load_insightface_state_dict(model, bad)

  bad = dict(sd)
  bad["layer1.0.se.fc1.weight"] = np.zeros((1, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"unexpected.*layer1\.0\.se\.fc1\.weight"):
    iresnet.load_insightface_state_dict(model, bad)

  # A DDP checkpoint (`module.` prefix) loads; num_batches_tracked is ignored.
  iresnet.load_insightface_state_dict(model, {f"module.{k}": v for k, v in sd.items()})
  np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), sd["fc.weight"].T)

  with pytest.raises(ValueError, match="Unknown IResNet variant 'r51'"):
    iresnet.IResNet("r51", rngs=nnx.Rngs(0))


def test_fused_batch_norm_equals_flax_batch_norm_in_both_modes():
  """`layers.BatchNorm` (the hand-written training-mode backward) against `nnx.BatchNorm`:
  the same output, gradients (input, scale, bias through a non-trivial loss) and running
  statistics after a training call, and the same evaluation-mode output."""
  from vigface_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, (8, 6, 6, 5)).astype(np.float32))
  made = []
  for cls in (nnx.BatchNorm, layers.BatchNorm):
    bn = cls(5, epsilon=1e-5, momentum=0.9, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.arange(1.0, 6.0)
    bn.bias[...] = jnp.arange(5.0) * 0.1
    made.append(bn)
  loss = lambda bn, x: jnp.sum(jnp.sin(bn(x)) * jnp.arange(5.0))
  results = [nnx.value_and_grad(loss, argnums=(0, 1))(bn, x) for bn in made]
  (l_ref, (g_ref, dx_ref)), (l_new, (g_new, dx_new)) = results
  np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)  # x·a + c against (x − μ)·a + b
  np.testing.assert_allclose(dx_new, dx_ref, rtol=1e-4, atol=1e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(g_new[name][...], g_ref[name][...], rtol=1e-4, atol=1e-5)
  for stat in ("mean", "var"):
    np.testing.assert_allclose(getattr(made[1], stat)[...], getattr(made[0], stat)[...],
                               rtol=1e-6)
  assert not np.allclose(made[1].var[...], 1.0)  # the statistics did move
  for bn in made:
    bn.eval()
  np.testing.assert_allclose(made[1](x), made[0](x), rtol=1e-6, atol=1e-6)
  assert isinstance(iresnet.IResNet("tiny", rngs=nnx.Rngs(0)).bn1, layers.BatchNorm)
