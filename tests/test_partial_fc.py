"""Partial FC (class-centre sampling) and the padded class axis of the stage-1 head.

The sampled softmax is checked against the full one: with every column kept it *is* the full
softmax (loss and gradients); with a sample, positives are always kept, negatives are drawn
uniformly per shard (inclusion frequencies over many draws, and the importance-weighted
partition function is the full one in expectation), and the gradient is the full-softmax
gradient of a softmax over exactly the kept columns, zero on every other column. Sharded over 8
fake devices the sample and the step are the same as unsharded, and no collective moves more
than `[batch]` vectors (the scores and centres are never gathered). Padding columns change
nothing: the loss, the gradients of real columns and the report are those of the unpadded head.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_fake_devices
from vigface_jax.evaluate import prototypes
from vigface_jax.models import margin

D, C, B = 16, 96, 12


def _problem(seed=0, num_classes=C, batch=B):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D, num_classes)).astype(np.float32)
  emb = rng.normal(size=(batch, D)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch).astype(np.int32)
  return jnp.asarray(w), jnp.asarray(emb), jnp.asarray(labels)


def _sampled_loss(w, emb, labels, rng, rate, shards, num_classes=None):
  num_classes = w.shape[1] if num_classes is None else num_classes
  cols = margin.sample_columns(rng, w, labels, num_classes=num_classes, sample_rate=rate,
                               num_shards=shards)
  y = margin.column_labels(labels, cols.ids)
  loss, _ = margin.margin_softmax_loss(emb, cols.centres, y, margin.arcface,
                                       valid_columns=cols.valid)
  return loss


def _reference_loss(w, emb, labels, ids):
  """ArcFace cross-entropy over the columns `ids` only, written out directly."""
  sub = w[:, ids]
  cos = (emb / jnp.linalg.norm(emb, axis=1, keepdims=True)) @ (
      sub / jnp.linalg.norm(sub, axis=0, keepdims=True))
  pos = jnp.searchsorted(jnp.asarray(ids), labels)
  t = jnp.clip(jnp.take_along_axis(cos, pos[:, None], axis=1)[:, 0], -1, 1)
  theta = jnp.arccos(t)
  target = jnp.where(t > np.cos(np.pi - 0.5), jnp.cos(theta + 0.5), t - np.sin(np.pi - 0.5) * 0.5)
  logits = 64.0 * cos.at[jnp.arange(len(labels)), pos].set(target)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(labels)), pos])


def test_rate_one_is_the_full_softmax():
  w, emb, labels = _problem()
  full = lambda w_: margin.margin_softmax_loss(emb, w_, labels, margin.arcface)[0]
  for shards in (1, 4):
    sampled = functools.partial(_sampled_loss, emb=emb, labels=labels, rng=jax.random.key(3),
                                rate=1.0, shards=shards)
    np.testing.assert_allclose(sampled(w), full(w), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(sampled)(w), jax.grad(full)(w), rtol=1e-5, atol=1e-7)


def test_positives_kept_and_negatives_uniform_per_shard():
  w, _, labels = _problem(1)
  shards, rate, draws = 4, 0.25, 600
  local = C // shards
  keep = margin.num_sampled_per_shard(C, shards, rate, B)
  assert keep == max(int(rate * local), B)
  sample = jax.jit(lambda r: margin.sample_columns(r, w, labels, num_classes=C,
                                                   sample_rate=rate, num_shards=shards).ids)
  counts = np.zeros(C)
  for i in range(draws):
    ids = np.asarray(sample(jax.random.key(i)))
    assert ids.shape == (shards * keep,) and np.all(np.diff(ids) > 0)
    assert set(np.asarray(labels)) <= set(ids)
    for m in range(shards):  # each shard keeps exactly `keep` of its own columns
      assert np.sum((ids >= m * local) & (ids < (m + 1) * local)) == keep
    counts[ids] += 1
  positives = np.unique(np.asarray(labels))
  assert np.all(counts[positives] == draws)
  for m in range(shards):
    block = np.arange(m * local, (m + 1) * local)
    neg = np.setdiff1d(block, positives)
    p = (keep - (block.size - neg.size)) / neg.size  # the negatives' inclusion probability
    freq = counts[neg] / draws
    sd = np.sqrt(p * (1 - p) / draws)
    assert abs(freq.mean() - p) < 4 * sd / np.sqrt(neg.size), (m, freq.mean(), p)
    assert np.max(np.abs(freq - p)) < 5 * sd, (m, freq, p)


def test_importance_weighted_partition_function_is_unbiased():
  """E[exp(target) + Σ_sampled neg exp(l) / p] = Σ_all exp(l) for each row (one shard)."""
  w, emb, labels = _problem(2, batch=1)
  rate = 0.2
  logits = np.asarray(margin.arcface(margin.cosines(emb, margin.l2_normalize(w, axis=0)),
                                     labels, s=4.0))[0]
  full = np.exp(logits).sum()
  keep = margin.num_sampled_per_shard(C, 1, rate, 1)
  p = (keep - 1) / (C - 1)
  sample = jax.jit(lambda r: margin.sample_columns(r, w, labels, num_classes=C,
                                                   sample_rate=rate).ids)
  y = int(labels[0])
  est = []
  for i in range(2000):
    ids = np.asarray(sample(jax.random.key(100 + i)))
    neg = ids[ids != y]
    est.append(np.exp(logits[y]) + np.exp(logits[neg]).sum() / p)
  est = np.asarray(est)
  assert abs(est.mean() - full) < 4 * est.std() / np.sqrt(len(est)), (est.mean(), full)
  # The control: without the 1/p weight the estimate is far off.
  assert abs(np.mean(est - np.exp(logits[y])) * p + np.exp(logits[y]) - full) > 0.3 * full


def test_gradient_is_the_kept_columns_softmax_and_zero_elsewhere():
  w, emb, labels = _problem(3)
  rng = jax.random.key(7)
  shards, rate = 4, 0.3
  ids = np.asarray(margin.sample_columns(rng, w, labels, num_classes=C, sample_rate=rate,
                                         num_shards=shards).ids)
  loss_fn = functools.partial(_sampled_loss, emb=emb, labels=labels, rng=rng, rate=rate,
                              shards=shards)
  ref_fn = functools.partial(_reference_loss, emb=emb, labels=labels, ids=ids)
  np.testing.assert_allclose(loss_fn(w), ref_fn(w), rtol=1e-5)
  g, g_ref = np.asarray(jax.grad(loss_fn)(w)), np.asarray(jax.grad(ref_fn)(w))
  np.testing.assert_allclose(g[:, ids], g_ref[:, ids], rtol=1e-4, atol=1e-6)
  others = np.setdiff1d(np.arange(C), ids)
  assert others.size and np.all(g[:, others] == 0)
  assert np.all(np.abs(g[:, ids]).sum(0) > 0)
  # The full softmax's gradient differs on the kept columns (the sample changed the problem).
  g_full = np.asarray(jax.grad(lambda w_: margin.margin_softmax_loss(
      emb, w_, labels, margin.arcface)[0])(w))
  assert not np.allclose(g_full[:, ids], g[:, ids], rtol=1e-3)


def test_padding_columns_change_nothing():
  w, emb, labels = _problem(4, num_classes=C - 5)
  padded = jnp.concatenate([w, 10.0 * emb[:5].T], axis=1)  # padding on five rows' embeddings
  valid = jnp.arange(C) < C - 5
  plain = lambda w_: margin.margin_softmax_loss(emb, w_, labels, margin.arcface)[0]
  masked = lambda w_: margin.margin_softmax_loss(emb, w_, labels, margin.arcface,
                                                 valid_columns=valid)[0]
  np.testing.assert_allclose(masked(padded), plain(w), rtol=1e-6)
  g = np.asarray(jax.grad(masked)(padded))
  np.testing.assert_allclose(g[:, :C - 5], jax.grad(plain)(w), rtol=1e-5, atol=1e-7)
  assert np.all(g[:, C - 5:] == 0)
  # The control: without the mask the padding takes probability.
  unmasked = margin.margin_softmax_loss(emb, padded, labels, margin.arcface)[0]
  assert float(unmasked) > float(plain(w)) + 1.0
  # Sampling never keeps padding while a shard has valid columns left, and masks what it keeps.
  cols = margin.sample_columns(jax.random.key(0), padded, labels, num_classes=C - 5,
                               sample_rate=0.25, num_shards=4)
  ids, ok = np.asarray(cols.ids), np.asarray(cols.valid)
  assert np.all(ok == (ids < C - 5)) and np.all(ok)


def test_report_drops_padding_and_large_heads_use_the_sharded_search(tmp_path):
  rng = np.random.default_rng(5)
  n, k = 300, 200
  x = rng.normal(size=(D, n + k)).astype(np.float32)
  x[:, n + 3] = x[:, 7]  # a leaked virtual row, so the nearest-real figures are not trivial
  padded = np.concatenate([x, rng.normal(size=(D, 12)).astype(np.float32)], axis=1)
  report = prototypes.write_report(tmp_path, jnp.asarray(padded), n, num_classes=n + k)
  saved = np.load(tmp_path / "prototypes.npz")
  assert saved["real"].shape == (n, D) and saved["virtual"].shape == (k, D)
  host = prototypes.separability(x, n)
  assert report["virtual_real"] == host["virtual_real"]
  # The device path (forced by a low threshold): the same nearest neighbours and verdict.
  dev = prototypes.separability(x, n, device_above=100, pair_sample=400, seed=1)
  for key in ("nearest_real_index", "nearest_index"):
    np.testing.assert_array_equal(dev["per_row"][key], host["per_row"][key])
  for key in ("nearest_real_cosine", "nearest_cosine"):
    np.testing.assert_allclose(dev["per_row"][key], host["per_row"][key], atol=1e-6)
  assert dev["verdict"]["passed"] == host["verdict"]["passed"]
  for key in ("virtual_nearest_real_p99", "real_nearest_real_median"):
    assert dev["verdict"][key] == pytest.approx(host["verdict"][key], abs=1e-6)
  assert dev["nearest_real_to_virtual"]["max"] == pytest.approx(1.0, abs=1e-6)  # the leak
  assert dev["pairs_from"]["rows"] == 400 and host["pairs_from"]["rows"] == n + k
  pairs = dev["virtual_real"]["pairs"] + dev["real_real"]["pairs"] + dev["virtual_virtual"][
      "pairs"]
  assert pairs == 400 * 399 // 2
  assert dev["real_real"]["mean"] == pytest.approx(host["real_real"]["mean"], abs=0.02)


_SHARDED = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np, ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
from vigface_jax import parallel
from vigface_jax.models import face_recognizer, margin
from vigface_jax.train import fr

mesh = parallel.create_mesh(("data", "fsdp", "model"), (1, 1, 8))
logits_sharding = parallel.logical_sharding(mesh, ("head_batch", "classes"), parallel.FR_RULES)
centres = NamedSharding(mesh, P(None, "model"))
out = {}

# The sample over 8 blocks, on one device and with the class axis over 8 devices.
d, classes, b = 16, 392, 24
rng = np.random.default_rng(0)
w = jnp.asarray(rng.normal(size=(d, classes)), jnp.float32)
emb = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
labels = jnp.asarray(rng.integers(0, classes - 3, b), jnp.int32)

def loss(w_, sharding, shards):
  cols = margin.sample_columns(jax.random.key(9), w_, labels, num_classes=classes - 3,
                               sample_rate=0.25, num_shards=shards, logits_sharding=sharding)
  y = margin.column_labels(labels, cols.ids)
  return margin.margin_softmax_loss(emb, cols.centres, y, margin.arcface, sharding,
                                    valid_columns=cols.valid)[0]

l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, sharding=None, shards=8)))(w)
l8, g8 = jax.jit(jax.value_and_grad(functools.partial(loss, sharding=logits_sharding,
                                                      shards=None)))(jax.device_put(w, centres))
# The control for the gather check below: the same sample with the centres sharded but the
# top_k left to XLA (no shard_map) all-gathers the [8, 49] block scores.
def gathers_of(compiled):
  return [line.strip()[:200] for line in compiled.as_text().splitlines() if "all-gather(" in line]
control = jax.jit(jax.grad(functools.partial(loss, sharding=None, shards=8))).lower(
    jax.device_put(w, centres)).compile()
out.update(control_gathers=gathers_of(control))
out.update(l1=float(l1), l8=float(l8), gdiff=float(jnp.max(jnp.abs(g1 - g8))),
           kept=int((np.abs(np.asarray(g8)).sum(0) > 0).sum()),
           keep=margin.num_sampled_per_shard(classes, 8, 0.25, b))

# fr_loss on 8 devices: 250 real + 141 virtual = 391 classes, padded to 392; virtual rows too.
n, k = 250, 141
cfg = ml_collections.ConfigDict({
    "margin": {"name": "arcface", "s": 32.0, "m": 0.3, "sample_rate": 0.25},
    "virtual": {"per_step": 6, "alpha": 0.9}, "model": {"class_multiple": None},
    "sharding_rules": parallel.FR_RULES})
pad = fr.class_padding(cfg, mesh, n + k)
model = face_recognizer.FaceRecognizer("tiny", embed_dim=d, num_real=n, num_virtual=k,
                                       num_padding=pad, input_size=32, rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
replicated = NamedSharding(mesh, P())
shardings = jax.tree_util.tree_map_with_path(
    lambda path, _: centres if "'head'" in str(path) and "'weight'" in str(path) else replicated,
    params)
params = jax.device_put(params, shardings)
batch = {"image": jnp.asarray(rng.integers(0, 255, (16, 112, 112, 3)), jnp.uint8),
         "label": jnp.asarray(rng.integers(0, n, 16), jnp.int32)}

def step(p, r):
  def f(p_):
    return fr.fr_loss(nnx.merge(graphdef, p_, r, copy=True), batch, jax.random.key(4), cfg=cfg,
                      logits_sharding=logits_sharding)
  (l, metrics), g = jax.value_and_grad(f, has_aux=True)(p)
  return l, metrics["sampled_classes"], g["head"]["weight"][...]

rest = jax.device_put(rest, replicated)
compiled = jax.jit(step).lower(params, rest).compile()
l, sampled, g = compiled(params, rest)
g = np.asarray(g)
gathers = gathers_of(compiled)
out.update(pad=pad, loss=float(l), sampled=float(sampled),
           kept_fr=int((np.abs(g).sum(0) > 0).sum()), pad_grad=float(np.abs(g[:, n + k:]).sum()),
           weight_shape=list(g.shape), gathers=gathers)
print(json.dumps(out))
print("OK")
"""


def test_sampled_step_sharded_over_eight_devices():
  """The 8-block sample is the same on one device and with the class axis over 8 devices; the
  stage-1 loss with a padded head and virtual rows steps there, keeps every positive, gives
  padding no gradient, and its program gathers neither scores nor centres."""
  import json
  out = run_on_fake_devices(_SHARDED, num_devices=8, timeout=600)
  r = json.loads(out.strip().splitlines()[-2])
  assert r["l1"] == pytest.approx(r["l8"], rel=1e-5) and r["gdiff"] < 1e-5
  assert r["kept"] == 8 * r["keep"]
  assert r["pad"] == 1 and r["weight_shape"] == [16, 392]
  assert np.isfinite(r["loss"]) and r["pad_grad"] == 0.0
  assert r["kept_fr"] == r["sampled"] == 8 * margin.num_sampled_per_shard(392, 8, 0.25, 22)
  # Only the data-parallel backbone's [b, ...] activations may be gathered: nothing with the
  # class axis (392 columns, 49 per shard). The control shows the check catching XLA's own
  # TopK partitioning, which gathers every block's scores.
  class_sized = lambda lines: [g for g in lines if "392" in g or ",49]" in g or "[49" in g]
  assert not class_sized(r["gathers"]), r["gathers"]
  assert class_sized(r["control_gathers"]), r["control_gathers"]


_RUN = r"""
import json, sys, tempfile
import numpy as np
from configs import fr as fr_config
from vigface_jax import main
config = fr_config.get_config("tiny")
config.mesh.shape = (1, 1, 8)
config.virtual.num_virtual = 981  # 16 + 981 = 997 centres: 3 padding columns for 8 devices
config.virtual.per_step = 4
config.margin.sample_rate = 0.5
workdir = tempfile.mkdtemp()
summary = main.run(config, workdir)
with np.load(workdir + "/prototypes.npz") as npz:
  shapes = {key: list(npz[key].shape) for key in ("real", "virtual", "nearest_index")}
  nearest = int(npz["nearest_index"].max())
metrics = [json.loads(l) for l in open(workdir + "/metrics.jsonl")]
sampled = [m["train/sampled_classes"] for m in metrics if "train/sampled_classes" in m]
print(json.dumps({"pad": summary["num_padding"], "loss": summary["train/loss"],
                  "shapes": shapes, "nearest": nearest, "sampled": sampled}))
print("OK")
"""


def test_stage1_run_with_padding_and_partial_fc_on_eight_devices():
  """`configs/fr.py:tiny` with a class count the model axis does not divide and Partial FC:
  it trains, and the report and export hold exactly the real and virtual rows."""
  import json
  out = run_on_fake_devices(_RUN, num_devices=8, timeout=600)
  r = json.loads(out.strip().splitlines()[-2])
  assert r["pad"] == 3 and np.isfinite(r["loss"])
  assert r["shapes"] == {"real": [16, 32], "virtual": [981, 32], "nearest_index": [997]}
  assert r["nearest"] < 997  # no row's nearest neighbour is a padding column
  # 8 shards of 125 columns (1,000 with padding), each keeping int(0.5 * 125) = 62 (more than
  # the step's 8 + 4 rows), all valid: the last shard has 122 valid columns.
  assert r["sampled"] and all(s == 8 * 62 for s in r["sampled"]), r["sampled"]
