"""The shared trainer (vigface_jax/train) and the stage-1 task on tiny configs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import run_on_fake_devices
from configs import fr as fr_config
from vigface_jax import config_lib
from vigface_jax import parallel
from vigface_jax.data import pipeline
from vigface_jax.evaluate import common
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.evaluate import verification
from vigface_jax.train import fr
from vigface_jax.train import loop
from vigface_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _optim(**kw) -> config_dict.ConfigDict:
  return config_lib.optim_config(**kw)


def test_schedules():
  s = optim.make_schedule(_optim(schedule="cosine", warmup_steps=10), 110)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0, 0.05, 0.1, 0.05, 0],
                             atol=1e-7)
  s = optim.make_schedule(_optim(schedule="step", decay_steps=(50, 80), warmup_steps=10), 100)
  np.testing.assert_allclose([s(49), s(50), s(79), s(80)], [0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_schedule(_optim(schedule="linear"), 10)
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_optim(name="lamb"), 10)


def test_sgd_is_torch_sgd_with_l2_and_clipping():
  # torch.optim.SGD(lr, momentum, weight_decay): g' = g + wd·p; buf = m·buf + g'; p -= lr·buf.
  tx, _ = optim.make_optimizer(_optim(weight_decay=0.1, grad_clip_norm=10.0), 5)
  p, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  st = tx.init(p)
  buf = np.zeros(2)
  want = np.array(p)
  for _ in range(2):
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
    buf = 0.9 * buf + (np.asarray(g) + 0.1 * want)
    want = want - 0.1 * buf
  np.testing.assert_allclose(p, want, rtol=1e-6)
  tx, _ = optim.make_optimizer(_optim(grad_clip_norm=1.0, momentum=0.0), 5)
  u, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(p), p)
  np.testing.assert_allclose(u, [-0.06, -0.08], rtol=1e-6)  # clipped to norm 1, times lr
  tx, _ = optim.make_optimizer(_optim(name="adamw", lr=1e-3, weight_decay=0.05), 5)
  assert tx.update(g, tx.init(p), p)[0].shape == (2,)


def test_nesterov_is_torch_sgd_nesterov():
  # optim.nesterov=True (a declared field, settable from the command line): torch's rule
  # buf = m·buf + g; p -= lr·(g + m·buf).
  tx, _ = optim.make_optimizer(_optim(nesterov=True), 5)
  p, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  st, buf, want = tx.init(p), np.zeros(2), np.array(p)
  for _ in range(2):
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
    buf = 0.9 * buf + np.asarray(g)
    want = want - 0.1 * (np.asarray(g) + 0.9 * buf)
  np.testing.assert_allclose(p, want, rtol=1e-6)


# ------------------------------------------------------------- loop, toy model


class _Toy(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(3, 1, rngs=rngs)


def _toy_loss(model, batch, rng):
  del rng
  err = model.dense(batch["x"])[:, 0] - batch["y"]
  loss = jnp.mean(err * err) * batch["scale"][0]
  return loss, {"mse": jnp.mean(err * err)}


def _toy_config(num_steps, **train):
  config = config_dict.ConfigDict({
      "optim": _optim(lr=0.05),
      "train": config_lib.train_config(**{**dict(num_steps=num_steps, seed=3, log_every=1,
                                                 checkpoint_every=1, keep_checkpoints=5,
                                                 async_checkpoint=False), **train}),
  })
  config_lib.add_parallelism(config)
  return config


def _toy_batches(scales):
  rng = np.random.default_rng(0)
  for s in scales:
    x = rng.normal(size=(4, 3)).astype(np.float32)
    yield {"x": jnp.asarray(x), "y": jnp.asarray(x.sum(1)),
           "scale": jnp.full((4,), s, jnp.float32)}


def _mesh():
  return parallel.create_mesh(("data", "fsdp", "model"), (1, 1, 1), devices=jax.devices()[:1])


def test_nonfinite_step_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.TrainingDiverged, match=r"step 3 .*last good checkpoint is step 2"):
    loop.fit(_toy_config(5), str(tmp_path), mesh=_mesh(), create_model=_Toy,
             loss_fn=_toy_loss, data=_toy_batches([1, 1, np.inf, 1, 1]), images_per_step=4)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [1, 2]
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["train/finite"] for r in records] == [1.0, 1.0]


def test_ema_and_metrics(tmp_path):
  result = loop.fit(_toy_config(2, ema_decay=0.5, profile_steps=(1, 2)), str(tmp_path),
                    mesh=_mesh(),
                    create_model=_Toy, loss_fn=_toy_loss, data=_toy_batches([1, 1]),
                    images_per_step=4)
  first = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")
  # ema_2 = 0.5·ema_1 + 0.5·p_2 with ema_1 = 0.5·p_0 + 0.5·p_1.
  p2 = np.asarray(result.state.params["dense"]["kernel"][...])
  ema1 = np.asarray(first["ema"]["dense"]["kernel"]["value"])
  np.testing.assert_allclose(result.state.ema["dense"]["kernel"][...], 0.5 * ema1 + 0.5 * p2,
                             rtol=1e-6)
  assert not np.allclose(ema1, first["params"]["dense"]["kernel"]["value"])
  m = result.metrics
  assert {"train/loss", "train/mse", "train/lr", "train/grad_norm", "train/images_per_s",
          "train/step_time_s", "train/tflops_per_s"} <= set(m), sorted(m)
  assert int(result.state.step) == 2
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces  # jax.profiler trace written
  # Each traced step is annotated (XProf's step-time views); the perfetto trace names them.
  (trace,) = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "profile") for f in files
              if f.endswith(".trace.json.gz")]
  with gzip.open(trace) as fh:
    names = {e.get("name") for e in json.load(fh)["traceEvents"]}
  assert "train" in names, sorted(n for n in names if n)[:50]


def test_failing_end_hook_keeps_the_last_checkpoint_and_a_rerun_evaluates_it(tmp_path):
  calls = []

  def failing(step, state):
    calls.append(("fail", step))
    raise RuntimeError("evaluation broke")

  def working(step, state):
    calls.append(("ok", step, int(state.step)))
    return {"value": float(step)}

  def fit(hook, num_steps=3):
    return loop.fit(_toy_config(num_steps, checkpoint_every=0), str(tmp_path), mesh=_mesh(),
                    create_model=_Toy, loss_fn=_toy_loss, data=_toy_batches([1] * num_steps),
                    images_per_step=4, evaluators=[common.FunctionEvaluator("eval", 0, hook)])

  with pytest.raises(RuntimeError, match="evaluation broke"):
    fit(failing)
  # The training reached its last step and was saved before the end-of-training hook ran.
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [3]
  # Run again: nothing left to train, the end-of-training hooks run on the final state.
  result = fit(working)
  assert calls == [("fail", 3), ("ok", 3, 3)]
  assert result.metrics["eval/value"] == 3.0 and int(result.state.step) == 3


# ------------------------------------------------------------------- stage 1


def _tiny(workdir_eval: bool = False) -> config_dict.ConfigDict:
  config = fr_config.get_config("tiny")
  if not workdir_eval:
    config.evals.verify.procedural_pairs = None
    config.evals.verify.baselines = False
  return config


class _Crash(Exception):
  pass


class _CrashingIterator:
  """A pipeline that dies when asked for batch `crash_at` (a pre-empted job)."""

  def __init__(self, inner, crash_at):
    self._inner, self._left = inner, crash_at - 1
    self.source = inner.source

  def __next__(self):
    if self._left == 0:
      raise _Crash()
    self._left -= 1
    return next(self._inner)

  def __getattr__(self, name):  # get_state / set_state / start_prefetch / close
    return getattr(self._inner, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._inner.close()


def _checkpoint_tree(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def test_two_steps_crash_resume_two_more_equals_four(tmp_path, monkeypatch):
  config = _tiny()
  straight = str(tmp_path / "straight")
  fr.run(config, straight)

  resumed = str(tmp_path / "resumed")
  real = pipeline.make_pipeline
  monkeypatch.setattr(pipeline, "make_pipeline",
                      lambda *a, **k: _CrashingIterator(real(*a, **k), crash_at=3))
  with pytest.raises(_Crash):
    fr.run(config, resumed)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
  monkeypatch.setattr(pipeline, "make_pipeline", real)
  summary = fr.run(config, resumed)

  a, b = _checkpoint_tree(straight, 4), _checkpoint_tree(resumed, 4)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  def arr(x):  # the dropout RNG streams are typed keys
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else x)

  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(arr(x), arr(y), rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  assert int(a["step"]) == 4
  sigma = np.asarray(a["rest"]["head"]["sigma"]["value"])
  assert (sigma > 0).all()  # the σ buffer is part of what is saved and restored
  assert summary["num_real"] == 16 and summary["num_virtual"] == 16

  # Re-running the finished workdir trains nothing and rewrites its own export/ (it used to
  # stop with "export already holds a backbone checkpoint").
  again = fr.run(config, straight)
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4"]
  assert again["num_real"] == 16
  assert os.path.exists(os.path.join(straight, "export", "backbone.json"))


def test_stage1_cli_outputs_and_exported_backbone(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "vigface_jax.main", "--config=configs/fr.py:tiny",
       f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  for name in ("prototypes.npz", "separability.json", "prototype_similarity.png",
               "export/backbone.json", "verification/procedural.bin", "config.json"):
    assert (workdir / name).exists(), name
  assert summary["separability"]["criterion"]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert any("train/images_per_s" in r for r in records)
  # The exported backbone (a 32×32 network fed resized 112×112 crops) scores the pack exactly
  # as the in-training hook did.
  embed_fn, info = embed_lib.load_embedder(str(workdir), batch_size=40)
  assert info["input_size"] == 32
  result = verification.verify(embed_fn, workdir / "verification" / "procedural.bin", 40)
  assert result["accuracy_mean"] == pytest.approx(summary["verify/procedural/accuracy"])
  assert "baseline/raw_pixels/accuracy" in summary


def test_default_config_needs_a_dataset_path(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "vigface_jax.main", "--config=configs/fr.py",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2
  assert "data.path is not set" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_margin_name_is_checked():
  config = _tiny()
  config.margin.name = "sphereface"
  with pytest.raises(ValueError, match="margin.name"):
    fr.run(config, "/nonexistent/never/written")


_SHARDED = r"""
import jax, numpy as np
from configs import fr as fr_config
from vigface_jax import parallel
from vigface_jax.data import pipeline
from vigface_jax.train import fr, loop
import functools

def train(shape):
  config = fr_config.get_config("tiny")
  config.mesh.shape = shape
  config.train.num_steps = 2
  config.train.checkpoint_every = 0
  mesh = parallel.mesh_from_config(config)
  rules = config.sharding_rules  # parallel.FR_RULES: the batch over every device
  data = pipeline.make_pipeline(config, mesh, rules)
  create = fr.create_model(config, 16, 16)
  loss_fn = functools.partial(fr.fr_loss, cfg=config, logits_sharding=parallel.logical_sharding(
      mesh, ("head_batch", "classes"), rules))
  import tempfile
  with data:
    return loop.fit(config, tempfile.mkdtemp(), mesh=mesh, create_model=create,
                    loss_fn=loss_fn, data=data, images_per_step=8)

# The backbone stays data-parallel over all 8 devices on the (2, 1, 4) mesh: one image each.
mesh = parallel.mesh_from_config(fr_config.get_config("tiny"))
assert fr_config.get_config("tiny").sharding_rules == parallel.FR_RULES
spec = parallel.batch_sharding(parallel.create_mesh(("data", "fsdp", "model"), (2, 1, 4)),
                               parallel.FR_RULES)
assert spec.shard_shape((8, 3)) == (1, 3), spec

dp = train((8, 1, 1))
mp = train((2, 1, 4))
w = mp.state.params["head"]["weight"][...]
assert w.sharding.spec[1] == "model", w.sharding  # embed -> fsdp (size 1 here)
assert len({s.data.shape for s in w.addressable_shards}) == 1
assert w.addressable_shards[0].data.shape == (32, 8), w.addressable_shards[0].data.shape
mom = [x for x in jax.tree.leaves(mp.state.opt_state) if getattr(x, "shape", None) == (32, 32)]
assert mom and all(x.sharding.spec == w.sharding.spec for x in mom)
for key in ("train/loss", "train/loss_real", "train/loss_virtual", "train/grad_norm"):
  np.testing.assert_allclose(dp.metrics[key], mp.metrics[key], rtol=2e-5, err_msg=key)
# Two SGD steps at lr 0.1 amplify the different reduction order to ~1e-5.
np.testing.assert_allclose(np.asarray(dp.state.params["head"]["weight"][...]), np.asarray(w),
                           rtol=1e-3, atol=2e-5)
print("OK")
"""


def test_class_axis_sharded_over_eight_devices_matches_data_parallel():
  run_on_fake_devices(_SHARDED, num_devices=8, timeout=600)


class _ToyWithFrozen(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(3, 1, rngs=rngs)
    self.frozen = nnx.Linear(3, 3, rngs=rngs)


def test_trainable_filter_keeps_a_frozen_network_fixed(tmp_path):
  def loss_fn(model, batch, rng):
    del rng
    err = model.dense(model.frozen(batch["x"]))[:, 0] - batch["y"]
    return jnp.mean(err * err), {}

  trainable = nnx.All(nnx.Param, nnx.PathContains("dense"))
  init = _ToyWithFrozen(rngs=nnx.Rngs(params=3, dropout=4))
  pretrained = np.full((3, 3), 0.5, np.float32)

  def initialize(state, setup):  # "load" the frozen network's weights into a fresh state
    del setup
    state.rest["frozen"]["kernel"][...] = jnp.asarray(pretrained)
    return state

  result = loop.fit(_toy_config(2), str(tmp_path), mesh=_mesh(), create_model=_ToyWithFrozen,
                    loss_fn=loss_fn, data=_toy_batches([1, 1]), images_per_step=4,
                    trainable=trainable, initialize=initialize)
  assert "frozen" not in result.state.params and "frozen" in result.state.rest
  np.testing.assert_array_equal(result.state.rest["frozen"]["kernel"][...], pretrained)
  assert not np.allclose(result.state.params["dense"]["kernel"][...], init.dense.kernel[...])


def test_nonfinite_steps_are_skipped_up_to_the_limit_then_training_stops(tmp_path):
  """train.skip_nonfinite=2: two non-finite steps in a row are skipped (no update, counted),
  the third stops training; an isolated one later would have been skipped too."""
  # Steps 2 and 4, 5 are non-finite; skipping leaves the parameters as the finite steps made
  # them, so the run equals one that never saw those batches.
  result = loop.fit(_toy_config(6, skip_nonfinite=2, checkpoint_every=0), str(tmp_path / "a"),
                    mesh=_mesh(), create_model=_Toy, loss_fn=_toy_loss,
                    data=_toy_batches([1, np.inf, 1, np.nan, np.inf, 1]), images_per_step=4)
  records = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert [r["train/skipped_steps"] for r in records] == [0, 1, 1, 2, 3, 3]
  assert [r["train/finite"] for r in records] == [1, 0, 1, 0, 0, 1]
  # A window of skipped steps reports only `finite` and the count, never a NaN loss.
  assert [("train/loss" in r) for r in records] == [True, False, True, False, False, True]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  assert int(result.state.step) == 6
  batches = list(_toy_batches([1, np.inf, 1, np.nan, np.inf, 1]))
  clean = loop.fit(_toy_config(3, checkpoint_every=0), str(tmp_path / "b"), mesh=_mesh(),
                   create_model=_Toy, loss_fn=_toy_loss,
                   data=iter([batches[i] for i in (0, 2, 5)]), images_per_step=4)
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(clean.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # Three in a row is one more than the limit: stop, naming the count and the field.
  with pytest.raises(loop.TrainingDiverged, match=r"step 4 \(3 in a row; train.skip_nonfinite"
                                                  r"=2\)"):
    loop.fit(_toy_config(6, skip_nonfinite=2), str(tmp_path / "c"), mesh=_mesh(),
             create_model=_Toy, loss_fn=_toy_loss,
             data=_toy_batches([1, np.inf, np.inf, np.inf, 1, 1]), images_per_step=4)


def test_nonfinite_flags_are_read_at_log_steps_and_checkpoints_only(tmp_path, monkeypatch):
  """By default the host reads `finite` at log steps and checkpoints only (one transfer for
  the steps since the last read): a NaN at step 6 stops the run at step 8, naming step 6 and
  keeping checkpoint 4. `finite_check_every=1` reads every step one step late (the control:
  the counter sees the extra reads), stopping at step 7."""
  guards = []

  class Counted(loop._FiniteGuard):  # pylint: disable=protected-access
    def __init__(self, *args):
      super().__init__(*args)
      guards.append(self)

  monkeypatch.setattr(loop, "_FiniteGuard", Counted)
  scales = [1, 1, 1, 1, 1, np.inf, 1, 1, 1, 1, 1, 1]
  for every, reads in ((0, 2), (1, 6)):
    workdir = tmp_path / str(every)
    with pytest.raises(loop.TrainingDiverged, match=r"step 6 .*last good checkpoint is step 4"):
      loop.fit(_toy_config(12, log_every=4, checkpoint_every=4, finite_check_every=every),
               str(workdir), mesh=_mesh(), create_model=_Toy, loss_fn=_toy_loss,
               data=_toy_batches(scales), images_per_step=4)
    assert guards[-1].reads == reads, (every, guards[-1].reads)
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4]
    records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [4]


class _WiderToy(nnx.Module):
  """`_Toy` with another architecture: a hidden layer its checkpoints do not have."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(3, 1, rngs=rngs)
    self.extra = nnx.Linear(3, 2, rngs=rngs)


def test_a_checkpoint_of_another_architecture_is_a_config_error(tmp_path):
  loop.fit(_toy_config(2), str(tmp_path), mesh=_mesh(), create_model=_Toy, loss_fn=_toy_loss,
           data=_toy_batches([1, 1]), images_per_step=4)
  with pytest.raises(config_lib.ConfigError,
                     match=r"checkpoint 2 in .*checkpoints does not match this run's model"):
    loop.fit(_toy_config(4), str(tmp_path), mesh=_mesh(), create_model=_WiderToy,
             loss_fn=_toy_loss, data=_toy_batches([1, 1]), images_per_step=4)
