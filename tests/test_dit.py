"""Tests for vigface_jax.models.dit: the pixel-space Diffusion Transformer (tiny variant)."""

from __future__ import annotations

import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vigface_jax import parallel
from vigface_jax.models import dit

from conftest import run_on_fake_devices

B = 4


@nnx.jit
def _forward(model, x, t, cond):
  return model(x, t, cond)


@nnx.jit
def _forward_null(model, x, t):
  return model(x, t, None)


def _randomize(module: nnx.Module, seed: int, scale: float = 0.1) -> None:
  """Replaces every Param of `module` (in place) with `scale * normal`."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(module, jax.tree.unflatten(treedef, new))


def _inputs(seed: int = 0, batch: int = B, size: int = 112, channels: int = 6):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.randint(kt, (batch,), 0, 1000)
  cond = jax.random.normal(kc, (batch, 512))
  return x, t, cond


@pytest.fixture(scope="module")
def tiny():
  return dit.DiT("tiny", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_random():
  """A tiny DiT with every parameter random (blocks are not the identity)."""
  model = dit.DiT("tiny", rngs=nnx.Rngs(1))
  _randomize(model, 1)
  return model


def test_output_shape_and_exactly_zero_at_init(tiny):
  x, t, cond = _inputs()
  y = _forward(tiny, x, t, cond)
  assert y.shape == (B, 112, 112, 3) and y.dtype == jnp.float32
  assert not np.any(np.asarray(y))
  # adaLN-Zero: every modulation and the final linear layer start at zero.
  assert not np.any(np.asarray(tiny.blocks[0].adaLN_modulation.kernel[...]))
  assert not np.any(np.asarray(tiny.final_layer.linear.kernel[...]))


def test_other_patch_size_bf16_and_float_timesteps():
  model = dit.DiT("tiny", patch_size=14, out_channels=4, dtype=jnp.bfloat16,
                  rngs=nnx.Rngs(0))
  _randomize(model, 2)
  x, t, cond = _inputs(batch=2)
  y = _forward(model, x, t.astype(jnp.float32) + 0.5, cond)
  assert y.shape == (2, 112, 112, 4) and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y))) and np.any(np.asarray(y))
  assert model.grid_size == 8


def test_patchify_roundtrip(tiny):
  x = jax.random.normal(jax.random.key(0), (2, 112, 112, 6))
  patches = tiny.patchify(x)
  assert patches.shape == (2, 14 * 14, 8 * 8 * 6)
  # Patch (row 1, col 2) holds pixels [8:16, 16:24] in (p_h, p_w, C) order.
  np.testing.assert_array_equal(patches[:, 14 + 2], x[:, 8:16, 16:24].reshape(2, -1))
  np.testing.assert_array_equal(tiny.unpatchify(patches), x)


def test_condition_and_timestep_dependence():
  model = dit.DiT("tiny", rngs=nnx.Rngs(3))
  _randomize(model.final_layer, 3, scale=0.5)  # blocks stay the identity (zero gates)
  x, _, cond = _inputs(3)
  x = jnp.broadcast_to(x[:1], x.shape)  # the same image in every row
  cond = cond.at[2].set(0.0)
  # rows: (cond0, t=10), (cond1, t=10), (zero, t=10), (cond0, t=500)
  cond = cond.at[3].set(cond[0])
  t = jnp.array([10, 10, 10, 500])
  y = np.asarray(_forward(model, x, t, cond))
  assert np.any(y)
  assert np.abs(y[0] - y[1]).max() > 1e-3  # the condition matters
  assert np.abs(y[0] - y[2]).max() > 1e-3
  assert np.abs(y[0] - y[3]).max() > 1e-3  # the timestep matters
  # The null path (cond=None: Linear(0) == bias) equals a zero condition row.
  y_null = np.asarray(_forward_null(model, x, t))
  np.testing.assert_allclose(y_null[2], y[2], rtol=0, atol=1e-6)
  np.testing.assert_allclose(y_null[:3], np.broadcast_to(y[2], (3,) + y.shape[1:]),
                             rtol=0, atol=1e-6)


def test_cond_scale_multiplies_the_row_and_keeps_the_null_condition():
  """`cond_scale=k` on a row equals `cond_scale=1` on k·row; zero stays the null path."""
  scaled = dit.DiT("tiny", cond_scale=8.0, rngs=nnx.Rngs(4))
  plain = dit.DiT("tiny", rngs=nnx.Rngs(4))
  for m in (scaled, plain):
    _randomize(m, 4, scale=0.2)
  x, t, cond = _inputs(4)
  cond = cond.at[1].set(0.0)
  y = np.asarray(_forward(scaled, x, t, cond))
  np.testing.assert_allclose(y, np.asarray(_forward(plain, x, t, 8.0 * cond)), rtol=1e-5,
                             atol=1e-5)
  assert np.abs(y[0] - np.asarray(_forward(plain, x, t, cond))[0]).max() > 1e-3
  np.testing.assert_allclose(np.asarray(_forward_null(scaled, x, t))[1], y[1], atol=1e-6)


def test_errors():
  for p in (5, 0, 3):
    with pytest.raises(ValueError, match="patch_size must divide input_size=112"):
      dit.DiT("tiny", patch_size=p, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Unknown DiT variant"):
    dit.DiT("huge", rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: dit.DiT("tiny", rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="input must be"):
    model(jnp.zeros((1, 112, 112, 3)), jnp.zeros((1,)), jnp.zeros((1, 512)))
  with pytest.raises(ValueError, match="cond must be"):
    model(jnp.zeros((1, 112, 112, 6)), jnp.zeros((1,)), jnp.zeros((1, 256)))


def _ref_fold(tokens, patch, overlap):
  """Scatter-add reference for `fold_patches`: paste each weighted window, renormalise."""
  tokens = np.asarray(tokens, np.float64)
  b, n, d = tokens.shape
  g, k = int(round(n ** 0.5)), patch + 2 * overlap
  ch = d // (k * k)
  w = np.ones(k)
  w[:2 * overlap] = (np.arange(2 * overlap) + 0.5) / (2 * overlap)
  w[k - 2 * overlap:] = w[:2 * overlap][::-1]
  w2 = w[:, None] * w[None, :]
  size = g * patch + 2 * overlap
  canvas, weight = np.zeros((b, size, size, ch)), np.zeros((size, size))
  for i in range(g):
    for j in range(g):
      win = tokens[:, i * g + j].reshape(b, k, k, ch)
      canvas[:, i * patch:i * patch + k, j * patch:j * patch + k] += win * w2[..., None]
      weight[i * patch:i * patch + k, j * patch:j * patch + k] += w2
  crop = slice(overlap, overlap + g * patch)
  return canvas[:, crop, crop] / weight[crop, crop, None]


@pytest.mark.parametrize("patch,overlap", [(16, 4), (8, 4), (14, 3)])
def test_fold_patches_matches_scatter_add_reference(patch, overlap):
  g = 112 // patch
  k = patch + 2 * overlap
  tokens = jax.random.normal(jax.random.key(patch), (2, g * g, k * k * 3))
  got = jax.jit(dit.fold_patches, static_argnums=(1, 2))(tokens, patch, overlap)
  assert got.shape == (2, 112, 112, 3)
  np.testing.assert_allclose(np.asarray(got), _ref_fold(tokens, patch, overlap), atol=1e-5)


def test_fold_patches_is_unpatchify_without_overlap_and_keeps_constants(tiny):
  tokens = jax.random.normal(jax.random.key(0), (2, 14 * 14, 8 * 8 * 3))
  np.testing.assert_array_equal(dit.fold_patches(tokens, 8, 0), tiny.unpatchify(tokens))
  const = jnp.full((1, 49, 24 * 24 * 3), 0.7)
  np.testing.assert_allclose(np.asarray(dit.fold_patches(const, 16, 4)), 0.7, atol=1e-6)


def test_fold_patches_crossfades_patch_borders():
  """Tokens that each predict one flat colour: a mosaic without overlap, ramps with it."""
  colours = jax.random.uniform(jax.random.key(1), (1, 49, 1, 3))
  step = float(jnp.ptp(colours, axis=1).max())  # the largest colour difference
  flat = lambda k: jnp.broadcast_to(colours, (1, 49, k * k, 3)).reshape(1, 49, -1)
  mosaic = np.asarray(dit.fold_patches(flat(16), 16, 0)[0])
  faded = np.asarray(dit.fold_patches(flat(24), 16, 4)[0])
  jump = lambda im: max(np.abs(np.diff(im, axis=a)).max() for a in (0, 1))
  assert jump(mosaic) > 0.5 * step
  assert jump(faded) <= step / 8 + 1e-6  # 2·overlap = 8 pixels per cross-fade
  # Away from the borders each patch keeps its token's colour.
  np.testing.assert_allclose(faded[3 * 16 + 8, 2 * 16 + 8], colours[0, 3 * 7 + 2, 0], atol=1e-6)


def test_output_overlap_model():
  model = dit.DiT("tiny", patch_size=16, output_overlap=4, rngs=nnx.Rngs(0))
  assert model.final_layer.linear.kernel.shape == (32, 24 * 24 * 3)
  x, t, cond = _inputs(batch=2)
  assert not np.any(np.asarray(_forward(model, x, t, cond)))  # zero final layer
  _randomize(model, 5)
  y = np.asarray(_forward(model, x, t, cond))
  assert y.shape == (2, 112, 112, 3) and np.all(np.isfinite(y)) and np.any(y)
  with pytest.raises(ValueError, match="output_overlap must be in"):
    dit.DiT("tiny", patch_size=16, output_overlap=9, rngs=nnx.Rngs(0))


def _ref_2d_sincos(embed_dim, grid_size):
  """facebookresearch/DiT `get_2d_sincos_pos_embed` (cls_token=False), verbatim numpy."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb_h = one_d(embed_dim // 2, grid[0])
  emb_w = one_d(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def test_pos_embed_matches_dit():
  for dim, grid in ((16, 4), (32, 7)):
    ours = dit.get_2d_sincos_pos_embed(dim, grid)
    assert ours.shape == (grid * grid, dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _ref_2d_sincos(dim, grid), rtol=0, atol=1e-6)


def test_timestep_embedding_matches_dit():
  t = jnp.array([0.0, 1.0, 999.0])
  emb = np.asarray(dit.timestep_embedding(t))
  half = 128
  freqs = np.exp(-np.log(10000) * np.arange(half) / half)
  args = np.array([0.0, 1.0, 999.0])[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1),
                             atol=1e-4)


def test_parameter_count_dit_xl2_matches_paper():
  # DiT-XL/2 on 32x32x4 latents, learn_sigma (8 output channels): 675,129,632 parameters
  # (DiT's train.py log, which counts the fixed pos_embed and the 1001-row label table).
  ours = dit.parameter_count("XL", 2, input_size=32, in_channels=4, out_channels=8,
                             cond_dim=1)
  hidden = 1152
  cond_proj = 1 * hidden + hidden
  label_table = 1001 * hidden
  pos_embed = 16 * 16 * hidden
  assert ours - cond_proj + label_table + pos_embed == 675_129_632


def test_parameter_count_b8_formula():
  h, depth, p, c_in, c_out, cond = 768, 12, 8, 6, 3, 512
  m = 4 * h
  block = (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + (h * 6 * h + 6 * h)
  total = (
      (p * p * c_in * h + h)  # patch embedding
      + (256 * h + h + h * h + h)  # timestep MLP
      + (cond * h + h)  # condition projection
      + depth * block
      + (h * 2 * h + 2 * h) + (h * p * p * c_out + p * p * c_out)  # final layer
  )
  assert dit.parameter_count("B", 8) == total
  assert dit.parameter_count("B", 8, scan_blocks=True) == total


def test_remat_and_scan_match_plain_loop(tiny_random):
  x, t, cond = _inputs(4)
  ref = np.asarray(_forward(tiny_random, x, t, cond))
  assert np.any(ref)
  remat = dit.DiT("tiny", remat=True, rngs=nnx.Rngs(9))
  nnx.update(remat, nnx.state(tiny_random, nnx.Param))
  np.testing.assert_allclose(_forward(remat, x, t, cond), ref, rtol=0, atol=1e-5)
  scanned = dit.DiT("tiny", scan_blocks=True, remat=True, rngs=nnx.Rngs(9))
  assert scanned.blocks.mlp.fc1.kernel.shape == (2, 32, 128)
  dit.copy_into_scanned(tiny_random, scanned)

  # Gradients too: remat + scan must differentiate like the plain loop.
  def loss(model):
    return jnp.mean(jnp.square(model(x, t, cond)))

  y_scan, g_scan = nnx.jit(lambda m: (m(x, t, cond), nnx.grad(loss)(m)))(scanned)
  np.testing.assert_allclose(y_scan, ref, rtol=0, atol=1e-5)
  g_plain = nnx.jit(nnx.grad(loss))(tiny_random)
  np.testing.assert_allclose(g_scan["final_layer"]["linear"]["kernel"][...],
                             g_plain["final_layer"]["linear"]["kernel"][...],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_scan["blocks"]["attn"]["qkv"]["kernel"][...][1],
                             g_plain["blocks"][1]["attn"]["qkv"]["kernel"][...],
                             rtol=1e-4, atol=1e-6)


def test_remat_and_scan_inside_a_sampler_loop(tiny_random):
  """Merged under jit and called inside `lax.scan`, as samplers do (nnx.scan / nnx.remat
  refused this: "Cannot extract graph node from different trace level")."""
  x, _, cond = _inputs(4)
  x = x[..., :3]
  scanned = dit.DiT("tiny", scan_blocks=True, remat=True, rngs=nnx.Rngs(9))
  dit.copy_into_scanned(tiny_random, scanned)
  remat = dit.DiT("tiny", remat=True, rngs=nnx.Rngs(9))
  nnx.update(remat, nnx.state(tiny_random, nnx.Param))

  def run(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def loop(state, x):
      m = nnx.merge(graphdef, state)

      def body(x, t):
        return x - 0.1 * m(jnp.concatenate([x, x], -1), t, cond), None

      return jax.lax.scan(body, x, jnp.array([900, 500, 100]))[0]

    return np.asarray(loop(state, x))

  ref = run(tiny_random)
  assert not np.allclose(ref, np.asarray(x))
  np.testing.assert_allclose(run(scanned), ref, rtol=0, atol=1e-5)
  np.testing.assert_allclose(run(remat), ref, rtol=0, atol=1e-5)


def test_long_skips_and_output_conv(tiny_random):
  """U-ViT's options: zero at init, exactly DiT while the skips are [I; 0] and the conv zero,
  a different function once they are trained, the same function scanned / rematerialised,
  and gradients that reach both."""
  x, t, cond = _inputs(6, size=24)
  kw = dict(patch_size=6, input_size=24, output_overlap=1)
  model = dit.DiT("tiny", long_skips=True, output_conv=True, rngs=nnx.Rngs(2), **kw)
  assert not np.any(np.asarray(_forward(model, x, t, cond)))
  assert model.long_skips.kernel.shape == (1, 64, 32)  # depth 2: one skip, block 1 ← block 0
  plain = dit.DiT("tiny", rngs=nnx.Rngs(2), **kw)
  _randomize(plain, 3)
  ref = np.asarray(_forward(plain, x, t, cond))
  pure = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, {**nnx.to_pure_dict(state), **pure})
  nnx.update(model, state)
  np.testing.assert_array_equal(np.asarray(_forward(model, x, t, cond)), ref)

  def perturb(path, kernel, seed):
    leaf = getattr(getattr(model, path), kernel)
    leaf[...] = leaf[...] + 0.05 * jax.random.normal(jax.random.key(seed), leaf.shape)

  perturb("long_skips", "kernel", 4)
  with_skips = np.asarray(_forward(model, x, t, cond))
  assert np.abs(with_skips - ref).max() > 1e-2
  perturb("output_conv", "kernel", 5)
  both = np.asarray(_forward(model, x, t, cond))
  assert np.abs(both - with_skips).max() > 1e-3
  scanned = dit.DiT("tiny", long_skips=True, output_conv=True, scan_blocks=True, remat=True,
                    rngs=nnx.Rngs(7), **kw)
  dit.copy_into_scanned(model, scanned)
  np.testing.assert_allclose(np.asarray(_forward(scanned, x, t, cond)), both, rtol=0, atol=1e-5)

  def loss(m):
    return jnp.mean(jnp.square(m(x, t, cond)))

  g_scan = nnx.jit(nnx.grad(loss))(scanned)
  g_plain = nnx.jit(nnx.grad(loss))(model)
  for name in ("long_skips", "output_conv"):
    g = np.asarray(g_plain[name]["kernel"][...])
    assert np.abs(g).max() > 0, name
    np.testing.assert_allclose(np.asarray(g_scan[name]["kernel"][...]), g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"long_skips": True, "output_conv": True}])
@pytest.mark.parametrize("scan_blocks", [False, True])
def test_logical_axes_on_every_param(scan_blocks, options):
  model = nnx.eval_shape(lambda: dit.DiT("tiny", scan_blocks=scan_blocks, rngs=nnx.Rngs(0),
                                         **options))
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  shapes = jax.tree.leaves(params)
  names = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert len(names) == len(shapes) > 0
  for spec, x in zip(names, shapes):
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == len(x.shape)
    assert all(isinstance(n, str) for n in spec), spec
  rules = parallel.DEFAULT_RULES
  if scan_blocks:
    fc1 = specs["blocks"]["mlp"]["fc1"]["kernel"]
    assert tuple(fc1) == ("layers", "embed", "mlp")
    assert tuple(parallel.logical_to_spec(fc1, rules)) == (None, "fsdp", "model")
  else:
    assert tuple(specs["blocks"][0]["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["blocks"][0]["attn"]["qkv"]["kernel"]) == ("embed", "heads")
    spec = parallel.logical_to_spec(specs["blocks"][0]["attn"]["proj"]["kernel"], rules)
    assert tuple(spec) == ("model", "fsdp")


_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from vigface_jax import parallel
    from vigface_jax.models import dit

    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    assert jax.device_count() == 8
    mesh = parallel.create_mesh(("data", "fsdp", "model"), (2, 2, 2))
    model = dit.DiT("tiny", rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    kx, kt, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (8, 112, 112, 6))
    t = jax.random.randint(kt, (8,), 0, 1000)
    cond = jax.random.normal(kc, (8, 512))
    fwd = nnx.jit(lambda m, x, t, c: m(x, t, c))
    ref = np.asarray(fwd(model, x, t, cond))

    scanned = dit.DiT("tiny", scan_blocks=True, rngs=nnx.Rngs(0))
    dit.copy_into_scanned(model, scanned)

    batch = parallel.batch_sharding(mesh)
    xs, ts, cs = (jax.device_put(a, batch) for a in (x, t, cond))
    for name, m in (("loop", model), ("scan", scanned)):
      graphdef, state = nnx.split(m)
      shardings = parallel.tree_shardings(mesh, nnx.get_partition_spec(state))
      sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
      block = sharded.blocks if name == "scan" else sharded.blocks[0]
      spec = block.mlp.fc1.kernel[...].sharding.spec
      want = P(None, "fsdp", "model") if name == "scan" else P("fsdp", "model")
      assert spec == want, spec
      out = fwd(sharded, xs, ts, cs)
      err = float(np.abs(np.asarray(out) - ref).max())
      print(name, "max err", err)
      assert err < 1e-5, err
    print("OK")
""")


def test_sharded_forward_matches_unsharded_on_8_devices():
  cache = jax.config.jax_compilation_cache_dir  # conftest's persistent cache
  out = run_on_fake_devices(_EIGHT_DEVICE_SCRIPT.format(cache=cache), timeout=240)
  assert "loop max err" in out and "scan max err" in out


def test_gradient_boundary_is_the_identity_and_reaches_xla():
  """The unrolled blocks' gradient boundary: same value and gradient as no boundary, and a
  conditional in the compiled backward pass (what keeps XLA from fusing across blocks)."""
  f = lambda x: jnp.sum(jnp.tanh(dit.gradient_boundary(x * 2.0)) ** 2)
  g = lambda x: jnp.sum(jnp.tanh(x * 2.0) ** 2)
  x = jax.random.normal(jax.random.key(0), (4, 3))
  np.testing.assert_allclose(f(x), g(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
  assert " conditional(" in jax.jit(jax.grad(f)).lower(x).compile().as_text()
