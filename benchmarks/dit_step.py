r"""Stage-2 training step, JAX vs PyTorch: pixel-space DiT + MSE + AdamW, CPU float32.

    python -m benchmarks.dit_step --variant=small --patch_size=16 --output_overlap=4 \
        --landmark_blur=6,16 --batch=32 --steps=5 [--write]

One training step of `vigface_jax.models.dit.DiT` (112x112, 6 input channels, or 6 + 3 per
`--landmark_blur` σ as in the demo config, 3 output channels, 512-d condition rows) against
the same architecture written here in PyTorch the facebookresearch/DiT way (`models.py`): a
`Conv2d` patch embedding (kernel = stride = p), the fixed 2-D sin-cos position embedding
(DiT's numpy code, copied below), DiT's `TimestepEmbedder`, `c = t_emb + Linear(cond)` (our
replacement of the `LabelEmbedder`), adaLN-Zero blocks with timm-style attention (`qkv` laid
out `[3, heads, head_dim]`) through `F.scaled_dot_product_attention`, a tanh-GELU MLP, DiT's
`FinalLayer` and `unpatchify`. With
`--output_overlap=m` (the demo config uses 4) each token's `(p + 2m)²` window is weighted by
the same cross-fade and overlap-added with `F.fold` (stride p, padding m), then divided by the
folded weights: an independent implementation of `dit.fold_patches`.

Weights: our model is built first; its zero-initialised parameters (adaLN modulation kernels,
the final linear kernel) and all biases are randomised (normal, std 0.02) so the output is not
identically zero, then every parameter is copied into the torch model (kernels transposed, the
patch-embedding kernel reshaped into conv layout, qkv re-ordered from our heads-major
`[heads, 3, head_dim]` to timm's `[3, heads, head_dim]`). The forward outputs on the benchmark
batch must agree (max |diff| / max |out| < 1e-3, asserted and printed) before anything is timed.

Step: predict a fixed random target (v-prediction-like) from `(x, t, cond)`; loss = mean
squared error; AdamW (lr 1e-4, betas 0.9 / 0.999, eps 1e-8, weight decay 0, as DiT and
`configs/dit.py`; `optax.adamw` and `torch.optim.AdamW` both decouple the decay). JAX: one
`jax.jit` over the split NNX `(model, nnx.Optimizer(model, tx, wrt=nnx.Param))` state with the
state donated; compile (`lower().compile()`) is reported separately. The JAX step runs twice:
blocks unrolled (the default) and `scan_blocks=True` (the same weights stacked over depth,
`jax.lax.scan` over the blocks; its losses must match). PyTorch: eager, default
`torch.optim.AdamW` (its for-loop implementation on CPU). Each side runs two warm-up steps,
then `--steps` timed steps, each ended by `jax.block_until_ready` (torch is synchronous on
CPU); median and best are reported. The step-1 losses come from identical weights and must
agree; the step-2 losses show the first AdamW updates agree too.

Threads: as `benchmarks/fr_step.py`: `torch.set_num_threads(--threads)`, and this process is
pinned to `--threads` CPUs (`os.sched_setaffinity`) before jax starts, since XLA:CPU sizes its
pool from the CPUs the process may use.
"""

from __future__ import annotations

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
import numpy as np
import optax
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import data_pipeline as dp  # machine(), section_header(), write_output()
from vigface_jax.models import dit
from vigface_jax.train import dit as dit_train
# pylint: enable=g-import-not-at-top,wrong-import-position

_VARIANT = flags.DEFINE_string("variant", "small", "DiT variant (dit.VARIANTS).")
_PATCH = flags.DEFINE_integer("patch_size", 8, "Patch side (divides 112).")
_OVERLAP = flags.DEFINE_integer("output_overlap", 0, "DiT output_overlap (pixels).")
_BLUR = flags.DEFINE_list("landmark_blur", [], "σ of the blurred landmark-image copies "
                          "(configs/dit.py model.landmark_blur; the demo: 6,16), 3 more input "
                          "channels each.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per framework (after 2 warm-up steps).")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for both frameworks.")
_LR = flags.DEFINE_float("lr", 1e-4, "AdamW learning rate.")
_WRITE = flags.DEFINE_bool("write", False, "Write the section into --output (BENCHMARKS.md).")
# data_pipeline's flags: --output (BENCHMARKS.md) and --seed (weights and batch).
flags.FLAGS.set_default("output", "BENCHMARKS.md")
_SEED = dp._SEED  # pylint: disable=protected-access

SECTION = "## DiT training step"
INPUT_SIZE, OUT_CHANNELS, COND_DIM = 112, 3, 512
NUM_TIMESTEPS = 1000
REL_TOL = 1e-3


def landmark_blur() -> tuple[float, ...]:
  """`--landmark_blur` as σ values."""
  return tuple(float(v) for v in _BLUR.value)


def in_channels() -> int:
  """Noisy image ⊕ landmark image (6), plus 3 per blurred landmark copy (as stage 2)."""
  return dit_train.input_channels(landmark_blur())

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
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
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

  def __init__(self, v: dit.Variant, patch: int, mlp_ratio: float = 4.0, overlap: int = 0):
    super().__init__()
    self.patch, self.out_channels, self.overlap = patch, OUT_CHANNELS, overlap
    self.window = patch + 2 * overlap
    self.x_embedder = nn.Conv2d(in_channels(), v.hidden, kernel_size=patch, stride=patch)
    self.t_embedder = TorchTimestepEmbedder(v.hidden)
    self.y_embedder = nn.Linear(COND_DIM, v.hidden)
    pos = torch_2d_sincos_pos_embed(v.hidden, INPUT_SIZE // patch)
    self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0),
                         persistent=False)
    self.blocks = nn.ModuleList([TorchDiTBlock(v.hidden, v.heads, mlp_ratio)
                                 for _ in range(v.depth)])
    self.final_layer = TorchFinalLayer(v.hidden, self.window, OUT_CHANNELS)
    if overlap:
      ramp = (torch.arange(2 * overlap, dtype=torch.float32) + 0.5) / (2 * overlap)
      w = torch.cat([ramp, torch.ones(patch - 2 * overlap), ramp.flip(0)])
      self.register_buffer("window_weights", w[:, None] * w[None, :], persistent=False)
      g = INPUT_SIZE // patch
      ones = self.window_weights.reshape(1, -1, 1).expand(1, -1, g * g)
      self.register_buffer("fold_norm", self._fold(ones), persistent=False)

  def _fold(self, cols):
    return F.fold(cols, (INPUT_SIZE, INPUT_SIZE), self.window, stride=self.patch,
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
    c = self.t_embedder(t) + self.y_embedder(cond)
    for block in self.blocks:
      x = block(x, c)
    if self.overlap:
      return self.fold_windows(self.final_layer(x, c))
    return self.unpatchify(self.final_layer(x, c))


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


def scanned_copy(model: dit.DiT) -> dit.DiT:
  """The same network built with `scan_blocks=True`, block weights stacked over depth."""
  scanned = dit.DiT(model.variant, patch_size=model.patch_size, input_size=INPUT_SIZE,
                    in_channels=in_channels(), out_channels=OUT_CHANNELS, cond_dim=COND_DIM,
                    output_overlap=model.output_overlap, scan_blocks=True, rngs=nnx.Rngs(0))
  dit.copy_into_scanned(model, scanned)  # copies: the unrolled model's state is donated
  return scanned


# ---------------------------------------------------------------------- JAX


def jax_setup(model: dit.DiT):
  """Optimizer and a jitted step over the donated split `(model, optimizer)` state."""
  tx = optax.adamw(_LR.value, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, x, t, cond, target):
    return jnp.mean(jnp.square(model(x, t, cond) - target))

  def step(state, x, t, cond, target):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, t, cond, target)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return state, jax.jit(step, donate_argnums=0)


def torch_setup(model: TorchDiT):
  opt = torch.optim.AdamW(model.parameters(), lr=_LR.value, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0)

  def step(x, t, cond, target) -> torch.Tensor:
    loss = F.mse_loss(model(x, t, cond), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return step


# -------------------------------------------------------------------- timing


def run() -> dict[str, Any]:
  torch.manual_seed(_SEED.value)
  torch.set_num_threads(_THREADS.value)
  v = dit.get_variant(_VARIANT.value)
  rng = np.random.default_rng(_SEED.value)
  b = _BATCH.value
  x = rng.normal(size=(b, INPUT_SIZE, INPUT_SIZE, in_channels())).astype(np.float32)
  t = rng.integers(0, NUM_TIMESTEPS, (b,)).astype(np.int32)
  cond = rng.normal(0.0, 0.05, (b, COND_DIM)).astype(np.float32)
  target = rng.normal(size=(b, INPUT_SIZE, INPUT_SIZE, OUT_CHANNELS)).astype(np.float32)

  jmodel = dit.DiT(v, patch_size=_PATCH.value, input_size=INPUT_SIZE, in_channels=in_channels(),
                   out_channels=OUT_CHANNELS, cond_dim=COND_DIM,
                   output_overlap=_OVERLAP.value, rngs=nnx.Rngs(_SEED.value))
  randomise_zero_init(jmodel, _SEED.value)
  tmodel = TorchDiT(v, _PATCH.value, overlap=_OVERLAP.value).train()
  copy_into_torch(tmodel, jmodel)

  jx, jt, jcond, jtarget = map(jnp.asarray, (x, t, cond, target))
  # NHWC -> NCHW once, outside the timed step (JAX takes NHWC as it is).
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  tt, tcond = torch.from_numpy(t).long(), torch.from_numpy(cond)
  ttarget = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()

  out: dict[str, Any] = {"params": sum(p.numel() for p in tmodel.parameters()),
                         "tokens": (INPUT_SIZE // _PATCH.value) ** 2, "hidden": v.hidden,
                         "depth": v.depth, "heads": v.heads}
  # Forward agreement (before any update; JAX eager, torch no-grad).
  jout = np.asarray(jmodel(jx, jt, jcond))
  with torch.no_grad():
    tout = tmodel(tx, tt, tcond).permute(0, 2, 3, 1).numpy()
  out["fwd_max_abs"] = float(np.max(np.abs(tout)))
  out["fwd_max_diff"] = float(np.max(np.abs(jout - tout)))
  out["fwd_rel"] = out["fwd_max_diff"] / out["fwd_max_abs"]
  print(f"forward: max |out| {out['fwd_max_abs']:.4g}, out std {float(np.std(tout)):.4g}, "
        f"max |jax - torch| {out['fwd_max_diff']:.3g} (relative {out['fwd_rel']:.3g})")
  assert out["fwd_rel"] < REL_TOL, f"forward outputs disagree: relative {out['fwd_rel']:.3g}"

  smodel = scanned_copy(jmodel)  # before jmodel's state is donated
  tstep = torch_setup(tmodel)

  # JAX, blocks unrolled (`jax`) and scanned (`scan`, `scan_blocks=True`): compile, step 1
  # and the step-2 warm-up, then the timed steps.
  for side, model in (("jax", jmodel), ("scan", smodel)):
    state, jstep = jax_setup(model)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, jx, jt, jcond, jtarget).compile()
    out[f"{side}_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, loss = jax.block_until_ready(compiled(state, jx, jt, jcond, jtarget))
    out[f"{side}_first_step_s"] = time.perf_counter() - t0
    out[f"{side}_loss_1"] = float(loss)
    state, loss = jax.block_until_ready(compiled(state, jx, jt, jcond, jtarget))
    out[f"{side}_loss_2"] = float(loss)

    def jax_once(compiled=compiled):
      nonlocal state
      state, loss = compiled(state, jx, jt, jcond, jtarget)
      jax.block_until_ready((state, loss))

    out[f"{side}_times"], out[f"{side}_cores"] = cpu_threads.time_calls(jax_once, _STEPS.value)
    del state

  for k in ("loss_1", "loss_2"):
    assert abs(out[f"scan_{k}"] - out[f"jax_{k}"]) <= 1e-5 * abs(out[f"jax_{k}"]), (
        f"scan_blocks changed the {k.replace('_', ' ')}: {out[f'scan_{k}']} vs {out[f'jax_{k}']}")
  t0 = time.perf_counter()
  out["torch_loss_1"] = float(tstep(tx, tt, tcond, ttarget))
  out["torch_first_step_s"] = time.perf_counter() - t0
  # Second step: warm-up; its loss checks the first AdamW updates agree.
  out["torch_loss_2"] = float(tstep(tx, tt, tcond, ttarget))
  out["torch_times"], out["torch_cores"] = cpu_threads.time_calls(lambda: tstep(tx, tt, tcond, ttarget),
                                                 _STEPS.value)
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
  lines = dp.section_header(SECTION, "benchmarks.dit_step", info) + [
      f"**CPU only** (no accelerator), float32, torch {torch.__version__}, "
      f"{r['torch_threads']} torch threads, process pinned to {r['affinity']} CPU(s) "
      f"(XLA:CPU's pool; `XLA_FLAGS`={r['xla_flags']!r}).",
      "",
      f"One step = DiT-{_VARIANT.value} (hidden {r['hidden']}, depth {r['depth']}, "
      f"{r['heads']} heads, {r['params'] / 1e6:.2f} M parameters), patch {_PATCH.value} "
      f"({r['tokens']} tokens), output_overlap {_OVERLAP.value}, forward + backward on {b} "
      f"float32 112x112x{in_channels()} "
      f"inputs with random timesteps and {COND_DIM}-d condition rows, MSE against a fixed "
      f"random 112x112x{OUT_CHANNELS} target, AdamW lr={_LR.value:g} (betas 0.9/0.999, "
      "eps 1e-8, weight decay 0). Median and best of the timed steps after compile + 2 "
      "warm-up steps.",
      "",
      "| | JAX (ours, `jax.jit`, donated state) | JAX, `scan_blocks=True` | PyTorch (DiT "
      "`models.py` recipe, eager) |",
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
      f"| loss, step 1 (same weights, same batch) | {r['jax_loss_1']:.6f} | "
      f"{r['scan_loss_1']:.6f} | {r['torch_loss_1']:.6f} |",
      f"| loss, step 2 (after one AdamW update) | {r['jax_loss_2']:.6f} | "
      f"{r['scan_loss_2']:.6f} | {r['torch_loss_2']:.6f} |",
      "",
      f"torch time / JAX time = **{r['ratio']:.2f}** median, {r['ratio_best']:.2f} best; "
      f"with `scan_blocks=True` **{r['ratio_scan']:.2f}** median, "
      f"{r['ratio_scan_best']:.2f} best (> 1: JAX faster).",
      "",
      "Notes:",
      "",
      "* Same weights on both sides: our DiT is initialised, its zero-initialised parameters "
      "(adaLN modulation and final linear kernels) and all biases are set to normal(0, 0.02), "
      "and everything is copied into the torch model (patch kernel into conv layout, qkv "
      "re-ordered from heads-major to timm's `[3, heads, head_dim]`). Forward outputs on the "
      f"benchmark batch: max |JAX - torch| = {r['fwd_max_diff']:.2e}, "
      f"{r['fwd_rel']:.1e} of max |out| = {r['fwd_max_abs']:.3g} (asserted < {REL_TOL:g}).",
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
      "CPU); the batch is converted to NCHW once, outside the timed step.",
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
  info = dp.machine()
  r = run()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"first-step loss: jax {r['jax_loss_1']:.6f}  torch {r['torch_loss_1']:.6f}  "
        f"(|diff| {abs(r['jax_loss_1'] - r['torch_loss_1']):.2e})")
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


if __name__ == "__main__":
  app.run(main)
