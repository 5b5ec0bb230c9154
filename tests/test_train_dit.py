"""Stage 2 (`vigface_jax/train/dit.py`) on tiny configs, after a tiny stage 1."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import numpy as np
from PIL import Image
import pytest

import config_fields
from configs import dit as dit_config
from configs import fr as fr_config
from test_train import _checkpoint_tree, _Crash, _CrashingIterator
from vigface_jax import config_lib
from vigface_jax.data import faces
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import pipeline
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.models import dit as dit_lib
from vigface_jax.models import iresnet
from vigface_jax.models import stage2
from vigface_jax.train import dit
from vigface_jax.train import fr


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  config = fr_config.get_config("tiny")
  config.evals.verify.procedural_pairs = None
  config.evals.verify.baselines = False
  with config_fields.recording(config) as record:  # stage 1 reads only declared fields
    fr.run(config, workdir)
  assert not record.missing, sorted(record.missing)
  return workdir


def _tiny(stage1_dir):
  config = dit_config.get_config("tiny")
  config.stage1.workdir = stage1_dir
  return config


def _arr(x):
  return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                    else x)


def test_missing_stage1_names_the_command(tmp_path):
  config = dit_config.get_config("tiny")
  with pytest.raises(config_lib.ConfigError, match=r"configs/fr.py:demo"):
    dit.run(config, str(tmp_path))
  config.stage1.workdir = str(tmp_path / "nothing")
  with pytest.raises(config_lib.ConfigError, match=r"configs/fr.py:demo"):
    dit.run(config, str(tmp_path))


def test_stage2_trains_samples_and_keeps_stage1_frozen(stage1, tmp_path):
  workdir = str(tmp_path / "dit")
  config = _tiny(stage1)
  # The sweep re-runs the main scale (same rows, landmarks, seeds: the same images and
  # metrics) and one other scale.
  config.evals.guidance_sweep.scales = (config.sample.guidance, 1.0)
  config.sample.pose_guidance = 1.0  # the sampler's third (typical-pose) batch
  with config_fields.recording(config) as record:  # every evaluator on; only declared fields
    summary = dit.run(config, workdir)
  assert not record.missing, sorted(record.missing)
  samples = os.path.join(workdir, "samples")
  assert sorted(os.listdir(samples)) == ["step_0000004.png", "step_0000004_g1.png",
                                         "step_0000004_g4.png"]
  for key in ("identity/top1", "identity/mean_cos_to_row", "train/loss_diffusion",
              "train/loss_identity", "guidance_sweep/top1_g1",
              "guidance_sweep/mean_cos_to_row_g1", "landmarks/follow", "landmarks/follow_x",
              "landmarks/follow_y", "landmarks/cross_x", "landmarks/cross_y",
              "landmarks/pose_agree", "landmarks/pose_follow", "landmarks/pose_probe_r2"):
    assert key in summary, sorted(summary)
    assert np.isfinite(summary[key]), key
  assert summary["identity/chance"] == pytest.approx(1 / 16)
  assert summary["guidance_sweep/top1_g4"] == summary["identity/top1"]
  assert summary["guidance_sweep/mean_cos_to_row_g4"] == summary["identity/mean_cos_to_row"]
  sheet = lambda name: np.asarray(Image.open(os.path.join(samples, name)))
  np.testing.assert_array_equal(sheet("step_0000004_g4.png"), sheet("step_0000004.png"))
  assert not np.array_equal(sheet("step_0000004_g1.png"), sheet("step_0000004.png"))
  # The FR network and the row table are exactly stage 1's after training.
  saved = _checkpoint_tree(workdir, 4)
  model, _ = embed_lib.load_backbone(stage1)
  want = {path: _arr(v[...]) for path, v in nnx.state(model).flat_state()}
  got = saved["rest"]["fr"]
  for path, value in want.items():
    node = got
    for key in path:
      node = node[key] if key in node else node[str(key)]
    np.testing.assert_array_equal(_arr(node["value"]), value, err_msg=str(path))
  with np.load(os.path.join(stage1, "prototypes.npz")) as f:
    np.testing.assert_array_equal(saved["rest"]["rows"]["value"], f["real"])
  assert "fr" not in saved["params"] and "dit" in saved["params"]


def test_stage2_two_steps_crash_resume_equals_four(stage1, tmp_path, monkeypatch):
  config = _tiny(stage1)
  # No sheet rows, evaluation rows or following pairs: those evaluators are left out, and
  # the sweep is switched off.
  config.evals.samples.identities = 0
  config.evals.identity.identities = 0
  config.evals.landmarks.identities = 0
  config.evals.guidance_sweep.every = -1
  straight = str(tmp_path / "straight")
  summary = dit.run(config, straight)
  assert not os.path.exists(os.path.join(straight, "samples"))
  assert not any(k.startswith(("identity/", "landmarks/", "guidance_sweep/")) for k in summary)
  resumed = str(tmp_path / "resumed")
  real = pipeline.make_pipeline
  monkeypatch.setattr(pipeline, "make_pipeline",
                      lambda *a, **k: _CrashingIterator(real(*a, **k), crash_at=3))
  with pytest.raises(_Crash):
    dit.run(config, resumed)
  monkeypatch.setattr(pipeline, "make_pipeline", real)
  dit.run(config, resumed)
  a, b = _checkpoint_tree(straight, 4), _checkpoint_tree(resumed, 4)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(_arr(x), _arr(y), rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("sweep", [("strong",), (1.0, float("nan"))])
def test_bad_guidance_sweep_names_the_field(tmp_path, sweep):
  config = dit_config.get_config("tiny")
  config.evals.guidance_sweep.scales = sweep
  with pytest.raises(config_lib.ConfigError, match="evals.guidance_sweep.scales"):
    dit.run(config, str(tmp_path))


@pytest.mark.parametrize("interval", [(700, 100), (0, 1000), ("low", "high"), (5,)])
def test_bad_guidance_interval_names_the_field(tmp_path, interval):
  config = dit_config.get_config("tiny")
  config.sample.guidance_interval = interval
  with pytest.raises(config_lib.ConfigError, match="sample.guidance_interval"):
    dit.run(config, str(tmp_path))


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_pose_guidance_names_the_field(tmp_path, scale):
  config = dit_config.get_config("tiny")
  config.sample.pose_guidance = scale
  with pytest.raises(config_lib.ConfigError, match="sample.pose_guidance"):
    dit.run(config, str(tmp_path))


@pytest.mark.parametrize("field,value", [("sample.sheet_landmarks", 0),
                                         ("evals.identity.identities", -1),
                                         ("sample.batch_size", 0), ("evals.samples.every", -2),
                                         ("evals.landmarks.shift", -1.0),
                                         ("diffusion.schedule_shift", 0.0),
                                         ("diffusion.schedule_shift", -1.75)])
def test_bad_sample_counts_name_the_field(tmp_path, field, value):
  config = dit_config.get_config("tiny")
  section, key = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[key] = value
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    dit.run(config, str(tmp_path))


@pytest.mark.parametrize("blur", [(0.0,), (-2.0, 8.0), ("wide",), (float("nan"),)])
def test_bad_landmark_blur_names_the_field(tmp_path, blur):
  config = dit_config.get_config("tiny")
  config.model.landmark_blur = blur
  with pytest.raises(config_lib.ConfigError, match="model.landmark_blur"):
    dit.run(config, str(tmp_path))


def test_landmark_fields_spread_each_point_where_it_is():
  points = np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None]
  image = jnp.asarray(stage2.model_landmarks(points))
  assert stage2.landmark_fields(image, ()) == []
  near, far = stage2.landmark_fields(image, (4.0, 12.0))
  for field in (near, far):
    assert field.shape == image.shape and float(field.min()) >= -1.0
  near = (np.asarray(near[0]) + 1) / 2  # blurred dot density
  # One diamond blurred at σ = 4 peaks near 1 at its point (the nose: green only).
  nx, ny = np.rint(points[0, 2]).astype(int)
  assert near[ny, nx, 1] == pytest.approx(near[..., 1].max()) and 0.8 < near[ny, nx, 1] < 1.1
  # Its mass stays where the point is: the green centroid is the nose.
  ys, xs = np.mgrid[:112, :112]
  g = near[..., 1]
  np.testing.assert_allclose([np.sum(g * xs) / g.sum(), np.sum(g * ys) / g.sum()],
                             points[0, 2], atol=0.6)
  # Far from every point (a corner) the near field is empty, the wide one is not.
  assert near[0, 0].max() < 1e-6 and float(far[0, 60, 56, 0]) > -1.0
  # The DiT sees 6 + 3 per σ channels.
  cfg = dit_config.get_config("tiny")
  cfg.model.landmark_blur = (4.0, 12.0)
  model = dit.create_model(cfg, {"arch": "tiny", "embed_dim": 32, "input_size": 32}, 4)(
      rngs=nnx.Rngs(0))
  assert model.dit.in_channels == 12
  channels = model.landmark_channels(image)
  assert channels.shape == (1, 112, 112, 9)
  np.testing.assert_array_equal(channels[..., :3], image)
  out = model.denoise(jnp.zeros((1, 112, 112, 3)), jnp.asarray([5]), jnp.zeros((1, 32)), channels)
  assert out.shape == (1, 112, 112, 3)


def _grads(model, batch, cfg, schedule, trainable):
  """Gradient of `dit_loss` w.r.t. the `trainable` variables of a Stage2 model."""
  graphdef, params, rest = nnx.split(model, trainable, ...)

  def loss(params):
    return dit.dit_loss(nnx.merge(graphdef, params, rest), batch, jax.random.PRNGKey(3),
                        cfg=cfg, schedule=schedule)[0]

  return jax.grad(loss)(params)


def test_identity_loss_gradient_reaches_the_dit_and_nothing_else():
  from vigface_jax.diffusion import schedules
  cfg = dit_config.get_config("tiny")
  cfg.diffusion.cond_drop = 0.0
  cfg.diffusion.id_loss_max_t = 1000  # every example contributes
  info = {"arch": "tiny", "embed_dim": 32, "input_size": 32}
  model = dit.create_model(cfg, info, 4)(rngs=nnx.Rngs(0))
  assert model.dit.cond_scale == pytest.approx(np.sqrt(32))  # unit rows → unit-RMS inputs
  rng = np.random.default_rng(0)
  model.rows[...] = jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32))
  # adaLN-Zero makes the DiT's output (and so x̂0's dependence on it) zero at init: perturb.
  for _, var in nnx.state(model.dit, nnx.Param).flat_state():
    var[...] = var[...] + 0.02 * jnp.asarray(rng.normal(size=var.shape).astype(np.float32))
  batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 112, 112, 3), np.uint8)),
           "label": jnp.asarray([0, 3], jnp.int32),
           "landmarks": jnp.tile(jnp.asarray(np.asarray(
               landmarks_lib.ARCFACE_TEMPLATE, np.float32))[None], (2, 1, 1)),
           "has_landmarks": jnp.asarray([True, False])}
  schedule = schedules.make_schedule("cosine", 1000)
  trainable = stage2.TRAINABLE
  with_id = _grads(model, batch, cfg, schedule, trainable)
  cfg.diffusion.id_loss_weight = 0.0
  without = _grads(model, batch, cfg, schedule, trainable)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), with_id, without)
  assert max(jax.tree.leaves(diff)) > 0  # the identity loss reaches the DiT's parameters
  # Under the trainer's filter the FR network and the rows are not differentiated at all.
  paths = {path for path, _ in with_id.flat_state()}
  assert paths and all(path[0] == "dit" for path in paths)
  assert not any(path[0] in ("fr", "rows") for path, _ in nnx.state(model, trainable).flat_state())


def test_image_condition_feeds_each_image_its_own_stage1_feature(monkeypatch):
  """diffusion.condition='image': the DiT's condition is the image's unit stage-1 feature,
  whatever the row table holds; 'row' (the paper) reads the table."""
  from vigface_jax.diffusion import schedules
  cfg = dit_config.get_config("tiny")
  cfg.diffusion.cond_drop = 0.0
  info = {"arch": "tiny", "embed_dim": 32, "input_size": 32}
  model = dit.create_model(cfg, info, 4)(rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  model.rows[...] = jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32))
  images = jnp.asarray(rng.integers(0, 256, (2, 112, 112, 3), np.uint8))
  batch = {"image": images, "label": jnp.asarray([0, 3], jnp.int32),
           "landmarks": jnp.tile(jnp.asarray(np.asarray(
               landmarks_lib.ARCFACE_TEMPLATE, np.float32))[None], (2, 1, 1)),
           "has_landmarks": jnp.asarray([True, True])}
  seen = []
  real_denoise = stage2.Stage2.denoise
  monkeypatch.setattr(stage2.Stage2, "denoise",
                      lambda self, x, t, cond, ch: seen.append(cond) or real_denoise(
                          self, x, t, cond, ch))
  schedule = schedules.make_schedule("cosine", 1000)
  for condition in ("row", "image"):
    cfg.diffusion.condition = condition
    dit.dit_loss(model, batch, jax.random.PRNGKey(3), cfg=cfg, schedule=schedule)
  row_cond, image_cond = (np.asarray(c) for c in seen)
  np.testing.assert_allclose(row_cond, np.asarray(model.rows[...])[[0, 3]], rtol=1e-6)
  emb = np.asarray(model.embed(stage2.to_model_range(images)))
  np.testing.assert_allclose(image_cond, emb / np.linalg.norm(emb, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(image_cond, axis=1), 1.0, rtol=1e-5)
  assert np.abs(image_cond[0] - image_cond[1]).max() > 1e-3  # two images, two conditions
  cfg.diffusion.condition = "pixels"
  with pytest.raises(config_lib.ConfigError, match="diffusion.condition"):
    dit.validate(cfg)


def test_stage2_draws_at_a_reduced_size_and_samples_in_the_112_frame(stage1, tmp_path):
  config = _tiny(stage1)
  config.model.image_size = 32  # the tiny stage 1 sees 32×32 crops
  for name in ("identity", "landmarks", "guidance_sweep"):
    config.evals[name].every = -1
  summary = dit.run(config, str(tmp_path / "dit32"))
  assert np.isfinite(summary["train/loss_diffusion"]) and np.isfinite(
      summary["train/loss_identity"])
  reduced = np.asarray(Image.open(tmp_path / "dit32" / "samples" / "step_0000004.png"))
  cell = landmarks_lib.IMAGE_SIZE
  assert reduced.shape[0] % cell == 0 and reduced.shape[1] % (2 * cell) == 0
  # The DiT itself works at 32: its position table has (32 / 16)² tokens.
  model = stage2.builder(config.model, embed_lib.read_info(stage1)[1], 16)(rngs=nnx.Rngs(0))
  assert model.dit.input_size == 32 and model.dit.grid_size == 2


def test_reduced_size_targets_are_what_the_fr_network_sees():
  image = faces.render_face(0, 3, 1)[0][None]
  model_range = stage2.to_model_range(jnp.asarray(image))
  np.testing.assert_allclose(np.asarray(stage2.resize(model_range, 48)),
                             np.asarray(iresnet.prepare(jnp.asarray(image), 48)), atol=1e-6)
  assert stage2.resize(model_range, 112) is model_range


def test_a_stage2_config_saved_before_image_size_builds_a_112_dit(stage1):
  model_section = ml_collections.ConfigDict(dit_config.get_config("tiny").model.to_dict())
  for later in ("image_size", "long_skips", "output_conv", "landmark_pose", "hidden", "depth",
                "heads"):
    del model_section[later]
  model = stage2.builder(model_section, embed_lib.read_info(stage1)[1], 16)(rngs=nnx.Rngs(0))
  assert model.dit.input_size == 112 and model.image_size == 112
  assert model.dit.long_skips is None and model.dit.output_conv is None
  assert not model.landmark_pose and model.dit.extra_proj is None
  assert model.dit.variant == dit_lib.VARIANTS["tiny"]


def test_width_depth_and_heads_override_the_variant(stage1):
  config = dit_config.get_config("tiny")
  config.model.hidden, config.model.depth = 48, 3
  dit.validate(config)
  model = stage2.builder(config.model, embed_lib.read_info(stage1)[1], 16)(rngs=nnx.Rngs(0))
  assert model.dit.variant == dit_lib.Variant(48, 3, 2)  # heads: the variant's
  assert len(model.dit.blocks) == 3
  assert model.dit.blocks[0].attn.qkv.kernel.shape == (48, 144)
  config.model.heads = 5  # 48 / 5 is no head size
  with pytest.raises(config_lib.ConfigError, match=r"model\.hidden must be a multiple of 4 that the 5 heads"):
    dit.validate(config)
  config.model.heads, config.model.depth = 2, 0
  with pytest.raises(config_lib.ConfigError, match=r"model\.depth"):
    dit.validate(config)


def _moments(points, size=48):
  image = stage2.resize(jnp.asarray(stage2.model_landmarks(np.asarray(points, np.float32))), size)
  return np.asarray(stage2.landmark_moments(image)).reshape(-1, 5, 3)


def test_landmark_moments_say_where_the_points_are():
  template = landmarks_lib.ARCFACE_TEMPLATE[None]
  np.testing.assert_allclose(_moments(template), 0.0, atol=5e-3)  # the reference pose
  assert not np.any(np.asarray(stage2.landmark_moments(-jnp.ones((2, 48, 48, 3)))))  # none
  moved = _moments(template + np.array([8.0, 0.0]))[0]  # 8 px right at 112 = 0.143 of [-1, 1]
  np.testing.assert_allclose(moved[0], 8 / 112 * 2 / 0.05, rtol=0.03)  # every colour's x
  np.testing.assert_allclose(moved[1:], 0.0, atol=0.05)  # nothing else
  right, left = (_moments(faces.render_face(0, 5, 2, yaw=y)[1][None])[0] for y in (40.0, -40.0))
  assert right[0, 1] * left[0, 1] < 0 and abs(right[0, 1] - left[0, 1]) > 2  # the nose's x
  assert right[2, 0] < 0 and left[2, 0] < 0  # both turns narrow the eyes' spread


def test_stage2_with_the_pixel_options_trains_and_follows_the_pose_vector(stage1, tmp_path):
  """U-ViT's skips and output conv and the landmark moments: a tiny run trains, and the
  moments reach the prediction (with the DiT's output layers random, moved points change it
  through `c` even where no dot lies)."""
  config = _tiny(stage1)
  config.model.long_skips = config.model.output_conv = config.model.landmark_pose = True
  for name in ("identity", "landmarks", "guidance_sweep"):
    config.evals[name].every = -1
  summary = dit.run(config, str(tmp_path / "dit_options"))
  assert np.isfinite(summary["train/loss_diffusion"])
  model = stage2.builder(config.model, embed_lib.read_info(stage1)[1], 16)(rngs=nnx.Rngs(0))
  assert model.dit.extra_proj.kernel.shape == (stage2.POSE_FEATURES, 32)
  final = model.dit.final_layer
  for layer in (final.linear, final.adaLN_modulation):
    layer.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), layer.kernel.shape)
  points = np.stack([landmarks_lib.ARCFACE_TEMPLATE] * 2).astype(np.float32)
  points[1] += 8.0
  channels = model.landmark_channels(jnp.asarray(stage2.model_landmarks(points)))
  x = jnp.zeros((2, 112, 112, 3))
  rows = jnp.zeros((2, model.rows.shape[1]))
  pred = np.asarray(model.denoise(x, jnp.array([500, 500]), rows, channels))
  corner = (slice(0, 16), slice(0, 16))  # no dot within 16 px of this tile in either set
  assert np.abs(pred[0][corner] - pred[1][corner]).max() > 1e-4
  model.landmark_pose = False  # the channels alone cannot move the far corner's token
  with pytest.raises(ValueError, match="extra must be"):
    model.denoise(x, jnp.array([500, 500]), rows, channels)


@pytest.mark.parametrize("size,patch,field", [(40, 16, "model.patch_size"),
                                              (113, 16, "model.image_size"),
                                              (0, 16, "model.image_size")])
def test_bad_image_size_or_patch_names_the_field(tmp_path, size, patch, field):
  config = dit_config.get_config("tiny")
  config.model.image_size, config.model.patch_size = size, patch
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    dit.run(config, str(tmp_path))


# A stand-in stage-1 run for subprocess scripts (tests/test_strategies.py too): a tiny IResNet
# export (32-d, 32 px) and 16 unit rows, written to `stage1` under a fresh `root`.
STUB_STAGE1 = r"""
root = tempfile.mkdtemp()
stage1 = os.path.join(root, "stage1")
embed.save_backbone(os.path.join(stage1, "export"),
                    iresnet.IResNet("tiny", embed_dim=32, input_size=32, rngs=nnx.Rngs(0)),
                    arch="tiny", embed_dim=32, input_size=32)
rows = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
np.savez(os.path.join(stage1, "prototypes.npz"),
         real=rows / np.linalg.norm(rows, axis=1, keepdims=True))
"""

_DEFAULT_ON_EIGHT = r"""
import os, sys, tempfile
from absl import flags
flags.FLAGS.mark_as_parsed()
import jax
from flax import nnx
import numpy as np
sys.path.insert(0, os.getcwd())
from configs import dit as dit_config
from vigface_jax import tasks
from vigface_jax.evaluate import embed
from vigface_jax.models import iresnet

assert jax.device_count() == 8
""" + STUB_STAGE1 + r"""
config = dit_config.get_config()  # the paper's DiT-B/8 at 112, v-prediction, guidance 4.0
assert (config.model.variant, config.model.patch_size, config.model.image_size,
        config.diffusion.prediction, config.sample.guidance) == ("B", 8, 112, "v", 4.0)
config.stage1.workdir = stage1
# Only the data and the run length differ: procedural faces instead of CASIA's RecordIO.
config.data.source, config.data.num_identities, config.data.images_per_identity = "procedural", 16, 2
config.data.global_batch_size, config.data.worker_count, config.data.read_threads = 8, 0, 0
config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 2, 1, 100
# FSDP over the 8 devices: replicated, DiT-B's parameters, AdamW moments and EMA would take
# 8 × 2 GB of this machine's memory.
config.mesh.shape = (1, 8, 1)
for name in config.evals:
  config.evals[name].every = -1
summary = tasks.run(config, os.path.join(root, "dit"))
assert np.isfinite(summary["train/loss"]), summary
print("OK")
"""


def test_the_paper_default_dit_runs_steps_on_eight_fake_devices():
  from conftest import run_on_fake_devices  # pylint: disable=g-import-not-at-top
  run_on_fake_devices(_DEFAULT_ON_EIGHT, timeout=600)
