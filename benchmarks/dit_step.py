r"""Stage-2 training step, JAX vs PyTorch: the stage-2 trainer's step against the same work in
PyTorch (pixel DiT + diffusion MSE + identity loss through a frozen IResNet + AdamW).

    python -m benchmarks.dit_step --variant=small --patch_size=16 --output_overlap=4 \
        --landmark_blur=6,16 --batch=32 --steps=5 [--write]
    python -m benchmarks.dit_step --variant=B --patch_size=4 --batch=16 --dtype=bfloat16  # GPU

`--dtype` and `--torch_device` as in `benchmarks/fr_step.py`: bfloat16 is the trainer's
accelerator policy (bf16 DiT activations and matmuls, float32 parameters, AdamW state and EMA;
torch: forward + loss under `torch.autocast`), and the torch model, batch, schedule tables and
draws live on `--torch_device` ('auto': cuda when available), each timed step synchronised.
In bfloat16 the agreement tolerances below are loosened (`TOLERANCES`).

The defaults are `configs/dit.py:demo`'s model, diffusion and optimizer settings, at the
112-pixel geometry the demo had before it drew at 48 (DiT-small, patch 16, output_overlap 4,
landmark_blur (6, 16)), x0-prediction with the unweighted loss, condition dropout 0.1,
identity-loss weight 0.05 on t <= 300, AdamW lr 3e-4 with gradient clipping at 1.0 and an EMA
0.999 with warm-up); the frozen FR network is `configs/fr.py:demo`'s (`--fr_config`: IResNet
`small`, 128-d, fed 48x48), which also sets the row size.

**JAX: the trainer's own step.** What `train/dit.py` trains through `train/loop.py` `fit`,
built the same way (`benchmarks/train_step.py`): `configs/dit.py:demo` with the flags' fields
(`--dtype`), `optim.make_optimizer`, `state.create_state(dit.create_model(config, fr_info, n),
..., trainable=stage2.TRAINABLE, ema=True)` and `state.make_train_step(graphdef, dit.dit_loss,
...)`: one `jax.jit` over the whole donated train state. Per step it renders the batch's
landmark images and their blurred copies, draws the timesteps, the noise and the condition
dropout, runs the `models.stage2.Stage2` DiT forward + backward, the denoising MSE, the
identity loss `||normalise(f_FR(clip(x0_hat))) - normalise(row)||^2` through the frozen
IResNet (on kept rows with t <= 300), clips the gradient, applies AdamW, updates the EMA, and
computes the gradient / update norms and the non-finite guard. It runs twice: blocks unrolled,
and `model.scan_blocks=True` (the demo config's setting until 2026-12-02: the same weights
stacked over depth, `jax.lax.scan` over the blocks; its losses must match).

**PyTorch: the same work, eager.** The same DiT written the facebookresearch/DiT way
(`models.py`): a `Conv2d` patch embedding (kernel = stride = p), the fixed 2-D sin-cos
position embedding (DiT's numpy code, copied below), DiT's `TimestepEmbedder`,
`c = t_emb + Linear(cond_scale * cond)` (our replacement of the `LabelEmbedder`), adaLN-Zero
blocks with timm-style attention (`qkv` laid out `[3, heads, head_dim]`) through
`F.scaled_dot_product_attention`, a tanh-GELU MLP, DiT's `FinalLayer` and `unpatchify`; with
`--output_overlap=m` each token's `(p + 2m)^2` window is weighted by the same cross-fade and
overlap-added with `F.fold` (stride p, padding m), then divided by the folded weights (an
independent implementation of `dit.fold_patches`). Around it, `TorchStage2Step` does what
`dit_loss` does, step by step in torch: landmark images drawn from the points (the same
Manhattan-diamond rule), Gaussian-blurred copies by two matmuls, `torch.randint` / `randn` /
`rand` for t, noise and dropout, `q_sample`, the target and x0_hat of `--prediction`, the
identity loss through the arcface_torch IResNet of `tests/test_iresnet.py` (eval mode,
`requires_grad_(False)`, the image resized with `F.interpolate(bilinear, antialias=True)`),
`clip_grad_norm_`, the default `torch.optim.AdamW` (its for-loop implementation on CPU) and
DiT `train.py`'s `update_ema`. It does not do the JAX step's non-finite guard (a select over
the state) or its update-norm metric: extra work on the JAX side only.

Weights: the trainer's state is created, then, as `fit(initialize=...)` does, filled: the DiT's
zero-initialised parameters (adaLN modulation kernels, the final linear kernel) and all biases
are randomised (normal, std 0.02) so the output is not identically zero, the frozen IResNet
gets the weights of a randomised torch IResNet (`load_insightface_state_dict`) and the row
table random unit rows. Every DiT parameter is copied into the torch DiT (kernels transposed,
the patch-embedding kernel reshaped into conv layout, qkv re-ordered from our heads-major
`[heads, 3, head_dim]` to timm's `[3, heads, head_dim]`). The DiT forward outputs on a random
batch must agree (max |diff| / max |out| < 1e-3 in float32, asserted and printed) before
anything is timed. Steps 1 and 2 of the torch side use the random draws the trainer's step
makes (t, noise, dropout from `fold_in(state.rng, step)`, recomputed here), so their losses
must agree with the JAX ones (step 1 asserted: the same weights; step 2 checks the first AdamW
update and EMA); the timed torch steps draw their own.

Timing: compile (`lower().compile()`) is reported separately; each side runs two warm-up
steps, then `--steps` timed steps, each ended by `jax.block_until_ready` (torch: synchronous
on CPU, `torch.cuda.synchronize()` on cuda); median and best are reported.

Threads: as `benchmarks/fr_step.py`: `torch.set_num_threads(--threads)`, and this process is
pinned to `--threads` CPUs (`os.sched_setaffinity`) before jax starts, since XLA:CPU sizes its
pool from the CPUs the process may use.

`--json=PATH` also writes the figures (and the device's peak memory where the backend
reports it) as JSON: what `benchmarks/run.py` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import sys
import time
from typing import Any


_REPO = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python benchmarks/dit_step.py`: make the repo importable.
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import cpu_threads  # pins --threads CPUs; before jax
from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import data_pipeline as dp  # machine(), section_header(), write_output()
from benchmarks import train_step  # the trainer's step, built and timed as loop.fit runs it
from configs import dit as dit_config
from configs import fr as fr_config
from tests import test_iresnet as torch_ref  # the PyTorch arcface_torch IResNet copy
import vigface_jax
from vigface_jax import parallel
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.diffusion import schedules
from vigface_jax.models import dit
from vigface_jax.models import iresnet
from vigface_jax.models import stage2
from vigface_jax.train import dit as dit_train
# pylint: enable=g-import-not-at-top,wrong-import-position

_DEMO = dit_config.get_config("demo")  # the flags' defaults
# The defaults are the 112-pixel geometry the demo had before 2026-12-01 (DiT-small/16,
# output margin 4, blur σ (6, 16)); `--image_size=48 --patch_size=6 --output_overlap=1
# --landmark_blur=2.6,6.9` is the demo's now (README "Generator quality"). Both sides then
# resize the 112 faces and landmark images to the side the DiT draws at, as `dit_loss` does.
_GEOMETRY_112 = {"patch_size": 16, "output_overlap": 4, "landmark_blur": (6.0, 16.0)}
_VARIANT = flags.DEFINE_string("variant", _DEMO.model.variant, "DiT variant (dit.VARIANTS).")
_PATCH = flags.DEFINE_integer("patch_size", _GEOMETRY_112["patch_size"],
                              "Patch side (divides --image_size).")
_OVERLAP = flags.DEFINE_integer("output_overlap", _GEOMETRY_112["output_overlap"],
                                "DiT output_overlap (pixels).")
_BLUR = flags.DEFINE_list("landmark_blur", [f"{v:g}" for v in _GEOMETRY_112["landmark_blur"]],
                          "σ of the blurred landmark-image copies (configs/dit.py "
                          "model.landmark_blur), 3 more input channels each; empty: none.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 112, "The side the DiT draws at (model.image_size; the batch's faces and "
    "landmark images stay 112 and are resized to it inside the step).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per framework (after 2 warm-up steps).")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for both frameworks.")
_LR = flags.DEFINE_float("lr", _DEMO.optim.lr, "AdamW learning rate (constant, no warm-up).")
_PREDICTION = flags.DEFINE_enum("prediction", _DEMO.diffusion.prediction, ["v", "eps", "x0"],
                                "What the DiT predicts (diffusion.prediction).")
_COND_DROP = flags.DEFINE_float("cond_drop", _DEMO.diffusion.cond_drop,
                                "Condition-dropout probability (diffusion.cond_drop).")
_ID_WEIGHT = flags.DEFINE_float("id_loss_weight", _DEMO.diffusion.id_loss_weight,
                                "Identity-loss weight (diffusion.id_loss_weight; 0: no identity "
                                "loss, no FR network in the step).")
_FR_CONFIG = flags.DEFINE_enum("fr_config", "demo", ["default", "demo", "tiny"],
                               "configs/fr.py variant whose model (arch, embed_dim, input_size) "
                               "is the frozen FR network; its embed_dim is the row size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(train_step.DTYPES),
                           "Compute dtype of both sides (parameters stay float32).")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "auto", ["auto", "cpu", "cuda"],
                                  "PyTorch's device ('auto': cuda if available, else cpu).")
_WRITE = flags.DEFINE_bool("write", False, "Write the section into --output (BENCHMARKS.md).")
# data_pipeline's flags: --output (BENCHMARKS.md) and --seed (weights and batch).
flags.FLAGS.set_default("output", "BENCHMARKS.md")
_SEED = dp._SEED  # pylint: disable=protected-access

SECTION = "## DiT training step"
INPUT_SIZE, OUT_CHANNELS = 112, 3
NUM_REAL = int(_DEMO.data.num_identities)  # rows in the table (the demo's identities)
# Relative tolerances by --dtype: DiT forward outputs (max |diff| / max |out|), step-1
# losses JAX vs torch, and losses scan_blocks vs unrolled (bf16: XLA fuses the two
# differently, so their bf16 roundings differ too).
TOLERANCES = {"float32": {"fwd": 1e-3, "loss": 1e-3, "scan": 1e-5},
              "bfloat16": {"fwd": 5e-2, "loss": 2e-2, "scan": 1e-2}}


def landmark_blur() -> tuple[float, ...]:
  """`--landmark_blur` as σ values."""
  return tuple(float(v) for v in _BLUR.value)


def in_channels() -> int:
  """Noisy image ⊕ landmark image (6), plus 3 per blurred landmark copy (as stage 2)."""
  return stage2.input_channels(landmark_blur())


def fr_info() -> dict[str, Any]:
  """The frozen FR network, as `train/dit.py` reads it from a stage-1 export."""
  m = fr_config.get_config(_FR_CONFIG.value).model
  return {"arch": m.arch, "embed_dim": int(m.embed_dim), "input_size": int(m.input_size)}


def cond_dim() -> int:
  """Size of a condition row: the FR embedding's."""
  return fr_info()["embed_dim"]


def cond_scale() -> float:
  """`Stage2`'s DiT condition scale (unit rows → unit-RMS projection inputs)."""
  return math.sqrt(cond_dim())


def stage2_config(scan_blocks: bool, dtype: str = "float32") -> ml_collections.ConfigDict:
  """`configs/dit.py:demo` with the fields this benchmark measures set from its flags, computing
  in `dtype` (this script passes `--dtype`; `sample.py` and `generate.py` keep float32)."""
  config = dit_config.get_config("demo")
  m = config.model
  m.variant = _VARIANT.value
  m.image_size = _IMAGE_SIZE.value
  m.patch_size = _PATCH.value
  m.output_overlap = _OVERLAP.value
  m.landmark_blur = landmark_blur()
  m.dtype = dtype  # bfloat16: bf16 compute, float32 parameters
  m.remat = False
  m.scan_blocks = scan_blocks
  m.num_real = NUM_REAL
  d = config.diffusion
  d.prediction = _PREDICTION.value
  d.cond_drop = _COND_DROP.value
  d.id_loss_weight = _ID_WEIGHT.value
  # The demo weighs its loss per example (weighting 'v'); the torch reference implements the
  # unweighted loss, a per-example multiply the step time does not notice, so both time that.
  d.weighting = "none"
  if float(d.landmark_drop) > 0:
    raise app.UsageError("the torch reference implements landmark_drop=0 only")
  config.data.global_batch_size = _BATCH.value
  config.optim.lr = _LR.value
  config.optim.warmup_steps = 0  # warm-up would make step 1 a zero update
  config.train.num_steps = _STEPS.value + 2
  config.train.seed = _SEED.value
  dit_train.validate(config)
  return config


# ------------------------------------------------------- PyTorch (DiT models.py)


def _torch_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def torch_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """DiT's `get_2d_sincos_pos_embed` (no cls token): `[grid_size ** 2, embed_dim]`."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
  emb_h = _torch_1d_sincos(embed_dim // 2, grid[0])
  emb_w = _torch_1d_sincos(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def _modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TorchTimestepEmbedder(nn.Module):

  def __init__(self, hidden: int, freq: int = 256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  @staticmethod
  def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  def forward(self, t):
    return self.mlp(self.timestep_embedding(t, self.freq))


class TorchAttention(nn.Module):
  """timm `Attention` (qkv bias, no qk-norm) with `F.scaled_dot_product_attention`."""

  def __init__(self, hidden: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(hidden, 3 * hidden)
    self.proj = nn.Linear(hidden, hidden)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, d))


class TorchMlp(nn.Module):

  def __init__(self, hidden: int, mlp_hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(hidden, mlp_hidden)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(mlp_hidden, hidden)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TorchDiTBlock(nn.Module):

  def __init__(self, hidden: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.attn = TorchAttention(hidden, heads)
    self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.mlp = TorchMlp(hidden, int(hidden * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))  # pylint: disable=invalid-name

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=1))
    x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class TorchFinalLayer(nn.Module):

  def __init__(self, hidden: int, window: int, out_channels: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden, window * window * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))  # pylint: disable=invalid-name

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(_modulate(self.norm_final(x), shift, scale))


class TorchDiT(nn.Module):
  """DiT `models.DiT` with a condition-row projection instead of the label embedder; NCHW."""

  def __init__(self, v: dit.Variant, patch: int, mlp_ratio: float = 4.0, overlap: int = 0,
               cond_scale: float = 1.0):
    super().__init__()
    self.patch, self.out_channels, self.overlap = patch, OUT_CHANNELS, overlap
    self.cond_scale = cond_scale  # as `dit.DiT(cond_scale=...)`: Linear(cond_scale * cond)
    self.window = patch + 2 * overlap
    self.x_embedder = nn.Conv2d(in_channels(), v.hidden, kernel_size=patch, stride=patch)
    self.t_embedder = TorchTimestepEmbedder(v.hidden)
    self.y_embedder = nn.Linear(cond_dim(), v.hidden)
    self.size = _IMAGE_SIZE.value
    pos = torch_2d_sincos_pos_embed(v.hidden, self.size // patch)
    self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0),
                         persistent=False)
    self.blocks = nn.ModuleList([TorchDiTBlock(v.hidden, v.heads, mlp_ratio)
                                 for _ in range(v.depth)])
    self.final_layer = TorchFinalLayer(v.hidden, self.window, OUT_CHANNELS)
    if overlap:
      ramp = (torch.arange(2 * overlap, dtype=torch.float32) + 0.5) / (2 * overlap)
      w = torch.cat([ramp, torch.ones(patch - 2 * overlap), ramp.flip(0)])
      self.register_buffer("window_weights", w[:, None] * w[None, :], persistent=False)
      g = self.size // patch
      ones = self.window_weights.reshape(1, -1, 1).expand(1, -1, g * g)
      self.register_buffer("fold_norm", self._fold(ones), persistent=False)

  def _fold(self, cols):
    return F.fold(cols, (self.size, self.size), self.window, stride=self.patch,
                  padding=self.overlap)

  def fold_windows(self, x):
    """`[b, L, (k, k, C)]` windows -> `[b, C, H, W]`: weight, overlap-add, renormalise."""
    b, n, k, c = x.shape[0], x.shape[1], self.window, self.out_channels
    x = x.reshape(b, n, k, k, c) * self.window_weights[None, None, :, :, None]
    cols = x.permute(0, 4, 2, 3, 1).reshape(b, c * k * k, n)  # F.fold's (C, k, k) x L
    return self._fold(cols) / self.fold_norm

  def unpatchify(self, x):
    c, p = self.out_channels, self.patch
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, t, cond):
    x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(cond * self.cond_scale)
    for block in self.blocks:
      x = block(x, c)
    if self.overlap:
      return self.fold_windows(self.final_layer(x, c))
    return self.unpatchify(self.final_layer(x, c))


# ------------------------------------------- PyTorch: the rest of the stage-2 step


def torch_landmark_input(points: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
  """`stage2.landmark_input` in torch: `[b, 5, 2]` points → NCHW landmark images in [-1, 1].

  Each point is a filled diamond `|dx| + |dy| <= DIAMOND_RADIUS` around its pixel (rounded half
  up), later points drawn over earlier ones; examples without landmarks get the empty image.
  """
  size = INPUT_SIZE
  base = torch.floor(points)
  centre = base + (points - base >= 0.5).to(points.dtype)
  cx, cy = centre[..., 0, None, None], centre[..., 1, None, None]  # [b, 5, 1, 1]
  dev = points.device
  coords = torch.arange(size, dtype=points.dtype, device=dev)
  dist = (coords[None, :] - cx).abs() + (coords[:, None] - cy).abs()  # [b, 5, H, W]
  ranks = torch.arange(1, landmarks_lib.NUM_LANDMARKS + 1, device=dev)[:, None, None]
  winner = torch.where(dist <= landmarks_lib.DIAMOND_RADIUS, ranks, 0).amax(dim=1) - 1
  colours = torch.from_numpy(np.asarray(landmarks_lib.LANDMARK_COLOURS, np.float32)).to(dev)
  image = colours[winner.clamp(min=0)] * (winner >= 0)[..., None]  # [b, H, W, 3], 0..255
  image = image / 127.5 - 1.0
  image = torch.where(has[:, None, None, None], image, torch.full_like(image, -1.0))
  return image.permute(0, 3, 1, 2)


def to_draw_size(images: torch.Tensor) -> torch.Tensor:
  """NCHW 112 images → `--image_size` (`stage2.resize`: antialiased linear; unchanged at 112)."""
  size = _IMAGE_SIZE.value
  if images.shape[-1] == size:
    return images
  return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                       antialias=True)


@functools.cache
def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
  i = torch.arange(size, dtype=torch.float64)
  g = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
  return (g / math.sqrt(13.0)).float().to(device)  # a blurred 13-pixel diamond peaks near 1


def torch_landmark_channels(lmk: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
  """`stage2.landmark_channels` in torch (NCHW): the image, then each blurred copy."""
  dots = (lmk + 1.0) * 0.5
  h, w = lmk.shape[-2:]
  g = lambda n, s: _gaussian(n, s, lmk.device)
  fields = [(g(h, s) @ dots @ g(w, s).T) * 2.0 - 1.0 for s in sigmas]
  return torch.cat([lmk] + fields, dim=1)


def torch_iresnet(info: dict[str, Any]) -> nn.Module:
  """arcface_torch's IResNet (`tests/test_iresnet.py`) for `info`'s arch, size and input side."""
  v = iresnet.VARIANTS[info["arch"]]
  side = info["input_size"] // 16
  cls = type("TorchIResNetAt", (torch_ref.TorchIResNet,), {"fc_scale": side * side})
  return cls(v.layers, v.widths, v.se, num_features=info["embed_dim"])


class TorchStage2Step:
  """`dit_train.dit_loss` + clipping + AdamW + EMA, as a PyTorch training script does them.

  `step(batch, draws=None)`: `draws = (t, noise, kept)` replaces the step's own
  `torch.randint` / `torch.randn` / `torch.rand` draws (for the agreement checks). The models
  and the batch are on `device`; forward + loss run under `train_step.torch_autocast`.
  """

  def __init__(self, model: nn.Module, fr: nn.Module, rows: np.ndarray,
               schedule: schedules.Schedule, config: ml_collections.ConfigDict,
               device: str = "cpu", dtype: str = "float32"):
    self.device, self.dtype = device, dtype
    self.model = model.to(device).train()
    self.fr = fr.to(device).eval().requires_grad_(False)
    to_dev = lambda x: torch.from_numpy(np.array(x, np.float32)).to(device)
    self.rows = to_dev(rows)
    self.a = to_dev(schedule.sqrt_alphas_cumprod)
    self.s = to_dev(schedule.sqrt_one_minus_alphas_cumprod)
    self.num_t = int(schedule.num_timesteps)
    self.d, self.o, self.tr = config.diffusion, config.optim, config.train
    self.fr_size = fr_info()["input_size"]
    self.sigmas = tuple(config.model.landmark_blur)
    self.opt = torch.optim.AdamW(model.parameters(), lr=float(self.o.lr),
                                 betas=(float(self.o.b1), float(self.o.b2)),
                                 eps=float(self.o.eps), weight_decay=float(self.o.weight_decay))
    self.ema = ({n: p.detach().clone() for n, p in model.named_parameters()}
                if float(self.tr.ema_decay) > 0 else None)
    self.steps = 0

  def loss(self, batch: dict[str, torch.Tensor], draws=None) -> tuple[torch.Tensor, ...]:
    """(loss, diffusion loss, identity loss) of one batch; see `dit_train.dit_loss`."""
    d = self.d
    x0 = to_draw_size(batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    lmk = to_draw_size(torch_landmark_input(batch["landmarks"], batch["has_landmarks"]))
    rows = self.rows[batch["label"]]
    b = x0.shape[0]
    if draws is None:
      t = torch.randint(0, self.num_t, (b,), device=x0.device)
      noise = torch.randn_like(x0)
      kept = torch.rand(b, device=x0.device) >= float(d.cond_drop)
    else:
      t, noise, kept = (x.to(x0.device) for x in draws)
    a, s = self.a[t].view(b, 1, 1, 1), self.s[t].view(b, 1, 1, 1)
    x_t = a * x0 + s * noise
    cond = torch.where(kept[:, None], rows, torch.zeros_like(rows))
    lmk = torch_landmark_channels(lmk, self.sigmas)
    with train_step.torch_autocast(self.device, self.dtype):  # float32: a no-op
      return self._model_loss(x0, x_t, noise, (a, s), t, kept, rows, lmk, cond)

  def _model_loss(self, x0, x_t, noise, coefs, t, kept, rows, lmk, cond
                  ) -> tuple[torch.Tensor, ...]:
    """`loss` from the noisy input on (under autocast): the DiT, the target, the identity loss;
    the landmark channels and `q_sample` before it stay float32, as in `dit_loss`."""
    d, (a, s) = self.d, coefs
    pred = self.model(torch.cat([x_t, lmk], 1), t, cond)
    kind = d.prediction
    target = {"x0": x0, "eps": noise}.get(kind) if kind != "v" else a * noise - s * x0
    diff = F.mse_loss(pred, target)
    weight = float(d.id_loss_weight)
    if weight <= 0:
      return diff, diff, torch.zeros((), device=diff.device)
    if kind == "x0":
      x0_hat = pred
    elif kind == "eps":
      x0_hat = (x_t - s * pred) / a
    else:
      x0_hat = a * x_t - s * pred
    x = x0_hat.clamp(-1.0, 1.0).float()
    # The frozen FR network computes in float32 on the JAX side (`Stage2.fr` has no dtype).
    with torch.autocast(self.device, enabled=False):
      if self.fr_size != x.shape[-1]:
        x = F.interpolate(x, size=(self.fr_size, self.fr_size), mode="bilinear",
                          align_corners=False, antialias=True)
      emb = F.normalize(self.fr(x), dim=-1)
    per_example = (emb - F.normalize(rows, dim=-1)).square().sum(-1)
    t_id = torch.where(kept, t, torch.full_like(t, self.num_t))
    mask = (t_id <= int(d.id_loss_max_t)).float()
    id_loss = (per_example * mask).sum() / mask.sum().clamp(min=1.0)
    return diff + weight * id_loss, diff, id_loss

  def step(self, batch: dict[str, torch.Tensor], draws=None) -> tuple[torch.Tensor, ...]:
    losses = self.loss(batch, draws)
    self.opt.zero_grad(set_to_none=True)
    losses[0].backward()
    if float(self.o.grad_clip_norm) > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.o.grad_clip_norm))
    self.opt.step()
    if self.ema is not None:  # DiT train.py's update_ema, with the trainer's warm-up
      decay = float(self.tr.ema_decay)
      if self.tr.ema_warmup:
        decay = min(decay, (1.0 + self.steps) / (10.0 + self.steps))
      with torch.no_grad():
        for name, p in self.model.named_parameters():
          self.ema[name].mul_(decay).add_(p.data, alpha=1 - decay)
    self.steps += 1
    return tuple(x.detach() for x in losses)


# ------------------------------------------------------------- weight copying


def _np(param) -> np.ndarray:
  return np.array(param[...], dtype=np.float32)  # a writable copy for torch.from_numpy


def _copy_linear(dst: nn.Linear, src: nnx.Linear) -> None:
  dst.weight.copy_(torch.from_numpy(_np(src.kernel).T.copy()))
  dst.bias.copy_(torch.from_numpy(_np(src.bias)))


@torch.no_grad()
def copy_into_torch(tm: TorchDiT, jm: dit.DiT) -> None:
  """Every parameter of our DiT into the torch DiT (layouts converted, see the docstring)."""
  v, p = jm.variant, jm.patch_size
  # Our patch kernel is [(p_h, p_w, C), hidden]; the conv's weight is [hidden, C, p_h, p_w].
  kernel = _np(jm.x_embedder.kernel).reshape(p, p, in_channels(), v.hidden)
  tm.x_embedder.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
  tm.x_embedder.bias.copy_(torch.from_numpy(_np(jm.x_embedder.bias)))
  _copy_linear(tm.t_embedder.mlp[0], jm.t_embedder.fc1)
  _copy_linear(tm.t_embedder.mlp[2], jm.t_embedder.fc2)
  _copy_linear(tm.y_embedder, jm.cond_proj)
  hd = v.hidden // v.heads
  for tb, jb in zip(tm.blocks, jm.blocks, strict=True):
    # qkv output: ours [heads, 3, head_dim] -> timm [3, heads, head_dim].
    k = _np(jb.attn.qkv.kernel).reshape(v.hidden, v.heads, 3, hd).transpose(0, 2, 1, 3)
    b = _np(jb.attn.qkv.bias).reshape(v.heads, 3, hd).transpose(1, 0, 2)
    tb.attn.qkv.weight.copy_(torch.from_numpy(k.reshape(v.hidden, 3 * v.hidden).T.copy()))
    tb.attn.qkv.bias.copy_(torch.from_numpy(b.reshape(-1).copy()))
    _copy_linear(tb.attn.proj, jb.attn.proj)
    _copy_linear(tb.mlp.fc1, jb.mlp.fc1)
    _copy_linear(tb.mlp.fc2, jb.mlp.fc2)
    _copy_linear(tb.adaLN_modulation[1], jb.adaLN_modulation)
  _copy_linear(tm.final_layer.adaLN_modulation[1], jm.final_layer.adaLN_modulation)
  _copy_linear(tm.final_layer.linear, jm.final_layer.linear)
  n_torch = sum(x.numel() for x in tm.parameters())
  n_jax = sum(x.size for x in jax.tree.leaves(nnx.state(jm, nnx.Param)))
  assert n_torch == n_jax, (n_torch, n_jax)


def randomise_zero_init(model: dit.DiT, seed: int) -> None:
  """Zero-initialised parameters (adaLN, final linear, every bias) -> normal(0, 0.02)."""
  rng = np.random.default_rng(seed + 1)
  linears = [model.x_embedder, model.t_embedder.fc1, model.t_embedder.fc2, model.cond_proj,
             model.final_layer.linear, model.final_layer.adaLN_modulation]
  for block in model.blocks:
    linears += [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2,
                block.adaLN_modulation]
  zero_kernels = [block.adaLN_modulation for block in model.blocks] + [
      model.final_layer.adaLN_modulation, model.final_layer.linear]
  for lin in linears:
    params = [lin.bias] + ([lin.kernel] if any(lin is z for z in zero_kernels) else [])
    for param in params:
      param[...] = jnp.asarray(rng.normal(0.0, 0.02, param.shape).astype(np.float32))


# ---------------------------------------------------------------------- JAX


def jax_setup(config: ml_collections.ConfigDict, fill) -> train_step.TrainerStep:
  """The stage-2 trainer's step (`make_train_step` over `dit_loss`), filled by `fill(model)`."""
  mesh = parallel.mesh_from_config(config)
  schedule = schedules.from_config(config.diffusion)
  loss_fn = functools.partial(dit_train.dit_loss, cfg=config, schedule=schedule)
  return train_step.build(config, mesh, dit_train.create_model(config, fr_info(), NUM_REAL),
                          loss_fn, trainable=stage2.TRAINABLE, fill=fill)


def trainer_draws(rng: np.ndarray, step: int, b: int, config: ml_collections.ConfigDict
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """(t, noise NCHW, kept) that `dit_train.dit_loss` draws at `step` (0-based) of a state
  whose `rng` is `rng`: `make_train_step` passes `fold_in(rng, step)`; `dit_loss` splits it
  into (t, noise, condition dropout, landmark dropout) keys. Recomputed here so the torch
  side can take the same draws; if `dit_loss` changes how it draws, the step-1 loss check
  fails and this needs the same change."""
  key = jax.random.fold_in(jnp.asarray(rng), step)
  r_t, r_n, r_c, _ = jax.random.split(key, 4)
  t = jax.random.randint(r_t, (b,), 0, int(config.diffusion.timesteps))
  size = _IMAGE_SIZE.value
  noise = jax.random.normal(r_n, (b, size, size, OUT_CHANNELS), jnp.float32)
  kept = jax.random.uniform(r_c, (b,)) >= float(config.diffusion.cond_drop)
  to_t = lambda x: torch.from_numpy(np.array(x))
  return to_t(t).long(), to_t(noise).permute(0, 3, 1, 2).contiguous(), to_t(kept)


# -------------------------------------------------------------------- timing


@dataclasses.dataclass
class Sides:
  """Both frameworks' stage-2 steps from the same weights, ready to time (`build`)."""

  trainers: dict[str, train_step.TrainerStep]  # 'jax' (blocks unrolled) and 'scan'
  batch: dict[str, np.ndarray]  # the host batch, as the stage-2 pipeline delivers it
  tbatch: dict[str, torch.Tensor]  # the same on the torch device
  tstep: "TorchStage2Step"
  configs: dict[str, ml_collections.ConfigDict]
  jdit: dit.DiT | None  # the unrolled DiT's weights (forward check; drop before timing)
  check: tuple[np.ndarray, np.ndarray, np.ndarray]  # (x, t, cond) of the forward check
  out: dict[str, Any]  # the run's description (sizes, sides, tolerances)


def build() -> Sides:
  """The trainer's unrolled and scanned steps and the PyTorch step, from identical weights."""
  torch.manual_seed(_SEED.value)
  torch.set_num_threads(_THREADS.value)
  device, dtype = train_step.torch_device(_TORCH_DEVICE.value), _DTYPE.value
  tol = TOLERANCES[dtype]
  v = dit.get_variant(_VARIANT.value)
  rng = np.random.default_rng(_SEED.value)
  b, d = _BATCH.value, cond_dim()
  # The training batch, as the stage-2 pipeline delivers it.
  rows = rng.normal(size=(NUM_REAL, d)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=-1, keepdims=True)  # stage-1 rows are unit vectors
  points = (np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None]
            + rng.normal(0.0, 2.0, (b, 5, 2)).astype(np.float32))
  batch = {"image": rng.integers(0, 256, (b, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8),
           "label": rng.integers(0, NUM_REAL, (b,)).astype(np.int32),
           "landmarks": points, "has_landmarks": np.ones((b,), bool)}
  tbatch = {k: torch.from_numpy(np.array(x)).to(device) for k, x in batch.items()}
  tbatch["label"] = tbatch["label"].long()
  # Inputs of the forward-agreement check only.
  size = _IMAGE_SIZE.value
  x = rng.normal(size=(b, size, size, in_channels())).astype(np.float32)
  t = rng.integers(0, int(_DEMO.diffusion.timesteps), (b,)).astype(np.int32)
  cond = rng.normal(size=(b, d)).astype(np.float32) / math.sqrt(d)

  tfr = torch_ref._randomise(torch_iresnet(fr_info()), _SEED.value)  # pylint: disable=protected-access
  fr_state = {k: val.detach().clone() for k, val in tfr.state_dict().items()}
  tmodel = TorchDiT(v, _PATCH.value, overlap=_OVERLAP.value, cond_scale=cond_scale()).train()
  filled: dict[str, Any] = {}

  def fill(model: stage2.Stage2) -> None:
    """The benchmark's weights into a fresh state (as `fit(initialize=...)`)."""
    if "dit" in filled:  # the scanned model: the same weights, stacked over depth
      dit.copy_into_scanned(filled["dit"], model.dit)
    else:
      randomise_zero_init(model.dit, _SEED.value)
      filled["dit"] = model.dit
    iresnet.load_insightface_state_dict(model.fr, fr_state)
    model.rows[...] = jnp.asarray(rows)

  configs = {side: stage2_config(scan_blocks=side == "scan", dtype=dtype)
             for side in ("jax", "scan")}
  trainers = {"jax": jax_setup(configs["jax"], fill)}
  jdit = filled["dit"]
  copy_into_torch(tmodel, jdit)
  tmodel.to(device)
  # Built before any step donates the unrolled state: the scanned state copies its weights.
  trainers["scan"] = jax_setup(configs["scan"], fill)
  filled.clear()  # (not `del`: `fill` closes over it)
  schedule = schedules.from_config(configs["jax"].diffusion)
  tstep = TorchStage2Step(tmodel, tfr, rows, schedule, configs["jax"], device, dtype)
  out: dict[str, Any] = {"params": sum(p.numel() for p in tmodel.parameters()),
                         "tokens": (size // _PATCH.value) ** 2, "hidden": v.hidden,
                         "depth": v.depth, "heads": v.heads, "fr": fr_info(),
                         "tolerances": tol, **train_step.sides(device, dtype)}
  return Sides(trainers, batch, tbatch, tstep, configs, jdit, (x, t, cond), out)


def run() -> dict[str, Any]:
  sides = build()
  trainers, batch, tbatch, tstep, configs = (sides.trainers, sides.batch, sides.tbatch,
                                             sides.tstep, sides.configs)
  out, tol, (x, t, cond) = sides.out, sides.out["tolerances"], sides.check
  device, dtype, b = tstep.device, _DTYPE.value, _BATCH.value
  # Forward agreement of the two DiTs (before any update; JAX eager, torch no-grad).
  jout = np.asarray(sides.jdit(jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond)), np.float32)
  sides.jdit = None
  to_dev = lambda a: torch.from_numpy(a).to(device)
  with torch.no_grad(), train_step.torch_autocast(device, dtype):
    tout = tstep.model(to_dev(x).permute(0, 3, 1, 2).contiguous(), to_dev(t).long(),
                       to_dev(cond))
  tout = tout.float().permute(0, 2, 3, 1).cpu().numpy()
  out["fwd_max_abs"] = float(np.max(np.abs(tout)))
  out["fwd_max_diff"] = float(np.max(np.abs(jout - tout)))
  out["fwd_rel"] = out["fwd_max_diff"] / out["fwd_max_abs"]
  print(f"forward: max |out| {out['fwd_max_abs']:.4g}, out std {float(np.std(tout)):.4g}, "
        f"max |jax - torch| {out['fwd_max_diff']:.3g} (relative {out['fwd_rel']:.3g})")
  assert out["fwd_rel"] < tol["fwd"], (
      f"forward outputs disagree ({dtype}): relative {out['fwd_rel']:.3g}")
  state_rng = np.asarray(trainers["jax"].state.rng)

  # JAX, blocks unrolled (`jax`) and scanned (`scan`): compile, step 1 and the step-2
  # warm-up, then the timed steps.
  for side in ("jax", "scan"):
    trainer = trainers.pop(side)
    r = train_step.time_steps(trainer, trainer.put_batch(batch), _STEPS.value)
    for k in ("compile_s", "first_step_s", "times", "cores", "flops"):
      out[f"{side}_{k}"] = r[k]
    for i in (1, 2):
      m = r[f"metrics_{i}"]
      out[f"{side}_loss_{i}"] = m["loss"]
      out[f"{side}_diff_{i}"] = m["loss_diffusion"]
      out[f"{side}_id_{i}"] = m.get("loss_identity", 0.0)
    del trainer, r

  for k in ("loss_1", "loss_2"):
    assert abs(out[f"scan_{k}"] - out[f"jax_{k}"]) <= tol["scan"] * abs(out[f"jax_{k}"]), (
        f"scan_blocks changed the {k.replace('_', ' ')}: {out[f'scan_{k}']} vs {out[f'jax_{k}']}")
  # Torch steps 1 and 2 take the trainer's draws; the timed steps draw their own.
  t0 = time.perf_counter()
  losses = tuple(map(float, tstep.step(tbatch, trainer_draws(state_rng, 0, b, configs["jax"]))))
  out["torch_first_step_s"] = time.perf_counter() - t0  # float(): waits for the device
  out["torch_loss_1"], out["torch_diff_1"], out["torch_id_1"] = losses
  losses = tstep.step(tbatch, trainer_draws(state_rng, 1, b, configs["jax"]))
  out["torch_loss_2"], out["torch_diff_2"], out["torch_id_2"] = map(float, losses)
  out["loss_1_rel"] = abs(out["jax_loss_1"] - out["torch_loss_1"]) / abs(out["torch_loss_1"])
  out["loss_2_rel"] = abs(out["jax_loss_2"] - out["torch_loss_2"]) / abs(out["torch_loss_2"])
  assert out["loss_1_rel"] < tol["loss"], (
      f"step-1 losses disagree ({dtype}): jax {out['jax_loss_1']} (diffusion {out['jax_diff_1']}, "
      f"identity {out['jax_id_1']}), torch {out['torch_loss_1']} (diffusion "
      f"{out['torch_diff_1']}, identity {out['torch_id_1']})")
  out["torch_times"], out["torch_cores"] = cpu_threads.time_calls(
      train_step.torch_synced(lambda: tstep.step(tbatch), device), _STEPS.value)
  for side in ("jax", "scan", "torch"):
    out[f"{side}_s"] = float(np.median(out[f"{side}_times"]))
    out[f"{side}_best_s"] = float(np.min(out[f"{side}_times"]))
  out["ratio"] = out["torch_s"] / out["jax_s"]
  out["ratio_best"] = out["torch_best_s"] / out["jax_best_s"]
  out["ratio_scan"] = out["torch_s"] / out["scan_s"]
  out["ratio_scan_best"] = out["torch_best_s"] / out["scan_best_s"]
  out.update(cpu_threads.environment(torch.get_num_threads()))
  return out


def to_markdown(info: dict[str, Any], r: dict[str, Any]) -> str:
  ms = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
  b = _BATCH.value
  fr = r["fr"]
  id_w = _ID_WEIGHT.value
  identity = (f"the identity loss (weight {id_w:g}, t <= {_DEMO.diffusion.id_loss_max_t}) "
              f"through the frozen IResNet-{fr['arch']} ({fr['embed_dim']}-d, "
              f"{fr['input_size']}x{fr['input_size']} input: x0_hat resized)"
              if id_w > 0 else "no identity loss (`--id_loss_weight=0`)")
  lines = dp.section_header(SECTION, "benchmarks.dit_step", info) + [
      f"{train_step.describe(r)}; torch {torch.__version__}, "
      f"{r['torch_threads']} torch threads, process pinned to {r['affinity']} CPU(s) "
      f"(XLA:CPU's pool; `XLA_FLAGS`={r['xla_flags']!r}).",
      "",
      f"One step of stage-2 training on {b} uint8 112x112 faces with their landmark points"
      + (f" (faces and landmark images resized to the {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} "
         "the DiT draws at, in the step)" if _IMAGE_SIZE.value != INPUT_SIZE else "") + ": "
      f"DiT-{_VARIANT.value} (hidden {r['hidden']}, depth {r['depth']}, {r['heads']} heads, "
      f"{r['params'] / 1e6:.2f} M parameters), patch {_PATCH.value} ({r['tokens']} tokens), "
      f"output_overlap {_OVERLAP.value}, {in_channels()} input channels (landmark image "
      f"rendered in the step, blurred copies σ = {', '.join(_BLUR.value) or 'none'}), "
      f"{cond_dim()}-d rows with condition dropout {_COND_DROP.value:g}, random t and noise "
      f"drawn in the step, {_PREDICTION.value}-prediction MSE plus {identity}, gradient "
      f"clipping at {_DEMO.optim.grad_clip_norm:g}, AdamW lr={_LR.value:g} (betas "
      f"{_DEMO.optim.b1:g}/{_DEMO.optim.b2:g}, eps {_DEMO.optim.eps:g}, weight decay "
      f"{_DEMO.optim.weight_decay:g}), EMA {_DEMO.train.ema_decay:g} with warm-up (the flags' "
      "defaults are `configs/dit.py:demo`'s settings). Median and best of the timed steps "
      "after compile + 2 warm-up steps.",
      "",
      "JAX columns: the stage-2 trainer's own step, as `train/loop.py` `fit` builds it "
      "(`state.make_train_step` over `dit.dit_loss`, `trainable=stage2.TRAINABLE`, the "
      "donated train state of `state.create_state`; it also computes the gradient and "
      "update norms and the non-finite guard). PyTorch column: the same work in eager "
      "PyTorch (`TorchStage2Step`: DiT `models.py` recipe, arcface_torch IResNet, "
      "`clip_grad_norm_`, `torch.optim.AdamW`, DiT's `update_ema`).",
      "",
      "| | JAX (trainer's step, blocks unrolled: the configs') | JAX (trainer's step, "
      "`scan_blocks=True`) | PyTorch (same work, eager) |",
      "|---|---:|---:|---:|",
      f"| compile (lower + compile) s | {r['jax_compile_s']:.1f} | {r['scan_compile_s']:.1f} "
      "| - |",
      f"| first step s (JAX: after compile) | {r['jax_first_step_s']:.3f} | "
      f"{r['scan_first_step_s']:.3f} | {r['torch_first_step_s']:.3f} |",
      f"| step s, median of {_STEPS.value} | **{r['jax_s']:.3f}** | **{r['scan_s']:.3f}** | "
      f"**{r['torch_s']:.3f}** |",
      f"| step s, best of {_STEPS.value} | {r['jax_best_s']:.3f} | {r['scan_best_s']:.3f} | "
      f"{r['torch_best_s']:.3f} |",
      f"| timed steps s | {ms(r['jax_times'])} | {ms(r['scan_times'])} | "
      f"{ms(r['torch_times'])} |",
      f"| cores used (process CPU s / wall s, timed steps) | {r['jax_cores']:.2f} | "
      f"{r['scan_cores']:.2f} | {r['torch_cores']:.2f} |",
      f"| images / s (median step) | {b / r['jax_s']:.1f} | {b / r['scan_s']:.1f} | "
      f"{b / r['torch_s']:.1f} |",
      f"| loss, step 1 (same weights, batch and draws) | {r['jax_loss_1']:.6f} | "
      f"{r['scan_loss_1']:.6f} | {r['torch_loss_1']:.6f} |",
      f"| of which diffusion / identity, step 1 | {r['jax_diff_1']:.6f} / {r['jax_id_1']:.6f} "
      f"| {r['scan_diff_1']:.6f} / {r['scan_id_1']:.6f} | {r['torch_diff_1']:.6f} / "
      f"{r['torch_id_1']:.6f} |",
      f"| loss, step 2 (after one AdamW update) | {r['jax_loss_2']:.6f} | "
      f"{r['scan_loss_2']:.6f} | {r['torch_loss_2']:.6f} |",
      "",
      f"torch time / JAX time = **{r['ratio']:.2f}** median, {r['ratio_best']:.2f} best; "
      f"with `scan_blocks=True` **{r['ratio_scan']:.2f}** median, "
      f"{r['ratio_scan_best']:.2f} best (> 1: JAX faster).",
      "",
      "Notes:",
      "",
      "* Same weights on both sides: the trainer's state is created, then the DiT's "
      "zero-initialised parameters (adaLN modulation and final linear kernels) and all biases "
      "are set to normal(0, 0.02), the frozen IResNet gets a randomised torch IResNet's "
      "weights and the rows random unit vectors; the DiT is copied into the torch model "
      "(patch kernel into conv layout, qkv re-ordered from heads-major to timm's "
      "`[3, heads, head_dim]`). DiT forward outputs on a random batch: max |JAX - torch| = "
      f"{r['fwd_max_diff']:.2e}, {r['fwd_rel']:.1e} of max |out| = {r['fwd_max_abs']:.3g} "
      f"(asserted < {r['tolerances']['fwd']:g}, {r['dtype']}).",
      "* Same draws for the two untimed warm-up steps: torch takes the t, noise and dropout "
      "the trainer's step draws from `fold_in(state.rng, step)`, so the losses agree "
      f"(step 1: relative {r['loss_1_rel']:.1e}, asserted < {r['tolerances']['loss']:g}; "
      f"step 2: {r['loss_2_rel']:.1e}). The timed torch steps draw their own (`torch.randint`, "
      "`randn`, `rand`), as the JAX step does.",
      "* Not mirrored on the torch side: the JAX step's non-finite guard (a select between the "
      "old and new state) and its update-norm metric, work the JAX columns pay for alone.",
      "* Shared 2-core machine: other jobs may have used the same cores; see the load "
      "averages above. All JAX steps run before all torch steps, so a load change during "
      "the run hits one side only; treat the ratio as approximate.",
      "* Why the scanned column: unrolled, XLA:CPU fuses the residual stream's backward "
      "chain (adaLN gates, LayerNorm backward) into the transposing copy that feeds each "
      "weight-gradient matmul, recomputing the chain from the output down to that block for "
      "every block (`copy_bitcast_fusion`s costing up to ~30 ms each, largest for the deepest "
      "chains, in a `jax.profiler` trace of DiT-small/16 at batch 32). `lax.scan` "
      "materialises the gradient at each block boundary. `optimization_barrier` does not "
      "help: XLA:CPU expands it away before fusion.",
      "* PyTorch is eager with the default `torch.optim.AdamW` (for-loop implementation on "
      "CPU); the batch reaches both sides as uint8 NHWC, and the torch step does its own "
      "NCHW conversion.",
      "* Threads: as in the stage-1 section above (`torch.set_num_threads`, and the process "
      "pinned to `--threads` CPUs for XLA:CPU's pool). \"cores used\" shows what each side "
      "actually kept busy.",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _THREADS.value != cpu_threads.THREADS_EARLY:
    raise app.UsageError("--threads must be given as --threads=N.")
  # The trainers' XLA:CPU flags, as `python -m vigface_jax.main` adds them for training tasks
  # (before dp.machine() starts the backend; VIGFACE_CPU_XLA_FLAGS=0: none).
  vigface_jax.add_cpu_xla_flags()
  info = dp.machine()
  r = run()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"first-step loss: jax {r['jax_loss_1']:.6f}  torch {r['torch_loss_1']:.6f}  "
        f"(|diff| {abs(r['jax_loss_1'] - r['torch_loss_1']):.2e}; diffusion "
        f"{r['jax_diff_1']:.6f} / {r['torch_diff_1']:.6f}, identity {r['jax_id_1']:.6f} / "
        f"{r['torch_id_1']:.6f})")
  print(f"second-step loss: jax {r['jax_loss_2']:.6f}  torch {r['torch_loss_2']:.6f}")
  print(f"scan_blocks: step median {r['scan_s']:.3f} s, losses {r['scan_loss_1']:.6f} / "
        f"{r['scan_loss_2']:.6f}; torch/scan = {r['ratio_scan']:.2f}")
  b = _BATCH.value
  print(f"jax compile {r['jax_compile_s']:.1f} s; step median: jax {r['jax_s']:.3f} s "
        f"({b / r['jax_s']:.1f} img/s), torch {r['torch_s']:.3f} s "
        f"({b / r['torch_s']:.1f} img/s); torch/jax = {r['ratio']:.2f} "
        f"(best-of-{_STEPS.value}: {r['ratio_best']:.2f})")
  section = to_markdown(info, r)
  print(section)
  if _WRITE.value and flags.FLAGS.output:
    dp.write_output(flags.FLAGS.output, section, SECTION)
  if flags.FLAGS.json:  # the figures, for a caller (benchmarks/run.py)
    dp.write_json(flags.FLAGS.json, {"machine": info, "figures": r, "batch": _BATCH.value})


if __name__ == "__main__":
  app.run(main)
